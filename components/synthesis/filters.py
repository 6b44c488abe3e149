"""Offline quality filters for synthetic samples, and the report of what they rejected.

SynSur filters its diffusion samples with DreamSim and CLIPScore: a sample is only worth training on when the
defect is visible, the rest of the image is intact, and the defect looks like a defect. Neither DreamSim nor
CLIP weights can be fetched on an offline machine, so every filter here works without the network:

==========================  ================================================================  ==================
filter                      measures                                                          passes when
==========================  ================================================================  ==================
``visible_change``          mean |synthetic − original| inside the mask (RGB in [0, 1])       >= 0.02
``background_preserved``    change outside the mask (grown by ``margin`` px): mean |Δ| or     mean |Δ| <= 0.01
                            PSNR                                                              (PSNR >= 30 dB)
``feature_realism``         d(normal) − d(defect): cosine distances of the region's masked    >= 0.0
                            feature embedding to the nearest real-defect region and to the
                            nearest real mask laid over normal texture (frozen
                            efficientnet_lite0, offline ImageNet weights)
``dreamsim_like``           DreamSim's formula, 1 − cos of mean-centred, L2-normalised        in [0.01, 0.35]
                            embeddings of the crop around the mask, against the original      (defects: <= 0.35)
                            crop (``against: source``; flattened feature maps) or the
                            nearest real defect crop (``against: defects``; feature stats)
``clip_score``              torchmetrics CLIPScore of the crop and the prompt, with a local   >= 20
                            CLIP model folder (optional)
==========================  ================================================================  ==================

Filters are composable: :class:`FilterChain` runs all of them on every sample (so provenance carries every score,
not only the first failure) and returns per-sample scores, ``passed`` and ``reasons``. Rejections are never
silent: the chain's :class:`FilterReport` counts evaluations and rejections per filter and per reason, keeps a few
example sample ids, merges across Ray actors, and is written next to the synthetic set.
"""

from __future__ import annotations

import logging
import math
import os
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage

from components.errors import ConfigError, DataError

log = logging.getLogger(__name__)

BELOW = "below_threshold"
ABOVE = "above_threshold"
EMPTY_MASK = "empty_mask"
NOT_FINITE = "not_finite"


@dataclass
class FilterInput:
    """One synthetic sample as the filters see it. Images are float RGB (H, W, 3) in [0, 1]; ``original`` is the
    defect-free image the generator started from (needed by the filters that compare against it)."""

    image: np.ndarray
    mask: np.ndarray
    original: np.ndarray | None = None
    prompt: str | None = None
    defect_class: str | None = None
    sample_id: str | None = None


@dataclass
class FilterResult:
    """``reason`` is a short code (counted by the report); ``detail`` the human-readable why."""

    filter: str
    score: float
    passed: bool
    reason: str | None = None
    detail: str | None = None


class SampleFilter(ABC):
    """Scores a batch of samples; pass/fail compares each score with the configured threshold."""

    name: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True

    def __init__(self, threshold: float):
        self.threshold = float(threshold)

    @abstractmethod
    def scores(self, inputs: Sequence[FilterInput]) -> list[float]:
        """One score per input."""

    def judge(self, score: float, item: FilterInput) -> FilterResult:
        if not math.isfinite(score):
            return FilterResult(self.name, score, False, NOT_FINITE, f"{self.name}: score is {score}")
        if self.higher_is_better:
            ok = score >= self.threshold
            return FilterResult(self.name, score, ok, None if ok else BELOW,
                                None if ok else f"{self.name}: {score:.4g} < {self.threshold:.4g}")
        ok = score <= self.threshold
        return FilterResult(self.name, score, ok, None if ok else ABOVE,
                            None if ok else f"{self.name}: {score:.4g} > {self.threshold:.4g}")

    def __call__(self, inputs: Sequence[FilterInput]) -> list[FilterResult]:
        out = []
        for item, score in zip(inputs, self.scores(inputs), strict=True):
            if not (np.asarray(item.mask) > 0).any():
                out.append(FilterResult(self.name, float("nan"), False, EMPTY_MASK, f"{self.name}: empty mask"))
            else:
                out.append(self.judge(float(score), item))
        return out


