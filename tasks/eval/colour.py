"""The colour judge: which palette colour an image is drawn in, by pixel statistics (no model).

    foreground_counts: per image, how many pixels are nearest each palette colour (the backgrounds' are not counted)
    dominant_colour:   the colour most foreground pixels are nearest to, or None when it covers too little
    colour_purity:     that colour's share of the foreground: one coloured thing (1) or scattered pixels (low)
    builtin_palette:   the vocabulary's colours as the built-in set draws them, and its backgrounds
"""

from __future__ import annotations

import torch

from tasks.data.builtin.synthetic import BACKGROUNDS
from tasks.data.builtin.vocab import COLOURS, Vocabulary


MIN_FOREGROUND = 0.02  # a foreground colour must cover at least this share of the image to be named


def foreground_counts(pixels: torch.Tensor, palette: dict[str, tuple[int, int, int]],
                      backgrounds: list[tuple[int, int, int]]) -> torch.Tensor:
    """Pixels (N, 3, H, W) in 0..255 -> (N, C): per image, how many pixels are nearest each palette colour (RGB
    distance, among the palette and the backgrounds; the ones nearest a background are background). Anti-aliased
    edges blend a colour with its background and mostly fall to either, not to a third colour."""
    refs = torch.tensor([palette[n] for n in palette] + list(backgrounds), dtype=torch.float32)  # (C + G, 3)
    flat = pixels.float().flatten(2).transpose(1, 2)  # (N, H*W, 3)
    nearest = torch.cdist(flat, refs.expand(len(flat), -1, -1)).argmin(-1)  # (N, H*W)
    return torch.stack([(nearest == i).sum(-1) for i in range(len(palette))], dim=1)  # (N, C)


def dominant_colour(pixels: torch.Tensor, palette: dict[str, tuple[int, int, int]],
                    backgrounds: list[tuple[int, int, int]], min_share: float = MIN_FOREGROUND) -> list[str | None]:
    """The colour an image is drawn in, by pixel statistics: pixels (N, 3, H, W) in 0..255 -> per image the palette
    name most of its foreground pixels are nearest to (foreground_counts), or None when that colour covers under
    min_share of the image."""
    names = list(palette)
    best, idx = foreground_counts(pixels, palette, backgrounds).max(-1)  # (N,)
    enough = best >= min_share * pixels.shape[-1] * pixels.shape[-2]
    return [names[i] if ok else None for i, ok in zip(idx.tolist(), enough.tolist())]


def colour_purity(pixels: torch.Tensor, palette: dict[str, tuple[int, int, int]],
                  backgrounds: list[tuple[int, int, int]]) -> list[float]:
    """Pixels (N, 3, H, W) -> per image the dominant colour's share of its foreground pixels (0 with none): 1 for one
    shape in one colour, low for scattered pixels of many colours."""
    counts = foreground_counts(pixels, palette, backgrounds).float()  # (N, C)
    return (counts.max(-1).values / counts.sum(-1).clamp_min(1)).tolist()


def builtin_palette(vocab: Vocabulary) -> tuple[dict[str, tuple[int, int, int]], list[tuple[int, int, int]]]:
    """The vocabulary's colours with the built-in set's RGB values, and its backgrounds."""
    palette = {c: COLOURS[c] for c in vocab.colours if c in COLOURS}
    if len(palette) < len(vocab.colours):
        raise ValueError(f"no RGB value for colours {sorted(set(vocab.colours) - set(palette))}: the colour judge "
                         "knows the built-in set's palette (tasks/data/builtin/vocab.py COLOURS)")
    return palette, list(BACKGROUNDS.values())
