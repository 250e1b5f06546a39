"""Users' webdataset tar shards (img2dataset's layout: key.jpg|png|webp or an audio file, key.txt, key.json) as
ingest jobs. A corrupt or truncated shard keeps the samples read before the damage; the shard and the sample cut off
are quarantined with the reason. Keys come from "<shard folder>/<shard name>#<member key>".
"""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path
from typing import Iterator

from tasks.data.ingest.decode import one_line
from tasks.data.ingest.sources import (
    AUDIO_EXTS,
    IMAGE_EXTS,
    MODALITY_OF_EXT,
    IngestConfig,
    Job,
    Sources,
    expand_shards,
    make_key,
    parse_split,
    quarantine_entry,
    text_cell,
)

SHARD_ERROR = "tar shard is"  # how a whole-shard quarantine reason starts (the shard, not one input)

# webdataset's rule: key = member name up to the first dot after the last '/', extension = the rest
_MEMBER = re.compile(r"^((?:.*/|)[^./][^.]*)\.([^/]*)$")


class ShardError(Exception):
    def __init__(self, reason: str, partial: str | None):
        super().__init__(reason)
        self.reason, self.partial = reason, partial


def _is_compressed(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(6)
    return head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00"))


def read_shard(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample, in tar order, streaming. Raises ShardError at a corrupt or truncated point,
    after yielding every sample completed before it (`partial` names the sample that was being read)."""
    current: str | None = None
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(path, mode="r|*") as tf:
            for info in tf:
                m = _MEMBER.match(info.name.removeprefix("./"))
                if not info.isfile() or m is None:
                    continue
                key, ext = m.group(1), m.group(2).lower()
                if key != current:
                    if current is not None:
                        yield current, members
                    current, members = key, {}
                members[ext] = tf.extractfile(info).read()
            end = tf.offset  # where the header that ended the stream starts
        if not _is_compressed(path):  # tarfile stops quietly at a cut header: require the end-of-archive block
            with open(path, "rb") as f:
                f.seek(end)
                if f.read(512) != b"\0" * 512:
                    raise ShardError("tar shard is truncated: it ends without the end-of-archive marker", current)
    except (tarfile.TarError, EOFError, OSError, ValueError) as err:
        raise ShardError(f"tar shard is corrupt or truncated: {one_line(err)}", current) from None
    if current is not None:
        yield current, members


def _shard_job(shard: Path, key: str, members: dict[str, bytes], cfg: IngestConfig) -> Job | dict:
    """One sample's job, or its quarantine entry (no media member, unreadable json, bad split)."""
    source = f"{shard}#{key}"
    media = [e for e in (*IMAGE_EXTS, *AUDIO_EXTS) if e in members]
    if not media:
        found = ", ".join(sorted(members)) or "nothing"
        return quarantine_entry(source, "shard", f"no image or audio member: the sample has only {found}")
    ext = media[0]
    modality = MODALITY_OF_EXT[ext]
    meta: dict = {}
    if "json" in members:
        try:
            parsed = json.loads(members["json"])
        except ValueError as err:
            return quarantine_entry(source, modality, f"cannot parse json member: {key}.json: {one_line(err)}")
        meta = parsed if isinstance(parsed, dict) else {"json": parsed}
    split, err = parse_split(meta.pop("split", None), f"{key}.json")
    if err:
        return quarantine_entry(source, modality, err)
    label = text_cell(meta.pop(cfg.label_col, None))
    if label is None and "cls" in members:
        label = text_cell(members["cls"].decode("utf-8", "replace").strip())
    text = text_cell(members["txt"].decode("utf-8", "replace").strip()) if "txt" in members else None
    identity = f"shards:{shard.parent.name}/{shard.name}#{key}"
    return Job(make_key(modality, identity), modality, source, data=members[ext], label=label, text=text,
                split=split, meta=meta)


def plan_shards(sources: Sources, cfg: IngestConfig, quarantine: list) -> Iterator[Job]:
    for shard in expand_shards(sources.shards):
        samples = read_shard(shard)
        n = 0
        while True:
            try:
                key, members = next(samples)
            except StopIteration:
                break
            except ShardError as err:
                reason = f"{err.reason}; kept the {n} samples read before it"
                quarantine.append(quarantine_entry(str(shard), "shard", reason))
                if err.partial is not None:
                    reason = "sample cut off by the shard error"
                    quarantine.append(quarantine_entry(f"{shard}#{err.partial}", "shard", reason))
                break
            n += 1
            job = _shard_job(shard, key, members, cfg)
            if isinstance(job, dict):
                quarantine.append(job)
            else:
                yield job
