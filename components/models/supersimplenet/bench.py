"""SuperSimpleNet's ``defectflow bench`` hook: parameters, FLOPs, batch-1 latency (eager and ONNX Runtime) and the
training-epoch speed-up of cached backbone features, per head configuration.

The default variants are the paper's heads (1024/128) and the narrower CPU config heads (256/64), both on
efficientnet_lite0 with its offline ImageNet weights; a variant is a params override on top of that (e.g.
``backbone.name=resnet18,backbone.weights=random``). Imported on demand by the family's ``bench`` hook.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from components import profiling
from components.config import deep_merge
from components.models import registry

log = logging.getLogger(__name__)


def paper_note(paper: dict[str, Any]) -> str:
    """The family's published figures (``Family.paper``, GPU only) as the sentence a bench report prints."""
    return (f"Paper (SuperSimpleNet, JIMS/ICPR code): {paper['gpu_latency_ms']} ms batch-1 latency, "
            f"~{paper['gpu_throughput']} img/s at batch 16, {paper['gflops']} GFLOPs at {paper['input']}x"
            f"{paper['input']} on {paper['hardware']}; no CPU figure is published.")


DEFAULT_SIZE = 256
BASE_PARAMS: dict[str, Any] = {"backbone": {"name": "efficientnet_lite0", "weights": "offline"}}
DEFAULT_VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("paper heads (1024/128)", {}),
    ("CPU config heads (256/64)", {"seg_hidden": 256, "cls_hidden": 64}),
]


def _timed_epoch(det: Any, objective: Any, arrays: dict[str, Any], use_features: bool, batch_size: int) -> float:
    """Seconds for one pass of training steps over ``arrays`` (no Ray: the compute a Train worker does)."""
    import torch

    from components.data.loading import to_batch

    opt = torch.optim.AdamW(objective.param_groups(det, 2e-4, 0.0), lr=2e-4)
    det.train()
    n = len(arrays["label"])
    t0 = time.perf_counter()
    for i in range(0, n, batch_size):
        part = {k: v[i:i + batch_size] for k, v in arrays.items() if k != "sample_id"}
        if not use_features:
            part.pop("features", None)
        else:
            part.pop("image", None)
        loss, _ = objective(det, to_batch(part))
        opt.zero_grad()
        loss.backward()
        opt.step()
    det.eval()
    return time.perf_counter() - t0


def bench(size: int | None = None, iters: int = 20, threads: int | None = None, onnx: bool = True,
          variants: list[dict[str, Any]] | None = None, epoch_images: int = 32) -> dict[str, Any]:
    import numpy as np
    import torch

    from components.data import adapters
    from components.data.loading import prepare_rows

    size = size or DEFAULT_SIZE
    paper = registry.get("supersimplenet").paper
    if threads:
        torch.set_num_threads(threads)
    table = adapters.ingest("procedural", None, options={"count": epoch_images, "size": size, "seed": 0,
                                                         "defect_fraction": 0.5})
    arrays = prepare_rows(table.to_pylist(), (size, size))
    named = ([(profiling.variant_label(v) or "default", v) for v in variants] if variants is not None
             else DEFAULT_VARIANTS)
    rows = []
    for label, override in named:
        det = registry.create_detector("supersimplenet", deep_merge(BASE_PARAMS, override),
                                       {"input_size": (size, size)}).eval()
        counts = det.parameter_counts()
        log.info("SuperSimpleNet %s: %d trainable parameters; timing", label, counts["trainable"])
        row: dict[str, Any] = {"variant": label, "backbone": det.params.backbone.name,
                               "trainable_params": counts["trainable"], "backbone_params": counts["backbone"]}
        row.update(profiling.measure_detector(det, size, iters=iters, threads=threads, onnx=onnx))
        objective = registry.create_objective("supersimplenet", {})
        t0 = time.perf_counter()
        with torch.inference_mode():
            x = torch.from_numpy(arrays["image"]).float() / 255.0
            feats = np.concatenate([det.extract(det.preprocess(x[i:i + 8])).numpy() for i in range(0, len(x), 8)])
        extract_s = time.perf_counter() - t0
        data = {**arrays, "features": feats}
        cached = _timed_epoch(det, objective, data, True, 8)
        pixels = _timed_epoch(det, objective, data, False, 8)
        row.update({"feature_extraction_img_s": round(epoch_images / extract_s, 2),
                    "epoch_from_features_s": round(cached, 2), "epoch_from_pixels_s": round(pixels, 2),
                    "epoch_speedup": round(pixels / cached, 2)})
        rows.append(row)
    return {"target": "supersimplenet", "input": [1, 3, size, size], "iters": iters, "machine": profiling.machine(),
            "epoch_images": epoch_images, "results": rows, "paper": paper, "paper_note": paper_note(paper),
            "notes": "Default backbone efficientnet_lite0 with its offline ImageNet weights (the paper: "
                     "wide_resnet50_2 on a GPU). Latency: batch 1, whole Detector graph (resize, normalise, backbone, "
                     "heads, upsample, blur sigma 4), no I/O; ONNX: the `defectflow export` graph. Epochs: training "
                     "steps (batch 8) over the same procedural images, from cached features vs end to end from "
                     "pixels, in-process (the work of one Train worker)."}
