"""Builders shared by several test modules (fixtures live in conftest.py): tiny items tables, a learnable prep
folder for the trainer, a prep folder and CLIP checkpoint for the index, Prefect task-run states, and a training's
MLflow metrics read back."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf
import torch
import webdataset as wds
from mlflow import MlflowClient
from PIL import Image
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from models.clip import CLIP, CLIPConfig
from models.vq import Codebook
from tasks.data.codebook import save_codebook
from tasks.infra.checkpoint import save_checkpoint
from tasks.infra.common import sha256_bytes, write_json
from tasks.train.trainer import TrainConfig, get_lr


def png_bytes(rgb=(255, 0, 0), size=(32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format="PNG")
    return buf.getvalue()


def wav_bytes(freq=440.0, seconds=0.5, sr=16000) -> bytes:
    t = np.arange(int(seconds * sr)) / sr
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def item_rows(n_images: int, n_audio: int, offset: int = 0) -> list[dict]:
    """Rows with the schema ingest writes to items.parquet."""
    rows = []
    for i in range(offset, offset + n_images):
        payload = png_bytes(((i * 37) % 256, (i * 91) % 256, (i * 13) % 256))
        rows.append(dict(key=f"img-{i:06d}", modality="image", label=["circle", "square"][i % 2],
                         text=f"a picture number {i}", source=f"images/{i}.png", payload=payload, payload_ext="png",
                         sha256=sha256_bytes(payload), nbytes=len(payload), width=32, height=32, duration_s=None,
                         split=None, meta=json.dumps({"i": i})))
    for i in range(offset, offset + n_audio):
        payload = wav_bytes(200 + 20 * i, 0.3 + 0.05 * (i % 5))
        rows.append(dict(key=f"aud-{i:06d}", modality="audio", label=["yes", "no"][i % 2], text=["yes", "no"][i % 2],
                         source=f"audio/{i}.wav", payload=payload, payload_ext="wav", sha256=sha256_bytes(payload),
                         nbytes=len(payload), width=None, height=None, duration_s=0.3, split=None, meta="{}"))
    return sorted(rows, key=lambda r: r["key"])


ITEM_SCHEMA = pa.schema([
    ("key", pa.string()), ("modality", pa.string()), ("label", pa.string()), ("text", pa.string()),
    ("source", pa.string()), ("payload", pa.binary()), ("payload_ext", pa.string()), ("sha256", pa.string()),
    ("nbytes", pa.int64()), ("width", pa.int32()), ("height", pa.int32()), ("duration_s", pa.float32()),
    ("split", pa.string()), ("meta", pa.string()),
])


def write_items(path, rows) -> None:
    pq.write_table(pa.Table.from_pylist(rows, schema=ITEM_SCHEMA), path)


# ---------------------------------------------------------------------------------------------------- trainer
# A prep folder in preprocess's layout whose classes are visible (bright top vs bottom half; low vs high bands), so a
# 1-layer model learns in a few dozen steps.
PREP_SIZE, PREP_N_MELS, PREP_N_FRAMES = 16, 16, 32
TINY_TRAIN = TrainConfig(max_steps=12, batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=2, eval_every=4,
                         ckpt_every=4, log_every=3, precision="fp32", shuffle_buffer=64)


def weights_equal(a: dict, b: dict) -> bool:
    """Two state dicts with the same keys and equal tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def failing_at(step_to_fail: int):
    """A stand-in for trainer.get_lr that raises at one step (a crash mid-run), else the real schedule."""
    def failing_get_lr(step, cfg):  # step: optimiser steps applied so far
        if step == step_to_fail:
            raise RuntimeError("boom")
        return get_lr(step, cfg)

    return failing_get_lr


