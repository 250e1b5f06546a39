"""Wrong arguments: one line on stderr naming the value and the fix, exit status 2, no traceback, and nothing run
(no output root created, no Prefect server started)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from flows.cli import main as cli_main


@pytest.fixture
def layout(tmp_path):
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "cat" / "a.png")
    (tmp_path / "caps.csv").write_text("file,text\ncat/a.png,a cat\n")
    (tmp_path / "splits.csv").write_text("file,split\ncat/a.png,test\n")
    (tmp_path / "afile").write_text("not a folder")
    return tmp_path


CASES = {
    "empty image folder": (["data", "--images", "{t}/empty"],
                           "images folder {t}/empty holds no png/jpg/jpeg/webp files"),
    "captions with other columns": (["data", "--images", "{t}/imgs", "--captions", "{t}/caps.csv"],
                                    "captions table {t}/caps.csv has no 'image' and 'caption' columns (columns: file, "
                                    "text); name the right column with --caption-path-col NAME / --caption-col NAME, "
                                    "or give it a 'label' or 'split' column"),
    "a table of splits without paths": (["data", "--images", "{t}/imgs", "--captions", "{t}/splits.csv"],
                                        "captions table {t}/splits.csv has no 'image' column (columns: file, split); "
                                        "name the right column with --caption-path-col NAME"),
    "missing shard glob": (["data", "--shards", "{t}/nothing-*.tar"], "{t}/nothing-*.tar"),
    "root is a file": (["run", "--root", "{t}/afile"],
                       "--root='{t}/afile': {t}/afile is a file; the output root must be a folder (pass --root DIR)"),
    "unknown device": (["run", "--device", "tpu"], "argument --device: invalid choice: 'tpu' (choose from 'auto', 'cpu', "
                       "'cuda'); see tessera run --help"),
    "unknown precision": (["train", "vit", "--precision", "fp8"],
                          "argument --precision: invalid choice: 'fp8' (choose from 'auto', 'bf16', 'fp32')"),
    "unknown model": (["train", "resnet"], "argument model: invalid choice: 'resnet'"),
    "no steps": (["run", "--steps", "0"], "--steps=0: Input should be greater than or equal to 1"),
    "normalise by a field no item has": (["data", "--images", "{t}/imgs", "--normalise-by", "speaker"],
                                         "--normalise-by speaker: no item has a 'speaker' value; name a table column "
                                         "or a --name-pattern field"),
    "normalise by the label": (["run", "--normalise-by", "label"],
                               "--normalise-by label would tell the test clips' labels through their means"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_wrong_argument_is_one_line_before_any_work(case, layout, capsys, monkeypatch):
    monkeypatch.chdir(layout)  # the default output root would be ./outputs
    argv, expected = CASES[case]
    argv = [a.replace("{t}", str(layout)) for a in argv]
    try:
        status = cli_main(argv + (["--root", str(layout / "out")] if "--root" not in argv else []))
    except SystemExit as exit_:  # argparse's own checks (choices, types) exit at parse time
        status = exit_.code
    assert status == 2
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


@pytest.mark.parametrize("config, command, key", [("data: {split: foo}\n", "run", "data.split"),
                                                  ("train: {stepz: 3}\n", "run", "train.stepz"),
                                                  ("split: foo\n", "data", "split")])
def test_an_unknown_config_key_is_one_line_listing_the_valid_ones(config, command, key, tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(config)
    assert cli_main([command, "--config", str(tmp_path / "c.yaml"), "--root", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tessera: error: unknown key {key!r} in the config; valid keys there: ") and err.count("\n") == 1
    assert ("steps, batch_size" if "train" in key else "images, audio, captions") in err
    assert not (tmp_path / "out").exists()


def test_every_parameter_has_a_flag_with_its_description(capsys):
    """The flags come from the parameter models: none missing, each with its description (and default) as help."""
    from flows.cli import CONFIG_ONLY, SECTIONS

    with pytest.raises(SystemExit):
        cli_main(["run", "--help"])
    helptext = " ".join(capsys.readouterr().out.split())
    for section, model in SECTIONS.items():
        for name, field in model.model_fields.items():
            assert field.description, f"{section}.{name} has no description"
            if name not in CONFIG_ONLY:
                assert f"--{name.replace('_', '-')}" in helptext
                assert " ".join(field.description.split())[:30] in helptext, name


@pytest.mark.usefixtures("prefect_harness")
def test_a_named_model_the_data_cannot_feed_is_one_line_before_any_model_stage(layout, capsys):
    """Images without captions cannot train CLIP: the data stages run, then one line, and no codebook or training."""
    (layout / "imgs" / "dog").mkdir()
    for i in range(6):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(layout / "imgs" / ("cat", "dog")[i % 2] / f"{i}.png")
    assert cli_main(["run", "--images", str(layout / "imgs"), "--models", "vit", "clip",
                     "--root", str(layout / "out")]) == 2
    err = capsys.readouterr().err
    assert err == ("tessera: error: cannot train clip: it needs captions, and no image item in the train split has "
                   "one (leave it out of --models, or bring data that has it)\n")
    assert (layout / "out" / "prep").is_dir() and not (layout / "out" / "codebooks").exists()


@pytest.mark.usefixtures("prefect_harness")
def test_bad_input_found_inside_a_stage_prints_no_traceback(tmp_path, capfd, monkeypatch):
    """A --split-by whose hash leaves splits empty is refused before any stage; where the groups cannot be known up
    front (webdataset shards: `group_values` gives None), the shard stage finds it: Prefect's log lines keep the
    message and drop the traceback, and the CLI's last line is the error."""
    import numpy as np
    import soundfile as sf

    import flows.data

    for i in range(4):
        for c in "ab":
            (tmp_path / "clips" / c).mkdir(parents=True, exist_ok=True)
            sf.write(tmp_path / "clips" / c / f"{c}_{i}.wav", (0.3 * np.sin(np.arange(3200) * (0.05 + i / 100))
                                                                ).astype("float32"), 16000)
    argv = ["data", "--root", str(tmp_path / "out"), "--audio", str(tmp_path / "clips"), "--name-pattern",
            "{x}_{take}", "--split-by", "take", "--val-fraction", "0.01", "--test-fraction", "0.01"]
    assert cli_main(argv) == 2
    assert capfd.readouterr().err == ("tessera: error: --split-by take: the hash of 4 group(s) (0, 1, 2, 3) leaves "
                                      "the val and test split(s) empty; name the groups with --test-groups/"
                                      "--val-groups, or change the fractions\n")
    assert not (tmp_path / "out").exists()  # before any stage
    monkeypatch.setattr(flows.data, "group_values", lambda *a: None)  # as for shards: known only inside the stage
    status = cli_main(argv)
    out, err = capfd.readouterr()
    assert status == 2 and "Traceback" not in out + err and "Failed to serialize" not in out + err
    assert err.rstrip().splitlines()[-1] == ("tessera: error: --split-by take: 4 group(s) leave the test and val "
                                             "split(s) empty; name the groups with --test-groups/--val-groups, or "
                                             "change the fractions")


def test_the_readme_lists_every_parameter():
    """README "Every parameter" is the table flows/cli.py `parameter_reference` makes from the parameter models."""
    from flows.cli import parameter_reference

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("<!-- parameters -->", 1)[1].split("<!-- /parameters -->", 1)[0].strip("\n")
    assert block == parameter_reference(), (
        "README's parameter table is stale; regenerate it: .venv/bin/python -m flows.cli --write-readme-parameters")
