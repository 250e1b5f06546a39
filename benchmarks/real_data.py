"""python -m benchmarks --real-data DIR [--held-out NAME ...]: the audio classifier and the speech recogniser on real
recordings, each speaker held out in turn and then held-out takes, against a logistic regression on the same split;
and text-to-speech trained on the same clips, its speech transcribed by that recogniser (the round trip).

DIR holds `{label}_{speaker}_{take}.wav` files (the Free Spoken Digit Dataset's layout). For each held-out speaker
this runs what a user would run, at the defaults:

    tessera run --transcripts DIR.csv --split-by speaker --test-groups SPEAKER --sample-rate SR --models AST ASR TTS

and for held-out takes (`--held-out takes`: every speaker in training) the same command with `--split-by take
--test-groups 0 10 20 30 40`: every tenth take of each speaker and digit in test (`test_takes`). Not the default
split's hash: that hashes each row's key, its file's path from the table's folder, and the benchmark's table sits in
a new temporary folder, so the split would move with where that folder is (175 to 206 test clips seen).

where the table (written into the output folder) has one row per file: audio, transcript (the label; a digit label
spelled as its English word, so "7" is "seven"), label, speaker. SR is the files' own sample rate. Reported per
held-out speaker: AST test accuracy; the speech recogniser's character error rate and word accuracy (the transcript
exactly right: a digit is a one-word transcript); the baseline's test accuracy (a multinomial logistic regression
on each mel band's mean and std over the stored log-mel, standardised on the train split: `logistic_regression`);
text-to-speech's round trip (the run's own, tasks/eval/roundtrip.py: the first 160 test transcripts spoken in train
speakers' voices, through Griffin-Lim, transcribed by the run's recogniser: CER against the transcript, and the
recogniser on the generated spectrogram itself, no vocoder); and the wall time of the whole run. Writes
OUT/real_data.md and real_data.json (OUT: --out, default benchmarks/); prints the table. One held-out speaker of
fsdd4 (2,000 clips) takes about 5-10 minutes on two CPU cores.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

NAME = re.compile(r"^(?P<label>[^_]+)_(?P<speaker>[^_]+)_(?P<take>[^_]+)\.wav$")
DIGIT_WORDS = "zero one two three four five six seven eight nine".split()


def audio_models() -> tuple[str, str]:
    """(the audio classifier, the speech recogniser): the model table's names, so none is written here."""
    from tasks.train.table import MODELS, with_role

    classifier = next(m for m, s in MODELS.items() if s.modality == "audio" and s.evaluation == "classifier")
    return classifier, with_role("speech-recogniser")


def run_models() -> tuple[str, ...]:
    """What each run trains: the audio classifier, the speech recogniser and the text-to-speech model it judges."""
    from tasks.train.table import with_role

    return (*audio_models(), with_role("speech-generator"))


def transcript(label: str) -> str:
    return DIGIT_WORDS[int(label)] if label.isdigit() and int(label) < 10 else label


def scan(folder: Path) -> list[dict]:
    """Every `{label}_{speaker}_{take}.wav` in folder -> rows {audio (absolute), transcript, label, speaker, take}."""
    rows = []
    for path in sorted(folder.glob("*.wav")):
        m = NAME.match(path.name)
        if m:
            rows.append({"audio": str(path.resolve()), "transcript": transcript(m["label"]), **m.groupdict()})
    if not rows:
        raise ValueError(f"{folder} has no files named {{label}}_{{speaker}}_{{take}}.wav")
    return rows


def sample_rate(rows: list[dict]) -> int:
    with wave.open(rows[0]["audio"]) as w:
        return w.getframerate()


