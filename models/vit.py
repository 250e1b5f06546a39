"""Vision Transformer (Dosovitskiy et al. 2020) for image classification.

    z0   = [x_class; E x_1; ...; E x_m] + E_pos       E in R^{(P^2 C) x D}, E_pos in R^{(m+1) x D}
    z'_l = MSA(LN(z_{l-1})) + z_{l-1}                 l = 1..L
    z_l  = MLP(LN(z'_l)) + z'_l
    y    = LN(z_L^0)                                  the CLS token alone represents the image

`ViTEncoder` is the trunk (also AST's and CLIP's image/audio towers); `ViT` adds the classification head.
Default config (32x32 RGB, patch 4 -> 64 patches, D=192, 6 layers, 3 heads, 10 classes): 2,693,578 parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.embeddings import ConvStem, PatchEmbed, _pair, resize_pos_embed
from models.rng import Dropout
from models.transformer import Transformer, init_weights


@dataclass(frozen=True)
class ViTConfig:
    img_size: int = 32  # square input, pixels
    patch_size: int = 4
    in_chans: int = 3
    n_classes: int = 10
    dim: int = 192
    depth: int = 6
    n_heads: int = 3
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    stem: str = "patch"  # "patch": one linear map per patch (ViT); "conv": a convolutional stem (Xiao et al. 2021)
    drop_path: float = 0.0  # stochastic depth at the last block (models/transformer.py), as DeiT
    label_smoothing: float = 0.0  # of the training loss's targets (Szegedy et al. 2016); evaluation loss is plain CE


class ViTEncoder(nn.Module):
    """The ViT trunk: (B, C, H, W) -> (B, 1 + N, D), final LayerNorm applied, token 0 = CLS.

    in_size is the (H, W) the positional table is learned for; other sizes get it resized (bicubic) on the fly.
    stride < patch gives overlapping patches (AST). stem="conv" replaces the patchify layer with ConvStem.
    drop_path: stochastic depth of the stack (models/transformer.py).
    """

    def __init__(self, in_chans, in_size, patch, stride, dim, depth, n_heads, mlp_ratio=4.0, dropout=0.0,
                 stem="patch", drop_path=0.0):
        super().__init__()
        if stem not in ("patch", "conv"):
            raise ValueError(f"unknown stem {stem!r}; use 'patch' or 'conv'")
        if stem == "conv" and stride is not None and _pair(stride) != _pair(patch):
            raise ValueError("a conv stem has no overlapping patches; use stem='patch' with a stride")
        self.patch_embed = ConvStem(in_chans, dim, patch) if stem == "conv" else PatchEmbed(in_chans, dim, patch, stride)
        self.grid = self.patch_embed.grid(*in_size)  # (gh, gw) of the learned table
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)  # x_class
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + self.grid[0] * self.grid[1], dim) * 0.02)  # E_pos
        self.drop = Dropout(dropout)
        self.transformer = Transformer(dim, depth, n_heads, mlp_ratio, dropout, drop_path=drop_path)
        self.transformer.apply(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        e = self.patch_embed(x)  # (B, m, D): E x_1 ... E x_m
        pos = resize_pos_embed(self.pos_embed, self.grid, self.patch_embed.grid(H, W))  # (1, 1 + m, D)
        z0 = torch.cat([self.cls_token.expand(B, -1, -1), e], dim=1) + pos  # (B, 1 + m, D)
        return self.transformer(self.drop(z0))  # (B, 1 + m, D); [:, 0] is y = LN(z_L^0)

    def flops(self, h: int, w: int) -> int:
        """Forward FLOPs for one (h, w) input: patch embedding + the stack over 1 + m tokens."""
        gh, gw = self.patch_embed.grid(h, w)
        return self.patch_embed.flops(h, w) + self.transformer.flops(1 + gh * gw)


class ViT(nn.Module):
    """Image classifier: {"image": (B, 3, H, W) normalised, "label": (B,) long or (B, n_classes) class probabilities
    (mixup, cutmix)} -> (logits (B, n_classes), loss)."""

    def __init__(self, cfg: ViTConfig = ViTConfig()):
        super().__init__()
        self.cfg = cfg
        self.encoder = ViTEncoder(cfg.in_chans, (cfg.img_size, cfg.img_size), cfg.patch_size, None,
                                  cfg.dim, cfg.depth, cfg.n_heads, cfg.mlp_ratio, cfg.dropout, cfg.stem, cfg.drop_path)
        self.head = nn.Linear(cfg.dim, cfg.n_classes)
        init_weights(self.head)

    def forward_features(self, image: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1 + m, D) token features after the final LayerNorm."""
        return self.encoder(image)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, 1 + m, D) -> logits (B, n_classes), or y = LN(z_L^0) (B, D) when pre_logits."""
        y = features[:, 0]  # (B, D)
        return y if pre_logits else self.head(y)

    def forward(self, batch: dict[str, torch.Tensor]):
        logits = self.forward_head(self.forward_features(batch["image"]))
        smooth = self.cfg.label_smoothing if self.training else 0.0
        loss = F.cross_entropy(logits, batch["label"], label_smoothing=smooth) if "label" in batch else None
        return logits, loss

    def flops_per_sample(self, train: bool = True, img_size: int | None = None) -> int:
        """Matmul FLOPs for one image (forward x3 when train: backward costs twice the forward)."""
        s = img_size or self.cfg.img_size
        fwd = self.encoder.flops(s, s) + 2 * self.cfg.dim * self.cfg.n_classes
        return 3 * fwd if train else fwd
