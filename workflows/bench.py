"""bench: size and speed of a model, written down as JSON + Markdown (never asserted in tests).

    defectflow bench gmbinet [--size 512] [--n 1 --n 2 --n 4 --n 8] [--out ./defectflow-data/reports/bench]

GMBINet: parameters, FLOPs (torch.utils.flop_counter: convolutions and matmuls) and MACs, CPU images/s at batch 1
for the whole Detector graph (pre/post-processing included) in eager PyTorch and in ONNX Runtime. The paper reports
0.19 M parameters, 0.39 GFLOPs and 16.53 FPS on a CPU at 512x512.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import tempfile
import time
from typing import Any

from components import report, storage

log = logging.getLogger("defectflow.bench")

PAPER_GMBINET = {"params_m": 0.19, "gflops": 0.39, "cpu_fps": 16.53, "gpu_fps": 1048, "input": 512}


def machine() -> dict[str, Any]:
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version()}


def bench_gmbinet(size: int = 512, ns: list[int] | None = None, iters: int = 30, threads: int | None = None,
                  onnx: bool = True) -> dict[str, Any]:
    import torch

    from components.models import registry
    from components.models.gmbinet import profile

    if threads:
        torch.set_num_threads(threads)
    rows = []
    for n in ns or [4]:
        det = registry.create_detector("gmbinet", {"n": n}, {"input_size": (size, size)})
        det.eval()
        params = profile.count_parameters(det)
        fl = profile.count_flops(det.net, (1, 3, size, size))
        log.info("GMBINet n=%d: %d parameters, %.3f GFLOPs; timing %d iterations", n, params, fl["flops"] / 1e9,
                 iters)
        eager = profile.cpu_throughput(det, (1, 3, size, size), warmup=3, iters=iters, threads=threads)
        row: dict[str, Any] = {"n": n, "params": params, "params_m": round(params / 1e6, 4),
                               "gflops": round(fl["flops"] / 1e9, 4), "gmacs": round(fl["macs"] / 1e9, 4),
                               "eager_fps": round(eager, 2), "eager_ms": round(1000.0 / eager, 2)}
        if onnx:
            with tempfile.TemporaryDirectory() as d:
                path = profile.onnx_export(det, os.path.join(d, "gmbinet.onnx"), (size, size))
                ort = profile.onnx_throughput(path, warmup=3, iters=iters, threads=threads)
            row.update({"onnx_fps": round(ort, 2), "onnx_ms": round(1000.0 / ort, 2)})
        rows.append(row)
    return {"target": "gmbinet", "input": [1, 3, size, size], "iters": iters, "machine": machine(),
            "results": rows, "paper": PAPER_GMBINET,
            "notes": "FLOPs count convolutions/matmuls of the network (torch FlopCounterMode); MACs = FLOPs/2, the "
                     "unit thop-based papers call FLOPs. FPS: batch 1, whole Detector graph including resize and "
                     "normalisation, no I/O."}


def to_markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [f"# Benchmark: {res['target']}", "",
             f"Machine: {m['processor']}, {m['cpus']} CPUs, torch {m['torch']} ({m['torch_threads']} threads), "
             f"Python {m['python']}. Input {tuple(res['input'])}, {res['iters']} timed iterations.", "",
             report.markdown_table(res["results"]), ""]
    p = res.get("paper")
    if p:
        lines += [f"Paper (GMBINet, arXiv 2508.16397): {p['params_m']} M parameters, {p['gflops']} GFLOPs, "
                  f"{p['cpu_fps']} FPS on a CPU and {p['gpu_fps']} FPS on a GPU at {p['input']}x{p['input']} "
                  "(hardware not stated).", ""]
    lines.append(res.get("notes", ""))
    return "\n".join(lines) + "\n"


def run_cli(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.time()
    res = bench_gmbinet(size=args.size, ns=args.n, iters=args.iters, threads=args.threads, onnx=not args.no_onnx)
    res["seconds"] = round(time.time() - t0, 1)
    out = storage.normalize(args.out)
    storage.write_json(storage.join(out, f"{res['target']}.json"), res)
    storage.write_text(storage.join(out, f"{res['target']}.md"), to_markdown(res))
    print(to_markdown(res))
    print(f"written: {storage.join(out, res['target'] + '.json')} and .md")
    return res


def main(argv: list[str] | None = None) -> int:
    from workflows.cli import run_command

    return run_command("bench", argv)


if __name__ == "__main__":
    raise SystemExit(main())
