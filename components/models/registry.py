"""Model families by name (timm-style): ``create_detector(family, params, preprocessing, postprocessing)``.

A family registers its Detector class, the pydantic model of its constructor parameters and of its loss
parameters, a factory for its training objective, and optional hooks (importing published weights, a benchmark
with the paper's figures). Workflows only talk to this module and the Detector contract.

Like timm's ``_registry.py``, this module imports none of the families: each family package registers itself on
import, and ``components/models/__init__.py`` imports the built-in ones, so any import of this module (which
imports its package first) sees them all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from components.errors import ConfigError
from components.models.base import Detector, Objective, Postprocessing, Preprocessing


@dataclass(frozen=True)
class Family:
    name: str
    detector_cls: type[Detector]
    params_model: type[BaseModel]
    loss_model: type[BaseModel]
    objective: Callable[[BaseModel], Objective]
    default_preprocessing: Callable[[], Preprocessing]
    default_postprocessing: Callable[[], Postprocessing]
    description: str = ""
    needs_masks: bool = False  # True: trains only on pixel-supervised rows (a segmenter)
    # (checkpoint URI, artifact URI) -> artifact URI: converts the authors' published weights
    import_weights: Callable[[str, str], str] | None = None
    # (size, iters, threads, onnx, variants) -> bench result with "results" rows and a "paper_note"
    bench: Callable[..., dict[str, Any]] | None = None
    paper: dict[str, Any] = field(default_factory=dict)  # the paper's published figures, for reports


_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    if family.name in _FAMILIES and _FAMILIES[family.name] is not family:
        raise ValueError(f"model family {family.name!r} is already registered")
    _FAMILIES[family.name] = family
    return family


def families() -> dict[str, Family]:
    return dict(_FAMILIES)


def get(name: str) -> Family:
    fams = families()
    if name not in fams:
        raise ConfigError(f"unknown model family {name!r}", f"choose one of {sorted(fams)}")
    return fams[name]


def _validate(model: type[BaseModel], values: dict[str, Any] | None, what: str) -> BaseModel:
    try:
        return model.model_validate(values or {})
    except ValidationError as e:
        raise ConfigError(f"invalid {what}: {e}", f"see README, section 'Config keys' ({what})") from e


def params(name: str, values: dict[str, Any] | None) -> BaseModel:
    return _validate(get(name).params_model, values, f"model.params for {name}")


def loss_params(name: str, values: dict[str, Any] | None) -> BaseModel:
    return _validate(get(name).loss_model, values, f"loss for {name}")


def create_detector(name: str, params_values: dict[str, Any] | None = None,
                    preprocessing: dict[str, Any] | Preprocessing | None = None,
                    postprocessing: dict[str, Any] | Postprocessing | None = None) -> Detector:
    """Build a freshly initialised detector of a family."""
    fam = get(name)
    p = params(name, params_values)
    pre = preprocessing if isinstance(preprocessing, Preprocessing) else _validate(
        Preprocessing, {**fam.default_preprocessing().model_dump(), **(preprocessing or {})},
        f"model.preprocessing for {name}")
    post = postprocessing if isinstance(postprocessing, Postprocessing) else _validate(
        Postprocessing, {**fam.default_postprocessing().model_dump(), **(postprocessing or {})},
        f"model.postprocessing for {name}")
    return fam.detector_cls.from_config({"params": p.model_dump(), "preprocessing": pre.model_dump(),
                                         "postprocessing": post.model_dump()})


def create_objective(name: str, loss_values: dict[str, Any] | None = None) -> Objective:
    fam = get(name)
    return fam.objective(loss_params(name, loss_values))
