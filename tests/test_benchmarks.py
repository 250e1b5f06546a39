"""Smoke tests of the benchmark suite: each benchmark at its --quick size, into a temp folder; no timing assertions
(speed lives in benchmarks/results.md, from a real run)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks.__main__ import BENCHMARKS, main, markdown
from tasks.infra.hardware import BF16_MARGIN
from tasks.train.table import MODELS


def quick(tmp_path, name: str) -> dict:
    """Run one benchmark with --quick into tmp_path; the result JSON, checked for what every row must carry."""
    assert main(["--quick", "--only", name, "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert not result["errors"]
    assert {"cpu", "cores", "torch_threads", "torch"} <= set(result["machine"])
    assert set(result["load"]) == {name}
    md = (tmp_path / "results.md").read_text()
    for r in result["rows"]:
        assert isinstance(r["ratio"], (int, float)) and math.isfinite(r["ratio"]), r["name"]
        assert r["baseline"] and r["candidate"] and r["target"] and r["sizes"] and r["metric"], r["name"]
        assert r["passed"] in (True, False, None)
        if r["passed"] is False:
            assert r["note"], f"{r['name']} missed its target without a note"
        assert f"| {r['name']} |" in md
    return {"rows": {r["name"]: r for r in result["rows"]}, "result": result, "md": md}


def test_spectrograms(tmp_path):
    rows = quick(tmp_path, "spectrograms")["rows"]
    assert rows["spectrograms"]["extra"]["shapes_agree"]
    # both are log-mel spectrograms of the same clips (Slaney against HTK mel scales): strongly correlated
    assert rows["spectrograms"]["extra"]["pearson_median"] > 0.3


def test_codebook(tmp_path):
    rows = quick(tmp_path, "codebook")["rows"]
    assert {"codebook_time", "codebook_distortion"} <= set(rows)
    assert rows["codebook_distortion"]["ratio"] < 1.5  # same k and iterations: distortions comparable


def test_loading(tmp_path):
    rows = quick(tmp_path, "loading")["rows"]
    assert {"loading_vs_raw", "loading_vs_npy"} <= set(rows)
    counted = rows["loading_vs_raw"]["extra"]["samples_per_epoch"]
    assert counted["shards"] > 0 and counted["raw"] == counted["npy"]  # the baselines read the same train items


def test_index(tmp_path):
    rows = quick(tmp_path, "index")["rows"]
    assert rows["index_2k"]["target"] == "report"  # the target is set at 1M vectors
    extra = rows["index_2k"]["extra"]
    assert extra["tuning_recall"]["value"] >= 0.95  # efSearch is doubled until the tuning queries reach it
    assert extra["recall_at_10"] >= 0.9  # and other queries come close


def test_training(tmp_path):
    rows = quick(tmp_path, "training")["rows"]
    assert {f"training_mfu_{m}" for m in MODELS} <= set(rows)  # every model of the table
    assert {"training_compile_vit", "training_compile_imagegpt"} <= set(rows)
    peak = rows["training_mfu_vit"]["extra"]["peak_flops"]
    assert peak["fp32"] > 0 and peak["bf16"] > 0
    timed = {"fp32", "bf16"} if peak["bf16"] > peak["fp32"] else {"fp32"}  # both where bf16 may be the faster
    for m in MODELS:
        x = rows[f"training_mfu_{m}"]["extra"]
        for size in ("default", "larger"):
            r = x[size]
            assert set(r["samples_per_s_by_dtype"]) == timed
            by = r["samples_per_s_by_dtype"]
            kept = "bf16" if by.get("bf16", 0.0) >= BF16_MARGIN * by["fp32"] else "fp32"
            assert r["dtype"] == kept and r["samples_per_s"] == by[kept]  # the faster step kept (bf16 by the margin)
            assert x["mfu"][size] == pytest.approx(r["samples_per_s"] * r["flops_per_sample"] / peak[r["dtype"]])


def test_scaling_writes_its_plot(tmp_path):
    out = quick(tmp_path, "scaling")
    assert {f"scaling_{s}" for s in ("generate", "ingest", "shard", "preprocess", "codebooks", "train_epoch",
                                     "index")} == set(out["rows"])
    assert (tmp_path / "scaling.png").stat().st_size > 0 and "scaling.png" in out["md"]


def test_gpu_smoke(tmp_path):
    from benchmarks import gpu

    assert gpu.main(["--smoke", "--out", str(tmp_path / "gpu.json")]) == 0
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert [r["model"] for r in result["results"]] == ["vit", "imagegpt"]
    assert all(r["samples_per_s"] > 0 and r["flops_per_sample"] > 0 for r in result["results"])


def test_no_gpu_is_reported_as_not_measured(tmp_path, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(["--only", "gpu", "--out", str(tmp_path)]) == 0  # default mode: no GPU, nothing to run
    result = json.loads((tmp_path / "results.json").read_text())
    assert not result["rows"] and [r["name"] for r in result["not_measured"]] == ["gpu"]
    assert "no GPU" in (tmp_path / "results.md").read_text()


@pytest.mark.usefixtures("prefect_harness")
def test_orchestration():
    from benchmarks import orchestration

    rows = {r.name: r for r in orchestration.run(quick=True, in_process=True)}
    assert set(rows) == {"prefect_overhead", "cached_rerun", "mlflow_logging"}
    assert rows["cached_rerun"].extra["cached_states"].get("Cached", 0) >= 4  # the data flow's tasks, all Cached
    assert 0 < rows["mlflow_logging"].ratio < 1
    assert rows["prefect_overhead"].extra["calls"]["tasks"] == 4


def test_markdown_lists_every_row_kind():
    row = dict(name="x", sizes="s", baseline="b", candidate="c", ratio=2.0, metric="m", target=">= 1", passed=True,
               note="", extra={})
    result = {"started": "t", "mode": "quick", "seconds": 1.0, "rows": [row, {**row, "name": "y", "passed": False,
                                                                          "note": "miss: why"}],
              "machine": {"cpu": "c", "cores": 2, "torch_threads": 2, "torch": "t", "python": "p"},
              "load": {"x": {"before": [1, 1, 1], "after": [2, 2, 2]}},
              "not_measured": [{"name": "gpu", "what": "w", "status": "not measured: no GPU"}],
              "errors": [{"name": "z", "error": "E"}]}
    md = markdown(result)
    assert "| x |" in md and "| MISS | miss: why |" in md and "| gpu |" in md and "| z |" in md and "ERROR" in md
    assert "x [1, 1, 1] -> [2, 2, 2]" in md and len(BENCHMARKS) == 8


def _halves(n: int, told: bool, seed: int):
    """Synthetic top halves (N, 3, 4, 8) of 3 classes: a bar across the row of its class when `told` (what mirroring
    keeps), else all blank; random bright colours, half of the images held out."""
    from benchmarks.completion_bound import Halves

    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = -torch.ones(n, 3, 4, 8)
    if told:
        colour = torch.rand(n, 3, 1, generator=g)
        for i, c in enumerate(y.tolist()):
            x[i, :, c, 2:6] = colour[i]
    heldout = torch.arange(n) % 2 == 0
    return Halves(x, y, heldout, torch.full((n,), told))


@pytest.mark.parametrize("told", [True, False])
def test_the_completion_bound_reads_what_top_halves_tell(told):
    """A posterior trained on top halves that name their class reads near 1 on held-out ones, and near a third
    (3 classes) where every top half is blank: the bound measures the halves, not the training."""
    from benchmarks.completion_bound import bound_metrics, fit, posterior

    train, val, test = (_halves(n, told, seed) for n, seed in ((384, 0), (96, 1), (192, 2)))
    net = fit(train, val, n_classes=3, seed=0, epochs=20, width=8)
    m = bound_metrics(posterior([net], test.x), test)
    if told:
        assert m["all"]["argmax"] > 0.9 and m["heldout"]["mean_p_true"] > 0.7, m
    else:
        assert abs(m["all"]["mean_p_true"] - 1 / 3) < 0.1 and "visible" not in m, m


def test_the_completion_bound_names_what_a_root_lacks(tmp_path):
    with pytest.raises(SystemExit, match="no trained ImageGPT"):
        main(["--completion-bound", str(tmp_path), "--out", str(tmp_path)])
