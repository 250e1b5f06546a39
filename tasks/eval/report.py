"""Evaluation artifacts: markdown tables, CSV, image grids, confusion matrices, and the metrics.json/summary.md pair
every evaluation folder holds. Figures are drawn on matplotlib's object API (`Figure`), which needs no backend."""

from __future__ import annotations

import csv
import math
import textwrap
from pathlib import Path
from typing import Sequence

import torch
from matplotlib.figure import Figure

from tasks.infra.common import write_json

N_SHOW = 8  # generated samples per grid (and per row of a grid) / WAVs per model


def table(header: Sequence[str], rows: list[Sequence]) -> str:
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows])


def write_csv(path: Path, header: Sequence[str], rows: list[Sequence]) -> None:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


def confusion_plot(cm: torch.Tensor, classes: list[str], path: Path, title: str) -> None:
    n = len(classes)
    frac = cm.float() / cm.sum(dim=1, keepdim=True).clamp_min(1)  # row-normalised
    fig = Figure(figsize=(min(2 + 0.6 * n, 14), min(1.6 + 0.6 * n, 13)))
    ax = fig.subplots()
    ax.imshow(frac.numpy(), cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            colour = "white" if frac[i, j] > 0.5 else "black"
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7, color=colour)
    ax.set_xticks(range(n), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def image_grid(images: torch.Tensor, titles: list[str], path: Path, ncols: int = N_SHOW) -> None:
    """Pixels (N, 3, H, W) in 0..255 -> a PNG grid, each image with its (wrapped) title above it."""
    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(1.8 * ncols, 2.2 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i].clamp(0, 255).byte().permute(1, 2, 0).numpy(), interpolation="nearest")
            lines = [w for line in titles[i].split("\n") for w in textwrap.wrap(line, 24)]
            ax.set_title("\n".join(lines[:5]), fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def finish(tmp: Path, record: dict, title: str, metrics: dict, sections: list[str]) -> str:
    """metrics.json + summary.md into tmp, metrics and artifacts into the _SUCCESS record; returns the summary."""
    summary = "\n\n".join([f"## {title}", table(("metric", "value"), list(metrics.items())), *sections]) + "\n"
    write_json(tmp / "metrics.json", metrics)
    (tmp / "summary.md").write_text(summary)
    record.update(metrics=metrics, artifacts=sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()))
    return summary
