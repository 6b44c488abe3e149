"""Size and speed measurements for ``defectflow bench`` (plain functions, no Ray, no timed asserts).

Throughput is measured at batch 1 because that is how a line camera feeds a detector; the thread count is set
explicitly so numbers from different machines (and from the paper's "CPU FPS") can be compared.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

ONNX_OPSET = 17
ONNX_INPUT = "images"
ONNX_OUTPUTS = ("score", "anomaly_map")


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@contextlib.contextmanager
def _eval(module: nn.Module) -> Iterator[nn.Module]:
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


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
    with _eval(module), torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(x)
    flops = int(counter.get_total_flops())
    return {"flops": flops, "macs": flops // 2}


def cpu_throughput(module: nn.Module, input_shape: Sequence[int], warmup: int = 5, iters: int = 20,
                   threads: int | None = None) -> float:
    """Eager images per second (``input_shape`` includes the batch dimension; use batch 1 for latency-bound FPS)."""
    x = torch.rand(*input_shape)
    module = module.to("cpu")
    with _eval(module), _threads(threads), torch.inference_mode():
        for _ in range(warmup):
            module(x)
        start = time.perf_counter()
        for _ in range(iters):
            module(x)
        elapsed = time.perf_counter() - start
    return iters * int(input_shape[0]) / elapsed


def onnx_export(detector: nn.Module, path: str | os.PathLike, input_size: Sequence[int]) -> str:
    """Export the whole Detector (pre- and post-processing included) at a fixed input size.

    ``images`` (1, 3, H, W) float in [0, 1] -> ``score`` (1,), ``anomaly_map`` (1, 1, H, W). The TorchScript-based
    exporter is used: it needs no extra package (the dynamo exporter wants ``onnxscript``) and handles this graph.
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    h, w = (int(s) for s in input_size)
    dummy = torch.rand(1, 3, h, w)
    detector = detector.to("cpu")
    with _eval(detector), torch.no_grad(), warnings.catch_warnings():
        # shape checks become constants in the trace: intended, the export is for one fixed size
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(detector, (dummy,), path, input_names=[ONNX_INPUT], output_names=list(ONNX_OUTPUTS),
                          opset_version=ONNX_OPSET, dynamo=False)
    log.info("exported ONNX model (%dx%d) to %s", h, w, path)
    return path


def onnx_session(path: str | os.PathLike, threads: int | None = None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(os.fspath(path), sess_options=opts, providers=["CPUExecutionProvider"])


def onnx_run(session: Any, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(score, anomaly_map) from an onnxruntime session, as torch tensors."""
    score, amap = session.run(list(ONNX_OUTPUTS), {ONNX_INPUT: images.detach().cpu().float().numpy()})
    return torch.from_numpy(score), torch.from_numpy(amap)


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
