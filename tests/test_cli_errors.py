"""Wrong arguments: one line on stderr naming the value and the fix, exit status 2, no traceback, and nothing run
(no output root created, no Prefect server started)."""

from __future__ import annotations

import pytest
from PIL import Image

from flows.cli import main as cli_main


@pytest.fixture
def layout(tmp_path):
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "cat" / "a.png")
    (tmp_path / "caps.csv").write_text("file,text\ncat/a.png,a cat\n")
    (tmp_path / "afile").write_text("not a folder")
    return tmp_path


CASES = {
    "empty image folder": (["data", "--images", "{t}/empty"],
                           "images folder {t}/empty holds no png/jpg/jpeg/webp files"),
    "captions with other columns": (["data", "--images", "{t}/imgs", "--captions", "{t}/caps.csv"],
                                    "captions table {t}/caps.csv has no 'image' column (columns: file, text); name it "
                                    "with --caption-path-col NAME"),
    "missing shard glob": (["data", "--shards", "{t}/nothing-*.tar"], "{t}/nothing-*.tar"),
    "root is a file": (["run", "--root", "{t}/afile"],
                       "--root='{t}/afile': {t}/afile is a file; the output root must be a folder (pass --root DIR)"),
    "unknown device": (["run", "--device", "tpu"], "--device='tpu': Input should be 'auto', 'cpu' or 'cuda'"),
    "unknown precision": (["train", "vit", "--precision", "fp8"],
                          "--precision='fp8': Input should be 'auto', 'bf16' or 'fp32'"),
    "no steps": (["run", "--steps", "0"], "--steps=0: Input should be greater than or equal to 1"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_wrong_argument_is_one_line_before_any_work(case, layout, capsys, monkeypatch):
    monkeypatch.chdir(layout)  # the default output root would be ./outputs
    argv, expected = CASES[case]
    argv = [a.replace("{t}", str(layout)) for a in argv]
    assert cli_main(argv + (["--root", str(layout / "out")] if "--root" not in argv else [])) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("tessera: error: ") and expected.replace("{t}", str(layout)) in err, err
    assert not (layout / "out").exists() and not (layout / "outputs").exists()  # no stage ran


def test_cuda_without_a_gpu_is_refused_before_any_stage(layout, capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert cli_main(["train", "ast", "--device", "cuda", "--root", str(layout / "out")]) == 2
    err = capsys.readouterr().err
    assert err == ("tessera: error: --device='cuda': no CUDA device is visible on this machine; use --device auto or "
                   "cpu\n")
    assert not (layout / "out").exists()
