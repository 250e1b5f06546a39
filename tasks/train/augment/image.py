"""Image augmentation (ViT, DeiT/timm): shifts and flips, colour jitter, TrivialAugment; vit_augment and VIT_AUG.
ImageGPT's: each image's hues turned to a shuffled partner's (hue_swap; imagegpt_augment and IMAGEGPT_AUG)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from models.rng import generator
from models.vq import image_to_tokens, tokens_to_image
from tasks.train.augment.common import mix, settings


def shift_flip(images: torch.Tensor, max_shift: int = 4, flip: bool = True) -> torch.Tensor:
    """(B, C, H, W) -> same shape: each image moved by up to max_shift pixels each way (edges replicated), and
    mirrored left-right with probability 1/2 when flip."""
    B, _, H, W = images.shape
    s = max_shift
    if s > 0:
        padded = F.pad(images, (s, s, s, s), mode="replicate")  # (B, C, H + 2s, W + 2s)
        dy, dx = torch.randint(0, 2 * s + 1, (2, B), generator=generator()).tolist()
        images = torch.stack([padded[i, :, dy[i]:dy[i] + H, dx[i]:dx[i] + W] for i in range(B)])
    if flip:
        mirror = torch.rand(B, generator=generator()) < 0.5
        images = torch.where(mirror[:, None, None, None], images.flip(-1), images)
    return images


def grey(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB -> (B, 1, H, W) luma (ITU-R 601, as PIL's "L" and torchvision's rgb_to_grayscale)."""
    return (0.299 * pixels[:, 0] + 0.587 * pixels[:, 1] + 0.114 * pixels[:, 2])[:, None]


def _factors(n: int, strength: float) -> torch.Tensor:
    """(n, 1, 1, 1) factors uniform in [max(0, 1 - strength), 1 + strength]."""
    lo = max(0.0, 1.0 - strength)
    return (lo + torch.rand(n, generator=generator()) * (1.0 + strength - lo))[:, None, None, None]


