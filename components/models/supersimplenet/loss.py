"""SuperSimpleNet's training objective: synthetic feature anomalies, L_seg + L_cls, per-part learning rates.

What each row may teach (the JIMS rule, "no label left behind"):

==========================================  ===================  =========================================
row                                         L_seg (pixels)       L_cls (image)
==========================================  ===================  =========================================
mask known (``has_mask``)                   yes                  yes
label 0, no mask (a known-good image)       yes (mask is empty)  yes
label 1, no mask (weakly labelled defect)   no                   yes
label -1, no mask (unlabelled)              see ``unlabelled``   see ``unlabelled``
==========================================  ===================  =========================================

Both copies of a row follow the row's rule: synthetic noise only says where *it* is, so a copy of a weakly labelled
image still has unknown pixels wherever the real defect is.

``unlabelled="normal"`` (default) treats unlabelled rows as defect-free: the supervision regimes hand the
unsupervised trainer its images with label -1 (see ``components.data.loading``), and SuperSimpleNet's unsupervised
premise is exactly that those images are good. ``"ignore"`` keeps them unknown: they then only teach through the
copies that received noise (label 1 on the cls head).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from scipy import ndimage

from components.models.base import Batch, Objective
from components.models.supersimplenet.anomaly import AnomalyGenerator

if TYPE_CHECKING:
    from components.models.supersimplenet.detector import SuperSimpleNetDetector

log = logging.getLogger(__name__)


class SuperSimpleNetLossParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    perlin_threshold: float = Field(0.2, ge=0, lt=1, description="Perlin binarisation threshold (0.2 MVTec, 0.6 "
                                                                   "VisA and the authors' supervised runs)")
    noise_std: float = Field(0.5, ge=0, description="std of the feature noise: a fraction of the backbone "
                                                     "features' std when noise_relative, else absolute (the "
                                                     "paper: 0.015 absolute for wide_resnet50_2 V1 features)")
    noise_relative: bool = Field(True, description="scale noise_std by the batch's backbone-feature std, so one "
                                                   "value fits every backbone (efficientnet_lite0 features have "
                                                   "std ~5.7; 0.015 absolute would be invisible)")
    empty_prob: float = Field(0.5, ge=0, le=1, description="share of copies that get no synthetic anomaly")
    overlap: bool | Literal["auto"] = Field("auto", description="allow noise on real defect pixels; auto: only "
                                                                 "when no row in the batch has a mask")
    focal_gamma: float = Field(4.0, ge=0)
    trunc_l1_threshold: float = Field(0.5, ge=0, description="margin of the truncated L1 on seg logits")
    stop_grad: bool | Literal["auto"] = Field("auto", description="detach the seg map before the cls head; auto: "
                                                                   "when the batch carries no label and no mask "
                                                                   "(unsupervised)")
    dilate: int = Field(0, ge=0, description="dilate GT masks with a k x k max filter before downsampling "
                                             "(0 = off; the authors use 7 in supervised runs); odd")
    dt_weight: tuple[float, float] | None = Field(None, description="(w, p): weight defect pixels by "
                                                                     "w * (d / max d)^p per connected component "
                                                                     "(the authors use (3, 2) supervised)")
    cls_weight: float = Field(1.0, gt=0, description="weight of L_cls in L_seg + w * L_cls (1 in the paper)")
    unlabelled: Literal["normal", "ignore"] = Field("normal", description="rows with label -1 and no mask: "
                                                                          "assume defect-free, or leave unknown")
    adaptor_lr_scale: float = Field(0.5, gt=0, description="adaptor lr = scale x optim.lr (paper: 1e-4 vs 2e-4)")
    head_weight_decay: float = Field(1e-5, ge=0, description="weight decay of the seg and cls heads")

    @field_validator("dilate")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v and v % 2 == 0:
            raise ValueError("dilate must be 0 (off) or an odd kernel size such as 7")
        return v

    @field_validator("dt_weight")
    @classmethod
    def _positive(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and (v[0] <= 0 or v[1] < 0):
            raise ValueError("dt_weight is (w > 0, p >= 0), e.g. [3, 2]")
        return v


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 4.0,
                       reduction: str = "none") -> torch.Tensor:
    """Focal loss without the alpha balance (the authors' alpha=-1), computed from logits for stability."""
    targets = targets.to(logits.dtype)
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1.0 - p) * (1.0 - targets)
    loss = ce * (1.0 - p_t) ** gamma
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def truncated_l1(logits: torch.Tensor, targets: torch.Tensor, threshold: float = 0.5,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """Hinge on the seg logits: normal pixels pay ``max(x + th, 0)``, defect pixels ``max(th - x, 0)``.

    The two terms are averaged separately, so a handful of defect pixels weighs as much as the whole background.
    ``weights`` multiply the per-pixel terms before averaging (the JIMS distance-transform weighting).
    """
    anomalous = targets > 0.5
    per_pixel = torch.where(anomalous, (threshold - logits).clamp_min(0.0), (logits + threshold).clamp_min(0.0))
    if weights is not None:
        per_pixel = per_pixel * weights
    zero = logits.new_zeros(())
    normal_term = per_pixel[~anomalous].mean() if bool((~anomalous).any()) else zero
    anomalous_term = per_pixel[anomalous].mean() if bool(anomalous.any()) else zero
    return normal_term + anomalous_term


def feature_masks(masks: torch.Tensor, size: tuple[int, int], dilate: int = 0) -> torch.Tensor:
    """Image-resolution masks (B,1,H,W) -> {0,1} masks at the feature grid.

    Bilinear then >= 0.5 (the DeSTSeg trick the authors use): a feature cell is a defect when about half of its
    footprint is. Dilation happens first, at image resolution, as in the authors' data pipeline.
    """
    m = masks.float()
    if m.ndim == 3:
        m = m.unsqueeze(1)
    if dilate > 1:
        m = F.max_pool2d(m, kernel_size=dilate, stride=1, padding=dilate // 2)
    if tuple(m.shape[-2:]) != tuple(size):
        m = F.interpolate(m, size=size, mode="bilinear", align_corners=True)
    return (m >= 0.5).float()


def distance_weights(masks: torch.Tensor, w: float = 3.0, p: float = 2.0) -> torch.Tensor:
    """Per-pixel loss weights: ``w * (d / max d)^p`` on defect pixels (d = distance to the nearest normal pixel,
    max over the pixel's 8-connected component), 1 elsewhere (Božič et al.'s mixed-segdec-net, used by JIMS).

    Defect borders are where annotations are least certain, so they weigh least and component centres most. One
    Euclidean distance transform per mask suffices: 8-connected components are separated by normal pixels, so the
    nearest normal pixel is the same as with one transform per component.
    """
    arr = masks.detach().float().cpu().numpy()
    out = np.ones_like(arr, dtype=np.float32)
    structure = np.ones((3, 3), dtype=bool)
    for idx in np.ndindex(*arr.shape[:-2]):
        m = arr[idx] > 0.5
        if not m.any():
            continue
        labels, n = ndimage.label(m, structure=structure)
        dist = ndimage.distance_transform_edt(m)
        peak = np.asarray(ndimage.maximum(dist, labels, index=np.arange(1, n + 1)), dtype=np.float64)
        peak_map = np.concatenate(([1.0], np.maximum(peak, 1e-12)))[labels]
        out[idx] = np.where(m, w * (dist / peak_map) ** p, 1.0).astype(np.float32)
    return torch.from_numpy(out).to(masks.device)


class SuperSimpleNetObjective(Objective):
    """L_seg (truncated L1 + focal on the maps) + L_cls (focal on the image logits) over a noise-augmented 2B batch.

    The frozen backbone runs under no_grad (or is skipped entirely when the batch carries cached features), so
    only the adaptor and the two heads learn.
    """

    def __init__(self, params: SuperSimpleNetLossParams | None = None):
        super().__init__()
        self.params = params or SuperSimpleNetLossParams()
        p = self.params
        self.generator = AnomalyGenerator(perlin_threshold=p.perlin_threshold, noise_std=p.noise_std,
                                          empty_prob=p.empty_prob, overlap=p.overlap is True)

    def resolve(self, batch: Batch) -> dict[str, bool]:
        """The batch-dependent switches (``overlap``, ``stop_grad``) after resolving ``"auto"``."""
        has_mask = batch.has_mask.bool().reshape(-1)
        labels = batch.labels.reshape(-1)
        any_mask = bool(has_mask.any())
        unsupervised = not any_mask and not bool((labels >= 0).any())
        p = self.params
        return {"overlap": (not any_mask) if p.overlap == "auto" else bool(p.overlap),
                "stop_grad": unsupervised if p.stop_grad == "auto" else bool(p.stop_grad)}

    def forward(self, detector: SuperSimpleNetDetector, batch: Batch,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        p = self.params
        heads = detector.heads
        dtype = next(heads.parameters()).dtype
        if batch.features is not None:
            feats = batch.features.to(dtype)
        else:
            with torch.no_grad():
                feats = detector.extract(detector.preprocess(batch.images))
        size = (int(feats.shape[-2]), int(feats.shape[-1]))
        switches = self.resolve(batch)

        has_mask = batch.has_mask.bool().reshape(-1).to(feats.device)
        labels = batch.labels.reshape(-1).to(feats.device, dtype)
        gt = feature_masks(batch.masks.to(feats.device), size, p.dilate) * has_mask.view(-1, 1, 1, 1)
        # a mask settles an unknown label; an unknown label without a mask is normal under the unsupervised premise
        labels = torch.where(has_mask & (labels < 0), gt.flatten(1).amax(dim=1), labels)
        if p.unlabelled == "normal":
            labels = torch.where(labels < 0, torch.zeros_like(labels), labels)
        seg_ok = has_mask | (labels == 0)

        noise_std = p.noise_std * float(feats.detach().std()) if p.noise_relative else p.noise_std
        syn = self.generator(heads.adapt(feats), gt, labels, has_mask,
                             features=None if heads.adapt_cls_features else feats,
                             overlap=switches["overlap"], generator=generator, noise_std=noise_std)
        cls_in = syn.adapted if heads.adapt_cls_features else syn.features
        seg, cls = heads.segment_classify(syn.adapted, cls_in, stop_grad=switches["stop_grad"])

        seg_rows = torch.cat((seg_ok, seg_ok))
        if bool(seg_rows.any()):
            weights = None
            if p.dt_weight is not None and bool(gt.any()):
                weights = torch.cat([distance_weights(gt, *p.dt_weight)] * 2)[seg_rows].to(dtype)
            s, m = seg[seg_rows], syn.masks[seg_rows]
            focal = sigmoid_focal_loss(s, m, p.focal_gamma)
            if weights is not None:
                focal = focal * weights
            seg_loss = truncated_l1(s, m, p.trunc_l1_threshold, weights) + focal.mean()
        else:
            seg_loss = 0.0 * seg.sum()  # keeps the seg head and adaptor in the graph (DDP needs every parameter)

        known = syn.labels >= 0
        if bool(known.any()):
            cls_loss = sigmoid_focal_loss(cls[known], syn.labels[known], p.focal_gamma, reduction="mean")
        else:
            cls_loss = 0.0 * cls.sum()
        loss = seg_loss + p.cls_weight * cls_loss
        return loss, {"loss": float(loss.detach()), "seg": float(seg_loss.detach()), "cls": float(cls_loss.detach())}

    def param_groups(self, detector: SuperSimpleNetDetector, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """The authors' three AdamW groups (JIMS ``train.py``): adaptor at half the heads' lr with the optimiser's
        weight decay (their adaptor group inherits AdamW's default 0.01), segmentation head and classification head
        each at lr with weight decay 1e-5. The frozen backbone is never listed. Separate head groups also let
        ``optim.grad_clip_per_group`` clip each head on its own."""
        heads = detector.heads
        hwd = self.params.head_weight_decay
        return [
            {"params": [q for q in heads.adaptor.parameters() if q.requires_grad],
             "lr": lr * self.params.adaptor_lr_scale, "weight_decay": weight_decay, "name": "adaptor"},
            {"params": [q for q in heads.seg_head_parameters() if q.requires_grad], "lr": lr, "weight_decay": hwd,
             "name": "seg_head"},
            {"params": [q for q in heads.cls_head_parameters() if q.requires_grad], "lr": lr, "weight_decay": hwd,
             "name": "cls_head"},
        ]