def _need_original(item: FilterInput, who: str) -> np.ndarray:
    if item.original is None:
        raise DataError(f"filter {who} compares with the original image, but the sample has none",
                        "pass FilterInput(original=...) (the defect-free image the generator started from)")
    if item.original.shape != item.image.shape:
        raise DataError(f"filter {who}: original {item.original.shape} and synthetic {item.image.shape} differ",
                        "compare images of the same size")
    return np.asarray(item.original, np.float32)


# -------------------------------------------------------------------------------------------- pixel filters


class VisibleChange(SampleFilter):
    """Did the generator change the masked region at all? Diffusion at low strength or a too-weak procedural
    effect leaves masks over untouched texture, which would teach a detector that normal texture is a defect."""

    name = "visible_change"

    def __init__(self, threshold: float = 0.02):
        super().__init__(threshold)

    def scores(self, inputs: Sequence[FilterInput]) -> list[float]:
        out = []
        for item in inputs:
            orig = _need_original(item, self.name)
            m = np.asarray(item.mask) > 0
            diff = np.abs(np.asarray(item.image, np.float32) - orig).mean(axis=2)
            out.append(float(diff[m].mean()) if m.any() else float("nan"))
        return out


class BackgroundPreserved(SampleFilter):
    """Did the generator leave the rest of the image alone? A change outside the mask is an unlabelled defect (or a
    global shift a detector can cheat on). ``margin`` pixels around the mask are excluded: blending changes them on
    purpose."""

    name = "background_preserved"

    def __init__(self, threshold: float | None = None, metric: Literal["mean_abs", "psnr"] = "mean_abs",
                 margin: int = 4):
        if metric not in ("mean_abs", "psnr"):
            raise ConfigError(f"unknown background metric {metric!r}", "use 'mean_abs' or 'psnr'")
        super().__init__(threshold if threshold is not None else (0.01 if metric == "mean_abs" else 30.0))
        self.metric = metric
        self.margin = int(margin)
        self.higher_is_better = metric == "psnr"  # type: ignore[misc]

    def scores(self, inputs: Sequence[FilterInput]) -> list[float]:
        out = []
        for item in inputs:
            orig = _need_original(item, self.name)
            m = np.asarray(item.mask) > 0
            outside = ndimage.distance_transform_edt(~m) > self.margin if m.any() else np.ones(m.shape, bool)
            if not outside.any():
                out.append(0.0 if self.metric == "mean_abs" else 100.0)
                continue
            diff = np.asarray(item.image, np.float32)[outside] - orig[outside]
            if self.metric == "mean_abs":
                out.append(float(np.abs(diff).mean()))
            else:
                mse = float((diff.astype(np.float64) ** 2).mean())
                out.append(100.0 if mse <= 1e-10 else min(100.0, 10.0 * math.log10(1.0 / mse)))
        return out


# ----------------------------------------------------------------------------------------- feature filters


def crop_box(mask: np.ndarray, context: float = 0.5, min_size: int = 32) -> tuple[int, int, int, int]:
    """A square window around the mask's bounding box, ``context`` times its size on each side, at least
    ``min_size`` pixels, moved (not clipped) to stay inside the image where possible: (y0, y1, x0, x1)."""
    m = np.asarray(mask) > 0
    H, W = m.shape
    if m.any():
        ys, xs = np.nonzero(m)
        cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
        side = max(ys.max() + 1 - ys.min(), xs.max() + 1 - xs.min()) * (1 + 2 * context)
    else:
        cy, cx, side = H / 2, W / 2, min(H, W)
    side = int(min(max(side, min_size), H, W)) if min(H, W) >= min_size else min(H, W)
    sh = sw = side
    y0 = int(np.clip(round(cy - sh / 2), 0, H - sh))
    x0 = int(np.clip(round(cx - sw / 2), 0, W - sw))
    return y0, y0 + sh, x0, x0 + sw


