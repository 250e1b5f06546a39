"""Round trips across modalities, scored by the other trained models.

    roundtrip_t2i: caption -> t2i -> image -> ViT (shape) and CLIP zero-shot (shape, colour): was the request kept?
    roundtrip_tts: transcript -> tts -> Griffin-Lim waveform -> log-mel -> asr: CER against the transcript.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from tasks.data.builtin.vocab import Vocabulary
from tasks.eval import audio_out
from tasks.eval.evaluate import (BATCH_SIZE, N_EXAMPLES, N_SHOW, Run, amp, generate_images, load_model, transcribe,
                                 zero_shot, zero_shot_classifiers)
from tasks.eval.metrics import cer, hit_rates, wer
from tasks.eval.report import finish, image_grid, table
from tasks.infra.common import atomic_dir


@torch.no_grad()
def roundtrip_t2i(t2i_ckpt: Path, classifier_ckpt: Path, clip_ckpt: Path, prep_dir: Path,
                  codebooks: dict[str, str] | None, out_dir: Path, vocab: Vocabulary,
                  prompts: list[str] | None = None) -> dict:
    """Generate an image per prompt, classify it with the ViT (shape) and CLIP zero-shot (shape, colour); metrics are
    the fractions of prompts whose named shape / colour is recovered (and on the held-out pairs alone).

    vocab: the shapes, colours and held-out pairs the prompts name (default prompts: every pair of it)."""
    prompts = list(prompts or vocab.prompts())
    _, t2i, tctx = load_model(t2i_ckpt, prep_dir, codebooks, role="image-generator")
    _, vit, vctx = load_model(classifier_ckpt, prep_dir, role="image-classifier")
    _, clip, cctx = load_model(clip_ckpt, prep_dir, role="image-text")
    pixels = generate_images(t2i, tctx, prompts)  # (N, 3, S, S)
    with amp():
        vit_pred = vit({"image": (pixels / 255 - vctx.mean) / vctx.std})[0].argmax(-1).tolist()
    classes = vctx.data.modality("image")["classes"]
    classifiers = zero_shot_classifiers(clip, vocab.label_sets())
    clip_pred, _ = zero_shot(clip, (pixels / 255 - cctx.mean) / cctx.std, classifiers)
    got = {"vit_shape": [classes[i] for i in vit_pred], **clip_pred}
    wanted = [vocab.wanted(p) for p in prompts]
    want = {"shape": [s for s, _ in wanted], "colour": [c for _, c in wanted]}
    heldout = [pair in vocab.heldout for pair in wanted]
    rows = hit_rates({"vit_shape": got["vit_shape"], "clip_shape": got["shape"], "clip_colour": got["colour"]},
                     {"vit_shape": want["shape"], "clip_shape": want["shape"], "clip_colour": want["colour"]}, heldout)
    metrics = {"n": float(len(prompts))}
    metrics.update({f"{'' if sub == 'all' else 'heldout_'}{k}_recovered": acc for k, sub, _, acc in rows})
    titles = [f"{p}\nvit: {v}\nclip: {c} {s}" for p, v, c, s in zip(prompts, got["vit_shape"], got["colour"],
                                                                      got["shape"])]
    record: dict = {}
    with atomic_dir(out_dir, record) as tmp:
        image_grid(pixels, titles, tmp / "roundtrip_t2i.png", ncols=len(vocab.colours))
        rows = [(p, v, f"{c} {s}") for p, v, c, s in zip(prompts, got["vit_shape"], got["colour"], got["shape"])]
        summary = finish(tmp, record, "round trip: text -> image -> classifiers", metrics,
                          ["### Prompts", table(("prompt", "vit shape", "clip colour shape"), rows)])
    return {**record, "summary": summary}


@torch.no_grad()
def roundtrip_tts(tts_ckpt: Path, asr_ckpt: Path, prep_dir: Path, codebooks: dict[str, str] | None, out_dir: Path,
                  vocab: Vocabulary | None = None, texts: list[str] | None = None, split: str = "test",
                  max_samples: int | None = 32) -> dict:
    """Speak each text (default: the split's transcripts) with tts, through Griffin-Lim to a waveform and back to a
    normalised log-mel, and transcribe it with asr. Metrics: CER/WER against the text, and `direct_cer` of asr on the
    codebook spectrogram itself (no vocoder), which separates what Griffin-Lim loses from what tts gets wrong.
    vocab is not needed (the text is the judge's target); it is taken for a signature common to every round trip."""
    name, tts, ctx = load_model(tts_ckpt, prep_dir, codebooks, role="speech-generator")
    _, asr, _ = load_model(asr_ckpt, prep_dir, role="speech-recogniser")
    if texts is None:
        texts = [s["info"].get("text") or "" for s in Run(name, tts, ctx, split, max_samples, Path(out_dir)).first()]
    mel_cfg, audio = audio_out.mel_config(ctx.data.stats), ctx.data.modality("audio")
    hyps, direct, shown = [], [], None
    for i in range(0, len(texts), BATCH_SIZE):
        with amp():
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
        summary = finish(tmp, record, "round trip: text -> speech -> text", metrics,
                          ["### Examples", table(("text", "asr after Griffin-Lim", "asr on tts mel"), rows)])
    return {**record, "summary": summary}


@dataclass(frozen=True)
class RoundTrip:
    """A round trip and the model roles it needs (the model table's `role`)."""

    roles: tuple[str, ...]
    run: Callable[..., dict]  # (checkpoints by role, prep_dir, codebooks, out_dir, vocab) -> record
    needs_vocab: bool = False  # its prompts and judges are the data's vocabulary (the built-in set's)


ROUND_TRIPS: dict[str, RoundTrip] = {
    "t2i": RoundTrip(("image-generator", "image-classifier", "image-text"),
                     lambda c, prep, cbs, out, vocab: roundtrip_t2i(c["image-generator"], c["image-classifier"],
                                                                    c["image-text"], prep, cbs, out, vocab),
                     needs_vocab=True),
    "tts": RoundTrip(("speech-generator", "speech-recogniser"),
                     lambda c, prep, cbs, out, vocab: roundtrip_tts(c["speech-generator"], c["speech-recogniser"],
                                                                    prep, cbs, out, vocab)),
}
ROLES = tuple(dict.fromkeys(r for trip in ROUND_TRIPS.values() for r in trip.roles))
