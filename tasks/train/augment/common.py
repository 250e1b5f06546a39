"""What image and audio augmentation share: mixup and CutMix with soft targets, and a run's settings."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from models.rng import generator


def settings(defaults: dict, given: bool | dict | None = None) -> dict:
    """TrainConfig.augment -> what a run augments with: the model's defaults (VIT_AUG, AST_AUG, ASR_AUG) with a dict's
    entries on top (`train_overrides {"asr": {"augment": {"freq_mask": 16}}}`); an unknown entry is a ValueError."""
    extra = given if isinstance(given, dict) else {}
    if unknown := sorted(set(extra) - set(defaults)):
        raise ValueError(f"unknown augment setting(s) {unknown}: this model's are {defaults} (its defaults)")
    return {**defaults, **extra}


def beta(alpha: float) -> float:
    """A draw of Beta(alpha, alpha) from this thread's generator (models/rng.py; torch's Beta takes none)."""
    return float(np.random.default_rng(int(torch.randint(2**62, (), generator=generator()))).beta(alpha, alpha))


def mixup(x: torch.Tensor, labels: torch.Tensor, n_classes: int, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend each sample with a shuffled partner: x' = lam x + (1 - lam) x[perm], targets likewise (B, n_classes).

    lam ~ Beta(alpha, alpha), one per batch as in the reference implementation."""
    target = F.one_hot(labels, n_classes).float()
    if alpha <= 0:
        return x, target
    lam = beta(alpha)
    perm = torch.randperm(len(x), generator=generator())
    return lam * x + (1 - lam) * x[perm], lam * target + (1 - lam) * target[perm]


def cutmix(x: torch.Tensor, labels: torch.Tensor, n_classes: int, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, H, W) images -> the same with one box of each replaced by the same box of a shuffled partner; targets
    (B, n_classes) weigh the two labels by the areas they show. The box's area share 1 - lam, lam ~ Beta(alpha, alpha),
    has a uniform random centre and is clipped at the border (so the label weights use the clipped area), one box per
    batch, as the reference implementation."""
    target = F.one_hot(labels, n_classes).float()
    if alpha <= 0:
        return x, target
    B, _, H, W = x.shape
    lam = beta(alpha)
    side = math.sqrt(1 - lam)
    h, w = int(H * side), int(W * side)
    cy, cx = (int(torch.randint(0, n, (), generator=generator())) for n in (H, W))
    y0, y1, x0, x1 = max(cy - h // 2, 0), min(cy + h // 2, H), max(cx - w // 2, 0), min(cx + w // 2, W)
    perm = torch.randperm(B, generator=generator())
    x = x.clone()
    x[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
    pasted = (y1 - y0) * (x1 - x0) / (H * W)
    return x, (1 - pasted) * target + pasted * target[perm]


def mix(x: torch.Tensor, labels: torch.Tensor, n_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or CutMix on a batch (both on: one or the other per batch, with probability 1/2, as timm's Mixup) ->
    (x, targets (B, n_classes)); neither: the batch and its labels (B,) as they were."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return x, labels
    if cutmix_alpha > 0 and (mixup_alpha <= 0 or torch.rand((), generator=generator()) < 0.5):
        return cutmix(x, labels, n_classes, cutmix_alpha)
    return mixup(x, labels, n_classes, mixup_alpha)
