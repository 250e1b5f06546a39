"""Tiny input files for the ingest tests (test_ingest.py, test_ingest_keys.py, test_hostile.py): images of any mode
and format, audio of any rate, channels and format, tars, img2dataset samples; and ingest's outputs read back."""

from __future__ import annotations

import io
import json
import tarfile

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
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
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
