"""bench: size and speed of a model family or of the synthesis generators, written down as JSON + Markdown (never
asserted in tests).

    defectflow bench <family> [--size 512] [--iters 30] [--threads N] [--no-onnx] [--variant KEY=VALUE[,KEY=VALUE]]
    defectflow bench gmbinet --n 1 --n 2 --n 4 --n 8            # --n N is --variant n=N
    defectflow bench supersimplenet --variant seg_hidden=256,cls_hidden=64
    defectflow bench synth [--size 256] [--generator procedural --generator ddpm ...] [--ddpm-model <uri>]

A target is every registered model family with a bench hook (``Family.bench``: what it measures, its default
variants and the paper's figures live with the family) plus ``synth``. Each ``--variant`` is one measured variant:
comma-separated family params overrides (dotted keys, YAML values, e.g.
``--variant backbone.name=resnet18,backbone.weights=random``). ONNX figures run the graph ``defectflow export``
writes.
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from collections.abc import Callable
from typing import Any

from components import report, storage
from components.config import parse_overrides
from components.errors import ConfigError
from components.models import registry
from workflows.command import Command, main

log = logging.getLogger("defectflow.bench")

SYNTH = "synth"
SYNTH_DEFAULT_SIZE = 256
_PAIR_SPLIT = re.compile(r",(?=\s*[A-Za-z_][\w.]*=)")  # commas that start the next KEY=, not those inside values


def family_benches() -> dict[str, Callable[..., dict[str, Any]]]:
    return {name: fam.bench for name, fam in sorted(registry.families().items()) if fam.bench is not None}


def targets() -> list[str]:
    return [*family_benches(), SYNTH]


def parse_variants(items: list[str] | None, ns: list[int] | None = None) -> list[dict[str, Any]] | None:
    """``--n`` values and ``--variant`` strings -> one params override per measured variant (None: the family's
    defaults)."""
    out = [{"n": n} for n in ns or []]
    for item in items or []:
        pairs = [p.strip() for p in _PAIR_SPLIT.split(item) if p.strip()]
        if not pairs or any("=" not in p for p in pairs):
            raise ConfigError(f"--variant {item!r} is not KEY=VALUE[,KEY=VALUE...]",
                              "e.g. --variant n=2 or --variant backbone.name=resnet18,backbone.weights=random")
        out.append(parse_overrides(pairs))
    return out or None


def to_markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [f"# Benchmark: {res['target']}", "",
             f"Machine: {m['processor']}, {m['cpus']} CPUs, torch {m['torch']} ({m['torch_threads']} threads), "
             f"Python {m['python']}. Input {tuple(res['input'])}, {res['iters']} timed iterations.", "",
             report.markdown_table(res["results"]), ""]
    if res.get("paper_note"):
        lines += [res["paper_note"], ""]
    lines.append(res.get("notes", ""))
    return "\n".join(lines) + "\n"


def run(target: str, *, size: int | None = None, iters: int = 30, threads: int | None = None, onnx: bool = True,
        variants: list[dict[str, Any]] | None = None, synth: dict[str, Any] | None = None) -> dict[str, Any]:
    """One benchmark; ``synth`` holds the synthesis options (count, generators, steps, ddpm_model,
    diffusion_model)."""
    t0 = time.time()
    if target == SYNTH:
        if variants:
            raise ConfigError("--variant/--n apply to model families, not to synth",
                              "choose generators with --generator")
        from components.synthesis.bench import bench_synth

        res = bench_synth(size=size or SYNTH_DEFAULT_SIZE, threads=threads, **(synth or {}))
    else:
        benches = family_benches()
        if target not in benches:
            raise ConfigError(f"nothing to benchmark called {target!r}", f"choose one of {targets()}")
        res = benches[target](size=size, iters=iters, threads=threads, onnx=onnx, variants=variants)
    res["seconds"] = round(time.time() - t0, 1)
    return res


def run_cli(args: argparse.Namespace) -> dict[str, Any]:
    storage.configure(endpoint_url=args.s3_endpoint_url)
    synth = {"count": args.count, "generators": args.generator, "steps": args.steps, "ddpm_model": args.ddpm_model,
             "diffusion_model": args.diffusion_model}
    res = run(args.target, size=args.size, iters=args.iters, threads=args.threads, onnx=not args.no_onnx,
              variants=parse_variants(args.variant, args.n), synth=synth)
    out = storage.normalize(args.out)
    json_uri, md_uri = storage.join(out, f"{res['target']}.json"), storage.join(out, f"{res['target']}.md")
    storage.write_json(json_uri, res)
    storage.write_text(md_uri, to_markdown(res))
    res["written"] = [json_uri, md_uri]
    return res


def _report(res: dict[str, Any]) -> str:
    return to_markdown(res) + f"\nwritten: {res['written'][0]} and .md"


def add_arguments(b: argparse.ArgumentParser) -> None:
    b.add_argument("target", choices=targets(), help="a model family, or synth (the synthesis generators)")
    b.add_argument("--out", default="./defectflow-data/reports/bench", help="output folder or URI")
    b.add_argument("--size", type=int, default=None,
                   help="input side length (default: the family's paper size, e.g. 512 for GMBINet, 256 for "
                        "SuperSimpleNet; 256 for synth)")
    b.add_argument("--iters", type=int, default=30, help="timed iterations per measurement")
    b.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    b.add_argument("--variant", action="append", metavar="KEY=VALUE[,KEY=VALUE]",
                   help="one measured variant: family params overrides (repeat for several; default: the "
                        "family's own variants)")
    b.add_argument("--n", type=int, action="append", help="shortcut for --variant n=N (GMBINet scale dimension)")
    b.add_argument("--no-onnx", action="store_true", help="skip the ONNX export and ONNX Runtime measurement")
    b.add_argument("--generator", action="append", choices=["procedural", "cutpaste", "ddpm", "diffusion"],
                   help="synth: generator(s) to measure (default: all four)")
    b.add_argument("--count", type=int, default=16, help="synth: images per generator")
    b.add_argument("--steps", type=int, default=25, help="synth: denoising steps of ddpm/diffusion")
    b.add_argument("--ddpm-model", default=None, help="synth: a trained ddpm model URI (default: untrained weights)")
    b.add_argument("--diffusion-model", default=None,
                   help="synth: a diffusers inpainting pipeline folder/URI (default: a tiny random one)")
    b.add_argument("--s3-endpoint-url", default=None, help="S3-compatible endpoint (default: AWS_ENDPOINT_URL)")


COMMAND = Command("bench", "measure a model family's (or the synthesis generators') size and speed; writes JSON "
                  "+ Markdown", add_arguments, run_cli, _report)

if __name__ == "__main__":
    raise SystemExit(main(COMMAND))
