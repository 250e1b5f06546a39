"""Train-time augmentation on collated batches, the anchors' recipes at the built-in data's scale.

- images (ViT, DeiT/timm): random translation (replicate-pad, random crop back) and horizontal flips; colour
  jitter (brightness, contrast, saturation, as torchvision's ColorJitter), a TrivialAugment policy (Muller and Hutter
  2021: one op of RandAugment's, at a uniform random strength, per image), mixup and CutMix (Yun et al. 2019) with
  soft targets; the model adds label smoothing and stochastic depth (models/vit.py). Which are on: VIT_AUG and the ViT's
  entry in tasks/train/table.py. CLIP gets the translation only, since its captions name left and right;
- log-mels (AST, as in its Speech Commands recipe): a random gain per clip (the recording level) and a noise floor
  under some clips (the room and microphone), both on by default (AST_AUG); SpecAugment frequency and time masks (Park
  et al. 2019) and mixup (Zhang et al. 2018) with soft targets, which `F.cross_entropy` takes as class probabilities;
  random time and mel-axis shifts, a vocal-tract-length warp and a tempo stretch (speed_warp) are off: measured worse;
- the speech recogniser's log-mel source: the same gain and noise floor (on), the warp and stretch, and SpecAugment, as
  Park et al. introduced it for speech recognition (off by default, see ASR_AUG).

A run sets these with TrainConfig.augment: True the defaults below, a dict some of them (`settings`), False none.
Every draw comes from torch's global RNG, which the trainer checkpoints (tasks/infra/checkpoint.py `rng_state`), so a
resumed run augments exactly as the uninterrupted one. Generative models get no augmentation: their targets are the
inputs (the speech recogniser's target is text, so its spectrogram is augmented). The trainer applies the model's
augmentation when `TrainConfig.augment` is on (the model table's `augment`).
"""

from __future__ import annotations

import math

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


