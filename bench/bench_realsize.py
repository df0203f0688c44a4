"""Real-size rows (issue 36): one TDM iteration (K = 4) of the published SD1.5 and SDXL UNets.

    TDM_BENCH_REAL_SIZES=sd15-real python -m pytest bench/bench_realsize.py --benchmark-json=out.json
    tdm-fast bench realsize                          # the same, written to <results>/realsize-<machine>.json

The configurations of the training comparison (``bench/sd15_comparison.py``: official-style loop,
plain full copies, plain LoRA roles, all options) on random weights, one configuration at a time, on
whatever device is here. Sizes (``TDM_BENCH_REAL_SIZES``): on a CPU ``sd15-real`` (SD1.5's published
UNet, 64×64 latents = 512 px, 77×768 text, batch 1, fp32) and ``sdxl-real`` (SDXL's, 128×128 latents,
2048-wide text and text-time embeddings, batch 1, fp32, the LoRA roles with gradient checkpointing), and both
at bf16 autocast as ``sd15-real-bf16`` / ``sdxl-real-bf16`` (for CPUs with bf16 arithmetic: AVX512-BF16, AMX);
on a GPU ``sd15`` and ``sdxl`` (bf16 autocast, ``TDM_BENCH_SD15_BATCH`` / ``TDM_BENCH_SDXL_BATCH``);
``tiny`` is the dry run of ``bench/gpu_all.sh``. A configuration whose ``tdm-fast plan`` total exceeds
``TDM_BENCH_REAL_MEMORY_GIB`` (CPU default 12: the machine is shared; GPU default 90 % of the card) is
not built: it is listed, with its plan, as not run; nor is a row that would start after
``TDM_BENCH_REAL_DEADLINE`` (seconds since the epoch; pytest's skip reason says so).

Per row: ms per iteration (pytest-benchmark's rounds, ``TDM_BENCH_REAL_ITERATIONS``, default 2, after one
untimed iteration, two for the compiled configuration, whose first compiles), network passes × batch per
timed iteration, the tensor peak against ``tdm-fast plan``'s prediction for the same configuration (CPU: the
running sum of torch.profiler's memory events; CUDA: ``max_memory_allocated``; over the build and every
iteration), the peak RSS over the timed iterations (CPU; minus the RSS before the build), and the FLOPs of
the last untimed iteration counted by torch's FLOP formulas (``tdm_fast.perf.flops.count_flops``) against the FLOP model
(``tdm_fast.perf.flops``: ``tdm_iteration_flops`` on this UNet's forward FLOPs, moved to the network passes
that iteration drew; the model describes tdm-fast's iteration, not the official-style loop's).
"""
from __future__ import annotations

import functools
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sd15_comparison as cmp  # noqa: E402

CUDA = torch.cuda.is_available()
SIZES = [s for s in os.environ.get("TDM_BENCH_REAL_SIZES", "sd15,sdxl" if CUDA else "sd15-real,sdxl-real").split(",") if s]
ITERATIONS = int(os.environ.get("TDM_BENCH_REAL_ITERATIONS", "2"))
# a row that would start after this time (seconds since the epoch) is skipped, so that a session with a time
# limit (bench/gpu_all.sh) still ends with the rows it measured written
DEADLINE = float(os.environ.get("TDM_BENCH_REAL_DEADLINE", "inf"))
# `tdm-fast bench realsize` runs each row in its own process and rewrites the record after each: a row killed
# for memory (or by bench/gpu_all.sh's limit) loses itself only, and is written down as not recorded
ONE_PROCESS_PER_TEST = True


def memory_budget_gib() -> float:
    if "TDM_BENCH_REAL_MEMORY_GIB" in os.environ:
        return float(os.environ["TDM_BENCH_REAL_MEMORY_GIB"])
    return 0.9 * torch.cuda.get_device_properties(0).total_memory / 2**30 if CUDA else 12.0


@functools.lru_cache(maxsize=None)
def planned_mb(name: str, size: str) -> float:
    return cmp.planned_memory_mb(name, size)


def not_run(size: str) -> dict:
    """{configuration: why it was not built} for the configurations whose plan exceeds the budget."""
    budget = memory_budget_gib()
    return {name: f"plan {planned_mb(name, size) / 1024:.1f} GiB > budget {budget:g} GiB" for name in cmp.CONFIGS
            if planned_mb(name, size) / 1024 > budget}


