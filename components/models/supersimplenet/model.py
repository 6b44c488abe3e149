"""SuperSimpleNet's trainable parts as plain nn.Modules (Rolih et al., ICPR 2024 / JIMS 2025).

The frozen backbone lives in :mod:`components.backbones`; this module only turns its feature maps into one
upscaled, locally aggregated map (:class:`FeatureAggregator`) and holds the three trainable pieces
(:class:`SuperSimpleNetHeads`): the feature adaptor, the segmentation head and the classification head. Channel
counts come from the backbone, so the same code serves wide_resnet50_2 (1536 channels) and a narrow
efficientnet_lite0 alike.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


def init_weights(module: nn.Module) -> None:
    """The authors' init: Xavier-normal convs/linears, BatchNorm scale 1 (biases keep PyTorch's default)."""
    if isinstance(module, nn.Conv2d | nn.Linear):
        nn.init.xavier_normal_(module.weight)
    elif isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
        nn.init.constant_(module.weight, 1.0)


class FeatureAggregator(nn.Module):
    """Upscale every backbone map to ``upscale`` x the first one's size, concatenate, average 3x3 neighbourhoods.

    Deep features are coarse (stride 8 and 16 for layer2/layer3); upscaling before concatenation is what gives
    SuperSimpleNet its stride-4 maps and its localisation edge over SimpleNet. ``align_corners=True`` as in the
    authors' code, so the learned heads see the features they were designed around.
    """

    def __init__(self, patch_size: int = 3, upscale: int = 2):
        super().__init__()
        if patch_size < 1 or patch_size % 2 == 0:
            raise ValueError(f"patch_size must be odd and >= 1, got {patch_size}")
        if upscale < 1:
            raise ValueError(f"upscale must be >= 1, got {upscale}")
        self.upscale = upscale
        self.patch_size = patch_size
        self.pool = nn.AvgPool2d(kernel_size=patch_size, stride=1, padding=patch_size // 2)

    def output_size(self, first_layer_size: Sequence[int]) -> tuple[int, int]:
        h, w = (int(s) for s in first_layer_size)
        return h * self.upscale, w * self.upscale

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        if not features:
            raise ValueError("FeatureAggregator needs at least one feature map")
        size = self.output_size(features[0].shape[-2:])
        maps = [f if tuple(f.shape[-2:]) == size else
                F.interpolate(f, size=size, mode="bilinear", align_corners=True) for f in features]
        return self.pool(torch.cat(maps, dim=1))


class SuperSimpleNetHeads(nn.Module):
    """Adaptor + segmentation head + classification head.

    ``adapt_cls_features`` picks the version: ICPR (True) feeds the adapted features to the classification head,
    JIMS (False, the authors' current default) the raw ones, so the adaptor is shaped by the pixel loss alone and
    the classifier keeps the backbone's own feature space. Training injects noise between :meth:`adapt` and
    :meth:`segment_classify`, which is why the two steps are separate methods.
    """

    def __init__(self, in_ch: int, adapt_cls_features: bool = False, seg_hidden: int = 1024, cls_hidden: int = 128,
                 cls_kernel: int = 5):
        super().__init__()
        if in_ch < 1 or seg_hidden < 1 or cls_hidden < 1:
            raise ValueError(f"channel counts must be >= 1 (in_ch={in_ch}, seg_hidden={seg_hidden}, "
                             f"cls_hidden={cls_hidden})")
        if cls_kernel < 1 or cls_kernel % 2 == 0:
            raise ValueError(f"cls_kernel must be odd, got {cls_kernel}")
        self.in_ch = in_ch
        self.adapt_cls_features = adapt_cls_features
        # a 1x1 conv is a per-location linear layer, which is what the paper's adaptor is
        self.adaptor = nn.Conv2d(in_ch, in_ch, kernel_size=1)
        self.seg_head = nn.Sequential(
            nn.Conv2d(in_ch, seg_hidden, kernel_size=1),
            nn.BatchNorm2d(seg_hidden),
            nn.LeakyReLU(0.2),
            nn.Conv2d(seg_hidden, 1, kernel_size=1, bias=False),
        )
        # integer padding == "same" for odd kernels, and exports to ONNX without a Pad node
        self.cls_conv = nn.Sequential(
            nn.Conv2d(in_ch + 1, cls_hidden, kernel_size=cls_kernel, padding=cls_kernel // 2),
            nn.BatchNorm2d(cls_hidden),
            nn.ReLU(),
        )
        self.cls_fc = nn.Linear(2 * cls_hidden + 2, 1)
        self.apply(init_weights)

    def adapt(self, features: torch.Tensor) -> torch.Tensor:
        return self.adaptor(features)

    def head_parameters(self) -> list[nn.Parameter]:
        """Segmentation and classification head parameters."""
        return [*self.seg_head_parameters(), *self.cls_head_parameters()]

    def seg_head_parameters(self) -> list[nn.Parameter]:
        return list(self.seg_head.parameters())

    def cls_head_parameters(self) -> list[nn.Parameter]:
        return [*self.cls_conv.parameters(), *self.cls_fc.parameters()]

    def segment_classify(self, seg_features: torch.Tensor, cls_features: torch.Tensor,
                         stop_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (seg logits (B,1,h,w), cls logit (B,)).

        ``stop_grad`` keeps the classification loss from reshaping the segmentation head; the authors use it when
        only synthetic anomalies exist, where the image label adds nothing the pixel mask does not already say.
        """
        seg = self.seg_head(seg_features)
        seg_in = seg.detach() if stop_grad else seg
        dec = self.cls_conv(torch.cat((cls_features, seg_in), dim=1))
        pooled = torch.cat((dec.amax(dim=(2, 3)), dec.mean(dim=(2, 3)),
                            seg_in.amax(dim=(2, 3)), seg_in.mean(dim=(2, 3))), dim=1)
        # reshape, not squeeze: squeeze(dim) traces into shape-dependent ops that OpenVINO/ONNX choke on
        cls = self.cls_fc(pooled).reshape(-1)
        return seg, cls

    def cls_input(self, features: torch.Tensor, adapted: torch.Tensor) -> torch.Tensor:
        return adapted if self.adapt_cls_features else features

    def forward(self, features: torch.Tensor, stop_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        adapted = self.adapt(features)
        return self.segment_classify(adapted, self.cls_input(features, adapted), stop_grad=stop_grad)
