"""Data-parallel training: torchrun with two CPU ranks on gloo, stopped and resumed, against one process with the
global batch (tiny prep folder: tests/helpers.py make_prep)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from tasks.train.trainer import CKPT, load_checkpoint, train

from tests.helpers import TINY_TRAIN, _shared_mlflow, experiment_runs, mlflow_db, prep, train_losses  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
DDP_TOLERANCE = 0.15  # mean |loss_ddp - loss_single| per step: rank 0 logs its own 16 samples' loss, not all 32


DDP_CHILD = """
import json, os, sys
import torch, torch.distributed as dist
import tasks.train.checkpoint as C
import tasks.train.trainer as T
from tasks.data import loader
from tasks.infra import tracking

args = json.loads(sys.argv[1])
rank = int(os.environ["RANK"])
report = {"rank": rank, "shards": [], "checkpoints": 0, "mlflow_runs": 0}
nets, stop_at = [], [args["stop_at"]]
make_optimizer, batches, save_checkpoint, start_run, get_lr = (T.make_optimizer, loader.batches, C.save_checkpoint,
                                                               tracking.start_run, T.get_lr)

class Stop(Exception):
    pass

def spy_optimizer(model, cfg, device):  # the module every rank trains (DDP wraps it)
    nets.append(model)
    return make_optimizer(model, cfg, device)

def spy_batches(urls, batch_size, **kw):  # which shards this rank trains on, per epoch
    for b in batches(urls, batch_size, **kw):
        if kw.get("train", True) and kw.get("split_nodes", True):
            report["shards"] += [[kw.get("epoch", 0), os.path.basename(s["__url__"])] for s in b]
        yield b

def spy_save(path, ckpt):
    report["checkpoints"] += 1
    save_checkpoint(path, ckpt)

def spy_start_run(*a, **kw):
    report["mlflow_runs"] += 1
    return start_run(*a, **kw)

def stopping_get_lr(step, cfg):  # both ranks stop at the top of the same step, before its collectives
    if step == stop_at[0]:
        raise Stop(step)
    return get_lr(step, cfg)

T.make_optimizer, loader.batches, C.save_checkpoint, tracking.start_run, T.get_lr = (
    spy_optimizer, spy_batches, spy_save, spy_start_run, stopping_get_lr)
run = lambda: T.train("ast", args["prep"], args["out"], T.TrainConfig(**args["cfg"]), preset="tiny",
                      experiment="ddp")
try:
    run()
except Stop:
    dist.barrier()  # rank 0 has written the checkpoint of step stop_at; now every rank resumes from it
    stop_at[0] = None
    run()
torch.save(nets[-1].state_dict(), os.path.join(args["out"], f"params-rank{rank}.pt"))
with open(os.path.join(args["out"], f"report-rank{rank}.json"), "w") as f:
    json.dump(report, f)
sys.stdout.flush()
os._exit(0)  # skip the interpreter's teardown of torch, mlflow and prefect: seconds per rank on a loaded 2-core box
"""


def test_ddp_two_cpu_processes_match_one_process_with_the_global_batch(prep, tmp_path):
    """torchrun, 2 ranks on gloo, stopped after the step-4 checkpoint and resumed: each rank trains on its own audio
    shard, rank 0 alone logs and checkpoints, parameters stay identical across ranks, and the loss curve follows a
    single-process run with the same global batch (2 x 16 = 32)."""
    script = tmp_path / "ddp_child.py"
    script.write_text(DDP_CHILD)
    out = tmp_path / "out"
    cfg = replace(TINY_TRAIN, max_steps=8)  # checkpoints at steps 4 and 8: stopped at 4, resumed to 8
    args = {"prep": str(prep), "out": str(out), "cfg": asdict(cfg), "stop_at": 4}
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), json.dumps(args)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = [json.loads((out / f"report-rank{r}.json").read_text()) for r in (0, 1)]

    # one MLflow run, resumed (not restarted): every step logged once, by rank 0 alone
    (run,) = experiment_runs("ddp")
    assert run.info.status == "FINISHED" and run.data.params["world_size"] == "2"
    ddp = train_losses(run.info.run_id)
    assert sorted(ddp) == list(range(1, cfg.max_steps + 1))
    assert [r["mlflow_runs"] for r in reports] == [2, 0]  # the first attempt and the resumed one
    assert [r["checkpoints"] > 0 for r in reports] == [True, False] and (out / "_SUCCESS").exists()

    # each rank its own shard: in every epoch the two ranks read disjoint shards, together all of them
    per_epoch: dict[int, list[set]] = {}
    for r in reports:
        for epoch, shard in r["shards"]:
            per_epoch.setdefault(epoch, [set(), set()])[r["rank"]].add(shard)
    assert len(per_epoch) >= 2
    for epoch, (a, b) in per_epoch.items():
        assert a and b and not a & b and a | b == {"train-000000.tar", "train-000001.tar"}, (epoch, a, b)

    # parameters identical across ranks, and equal to what rank 0 checkpointed
    p0, p1 = (torch.load(out / f"params-rank{r}.pt", weights_only=True) for r in (0, 1))
    assert p0.keys() == p1.keys() and all(torch.equal(p0[k], p1[k]) for k in p0)
    ckpt = load_checkpoint(out / CKPT)
    assert ckpt["step"] == cfg.max_steps and all(torch.equal(ckpt["state_dict"][k], p0[k]) for k in p0)

    # the loss curve of one process with the same global batch: same start, same descent, within sampling noise
    single = train("ast", prep, tmp_path / "single", replace(cfg, batch_size=2 * cfg.batch_size), preset="tiny",
                   experiment="ddp-single")
    one = train_losses(single["run_id"])
    steps = range(1, cfg.max_steps + 1)
    curves = f"ddp {[round(ddp[s], 3) for s in steps]} vs one process {[round(one[s], 3) for s in steps]}"
    assert abs(ddp[1] - one[1]) < 0.1, curves  # the same initial weights
    assert np.mean([abs(ddp[s] - one[s]) for s in steps]) < DDP_TOLERANCE, curves
    assert abs(np.mean([ddp[s] for s in steps[-4:]]) - np.mean([one[s] for s in steps[-4:]])) < DDP_TOLERANCE, curves
