"""Pydantic models of every workflow config: YAML in, clear errors out.

Configs reject unknown keys, carry defaults that work on a laptop, and accept ``--set a.b.c=value`` overrides
(values parsed as YAML scalars, so ``--set optim.epochs=3`` is an int and ``--set model.params.n=8`` too).
Local relative paths are made absolute when a config is loaded, so Ray workers with another working directory
read the same files.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from components import catalog, storage
from components.errors import ConfigError

DEFAULT_ROOT = "./defectflow-data"
NAME_PATTERN = catalog.NAME_RE.pattern  # every name that becomes a path component
T = TypeVar("T", bound=BaseModel)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------- shared


class StorageConfig(Strict):
    """Where artifacts go and how S3 is reached (credentials always come from the AWS environment/profile)."""

    root: str = Field(DEFAULT_ROOT, validate_default=True,
                      description="local folder or s3://bucket/prefix holding datasets/, runs/, ...")
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, moto); default AWS")
    s3_region: str | None = None

    @field_validator("root")
    @classmethod
    def _norm(cls, v: str) -> str:
        return storage.normalize(v)

    def apply(self) -> catalog.Layout:
        """Configure this process's S3 access and return the artifact layout."""
        storage.configure(endpoint_url=self.s3_endpoint_url, region=self.s3_region)
        return catalog.Layout(self.root)


class RayConfig(Strict):
    """How to reach Ray. ``address`` null: use RAY_ADDRESS (set under `ray job submit`) or start a local instance."""

    address: str | None = None
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a locally started instance (default: all)")
    num_gpus: int | None = Field(None, ge=0)
    object_store_memory: int | None = Field(None, ge=78_643_200, description="bytes, local instance only")
    include_dashboard: bool | None = None
    progress_bars: bool = Field(False, description="Ray Data's own progress bars (in the log file; on the terminal "
                                                    "with -v)")


class ScalingSettings(Strict):
    """Ray Train workers. ``use_gpu: auto`` uses GPUs when the cluster has enough for every worker."""

    num_workers: int = Field(1, ge=1)
    use_gpu: bool | Literal["auto"] = "auto"
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, gt=0)


def _uri(v: str | None) -> str | None:
    return None if v is None else storage.normalize(v)


# --------------------------------------------------------------------------------------------- ingest


class SplitConfig(Strict):
    train: float = Field(0.7, ge=0, le=1)
    val: float = Field(0.1, ge=0, le=1)
    test: float = Field(0.2, ge=0, le=1)

    @model_validator(mode="after")
    def _sum(self) -> SplitConfig:
        if abs(self.train + self.val + self.test - 1.0) > 1e-6:
            raise ValueError(f"split fractions must sum to 1 (got {self.train + self.val + self.test:g})")
        return self


class IngestConfig(Strict):
    dataset: str = Field(..., description="layout (adapter) name; `defectflow ingest --help` lists them")
    root: str | None = Field(None, description="dataset folder or s3:// prefix (not needed for procedural)")
    name: str | None = Field(None, pattern=NAME_PATTERN,
                             description="dataset name in the layout (default: the adapter name)")
    out: str | None = Field(None, description="manifest URI (default <storage.root>/datasets/<name>/manifest.parquet)")
    options: dict[str, Any] = Field(default_factory=dict, description="adapter options (see README)")
    embed: bool | Literal["auto"] = Field("auto", description="copy image bytes into the manifest; auto: when "
                                                              "the manifest goes to S3 and the images are local")
    split: SplitConfig = Field(default_factory=SplitConfig)
    seed: int = 0
    max_image_pixels: int = Field(64_000_000, ge=1)
    verify: bool = Field(True, description="decode every image and mask once; unreadable files are reported in "
                                           "rejected.json next to the manifest and left out")
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @field_validator("root", "out")
    @classmethod
    def _uris(cls, v: str | None) -> str | None:
        return _uri(v)


