"""Remote storage: shard, manifest, prep, checkpoint and index locations given as fsspec URLs.

fsspec's local (file://) and memory (memory://) filesystems stand in for s3:// and gs://: file:// takes the local
code path (rename-atomic), memory:// the object-store one (staged locally, uploaded, `_SUCCESS` last; one PUT per
file), the path s3:// and gs:// take with s3fs and gcsfs installed.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import uuid
from dataclasses import asdict, replace
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest
import torch
from mlflow import MlflowClient
from pydantic import ValidationError

from flows.params import DataParams, PipelineParams
from models.vit import ViT, ViTConfig
from tasks import stages
from tasks.data import loader
from tasks.data.features import MelConfig
from tasks.data.preprocess import PrepConfig
from tasks.data.shards import CorruptShardError, ShardConfig, read_samples, shard_urls, write_shards
from tasks.index import IndexConfig, IndexIntegrityError, build_index, load_index, search_text
from tasks.infra import cache, storage
from tasks.infra.cache import ContentDigest, path_digest
from tasks.infra.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tasks.infra.common import SUCCESS, atomic_dir, read_success, tree_digest, write_json
from tasks.train import table
from tasks.train.trainer import train
from tests.helpers import item_rows, write_items
from tests.helpers import TINY_TRAIN, make_prep, write_index_prep
from tests.helpers import clip_checkpoint as save_clip

MEMORY = "memory://tessera-tests"


@pytest.fixture
def mem():
    """A fresh memory:// folder, removed afterwards (the memory filesystem is one store per process)."""
    url = f"{MEMORY}/{uuid.uuid4().hex[:12]}"
    yield url
    storage.rmtree(url)


@pytest.fixture(params=["file", "memory"])
def store(request, tmp_path, mem) -> str:
    """The same tests against fsspec's local filesystem (file://) and its memory filesystem (memory://)."""
    return (tmp_path / "store").as_uri() if request.param == "file" else mem


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"  # one store for the module: creating one costs s


def upload(local: Path, url: str) -> str:
    """Copy a finished local folder to `url` the way atomic_dir publishes one (`_SUCCESS` last)."""
    if not (local / SUCCESS).exists():
        write_json(local / SUCCESS, {"digest": tree_digest(local)[:32]})
    if storage.is_remote(url):
        storage.upload_dir(local, url, last=SUCCESS)
    else:
        shutil.copytree(local, storage.location(url))
    return url


# ------------------------------------------------------------------------------------------------ locations
def test_locations_keep_urls_whole_and_name_the_fix():
    assert storage.location("file:///tmp/a/b") == Path("/tmp/a/b")  # local: the Path code path, unchanged
    assert storage.location("memory://bucket/x/") == "memory://bucket/x"
    assert storage.location("s3://bucket/prefix") == "s3://bucket/prefix"  # not Path("s3:/bucket/prefix")
    assert storage.location(Path("rel/x")) == Path("rel/x") and storage.location("rel/x") == Path("rel/x")
    assert storage.join("s3://b/p", "shards", "abc") == "s3://b/p/shards/abc"
    assert storage.join("/tmp/p", "shards") == Path("/tmp/p/shards")
    assert storage.name("gs://b/p/ckpt.pt") == "ckpt.pt" and storage.parent("gs://b/p/ckpt.pt") == "gs://b/p"
    assert storage.is_remote("memory://x") and not storage.is_remote("file:///x") and not storage.is_remote("x")
    with pytest.raises(ValueError, match=r"cannot open nosuch://b/k: .*use an fsspec URL"):
        storage.check("nosuch://b/k")
    if importlib.util.find_spec("s3fs") is None:
        with pytest.raises(ValueError, match=r"cannot open s3://b/k: .*pip install s3fs"):
            storage.check("s3://b/k")


def test_flow_params_take_a_store_url():
    assert DataParams(store="memory://bucket/data").store == "memory://bucket/data"
    with pytest.raises(ValidationError, match="nosuch://x"):
        DataParams(store="nosuch://x")
    with pytest.raises(ValidationError, match=r"data\.store=memory://b.*local store"):
        PipelineParams(data=DataParams(store="memory://b"))
    assert PipelineParams(data=DataParams(store="/tmp/local-store")).data.store == "/tmp/local-store"


