"""The built-in multimodal dataset: coloured shapes with captions, and spoken shape phrases; deterministic from a seed.

It writes the same layout a user would bring, so ingest treats it like user data:

    out/images/<shape>/<key>.png    RGB PNG, image_size x image_size
    out/audio/<shape>/<key>.wav     mono PCM16 speech at sample_rate (eSpeak NG, see speech.py)
    out/captions.csv                image, caption, shape, colour, size, position, background, split
    out/transcripts.csv             audio, transcript, word, colour, voice, rate, pitch, split
    out/_SUCCESS                    the record `generate` returns (counts, relative paths, config)

Zero-shot hold-out: rows whose (shape, colour) pair is in HELDOUT get split="test" (for speech: only phrases that
say the colour); every other row has split="" and is assigned later from a hash of its key.

Item i depends only on (seed, modality, i): its shape and colour follow a Latin-square order (every shape and every
colour within any 6 consecutive items, all 36 pairs within 36) under a per-seed permutation, and its other choices
come from its own generator `np.random.default_rng([seed, stream, i])`. So a small dataset is a prefix of a larger
one with the same seed, and the same config gives byte-identical files.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw

from tasks.data.builtin import speech
from tasks.data.builtin.vocab import COLOURS, HELDOUT, SHAPES  # noqa: F401 - the set's words
from tasks.infra.common import atomic_dir, progress, read_success

BACKGROUNDS = {"white": (255, 255, 255), "grey": (128, 128, 128), "black": (0, 0, 0)}
SIZES = {"small": 0.36, "large": 0.62}  # the shape's extent as a fraction of the image side
POSITIONS = ("centre", "top left", "top right", "bottom left", "bottom right")

SUPERSAMPLE = 4  # draw at 4x, downsample with LANCZOS: anti-aliased edges
JITTER = 0.04  # uniform position jitter, fraction of the image side
MARGIN = 0.03  # gap between a corner shape and the image border, fraction of the image side

CAPTION_TEMPLATES = (
    "{a_size} {colour} {shape} on {a_bg} background",
    "{a_colour} {shape}",
    "{size} {colour} {shape} {where}",
    "a picture of {a_colour} {shape}",
    "{a_colour} {shape} on {bg}",
    "there is {a_size} {colour} {shape} {where} of the image",
    "an image of {a_size} {colour} {shape} on {bg}",
    "{colour} {shape}, {size}, {bg} background",
)
SPEECH_TEMPLATES = ("{shape}", "{colour} {shape}", "{a_colour} {shape}")
SPEECH_RATES = (130, 210)  # words per minute, inclusive
SPEECH_PITCHES = (30, 70)  # eSpeak pitch 0..100, inclusive

_IMAGE_STREAM, _AUDIO_STREAM = 0, 1
_HELDOUT = frozenset(HELDOUT)


@dataclass(frozen=True)
class SyntheticConfig:
    n_images: int = 2000
    n_audio: int = 1000
    image_size: int = 32  # pixels per side
    sample_rate: int = 16000  # Hz
    seed: int = 0


def _article(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon vertices (pixels) of `shape` centred at (cx, cy) with half-extent r."""
    def polar(radii: list[float], start: float) -> list[tuple[float, float]]:
        n = len(radii)
        angles = start + 2 * np.pi * np.arange(n) / n
        return [(cx + q * np.cos(a), cy + q * np.sin(a)) for q, a in zip(radii, angles)]

    if shape == "square":
        h = 0.82 * r  # similar area to the circle
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":  # equilateral, pointing up, centroid lowered so it fills the box evenly
        return [(x, y + 0.15 * r) for x, y in polar([1.1 * r] * 3, -np.pi / 2)]
    if shape == "diamond":  # taller than wide, so it is not a turned square
        return [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]
    if shape == "star":  # five points, inner radius 0.45 of the outer
        return polar([r, 0.45 * r] * 5, -np.pi / 2)
    if shape == "cross":  # a plus sign with arms 0.36 r thick on each side of the axis
        t = 0.36 * r
        return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t),
                (cx + r, cy + t), (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r),
                (cx - t, cy + t), (cx - r, cy + t), (cx - r, cy - t), (cx - t, cy - t)]
    raise ValueError(f"unknown shape {shape!r}; use one of {SHAPES}")


