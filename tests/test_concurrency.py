"""Several writers of one output root: one writer per output folder, a finished folder is never deleted, and what a
killed writer left behind is cleaned when a stage starts (issue 14, items 6 and 7)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tasks import stages
from tasks.data.builtin import synthetic
from tasks.data.builtin.synthetic import SyntheticConfig
from tasks.infra import storage
from tasks.infra.common import SUCCESS, atomic_dir, output_lock, read_success

REPO = Path(__file__).resolve().parents[1]
CFG = SyntheticConfig(n_images=8, n_audio=4, image_size=16)


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def _counting_images(count_file: Path, arrived: Path, real):
    """synthetic._images (runs only when the dataset is generated, not when it is reused), counting its calls in a
    file both processes append to, and held until both writers have started, so that they overlap."""

    def images(cfg, root):
        with open(count_file, "a") as f:
            f.write(f"{os.getpid()}\n")
        deadline = time.monotonic() + 60
        while len(arrived.read_text().split()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # the other writer, started, reaches the lock
        return real(cfg, root)

    return images


def _write_builtin(root: Path, count_file: Path, arrived: Path, results) -> None:
    """One writer, in a spawned process: a fork of a pytest worker that has run torch's threads (or holds another
    thread's lock) can hang in the child, as one did in a slow `make test`."""
    synthetic._images = _counting_images(count_file, arrived, synthetic._images)
    with open(arrived, "a") as f:
        f.write(f"{os.getpid()}\n")
    record = stages.builtin_dataset.fn(CFG, root)
    results.put((record, os.stat(record["path"]).st_ino))


def test_two_processes_writing_one_output_compute_it_once(tmp_path):
    """Two processes run the same stage on one root: one computes, the other waits for it and reuses the result; the
    folder the first one published is the one that stays (nothing is deleted or replaced under a reader)."""
    count, arrived = tmp_path / "calls.txt", tmp_path / "arrived.txt"
    arrived.touch()
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_write_builtin, args=(tmp_path / "out", count, arrived, results)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len(count.read_text().split()) == 1  # one writer computed; the other reused its output
    (rec_a, ino_a), (rec_b, ino_b) = got
    assert rec_a == rec_b
    out = Path(rec_a["path"])
    assert ino_a == ino_b == os.stat(out).st_ino  # the published folder was never replaced
    assert read_success(out) is not None and (out / "captions.csv").is_file()
    assert _temps(out.parent) == []


def test_a_finished_output_is_never_deleted(tmp_path):
    """A writer that did not hold the lock (a library function called directly) and finishes second keeps the
    finished folder a reader has open; its own copy is dropped and its record becomes the finished one's."""
    final = tmp_path / "stage" / "abc"
    with atomic_dir(final, {"digest": "first"}) as tmp:
        (tmp / "data.txt").write_text("first")
    ino = os.stat(final).st_ino
    with open(final / "data.txt") as reader:
        record = {}
        with atomic_dir(final, record) as tmp:
            (tmp / "data.txt").write_text("second")
            record["digest"] = "second"
        assert reader.read() == "first"
    assert (final / "data.txt").read_text() == "first" and os.stat(final).st_ino == ino
    assert record == {"digest": "first"} == read_success(final)
    assert _temps(final.parent) == []


def test_an_unfinished_leftover_is_replaced(tmp_path):
    final = tmp_path / "stage" / "abc"
    final.mkdir(parents=True)
    (final / "partial.bin").write_text("half")  # no _SUCCESS: an earlier writer died before finishing
    with atomic_dir(final, {"digest": "d"}) as tmp:
        (tmp / "data.txt").write_text("whole")
    assert sorted(p.name for p in final.iterdir()) == [SUCCESS, "data.txt"]
    assert _temps(final.parent) == []


KILLED_WRITER = """
import sys, time
from tasks.infra.common import atomic_dir
with atomic_dir(sys.argv[1]) as tmp:
    (tmp / "half.bin").write_bytes(b"x" * 1000)
    print("writing", flush=True)
    time.sleep(600)
"""


def _killed_writer(final: Path) -> None:
    """A process killed (SIGKILL: no cleanup runs) while it writes `final`."""
    p = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(final)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "writing"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
        p.stdout.close()


def test_a_killed_writers_temporary_folders_are_cleaned_when_a_stage_starts(tmp_path):
    root = tmp_path / "out"
    final = Path(stages.BUILTIN.out(root, CFG))
    _killed_writer(final)  # the output this stage writes
    _killed_writer(final.parent / "0123456789abcdef")  # another output of the stage (other parameters)
    live = final.parent / f".{final.name}.tmp-{os.getpid()}-0badcafe"  # a live process's: never touched
    live.mkdir()
    assert len(_temps(final.parent)) == 3
    record = stages.builtin_dataset.fn(CFG, root)
    assert Path(record["path"]) == final and read_success(final) is not None
    assert _temps(final.parent) == [live.name]


def test_a_second_writer_waits_for_the_lock(tmp_path):
    """output_lock: a process holding an output's lock makes another wait until it lets go."""
    final = tmp_path / "stage" / "abc"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom tasks.infra.common import output_lock\n"
         "with output_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(1.5)\n", str(final)],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        with output_lock(final):
            waited = time.monotonic() - t0
        assert waited > 0.5
    finally:
        holder.wait(timeout=30)
        holder.stdout.close()


def test_a_remote_output_has_no_local_lock(tmp_path, monkeypatch):
    """An fsspec URL has no file lock: output_lock lets the stage run and creates nothing, here or there."""
    monkeypatch.chdir(tmp_path)
    with output_lock("memory://tessera-lock/stage/abc"), output_lock("memory://tessera-lock/stage/abc"):
        pass
    assert list(tmp_path.iterdir()) == [] and not storage.exists("memory://tessera-lock/stage")