def write_table(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


# ---------------------------------------------------------------------------------------------------- baseline
def band_features(prep: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Each stored clip's log-mel -> (X (N, 2 n_mels): per-band mean and std over its frames, y (N,) label ids)."""
    from tasks.data import loader
    from tasks.data.shards import shard_urls

    X, y = [], []
    for batch in loader.batches(shard_urls(prep, "audio", split), 256, train=False, split_nodes=False):
        for s in batch:
            m = s["mel"].astype(np.float32)  # (n_mels, T)
            X.append(np.concatenate([m.mean(1), m.std(1)]))
            y.append(int(s["info"]["label_id"]))
    return np.stack(X), np.array(y)


def logistic_regression(X: np.ndarray, y: np.ndarray, X_test: np.ndarray, C: float = 1.0) -> np.ndarray:
    """Multinomial logistic regression (sklearn's LogisticRegression(C=C) objective: 0.5 |W|^2 + C sum of the
    cross-entropies, bias not penalised) on features standardised with the train mean and std, fitted by L-BFGS in
    float64 -> predicted labels of X_test."""
    x, xt = torch.from_numpy(X).double(), torch.from_numpy(X_test).double()
    mu, sd = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-8)
    x, xt = (x - mu) / sd, (xt - mu) / sd
    target = torch.from_numpy(y).long()
    n_classes = int(target.max()) + 1
    W = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=500, tolerance_grad=1e-7, tolerance_change=1e-10,
                            history_size=20, line_search_fn="strong_wolfe")

    def loss():
        opt.zero_grad()
        value = F.cross_entropy(x @ W + b, target, reduction="sum") * C + 0.5 * (W * W).sum()
        value.backward()
        return value

    opt.step(loss)
    with torch.no_grad():
        return (xt @ W + b).argmax(1).numpy()


def baseline_accuracy(prep: Path) -> float:
    """The logistic regression trained on prep's train split, its accuracy on the test split."""
    X, y = band_features(prep, "train")
    X_test, y_test = band_features(prep, "test")
    return float((logistic_regression(X, y, X_test) == y_test).mean())


def transcripts_scores(checkpoint: Path, prep: Path) -> dict[str, float]:
    """A speech recogniser's greedy transcripts of prep's test split -> {cer, word_accuracy (exactly right)}."""
    from tasks.data import loader
    from tasks.data.shards import shard_urls
    from tasks.eval.evaluate import load_model, transcribe
    from tasks.eval.metrics import cer
    from tasks.train.batches import mels

    _, net, ctx = load_model(Path(checkpoint), Path(prep))
    refs, hyps = [], []
    for batch in loader.batches(shard_urls(prep, "audio", "test"), 128, train=False, split_nodes=False):
        refs += [s["info"].get("text") or "" for s in batch]
        hyps += transcribe(net, mels(batch, ctx.data.mel_grid[1]))
    exact = np.mean([r.strip() == h.strip() for r, h in zip(refs, hyps)])
    return {"cer": float(cer(refs, hyps)), "word_accuracy": float(exact)}


# ---------------------------------------------------------------------------------------------------- one split
TAKES = "takes"  # the held-out name for held-out takes of every speaker
TAKE_STRIDE = 10  # every tenth take in test


def test_takes(rows: list[dict]) -> list[str]:
    """The takes held out for TAKES: every TAKE_STRIDE-th of the sorted take names (numbers sort as numbers)."""
    names = sorted({r["take"] for r in rows}, key=lambda t: (not t.isdigit(), int(t) if t.isdigit() else 0, t))
    return names[::TAKE_STRIDE]


def command(table: Path, folder: Path, speaker: str, rate: int, root: Path, normalise_by: str | None = None,
            takes: list[str] | None = None) -> list[str]:
    """The `tessera run` command for one row; `takes` (for TAKES) are the take names held out."""
    if speaker == TAKES and not takes:
        raise ValueError("held-out takes need the takes to hold out (test_takes)")
    split = (["--split-by", "take", "--test-groups", *takes] if speaker == TAKES
             else ["--split-by", "speaker", "--test-groups", speaker])
    norm = ["--normalise-by", normalise_by] if normalise_by else []
    return ["tessera", "run", "--transcripts", str(table), "--allow-roots", str(folder), *split, *norm,
            "--sample-rate", str(rate), "--models", *run_models(), "--root", str(root),
            "--dataset-name", f"real-{speaker}"]


