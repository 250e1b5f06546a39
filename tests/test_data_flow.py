"""End to end: the `data` flow on a tiny built-in set, twice (the second run must come from the cache)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flows.cli import main as cli_main
from flows.data import data_flow
from flows.params import DataParams
from tasks.infra.common import read_success
from tests.helpers import task_states


@pytest.mark.usefixtures("prefect_harness")
def test_data_flow_builtin_then_cached(tmp_path):
    params = DataParams(root=tmp_path / "out", size=24, n_mels=32, n_frames=64, shard_maxcount=8)
    state = data_flow(params, return_state=True)
    first = state.result()
    assert state.is_completed()
    states = task_states(state.state_details.flow_run_id)
    assert set(states.values()) == {"Completed"}, states
    for stage in ("ingest", "shards", "prep"):
        assert read_success(first[stage]["path"]) is not None
    manifest = pq.read_table(f"{first['shards']['path']}/manifest.parquet").to_pylist()
    assert {r["modality"] for r in manifest} == {"image", "audio"}
    assert sum(r["modality"] == "image" for r in manifest) == 24
    stats = json.loads((tmp_path / "out" / "prep").glob("*/stats.json").__next__().read_text())
    assert len(stats["image"]["classes"]) >= 4 and stats["audio"]["classes"]

    state2 = data_flow(params, return_state=True)
    assert state2.result() == first
    states2 = task_states(state2.state_details.flow_run_id)
    assert set(states2.values()) == {"Cached"}, states2


@pytest.mark.usefixtures("prefect_harness")
def test_cli_errors_are_one_line(tmp_path, capsys):
    assert cli_main(["data", "--images", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "nope" in err and "does not exist" in err
    assert cli_main(["data", "--size", "-3", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--size" in err and "-3" in err


def test_same_seed_same_manifest_digest(tmp_path):
    """The built-in set, ingested and sharded twice from scratch with one seed, gives one manifest digest."""
    from tasks import stages
    from tasks.data.ingest import IngestConfig
    from tasks.data.shards import ShardConfig
    from tasks.data.builtin.synthetic import SyntheticConfig

    digests = []
    for seed, run in ((0, "a"), (0, "b"), (1, "c")):
        root = tmp_path / run
        ds = stages.builtin_dataset.fn(SyntheticConfig(n_images=16, n_audio=6, seed=seed), root)
        ingested = stages.ingest.fn(stages.builtin_sources(ds["path"]), IngestConfig(), root)
        digests.append(stages.shard.fn(Path(ingested["items"]), ShardConfig(), root)["digest"])
    assert digests[0] == digests[1] != digests[2]


def test_the_data_summary_counts_every_quarantine_and_skip_by_reason():
    from flows.data import _summary

    ingested = {"n_quarantined": 3, "quarantine": "q.parquet", "reasons": {"not a regular file": 1, "hidden file": 2},
                "skipped": {"hidden folder (not searched)": 1}}
    text = _summary(ingested, {"counts": {"image": {"train": 5}}, "path": "s", "digest": "d"}, {"path": "p"})
    assert "quarantined: **3** (hidden file 2, not a regular file 1)" in text
    assert "skipped on purpose: hidden folder (not searched) 1" in text
