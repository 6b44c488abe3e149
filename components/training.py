"""The torch side of training a Detector: one module for DDP, optimiser and LR schedule, validation metrics, and
the fingerprint that says whether a checkpoint belongs to a config. No Ray: ``workflows/trainer.py`` runs these
inside Ray Train workers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from components.metrics.image import roc_auc
from components.metrics.sample import iou_from_counts, pooled_iou
from components.models.base import Batch, Detector, Objective


class TrainStep(nn.Module):
    """Detector + objective in one module, so DDP sees every trainable parameter through one forward."""

    def __init__(self, detector: Detector, objective: Objective):
        super().__init__()
        self.detector = detector
        self.objective = objective

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        return self.objective(self.detector, batch)


def make_optimizer(param_groups: list[dict[str, Any]], optim: dict[str, Any]) -> torch.optim.Optimizer:
    """``optim`` is the ``optim`` section of a train config."""
    kind, lr, wd = optim["optimizer"], optim["lr"], optim["weight_decay"]
    if kind == "adam":
        return torch.optim.Adam(param_groups, lr=lr, weight_decay=wd)
    if kind == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr, weight_decay=wd)
    return torch.optim.SGD(param_groups, lr=lr, momentum=0.9, weight_decay=wd)


def clip_gradients(opt: torch.optim.Optimizer, module: torch.nn.Module, max_norm: float,
                   per_group: bool = True) -> list[float]:
    """Clip gradient norms to ``max_norm``: each optimiser parameter group on its own (``per_group``), or one norm
    over all of ``module``'s parameters (torch's ``clip_grad_norm_``, the SuperSimpleNet authors' code). Returns the
    norms before clipping (one per group, or one).

    Why per group: under one global norm the largest loss decides every parameter's step. With full supervision
    SuperSimpleNet's segmentation loss on real defects keeps the norm far above 1 for many epochs, so the global
    clip shrinks the classification head's steps too and, on a short schedule, the image score stays undertrained
    (README, "Full vs weak supervision")."""
    if not per_group:
        return [float(torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm))]
    return [float(torch.nn.utils.clip_grad_norm_(g["params"], max_norm)) for g in opt.param_groups]


def make_scheduler(opt: torch.optim.Optimizer, optim: dict[str, Any]) -> Any:
    """The per-epoch LR schedule (None for a constant rate)."""
    if optim["lr_schedule"] == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=optim["epochs"])
    if optim["lr_schedule"] == "multistep":
        marks = sorted({max(1, round(m * optim["epochs"])) for m in optim["milestones"]})
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=marks, gamma=optim["gamma"])
    if optim["lr_schedule"] == "onecycle":
        return torch.optim.lr_scheduler.LambdaLR(opt, OneCycle(optim["epochs"], optim.get("warmup_fraction", 0.1)))
    if optim["lr_schedule"] == "cosine_restarts":
        return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=optim.get("restart_epochs", 10),
                                                                    T_mult=optim.get("restart_mult", 2))
    return None


class OneCycle:
    """LR factor of epoch ``e`` for a one-cycle schedule stepped per epoch: linear warm-up from 1/25 to 1 over
    ``warmup_fraction`` of the epochs, then cosine down to 1e-4 at the last epoch (Smith's one-cycle, the defaults
    of torch's ``OneCycleLR``). A class, not a lambda, so the schedule is rebuilt from the config on resume."""

    START, END = 1.0 / 25.0, 1e-4

    def __init__(self, epochs: int, warmup_fraction: float = 0.1):
        self.epochs = max(int(epochs), 1)
        self.warmup = max(round(warmup_fraction * self.epochs), 0)

    def __call__(self, epoch: int) -> float:
        if epoch < self.warmup:
            return self.START + (1.0 - self.START) * epoch / self.warmup
        span = max(self.epochs - 1 - self.warmup, 1)
        t = min(max(epoch - self.warmup, 0) / span, 1.0)
        return self.END + (1.0 - self.END) * 0.5 * (1.0 + math.cos(math.pi * t))


# all an epoch schedule needs to resume (T_cur, T_i: where a warm-restart schedule is in its cycle)
SCHEDULER_STATE = ("last_epoch", "_step_count", "_last_lr", "base_lrs", "T_cur", "T_i")


def optimizer_state(opt: torch.optim.Optimizer, sched: Any = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer's (and LR schedule's) state as tensors for safetensors and JSON-able rest: a checkpoint
    defectflow writes is never a pickle. The schedule itself (milestones, T_max) is rebuilt from the config."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, entries in sd["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    schedule = ({k: getattr(sched, k) for k in SCHEDULER_STATE if hasattr(sched, k)} if sched is not None
                else None)
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars, "scheduler": schedule}