def held_out(folder: Path, speaker: str, out: Path, normalise_by: str | None = None) -> dict:
    """`tessera run` with `speaker` (or TAKES) held out (in its own root under out, MLflow store there too) -> one
    row."""
    rows = scan(folder)
    root = out / f"held-out-{speaker}"
    table = write_table(rows, root / "transcripts.csv")
    takes = test_takes(rows)
    cmd = command(table, folder.resolve(), speaker, sample_rate(rows), root, normalise_by, takes)
    cmd[0] = str(Path(sys.executable).with_name("tessera"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root.resolve()}/mlflow.db"}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=(root / "run.log").open("w"), stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    latest = json.loads((root / "latest.json").read_text())
    prep, (ast, asr) = Path(latest["prep"]), audio_models()
    metrics = json.loads(next((root / "eval" / ast).glob("*/metrics.json")).read_text())
    speech = transcripts_scores(Path(latest["checkpoints"][asr]), prep)
    spoken = json.loads(next((root / "roundtrips").glob("*/tts/metrics.json")).read_text())
    n_test = len(band_features(prep, "test")[1])
    return {"held_out": speaker, "n_train_val": len(rows) - n_test, "n_test": n_test,
            "ast_accuracy": metrics["accuracy"], "asr_cer": speech["cer"], "asr_word_accuracy": speech["word_accuracy"],
            "tts_roundtrip_cer": spoken["cer"], "tts_direct_cer": spoken["direct_cer"], "tts_n": int(spoken["n"]),
            "lr_accuracy": baseline_accuracy(prep), "wall_s": round(wall, 1),
            "command": " ".join(command(Path("TABLE.csv"), Path("DIR"), speaker, sample_rate(rows), Path("ROOT"),
                                        normalise_by, takes))}


def markdown(rows: list[dict], folder: Path) -> str:
    lines = [f"# Real data: {folder}", "", "Each speaker held out in turn (never heard in training; val: held-out "
             "takes of the others), then `takes` (every tenth take of every speaker and digit held out: "
             "`--split-by take --test-groups ...`), `tessera run` at its defaults (benchmarks/real_data.py). LR: "
             "logistic regression on per-band log-mel mean and std. TTS: text-to-speech trained on the same train "
             "clips, its speech of the first test transcripts (TTS n) in train speakers' voices transcribed by the "
             "run's speech recogniser after Griffin-Lim (CER; on the generated log-mel itself in brackets): compare "
             "the recogniser's CER on the real test speech.", "",
             "| held out | train+val / test clips | AST accuracy | ASR word accuracy | ASR CER | LR accuracy | "
             "AST - LR | ASR words - LR | TTS round trip CER (direct) | TTS n | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['held_out']} | {r['n_train_val']} / {r['n_test']} | {r['ast_accuracy']:.3f} | "
                     f"{r['asr_word_accuracy']:.3f} | {r['asr_cer']:.3f} | {r['lr_accuracy']:.3f} | "
                     f"{r['ast_accuracy'] - r['lr_accuracy']:+.3f} | {r['asr_word_accuracy'] - r['lr_accuracy']:+.3f} "
                     f"| {r['tts_roundtrip_cer']:.3f} ({r['tts_direct_cer']:.3f}) | {r['tts_n']} | {r['wall_s']:.0f} |")
    if rows:
        lines += ["", f"Command: `{rows[0]['command']}`"]
    return "\n".join(lines) + "\n"


def run(folder: Path, out: Path, speakers: list[str] | None = None, normalise_by: str | None = None) -> list[dict]:
    """Hold out each speaker (or those named), then takes, each run in a new temporary folder (kept, on stderr);
    write out/real_data.md and .json; print the table."""
    found = sorted({r["speaker"] for r in scan(folder)}) + [TAKES]
    unknown = sorted(set(speakers or []) - set(found))
    if unknown:
        raise ValueError(f"no speaker {unknown} in {folder}; it has {found}")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tessera-real-data-"))  # the runs' data, checkpoints and MLflow stores
    print(f"real data: runs under {work}", file=sys.stderr, flush=True)
    rows = []
    for speaker in speakers or found:
        print(f"== real data: {speaker} held out", file=sys.stderr, flush=True)  # TAKES: takes of every speaker
        rows.append(held_out(folder, speaker, work, normalise_by))
        md = markdown(rows, folder)
        (out / "real_data.md").write_text(md)
        (out / "real_data.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(md)
    return rows
