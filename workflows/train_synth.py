"""train-synth: train a defect synthesizer on the dataset's own defect crops, on Ray Train.

    defectflow train-synth --config workflows/configs/ddpm_procedural.yaml     # own pixel-space inpainting DDPM
    defectflow train-synth --config workflows/configs/lora_inpaint.yaml        # LoRA adapters of an inpainting pipeline

``kind: ddpm`` trains defectflow's small conditional inpainting diffusion model (no downloaded weights needed) and
saves it where the ``ddpm`` generator loads it; ``kind: lora`` fine-tunes LoRA adapters of a local or S3 diffusers
inpainting pipeline (SynSur) and saves them in diffusers' format for the ``diffusion`` generator. Both checkpoint
every epoch to ``<storage.root>/runs/<name>``; re-running the same name resumes.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from components import config as cfgmod
from components import storage
from components.config import SynthTrainConfig
from components.data import manifest
from components.errors import ConfigError, DataError
from workflows import console, train_data, trainer
from workflows.command import Command, add_config_options, main
from workflows.runtime import check_train_resources, init_ray, resolve_use_gpu

log = logging.getLogger("defectflow.train_synth")


def training_crops(cfg: SynthTrainConfig) -> dict[str, np.ndarray]:
    """Defect crops (float32 (N,3,R,R) in [-1,1]) with masks (N,1,R,R) and their classes, from the train split
    (one crop per connected defect, framed as the ``ddpm`` generator frames its windows)."""
    from components.synthesis.ddpm import crops_from_manifest_rows

    table = manifest.read(cfg.manifest)
    rows = [r for r in table.to_pylist() if r["split"] == "train" and r.get("label") == 1
            and (r.get("mask_uri") or r.get("mask_bytes"))]
    if not rows:
        raise DataError(f"{cfg.manifest} has no defective train images with masks", "train-synth learns from "
                        "real defect crops: ingest a dataset with pixel masks")
    rng = np.random.default_rng(cfg.seed)
    crops_l, masks_l, classes = [], [], []
    for r in rows:  # per row, so every crop keeps its class (LoRA prompts)
        c, m = crops_from_manifest_rows([r], cfg.resolution, rng, cfg.context)
        crops_l.append(c.numpy())
        masks_l.append(m.numpy())
        classes += [r.get("defect_class") or "defect"] * len(c)
    crops, masks = np.concatenate(crops_l), np.concatenate(masks_l)
    if cfg.max_crops and len(crops) > cfg.max_crops:
        keep = rng.choice(len(crops), cfg.max_crops, replace=False)
        crops, masks, classes = crops[keep], masks[keep], [classes[i] for i in keep]
    log.info("%d training crops of %dx%d from %d defective images", len(crops), cfg.resolution, cfg.resolution,
             len(rows))
    return {"crop": crops.astype(np.float32), "mask": masks.astype(np.float32),
            "defect_class": np.array(classes, dtype=object)}


def _loop(c: dict[str, Any]) -> None:
    """Ray Train worker: DDPM or LoRA steps over this worker's shard of crops; a checkpoint per epoch."""
    import ray.train
    import torch
    from ray.train import Checkpoint
    from ray.train.torch import get_device, prepare_model

    storage.configure(**c["_storage"])
    cfg = SynthTrainConfig.model_validate({k: v for k, v in c.items() if not k.startswith("_")})
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(cfg.seed + rank)
    gen = torch.Generator().manual_seed(cfg.seed + 17 + rank)
    device = get_device()
    synth = _DDPMTrainer(cfg) if cfg.kind == "ddpm" else _LoRATrainer(cfg, device)
    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            start = synth.load(d) + 1
    synth.model = prepare_model(synth.model) if cfg.kind == "ddpm" else synth.model
    synth.build_optimizer()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            synth.load_optimizer(d)
    shard = ray.train.get_dataset_shard("train")
    for epoch in range(start, cfg.epochs):
        t0 = time.time()
        losses = []
        for b in shard.iter_batches(batch_size=cfg.batch_size, batch_format="numpy",
                                    local_shuffle_buffer_size=4 * cfg.batch_size,
                                    local_shuffle_seed=cfg.seed + epoch):
            losses.append(synth.step(b, device, gen))
        metrics = {"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else float("nan"),
                   "epoch_time_s": round(time.time() - t0, 2)}
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                synth.save(d, epoch)
                checkpoint = Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)


