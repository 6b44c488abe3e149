"""bench: size and speed of a model, written down as JSON + Markdown (never asserted in tests).

    defectflow bench gmbinet [--size 512] [--n 1 --n 2 --n 4 --n 8] [--out ./defectflow-data/reports/bench]
    defectflow bench supersimplenet [--size 256]
    defectflow bench synth [--size 256] [--generator procedural --generator ddpm ...] [--ddpm-model <uri>]

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
from components.errors import ConfigError

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

    from components import profiling as profile
    from components.models import registry

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


PAPER_SSN = {"gpu_latency_ms": 9.3, "gpu_throughput": 268, "gflops": 56.3, "input": 256,
             "hardware": "Tesla V100S, FP16, wide_resnet50_2"}


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
    return time.perf_counter() - t0


def bench_supersimplenet(size: int = 256, iters: int = 20, threads: int | None = None, onnx: bool = True,
                         epoch_images: int = 32) -> dict[str, Any]:
    import numpy as np
    import torch

    from components import profiling as profile
    from components.data import adapters
    from components.data.loading import prepare_rows
    from components.models import registry

    if threads:
        torch.set_num_threads(threads)
    rows = []
    table = adapters.ingest("procedural", None, options={"count": epoch_images, "size": size, "seed": 0,
                                                         "defect_fraction": 0.5})
    arrays = prepare_rows(table.to_pylist(), (size, size))
    for label, heads in (("paper heads (1024/128)", {}), ("CPU config heads (256/64)",
                                                           {"seg_hidden": 256, "cls_hidden": 64})):
        det = registry.create_detector("supersimplenet", {"backbone": {"name": "efficientnet_lite0",
                                                                       "weights": "offline"}, **heads},
                                       {"input_size": (size, size)}).eval()
        counts = det.parameter_counts()
        fl = profile.count_flops(det, (1, 3, size, size))
        log.info("SuperSimpleNet %s: %d trainable parameters; timing", label, counts["trainable"])
        eager = profile.cpu_throughput(det, (1, 3, size, size), warmup=3, iters=iters, threads=threads)
        row: dict[str, Any] = {"variant": label, "trainable_params": counts["trainable"],
                               "backbone_params": counts["backbone"], "gflops": round(fl["flops"] / 1e9, 3),
                               "eager_ms": round(1000.0 / eager, 1), "eager_fps": round(eager, 2)}
        if onnx:
            with tempfile.TemporaryDirectory() as d:
                path = profile.onnx_export(det, os.path.join(d, "ssn.onnx"), (size, size))
                ort = profile.onnx_throughput(path, warmup=3, iters=iters, threads=threads)
            row.update({"onnx_ms": round(1000.0 / ort, 1), "onnx_fps": round(ort, 2)})
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
    return {"target": "supersimplenet", "input": [1, 3, size, size], "iters": iters, "machine": machine(),
            "epoch_images": epoch_images, "results": rows, "paper_ssn": PAPER_SSN,
            "notes": "Backbone efficientnet_lite0 with its offline ImageNet weights (the paper: wide_resnet50_2 on a "
                     "GPU). Latency: batch 1, whole Detector graph (resize, normalise, backbone, heads, upsample, "
                     "blur sigma 4), no I/O. Epochs: training steps (batch 8) over the same procedural images, "
                     "from cached features vs end to end from pixels, in-process (the work of one Train worker)."}


SYNTH_GENERATORS = ("procedural", "cutpaste", "ddpm", "diffusion")


def _synth_requests(size: int, count: int) -> list[Any]:
    """``count`` requests on defect-free procedural surfaces, masks re-used from the defective ones (as ExDD), each
    with a real defect as cut-paste reference (the other generators ignore it)."""
    from components.data import adapters, manifest
    from components.synthesis.generators.base import SynthesisRequest
    from components.synthesis.masks import MaskSampler, real_mask_pool

    table = adapters.ingest("procedural", None, options={"count": 2 * count, "size": size, "seed": 0,
                                                         "defect_fraction": 0.5})
    rows = table.to_pylist()
    normals = [r for r in rows if r["label"] == 0]
    defects = [r for r in rows if r["label"] == 1]
    sampler = MaskSampler({"default": {"kind": "real"}}, real_mask_pool(table), seed=0)
    out = []
    for i in range(count):
        img = manifest.load_image(normals[i % len(normals)])
        ref = defects[i % len(defects)]
        out.append(SynthesisRequest(
            image=img, mask=sampler.sample(img, None, ref["defect_class"], i), defect_class=ref["defect_class"] or
            "defect", seed=i, reference=manifest.load_image(ref), reference_mask=manifest.load_mask(ref)))
    return out


def _synth_options(name: str, workdir: str, ddpm_model: str | None, diffusion_model: str | None,
                   steps: int) -> tuple[dict[str, Any], str]:
    """Generator options and a note saying what the figure stands for."""
    if name == "ddpm":
        if ddpm_model:
            return {"model": ddpm_model, "steps": steps, "device": "cpu"}, f"trained model {ddpm_model}"
        from components.synthesis import ddpm

        params = ddpm.InpaintDDPMParams()
        uri = ddpm.save(ddpm.InpaintDDPM(params), params, os.path.join(workdir, "ddpm"))
        return ({"model": uri, "steps": steps, "device": "cpu"},
                f"default architecture ({params.resolution}² window, channels {list(params.block_out_channels)}), "
                "untrained weights: the compute of a trained model, not its images")
    if name == "diffusion":
        if diffusion_model:
            return ({"model": diffusion_model, "num_inference_steps": steps, "device": "cpu"},
                    f"pipeline {diffusion_model}")
        from components.synthesis import tiny_pipelines

        uri = tiny_pipelines.build_tiny_sd_inpaint(os.path.join(workdir, "tiny-sd-inpaint"))
        return ({"model": uri, "num_inference_steps": steps, "device": "cpu"},
                "tiny random SD-inpainting pipeline: measures the pipeline's own overhead (tokenizer, VAE, "
                "scheduler, paste-back), not SD's compute; a real SD 1.5/SDXL on a CPU is minutes per image")
    return {}, "CPU generator"


def bench_synth(size: int = 256, count: int = 16, generators: list[str] | None = None, steps: int = 25,
                ddpm_model: str | None = None, diffusion_model: str | None = None,
                threads: int | None = None) -> dict[str, Any]:
    """Images/s of each generator on this CPU: ``count`` requests in one ``generate`` call after one warm-up call
    (model loading excluded), as one Ray Data synthesis actor runs them."""
    import torch

    from components.synthesis.generators.base import create_generator

    if threads:
        torch.set_num_threads(threads)
    names = generators or list(SYNTH_GENERATORS)
    unknown = sorted(set(names) - set(SYNTH_GENERATORS))
    if unknown:
        raise ConfigError(f"unknown generator(s) {unknown}", f"choose from {list(SYNTH_GENERATORS)}")
    rows = []
    reqs = _synth_requests(size, count)
    with tempfile.TemporaryDirectory() as workdir:
        for name in names:
            options, note = _synth_options(name, workdir, ddpm_model, diffusion_model, steps)
            t0 = time.perf_counter()
            gen = create_generator(name, options)
            load_s = time.perf_counter() - t0
            gen.generate(reqs[:1])
            log.info("synth bench: %s, %d images of %d²", name, count, size)
            t0 = time.perf_counter()
            results = gen.generate(reqs)
            sec = time.perf_counter() - t0
            changed = sum(bool((abs(r.image - q.image).max(axis=-1) > 1 / 255).any()) for r, q in
                          zip(results, reqs, strict=True))
            rows.append({"generator": name, "images": count, "seconds": round(sec, 3),
                         "images_per_s": round(count / sec, 2), "ms_per_image": round(1000 * sec / count, 2),
                         "load_s": round(load_s, 2), "changed": changed,
                         "steps": steps if name in ("ddpm", "diffusion") else None, "what": note})
    return {"target": "synth", "input": [count, 3, size, size], "iters": 1, "machine": machine(), "results": rows,
            "notes": "One generate() call over all requests after a one-request warm-up; masks re-used from real "
                     "(procedural) defects; filters and Parquet writing excluded (see `defectflow synthesize` logs "
                     "for the whole job). `changed`: results differing from their source image."}


def to_markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [f"# Benchmark: {res['target']}", "",
             f"Machine: {m['processor']}, {m['cpus']} CPUs, torch {m['torch']} ({m['torch_threads']} threads), "
             f"Python {m['python']}. Input {tuple(res['input'])}, {res['iters']} timed iterations.", "",
             report.markdown_table(res["results"]), ""]
    p = res.get("paper_ssn")
    if p:
        lines += [f"Paper (SuperSimpleNet, JIMS/ICPR code): {p['gpu_latency_ms']} ms batch-1 latency, "
                  f"~{p['gpu_throughput']} img/s at batch 16, {p['gflops']} GFLOPs at {p['input']}x{p['input']} on "
                  f"{p['hardware']}; no CPU figure is published.", ""]
    p = res.get("paper")
    if p:
        lines += [f"Paper (GMBINet, arXiv 2508.16397): {p['params_m']} M parameters, {p['gflops']} GFLOPs, "
                  f"{p['cpu_fps']} FPS on a CPU and {p['gpu_fps']} FPS on a GPU at {p['input']}x{p['input']} "
                  "(hardware not stated).", ""]
    lines.append(res.get("notes", ""))
    return "\n".join(lines) + "\n"


def run_cli(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.time()
    if args.target == "synth":
        res = bench_synth(size=args.size or 256, count=args.count, generators=args.generator, steps=args.steps,
                          ddpm_model=args.ddpm_model, diffusion_model=args.diffusion_model, threads=args.threads)
    elif args.target == "supersimplenet":
        res = bench_supersimplenet(size=args.size or 256, iters=args.iters, threads=args.threads,
                                   onnx=not args.no_onnx)
    else:
        res = bench_gmbinet(size=args.size or 512, ns=args.n, iters=args.iters, threads=args.threads,
                            onnx=not args.no_onnx)
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
