"""Evaluation: hand-checked metric functions, Griffin-Lim on a tone, and every model's evaluate + the round trips on
the tiny built-in world (tests/conftest.py), with real checkpoints of the trainer. Where a value is asserted it is a
known answer: a blank model (every weight zero) predicts class 0 for everything, gives every token the same
probability, and embeds every image and caption as the zero vector, so its metrics follow from the test split alone."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from tasks.data.builtin.vocab import BUILTIN, Vocabulary
from tasks.data.features import MelConfig, log_mel
from tasks.eval import evaluate as ev
from tasks.eval import metrics as mt
from tasks.eval import roundtrip
from tasks.eval.audio_out import mel_config, mel_to_wave, wave_to_model_mel
from tasks.infra.checkpoint import load_checkpoint
from tasks.train.table import MODELS


@pytest.fixture(scope="module")
def world(builtin_world, tiny_checkpoints):
    return {"tmp": builtin_world["root"], "prep": builtin_world["prep"], "codebooks": builtin_world["codebooks"],
            "ckpts": tiny_checkpoints["trained"], "blank": tiny_checkpoints["blank"], "mel": builtin_world["mel"]}


def split_rows(world, modality: str) -> list[dict]:
    """The test split's manifest rows of one modality, with their metadata parsed."""
    shards = world["prep"].parent / "shards"
    rows = [r for r in pq.read_table(shards / "manifest.parquet").to_pylist()
            if r["modality"] == modality and r["split"] == "test"]
    return [{**r, "meta": json.loads(r["meta"] or "{}")} for r in rows]


def assert_png(path, min_bytes: int = 2000) -> None:
    assert path.stat().st_size > min_bytes
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    assert pixels.std() > 5  # not a blank canvas


# ---------------------------------------------------------------------------------------------------- metric functions
def test_levenshtein_cer_wer():
    assert mt.levenshtein("kitten", "sitting") == 3
    assert mt.levenshtein("", "abc") == 3 and mt.levenshtein("abc", "") == 3 and mt.levenshtein("abc", "abc") == 0
    assert mt.levenshtein("flaw", "lawn") == 2
    assert mt.levenshtein(["a", "red", "circle"], ["a", "blue", "circle"]) == 1
    assert mt.cer(["kitten"], ["sitting"]) == pytest.approx(3 / 6)
    assert mt.wer(["a red circle", "star"], ["a blue circle", "star"]) == pytest.approx(1 / 4)
    assert mt.cer(["A  Red circle"], ["a red circle "]) == 0.0  # case and spacing are normalised
    assert mt.wer(["red square"], [""]) == 1.0


def test_perfect_classifier_is_diagonal():
    classes = ["circle", "square", "star", "cross"]
    labels = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0, 0])
    logits = 10 * torch.nn.functional.one_hot(labels, 4).float() + torch.rand(9, 4)
    metrics, rows, cm = mt.classification_metrics(logits, labels, classes)
    assert metrics["accuracy"] == 1.0 and metrics["top5_accuracy"] == 1.0
    assert torch.equal(cm, torch.diag(torch.tensor([3, 2, 2, 2])))
    assert [r[:2] for r in rows] == [("circle", 3), ("square", 2), ("star", 2), ("cross", 2)]
    assert all(r[2] == 1.0 for r in rows)
    wrong = mt.classification_metrics(logits.roll(1, dims=1), labels, classes)[0]
    assert wrong["accuracy"] == 0.0 and wrong["top5_accuracy"] == 1.0  # 4 classes: top-5 holds them all


def test_zero_shot_prompt_ensemble_averages_normalised_embeddings():
    table = {"a": torch.tensor([10.0, 0.0]), "b": torch.tensor([0.0, 1.0]), "c": torch.tensor([-3.0, 4.0])}

    def encode(texts):  # a stub text tower: very different norms per prompt
        return torch.stack([table[t] for t in texts])

    w = mt.zero_shot_weights(encode, [["a", "b"], ["c"]])
    assert w.shape == (2, 2)
    expect = torch.nn.functional.normalize(torch.tensor([0.5, 0.5]), dim=0)  # unweighted by the raw norms 10 and 1
    torch.testing.assert_close(w[:, 0], expect)
    torch.testing.assert_close(w[:, 1], torch.tensor([-0.6, 0.8]))


