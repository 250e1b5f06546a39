"""The `data` flow: built-in dataset or user sources -> ingest -> shards -> preprocess.

The built-in dataset and ingest write under the local output root; shards and model-ready shards under `store`
(a folder or an fsspec URL such as s3://bucket/prefix), which defaults to the root.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow, runtime
from prefect.artifacts import create_markdown_artifact

from flows.deploy import start_flow_run
from flows.params import DataParams
from tasks import stages
from tasks.infra import storage
from tasks.data.features import MelConfig
from tasks.data.ingest import IngestConfig, IngestError, Sources, check_sources
from tasks.data.ingest.sources import KINDS, check_table, group_values
from tasks.data.preprocess import PrepConfig
from tasks.data.shards import ShardConfig, assign_split, ordered_splits
from tasks.data.builtin.synthetic import SyntheticConfig


def _sources(p: DataParams) -> Sources:
    return Sources(images=p.images, audio=p.audio, captions=p.captions, transcripts=p.transcripts,
                   shards=tuple(p.shards), allow_roots=tuple(str(r) for r in p.allow_roots))


def _has_files(folder: Path, exts: tuple[str, ...]) -> bool:
    """Whether a folder (any depth, symlinks not followed, hidden names skipped) holds a file with one of exts."""
    for _, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if any(f.rsplit(".", 1)[-1].lower() in exts for f in files if not f.startswith(".")):
            return True
    return False


def check_data(p: DataParams) -> None:
    """Every data argument checked before any stage runs; an IngestError (one line naming the value and the fix)
    otherwise: the folders and tables exist and are what they should be, a folder holds files of its kind, a table
    has the columns named for it, every shard pattern matches."""
    if p.builtin:
        return
    sources = _sources(p)
    check_sources(sources)
    ingest_cfg = _configs(p)[0]
    for kind in KINDS:
        folder, table = getattr(sources, kind.folder), getattr(sources, kind.table)
        if folder is not None and not _has_files(folder, kind.exts):
            raise IngestError(f"{kind.folder} folder {folder} holds no {'/'.join(kind.exts)} files; put them in "
                              f"{folder}/<class>/, or pass the folder that has them")
        if table is not None:
            check_table(table, kind, ingest_cfg)
    found = {f: group_values(sources, ingest_cfg, f) for f in {p.split_by, p.normalise_by} - {None}}  # read once
    if p.split_by and found[p.split_by] is not None:
        check_groups(p, found[p.split_by])
    if p.normalise_by and found[p.normalise_by] == set():
        raise IngestError(f"--normalise-by {p.normalise_by}: no item has a {p.normalise_by!r} value; name a table "
                          "column or a --name-pattern field")


def check_groups(p: DataParams, found: set[str]) -> None:
    """--split-by/--test-groups/--val-groups against the groups the data has (`group_values`): one line each."""
    by = p.split_by
    if not found:
        raise IngestError(f"--split-by {by}: no item has a {by!r} value; name a table column or a --name-pattern "
                          "field (or 'label')")
    shown = ", ".join(sorted(found)[:12]) + (", ..." if len(found) > 12 else "")
    for flag, named in (("--test-groups", p.test_groups), ("--val-groups", p.val_groups)):
        if unknown := [g for g in named if g not in found]:
            raise IngestError(f"{flag} {','.join(unknown)}: no item has {by}={unknown[0]} (found: {shown}); name "
                              "groups that exist")
    if p.test_groups or p.val_groups:
        wanted = 1 if not set(found) - set(p.test_groups) - set(p.val_groups) else 0
    else:
        wanted = 1 + (p.test_fraction > 0) + (p.val_fraction > 0) - len(found)
    if wanted > 0:
        raise IngestError(f"--split-by {by}: {len(found)} group(s) ({shown}) are too few for a train split beside "
                          "the held-out ones; name fewer --test-groups/--val-groups, or change the fractions")
    if not (p.test_groups or p.val_groups):  # the hash the shard stage will use, worked out now
        cfg = _configs(p)[1]
        got = {assign_split(g, cfg) for g in found}
        if empty := [s for s, f in (("train", 1), ("val", p.val_fraction), ("test", p.test_fraction))
                     if f > 0 and s not in got]:
            raise IngestError(f"--split-by {by}: the hash of {len(found)} group(s) ({shown}) leaves the "
                              f"{' and '.join(empty)} split(s) empty; name the groups with --test-groups/"
                              "--val-groups, or change the fractions")


def _configs(p: DataParams):
    ingest = IngestConfig(
        sample_rate=p.sample_rate,
        caption_path_col=p.caption_path_col,
        caption_col=p.caption_col,
        transcript_path_col=p.transcript_path_col,
        transcript_col=p.transcript_col,
        max_duration_s=p.max_clip_seconds,
        max_pixels=p.max_pixels,
        max_file_bytes=p.max_file_mb << 20,
        decoder_threads=p.decoder_threads,
        name_pattern=p.name_pattern,
    )
    shard = ShardConfig(maxcount=p.shard_maxcount, val_fraction=p.val_fraction, test_fraction=p.test_fraction,
                        split_by=p.split_by, test_groups=tuple(p.test_groups), val_groups=tuple(p.val_groups))
    mel = MelConfig(sample_rate=p.sample_rate, n_mels=p.n_mels, n_frames=p.n_frames)  # None: from the data
    prep = PrepConfig(image_size=p.image_size, mel=mel, maxcount=p.shard_maxcount, clip_seconds=p.clip_seconds,
                      normalise_by=p.normalise_by)
    return ingest, shard, prep


def window_line(prepared: dict) -> str | None:
    """The clip window preprocess chose and why, in one line; None without audio."""
    w = prepared.get("window")
    if not w:
        return None
    return (f"clip window: {w['seconds']:.2f} s ({w['n_frames']} frames of 10 ms), {w['why']}; longer clips kept "
            f"up to {w['max_frames']} frames")


def _summary(ingested: dict, sharded: dict, prepared: dict) -> str:
    splits = ordered_splits({"train", "val", "test"}.union(*sharded["counts"].values()))  # test_* sets too
    lines = ["| modality | " + " | ".join(splits) + " |", "|---" * (len(splits) + 1) + "|"]
    for modality, counts in sorted(sharded["counts"].items()):
        lines.append(f"| {modality} | " + " | ".join(str(counts.get(s, 0)) for s in splits) + " |")
    reasons = ", ".join(f"{k} {n}" for k, n in sorted(ingested.get("reasons", {}).items()))
    skipped = ", ".join(f"{k} {n}" for k, n in sorted(ingested.get("skipped", {}).items()))
    lines += [
        "",
        f"quarantined: **{ingested['n_quarantined']}**{f' ({reasons})' if reasons else ''} (see "
        f"`{ingested['quarantine']}`)",
        f"skipped on purpose: {skipped or 'nothing'}",
        *filter(None, [window_line(prepared)]),
        "changed on the way in: " + (", ".join(f"{k} {n}" for k, n in sorted({**ingested.get("changes", {}),
                                                                             **prepared.get("changes", {})}.items()))
                                     or "nothing"),
        f"shards: `{sharded['path']}` (manifest digest `{sharded['digest']}`)",
        f"model-ready: `{prepared['path']}`",
    ]
    return "\n".join(lines)


# The built-in set's clips: half its images, at most AUDIO_CLIPS. Text-to-image learned the asked shape only from
# 8,000 images (README "What the models learn", 2026-12-03); the speech models' figures and time stay at 1,000 clips.
AUDIO_CLIPS = 1000


def builtin_config(params: DataParams) -> SyntheticConfig:
    """The built-in dataset the data params ask for: `size` images and half as many clips (at most AUDIO_CLIPS)."""
    return SyntheticConfig(n_images=params.size, n_audio=max(4, min(params.size // 2, AUDIO_CLIPS)),
                           image_size=params.image_size, sample_rate=params.sample_rate, seed=params.seed)


@flow(name="data", log_prints=True)
def data_flow(params: DataParams = DataParams()) -> dict:
    start_flow_run(runtime.flow_run.id)  # tag this run with its process; end the runs of dead ones (Crashed)
    root = Path(params.root).resolve()
    ingest_cfg, shard_cfg, prep_cfg = _configs(params)
    if params.builtin:
        sources = stages.builtin_sources(stages.builtin_dataset(builtin_config(params), root)["path"])
    else:
        sources = _sources(params)
    store = storage.location(params.store) if params.store else root
    store = store.resolve() if isinstance(store, Path) else store
    ingested = stages.ingest(sources, ingest_cfg, root)
    sharded = stages.shard(Path(ingested["items"]), shard_cfg, store)
    prepared = stages.preprocess(storage.location(sharded["path"]), prep_cfg, store)
    create_markdown_artifact(_summary(ingested, sharded, prepared), key="data-summary", description="tessera data")
    if window_line(prepared):
        print(window_line(prepared))
    print(f"data ready: {prepared['path']} ({ingested['n_quarantined']} quarantined)")
    return {"ingest": ingested, "shards": sharded, "prep": prepared}
