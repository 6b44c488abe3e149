"""Reports: prediction sheets (PNG), Markdown tables, and plots. matplotlib runs headless (Agg)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def prediction_sheet(rows: Sequence[Mapping[str, Any]], title: str = "") -> bytes:
    """PNG with one line per image: image | ground truth | prediction (and the score in the caption).

    Each row: {"name", "image" (H,W,3 float [0,1]), "mask" (H,W {0,1}) or None, "prob" (H,W [0,1]), "score",
    optional "label"}.
    """
    plt = _plt()
    n = max(1, len(rows))
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.5 * n), squeeze=False)
    for i, r in enumerate(rows):
        img, mask, prob = r["image"], r.get("mask"), r["prob"]
        axes[i, 0].imshow(np.clip(img, 0, 1))
        axes[i, 0].set_title(str(r.get("name", ""))[-28:], fontsize=7)
        if mask is not None:
            axes[i, 1].imshow(mask, cmap="gray", vmin=0, vmax=1)
            axes[i, 1].set_title(f"ground truth (label {r.get('label')})", fontsize=7)
        else:
            axes[i, 1].text(0.5, 0.5, "no mask", ha="center", va="center")
            axes[i, 1].set_title("ground truth", fontsize=7)
        axes[i, 2].imshow(prob, cmap="inferno", vmin=0, vmax=1)
        axes[i, 2].set_title(f"prediction (score {float(r.get('score', 0)):.3f})", fontsize=7)
        for a in axes[i]:
            a.set_xticks([])
            a.set_yticks([])
    if not rows:
        for a in axes[0]:
            a.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / (2.5 * n)) if title else None)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 10**digits else f"{v:.0f}"
    return str(v)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, digits: int = 4) -> str:
    if not rows:
        return "(no rows)\n"
    cols = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c), digits) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def line_plot(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], xlabel: str, ylabel: str,
              title: str = "") -> bytes:
    """One line per named series (x values, y values) -> PNG."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if series:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def training_curves(history: Sequence[Mapping[str, Any]], chosen_epoch: int | None = None, title: str = "") -> bytes:
    """The curves every training tool draws: losses (left) and validation metrics in [0, 1] (right) per epoch, with
    the epoch that became the artifact marked. ``history`` is the per-epoch metrics (key ``epoch`` 1-based)."""
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = [int(h["epoch"]) for h in history]
    for ax, keys in ((left, [k for k in _keys(history) if k.endswith("loss")]),
                     (right, [k for k in _keys(history) if k.startswith("val_") and not k.endswith("loss")])):
        for k in keys:
            pts = [(e, float(h[k])) for e, h in zip(epochs, history, strict=True) if isinstance(h.get(k), (int, float))]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o" if len(pts) < 30 else None, markersize=3, label=k)
        if chosen_epoch:
            ax.axvline(chosen_epoch, color="grey", linestyle="--", linewidth=1, label=f"chosen (epoch {chosen_epoch})")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    left.set_title("losses")
    right.set_title("validation")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _keys(history: Sequence[Mapping[str, Any]]) -> list[str]:
    return sorted({k for h in history for k in h if k not in ("epoch", "epoch_time_s", "lr")})


def contact_sheet(items: Sequence[Mapping[str, Any]], cols: int = 4) -> bytes:
    """PNG grid of samples, each the image with its mask's outline in red. Items: {"image", "mask", "title"}."""
    from scipy import ndimage

    plt = _plt()
    n = max(1, len(items))
    cols = min(cols, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, it in zip(axes.flat, items, strict=False):
        img = np.clip(np.asarray(it["image"], dtype=np.float32), 0, 1).copy()
        mask = it.get("mask")
        if mask is not None and np.asarray(mask).any():
            m = np.asarray(mask) > 0
            edge = m & ~ndimage.binary_erosion(m, iterations=max(1, min(img.shape[:2]) // 128))
            img[edge] = (1.0, 0.1, 0.1)
        ax.imshow(img)
        ax.set_title(str(it.get("title", ""))[:40], fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()
