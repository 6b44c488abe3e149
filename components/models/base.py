"""The Detector contract every model family implements.

``forward(images) -> DetectorOutput(score[B], anomaly_map[B,1,H,W])`` in eval mode, where ``images`` is float RGB in
[0, 1] of any size (B, 3, H, W). Pre-processing (resize to the model's input size, normalisation) and
post-processing (sigmoid, upsampling back to (H, W), blur, score reduction) happen inside the module, so training,
evaluation, ONNX export and serving run the same graph. Training-only pieces (losses, synthetic feature noise) live
beside the module in the family's ``loss.py``/``objective``, never inside ``forward``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn


class DetectorOutput(NamedTuple):
    """``score``: (B,) image-level defect score; ``anomaly_map``: (B, 1, H, W) in [0, 1] at the input size."""

    score: torch.Tensor
    anomaly_map: torch.Tensor


class Preprocessing(BaseModel):
    """How raw [0, 1] RGB images become the network's input. Stored in detector.json."""

    model_config = ConfigDict(extra="forbid")

    input_size: tuple[int, int] = Field((256, 256), description="(height, width) the network sees")
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    scale_by_max: bool = Field(False, description="divide each image by its own max first (GMBINet authors)")
    grayscale: bool = Field(False, description="average RGB to one channel replicated 3x before normalising")

    layout: Literal["squash", "letterbox", "tile"] = Field(
        "squash", description="how an image of another size meets input_size: squash (resize to it, the aspect "
                              "ratio is lost), letterbox (resize the longer side to fit, pad the rest, crop the "
                              "map back), tile (overlapping input_size tiles at tile_scale x native resolution, "
                              "maps stitched back): for thin defects on large or elongated images")
    tile_overlap: float = Field(0.25, ge=0, le=0.75, description="tile: share of a tile shared with its neighbour")
    tile_scale: float = Field(1.0, gt=0, le=4, description="tile: resize the image by this factor before tiling")
    tile_score: Literal["map", "tiles"] = Field(
        "map", description="tile: the image score from the stitched map (the postprocessing reduction) or the "
                           "highest tile score (families with a classification head)")

    @field_validator("input_size")
    @classmethod
    def _positive(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 8 or v[1] < 8:
            raise ValueError("input_size must be at least 8x8")
        return v

    @field_validator("std")
    @classmethod
    def _nonzero(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(s <= 0 for s in v):
            raise ValueError("std values must be > 0")
        return v


class Postprocessing(BaseModel):
    """How the network's output becomes a defect map and a score. Stored in detector.json."""

    model_config = ConfigDict(extra="forbid")

    score: str = Field("max", pattern="^(max|mean|topk_mean)$", description="map -> image score reduction")
    topk_fraction: float = Field(0.01, gt=0, le=1, description="share of pixels averaged by topk_mean")
    blur_sigma: float = Field(0.0, ge=0, description="Gaussian blur of the map (0 = none)")


class Detector(nn.Module):
    """Base class: owns pre/post-processing; subclasses implement :meth:`raw_map` on preprocessed input."""

    family: ClassVar[str] = ""

    def __init__(self, preprocessing: Preprocessing, postprocessing: Postprocessing):
        super().__init__()
        self.preprocessing = preprocessing
        self.postprocessing = postprocessing
        self.register_buffer("_mean", torch.tensor(preprocessing.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(preprocessing.std).view(1, 3, 1, 1), persistent=False)

    # -- the contract -------------------------------------------------------------------------------------------

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] RGB (B, 3, H, W) -> normalised network input at ``input_size``."""
        x = images.float()
        if self.preprocessing.scale_by_max:
            x = x / x.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-8)
        if self.preprocessing.grayscale:
            x = x.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
        h, w = self.preprocessing.input_size
        if tuple(x.shape[-2:]) != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=False)
        return (x - self._mean) / self._std

    def raw_map(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed input -> defect probability map (B, 1, h, w) in [0, 1] at the network's resolution."""
        raise NotImplementedError

    def image_score(self, prob_map: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Map (B, 1, H, W) -> score (B,). Families with a classification head override this."""
        flat = prob_map.flatten(1)
        mode = self.postprocessing.score
        if mode == "mean":
            return flat.mean(dim=1)
        if mode == "topk_mean":
            k = max(1, round(flat.shape[1] * self.postprocessing.topk_fraction))
            return flat.topk(k, dim=1).values.mean(dim=1)
        return flat.amax(dim=1)

    def forward(self, images: torch.Tensor) -> DetectorOutput:
        h, w = images.shape[-2:]
        x = self.preprocess(images)
        prob = self.raw_map(x)
        if self.postprocessing.blur_sigma > 0:
            prob = gaussian_blur(prob, self.postprocessing.blur_sigma)
        if tuple(prob.shape[-2:]) != (h, w):
            prob = F.interpolate(prob, size=(h, w), mode="bilinear", align_corners=False)
        prob = prob.clamp(0.0, 1.0)
        return DetectorOutput(score=self.image_score(prob, x), anomaly_map=prob)

    # -- feature cache (families with a frozen extractor) -----------------------------------------------------------

    #: True when ``extract`` is a frozen function of the preprocessed image, so its output can be computed once and
    #: cached (``defectflow features``) and the trainable part trained from the cache.
    supports_feature_cache: ClassVar[bool] = False

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed input -> the frozen features the trainable part consumes."""
        raise NotImplementedError(f"{self.family} has no frozen feature extractor")

    def feature_shape(self, input_size: tuple[int, int] | None = None) -> tuple[int, int, int]:
        raise NotImplementedError(f"{self.family} has no frozen feature extractor")

    def extractor_config(self) -> dict[str, Any]:
        """What determines ``extract`` (e.g. backbone name, layers, weights): part of the cache signature."""
        raise NotImplementedError(f"{self.family} has no frozen feature extractor")

    def forward_features(self, features: torch.Tensor, out_size: tuple[int, int]) -> DetectorOutput:
        """``forward`` from cached features (the output of ``extract``) at an output size: validation during
        training from a feature cache. Must equal ``forward`` on the images the features came from."""
        raise NotImplementedError(f"{self.family} has no frozen feature extractor")

    def feature_signature(self) -> dict[str, Any]:
        """Everything cached features depend on; a cache is only reused when its signature is identical."""
        pre = self.preprocessing
        return {"family": self.family, "extractor": self.extractor_config(),
                "input_size": list(pre.input_size), "mean": list(pre.mean), "std": list(pre.std),
                "scale_by_max": pre.scale_by_max, "grayscale": pre.grayscale,
                "feature_shape": list(self.feature_shape(pre.input_size))}

    # -- serialisation ------------------------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild this module (without weights): goes to detector.json."""
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Detector:
        raise NotImplementedError


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) with reflect padding (radius 4 sigma, like anomalib/SSN)."""
    radius = max(1, int(4.0 * sigma + 0.5))
    radius = min(radius, (min(x.shape[-2:]) - 1) // 2) if min(x.shape[-2:]) > 2 else 0
    if radius < 1:
        return x
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return x


class Batch(NamedTuple):
    """What a training objective receives (already on the device).

    ``images`` (B,3,H,W) in [0,1]; ``masks`` (B,1,H,W) float {0,1} (zeros where unknown); ``labels`` (B,) float
    (-1 where unknown); ``has_mask`` (B,) bool: the mask may be used for a pixel loss. ``features`` (B,C,h,w) is set
    when training from cached backbone features (``images`` is then an empty (B,0,H,W) placeholder and the objective
    must skip the frozen backbone); families that cannot use cached features ignore it.
    """

    images: torch.Tensor
    masks: torch.Tensor
    labels: torch.Tensor
    has_mask: torch.Tensor
    features: torch.Tensor | None = None


class Objective(nn.Module):
    """Training-only loss beside a Detector: ``forward(detector, batch) -> (loss, {name: float})``."""

    def forward(self, detector: Detector, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:  # pragma: no cover
        raise NotImplementedError

    def param_groups(self, detector: Detector, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Optimiser parameter groups; families with per-part learning rates override this."""
        return [{"params": [p for p in detector.parameters() if p.requires_grad], "lr": lr,
                 "weight_decay": weight_decay}]
