"""Text-to-speech's alignment: the monotonic alignment search, the prior and share terms it trains, Gaussian
upsampling in byte order and the reference voice."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from models.tts import TTS, monotonic_alignment
from tests.tiny_models import TOK, _one_thread, build, make_batch  # noqa: F401 (fixture)


def test_monotonic_alignment_finds_each_bytes_frames():
    """Frames that are noisy copies of their byte's mean, bytes over 2, 6, 3, 5, 4 frames then silence: the search
    returns exactly that path (-1 past the speech); a clip with more bytes than frames gets no path."""
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(2, 7, 8, generator=g) * 3  # (B, Ls, n_mels) each byte's mean
    truth = torch.tensor([i for i, d in enumerate([2, 6, 3, 5, 4]) for _ in range(d)])  # (20,)
    frames = torch.zeros(2, 24, 8)
    frames[:, :20] = mu[:, truth] + 0.3 * torch.randn(2, 20, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]]).bool()
    path = monotonic_alignment(-torch.cdist(mu, frames, p=1), mask, torch.tensor([20, 5]))
    assert path[0].tolist() == truth.tolist() + [-1] * 4
    assert (path[1] == -1).all()  # 7 bytes cannot be spoken in 5 frames


def test_tts_learns_its_alignment_from_the_search():
    """align="mas": the loss adds the prior and share terms, and 30 optimiser steps bring that term down (the prior
    head fits the bytes' frames, the share head the searched path); align="soft" has no prior head; an unknown align is
    a clear error."""
    model, cfg = build("tts")
    g = torch.Generator().manual_seed(0)
    src = TOK.batch_encode(["a red", "blue"], cfg.src_len)  # fewer bytes than the 16 speech frames
    mel = torch.full((2, cfg.n_mels, cfg.n_frames), -3.0)  # silence after 16 frames
    mel[:, :, :16] = torch.randn(2, cfg.n_mels, 4, generator=g).repeat_interleave(4, -1)  # 4 sounds of 4 frames
    batch = {"src": src, "mel": mel}

    def align_loss():
        memory, mask, _, share = model.encode(batch["src"], mel)
        shares, loss = model.aligned_shares(memory, mask, share, mel, model.speech_length(mel))
        assert torch.allclose(shares.sum(-1), torch.ones(2))
        return loss

    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = align_loss().item()
    for _ in range(30):
        opt.zero_grad()
        model(batch)[1].backward()
        opt.step()
    assert first > 0 and align_loss().item() < 0.7 * first
    assert TTS(replace(cfg, align="soft")).prior is None
    with pytest.raises(ValueError, match="align"):
        TTS(replace(cfg, align="hard"))


def test_tts_lays_the_bytes_out_in_order_and_speaks_in_the_reference_voice():
    """Gaussian upsampling at equal shares: the byte each query mixes most moves forward with time, from the first
    bytes to the last. The speech length is the frame after the last loud one. A different reference voice changes the
    generated spectrogram; generating without one is a clear error."""
    model, cfg = build("tts")
    batch = make_batch(cfg, B=2)
    memory, mask, _, share = model.encode(batch["src"], batch["mel"])
    assert torch.allclose(share.sum(-1), torch.ones(2)) and (share[~mask] == 0).all()
    torch.testing.assert_close(model.speech_length(batch["mel"]), torch.tensor([12.0, 13.0]))  # silent from 12, 13
    n = int(mask[0].sum())
    eye = torch.eye(memory.shape[1])[None].expand(1, -1, -1)  # memory = one-hot byte index: the mix is the weights
    w = model.upsample(eye, mask[:1], torch.full((1, memory.shape[1]), 1.0 / n) * mask[:1], torch.tensor([24.0]))
    nearest = w[0].argmax(-1)  # (n_q,) the byte each query is made of most: queries every 4 of 24 frames, bytes
    assert torch.allclose(w.sum(-1), torch.ones(1, 6))  # every 24 / n frames, so the first query sits on byte 1
    assert nearest[0] <= 1 and nearest[-1] >= n - 2 and (nearest.diff() > 0).all()
    with torch.no_grad():
        a = model.generate(batch["src"], batch["mel"])
        b = model.generate(batch["src"], batch["mel"].flip(0))
    assert a.shape == (2, cfg.n_mels, cfg.n_frames) and not torch.allclose(a, b)
    with pytest.raises(ValueError, match="reference voice"):
        model.generate(batch["src"])
