"""Tiny input files for the ingest tests (test_ingest.py, test_ingest_keys.py, test_hostile.py): images of any mode
and format, audio of any rate, channels and format, tars, img2dataset samples, hostile files (decompression bombs,
links, FIFOs, tar members of any type); and ingest's outputs read back."""

from __future__ import annotations

import io
import json
import os
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import soundfile as sf
from PIL import Image


def save_image(path, mode="RGB", size=(12, 10), fmt=None, colour=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = colour if colour is not None else {"RGB": (200, 30, 40), "RGBA": (10, 200, 30, 255), "L": 90,
                                                "P": 3, "CMYK": (0, 255, 255, 0)}[mode]
    im = Image.new(mode, size, colour)
    if mode == "P":
        im.putpalette([v for i in range(256) for v in (i, 255 - i, 7)])
    im.save(path, format=fmt)
    return path


def image_bytes(mode="RGB", size=(8, 8), fmt="JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, (1, 2, 3)).save(buf, format=fmt)
    return buf.getvalue()


def save_audio(path, sr=16000, seconds=0.5, channels=1, freq=440.0, fmt="WAV", subtype=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(round(sr * seconds))) / sr
    x = (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    x = np.stack([x] * channels, axis=1) if channels > 1 else x
    sf.write(path, x, sr, format=fmt, subtype=subtype)
    return path


def write_tar(path, samples: list[tuple[str, dict[str, bytes]]]):
    """samples: (key, {extension: bytes}): a webdataset shard."""
    return tar_of(path, [(f"{key}.{ext}", data) for key, members in samples for ext, data in members.items()])


def png_bomb(w: int, h: int) -> bytes:
    """A PNG whose header declares w x h pixels, with a few bytes of data: decoding it would allocate w * h * 3."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def noise_png(path: Path, size=(64, 64)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(path)
    return path


def tar_of(path: Path, members: list, gz: bool = False) -> Path:
    """members: (name, bytes) for files, or ready TarInfo objects (links, devices: no data)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz" if gz else "w") as tf:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tf.addfile(m)
                continue
            info = tarfile.TarInfo(m[0])
            info.size = len(m[1])
            tf.addfile(info, io.BytesIO(m[1]))
    return path


def link_member(name: str, target: str, kind=tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def symlink(path: Path, target) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, path)
    return path


def img2dataset_sample(i: int, fmt="JPEG", ext="jpg"):
    meta = {"url": f"http://example.com/{i}.jpg", "caption": f"photo {i}", "key": f"{i:09d}", "status": "success"}
    return f"{i:09d}", {ext: image_bytes(fmt=fmt, size=(8 + i, 6)), "txt": f"photo {i}".encode(),
                        "json": json.dumps(meta).encode()}


def read_items(res) -> list[dict]:
    return pq.read_table(res.items_path).to_pylist()


def read_quarantine(res) -> list[dict]:
    return pq.read_table(res.quarantine_path).to_pylist()


def decode_payload(row) -> Image.Image:
    im = Image.open(io.BytesIO(row["payload"]))
    im.load()
    return im
