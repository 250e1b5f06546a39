"""Metrics that survive a tracking outage: `MetricBuffer` sends a run's metrics from a thread and keeps, retries and
spools what MLflow does not take. Runs that own a buffer: tasks/infra/tracking.py.

Tracking never stops a training. Metrics go to MLflow from a sender thread; what the server does not take (it is
down past the client's own retries) stays in memory and is retried with back-off, with one warning on stderr when
the server goes away and one when it answers again. Before a checkpoint the trainer flushes with wait=True: that
returns once everything is stored, or at once while the server is away, with what is not stored written to the
run's spool file (`SPOOL` in the output folder), so a run resumed from that checkpoint sends it and never lacks a
step. At the end a run waits, at most catchup_s() seconds and saying so, for the server to take the rest
(tracking.Run.catch_up). Resending is safe: MLflow stores a metric (key, value, timestamp, step) that it already has
only once.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric

from tasks.infra.tracking_store import _uri

MAX_BATCH = 1000  # MLflow's limit on metrics per log_batch call
SPOOL = "mlflow-unsent.jsonl"  # in a run's output folder: metrics MLflow had not taken at a checkpoint
SETTLE_S = 30.0  # a checkpoint waits at most this long for the metrics before it (none while the server is away)
RETRY_MAX_S = 10.0  # the longest pause between two tries to send kept metrics
# Refusals, not outages: sending the same batch again cannot help, so it is dropped with a warning.
REFUSED = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE"}


def say(message: str) -> None:
    """One line on stderr (Prefect shows it in the task's log)."""
    print(f"tessera: {message}", file=sys.stderr, flush=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


class MetricBuffer:
    """Collects (key, value, step); a sender thread sends them with one `log_batch` call per flush and keeps what
    the server does not take until it does (see the module docstring).

    Values may be 0-d tensors: they are converted at flush time, so a GPU training loop does not synchronise on every
    `add`. `skip_through` drops steps already recorded by an earlier (killed) attempt of the same run. `spool`: the
    file that holds what is not stored at a checkpoint (None: nothing is written to disk). Sending from a thread
    keeps a training loop off the network: a log_batch to a SQLite store took 70-500 ms here, 9% of a default ViT's
    loop at one flush per 10 steps (benchmarks/orchestration.py).
    """

    def __init__(self, c: MlflowClient, run_id: str, skip_through: int = -1, spool: Path | None = None):
        self.client, self.run_id, self.skip_through, self.spool = c, run_id, skip_through, spool
        self.pending: list[tuple[str, Any, int, int]] = []  # added since the last flush
        self.unsent: list[Metric] = []  # flushed, not stored yet; the sender sends from the head
        self.away_since: float | None = None  # time.monotonic() when the server stopped answering; None: it answers
        self.stored = 0
        self._cond = threading.Condition()
        self._sender: threading.Thread | None = None
        self._stop = False
        self._take_spool()

    def add(self, metrics: dict[str, Any], step: int) -> None:
        if step <= self.skip_through:
            return
        ts = int(time.time() * 1000)
        self.pending.extend((k, v, ts, step) for k, v in metrics.items())

    def flush(self, wait: bool = True, timeout: float = SETTLE_S) -> bool:
        """Hand what is buffered to the sender. wait=True: return once everything flushed so far is stored, or, while
        the server is away or after `timeout` seconds, once what is not stored is in the spool file. Never raises;
        True when everything is stored."""
        metrics = [Metric(k, float(v), ts, step) for k, v, ts, step in self.pending]
        self.pending.clear()
        with self._cond:
            self.unsent.extend(metrics)
            if self.unsent:
                self._start()
                self._cond.notify_all()
            return self._settle(timeout) if wait else not self.unsent

    def close(self, timeout: float, while_away: bool = True) -> bool:
        """Flush, then wait up to `timeout` seconds (saying so when it takes a while) until MLflow has everything, and
        stop the sender; while_away=False: stop waiting as soon as the server is known to be away. False when
        something is left: it is in the spool file, when there is one."""
        self.flush(wait=False)
        with self._cond:
            done = self._settle(min(2.0, timeout), while_away)
            if not done and (while_away or self.away_since is None) and timeout > 2.0:
                say(f"waiting up to {timeout:.0f} s for MLflow at {_uri(self.client)} to take {len(self.unsent)} "
                    f"metrics of run {self.run_id}")
                done = self._settle(timeout - 2.0, while_away)
            self._stop = True
            self._cond.notify_all()
            return done

    def kept_step(self, key: str) -> int:
        """The highest step of `key` among the metrics not stored yet (-1 when none)."""
        with self._cond:
            return max((m.step for m in self.unsent if m.key == key), default=-1)

    # -------------------------------------------------------------------------------- the sender and the spool
    def _start(self) -> None:
        """(Lock held.) A sender thread, unless one runs."""
        self._stop = False
        if self._sender is None:
            self._sender = threading.Thread(target=self._send_loop, name=f"mlflow-metrics-{self.run_id[:8]}",
                                            daemon=True)
            self._sender.start()

    def _settle(self, timeout: float, while_away: bool = False) -> bool:
        """(Lock held.) Wait until nothing is unsent, the timeout passes, or (unless while_away) the server is away;
        then spill what is left. True when nothing is left."""
        deadline = time.monotonic() + timeout
        while self.unsent and (while_away or self.away_since is None):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._cond.wait(left)
        if self.unsent:
            self._spill()
        return not self.unsent

    def _send_loop(self) -> None:
        delay = 1.0
        while True:
            with self._cond:
                while not self.unsent and not self._stop:
                    self._cond.wait()
                if self._stop:
                    self._sender = None  # under the lock: a flush after this starts a new sender
                    return
                batch = self.unsent[:MAX_BATCH]
            try:
                self.client.log_batch(self.run_id, metrics=batch, synchronous=True)
            except Exception as exc:  # noqa: BLE001 - whatever the client raises, the training goes on
                if getattr(exc, "error_code", None) in REFUSED:
                    say(f"MLflow refused {len(batch)} metrics of run {self.run_id} ({_first_line(exc)}); dropped")
                    self._sent(batch, refused=True)
                    continue
                self._went_away(exc)
                with self._cond:
                    self._cond.wait(delay)
                delay = min(2 * delay, RETRY_MAX_S)
                continue
            delay = 1.0
            self._sent(batch)

    def _sent(self, batch: list[Metric], refused: bool = False) -> None:
        with self._cond:
            del self.unsent[: len(batch)]
            if not refused:
                self.stored += len(batch)
                if self.away_since is not None:
                    say(f"MLflow at {_uri(self.client)} answers again after {time.monotonic() - self.away_since:.0f} "
                        f"s; sending the {len(self.unsent) + len(batch)} metrics kept for run {self.run_id}")
                    self.away_since = None
            if not self.unsent and self.spool is not None:
                self.spool.unlink(missing_ok=True)
            self._cond.notify_all()

    def _went_away(self, exc: Exception) -> None:
        with self._cond:
            if self.away_since is None:
                self.away_since = time.monotonic()
                say(f"MLflow at {_uri(self.client)} does not answer ({_first_line(exc)}); training goes on, its "
                    f"metrics are kept ({len(self.unsent)} so far) and sent when MLflow answers again")
            self._cond.notify_all()

    def _spill(self) -> None:
        """(Lock held.) Write every unsent metric to the spool file, atomically."""
        if self.spool is None:
            return
        lines = [json.dumps({"run_id": self.run_id, "key": m.key, "value": m.value, "timestamp": m.timestamp,
                             "step": m.step}) for m in self.unsent]
        self.spool.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.spool.with_name(f".{self.spool.name}.{os.getpid()}.tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, self.spool)

    def _take_spool(self) -> None:
        """Metrics an earlier attempt of this run kept in the spool file go first (those MLflow has already are
        stored once)."""
        if self.spool is None or not self.spool.is_file():
            return
        rows = [json.loads(line) for line in self.spool.read_text().splitlines() if line.strip()]
        self.unsent = [Metric(r["key"], r["value"], r["timestamp"], r["step"]) for r in rows
                       if r.get("run_id") == self.run_id]
        if self.unsent:
            with self._cond:
                self._start()
