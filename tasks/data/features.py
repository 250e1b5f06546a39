"""Audio and image features, like whisper's audio.py: named constants, pure array-in/array-out functions.

Log-mel defaults follow the AST recipe: 16 kHz audio, 128 mel bins, 25 ms windows, 10 ms hop. A clip shorter than
the window (`n_frames`) is zero-padded to it before the log, so a batch of them is one tensor and one torchaudio call;
a longer clip keeps its own length (`clip_log_mels`, up to a cap), padded with zeros to whole frames. Each clip's DC
offset (its mean) is removed first, as Kaldi's fbank does (`remove_dc_offset`): a microphone's offset is a constant
the spectrogram would show as energy in the lowest bands of every frame, silence included.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import soundfile as sf
import torch
import torchaudio
from PIL import Image, ImageOps

SAMPLE_RATE = 16000
N_MELS = 128
WIN_MS = 25.0
HOP_MS = 10.0
N_FRAMES = 128  # 1.28 s; the data stage picks the window from the clips' durations (tasks/data/preprocess.py)
LOG_FLOOR = 1e-10


@dataclass(frozen=True)
class MelConfig:
    sample_rate: int = SAMPLE_RATE
    n_mels: int = N_MELS
    win_ms: float = WIN_MS
    hop_ms: float = HOP_MS
    n_frames: int | None = N_FRAMES  # the window; None: preprocess decides it from the train clips' durations
    f_min: float = 20.0

    def __post_init__(self):
        if self.n_mels < 1 or (self.n_frames is not None and self.n_frames < 1) or self.hop_ms <= 0 \
                or self.win_ms < self.hop_ms:
            raise ValueError(f"invalid mel config {self}: need n_mels, n_frames >= 1 and win_ms >= hop_ms > 0")

    @property
    def win_length(self) -> int:  # samples per window (400 at 16 kHz)
        return int(round(self.sample_rate * self.win_ms / 1000))

    @property
    def hop_length(self) -> int:  # samples per hop (160 at 16 kHz)
        return int(round(self.sample_rate * self.hop_ms / 1000))

    @property
    def n_fft(self) -> int:  # next power of two >= window (512)
        return 1 << (self.win_length - 1).bit_length()

    @property
    def n_samples(self) -> int:
        """Samples that give exactly n_frames frames with centred STFT frames: 1 + n_samples // hop."""
        if self.n_frames is None:
            raise ValueError("the mel window is not decided yet (n_frames=None): preprocess picks it from the data")
        return (self.n_frames - 1) * self.hop_length

    def frames_for(self, n_samples: int) -> int:
        """Frames that hold n_samples whole: 1 + ceil(n_samples / hop) (a window of n frames holds (n - 1) hops)."""
        return 1 + -(-int(n_samples) // self.hop_length)


@lru_cache(maxsize=8)
def mel_transform(cfg: MelConfig) -> torchaudio.transforms.MelSpectrogram:
    return torchaudio.transforms.MelSpectrogram(
        sample_rate=cfg.sample_rate,
        n_fft=cfg.n_fft,
        win_length=cfg.win_length,
        hop_length=cfg.hop_length,
        f_min=cfg.f_min,
        n_mels=cfg.n_mels,
        power=2.0,
        center=True,
        mel_scale="slaney",  # linear below 1 kHz: with htk, 128 bands over a 512-point FFT leave empty filters
        norm="slaney",
    )


def pad_or_trim(wave: np.ndarray, length: int) -> np.ndarray:
    """Zero-pad at the end or crop a (N,) waveform to `length` samples."""
    if len(wave) >= length:
        return wave[:length]
    return np.pad(wave, (0, length - len(wave)))


def without_dc(wave: np.ndarray) -> np.ndarray:
    """A (N,) waveform -> float32, its mean subtracted (the DC offset; fsdd4's nicolas records at 0.16 of his RMS)."""
    x = np.asarray(wave, np.float32)
    return x - x.mean() if len(x) else x


@torch.no_grad()
def log_mel(waves: list[np.ndarray] | torch.Tensor, cfg: MelConfig = MelConfig(), n_frames: int | None = None
            ) -> torch.Tensor:
    """Batched log-mel spectrogram.

    waves: B mono float waveforms at cfg.sample_rate (any lengths; each without its mean, then zero-padded/cropped to
    the samples of n_frames).
    n_frames: the frames to return (default cfg.n_frames).
    returns: float32 tensor, shape = (B, n_mels, n_frames), natural log of power.
    """
    n_samples = cfg.n_samples if n_frames is None else (n_frames - 1) * cfg.hop_length
    if isinstance(waves, torch.Tensor):
        batch = waves.float()
        batch = batch - batch.mean(-1, keepdim=True)
        batch = torch.nn.functional.pad(batch, (0, max(0, n_samples - batch.shape[-1])))[..., :n_samples]
    else:
        batch = torch.from_numpy(np.stack([pad_or_trim(without_dc(w), n_samples) for w in waves]))
    mel = mel_transform(cfg)(batch)  # (B, n_mels, n_frames)
    return torch.log(mel.clamp_min(LOG_FLOOR))


def clip_log_mels(waves: list[np.ndarray], cfg: MelConfig, max_frames: int) -> list[np.ndarray]:
    """Each clip's log-mel at its own length: float32 (n_mels, T), T = frames_for(len(wave)) clamped to
    [cfg.n_frames, max_frames]. Clips within the window are zero-padded to it and computed as one batch (exactly
    `log_mel`); a longer clip is zero-padded to whole frames (or cut at max_frames) and computed on its own."""
    frames = [min(max(cfg.frames_for(len(w)), cfg.n_frames), max_frames) for w in waves]
    out: list[np.ndarray | None] = [None] * len(waves)
    short = [i for i, t in enumerate(frames) if t == cfg.n_frames]
    if short:
        for i, m in zip(short, log_mel([waves[i] for i in short], cfg).numpy()):  # (n_short, n_mels, n_frames)
            out[i] = m
    for i, t in enumerate(frames):
        if out[i] is None:
            out[i] = log_mel([waves[i]], cfg, n_frames=t)[0].numpy()  # (n_mels, t)
    return out


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """WAV/FLAC/OGG/MP3 bytes -> (float32 mono waveform, sample rate), through libsndfile."""
    wave, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return wave.mean(axis=1), sr


def image_array(data: bytes, size: int) -> np.ndarray:
    """Image bytes -> uint8 array, shape = (3, size, size): RGB, centre-cropped to square, bicubic resize."""
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        if img.size != (size, size):
            img = ImageOps.fit(img, (size, size), Image.Resampling.BICUBIC)
        return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))
