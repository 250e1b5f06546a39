"""Audio Spectrogram Transformer (Gong, Chung and Glass 2021): a ViT over log-mel patches.

The spectrogram (B, n_mels, n_frames) is read as a one-channel image with H = frequency and W = time, split into
P x P patches with strides (fstride, tstride) (overlapping when a stride is below P, as in the paper's 10/6
overlap), embedded, and classified from the CLS token: y = LN(z_L^0), exactly ViT's equations.
Default config (128 mel x 128 frames, patch 16, stride 16 -> 8x8 = 64 patches, D=192, 6 layers, 3 heads,
10 classes): 2,733,514 parameters. n_frames is the data's clip window (stats.json), so the positional table follows it.

A clip longer than the window is classified from all its windows: the batch holds every window (W, n_mels, n_frames)
and clip_of (W,), the index of the clip each window belongs to; the logits are averaged over a clip's windows (the same
softmax as averaging log-probabilities: each window's normaliser is one constant per window). Which windows and the
training crops: tasks/train/batches.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.rng import Dropout
from models.seq2seq import MelStem
from models.transformer import Transformer, init_weights
from models.vit import ViTEncoder


@dataclass(frozen=True)
class ASTConfig:
    n_mels: int = 128
    n_frames: int = 128
    patch_size: int = 16
    fstride: int = 16  # frequency stride; < patch_size for overlapping patches (AST uses 10)
    tstride: int = 16  # time stride
    n_classes: int = 10
    dim: int = 192
    depth: int = 6
    n_heads: int = 3
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    # "patch" (the paper's linear patch embedding), "conv" (vit.py; needs strides = patch) or "frames": Whisper's mel
    # stem (models/seq2seq.py MelStem), one token per 2 frames over every mel band (patch_size and strides unused)
    stem: str = "patch"
    pool: str = "cls"  # "cls" (the paper: y = LN(z_L^0)) or "mean" of the final patch tokens (fsdd4: 0.58 vs 0.68)


def average_windows(logits: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    """Window logits (W, C) and clip (W,) in 0..B-1 -> the mean over each clip's windows (B, C)."""
    n = int(clip.max()) + 1
    total = logits.new_zeros(n, logits.shape[1]).index_add_(0, clip, logits)  # (B, C)
    count = torch.bincount(clip, minlength=n).clamp_min(1).to(logits.dtype)  # (B,)
    return total / count[:, None]


class FramesEncoder(nn.Module):
    """stem="frames": (B, 1, n_mels, T) -> (B, 1 + ceil(T / 2), D), token 0 = CLS, final LayerNorm applied: Whisper's
    stem (two 3-wide convolutions over time, every mel band a channel, the second with stride 2), a learned positional
    table, then the same Transformer stack as ViTEncoder."""

    def __init__(self, n_mels: int, n_frames: int, dim: int, depth: int, n_heads: int, mlp_ratio: float = 4.0,
                 dropout: float = 0.0):
        super().__init__()
        self.stem = MelStem(n_mels, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + (n_frames + 1) // 2, dim) * 0.02)
        self.drop = Dropout(dropout)
        self.transformer = Transformer(dim, depth, n_heads, mlp_ratio, dropout)
        self.transformer.apply(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.stem(x.squeeze(1))  # (B, S, D)
        if e.shape[1] + 1 > self.pos_embed.shape[1]:
            raise ValueError(f"{x.shape[-1]} frames is longer than the {2 * (self.pos_embed.shape[1] - 1)} configured")
        z0 = torch.cat([self.cls_token.expand(len(e), -1, -1), e], dim=1) + self.pos_embed[:, : e.shape[1] + 1]
        return self.transformer(self.drop(z0))

    def flops(self, h: int, w: int) -> int:
        """Forward FLOPs for one (n_mels=h, frames=w) input: the two convolutions + the stack over 1 + S tokens."""
        S, D = (w + 1) // 2, self.cls_token.shape[-1]
        return 2 * 3 * h * D * w + 2 * 3 * D * D * S + self.transformer.flops(1 + S)


class AST(nn.Module):
    """Audio classifier: {"mel": (B, n_mels, n_frames) normalised, "label": (B,)} -> (logits (B, n_classes), loss).
    With "clip_of" (W,), mel holds W windows of B clips and the logits are averaged per clip (B, n_classes)."""

    def __init__(self, cfg: ASTConfig = ASTConfig()):
        super().__init__()
        if cfg.pool not in ("cls", "mean"):
            raise ValueError(f"ASTConfig.pool={cfg.pool!r}: use 'cls' or 'mean'")
        self.cfg = cfg
        if cfg.stem == "frames":
            self.encoder = FramesEncoder(cfg.n_mels, cfg.n_frames, cfg.dim, cfg.depth, cfg.n_heads, cfg.mlp_ratio,
                                         cfg.dropout)
        else:
            self.encoder = ViTEncoder(1, (cfg.n_mels, cfg.n_frames), cfg.patch_size, (cfg.fstride, cfg.tstride),
                                      cfg.dim, cfg.depth, cfg.n_heads, cfg.mlp_ratio, cfg.dropout, cfg.stem)
        self.head = nn.Linear(cfg.dim, cfg.n_classes)
        init_weights(self.head)

    def forward_features(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, n_mels, n_frames) -> (B, 1 + m, D); another n_frames gets the positional table resized."""
        return self.encoder(mel.unsqueeze(1))  # (B, 1, n_mels, n_frames) in, (B, 1 + m, D) out

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, 1 + m, D) -> logits (B, n_classes), or y (B, D) when pre_logits: LN(z_L^0) (pool "cls") or the mean
        of the m patch tokens (pool "mean")."""
        y = features[:, 1:].mean(1) if self.cfg.pool == "mean" else features[:, 0]  # (B, D)
        return y if pre_logits else self.head(y)

    def forward(self, batch: dict[str, torch.Tensor]):
        logits = self.forward_head(self.forward_features(batch["mel"]))  # (W, n_classes)
        if "clip_of" in batch:
            logits = average_windows(logits, batch["clip_of"])  # (B, n_classes)
        loss = F.cross_entropy(logits, batch["label"]) if "label" in batch else None
        return logits, loss

    def flops_per_sample(self, train: bool = True) -> int:
        """Matmul FLOPs for one spectrogram (forward x3 when train)."""
        fwd = self.encoder.flops(self.cfg.n_mels, self.cfg.n_frames) + 2 * self.cfg.dim * self.cfg.n_classes
        return 3 * fwd if train else fwd
