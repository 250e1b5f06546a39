"""Round trips across modalities, judged by the other trained models and by pixel statistics.

    roundtrip_t2i:      prompt -> t2i -> SAMPLES_PER_PROMPT images (seeded; each the best of T2I_SAMPLING.rerank
                        candidates by the trained CLIP, unless that CLIP shares weights with the judging ViT) -> the
                        trained ViT names the shape, the dominant foreground colour (dominant_colour, against the
                        built-in palette and backgrounds) names the colour; CLIP's zero-shot shape and colour are
                        reported beside them, not as judges (a CLIP that re-ranked the samples cannot judge them). A
                        grid per prompt. The ceiling beside it: the ViT on real test images through the image codebook.
    roundtrip_imagegpt: unconditional samples and completions of test images from their top half -> the ViT (shape)
                        and colour_purity (one coloured thing, or scattered pixels?).
    roundtrip_tts:      transcript -> tts -> Griffin-Lim waveform -> log-mel -> asr: CER against the transcript.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from tasks.data.builtin.vocab import Vocabulary
from tasks.eval import audio_out
from tasks.eval.colour import builtin_palette, colour_purity, dominant_colour
from tasks.eval.evaluate import (BATCH_SIZE, N_EXAMPLES, N_SHOW, SEED, Run, amp, load_model, transcribe, zero_shot,
                                 zero_shot_classifiers)
from tasks.eval.generate import (IMAGEGPT_SAMPLING, T2I_SAMPLING, Sampling, clip_scorer,
                                 complete_images, generate_images, imagegpt_pixels, imagegpt_tokens, t2i_pixels)
from tasks.eval.metrics import cer, wer
from tasks.eval.report import finish, image_grid, table
from tasks.infra.checkpoint import load_checkpoint
from tasks.infra.common import atomic_dir
from tasks.train.batches import image_codes, pixels as sample_pixels
from tasks.train.table import spec


SAMPLES_PER_PROMPT = 16  # t2i images drawn per prompt, from one seeded generator
GRID_SAMPLES = 8  # samples shown in each prompt's grid


def slug(text: str) -> str:
    """"a red circle" -> "a_red_circle" (file names)."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def group_shares(key: str, hits: list[bool], groups: dict[str, list[bool]]) -> dict[str, float]:
    """{key: the share of hits, f"{group}_{key}": the share among each group's members}; a key with no hits to count
    is left out."""
    out = {key: sum(hits) / len(hits)} if hits else {}
    for group, member in groups.items():
        if part := [h for h, m in zip(hits, member, strict=True) if m]:
            out[f"{group}_{key}"] = sum(part) / len(part)
    return out


def pair_groups(heldout: list[bool]) -> dict[str, list[bool]]:
    """The items of seen and of held-out (shape, colour) pairs, as group_shares takes them."""
    return {"seen": [not h for h in heldout], "heldout": heldout}


def subset_rates(got: dict[str, list], want: dict[str, list], heldout: list[bool]) -> dict[str, float]:
    """{"<key>_recovered", "seen_<key>_recovered", "heldout_<key>_recovered": fraction of got[key] == want[key]} over
    every item, the items of seen pairs and of held-out pairs (a subset with no items is left out)."""
    out = {}
    for key, w in want.items():
        hits = [g == t for g, t in zip(got[key], w, strict=True)]
        out.update(group_shares(f"{key}_recovered", hits, pair_groups(heldout)))
    return out


def shares_weights(checkpoint: Path, other: Path) -> bool:
    """Did `checkpoint`'s model start part of itself from `other` (its "init_from", tasks/train/trainer.py
    init_part)? A checkpoint from before the field was recorded counts as sharing when its model can start from
    another (table `init`: the pipeline started it so by default)."""
    ckpt = load_checkpoint(checkpoint)
    if "init_from" not in ckpt:
        return spec(ckpt["model"]).init is not None
    return ckpt["init_from"] is not None and os.path.abspath(ckpt["init_from"]) == os.path.abspath(other)


