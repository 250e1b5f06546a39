"""The one transformer core every model is built from (pre-LayerNorm, as in ViT, GPT-2 and Whisper).

    z'_l = MSA(LN(z_{l-1})) + z_{l-1}          Block: self-attention sublayer
    z''_l = CrossAttn(LN(z'_l), memory) + z'_l   Block: cross-attention sublayer (decoders only)
    z_l  = MLP(LN(z''_l)) + z''_l              Block: feed-forward sublayer
    y    = LN(z_L)                              Transformer.ln_f

Stochastic depth (Huang et al. 2016; DeiT's drop_path): while training, each sublayer's residual branch is dropped
for a whole sample with probability p_l (the survivors scaled by 1 / (1 - p_l)), p_l rising linearly from 0 at the
first block to `drop_path` at the last. At drop_path=0 and in eval mode it is the identity and draws nothing.

Attention runs through F.scaled_dot_product_attention (flash / memory-efficient kernels where the device has
them). An encoder stack is `Transformer(causal=False)`, a decoder-only stack `Transformer(causal=True)` and an
encoder-decoder's decoder `Transformer(causal=True, cross=True)`. `KVCache` holds past keys/values for
incremental decoding. Shapes: B batch, T query length, S key length, D width, nh heads, hs = D / nh.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.rng import Dropout, generator


class KVCache:
    """Keys/values of past decoding steps, one pair of dicts per block.

    layers[i]["self"]:  {"k", "v"} each (B, nh, T_past, hs); grows by the new positions at every call.
    layers[i]["cross"]: {"k", "v"} each (B, nh, S, hs); the memory's keys/values, computed at the first call.
    """

    def __init__(self, n_layers: int):
        self.layers: list[dict[str, dict[str, torch.Tensor]]] = [{"self": {}, "cross": {}} for _ in range(n_layers)]

    def __len__(self) -> int:
        """Number of positions already cached (the position offset of the next call)."""
        kv = self.layers[0]["self"] if self.layers else {}
        return kv["k"].shape[2] if "k" in kv else 0


class Attention(nn.Module):
    """Multi-head attention: self-attention when `context` is None, cross-attention to `context` otherwise.

    `dropout` applies to the output projection (residual dropout), not to the attention probabilities (as timm's
    default attn_drop=0): SDPA with dropout_p > 0 leaves its fused CPU kernel, and a default ImageGPT training step
    measured 0.70 s instead of 0.19 s (0.22 s with residual dropout only) on one core here."""

    def __init__(self, dim: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim={dim} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.resid_drop = Dropout(dropout)

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        B, T, D = t.shape
        return t.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2)  # (B, nh, T, hs)

    def forward(self, x, context=None, key_mask=None, causal=False, cache=None):
        """x: (B, T, D) -> (B, T, D).

        context:  (B, S, D) memory for cross-attention; None for self-attention (S = T_past + T).
        key_mask: (B, S) bool, True for real keys, False for padding (never attended to).
        causal:   query t sees keys <= t, offset by the cached length when decoding step by step.
        cache:    a dict; self-attention appends this call's k/v to it, cross-attention fills it once and reuses it.
        """
        B, T, D = x.shape
        q = self._split_heads(self.q(x))  # (B, nh, T, hs)
        if context is not None and cache is not None and "k" in cache:
            k, v = cache["k"], cache["v"]  # (B, nh, S, hs), memory K/V from the first step
        else:
            k, v = self.kv(x if context is None else context).split(D, dim=-1)  # (B, S, D) each
            k, v = self._split_heads(k), self._split_heads(v)  # (B, nh, S, hs)
            if cache is not None:
                if context is None and "k" in cache:
                    k = torch.cat([cache["k"], k], dim=2)  # (B, nh, T_past + T, hs)
                    v = torch.cat([cache["v"], v], dim=2)
                cache["k"], cache["v"] = k, v
        S = k.shape[2]
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, S)
        is_causal = False
        if causal and T > 1:
            if S == T and mask is None:
                is_causal = True  # lets SDPA pick its causal kernels
            else:
                tri = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)  # (T, S)
                mask = tri if mask is None else mask & tri  # (B, 1, T, S)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, D)  # (B, T, D), heads concatenated
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: Linear(D, H) -> GELU -> Linear(H, D). (B, T, D) -> (B, T, D)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc = nn.Linear(dim, hidden)
        self.proj = nn.Linear(hidden, dim)
        self.drop = Dropout(dropout)

    def forward(self, x):
        return self.drop(self.proj(F.gelu(self.fc(x))))


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """A residual branch (B, ...) -> same shape: each sample's branch zeroed with probability p and the rest scaled
    by 1 / (1 - p) while training; x itself at p=0 or in eval mode."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *(1,) * (x.ndim - 1)).bernoulli_(1 - p, generator=generator(x.device))  # (B, 1, 1)
    return x * keep / (1 - p)


