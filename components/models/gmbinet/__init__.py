"""GMBINet: a 0.19 M-parameter supervised defect segmenter (Zhang et al., arXiv 2508.16397).

Importing this package registers the ``gmbinet`` family. The weight converter (``convert``) and the benchmark
(``bench``) are imported on demand by their hooks, so loading a detector never pulls in the artifact or ONNX
machinery.
"""

from __future__ import annotations

from typing import Any

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


def _import_weights(checkpoint_uri: str, out_uri: str) -> str:
    from components.models.gmbinet.convert import import_authors_checkpoint

    return import_authors_checkpoint(checkpoint_uri, out_uri)


def _bench(**kwargs: Any) -> dict[str, Any]:
    from components.models.gmbinet.bench import bench

    return bench(**kwargs)


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
    import_weights=_import_weights,
    bench=_bench,
    paper={"params_m": 0.19, "gflops": 0.39, "cpu_fps": 16.53, "gpu_fps": 1048, "input": 512,
           "source": "arXiv 2508.16397"},
))
