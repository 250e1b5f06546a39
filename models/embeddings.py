"""Input embeddings: patches (ViT, AST), learned 2D positional tables that resize, sinusoidal positions.

ViT's z0 = [x_class; E x_1; ...; E x_m] + E_pos with E in R^{(P^2 C) x D} and E_pos in R^{(m+1) x D}:
`PatchEmbed` computes E x_i for every P x P patch (a strided convolution is exactly a shared linear map of the
flattened patch), `ViTEncoder` (vit.py) prepends x_class and adds E_pos, resized by `resize_pos_embed` when the
input grid differs from the one the table was learned on.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class PatchEmbed(nn.Module):
    """P x P patches -> D-dim tokens. (B, C, H, W) -> (B, N, D), N = gh * gw in raster order (row by row).

    stride = patch: non-overlapping patches (ViT). stride < patch: overlapping patches, AST's (fstride, tstride)
    over a spectrogram laid out as (B, 1, n_mels, n_frames), i.e. H = frequency, W = time.
    """

    def __init__(self, in_chans: int, dim: int, patch, stride=None):
        super().__init__()
        self.patch = _pair(patch)
        self.stride = self.patch if stride is None else _pair(stride)
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=self.patch, stride=self.stride)  # weight (D, C, P, P) = E

    def grid(self, h: int, w: int) -> tuple[int, int]:
        """Number of patch rows and columns for an H x W input."""
        if h < self.patch[0] or w < self.patch[1]:
            raise ValueError(f"input {h}x{w} is smaller than the {self.patch[0]}x{self.patch[1]} patch")
        return (h - self.patch[0]) // self.stride[0] + 1, (w - self.patch[1]) // self.stride[1] + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, D, gh, gw)
        return x.flatten(2).transpose(1, 2)  # (B, gh*gw, D)

    def flops(self, h: int, w: int) -> int:
        """Forward FLOPs for one H x W input: 2 * (P*P*C) * D per patch."""
        gh, gw = self.grid(h, w)
        return 2 * self.proj.weight[0].numel() * self.proj.out_channels * gh * gw


class ConvStem(nn.Module):
    """A convolutional stem in place of the patchify layer (Xiao et al. 2021, "Early convolutions help
    transformers see better"): log2(P) 3x3 stride-2 convolutions (GroupNorm, GELU) then a 1x1 projection to D.

    Same interface as PatchEmbed: (B, C, H, W) -> (B, gh*gw, D) with the grid of a P x P patchify for H, W divisible
    by P. It gives the transformer a locality prior that a small dataset cannot teach it, for ~20% more FLOPs on
    the default ViT.
    """

    def __init__(self, in_chans: int, dim: int, patch: int, widths: tuple[int, ...] | None = None):
        super().__init__()
        n = int(math.log2(patch))
        if patch < 2 or 2 ** n != patch:
            raise ValueError(f"a conv stem needs a power-of-two patch size >= 2, got {patch}; use stem='patch'")
        self.patch = (patch, patch)
        widths = widths or tuple(min(dim, max(32, dim >> (n - 1 - i))) for i in range(n))  # e.g. D=128, P=8: 32,64,128
        layers, c = [], in_chans
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, stride=2, padding=1, bias=False), nn.GroupNorm(min(8, w), w), nn.GELU()]
            c = w
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Conv2d(c, dim, kernel_size=1)

    def grid(self, h: int, w: int) -> tuple[int, int]:
        if h < self.patch[0] or w < self.patch[1]:
            raise ValueError(f"input {h}x{w} is smaller than the {self.patch[0]}x{self.patch[1]} patch")
        return -(-h // self.patch[0]), -(-w // self.patch[1])  # each stride-2, pad-1 conv gives ceil(h / 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.convs(x))  # (B, D, gh, gw)
        return x.flatten(2).transpose(1, 2)  # (B, gh*gw, D)

    def flops(self, h: int, w: int) -> int:
        """Forward FLOPs for one H x W input: 2 * (k*k*C_in) * C_out per output position of each convolution."""
        total = 0
        for m in [*self.convs, self.proj]:
            if isinstance(m, nn.Conv2d):
                h, w = (h + 2 * m.padding[0] - m.kernel_size[0]) // m.stride[0] + 1, \
                       (w + 2 * m.padding[1] - m.kernel_size[1]) // m.stride[1] + 1
                total += 2 * m.weight[0].numel() * m.out_channels * h * w
        return total


def resize_pos_embed(pos: torch.Tensor, old_grid, new_grid, n_prefix: int = 1, mode: str = "bicubic") -> torch.Tensor:
    """Resample a learned positional table to another patch grid (timm / DeiT recipe).

    pos: (1, n_prefix + gh*gw, D) -> (1, n_prefix + nh*nw, D). Prefix rows (the CLS position) are kept as they are;
    the grid part is reshaped to its 2D layout and interpolated (bicubic or bilinear, align_corners=False).
    """
    (gh, gw), (nh, nw) = _pair(old_grid), _pair(new_grid)
    if (gh, gw) == (nh, nw):
        return pos
    prefix, grid = pos[:, :n_prefix], pos[:, n_prefix:]  # (1, n_prefix, D), (1, gh*gw, D)
    D = grid.shape[-1]
    grid = grid.reshape(1, gh, gw, D).permute(0, 3, 1, 2)  # (1, D, gh, gw)
    grid = F.interpolate(grid.float(), size=(nh, nw), mode=mode, align_corners=False).to(pos.dtype)  # (1, D, nh, nw)
    grid = grid.permute(0, 2, 3, 1).reshape(1, nh * nw, D)  # (1, nh*nw, D)
    return torch.cat([prefix, grid], dim=1)


def sinusoidal(n_pos: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    """Fixed positional encodings (Vaswani et al.): PE[p, 2i] = sin(p / base^(2i/D)), PE[p, 2i+1] = cos(...).

    Returns (n_pos, dim) float32.
    """
    if dim % 2:
        raise ValueError(f"sinusoidal positions need an even dim, got {dim}")
    pos = torch.arange(n_pos, dtype=torch.float32)[:, None]  # (n_pos, 1)
    inv_freq = torch.exp(-math.log(base) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # (D/2,)
    angles = pos * inv_freq  # (n_pos, D/2)
    return torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(n_pos, dim)  # (n_pos, D), sin/cos interleaved


def raster_side(length: int, what: str) -> int:
    """The side of a square raster of `length` codes; a length that is not a square is refused, naming `what`."""
    side = math.isqrt(length)
    if side * side != length:
        raise ValueError(f"{what} needs a square raster of codes; {length} is not a square")
    return side


class RowAbove(nn.Module):
    """The codes of the row above, for a raster of `width` codes generated one at a time: the input at position i
    (which predicts code i) gets the embeddings of the codes above-left, above and above-right of code i (PixelCNN's
    causal stencil), so a small model sees its vertical neighbours without learning a jump of `width` positions.
    Codes outside the raster (first row, first and last column) read a learned `outside` row of each table.

    (codes (B, T) known so far, first position p, n positions) -> (B, n, D) for positions p .. p+n-1 (all < T+1).
    """

    OFFSETS = (-1, 0, 1)

    def __init__(self, vocab: int, dim: int, width: int, length: int):
        super().__init__()
        self.vocab = vocab
        self.tables = nn.ModuleList(nn.Embedding(vocab + 1, dim) for _ in self.OFFSETS)  # + the outside code
        pos = torch.arange(length)
        row, col = pos // width, pos % width
        off = torch.tensor(self.OFFSETS)
        idx = pos[:, None] - width + off  # (L, 3): the code above i, and either side of it
        outside = (row[:, None] == 0) | ((col[:, None] + off) % width != col[:, None] + off)  # first row, or past an edge
        self.register_buffer("index", idx.masked_fill(outside, -1), persistent=False)  # (L, 3), -1: outside

    def forward(self, codes: torch.Tensor, first: int, n: int) -> torch.Tensor:
        idx = self.index[first : first + n]  # (n, 3)
        ext = F.pad(codes, (0, 1), value=self.vocab)  # (B, T + 1): index -1 reads the outside code
        got = ext[:, idx]  # (B, n, 3)
        return sum(table(got[..., j]) for j, table in enumerate(self.tables))  # (B, n, D)
