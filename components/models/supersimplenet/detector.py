"""SuperSimpleNet behind the Detector contract.

The frozen backbone is part of the module, and its weights ARE written to ``model.safetensors``: an artifact is
self-contained, so serving needs neither the timm hub nor an offline weights package, and a later change of the
hub's default weights cannot silently change a deployed model. The price is size: wide_resnet50_2 up to layer3 is
24.9 M parameters (about 100 MB of the 135 MB fp32 artifact, beside 8.86 M trainable ones); efficientnet_lite0 up
to blocks.4 is 0.7 M (a 5.6 MB artifact). When rebuilding from an artifact the backbone is therefore created with
random weights and overwritten by the state dict.

Inference follows the authors' order: sigmoid of the seg logits, bilinear upsampling to the network input size,
then the Gaussian blur (sigma 4 in input pixels), then a resize to the caller's image size if it differs. The base
class blurs before upsampling, which would shrink the blur 4x (the seg map has stride 4), hence the own ``forward``.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from components.backbones import BackboneSpec, create_backbone, imagenet_normalization
from components.models.base import Detector, DetectorOutput, Postprocessing, Preprocessing, gaussian_blur
from components.models.supersimplenet.model import FeatureAggregator, SuperSimpleNetHeads

log = logging.getLogger(__name__)

# config key telling from_config that the state dict carries the backbone (set by config(), absent in fresh configs)
BACKBONE_IN_STATE_DICT = "backbone_in_state_dict"


# the paper's backbone; needs hub access or a weights file (the default below works offline)
PAPER_BACKBONE = {"name": "wide_resnet50_2.tv_in1k", "layers": ["layer2", "layer3"]}


class _ArtifactBackboneFilter(logging.Filter):
    """create_backbone warns that random weights give useless features; when loading an artifact they are only
    placeholders that the state dict overwrites, so that warning would be a false alarm on every serving replica."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.WARNING and "RANDOM weights" in record.getMessage())


class SuperSimpleNetParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backbone: BackboneSpec = Field(default_factory=BackboneSpec,
                                   description="frozen feature extractor; default efficientnet_lite0 at strides 8 "
                                               "and 16 with offline weights; the paper: " + str(PAPER_BACKBONE))
    adapt_cls_features: bool = Field(False, description="True: ICPR 2024 (cls head sees adapted features); "
                                                        "False: JIMS 2025 (raw features)")
    seg_hidden: int = Field(1024, ge=1, description="width of the segmentation head")
    cls_hidden: int = Field(128, ge=1, description="width of the classification head's 5x5 conv")
    score: Literal["cls", "seg_max"] = Field("cls", description="image score: sigmoid of the cls logit, or the "
                                                                 "max of the (blurred) defect map")


def default_preprocessing() -> Preprocessing:
    mean, std = imagenet_normalization()
    return Preprocessing(input_size=(256, 256), mean=tuple(mean), std=tuple(std))


def default_postprocessing() -> Postprocessing:
    return Postprocessing(score="max", blur_sigma=4.0)


