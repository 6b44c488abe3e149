"""GMBINet's deeply supervised segmentation loss.

The authors train with BCE + Dice on each of the five side outputs (weights 1 each) and leave an SSIM term commented
out; all three are here, with the SSIM weight 0 by default so the default matches their released training.

Two choices that the released code leaves open:
- Dice is computed per image and averaged over images whose ground truth is non-empty. On a defect-free image the
  soft Dice is ~1 whatever the prediction (and its gradient vanishes unless the prediction is already ~0), so
  averaging it in would only add a constant; BCE alone teaches those images to stay dark.
- Only rows with ``has_mask`` are fed through the network, so unlabelled rows neither contribute a loss nor move
  the BatchNorm statistics.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator

from components.models.base import Batch, Objective
from components.models.gmbinet.model import NUM_SIDE_OUTPUTS

if TYPE_CHECKING:
    from components.models.gmbinet.detector import GMBINetDetector

log = logging.getLogger(__name__)

DICE_SMOOTH = 1e-5
SSIM_SIGMA = 1.5
SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2


class GMBINetLossParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bce_weight: float = Field(1.0, ge=0)
    dice_weight: float = Field(1.0, ge=0)
    ssim_weight: float = Field(0.0, ge=0, description="1 - SSIM term (written but disabled in the authors' code)")
    iou_weight: float = Field(0.0, ge=0, description="1 - soft IoU term (Rahman & Wang): optimises the metric the "
                                                     "paper reports; not in the authors' code")
    ssim_window: int = Field(11, ge=3, description="Gaussian SSIM window (odd)")
    side_weights: list[float] = Field(default_factory=lambda: [1.0] * NUM_SIDE_OUTPUTS,
                                      description="weights of the 5 side outputs, finest first")

    @field_validator("side_weights")
    @classmethod
    def _five_non_negative(cls, v: list[float]) -> list[float]:
        if len(v) != NUM_SIDE_OUTPUTS:
            raise ValueError(f"side_weights needs {NUM_SIDE_OUTPUTS} values (finest first), got {len(v)}")
        if any(w < 0 for w in v):
            raise ValueError("side_weights must be >= 0")
        return v

    @field_validator("ssim_window")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError("ssim_window must be odd")
        return v


def _foreground_mean(per_image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of a per-image loss over the images whose target is non-empty (0 when there is none)."""
    has_fg = target.flatten(1).amax(dim=1) > 0
    if not bool(has_fg.any()):
        return per_image.new_zeros(())
    return per_image[has_fg].mean()


def soft_dice_loss(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean ``1 - Dice`` over the images whose target is non-empty (0 when there is none)."""
    dims = tuple(range(1, prob.ndim))
    inter = (prob * target).sum(dims)
    denom = prob.sum(dims) + target.sum(dims)
    return _foreground_mean(1.0 - (2.0 * inter + DICE_SMOOTH) / (denom + DICE_SMOOTH), target)


def soft_iou_loss(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean ``1 - soft IoU`` (sum p*t / sum(p + t - p*t)) over the images whose target is non-empty, as Dice."""
    dims = tuple(range(1, prob.ndim))
    inter = (prob * target).sum(dims)
    union = (prob + target - prob * target).sum(dims)
    return _foreground_mean(1.0 - (inter + DICE_SMOOTH) / (union + DICE_SMOOTH), target)


def _gaussian_window(size: int, sigma: float, channels: int, like: torch.Tensor) -> torch.Tensor:
    t = torch.arange(size, dtype=like.dtype, device=like.device) - (size - 1) / 2
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim_loss(prob: torch.Tensor, target: torch.Tensor, window: int = 11, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """``1 - SSIM`` with a Gaussian window (zero padding, as in the usual pytorch-ssim used by saliency work).

    The window shrinks (staying odd) when the map is smaller than it, so tiny test inputs still work.
    """
    window = min(window, min(prob.shape[-2:]))
    window = window if window % 2 else window - 1
    if window < 1:
        return prob.new_zeros(())
    c = prob.shape[1]
    w = _gaussian_window(window, sigma, c, prob)
    pad = window // 2

    def blur(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(z, w, padding=pad, groups=c)

    mu_x, mu_y = blur(prob), blur(target)
    var_x = blur(prob * prob) - mu_x**2
    var_y = blur(target * target) - mu_y**2
    cov = blur(prob * target) - mu_x * mu_y
    ssim = ((2 * mu_x * mu_y + SSIM_C1) * (2 * cov + SSIM_C2)) / (
        (mu_x**2 + mu_y**2 + SSIM_C1) * (var_x + var_y + SSIM_C2))
    return 1.0 - ssim.mean()


class GMBINetObjective(Objective):
    """Side-weighted BCE + Dice (+ SSIM) over the five side outputs, on pixel-supervised rows only."""

    def __init__(self, params: GMBINetLossParams | None = None):
        super().__init__()
        self.params = params or GMBINetLossParams()

    def forward(self, detector: GMBINetDetector, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        p = self.params
        sel = batch.has_mask.bool().flatten()
        if not bool(sel.any()):
            # keep the graph connected to every parameter so backward()/DDP bucketing still work on such a batch
            params = [q for q in detector.parameters() if q.requires_grad]
            zero = sum((q.sum() for q in params), torch.zeros((), device=batch.images.device)) * 0.0
            return zero, {"loss": 0.0, "bce": 0.0, "dice": 0.0, "ssim": 0.0, "iou": 0.0}

        x = detector.preprocess(batch.images[sel])
        masks = batch.masks[sel].float()
        if tuple(masks.shape[-2:]) != tuple(x.shape[-2:]):
            masks = F.interpolate(masks, size=tuple(x.shape[-2:]), mode="nearest")
        masks = (masks > 0.5).to(x.dtype)

        logits = detector.net(x)
        bce = dice = ssim = iou = x.new_zeros(())
        for weight, logit in zip(p.side_weights, logits, strict=True):
            if weight == 0:
                continue
            if p.bce_weight:
                bce = bce + weight * F.binary_cross_entropy_with_logits(logit, masks)
            prob = torch.sigmoid(logit) if (p.dice_weight or p.ssim_weight or p.iou_weight) else None
            if p.dice_weight:
                dice = dice + weight * soft_dice_loss(prob, masks)
            if p.ssim_weight:
                ssim = ssim + weight * ssim_loss(prob, masks, p.ssim_window)
            if p.iou_weight:
                iou = iou + weight * soft_iou_loss(prob, masks)
        loss = p.bce_weight * bce + p.dice_weight * dice + p.ssim_weight * ssim + p.iou_weight * iou
        if loss.grad_fn is None:  # every weight is zero: still hand back something backward() accepts
            loss = loss + 0.0 * sum(t.sum() for t in logits)
        return loss, {"loss": float(loss.detach()), "bce": float(bce.detach()), "dice": float(dice.detach()),
                      "ssim": float(ssim.detach()), "iou": float(iou.detach())}
