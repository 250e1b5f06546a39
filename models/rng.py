"""Where a training's random draws come from, so that models trained side by side repeat.

torch has one global generator per device, and the pipeline trains models side by side on threads of one process
(flows/pipeline.py, lanes): two trainings drawing from it take each other's numbers in whatever order the threads
run, so no run repeats and a seed names nothing. Here a training owns its draws instead:

- `own_draws(seed)`: the thread (a context variable: each thread, and each copied context, has its own) draws from
  generators of its own, one per device type, all seeded with `seed`. `generator(device)` is that thread's (None
  outside `own_draws`: torch's global generator, as usual). Every draw of training takes it: dropout (`Dropout`
  here), stochastic depth (transformer.drop_path) and the augmentations (tasks/train/augment).
- `seeded(seed)`: torch's global generator seeded, then restored, under one lock, for what can only draw from it:
  the modules' initialisation (nn.Linear's reset_parameters takes no generator) and torchaudio's Griffin-Lim. Two
  threads never interleave in it; code that draws from the global generator outside it still could (a ViT's training
  with every augmentation on draws none: tests/test_rng.py).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F


class Draws:
    """One training's generators, one per device type, each seeded with `seed` when first asked for."""

    def __init__(self, seed: int):
        self.seed = seed
        self.generators: dict[str, torch.Generator] = {}

    def get(self, device: torch.device | str = "cpu") -> torch.Generator:
        device = torch.device(device)
        if device.type not in self.generators:
            self.generators[device.type] = torch.Generator(device).manual_seed(self.seed)
        return self.generators[device.type]

    def reseed(self, seed: int) -> None:
        """Start over from `seed` (generators made anew when next asked for)."""
        self.seed, self.generators = seed, {}

    def state(self) -> dict[str, torch.Tensor]:
        """{device type: generator state}: what a checkpoint holds to resume the same draws."""
        return {kind: g.get_state() for kind, g in self.generators.items()}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        for kind, s in state.items():
            if kind == "cpu" or (kind == "cuda" and torch.cuda.is_available()):
                self.get(kind).set_state(s)


_DRAWS: ContextVar[Draws | None] = ContextVar("draws", default=None)
_GLOBAL = threading.RLock()


def current() -> Draws | None:
    """This thread's Draws inside `own_draws`, else None."""
    return _DRAWS.get()


def generator(device: torch.device | str = "cpu") -> torch.Generator | None:
    """This thread's generator for `device` inside `own_draws`, else None (torch's global one). None as well inside
    torch.compile, which traces neither a context variable nor a generator argument (each would break the graph):
    a compiled model's dropout draws from torch's global generator."""
    if torch.compiler.is_compiling():
        return None
    draws = current()
    return None if draws is None else draws.get(device)


@contextmanager
def own_draws(seed: int) -> Iterator[Draws]:
    """Within it, this thread's draws come from generators of its own, seeded with `seed` (module docstring)."""
    draws = Draws(seed)
    token = _DRAWS.set(draws)
    try:
        yield draws
    finally:
        _DRAWS.reset(token)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """torch's global CPU generator seeded with `seed` for this block, held by no other thread meanwhile, and put
    back as it was after."""
    with _GLOBAL, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout, its mask drawn from this thread's generator (`generator`)."""
    g = generator(x.device)
    if p == 0.0 or not training or g is None:
        return F.dropout(x, p, training)
    return x * torch.empty_like(x).bernoulli_(1 - p, generator=g).div_(1 - p)  # as F.dropout's CPU kernel


class Dropout(nn.Dropout):
    """nn.Dropout drawing from this thread's generator (`dropout`); the same module otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)