class RegionEmbedder:
    """Embeddings of image regions with a frozen backbone, shared by the feature filters.

    A region is the square crop around a mask (:func:`crop_box`), resized to ``crop_size``. ``masked`` embeddings
    average each feature map over the (downsampled) mask, so a small defect is not drowned by the texture around
    it; ``stats`` embeddings concatenate per-channel mean and standard deviation over the whole crop (texture
    statistics, position-free); ``spatial`` embeddings are the flattened feature maps (an LPIPS-like comparison of
    two crops of the same window, sensitive to where things changed). Each layer's block is L2-normalised before
    concatenation so the deep layer's larger activations do not dominate.

    ``backbone`` defaults to the offline ImageNet ``efficientnet_lite0`` (layers at strides 8 and 16).
    """

    def __init__(self, backbone: Any = None, crop_size: int = 96, context: float = 0.5, min_crop: int = 32,
                 batch_size: int = 16, device: str = "cpu"):
        import torch

        from components.backbones import BackboneSpec, create_backbone, imagenet_normalization

        if backbone is None:
            backbone = create_backbone(BackboneSpec())
        elif isinstance(backbone, BackboneSpec):
            backbone = create_backbone(backbone)
        self.backbone = backbone.to(device).eval()
        self.crop_size, self.context, self.min_crop = int(crop_size), float(context), int(min_crop)
        self.batch_size, self.device = int(batch_size), device
        mean, std = imagenet_normalization()
        self._mean = torch.tensor(mean).view(1, 3, 1, 1).to(device)
        self._std = torch.tensor(std).view(1, 3, 1, 1).to(device)

    def crops(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray | None],
              boxes: Sequence[tuple[int, int, int, int] | None] | None = None) -> tuple[Any, Any]:
        """(N, 3, S, S) crops and (N, 1, S, S) soft masks, as tensors; a None mask is the whole crop."""
        import torch
        import torch.nn.functional as F

        xs, ms = [], []
        for i, (img, m) in enumerate(zip(images, masks, strict=True)):
            img = np.asarray(img, np.float32)
            mm = np.ones(img.shape[:2], np.float32) if m is None else (np.asarray(m) > 0).astype(np.float32)
            box = boxes[i] if boxes is not None and boxes[i] is not None else (
                crop_box(mm, self.context, self.min_crop) if m is not None else (0, img.shape[0], 0, img.shape[1]))
            y0, y1, x0, x1 = box
            t = torch.from_numpy(np.ascontiguousarray(img[y0:y1, x0:x1])).permute(2, 0, 1)[None]
            tm = torch.from_numpy(np.ascontiguousarray(mm[y0:y1, x0:x1]))[None, None]
            size = (self.crop_size, self.crop_size)
            xs.append(F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True))
            ms.append(F.interpolate(tm, size=size, mode="area"))
        return torch.cat(xs), torch.cat(ms)

    def _features(self, x: Any) -> list[Any]:
        import torch

        with torch.no_grad():
            return self.backbone(((x.to(self.device) - self._mean) / self._std).float())

    def embed(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray | None] | None = None,
              mode: Literal["masked", "stats", "spatial"] = "masked",
              boxes: Sequence[tuple[int, int, int, int] | None] | None = None) -> np.ndarray:
        """(N, D) float32 embeddings of the regions around ``masks`` (None: whole images)."""
        import torch
        import torch.nn.functional as F

        masks = list(masks) if masks is not None else [None] * len(images)
        out = []
        for s in range(0, len(images), self.batch_size):
            x, m = self.crops(images[s:s + self.batch_size], masks[s:s + self.batch_size],
                              None if boxes is None else boxes[s:s + self.batch_size])
            parts = []
            for f in self._features(x):
                if mode == "masked":
                    w = F.interpolate(m, size=f.shape[-2:], mode="area").to(f.device)
                    peak = F.adaptive_max_pool2d(m, f.shape[-2:]).to(f.device)
                    # a mask thinner than a feature cell averages to ~0 at coarse levels: fall back to coverage
                    w = torch.where(w.sum(dim=(2, 3), keepdim=True) > 0.5, w, peak)
                    v = (f * w).sum(dim=(2, 3)) / w.sum(dim=(2, 3)).clamp_min(1e-6)
                elif mode == "stats":
                    v = torch.cat([f.mean(dim=(2, 3)), f.std(dim=(2, 3))], dim=1)
                else:
                    v = f.flatten(1)
                parts.append(F.normalize(v, dim=1))
            out.append(torch.cat(parts, dim=1).cpu().numpy().astype(np.float32))
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def _cosine_distance_to_bank(x: np.ndarray, bank: np.ndarray, k: int = 1) -> np.ndarray:
    sims = _unit(x) @ _unit(bank).T
    k = min(k, bank.shape[0])
    top = -np.sort(-sims, axis=1)[:, :k]
    return 1.0 - top.mean(axis=1)