@functools.lru_cache(maxsize=None)
def modelled_flops(name: str, size: str) -> dict | None:
    """The FLOP model of one tdm-fast iteration on this size's UNet: its total, one forward's FLOPs and the
    forward passes × batch it composes (None for the official-style loop)."""
    from diffusers import UNet2DConditionModel

    from tdm_fast.lora import DEFAULT_TARGETS
    from tdm_fast.perf.flops import IterationSettings, count_flops, lora_adapter_flops, tdm_iteration_flops

    if name == "official":
        return None
    s = cmp.SIZES[size]
    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=s.latent, **s.unet)
    cond, _ = cmp.prompt_pool(size, "meta")
    x = torch.zeros(s.batch, 4, s.latent, s.latent, device="meta")
    t = torch.zeros(s.batch, dtype=torch.long, device="meta")
    kwargs = cmp.unet_kwargs(cmp._batched(cond, slice(0, s.batch)))
    with torch.no_grad():
        forward = count_flops(lambda: unet(x, t, **kwargs))
    lora = name != "plain-full"
    adapters = lora_adapter_flops(unet, lambda: unet(x, t, **kwargs), DEFAULT_TARGETS["unet"], s.lora_rank) if lora else 0
    settings = IterationSettings(steps=(cmp.K,), lora=lora, checkpointing=lora and s.checkpointing,
                                 adapter_fraction=adapters / forward)
    phases = tdm_iteration_flops(forward, settings)
    base = tdm_iteration_flops(forward, IterationSettings(steps=(cmp.K,), lora=lora))
    passes = sum(v for k, v in base.items() if "fwd" in k) / forward
    return {"total": phases["total"], "forward": forward, "passes": passes, "adapter_fraction": settings.adapter_fraction}


class TensorPeak:
    """Peak tensor memory over the block, minus what was allocated before it. CUDA: the caching allocator's
    ``max_memory_allocated``; CPU: the running sum of torch.profiler's allocation and free events, its maximum
    (the profiler costs microseconds per operation, against the milliseconds of each at these sizes)."""

    def __init__(self, device: str):
        self.device, self.mb = device, float("nan")

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.empty_cache()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            from torch.profiler import ProfilerActivity, profile

            self.profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True).__enter__()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            self.mb = (torch.cuda.max_memory_allocated() - self.base) / 2**20
            return
        self.profiler.__exit__(*exc)
        self.mb = cmp.profiled_tensor_peak_mb(self.profiler)
        del self.profiler


def _warm_up(runner) -> tuple[list, int, float]:
    """The untimed iterations (one; two where the first compiles), the FLOPs of the last one, counted by
    ``count_flops`` (under a dispatch mode compiled code runs eagerly: the same arithmetic), and its network
    passes × batch (the fake update runs the student only on the samples drawn at the last stage)."""
    from tdm_fast.perf.flops import count_flops

    seconds = []
    for _ in range(untimed_iterations(runner.name) - 1):
        start = time.perf_counter()
        runner.step()
        seconds.append(time.perf_counter() - start)
    runner.reset_stats()
    start = time.perf_counter()
    flops = count_flops(runner.step)
    runner.finish()
    seconds.append(time.perf_counter() - start)
    passes = runner.passes.per_iteration()["network_passes_x_batch"]
    runner.reset_stats()
    return seconds, flops, passes


def untimed_iterations(config: str) -> int:
    return 2 if config == "all" else 1


@pytest.mark.parametrize("config", cmp.CONFIGS)
@pytest.mark.parametrize("size", SIZES)
def test_real_size_iteration(benchmark, size, config):
    skipped = not_run(size)
    if config in skipped:
        pytest.skip(f"{size} {config}: {skipped[config]}")
    if time.time() > DEADLINE:
        pytest.skip(f"{size} {config}: not started, past TDM_BENCH_REAL_DEADLINE")
    device = "cuda" if CUDA else "cpu"
    gc.collect()
    rss_before = cmp._rss_kb("VmRSS")
    times = []
    with TensorPeak(device) as tensor_peak:
        runner = cmp.Runner(config, size, device, profile=False)
        untimed, flops, flop_passes = _warm_up(runner)
        rss_reset = cmp._reset_peak_rss()

        def timed():
            start = time.perf_counter()
            runner.step()
            times.append(time.perf_counter() - start)

        benchmark.pedantic(timed, rounds=ITERATIONS, warmup_rounds=0, iterations=1)
        runner.finish()
        rss_peak = cmp._rss_kb("VmHWM")
    passes = runner.passes.per_iteration()
    model = modelled_flops(config, size)
    # the model at the passes this iteration drew: each pass more or less is one no-grad student forward
    modelled = model and model["total"] + (flop_passes - model["passes"]) * model["forward"] * (1 + model["adapter_fraction"])
    planned = planned_mb(config, size)
    benchmark.extra_info.update(cmp.size_info(size))
    benchmark.extra_info.update(
        config=config, label=cmp.LABELS[config], device=torch.cuda.get_device_name(0) if CUDA else "cpu",
        torch_threads=torch.get_num_threads(), ms_per_iteration=round(1e3 * statistics.median(times), 1),
        iterations_timed=len(times), untimed_iterations_s=[round(s, 2) for s in untimed],
        network_calls=round(passes["network_calls"], 2), network_passes_x_batch=round(passes["network_passes_x_batch"], 2),
        tensor_peak_memory_mb=round(tensor_peak.mb, 1), planned_memory_mb=round(planned, 1),
        tensor_peak_vs_plan=round(tensor_peak.mb / planned, 3),
        peak_rss_mb=round((rss_peak - rss_before) / 1024, 1) if not CUDA and rss_reset else None,
        flops_measured=flops, flops_iteration_passes_x_batch=round(flop_passes, 2),
        flops_modelled_expected=model and model["total"], flops_modelled=modelled,
        flops_measured_vs_model=round(flops / modelled, 3) if modelled else None,
        not_run=skipped, memory_budget_gib=round(memory_budget_gib(), 1),
        tensor_peak_method=("torch.cuda.max_memory_allocated" if CUDA else "torch.profiler CPU memory events, running sum")
        + " over the build, the untimed and the timed iterations")
    del runner
    gc.collect()


