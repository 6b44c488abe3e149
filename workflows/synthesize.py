"""synthesize: synthetic defects on defect-free images, on a Ray Data actor pool, as a manifest of labelled rows.

    defectflow synthesize --config workflows/configs/synth_magnetic_tile.yaml

The driver plans requests (normal image, defect class, seed) deterministically from the seed; each actor loads the
generator once (diffusion pipelines, the own DDPM, or the CPU generators), samples a placed mask per request (real
defect masks re-used as ExDD does, or shapes), generates, derives labels (mask, class, boxes from connected
components), runs the filters and writes one Parquet shard of accepted rows (manifest schema, ``source:
synthetic``, provenance: generator, model, LoRA, prompt, seed, strength, filter scores, boxes) plus a status file
with every rejection and its reasons. Shards are the unit of resumption: a re-run skips the shards already written.
Waves of requests continue until ``count`` samples are accepted (or ``max_waves`` is reached). The folder ends with
``_report.json`` (accepted, rejections by filter and reason) and ``contact_sheet.png``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from components import config as cfgmod
from components import report, storage
from components.config import SynthesizeConfig
from components.data import manifest
from components.errors import ConfigError, DataError
from components.synthesis import pipeline
from workflows import console
from workflows.command import Command, add_config_options, main

log = logging.getLogger("defectflow.synthesize")

CONFIG_FILE = "_config.json"


class SynthesisActor:
    """Ray Data actor around :class:`components.synthesis.pipeline.Synthesizer`: a call writes whole shards."""

    def __init__(self, cfg: dict[str, Any], out_uri: str, storage_settings: dict[str, Any], use_gpu: bool):
        storage.configure(**storage_settings)
        self.synth = pipeline.Synthesizer(SynthesizeConfig.model_validate(cfg), out_uri, use_gpu)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        done = [self.synth.write_shard(str(n), json.loads(q)) for n, q in zip(batch["shard"], batch["requests"],
                                                                               strict=True)]
        return {"shard": [d["shard"] for d in done], "accepted": [d["accepted"] for d in done],
                "rejected": [len(d["rejected"]) for d in done], "seconds": [d["seconds"] for d in done]}


@dataclass
class SynthesizeResult:
    uri: str
    accepted: int
    requested: int
    rejected: int
    rejections: dict[str, int] = field(default_factory=dict)
    contact_sheet: str | None = None
    seconds: float = 0.0


def run(cfg: SynthesizeConfig) -> SynthesizeResult:
    from workflows.runtime import actor_pool_gpu, init_ray

    t0 = time.time()
    layout = cfg.storage.apply()
    out = cfg.out or layout.synthetic(cfg.name)
    console.keep_log_in(out)
    table = pipeline.sources(cfg)
    normals = pipeline.normal_ids(table)
    if not normals:
        raise DataError(f"{cfg.manifest} has no defect-free rows in splits {cfg.source_splits}",
                        "synthesis puts defects on defect-free images: check source_splits and the labels")
    classes = pipeline.classes_of(cfg, table)
    _claim_folder(cfg, out)
    init_ray(cfg.ray, cfg.storage)
    use_gpu = actor_pool_gpu("synthesize", cfg.use_gpu, cfg.cpus_per_actor)
    statuses = _waves(cfg, out, normals, classes, use_gpu)
    reasons: dict[str, int] = {}
    for rej in (r for st in statuses for r in st["rejected"]):
        for reason in rej["reasons"]:
            reasons[reason.split(":", 1)[0]] = reasons.get(reason.split(":", 1)[0], 0) + 1
    summary = {"name": cfg.name, "accepted": sum(st["accepted"] for st in statuses),
               "requested": sum(st["requests"] for st in statuses),
               "rejected": sum(len(st["rejected"]) for st in statuses), "rejections_by_stage": reasons,
               "generator": cfg.generator.name, "classes": classes, "filters": cfg.filters}
    if summary["accepted"] < cfg.count:
        log.warning("only %d of %d requested samples were accepted after %d wave(s); see %s", summary["accepted"],
                    cfg.count, cfg.max_waves, storage.join(out, "_report.json"))
    storage.write_json(storage.join(out, "_report.json"), summary)
    sheet = _contact_sheet(out, cfg.contact_sheet)
    log.info("synthetic set %s: %d accepted, %d rejected (%s) -> %s", cfg.name, summary["accepted"],
             summary["rejected"], reasons, out)
    return SynthesizeResult(uri=out, accepted=summary["accepted"], requested=summary["requested"],
                            rejected=summary["rejected"], rejections=reasons, contact_sheet=sheet,
                            seconds=round(time.time() - t0, 1))


def _claim_folder(cfg: SynthesizeConfig, out: str) -> None:
    """Record the settings a folder's samples are made with; a re-run with other settings is refused."""
    fingerprint = {k: v for k, v in cfg.model_dump(mode="json").items()
                   if k not in ("count", "max_waves", "num_actors", "cpus_per_actor", "use_gpu", "contact_sheet",
                                "storage", "ray", "out")} | {"synthesis_version": pipeline.VERSION}
    cfg_uri = storage.join(out, CONFIG_FILE)
    if not storage.exists(cfg_uri):
        storage.write_json(cfg_uri, fingerprint)
    elif storage.read_json(cfg_uri) != fingerprint:
        raise ConfigError(f"{out} holds a synthetic set made with other settings",
                          "choose another name/out, or delete that folder")


