import json
import pyarrow.parquet as pq
import pytest

from tasks import shards as shard_lib
from tasks.common import SUCCESS, sha256_bytes
from tasks.shards import ShardConfig, assign_split, read_samples, shard_urls, write_shards
from tests.helpers import item_rows, write_items


@pytest.fixture
def items(tmp_path):
    rows = item_rows(30, 12)
    path = tmp_path / "items.parquet"
    write_items(path, rows)
    return path, rows


def test_round_trip_same_bytes(items, tmp_path):
    path, rows = items
    out = tmp_path / "shards"
    record = write_shards(path, ShardConfig(maxcount=7), out)
    assert (out / SUCCESS).exists() and (out / "manifest.parquet").exists()
    got = {}
    for modality in ("image", "audio"):
        for split in shard_lib.SPLITS:
            for s in read_samples(shard_urls(out, modality, split)):
                got[s["__key__"]] = s
    assert set(got) == {r["key"] for r in rows}
    for r in rows:
        s = got[r["key"]]
        assert s[r["payload_ext"]] == r["payload"]  # same bytes
        assert sha256_bytes(s[r["payload_ext"]]) == r["sha256"]
        info = json.loads(s["json"])
        assert info["label"] == r["label"] and info["text"] == r["text"]
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert len(manifest) == len(rows)
    for m in manifest:
        assert (out / m["shard"]).is_file()
        assert m["shard"].startswith(f"{m['modality']}/{m['split']}-")
    # maxcount respected, and the record lists every shard with its digest
    assert sum(c for mod in record["counts"].values() for c in mod.values()) == len(rows)
    assert set(record["shards"]) == {str(p.relative_to(out)) for p in out.rglob("*.tar")}
    assert max(sum(1 for m in manifest if m["shard"] == s) for s in record["shards"]) <= 7


def test_deterministic_manifest_and_bytes(items, tmp_path):
    path, _ = items
    a = write_shards(path, ShardConfig(), tmp_path / "a")
    b = write_shards(path, ShardConfig(), tmp_path / "b")
    assert a["digest"] == b["digest"]
    assert a["shards"] == b["shards"]  # byte-identical tar files (sha256 per shard)


def test_split_stable_when_items_are_added(tmp_path):
    cfg = ShardConfig()
    small, big = tmp_path / "small.parquet", tmp_path / "big.parquet"
    write_items(small, item_rows(40, 0))
    write_items(big, item_rows(80, 0))
    write_shards(small, cfg, tmp_path / "s1")
    m1 = {r["key"]: r["split"] for r in pq.read_table(tmp_path / "s1" / "manifest.parquet").to_pylist()}
    write_shards(big, cfg, tmp_path / "s2")
    m2 = {r["key"]: r["split"] for r in pq.read_table(tmp_path / "s2" / "manifest.parquet").to_pylist()}
    assert all(m2[k] == v for k, v in m1.items())
    # the hash split gives roughly the configured fractions
    splits = [assign_split(f"k{i}", cfg) for i in range(5000)]
    assert 0.08 < splits.count("test") / 5000 < 0.12 and 0.08 < splits.count("val") / 5000 < 0.12


def test_split_override(tmp_path):
    rows = item_rows(10, 0)
    for r in rows[:3]:
        r["split"] = "test"
    write_items(tmp_path / "i.parquet", rows)
    write_shards(tmp_path / "i.parquet", ShardConfig(test_fraction=0.0), tmp_path / "o")
    m = {r["key"]: r["split"] for r in pq.read_table(tmp_path / "o" / "manifest.parquet").to_pylist()}
    assert [m[r["key"]] for r in rows[:3]] == ["test"] * 3
    assert all(m[r["key"]] != "test" for r in rows[3:])
    rows[0]["split"] = "holdout"
    write_items(tmp_path / "bad.parquet", rows)
    with pytest.raises(ValueError, match="holdout"):
        write_shards(tmp_path / "bad.parquet", ShardConfig(), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_interrupted_write_leaves_nothing_finished(items, tmp_path, monkeypatch):
    path, _ = items
    calls = {"n": 0}
    real = shard_lib._sample

    def dying(row):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt("killed")
        return real(row)

    monkeypatch.setattr(shard_lib, "_sample", dying)
    out = tmp_path / "shards"
    with pytest.raises(KeyboardInterrupt):
        write_shards(path, ShardConfig(maxcount=5), out)
    assert not out.exists()
    assert not any(tmp_path.glob(".shards.tmp-*"))  # temp cleaned up
    monkeypatch.setattr(shard_lib, "_sample", real)
    write_shards(path, ShardConfig(maxcount=5), out)
    assert (out / SUCCESS).exists()


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="val_fraction=0.6"):
        ShardConfig(val_fraction=0.6, test_fraction=0.5)
