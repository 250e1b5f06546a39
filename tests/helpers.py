"""Tiny synthetic inputs shared by the data-plane tests."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf
from PIL import Image

from tasks.common import sha256_bytes


def png_bytes(rgb=(255, 0, 0), size=(32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format="PNG")
    return buf.getvalue()


def wav_bytes(freq=440.0, seconds=0.5, sr=16000) -> bytes:
    t = np.arange(int(seconds * sr)) / sr
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def item_rows(n_images: int, n_audio: int, offset: int = 0) -> list[dict]:
    """Rows with the schema ingest writes to items.parquet."""
    rows = []
    for i in range(offset, offset + n_images):
        payload = png_bytes(((i * 37) % 256, (i * 91) % 256, (i * 13) % 256))
        rows.append(dict(key=f"img-{i:06d}", modality="image", label=["circle", "square"][i % 2],
                         text=f"a picture number {i}", source=f"images/{i}.png", payload=payload, payload_ext="png",
                         sha256=sha256_bytes(payload), nbytes=len(payload), width=32, height=32, duration_s=None,
                         split=None, meta=json.dumps({"i": i})))
    for i in range(offset, offset + n_audio):
        payload = wav_bytes(200 + 20 * i, 0.3 + 0.05 * (i % 5))
        rows.append(dict(key=f"aud-{i:06d}", modality="audio", label=["yes", "no"][i % 2], text=["yes", "no"][i % 2],
                         source=f"audio/{i}.wav", payload=payload, payload_ext="wav", sha256=sha256_bytes(payload),
                         nbytes=len(payload), width=None, height=None, duration_s=0.3, split=None, meta="{}"))
    return sorted(rows, key=lambda r: r["key"])


ITEM_SCHEMA = pa.schema([
    ("key", pa.string()), ("modality", pa.string()), ("label", pa.string()), ("text", pa.string()),
    ("source", pa.string()), ("payload", pa.binary()), ("payload_ext", pa.string()), ("sha256", pa.string()),
    ("nbytes", pa.int64()), ("width", pa.int32()), ("height", pa.int32()), ("duration_s", pa.float32()),
    ("split", pa.string()), ("meta", pa.string()),
])


def write_items(path, rows) -> None:
    pq.write_table(pa.Table.from_pylist(rows, schema=ITEM_SCHEMA), path)