# ---------------------------------------------------------------------------------------------- train


class SyntheticMix(Strict):
    source: str = Field(..., description="manifest URI of synthetic samples")
    count: int = Field(0, ge=0)


class AugmentConfig(Strict):
    """Per-sample training augmentation, drawn from the run's seeded generator. Flips and 90-degree rotations also
    apply to cached features (approximately: convolutions are not flip/rotation-equivariant); the photometric and
    scale changes need pixels, so a run from cached features refuses them."""

    hflip: bool = True
    vflip: bool = True
    rot90: bool = Field(False, description="rotate by a random multiple of 90 degrees (180 only when not square)")
    brightness: float = Field(0.0, ge=0, le=1, description="add U(-b, b) to the [0, 1] image")
    contrast: float = Field(0.0, ge=0, lt=1, description="scale deviations from the image mean by U(1-c, 1+c)")
    scale_jitter: float = Field(0.0, ge=0, le=1, description="zoom in by U(1, 1+s): a random crop resized back")

    def photometric(self) -> bool:
        return bool(self.brightness or self.contrast or self.scale_jitter)


class FeatureSettings(Strict):
    """How cached features are computed (``defectflow features`` and ``data.features: auto``)."""

    shard_size: int = Field(64, ge=1, description="images per Parquet shard (the unit of resumption)")
    batch_size: int = Field(8, ge=1, description="images per backbone forward pass")
    num_actors: int = Field(1, ge=1, description="Ray Data actor pool size")
    use_gpu: bool | Literal["auto"] = Field("auto", description="one GPU per actor when the cluster has them")
    cpus_per_actor: float = Field(1.0, gt=0)
    dtype: Literal["float16", "float32"] = "float16"


class DataSettings(Strict):
    manifest: str = Field(..., description="manifest URI written by `defectflow ingest`")
    regime: Literal["unsupervised", "weak", "mixed", "full"] = "full"
    mixed_masks: int | float | None = Field(None, description="mixed regime: N masks, or a fraction in (0, 1]")
    image_size: tuple[int, int] = Field((256, 256), description="(height, width) images are resized to")
    max_image_pixels: int = Field(64_000_000, ge=1)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    synthetic: SyntheticMix | None = None
    max_train_samples: int | None = Field(None, ge=1, description="cap the training rows (quick experiments)")
    features: str | None = Field(None, description="train the trainable part from cached frozen features: "
                                                   "'auto' (compute missing shards first) or a features URI; "
                                                   "null = end to end from pixels")

    @field_validator("manifest")
    @classmethod
    def _manifest(cls, v: str) -> str:
        return storage.normalize(v)

    @field_validator("image_size")
    @classmethod
    def _size(cls, v: tuple[int, int]) -> tuple[int, int]:
        if min(v) < 32 or max(v) > 4096:
            raise ValueError("image_size must be within 32..4096 pixels a side")
        return v

    @model_validator(mode="after")
    def _pixel_augment(self) -> DataSettings:
        if self.features is not None and self.augment.photometric():
            raise ValueError("data.augment brightness, contrast and scale_jitter change pixels, but with data.features "
                             "the model trains from features cached from unchanged images: set data.features: null "
                             "or turn them off (flips and rot90 work on cached features)")
        return self

    @model_validator(mode="after")
    def _mixed(self) -> DataSettings:
        if self.regime == "mixed" and self.mixed_masks is None:
            raise ValueError("regime 'mixed' needs data.mixed_masks (an int N or a fraction in (0, 1])")
        return self


class ModelSettings(Strict):
    family: str = "gmbinet"
    params: dict[str, Any] = Field(default_factory=dict, description="family constructor parameters")
    preprocessing: dict[str, Any] = Field(default_factory=dict, description="overrides of the family defaults")
    postprocessing: dict[str, Any] = Field(default_factory=dict)