def summarize(benchmarks) -> str:
    """The real-size table per size, the rows that did not fit, and the all-options speed-up."""
    by_size: dict[str, list] = {}
    for b in benchmarks:
        if "flops_measured" in b["extra_info"]:  # a row interrupted after its timing has no record
            by_size.setdefault(b["extra_info"]["size"], []).append(b["extra_info"])
    lines = []
    for size, rows in by_size.items():
        info = rows[0]
        lines += [f"**Real size: one TDM iteration of `{size}`** (channels {info['block_out_channels']}, latent {info['latent']}, "
                  f"text {info['text_embeddings']}, batch {info['batch']}, K = {info['K']}, {info['dtype']}, LoRA rank "
                  f"{info['lora_rank']}" + (", LoRA roles with gradient checkpointing" if info.get("gradient_checkpointing") else "")
                  + f"; random weights) on {info['device']}, {info['torch_threads']} torch threads, one configuration at a time. "
                  f"Tensor peak: {info['tensor_peak_method']}; RSS: peak over the timed iterations minus the RSS before the build.",
                  "", "| configuration | ms / iteration | iterations timed | passes × batch / it | tensor peak (MB) | "
                  "`tdm-fast plan` (MB) | tensor peak / plan | peak RSS (MB) | FLOPs measured (GFLOP) | passes × batch of that "
                  "iteration | FLOPs modelled at those passes (GFLOP) | measured / model |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            modelled = f"{r['flops_modelled'] / 1e9:.5g}" if r.get("flops_modelled") else "— (model is tdm-fast's)"
            flop_passes = r.get("flops_iteration_passes_x_batch", "not recorded (model at its expected passes)")
            ratio = f"{r['flops_measured_vs_model']:.3f}" if r.get("flops_measured_vs_model") else "—"
            rss = f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") is not None else "—"
            lines.append(f"| {r['label']} | {r['ms_per_iteration']:.0f} | {r['iterations_timed']} | {r['network_passes_x_batch']:g} | "
                         f"{r['tensor_peak_memory_mb']:.0f} | {r['planned_memory_mb']:.0f} | {r['tensor_peak_vs_plan']:.2f} | {rss} | "
                         f"{r['flops_measured'] / 1e9:.5g} | {flop_passes} | {modelled} | {ratio} |")
        for name, why in rows[-1].get("not_run", {}).items():
            lines.append(f"| {cmp.LABELS[name]} | not run: {why} | | | | | | | | | | |")
        ms = {r["config"]: r["ms_per_iteration"] for r in rows}
        if "all" in ms and "official" in ms:
            verdict = (f"all options {ms['official'] / ms['all']:.2f}× the official-style loop's speed "
                       f"({info['dtype']}, {info['torch_threads']} threads)")
        else:
            verdict = "the all-options speed-up over the official-style loop is not measured at this size here: " + (
                "the official-style loop did not fit" if "official" not in ms else "the all-options row did not run")
        if "all" in ms and "plain-lora" in ms:
            verdict += f"; all options {ms['plain-lora'] / ms['all']:.2f}× plain LoRA roles"
        lines += ["", verdict[0].upper() + verdict[1:] + ".", ""]
    return "\n".join(lines)
