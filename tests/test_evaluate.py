"""Evaluation: hand-checked metric functions, Griffin-Lim on a tone, and every model's evaluate + the round trips on a
tiny built-in dataset (48 images, 24 clips; generate -> ingest -> shards -> preprocess) with untrained tiny
checkpoints in the trainer's format."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.vq import fit_kmeans
from tasks import evaluate as ev
from tasks import metrics as mt
from tasks import roundtrip
from tasks.audio_out import mel_config, mel_to_wave, wave_to_model_mel
from tasks.codebook import save_codebook
from tasks.features import MelConfig, log_mel
from tasks.ingest import IngestConfig, Sources, ingest
from tasks.preprocess import PrepConfig, preprocess
from tasks.registry import MODELS, DataInfo, configure
from tasks.shards import ShardConfig, write_shards
from tasks.synthetic import SyntheticConfig, generate

MEL = MelConfig(n_mels=32, n_frames=64)
CODEBOOK_K = {"pixels": 16, "image": 32, "mel": 16}
PATCH = {"pixels": 1, "image": 4, "mel": 16}


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """prep dir, codebook paths and a tiny untrained checkpoint per model."""
    tmp = tmp_path_factory.mktemp("eval")
    d = Path(generate(SyntheticConfig(n_images=48, n_audio=24, image_size=16), tmp / "builtin")["path"])
    sources = Sources(images=d / "images", audio=d / "audio", captions=d / "captions.csv",
                      transcripts=d / "transcripts.csv")
    items = ingest(sources, IngestConfig(), tmp / "ingest").items_path
    write_shards(items, ShardConfig(maxcount=16, val_fraction=0.1, test_fraction=0.3), tmp / "shards")
    prep = tmp / "prep"
    preprocess(tmp / "shards", PrepConfig(image_size=16, mel=MEL, batch_size=16, mel_patch=16, n_pixels=2000,
                                          n_patches=400), prep)
    codebooks = {}
    for kind, k in CODEBOOK_K.items():
        x = torch.from_numpy(np.load(prep / "patches" / f"{kind}.npy").astype(np.float32))
        cb, _ = fit_kmeans(x, k, iters=5)
        codebooks[kind] = str(tmp / f"{kind}.pt")
        save_codebook(cb, tmp / f"{kind}.pt", {"kind": kind, "patch": PATCH[kind]})
    data = DataInfo.load(prep, codebooks)
    ckpts = {}
    for name, s in MODELS.items():
        torch.manual_seed(0)
        cfg = configure(name, data, "tiny")
        ckpts[name] = tmp / f"{name}.pt"
        used = {s.codebook: codebooks[s.codebook]} if s.codebook else {}
        torch.save({"model": name, "config": asdict(cfg), "state_dict": s.build(cfg).state_dict(), "step": 0,
                    "codebooks": used}, ckpts[name])
    return {"tmp": tmp, "prep": prep, "codebooks": codebooks, "ckpts": ckpts}


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
    sets = mt.label_sets()
    assert {k: len(v[0]) for k, v in sets.items()} == {"shape": 6, "colour": 6, "combo": 36}
    assert all(len(p) == 6 * len(mt.TEMPLATES) for p in sets["shape"][1] + sets["colour"][1])
    assert "a photo of an orange star." in mt.prompt_ensemble("orange star")
    assert "a photo of a red circle." in sets["colour"][1][0]  # red's ensemble names red with every shape
    assert "a red circle" in roundtrip.default_prompts() and "an orange star" in roundtrip.default_prompts()


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
    for a in result["artifacts"]:
        if a.endswith(".png"):
            assert_png(out / a)


@pytest.mark.parametrize("name", ["vit", "ast"])
def test_evaluate_classifier(world, name):
    out = world["tmp"] / f"out-{name}"
    res = ev.evaluate(name, world["ckpts"][name], world["prep"], out)
    check_common(res, out)
    m = res["metrics"]
    assert 0 <= m["accuracy"] <= m["top5_accuracy"] <= 1 and m["n"] > 0
    assert {"per_class.csv", "confusion.png"} <= set(res["artifacts"])
    rows = list(csv.reader(open(out / "per_class.csv")))
    assert rows[0] == ["class", "n", "accuracy"] and sum(int(r[1]) for r in rows[1:]) == m["n"]
    assert "### Per class" in res["summary"]
    if name == "vit":  # the held-out (shape, colour) pairs are in the test split
        assert 0 <= m["heldout_accuracy"] <= 1 and m["n_heldout"] >= 1


@pytest.mark.parametrize("name", ["imagegpt", "t2i", "tts"])
def test_evaluate_generative(world, name):
    out = world["tmp"] / f"out-{name}"
    res = ev.evaluate(name, world["ckpts"][name], world["prep"], out, codebooks=world["codebooks"], max_samples=12)
    check_common(res, out)
    m = res["metrics"]
    k = CODEBOOK_K[MODELS[name].codebook]
    assert 0 < m["bits_per_token"] < 2 * math.log2(k)  # untrained: near log2(vocab)
    assert m["nll_nats"] == pytest.approx(m["bits_per_token"] * math.log(2))
    assert "samples.png" in res["artifacts"] or "spectrograms.png" in res["artifacts"]
    if name == "tts":
        wavs = [a for a in res["artifacts"] if a.endswith(".wav")]
        assert any(a.startswith("wav/generated_") for a in wavs) and any(a.startswith("wav/reference_") for a in wavs)
        import soundfile as sf

        wave, sr = sf.read(out / wavs[0])
        assert sr == MEL.sample_rate and len(wave) == MEL.n_samples


def test_evaluate_asr(world):
    out = world["tmp"] / "out-asr"
    res = ev.evaluate("asr", world["ckpts"]["asr"], world["prep"], out, max_samples=4)
    check_common(res, out)
    assert res["metrics"]["cer"] >= 0 and res["metrics"]["wer"] >= 0 and res["metrics"]["n"] == 4  # capped
    table = (out / "examples.md").read_text().splitlines()
    assert table[0] == "| reference | hypothesis |" and len(table) == 2 + 4


def test_evaluate_clip(world):
    out = world["tmp"] / "out-clip"
    res = ev.evaluate("clip", world["ckpts"]["clip"], world["prep"], out)
    m = res["metrics"]
    check_common(res, out)
    for label_set in ("shape", "colour", "combo"):
        assert 0 <= m[f"zero_shot/{label_set}_accuracy"] <= 1
        assert 0 <= m[f"zero_shot/{label_set}_heldout_accuracy"] <= 1
    for d in ("i2t", "t2i"):
        r = [m[f"retrieval/{d}_recall_at_{k}"] for k in (1, 5, 10)]
        assert 0 <= r[0] <= r[1] <= r[2] <= 1


@pytest.mark.parametrize("name", ["vit", "t2i"])
def test_evaluate_under_bf16_autocast(world, name, monkeypatch):
    monkeypatch.setattr(ev, "PRECISION", "bf16")
    out = world["tmp"] / f"out-bf16-{name}"
    res = ev.evaluate(name, world["ckpts"][name], world["prep"], out, codebooks=world["codebooks"], max_samples=4)
    assert all(math.isfinite(v) for v in res["metrics"].values())


def test_evaluate_rejects_a_checkpoint_of_another_model(world, tmp_path):
    with pytest.raises(ValueError, match="holds a vit"):
        ev.evaluate("ast", world["ckpts"]["vit"], world["prep"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_roundtrip_t2i(world):
    out = world["tmp"] / "rt-t2i"
    c = world["ckpts"]
    res = roundtrip.roundtrip_t2i(c["t2i"], c["vit"], c["clip"], world["prep"], world["codebooks"], out,
                           prompts=["a red circle", "a blue triangle", "an orange star", "a green square"])
    check_common(res, out)
    m = res["metrics"]
    for key in ("vit_shape", "clip_shape", "clip_colour"):
        assert 0 <= m[f"{key}_recovered"] <= 1 and 0 <= m[f"heldout_{key}_recovered"] <= 1
    assert "roundtrip_t2i.png" in res["artifacts"]


def test_roundtrip_tts(world):
    out = world["tmp"] / "rt-tts"
    c = world["ckpts"]
    res = roundtrip.roundtrip_tts(c["tts"], c["asr"], world["prep"], world["codebooks"], out, max_samples=4)
    check_common(res, out)
    m = res["metrics"]
    assert m["cer"] >= 0 and m["direct_cer"] >= 0 and m["n"] == 4
    assert len([a for a in res["artifacts"] if a.endswith(".wav")]) == 4
    assert mel_config(json.loads((world["prep"] / "stats.json").read_text())) == MEL
