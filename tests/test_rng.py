"""A training's random draws are its own (models/rng.py): trained beside others on threads, as the pipeline's lanes
do, a model ends with the weights it has when trained alone."""

from __future__ import annotations

import threading
from dataclasses import replace
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from flows.pipeline import run_lanes
from models import rng
from tasks.infra.hardware import cpu_threads
from tasks.train.augment.image import vit_augment
from tasks.train.batches import BatchContext, DataInfo
from tasks.train.trainer import load_checkpoint, train
from tests.helpers import TINY_TRAIN, _shared_mlflow, mlflow_db, prep, weights_equal  # noqa: F401 (fixtures)

# every kind of draw a training makes: dropout, stochastic depth, and each of the ViT's augmentations
NOISY = {"dropout": 0.2, "drop_path": 0.2}
EVERY_AUG = {"max_shift": 2, "flip": True, "jitter": 0.4, "trivial": True, "mixup": 0.8, "cutmix": 1.0}


def _masks(seed: int, between=lambda: None) -> list[torch.Tensor]:
    x = torch.ones(4, 8, 16)
    with rng.own_draws(seed):
        out = []
        for _ in range(3):
            out.append(rng.Dropout(0.5).train()(x))
            between()
        return out


def test_dropout_draws_from_the_threads_own_generator():
    ref = _masks(3)
    assert all(torch.equal(a, b) for a, b in zip(ref, _masks(3, between=lambda: torch.rand(100))))
    assert not torch.equal(ref[0], _masks(4)[0])
    assert not torch.equal(ref[0], ref[1])  # the generator moves on
    kept = torch.cat(ref) > 0
    assert 0.4 < kept.float().mean() < 0.6 and torch.all(torch.cat(ref)[kept] == 2.0)  # 1 / (1 - p)
    torch.manual_seed(5)  # outside own_draws: torch's global generator, as nn.Dropout
    a = rng.Dropout(0.5).train()(torch.ones(64))
    torch.manual_seed(5)
    assert torch.equal(a, F.dropout(torch.ones(64), 0.5, True))
    assert torch.equal(rng.Dropout(0.5).eval()(torch.ones(8)), torch.ones(8))


def test_augmentation_draws_from_the_threads_own_generator(prep):
    ctx = BatchContext(DataInfo.load(prep), SimpleNamespace(n_classes=4))
    batch = {"image": torch.randn(16, 3, 16, 16), "label": torch.arange(16) % 4}

    def augmented(seed: int) -> torch.Tensor:
        with rng.own_draws(seed):
            torch.rand(1000)  # torch's global generator: not the thread's
            return vit_augment(dict(batch), ctx, EVERY_AUG)["image"]

    assert torch.equal(augmented(1), augmented(1)) and not torch.equal(augmented(1), augmented(2))


def test_a_model_trained_beside_others_ends_as_it_does_alone(prep, tmp_path):
    """The ViT with dropout, stochastic depth and its augmentations, 12 steps: alone, then in a lane beside a second
    training (another seed) while a third thread keeps seeding torch's global generator and drawing from it, as
    another model's initialisation does. Same weights, to the bit."""
    cfg = replace(TINY_TRAIN, seed=7, augment=EVERY_AUG)

    def vit(out: str, seed_cfg=cfg):
        return lambda: train("vit", prep, tmp_path / out, seed_cfg, model_overrides=NOISY, preset="tiny",
                             experiment="rng")

    with cpu_threads(1):
        alone = vit("alone")()
    stop = threading.Event()

    def draw_meanwhile():
        while not stop.is_set():
            with rng.seeded(0):  # as another training initialising its weights
                torch.rand(64)

    noise = threading.Thread(target=draw_meanwhile)
    noise.start()
    try:
        beside, _ = run_lanes([vit("beside"), vit("other", replace(cfg, seed=8))])
    finally:
        stop.set()
        noise.join()
    a, b = (load_checkpoint(r["last_checkpoint"])["state_dict"] for r in (alone, beside))
    assert weights_equal(a, b)
    other = load_checkpoint(tmp_path / "other" / "ckpt.pt")["state_dict"]
    assert not weights_equal(a, other)  # the seed is what names the run


def test_torch_compile_traces_dropout_in_one_graph():
    """Under torch.compile the draws fall back to torch's global generator (a context variable or a generator
    argument would break the graph at every dropout)."""
    from models.transformer import Transformer

    net = Transformer(32, 2, 2, dropout=0.2, drop_path=0.1).train()
    with rng.own_draws(0):
        explained = torch._dynamo.explain(net)(torch.randn(2, 8, 32))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
