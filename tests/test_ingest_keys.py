"""Ingest's keys, order, caching and atomicity: keys stable when items are added or the tree moves, nothing written
by a run that fails midway, cache keys that follow the inputs' content, and the limits users set."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from PIL import Image

from tasks.data import ingest as ing
from tasks.data.ingest import IngestConfig, IngestError, Sources, digest_sources, ingest
from tests.tiny_inputs import img2dataset_sample, read_items, read_quarantine, save_audio, save_image, write_tar

CFG = IngestConfig()


# ---- keys, order, caching, atomicity -------------------------------------------------------------------------------


def test_keys_stable_when_items_are_added_and_the_folder_moves(tmp_path, monkeypatch):
    monkeypatch.setattr(ing, "ROW_GROUP_ROWS", 2)  # several row groups even for a tiny set
    root = tmp_path / "a" / "images"
    for i in range(5):
        save_image(root / ("cat" if i % 2 else "dog") / f"{i}.png", colour=(i, 0, 0))
    save_audio(tmp_path / "a" / "audio" / "hi" / "x.wav")
    sources = Sources(images=root, audio=tmp_path / "a" / "audio")
    first = ingest(sources, CFG, tmp_path / "o1")
    keys1 = {r["source"].split("/a/")[1]: r["key"] for r in read_items(first)}
    assert [r["key"] for r in read_items(first)] == sorted(keys1.values())
    assert pq.ParquetFile(first.items_path).metadata.num_row_groups == 3

    # rerun: the finished directory answers without decoding anything
    monkeypatch.setattr(ing, "decode_image", lambda *a: pytest.fail("decoded again"))
    assert ingest(sources, CFG, tmp_path / "o1") == first
    monkeypatch.undo()

    digest1 = digest_sources(sources, CFG)
    shutil.move(tmp_path / "a", tmp_path / "b")
    moved_sources = Sources(images=tmp_path / "b" / "images", audio=tmp_path / "b" / "audio")
    assert digest_sources(moved_sources, CFG) == digest1
    moved = ingest(moved_sources, CFG, tmp_path / "o2")
    assert {r["source"].split("/b/")[1]: r["key"] for r in read_items(moved)} == keys1
    assert moved.digest == first.digest

    save_image(tmp_path / "b" / "images" / "cat" / "new.png")
    assert digest_sources(moved_sources, CFG) != digest1
    grown = {r["source"].split("/b/")[1]: r["key"] for r in read_items(ingest(moved_sources, CFG, tmp_path / "o3"))}
    assert len(grown) == len(keys1) + 1 and all(grown[k] == v for k, v in keys1.items())


def test_table_rows_outside_the_tables_folder_keep_their_keys_when_the_tree_moves(tmp_path):
    """A row naming a file beside the table's folder (../clips/x.png, allowed by allow_roots) is keyed by its path
    from the table's folder, not by its absolute path: a moved or cloned tree keys (and so splits) alike."""
    for name in ("a", "b"):
        save_image(tmp_path / "a" / "imgs" / f"{name}.png", colour=(ord(name), 0, 0))
    (tmp_path / "a" / "meta").mkdir()
    (tmp_path / "a" / "meta" / "captions.csv").write_text("image,caption\n../imgs/a.png,red\n../imgs/b.png,blue\n")

    def keyed(tree):
        sources = Sources(captions=tree / "meta" / "captions.csv", allow_roots=(str(tree),))
        rows = read_items(ingest(sources, CFG, tmp_path / f"out-{tree.name}"))
        return digest_sources(sources, CFG), {r["text"]: r["key"] for r in rows}

    digest, keys = keyed(tmp_path / "a")
    assert len(set(keys.values())) == 2
    shutil.move(tmp_path / "a", tmp_path / "b")
    assert keyed(tmp_path / "b") == (digest, keys)


class Boom(BaseException):
    pass


@pytest.mark.parametrize("where", ["decode", "write"])
def test_an_exception_midway_leaves_no_output(tmp_path, monkeypatch, where):
    for i in range(6):
        save_image(tmp_path / "images" / "c" / f"{i}.png", colour=(i, i, i))
    calls = []

    def decode_then_fail(data, *limits):
        calls.append(1)
        if len(calls) == 3:
            raise Boom("decoder blew up")
        return real_decode(data, *limits)

    def fail_writing(*args):
        raise RuntimeError("disk full")

    real_decode = ing.decode_image
    if where == "decode":
        monkeypatch.setattr(ing, "decode_image", decode_then_fail)
    else:
        monkeypatch.setattr(ing, "_write_items", fail_writing)
    with pytest.raises((Boom, RuntimeError)):
        ingest(Sources(images=tmp_path / "images"), CFG, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]  # no out, no temp sibling


# ---- cache keys follow the inputs' content (issue 14 item 5) -------------------------------------------------------


