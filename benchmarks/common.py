"""Shared pieces of the benchmarks: interleaved timing, the machine description, and the result row.

Every benchmark measures its baseline and its candidate in the same process, alternating repetitions (A B A B ...)
so that load from other processes on the shared cores falls on both, and reports medians.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from tasks.infra.hardware import cpu_threads


@dataclass
class Row:
    """One line of the results table. `ratio` is oriented so that `target` reads `ratio OP value`."""

    name: str
    metric: str  # what ratio means, e.g. "speedup (baseline s / candidate s)"
    sizes: str
    baseline: str  # "label: value unit"
    candidate: str
    ratio: float
    target: str  # ">= 5" or "<= 1.5" or "report"
    passed: bool | None  # None: report only, no target
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def check(ratio: float, target: str) -> bool | None:
    """Evaluate `ratio` against a target written as ">= x" or "<= x"; None for "report"."""
    op, _, value = target.partition(" ")
    if op == ">=":
        return ratio >= float(value)
    if op == "<=":
        return ratio <= float(value)
    return None


def interleaved(fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run each fn `warmup` times, then `reps` rounds of every fn in turn (ABAB...); seconds per call, per name."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


torch_threads = cpu_threads  # the trainer's (tasks/infra/hardware.py): torch's thread count in a block, restored after


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_avg_at_start": [round(x, 2) for x in load] if load else None,
    }
