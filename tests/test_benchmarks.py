"""Smoke test of the benchmark suite: every benchmark in --quick mode, into a temp folder; no timing assertions."""

from __future__ import annotations

import json
import math

from benchmarks.__main__ import BENCHMARKS, NOT_MEASURED, main


def test_quick_benchmarks_write_every_row(tmp_path):
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert not result["errors"]
    assert {"cpu", "cores", "torch_threads", "torch"} <= set(result["machine"])
    rows = {r["name"]: r for r in result["rows"]}
    expected = {"spectrograms", "codebook_time", "codebook_distortion", "loading_vs_raw", "loading_vs_npy", "index_2k"}
    assert expected <= set(rows)
    for r in rows.values():
        assert isinstance(r["ratio"], (int, float)) and math.isfinite(r["ratio"]), r["name"]
        assert r["baseline"] and r["candidate"] and r["target"] and r["sizes"]
        assert r["passed"] in (True, False, None)
        if r["passed"] is False:
            assert r["note"], f"{r['name']} missed its target without a note"
    assert rows["spectrograms"]["extra"]["shapes_agree"]
    assert -1 <= rows["spectrograms"]["extra"]["pearson_median"] <= 1
    not_measured = {r["name"] for r in result["not_measured"]}
    assert {n for n, _ in NOT_MEASURED} | {"index_1M"} <= not_measured
    md = (tmp_path / "results.md").read_text()
    for name in list(rows) + sorted(not_measured):
        assert f"| {name} |" in md
    assert "not measured yet" in md and len(BENCHMARKS) == 4
