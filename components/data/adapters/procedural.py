"""The procedural layout: no folder at all, the embedded default data of :mod:`components.data.procedural`.

It is an adapter like the others so that ``defectflow ingest --dataset procedural`` produces an ordinary manifest
and the demo, the tests and a first laptop run all go through the same path as real data. Images and masks are
embedded as PNG bytes: there is no file to point at.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import Field, field_validator

from components.data import manifest
from components.data import procedural as gen
from components.data.adapters.base import Adapter, AdapterOptions, register
from components.data.images import DEFAULT_MAX_PIXELS, encode_mask_png, encode_png
from components.errors import DataError
from components.progress import bar

log = logging.getLogger(__name__)

DESCRIPTION = (
    "No root: images are generated from a seed (numpy only, bit-identical for the same options). Textured "
    f"industrial surfaces ({', '.join(gen.TEXTURES)}) with lighting gradients, sensor noise and texture rotation; "
    f"defects ({', '.join(gen.DEFECT_KINDS)}) drawn from exact geometry, so every defective image has an exact "
    "pixel mask and defect-free images an empty one. Options: count, size (int or [height, width], 32-4096), "
    "defect_fraction (exactly round(count x fraction) images are defective), seed, textures, defects (lists or "
    "comma-separated). Images and masks are embedded in the manifest as PNG bytes; ids are <dataset>/<index>."
)


class ProceduralOptions(AdapterOptions):
    count: int = Field(200, ge=1, le=1_000_000, description="number of images")
    size: int | tuple[int, int] = Field(128, description="side, or [height, width], in pixels (32-4096)")
    defect_fraction: float = Field(0.5, ge=0.0, le=1.0, description="share of defective images")
    seed: int = Field(0, description="generator seed (the ingest seed drives the split)")
    textures: list[str] = Field(list(gen.TEXTURES), description=f"subset of {list(gen.TEXTURES)}")
    defects: list[str] = Field(list(gen.DEFECT_KINDS), description=f"subset of {list(gen.DEFECT_KINDS)}")

    @field_validator("textures", "defects", mode="before")
    @classmethod
    def _csv(cls, v: Any) -> Any:
        return [p.strip() for p in v.split(",") if p.strip()] if isinstance(v, str) else v

    @field_validator("textures")
    @classmethod
    def _textures(cls, v: list[str]) -> list[str]:
        return _subset(v, gen.TEXTURES, "texture")

    @field_validator("defects")
    @classmethod
    def _defects(cls, v: list[str]) -> list[str]:
        return _subset(v, gen.DEFECT_KINDS, "defect kind")

    @field_validator("size")
    @classmethod
    def _size(cls, v: int | tuple[int, int]) -> int | tuple[int, int]:
        sides = (v, v) if isinstance(v, int) else v
        if not all(gen.MIN_SIZE <= s <= gen.MAX_SIZE for s in sides):
            raise ValueError(f"each side must be in [{gen.MIN_SIZE}, {gen.MAX_SIZE}]")
        return v


def _subset(values: list[str], allowed: tuple[str, ...], what: str) -> list[str]:
    bad = [x for x in values if x not in allowed]
    if bad or not values:
        raise ValueError(f"unknown or empty {what} list {values}; choose from {list(allowed)}")
    return values


class ProceduralAdapter(Adapter):
    name = "procedural"
    description = DESCRIPTION
    Options = ProceduralOptions
    needs_root = False

    def scan(self, root_uri: str | None, dataset_name: str, options: AdapterOptions, *,
             max_pixels: int = DEFAULT_MAX_PIXELS) -> list[dict[str, Any]]:
        assert isinstance(options, ProceduralOptions)
        h, w = (options.size, options.size) if isinstance(options.size, int) else options.size
        if h * w > max_pixels:
            raise DataError(f"procedural size {w}x{h} is above the pixel limit {max_pixels:,}",
                            "lower the size or raise max_image_pixels")
        log.info("generating %d procedural images of %dx%d (seed %d)", options.count, w, h, options.seed)
        rows = []
        samples = bar(gen.iter_samples(options.count, options.size, options.defect_fraction, options.seed,
                                            options.textures, options.defects),
                           total=options.count, desc="generating images", unit="img")
        for i, smp in enumerate(samples):
            mask_bytes = encode_mask_png(smp.mask) if smp.label == 1 else None
            rows.append(manifest.row(
                f"{dataset_name}/{i:06d}", dataset_name, width=w, height=h, split="",
                image_bytes=encode_png(smp.image), label=smp.label, mask_bytes=mask_bytes,
                defect_class=smp.defect_class, provenance={"adapter": self.name, **smp.provenance}))
        return rows


register(ProceduralAdapter())