def defect_regions(examples: Sequence[tuple[np.ndarray, np.ndarray]], max_per_image: int = 4,
                   min_area: int = 4) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Split real (image, mask) examples into one (image, component mask) pair per defect, so an image with two
    distant defects gives two prototypes instead of one blurred average."""
    from components.synthesis.labels import components

    images, masks = [], []
    for img, mask in examples:
        labels, boxes = components(mask, min_area)
        boxes = sorted(enumerate(boxes, start=1), key=lambda b: -b[1][4])[:max_per_image]
        for i, _ in boxes:
            images.append(img)
            masks.append((labels == i).astype(np.uint8))
    return images, masks


class FeatureRealism(SampleFilter):
    """Is the synthesized region closer, in ImageNet feature space, to real defects than to normal texture?

    Prototype banks are embedded once (:meth:`fit`) from real defect regions (masked average over each defect
    component) and from the same masks laid over normal images. A sample's region embedding is
    compared with both by cosine distance to the ``k`` nearest entries; score = d(normal) − d(defect). A region
    that still looks like plain texture scores below 0.
    """

    name = "feature_realism"

    def __init__(self, embedder: RegionEmbedder, defect_bank: np.ndarray, normal_bank: np.ndarray,
                 threshold: float = 0.0, k: int = 1):
        super().__init__(threshold)
        if len(defect_bank) == 0 or len(normal_bank) == 0:
            raise DataError("feature_realism needs real defect regions and normal images to compare with",
                            "give defective images with masks and defect-free images, or drop this filter")
        self.embedder, self.k = embedder, int(k)
        self.defect_bank, self.normal_bank = np.asarray(defect_bank, np.float32), np.asarray(normal_bank, np.float32)

    @classmethod
    def fit(cls, embedder: RegionEmbedder, defect_examples: Sequence[tuple[np.ndarray, np.ndarray]],
            normal_images: Sequence[np.ndarray], threshold: float = 0.0, k: int = 1, crops_per_normal: int = 4,
            seed: int = 0) -> FeatureRealism:
        """Embed the prototype banks. Normal prototypes are the real defect masks themselves, placed at random on
        the normal images: the null hypothesis "this mask covers plain texture" then has the same mask geometry
        (size, thinness, crop zoom) as the samples it is compared with."""
        from components.synthesis.masks import place

        images, masks = defect_regions(defect_examples)
        defect_bank = embedder.embed(images, masks, mode="masked")
        rng = np.random.default_rng(seed)
        n_imgs, n_masks = [], []
        for img in normal_images:
            for _ in range(crops_per_normal if masks else 0):
                placed = place(masks[int(rng.integers(len(masks)))], img.shape[:2], rng=rng)
                if placed is not None:
                    n_imgs.append(img)
                    n_masks.append(placed)
        normal_bank = embedder.embed(n_imgs, n_masks, mode="masked") if n_imgs else np.zeros((0, 0), np.float32)
        log.info("feature_realism: %d defect and %d normal prototypes", len(defect_bank), len(normal_bank))
        return cls(embedder, defect_bank, normal_bank, threshold=threshold, k=k)

    def distances(self, inputs: Sequence[FilterInput]) -> tuple[np.ndarray, np.ndarray]:
        """(d_normal, d_defect) per input."""
        emb = self.embedder.embed([i.image for i in inputs], [i.mask for i in inputs], mode="masked")
        return (_cosine_distance_to_bank(emb, self.normal_bank, self.k),
                _cosine_distance_to_bank(emb, self.defect_bank, self.k))

    def scores(self, inputs: Sequence[FilterInput]) -> list[float]:
        if not inputs:
            return []
        d_normal, d_defect = self.distances(inputs)
        return [float(v) for v in d_normal - d_defect]


def dreamsim_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """DreamSim's distance on any embeddings: 1 − cos of per-vector mean-centred, L2-normalised vectors."""
    def norm(v: np.ndarray) -> np.ndarray:
        v = np.asarray(v, np.float64)
        return _unit(v - v.mean(axis=-1, keepdims=True))

    return 1.0 - (norm(a) * norm(b)).sum(axis=-1)