def _judge_images(pixels: torch.Tensor, vit, vctx, clip, cctx, vocab: Vocabulary) -> dict[str, list]:
    """Pixels (N, 3, S, S) 0..255 -> {"shape": ViT argmax, "shape_p": its probability, "colour": dominant pixel
    colour, "clip_shape", "clip_colour": CLIP zero-shot (reported, not the judge)}, a list of N each."""
    probs = []
    for i in range(0, len(pixels), BATCH_SIZE):
        with amp():
            logits = vit({"image": (pixels[i : i + BATCH_SIZE] / 255 - vctx.mean) / vctx.std})[0]
        probs.append(logits.float().softmax(-1))  # (b, C)
    p, idx = torch.cat(probs).max(-1)  # (N,)
    classes = vctx.data.modality("image")["classes"]
    got = {"shape": [classes[i] for i in idx.tolist()], "shape_p": p.tolist(),
           "colour": dominant_colour(pixels, *builtin_palette(vocab)),
           "purity": colour_purity(pixels, *builtin_palette(vocab))}
    if clip is not None:
        classifiers = zero_shot_classifiers(clip, vocab.label_sets())
        preds = [zero_shot(clip, (pixels[i : i + BATCH_SIZE] / 255 - cctx.mean) / cctx.std, classifiers)[0]
                 for i in range(0, len(pixels), BATCH_SIZE)]
        got.update({f"clip_{k}": [x for pr in preds for x in pr[k]] for k in ("shape", "colour")})
    return got


@torch.no_grad()
def roundtrip_t2i(t2i_ckpt: Path, classifier_ckpt: Path, clip_ckpt: Path | None, prep_dir: Path,
                  codebooks: dict[str, str] | None, out_dir: Path, vocab: Vocabulary,
                  prompts: list[str] | None = None, samples: int = SAMPLES_PER_PROMPT,
                  how: Sampling = T2I_SAMPLING) -> dict:
    """Draw `samples` images per prompt (seeded); the judges: the trained ViT names the shape, the dominant
    foreground colour by pixel statistics (dominant_colour) names the colour; CLIP's zero-shot shape and colour are
    reported beside them. Metrics: the fractions of images whose asked shape / colour / both are recovered, over every
    prompt, the seen pairs and the held-out pairs; the ViT's mean top-1 probability. A grid per prompt.
    how.rerank > 1: each image is the best of that many candidates by CLIP (clip_scorer); with no clip_ckpt, or a
    CLIP that shares weights with the judge (shares_weights: the pipeline's CLIP starts from the ViT's stem), one
    candidate (metrics "rerank" says which, the summary why).

    vocab: the shapes, colours and held-out pairs the prompts name (default prompts: every pair of it)."""
    prompts = list(prompts or vocab.prompts())
    name, t2i, tctx = load_model(t2i_ckpt, prep_dir, codebooks, role="image-generator")
    _, vit, vctx = load_model(classifier_ckpt, prep_dir, role="image-classifier")
    clip, cctx = load_model(clip_ckpt, prep_dir, role="image-text")[1:] if clip_ckpt else (None, None)
    asked = [p for p in prompts for _ in range(samples)]  # prompt-major: asked[i * samples + j]
    coupled = clip_ckpt is not None and shares_weights(clip_ckpt, classifier_ckpt)
    scorer = clip_scorer(clip, cctx) if clip is not None and how.rerank > 1 and not coupled else None
    with amp():
        pixels = generate_images(t2i, tctx, asked, how, torch.Generator().manual_seed(SEED), scorer=scorer)
    got = _judge_images(pixels, vit, vctx, clip, cctx, vocab)
    wanted = [vocab.wanted(p) for p in asked]
    want = {"shape": [s for s, _ in wanted], "colour": [c for _, c in wanted]}
    got["pair"], want["pair"] = list(zip(got["shape"], got["colour"])), list(zip(want["shape"], want["colour"]))
    for k in ("shape", "colour") if clip is not None else ():
        want[f"clip_{k}"] = want[k]
    heldout = [pair in vocab.heldout for pair in wanted]
    metrics = {"n": float(len(asked)), "samples_per_prompt": float(samples), "guidance": how.guidance,
               "temperature": how.temperature, "top_k": float(how.top_k or 0),
               "rerank": float(how.rerank if scorer else 1), "reranker_shares_judge_weights": float(coupled),
               **subset_rates(got, want, heldout),
               "vit_top1_probability": sum(got["shape_p"]) / len(asked),
               **codebook_ceiling(Run(name, t2i, tctx, "test", CEILING_IMAGES, Path(out_dir)).first(), tctx, vit, vctx,
                                  vocab)}
    record: dict = {}
    with atomic_dir(out_dir, record) as tmp:
        rows = _t2i_grids(tmp, prompts, samples, pixels, got, want)
        image_grid(pixels[::samples], [f"{p}\n{s} {c}" for p, s, c in zip(prompts, got["shape"][::samples],
                                                                         got["colour"][::samples])],
                   tmp / "roundtrip_t2i.png", ncols=len(vocab.colours))
        why = ([f"One candidate an image, not the best of {how.rerank} by CLIP: this CLIP started from the judging "
                "ViT's weights, so it would pick the samples that this ViT in particular reads as asked (README, "
                "text-to-image)."] if coupled and how.rerank > 1 else [])
        seen, held = (metrics.get(f"{k}_shape_ceiling", float("nan")) for k in ("seen", "heldout"))
        ceiling = (f"A perfect generator would score seen shape {seen:.3f}, held-out {held:.3f}: the same ViT on real "
                   "test images passed through the image codebook (`*_shape_ceiling`).")
        summary = finish(tmp, record, "round trip: text -> image -> judges (ViT shape, pixel colour)", metrics,
                         why + [ceiling, "### Prompts",
                                table(("prompt", "shape recovered", "colour recovered", "both", "grid"), rows),
                                "Overview (one sample a prompt): ![](roundtrip_t2i.png)"])
    return {**record, "summary": summary}


