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

import argparse
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from components import config as cfgmod
from components import report, storage
from components.config import RayConfig, StorageConfig, Strict
from components.data import manifest
from components.data.images import encode_mask_png, encode_png, resize_image, resize_mask
from components.errors import ConfigError, DataError

log = logging.getLogger("defectflow.synthesize")

CONFIG_FILE = "_config.json"
STATUS_DIR = "_shards"


class GeneratorSettings(Strict):
    name: Literal["procedural", "cutpaste", "diffusion", "ddpm"] = "procedural"
    options: dict[str, Any] = Field(default_factory=dict)


class SourceRegime(Strict):
    """Synthesize only from what a trainer of this supervision regime may see (e.g. ``mixed`` with 10 masks: the
    real masks and cut-paste crops come from those 10 images only), so a small-real-data experiment stays honest.
    Same rules and seeded subset as ``data.regime`` / ``data.mixed_masks`` / ``seed`` of a train config."""

    regime: Literal["unsupervised", "weak", "mixed", "full"] = "full"
    mixed_masks: int | float | None = None
    seed: int = Field(0, description="the train config's seed (it picks the mixed subset)")


class SynthesizeConfig(Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="synthetic set name")
    manifest: str = Field(..., description="source manifest: its defect-free rows get the defects; its real defect "
                                           "masks and crops feed kind: real masks and the cut-paste generator")
    out: str | None = Field(None, description="default <storage.root>/synthetic/<name>")
    count: int = Field(100, ge=1, description="accepted samples wanted")
    seed: int = 0
    source_splits: list[Literal["train", "val", "test"]] = Field(["train"], description="rows used as sources")
    source_regime: SourceRegime = Field(default_factory=SourceRegime,
                                        description="the supervision regime the sources are seen through")
    classes: list[str] | None = Field(None, description="defect classes to make (default: the real ones, else "
                                                        "'defect'); requests cycle through them")
    masks: dict[str, Any] | None = Field(None, description="defect class (or 'default') -> MaskSpec or list; "
                                                           "default: real masks when the manifest has some, "
                                                           "else blobs")
    generator: GeneratorSettings = Field(default_factory=GeneratorSettings)
    prompts: dict[str, str] = Field(default_factory=dict, description="defect class -> prompt (diffusion)")
    image_size: tuple[int, int] | None = Field(None, description="resize source images first (null: keep)")
    filters: list[dict[str, Any]] = Field(
        default_factory=lambda: [{"name": "visible_change"}, {"name": "background_preserved"}],
        description="FilterSpec entries: visible_change, background_preserved, feature_realism, dreamsim_like, "
                    "clip_score")
    filter_examples: int = Field(32, ge=1, description="real defects / normal images fitted into feature filters")
    min_box_area: int = Field(16, ge=1, description="connected components below this many pixels get no box")
    shard_size: int = Field(16, ge=1)
    max_waves: int = Field(4, ge=1, description="request waves until count is reached")
    num_actors: int = Field(1, ge=1)
    cpus_per_actor: float = Field(1.0, gt=0)
    use_gpu: bool | Literal["auto"] = "auto"
    contact_sheet: int = Field(16, ge=0, description="samples on the contact sheet")
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def plan_requests(normal_ids: list[str], classes: list[str], start: int, n: int, seed: int) -> list[dict[str, Any]]:
    """Requests ``start .. start+n-1``: each picks a normal image and a class from its own index and the seed."""
    out = []
    for i in range(start, start + n):
        rng = np.random.default_rng([seed, i])
        out.append({"index": i, "source_id": normal_ids[int(rng.integers(len(normal_ids)))],
                    "defect_class": classes[i % len(classes)], "seed": int(rng.integers(2**31 - 1))})
    return out


