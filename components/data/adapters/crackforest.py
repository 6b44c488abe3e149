"""CrackForest (Shi et al., IEEE T-ITS 2016): road-surface cracks with MATLAB ground truth.

The masks are BSDS-style MATLAB structs, which no image decoder reads, so this adapter converts them to PNG at
ingest time and carries them as ``mask_bytes``: later steps (and Ray workers without scipy quirks) only ever see
ordinary masks.

``Segmentation`` is a region labelling, not a binary mask. 1 is the background and 2 the crack, as documented,
but 22 of the 118 files hold further regions (3, 4): some are background islands enclosed by crack branches (wide
blobs bounded by label 2), others are separate, disconnected cracks (thin strokes on the background). The default
``extra_segments: thin`` tells them apart by shape: a connected region of label >= 3 counts as crack when almost
nothing of it survives a 2-pixel erosion (it is a stroke, not an area).
"""

from __future__ import annotations

import io
import logging
from typing import Any, Literal

import numpy as np
from pydantic import Field

from components import storage
from components.data import manifest
from components.data.adapters.base import (
    Adapter,
    AdapterOptions,
    Unreadable,
    is_image,
    list_files,
    parallel_map,
    probe_sizes,
    register,
    relative,
    sample_id,
    stem_of,
    unreadable_row,
)
from components.data.images import DEFAULT_MAX_PIXELS, encode_mask_png
from components.errors import DataError

log = logging.getLogger(__name__)

BACKGROUND, CRACK = 1, 2
THIN_SURVIVAL = 0.10  # a region is a stroke when < 10 % of it survives a 2-px erosion

DESCRIPTION = (
    "<root>/image/<nnn>.jpg are the images (RGB 480x320 road surfaces) and <root>/groundTruth/<nnn>.mat their "
    "ground truth: a MATLAB struct 'groundTruth' whose field 'Segmentation' labels regions (1 = background, 2 = "
    "crack; extra regions 3, 4 are classified by shape, see the extra_segments option; several annotators are "
    "merged). The masks are converted to PNG and embedded; label = 1 when a crack pixel exists, else 0. Images "
    "without a .mat get label null and supervision none. seg/ (Berkeley .seg files) is ignored. There is no "
    "official split: a deterministic one is derived from the file names."
)


class CrackForestOptions(AdapterOptions):
    extra_segments: Literal["thin", "crack", "background"] = Field(
        "thin", description="regions labelled >= 3: 'thin' strokes are crack, areas background; or all one way")


class CrackForestAdapter(Adapter):
    name = "crackforest"
    description = DESCRIPTION
    Options = CrackForestOptions

    def scan(self, root_uri: str | None, dataset_name: str, options: AdapterOptions, *,
             max_pixels: int = DEFAULT_MAX_PIXELS) -> list[dict[str, Any]]:
        assert root_uri is not None and isinstance(options, CrackForestOptions)
        images: list[tuple[str, str]] = []
        mats: dict[str, str] = {}
        for uri in list_files(root_uri):
            rel = relative(root_uri, uri)
            parts = rel.split("/")
            if len(parts) != 2:
                continue
            folder = parts[0].lower()
            if folder == "image" and is_image(uri):
                images.append((uri, rel))
            elif folder == "groundtruth" and rel.lower().endswith(".mat"):
                mats[stem_of(parts[1])] = uri
        if not images:
            raise self.empty_error(root_uri, "no image/<nnn>.jpg")

        sizes = probe_sizes([u for u, _ in images], max_pixels)
        stems = [stem_of(rel.split("/")[1]) for _, rel in images]
        with_gt = [i for i, s in enumerate(stems) if s in mats]
        masks = parallel_map(lambda i: load_mask(mats[stems[i]], options.extra_segments), with_gt,
                             desc="converting .mat masks")
        by_index = dict(zip(with_gt, masks, strict=True))

        rows = []
        for i, ((uri, rel), size) in enumerate(zip(images, sizes, strict=True)):
            if isinstance(size, Unreadable):
                rows.append(unreadable_row(dataset_name, rel, size))
                continue
            w, h = size
            prov: dict[str, Any] = {"adapter": self.name}
            mask = by_index.get(i)
            if mask is None:
                rows.append(manifest.row(sample_id(dataset_name, rel), dataset_name, width=w, height=h, split="",
                                         image_uri=uri, label=None, provenance=prov))
                continue
            if mask.shape != (h, w):
                raise DataError(f"{mats[stems[i]]}: Segmentation is {mask.shape[1]}x{mask.shape[0]} but {uri} is "
                                f"{w}x{h}", "fix or remove the ground-truth file")
            label = int(mask.any())
            prov["mask_uri"] = mats[stems[i]]
            rows.append(manifest.row(sample_id(dataset_name, rel), dataset_name, width=w, height=h, split="",
                                     image_uri=uri, label=label, mask_bytes=encode_mask_png(mask),
                                     defect_class="crack" if label else None, provenance=prov))
        orphans = sorted(set(mats) - set(stems))
        if orphans:
            log.warning("crackforest: %d .mat file(s) without an image, e.g. %s", len(orphans), orphans[:3])
        log.info("crackforest: %d images, %d with ground truth", len(rows), len(with_gt))
        return rows