def test_shard_globs_are_keyed_by_the_files_they_match(tmp_path):
    """`--shards 'dir/*.tar'` was keyed by the glob's text: a shard rewritten in place, or a new file matching the
    glob, left the key as it was. Both keys (the output folder's and the pipeline cache's) now follow every file the
    glob expands to (path, size, mtime_ns) and every folder and table file (content / stat)."""
    d = tmp_path / "shards"
    d.mkdir()
    write_tar(d / "a.tar", [img2dataset_sample(0)])
    (tmp_path / "t").mkdir()
    save_image(tmp_path / "t" / "x.png")
    (tmp_path / "t" / "caps.csv").write_text("image,caption\nx.png,hello\n")
    sources = Sources(shards=(str(d / "*.tar"),), captions=tmp_path / "t" / "caps.csv")

    def keys():
        return digest_sources(sources, CFG), sources.cache_key()

    first = keys()
    assert keys() == first  # nothing touched: the same keys (a re-run is Cached)
    st = (d / "a.tar").stat()
    data = (d / "a.tar").read_bytes().replace(b"photo 0", b"photo 9")  # rewritten in place, the same size
    (d / "a.tar").write_bytes(data)
    os.utime(d / "a.tar", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a later write (not within one mtime tick)
    rewritten = keys()
    assert rewritten[0] != first[0] and rewritten[1] != first[1]
    write_tar(d / "b.tar", [img2dataset_sample(2)])  # a new file matching the glob
    added = keys()
    assert added[0] != rewritten[0] and added[1] != rewritten[1]
    save_image(tmp_path / "t" / "x.png", colour=(0, 0, 0))  # a file only the table names, changed
    changed = keys()
    assert changed[0] != added[0] and changed[1] != added[1]


# ---- limits users can set (issue 14 item 9) ------------------------------------------------------------------------


def test_limits_are_parameters(tmp_path):
    save_audio(tmp_path / "a" / "x" / "long.wav", sr=8000, seconds=31.0)
    save_audio(tmp_path / "a" / "x" / "short.wav")
    save_image(tmp_path / "i" / "c" / "big.png", size=(200, 100))
    save_image(tmp_path / "i" / "c" / "small.png", size=(10, 10))
    sources = Sources(images=tmp_path / "i", audio=tmp_path / "a")

    strict = ingest(sources, IngestConfig(max_pixels=10_000), tmp_path / "o1")
    reasons = {q["source"].rsplit("/", 1)[-1]: q["reason"] for q in read_quarantine(strict)}
    assert reasons == {"long.wav": "audio too long: 31.000 s > max_duration_s=30.0 (raise --max-clip-seconds)",
                       "big.png": "image too large: 200 x 100 = 20000 pixels > max_pixels=10000 (raise --max-pixels)"}
    loose = ingest(sources, IngestConfig(max_duration_s=60, decoder_threads=1), tmp_path / "o2")
    assert loose.n_items == {"image": 2, "audio": 2} and loose.n_quarantined == 0
    with pytest.raises(IngestError, match="decoder_threads"):
        IngestConfig(decoder_threads=-1)


def test_limits_and_allowed_roots_from_the_command_line(tmp_path):
    from flows.cli import build_parser, data_params
    from flows.data import _configs

    (tmp_path / "i").mkdir()
    (tmp_path / "r1").mkdir()
    (tmp_path / "r2").mkdir()
    args = build_parser().parse_args([
        "data", "--images", str(tmp_path / "i"), "--allow-root", str(tmp_path / "r1"), "--allow-root",
        str(tmp_path / "r2"), "--max-clip-seconds", "60", "--max-pixels", "1000", "--max-file-mb", "3",
        "--decoder-threads", "2", "--config", "",
    ])
    params = data_params(args)
    assert params.allow_roots == [tmp_path / "r1", tmp_path / "r2"]
    cfg = _configs(params)[0]
    assert (cfg.max_duration_s, cfg.max_pixels, cfg.max_file_bytes, cfg.decoder_threads) == (60, 1000, 3 << 20, 2)
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="--allow-root"):
        data_params(build_parser().parse_args(["data", "--allow-root", str(tmp_path / "nope"), "--config", ""]))


def test_every_change_on_the_way_in_is_counted(tmp_path):
    """Resampling, mixing to mono and converting images are counted in the summary, never silent."""
    (tmp_path / "a" / "x").mkdir(parents=True)
    (tmp_path / "i" / "x").mkdir(parents=True)
    t = np.arange(8000) / 8000
    sf.write(tmp_path / "a" / "x" / "st.wav", np.stack([np.sin(2 * np.pi * 300 * t)] * 2, 1).astype(np.float32) * 0.3,
             8000)
    Image.new("L", (16, 16), 128).save(tmp_path / "i" / "x" / "grey.png")
    Image.new("RGB", (16, 16), (1, 2, 3)).save(tmp_path / "i" / "x" / "rgb.png")
    res = ingest(Sources(images=tmp_path / "i", audio=tmp_path / "a"), IngestConfig(), tmp_path / "out")
    assert res.changes == {"audio mixed from 2 channels to mono": 1, "audio resampled 8000 Hz -> 16000 Hz": 1,
                           "image converted from L to RGB": 1}
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["changes"] == res.changes
