"""Shared pytest fixtures: isolated Prefect and MLflow state, so tests never touch the user's."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keep Prefect's home (cached results, local storage) out of the user's ~/.prefect for the whole test session.
os.environ.setdefault("PREFECT_HOME", os.path.join(os.environ.get("PYTEST_TMPDIR", "/tmp"), f"tessera-prefect-{os.getpid()}"))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path, monkeypatch):
    """Every test gets its own MLflow store unless it sets one itself."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API (SQLite) for the flow tests of this session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


# ---------------------------------------------------------------------------------------------------- a tiny world
TINY_MEL = dict(n_mels=32, n_frames=64)
TINY_CODEBOOK_K = {"pixels": 16, "image": 32, "mel": 16}
TINY_CODEBOOK_PATCH = {"pixels": 1, "image": 4, "mel": 16}


@pytest.fixture(scope="session")
def builtin_world(tmp_path_factory):
    """The built-in set at its smallest through every data stage: 48 images (16 px) and 24 clips -> ingest -> shards
    (30% test, so every held-out pair is there) -> preprocess (32 mels x 64 frames) -> codebooks.

    {"root", "dataset", "prep", "codebooks": {kind: path}, "mel": MelConfig}."""
    import numpy as np
    import torch

    from models.vq import fit_kmeans
    from tasks.data.builtin.synthetic import SyntheticConfig, generate
    from tasks.data.codebook import save_codebook
    from tasks.data.features import MelConfig
    from tasks.data.ingest import IngestConfig, Sources, ingest
    from tasks.data.preprocess import PrepConfig, preprocess
    from tasks.data.shards import ShardConfig, write_shards

    tmp = tmp_path_factory.mktemp("builtin-world")
    d = Path(generate(SyntheticConfig(n_images=48, n_audio=24, image_size=16), tmp / "builtin")["path"])
    sources = Sources(images=d / "images", audio=d / "audio", captions=d / "captions.csv",
                      transcripts=d / "transcripts.csv")
    items = ingest(sources, IngestConfig(), tmp / "ingest").items_path
    write_shards(items, ShardConfig(maxcount=16, val_fraction=0.1, test_fraction=0.3), tmp / "shards")
    prep = tmp / "prep"
    preprocess(tmp / "shards", PrepConfig(image_size=16, mel=MelConfig(**TINY_MEL), batch_size=16, mel_patch=16,
                                          n_pixels=2000, n_patches=400), prep)
    codebooks = {}
    for kind, k in TINY_CODEBOOK_K.items():
        x = torch.from_numpy(np.load(prep / "patches" / f"{kind}.npy").astype(np.float32))
        cb, _ = fit_kmeans(x, k, iters=5)
        codebooks[kind] = str(tmp / f"{kind}.pt")
        save_codebook(cb, tmp / f"{kind}.pt", {"kind": kind, "patch": TINY_CODEBOOK_PATCH[kind]})
    return {"root": tmp, "dataset": d, "prep": prep, "codebooks": codebooks, "mel": MelConfig(**TINY_MEL)}


@pytest.fixture(scope="session")
def tiny_checkpoints(builtin_world, tmp_path_factory):
    """Every model of the table, tiny preset, trained for one step by the trainer on `builtin_world`: real
    checkpoints. {"trained": {model: ckpt path}, "blank": {model: the same checkpoint with every weight zeroed}}.

    A blank model's outputs are known: every logit is 0, so a classifier predicts class 0 for everything, a token
    model gives every code the same probability, and every CLIP embedding is the zero vector."""
    import torch

    from tasks.infra.checkpoint import load_checkpoint, save_checkpoint
    from tasks.train import table
    from tasks.train.trainer import TrainConfig, train

    tmp = tmp_path_factory.mktemp("tiny-checkpoints")
    cfg = TrainConfig(max_steps=1, batch_size=4, warmup_steps=1, eval_every=1, ckpt_every=1, log_every=1,
                      precision="fp32", shuffle_buffer=1)
    trained, blank = {}, {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlflow.db")
        for name, spec in table.MODELS.items():
            cbs = {spec.codebook: builtin_world["codebooks"][spec.codebook]} if spec.codebook else {}
            record = train(name, builtin_world["prep"], tmp / name, cfg, codebooks=cbs, preset="tiny")
            trained[name] = Path(record["checkpoint"])
            ckpt = load_checkpoint(trained[name])
            ckpt["state_dict"] = {k: torch.zeros_like(v) for k, v in ckpt["state_dict"].items()}
            blank[name] = tmp / f"{name}-blank.pt"
            save_checkpoint(blank[name], ckpt)
    return {"trained": trained, "blank": blank}
