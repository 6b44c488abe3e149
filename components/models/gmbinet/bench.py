"""GMBINet's ``defectflow bench`` hook: parameters, FLOPs/MACs and CPU images/s per scale dimension ``n``.

FLOPs are counted on the network alone (torch FlopCounterMode: convolutions and matmuls), as the paper counts
them; speed is the whole Detector graph (resize, normalisation, network, upsampling) at batch 1, eager PyTorch and
ONNX Runtime on the graph ``defectflow export`` writes. Imported on demand by the family's ``bench`` hook, so
loading a detector never imports onnx.
"""

from __future__ import annotations

import logging
from typing import Any

from components import profiling
from components.models import registry

log = logging.getLogger(__name__)


def paper_note(paper: dict[str, Any]) -> str:
    """The family's published figures (``Family.paper``) as the sentence a bench report prints."""
    return (f"Paper (GMBINet, {paper['source']}): {paper['params_m']} M parameters, {paper['gflops']} GFLOPs, "
            f"{paper['cpu_fps']} FPS on a CPU and {paper['gpu_fps']} FPS on a GPU at {paper['input']}x"
            f"{paper['input']} (hardware not stated).")


DEFAULT_SIZE = 512
DEFAULT_VARIANTS: list[dict[str, Any]] = [{"n": 4}]


def bench(size: int | None = None, iters: int = 30, threads: int | None = None, onnx: bool = True,
          variants: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One row per variant (a params override, default ``n=4``) at ``size``x``size`` (default 512, the paper's)."""
    import torch

    size = size or DEFAULT_SIZE
    paper = registry.get("gmbinet").paper
    if threads:
        torch.set_num_threads(threads)
    rows = []
    for override in variants or DEFAULT_VARIANTS:
        det = registry.create_detector("gmbinet", override, {"input_size": (size, size)}).eval()
        params = profiling.count_parameters(det)
        label = profiling.variant_label(override) or "default"
        log.info("GMBINet %s: %d parameters; timing %d iterations", label, params, iters)
        row: dict[str, Any] = {"variant": label, "n": det.params.n, "params": params,
                               "params_m": round(params / 1e6, 4)}
        row.update(profiling.measure_detector(det, size, iters=iters, threads=threads, onnx=onnx, flops_of=det.net))
        rows.append(row)
    return {"target": "gmbinet", "input": [1, 3, size, size], "iters": iters, "machine": profiling.machine(),
            "results": rows, "paper": paper, "paper_note": paper_note(paper),
            "notes": "FLOPs count convolutions/matmuls of the network (torch FlopCounterMode); MACs = FLOPs/2, the "
                     "unit thop-based papers call FLOPs. FPS: batch 1, whole Detector graph including resize and "
                     "normalisation, no I/O. ONNX: the `defectflow export` graph (onnx_exporter, and its largest "
                     "|ONNX - eager| difference, onnx_max_abs_diff)."}