class DreamSimLike(SampleFilter):
    """DreamSim's role without its weights: perceptual distance of the crop around the mask.

    ``against="source"``: distance between the synthetic and the original crop (same window); a sample passes when
    it is visibly different but not wrecked (``min_distance`` <= d <= ``threshold``). ``against="defects"``:
    distance to the nearest real defect crop (``defect_bank`` from :meth:`fit_defects`); passes when
    d <= ``threshold``. Embeddings are texture statistics of the shared backbone by default; ``embed_fn`` plugs in
    a real perceptual model (N×3×H×W tensor in [0, 1] → N×D), e.g. DreamSim's ``embed`` where it is installed.
    """

    name = "dreamsim_like"
    higher_is_better = False

    def __init__(self, embedder: RegionEmbedder, threshold: float = 0.35, min_distance: float = 0.01,
                 against: Literal["source", "defects"] = "source", defect_bank: np.ndarray | None = None,
                 embed_fn: Callable[[Any], Any] | None = None):
        super().__init__(threshold)
        if against not in ("source", "defects"):
            raise ConfigError(f"dreamsim_like: unknown reference {against!r}", "use 'source' or 'defects'")
        if against == "defects" and (defect_bank is None or len(defect_bank) == 0):
            raise DataError("dreamsim_like against defects needs real defect crops",
                            "build it with DreamSimLike.fit_defects(...) or use against='source'")
        self.embedder, self.against, self.min_distance = embedder, against, float(min_distance)
        self.defect_bank, self.embed_fn = defect_bank, embed_fn

    def _embed(self, images: Sequence[np.ndarray], boxes: Sequence[tuple[int, int, int, int]]) -> np.ndarray:
        if self.embed_fn is None:
            # the same window before/after: compare maps position by position; different defects: statistics
            mode = "spatial" if self.against == "source" else "stats"
            return self.embedder.embed(images, [None] * len(images), mode=mode, boxes=boxes)
        import torch

        x, _ = self.embedder.crops(images, [None] * len(images), boxes)
        with torch.no_grad():
            return np.asarray(self.embed_fn(x).detach().cpu().numpy(), np.float32)

    @classmethod
    def fit_defects(cls, embedder: RegionEmbedder, defect_examples: Sequence[tuple[np.ndarray, np.ndarray]],
                    threshold: float = 0.35, **kwargs: Any) -> DreamSimLike:
        images, masks = defect_regions(defect_examples)
        probe = cls(embedder, threshold=threshold, against="defects", defect_bank=np.zeros((1, 1)), **kwargs)
        boxes = [crop_box(m, embedder.context, embedder.min_crop) for m in masks]
        bank = probe._embed(images, boxes)
        return cls(embedder, threshold=threshold, against="defects", defect_bank=bank, **kwargs)

    def scores(self, inputs: Sequence[FilterInput]) -> list[float]:
        if not inputs:
            return []
        boxes = [crop_box(i.mask, self.embedder.context, self.embedder.min_crop) for i in inputs]
        syn = self._embed([i.image for i in inputs], boxes)
        if self.against == "source":
            orig = self._embed([_need_original(i, self.name) for i in inputs], boxes)
            return [float(v) for v in dreamsim_distance(syn, orig)]
        assert self.defect_bank is not None
        a = syn - syn.mean(axis=1, keepdims=True)
        b = self.defect_bank - self.defect_bank.mean(axis=1, keepdims=True)
        return [float(v) for v in _cosine_distance_to_bank(a, b, 1)]

    def judge(self, score: float, item: FilterInput) -> FilterResult:
        if self.against == "source" and math.isfinite(score) and score < self.min_distance:
            return FilterResult(self.name, score, False, BELOW,
                                f"{self.name}: {score:.4g} < min_distance {self.min_distance:.4g} (no visible change)")
        return super().judge(score, item)


# ------------------------------------------------------------------------------------------------ CLIP


def _pooled(out: Any) -> Any:
    """transformers 5 returns model outputs where torchmetrics 1.9 expects tensors; the embedding is the
    ``pooler_output`` (already projected)."""
    import torch

    return out if isinstance(out, torch.Tensor) else out.pooler_output


