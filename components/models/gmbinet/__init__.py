"""GMBINet: a 0.19 M-parameter supervised defect segmenter (Zhang et al., arXiv 2508.16397).

Importing this package registers the ``gmbinet`` family. The weight converter (``convert``) and the bench helpers
(``profile``) are imported on demand, so loading a detector never pulls in the artifact or ONNX machinery.
"""

from __future__ import annotations

from components.models.gmbinet.detector import (
    GMBINetDetector,
    GMBINetParams,
    default_postprocessing,
    default_preprocessing,
)
from components.models.gmbinet.loss import GMBINetLossParams, GMBINetObjective
from components.models.gmbinet.model import GMBINet
from components.models.registry import Family, register

__all__ = ["GMBINet", "GMBINetDetector", "GMBINetLossParams", "GMBINetObjective", "GMBINetParams"]

register(Family(
    name="gmbinet",
    detector_cls=GMBINetDetector,
    params_model=GMBINetParams,
    loss_model=GMBINetLossParams,
    objective=GMBINetObjective,
    default_preprocessing=default_preprocessing,
    default_postprocessing=default_postprocessing,
    description="GMBINet: lightweight supervised segmenter with group multi-scale bidirectional interaction "
                "modules and 5 deeply supervised side outputs; trains on pixel masks (BCE + Dice).",
    needs_masks=True,
))
