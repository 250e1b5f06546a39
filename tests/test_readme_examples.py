"""The README's "Bring your own data" examples, run as written (plus flags that make the models tiny) on small
folders of the layout each one describes."""

from __future__ import annotations

import csv
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from flows.cli import main as cli_main
from tasks.infra import tracking

pytestmark = pytest.mark.usefixtures("prefect_harness")

README = Path(__file__).resolve().parents[1] / "README.md"
TINY = ["--root", "out", "--preset", "tiny", "--steps", "2", "--batch-size", "4", "--image-size", "16",
        "--n-mels", "32", "--image-k", "16", "--pixels-k", "8", "--lanes", "1"]  # one lane: repeatable
COLOURS = {"cat": (200, 60, 60), "dog": (60, 60, 200), "owl": (60, 200, 60)}


def readme_commands() -> list[str]:
    """Every `tessera run` line of the README's "Bring your own data" section, in order."""
    text = README.read_text()
    section = text.split("### Bring your own data", 1)[1].split("\n### ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [line for b in blocks for line in b.splitlines() if line.startswith("tessera run")]


def _png(path: Path, rgb, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    px = np.random.default_rng(seed).normal(rgb, 25, (24, 24, 3))
    Image.fromarray(np.clip(px, 0, 255).astype(np.uint8)).save(path)


def _wav(path: Path, freq: float, seconds: float = 0.4, sr: int = 16000) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr)


def _table(path: Path, header: list[str], rows: list[tuple]) -> None:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


def photos_and_splits(d: Path) -> None:
    rows = []
    for c, rgb in COLOURS.items():
        for i in range(8):
            _png(d / "photos" / c / f"{i:03d}.png", rgb, i)
            rows.append((f"photos/{c}/{i:03d}.png", "test" if i < 2 else ""))
    _table(d / "splits.csv", ["image", "split"], rows)


def clips_in_split_folders(d: Path) -> None:
    for split, n in (("train", 8), ("test", 2), ("test_noisy", 2)):
        for c, f0 in (("yes", 300.0), ("no", 700.0)):
            for i in range(n):
                _wav(d / "clips" / split / c / f"{i}.wav", f0 + 20 * i)


def recordings(d: Path) -> None:
    for digit in range(3):
        for s, speaker in enumerate(("jackson", "nicolas", "theo")):
            for take in range(5):
                _wav(d / "recordings" / f"{digit}_{speaker}_{take}.wav", 200 + 150 * digit + 10 * s + take, 0.3, 8000)


def sounds(d: Path) -> None:
    for c, f0 in (("dog", 250.0), ("rain", 900.0)):
        for i in range(10):
            _wav(d / "sounds" / c / f"1-{i}-A.wav", f0 + 15 * i, seconds=0.6 + 0.05 * i)


def pets_and_captions(d: Path) -> None:
    rows = []
    for c, rgb in COLOURS.items():
        for i in range(8):
            _png(d / "pets" / c / f"{i:03d}.png", rgb, 10 + i)
            rows.append((f"pets/{c}/{i:03d}.png", f"a {['small', 'big'][i % 2]} {c} number {i}"))
    _table(d / "captions.csv", ["image", "caption"], rows)


# the folder an example reads -> (what builds it, the models it trains, the test sets it reports, more flags)
EXAMPLES = {
    "photos/": (photos_and_splits, {"vit", "imagegpt"}, ["test"], []),
    "clips/": (clips_in_split_folders, {"ast"}, ["test", "test_noisy"], []),
    "recordings/": (recordings, {"ast"}, ["test"], []),
    "sounds/": (sounds, {"ast"}, ["test"], []),
    # CLIP must learn enough that its index is not refused as collapsed (tasks/index/build.py `check_spread`)
    "pets/": (pets_and_captions, {"vit", "imagegpt", "clip", "t2i"}, ["test"], ["--steps", "60"]),
}


def _source(argv: list[str]) -> str:
    return next(argv[i + 1] for i, a in enumerate(argv) if a in ("--images", "--audio"))


def test_the_readme_has_one_example_per_layout():
    assert sorted(_source(shlex.split(c)) for c in readme_commands()) == sorted(EXAMPLES)


@pytest.mark.parametrize("command", readme_commands(), ids=lambda c: _source(shlex.split(c)))
def test_readme_example_runs_as_written(command, tmp_path, monkeypatch):
    argv = shlex.split(command)
    build, models, test_sets, more = EXAMPLES[_source(argv)]
    build(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert cli_main(argv[1:] + TINY + more) == 0
    latest = json.loads((tmp_path / "out" / "latest.json").read_text())
    assert set(latest["checkpoints"]) == models  # the models this data can feed, no other (tests/test_plan.py)
    stats = json.loads((Path(latest["prep"]) / "stats.json").read_text())
    splits = set().union(*(c.keys() for c in stats["counts"].values()))
    assert sorted(s for s in splits if s.startswith("test")) == test_sets
    client = tracking.client()  # each test set evaluated and reported on its own, in experiment tessera-<folder>
    runs = client.search_runs([client.get_experiment_by_name(f"tessera-{_source(argv).strip('/')}").experiment_id])
    reported = {k.split("/")[0] for r in runs for k in r.data.metrics if k.startswith("test")}
    assert reported == set(test_sets)
