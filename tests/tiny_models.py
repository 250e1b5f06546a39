"""Tiny configs (D=32, 2 layers) of every model, and batches with exactly the keys the data loaders produce for
each: shared by the model test modules, which import `_one_thread` to run on one intra-op thread."""

from __future__ import annotations

import pytest
import torch

from models import (
    AST,
    CLIP,
    ASTConfig,
    ByteTokenizer,
    CLIPConfig,
    ImageGPT,
    ImageGPTConfig,
    Seq2Seq,
    Seq2SeqConfig,
    ViT,
    ViTConfig,
    audio_to_text_config,
    text_to_image_config,
)
from models.tts import TTS, TTSConfig


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these tensors are tiny, and on a shared two-core machine OpenMP threads that spin
    while another process holds a core made these tests 30x slower (0.7 s -> 23 s for one overfit run)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


TOK = ByteTokenizer()
SMALL = dict(dim=32, n_heads=2)
S2S = dict(SMALL, enc_depth=2, dec_depth=2)
CLIP_SMALL = dict(embed_dim=16, vision_dim=32, vision_depth=2, vision_heads=2, context_len=24, text_dim=32,
                  text_depth=2, text_heads=2)

# name -> (model class, tiny config)
TINY = {
    "vit": (ViT, ViTConfig(img_size=16, patch_size=4, n_classes=5, depth=2, **SMALL)),
    "ast": (AST, ASTConfig(n_mels=32, n_frames=40, patch_size=8, fstride=6, tstride=6, n_classes=5, depth=2, **SMALL)),
    "imagegpt": (ImageGPT, ImageGPTConfig(vocab_size=16, seq_len=24, depth=2, **SMALL)),
    "imagegpt_cond": (ImageGPT, ImageGPTConfig(vocab_size=16, seq_len=24, n_classes=3, depth=2, **SMALL)),
    "imagegpt_above": (ImageGPT, ImageGPTConfig(vocab_size=16, seq_len=25, row_above=True, depth=2, **SMALL)),
    "audio_to_text": (Seq2Seq, audio_to_text_config(n_mels=16, n_frames=24, tgt_len=20, **S2S)),
    "text_to_image": (Seq2Seq, text_to_image_config(n_codes=16, n_tokens=12, src_len=24, **S2S)),
    "text_to_image_grid": (Seq2Seq, text_to_image_config(n_codes=16, n_tokens=12, src_len=24, tgt_grid=4, **S2S)),
    "text_to_image_above": (Seq2Seq, text_to_image_config(n_codes=16, n_tokens=16, src_len=24, tgt_row_above=True,
                                                          **S2S)),
    "tts": (TTS, TTSConfig(n_mels=16, n_frames=24, src_len=24, voice_dim=4, align="mas", **S2S)),
    "clip": (CLIP, CLIPConfig(img_size=16, patch_size=4, **CLIP_SMALL)),
    "clip_bidir": (CLIP, CLIPConfig(img_size=16, patch_size=4, text_causal=False, **CLIP_SMALL)),
    "clap": (CLIP, CLIPConfig(tower="audio", n_mels=32, n_frames=32, mel_patch=8, fstride=8, tstride=8, **CLIP_SMALL)),
}
CAPTIONS = ["a red circle", "a small blue square", "green", "a big yellow triangle on grey"]


def make_batch(cfg, B: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A synthetic batch with exactly the keys the data loaders produce for this config."""
    g = torch.Generator().manual_seed(seed)
    if isinstance(cfg, ViTConfig):
        return {"image": torch.randn(B, 3, cfg.img_size, cfg.img_size, generator=g),
                "label": torch.randint(0, cfg.n_classes, (B,), generator=g)}
    if isinstance(cfg, ASTConfig):
        return {"mel": torch.randn(B, cfg.n_mels, cfg.n_frames, generator=g),
                "label": torch.randint(0, cfg.n_classes, (B,), generator=g)}
    if isinstance(cfg, ImageGPTConfig):
        batch = {"tokens": torch.randint(0, cfg.vocab_size, (B, cfg.seq_len), generator=g)}
        if cfg.n_classes:
            batch["label"] = torch.randint(0, cfg.n_classes, (B,), generator=g)
        return batch
    if isinstance(cfg, Seq2SeqConfig):
        if cfg.src_kind == "mel":
            src = torch.randn(B, cfg.n_mels, cfg.n_frames, generator=g)
        else:
            src = TOK.batch_encode((CAPTIONS * B)[:B], cfg.src_len)
        if cfg.pad_id >= 0:  # byte targets, EOS-terminated and padded
            tgt = TOK.batch_encode((CAPTIONS[::-1] * B)[:B], cfg.tgt_len)
        else:  # VQ codes: every position is a real token
            tgt = torch.randint(0, cfg.bos_id, (B, cfg.tgt_len), generator=g)
        return {"src": src, "tgt": tgt}
    if isinstance(cfg, TTSConfig):
        # sounds of 4 frames each (a byte's mean frame can fit them: models/tts.py `prior`)
        mel = torch.randn(B, cfg.n_mels, cfg.n_frames // 4, generator=g).repeat_interleave(4, -1)
        for b in range(B):  # each clip ends in silence, a frame later than the one before
            mel[b, :, cfg.n_frames // 2 + b:] = -3.0
        return {"src": TOK.batch_encode((CAPTIONS * B)[:B], cfg.src_len), "mel": mel}
    if isinstance(cfg, CLIPConfig):
        text = TOK.batch_encode((CAPTIONS * B)[:B], cfg.context_len)
        if cfg.tower == "audio":
            return {"mel": torch.randn(B, cfg.n_mels, cfg.n_frames, generator=g), "text": text}
        return {"image": torch.randn(B, 3, cfg.img_size, cfg.img_size, generator=g), "text": text}
    raise TypeError(cfg)


def build(name: str, seed: int = 0):
    cls, cfg = TINY[name]
    torch.manual_seed(seed)
    return cls(cfg).eval(), cfg