def test_label_sets_and_prompts():
    sets = mt.zero_shot_prompts(BUILTIN.label_sets())
    assert {k: len(v[0]) for k, v in sets.items()} == {"shape": 6, "colour": 6, "combo": 36}
    assert all(len(p) == 6 * len(mt.TEMPLATES) for p in sets["shape"][1] + sets["colour"][1])
    assert "a photo of an orange star." in mt.prompt_ensemble("orange star")
    assert "a photo of a red circle." in sets["colour"][1][0]  # red's ensemble names red with every shape
    assert sets["combo"][1][0] == mt.prompt_ensemble("red circle")
    assert "a red circle" in BUILTIN.prompts() and "an orange star" in BUILTIN.prompts() and len(BUILTIN.prompts()) == 36


def test_retrieval_recall():
    assert mt.retrieval_recall(torch.eye(12)) == {1: 1.0, 5: 1.0, 10: 1.0}
    sim = torch.eye(12).flip(0) - torch.eye(12)  # every match scores lowest
    assert mt.retrieval_recall(sim) == {1: 0.0, 5: 0.0, 10: 0.0}


@pytest.mark.parametrize("cfg, freq", [(MelConfig(), 440.0), (MelConfig(n_mels=64, n_frames=64), 1500.0)])
def test_griffin_lim_recovers_a_tone(cfg, freq):  # the default 128 bands leave the mel filterbank rank-deficient
    t = np.arange(cfg.n_samples) / cfg.sample_rate
    mel = log_mel([0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)], cfg)  # (1, 64, 64)
    mean, std = mel.mean().item(), mel.std().item()
    wave = mel_to_wave((mel - mean) / std, cfg, mean, std)
    assert wave.shape == (1, cfg.n_samples) and wave.abs().max() <= 1.0
    spectrum = np.abs(np.fft.rfft(wave[0].numpy() * np.hanning(cfg.n_samples)))
    peak = np.fft.rfftfreq(cfg.n_samples, 1 / cfg.sample_rate)[spectrum.argmax()]
    assert abs(peak - freq) < 0.08 * freq
    again = wave_to_model_mel(wave, cfg, mean, std)  # back to the model's input: the tone's band still dominates
    assert abs(again[0].mean(-1).argmax().item() - mel[0].mean(-1).argmax().item()) <= 1


# ---------------------------------------------------------------------------------------------------- evaluate
def check_common(result, out):
    assert set(result) >= {"metrics", "artifacts", "summary"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in result["metrics"].values())
    assert {"metrics.json", "summary.md"} <= set(result["artifacts"])
    assert all((out / a).is_file() for a in result["artifacts"])
    assert (out / "_SUCCESS").is_file() and not list(out.parent.glob(f".{out.name}.tmp-*"))
    assert result["summary"].startswith("## ")
    assert json.loads((out / "metrics.json").read_text()) == result["metrics"]
    for a in result["artifacts"]:
        if a.endswith(".png"):
            assert_png(out / a)


@pytest.mark.parametrize("name, modality", [("vit", "image"), ("ast", "audio")])
def test_evaluate_classifier_known_answers(world, name, modality):
    """A blank classifier says class 0 (the first class folder) for everything: accuracy is class 0's share of the
    test split, and no held-out pair is a circle. (Which five classes tie into its top 5 is torch.topk's choice.)"""
    out = world["tmp"] / f"out-{name}"
    res = ev.evaluate(name, world["blank"][name], world["prep"], out, vocab=BUILTIN)
    check_common(res, out)
    rows = split_rows(world, modality)
    classes = json.loads((world["prep"] / "stats.json").read_text())[modality]["classes"]
    labels = [r["label"] for r in rows]
    m = res["metrics"]
    assert m["n"] == len(rows)
    assert m["accuracy"] == pytest.approx(labels.count(classes[0]) / len(rows))
    table = list(csv.reader(open(out / "per_class.csv")))
    assert table[0] == ["class", "n", "accuracy"]
    assert {r[0]: int(r[1]) for r in table[1:]} == {c: labels.count(c) for c in classes}
    assert "### Per class" in res["summary"]
    heldout = [r for r in rows if BUILTIN.is_heldout(r["meta"])]
    if name == "vit":  # every held-out (shape, colour) pair is in the test split; none of them is a circle
        assert m["n_heldout"] == len(heldout) >= 3 and m["heldout_accuracy"] == 0.0