class _Trainer:
    """What both synthesizer trainers share: AdamW over ``trainable()`` and the optimizer/epoch part of the
    checkpoint (:mod:`workflows.trainer`'s format); subclasses save and load their own weights."""

    cfg: SynthTrainConfig
    opt: Any = None

    def trainable(self) -> list[Any]:
        raise NotImplementedError

    def build_optimizer(self) -> None:
        import torch

        self.opt = torch.optim.AdamW(self.trainable(), **self.optimizer_kwargs())

    def optimizer_kwargs(self) -> dict[str, Any]:
        return {"lr": self.cfg.lr}

    def save_state(self, d: str, epoch: int) -> None:
        trainer.save_optimizer(d, self.opt)
        trainer.write_state(d, {"epoch": epoch})

    @staticmethod
    def saved_epoch(d: str) -> int:
        return int(trainer.read_state(d)["epoch"])

    def load_optimizer(self, d: str) -> None:
        trainer.load_optimizer(d, self.opt)


class _DDPMTrainer(_Trainer):
    def __init__(self, cfg: SynthTrainConfig):
        from components.synthesis.ddpm import InpaintDDPM, InpaintDDPMParams, noise_scheduler

        self.cfg = cfg
        self.params = InpaintDDPMParams.model_validate({"resolution": cfg.resolution, **cfg.ddpm})
        self.model = InpaintDDPM(self.params)
        self.scheduler = noise_scheduler(self.params)

    def _inner(self) -> Any:
        return self.model.module if hasattr(self.model, "module") else self.model

    def trainable(self) -> list[Any]:
        return list(self.model.parameters())

    def optimizer_kwargs(self) -> dict[str, Any]:
        return {"lr": self.cfg.lr, "betas": (0.95, 0.999), "weight_decay": 1e-6}

    def step(self, b: dict[str, Any], device: Any, gen: Any) -> float:
        import torch

        from components.synthesis.ddpm import augment_dihedral, training_step

        crops = torch.as_tensor(b["crop"])
        masks = torch.as_tensor(b["mask"])
        if self.cfg.augment:
            crops, masks = augment_dihedral(crops, masks, gen)
        loss = training_step(self.model, self.scheduler, crops.to(device), masks.to(device), generator=gen)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        return float(loss.detach())

    def save(self, d: str, epoch: int) -> None:
        from components.synthesis.ddpm import save

        save(self._inner(), self.params, os.path.join(d, "model"),
             training={"crop": {"context": self.cfg.context}, "epochs": epoch + 1, "source": self.cfg.manifest})
        self.save_state(d, epoch)

    def load(self, d: str) -> int:
        from components.synthesis.ddpm import load

        self.model = load(os.path.join(d, "model"))[0]
        return self.saved_epoch(d)


class _LoRATrainer(_Trainer):
    def __init__(self, cfg: SynthTrainConfig, device: Any):
        from components.synthesis import lora as lora_mod
        from components.synthesis.generators.diffusion import load_pipeline

        self.cfg = cfg
        opts = {"rank": 4, "alpha": 4, "prompt": "{defect} defect", "prompts": {}, **cfg.lora}  # model: validated
        self.opts = opts
        self.pipe = load_pipeline(opts["model"], device=device)
        lora_mod.add_lora(self.pipe, rank=int(opts["rank"]), alpha=float(opts["alpha"]))
        self.model = self.pipe.unet
        self.noise_scheduler = lora_mod.training_scheduler(self.pipe)

    def trainable(self) -> list[Any]:
        from components.synthesis.lora import trainable_parameters

        return trainable_parameters(self.pipe)

    def step(self, b: dict[str, Any], device: Any, gen: Any) -> float:
        from components.synthesis import lora as lora_mod

        prompts = [self.opts["prompts"].get(c, self.opts["prompt"].format(defect=c)) for c in b["defect_class"]]
        batch = lora_mod.prepare_lora_batch(b["crop"], b["mask"], prompts, self.cfg.resolution)
        return float(lora_mod.lora_training_step(self.pipe, batch, self.noise_scheduler, self.opt, generator=gen))

    def save(self, d: str, epoch: int) -> None:
        from components.synthesis import lora as lora_mod

        lora_mod.save_lora(self.pipe, os.path.join(d, "lora"))
        self.save_state(d, epoch)

    def load(self, d: str) -> int:
        from components.synthesis import lora as lora_mod

        lora_mod.load_lora_state(self.pipe, os.path.join(d, "lora"))
        return self.saved_epoch(d)


