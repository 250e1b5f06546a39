"""The time cap (tasks/train/budget.py Clock, TrainConfig.max_minutes) and a run's training minutes shared among its
models (--train-minutes, table `minutes`). The step pace is set by a fake clock, never measured: no test here
depends on this machine's speed.

The runs are TINY_TRAIN runs on the learnable prep folder of tests/helpers.py (64 train and 16 val items a modality).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from mlflow import MlflowClient

import tasks.train.budget as budget
import tasks.train.trainer as trainer
from flows.params import PipelineParams, TrainParams
from tasks.infra.checkpoint import CKPT
from tasks.train.table import MODEL_MINUTES, MODELS
from tasks.train.trainer import TrainConfig, get_lr, load_checkpoint, train

from tests.helpers import (TINY_TRAIN, _shared_mlflow, failing_at, mlflow_db, prep,  # noqa: F401 (fixtures)
                           weights_equal)


def _steps_take_a_second(monkeypatch) -> None:
    """The time cap's clock (budget.now) moves one second with every optimiser step, and not otherwise."""
    t = [0.0]
    real = trainer.optimiser_step

    def step(*args):
        t[0] += 1.0
        return real(*args)

    monkeypatch.setattr(budget, "now", lambda: t[0])
    monkeypatch.setattr(trainer, "optimiser_step", step)


def test_the_clock_moves_the_end_to_the_steps_that_fit(monkeypatch):
    """A cap of 100 s at 1 s a step: after 20 steps the end is step 100 (or the plan, if sooner); no decision before
    20 steps of this attempt; time already spent (a resumed run's) counts; a run out of time gets one more step; the
    pace leaves out the first 10 steps' warm-up."""
    t = [0.0]
    monkeypatch.setattr(budget, "now", lambda: t[0])
    clock = budget.Clock(100.0)
    t[0] = 10.0
    assert clock.end(10, 500) is None  # 10 steps are too few to judge the pace
    t[0] = 20.0
    assert (clock.end(20, 500), clock.end(20, 60)) == (100, 60)
    assert budget.Clock(None).end(20, 500) is None
    resumed = budget.Clock(100.0, before=50.0, first_step=50)  # 50 s spent before, this attempt from step 50
    t[0] += 20.0
    assert resumed.end(70, 500) == 100  # 70 s spent, 1 s a step: 30 more
    t[0] += 100.0
    assert resumed.end(75, 500) == 76  # out of time: the next step ends the run
    assert clock.announce("vit", 100, 500).startswith("[vit] time cap 1.67 min: the schedule now ends at step 100")
    assert clock.announce("vit", 99, 500) is None  # moved by less than 2% of the plan since it was said
    warm = budget.Clock(100.0, t0=0.0)  # the first 10 steps take 5 s each (warm-up), then 1 s: the pace is 1 s
    t[0] = 50.0
    assert warm.end(10, 500) is None
    t[0] = 60.0
    assert warm.end(20, 500) == 60  # 60 s spent, 40 left at 1 s a step (from the first 10 steps' pace: 33)


def test_a_time_capped_run_ends_its_schedule_where_the_time_runs_out(prep, tmp_path, monkeypatch, capsys, mlflow_db):
    """max_minutes=1 at 1 s a step: 200 planned steps become 60 (decided at step 20), the cosine ends at step 60,
    the last step is evaluated and checkpointed, and the record, the tag and stdout say so. Killed at step 50 and
    resumed, the run ends at the same step with the same weights."""
    _steps_take_a_second(monkeypatch)
    cfg = replace(TINY_TRAIN, max_steps=200, eval_every=100, ckpt_every=25, log_every=5, max_minutes=1.0)
    whole = train("vit", prep, tmp_path / "whole", cfg, preset="tiny", experiment="time-cap")
    assert "[vit] time cap 1 min: the schedule now ends at step 60 of the 200 planned" in capsys.readouterr().out
    assert (whole["steps"], whole["planned_steps"], whole["time_capped"], whole["stopped_early"]) == (60, 200, True,
                                                                                                      False)
    ckpt = load_checkpoint(tmp_path / "whole" / CKPT)
    assert (ckpt["step"], ckpt["end"], ckpt["clock_s"]) == (60, 60, 60.0)
    c = MlflowClient(tracking_uri=mlflow_db)
    lrs = sorted(c.get_metric_history(whole["run_id"], "train/lr"), key=lambda m: m.step)
    assert lrs[-1].value == pytest.approx(get_lr(59, replace(cfg, max_steps=60)))  # the decay's end
    assert c.get_run(whole["run_id"]).data.tags["tessera.time_capped"] == "true"
    assert sorted(m.step for m in c.get_metric_history(whole["run_id"], "val/loss")) == [60]

    out = tmp_path / "killed"
    with monkeypatch.context() as mp:
        mp.setattr(trainer, "get_lr", failing_at(50))
        with pytest.raises(RuntimeError, match="boom"):
            train("vit", prep, out, cfg, preset="tiny", experiment="time-cap")
    assert (load_checkpoint(out / CKPT)["step"], load_checkpoint(out / CKPT)["end"]) == (50, 60)
    resumed = train("vit", prep, out, cfg, preset="tiny", experiment="time-cap")
    assert (resumed["steps"], resumed["time_capped"]) == (60, True)
    assert weights_equal(load_checkpoint(out / CKPT)["state_dict"], ckpt["state_dict"])