def _blend(pixels: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance's blend: factor 1 keeps `pixels`, 0 gives `other`, above 1 extrapolates; clamped to 0..1."""
    return (other + factor * (pixels - other)).clamp(0.0, 1.0)


def enhance_brightness(p: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Towards black by factor f (PIL ImageEnhance.Brightness)."""
    return _blend(p, torch.zeros_like(p), f)


def enhance_contrast(p: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Towards the image's mean grey (PIL ImageEnhance.Contrast)."""
    return _blend(p, grey(p).mean((1, 2, 3), keepdim=True), f)


def enhance_colour(p: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Towards the image's own grey (PIL ImageEnhance.Color)."""
    return _blend(p, grey(p), f)


def colour_jitter(pixels: torch.Tensor, brightness: float = 0.4, contrast: float = 0.4,
                  saturation: float = 0.4) -> torch.Tensor:
    """(B, 3, H, W) RGB in 0..1 -> same shape, per image: brightness (scale towards black), contrast (towards the
    image's mean grey) and saturation (towards its own grey image), each by a factor uniform in [1 - s, 1 + s], in that
    order (torchvision's ColorJitter draws the order too), clamped to 0..1. Batches are normalised with the data's
    mean/std: vit_augment turns them back into 0..1 pixels before calling this."""
    for op, strength in ((enhance_brightness, brightness), (enhance_contrast, contrast), (enhance_colour, saturation)):
        if strength > 0:
            pixels = op(pixels, _factors(len(pixels), strength))
    return pixels


def _affine(pixels: torch.Tensor, theta: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) resampled (bilinear) through the (B, 2, 3) affine maps theta in [-1, 1] coordinates; what comes
    from outside the image is `fill` (C, 1, 1)."""
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)  # (B, H, W, 2)
    return F.grid_sample(pixels - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill


def _sharpness(p: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """PIL's sharpness: blend with the image smoothed by [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 (border kept)."""
    k = torch.ones(3, 3, dtype=p.dtype)
    k[1, 1] = 5.0
    smooth = F.conv2d(F.pad(p, (1, 1, 1, 1), mode="replicate"), (k / 13).expand(p.shape[1], 1, 3, 3), groups=p.shape[1])
    return _blend(p, smooth, f)


def _posterize(p: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Keep 8 - round(4 m) bits of each 8-bit value."""
    step = 2.0 ** (4 * m).round()  # (b, 1, 1, 1)
    return ((p * 255).round() / step).floor() * step / 255


def _autocontrast(p: torch.Tensor) -> torch.Tensor:
    lo, hi = p.amin((2, 3), keepdim=True), p.amax((2, 3), keepdim=True)  # (b, C, 1, 1) per channel
    return torch.where(hi > lo, (p - lo) / (hi - lo).clamp_min(1e-6), p)


def _theta(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor, tx, ty) -> torch.Tensor:
    """Per-image (B,) entries -> (B, 2, 3) affine maps [[a, b, tx], [c, d, ty]]."""
    return torch.stack([torch.stack([a, b, tx], -1), torch.stack([c, d, ty], -1)], 1)


# TrivialAugment's ops on 0..1 pixels: (pixels (b, 3, H, W), strength (b, 1, 1, 1) in [0, 1] with a random sign where
# the op has two directions, fill (3, 1, 1)) -> same shape. Ranges are RandAugment's (torchvision's at 31 bins):
# enhance factors 1 +- 0.9, rotation 30 degrees, shear 0.3, translation 150/331 of the side, posterize to 4..8 bits,
# solarize above 1 - strength. Equalize is left out (a per-image histogram: slow in batch, and it rarely mattered).
def _signed(m: torch.Tensor) -> torch.Tensor:
    return m * torch.where(torch.rand(m.shape, generator=generator()) < 0.5, -1.0, 1.0)


def _rotate(p, m, fill):
    t = _signed(m.flatten()) * math.radians(30.0)
    z = torch.zeros_like(t)
    return _affine(p, _theta(t.cos(), -t.sin(), t.sin(), t.cos(), z, z), fill)


def _shear(axis):
    def op(p, m, fill):
        s, z, o = _signed(m.flatten()) * 0.3, torch.zeros(len(p)), torch.ones(len(p))
        theta = _theta(o, s, z, o, z, z) if axis == "x" else _theta(o, z, s, o, z, z)
        return _affine(p, theta, fill)
    return op


def _translate(axis):
    def op(p, m, fill):
        t, z, o = _signed(m.flatten()) * 2 * 150 / 331, torch.zeros(len(p)), torch.ones(len(p))  # [-1, 1] coordinates
        return _affine(p, _theta(o, z, z, o, t if axis == "x" else z, t if axis == "y" else z), fill)
    return op


TRIVIAL_OPS = {
    "identity": lambda p, m, fill: p,
    "brightness": lambda p, m, fill: enhance_brightness(p, 1 + 0.9 * _signed(m)),
    "contrast": lambda p, m, fill: enhance_contrast(p, 1 + 0.9 * _signed(m)),
    "colour": lambda p, m, fill: enhance_colour(p, 1 + 0.9 * _signed(m)),
    "sharpness": lambda p, m, fill: _sharpness(p, 1 + 0.9 * _signed(m)),
    "posterize": lambda p, m, fill: _posterize(p, m),
    "solarize": lambda p, m, fill: torch.where(p >= 1 - m, 1 - p, p),
    "autocontrast": lambda p, m, fill: _autocontrast(p),
    "rotate": _rotate,
    "shear_x": _shear("x"), "shear_y": _shear("y"),
    "translate_x": _translate("x"), "translate_y": _translate("y"),
}


def trivial_augment(pixels: torch.Tensor, fill: torch.Tensor | None = None, ops: tuple[str, ...] | None = None
                    ) -> torch.Tensor:
    """(B, 3, H, W) RGB in 0..1 -> same shape: each image gets one op of `ops` (default: every TRIVIAL_OPS entry),
    drawn uniformly, at a strength uniform in [0, 1] (TrivialAugment). fill (3, 1, 1): what geometric ops bring in
    from outside the image (default black, torchvision's; vit_augment passes the data's mean colour)."""
    names = list(TRIVIAL_OPS if ops is None else ops)
    fill = torch.zeros(pixels.shape[1], 1, 1, dtype=pixels.dtype) if fill is None else fill
    which = torch.randint(0, len(names), (len(pixels),), generator=generator())  # (B,) op per image
    strength = torch.rand(len(pixels), 1, 1, 1, generator=generator())  # (B, 1, 1, 1)
    out = pixels.clone()
    for k, name in enumerate(names):
        idx = (which == k).nonzero().flatten()
        if len(idx):
            out[idx] = TRIVIAL_OPS[name](pixels[idx], strength[idx], fill).to(pixels.dtype)
    return out


def hues(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, H, W) RGB -> (hue in [0, 1) (B, H, W), chroma max - min (B, H, W)): HSV's hue, 0 where chroma is 0."""
    r, g, b = pixels.unbind(1)
    top = pixels.amax(1)
    chroma = top - pixels.amin(1)
    c = chroma.clamp_min(1e-12)
    h = torch.where(top == r, ((g - b) / c) % 6, torch.where(top == g, (b - r) / c + 2, (r - g) / c + 4))
    return torch.where(chroma > 0, h / 6, torch.zeros_like(h)), chroma


def with_hue(pixels: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB with each pixel's HSV hue set to `hue` (B, H, W) in [0, 1): value and chroma (so saturation)
    kept, so a blend of a colour with a grey background stays a blend, of the new colour, with the same grey."""
    top = pixels.amax(1, keepdim=True)
    chroma = top - pixels.amin(1, keepdim=True)
    k = (torch.tensor([5.0, 3.0, 1.0], dtype=pixels.dtype)[None, :, None, None] + 6 * hue[:, None]) % 6  # (B, 3, H, W)
    return top - chroma * torch.minimum(k, 4 - k).clamp(0, 1)


def dominant_hue(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, H, W) RGB -> (each image's mean hue on the colour circle, weighted by chroma (B,); whether it has any
    colour at all (B,) bool). Of one coloured thing on a grey, white or black background: the thing's hue."""
    return _dominant(*hues(pixels), pixels.amax())


def _dominant(h: torch.Tensor, chroma: torch.Tensor, brightest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dominant_hue from the pixels' hues and chromas (B, H, W) and the batch's largest value."""
    angle = 2 * math.pi * h
    x, y = (chroma * angle.cos()).flatten(1).sum(1), (chroma * angle.sin()).flatten(1).sum(1)  # (B,)
    return (torch.atan2(y, x) / (2 * math.pi)) % 1, chroma.flatten(1).amax(1) > 1e-3 * brightest.clamp_min(1e-12)


def hue_swap(pixels: torch.Tensor, share: float = 0.5) -> torch.Tensor:
    """(B, 3, H, W) RGB -> same shape: with probability `share` each image's hues turned (HSV, value and chroma kept)
    by what takes its dominant hue to a shuffled partner's, as mixup pairs images. One coloured thing on a grey, white
    or black background (the built-in set) comes back as the same thing in the partner's colour, so every colour meets
    every shape, held-out pairs included; on photos it is a hue shift (ColorJitter's hue) towards another photo's."""
    if share <= 0:
        return pixels
    B = len(pixels)
    partner = torch.randperm(B, generator=generator())
    turn = torch.rand(B, generator=generator()) < share  # (B,)
    h, chroma = hues(pixels)  # (B, H, W) each
    hue, coloured = _dominant(h, chroma, pixels.amax())
    turn &= coloured & coloured[partner]
    if not turn.any():
        return pixels
    shift = (hue[partner] - hue)[turn][:, None, None]  # (b, 1, 1)
    out = pixels.clone()
    out[turn] = with_hue(pixels[turn], (h[turn] + shift) % 1)
    return out


def imagegpt_augment(batch, ctx, given: bool | dict | None = None):
    """ImageGPT's codes -> palette pixels, hue_swap, back to the nearest palette codes."""
    a = settings(IMAGEGPT_AUG, given)
    if a["hue_swap"] <= 0:
        return batch
    palette, side = ctx.data.codebook("pixels").codebook, math.isqrt(ctx.cfg.seq_len)
    pixels = tokens_to_image(palette, batch["tokens"], 1, side, side)  # (B, 3, side, side) in 0..255
    return {**batch, "tokens": image_to_tokens(palette, hue_swap(pixels, a["hue_swap"]), patch=1)}


# What the table (tasks/train/table.py, `augment`) names; the trainer calls them after make_batch when
# TrainConfig.augment is on (True: the defaults; a dict: settings on top of them).
def vit_augment(batch, ctx, given: bool | dict | None = None):
    """Shifts and flips, then (on 0..1 pixels: the batch is normalised with ctx.mean / ctx.std) TrivialAugment and
    colour jitter, then mixup / CutMix (soft targets)."""
    a = settings(VIT_AUG, given)
    image = shift_flip(batch["image"], a["max_shift"], a["flip"])  # (B, 3, H, W), normalised
    if a["trivial"] or a["jitter"] > 0:
        pixels = image * ctx.std + ctx.mean  # 0..1
        if a["trivial"]:
            pixels = trivial_augment(pixels, fill=ctx.mean)
        if a["jitter"] > 0:
            pixels = colour_jitter(pixels, a["jitter"], a["jitter"], a["jitter"])
        image = (pixels - ctx.mean) / ctx.std
    image, label = mix(image, batch["label"], ctx.cfg.n_classes, a["mixup"], a["cutmix"])
    return {**batch, "image": image, "label": label}


# Measured on the built-in set (default ViT with the conv stem, 600 steps, test accuracy): flips 0.95, none 0.90,
# flips + 1-pixel shifts 0.71, flips + 4-pixel shifts 0.70, so shifts are off by default. CLIP gets none: flips would
# contradict captions that say "left" and "right", and shifts cost the ViT accuracy.
# For natural photos (measured; all off, as they are for the figures above): colour jitter (`jitter`: brightness,
# contrast and saturation factors in 1 +- jitter), TrivialAugment (`trivial`), mixup / CutMix (Beta alphas; both on: one
# or the other per batch), and in the model label smoothing and stochastic depth (model_overrides {"vit":
# {"label_smoothing": 0.1, "drop_path": 0.1}}). Default ViT, default budget (600 steps), test accuracy / held-out
# pairs, seed 0 unless noted. Built-in set: none 0.883 / 0.808 (seed 1: 0.755 / 0.689), jitter 0.4 0.935 / 0.868,
# TrivialAugment 0.897 / 0.802, mixup 0.8 0.927 / 0.874, CutMix 1.0 0.277 / 0.000, label smoothing 0.1 0.951 / 0.904
# (seed 1: 0.712 / 0.581), drop path 0.1 0.821 / 0.689, jitter + mixup 0.861 / 0.725 (seed 1: 0.408 / 0.198).
# Photo stand-in (the built-in shapes cut out and pasted on random crops of two photographs, sklearn's china.jpg and
# flower.jpg, with colour casts, blur and noise; logistic regression on pixels 0.18): none 0.543 (seed 1: 0.666),
# jitter 0.291 (seed 1: 0.312), TrivialAugment 0.179, mixup 0.144, CutMix 0.144, label smoothing 0.489 (seed 1: 0.565),
# drop path 0.370; at 1,200 steps none 0.772 (seed 1: 0.649), jitter + mixup + label smoothing 0.845 (seed 1: 0.163, it
# never started learning). Seeds move a run by 0.12, and no setting gained on both sets and both seeds (each slowed
# the stand-in's learning: train loss stayed high), so none is on by default; a run turns them on with
# train_overrides {"vit": {"augment": {"jitter": 0.4, "mixup": 0.8}}}.
VIT_AUG = dict(max_shift=0, flip=True, jitter=0.0, trivial=False, mixup=0.0, cutmix=0.0)
# ImageGPT: hue_swap, the share of training images whose hues are turned to a shuffled partner's. Measured (AMD EPYC,
# 2026-12-03; 1,800 steps, seeds 0 / 1; completions of all 1,399 test images at T 1.0, top-k 8, judged by one default
# run's ViT): none 0.585 / 0.590 (held-out pairs 0.499 / 0.493, seen 0.663 / 0.678), 0.5 0.590 / 0.597 (0.511 /
# 0.519), 1.0 0.608 / 0.600 (0.537 / 0.529, seen 0.672 / 0.665); one coloured thing 0.823 / 0.885 -> 0.896 / 0.865, six
# shapes each; bits/token 0.328 / 0.324 -> 0.341 / 0.342 (the test images' own colours cost a little more once every
# colour goes with every shape). A small CNN trained on top halves: mean probability of the true shape 0.55 -> 0.67
# with the swap (0.69 recoloured by the captions' colour; larger CNNs with shuffled channels: 0.79,
# benchmarks/completion_bound.py).
# On by default for the built-in set alone (table `builtin_train`; 2026-12-03, fourteenth session): on a photo stand-in
# (6,000 random 32 px crops of sklearn's china.jpg and flower.jpg, two classes, 1,200 steps, seed 0, AMD EPYC) the swap
# raised test bits/token 1.66 -> 1.82: a photo's hues mean something (sky, foliage), and swapped ones are not the
# test images'. `train_overrides {"imagegpt": {"augment": {"hue_swap": 1.0}}}` turns it on for other data.
IMAGEGPT_AUG = dict(hue_swap=0.0)