def clip_model_factory(model_dir: str) -> Callable[[], tuple[Any, Any]]:
    """The callable torchmetrics' ``CLIPScore(model_name_or_path=...)`` accepts for a local model folder (its string
    form only takes hub names). The model is wrapped so ``get_*_features`` return tensors under transformers 5."""
    from torch import nn

    class PooledCLIP(nn.Module):
        def __init__(self, model: Any):
            super().__init__()
            self.model = model
            self.config = model.config

        def get_image_features(self, *args: Any, **kwargs: Any) -> Any:
            return _pooled(self.model.get_image_features(*args, **kwargs))

        def get_text_features(self, *args: Any, **kwargs: Any) -> Any:
            return _pooled(self.model.get_text_features(*args, **kwargs))

    def factory() -> tuple[Any, Any]:
        from transformers import CLIPModel, CLIPProcessor

        model = CLIPModel.from_pretrained(model_dir, local_files_only=True)
        processor = CLIPProcessor.from_pretrained(model_dir, local_files_only=True)
        return PooledCLIP(model).eval(), processor

    return factory


class CLIPScoreFilter(SampleFilter):
    """Does the crop around the defect match its text prompt? torchmetrics ``CLIPScore`` = max(100·cos, 0).

    Only with a local CLIP folder (``save_pretrained`` of a ``CLIPModel`` and ``CLIPProcessor``): real CLIP weights
    need the hub, and a meaningless score is worse than no filter. The prompt is the sample's prompt, else
    ``prompt_template`` filled with the defect class.
    """

    name = "clip_score"

    def __init__(self, model_dir: str, threshold: float = 20.0,
                 prompt_template: str = "a photo of a {defect_class} defect on an industrial surface",
                 crop: bool = True, context: float = 0.5, min_crop: int = 32):
        super().__init__(threshold)
        if "://" in str(model_dir) or not os.path.isdir(model_dir):
            raise ConfigError(f"clip_score needs a local CLIP model folder; {model_dir!r} is not one",
                              "save a CLIPModel and CLIPProcessor with save_pretrained into a local folder, "
                              "or drop the clip_score filter")
        from torchmetrics.multimodal import CLIPScore

        self.metric = CLIPScore(model_name_or_path=clip_model_factory(model_dir))
        self.prompt_template, self.crop, self.context, self.min_crop = prompt_template, crop, context, min_crop

    def prompt_for(self, item: FilterInput) -> str:
        return item.prompt or self.prompt_template.format(defect_class=item.defect_class or "surface")

    def scores(self, inputs: Sequence[FilterInput]) -> list[float]:
        import torch

        out = []
        for item in inputs:
            img = np.asarray(item.image, np.float32)
            if self.crop:
                y0, y1, x0, x1 = crop_box(item.mask, self.context, self.min_crop)
                img = img[y0:y1, x0:x1]
            t = torch.from_numpy(np.ascontiguousarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)))
            with torch.no_grad():
                self.metric.update(t.permute(2, 0, 1), self.prompt_for(item))
                out.append(float(self.metric.compute()))
            self.metric.reset()
        return out


# ------------------------------------------------------------------------------------------ chain, report


