"""GMBINet (Zhang et al., arXiv 2508.16397) as a pure ``nn.Module``.

Re-implemented from the description of the authors' architecture (their repository has no licence, so nothing is
copied). The layout follows their released weights one to one, so :mod:`.convert` can import them, but the module
names are ours and the authors' unused pieces (``decoder1..4``, ``conv_final``) are left out.

The network returns *logits* for its five side outputs, finest first. The authors end every head with a sigmoid;
keeping logits here lets the loss use the numerically stable ``binary_cross_entropy_with_logits``, and the
Detector applies the sigmoid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# channel multipliers of the stem and the four encoder stages, times ``init_filters`` (16, 32, 64, 96, 128)
CHANNEL_MULTIPLIERS = (1, 2, 4, 6, 8)
NUM_SIDE_OUTPUTS = 5


def ewms(guide: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Element-wise multiplication and summation: the guide gates the target without ever suppressing it."""
    return torch.sigmoid(guide) * target + target


class ConvBNReLU(nn.Module):
    """Conv (with bias, like the authors' weights) + BatchNorm + ReLU; padding keeps the size for odd kernels."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 1, stride: int = 1, dilation: int = 1,
                 groups: int = 1):
        super().__init__()
        padding = dilation * (kernel_size - 1) // 2
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding, dilation=dilation,
                              groups=groups, bias=True)
        self.bn = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class DepthwiseSeparable(nn.Module):
    """Depthwise 3x3 then pointwise 1x1; the stride-2 variant is the encoder's down-sampling block."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.dw = ConvBNReLU(in_ch, in_ch, 3, stride=stride, groups=in_ch)
        self.pw = ConvBNReLU(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(x))


class GMBIModule(nn.Module):
    """Group multi-scale bidirectional interaction.

    The channels are split into ``n`` groups; group ``i`` sees a depthwise conv with dilation ``i + 1``, so ``n`` is
    the number of receptive-field scales. Forward guidance lets each smaller scale gate the *input* of the next
    larger one; backward enhancement lets each larger scale gate the *output* of the previous one. A pointwise conv
    mixes the groups again, and a residual keeps the module easy to train when stacked.
    """

    def __init__(self, channels: int, n: int = 4, kernel_size: int = 3):
        super().__init__()
        if n < 1:
            raise ValueError(f"GMBI scale count n must be >= 1, got {n}")
        if channels % n:
            raise ValueError(f"GMBI module with {channels} channels cannot be split into n={n} equal groups; "
                             f"choose n dividing {channels}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"GMBI kernel size must be odd, got {kernel_size}")
        self.group = channels // n
        self.branches = nn.ModuleList(
            ConvBNReLU(self.group, self.group, kernel_size, dilation=i + 1, groups=self.group) for i in range(n))
        self.fuse = ConvBNReLU(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = torch.split(x, self.group, dim=1)
        ys: list[torch.Tensor] = []
        for i, (branch, xi) in enumerate(zip(self.branches, groups, strict=True)):
            ys.append(branch(xi if i == 0 else ewms(ys[-1], xi)))
        enhanced = [ewms(ys[i + 1], ys[i]) for i in range(len(ys) - 1)]
        enhanced.append(ys[-1])
        return self.fuse(torch.cat(enhanced, dim=1)) + x


class EncoderStage(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, num_blocks: int, n: int, kernel_size: int):
        super().__init__()
        self.down = DepthwiseSeparable(in_ch, out_ch, stride=2)
        self.blocks = nn.Sequential(*(GMBIModule(out_ch, n, kernel_size) for _ in range(num_blocks)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.down(x))


class Decoder(nn.Module):
    """U-shaped decoder with additive skips; returns its five feature maps, finest first."""

    def __init__(self, channels: Sequence[int]):
        super().__init__()
        c = list(channels)
        self.reduce = ConvBNReLU(c[4], c[3], 1)
        # applied coarsest first: (c3 -> c2), (c2 -> c1), (c1 -> c0), (c0 -> c0)
        self.fusions = nn.ModuleList(
            DepthwiseSeparable(c[k], c[max(k - 1, 0)]) for k in (3, 2, 1, 0))

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        d = self.reduce(feats[4])
        outs = [d]
        for fusion, skip in zip(self.fusions, (feats[3], feats[2], feats[1], feats[0]), strict=True):
            d = fusion(skip + _resize(d, skip.shape[-2:]))
            outs.append(d)
        return outs[::-1]


class SideHead(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, dropout: float):
        super().__init__()
        self.drop = nn.Dropout2d(dropout)
        self.conv = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.drop(x))


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest resize (the authors' ``F.interpolate`` default), skipped when the size already matches."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(int(s) for s in size), mode="nearest")


class GMBINet(nn.Module):
    """Encoder (stem + 4 stages of GMBI modules), additive U-decoder and 5 deeply supervised side outputs.

    ``forward`` returns the side-output logits resized to the input, ``[finest (decoder level 1), ..., coarsest]``.
    """

    def __init__(self, in_ch: int = 3, init_filters: int = 16, out_ch: int = 1,
                 blocks: Sequence[int] = (3, 4, 6, 3), n: int = 4, ksize: int = 3, dropout: float = 0.1,
                 head_prior: float | None = None):
        super().__init__()
        blocks = tuple(int(b) for b in blocks)
        if len(blocks) != 4 or any(b < 0 for b in blocks):
            raise ValueError(f"blocks must be 4 non-negative GMBI module counts, got {blocks}")
        if init_filters < 1:
            raise ValueError(f"init_filters must be >= 1, got {init_filters}")
        ch = [m * init_filters for m in CHANNEL_MULTIPLIERS]
        bad = [c for c, nb in zip(ch[1:], blocks, strict=True) if nb and c % max(n, 1)]
        if n < 1 or bad:
            raise ValueError(f"n={n} must be >= 1 and divide every stage's channel count {ch[1:]} "
                             f"(init_filters={init_filters}); e.g. n in 1, 2, 4, 8 with init_filters=16")
        self.channels = tuple(ch)
        self.stem = ConvBNReLU(in_ch, ch[0], 3, stride=2)
        self.stages = nn.ModuleList(
            EncoderStage(ch[k], ch[k + 1], blocks[k], n, ksize) for k in range(4))
        self.decoder = Decoder(ch)
        head_ch = (ch[0], ch[0], ch[1], ch[2], ch[3])
        self.heads = nn.ModuleList(SideHead(c, out_ch, dropout) for c in head_ch)
        if head_prior is not None:
            # Start every side output at a small defect probability (RetinaNet's prior init): defects cover a few
            # percent of pixels, and Adam would otherwise spend hundreds of steps moving the biases there.
            if not 0.0 < head_prior < 1.0:
                raise ValueError(f"head_prior must be in (0, 1), got {head_prior}")
            for head in self.heads:
                nn.init.constant_(head.conv.bias, math.log(head_prior / (1.0 - head_prior)))

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Decoder feature maps, finest first (what the side heads see)."""
        feats = [self.stem(x)]
        for stage in self.stages:
            feats.append(stage(feats[-1]))
        return self.decoder(feats)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        size = x.shape[-2:]
        return [_resize(head(d), size) for head, d in zip(self.heads, self.features(x), strict=True)]

    def side_output(self, x: torch.Tensor, index: int = 0) -> torch.Tensor:
        """One side output's logits at the input size, without running the other heads (inference path)."""
        if not 0 <= index < NUM_SIDE_OUTPUTS:
            raise ValueError(f"side output index must be in 0..{NUM_SIDE_OUTPUTS - 1}, got {index}")
        return _resize(self.heads[index](self.features(x)[index]), x.shape[-2:])