class OptimSettings(Strict):
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(4e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(8, ge=1, description="per worker")
    epochs: int = Field(10, ge=1)
    lr_schedule: Literal["none", "cosine", "multistep", "onecycle", "cosine_restarts"] = Field(
        "none", description="per-epoch LR schedule: onecycle = linear warm-up over warmup_fraction of the epochs from "
                            "lr/25, then cosine to lr/1e4; cosine_restarts = cosine over restart_epochs, each cycle "
                            "restart_mult times longer")
    warmup_fraction: float = Field(0.1, ge=0, lt=1, description="onecycle: share of the epochs spent warming up")
    restart_epochs: int = Field(10, ge=1, description="cosine_restarts: length of the first cycle")
    restart_mult: int = Field(2, ge=1, description="cosine_restarts: growth of each next cycle")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="keep an exponential moving average of the "
                                                                  "weights (e.g. 0.999); validation, checkpoints "
                                                                  "and the artifact use it (off: null)")
    milestones: list[float] = Field([0.8, 0.9], description="multistep: fractions of the epochs")
    gamma: float = Field(0.4, gt=0, le=1, description="multistep: LR factor at each milestone")
    grad_clip: float | None = Field(None, gt=0, description="clip gradient norms to this value (off: null)")
    grad_clip_per_group: bool = Field(
        True, description="clip each optimiser parameter group on its own (SuperSimpleNet: adaptor, segmentation "
                          "head, classification head), so the segmentation loss's large gradients under full "
                          "supervision do not scale down the classification head's steps; false: one global norm "
                          "over all parameters, as the authors' code")

    @field_validator("milestones")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if any(not 0 < m < 1 for m in v) or v != sorted(v):
            raise ValueError("milestones are increasing fractions of the epochs in (0, 1)")
        return v


class CheckpointSettings(Strict):
    num_to_keep: int = Field(2, ge=1)
    select: Literal["best", "last"] = Field("best", description="which checkpoint becomes the artifact")
    metric: str = Field("auto", description="selection metric: auto (segmenters: val_iou_pooled with validation "
                                            "masks; families with an image score: val_image_auroc with both labels; "
                                            "else val_loss) or any reported metric, e.g. val_iou")
    mode: Literal["min", "max"] = Field("max", description="for an explicit metric")
    smoothing: int | Literal["auto"] = Field(
        "auto", description="choose by the trailing mean of the metric over this many epochs (1 = the epoch's own "
                            "value); auto: 3 when validation holds fewer than 10 defective images, else 1")

    @field_validator("smoothing")
    @classmethod
    def _window(cls, v: int | str) -> int | str:
        if v != "auto" and int(v) < 1:
            raise ValueError("smoothing is auto or a number of epochs >= 1")
        return v


class EvalSettings(Strict):
    split: Literal["train", "val", "test"] = "test"
    threshold: float | Literal["auto"] = Field(
        "auto", description="pixel threshold for predicted masks (map >= threshold): auto = the pooled pixel F1-max "
                            "threshold on the validation masks, stored in the artifact (0.5 while training and when "
                            "validation has no defective mask); a number is used as is (GMBINet's paper metrics "
                            "are at 0.5)")
    decision_threshold: float | Literal["auto"] = Field(
        "auto", description="image decision threshold on the score: auto = F1-max on the validation split "
                            "(fallback without defective validation images: the highest normal score)")
    threshold_margin: float = Field(0.0, ge=0, description="auto fallback only: raise the highest normal "
                                                           "validation score by this fraction")
    seg_iou_threshold: float = Field(0.5, ge=0, le=1, description="IoU a sample needs to count as detected")
    batch_size: int = Field(8, ge=1)
    sheet_images: int = Field(8, ge=0, description="test images in the prediction sheet PNG")
    num_actors: int = Field(1, ge=1, description="Ray Data actor pool size for evaluation")


    @field_validator("threshold")
    @classmethod
    def _open_unit(cls, v: float | str) -> float | str:
        if v != "auto" and not 0 < float(v) < 1:
            raise ValueError("the pixel threshold is auto or a number in (0, 1)")
        return v

    def provisional_threshold(self) -> float:
        """The pixel threshold before calibration (validation metrics during training): 0.5 for ``auto``."""
        return 0.5 if self.threshold == "auto" else float(self.threshold)

