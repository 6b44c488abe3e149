"""SuperSimpleNet: a frozen backbone, feature-space synthetic anomalies and two light heads (Rolih et al., ICPR 2024;
"No Label Left Behind", JIMS 2025). One model for every supervision regime: unlabelled, image-labelled and
pixel-labelled rows each train what they can (see :mod:`.loss`).

Importing this package registers the ``supersimplenet`` family; its benchmark (``bench``) is imported on demand by
its hook, so loading a detector never imports onnx.
"""

from __future__ import annotations

from typing import Any

from components.models.registry import Family, register
from components.models.supersimplenet.anomaly import AnomalyGenerator, SyntheticBatch, perlin_mask
from components.models.supersimplenet.detector import (
    SuperSimpleNetDetector,
    SuperSimpleNetParams,
    default_postprocessing,
    default_preprocessing,
)
from components.models.supersimplenet.loss import SuperSimpleNetLossParams, SuperSimpleNetObjective
from components.models.supersimplenet.model import FeatureAggregator, SuperSimpleNetHeads

__all__ = [
    "AnomalyGenerator",
    "FeatureAggregator",
    "SuperSimpleNetDetector",
    "SuperSimpleNetHeads",
    "SuperSimpleNetLossParams",
    "SuperSimpleNetObjective",
    "SuperSimpleNetParams",
    "SyntheticBatch",
    "perlin_mask",
]


def _bench(**kwargs: Any) -> dict[str, Any]:
    from components.models.supersimplenet.bench import bench

    return bench(**kwargs)


register(Family(
    name="supersimplenet",
    detector_cls=SuperSimpleNetDetector,
    params_model=SuperSimpleNetParams,
    loss_model=SuperSimpleNetLossParams,
    objective=SuperSimpleNetObjective,
    default_preprocessing=default_preprocessing,
    default_postprocessing=default_postprocessing,
    description="SuperSimpleNet: frozen ImageNet backbone, upscaled layer2+layer3 features, Perlin-masked Gaussian "
                "feature noise, segmentation + classification heads; trains on any mix of unlabelled, "
                "image-labelled and pixel-labelled images.",
    needs_masks=False,
    bench=_bench,
    paper={"gpu_latency_ms": 9.3, "gpu_throughput": 268, "gflops": 56.3, "input": 256,
           "hardware": "Tesla V100S, FP16, wide_resnet50_2"},
))