def grey(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB -> (B, 1, H, W) luma (ITU-R 601, as PIL's "L" and torchvision's rgb_to_grayscale)."""
    return (0.299 * pixels[:, 0] + 0.587 * pixels[:, 1] + 0.114 * pixels[:, 2])[:, None]


def _factors(n: int, strength: float) -> torch.Tensor:
    """(n, 1, 1, 1) factors uniform in [max(0, 1 - strength), 1 + strength]."""
    lo = max(0.0, 1.0 - strength)
    return (lo + torch.rand(n) * (1.0 + strength - lo))[:, None, None, None]


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
    return m * torch.where(torch.rand_like(m) < 0.5, -1.0, 1.0)


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
    which = torch.randint(0, len(names), (len(pixels),))  # (B,) op per image
    strength = torch.rand(len(pixels), 1, 1, 1)  # (B, 1, 1, 1)
    out = pixels.clone()
    for k, name in enumerate(names):
        idx = (which == k).nonzero().flatten()
        if len(idx):
            out[idx] = TRIVIAL_OPS[name](pixels[idx], strength[idx], fill).to(pixels.dtype)
    return out


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


def slaney_mel(hz: torch.Tensor) -> torch.Tensor:
    """Hz -> the Slaney mel scale the features use (tasks/data/features.py): linear below 1 kHz, log above."""
    log_step = math.log(6.4) / 27.0
    return torch.where(hz < 1000, hz * 3 / 200, 15 + torch.log(hz.clamp(min=1e-6) / 1000) / log_step)


def slaney_hz(mel: torch.Tensor) -> torch.Tensor:
    """slaney_mel's inverse."""
    log_step = math.log(6.4) / 27.0
    return torch.where(mel < 15, mel * 200 / 3, 1000 * torch.exp((mel - 15) * log_step))


def warp_mel(mel: torch.Tensor, warp: torch.Tensor, stretch: torch.Tensor, sample_rate: int, f_min: float = 0.0
             ) -> torch.Tensor:
    """(B, n_mels, n_frames) log-mel, factors (B,) -> same shape: clip i with every frequency scaled by warp[i] (the
    content at f moves to warp x f, through the bands' centre frequencies on the Slaney mel scale) and time by
    stretch[i] (frame t comes from t / stretch), about the start, by linear interpolation; what would come from
    beyond the clip or the top band repeats the edge."""
    B, F_, T = mel.shape
    top = slaney_mel(torch.tensor(sample_rate / 2.0, dtype=torch.float64))
    low = slaney_mel(torch.tensor(float(f_min), dtype=torch.float64))
    centres = slaney_hz(low + (top - low) * torch.arange(1, F_ + 1, dtype=torch.float64) / (F_ + 1))  # (F,) Hz
    warp, stretch = warp.to(torch.float64)[:, None], stretch.to(torch.float64)[:, None]  # (B, 1)
    src_bin = (slaney_mel(centres[None, :] / warp) - low) / (top - low) * (F_ + 1) - 1  # (B, F) fractional bins
    src_frame = torch.arange(T, dtype=torch.float64)[None, :] / stretch  # (B, T)
    grid = torch.stack(torch.broadcast_tensors(
        (src_frame / max(T - 1, 1) * 2 - 1)[:, None, :],  # x: time
        (src_bin / max(F_ - 1, 1) * 2 - 1)[:, :, None]), -1)  # y: band -> (B, F, T, 2)
    out = F.grid_sample(mel[:, None], grid.to(mel.dtype), mode="bilinear", padding_mode="border",
                        align_corners=True)
    return out[:, 0]


def speed_warp(mel: torch.Tensor, max_warp: float, max_stretch: float, sample_rate: int, f_min: float = 0.0
               ) -> torch.Tensor:
    """warp_mel with factors uniform in 1 +- max_warp (vocal-tract-length perturbation, Jaitly and Hinton 2013: a
    shorter or longer vocal tract scales the formants) and 1 +- max_stretch (the tempo half of Kaldi's speed
    perturbation), one pair per clip."""
    if max_warp <= 0 and max_stretch <= 0:
        return mel
    warp, stretch = 1 + (torch.rand(2, len(mel), dtype=torch.float64) * 2 - 1) * torch.tensor(
        [[max_warp], [max_stretch]], dtype=torch.float64)
    return warp_mel(mel, warp, stretch, sample_rate, f_min)


def noise_floor(mel: torch.Tensor, drop: tuple[float, float], std: float, p: float = 0.5) -> torch.Tensor:
    """(B, n_mels, n_frames) normalised log-mel -> same shape, a share p of the clips with flat (white) noise added in
    power under them: its level is the clip's loudest bin minus a drop uniform in `drop` (in units of the data's
    log-mel std, `std` nats each), added as power (log-add-exp), so quiet bins rise to the floor and loud ones stay:
    recordings differ in background noise and room as much as in level."""
    lo, hi = drop
    if p <= 0:
        return mel
    B = len(mel)
    level = mel.amax((1, 2), keepdim=True) - (lo + torch.rand(B, 1, 1, dtype=mel.dtype) * (hi - lo))  # (B, 1, 1)
    noisy = torch.logaddexp(mel * std, level * std) / std
    return torch.where((torch.rand(B) < p)[:, None, None], noisy, mel)


def random_gain(mel: torch.Tensor, max_offset: float) -> torch.Tensor:
    """(B, n_mels, n_frames) normalised log-mel -> same shape, each clip moved by one offset uniform in
    [-max_offset, max_offset]: in log power a recording's level (microphone, distance, speaker) is an added constant,
    here in units of the data's log-mel std, so an offset d is a gain of d x std nats of power."""
    if max_offset <= 0:
        return mel
    return mel + (torch.rand(len(mel), 1, 1, dtype=mel.dtype) * 2 - 1) * max_offset


def mixup(x: torch.Tensor, labels: torch.Tensor, n_classes: int, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend each sample with a shuffled partner: x' = lam x + (1 - lam) x[perm], targets likewise (B, n_classes).

    lam ~ Beta(alpha, alpha), one per batch as in the reference implementation."""
    target = F.one_hot(labels, n_classes).float()
    if alpha <= 0:
        return x, target
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(len(x))
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
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    side = math.sqrt(1 - lam)
    h, w = int(H * side), int(W * side)
    cy, cx = torch.randint(0, H, ()).item(), torch.randint(0, W, ()).item()
    y0, y1, x0, x1 = max(cy - h // 2, 0), min(cy + h // 2, H), max(cx - w // 2, 0), min(cx + w // 2, W)
    perm = torch.randperm(B)
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
    if cutmix_alpha > 0 and (mixup_alpha <= 0 or torch.rand(()) < 0.5):
        return cutmix(x, labels, n_classes, cutmix_alpha)
    return mixup(x, labels, n_classes, mixup_alpha)


# ---------------------------------------------------------------------------------------------------- per model
def settings(defaults: dict, given: bool | dict | None = None) -> dict:
    """TrainConfig.augment -> what a run augments with: the model's defaults (VIT_AUG, AST_AUG, ASR_AUG) with a dict's
    entries on top (`train_overrides {"asr": {"augment": {"freq_mask": 16}}}`); an unknown entry is a ValueError."""
    extra = given if isinstance(given, dict) else {}
    if unknown := sorted(set(extra) - set(defaults)):
        raise ValueError(f"unknown augment setting(s) {unknown}: this model's are {defaults} (its defaults)")
    return {**defaults, **extra}


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


FLOOR_DROP = (1.5, 3.5)  # noise_floor's level under the clip's loudest bin, in std units of the data's log-mel


def speaker_and_room(mel: torch.Tensor, a: dict, ctx) -> torch.Tensor:
    """What both speech models share: the speed warp, the noise floor and the gain of settings `a`, in that order;
    the features' sample rate, lowest frequency and log-mel std come from the prepared data's stats (ctx.data)."""
    if a["warp"] > 0 or a["stretch"] > 0:
        feat = ctx.data.modality("audio")["mel"]
        mel = speed_warp(mel, a["warp"], a["stretch"], int(feat["sample_rate"]), float(feat.get("f_min", 0.0)))
    if a["floor"] > 0:
        mel = noise_floor(mel, FLOOR_DROP, float(ctx.data.modality("audio")["std"]), a["floor"])
    return random_gain(mel, a["gain"])


def asr_augment(batch, ctx, given: bool | dict | None = None):
    a = settings(ASR_AUG, given)
    src = speaker_and_room(batch["src"], a, ctx)
    return {**batch, "src": spec_augment(src, freq_mask=a["freq_mask"], time_mask=a["time_mask"])}


def ast_augment(batch, ctx, given: bool | dict | None = None):
    a = settings(AST_AUG, given)
    mel = time_shift(batch["mel"], a["time_shift"])
    mel = speaker_and_room(freq_shift(mel, a["freq_shift"]), a, ctx)
    mel = spec_augment(mel, freq_mask=a["freq_mask"], time_mask=a["time_mask"])
    mel, target = mixup(mel, batch["label"], ctx.cfg.n_classes, a["mixup"])
    return {**batch, "mel": mel, "label": target}


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
# Speech recognition's SpecAugment masks, test word accuracy (transcript exactly right): spoken digits of a speaker
# never heard in training (fsdd4, theo held out, default model and budget, 449 steps) 0.91 without, 0.93 with 16 bins
# / 8 frames; 10 takes a speaker and digit (272 train clips, 340 steps) 0.48 without, 0.66 with 8 / 4, 0.77 with
# 16 / 8. The built-in set at its 250 steps: CER 0.026 without, 0.075 with 8 / 4, 0.204 with 16 / 8 (the masks slow a
# short run down), so they are off by default.
# A random gain of +-0.5 std per clip (`gain`, on): built-in CER 0.026 -> 0.019; fsdd4, nicolas held out (the speaker no
# model reached the baseline on; LR 0.42), word accuracy 0.21 -> 0.38, with the masks 16 / 8 as well 0.44. So the recipe
# for real speech is train_overrides {"asr": {"augment": {"freq_mask": 16, "time_mask": 8}}}.
# A noise floor under a quarter of the clips (`floor`, noise_floor: flat noise 1.5-3.5 std under the clip's loudest bin,
# on by default), measured on an Intel AMX machine (2026-12-02; the gain-only default there: built-in CER 0.034; fsdd4
# each speaker held out, CER jackson 0.316, nicolas 0.602, theo 0.076, yweweler 0.102): floor 0.25 built-in 0.028,
# 0.324 / 0.382 / 0.077 / 0.113 (mean 0.274 -> 0.224); floor 0.5 built-in 0.069 (slows the 250-step run), 0.300 /
# 0.341 / 0.088 / 0.117. Vocal-tract-length warp +-10% (`warp`) jackson 0.302, nicolas 0.570; with a +-10% tempo
# stretch (`stretch`) 0.283 / 0.680: off.
ASR_AUG = dict(gain=0.5, warp=0.0, stretch=0.0, floor=0.25, freq_mask=0, time_mask=0)
# AST (before the gain, with the masks on): fsdd4, theo held out, conv stem, 717 steps, test
# accuracy without augmentation 0.68 / 0.71 (seeds 0 / 1); time shifts of up to 8 frames 0.56, mel shifts of up to 4
# bins 0.64, of 8 bins 0.54, both 0.56, both + masks of 8 bins and 8 frames 0.61: so the shifts stay at 0.
# A random gain per clip (`gain`: an offset uniform in +-0.5 std of the data's log-mel; the four fsdd4 speakers were
# recorded at levels 8x apart in RMS) is on by default, the masks off: fsdd4, frames stem, default budget (713-717
# steps), each speaker held out in turn (LR 0.50 / 0.42 / 0.614 / 0.624), without -> with the gain: jackson 0.774 ->
# 0.774, nicolas 0.36 -> 0.636, theo 0.834 -> 0.888, yweweler 0.868 -> 0.93; built-in set 1.0 -> 1.0. Gain +-1.0:
# jackson 0.784, nicolas 0.594. On nicolas: +-0.5 with mixup 0.2 0.646, mixup 0.2 alone 0.542; dropout 0.1 (no gain)
# 0.276; each band's mean over the clip removed (cepstral mean normalisation, a model change) 0.216.
# A noise floor under half the clips (`floor`, noise_floor; on by default), measured on an Intel AMX machine
# (2026-12-02), each speaker held out (jackson, nicolas, theo, yweweler), seed 0: the gain alone 0.790 / 0.634 / 0.864 /
# 0.828 (seed 1: 0.794 / 0.712 / 0.910 / 0.822) -> floor 0.5 0.804 / 0.684 / 0.880 / 0.858 (seed 1: 0.846 / 0.720 /
# 0.862 / 0.912); built-in set 1.0 -> 1.0. Also measured there (seed 0): mixup 0.2 0.772 / 0.692 / 0.900 / 0.922,
# with the floor 0.780 / 0.754 / 0.932 / 0.860; a tempo stretch of +-10% (`stretch`) 0.824 / 0.580 / 0.866 / 0.940
# (seed 1: 0.792 / 0.470 / - / -). Jackson / nicolas only: a vocal-tract-length warp of +-10% (`warp`, speed_warp)
# 0.784 / 0.508, of +-15% 0.744 / 0.484; warp and stretch +-10% 0.824 / 0.604; mel shifts of 2 bins 0.832 / 0.616, of
# 4 bins 0.788 / 0.442; time shifts of 4 frames 0.796 / 0.504; lr 2e-3 0.768 / 0.346; weight decay 0.2 0.786 / 0.626.
# Nicolas moves by 0.08 between seeds, so one run says little.
AST_AUG = dict(time_shift=0, freq_shift=0.0, warp=0.0, stretch=0.0, floor=0.5, gain=0.5, freq_mask=0, time_mask=0,
               mixup=0.0)

DEFAULTS = {vit_augment: VIT_AUG, ast_augment: AST_AUG, asr_augment: ASR_AUG}  # each model augmentation's settings