# ------------------------------------------------------------------------------------------------ atomic writes
def test_remote_folder_is_finished_only_when_success_is_there(mem, monkeypatch):
    record = {}
    with atomic_dir(f"{mem}/out", record) as tmp:
        assert isinstance(tmp, Path)  # a local staging folder
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.bin").write_bytes(b"a")
        (tmp / "z.bin").write_bytes(b"z")
        record["digest"] = "d1"
    assert read_success(f"{mem}/out") == {"digest": "d1"}
    assert storage.files(f"{mem}/out") == [SUCCESS, "sub/a.bin", "z.bin"]

    # an exception in the body publishes nothing
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(f"{mem}/failed") as tmp:
        (tmp / "a.bin").write_bytes(b"a")
        raise RuntimeError("boom")
    assert not storage.exists(f"{mem}/failed")

    # an upload that dies part-way leaves files but no _SUCCESS: unfinished, and a re-run replaces it
    fs, _ = storage.filesystem(mem)
    real_put, order = type(fs).put_file, []

    def dying_put(self, lpath, rpath, **kw):
        order.append(Path(rpath).name)
        if len(order) == 2:
            raise OSError("connection reset")
        return real_put(self, lpath, rpath, **kw)

    monkeypatch.setattr(type(fs), "put_file", dying_put)
    with pytest.raises(OSError, match="connection reset"), atomic_dir(f"{mem}/half", {"digest": "d2"}) as tmp:
        for name in ("a.bin", "b.bin", "c.bin"):
            (tmp / name).write_bytes(name.encode())
    assert storage.files(f"{mem}/half") == ["a.bin"] and read_success(f"{mem}/half") is None
    monkeypatch.setattr(type(fs), "put_file", real_put)
    with atomic_dir(f"{mem}/half", {"digest": "d3"}) as tmp:
        (tmp / "new.bin").write_bytes(b"n")
    assert storage.files(f"{mem}/half") == [SUCCESS, "new.bin"] and read_success(f"{mem}/half")["digest"] == "d3"

    # _SUCCESS is the last object written
    order.clear()
    monkeypatch.setattr(type(fs), "put_file", lambda self, lp, rp, **kw: (order.append(Path(rp).name),
                                                                          real_put(self, lp, rp, **kw)))
    with atomic_dir(f"{mem}/order", {}) as tmp:
        for name in ("x.bin", "y.bin", "zz.bin"):
            (tmp / name).write_bytes(b"1")
    assert order[-1] == SUCCESS and sorted(order[:-1]) == ["x.bin", "y.bin", "zz.bin"]


# ------------------------------------------------------------------------------------------------ shards + manifest
def test_shards_and_manifest_at_a_url_match_the_local_ones(store, tmp_path):
    items = tmp_path / "items.parquet"
    rows = item_rows(14, 6)
    write_items(items, rows)
    cfg = ShardConfig(maxcount=5)
    local = write_shards(items, cfg, tmp_path / "local")
    out = f"{store}/shards"
    record = write_shards(items, cfg, out)
    assert record == local  # same manifest digest, same shard files byte for byte
    assert read_success(out) == record
    with storage.open(f"{out}/manifest.parquet") as f:
        manifest = pq.read_table(f).to_pylist()
    assert sorted(m["key"] for m in manifest) == sorted(r["key"] for r in rows)
    seen = {}
    for modality in ("image", "audio"):
        for split in ("train", "val", "test"):
            urls = shard_urls(out, modality, split, allow_empty=True)
            want = shard_urls(tmp_path / "local", modality, split, allow_empty=True)
            assert [storage.name(u) for u in urls] == [Path(w).name for w in want]
            assert all(u.startswith(str(storage.location(out))) for u in urls)
            seen.update({s["__key__"]: s for s in read_samples(urls)})
    assert {k: s[r["payload_ext"]] for r in rows for k, s in seen.items() if k == r["key"]} == {
        r["key"]: r["payload"] for r in rows}
    # the cache keys a URL by content: the recorded digest, as for the local folder
    assert path_digest(out) == path_digest(tmp_path / "local") == record["digest"]


def test_a_remote_folder_without_success_is_refused(mem, tmp_path):
    make_prep(tmp_path / "prep")
    fsspec.filesystem("memory").put(str(tmp_path / "prep"), storage.filesystem(mem)[1], recursive=True)
    assert storage.files(mem) and read_success(mem) is None
    with pytest.raises(FileNotFoundError, match=rf"{mem} has no _SUCCESS: it is unfinished"):
        shard_urls(mem, "image", "train")