def load_mask(uri: str, extra_segments: str = "thin") -> np.ndarray:
    """A CrackForest/BSDS ``.mat`` -> uint8 {0, 1} crack mask (union over annotators)."""
    segs = read_segmentations(storage.read_bytes(uri), uri)
    if len({s.shape for s in segs}) > 1:
        raise DataError(f"{uri}: the annotators' Segmentation sizes differ ({[s.shape for s in segs]})",
                        "fix or remove the ground-truth file")
    out = np.zeros(segs[0].shape, dtype=bool)
    for seg in segs:
        out |= crack_mask(seg, extra_segments)
    return out.astype(np.uint8)


def read_segmentations(data: bytes, name: str = "<mat>") -> list[np.ndarray]:
    """Every 2-D ``Segmentation`` array in a MATLAB file, wherever the struct/cell nesting puts it."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(io.BytesIO(data))
    except NotImplementedError as e:  # MATLAB v7.3 files are HDF5
        raise DataError(f"{name}: MATLAB v7.3 (HDF5) files are not supported",
                        "re-save it with save(..., '-v7') in MATLAB or Octave") from e
    except Exception as e:
        raise DataError(f"{name}: not a readable MATLAB file ({e})", "re-export or remove it") from e
    keys = ["groundTruth"] + [k for k in mat if not k.startswith("__") and k != "groundTruth"]
    found: list[np.ndarray] = []
    for k in keys:
        if k in mat:
            _collect(mat[k], found, depth=0)
        if found:
            break
    if not found:
        raise DataError(f"{name}: no 'Segmentation' field found (keys: {sorted(k for k in mat if k[:2] != '__')})",
                        "CrackForest ground truth is a struct groundTruth with a field Segmentation")
    return found


def _collect(obj: Any, found: list[np.ndarray], depth: int) -> None:
    if depth > 8:
        return
    if isinstance(obj, np.ndarray):
        if obj.dtype.names:
            for el in obj.reshape(-1):
                if "Segmentation" in obj.dtype.names:
                    seg = _unwrap(el["Segmentation"])
                    if seg is not None:
                        found.append(seg)
                        continue
                for field_name in obj.dtype.names:
                    _collect(el[field_name], found, depth + 1)
        elif obj.dtype == object:
            for el in obj.reshape(-1):
                _collect(el, found, depth + 1)
    elif isinstance(obj, np.void) and obj.dtype.names:
        _collect(np.asarray([obj]), found, depth + 1)


def _unwrap(value: Any) -> np.ndarray | None:
    """A 2-D numeric array out of MATLAB's (1, 1) object wrappers."""
    for _ in range(6):
        if isinstance(value, np.ndarray) and value.dtype == object:
            if value.size != 1:
                return None
            value = value.reshape(-1)[0]
        else:
            break
    if isinstance(value, np.ndarray) and value.ndim == 2 and value.dtype.kind in "uif" and value.size:
        return value
    return None


def crack_mask(seg: np.ndarray, extra_segments: str = "thin") -> np.ndarray:
    """Region labelling -> bool crack mask (see the module docstring for labels >= 3)."""
    seg = np.asarray(seg)
    mask = seg == CRACK
    extra = seg > CRACK
    if not extra.any() or extra_segments == "background":
        return mask
    if extra_segments == "crack":
        return mask | extra
    from scipy import ndimage

    for value in np.unique(seg[extra]):
        comps, n = ndimage.label(seg == value)
        for k in range(1, n + 1):
            region = comps == k
            survived = ndimage.binary_erosion(region, iterations=2).sum()
            if survived < THIN_SURVIVAL * region.sum():
                mask |= region
    return mask


register(CrackForestAdapter())