def test_evaluate_without_a_vocabulary_leaves_out_the_heldout_subset(world, tmp_path):
    res = ev.evaluate("vit", world["blank"]["vit"], world["prep"], tmp_path / "out")
    assert "heldout_accuracy" not in res["metrics"] and "accuracy" in res["metrics"]


@pytest.mark.parametrize("name", ["imagegpt", "t2i"])
def test_evaluate_generative(world, name):
    """A blank token model spreads its probability evenly: log2(vocabulary) bits per token, exactly."""
    out = world["tmp"] / f"out-{name}"
    res = ev.evaluate(name, world["blank"][name], world["prep"], out, codebooks=world["codebooks"], max_samples=12)
    check_common(res, out)
    m = res["metrics"]
    cfg = load_checkpoint(world["blank"][name])["config"]
    vocab = cfg.get("vocab_size") or cfg["tgt_vocab"]
    assert m["bits_per_token"] == pytest.approx(math.log2(vocab), rel=1e-5)
    assert m["nll_nats"] == pytest.approx(m["bits_per_token"] * math.log(2))
    trained = ev.evaluate(name, world["ckpts"][name], world["prep"], out.with_name(f"{out.name}-trained"),
                          codebooks=world["codebooks"], max_samples=12)
    assert "samples.png" in trained["artifacts"]
    check_common(trained, out.with_name(f"{out.name}-trained"))


def test_evaluate_tts(world):
    """Text-to-speech is scored by L1 to the real log-mel: training lowers it from the blank model's; the WAVs have the
    data's rate and length."""
    out = world["tmp"] / "out-tts"
    blank = ev.evaluate("tts", world["blank"]["tts"], world["prep"], out, max_samples=12)
    trained = ev.evaluate("tts", world["ckpts"]["tts"], world["prep"], out.with_name("out-tts-trained"), max_samples=12)
    for res, folder in ((blank, out), (trained, out.with_name("out-tts-trained"))):
        check_common(res, folder)
        assert res["metrics"]["n"] == len(split_rows(world, "audio")) and res["metrics"]["length_error_frames"] >= 0
    assert trained["metrics"]["mel_l1"] < blank["metrics"]["mel_l1"]
    wavs = [a for a in trained["artifacts"] if a.endswith(".wav")]
    assert any(a.startswith("wav/generated_") for a in wavs) and any(a.startswith("wav/reference_") for a in wavs)
    assert "spectrograms.png" in trained["artifacts"]
    import soundfile as sf

    wave, sr = sf.read(out.with_name("out-tts-trained") / wavs[0])
    assert sr == world["mel"].sample_rate and len(wave) == world["mel"].n_samples


def test_evaluate_asr(world):
    """A blank recogniser never says a word of the reference: WER 1 exactly; the cap on samples holds."""
    out = world["tmp"] / "out-asr"
    res = ev.evaluate("asr", world["blank"]["asr"], world["prep"], out, max_samples=4)
    check_common(res, out)
    assert res["metrics"]["n"] == 4 and res["metrics"]["wer"] == 1.0 and res["metrics"]["cer"] >= 1.0
    table = (out / "examples.md").read_text().splitlines()
    assert table[0] == "| reference | hypothesis |" and len(table) == 2 + 4


def test_evaluate_clip_known_answers(world):
    """A blank CLIP scores every image against every caption and prompt alike. Zero-shot then picks the first class
    of each label set (circle, red, "red circle"); recall@k is 1 for every k, because ties count for the match:
    a CLIP that cannot tell captions apart looks perfect on recall, which is why zero-shot is reported beside it."""
    out = world["tmp"] / "out-clip"
    res = ev.evaluate("clip", world["blank"]["clip"], world["prep"], out, vocab=BUILTIN)
    check_common(res, out)
    m, rows = res["metrics"], split_rows(world, "image")
    truths = [BUILTIN.truth(r["meta"]) for r in rows]
    assert m["n"] == len(rows)
    for label_set, first in (("shape", "circle"), ("colour", "red"), ("combo", "red circle")):
        assert m[f"zero_shot/{label_set}_accuracy"] == pytest.approx(
            sum(t[label_set] == first for t in truths) / len(rows))
        assert m[f"zero_shot/{label_set}_heldout_accuracy"] == 0.0  # no held-out pair is a red circle
    assert all(m[f"retrieval/{d}_recall_at_{k}"] == 1.0 for d in ("i2t", "t2i") for k in (1, 5, 10))


