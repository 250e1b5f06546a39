"""Decode and validate one input: bytes in, a validated payload out, or DecodeError with a one-sentence reason.

Every file is decoded fully once (a truncated file fails here). Images become RGB (alpha composited on white); an RGB
PNG/JPEG/WebP keeps its bytes, anything else is re-encoded as PNG. Audio becomes mono float32 resampled to
`sample_rate` and is stored as 16-bit WAV.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf
import torch
import torchaudio
from PIL import Image

if TYPE_CHECKING:
    from tasks.data.ingest.sources import IngestConfig


class DecodeError(Exception):
    pass


@dataclass(frozen=True)
class Decoded:
    payload: bytes
    ext: str
    width: int | None = None
    height: int | None = None
    duration_s: float | None = None
    meta: dict = field(default_factory=dict)  # what decoding measured (original mode, rate, channels)


MAX_PIXELS = 40_000_000  # IngestConfig.max_pixels' default
# max_pixels decides (from the header, before decoding); Pillow's warning for images it considers large is noise here
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
_KEEP_FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
_HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def one_line(err: BaseException) -> str:
    """An exception as one short line, without '<_io.BytesIO object at 0x...>' noise."""
    msg = re.sub(r"\s*'?<_io\.\w+ object at 0x[0-9a-fA-F]+>'?", "", str(err)) or type(err).__name__
    return " ".join(msg.split()).rstrip(".")


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode as RGB: alpha (or a transparent palette entry) composited on white, 16-bit scaled to 8-bit."""
    if im.mode in _HIGH_BIT_MODES:
        a = np.asarray(im, dtype=np.float64)
        if a.size and a.max() > 255:
            a = a * (255.0 / 65535.0)
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return im.convert("RGB")


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Decoded:
    """Decode fully (a truncated file fails here); keep an RGB PNG/JPEG/WebP's bytes, else re-encode as PNG. The size
    is checked from the header before anything is decoded: a decompression bomb costs a header parse."""
    if not data:
        raise DecodeError("file is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:  # lazy: reads the header only
            w, h = im.size
            if w * h > max_pixels:
                raise DecodeError(f"image too large: {w} x {h} = {w * h} pixels > max_pixels={max_pixels} "
                                  "(raise --max-pixels)")
            im.load()
            fmt, mode = im.format, im.mode
            if fmt in _KEEP_FORMATS and mode == "RGB" and "transparency" not in im.info:
                payload, ext, size = data, _KEEP_FORMATS[fmt], im.size
            else:
                rgb = _to_rgb(im)
                buf = io.BytesIO()
                rgb.save(buf, format="PNG")
                payload, ext, size = buf.getvalue(), "png", rgb.size
    except DecodeError:
        raise
    except Image.DecompressionBombError as err:  # Pillow's own limit (2 x MAX_IMAGE_PIXELS), when max_pixels is above
        raise DecodeError(f"image too large: {one_line(err)}") from None
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error ... on bad input
        raise DecodeError(f"cannot decode image: {one_line(err)}") from None
    return Decoded(payload, ext, width=size[0], height=size[1], meta={"orig_format": fmt, "orig_mode": mode})


_DATA_CHUNK = re.compile(r"^\s*(?:data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)


def _truncation(fmt: str, declared: int, got: int, info: str) -> str | None:
    """Why a decoded stream is shorter than its header says, or None. libsndfile reads a cut WAV without error
    (it only notes 'data : N (should be M)' in its log), and a cut MP3 reads fewer frames than its header declares."""
    m = _DATA_CHUNK.search(info)
    if m and int(m.group(2)) < int(m.group(1)):
        return f"truncated audio file: header declares {m.group(1)} data bytes, file holds {m.group(2)}"
    slack = max(1152, declared // 100) if fmt == "MP3" else 0  # MP3 headers may only estimate the length
    if declared > 0 and got < declared - slack:
        return f"truncated audio file: header declares {declared} frames, decoded {got}"
    return None


def decode_audio(data: bytes, cfg: IngestConfig) -> Decoded:
    """Decode with soundfile, mix to mono, resample to cfg.sample_rate; payload = 16-bit PCM WAV."""
    if not data:
        raise DecodeError("file is empty (0 bytes)")
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            sr, channels, declared, fmt = f.samplerate, f.channels, f.frames, f.format
            if declared > 0 and declared / sr > cfg.max_duration_s:  # don't decode an hour to reject it
                raise DecodeError(f"audio too long: {declared / sr:.3f} s > max_duration_s={cfg.max_duration_s} "
                                  "(raise --max-clip-seconds)")
            x = f.read(dtype="float32", always_2d=True)  # (n_frames, channels)
            info = f.extra_info
    except DecodeError:
        raise
    except Exception as err:  # libsndfile errors, bad headers
        raise DecodeError(f"cannot decode audio: {one_line(err)}") from None
    if reason := _truncation(fmt, declared, x.shape[0], info):
        raise DecodeError(reason)
    if not np.isfinite(x).all():
        raise DecodeError("audio contains NaN or infinite samples")
    duration = x.shape[0] / sr
    if duration < cfg.min_duration_s:
        raise DecodeError(f"audio too short: {duration:.3f} s < min_duration_s={cfg.min_duration_s}")
    if duration > cfg.max_duration_s:
        raise DecodeError(f"audio too long: {duration:.3f} s > max_duration_s={cfg.max_duration_s} "
                          "(raise --max-clip-seconds)")
    mono = x.mean(axis=1)  # (n_frames,)
    if sr != cfg.sample_rate:
        mono = torchaudio.functional.resample(torch.from_numpy(mono), sr, cfg.sample_rate).numpy()
    mono = np.clip(mono, -1.0, 1.0)  # resampling can overshoot; PCM_16 would wrap
    buf = io.BytesIO()
    sf.write(buf, mono, cfg.sample_rate, format="WAV", subtype="PCM_16")
    meta = {"orig_sample_rate": sr, "channels": channels, "orig_format": fmt}
    return Decoded(buf.getvalue(), "wav", duration_s=len(mono) / cfg.sample_rate, meta=meta)