def restore_optimizer_state(opt: torch.optim.Optimizer, sched: Any, tensors: dict[str, torch.Tensor],
                            meta: dict[str, Any]) -> None:
    """The inverse of :func:`optimizer_state` on a freshly built optimizer and schedule."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    if sched is not None and meta.get("scheduler"):
        for key, value in meta["scheduler"].items():
            setattr(sched, key, value)


def model_fingerprint(config: dict[str, Any]) -> str:
    """What must not change between a run and its resumption: architecture, preprocessing, input size."""
    key = json.dumps({"family": config["model"]["family"], "params": config["model"]["params"],
                      "pre": config["model"]["preprocessing"], "size": config["data"]["image_size"]}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class ImageRecord:
    """What validation keeps of one image."""

    label: float  # -1 unknown
    score: float
    has_mask: bool
    tp: int = 0
    fp: int = 0
    fn: int = 0
    mae: float = 0.0


class ValidationMeter:
    """Validation loss and metrics of the images seen, defined as in evaluation (:mod:`components.metrics`):
    ``val_images`` how many images were scored; ``val_iou`` the mean per-image IoU of images with masks
    (empty/empty = 1, the GMBINet authors' convention); ``val_iou_pooled`` ΣTP/Σ(TP+FP+FN), which also counts false
    alarms on defect-free images (the per-image mean rewards them); ``val_mae``; and ``val_image_auroc`` of the image
    score when both labels are present.
    """

    def __init__(self, threshold: float):
        self.threshold = float(threshold)
        self.records: list[ImageRecord] = []
        self.loss_sum = 0.0
        self.batches = 0

    @torch.no_grad()
    def add(self, loss: torch.Tensor | float, score: torch.Tensor, anomaly_map: torch.Tensor, batch: Batch) -> None:
        self.loss_sum += float(loss)
        self.batches += 1
        pred = anomaly_map >= self.threshold
        gt = batch.masks >= 0.5
        tp = (pred & gt).flatten(1).sum(1).tolist()
        fp = (pred & ~gt).flatten(1).sum(1).tolist()
        fn = (~pred & gt).flatten(1).sum(1).tolist()
        mae = (anomaly_map - batch.masks).abs().flatten(1).mean(1).tolist()
        for i, (lab, sc, has) in enumerate(zip(batch.labels.tolist(), score.tolist(), batch.has_mask.tolist(),
                                               strict=True)):
            self.records.append(ImageRecord(lab, sc, bool(has), *(int(tp[i]), int(fp[i]), int(fn[i])), mae[i])
                                if has else ImageRecord(lab, sc, False))

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {"val_images": len(self.records)}
        if self.batches:
            out["val_loss"] = self.loss_sum / self.batches
        labelled = [r for r in self.records if r.label >= 0]
        if {0.0, 1.0} <= {r.label for r in labelled}:
            out["val_image_auroc"] = float(roc_auc([r.label for r in labelled], [r.score for r in labelled]))
        masked = [r for r in self.records if r.has_mask]
        if masked:
            out["val_iou"] = sum(iou_from_counts(r.tp, r.fp, r.fn, empty=1.0) for r in masked) / len(masked)
            out["val_mae"] = sum(r.mae for r in masked) / len(masked)
            out["val_iou_pooled"] = pooled_iou([(r.tp, r.fp, r.fn) for r in masked])
        return out


class WeightAverage:
    """Exponential moving average of a module's weights (Polyak averaging; timm's ``ModelEmaV2``): every
    floating-point entry of the state dict (parameters and BatchNorm statistics) follows
    ``avg <- d * avg + (1 - d) * current``, integer entries are copied. The decay warms up as ``(1 + t) / (10 + t)``
    (TensorFlow's ``num_updates``), so the first steps do not drag the average back to the random initialisation.

    The average is what a short schedule's noisy last epochs lack: it is validated, checkpointed and published
    instead of the raw weights, which keep training."""

    def __init__(self, module: nn.Module, decay: float, updates: int = 0):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = int(updates)
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    def current_decay(self) -> float:
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        d = self.current_decay()
        for k, v in module.state_dict().items():
            s = self.shadow[k]
            if v.dtype.is_floating_point:
                s.lerp_(v.detach(), 1.0 - d)
            else:
                s.copy_(v)

    def load(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in state.items():
            self.shadow[k].copy_(v)

    @contextlib.contextmanager
    def applied(self, module: nn.Module):
        """Run the block with the averaged weights in ``module``; the raw weights come back afterwards."""
        backup = {k: v.detach().clone() for k, v in module.state_dict().items()}
        module.load_state_dict(self.shadow)
        try:
            yield module
        finally:
            module.load_state_dict(backup)