class OutputSettings(Strict):
    model_name: str | None = Field(None, pattern=NAME_PATTERN, description="registry name (default: the family)")
    register_model: bool = Field(True, description="copy the artifact into models/<model_name>/<version>")


class FeaturesConfig(Strict):
    """``defectflow features``: compute the frozen features a model family trains from, once, on Ray Data."""

    manifest: str = Field(..., description="manifest URI")
    model: ModelSettings = Field(default_factory=lambda: ModelSettings(family="supersimplenet"))
    image_size: tuple[int, int] = Field((256, 256), description="(height, width) the model sees")
    max_image_pixels: int = Field(64_000_000, ge=1)
    splits: list[Literal["train", "val", "test"]] = Field(["train", "val", "test"])
    out: str | None = Field(None, description="default <storage.root>/features/<backbone>/<dataset>/<signature>")
    features: FeatureSettings = Field(default_factory=FeatureSettings)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @field_validator("manifest")
    @classmethod
    def _manifest(cls, v: str) -> str:
        return storage.normalize(v)

    @field_validator("out")
    @classmethod
    def _out(cls, v: str | None) -> str | None:
        return _uri(v)


class TrainConfig(Strict):
    name: str = Field(..., pattern=NAME_PATTERN,
                      description="run name: re-running with the same name resumes from the last checkpoint")
    seed: int = 0
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    data: DataSettings
    model: ModelSettings = Field(default_factory=ModelSettings)
    loss: dict[str, Any] = Field(default_factory=dict, description="family loss parameters")
    optim: OptimSettings = Field(default_factory=OptimSettings)
    scaling: ScalingSettings = Field(default_factory=ScalingSettings)
    checkpoint: CheckpointSettings = Field(default_factory=CheckpointSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    output: OutputSettings = Field(default_factory=OutputSettings)
    features: FeatureSettings = Field(default_factory=FeatureSettings,
                                      description="feature-cache settings when data.features is 'auto'")


# ---------------------------------------------------------------------------------------------- sweep


class SchedulerSettings(Strict):
    type: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1)
    reduction_factor: int = Field(2, ge=2)


