"""The project's Prefect cache policy keys on content, config and code, not on path strings or run ids."""

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tasks.infra import cache
from tasks.infra.cache import ContentDigest, content, root_epoch
from tasks.infra.common import read_success
from tasks.stages import transient_only


@dataclass(frozen=True)
class Cfg:
    lr: float = 1e-3


CTX = SimpleNamespace(task=SimpleNamespace(name="t", source_code="def t(): ..."))


def key(policy, **inputs):
    return policy.compute_key(CTX, inputs, {})


def test_path_inputs_are_keyed_by_content(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("same")
    b.write_text("same")
    p = ContentDigest()
    assert key(p, x=a) == key(p, x=b)  # same bytes, other name
    b.write_text("different")
    assert key(p, x=a) != key(p, x=b)
    d = tmp_path / "d"
    d.mkdir()
    (d / "f").write_text("1")
    k1 = key(p, x=d)
    (d / "f").write_text("2")
    assert key(p, x=d) != k1  # folders by the content of their files


def test_config_and_code_change_the_key_run_ids_do_not(tmp_path):
    p = ContentDigest()
    assert key(p, cfg=Cfg()) != key(p, cfg=Cfg(lr=2e-3))
    assert key(p, cfg=Cfg(), parent_run_id="r1") == key(p, cfg=Cfg(), parent_run_id="r2")
    assert key(content(cache), cfg=Cfg()) != key(content(Path), cfg=Cfg())  # the code the task runs is in the key


def test_wiping_the_output_root_invalidates_the_cache(tmp_path):
    p = ContentDigest()
    root = tmp_path / "out"
    k1 = key(p, root=root)
    assert key(p, root=root) == k1
    (root / cache.EPOCH).unlink()
    assert key(p, root=root) != k1
    assert len(root_epoch(root)) == 32


def test_only_transient_io_errors_are_retried():
    def state(exc):
        return SimpleNamespace(result=lambda raise_on_failure=False: exc)

    assert transient_only(None, None, state(OSError("disk hiccup")))
    assert not transient_only(None, None, state(ValueError("bad input")))
    assert not transient_only(None, None, state(FileNotFoundError("gone")))


def test_every_task_keys_its_cache_and_names_its_folder_from_one_code_list(monkeypatch, tmp_path):
    """Each Prefect task of tasks/stages.py is made by its Stage: the cache policy covers exactly the Stage's code,
    and a change to that code moves both the cache key and the output folder."""
    from prefect import Task

    from tasks import stages

    from prefect.cache_policies import NO_CACHE

    tasks_ = {t.name: t for t in vars(stages).values() if isinstance(t, Task)}
    assert set(tasks_) == {s.name for s in stages.STAGES} | {"register"}
    assert tasks_["register"].cache_policy is NO_CACHE  # asks the registry every time (tasks/eval/registry.py)
    for s in stages.STAGES:
        assert tasks_[s.name].cache_policy.code == s.code, s.name
    train, before = stages.TRAIN, stages.TRAIN.out("/r", "vit", Cfg(), under="vit")
    ctx = SimpleNamespace(task=SimpleNamespace(name="train", source_code="def t(): ..."))
    inputs = dict(model="vit", prep=tmp_path / "prep", codebooks={}, cfg=Cfg(), root=tmp_path / "out")
    (tmp_path / "prep").mkdir()
    key_before = tasks_["train"].cache_policy.compute_key(ctx, inputs, {})
    assert key_before is not None
    monkeypatch.setattr(stages, "code_version", lambda *mods: "edited")
    monkeypatch.setattr(cache, "code_version", lambda *mods: "edited")
    assert train.out("/r", "vit", Cfg(), under="vit") != before
    assert tasks_["train"].cache_policy.compute_key(ctx, inputs, {}) not in (key_before, None)
    assert str(before).startswith("/r/train/vit/")


# ---------------------------------------------------------------------------------------------------- outputs
def test_a_record_whose_output_is_unfinished_or_gone_is_never_a_hit(tmp_path):
    """With `output` (the stage's output folder from its inputs) the key holds that folder's epoch, renewed whenever
    the folder has no `_SUCCESS`: a run that finds it missing gets a new key (no stored record matches: it runs), and
    the record it stores is the one later runs find while the folder is there."""
    out = tmp_path / "stage" / "d1"
    p = ContentDigest(output=lambda cfg, root, **_: out)
    missing = key(p, cfg=Cfg(), root=tmp_path)
    assert key(p, cfg=Cfg(), root=tmp_path) != missing  # still missing: never the same key twice
    built = key(p, cfg=Cfg(), root=tmp_path)
    out.mkdir(parents=True)
    assert key(p, cfg=Cfg(), root=tmp_path) != built  # a folder without _SUCCESS is not finished
    built = key(p, cfg=Cfg(), root=tmp_path)
    (out / "_SUCCESS").write_text("{}")
    assert key(p, cfg=Cfg(), root=tmp_path) == built == key(p, cfg=Cfg(), root=tmp_path)  # finished: found
    shutil.rmtree(out)
    assert key(p, cfg=Cfg(), root=tmp_path) != built  # deleted: the stored record is not a hit


def test_an_output_that_cannot_be_named_means_no_cache(tmp_path):
    """If the output folder cannot be worked out (bad inputs), there is no key: the task runs and reports its error."""

    def broken(**_):
        raise ValueError("no such source")

    assert key(ContentDigest(output=broken), cfg=Cfg()) is None


@pytest.mark.usefixtures("prefect_harness")
def test_deleting_an_output_reruns_its_stage(tmp_path):
    """`rm -rf outputs/prep/<digest>; tessera data`: preprocess runs again (not Cached with a dead path), the stages
    before it stay Cached, and the run after that is Cached again with the same records, read back from JSON."""
    from flows.data import data_flow
    from flows.params import DataParams
    from tests.helpers import task_states

    from prefect.settings import get_current_settings

    t0 = time.time() - 1
    params = DataParams(root=tmp_path / "out", size=16, n_mels=32, n_frames=64, shard_maxcount=8)
    first = data_flow(params, return_state=True).result()
    prep = Path(first["prep"]["path"])
    shutil.rmtree(prep)
    state = data_flow(params, return_state=True)
    again = state.result()
    states = task_states(state.state_details.flow_run_id)
    assert states.pop("preprocess") == "Completed" and set(states.values()) == {"Cached"}, states
    assert read_success(prep) is not None and (prep / "stats.json").is_file()
    assert again == first
    state = data_flow(params, return_state=True)
    assert set(task_states(state.state_details.flow_run_id).values()) == {"Cached"}
    assert state.result() == first
    store = Path(get_current_settings().results.local_storage_path)  # what Prefect stored: JSON, not pickle
    stored = [json.loads(f.read_bytes()) for f in store.iterdir() if f.is_file() and f.stat().st_mtime >= t0]
    assert len(stored) >= 5 and {r["metadata"]["serializer"]["type"] for r in stored} == {"json"}
    assert {r["metadata"]["serializer"]["object_decoder"] for r in stored} == {None}


def test_records_are_plain_json():
    """Every stage's result is stored by Prefect as plain JSON (no pickle, no class names to import on read), and a
    record is made of JSON values before it is returned, so a cached re-run reads back an equal record."""
    from prefect import Task
    from prefect.serializers import JSONSerializer

    from tasks import stages

    for t in [t for t in vars(stages).values() if isinstance(t, Task)]:
        assert isinstance(t.result_serializer, JSONSerializer), t.name
        assert t.result_serializer.object_encoder is None and t.result_serializer.object_decoder is None, t.name
    record = {"path": Path("/a/b"), "n": np.int64(3), "loss": np.float32(0.5), "shape": (1, 2), "ok": True,
              "none": None, "nested": {1: [Path("c")]}}
    plain = stages.plain(record)
    assert plain == {"path": "/a/b", "n": 3, "loss": 0.5, "shape": [1, 2], "ok": True, "none": None,
                     "nested": {"1": ["c"]}}
    assert json.loads(json.dumps(plain)) == plain
