"""Audio Spectrogram Transformer (Gong, Chung and Glass 2021): a ViT over log-mel patches.

The spectrogram (B, n_mels, n_frames) is read as a one-channel image with H = frequency and W = time, split into
P x P patches with strides (fstride, tstride) (overlapping when a stride is below P, as in the paper's 10/6
overlap), embedded, and classified from the CLS token: y = LN(z_L^0), exactly ViT's equations.
Default config (128 mel x 128 frames, patch 16, stride 16 -> 8x8 = 64 patches, D=192, 6 layers, 3 heads,
10 classes): 2,733,514 parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.transformer import init_weights
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
    stem: str = "patch"  # "patch" (the paper's linear patch embedding) or "conv" (vit.py; needs strides = patch)


class AST(nn.Module):
    """Audio classifier: {"mel": (B, n_mels, n_frames) normalised, "label": (B,)} -> (logits (B, n_classes), loss)."""

    def __init__(self, cfg: ASTConfig = ASTConfig()):
        super().__init__()
        self.cfg = cfg
        self.encoder = ViTEncoder(1, (cfg.n_mels, cfg.n_frames), cfg.patch_size, (cfg.fstride, cfg.tstride),
                                  cfg.dim, cfg.depth, cfg.n_heads, cfg.mlp_ratio, cfg.dropout, cfg.stem)
        self.head = nn.Linear(cfg.dim, cfg.n_classes)
        init_weights(self.head)

    def forward_features(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, n_mels, n_frames) -> (B, 1 + m, D); another n_frames gets the positional table resized."""
        return self.encoder(mel.unsqueeze(1))  # (B, 1, n_mels, n_frames) in, (B, 1 + m, D) out

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, 1 + m, D) -> logits (B, n_classes), or y = LN(z_L^0) (B, D) when pre_logits."""
        y = features[:, 0]  # (B, D)
        return y if pre_logits else self.head(y)

    def forward(self, batch: dict[str, torch.Tensor]):
        logits = self.forward_head(self.forward_features(batch["mel"]))
        loss = F.cross_entropy(logits, batch["label"]) if "label" in batch else None
        return logits, loss

    def flops_per_sample(self, train: bool = True) -> int:
        """Matmul FLOPs for one spectrogram (forward x3 when train)."""
        fwd = self.encoder.flops(self.cfg.n_mels, self.cfg.n_frames) + 2 * self.cfg.dim * self.cfg.n_classes
        return 3 * fwd if train else fwd