class SynthesisWorker:
    """Ray Data actor: generator, mask sampler, filters and source rows loaded once; a call writes whole shards."""

    def __init__(self, cfg: dict[str, Any], out_uri: str, storage_env: dict[str, Any], use_gpu: bool):
        from components.synthesis.filters import build_chain
        from components.synthesis.generators.base import create_generator
        from components.synthesis.masks import MaskSampler, real_mask_pool

        storage.configure(**storage_env)
        self.cfg = SynthesizeConfig.model_validate(cfg)
        self.out = out_uri
        table = _sources(self.cfg)
        self.rows = {r["sample_id"]: r for r in table.to_pylist()}
        self.empty_refs: set[str] = set()
        self.defects = [r for r in self.rows.values() if r.get("label") == 1
                        and (r.get("mask_uri") or r.get("mask_bytes"))]
        pool = real_mask_pool(table, seed=self.cfg.seed)
        self.sampler = MaskSampler(_mask_specs(self.cfg, bool(pool)), pool, seed=self.cfg.seed)
        options = dict(self.cfg.generator.options)
        if self.cfg.generator.name in ("diffusion", "ddpm") and use_gpu:
            options.setdefault("device", "cuda")
        self.generator = create_generator(self.cfg.generator.name, options)
        feature_filters = {"feature_realism", "dreamsim_like"} & {f.get("name") for f in self.cfg.filters}
        examples, normals = [], []
        if feature_filters:
            k = self.cfg.filter_examples
            for r in self.defects:
                if len(examples) >= k:
                    break
                img = self._image(r)
                mask = _fit_mask(manifest.load_mask(r), img.shape[:2])
                if mask.any():  # a defect too small to survive the resize is no example of a defect region
                    examples.append((img, mask))
            normals = [self._image(self.rows[i]) for i in _normal_ids(table)[:k]]
        self.chain = build_chain(self.cfg.filters, defect_examples=examples, normal_images=normals)

    def _image(self, rec: dict[str, Any]) -> np.ndarray:
        img = manifest.load_image(rec)
        return resize_image(img, tuple(self.cfg.image_size)) if self.cfg.image_size else img

    def _reference(self, rng: np.random.Generator) -> tuple[np.ndarray | None, np.ndarray | None, str | None]:
        """A random real defect (image, mask at the working size, id); defects whose mask is empty at that size
        (a few pixels lost to the resize, or an empty ground truth) are skipped and remembered."""
        for _ in range(20):
            usable = [r for r in self.defects if r["sample_id"] not in self.empty_refs]
            if not usable:
                break
            rec = usable[int(rng.integers(len(usable)))]
            img = self._image(rec)
            mask = _fit_mask(manifest.load_mask(rec), img.shape[:2])
            if mask.any():
                return img, mask, rec["sample_id"]
            log.warning("cut-paste reference %s has an empty mask at %s; skipped", rec["sample_id"], img.shape[:2])
            self.empty_refs.add(rec["sample_id"])
        return None, None, None

    def _generate(self, reqs: list[Any], metas: list[dict[str, Any]],
                  rejected: list[dict[str, Any]]) -> tuple[list[Any], list[dict[str, Any]], list[Any]]:
        """Batched generation; when the batch fails on bad input, request by request, so one unusable request is
        a counted rejection (``generator: ...``) instead of the end of the job."""
        if not reqs:
            return [], [], []
        try:
            return reqs, metas, self.generator.generate(reqs)
        except DataError as e:
            log.warning("generator failed on a batch (%s); retrying its requests one by one", e.message)
        keep_r, keep_m, results = [], [], []
        for req, meta in zip(reqs, metas, strict=True):
            try:
                results.append(self.generator.generate([req])[0])
            except DataError as e:
                rejected.append({"index": meta["index"], "reasons": [f"generator: {e.message}"]})
                continue
            keep_r.append(req)
            keep_m.append(meta)
        return keep_r, keep_m, results

    def write_shard(self, name: str, requests: list[dict[str, Any]]) -> dict[str, Any]:
        from components.synthesis.filters import FilterInput
        from components.synthesis.generators.base import SynthesisRequest
        from components.synthesis.labels import label_record
        from components.synthesis.masks import PlacementError

        t0 = time.time()
        reqs, metas, rejected = [], [], []
        for q in requests:
            rng = np.random.default_rng([self.cfg.seed, q["index"], 1])
            image = self._image(self.rows[q["source_id"]])
            try:
                mask, mask_info = self.sampler.sample_with_info(image, None, q["defect_class"], q["index"])
            except PlacementError as e:
                rejected.append({"index": q["index"], "reasons": [f"placement: {e.message}"]})
                continue
            ref, ref_mask, ref_id = (self._reference(rng) if self.cfg.generator.name == "cutpaste"
                                     else (None, None, None))
            reqs.append(SynthesisRequest(image=image, mask=mask, defect_class=q["defect_class"], seed=q["seed"],
                                         prompt=self.cfg.prompts.get(q["defect_class"]), source_id=q["source_id"],
                                         reference=ref, reference_mask=ref_mask,
                                         extra={"reference_id": ref_id} if ref_id else {}))
            metas.append({**q, "mask": mask_info, "reference_id": ref_id})
        reqs, metas, results = self._generate(reqs, metas, rejected)
        verdicts = self.chain.evaluate([
            FilterInput(image=res.image, mask=res.mask, original=req.image, prompt=res.info.get("prompt"),
                        defect_class=req.defect_class, sample_id=f"{self.cfg.name}/{meta['index']:06d}")
            for req, res, meta in zip(reqs, results, metas, strict=True)])
        rows = []
        for req, res, meta, verdict in zip(reqs, results, metas, verdicts, strict=True):
            labels = label_record(res.mask, req.defect_class, self.cfg.min_box_area)
            reasons = list(verdict["reasons"])
            if not labels["boxes"]:
                reasons.append(f"labels: no component of at least {self.cfg.min_box_area} pixels")
            if reasons:
                rejected.append({"index": meta["index"], "reasons": reasons, "scores": verdict["scores"]})
                continue
            h, w = res.image.shape[:2]
            rows.append(manifest.row(
                f"{self.cfg.name}/{meta['index']:06d}", self.cfg.name, width=w, height=h, split="train",
                image_bytes=encode_png(res.image), mask_bytes=encode_mask_png(res.mask), label=1,
                defect_class=req.defect_class, supervision="pixel", source="synthetic",
                provenance={**res.info, "source_id": meta["source_id"], "seed": meta["seed"],
                            "request_index": meta["index"], "mask": meta["mask"], "reference_id":
                            meta["reference_id"], "filters": verdict["scores"], "boxes": labels["boxes"],
                            "source_manifest": self.cfg.manifest}))
        if rows:
            manifest.write(manifest.make_table(rows), storage.join(self.out, f"{name}.parquet"))
        status = {"shard": name, "requests": len(requests), "accepted": len(rows), "rejected": rejected,
                  "seconds": round(time.time() - t0, 2)}
        storage.write_json(storage.join(self.out, STATUS_DIR, f"{name}.json"), status)
        return status

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        done = [self.write_shard(str(n), json.loads(q)) for n, q in zip(batch["shard"], batch["requests"],
                                                                         strict=True)]
        return {"shard": [d["shard"] for d in done], "accepted": [d["accepted"] for d in done],
                "rejected": [len(d["rejected"]) for d in done], "seconds": [d["seconds"] for d in done]}