class SweepConfig(Strict):
    name: str = Field(..., pattern=NAME_PATTERN)
    train: dict[str, Any] = Field(..., description="a train config (inline), the base of every trial")
    space: dict[str, dict[str, Any]] = Field(
        ..., description="dotted train-config key -> {grid: [...]} | {choice: [...]} | {uniform: [a, b]} | "
                         "{loguniform: [a, b]} | {randint: [a, b]}")
    num_samples: int = Field(1, ge=1, description="samples per grid point")
    metric: str = "val_iou_pooled"
    mode: Literal["min", "max"] = "max"
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    max_concurrent_trials: int | Literal["auto"] = "auto"
    seed: int = 0

    @field_validator("space")
    @classmethod
    def _space(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        kinds = {"grid", "choice", "uniform", "loguniform", "randint"}
        for key, spec in v.items():
            if len(spec) != 1 or next(iter(spec)) not in kinds:
                raise ValueError(f"space.{key} must have exactly one of {sorted(kinds)}")
            kind, vals = next(iter(spec.items()))
            if not isinstance(vals, list) or not vals:
                raise ValueError(f"space.{key}.{kind} must be a non-empty list")
            if kind in {"uniform", "loguniform", "randint"} and len(vals) != 2:
                raise ValueError(f"space.{key}.{kind} takes [low, high]")
        return v


# ------------------------------------------------------------------------------------------ synthesize


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
    name: str = Field(..., pattern=NAME_PATTERN, description="synthetic set name")
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


class SynthTrainConfig(Strict):
    name: str = Field(..., pattern=NAME_PATTERN)
    kind: Literal["ddpm", "lora"] = "ddpm"
    manifest: str = Field(..., description="manifest whose train-split defect masks give the training crops")
    seed: int = 0
    resolution: int = Field(64, ge=16, le=1024, description="crop side the model trains at")
    context: float = Field(0.5, ge=0, description="margin around each defect's box, as a fraction of its size")
    augment: bool = Field(True, description="random flips and 90-degree rotations of the crops in every step")
    max_crops: int | None = Field(None, ge=1)
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(2e-4, gt=0)
    ddpm: dict[str, Any] = Field(default_factory=lambda: {"prediction_type": "v_prediction"},
                                 description="InpaintDDPMParams (kind ddpm); v_prediction learns to draw inside the "
                                             "mask several times faster than epsilon on small budgets")
    lora: dict[str, Any] = Field(default_factory=dict,
                                 description="kind lora: {model: <pipeline uri>, rank: 4, alpha: 4, prompt: "
                                             "'{defect} defect', prompts: {class: prompt}}")
    out: str | None = Field(None, description="default <storage.root>/models/<name> (ddpm) or <name>-lora")
    scaling: ScalingSettings = Field(default_factory=ScalingSettings)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _lora_needs_a_pipeline(self) -> SynthTrainConfig:
        if self.kind == "lora" and not self.lora.get("model"):
            raise ValueError("kind lora needs lora.model: a local folder or s3:// URI of a diffusers inpainting "
                             "pipeline")
        return self


# ---------------------------------------------------------------------------------------------- serve


class ServeConfig(Strict):
    model: str = Field(..., description="artifact URI or <root>/models/<name>[@alias]")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    route_prefix: str = "/"
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.5, gt=0, description="CPUs per replica")
    num_gpus: float = Field(0.0, ge=0)
    threshold: float | None = Field(None, gt=0, lt=1, description="override the artifact's decision threshold")
    max_upload_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(64_000_000, ge=1)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)


# --------------------------------------------------------------------------------------------- loading


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> nested dict; values are YAML scalars (numbers, booleans, lists, null)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} is not key=value", "e.g. --set optim.epochs=3")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not p for p in key.split(".")):
            raise ConfigError(f"--set {item!r} has an empty key part", "e.g. --set model.params.n=8")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        set_dotted(out, key, value)
    return out


def set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[p] = nxt
        cur = nxt
    cur[parts[-1]] = value


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping from a local path or URI, with line numbers in errors."""
    p = str(path)
    try:
        text = storage.read_text(p) if storage.is_remote(p) else Path(p).read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise ConfigError(f"config file {p} does not exist", "check the path; ready configs: workflows/configs/") from e
    except OSError as e:
        raise ConfigError(f"cannot read config {p}: {e}", "check the path and permissions") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p} is not valid YAML: {e}", "fix the YAML syntax at the position shown") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a mapping (key: value), not {type(data).__name__}", "see README")
    return data


def format_validation_error(e: ValidationError, what: str) -> str:
    lines = [f"invalid {what}:"]
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "<root>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def validate(model: type[T], data: dict[str, Any], what: str = "config") -> T:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, what), "see README, section 'Config keys'") from e


def load(model: type[T], path: str | None = None, overrides: list[str] | None = None,
                       base: dict[str, Any] | None = None, what: str | None = None) -> T:
    """Build a config from (base dict) <- (YAML file) <- (--set overrides) and validate it."""
    data: dict[str, Any] = copy.deepcopy(base or {})
    if path:
        data = deep_merge(data, read_yaml(path))
    data = deep_merge(data, parse_overrides(overrides))
    return validate(model, data, what or (f"config {path}" if path else model.__name__))
