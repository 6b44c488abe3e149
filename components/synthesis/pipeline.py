"""The synthesis of one shard: place a mask on a defect-free image, generate the defect, filter, label, write.

Plain Python + torch (no Ray): the ``synthesize`` workflow runs :class:`Synthesizer` inside Ray Data actors and
plans the requests (:func:`plan_requests`) on the driver. Every random choice of a request derives from (seed,
request index), so a shard is the same whoever computes it, and re-runs skip shards already written.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from components import storage
from components.config import SynthesizeConfig
from components.data import manifest
from components.data.images import encode_mask_png, encode_png, resize_image, resize_mask
from components.errors import DataError

log = logging.getLogger(__name__)

STATUS_DIR = "_shards"
# What a seed draws: a set made by another version is not resumed with this one. 2: one Perlin implementation
# (components/noise.py) for masks and SuperSimpleNet's feature noise.
VERSION = 2


def plan_requests(normal_ids: list[str], classes: list[str], start: int, n: int, seed: int) -> list[dict[str, Any]]:
    """Requests ``start .. start+n-1``: each picks a normal image and a class from its own index and the seed."""
    out = []
    for i in range(start, start + n):
        rng = np.random.default_rng([seed, i])
        out.append({"index": i, "source_id": normal_ids[int(rng.integers(len(normal_ids)))],
                    "defect_class": classes[i % len(classes)], "seed": int(rng.integers(2**31 - 1))})
    return out


class Synthesizer:
    """Generator, mask sampler, filters and source rows loaded once; :meth:`write_shard` places, generates, filters
    and labels one shard of requests and writes its accepted rows and its status (every rejection with reasons)."""

    def __init__(self, cfg: SynthesizeConfig, out_uri: str, use_gpu: bool = False):
        from components.synthesis.filters import build_chain
        from components.synthesis.generators.base import create_generator
        from components.synthesis.masks import MaskSampler, real_mask_pool

        self.cfg = cfg
        self.out = out_uri
        table = sources(self.cfg)
        self.rows = {r["sample_id"]: r for r in table.to_pylist()}
        self.unusable_refs: set[str] = set()
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
                example = self._defect(r)
                if example is not None:
                    examples.append(example)
            normals = [img for img in (self._readable(self.rows[i]) for i in normal_ids(table)[: 2 * k])
                       if img is not None][:k]
        self.chain = build_chain(self.cfg.filters, defect_examples=examples, normal_images=normals)

    def _image(self, rec: dict[str, Any]) -> np.ndarray:
        img = manifest.load_image(rec)
        return resize_image(img, tuple(self.cfg.image_size)) if self.cfg.image_size else img

    def _readable(self, rec: dict[str, Any]) -> np.ndarray | None:
        """The source image, or None (logged) when it cannot be decoded: one bad file costs its use, not the job."""
        try:
            return self._image(rec)
        except DataError as e:
            log.warning("skipping %s: %s", rec["sample_id"], e.message)
            return None

    def _defect(self, rec: dict[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
        """A real defect (image, mask at the working size), or None when it is unusable: unreadable, or its mask
        empty at that size (a few pixels lost to the resize, or an empty ground truth)."""
        img = self._readable(rec)
        if img is None:
            return None
        try:
            mask = _fit_mask(manifest.load_mask(rec), img.shape[:2])
        except DataError as e:
            log.warning("skipping %s: %s", rec["sample_id"], e.message)
            return None
        if not mask.any():
            log.warning("real defect %s has an empty mask at %s; skipped", rec["sample_id"], img.shape[:2])
            return None
        return img, mask

    def _reference(self, rng: np.random.Generator) -> tuple[np.ndarray | None, np.ndarray | None, str | None]:
        """A random usable real defect (image, mask at the working size, id) for cut-paste; unusable ones are
        remembered and not drawn again."""
        for _ in range(20):
            usable = [r for r in self.defects if r["sample_id"] not in self.unusable_refs]
            if not usable:
                break
            rec = usable[int(rng.integers(len(usable)))]
            found = self._defect(rec)
            if found is not None:
                return found[0], found[1], rec["sample_id"]
            self.unusable_refs.add(rec["sample_id"])
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
            try:
                image = self._image(self.rows[q["source_id"]])
            except DataError as e:  # an unreadable source image costs its requests, not the job
                rejected.append({"index": q["index"], "reasons": [f"source: {e.message}"]})
                continue
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


def _fit_mask(mask: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    if mask is None:
        return np.zeros(shape, np.uint8)
    return mask if mask.shape == tuple(shape) else resize_mask(mask, shape)


def sources(cfg: SynthesizeConfig) -> pa.Table:
    from components.data import regimes

    sr = cfg.source_regime
    table = regimes.apply(manifest.read(cfg.manifest), sr.regime, mixed_masks=sr.mixed_masks, seed=sr.seed)
    table = table.filter(pc.is_in(table["split"], pa.array(list(cfg.source_splits))))
    return table.filter(pc.equal(table["source"], "real"))


def normal_ids(table: pa.Table) -> list[str]:
    return sorted(r["sample_id"] for r in table.select(["sample_id", "label"]).to_pylist() if r["label"] == 0)


def classes_of(cfg: SynthesizeConfig, table: pa.Table) -> list[str]:
    if cfg.classes:
        return list(cfg.classes)
    found = sorted({c for c, lab in zip(table["defect_class"].to_pylist(), table["label"].to_pylist(), strict=True)
                    if lab == 1 and c})
    return found or ["defect"]


def _mask_specs(cfg: SynthesizeConfig, has_real: bool) -> dict[str, Any]:
    return cfg.masks or {"default": {"kind": "real"} if has_real else {"kind": "blob"}}
