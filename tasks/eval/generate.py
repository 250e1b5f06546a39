"""Sampling from the generative models: classifier-free guidance for the encoder-decoder, and images out.

    sample_seq2seq(model, src, Sampling)        caption tokens (B, Ls) -> codes (B, tgt_len), guided when scale != 1
    generate_images(model, ctx, captions, ...)  captions -> pixels (N, 3, S, S) 0..255 through the patch codebook
    complete_images(model, ctx, pixels, ...)    ImageGPT: the top rows of each image given, the rest sampled

Classifier-free guidance (Ho & Salimans 2022; Parti, Muse): the model is trained with a fraction of captions replaced
by the empty caption (tasks/train/batches.py T2I_CAPTION_DROPOUT), so one network gives both p(x | caption) and p(x).
At each step the logits are uncond + scale * (cond - uncond): scale 1 is plain conditional sampling, larger scales
push samples towards what the caption tells apart from any image. The conditional and unconditional rows run as one
batch of 2B through the model's public encode/decode, with the decoder's KV cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from models.transformer import sample_logits
from models.vq import image_to_tokens, tokens_to_image
from tasks.train.batches import TOKENIZER, BatchContext


@dataclass(frozen=True)
class Sampling:
    """How codes are drawn: guidance scale (1: none), temperature (0: greedy) and top-k (None: every code)."""

    guidance: float = 1.0
    temperature: float = 1.0
    top_k: int | None = None


# The defaults the evaluations and round trips sample with (measured: README "What the models learn").
T2I_SAMPLING = Sampling(guidance=3.0, temperature=1.0, top_k=32)  # guidance 1 / 3 / 5: colour 0.44 / 0.63 / -
IMAGEGPT_SAMPLING = Sampling(temperature=1.0, top_k=None)
TTS_SAMPLING = Sampling(guidance=1.0, temperature=0.0)  # greedy


@torch.no_grad()
def sample_seq2seq(model, src: torch.Tensor, how: Sampling = Sampling(),
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Token source (B, Ls) -> sampled target codes (B, tgt_len), BOS never drawn (VQ targets: no EOS, no pad)."""
    cfg, B = model.cfg, src.shape[0]
    guided = how.guidance != 1.0
    if guided:  # rows B..2B-1: the empty caption, the unconditional model
        src = torch.cat([src, TOKENIZER.batch_encode([""] * B, src.shape[1]).to(src.device)])  # (2B, Ls)
    memory, mask = model.encode(src)  # (B or 2B, Ls, D)
    cache = model.decoder.new_cache()
    nxt = torch.full((src.shape[0],), cfg.bos_id, dtype=torch.long, device=src.device)  # (B or 2B,)
    out = []
    for _ in range(cfg.tgt_len):
        logits = model.decode(nxt[:, None], memory, mask, cache)[:, -1].float()  # (B or 2B, V)
        if guided:
            cond, uncond = logits[:B], logits[B:]
            logits = uncond + how.guidance * (cond - uncond)  # (B, V)
        logits[:, cfg.bos_id] = float("-inf")
        tok = sample_logits(logits, how.temperature, how.top_k, generator)  # (B,)
        out.append(tok)
        nxt = torch.cat([tok, tok]) if guided else tok
    return torch.stack(out, dim=1)  # (B, tgt_len)


@torch.no_grad()
def generate_images(model, ctx: BatchContext, captions: list[str], how: Sampling = T2I_SAMPLING,
                    generator: torch.Generator | None = None, batch_size: int = 64) -> torch.Tensor:
    """t2i: N captions -> pixels (N, 3, S, S) in 0..255, sampled codes decoded through the image-patch codebook."""
    codes, size = ctx.data.codebook("image"), ctx.data.image_size
    out = []
    for i in range(0, len(captions), batch_size):
        src = TOKENIZER.batch_encode(captions[i : i + batch_size], model.cfg.src_len)  # (b, Ls)
        tokens = sample_seq2seq(model, src, how, generator)  # (b, (S/P)^2)
        out.append(tokens_to_image(codes.codebook, tokens, codes.patch, size, size).clamp(0, 255))
    return torch.cat(out)  # (N, 3, S, S)


def imagegpt_pixels(model, ctx: BatchContext, tokens: torch.Tensor) -> torch.Tensor:
    """ImageGPT codes (N, side^2) -> palette pixels (N, 3, side, side) in 0..255."""
    side = math.isqrt(model.cfg.seq_len)
    return tokens_to_image(ctx.data.codebook("pixels").codebook, tokens, 1, side, side)


@torch.no_grad()
def complete_images(model, ctx: BatchContext, pixels: torch.Tensor, rows: int, how: Sampling = IMAGEGPT_SAMPLING,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """ImageGPT completions: pixels (N, 3, S, S) 0..255, downsampled to the model's side; its first `rows` rows
    given, the rest sampled -> palette pixels (N, 3, side, side)."""
    side = math.isqrt(model.cfg.seq_len)
    small = torch.nn.functional.interpolate(pixels, size=(side, side), mode="area")  # (N, 3, side, side)
    prompt = image_to_tokens(ctx.data.codebook("pixels").codebook, small, patch=1)[:, : rows * side]  # (N, rows*side)
    tokens = model.generate(len(pixels), how.temperature, how.top_k, prompt=prompt, generator=generator)
    return imagegpt_pixels(model, ctx, tokens)
