"""ImageGPT (Chen et al. 2020): a decoder-only causal transformer over VQ tokens in raster order.

An image is a sequence of L codebook indices (a colour palette per pixel, or a patch codebook); the model learns
p(x) = prod_i p(x_i | x_<i) with fixed sinusoidal positions. The sequence fed in is [start, x_0, ..., x_{L-2}] and
the logits at position i predict x_i, so the first token is predicted too. `start` is a learned start-of-image
embedding, or the embedding of the class label for class-conditional models (unconditional when no label is given).
Default config (512 colours, 32x32 = 1024 tokens, D=128, 6 layers, 4 heads, unconditional): 1,321,088 parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.embeddings import RowAbove, raster_side, sinusoidal
from models.rng import Dropout
from models.transformer import KVCache, Transformer, init_weights, sample_logits


@dataclass(frozen=True)
class ImageGPTConfig:
    vocab_size: int = 512  # VQ codes
    seq_len: int = 1024  # tokens per image (32 x 32 pixels)
    n_classes: int = 0  # > 0: class-conditional (the label's embedding is the start token)
    dim: int = 128
    depth: int = 6
    n_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    # each input also embeds the codes above-left, above and above-right of the one it predicts (a square raster;
    # models/embeddings.py RowAbove): the vertical neighbours without a jump of a whole row in attention
    row_above: bool = False


class ImageGPT(nn.Module):
    """batch {"tokens": (B, L) long, optional "label": (B,) long} -> (logits (B, L, vocab_size), next-token loss)."""

    def __init__(self, cfg: ImageGPTConfig = ImageGPTConfig()):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.start = nn.Parameter(torch.zeros(1, 1, cfg.dim))  # start-of-image token
        self.class_emb = nn.Embedding(cfg.n_classes, cfg.dim) if cfg.n_classes else None
        self.above = (RowAbove(cfg.vocab_size, cfg.dim, raster_side(cfg.seq_len, "row_above"), cfg.seq_len)
                      if cfg.row_above else None)
        self.register_buffer("pos", sinusoidal(cfg.seq_len, cfg.dim), persistent=False)  # (L, D)
        self.drop = Dropout(cfg.dropout)
        self.transformer = Transformer(cfg.dim, cfg.depth, cfg.n_heads, cfg.mlp_ratio, cfg.dropout, causal=True)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.apply(init_weights)
        nn.init.normal_(self.start, std=0.02)

    def _start(self, B: int, label: torch.Tensor | None) -> torch.Tensor:
        """The first input embedding: (B, 1, D)."""
        if label is not None and self.class_emb is not None:
            return self.class_emb(label)[:, None]  # (B, 1, D)
        return self.start.expand(B, -1, -1)  # (B, 1, D)

    def _step(self, x: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """Embedded inputs (B, T, D) at positions len(cache) .. len(cache)+T-1 -> logits (B, T, V)."""
        t0 = 0 if cache is None else len(cache)
        x = self.drop(x + self.pos[t0 : t0 + x.shape[1]])  # (B, T, D)
        return self.head(self.transformer(x, cache=cache))  # (B, T, V)

    def forward(self, batch: dict[str, torch.Tensor]):
        tokens = batch["tokens"]  # (B, L)
        B, L = tokens.shape
        if L > self.cfg.seq_len:
            raise ValueError(f"{L} tokens do not fit seq_len={self.cfg.seq_len}")
        x = torch.cat([self._start(B, batch.get("label")), self.tok_emb(tokens[:, :-1])], dim=1)  # (B, L, D)
        logits = self._step(self._with_above(x, tokens, 0), None)  # (B, L, V); logits[:, i] predicts tokens[:, i]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten())  # over (B*L, V)
        return logits, loss

    @torch.no_grad()
    def generate(self, n: int, temperature: float = 1.0, top_k: int | None = None, label=None, prompt=None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample n images -> (n, seq_len) tokens, one token per step with the KV cache.

        label: (n,) long for class-conditional models; prompt: (n, P) tokens to complete (ImageGPT's completions).
        temperature=0 is greedy decoding.
        """
        device = self.pos.device
        label = None if label is None else label.to(device)
        tokens = torch.zeros(n, 0, dtype=torch.long, device=device) if prompt is None else prompt.to(device)
        if tokens.shape[1] >= self.cfg.seq_len:
            return tokens[:, : self.cfg.seq_len]
        x = self._with_above(torch.cat([self._start(n, label), self.tok_emb(tokens)], dim=1), tokens, 0)  # (n, 1+P, D)
        cache = self.transformer.new_cache()
        while True:
            logits = self._step(x, cache)[:, -1]  # (n, V)
            nxt = sample_logits(logits, temperature, top_k, generator)  # (n,)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)  # (n, t + 1)
            if tokens.shape[1] == self.cfg.seq_len:
                return tokens
            x = self._with_above(self.tok_emb(nxt)[:, None], tokens, tokens.shape[1])  # (n, 1, D) for position t + 1

    def _with_above(self, x: torch.Tensor, tokens: torch.Tensor, first: int) -> torch.Tensor:
        """Inputs (B, T, D) for positions first .. first+T-1, plus the codes above each (row_above), from `tokens`."""
        return x if self.above is None else x + self.above(tokens, first, x.shape[1])

    def flops_per_sample(self, train: bool = True) -> int:
        """Matmul FLOPs for one image of seq_len tokens: the causal stack + the output head (x3 when train)."""
        L, D = self.cfg.seq_len, self.cfg.dim
        fwd = self.transformer.flops(L) + 2 * L * D * self.cfg.vocab_size
        return 3 * fwd if train else fwd