# Real test images the t2i shape ceiling reads (the built-in test split has 368: 201 of seen pairs, 167 held-out).
CEILING_IMAGES = 400


def codebook_ceiling(test: list[dict], tctx, vit, vctx, vocab: Vocabulary) -> dict[str, float]:
    """What a perfect text-to-image model would score: the judging ViT on real test images (samples with "img") passed
    through the image-patch codebook the model draws in (tctx's) -> {"shape_ceiling",
    "seen_shape_ceiling", "heldout_shape_ceiling"} (a subset with no images is left out). Measured on the built-in set
    (2026-12-02, seven ViTs trained apart, their mean): seen 0.83, held-out 0.65 through the k=256 codebook, against
    0.95 / 0.83 on the real images: the ViTs read held-out pairs worse too, having never seen them."""
    coded = t2i_pixels(tctx, image_codes(tctx, sample_pixels(test)))  # (M, 3, S, S)
    metas = [t["info"].get("meta") or {} for t in test]
    rates = subset_rates({"shape": _judge_images(coded, vit, vctx, None, None, vocab)["shape"]},
                         {"shape": [vocab.truth(m)["shape"] for m in metas]}, [vocab.is_heldout(m) for m in metas])
    return {k.replace("_recovered", "_ceiling"): v for k, v in rates.items()}


