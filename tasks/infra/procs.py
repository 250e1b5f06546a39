"""Processes and their owners: who this process is, whether an owner is still alive, and children that end with it.

Owner: `host/boot/pid/start`, the host name, the kernel's boot id (first 8 characters), the pid and the process's
start time in clock ticks since boot (/proc/PID/stat field 22). A pid alone is reused; with its start time it names
one process. `alive(owner)` is True or False on the owner's own host, None elsewhere (a process on another machine
cannot be checked from here). Tracking tags every MLflow run with its owner (tasks/infra/tracking.py), so that a
later start can end the runs of a dead owner.

Children: Prefect starts a temporary API server (`python -m uvicorn ... prefect.server.api.server:create_app`, from
`SubprocessASGIServer`) when no PREFECT_API_URL is set, and stops it from an atexit hook, which a SIGKILL (or a
SIGTERM that Prefect re-raises after its own clean-up) never runs: the server lived on, 200 MB, without a parent.
`guard_temporary_server()` makes Prefect start it under `WATCHDOG`, a few lines that run uvicorn in the same process
and end it (SIGTERM, then exit) once its parent is gone; `guarded_argv` does the same for any `python -m` command
(flows/deploy.py runs `prefect deploy` so). It is a thread that polls getppid() rather than the kernel's
PR_SET_PDEATHSIG, which fires when the *thread* that started the child ends, and Prefect may start the server from
any thread. DataLoader workers need nothing: torch's own watchdog ends a worker whose parent is gone.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import os
import socket
import sys
from functools import lru_cache
from pathlib import Path

WATCH_S = 1.0  # how often a guarded child looks at its parent
GRACE_S = 15.0  # then: SIGTERM to itself, and exit this long after if still there

# Runs a module as `python -m` would, in a process that ends once its parent (argv[1]) is gone.
WATCHDOG = """
import os, runpy, signal, sys, threading, time
parent = int(sys.argv[1])
def watch():
    while os.getppid() == parent:
        time.sleep(%(watch)s)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(%(grace)s)
    os._exit(1)
threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()
sys.argv = sys.argv[2:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
""" % {"watch": WATCH_S, "grace": GRACE_S}


# ---------------------------------------------------------------------------------------------------- owners
def _start_ticks(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot; None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:  # no /proc (macOS): only whether the pid exists can be told
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "?"
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else fields[19]  # a zombie has exited


@lru_cache(maxsize=1)
def _boot() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    except OSError:
        return "?"


def owner(pid: int | None = None) -> str:
    """`host/boot/pid/start` of process `pid` (default: this one)."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}/{_boot()}/{pid}/{_start_ticks(pid) or '?'}"


def alive(owner_tag: str) -> bool | None:
    """Whether the process an `owner()` string names still runs: None when it ran on another host, or the string is
    not one of ours."""
    parts = owner_tag.split("/")
    if len(parts) != 4 or not parts[2].isdigit():
        return None
    host, boot, pid, start = parts
    if host != socket.gethostname():
        return None
    if boot != _boot() and "?" not in (boot, _boot()):
        return False  # the machine restarted since
    now = _start_ticks(int(pid))
    if now is None:
        return False
    return "?" in (now, start) or now == start


# ---------------------------------------------------------------------------------------------------- children
def guarded_argv(argv: list[str], parent: int | None = None) -> list[str]:
    """`python -m MODULE ARGS` -> the same, run under WATCHDOG (it ends when `parent`, default this process, is
    gone). Any other command is returned as it is."""
    if len(argv) < 3 or argv[1] != "-m":
        return list(argv)
    return [argv[0], "-c", WATCHDOG, str(os.getpid() if parent is None else parent), *argv[2:]]


class _GuardedSubprocess:
    """Stands in for the `subprocess` module inside prefect.server.api.server: the same, except that the temporary
    server it starts runs under WATCHDOG."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, name)

    def Popen(self, args, *rest, **kwargs):  # noqa: N802 - the name it replaces
        if isinstance(args, (list, tuple)) and "uvicorn" in args[:3]:
            args = guarded_argv(list(args))
        return self._module.Popen(args, *rest, **kwargs)


SERVER_MODULE = "prefect.server.api.server"  # where SubprocessASGIServer starts the temporary server


def _guard(module) -> None:
    current = getattr(module, "subprocess", None)
    if current is not None and not isinstance(current, _GuardedSubprocess) and hasattr(module, "SubprocessASGIServer"):
        module.subprocess = _GuardedSubprocess(current)  # only that module's name: nothing else changes


class _GuardOnImport(importlib.abc.MetaPathFinder):
    """Guards SERVER_MODULE as it is imported: importing it up front would cost every process 2 s."""

    def find_spec(self, name, path, target=None):
        if name != SERVER_MODULE:
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_guard(module):
            exec_module(module)
            _guard(module)

        spec.loader.exec_module = exec_and_guard  # this spec's own loader object
        return spec


def guard_temporary_server() -> None:
    """Make the temporary Prefect server that this process may start end with it (see the module docstring), now or
    when Prefect imports its server module. Idempotent; does nothing to a Prefect whose layout differs."""
    if (module := sys.modules.get(SERVER_MODULE)) is not None:
        _guard(module)
    elif not any(isinstance(f, _GuardOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _GuardOnImport())


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (from /proc; empty elsewhere)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out
