"""GMBINet behind the Detector contract: the defect map is the sigmoid of one side output."""

from __future__ import annotations

import logging
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from components.models.base import Detector, Postprocessing, Preprocessing
from components.models.gmbinet.model import CHANNEL_MULTIPLIERS, NUM_SIDE_OUTPUTS, GMBINet

log = logging.getLogger(__name__)

# the authors' normalisation statistics (SD-Saliency-900), same value on every channel
AUTHORS_MEAN = (0.4669, 0.4669, 0.4669)
AUTHORS_STD = (0.2437, 0.2437, 0.2437)


class GMBINetParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n: int = Field(4, ge=1, le=16, description="scales per GMBI module (channel groups); must divide 2,4,6,8 x "
                                              "init_filters")
    init_filters: int = Field(16, ge=1, description="stem width; stages use 2, 4, 6, 8 times this")
    blocks: tuple[int, int, int, int] = Field((3, 4, 6, 3), description="GMBI modules per encoder stage")
    side_output: int = Field(0, ge=0, le=NUM_SIDE_OUTPUTS - 1, description="side output used at inference "
                                                                            "(0 = finest, the authors' choice)")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout2d before each side head (training only)")
    head_prior: float | None = Field(0.02, gt=0.0, lt=1.0,
                                     description="initial defect probability of the side outputs (bias init); "
                                                 "null = PyTorch's default init, as the authors")

    @field_validator("blocks")
    @classmethod
    def _non_negative(cls, v: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        if any(b < 0 for b in v):
            raise ValueError("blocks must be >= 0")
        return v

    @model_validator(mode="after")
    def _n_divides_channels(self) -> GMBINetParams:
        channels = [m * self.init_filters for m in CHANNEL_MULTIPLIERS[1:]]
        bad = [c for c, nb in zip(channels, self.blocks, strict=True) if nb and c % self.n]
        if bad:
            raise ValueError(f"n={self.n} does not divide the stage widths {channels} (init_filters="
                             f"{self.init_filters}); choose n in 1, 2, 4, 8 or change init_filters")
        return self


def default_preprocessing() -> Preprocessing:
    """Training from scratch: 256x256 keeps CPU training practical; the authors' statistics, no per-image max."""
    return Preprocessing(input_size=(256, 256), mean=AUTHORS_MEAN, std=AUTHORS_STD, scale_by_max=False)


def authors_preprocessing() -> Preprocessing:
    """What the released checkpoints expect: 512x512, image divided by its max, then their statistics."""
    return Preprocessing(input_size=(512, 512), mean=AUTHORS_MEAN, std=AUTHORS_STD, scale_by_max=True)


def default_postprocessing() -> Postprocessing:
    return Postprocessing(score="max", blur_sigma=0.0)


class GMBINetDetector(Detector):
    family = "gmbinet"

    def __init__(self, params: GMBINetParams | None = None, preprocessing: Preprocessing | None = None,
                 postprocessing: Postprocessing | None = None):
        super().__init__(preprocessing or default_preprocessing(), postprocessing or default_postprocessing())
        self.params = params or GMBINetParams()
        p = self.params
        self.net = GMBINet(in_ch=3, init_filters=p.init_filters, out_ch=1, blocks=p.blocks, n=p.n,
                           dropout=p.dropout, head_prior=p.head_prior)

    def raw_map(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net.side_output(x, self.params.side_output))

    def config(self) -> dict[str, Any]:
        return {"params": self.params.model_dump(mode="json"),
                "preprocessing": self.preprocessing.model_dump(mode="json"),
                "postprocessing": self.postprocessing.model_dump(mode="json")}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GMBINetDetector:
        return cls(GMBINetParams.model_validate(config.get("params") or {}),
                   Preprocessing.model_validate(config.get("preprocessing") or default_preprocessing().model_dump()),
                   Postprocessing.model_validate(config.get("postprocessing") or
                                                 default_postprocessing().model_dump()))