@dataclass
class FilterReport:
    """Counts of what every filter evaluated and rejected, by reason; JSON-able and mergeable across actors."""

    total: int = 0
    passed: int = 0
    per_filter: dict[str, dict[str, Any]] = field(default_factory=dict)
    max_examples: int = 20

    @property
    def rejected(self) -> int:
        return self.total - self.passed

    def add(self, results: Sequence[FilterResult], sample_id: str | None = None) -> None:
        self.total += 1
        ok = all(r.passed for r in results)
        self.passed += int(ok)
        for r in results:
            entry = self.per_filter.setdefault(r.filter, {"evaluated": 0, "rejected": 0, "reasons": {},
                                                          "examples": []})
            entry["evaluated"] += 1
            if not r.passed:
                entry["rejected"] += 1
                reason = r.reason or "rejected"
                entry["reasons"][reason] = entry["reasons"].get(reason, 0) + 1
                if sample_id is not None and len(entry["examples"]) < self.max_examples:
                    entry["examples"].append(sample_id)

    def merge(self, other: FilterReport) -> FilterReport:
        out = FilterReport.from_dict(self.to_dict())
        out.total += other.total
        out.passed += other.passed
        for name, e in other.per_filter.items():
            mine = out.per_filter.setdefault(name, {"evaluated": 0, "rejected": 0, "reasons": {}, "examples": []})
            mine["evaluated"] += e["evaluated"]
            mine["rejected"] += e["rejected"]
            mine["reasons"] = dict(Counter(mine["reasons"]) + Counter(e["reasons"]))
            mine["examples"] = (mine["examples"] + e["examples"])[:self.max_examples]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "passed": self.passed, "rejected": self.rejected,
                "per_filter": {k: {**v, "reasons": dict(v["reasons"]), "examples": list(v["examples"])}
                               for k, v in self.per_filter.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FilterReport:
        return cls(total=int(d.get("total", 0)), passed=int(d.get("passed", 0)),
                   per_filter={k: {**v, "reasons": dict(v["reasons"]), "examples": list(v["examples"])}
                               for k, v in d.get("per_filter", {}).items()})

    def summary(self) -> str:
        parts = [f"{self.passed}/{self.total} passed"]
        for name, e in self.per_filter.items():
            if e["rejected"]:
                reasons = ", ".join(f"{k}: {v}" for k, v in sorted(e["reasons"].items()))
                parts.append(f"{name} rejected {e['rejected']} ({reasons})")
        return "; ".join(parts)


class FilterChain:
    """Runs every filter on every sample and records the outcome in :attr:`report`.

    Returns one dict per sample: ``scores`` (filter name -> score, for provenance), ``passed`` (all filters
    passed) and ``reasons`` (the human-readable why of each failure). Callers keep or drop samples by ``passed``;
    the report is what tells the user how many were dropped and why.
    """

    def __init__(self, filters: Sequence[SampleFilter], report: FilterReport | None = None):
        names = [f.name for f in filters]
        if len(set(names)) != len(names):
            raise ConfigError(f"filter chain repeats a filter: {names}", "list each filter once")
        self.filters = list(filters)
        self.report = report or FilterReport()

    def evaluate(self, inputs: Sequence[FilterInput]) -> list[dict[str, Any]]:
        per_filter = [f(inputs) for f in self.filters]
        out = []
        for i, item in enumerate(inputs):
            results = [res[i] for res in per_filter]
            self.report.add(results, item.sample_id)
            passed = all(r.passed for r in results)
            reasons = [r.detail or f"{r.filter}: {r.reason}" for r in results if not r.passed]
            if not passed:
                log.debug("sample %s rejected: %s", item.sample_id, "; ".join(reasons))
            out.append({"scores": {r.filter: r.score for r in results}, "passed": passed, "reasons": reasons})
        return out

    __call__ = evaluate


# ------------------------------------------------------------------------------------------------ config


FilterName = Literal["visible_change", "background_preserved", "feature_realism", "dreamsim_like", "clip_score"]


class FilterSpec(BaseModel):
    """One filter of a synthesize config: ``name``, its ``threshold`` (null = the default in the module table) and
    filter-specific ``params`` (e.g. ``metric``/``margin``, ``against``/``min_distance``, ``model_dir``, ``k``)."""

    model_config = ConfigDict(extra="forbid")

    name: FilterName
    threshold: float | None = None
    params: dict[str, Any] = Field(default_factory=dict)


def build_chain(specs: Sequence[FilterSpec | dict[str, Any]], embedder: RegionEmbedder | None = None,
                defect_examples: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
                normal_images: Sequence[np.ndarray] | None = None) -> FilterChain:
    """A chain from config entries. The feature filters share one embedder (built on demand) and are fitted on the
    given real defect examples / normal images."""
    filters: list[SampleFilter] = []
    for raw in specs:
        spec = raw if isinstance(raw, FilterSpec) else FilterSpec.model_validate(raw)
        kw: dict[str, Any] = dict(spec.params)
        if spec.threshold is not None:
            kw["threshold"] = spec.threshold
        try:
            if spec.name == "visible_change":
                filters.append(VisibleChange(**kw))
            elif spec.name == "background_preserved":
                filters.append(BackgroundPreserved(**kw))
            elif spec.name == "clip_score":
                filters.append(CLIPScoreFilter(**kw))
            else:
                embedder = embedder or RegionEmbedder()
                if spec.name == "feature_realism":
                    filters.append(FeatureRealism.fit(embedder, defect_examples or [], normal_images or [], **kw))
                elif kw.get("against", "source") == "defects":
                    kw.pop("against")
                    filters.append(DreamSimLike.fit_defects(embedder, defect_examples or [], **kw))
                else:
                    filters.append(DreamSimLike(embedder, **kw))
        except TypeError as e:
            raise ConfigError(f"filter {spec.name}: bad params {sorted(spec.params)}: {e}",
                              "see components/synthesis/filters.py for each filter's parameters") from e
    return FilterChain(filters)
