"""How long a model trains: its steps from the data (epochs over the train split, a floor and a cap: plan_budget), a
wall-clock cap on them (Clock: TrainConfig.max_minutes), and what a whole run's minutes leave for training on this
machine (run_training_minutes, machine_slowdown: `tessera run --run-minutes`).

The time cap measures the pace of the steps run so far (evaluations and checkpoints included) every few steps and
moves the schedule's end (TrainConfig.max_steps, where the cosine decay ends) to the steps that fit in what is left
of the cap, never beyond the planned steps. On a machine fast enough the plan stands and the run is the uncapped
one; on a slower one the model trains fewer steps with a complete schedule, instead of a run that takes twice as
long. Where the cap moved the end, the run says so once per move of more than 2%.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from models import rng
from tasks.infra import storage
from tasks.infra.common import write_json

if TYPE_CHECKING:
    from tasks.train.trainer import TrainConfig


@dataclass(frozen=True)
class Budget:
    """The optimiser steps a run plans, and where they come from (plan_budget)."""

    steps: int  # optimiser steps planned
    n_train: int  # items in the train split
    per_step: int  # samples per optimiser step, all ranks together
    epochs: float | None  # the budget in passes over the train split; None: a fixed step count (max_steps)
    wanted: int  # the steps the epochs come to, before the cap and the floor
    cap: int
    floor: int

    def epochs_of(self, steps: int) -> float:
        """The passes over the train split that `steps` optimiser steps make."""
        return steps * self.per_step / max(self.n_train, 1)

    def line(self, model: str, items: str) -> str:
        """One line, e.g. "ast: 17 epochs of 1350 clips = 718 steps (cap 3750)"."""
        ran = f"{self.epochs_of(self.steps):.3g} epochs of {self.n_train} {items}"
        if self.epochs is None:
            return f"{model}: {self.steps} steps, a fixed count ({ran})"
        head = f"{model}: {self.epochs:g} epochs of {self.n_train} {items} = {self.wanted} steps"
        if self.wanted > self.steps:
            return f"{head}, capped at {self.steps} ({ran})"
        if self.wanted < self.steps:
            return f"{head}, raised to the floor of {self.steps} ({ran}; cap {self.cap})"
        return f"{head} (cap {self.cap})"


def plan_budget(cfg: TrainConfig, n_train: int, world: int = 1) -> Budget:
    """With cfg.epochs: ceil(epochs * n_train / (batch_size * grad_accum * world)) steps, at least min_steps and at
    most max_steps (the cap wins over the floor). Without: max_steps steps."""
    per_step = cfg.batch_size * cfg.grad_accum * world
    if cfg.epochs is None:
        return Budget(cfg.max_steps, n_train, per_step, None, cfg.max_steps, cfg.max_steps, cfg.max_steps)
    exact = cfg.epochs * n_train / per_step
    wanted = math.ceil(exact - 1e-9 * max(1.0, exact))  # a product that is a whole number in decimals stays whole
    steps = min(cfg.max_steps, max(cfg.min_steps, wanted))
    return Budget(steps, n_train, per_step, cfg.epochs, wanted, cfg.max_steps, cfg.min_steps)


def now() -> float:
    """The clock the time cap reads (a function, so a test can set the pace of the steps)."""
    return time.perf_counter()


@dataclass
class Clock:
    """Seconds a run has trained (this attempt, plus `before` from its checkpoint) against a cap (None: no cap)."""

    cap_s: float | None
    before: float = 0.0  # seconds earlier attempts spent (a resumed run's checkpoint)
    first_step: int = 0  # the step this attempt started at
    t0: float = field(default_factory=lambda: now())
    said: int = 0  # the end last announced (0: none)
    mark: tuple[int, float] | None = None  # (step, time) the pace is measured from, once past the first steps

    @property
    def spent(self) -> float:
        return self.before + now() - self.t0

    def end(self, step: int, planned: int, min_steps: int = 20) -> int | None:
        """The step the schedule should end at: `planned`, or fewer when this attempt's pace (seconds per step so
        far, evaluations and checkpoints included) says they would not fit in the cap; always past `step`, so the
        step that ends the run is evaluated and checkpointed as every last step is. None (keep the end it has) until
        this attempt has run `min_steps` steps, or without a cap. The pace leaves out the attempt's first
        min_steps / 2 steps (measured from `mark` once there are as many after it): they are slower (warm-up)."""
        done = step - self.first_step
        if self.cap_s is None:
            return None
        if self.mark is None and done >= min_steps // 2:
            self.mark = (step, now())
        if done < min_steps:
            return None
        s0, t0 = self.mark if step - self.mark[0] >= min_steps // 2 else (self.first_step, self.t0)
        pace = (now() - t0) / (step - s0)
        return max(step + 1, min(planned, step + math.floor((self.cap_s - self.spent) / pace)))

    def announce(self, model: str, end: int, planned: int) -> str | None:
        """A line when the end moved by more than 2% of the plan since the last one said (or first left the plan)."""
        if abs(end - (self.said or planned)) <= 0.02 * planned:
            return None
        self.said = end
        return (f"[{model}] time cap {self.cap_s / 60:.3g} min: the schedule now ends at step {end} of the {planned} "
                f"planned ({self.spent / 60:.2f} min spent)")


# ---------------------------------------------------------------------------------------------------- a run's minutes
# What a default `make run` spends besides its models' time caps, in minutes on the machine the table's `minutes` were
# measured on (tasks/train/table.py): starting up, the data and codebooks, each model's evaluation, the round trips,
# the CLIP index and the registry (1.4 there on a fresh root, 2026-12-02: 17 min 41 s in all, 16.3 of them in train
# tasks), and the part of each train task its cap does not see (building the model, starting its MLflow run and data,
# the last evaluation: 0.4 in all on a machine probed at 2.05x, so ~0.2 here). With two lanes (2026-12-03): 1.2 of the
# run's 14.8 minutes besides the longer lane's training (8,000 images: the data stages 0.4 minutes, fresh); kept at 1.8.
OTHER_MINUTES = 1.8
SHORTEST_TRAINING = 1.0  # minutes: a run's training is never planned shorter, however slow the machine
PROBE_STEPS = 8
# The probe's seconds (probe_seconds) on the machine the table's `minutes` were measured on (Intel AMX, the faster of
# bf16 and fp32: fp32, one thread as training uses, 2026-12-03; 1.03 s in bf16 on 2026-12-02).
REFERENCE_PROBE_S = 0.66


def probe_seconds(device: str = "cpu", precision: str = "auto", threads: int = 1) -> float:
    """Seconds for PROBE_STEPS AdamW steps of the shared transformer core at the default models' size (128 wide, 4
    deep; 32 sequences of 64 tokens), at the dtype and CPU threads training would use: this machine's training speed
    in one number (the best of two timings after a warm-up, hardware.faster_dtype; with precision "auto" where bf16 is
    fast, the faster of bf16 and fp32, as the trainer measures each model: trainer.measured_precision). Leaves torch's
    random state as it was."""
    from models.transformer import Transformer
    from tasks.infra.hardware import compute_dtype, cpu_threads, faster_dtype, pick_device

    dev = pick_device(device)
    fast_bf16 = compute_dtype(precision, dev) == torch.bfloat16
    both = fast_bf16 and precision == "auto" and dev.type == "cpu"
    dtypes = (torch.bfloat16, torch.float32) if both else (torch.bfloat16 if fast_bf16 else torch.float32,)
    with rng.seeded(0), cpu_threads(threads):
        net = Transformer(128, 4, 4).to(dev)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        x = torch.randn(32, 64, 128, device=dev)

        def steps():
            for _ in range(PROBE_STEPS):
                loss = net(x).float().square().mean()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

        return min(faster_dtype(steps, dev, repeats=2, dtypes=dtypes)[1].values())


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_slowdown(root: str | Path, device: str = "cpu", precision: str = "auto") -> tuple[float, bool]:
    """(this machine's training time over the reference machine's, measured now?): the probe against
    REFERENCE_PROBE_S, rounded to 0.05, measured once per machine and kept in ROOT/machine.json (by CPU, cores, torch
    version, device and precision), so every run on this machine and root plans the same minutes (and hits the same
    cache). A damaged file is probed again and written afresh."""
    key = f"{cpu_name()}|{os.cpu_count()} cores|torch {torch.__version__}|{device}|{precision}"
    path = storage.join(storage.location(root), "machine.json")
    try:
        known = json.loads(storage.read_text(path)) if storage.exists(path) else {}
        if not isinstance(known, dict):
            raise ValueError("not an object")
        stored = float(known[key]["slowdown"]) if key in known else None
    except (ValueError, TypeError, KeyError):  # a damaged file: probe again and write it afresh
        print(f"{path} is not the probe's JSON; probing this machine again")
        known, stored = {}, None
    if stored is not None:
        return stored, False
    seconds = probe_seconds(device, precision)
    slowdown = round(seconds / REFERENCE_PROBE_S / 0.05) * 0.05
    known[key] = {"probe_s": round(seconds, 4), "reference_s": REFERENCE_PROBE_S, "slowdown": slowdown}
    if not storage.is_url(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json(path, known)
    return slowdown, True


def run_training_minutes(run_minutes: float, slowdown: float) -> float:
    """`--run-minutes`: the minutes its models' training may take, what is left of the run after OTHER_MINUTES of other
    work at this machine's slowdown (a machine half as fast: twice those minutes), at least SHORTEST_TRAINING."""
    return max(SHORTEST_TRAINING, run_minutes - slowdown * OTHER_MINUTES)
