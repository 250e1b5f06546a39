"""Train-time augmentation on collated batches, the anchors' recipes at the built-in data's scale.

- images (ViT, DeiT/timm): random translation (replicate-pad, random crop back) and horizontal flips;
  CLIP gets the translation only, since its captions name left and right;
- log-mels (AST, as in its Speech Commands recipe): SpecAugment frequency and time masks (Park et al. 2019) and
  mixup (Zhang et al. 2018) with soft targets, which `F.cross_entropy` takes as class probabilities; random time and
  mel-axis shifts (off: measured worse, see AST_AUG);
- the speech recogniser's log-mel source: SpecAugment, as Park et al. introduced it for speech recognition.

Every draw comes from torch's global RNG, which the trainer checkpoints (tasks/infra/checkpoint.py `rng_state`), so a resumed
run augments exactly as the uninterrupted one. Generative models get no augmentation: their targets are the
inputs (the speech recogniser's target is text, so its spectrogram is augmented). The trainer applies the model's
augmentation when `TrainConfig.augment` is on (the model table's `augment`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def shift_flip(images: torch.Tensor, max_shift: int = 4, flip: bool = True) -> torch.Tensor:
    """(B, C, H, W) -> same shape: each image moved by up to max_shift pixels each way (edges replicated), and
    mirrored left-right with probability 1/2 when flip."""
    B, _, H, W = images.shape
    s = max_shift
    if s > 0:
        padded = F.pad(images, (s, s, s, s), mode="replicate")  # (B, C, H + 2s, W + 2s)
        dy, dx = torch.randint(0, 2 * s + 1, (2, B)).tolist()
        images = torch.stack([padded[i, :, dy[i]:dy[i] + H, dx[i]:dx[i] + W] for i in range(B)])
    if flip:
        mirror = torch.rand(B) < 0.5
        images = torch.where(mirror[:, None, None, None], images.flip(-1), images)
    return images


def spec_augment(mel: torch.Tensor, freq_mask: int = 16, time_mask: int = 16, n_masks: int = 1) -> torch.Tensor:
    """(B, n_mels, n_frames) -> same shape with n_masks frequency bands of up to freq_mask bins and n_masks time
    spans of up to time_mask frames set to 0 (the normalised mean) per sample."""
    B, F_, T = mel.shape
    keep = torch.ones(B, F_, T, dtype=torch.bool)
    bins, frames = torch.arange(F_)[None, :, None], torch.arange(T)[None, None, :]
    for size, n, axis in ((freq_mask, F_, bins), (time_mask, T, frames)):
        for _ in range(n_masks if size > 0 else 0):
            width = torch.randint(0, min(size, n) + 1, (B, 1, 1))
            start = (torch.rand(B, 1, 1) * (n - width + 1)).long()
            keep &= ~((axis >= start) & (axis < start + width))
    return mel * keep


def time_shift(mel: torch.Tensor, max_shift: int) -> torch.Tensor:
    """(B, n_mels, n_frames) -> same shape, each clip rolled in time by a whole number of frames in
    [-max_shift, max_shift] (what leaves one end comes in at the other: mostly the window's padding silence)."""
    B, _, T = mel.shape
    if max_shift <= 0:
        return mel
    shift = torch.randint(-max_shift, max_shift + 1, (B, 1, 1))
    idx = (torch.arange(T)[None, None, :] - shift) % T  # (B, 1, T)
    return mel.gather(2, idx.expand_as(mel))


def freq_shift(mel: torch.Tensor, max_shift: float) -> torch.Tensor:
    """(B, n_mels, n_frames) -> same shape, each clip moved along the mel axis by a shift in [-max_shift, max_shift]
    bins (fractional: linear interpolation; edge bins repeated). On a mel scale a formant scale change is close to a
    shift, so this is a cheap vocal-tract-length perturbation (Jaitly and Hinton 2013)."""
    B, F_, _ = mel.shape
    if max_shift <= 0:
        return mel
    src = torch.arange(F_, dtype=mel.dtype)[None, :] - (torch.rand(B, 1) * 2 - 1) * max_shift  # (B, F)
    src = src.clamp(0, F_ - 1)
    lo = src.floor().long().clamp(max=F_ - 2) if F_ > 1 else src.floor().long()
    hi = (lo + 1).clamp(max=F_ - 1)
    w = (src - lo.to(mel.dtype))[:, :, None]  # (B, F, 1)
    take = lambda i: mel.gather(1, i[:, :, None].expand_as(mel))  # noqa: E731
    return (1 - w) * take(lo) + w * take(hi)


def mixup(x: torch.Tensor, labels: torch.Tensor, n_classes: int, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend each sample with a shuffled partner: x' = lam x + (1 - lam) x[perm], targets likewise (B, n_classes).

    lam ~ Beta(alpha, alpha), one per batch as in the reference implementation."""
    target = F.one_hot(labels, n_classes).float()
    if alpha <= 0:
        return x, target
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(len(x))
    return lam * x + (1 - lam) * x[perm], lam * target + (1 - lam) * target[perm]


# ---------------------------------------------------------------------------------------------------- per model
# What the table (tasks/train/table.py, `augment`) names; the trainer calls them after make_batch when
# TrainConfig.augment is on.
def vit_augment(batch, ctx):
    return {**batch, "image": shift_flip(batch["image"], VIT_AUG["max_shift"], VIT_AUG["flip"])}


def asr_augment(batch, ctx):
    return {**batch, "src": spec_augment(batch["src"], freq_mask=ASR_AUG["freq_mask"], time_mask=ASR_AUG["time_mask"])}


def ast_augment(batch, ctx):
    mel = time_shift(batch["mel"], AST_AUG["time_shift"])
    mel = freq_shift(mel, AST_AUG["freq_shift"])
    mel = spec_augment(mel, freq_mask=AST_AUG["freq_mask"], time_mask=AST_AUG["time_mask"])
    mel, target = mixup(mel, batch["label"], ctx.cfg.n_classes, AST_AUG["mixup"])
    return {**batch, "mel": mel, "label": target}


# Measured on the built-in set (default ViT with the conv stem, 600 steps, test accuracy): flips 0.95, none 0.90,
# flips + 1-pixel shifts 0.71, flips + 4-pixel shifts 0.70, so shifts are off by default. CLIP gets none: flips would
# contradict captions that say "left" and "right", and shifts cost the ViT accuracy.
VIT_AUG = dict(max_shift=0, flip=True)
# Speech recognition (on only with train_overrides {"asr": {"augment": true}}), test word accuracy (transcript exactly
# right): spoken digits of a speaker never heard in training (fsdd4, theo held out, default model and budget, 449
# steps) 0.91 without, 0.93 with these masks; 10 takes a speaker and digit (272 train clips, 340 steps) 0.48 without,
# 0.66 with 8 bins and 4 frames, 0.77 with these. The built-in set at its 250 steps: CER 0.026 without, 0.075 with 8/4,
# 0.204 with these (the masks slow a short run down), so the default is off.
ASR_AUG = dict(freq_mask=16, time_mask=8)
# AST (on only with train_overrides {"ast": {"augment": true}}): fsdd4, theo held out, conv stem, 717 steps, test
# accuracy without augmentation 0.68 / 0.71 (seeds 0 / 1); time shifts of up to 8 frames 0.56, mel shifts of up to 4
# bins 0.64, of 8 bins 0.54, both 0.56, both + masks of 8 bins and 8 frames 0.61: so the shifts stay at 0.
AST_AUG = dict(time_shift=0, freq_shift=0.0, freq_mask=16, time_mask=16, mixup=0.0)