@dataclass
class SynthTrainResult:
    name: str
    kind: str
    out: str
    crops: int
    epochs: int
    final_loss: float | None
    seconds: float


def run(cfg: SynthTrainConfig) -> SynthTrainResult:
    import ray.data

    t0 = time.time()
    if cfg.kind == "lora" and cfg.scaling.num_workers > 1:
        raise ConfigError("LoRA fine-tuning runs on one worker (its adapter gradients are not averaged across "
                          "workers)", "set scaling.num_workers: 1 (use a GPU worker for speed)")
    layout = cfg.storage.apply()
    console.keep_log_in(layout.run(cfg.name))
    data = training_crops(cfg)
    init_ray(cfg.ray, cfg.storage)
    use_gpu = resolve_use_gpu(cfg.scaling)
    check_train_resources(cfg.scaling, use_gpu)
    rows = [{"crop": c, "mask": m, "defect_class": k}
            for c, m, k in zip(data["crop"], data["mask"], data["defect_class"], strict=True)]
    order = np.random.default_rng(cfg.seed).permutation(len(rows))  # crops come class by class: mix them
    ds = ray.data.from_items([rows[i] for i in order])
    ds = ds.materialize()
    train_data.quiet_progress()
    sink = trainer.progress_sink()
    fit = trainer.build_trainer(_loop, {**cfg.model_dump(mode="json"), "_storage": storage.worker_settings()},
                                {"train": ds}, scaling=cfg.scaling, use_gpu=use_gpu, run_name=cfg.name,
                                storage_uri=layout.runs(),
                                callbacks=[trainer.epoch_callback(sink, f"{cfg.name} ({cfg.kind})", cfg.epochs)])
    log.info("train-synth %s (%s): %d crops, %d epoch(s)", cfg.name, cfg.kind, len(data["crop"]), cfg.epochs)
    result = trainer.fit(fit, sink)
    out = cfg.out or layout.models(cfg.name if cfg.kind == "ddpm" else f"{cfg.name}-lora")
    with result.checkpoint.as_directory() as d:
        if cfg.kind == "ddpm":
            from components.synthesis.ddpm import load, save

            model, meta = load(os.path.join(d, "model"))
            save(model, None, out, training=meta.get("training"))
        else:
            storage.upload_dir(os.path.join(d, "lora"), out)
    loss = result.metrics.get("loss") if result.metrics else None
    log.info("saved %s synthesizer to %s", cfg.kind, out)
    return SynthTrainResult(name=cfg.name, kind=cfg.kind, out=out, crops=len(data["crop"]), epochs=cfg.epochs,
                            final_loss=loss, seconds=round(time.time() - t0, 1))


def _report(res: SynthTrainResult) -> str:
    return (f"{res.kind} synthesizer trained on {res.crops} crops for {res.epochs} epoch(s) "
            f"(final loss {res.final_loss}) -> {res.out}")


COMMAND = Command("train-synth", "train the own DDPM inpainter or LoRA adapters on defect crops (Ray Train)",
                  lambda p: add_config_options(p, "train-synth"),
                  lambda args: run(cfgmod.load(SynthTrainConfig, args.config, args.set)), _report)

if __name__ == "__main__":
    raise SystemExit(main(COMMAND))