def test_evaluate_clip_on_other_data_uses_its_class_names(world):
    """Without the built-in vocabulary, zero-shot runs on the data's own labels ("a photo of a circle." ...): a blank
    CLIP picks the first class for every image."""
    res = ev.evaluate("clip", world["blank"]["clip"], world["prep"], world["tmp"] / "out-clip-labels")
    m, rows = res["metrics"], split_rows(world, "image")
    classes = json.loads((world["prep"] / "stats.json").read_text())["image"]["classes"]
    assert m["zero_shot/label_accuracy"] == pytest.approx(sum(r["label"] == classes[0] for r in rows) / len(rows))
    assert not [k for k in m if "shape" in k or "colour" in k or "heldout" in k]


def test_evaluate_clip_of_a_trained_model_orders_its_recalls(world):
    res = ev.evaluate("clip", world["ckpts"]["clip"], world["prep"], world["tmp"] / "out-clip-trained", vocab=BUILTIN)
    for d in ("i2t", "t2i"):
        r = [res["metrics"][f"retrieval/{d}_recall_at_{k}"] for k in (1, 5, 10)]
        assert r == sorted(r)


@pytest.mark.parametrize("name", ["vit", "t2i"])
def test_evaluate_under_bf16_autocast(world, name, monkeypatch):
    fp32 = ev.evaluate(name, world["blank"][name], world["prep"], world["tmp"] / f"out-fp32-{name}",
                       codebooks=world["codebooks"], max_samples=4)
    monkeypatch.setattr(ev, "PRECISION", "bf16")
    bf16 = ev.evaluate(name, world["blank"][name], world["prep"], world["tmp"] / f"out-bf16-{name}",
                       codebooks=world["codebooks"], max_samples=4)
    assert bf16["metrics"] == pytest.approx(fp32["metrics"])  # blank logits are 0 in any precision