def _t2i_grids(tmp: Path, prompts: list[str], samples: int, pixels: torch.Tensor, got: dict,
               want: dict) -> list[tuple]:
    """A grid of GRID_SAMPLES images per prompt into tmp/grids/<prompt>.png -> the summary's rows, linking them."""
    rows = []
    for i, p in enumerate(prompts):
        sl = slice(i * samples, (i + 1) * samples)
        hit = {k: [g == w for g, w in zip(got[k][sl], want[k][sl])] for k in ("shape", "colour", "pair")}
        titles = [f"vit: {s} ({q:.2f})\ncolour: {c}" for s, q, c in zip(got["shape"][sl], got["shape_p"][sl],
                                                                       got["colour"][sl])]
        path = Path("grids") / f"{slug(p)}.png"
        (tmp / "grids").mkdir(exist_ok=True)
        image_grid(pixels[sl][:GRID_SAMPLES], titles[:GRID_SAMPLES], tmp / path, ncols=GRID_SAMPLES)
        rows.append((p, *(sum(hit[k]) / samples for k in ("shape", "colour", "pair")), f"[grid]({path})"))
    return rows


IMAGEGPT_SAMPLES = 96  # unconditional ImageGPT samples judged
# Test images whose top half ImageGPT completes (the first ones in file order): every one of the built-in set's 1,399.
# The first 192 read 0.04-0.10 higher than all of them (six checkpoints of 2026-12-03: 0.630-0.729 against
# 0.583-0.635), more than their standard error of ~0.035; all 1,399 (~0.013) take ~20 s on two cores.
IMAGEGPT_COMPLETIONS = 2048
CONFIDENT = 0.5  # a sample the ViT names with at least this top-1 probability "is" a shape (it says so of noise too)
PURE = 0.8  # a sample whose dominant colour is at least this share of its foreground is one coloured thing
# A completion is "visible" when its given top half holds at least this share of the thing's pixels. Of the built-in
# test images 17% show none of it there (the thing sits low) and 38% less than a quarter: those completions draw a
# shape the given half does not tell, so no completion recovers it above chance; the visible share says how well
# ImageGPT completes what it is shown.
VISIBLE = 0.5
BACKGROUND_TOLERANCE = 24  # a pixel off the top-left (background) pixel by more than this in a channel is the thing's


def shown_share(pixels: torch.Tensor, rows: int) -> torch.Tensor:
    """(N, 3, side, side) 0..255 -> (N,): the share of each image's foreground pixels (those off its top-left,
    background, pixel by more than BACKGROUND_TOLERANCE) in its first `rows` rows; 0 for an image without any."""
    fg = (pixels - pixels[:, :, :1, :1]).abs().amax(1) > BACKGROUND_TOLERANCE  # (N, side, side)
    return fg[:, :rows].flatten(1).sum(1) / fg.flatten(1).sum(1).clamp(min=1)


