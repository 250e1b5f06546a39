"""How long a model trains: its steps from the data (epochs over the train split, a floor and a cap: plan_budget) and
a wall-clock cap on them (Clock: TrainConfig.max_minutes).

The time cap measures the pace of the steps run so far (evaluations and checkpoints included) every few steps and
moves the schedule's end (TrainConfig.max_steps, where the cosine decay ends) to the steps that fit in what is left
of the cap, never beyond the planned steps. On a machine fast enough the plan stands and the run is the uncapped
one; on a slower one the model trains fewer steps with a complete schedule, instead of a run that takes twice as
long. Where the cap moved the end, the run says so once per move of more than 2%.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

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
