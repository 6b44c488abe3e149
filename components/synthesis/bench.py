"""``defectflow bench synth``: images/s of each synthesis generator on this CPU (JSON + Markdown via the bench
command; nothing here is timed in tests).

Requests are built once on procedural defect-free surfaces with masks re-used from procedural defects (as ExDD),
and every generator runs the same ones in one ``generate`` call after a one-request warm-up, as one Ray Data
synthesis actor runs them.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any

from components import profiling
from components.errors import ConfigError

log = logging.getLogger(__name__)

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
    return {"target": "synth", "input": [count, 3, size, size], "iters": 1, "machine": profiling.machine(),
            "results": rows,
            "notes": "One generate() call over all requests after a one-request warm-up; masks re-used from real "
                     "(procedural) defects; filters and Parquet writing excluded (see `defectflow synthesize` logs "
                     "for the whole job). `changed`: results differing from their source image."}
