"""python -m benchmarks [--quick] [--full] [--only NAME ...] [--out DIR]: run the benchmarks, print a table, and write
DIR/results.md and DIR/results.json (DIR defaults to benchmarks/).

Each benchmark module has `run(quick, full) -> list[Row]`; rows compare a candidate to a baseline measured side by
side in the same process (alternating repetitions, medians). Rows this suite does not measure yet are listed as
such, with no figures.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.common import Row, machine

BENCHMARKS = ("spectrograms", "codebook", "loading", "index")
NOT_MEASURED = (
    ("training_mfu", "model FLOP utilisation of tasks/train.py per model"),
    ("prefect_overhead", "Prefect + MLflow overhead per flow/task run vs the plain functions"),
    ("scaling", "throughput vs workers / threads / DDP ranks"),
    ("gpu", "any GPU row (this suite runs on CPU)"),
)


def fmt_ratio(r: float | None) -> str:
    return "—" if r is None else f"{r:.3g}"


def verdict(p: bool | None) -> str:
    return {True: "pass", False: "MISS", None: "report"}[p]


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# tessera benchmarks",
        "",
        f"Run {result['started']} ({result['mode']} mode, {result['seconds']:.0f} s). Machine: {m['cpu']}, "
        f"{m['cores']} cores, {m['torch_threads']} torch threads, torch {m['torch']}, Python {m['python']}, "
        f"load average at start {m['load_avg_at_start']} (the cores were shared with other work).",
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
        lines.append(f"| {r['name']} | — | — | — | — | {r['what']} | — | {r['status']} | {r.get('note', '')} |")
    for e in result["errors"]:
        lines.append(f"| {e['name']} | — | — | — | — | — | — | ERROR | {e['error']} |")
    extras = [r for r in result["rows"] if r["name"] == "spectrograms"]
    if extras:
        x = extras[0]["extra"]
        lines += ["", f"Spectrogram agreement: log_mel shape {x['shape_log_mel']} (n_mels, n_frames) vs fbank "
                  f"{x['shape_fbank_clip0']} (frames, n_mels) for clip 0 (same 128 bins; frame count follows clip "
                  f"length for fbank, fixed 128 for log_mel). Per-clip Pearson r of the log values on shared frames: "
                  f"median {x['pearson_median']}, min {x['pearson_min']}. The mel definitions differ (Slaney vs HTK), "
                  "so this is correlation, not equality."]
    lines += ["", "Raw timings per repetition are in results.json."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--full", action="store_true", help="also the 1M-vector index")
    ap.add_argument("--only", nargs="+", choices=BENCHMARKS, metavar="NAME", help=f"some of {BENCHMARKS}")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent, help="folder for results.md and results.json")
    args = ap.parse_args(argv)
    names = args.only or list(BENCHMARKS)
    t0 = time.perf_counter()
    result = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "mode": "quick" if args.quick else ("full" if args.full else "default"),
              "machine": machine(), "rows": [], "not_measured": [], "errors": []}
    for name in names:
        print(f"== {name}", file=sys.stderr, flush=True)
        try:
            rows: list[Row] = importlib.import_module(f"benchmarks.{name}").run(quick=args.quick, full=args.full)
            result["rows"] += [r.to_dict() for r in rows]
        except Exception as exc:  # one broken benchmark still leaves the others' results
            traceback.print_exc()
            result["errors"].append({"name": name, "error": f"{type(exc).__name__}: {exc}"})
    if "index" in names and not args.full:
        result["not_measured"].append({"name": "index_1M", "what": "HNSW vs flat at 1M vectors (where the target is set)",
                                       "status": "not run", "note": "needs --full; not run at 1M in this run"})
    result["not_measured"] += [{"name": n, "what": w, "status": "not measured yet"} for n, w in NOT_MEASURED]
    result["seconds"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    md = markdown(result)
    (args.out / "results.md").write_text(md)
    print(md)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
