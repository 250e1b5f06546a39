"""Training: model FLOPs utilisation (MFU) of one optimiser step per model on this CPU, and torch.compile's effect.

Every step is the trainer's (tasks/train/trainer.py): forward, backward, grad-norm clip, AdamW (make_optimizer), on one
batch of the model's own make_batch built from real prepared samples (a small built-in dataset and codebooks of the
pipeline's default sizes), with the torch thread count training uses (TrainConfig.cpu_threads, 1). Data loading is
left out (benchmarks/loading.py measures it): this is the model's compute.

    MFU = samples/s x flops_per_sample(train=True) / peak FLOP/s
    peak: tasks.infra.hardware.peak_flops, the best square matrix product measured in this run, fp32 and bf16,
          same threads.

Sizes: each model's default preset (tasks/train/table.py) and a larger config (about 2x the width). Precision as the
trainer picks it (trainer.measured_precision): where the CPU's bf16 matmul peak is above its fp32 one (AVX512-BF16,
AMX), each model and size is timed both ways and its faster step kept (bf16 only where 1.3x faster,
hardware.BF16_MARGIN), and its MFU is against the peak of the dtype it ran in (bf16 autocast's casts can cost a small
model more than its faster products save); where bf16 is slower (AVX2-only CPUs emulate it), fp32. The target
(issue #6) is ViT >= 0.3 of that peak at the larger config.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import Row, check, median, torch_threads
from benchmarks.loading import build
from tasks.data import loader, shards
from tasks.data.codebook import CodebookConfig, fit_codebooks
from tasks.infra.hardware import kept_dtype, peak_flops
from tasks.train.batches import BatchContext, DataInfo
from tasks.train.table import MODELS, configure, spec
from tasks.train.trainer import TrainConfig, make_optimizer

MFU_TARGET = ">= 0.3"
LARGER = {  # about twice the default width (and deeper where the default is shallow)
    "vit": dict(dim=256, depth=6, n_heads=8, patch_size=8),
    "ast": dict(dim=256, depth=6, n_heads=8),
    "clip": dict(vision_dim=256, vision_depth=6, vision_heads=8, text_dim=192, text_depth=3, text_heads=6),
    "imagegpt": dict(side=16, dim=128, depth=4, n_heads=4),
    "asr": dict(dim=256, enc_depth=3, dec_depth=4, n_heads=8),
    "t2i": dict(dim=256, enc_depth=3, dec_depth=4, n_heads=8),
    "tts": dict(dim=256, enc_depth=3, dec_depth=4, n_heads=8),
}
QUICK_LARGER = {"vit": dict(dim=48), "ast": dict(dim=48), "clip": dict(vision_dim=48), "imagegpt": dict(dim=48),
                "asr": dict(dim=48), "t2i": dict(dim=48), "tts": dict(dim=48)}
COMPILED = ("vit", "imagegpt")  # torch.compile on and off, default config (compiling every model takes minutes)


def data(root: Path, quick: bool) -> tuple[Path, dict[str, str]]:
    """A small prepared dataset and its codebooks (the pipeline's default k, so vocabularies have their real size)."""
    _, prep, _ = build(root, 24 if quick else 96, 12 if quick else 48, maxcount=64)
    k = dict(pixels_k=16, image_k=32) if quick else {}
    record = fit_codebooks(prep, CodebookConfig(iters=5, min_usage=0.0, **k), root / "codebooks")
    return prep, {kind: str(root / "codebooks" / f) for kind, f in record["codebooks"].items()}


def one_batch(name: str, prep: Path, ctx: BatchContext, batch_size: int) -> dict[str, torch.Tensor]:
    """batch_size real samples of the model's modality (repeated when the small set has fewer), made into a batch."""
    urls = shards.shard_urls(prep, spec(name).modality, "train")
    samples = [s for b in loader.batches(urls, 64, train=False) for s in b]
    return spec(name).make_batch([samples[i % len(samples)] for i in range(batch_size)], ctx)


def step_rate(name: str, prep: Path, codebooks: dict, preset: str, overrides: dict | None, batch_size: int,
              steps: int, compile: bool | str = False, bf16: bool = False) -> dict:
    """Samples/s of the trainer's step (median of `steps` timed steps after warm-up) and the model's FLOPs."""
    info = DataInfo.load(prep, codebooks)
    cfg = configure(name, info, preset, overrides)
    batch = one_batch(name, prep, BatchContext(info, cfg), batch_size)
    torch.manual_seed(0)
    net = spec(name).build(cfg)
    opt = make_optimizer(net, TrainConfig(), torch.device("cpu"))
    model = torch.compile(net, **({"backend": compile} if isinstance(compile, str) else {})) if compile else net

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            _, loss = model(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    step()  # warm-up (and the compilation, when compiling)
    first = time.perf_counter() - t0
    if compile:
        step()  # a second warm-up: recompiles for the optimizer state's first real step show up here
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    sps = batch_size / median(times)
    return {"samples_per_s": sps, "step_s": median(times), "step_times": times, "first_step_s": first,
            "flops_per_sample": net.flops_per_sample(train=True), "n_params": sum(p.numel() for p in net.parameters()),
            "batch_size": batch_size, "config": overrides or preset, "tokens": spec(name).tokens(cfg)}


def timed(name: str, prep: Path, codebooks: dict, preset: str, overrides: dict | None, batch_size: int, steps: int,
          both: bool) -> dict:
    """step_rate in fp32, and in bf16 autocast too when `both`: the faster of the two, bf16 only by
    hardware.BF16_MARGIN, with "dtype" and the samples/s of each (what trainer.measured_precision decides per model)."""
    rates = {"fp32": step_rate(name, prep, codebooks, preset, overrides, batch_size, steps)}
    if both:
        rates["bf16"] = step_rate(name, prep, codebooks, preset, overrides, batch_size, steps, bf16=True)
    names = {torch.float32: "fp32", torch.bfloat16: "bf16"}
    dtype = names[kept_dtype({d: 1 / rates[k]["samples_per_s"] for d, k in names.items() if k in rates})]
    return {**rates[dtype], "dtype": dtype, "samples_per_s_by_dtype": {k: r["samples_per_s"] for k, r in rates.items()}}


def run(quick: bool = False) -> list[Row]:
    threads = TrainConfig().cpu_threads
    steps = 1 if quick else 3
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="tessera-bench-train-") as tmp, torch_threads(threads):
        prep, codebooks = data(Path(tmp), quick)
        cpu = torch.device("cpu")
        peak = {"fp32": peak_flops(cpu, torch.float32), "bf16": peak_flops(cpu, torch.bfloat16)}
        both = peak["bf16"] > peak["fp32"]
        peak_note = (f"peaks measured in this run with {threads} torch thread(s): fp32 {peak['fp32'] / 1e9:.1f}, "
                     f"bf16 {peak['bf16'] / 1e9:.1f} GFLOP/s")
        preset = "tiny" if quick else "default"
        larger = QUICK_LARGER if quick else LARGER
        for name in MODELS:
            bs = 4 if quick else spec(name).train.get("batch_size", TrainConfig().batch_size)
            res = {"default": timed(name, prep, codebooks, preset, None, bs, steps, both),
                   "larger": timed(name, prep, codebooks, preset, larger[name], bs, steps, both)}
            mfu = {k: r["samples_per_s"] * r["flops_per_sample"] / peak[r["dtype"]] for k, r in res.items()}
            target = MFU_TARGET if name == "vit" else "report"
            passed = check(mfu["larger"], target)
            ran = {k: (f"{r['dtype']} ({' / '.join(f'{d} {v:.0f}' for d, v in r['samples_per_s_by_dtype'].items())}"
                       " samples/s)") for k, r in res.items()}
            note = f"{peak_note}; faster step: default {ran['default']}, larger {ran['larger']}"
            if passed is False:
                big = res["larger"]
                note = (f"miss: the larger ViT ({big['flops_per_sample'] / 1e6:.0f} MFLOP/sample, {big['tokens']} "
                        f"tokens) reaches {mfu['larger']:.2f} of the {big['dtype']} peak: its matrices are small next "
                        "to the 1024+ squares the peak is measured on, and attention, "
                        "LayerNorm, GELU, softmax and AdamW are memory-bound work that adds time but no counted FLOPs; "
                        + note)
            rows.append(Row(
                f"training_mfu_{name}", "MFU (model FLOP/s / the peak of the dtype it ran in) at the larger config",
                f"batch {bs}; default: {preset} preset ({res['default']['n_params'] / 1e6:.2f} M params, "
                f"{res['default']['flops_per_sample'] / 1e6:.1f} MFLOP/sample); larger {larger[name]} "
                f"({res['larger']['n_params'] / 1e6:.2f} M params, {res['larger']['flops_per_sample'] / 1e6:.1f} "
                "MFLOP/sample)",
                f"peaks fp32 {peak['fp32'] / 1e9:.1f}, bf16 {peak['bf16'] / 1e9:.1f} GFLOP/s",
                f"default ({res['default']['dtype']}): {res['default']['samples_per_s']:.0f} samples/s, MFU "
                f"{mfu['default']:.3f}; larger ({res['larger']['dtype']}): {res['larger']['samples_per_s']:.0f} "
                f"samples/s, MFU {mfu['larger']:.3f}",
                round(mfu["larger"], 4), target, passed, note,
                extra={"peak_flops": peak, "mfu": mfu, "threads": threads, **res}))

        # torch.compile on vs off (default config; the compiled call's first step includes compilation)
        for name in COMPILED:
            bs = 4 if quick else spec(name).train.get("batch_size", TrainConfig().batch_size)
            eager = step_rate(name, prep, codebooks, preset, None, bs, steps)
            compiled = step_rate(name, prep, codebooks, preset, None, bs, steps, compile="eager" if quick else True)
            ratio = compiled["samples_per_s"] / eager["samples_per_s"]
            rows.append(Row(
                f"training_compile_{name}", "speedup (compiled samples/s / eager samples/s), report only",
                f"{name} {preset} config, batch {bs}, {threads} thread(s)",
                f"eager: {eager['samples_per_s']:.0f} samples/s", f"torch.compile: {compiled['samples_per_s']:.0f} "
                f"samples/s (first step incl. compilation {compiled['first_step_s']:.1f} s)", round(ratio, 3),
                "report", None, "quick mode: backend 'eager' (no inductor), a smoke test of the path" if quick else
                "no target in the issue; inductor's CPU code for these small matrices",
                extra={"eager": eager, "compiled": compiled}))

        # bf16 autocast on this CPU, one model, to show why the trainer picks fp32 here
        if peak["bf16"] < peak["fp32"]:
            bs = 4 if quick else 16
            fp32 = step_rate("vit", prep, codebooks, preset, None, bs, 1)
            bf16 = step_rate("vit", prep, codebooks, preset, None, bs, 1, bf16=True)
            ratio = bf16["samples_per_s"] / fp32["samples_per_s"]
            rows.append(Row(
                "training_bf16_vit", "speedup (bf16 autocast samples/s / fp32 samples/s), report only",
                f"vit {preset} config, batch {bs}, {threads} thread(s)", f"fp32: {fp32['samples_per_s']:.1f} samples/s",
                f"bf16 autocast: {bf16['samples_per_s']:.1f} samples/s", round(ratio, 4), "report", None,
                f"bf16 matmul peak {peak['bf16'] / 1e9:.1f} vs fp32 {peak['fp32'] / 1e9:.1f} GFLOP/s on this CPU "
                "(no AVX512-BF16/AMX): precision 'auto' trains in fp32 here",
                extra={"fp32": fp32, "bf16": bf16}))
    return rows
