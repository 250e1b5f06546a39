"""python -m benchmarks [--quick] [--only NAME ...] [--out DIR]: run the benchmarks, print a table, and write
DIR/results.md, DIR/results.json and the plots (DIR/scaling.png, DIR/margins.png) (DIR defaults to benchmarks/).
python -m benchmarks --real-data REC [--held-out NAME ...]: only the real-data comparison (benchmarks/real_data.py) on
the folder REC of {label}_{speaker}_{take}.wav files, each speaker (or those named) held out in turn; it writes
DIR/real_data.md and DIR/real_data.json.
python -m benchmarks --completion-bound ROOT: only how much of a test image's shape its top half tells, the ceiling on
ImageGPT's completions (benchmarks/completion_bound.py) on ROOT's latest built-in run; it writes
DIR/completion_bound.md and DIR/completion_bound.json.

Each benchmark module has `run(quick) -> list[Row]` (scaling also takes `out`, the folder for its plot); rows
compare a candidate to a baseline measured side by side in the same process (alternating repetitions, medians).
The load average is recorded before and after every benchmark: these cores are shared with other work.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import os
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.common import Row, machine

BENCHMARKS = ("spectrograms", "codebook", "loading", "index", "training", "orchestration", "scaling", "gpu")
NO_GPU = ("gpu", "ViT and ImageGPT training MFU in bf16 + torch.compile + flash attention on a GPU",
          "not measured: no GPU on this machine (none was lent to this task); run benchmarks/gpu.sh where there is one")


def fmt_ratio(r: float | None) -> str:
    return "—" if r is None else f"{r:.3g}"


def verdict(p: bool | None) -> str:
    return {True: "pass", False: "MISS", None: "report"}[p]


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _rows(result: dict, prefix: str) -> list[dict]:
    return [r for r in result["rows"] if r["name"].startswith(prefix)]


def details(result: dict) -> list[str]:
    """Per-benchmark tables beside the main one (from each row's `extra`)."""
    lines: list[str] = []
    spec = _rows(result, "spectrograms")
    if spec:
        x = spec[0]["extra"]
        lines += ["", f"Spectrogram agreement: log_mel shape {x['shape_log_mel']} (n_mels, n_frames) vs fbank "
                  f"{x['shape_fbank_clip0']} (frames, n_mels) for clip 0 (same 128 bins; frame count follows clip "
                  f"length for fbank, fixed 128 for log_mel). Per-clip Pearson r of the log values on shared frames: "
                  f"median {x['pearson_median']}, min {x['pearson_min']}. The mel definitions differ (Slaney vs HTK), "
                  "so this is correlation, not equality."]
    train = [r for r in _rows(result, "training_mfu_")]
    if train:
        peak = train[0]["extra"]["peak_flops"]
        lines += ["", f"Training (CPU, {train[0]['extra']['threads']} torch thread, as the trainer runs; matmul peaks "
                  f"fp32 {peak['fp32'] / 1e9:.1f}, bf16 {peak['bf16'] / 1e9:.1f} GFLOP/s):", "",
                  "| model | config | params (M) | MFLOP/sample | dtype (faster step) | samples/s (fp32 / bf16) "
                  "| GFLOP/s | MFU (its dtype's peak) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in train:
            x = r["extra"]
            for size in ("default", "larger"):
                s = x[size]
                config = f"{size} {s['config']}" if size == "larger" else size
                by = " / ".join(f"{v:.1f}" for v in s["samples_per_s_by_dtype"].values())
                lines.append(f"| {r['name'].removeprefix('training_mfu_')} | {config} | {s['n_params'] / 1e6:.2f} | "
                             f"{s['flops_per_sample'] / 1e6:.1f} | {s['dtype']} | {by} | "
                             f"{s['samples_per_s'] * s['flops_per_sample'] / 1e9:.1f} | {x['mfu'][size]:.3f} |")
    scaling = _rows(result, "scaling_")
    if scaling:
        scales = scaling[0]["extra"]["scales"]
        lines += ["", "Scaling, seconds per stage (plot: [scaling.png](scaling.png)):", "",
                  "| stage | " + " | ".join(f"{s}x" for s in scales) + " | slope |",
                  "|---|" + "---|" * (len(scales) + 1)]
        for r in scaling:
            seconds = " | ".join(f"{t:.2f}" for t in r["extra"]["seconds"])
            lines.append(f"| {r['name'].removeprefix('scaling_')} | {seconds} | {r['ratio']:.2f} |")
        lines += ["", "![time per stage vs dataset size](scaling.png)"]
    if any(r["passed"] is not None for r in result["rows"]):
        lines += ["", "Margin to target per row (1 = on the target; right of it = pass): "
                  "[margins.png](margins.png)", "", "![margin to target](margins.png)"]
    return lines


def markdown(result: dict) -> str:
    m = result["machine"]
    loads = result.get("load", {})
    load_txt = "; ".join(f"{name} {v['before']} -> {v['after']}" for name, v in loads.items())
    lines = [
        "# tessera benchmarks",
        "",
        f"Run {result['started']} ({result['mode']} mode, {result['seconds']:.0f} s). Machine: {m['cpu']}, "
        f"{m['cores']} cores, {m['torch_threads']} torch threads, torch {m['torch']}, Python {m['python']}.",
        "",
        f"Load average (1, 5, 15 min) before -> after each benchmark: {load_txt}. Other jobs shared these cores "
        "during the run wherever the 1-minute figure is above what the benchmark itself uses (1-2).",
        "",
        "Baseline and candidate are measured in the same process, alternating repetitions; times are medians.",
        "",
        "| benchmark | sizes | baseline | candidate | ratio | metric | target | result | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {r['sizes']} | {r['baseline']} | {r['candidate']} | {fmt_ratio(r['ratio'])} | "
                     f"{r['metric']} | {r['target']} | {verdict(r['passed'])} | {r['note']} |")
    for r in result["not_measured"]:
        lines.append(f"| {r['name']} | — | — | — | — | {r['what']} | — | {r['status']} | "
                     f"{r.get('note', '')} |")
    for e in result["errors"]:
        lines.append(f"| {e['name']} | — | — | — | — | — | — | ERROR | {e['error']} |")
    lines += details(result)
    lines += ["", "Raw timings per repetition are in results.json."]
    return "\n".join(lines) + "\n"


def margins_plot(rows: list[dict], path: Path) -> None:
    """Each targeted row's margin: ratio / target for '>=' targets, target / ratio for '<=' ones (>= 1 passes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = []
    for r in rows:
        op, _, value = r["target"].partition(" ")
        if r["passed"] is None or op not in (">=", "<=") or not r["ratio"] or r["ratio"] <= 0:
            continue
        v = float(value.split()[0])
        items.append((r["name"], r["ratio"] / v if op == ">=" else v / r["ratio"], r["passed"]))
    if not items:
        return
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(items) + 1.2))
    names, margin, ok = zip(*items)
    ax.barh(range(len(items)), margin, color=["tab:green" if p else "tab:red" for p in ok])
    ax.axvline(1, color="k", lw=1)
    ax.set_xscale("log")
    ax.set_yticks(range(len(items)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("margin to target (log; >= 1 passes)")
    ax.set_title("tessera benchmarks: ratio against target")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--only", nargs="+", choices=BENCHMARKS, metavar="NAME", help=f"some of {BENCHMARKS}")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent, help="folder for results.md and results.json")
    ap.add_argument("--real-data", type=Path, metavar="REC", help="a folder of {label}_{speaker}_{take}.wav files: "
                    "run only the real-data comparison (AST, speech recogniser, logistic regression per held-out "
                    "speaker; benchmarks/real_data.py)")
    ap.add_argument("--held-out", nargs="+", metavar="NAME", help="with --real-data: hold out only these speakers")
    ap.add_argument("--normalise-by", metavar="FIELD", help="with --real-data: pass `tessera run --normalise-by "
                    "FIELD` (speaker: each speaker's mean log-mel moved to the train split's; the baseline reads the "
                    "same features)")
    ap.add_argument("--completion-bound", type=Path, metavar="ROOT", help="run only the measure of how much shape "
                    "a test image's top half tells (a CNN on ImageGPT's top halves, ROOT's latest built-in run; "
                    "benchmarks/completion_bound.py)")
    args = ap.parse_args(argv)
    if (args.held_out or args.normalise_by) and not args.real_data:
        ap.error("--held-out and --normalise-by need --real-data REC")
    if args.real_data:
        from benchmarks import real_data

        real_data.run(args.real_data, args.out, args.held_out, args.normalise_by)
        return 0
    if args.completion_bound:
        from benchmarks import completion_bound

        completion_bound.run(args.completion_bound, args.out)
        return 0
    names = args.only or list(BENCHMARKS)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "mode": "quick" if args.quick else "default",
              "machine": machine(), "rows": [], "not_measured": [], "errors": [], "load": {}, "seconds_per": {}}
    for name in names:
        print(f"== {name}", file=sys.stderr, flush=True)
        before, t1 = _load(), time.perf_counter()
        try:
            module = importlib.import_module(f"benchmarks.{name}")
            kwargs = {"out": args.out} if "out" in inspect.signature(module.run).parameters else {}
            rows: list[Row] = module.run(quick=args.quick, **kwargs)
            result["rows"] += [r.to_dict() for r in rows]
            if name == "gpu" and not rows:
                result["not_measured"].append(dict(zip(("name", "what", "status"), NO_GPU)))
        except Exception as exc:  # one broken benchmark still leaves the others' results
            traceback.print_exc()
            result["errors"].append({"name": name, "error": f"{type(exc).__name__}: {str(exc)[:500]}"})
        result["load"][name] = {"before": before, "after": _load()}
        result["seconds_per"][name] = round(time.perf_counter() - t1, 1)
    result["seconds"] = time.perf_counter() - t0
    for r in result["rows"]:  # JSON has no NaN/inf
        if isinstance(r["ratio"], float) and not math.isfinite(r["ratio"]):
            r["ratio"] = None
    (args.out / "results.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    margins_plot(result["rows"], args.out / "margins.png")
    md = markdown(result)
    (args.out / "results.md").write_text(md)
    print(md)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