def test_a_run_that_fits_its_time_cap_is_the_uncapped_run(prep, tmp_path, monkeypatch):
    """A cap the steps fit in (1 min for 40 steps of 1 s; judged from step 20 on) changes nothing: the same steps
    and weights as no cap."""
    _steps_take_a_second(monkeypatch)
    cfg = replace(TINY_TRAIN, max_steps=40, eval_every=20, log_every=5)
    capped = train("vit", prep, tmp_path / "capped", replace(cfg, max_minutes=1.0), preset="tiny",
                   experiment="time-cap")
    free = train("vit", prep, tmp_path / "free", cfg, preset="tiny", experiment="time-cap")
    assert (capped["steps"], capped["time_capped"]) == (free["steps"], False) == (40, False)
    assert weights_equal(load_checkpoint(capped["checkpoint"])["state_dict"],
                          load_checkpoint(free["checkpoint"])["state_dict"])
    with pytest.raises(ValueError, match="max_minutes=0 must be > 0"):
        TrainConfig(max_minutes=0)


def test_a_run_shares_its_training_minutes_by_each_models_time_in_the_default_run():
    """--train-minutes: each model's time cap is its share by table `minutes` among the run's models (all of them:
    the shares add up to the budget, less the shares of the models it does not cut, table `time_capped`, which keep
    MODEL_MINUTES); without it, MODEL_MINUTES each; a model's own max_minutes wins."""
    from flows.pipeline import train_config

    models = list(MODELS)
    run = PipelineParams(train=TrainParams(train_minutes=17))
    caps = {m: train_config(m, run, models).max_minutes for m in models}
    total = sum(MODELS[m].minutes for m in models)
    uncut = [m for m in models if not MODELS[m].time_capped]
    assert uncut == ["asr"] and caps["asr"] == MODEL_MINUTES
    assert sum(caps[m] for m in models if m not in uncut) == pytest.approx(17 * (1 - MODELS["asr"].minutes / total))
    assert caps["t2i"] == pytest.approx(17 * MODELS["t2i"].minutes / total) and caps["t2i"] > caps["vit"]
    pair = train_config("vit", run, ["vit", "ast"]).max_minutes  # two models share the whole budget
    assert pair == pytest.approx(17 * MODELS["vit"].minutes / (MODELS["vit"].minutes + MODELS["ast"].minutes))
    assert train_config("vit", PipelineParams(), models).max_minutes == MODEL_MINUTES
    own = PipelineParams(train=TrainParams(train_minutes=17, train_overrides={"vit": {"max_minutes": 3}}))
    assert train_config("vit", own, models).max_minutes == 3
    with pytest.raises(ValueError):
        TrainParams(train_minutes=0)


def test_a_runs_minutes_leave_training_what_the_other_work_does_not_take_on_this_machine():
    """--run-minutes: training gets the run's minutes less OTHER_MINUTES of other work times this machine's slowdown
    (a machine half as fast reserves twice as much), never less than SHORTEST_TRAINING."""
    other = budget.OTHER_MINUTES
    assert budget.run_training_minutes(20, 1.0) == pytest.approx(20 - other)
    assert budget.run_training_minutes(20, 2.0) == pytest.approx(20 - 2 * other)
    assert budget.run_training_minutes(20, 0.5) > budget.run_training_minutes(20, 1.0)  # a faster machine
    assert budget.run_training_minutes(2, 5.0) == budget.SHORTEST_TRAINING


