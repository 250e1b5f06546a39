"""Learning, not just running: the pipeline on a small built-in set (800 images, 400 clips, small models, a few
hundred steps each) must reach the thresholds below on its test split, and `tessera search` must put a matching
caption first for known queries.

The thresholds sit below what this config reached when it was written (see the issue note), with room for the
run-to-run spread of a 2-core machine; chance is 1/6 for the shape and word classes.
"""

from __future__ import annotations

import re

import pytest

from flows.cli import main as cli_main
from flows.cli import write_latest
from flows.params import CodebookParams, DataParams, EvalParams, PipelineParams, TrainParams
from flows.pipeline import pipeline
from tasks.index import load_index, search_text
from tasks.data.builtin.synthetic import COLOURS, SHAPES

pytestmark = pytest.mark.usefixtures("prefect_harness")

CHANCE = 1 / 6
SMALL = dict(dim=64, depth=2, n_heads=2)
TRAIN = {  # per model: TrainConfig fields (tasks/train/trainer.py) on top of the model's own; the image models a fixed
    # count (ViT 300, CLIP 300; CLIP had 179 by its epochs before they were cut for the 8,000-image built-in set)
    "vit": dict(max_steps=300, epochs=None, warmup_steps=50),  # 50 of its 300 steps warm up, as before the 200
    "ast": dict(max_steps=300, lr=1e-3, min_lr=1e-4, warmup_steps=30),
    "clip": dict(max_steps=300, epochs=None, warmup_steps=30),
    "asr": dict(max_steps=300, lr=2e-3, min_lr=2e-4, warmup_steps=30),
}
MODEL = {  # per model: config fields on top of the default preset (tasks/train/table.py); ViT and CLIP keep theirs, so
    "ast": SMALL,  # CLIP's image tower starts from the trained ViT as in `make run`
    "asr": dict(dim=64, n_heads=2),
}
QUERIES = ("a red circle", "a blue square")  # known to come first when this was written


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
    params = PipelineParams(
        data=DataParams(root=root / "out", size=800, n_mels=64, n_frames=128, shard_maxcount=200),
        codebooks=CodebookParams(pixels_k=16, image_k=32, iters=5, min_usage=0.0),
        # one lane: lanes draw from torch's one random state in whatever order their steps interleave
        train=TrainParams(models=list(TRAIN), train_overrides=TRAIN, model_overrides=MODEL, lanes=1),
        eval=EvalParams(max_samples=None, roundtrips=False),
    )
    result = pipeline(params)
    write_latest(root / "out", result)
    yield root / "out", result
    mp.undo()


def metrics(result, model: str) -> dict:
    m = result["eval"][model]["metrics"]
    print(model, {k: round(v, 3) for k, v in m.items()})  # shown with -s, and on failure
    return m


def test_vit_classifies_shapes(small_run):
    m = metrics(small_run[1], "vit")
    # reached 0.69 (held-out 0.60) on AMD EPYC machines, 0.595 (0.433) on an Intel AMX one, where bf16 rounds
    # differently: the bounds are 3x and 2x chance, learned shape on both, not one machine's figure
    assert m["accuracy"] >= 3 * CHANCE, m
    assert m["heldout_accuracy"] >= 2 * CHANCE, m  # on shape/colour pairs it never saw: not colour read as shape


def test_ast_recognises_spoken_words(small_run):
    m = metrics(small_run[1], "ast")
    assert m["accuracy"] >= 0.45, m  # reached 0.57


def test_asr_transcribes(small_run):
    m = metrics(small_run[1], "asr")
    assert m["cer"] <= 0.1, m


def test_clip_zero_shot(small_run):
    m = metrics(small_run[1], "clip")
    assert m["zero_shot/shape_accuracy"] >= 2 * CHANCE, m  # reached 0.47 in bf16, 0.386 in fp32 (300 steps)
    assert m["zero_shot/colour_accuracy"] >= 3 * CHANCE, m  # reached 0.66
    assert m["retrieval/i2t_recall_at_10"] >= 0.3, m


def _matches(colour: str, shape: str, caption: str) -> bool:
    words = set(re.findall(r"[a-z]+", caption))
    return colour in words and shape in words


def test_search_puts_a_matching_caption_first(small_run, capsys):
    """Every colour+shape query: the first hit's caption names both for most, and for the known queries always."""
    out, result = small_run
    loaded = load_index(result["index"]["path"])
    first = {}
    for shape in SHAPES:
        for colour in COLOURS:
            hits = search_text(loaded, f"a {colour} {shape}", k=3)
            first[colour, shape] = _matches(colour, shape, hits[0].caption)
    misses = sorted(k for k, ok in first.items() if not ok)
    print(f"search: first hit matches for {sum(first.values())}/{len(first)} queries; misses {misses}")
    assert sum(first.values()) >= 0.6 * len(first), misses
    for q in QUERIES:
        colour, shape = q.split()[-2:]
        assert first[colour, shape], (q, misses)
        assert cli_main(["search", *q.split(), "--root", str(out), "--k", "1"]) == 0
        hit = search_text(loaded, q, k=1)[0]
        printed = capsys.readouterr().out
        assert hit.key in printed and hit.caption[:40] in printed
