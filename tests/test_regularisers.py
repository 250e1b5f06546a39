"""Regularisers in the models: stochastic depth (drop path) and label smoothing, off at evaluation."""

from __future__ import annotations

from dataclasses import asdict

import torch

from models import ViT, ViTConfig
from tests.tiny_models import SMALL, _one_thread  # noqa: F401 (fixture)


def _vit_pair(**kw):
    """A tiny ViT with `kw` and one without, holding the same weights."""
    torch.manual_seed(0)
    cfg = ViTConfig(img_size=16, patch_size=4, n_classes=5, depth=3, **SMALL)
    plain = ViT(cfg)
    other = ViT(ViTConfig(**{**asdict(cfg), **kw}))
    other.load_state_dict(plain.state_dict())
    return plain, other


def test_drop_path_is_the_identity_at_zero_and_in_eval_mode():
    from models.transformer import drop_path

    plain, dropped = _vit_pair(drop_path=0.5)
    assert [b.drop_path for b in dropped.encoder.transformer.blocks] == [0.0, 0.25, 0.5]  # linear, as DeiT
    assert sum(p.numel() for p in ViT(ViTConfig(drop_path=0.3)).parameters()) == 2_693_578  # no new parameters
    x = torch.randn(6, 3, 16, 16)
    torch.testing.assert_close(dropped.eval()(dict(image=x))[0], plain.eval()(dict(image=x))[0], rtol=0, atol=0)
    plain.train()
    rng = torch.get_rng_state()
    train_out = plain(dict(image=x))[0]
    assert torch.equal(torch.get_rng_state(), rng)  # p = 0 draws nothing: existing models' runs are unchanged
    torch.testing.assert_close(train_out, plain.eval()(dict(image=x))[0], rtol=0, atol=0)
    dropped.train()
    assert not torch.allclose(dropped(dict(image=x))[0], train_out)
    branch = torch.ones(4000, 3, 2)
    out = drop_path(branch, 0.25, training=True)
    per_sample = out[:, 0, 0]
    assert ((per_sample == 0) | (per_sample == 1 / 0.75)).all() and (out == per_sample[:, None, None]).all()
    assert abs(float((per_sample == 0).float().mean()) - 0.25) < 0.03  # dropped with probability p, mean kept
    assert drop_path(branch, 0.25, training=False) is branch and drop_path(branch, 0.0, training=True) is branch


def test_label_smoothing_follows_cross_entropy_and_only_in_training():
    plain, smooth = _vit_pair(label_smoothing=0.1)
    torch.manual_seed(1)
    batch = dict(image=torch.randn(8, 3, 16, 16), label=torch.randint(0, 5, (8,)))
    logits, ce = plain.eval()(batch)
    logp = logits.log_softmax(-1)
    nll = -logp.gather(1, batch["label"][:, None]).mean()
    uniform = -logp.mean()  # cross-entropy against the uniform distribution over the 5 classes
    _, loss = smooth.train()(batch)
    torch.testing.assert_close(loss, 0.9 * nll + 0.1 * uniform)
    assert loss > ce  # the model's guesses are not uniform, so smoothing raises the loss
    torch.testing.assert_close(smooth.eval()(batch)[1], ce)  # evaluation reports plain cross-entropy
    soft = torch.nn.functional.one_hot(batch["label"], 5).float()  # soft targets (mixup, cutmix) are accepted
    torch.testing.assert_close(smooth.train()(dict(batch, label=soft))[1], loss)