def test_the_machines_slowdown_is_probed_once_per_root_and_machine(tmp_path, monkeypatch):
    """machine_slowdown: the probe against REFERENCE_PROBE_S, rounded to 0.05, kept in ROOT/machine.json; a second
    run on the root reads it (the same minutes, so the same cache keys) even when a probe now would say otherwise;
    another device or precision is probed on its own."""
    probes = iter([2.02 * budget.REFERENCE_PROBE_S, 0.5 * budget.REFERENCE_PROBE_S, 1.0 * budget.REFERENCE_PROBE_S])
    monkeypatch.setattr(budget, "probe_seconds", lambda device, precision: next(probes))
    assert budget.machine_slowdown(tmp_path) == (pytest.approx(2.0), True)
    assert budget.machine_slowdown(tmp_path) == (pytest.approx(2.0), False)
    assert budget.machine_slowdown(tmp_path, precision="fp32") == (pytest.approx(0.5), True)
    assert budget.machine_slowdown(tmp_path / "other-root") == (pytest.approx(1.0), True)
    assert len(__import__("json").loads((tmp_path / "machine.json").read_text())) == 2
    (tmp_path / "machine.json").write_text("{not json")  # damaged: probed again and rewritten, not a crash
    monkeypatch.setattr(budget, "probe_seconds", lambda device, precision: 3.0 * budget.REFERENCE_PROBE_S)
    assert budget.machine_slowdown(tmp_path) == (pytest.approx(3.0), True)
    assert budget.machine_slowdown(tmp_path) == (pytest.approx(3.0), False)
    (tmp_path / "machine.json").write_text("[]")
    assert budget.machine_slowdown(tmp_path) == (pytest.approx(3.0), True)


def test_a_run_shares_what_its_minutes_leave_for_training(tmp_path, monkeypatch):
    """The pipeline's training minutes under --run-minutes on a machine probed at 2x: the shares add up to
    run_training_minutes; with --train-minutes as well the smaller wins; without either, none."""
    from flows.pipeline import train_config, training_minutes

    monkeypatch.setattr(budget, "probe_seconds", lambda device, precision: 2 * budget.REFERENCE_PROBE_S)
    models = list(MODELS)
    run = PipelineParams(train=TrainParams(run_minutes=20))
    minutes = training_minutes(run, tmp_path)
    assert minutes == pytest.approx(20 - 2 * budget.OTHER_MINUTES)
    capped = [m for m in models if MODELS[m].time_capped]
    assert sum(train_config(m, run, models, minutes).max_minutes for m in capped) == pytest.approx(
        minutes * sum(MODELS[m].minutes for m in capped) / sum(MODELS[m].minutes for m in models))
    assert training_minutes(PipelineParams(train=TrainParams(run_minutes=20, train_minutes=8)), tmp_path) == 8
    assert training_minutes(PipelineParams(train=TrainParams(train_minutes=8)), tmp_path) == 8
    assert training_minutes(PipelineParams(), tmp_path) is None
    with pytest.raises(ValueError):
        TrainParams(run_minutes=0)


def test_the_probe_times_training_steps_and_leaves_the_random_state(monkeypatch):
    import torch

    torch.manual_seed(1)
    first = torch.rand(3)
    torch.manual_seed(1)
    seconds = budget.probe_seconds(precision="fp32")
    assert seconds > 0 and torch.equal(torch.rand(3), first)