def _fit_mask(mask: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    if mask is None:
        return np.zeros(shape, np.uint8)
    return mask if mask.shape == tuple(shape) else resize_mask(mask, shape)


def _sources(cfg: SynthesizeConfig) -> pa.Table:
    from components.data import regimes

    sr = cfg.source_regime
    table = regimes.apply(manifest.read(cfg.manifest), sr.regime, mixed_masks=sr.mixed_masks, seed=sr.seed)
    table = table.filter(pc.is_in(table["split"], pa.array(list(cfg.source_splits))))
    return table.filter(pc.equal(table["source"], "real"))


def _normal_ids(table: pa.Table) -> list[str]:
    return sorted(r["sample_id"] for r in table.select(["sample_id", "label"]).to_pylist() if r["label"] == 0)


def _classes(cfg: SynthesizeConfig, table: pa.Table) -> list[str]:
    if cfg.classes:
        return list(cfg.classes)
    found = sorted({c for c, lab in zip(table["defect_class"].to_pylist(), table["label"].to_pylist(), strict=True)
                    if lab == 1 and c})
    return found or ["defect"]


def _mask_specs(cfg: SynthesizeConfig, has_real: bool) -> dict[str, Any]:
    return cfg.masks or {"default": {"kind": "real"} if has_real else {"kind": "blob"}}


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
    import ray.data

    from components.synthesis.generators.base import create_generator  # noqa: F401  (fail fast on unknown names)
    from workflows.runtime import actor_pool_gpu, init_ray

    t0 = time.time()
    layout = cfg.storage.apply()
    out = cfg.out or layout.synthetic(cfg.name)
    table = _sources(cfg)
    normal_ids = _normal_ids(table)
    if not normal_ids:
        raise DataError(f"{cfg.manifest} has no defect-free rows in splits {cfg.source_splits}",
                        "synthesis puts defects on defect-free images: check source_splits and the labels")
    classes = _classes(cfg, table)
    fingerprint = {k: v for k, v in cfg.model_dump(mode="json").items()
                   if k not in ("count", "max_waves", "num_actors", "cpus_per_actor", "use_gpu", "contact_sheet",
                                "storage", "ray", "out")}
    cfg_uri = storage.join(out, CONFIG_FILE)
    if storage.exists(cfg_uri):
        if storage.read_json(cfg_uri) != fingerprint:
            raise ConfigError(f"{out} holds a synthetic set made with other settings",
                              "choose another name/out, or delete that folder")
    else:
        storage.write_json(cfg_uri, fingerprint)
    done = {storage.basename(u)[:-5]: storage.read_json(u) for u in storage.walk_files(storage.join(out, STATUS_DIR),
                                                                                       (".json",))}
    init_ray(cfg.ray, cfg.storage)
    use_gpu = actor_pool_gpu("synthesize", cfg.use_gpu, cfg.cpus_per_actor)
    s = storage.settings()
    next_index, accepted, requested = 0, 0, 0
    for wave in range(cfg.max_waves):
        if wave == 0:
            n = cfg.count
        else:
            rate = accepted / max(requested, 1)
            if accepted >= cfg.count:
                break
            n = math.ceil((cfg.count - accepted) / max(rate, 0.1) * 1.1)
            log.info("wave %d: %d accepted of %d so far (%.0f %%); %d more request(s)", wave + 1, accepted,
                     requested, 100 * rate, n)
        reqs = plan_requests(normal_ids, classes, next_index, n, cfg.seed)
        next_index += n
        requested += n
        shards = [(f"part-{chunk[0]['index']:06d}", chunk) for chunk in
                  (reqs[k:k + cfg.shard_size] for k in range(0, len(reqs), cfg.shard_size))]
        todo = [(name, chunk) for name, chunk in shards if name not in done]
        accepted += sum(done[name]["accepted"] for name, _ in shards if name in done)
        if todo:
            ds = ray.data.from_items([{"shard": name, "requests": json.dumps(chunk)} for name, chunk in todo])
            ds = ds.map_batches(
                SynthesisWorker, batch_size=1,
                fn_constructor_kwargs={"cfg": cfg.model_dump(mode="json"), "out_uri": out, "use_gpu": use_gpu,
                                       "storage_env": {"endpoint_url": s.endpoint_url, "region": s.region}},
                compute=ray.data.ActorPoolStrategy(size=cfg.num_actors), num_cpus=cfg.cpus_per_actor,
                num_gpus=1 if use_gpu else 0)
            for k, row in enumerate(ds.iter_rows(), start=1):
                accepted += int(row["accepted"])
                log.info("shard %s: %d accepted, %d rejected in %.1f s (%d/%d; %d/%d accepted in all)",
                         row["shard"], row["accepted"], row["rejected"], row["seconds"], k, len(todo), accepted,
                         cfg.count)
        for name, _ in todo:
            done[name] = storage.read_json(storage.join(out, STATUS_DIR, f"{name}.json"))
        if accepted >= cfg.count:
            break
    statuses = [done[n] for n in sorted(done)]
    reasons: dict[str, int] = {}
    for st in statuses:
        for rej in st["rejected"]:
            for r in rej["reasons"]:
                key = r.split(":", 1)[0]
                reasons[key] = reasons.get(key, 0) + 1
    n_rejected = sum(len(st["rejected"]) for st in statuses)
    total_accepted = sum(st["accepted"] for st in statuses)
    if total_accepted < cfg.count:
        log.warning("only %d of %d requested samples were accepted after %d wave(s); see %s", total_accepted,
                    cfg.count, cfg.max_waves, storage.join(out, "_report.json"))
    summary = {"name": cfg.name, "accepted": total_accepted, "requested": sum(st["requests"] for st in statuses),
               "rejected": n_rejected, "rejections_by_stage": reasons, "generator": cfg.generator.name,
               "classes": classes, "filters": cfg.filters}
    storage.write_json(storage.join(out, "_report.json"), summary)
    sheet = _contact_sheet(out, cfg.contact_sheet)
    log.info("synthetic set %s: %d accepted, %d rejected (%s) -> %s", cfg.name, total_accepted, n_rejected, reasons,
             out)
    return SynthesizeResult(uri=out, accepted=total_accepted, requested=summary["requested"], rejected=n_rejected,
                            rejections=reasons, contact_sheet=sheet, seconds=round(time.time() - t0, 1))


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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML synthesize config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")


def config_from_args(args: argparse.Namespace) -> SynthesizeConfig:
    return cfgmod.load(SynthesizeConfig, args.config, args.set)


def main(argv: list[str] | None = None) -> int:
    from workflows.cli import run_command

    return run_command("synthesize", argv)


if __name__ == "__main__":
    raise SystemExit(main())