# ------------------------------------------------------------------------------------------------ loader, trainer
def test_loader_streams_remote_shards_and_checks_them(mem, tmp_path):
    prep = make_prep(tmp_path / "prep")
    url = upload(prep, f"{mem}/prep")
    assert tree_digest(url) == tree_digest(prep)  # the same files, the same digest, wherever they are
    remote, local = shard_urls(url, "audio", "train"), shard_urls(prep, "audio", "train")
    assert remote == [f"{url}/audio/train-000000.tar", f"{url}/audio/train-000001.tar"]

    def keys(urls):
        return [[s["__key__"] for s in b] for b in loader.batches(urls, 8, seed=3, shuffle_buffer=16)]

    assert keys(remote) == keys(local)  # the same order: it depends on (seed, epoch), not on where shards live
    good = storage.read_bytes(remote[0])
    storage.write_bytes(remote[0], good[:4096])  # cut at a member boundary
    with pytest.raises(CorruptShardError, match=rf"{remote[0]} is truncated.*end-of-archive"):
        shard_urls(url, "audio", "train")


def _losses(run_id: str) -> list[float]:
    history = MlflowClient().get_metric_history(run_id, "train/loss")
    return [m.value for m in sorted(history, key=lambda m: m.step)]


def test_data_tasks_write_to_a_store_and_the_trainer_streams_it_back(store, tmp_path, mlflow_db, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_db)
    items = tmp_path / "items.parquet"
    write_items(items, item_rows(16, 8))
    prep_cfg = PrepConfig(image_size=16, mel=MelConfig(n_mels=16, n_frames=32), n_pixels=500, n_patches=200)
    local_sharded = stages.shard.fn(items, ShardConfig(), tmp_path / "local")
    sharded = stages.shard.fn(items, ShardConfig(), store)
    assert sharded["path"].startswith(str(storage.location(store))) and sharded["digest"] == local_sharded["digest"]
    local_prep = stages.preprocess.fn(Path(local_sharded["path"]), prep_cfg, tmp_path / "local")
    prepared = stages.preprocess.fn(storage.location(sharded["path"]), prep_cfg, store)
    assert prepared["digest"] == local_prep["digest"]  # the same model-ready files
    assert Path(prepared["path"]).name == Path(local_prep["path"]).name  # the same content-addressed key

    cfg = replace(TINY_TRAIN, max_steps=3, eval_every=3, ckpt_every=3, log_every=3, batch_size=4)
    record = train("vit", prepared["path"], tmp_path / "run", cfg, preset="tiny", experiment=f"remote-{uuid.uuid4()}")
    reference = train("vit", local_prep["path"], tmp_path / "ref", cfg, preset="tiny", experiment="remote-ref")
    assert _losses(record["run_id"]) == _losses(reference["run_id"])  # streamed from the store, same batches
    with pytest.raises(ValueError, match=r"out_dir=memory://x is a URL; pass a local folder"):
        train("vit", prepared["path"], "memory://x", cfg, preset="tiny")


# ------------------------------------------------------------------------------------------------ checkpoints
def test_checkpoints_at_a_url_save_and_load_weights_only(store, tmp_path, monkeypatch):
    ckpt = {"model": "vit", "state_dict": {"w": torch.arange(6.0).view(2, 3)}, "step": 7, "rng": [1, 2]}
    url = f"{store}/run/ckpt.pt"
    if not storage.is_remote(url):
        storage.location(url).parent.mkdir(parents=True)
    save_checkpoint(url, ckpt)
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: (loads.append(kw.get("weights_only")), real_load(*a, **kw))[1])
    got = load_checkpoint(url)
    assert loads == [True] and got["step"] == 7 and torch.equal(got["state_dict"]["w"], ckpt["state_dict"]["w"])
    save_checkpoint(url, {**ckpt, "step": 8})  # overwritten whole
    assert load_checkpoint(url)["step"] == 8
    assert storage.files(f"{store}/run") == ["ckpt.pt"]  # no temporary left behind

    storage.write_bytes(url, b"PK\x03\x04 not a checkpoint")
    with pytest.raises(CheckpointError, match=r"ckpt\.pt cannot be read.*delete"):
        load_checkpoint(url)
    save_checkpoint(url, {"bad": Path("x")})  # an object outside the weights-only allowlist: refused, not unpickled
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(url)
    with pytest.raises(CheckpointError, match=r"gone\.pt does not exist.*train\.json"):
        load_checkpoint(f"{store}/run/gone.pt")