def test_minutes_a_model_leaves_unused_go_to_the_models_after_it(tmp_path, monkeypatch):
    """The pipeline's training loop: each model's cap is its share of what the earlier models left (their records'
    train_seconds), so one that finishes under its cap gives the rest to the later ones and the caps still add up to
    the run's minutes; the same records (a cached re-run) plan the same caps."""
    import flows.pipeline as pipeline

    models = ["vit", "ast", "t2i"]
    spent = {"vit": 0.5, "ast": None, "t2i": None, "asr": 1.5}  # minutes each takes; None: all of its cap

    def planned_caps(lanes: int = 1, models: list[str] = models) -> dict[str, float]:
        caps = {}

        class Task:
            def __init__(self, fn):
                self.fn = fn

            def with_options(self, **_):
                return self.fn

        def train(m, prep, needs, cfg, *args, **kw):
            caps[m] = cfg.max_minutes
            return {"checkpoint": str(tmp_path / f"{m}.pt"), "run_id": m,
                    "train_seconds": 60 * (spent[m] or cfg.max_minutes)}

        monkeypatch.setattr(pipeline.stages, "train_model", Task(train))
        monkeypatch.setattr(pipeline.stages, "evaluate_model", Task(lambda *a, **kw: {"metrics": {}}))
        pipeline._train_and_evaluate(PipelineParams(train=TrainParams(lanes=lanes)), models, tmp_path, {},
                                     {"image": "x", "pixels": "y"}, tmp_path, {}, minutes=10.0)
        return caps

    caps = planned_caps()
    total = sum(MODELS[m].minutes for m in models)
    assert caps["vit"] == pytest.approx(10 * MODELS["vit"].minutes / total)
    rest = MODELS["ast"].minutes + MODELS["t2i"].minutes
    assert caps["ast"] == pytest.approx((10 - 0.5) * MODELS["ast"].minutes / rest)  # more than its plain share
    assert caps["ast"] > 10 * MODELS["ast"].minutes / total
    assert 0.5 + caps["ast"] + caps["t2i"] == pytest.approx(10)
    assert planned_caps() == caps
    # two lanes side by side: t2i alone in one (the longest), vit and ast in the other; each lane shares all 10
    two = planned_caps(lanes=2)
    assert two["t2i"] == pytest.approx(10)
    assert two["vit"] == pytest.approx(10 * MODELS["vit"].minutes / (MODELS["vit"].minutes + MODELS["ast"].minutes))
    assert 0.5 + two["ast"] == pytest.approx(10)
    # a model the run's minutes do not cut (the speech recogniser) trains first (after a model another starts from:
    # the ViT before CLIP), with its own cap, and the models after it share what it leaves
    assert pipeline.train_order(["clip", "vit", "asr"]) == ["vit", "asr", "clip"]
    assert pipeline.train_order(["vit", "ast", "t2i", "asr"]) == ["asr", "vit", "ast", "t2i"]
    uncut = planned_caps(models=pipeline.train_order(["vit", "ast", "t2i", "asr"]))
    assert uncut["asr"] == MODEL_MINUTES and uncut["vit"] == pytest.approx((10 - 1.5) * MODELS["vit"].minutes / total)
    assert 1.5 + 0.5 + uncut["ast"] + uncut["t2i"] == pytest.approx(10)
    assert pipeline.minutes_left(10.0, {}, 4.0) == 6.0  # a record without train_seconds took its whole cap
    assert pipeline.minutes_left(10.0, {"train_seconds": 900}, 4.0) == pytest.approx(0.1)  # overran: 1% is left
    assert pipeline.minutes_left(None, {"train_seconds": 60}, None) is None  # no minutes: no caps


def test_lanes_keep_a_model_with_the_one_it_starts_from_and_share_the_minutes_out(monkeypatch):
    import flows.pipeline as pipeline

    models = pipeline.train_order(sorted(MODELS))
    two = pipeline.lanes(models, 2)
    assert sorted(m for lane in two for m in lane) == sorted(models) and len(two) == 2
    assert all(lane == [m for m in models if m in lane] for lane in two)  # each keeps the training order
    assert any(lane.index("vit") < lane.index("clip") for lane in two if "clip" in lane and "vit" in lane)
    load = sorted(sum(MODELS[m].minutes for m in lane) for lane in two)
    assert load[1] - load[0] <= max(MODELS[m].minutes for m in models)  # longest first, to the emptier lane
    assert pipeline.lanes(models, 1) == [models]
    assert len(pipeline.lanes(models, 99)) == len(models) - 1  # CLIP trains after the ViT it starts from
    assert pipeline.lane_count(TrainParams(lanes=3)) == 3
    monkeypatch.setattr(pipeline.os, "cpu_count", lambda: 2)
    assert pipeline.lane_count(TrainParams(device="cpu")) == 2
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert pipeline.lane_count(TrainParams(lanes=2)) == 1  # under torchrun: the ranks' collectives in one order
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setattr(pipeline, "pick_device", lambda device: __import__("torch").device("cuda"))
    assert pipeline.lane_count(TrainParams()) == 1  # a GPU: one lane


def test_an_interrupt_in_one_lane_stops_the_others_and_a_failure_lets_them_finish():
    """run_lanes: a KeyboardInterrupt (Ctrl-C, SIGTERM) reaches every lane still running, which then ends at once; an
    error in one lane is raised only after the others have finished their work."""
    import time

    from flows.pipeline import run_lanes

    seen = []

    def long_lane():
        try:
            for _ in range(1000):  # 10 s unless interrupted
                time.sleep(0.01)
            seen.append("finished")
        except KeyboardInterrupt:
            seen.append("interrupted")
            raise

    def interrupted():
        time.sleep(0.2)
        raise KeyboardInterrupt

    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_lanes([interrupted, long_lane])
    assert seen == ["interrupted"] and time.monotonic() - t0 < 5

    def failing():
        raise ValueError("bad lane")

    seen.clear()
    with pytest.raises(ValueError, match="bad lane"):
        run_lanes([failing, lambda: (time.sleep(0.3), seen.append("finished"))])
    assert seen == ["finished"]
    assert run_lanes([lambda: 1, lambda: 2]) == [1, 2]
