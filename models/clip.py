"""CLIP (Radford et al. 2021): image and text encoders trained so matching pairs land close in one space.

Training: a batch of N (image, text) pairs -> normalised embeddings I (N, E) and T (N, E) -> logits = s * I T^T
with a learnable temperature s = exp(logit_scale) (initialised to 1/0.07, clamped at 100); the loss is the
symmetric cross-entropy with the matching pair as the target along both rows and columns.
Zero-shot: embed "a photo of a {class}" prompts, average the normalised embeddings over templates (CLIP's prompt
ensemble), and classify by cosine similarity. With tower="audio" the other encoder is an AST over log-mel (CLAP).
The text tower is a transformer over byte tokens pooled at the last non-pad token (EOS; tokenizer.py).
Default config (image tower ViT D=192 x 6 over 32x32/4; text D=128 x 4, 64 bytes; E=128): 3,567,297 parameters
(3,607,233 with tower="audio", an AST over 128x128 mel in 16x16 patches).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.tokenizer import PAD_ID, VOCAB_SIZE
from models.transformer import Transformer, init_weights
from models.vit import ViTEncoder


@dataclass(frozen=True)
class CLIPConfig:
    embed_dim: int = 128  # the shared space
    tower: str = "image"  # "image": ViT over (B, 3, H, W); "audio": AST over (B, n_mels, n_frames)
    img_size: int = 32
    patch_size: int = 4
    vision_stem: str = "patch"  # the image tower's stem: "patch" or "conv" (see vit.py)
    n_mels: int = 128
    n_frames: int = 128
    mel_patch: int = 16
    fstride: int = 16
    tstride: int = 16
    vision_dim: int = 192  # width/depth/heads of the image or audio tower
    vision_depth: int = 6
    vision_heads: int = 3
    vocab_size: int = VOCAB_SIZE
    context_len: int = 64  # text tokens
    text_dim: int = 128
    text_depth: int = 4
    text_heads: int = 4
    text_causal: bool = True  # CLIP's text tower is causal; False: bidirectional with a padding mask
    mlp_ratio: float = 4.0
    dropout: float = 0.0


class CLIP(nn.Module):
    """batch {"image" or "mel": ..., "text": (B, Ls) long} -> (logits_per_image (B, B), symmetric contrastive loss)."""

    def __init__(self, cfg: CLIPConfig = CLIPConfig()):
        super().__init__()
        self.cfg = cfg
        if cfg.tower == "image":
            self.visual = ViTEncoder(3, (cfg.img_size, cfg.img_size), cfg.patch_size, None, cfg.vision_dim,
                                     cfg.vision_depth, cfg.vision_heads, cfg.mlp_ratio, cfg.dropout, cfg.vision_stem)
        elif cfg.tower == "audio":
            self.visual = ViTEncoder(1, (cfg.n_mels, cfg.n_frames), cfg.mel_patch, (cfg.fstride, cfg.tstride),
                                     cfg.vision_dim, cfg.vision_depth, cfg.vision_heads, cfg.mlp_ratio, cfg.dropout)
        else:
            raise ValueError(f"tower={cfg.tower!r}: expected 'image' or 'audio'")
        self.visual_proj = nn.Linear(cfg.vision_dim, cfg.embed_dim, bias=False)
        self.token_emb = nn.Embedding(cfg.vocab_size, cfg.text_dim)
        self.text_pos = nn.Parameter(torch.zeros(cfg.context_len, cfg.text_dim))  # (Ls, D)
        self.text = Transformer(cfg.text_dim, cfg.text_depth, cfg.text_heads, cfg.mlp_ratio, cfg.dropout,
                                causal=cfg.text_causal)
        self.text_proj = nn.Linear(cfg.text_dim, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        for m in (self.visual_proj, self.token_emb, self.text, self.text_proj):
            m.apply(init_weights)
        nn.init.normal_(self.text_pos, std=0.01)

    def _tower(self, x: torch.Tensor, normalize: bool) -> torch.Tensor:
        y = self.visual(x)[:, 0]  # (B, D), y = LN(z_L^0)
        z = self.visual_proj(y)  # (B, E)
        return F.normalize(z, dim=-1) if normalize else z

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, 3, H, W) normalised -> (B, E)."""
        if self.cfg.tower != "image":
            raise ValueError("this CLIP has an audio tower: call encode_audio")
        return self._tower(image, normalize)

    def encode_audio(self, mel: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, n_mels, n_frames) normalised log-mel -> (B, E)."""
        if self.cfg.tower != "audio":
            raise ValueError("this CLIP has an image tower: call encode_image")
        return self._tower(mel.unsqueeze(1), normalize)  # (B, 1, n_mels, n_frames) in

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, Ls) byte tokens, right-padded with PAD -> (B, E), pooled at the last non-pad token (EOS)."""
        real = text != PAD_ID  # (B, Ls)
        x = self.token_emb(text) + self.text_pos[: text.shape[1]]  # (B, Ls, D)
        x = self.text(x, key_mask=None if self.cfg.text_causal else real)  # (B, Ls, D); causal: pads come last
        last = (real.sum(dim=1) - 1).clamp(min=0)  # (B,)
        z = self.text_proj(x[torch.arange(x.shape[0], device=x.device), last])  # (B, E)
        return F.normalize(z, dim=-1) if normalize else z

    def _encode_other(self, batch) -> torch.Tensor:
        return self.encode_image(batch["image"], True) if "image" in batch else self.encode_audio(batch["mel"], True)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=100.0)

    def forward(self, batch: dict[str, torch.Tensor]):
        img = self._encode_other(batch)  # (B, E)
        txt = self.encode_text(batch["text"], normalize=True)  # (B, E)
        logits_per_image = self.scale() * img @ txt.T  # (B, B); row i: image i against every text
        target = torch.arange(img.shape[0], device=img.device)
        loss = (F.cross_entropy(logits_per_image, target) + F.cross_entropy(logits_per_image.T, target)) / 2
        return logits_per_image, loss

    @torch.no_grad()
    def zero_shot_classifier(self, class_names: list[str], templates: list[str], tokenizer) -> torch.Tensor:
        """Class weights (E, n_classes): each column the re-normalised mean of the normalised text embeddings of
        `template.format(name)` over the templates (CLIP's prompt ensemble)."""
        device = self.text_pos.device
        cols = []
        for name in class_names:
            text = tokenizer.batch_encode([t.format(name) for t in templates], self.cfg.context_len).to(device)
            cols.append(F.normalize(self.encode_text(text, normalize=True).mean(dim=0), dim=-1))  # (E,)
        return torch.stack(cols, dim=1)  # (E, n_classes)

    @torch.no_grad()
    def zero_shot_logits(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) or mels (B, n_mels, n_frames) and classifier weights (E, C) -> logits (B, C)."""
        z = self.encode_image(x, True) if self.cfg.tower == "image" else self.encode_audio(x, True)
        return self.scale() * z @ weights

    def flops_per_sample(self, train: bool = True) -> int:
        """Matmul FLOPs for one pair: both towers, the projections, and this sample's row of the B x B logits is
        left out (it grows with the batch and is negligible at these sizes). x3 when train."""
        c = self.cfg
        h, w = (c.img_size, c.img_size) if c.tower == "image" else (c.n_mels, c.n_frames)
        fwd = self.visual.flops(h, w) + 2 * c.vision_dim * c.embed_dim
        fwd += self.text.flops(c.context_len) + 2 * c.text_dim * c.embed_dim
        return 3 * fwd if train else fwd