def test_a_trained_model_rebuilds_from_a_checkpoint_url(mem):
    cfg = ViTConfig(img_size=16, patch_size=4, dim=32, depth=1, n_heads=2, n_classes=2)
    torch.manual_seed(0)
    model = ViT(cfg)
    save_checkpoint(f"{mem}/ckpt.pt", {"model": "vit", "config": asdict(cfg), "state_dict": model.state_dict()})
    rebuilt, ckpt = table.build_from_checkpoint(f"{mem}/ckpt.pt")
    assert not rebuilt.training and ckpt["config"] == asdict(cfg)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), model.state_dict().values()))


# ------------------------------------------------------------------------------------------------ index
def test_index_built_and_loaded_at_urls(store, tmp_path):
    write_index_prep(tmp_path / "prep")
    prep = upload(tmp_path / "prep", f"{store}/prep")
    ckpt = f"{store}/clip.pt"
    save_clip(tmp_path / "clip.pt")
    storage.write_bytes(ckpt, (tmp_path / "clip.pt").read_bytes())
    cfg = IndexConfig(batch_size=8)
    local = build_index(tmp_path / "prep", tmp_path / "clip.pt", tmp_path / "index", cfg)
    out = stages.CLIP_INDEX.out(store, path_digest(prep), path_digest(ckpt), cfg)
    here = stages.CLIP_INDEX.out(tmp_path, path_digest(tmp_path / "prep"), path_digest(tmp_path / "clip.pt"), cfg)
    assert out == storage.join(store, "index", storage.name(here))  # keyed by content, not by location
    record = build_index(prep, ckpt, out, cfg)
    assert record == local  # the same index, row map and embeddings, byte for byte
    loaded = load_index(out)
    assert loaded.provenance["model"]["checkpoint"] == str(storage.location(ckpt))
    hits = search_text(loaded, "a circle", k=5)
    assert [h.key for h in hits] == [h.key for h in search_text(load_index(tmp_path / "index"), "a circle", k=5)]

    rows = storage.join(out, "rows.parquet")
    storage.write_bytes(rows, storage.read_bytes(rows) + b"\0")
    with pytest.raises(IndexIntegrityError, match=r"rows\.parquet changed.*rebuild with `tessera index`"):
        load_index(out)


# ------------------------------------------------------------------------------------------------ cache keys
def _key(**inputs) -> str:
    from types import SimpleNamespace

    ctx = SimpleNamespace(task=SimpleNamespace(name="t", source_code="def t(): ..."))
    return ContentDigest().compute_key(ctx, inputs, {})


def test_cache_keys_a_url_by_content_and_a_root_url_by_its_epoch(mem, tmp_path):
    a, b = f"{mem}/a.bin", f"{mem}/b.bin"
    storage.write_bytes(a, b"same")
    storage.write_bytes(b, b"same")
    assert _key(x=a) == _key(x=b)  # content, not the URL text
    storage.write_bytes(b, b"other")
    assert _key(x=a) != _key(x=b)
    (tmp_path / "f.bin").write_bytes(b"same")
    assert _key(x=(tmp_path / "f.bin").as_uri()) == _key(x=tmp_path / "f.bin") == _key(x=a)
    assert _key(x=f"{mem}/missing") != _key(x=f"{mem}/missing2")  # absent: keyed by where, never silently equal

    k1 = _key(root=f"{mem}/root")
    assert _key(root=f"{mem}/root") == k1 and storage.isfile(f"{mem}/root/{cache.EPOCH}")
    storage.rmtree(f"{mem}/root")  # a wiped store invalidates what was cached against it
    assert _key(root=f"{mem}/root") != k1


@pytest.mark.usefixtures("prefect_harness")
def test_data_flow_writes_to_a_store_url_and_is_cached_the_second_time(mem, tmp_path):
    from flows.data import data_flow
    from tests.helpers import task_states as _task_states

    params = DataParams(root=tmp_path / "out", store=mem, size=12, n_mels=32, n_frames=64, shard_maxcount=8)
    state = data_flow(params, return_state=True)
    first = state.result()
    assert first["shards"]["path"].startswith(f"{mem}/shards/") and first["prep"]["path"].startswith(f"{mem}/prep/")
    assert read_success(first["prep"]["path"]) is not None and not (tmp_path / "out" / "shards").exists()
    stats = json.loads(storage.read_text(f"{first['prep']['path']}/stats.json"))
    assert stats["image"]["size"] == 32 and shard_urls(first["prep"]["path"], "image", "train")
    state2 = data_flow(params, return_state=True)
    assert state2.result() == first
    assert set(_task_states(state2.state_details.flow_run_id).values()) == {"Cached"}
