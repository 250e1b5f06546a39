"""Round trips across modalities, scored by the other trained models.

    roundtrip_t2i: caption -> t2i -> image -> ViT (shape) and CLIP zero-shot (shape, colour): was the request kept?
    roundtrip_tts: transcript -> tts -> Griffin-Lim waveform -> log-mel -> asr: CER against the transcript.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from tasks import audio_out
from tasks.common import atomic_dir
from tasks.evaluate import (BATCH_SIZE, N_EXAMPLES, N_SHOW, Run, _amp, _finish, _table, generate_images, image_grid,
                            load_model, transcribe, zero_shot, zero_shot_classifiers)
from tasks.metrics import cer, hit_rates, prompt_ensemble, wer
from tasks.synthetic import COLOURS, HELDOUT, SHAPES


def _named(text: str, names) -> str | None:
    found = [n for n in names if re.search(rf"\b{n}\b", text.lower())]
    return found[0] if len(found) == 1 else None


def default_prompts() -> list[str]:
    """Every colour with every shape, held-out pairs included: "a red circle", "an orange star", ..."""
    return [prompt_ensemble(f"{c} {s}")[0].rstrip(".") for s in SHAPES for c in COLOURS]


@torch.no_grad()
def roundtrip_t2i(t2i_ckpt: Path, classifier_ckpt: Path, clip_ckpt: Path, prep_dir: Path,
                  codebooks: dict[str, str] | None, out_dir: Path, prompts: list[str] | None = None) -> dict:
    """Generate an image per prompt, classify it with the ViT (shape) and CLIP zero-shot (shape, colour); metrics are
    the fractions of prompts whose named shape / colour is recovered (and on the held-out pairs alone)."""
    prompts = list(prompts or default_prompts())
    _, t2i, tctx = load_model(t2i_ckpt, prep_dir, codebooks, expect="t2i")
    _, vit, vctx = load_model(classifier_ckpt, prep_dir, expect="vit")
    _, clip, cctx = load_model(clip_ckpt, prep_dir, expect="clip")
    pixels = generate_images(t2i, tctx, prompts)  # (N, 3, S, S)
    with _amp():
        vit_pred = vit({"image": (pixels / 255 - vctx.mean) / vctx.std})[0].argmax(-1).tolist()
    classes = vctx.data.modality("image")["classes"]
    clip_pred, _ = zero_shot(clip, (pixels / 255 - cctx.mean) / cctx.std, zero_shot_classifiers(clip))
    got = {"vit_shape": [classes[i] for i in vit_pred], **clip_pred}
    want = {"shape": [_named(p, SHAPES) for p in prompts], "colour": [_named(p, COLOURS) for p in prompts]}
    heldout = [(s, c) in HELDOUT for s, c in zip(want["shape"], want["colour"])]
    rows = hit_rates({"vit_shape": got["vit_shape"], "clip_shape": got["shape"], "clip_colour": got["colour"]},
                     {"vit_shape": want["shape"], "clip_shape": want["shape"], "clip_colour": want["colour"]}, heldout)
    metrics = {"n": float(len(prompts))}
    metrics.update({f"{'' if sub == 'all' else 'heldout_'}{k}_recovered": acc for k, sub, _, acc in rows})
    titles = [f"{p}\nvit: {v}\nclip: {c} {s}" for p, v, c, s in zip(prompts, got["vit_shape"], got["colour"],
                                                                      got["shape"])]
    record: dict = {}
    with atomic_dir(out_dir, record) as tmp:
        image_grid(pixels, titles, tmp / "roundtrip_t2i.png", ncols=len(COLOURS))
        rows = [(p, v, f"{c} {s}") for p, v, c, s in zip(prompts, got["vit_shape"], got["colour"], got["shape"])]
        summary = _finish(tmp, record, "round trip: text -> image -> classifiers", metrics,
                          ["### Prompts", _table(("prompt", "vit shape", "clip colour shape"), rows)])
    return {**record, "summary": summary}


@torch.no_grad()
def roundtrip_tts(tts_ckpt: Path, asr_ckpt: Path, prep_dir: Path, codebooks: dict[str, str] | None, out_dir: Path,
                  texts: list[str] | None = None, split: str = "test", max_samples: int | None = 32) -> dict:
    """Speak each text (default: the split's transcripts) with tts, through Griffin-Lim to a waveform and back to a
    normalised log-mel, and transcribe it with asr. Metrics: CER/WER against the text, and `direct_cer` of asr on the
    codebook spectrogram itself (no vocoder), which separates what Griffin-Lim loses from what tts gets wrong."""
    name, tts, ctx = load_model(tts_ckpt, prep_dir, codebooks, expect="tts")
    _, asr, _ = load_model(asr_ckpt, prep_dir, expect="asr")
    if texts is None:
        texts = [s["info"].get("text") or "" for s in Run(name, tts, ctx, split, max_samples, Path(out_dir)).first()]
    mel_cfg, audio = audio_out.mel_config(ctx.data.stats), ctx.data.modality("audio")
    hyps, direct, shown = [], [], None
    for i in range(0, len(texts), BATCH_SIZE):
        with _amp():
            mel = audio_out.generate_speech(tts, ctx, texts[i : i + BATCH_SIZE])  # (B, n_mels, n_frames)
        wave = audio_out.vocode(ctx.data.stats, mel)  # (B, n_samples)
        heard = audio_out.wave_to_model_mel(wave, mel_cfg, audio["mean"], audio["std"])
        hyps += transcribe(asr, heard)
        direct += transcribe(asr, mel)
        shown = shown or (wave[:N_SHOW], mel[:N_SHOW], heard[:N_SHOW])
    metrics = {"cer": cer(texts, hyps), "wer": wer(texts, hyps), "direct_cer": cer(texts, direct),
               "n": float(len(texts))}
    rows = list(zip(texts, hyps, direct))[:N_EXAMPLES]
    record: dict = {}
    with atomic_dir(out_dir, record) as tmp:
        if shown is not None:
            audio_out.write_wavs(shown[0], mel_cfg.sample_rate, tmp / "wav", "roundtrip")
            audio_out.spectrogram_plot(shown[1], shown[2], texts[:N_SHOW], tmp / "spectrograms.png",
                                       labels=("tts", "after Griffin-Lim"))
        summary = _finish(tmp, record, "round trip: text -> speech -> text", metrics,
                          ["### Examples", _table(("text", "asr after Griffin-Lim", "asr on tts mel"), rows)])
    return {**record, "summary": summary}
