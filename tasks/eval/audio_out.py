"""From the models' normalised log-mel back to sound, and from sound back to their input: Griffin-Lim, WAVs, plots.

    reference_voices(ctx)             the first clips of the train split: the voices speech is generated in
    generate_speech(tts, ctx, texts)  transcripts -> normalised log-mel (models/tts.py), in those voices in turn
    vocode(stats, mel)                normalised log-mel -> waveform, with the prep folder's mel config and statistics

    normalised log-mel (B, n_mels, n_frames)  --x std + mean, exp-->  mel power (B, n_mels, n_frames)
        --InverseMelScale (least squares, slaney)-->  linear power (B, n_fft//2 + 1, n_frames)
        --GriffinLim (phase from 32 iterations)-->  waveform (B, n_samples) at sample_rate

`mel_config(stats)` rebuilds the MelConfig preprocess used (stats.json "audio.mel"), so the inverse transform has the
forward one's sample rate, FFT size, window, hop, f_min and the slaney mel scale and norm (tasks/data/features.py).
`wave_to_model_mel` is the forward direction again, log-mel normalised with the train split's mean/std as preprocess
does, for feeding synthesised speech to a recogniser (round trips).
"""

from __future__ import annotations

from dataclasses import fields
from functools import lru_cache
from pathlib import Path

from matplotlib.figure import Figure
import numpy as np
import soundfile as sf
import torch
import torchaudio

from models import rng
from tasks.data import loader
from tasks.data.features import MelConfig, log_mel
from tasks.data.shards import shard_urls
from tasks.train.batches import TOKENIZER, BatchContext, mels

GRIFFIN_LIM_ITERS = 32
SEED = 0  # Griffin-Lim's random initial phase: the same mel gives the same waveform


def mel_config(stats: dict) -> MelConfig:
    """stats.json -> the MelConfig preprocess computed the spectrograms with (derived values such as hop_length
    are properties of it)."""
    mel = stats["audio"]["mel"]
    return MelConfig(**{f.name: mel[f.name] for f in fields(MelConfig) if f.name in mel})


@lru_cache(maxsize=4)
def _inverse(cfg: MelConfig) -> tuple[torchaudio.transforms.InverseMelScale, torchaudio.transforms.GriffinLim]:
    inv_mel = torchaudio.transforms.InverseMelScale(
        n_stft=cfg.n_fft // 2 + 1, n_mels=cfg.n_mels, sample_rate=cfg.sample_rate, f_min=cfg.f_min,
        norm="slaney", mel_scale="slaney",  # as features.mel_transform
        driver="gelsd",  # SVD least squares: 128 slaney bands over 257 FFT bins are rank-deficient for "gels"
    )
    griffin_lim = torchaudio.transforms.GriffinLim(
        n_fft=cfg.n_fft, n_iter=GRIFFIN_LIM_ITERS, win_length=cfg.win_length, hop_length=cfg.hop_length, power=2.0,
        length=cfg.n_samples,
    )
    return inv_mel, griffin_lim


@torch.no_grad()
def mel_to_wave(mel: torch.Tensor, cfg: MelConfig, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """Normalised log-mel, shape = (B, n_mels, n_frames) -> float32 waveform, shape = (B, n_samples), in [-1, 1].

    mean/std undo preprocess's normalisation (stats.json audio mean/std); the result is the natural-log mel power
    exponentiated, mapped to a linear spectrogram by least squares and given a phase by Griffin-Lim (fp32 throughout).
    """
    inv_mel, griffin_lim = _inverse(cfg)
    power = torch.exp(mel.float() * std + mean)  # (B, n_mels, n_frames), mel power
    linear = inv_mel(power)  # (B, n_fft // 2 + 1, n_frames), non-negative
    with rng.seeded(SEED):  # Griffin-Lim's initial phase: torch's global generator, for this thread alone
        wave = griffin_lim(linear)  # (B, n_samples)
    peak = wave.abs().amax(dim=-1, keepdim=True).clamp_min(1.0)  # only scale down what would clip
    return wave / peak


def vocode(stats: dict, mel: torch.Tensor) -> torch.Tensor:
    """Normalised log-mel (B, n_mels, n_frames) -> waveforms (B, n_samples), with stats.json's mel config, mean, std."""
    return mel_to_wave(mel, mel_config(stats), stats["audio"]["mean"], stats["audio"]["std"])


N_VOICES = 8  # reference clips speech is generated in (the train split's first, in shard order)


@lru_cache(maxsize=4)
def _voices(prep_dir: str, n: int, n_frames: int) -> torch.Tensor:
    urls = shard_urls(prep_dir, "audio", "train")
    first = next(iter(loader.batches(urls, n, train=False, split_nodes=False)))
    return mels(first, n_frames)  # (n, n_mels, n_frames)


def reference_voices(ctx: BatchContext, n: int = N_VOICES) -> torch.Tensor:
    """The voices generated speech is spoken in: the first n clips of the train split -> (n, n_mels, n_frames)."""
    return _voices(str(ctx.data.prep_dir), n, ctx.data.mel_grid[1])


@torch.no_grad()
def generate_speech(model, ctx: BatchContext, texts: list[str], voices: torch.Tensor | None = None) -> torch.Tensor:
    """tts: B transcripts -> normalised log-mel (B, n_mels, n_frames), text i spoken in voice i mod n_voices
    (default: reference_voices)."""
    voices = reference_voices(ctx) if voices is None else voices
    refs = voices[torch.arange(len(texts)) % len(voices)]  # (B, n_mels, n_frames)
    return model.generate(TOKENIZER.batch_encode(texts, model.cfg.src_len), refs)


def wave_to_model_mel(wave: torch.Tensor, cfg: MelConfig, mean: float, std: float) -> torch.Tensor:
    """Waveforms (B, n_samples) -> normalised log-mel (B, n_mels, n_frames), exactly what preprocess stores."""
    return (log_mel(wave, cfg) - mean) / std


def write_wavs(waves: torch.Tensor, sample_rate: int, out_dir: Path, prefix: str) -> list[Path]:
    """(B, n_samples) -> out_dir/{prefix}_{i:02d}.wav, PCM16 mono; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, w in enumerate(waves.numpy()):
        paths.append(out_dir / f"{prefix}_{i:02d}.wav")
        sf.write(paths[-1], w.astype(np.float32), sample_rate, subtype="PCM_16")
    return paths


def spectrogram_plot(generated: torch.Tensor, reference: torch.Tensor | None, titles: list[str], path: Path,
                     labels: tuple[str, str] = ("generated", "reference")) -> None:
    """One row per example: the generated normalised log-mel (n_mels, n_frames) beside its reference."""
    cols = 1 if reference is None else 2
    n = len(generated)
    fig = Figure(figsize=(3.2 * cols, 1.7 * n + 0.3))
    axes = fig.subplots(n, cols, squeeze=False)
    for i in range(n):
        pairs = [(labels[0], generated[i])] + ([] if reference is None else [(labels[1], reference[i])])
        for j, (name, mel) in enumerate(pairs):
            ax = axes[i, j]
            ax.imshow(mel.float().numpy(), origin="lower", aspect="auto", cmap="magma", vmin=-3, vmax=3)
            ax.set_title(f"{name}: {titles[i]}"[:60], fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