def draw_shape(
    shape: str,
    colour_rgb: tuple[int, int, int],
    bg_rgb: tuple[int, int, int],
    size: str,
    position: str,
    image_size: int,
    rng: np.random.Generator,
) -> Image.Image:
    """One shape on a plain background: an RGB image of (image_size, image_size).

    `size` is a key of SIZES, `position` one of POSITIONS; `rng` draws the position jitter (the shape always stays
    inside the image).
    """
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; use one of {tuple(SIZES)}")
    if position not in POSITIONS:
        raise ValueError(f"unknown position {position!r}; use one of {POSITIONS}")
    side = image_size * SUPERSAMPLE
    r = SIZES[size] * side / 2  # half-extent, supersampled pixels
    lo, hi = r + MARGIN * side, side - r - MARGIN * side  # centre coordinates that keep the shape inside
    anchor = {"centre": (0.5 * side, 0.5 * side), "top left": (lo, lo), "top right": (hi, lo),
              "bottom left": (lo, hi), "bottom right": (hi, hi)}[position]
    jx, jy = rng.uniform(-JITTER, JITTER, size=2) * side
    cx = float(np.clip(anchor[0] + jx, r, side - r))
    cy = float(np.clip(anchor[1] + jy, r, side - r))

    img = Image.new("RGB", (side, side), tuple(bg_rgb))
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=tuple(colour_rgb))
    else:
        draw.polygon(_shape_points(shape, cx, cy, r), fill=tuple(colour_rgb))
    return img.resize((image_size, image_size), Image.Resampling.LANCZOS)


def caption_for(
    shape: str,
    colour: str,
    size: str = "large",
    position: str = "centre",
    background: str = "white",
    template: int = 0,
) -> str:
    """A caption of the image's attributes from CAPTION_TEMPLATES[template]; always names the colour and shape."""
    where = "in the middle" if position == "centre" else f"in the {position}"
    return CAPTION_TEMPLATES[template % len(CAPTION_TEMPLATES)].format(
        shape=shape, colour=colour, size=size, bg=background, where=where,
        a_size=_article(size), a_colour=_article(colour), a_bg=_article(background),
    )


def phrase_for(shape: str, colour: str, template: int = 0) -> str:
    """The spoken text (lowercase) from SPEECH_TEMPLATES[template]: "circle", "red circle" or "a red circle"."""
    template_text = SPEECH_TEMPLATES[template % len(SPEECH_TEMPLATES)]
    return template_text.format(shape=shape, colour=colour, a_colour=_article(colour))


def _pair(i: int, shape_order: np.ndarray, colour_order: np.ndarray) -> tuple[str, str]:
    """(shape, colour) of item i: a Latin square over (shape, colour) indices, under the per-seed permutations."""
    n_s, n_c = len(SHAPES), len(COLOURS)
    s, k = i % n_s, i // n_s
    return SHAPES[shape_order[s]], tuple(COLOURS)[colour_order[(s + k) % n_c]]


def _orders(seed: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, stream])
    return rng.permutation(len(SHAPES)), rng.permutation(len(COLOURS))


def _key(prefix: str, i: int, n: int) -> str:
    return f"{prefix}-{i:0{max(6, len(str(n - 1)))}d}"  # no dots: webdataset splits keys at the first dot


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)  # fixed parameters, no metadata: stable bytes
    return buf.getvalue()


