"""Splits a user controls: a split column, train/val/test folders, fields read from file names, and group splits
that keep every speaker (fold, session) wholly in one split."""

from __future__ import annotations

import json
import re

import pyarrow.parquet as pq
import pytest

from tasks.data.ingest import IngestConfig, IngestError, Sources, ingest
from tasks.data.shards import ShardConfig, write_shards
from tests.helpers import wav_bytes

SPEAKERS = ("ann", "bob", "cy", "dee", "eve", "fay", "gus", "hal")


@pytest.fixture
def digits(tmp_path):
    """A flat folder of spoken-digit-style files named {digit}_{speaker}_{take}.wav: 2 digits x 8 speakers x 3."""
    d = tmp_path / "recordings"
    d.mkdir()
    for digit in ("0", "1"):
        for s, speaker in enumerate(SPEAKERS):
            for take in range(3):
                (d / f"{digit}_{speaker}_{take}.wav").write_bytes(wav_bytes(300 + 50 * s + 7 * take, 0.2))
    return d


def _manifest(tmp_path, sources, cfg, shard_cfg) -> list[dict]:
    res = ingest(sources, cfg, tmp_path / "ingest")
    write_shards(res.items_path, shard_cfg, tmp_path / "shards")
    rows = pq.read_table(tmp_path / "shards" / "manifest.parquet").to_pylist()
    return [{**r, "meta": json.loads(r["meta"] or "{}")} for r in rows]


def test_file_name_fields_label_the_items_and_name_the_held_out_speaker(digits, tmp_path):
    rows = _manifest(tmp_path, Sources(audio=digits), IngestConfig(name_pattern="{label}_{speaker}_{take}"),
                     ShardConfig(split_by="speaker", test_groups=("cy",), val_fraction=0.2))
    assert len(rows) == 48 and {r["label"] for r in rows} == {"0", "1"}
    by_split = {s: {r["meta"]["speaker"] for r in rows if r["split"] == s} for s in ("train", "val", "test")}
    assert by_split["test"] == {"cy"} and "cy" not in by_split["train"] | by_split["val"]
    assert by_split["val"] and by_split["val"] <= by_split["train"]  # val: held-out takes of the training speakers
    assert {r["split_source"] for r in rows if r["split"] == "test"} == {"speaker=cy"}


def test_hashed_groups_never_straddle_two_splits(digits, tmp_path):
    rows = _manifest(tmp_path, Sources(audio=digits), IngestConfig(name_pattern="{label}_{speaker}_{take}"),
                     ShardConfig(split_by="speaker", val_fraction=0.2, test_fraction=0.2))
    splits_of = {}
    for r in rows:
        splits_of.setdefault(r["meta"]["speaker"], set()).add(r["split"])
    assert all(len(s) == 1 for s in splits_of.values()), splits_of
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    assert {r["split_source"] for r in rows} == {f"speaker={s}" for s in SPEAKERS}


def test_too_few_groups_for_a_split_is_one_line(digits, tmp_path):
    with pytest.raises(ValueError, match=r"^--split-by take: 3 group\(s\) leave the .* split\(s\) empty; name the "
                                         r"groups with --test-groups/--val-groups, or change the fractions$"):
        _manifest(tmp_path, Sources(audio=digits), IngestConfig(name_pattern="{label}_{speaker}_{take}"),
                  ShardConfig(split_by="take", val_fraction=0.01, test_fraction=0.01))


def test_a_file_name_that_does_not_match_the_pattern_is_quarantined(digits, tmp_path):
    (digits / "notes.wav").write_bytes(wav_bytes(440, 0.2))
    res = ingest(Sources(audio=digits), IngestConfig(name_pattern="{label}_{speaker}_{take}"), tmp_path / "ingest")
    reasons = [r["reason"] for r in pq.read_table(res.quarantine_path).to_pylist()]
    assert reasons == ["file name does not match --name-pattern: 'notes' is not '{label}_{speaker}_{take}'"]
    assert sum(res.n_items.values()) == 48


def test_a_malformed_pattern_is_refused_before_any_work():
    with pytest.raises(IngestError, match="needs distinct"):
        IngestConfig(name_pattern="no fields here")


