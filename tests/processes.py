"""Real processes for the fault and server tests (test_faults.py, test_servers.py): each started in a session of its
own with its output in a log, and stopped with every process it started, whatever the test did."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tasks.infra import procs

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: tessera, prefect, mlflow


@dataclass
class Proc:
    popen: subprocess.Popen
    log: Path

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


def start(cmd: list[str], env: dict, log: Path, cwd: Path = ROOT) -> Proc:
    """cmd in a session of its own, stdout and stderr appended to `log`."""
    with log.open("ab") as out:
        popen = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return Proc(popen, log)


def stop(proc: Proc) -> None:
    """SIGTERM to the process, its descendants and their process groups (never ours); SIGKILL to whatever is left
    after the leader's 10 s and a second for its children (a Prefect worker may take that long to shut down)."""
    pids = [proc.popen.pid, *procs.descendants(proc.popen.pid)]
    groups = {proc.popen.pid}
    for pid in pids[1:]:
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    groups.discard(os.getpgid(0))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for kill, targets in ((os.killpg, groups), (os.kill, pids)):
            for target in targets:
                try:
                    kill(target, sig)
                except (ProcessLookupError, PermissionError):
                    pass
        try:
            proc.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            continue
        deadline = time.monotonic() + 1
        while alive(pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not alive(pids):
            return


def alive(pids: list[int]) -> list[int]:
    """The pids of `pids` that still run (a zombie has exited)."""
    out = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.append(pid)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"


def wait_for(cond, what: str, proc: Proc | None = None, timeout: float = 120, every: float = 0.05):
    """cond()'s first true value, polled every `every` s; the test fails, with the process's log, when `proc` exits
    first or `timeout` s pass."""
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if proc is not None and proc.popen.poll() is not None:
            pytest.fail(f"waiting for {what}: {proc.popen.args[:4]} exited with {proc.popen.returncode}:\n"
                        f"{proc.tail()}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f} s" + (f"\n{proc.tail()}" if proc else ""))
        time.sleep(every)
    return value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_ok(url: str, timeout: float = 2) -> bool:
    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False
