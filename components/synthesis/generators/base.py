"""The one interface every defect generator implements, and the generator registry.

A generator turns (defect-free image, mask, class, prompt, seed) requests into images with a defect inside the mask.
It is constructed once per Ray Data actor (model weights load in ``__init__``) and called on batches, so ``generate``
should batch internally where the backend allows it. Masks use 1 = defect (the region to change); generators whose
backend uses another convention (RePaint: 0 = inpaint) convert internally.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from components.errors import ConfigError


@dataclass
class SynthesisRequest:
    """``image``: float32 RGB (H, W, 3) in [0, 1], defect-free. ``mask``: uint8 (H, W), 1 = put the defect here."""

    image: np.ndarray
    mask: np.ndarray
    defect_class: str
    seed: int
    prompt: str | None = None
    negative_prompt: str | None = None
    source_id: str | None = None            # sample id of the normal image (provenance)
    reference: np.ndarray | None = None     # optional real defect crop (cut-paste), float RGB
    reference_mask: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SynthesisResult:
    """``image``: float32 RGB (H, W, 3) in [0, 1] at the request's size. ``mask``: uint8 (H, W) {0, 1}, the final
    defect mask (a generator may tighten it to what actually changed). ``info``: provenance (generator, model id,
    LoRA, prompt, strength, steps, seed, ...), JSON-able."""

    image: np.ndarray
    mask: np.ndarray
    info: dict[str, Any]


class GeneratorOptions(BaseModel):
    """Base of every generator's options: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class Generator(ABC):
    name: ClassVar[str] = ""
    Options: ClassVar[type[GeneratorOptions]] = GeneratorOptions

    def __init__(self, options: GeneratorOptions):
        self.options = options

    @abstractmethod
    def generate(self, requests: Sequence[SynthesisRequest]) -> list[SynthesisResult]:
        """One result per request, in order."""


_GENERATORS: dict[str, type[Generator]] = {}


def register(cls: type[Generator]) -> type[Generator]:
    _GENERATORS[cls.name] = cls
    return cls


BUILTIN = ("procedural", "cutpaste", "diffusion", "ddpm")


def _load(name: str) -> None:
    """Import one built-in generator module (diffusers is heavy: load only what is asked for)."""
    import importlib

    if name in BUILTIN and name not in _GENERATORS:
        importlib.import_module(f"components.synthesis.generators.{name}")


def generators() -> dict[str, type[Generator]]:
    """Every generator, built-in ones included (imports them all)."""
    for name in BUILTIN:
        _load(name)
    return dict(_GENERATORS)


def create_generator(name: str, options: dict[str, Any] | None = None) -> Generator:
    _load(name)
    if name not in _GENERATORS:
        raise ConfigError(f"unknown generator {name!r}", f"choose one of {sorted(set(BUILTIN) | set(_GENERATORS))}")
    cls = _GENERATORS[name]
    try:
        opts = cls.Options.model_validate(options or {})
    except ValidationError as e:
        raise ConfigError(f"invalid options for generator {name!r}: {e}",
                          f"options of {name}: {', '.join(sorted(cls.Options.model_fields))}") from e
    return cls(opts)

