"""Size and speed measurements for ``defectflow bench`` (plain functions, no Ray, no timed asserts).

Throughput is measured at batch 1 because that is how a line camera feeds a detector; the thread count is set
explicitly so numbers from different machines (and from the paper's "CPU FPS") can be compared. ONNX numbers run
the graph :mod:`components.export` writes (the same exporter and parity check as ``defectflow export``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from components.export import ONNX_INPUT, eval_mode, export_onnx, onnx_session

log = logging.getLogger(__name__)

__all__ = ["count_flops", "count_parameters", "cpu_throughput", "machine", "measure_detector", "onnx_throughput",
           "variant_label"]


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@contextlib.contextmanager
def _threads(threads: int | None) -> Iterator[None]:
    if not threads:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def count_flops(module: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """FLOPs of one eval forward pass as counted by torch's FlopCounterMode (convolutions and matmuls only;
    BatchNorm, activations and resizes are not counted). MACs = FLOPs / 2, the unit thop-style papers report."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(*input_shape, device=_device(module))
    with eval_mode(module), torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(x)
    flops = int(counter.get_total_flops())
    return {"flops": flops, "macs": flops // 2}


def cpu_throughput(module: nn.Module, input_shape: Sequence[int], warmup: int = 5, iters: int = 20,
                   threads: int | None = None) -> float:
    """Eager images per second (``input_shape`` includes the batch dimension; use batch 1 for latency-bound FPS)."""
    x = torch.rand(*input_shape)
    module = module.to("cpu")
    with eval_mode(module), _threads(threads), torch.inference_mode():
        for _ in range(warmup):
            module(x)
        start = time.perf_counter()
        for _ in range(iters):
            module(x)
        elapsed = time.perf_counter() - start
    return iters * int(input_shape[0]) / elapsed


def onnx_throughput(path: str | os.PathLike, input_shape: Sequence[int] | None = None, warmup: int = 5,
                    iters: int = 20, threads: int | None = None) -> float:
    """onnxruntime images per second; ``input_shape`` defaults to the exported (fixed) input shape."""
    import numpy as np

    session = onnx_session(path, threads)
    if input_shape is None:
        input_shape = [int(d) for d in session.get_inputs()[0].shape]
    x = np.random.default_rng(0).random(tuple(input_shape), dtype=np.float32)
    feed = {ONNX_INPUT: x}
    for _ in range(warmup):
        session.run(None, feed)
    start = time.perf_counter()
    for _ in range(iters):
        session.run(None, feed)
    elapsed = time.perf_counter() - start
    return iters * int(input_shape[0]) / elapsed


def variant_label(override: dict[str, Any], prefix: str = "") -> str:
    """``{"n": 2, "backbone": {"name": "resnet18"}}`` -> ``"n=2,backbone.name=resnet18"`` (a bench row's name)."""
    parts = []
    for k, v in override.items():
        key = f"{prefix}{k}"
        parts.append(variant_label(v, key + ".") if isinstance(v, dict) and v else f"{key}={v}")
    return ",".join(parts)


def machine() -> dict[str, Any]:
    """The hardware and software a benchmark ran on, recorded beside its figures."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version()}


def measure_detector(detector: nn.Module, size: int, *, iters: int, threads: int | None, onnx: bool,
                     flops_of: nn.Module | None = None) -> dict[str, Any]:
    """One benchmark row for a Detector at ``size``x``size``, batch 1: FLOPs/MACs (of ``flops_of``, default the whole
    Detector), eager images/s, and, with ``onnx``, onnxruntime images/s of its exported graph with the exporter used
    and the export's parity figures."""
    shape = (1, 3, size, size)
    fl = count_flops(flops_of if flops_of is not None else detector, shape)
    eager = cpu_throughput(detector, shape, warmup=3, iters=iters, threads=threads)
    row: dict[str, Any] = {"gflops": round(fl["flops"] / 1e9, 4), "gmacs": round(fl["macs"] / 1e9, 4),
                           "eager_fps": round(eager, 2), "eager_ms": round(1000.0 / eager, 2)}
    if onnx:
        with tempfile.TemporaryDirectory(prefix="defectflow-bench-") as d:
            res = export_onnx(detector, os.path.join(d, "model.onnx"), (size, size), allow_mismatch=True)
            ort = onnx_throughput(res.uri, warmup=3, iters=iters, threads=threads)
        diff = max(res.parity["score_max_abs_diff"], res.parity["anomaly_map_max_abs_diff"])
        row.update({"onnx_fps": round(ort, 2), "onnx_ms": round(1000.0 / ort, 2), "onnx_exporter": res.exporter,
                    "onnx_max_abs_diff": float(f"{diff:.3g}")})
    return row