def _upsampled(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """ImageGPT's (N, 3, side, side) palette pixels -> (N, 3, size, size) for the judges (nearest neighbour)."""
    return torch.nn.functional.interpolate(pixels, size=(size, size), mode="nearest")


@torch.no_grad()
def roundtrip_imagegpt(imagegpt_ckpt: Path, classifier_ckpt: Path, prep_dir: Path, codebooks: dict[str, str] | None,
                       out_dir: Path, vocab: Vocabulary, samples: int = IMAGEGPT_SAMPLES,
                       completions: int = IMAGEGPT_COMPLETIONS, how: Sampling = IMAGEGPT_SAMPLING,
                       complete: Sampling = IMAGEGPT_SAMPLING) -> dict:
    """ImageGPT judged by the trained ViT (images upsampled to its size): unconditional samples (the share the ViT
    names with top-1 probability >= CONFIDENT, which scattered pixels reach too; the share that is one coloured thing,
    colour_purity >= PURE; both; the shapes the coherent confident ones cover), and completions of test images from
    their top half (the share whose shape the ViT recovers; `prompt_only`: the same ViT on the top half with the
    bottom filled by the top-left pixel, what the given half alone tells; `ceiling`: the same ViT on the real image at
    ImageGPT's size and palette, what a perfect completion scores), over every completion, over the `visible` ones
    (shown_share >= VISIBLE), and over the `heldout` and `seen` ones (held out: a (shape, colour) pair kept out of
    training, ImageGPT's too). Samples drawn as `how` says, completions as `complete`. Grids of both."""
    name, gpt, ctx = load_model(imagegpt_ckpt, prep_dir, codebooks, role="image-sampler")
    _, vit, vctx = load_model(classifier_ckpt, prep_dir, role="image-classifier")
    size, g = vctx.data.image_size, torch.Generator().manual_seed(SEED)
    with amp():
        drawn = imagegpt_pixels(gpt, ctx, gpt.generate(samples, how.temperature, how.top_k, generator=g))
    got = _judge_images(_upsampled(drawn, size), vit, vctx, None, None, vocab)
    coherent = [c is not None and q >= PURE for c, q in zip(got["colour"], got["purity"])]
    confident = [p >= CONFIDENT for p in got["shape_p"]]
    covered = sorted({s for s, c, k in zip(got["shape"], confident, coherent) if c and k})
    metrics = {"n_samples": float(samples), "confident_share": sum(confident) / samples,
               "coherent_share": sum(coherent) / samples,
               "coherent_confident_share": sum(a and b for a, b in zip(coherent, confident)) / samples,
               "shapes_covered": float(len(covered))}
    run = Run(name, gpt, ctx, "test", completions, Path(out_dir), vocab)
    test = run.first()
    real = sample_pixels(test)  # (M, 3, S, S) 0..255
    truth = [vocab.truth(t["info"].get("meta") or {})["shape"] for t in test]
    half = math.isqrt(gpt.cfg.seq_len) // 2
    with amp():
        done = complete_images(gpt, ctx, real, half, complete, g)  # (M, 3, side, side)
    given = done.clone()
    given[:, :, half:] = given[:, :, :1, :1]  # the bottom half as the top-left (background) pixel
    small = imagegpt_pixels(gpt, ctx, imagegpt_tokens(gpt, ctx, real))  # (M, 3, side, side): the real image's
    groups = {"visible": (shown_share(small, half) >= VISIBLE).tolist(), **pair_groups([run.heldout(t) for t in test])}
    metrics.update(n_completions=float(len(test)), **{f"n_{k}": float(sum(m)) for k, m in groups.items()})
    named = {}
    for key, pixels in (("completion_shape_recovered", done), ("prompt_only_shape_recovered", given),
                        ("completion_ceiling", small)):
        named[key] = _judge_images(_upsampled(pixels, size), vit, vctx, None, None, vocab)["shape"]
        metrics.update(group_shares(key, [a == b for a, b in zip(named[key], truth)], groups))
    record: dict = {}
    with atomic_dir(out_dir, record) as tmp:
        titles = [f"vit: {s} ({q:.2f})\npurity {u:.2f}" for s, q, u in zip(got["shape"], got["shape_p"],
                                                                           got["purity"])]
        image_grid(drawn[:4 * GRID_SAMPLES], titles, tmp / "samples.png", ncols=GRID_SAMPLES)
        n = min(GRID_SAMPLES, len(test))
        image_grid(torch.cat([small[:n], given[:n], done[:n]]), [f"test: {t}" for t in truth[:n]] + ["given"] * n
                   + [f"vit: {s}" for s in named["completion_shape_recovered"][:n]], tmp / "completions.png", ncols=n)
        summary = finish(tmp, record, "round trip: ImageGPT -> ViT", metrics,
                         [f"Shapes the ViT names (p >= {CONFIDENT}) in the one-coloured-thing samples: "
                          f"{', '.join(covered) or 'none'}",
                          "Samples: ![](samples.png)", "Completions (test, given top half, completed): "
                          "![](completions.png)"])
    return {**record, "summary": summary}


# Test transcripts text-to-speech speaks (the first ones in file order): every one of the built-in set's 157. The first
# 32 (before 2026-12-03's thirteenth session) read 0.139 / 0.068 / 0.074 / 0.227 where all 157 read 0.166 / 0.064 /
# 0.109 / 0.218 (four checkpoints, one judge): off by up to 0.04 at the 0.15 target. ~25 s more on two slow cores.
TTS_TRANSCRIPTS = 160


@torch.no_grad()
def roundtrip_tts(tts_ckpt: Path, asr_ckpt: Path, prep_dir: Path, codebooks: dict[str, str] | None, out_dir: Path,
                  vocab: Vocabulary | None = None, texts: list[str] | None = None, split: str = "test",
                  max_samples: int | None = TTS_TRANSCRIPTS) -> dict:
    """Speak each text (default: the split's transcripts) with tts, through Griffin-Lim to a waveform and back to a
    normalised log-mel, and transcribe it with asr. Metrics: CER/WER against the text, and `direct_cer` of asr on the
    generated spectrogram itself (no vocoder), which separates what Griffin-Lim loses from what tts gets wrong.
    Text i is spoken in the voice of the train split's clip i mod N_VOICES (audio_out.reference_voices).
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
        links = [f"[{t}](wav/roundtrip_{i:02d}.wav)" for i, t in enumerate(texts[:N_SHOW])]
        summary = finish(tmp, record, "round trip: text -> speech -> text", metrics,
                          ["### Examples", table(("text", "asr after Griffin-Lim", "asr on tts mel"), rows),
                           "Speech: " + ", ".join(links), "Spectrograms: ![](spectrograms.png)"])
    return {**record, "summary": summary}


@dataclass(frozen=True)
class RoundTrip:
    """A round trip and the model roles it needs (the model table's `role`)."""

    roles: tuple[str, ...]
    run: Callable[..., dict]  # (checkpoints by role, prep_dir, codebooks, out_dir, vocab) -> record
    needs_vocab: bool = False  # its prompts and judges are the data's vocabulary (the built-in set's)
    headline: tuple[str, ...] = ()  # the metrics a run's summary names first (issue 13's targets), in this order


ROUND_TRIPS: dict[str, RoundTrip] = {
    "t2i": RoundTrip(("image-generator", "image-classifier", "image-text"),
                     lambda c, prep, cbs, out, vocab: roundtrip_t2i(c["image-generator"], c["image-classifier"],
                                                                    c["image-text"], prep, cbs, out, vocab),
                     needs_vocab=True,
                     headline=("seen_shape_recovered", "heldout_shape_recovered", "colour_recovered")),
    "image-sampler": RoundTrip(("image-sampler", "image-classifier"),
                               lambda c, prep, cbs, out, vocab: roundtrip_imagegpt(
                                   c["image-sampler"], c["image-classifier"], prep, cbs, out, vocab),
                               needs_vocab=True,
                               headline=("confident_share", "shapes_covered", "completion_shape_recovered")),
    "tts": RoundTrip(("speech-generator", "speech-recogniser"),
                     lambda c, prep, cbs, out, vocab: roundtrip_tts(c["speech-generator"], c["speech-recogniser"],
                                                                    prep, cbs, out, vocab),
                     headline=("cer",)),
}
ROLES = tuple(dict.fromkeys(r for trip in ROUND_TRIPS.values() for r in trip.roles))


def not_run(roles: set[str], builtin: bool) -> dict[str, str]:
    """{round trip: why it does not run} for each one whose generator (its first role) is among `roles` but which
    cannot run: a judge missing (named by its role) or a judge by the built-in vocabulary on other data."""
    why = {}
    for name, trip in ROUND_TRIPS.items():
        if trip.roles[0] not in roles:
            continue
        missing = [r for r in trip.roles if r not in roles]
        if missing:
            why[name] = "needs the " + " and the ".join(missing) + " model trained in the same run"
        elif trip.needs_vocab and not builtin:
            why[name] = "judges by the built-in set's shapes and colours"
    return why