def _prep_image(label: int, rng) -> np.ndarray:
    img = rng.integers(0, 60, (3, PREP_SIZE, PREP_SIZE))
    img[:, : PREP_SIZE // 2] += 150 * (label == 0)  # class 0: bright top half
    img[:, PREP_SIZE // 2 :] += 150 * (label == 1)  # class 1: bright bottom half
    return img.astype(np.uint8)


def _prep_mel(label: int, rng) -> np.ndarray:
    mel = rng.standard_normal((PREP_N_MELS, PREP_N_FRAMES)) * 0.5
    mel[(slice(0, PREP_N_MELS // 2) if label == 0 else slice(PREP_N_MELS // 2, None))] += 1.5
    return mel.astype(np.float16)


def _write_tar(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path), mtime=0) as sink:
        for s in samples:
            sink.write(s)


def make_prep(root: Path, n_train: int = 64, n_val: int = 16) -> Path:
    """A prep folder: image/{train,val}-000000.tar, audio/{train,val}-00000{0,1}.tar, stats.json."""
    rng = np.random.default_rng(0)
    words = ("up", "down")
    for modality in ("image", "audio"):
        (root / modality).mkdir(parents=True)
        for split, n in (("train", n_train), ("val", n_val)):
            samples = []
            for i in range(n):
                label = i % 2
                info = {"key": f"{modality}-{split}-{i}", "label": words[label], "label_id": label,
                        "text": f"a thing that is {words[label]}", "meta": {}}
                data = {"img.npy": _prep_image(label, rng)} if modality == "image" else {"mel.npy": _prep_mel(label, rng)}
                samples.append({"__key__": info["key"], **data, "json": json.dumps(info).encode()})
            if modality == "audio" and split == "train":  # two shards: shard shuffling and skipping across them
                _write_tar(root / modality / f"{split}-000000.tar", samples[: n // 2])
                _write_tar(root / modality / f"{split}-000001.tar", samples[n // 2 :])
            else:
                _write_tar(root / modality / f"{split}-000000.tar", samples)
    stats = {
        "counts": {m: {"train": n_train, "val": n_val} for m in ("image", "audio")},
        "image": {"classes": list(words), "mean": [0.3, 0.3, 0.3], "std": [0.3, 0.3, 0.3], "size": PREP_SIZE},
        "audio": {"classes": list(words), "mean": 0.0, "std": 1.0, "mel": {"n_mels": PREP_N_MELS, "n_frames": PREP_N_FRAMES}},
    }
    (root / "stats.json").write_text(json.dumps(stats))
    return root


# The trainer tests' module fixtures (tests/test_train.py, test_resume.py, test_ddp.py, test_budget.py and
# test_time_cap.py import them): one SQLite MLflow store per module (creating one costs seconds; tests keep apart by
# experiment name) and one tiny prep folder.
@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture(autouse=True)
def _shared_mlflow(mlflow_db, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_db)


@pytest.fixture(scope="module")
def prep(tmp_path_factory) -> Path:
    return make_prep(tmp_path_factory.mktemp("prep"))


def make_codebooks(root: Path) -> dict[str, str]:
    """Random codebooks, saved by the codebook stage's own save_codebook."""
    g = torch.Generator().manual_seed(0)
    paths = {}
    for kind, k, dim, patch, scale in (("pixels", 8, 3, 1, 255.0), ("image", 8, 4 * 4 * 3, 4, 255.0),
                                       ("mel", 8, 16 * 16, 16, 1.0)):
        cb = Codebook.from_codes(torch.rand(k, dim, generator=g) * scale)
        paths[kind] = str(root / f"{kind}.pt")
        save_codebook(cb, Path(paths[kind]), {"kind": kind, "patch": patch})
    return paths



# ---------------------------------------------------------------------------------------------------- CLIP index
INDEX_SIZE = 8
INDEX_CLIP = CLIPConfig(embed_dim=16, img_size=INDEX_SIZE, patch_size=4, vision_dim=16, vision_depth=1,
                        vision_heads=2, context_len=24, text_dim=16, text_depth=1, text_heads=2)
INDEX_LABELS = ["circle", "square"]


def clip_checkpoint(path, seed: int = 0):
    """An untrained INDEX_CLIP in the trainer's checkpoint format, written by the trainer's save_checkpoint."""
    torch.manual_seed(seed)
    model = CLIP(INDEX_CLIP)
    save_checkpoint(path, {"model": "clip", "config": dataclasses.asdict(INDEX_CLIP), "state_dict": model.state_dict(),
                           "step": 0})
    return path


def write_index_prep(prep, n_per_split: int = 10) -> dict[str, np.ndarray]:
    """A prep dir in preprocess's format: image/{split}-000000.tar (img.npy uint8 (3, S, S) + json) and stats.json.
    The last image has no caption. Returns key -> image."""
    rng = np.random.default_rng(0)
    (prep / "image").mkdir(parents=True)
    images = {}
    i = 0
    for split in ("train", "val"):
        with wds.ShardWriter(str(prep / "image" / f"{split}-%06d.tar"), maxcount=1000, mtime=0) as sink:
            for _ in range(n_per_split):
                key = f"img-{i:06d}"
                img = rng.integers(0, 256, size=(3, INDEX_SIZE, INDEX_SIZE), dtype=np.uint8)
                text = "" if i == 2 * n_per_split - 1 else f"a {INDEX_LABELS[i % 2]} number {i}"
                info = {"key": key, "label": INDEX_LABELS[i % 2], "label_id": i % 2, "text": text, "meta": {}}
                sink.write({"__key__": key, "img.npy": img, "json": info})
                images[key] = img
                i += 1
    write_json(prep / "stats.json", {"image": {"classes": INDEX_LABELS, "mean": [0.5, 0.5, 0.5], "std": [0.29, 0.29, 0.29],
                                               "size": INDEX_SIZE}})
    return images


# ---------------------------------------------------------------------------------------------------- MLflow
def tracking_client() -> MlflowClient:
    return MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])


def experiment_runs(experiment: str) -> list:
    c = tracking_client()
    exp = c.get_experiment_by_name(experiment)
    return [] if exp is None else c.search_runs([exp.experiment_id])


def metric_history(run_id: str, key: str) -> dict[int, float]:
    """{step: value} of one metric; fails if any step was logged twice."""
    history = tracking_client().get_metric_history(run_id, key)
    steps = [m.step for m in history]
    assert len(steps) == len(set(steps)), f"{key}: a step was logged twice: {sorted(steps)}"
    return {m.step: m.value for m in history}


def train_losses(run_id: str) -> dict[int, float]:
    return metric_history(run_id, "train/loss")


def all_metrics(run_id: str) -> dict[str, dict[int, float]]:
    """Every metric of the run: {key: {step: value}}."""
    return {key: metric_history(run_id, key) for key in tracking_client().get_run(run_id).data.metrics}


def assert_same_metrics(got: dict, expected: dict) -> None:
    """The same metrics at the same steps; the same values too, except perf/* (timings differ from run to run)."""
    assert sorted(got) == sorted(expected)
    for key in expected:
        assert sorted(got[key]) == sorted(expected[key]), key
        if not key.startswith("perf/"):
            assert got[key] == expected[key], key


# ---------------------------------------------------------------------------------------------------- Prefect
def task_states(flow_run_id, wait_s: float = 60) -> dict[str, str]:
    """Stage name -> final state name (Prefect 3 reports task-run states in the background: poll until final)."""
    deadline = time.monotonic() + wait_s
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        states = {r.name.rsplit("-", 1)[0]: r.state_name for r in runs}
        if not {"Pending", "Running"} & set(states.values()) or time.monotonic() > deadline:
            return states
        time.sleep(1)

