import io
import json
import tarfile

import pyarrow.parquet as pq
import pytest

from tasks.data import shards as shard_lib
from tasks.data.shards import (BLOCK, CorruptShardError, ShardConfig, TarDamage, assign_split, read_samples,
                               shard_urls, tar_members, write_shards)
from tasks.infra.common import SUCCESS, sha256_bytes
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


# ------------------------------------------------------------------------------------------------ shard_urls
def test_shard_urls_lists_a_split_in_name_order_and_names_the_fix_when_there_is_none(items, tmp_path):
    path, _ = items
    out = tmp_path / "shards"
    record = write_shards(path, ShardConfig(maxcount=7), out)
    want = sorted(s for s in record["shards"] if s.startswith("image/train-"))
    assert len(want) > 1  # several shards: the order is the point
    assert shard_urls(out, "image", "train") == [str(out / s) for s in want]
    with pytest.raises(FileNotFoundError, match=r"no video shards for split 'train' in .*shards/video; "
                                                 r"run `tessera data` first"):
        shard_urls(out, "video", "train")
    assert shard_urls(out, "video", "train", allow_empty=True) == []


def test_shard_urls_refuses_a_cut_or_damaged_shard_by_name(items, tmp_path):
    path, _ = items
    out = tmp_path / "shards"
    write_shards(path, ShardConfig(maxcount=7), out)
    shard = out / "image" / "train-000000.tar"
    good = shard.read_bytes()
    first = list(tar_members(lambda o, n: good[o:o + n], len(good)))
    cut = first[2][1] - BLOCK  # the third member's header: the archive is cut at a member boundary
    shard.write_bytes(good[:cut])
    with pytest.raises(CorruptShardError, match=rf"train-000000\.tar is truncated or damaged: it ends at byte {cut} "
                                                r"without an end-of-archive marker.*`tessera data` \(delete "
                                                rf"{out} to rebuild it\)"):
        shard_urls(out, "image", "train")
    shard.write_bytes(good[:cut] + b"\xff" * 64 + good[cut + 64:])  # the name field of that header
    with pytest.raises(CorruptShardError, match=rf"damaged: the member header at byte {cut} is damaged \(bad checksum"):
        shard_urls(out, "image", "train")
    shard.write_bytes(good)
    assert shard_urls(out, "image", "train")[0] == str(shard)


# ------------------------------------------------------------------------------------------------ tar headers
def _tar(fmt: int, members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, kind in (("folder", tarfile.DIRTYPE), ("link", tarfile.SYMTYPE)):  # not regular files: skipped
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "a.txt" if kind == tarfile.SYMTYPE else ""
            tar.addfile(info)
    return buf.getvalue()


def _walk(data: bytes) -> list[tuple[str, bytes]]:
    return [(name, data[start:end]) for name, start, end in tar_members(lambda o, n: data[o:o + n], len(data))]


LONG = "d" * 120 + "/key.img.npy"  # > 100 characters: a GNU long-name member or a pax path record


@pytest.mark.parametrize("fmt, members", [
    (tarfile.USTAR_FORMAT, [("a.txt", b"abc"), ("dir/k.json", b"{}"), ("empty.txt", b"")]),
    (tarfile.GNU_FORMAT, [("a.txt", b"abc"), (LONG, b"x" * 700)]),
    (tarfile.PAX_FORMAT, [("a.txt", b"abc"), (LONG, b"x" * 700), ("café/clé.json", b"[1]")]),
])
def test_tar_members_reads_every_header_format_as_tarfile_does(fmt, members):
    data = _tar(fmt, members)
    assert _walk(data) == members
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert [(i.name, i.offset_data, i.offset_data + i.size) for i in tar if i.isreg()] == list(
            tar_members(lambda o, n: data[o:o + n], len(data)))


def _rechecksum(head: bytearray, signed: bool = False) -> None:
    head[148:156] = b" " * 8
    total = sum(b - 256 if signed and b >= 128 else b for b in head)
    head[148:156] = b"%06o\0 " % total


def test_tar_members_reads_base256_sizes_and_signed_checksums():
    data = bytearray(_tar(tarfile.USTAR_FORMAT, [("é.bin", b"y" * 700)]))  # "é" is two bytes >= 128 in the name
    head = data[:BLOCK]
    head[124:136] = b"\x80" + (700).to_bytes(11, "big")  # GNU base-256 size
    _rechecksum(head, signed=True)
    data[:BLOCK] = head
    assert _walk(bytes(data)) == [("é.bin", b"y" * 700)]


def test_tar_members_refuses_what_tarfile_would_read_as_a_shorter_archive():
    data = _tar(tarfile.USTAR_FORMAT, [("a.txt", b"abc"), ("b.txt", b"d" * 700)])  # headers at bytes 0 and 1024
    with tarfile.open(fileobj=io.BytesIO(data[:1024])) as tar:
        assert tar.getnames() == ["a.txt"]  # what webdataset (tarfile) sees of a cut shard: no error
    with pytest.raises(TarDamage, match=r"^it ends at byte 1024 without an end-of-archive marker \(truncated\)$"):
        _walk(data[:1024])  # cut after the first member: tarfile lists a.txt and stops, silently
    with pytest.raises(TarDamage, match=r"^it ends at byte 2000 inside the member at byte 1024 \(truncated\)$"):
        _walk(data[:2000])
    with pytest.raises(TarDamage, match=r"^a zero block at byte 1024 is not followed by the end-of-archive marker$"):
        _walk(data[:1024] + bytes(BLOCK) + data[1024:])
    damaged = bytearray(data)
    damaged[1024 + 10] ^= 1  # a bit of the second header's name
    with pytest.raises(TarDamage, match=r"^the member header at byte 1024 is damaged \(bad checksum\)$"):
        _walk(bytes(damaged))