def test_split_folders_above_the_class_folders(tmp_path):
    for split in ("train", "test"):
        for label in ("yes", "no"):
            d = tmp_path / "clips" / split / label
            d.mkdir(parents=True)
            for i in range(2):
                (d / f"{i}.wav").write_bytes(wav_bytes(200 + 40 * i + (label == "yes") * 300, 0.2))
    rows = _manifest(tmp_path, Sources(audio=tmp_path / "clips"), IngestConfig(), ShardConfig())
    assert sorted((r["split"], r["label"]) for r in rows) == sorted(
        [(s, lb) for s in ("train", "test") for lb in ("yes", "no") for _ in range(2)])
    assert {r["split_source"] for r in rows} == {"given"}


def test_groups_need_a_split_by():
    from pydantic import ValidationError

    from flows.params import DataParams

    with pytest.raises(ValidationError, match="pass --split-by too"):
        DataParams(test_groups=["theo"])
    assert DataParams(split_by="speaker", test_groups=["theo,lucas", "nico"]).test_groups == ["theo", "lucas", "nico"]


def test_several_test_sets_from_folders_and_a_split_column(digits, tmp_path):
    """test_<name> splits (a folder or a split column) are test sets of their own, sharded apart from `test`."""
    from tasks.data.shards import shard_urls, test_sets

    for split in ("train", "test_takes"):
        d = tmp_path / "clips" / split / "yes"
        d.mkdir(parents=True)
        (d / "a.wav").write_bytes(wav_bytes(500, 0.2))
    (tmp_path / "t.csv").write_text("audio,label,split\n" + "".join(
        f"recordings/{f.name},{f.name[0]},{'test_speakers' if '_cy_' in f.name else ''}\n"
        for f in sorted(digits.iterdir())))
    rows = _manifest(tmp_path, Sources(audio=tmp_path / "clips", transcripts=tmp_path / "t.csv"), IngestConfig(),
                     ShardConfig(test_fraction=0.2))
    splits = {r["split"] for r in rows}
    assert {"train", "test", "test_takes", "test_speakers"} <= splits and test_sets(splits)[0] == "test"
    assert {r["split_source"] for r in rows if r["split"].startswith("test_")} == {"given"}
    speakers = shard_urls(tmp_path / "shards", "audio", "test_speakers")
    assert [u.rsplit("/", 1)[-1] for u in speakers] == ["test_speakers-000000.tar"]
    assert not set(speakers) & set(shard_urls(tmp_path / "shards", "audio", "test"))
    with pytest.raises(IngestError, match=r"invalid split: .* has split 'tests'; use train, val, test, test_<name>"):
        (tmp_path / "bad.csv").write_text("audio,label,split\nrecordings/0_ann_0.wav,0,tests\n")
        from flows.data import check_data
        from flows.params import DataParams

        check_data(DataParams(transcripts=tmp_path / "bad.csv"))


@pytest.mark.parametrize("flags, message", [
    (dict(split_by="speaker", test_groups=["theoo"]),
     "--test-groups theoo: no item has speaker=theoo (found: ann, bob, cy, dee, eve, fay, gus, hal); name groups that "
     "exist"),
    (dict(split_by="speakr"), "--split-by speakr: no item has a 'speakr' value; name a table column or a "
                              "--name-pattern field (or 'label')"),
    (dict(split_by="speaker", test_groups=list(SPEAKERS[:5]), val_groups=list(SPEAKERS[5:])),
     "--split-by speaker: 8 group(s) (ann, bob, cy, dee, eve, fay, gus, hal) are too few for a train split beside the "
     "held-out ones; name fewer --test-groups/--val-groups, or change the fractions"),
    (dict(split_by="label", test_fraction=0.2), "--split-by label: 2 group(s) (0, 1) are too few for a train split "
                                                "beside the held-out ones"),
    (dict(split_by="take", val_fraction=0.01, test_fraction=0.01),  # the shard stage's hash, worked out up front
     "--split-by take: the hash of 3 group(s) (0, 1, 2) leaves the val and test split(s) empty; name the groups with "
     "--test-groups/--val-groups, or change the fractions"),
])
def test_group_flags_are_checked_against_the_data_before_any_stage(digits, tmp_path, flags, message):
    from flows.data import check_data
    from flows.params import DataParams

    p = DataParams(audio=digits, name_pattern="{label}_{speaker}_{take}", root=tmp_path / "out", **flags)
    with pytest.raises(IngestError, match="^" + re.escape(message)):
        check_data(p)
    assert not (tmp_path / "out").exists()  # nothing ran
    check_data(DataParams(audio=digits, name_pattern="{label}_{speaker}_{take}", split_by="speaker",
                          test_groups=["cy"]))  # the same data with a group that exists: no error
