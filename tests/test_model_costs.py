"""What the models cost: FLOPs counted by hand and by torch, torch.compile forward and backward, and the parameter
counts each model file states."""

from __future__ import annotations

import re
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from models import AST, CLIP, CLIPConfig, ImageGPT, Seq2Seq, ViT, ViTConfig
from tests.tiny_models import _one_thread, build, make_batch  # noqa: F401 (fixture)


def test_flops_hand_count():
    """ViT, 8x8x3 image, patch 4 -> m = 4 patches, T = 5 tokens, D = 8, 1 layer, MLP H = 32, 2 classes.

    patch embedding  2 * (4*4*3) * 8 * 4          = 3072
    q, k, v, o       2 * 5 * 4 * 8*8              = 2560
    QK^T and AV      2 * (2 * 5 * 5 * 8)          =  800
    MLP              2 * 5 * (8*32 + 32*8)        = 5120
    head             2 * 8 * 2                    =   32
    forward                                        = 11584; training = 3 * 11584 = 34752
    """
    model = ViT(ViTConfig(img_size=8, patch_size=4, n_classes=2, dim=8, depth=1, n_heads=2))
    assert model.flops_per_sample(train=False) == 11584
    assert model.flops_per_sample() == 34752


def counted_forward_flops(model, batch) -> int:
    """FLOPs torch itself counts (matmuls, convolutions, attention on the math backend) for one forward."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(batch)
    return counter.get_total_flops()


@pytest.mark.parametrize("name", ["vit", "ast", "imagegpt", "audio_to_text", "text_to_image", "tts", "clip", "clap"])
def test_flops_match_torch_counter(name):
    model, cfg = build(name)
    batch = make_batch(cfg, B=2)
    expected = 2 * model.flops_per_sample(train=False)
    if isinstance(cfg, CLIPConfig):
        expected += 2 * 2 * 2 * cfg.embed_dim  # the (B, B) similarity matrix, left out of the per-sample count
    assert counted_forward_flops(model, batch) == expected


def _compile_or_skip(model, batch):
    try:
        return torch.compile(model)(batch)
    except Exception as e:  # noqa: BLE001 - an inductor toolchain failure is the machine's, not the model's
        pytest.skip(f"torch.compile failed on this machine's inductor C++ toolchain: {type(e).__name__}: {e}"[:300])


def test_torch_compile_smoke():
    """Forward only (about 25 s cold on two CPU cores; the inductor cache makes reruns quicker)."""
    model, cfg = build("vit")
    batch = make_batch(cfg, B=2)
    with torch.no_grad():
        out, loss = _compile_or_skip(model, batch)
        torch.testing.assert_close(out, model(batch)[0], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_torch_compile_training_step():
    """Forward and backward through inductor (about 45 s cold on two CPU cores)."""
    model, cfg = build("imagegpt")
    batch = make_batch(cfg, B=2)
    ref = torch.autograd.grad(model(batch)[1], list(model.parameters()))
    out, loss = _compile_or_skip(model, batch)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    for g, r in zip(grads, ref, strict=True):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("cls", [ViT, AST, ImageGPT, Seq2Seq, CLIP], ids=lambda c: c.__name__)
def test_docstring_parameter_counts(cls):
    """Each model file states its default config's parameter count; keep it true."""
    doc = sys.modules[cls.__module__].__doc__
    stated = int(re.search(r"([\d,]+) parameters", doc).group(1).replace(",", ""))
    assert sum(p.numel() for p in cls().parameters()) == stated  # the default config