def _wav_bytes(wav: np.ndarray, sample_rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wav, sample_rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _write_csv(path: Path, header: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=header, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def _images(cfg: SyntheticConfig, root: Path) -> list[dict]:
    shape_order, colour_order = _orders(cfg.seed, _IMAGE_STREAM)
    rows = []
    for i in progress(range(cfg.n_images), total=cfg.n_images, desc="images", unit="img"):
        rng = np.random.default_rng([cfg.seed, _IMAGE_STREAM, i])
        shape, colour = _pair(i, shape_order, colour_order)
        size = tuple(SIZES)[rng.integers(len(SIZES))]
        position = POSITIONS[rng.integers(len(POSITIONS))]
        background = tuple(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
        img = draw_shape(shape, COLOURS[colour], BACKGROUNDS[background], size, position, cfg.image_size, rng)
        rel = f"images/{shape}/{_key('img', i, cfg.n_images)}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(_png_bytes(img))
        caption = caption_for(shape, colour, size, position, background, int(rng.integers(len(CAPTION_TEMPLATES))))
        rows.append(dict(
            image=rel, caption=caption, shape=shape, colour=colour, size=size, position=position, background=background,
            split="test" if (shape, colour) in _HELDOUT else "",
        ))
    return rows


def _audio(cfg: SyntheticConfig, root: Path) -> tuple[list[dict], float]:
    shape_order, colour_order = _orders(cfg.seed, _AUDIO_STREAM)
    rows, seconds = [], 0.0
    for i in progress(range(cfg.n_audio), total=cfg.n_audio, desc="speech", unit="clip"):
        rng = np.random.default_rng([cfg.seed, _AUDIO_STREAM, i])
        shape, colour = _pair(i, shape_order, colour_order)
        template = int(rng.integers(len(SPEECH_TEMPLATES)))
        text = phrase_for(shape, colour, template)
        voice = speech.VOICES[rng.integers(len(speech.VOICES))]
        rate = int(rng.integers(SPEECH_RATES[0], SPEECH_RATES[1] + 1))
        pitch = int(rng.integers(SPEECH_PITCHES[0], SPEECH_PITCHES[1] + 1))
        wav = speech.synthesize(text, voice=voice, rate=rate, pitch=pitch, sample_rate=cfg.sample_rate)
        seconds += len(wav) / cfg.sample_rate
        rel = f"audio/{shape}/{_key('aud', i, cfg.n_audio)}.wav"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(_wav_bytes(wav, cfg.sample_rate))
        said_colour = colour if "colour}" in SPEECH_TEMPLATES[template] else ""  # "{colour}" or "{a_colour}"
        rows.append(dict(
            audio=rel, transcript=text, word=shape, colour=said_colour, voice=voice, rate=rate, pitch=pitch,
            split="test" if (shape, said_colour) in _HELDOUT else "",
        ))
    return rows, seconds


CAPTION_COLUMNS = ["image", "caption", "shape", "colour", "size", "position", "background", "split"]
TRANSCRIPT_COLUMNS = ["audio", "transcript", "word", "colour", "voice", "rate", "pitch", "split"]


def _absolute(out_dir: Path, record: dict) -> dict:
    return {**record, "path": str(out_dir), "captions": str(out_dir / record["captions"]),
            "transcripts": str(out_dir / record["transcripts"]), "images": str(out_dir / record["images"]),
            "audio": str(out_dir / record["audio"])}


def generate(cfg: SyntheticConfig, out_dir: Path) -> dict:
    """Write the dataset under `out_dir` atomically (temp sibling, then rename); reuse it if already complete.

    Returns counts (n_images, n_audio, n_test_images, n_test_audio), audio_seconds, the config, absolute paths
    (path, images, audio, captions, transcripts) and, when it generated, images_per_s and clips_per_s. The same
    record less the timings, with relative paths, is in out_dir/_SUCCESS.
    """
    out_dir = Path(out_dir)
    if (done := read_success(out_dir)) is not None:
        return _absolute(out_dir, done)
    for name, n in (("n_images", cfg.n_images), ("n_audio", cfg.n_audio)):
        if n < 0:
            raise ValueError(f"SyntheticConfig.{name} must be >= 0, got {n}")
    record: dict = {}
    with atomic_dir(out_dir, record) as tmp:
        t0 = time.perf_counter()
        image_rows = _images(cfg, tmp)
        t1 = time.perf_counter()
        audio_rows, audio_seconds = _audio(cfg, tmp)
        t2 = time.perf_counter()
        (tmp / "images").mkdir(exist_ok=True)
        (tmp / "audio").mkdir(exist_ok=True)
        _write_csv(tmp / "captions.csv", CAPTION_COLUMNS, image_rows)
        _write_csv(tmp / "transcripts.csv", TRANSCRIPT_COLUMNS, audio_rows)
        record.update(
            n_images=len(image_rows),
            n_audio=len(audio_rows),
            n_test_images=sum(r["split"] == "test" for r in image_rows),
            n_test_audio=sum(r["split"] == "test" for r in audio_rows),
            audio_seconds=round(audio_seconds, 3),
            images="images", audio="audio", captions="captions.csv", transcripts="transcripts.csv",
            config=asdict(cfg),
            heldout=[list(p) for p in HELDOUT],
        )
    timings = {  # returned, not recorded: _SUCCESS stays byte-identical for the same config
        "images_per_s": round(len(image_rows) / max(t1 - t0, 1e-9), 1),
        "clips_per_s": round(len(audio_rows) / max(t2 - t1, 1e-9), 1),
    }
    return {**_absolute(out_dir, record), **timings}


if __name__ == "__main__":  # python -m tasks.data.builtin.synthetic OUT_DIR [n_images n_audio]: generate and print the record
    import json
    import sys

    args = sys.argv[1:]
    if not args:
        sys.exit("usage: python -m tasks.data.builtin.synthetic OUT_DIR [n_images n_audio]")
    overrides = dict(zip(("n_images", "n_audio"), map(int, args[1:3])))
    print(json.dumps(generate(SyntheticConfig(**overrides), Path(args[0])), indent=2))