class SuperSimpleNetDetector(Detector):
    family = "supersimplenet"

    def __init__(self, params: SuperSimpleNetParams | None = None, preprocessing: Preprocessing | None = None,
                 postprocessing: Postprocessing | None = None, *, backbone_weights: str | None = None):
        """``backbone_weights`` overrides ``params.backbone.weights`` without changing the stored config: loading an
        artifact passes ``"random"`` because the state dict carries the backbone."""
        super().__init__(preprocessing or default_preprocessing(), postprocessing or default_postprocessing())
        self.params = params or SuperSimpleNetParams()
        bb = self.params.backbone
        if backbone_weights is None:
            self.backbone = create_backbone(bb)
        else:
            spec = bb.model_copy(update={"weights": backbone_weights, "weights_uri": None})
            quiet = _ArtifactBackboneFilter()
            backbone_log = logging.getLogger(create_backbone.__module__)
            backbone_log.addFilter(quiet)
            try:
                self.backbone = create_backbone(spec)
            finally:
                backbone_log.removeFilter(quiet)
        # record the resolved layer names: an artifact must not depend on the default layers of a later version
        self.params = self.params.model_copy(
            update={"backbone": bb.model_copy(update={"layers": list(self.backbone.layers)})})
        for q in self.backbone.parameters():
            q.requires_grad_(False)
        self.backbone.eval()
        self.aggregator = FeatureAggregator()
        self.heads = SuperSimpleNetHeads(int(sum(self.backbone.channels)), self.params.adapt_cls_features,
                                         self.params.seg_hidden, self.params.cls_hidden)
        self._feature_shapes: dict[tuple[int, int], tuple[int, int, int]] = {}

    def train(self, mode: bool = True) -> SuperSimpleNetDetector:
        # the backbone's BatchNorm statistics are part of the pretrained weights: never update them
        super().train(mode)
        self.backbone.eval()
        return self

    # -- features and heads -------------------------------------------------------------------------------------

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed input -> aggregated backbone features (B, C, h, w).

        No ``no_grad`` here on purpose: the backbone's parameters are frozen, so no graph is recorded unless the input
        itself requires grad, which is exactly the case of saliency methods that need input gradients.
        """
        return self.aggregator(list(self.backbone(x)))

    def head_forward(self, features: torch.Tensor, stop_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads(features, stop_grad=stop_grad)

    def feature_shape(self, input_size: tuple[int, int] | None = None) -> tuple[int, int, int]:
        """(C, h, w) of :meth:`extract` at ``input_size`` (default: the preprocessing size), for feature caches.

        Measured with one dry run per size rather than computed from strides, because padding conventions make
        ``ceil(H / stride)`` wrong for some timm models and odd sizes.
        """
        size = tuple(int(s) for s in (input_size or self.preprocessing.input_size))
        if size not in self._feature_shapes:
            device = next(self.backbone.parameters(), torch.empty(0)).device
            with torch.no_grad():
                first = self.backbone(torch.zeros(1, 3, *size, device=device))[0]
            h, w = self.aggregator.output_size(first.shape[-2:])
            self._feature_shapes[size] = (int(sum(self.backbone.channels)), h, w)
        return self._feature_shapes[size]

    def parameter_counts(self) -> dict[str, int]:
        def n(params: Any) -> int:
            return sum(q.numel() for q in params)

        h = self.heads
        counts = {"backbone": n(self.backbone.parameters()), "adaptor": n(h.adaptor.parameters()),
                  "seg_head": n(h.seg_head.parameters()),
                  "cls_head": n(h.cls_conv.parameters()) + n(h.cls_fc.parameters())}
        counts["trainable"] = counts["adaptor"] + counts["seg_head"] + counts["cls_head"]
        counts["total"] = counts["trainable"] + counts["backbone"]
        return counts

    # -- the contract -------------------------------------------------------------------------------------------

    def raw_map(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.head_forward(self.extract(x))[0])

    def image_score(self, prob_map: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.params.score == "seg_max":
            return prob_map.flatten(1).amax(dim=1)
        return torch.sigmoid(self.head_forward(self.extract(x))[1])

    def postprocess(self, seg_logits: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        """Seg logits at feature resolution -> defect map at ``out_size`` (upsample to the input size, blur, resize)."""
        prob = torch.sigmoid(seg_logits)
        net_size = tuple(self.preprocessing.input_size)
        if tuple(prob.shape[-2:]) != net_size:
            prob = F.interpolate(prob, size=net_size, mode="bilinear", align_corners=False)
        if self.postprocessing.blur_sigma > 0:
            prob = gaussian_blur(prob, self.postprocessing.blur_sigma)
        if tuple(prob.shape[-2:]) != tuple(out_size):
            prob = F.interpolate(prob, size=tuple(out_size), mode="bilinear", align_corners=False)
        return prob.clamp(0.0, 1.0)

    def forward(self, images: torch.Tensor) -> DetectorOutput:
        h, w = images.shape[-2:]
        return self.forward_features(self.extract(self.preprocess(images)), (int(h), int(w)))

    def forward_features(self, features: torch.Tensor, out_size: tuple[int, int]) -> DetectorOutput:
        seg, cls = self.head_forward(features)
        prob = self.postprocess(seg, (int(out_size[0]), int(out_size[1])))
        score = prob.flatten(1).amax(dim=1) if self.params.score == "seg_max" else torch.sigmoid(cls)
        return DetectorOutput(score=score, anomaly_map=prob)

    # -- feature cache ------------------------------------------------------------------------------------------

    supports_feature_cache = True

    def extractor_config(self) -> dict[str, Any]:
        """The backbone (name, resolved layers, weight source) and the aggregation: what ``extract`` computes."""
        spec = self.backbone.spec.model_dump(mode="json")
        return {**spec, "aggregator": {"patch_size": self.aggregator.patch_size, "upscale": self.aggregator.upscale}}

    # -- serialisation ------------------------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        return {"params": self.params.model_dump(mode="json"),
                "preprocessing": self.preprocessing.model_dump(mode="json"),
                "postprocessing": self.postprocessing.model_dump(mode="json"),
                BACKBONE_IN_STATE_DICT: True}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SuperSimpleNetDetector:
        return cls(SuperSimpleNetParams.model_validate(config.get("params") or {}),
                   Preprocessing.model_validate(config.get("preprocessing") or default_preprocessing().model_dump()),
                   Postprocessing.model_validate(config.get("postprocessing") or
                                                 default_postprocessing().model_dump()),
                   backbone_weights="random" if config.get(BACKBONE_IN_STATE_DICT) else None)