def test_evaluate_rejects_a_checkpoint_of_another_model(world, tmp_path):
    with pytest.raises(ValueError, match="holds a vit"):
        ev.evaluate("ast", world["ckpts"]["vit"], world["prep"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_every_model_of_the_table_has_its_evaluation(world, tmp_path):
    for name in MODELS:
        res = ev.evaluate(name, world["ckpts"][name], world["prep"], tmp_path / name, codebooks=world["codebooks"],
                          max_samples=4, vocab=BUILTIN)
        assert res["metrics"]["n" if "n" in res["metrics"] else "n_tokens"] > 0


def test_roundtrip_t2i(world):
    """Blank judges: the ViT says circle (top-1 probability 1/6) and CLIP says red circle for every image, so exactly
    the prompts that ask for a circle (red) are recovered by them; the held-out prompts (blue triangle, orange star)
    never are. Colour is judged from the pixels; each prompt gets its samples and its grid."""
    out = world["tmp"] / "rt-t2i"
    c, b = world["ckpts"], world["blank"]
    prompts = ["a red circle", "a blue triangle", "an orange star", "a green circle"]
    res = roundtrip.roundtrip_t2i(c["t2i"], b["vit"], b["clip"], world["prep"], world["codebooks"], out, BUILTIN,
                                  prompts=prompts, samples=3)
    check_common(res, out)
    m = res["metrics"]
    assert m["n"] == 12 and m["samples_per_prompt"] == 3
    assert (m["shape_recovered"], m["clip_shape_recovered"], m["clip_colour_recovered"]) == (0.5, 0.5, 0.25)
    assert m["heldout_shape_recovered"] == m["heldout_clip_colour_recovered"] == m["heldout_pair_recovered"] == 0.0
    assert m["seen_shape_recovered"] == 1.0 and m["vit_top1_probability"] == pytest.approx(1 / 6)
    assert 0.0 <= m["colour_recovered"] <= 1.0 and m["pair_recovered"] <= m["colour_recovered"]
    assert "roundtrip_t2i.png" in res["artifacts"]
    # the ceiling: the same ViT (circle, always) on the real test images through the codebook, seen and held-out apart
    rows = split_rows(world, "image")
    held = [BUILTIN.is_heldout(r["meta"]) for r in rows]
    for prefix, keep in (("", [True] * len(rows)), ("seen_", [not h for h in held]), ("heldout_", held)):
        circles = [r["meta"]["shape"] == "circle" for r, k in zip(rows, keep) if k]
        assert m.get(f"{prefix}shape_ceiling") == (sum(circles) / len(circles) if circles else None)
    assert "A perfect generator would score seen shape" in (out / "summary.md").read_text()
    assert sorted(a for a in res["artifacts"] if a.startswith("grids/")) == [
        "grids/a_blue_triangle.png", "grids/a_green_circle.png", "grids/a_red_circle.png", "grids/an_orange_star.png"]
    assert "](grids/a_red_circle.png)" in (out / "summary.md").read_text()


def test_the_t2i_ceiling_reads_real_test_images_through_the_codebook():
    """codebook_ceiling judges the real test images as the generator could draw them: a judge that names "circle" an
    image with an edge in it and "square" a flat one reads two drawn circles (seen) and a blue triangle (held out)
    through a grey-and-white codebook as circles, but through a one-code (grey) codebook they come out flat."""
    from types import SimpleNamespace

    from models.vq import Codebook

    img = np.full((3, 8, 8), 128.0, dtype=np.float32)
    img[:, :4, :4] = 255.0  # a white 4x4 patch on grey: exactly one of the four patches
    test = [{"img": img, "info": {"meta": {"shape": s, "colour": c}}}
            for s, c in (("circle", "red"), ("circle", "green"), ("triangle", "blue"))]

    def judge(batch):  # -> logits over ("circle", "square", "triangle"): an edge -> circle, flat -> square
        edged = (batch["image"].flatten(1).std(1) > 1e-3).float()
        return (torch.stack([edged, 1 - edged, torch.zeros_like(edged)], 1),)

    vctx = SimpleNamespace(mean=0.0, std=1.0,
                           data=SimpleNamespace(modality=lambda m: {"classes": ["circle", "square", "triangle"]}))
    got = {}
    for name, values in (("grey", [128.0]), ("grey and white", [128.0, 255.0])):
        code = SimpleNamespace(codebook=Codebook.from_codes(torch.tensor(values)[:, None].expand(-1, 48)), patch=4)
        tctx = SimpleNamespace(data=SimpleNamespace(codebook=lambda kind, c=code: c, image_size=8))
        m = roundtrip.codebook_ceiling(test, tctx, judge, vctx, BUILTIN)
        got[name] = (m["shape_ceiling"], m["seen_shape_ceiling"], m["heldout_shape_ceiling"])
    assert got == {"grey": (0.0, 0.0, 0.0), "grey and white": (pytest.approx(2 / 3), 1.0, 0.0)}


def test_a_clip_started_from_the_judge_does_not_rerank_what_the_judge_reads(world, tmp_path):
    """A CLIP whose stem started from the judging ViT would pick the samples that ViT reads as asked (the default
    run's: seen shape 0.70 by that ViT, 0.54 by one trained apart), so the round trip draws one candidate an image and
    says why; the same CLIP recorded as started from nothing re-ranks. The trainer records where a part started."""
    from tasks.eval.generate import Sampling
    from tasks.infra.checkpoint import save_checkpoint
    from tasks.train.trainer import TrainConfig, train

    c, b = world["ckpts"], world["blank"]
    clip = load_checkpoint(b["clip"])
    rows = {}
    for name, source in (("coupled", str(b["vit"])), ("apart", None)):
        save_checkpoint(tmp_path / f"{name}.pt", {**clip, "init_from": source})
        res = roundtrip.roundtrip_t2i(c["t2i"], b["vit"], tmp_path / f"{name}.pt", world["prep"], world["codebooks"],
                                      tmp_path / name, BUILTIN, prompts=["a red circle"], samples=2,
                                      how=Sampling(guidance=2.0, temperature=0.3, top_k=8, rerank=3))
        rows[name] = (res["metrics"]["rerank"], res["metrics"]["reranker_shares_judge_weights"],
                      "started from the judging ViT" in (tmp_path / name / "summary.md").read_text())
    assert rows == {"coupled": (1.0, 1.0, True), "apart": (3.0, 0.0, False)}
    cfg = TrainConfig(max_steps=1, batch_size=4, warmup_steps=1, eval_every=1, ckpt_every=1, log_every=1,
                      precision="fp32", shuffle_buffer=1)
    record = train("clip", world["prep"], tmp_path / "clip", cfg, preset="tiny", init_from=c["vit"])
    assert load_checkpoint(record["checkpoint"])["init_from"] == str(c["vit"])
    assert roundtrip.shares_weights(record["checkpoint"], c["vit"])
    assert not roundtrip.shares_weights(record["checkpoint"], b["vit"])
    # a checkpoint from before "init_from" was recorded: a model that can start from another is taken to have
    legacy = {k: v for k, v in clip.items() if k != "init_from"}
    save_checkpoint(tmp_path / "legacy.pt", legacy)
    assert roundtrip.shares_weights(tmp_path / "legacy.pt", b["vit"])
    vit = {k: v for k, v in load_checkpoint(b["vit"]).items() if k != "init_from"}
    save_checkpoint(tmp_path / "legacy-vit.pt", vit)
    assert not roundtrip.shares_weights(tmp_path / "legacy-vit.pt", b["vit"])


def test_roundtrip_imagegpt(world):
    """A blank ViT names every image a circle with probability 1/6: no sample is confident, and a completion's shape
    is recovered exactly when the test image is a circle (over all of them, the seen pairs and the held-out ones)."""
    out, rows = world["tmp"] / "rt-imagegpt", split_rows(world, "image")
    res = roundtrip.roundtrip_imagegpt(world["ckpts"]["imagegpt"], world["blank"]["vit"], world["prep"],
                                       world["codebooks"], out, BUILTIN, samples=6, completions=len(rows))
    check_common(res, out)
    m = res["metrics"]
    assert m["confident_share"] == m["coherent_confident_share"] == m["shapes_covered"] == 0.0
    circles = sum(r["meta"]["shape"] == "circle" for r in rows)
    assert m["n_completions"] == len(rows) and m["completion_shape_recovered"] == circles / len(rows)
    assert m["prompt_only_shape_recovered"] == m["completion_ceiling"] == circles / len(rows)
    assert 0 <= m["n_visible"] <= len(rows)
    held = sum(BUILTIN.is_heldout(r["meta"]) for r in rows)  # no held-out pair is a circle: none of theirs recovered
    assert m["n_heldout"] == held > 0 and m["heldout_completion_shape_recovered"] == 0.0
    assert m["n_seen"] == len(rows) - held and m["seen_completion_shape_recovered"] == circles / (len(rows) - held)
    assert {"samples.png", "completions.png"} <= set(res["artifacts"])


def test_shown_share_counts_the_things_pixels_in_the_given_rows():
    """shown_share: the share of the foreground (pixels off the top-left one by more than the tolerance) in the first
    rows; a faint shade under the tolerance is background; an image without foreground shows 0."""
    img = torch.full((3, 3, 8, 8), 128.0)
    img[0, :, 2:6, 2:4] = 255.0  # rows 2..5: half of it in rows 0..3
    img[1, :, 6:8, :] = 0.0  # all of it below
    img[2, :, 0:2, :] += roundtrip.BACKGROUND_TOLERANCE  # a shade, not a thing
    assert roundtrip.shown_share(img, 4).tolist() == [0.5, 0.0, 0.0]


def test_roundtrip_t2i_default_prompts_are_every_pair():
    small = Vocabulary(("circle", "star"), ("red", "orange"), frozenset({("star", "orange")}))
    assert small.prompts() == ["a red circle", "an orange circle", "a red star", "an orange star"]
    assert small.wanted("an orange star") == ("star", "orange") and small.wanted("a red") == (None, "red")


def test_roundtrip_tts(world):
    out = world["tmp"] / "rt-tts"
    c = world["ckpts"]
    res = roundtrip.roundtrip_tts(c["tts"], world["blank"]["asr"], world["prep"], world["codebooks"], out,
                                  max_samples=4)
    check_common(res, out)
    m = res["metrics"]
    assert m["n"] == 4 and m["wer"] == 1.0 and m["cer"] >= 1.0  # a blank recogniser
    assert len([a for a in res["artifacts"] if a.endswith(".wav")]) == 4
    assert mel_config(json.loads((world["prep"] / "stats.json").read_text())) == world["mel"]