class Block(nn.Module):
    """One pre-LN transformer layer; `cross=True` adds a cross-attention sublayer between the two."""

    def __init__(self, dim: int, n_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0, cross: bool = False,
                 drop_path: float = 0.0):
        super().__init__()
        self.drop_path = drop_path  # stochastic depth: the probability of dropping a sublayer for a sample
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, n_heads, dropout)
        self.ln_x = nn.LayerNorm(dim) if cross else None
        self.cross_attn = Attention(dim, n_heads, dropout) if cross else None
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(mlp_ratio * dim), dropout)

    def forward(self, x, key_mask=None, causal=False, memory=None, memory_mask=None, cache=None):
        """x: (B, T, D) -> (B, T, D); memory: (B, S, D) for cross-attention; cache: one KVCache.layers entry."""
        self_cache, cross_cache = (None, None) if cache is None else (cache["self"], cache["cross"])
        # z'_l = MSA(LN(z_{l-1})) + z_{l-1}
        p = self.drop_path
        x = x + drop_path(self.attn(self.ln_1(x), key_mask=key_mask, causal=causal, cache=self_cache), p, self.training)
        if self.cross_attn is not None:
            x = x + drop_path(self.cross_attn(self.ln_x(x), memory, memory_mask, cache=cross_cache), p, self.training)
        return x + drop_path(self.mlp(self.ln_2(x)), p, self.training)  # z_l = MLP(LN(z'_l)) + z'_l


class Transformer(nn.Module):
    """A stack of `depth` Blocks and the final LayerNorm. (B, T, D) -> (B, T, D).

    causal=False: encoder (bidirectional, optional key padding mask).
    causal=True:  decoder (each position sees itself and the past); cross=True adds cross-attention to `memory`.
    drop_path: stochastic depth at the last block, linearly less below it (0 at the first, as DeiT).
    """

    def __init__(self, dim, depth, n_heads, mlp_ratio=4.0, dropout=0.0, causal=False, cross=False, drop_path=0.0):
        super().__init__()
        self.dim, self.depth, self.mlp_hidden, self.causal, self.cross = dim, depth, int(mlp_ratio * dim), causal, cross
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # 0 ... drop_path
        self.blocks = nn.ModuleList(Block(dim, n_heads, mlp_ratio, dropout, cross, p) for p in rates)
        self.ln_f = nn.LayerNorm(dim)

    def forward(self, x, key_mask=None, memory=None, memory_mask=None, cache: KVCache | None = None):
        """x: (B, T, D); key_mask: (B, T_past + T) bool; memory: (B, S, D); memory_mask: (B, S) bool."""
        for i, block in enumerate(self.blocks):
            x = block(x, key_mask, self.causal, memory, memory_mask, None if cache is None else cache.layers[i])
        return self.ln_f(x)

    def new_cache(self) -> KVCache:
        return KVCache(self.depth)

    def flops(self, T: int, S: int = 0) -> int:
        """Forward FLOPs of the stack for one sequence of T tokens (S memory tokens for cross-attention).

        Counting 2 FLOPs per multiply-add in matmuls only (LayerNorm, softmax, GELU and biases are ignored), and
        attention over the full T x S score matrix (no causal discount, as nanoGPT and PaLM count it):
            per layer, self-attention: q,k,v,o projections 2*T*4*D^2, scores Q K^T 2*T*T*D, weighted sum A V 2*T*T*D
            per layer, MLP:            2*T*2*D*H
            per layer, cross-attention (cross=True): q,o on T 2*T*2*D^2, k,v on S 2*S*2*D^2, QK^T and AV 4*T*S*D
        The projection and MLP terms are 2*N_layer*T (N_layer = weights of the layer): the "2N per token" of 6*N*T.
        """
        D, H = self.dim, self.mlp_hidden
        per_layer = 2 * T * 4 * D * D + 4 * T * T * D + 2 * T * 2 * D * H
        if self.cross:
            per_layer += 2 * T * 2 * D * D + 2 * S * 2 * D * D + 4 * T * S * D
        return self.depth * per_layer


def init_weights(module: nn.Module) -> None:
    """GPT-2 / ViT style init: N(0, 0.02) for Linear and Embedding weights, zero biases (apply with model.apply)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def sample_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, generator=None):
    """Pick the next token from logits (B, V) -> (B,) long. temperature=0: greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)