def _waves(cfg: SynthesizeConfig, out: str, normals: list[str], classes: list[str], use_gpu: bool
           ) -> list[dict[str, Any]]:
    """Request waves (sized by the acceptance rate so far) until ``count`` samples are accepted; shards already
    written are skipped. Returns every shard's status, in shard order."""
    import ray.data

    status_dir = storage.join(out, pipeline.STATUS_DIR)
    done = {storage.basename(u)[:-5]: storage.read_json(u) for u in storage.walk_files(status_dir, (".json",))}
    next_index, accepted, requested = 0, 0, 0
    for wave in range(cfg.max_waves):
        if wave and accepted >= cfg.count:
            break
        rate = accepted / max(requested, 1)
        n = cfg.count if wave == 0 else math.ceil((cfg.count - accepted) / max(rate, 0.1) * 1.1)
        if wave:
            log.info("wave %d: %d accepted of %d so far (%.0f %%); %d more request(s)", wave + 1, accepted,
                     requested, 100 * rate, n)
        reqs = pipeline.plan_requests(normals, classes, next_index, n, cfg.seed)
        next_index, requested = next_index + n, requested + n
        shards = [(f"part-{chunk[0]['index']:06d}", chunk) for chunk in
                  (reqs[k:k + cfg.shard_size] for k in range(0, len(reqs), cfg.shard_size))]
        todo = [(name, chunk) for name, chunk in shards if name not in done]
        accepted += sum(done[name]["accepted"] for name, _ in shards if name in done)
        if todo:
            ds = ray.data.from_items([{"shard": name, "requests": json.dumps(chunk)} for name, chunk in todo])
            ds = ds.map_batches(
                SynthesisActor, batch_size=1,
                fn_constructor_kwargs={"cfg": cfg.model_dump(mode="json"), "out_uri": out, "use_gpu": use_gpu,
                                       "storage_settings": storage.worker_settings()},
                compute=ray.data.ActorPoolStrategy(size=cfg.num_actors), num_cpus=cfg.cpus_per_actor,
                num_gpus=1 if use_gpu else 0)
            for k, row in enumerate(ds.iter_rows(), start=1):
                accepted += int(row["accepted"])
                log.info("shard %d/%d: %d accepted, %d rejected in %.1f s (%d/%d accepted in all)", k, len(todo),
                         row["accepted"], row["rejected"], row["seconds"], accepted, cfg.count)
        for name, _ in todo:
            done[name] = storage.read_json(storage.join(status_dir, f"{name}.json"))
    return [done[n] for n in sorted(done)]


def _contact_sheet(out: str, n: int) -> str | None:
    if n <= 0:
        return None
    try:
        table = manifest.read(out)
    except Exception:  # no accepted sample at all
        return None
    rows = sorted(table.to_pylist(), key=lambda r: r["sample_id"])[:n]
    items = []
    for r in rows:
        prov = json.loads(r["provenance"] or "{}")
        items.append({"image": manifest.load_image(r), "mask": manifest.load_mask(r),
                      "title": f"{r['sample_id'].split('/')[-1]} {r['defect_class']} ({prov.get('generator')})"})
    uri = storage.join(out, "contact_sheet.png")
    storage.write_bytes(uri, report.contact_sheet(items))
    return uri


# ---------------------------------------------------------------------------------------------- CLI


def _report(res: SynthesizeResult) -> str:
    return (f"synthetic set: {res.uri}\n{res.accepted} accepted of {res.requested} requested; rejections: "
            f"{res.rejections or 'none'}\ncontact sheet: {res.contact_sheet}")


COMMAND = Command("synthesize", "synthetic labelled defects on normal images (Ray Data; procedural, cutpaste, "
                  "diffusion, ddpm)", lambda p: add_config_options(p, "synthesize"),
                  lambda args: run(cfgmod.load(SynthesizeConfig, args.config, args.set)), _report)

if __name__ == "__main__":
    raise SystemExit(main(COMMAND))
