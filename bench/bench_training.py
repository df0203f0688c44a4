"""Training benchmarks: per-iteration breakdown of a TDM step, and time-to-quality on the toy teacher.

    python -m pytest bench/bench_training.py --benchmark-json=out.json      # or: tdm-fast bench training

* ``test_step_breakdown[teacher-kernels]``: one benchmark round = one TDM iteration
  (``trainer.train_step``) under :class:`tdm_fast.perf.step_profiler.StepProfiler`; the per-category
  breakdown (ms per step), the share of time outside network passes, batch, device and threads
  go to ``extra_info``. Teachers: the built-in 2-D toy MLP and the digits UNet (8×8), each with
  the fused kernels (``tdm_fast.kernels``: Triton on CUDA, Inductor-compiled on CPU) and the
  pure-torch reference kernels. Three untimed warm-up steps absorb compilation.
* ``test_step_breakdown_fisher[teacher]``: the same with ``objective="fisher"`` (reference kernels:
  the Fisher loss is plain torch either way), so that its extra cost per iteration shows per
  category beside the KL rows — mostly the new "teacher+fake bwd to x_τ (fisher)" (docs/fisher.md).
* ``test_time_to_quality_toy``: trains a small toy teacher, distils a 4-step student and records
  the sliced Wasserstein distance to the teacher's 100-step CFG samples every ``EVAL_EVERY``
  iterations, against iterations and against training wall-clock (evaluation time excluded) —
  the paper's Fig. 2 at our scale.

* ``test_sd15_arch_iteration[size-config]``: issue 15's comparison (``bench/sd15_comparison.py``): one
  TDM iteration at K = 4 of an SD1.5-architecture UNet by the official-style loop
  (``bench/official_loop.py``), tdm-fast's plain path (full copies, and LoRA roles) and tdm-fast with
  every option. Interleaved: every round of a row first runs one iteration of each other configuration
  (pytest-benchmark's untimed ``setup``), so all rows are measured under the same load; each row's
  ``ms_per_iteration`` is the median over every iteration of that configuration so far (its own rounds and
  the other rows' set-ups), and ``speedup_vs_official_style`` / ``peak_memory_vs_official_style`` divide
  the official row's figures by its own. Also per row: the breakdown, network calls and passes × batch
  per iteration, peak memory and how it was measured, and the memory plan check: the tensor peak
  (allocations only) against ``tdm-fast plan``'s accounting of the same UNet (``planned_memory_mb``,
  ``tensor_peak_vs_plan``). The last row holds ``final_comparison``, every
  configuration over all iterations, which ``summarize`` renders into RESULTS.md. Sizes:
  ``TDM_BENCH_COMPARISON_SIZES`` (default ``scaled``; ``sd15,sdxl`` on a GPU: bench/gpu_training.sh).

Knobs (environment): ``TDM_BENCH_ROUNDS`` (default 8), ``TDM_BENCH_TTQ_ITERS`` (default 300),
``TDM_BENCH_COMPARISON_ROUNDS`` (default 4), ``TDM_BENCH_COMPARISON_SIZES``.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

from tdm_fast.perf.step_profiler import StepProfiler, make_trainer

ROUNDS = int(os.environ.get("TDM_BENCH_ROUNDS", "8"))
TTQ_ITERS = int(os.environ.get("TDM_BENCH_TTQ_ITERS", "300"))
EVAL_EVERY = 25
WARMUP = 3
COMPARISON_ROUNDS = int(os.environ.get("TDM_BENCH_COMPARISON_ROUNDS", "4"))
COMPARISON_SIZES = [s for s in os.environ.get("TDM_BENCH_COMPARISON_SIZES", "scaled").split(",") if s]
COMPARISON_WARMUP = 2
sys.path.insert(0, str(Path(__file__).resolve().parent))
import sd15_comparison as cmp  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_accelerator(request):
    """conftest's reset of accelerate's process-wide state, except between the comparison rows: their
    trainers live for the whole module (all with the same settings)."""
    yield
    if "sd15_arch" in request.node.name:
        return
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _env_info(trainer) -> dict:
    d = trainer.device
    return {"device": torch.cuda.get_device_name(d) if d.type == "cuda" else "cpu", "torch_threads": torch.get_num_threads(),
            "batch": trainer.config.batch_size, "K": list(trainer.config.steps), "kernels": trainer.config.kernels}


@pytest.mark.parametrize("kernels", ["fused", "reference"])
@pytest.mark.parametrize("teacher", ["toy", "digits"])
def test_step_breakdown(benchmark, teacher, kernels):
    _breakdown(benchmark, teacher, kernels, "kl")


@pytest.mark.parametrize("teacher", ["toy", "digits"])
def test_step_breakdown_fisher(benchmark, teacher):
    _breakdown(benchmark, teacher, "reference", "fisher")


def _breakdown(benchmark, teacher, kernels, objective):
    trainer = make_trainer(teacher, kernels, objective=objective)
    for _ in range(WARMUP):
        trainer.train_step()
    with StepProfiler(trainer) as profiler:
        benchmark.pedantic(profiler.step, rounds=ROUNDS, warmup_rounds=0, iterations=1)
        summary = profiler.summary()
    benchmark.extra_info.update(_env_info(trainer))
    benchmark.extra_info.update(
        teacher=teacher,
        objective=objective,
        step_ms=round(summary["step_ms"], 3),
        network_ms=round(summary["network_ms"], 3),
        outside_network_pct=round(100 * summary["outside_network_share"], 2),
        breakdown_ms={k: round(v, 4) for k, v in summary["breakdown_ms"].items()},
    )


def test_time_to_quality_toy(benchmark):
    from tdm_fast.eval.toy2d import sliced_wasserstein
    from tdm_fast.sampling import nfe_matched_baselines, reference_sampler, sample_student
    from tdm_fast.demos.toy2d import NUM_CLASSES, train_toy_teacher

    cfg, k, samples = 3.0, 4, 2000
    teacher = train_toy_teacher(iterations=400, batch_size=512, hidden=128, progress=False)
    g = torch.Generator().manual_seed(1234)
    labels = torch.randint(0, NUM_CLASSES, (samples,), generator=g)
    noise = torch.randn(samples, 2, generator=g)
    reference = reference_sampler(100, cfg)(teacher, noise, labels)
    baseline = min(sliced_wasserstein(s(teacher, noise, labels), reference) for s in nfe_matched_baselines(k, cfg))
    curve = {"iteration": [], "wall_s": [], "swd": []}

    def run():
        # the toy demo's recipe (tdm_fast.demos.demo_toy.toy_config): batch 256, fake lr 1e-3
        trainer = make_trainer("toy", "reference", batch=256, steps=(k,), teacher_model=teacher, fake_lr=1e-3,
                               iterations=TTQ_ITERS)
        eval_seconds = [0.0]
        start = time.perf_counter()

        def evaluate(tr, record=None):
            t0 = time.perf_counter()
            x = sample_student(tr.student_core.eval(), noise, labels, k)
            tr.student_core.train()
            curve["iteration"].append(tr.step)
            curve["wall_s"].append(round(t0 - start - eval_seconds[0], 4))
            curve["swd"].append(round(sliced_wasserstein(x, reference), 5))
            eval_seconds[0] += time.perf_counter() - t0

        evaluate(trainer)
        trainer.train(callback=lambda tr, rec: evaluate(tr) if tr.step % EVAL_EVERY == 0 else None)

    benchmark.pedantic(run, rounds=1, warmup_rounds=0, iterations=1)
    benchmark.extra_info.update(
        teacher="toy (hidden 128, 400 iterations)", K=k, batch=256, kernels="reference", cfg_scale=cfg,
        final_swd=curve["swd"][-1], best_nfe_matched_baseline_swd=round(baseline, 5),
        swd_vs_iteration={"iteration": curve["iteration"], "swd": curve["swd"]},
        swd_vs_wall_s={"wall_s": curve["wall_s"], "swd": curve["swd"]},
    )


# -- issue 15: the whole iteration against an official-style loop ------------------------------------
_COMPARISON: dict[str, dict] = {}


def _interleaved(size: str) -> bool:
    """The CPU size keeps all four configurations in memory and interleaves them; the full GPU sizes do
    not fit four times (SDXL's official-style loop alone holds ~95 GB of weights, gradients and AdamW
    state), so there each row builds, measures and frees its own (a GPU is not shared with other jobs)."""
    return size == "scaled"


def _comparison(size: str) -> dict:
    """The state shared by the rows of one size: runners, peak memory, every timed iteration."""
    if size not in _COMPARISON:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        state = {"device": device, "runners": {}, "memory": {}, "times": {name: [] for name in cmp.CONFIGS}}
        if _interleaved(size):
            state["memory"] = {name: _memory(name, size, device) for name in cmp.CONFIGS}
            state["runners"] = {name: _warm(cmp.Runner(name, size, device)) for name in cmp.CONFIGS}
        _COMPARISON[size] = state
    return _COMPARISON[size]


def _warm(runner):
    for _ in range(COMPARISON_WARMUP):
        runner.step()
    runner.finish()
    runner.reset_stats()
    return runner


def _runner(state, size: str, name: str):
    """The row's runner; in the non-interleaved mode the previous row's is freed first and the peak of
    this one (build, warm-up and timed rounds) is read after its rounds (``_finish_memory``)."""
    if name not in state["runners"]:
        import gc

        state["runners"].clear()
        gc.collect()
        if state["device"] == "cuda":
            torch.cuda.empty_cache()
            state["base"] = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        state["runners"][name] = _warm(cmp.Runner(name, size, state["device"]))
    return state["runners"][name]


def _finish_memory(state, size: str, name: str) -> None:
    if name in state["memory"]:
        return
    if state["device"] != "cuda":
        state["memory"][name] = _memory(name, size, state["device"])
    else:
        peak = (torch.cuda.max_memory_allocated() - state["base"]) / 2**20
        state["memory"][name] = {"peak_memory_mb": peak, "tensor_peak_memory_mb": peak,
                                 "planned_memory_mb": cmp.planned_memory_mb(name, size),
                                 "peak_memory_method": "torch.cuda.max_memory_allocated over build, warm-up and "
                                                       "timed iterations, minus the allocation before the build"}


def _memory(name: str, size: str, device: str) -> dict:
    """Peak memory (bench/sd15_comparison.py: RSS in a fresh process on a CPU), the tensor peak and the plan."""
    memory = cmp.measure_peak_memory(name, size, device)
    if device == "cuda":
        memory["tensor_peak_memory_mb"] = memory["peak_memory_mb"]
    else:
        memory.update(cmp.measure_tensor_peak(name, size))
    return {**memory, "planned_memory_mb": cmp.planned_memory_mb(name, size)}


def _timed(state, name):
    runner = state["runners"][name]

    def run():
        start = time.perf_counter()
        runner.step()
        state["times"][name].append(time.perf_counter() - start)

    return run


def _plan_check(memory: dict) -> dict:
    """``tdm-fast plan``'s estimate beside the measured tensor memory (allocations only: no runtime,
    no compiled code, no allocator slack; what the plan accounts for)."""
    tensors, planned = memory.get("tensor_peak_memory_mb", float("nan")), memory.get("planned_memory_mb", float("nan"))
    return {"tensor_peak_memory_mb": round(tensors, 1), "planned_memory_mb": round(planned, 1),
            "tensor_peak_vs_plan": round(tensors / planned, 3)}


def _row(state, name) -> dict:
    times, memory = state["times"], state["memory"]
    ms = 1e3 * statistics.median(times[name])
    official_ms = 1e3 * statistics.median(times["official"]) if times["official"] else float("nan")
    peak = memory.get(name, {}).get("peak_memory_mb", float("nan"))
    row = {"ms_per_iteration": round(ms, 2), "iterations_timed": len(times[name]),
           "speedup_vs_official_style": round(official_ms / ms, 3), "peak_memory_mb": round(peak, 1),
           "peak_memory_first_iteration_mb": round(memory.get(name, {}).get("peak_memory_first_iteration_mb", float("nan")), 1),
           "peak_memory_vs_official_style": round(peak / memory.get("official", {}).get("peak_memory_mb", float("nan")), 3),
           **_plan_check(memory.get(name, {})),
           **state["passes"][name]}
    for plain in ("plain-full", "plain-lora"):
        if times[plain]:
            row[f"speedup_vs_{plain}"] = round(1e3 * statistics.median(times[plain]) / ms, 3)
    return row


@pytest.mark.parametrize("config", cmp.CONFIGS)
@pytest.mark.parametrize("size", COMPARISON_SIZES)
def test_sd15_arch_iteration(benchmark, size, config):
    state = _comparison(size)
    runner = _runner(state, size, config)
    others = [_timed(state, name) for name in state["runners"] if name != config]

    def setup():
        for run in others:
            run()

    benchmark.pedantic(_timed(state, config), setup=setup, rounds=COMPARISON_ROUNDS, warmup_rounds=0, iterations=1)
    _finish_memory(state, size, config)
    state.setdefault("passes", {})
    for name, r in state["runners"].items():
        r.finish()
        state["passes"][name] = {k: round(v, 2) for k, v in r.passes.per_iteration().items()}
    benchmark.extra_info.update(cmp.size_info(size))
    benchmark.extra_info.update(
        config=config, label=cmp.LABELS[config], device=str(runner.device), torch_threads=torch.get_num_threads(),
        interleaved=_interleaved(size), peak_memory_method=state["memory"][config]["peak_memory_method"],
        **_row(state, config),
        breakdown_ms=runner.breakdown_ms())
    if config == cmp.CONFIGS[-1]:
        benchmark.extra_info["final_comparison"] = {name: _row(state, name) for name in cmp.CONFIGS if state["times"][name]}


def _ratio(final: dict, name: str, base: str, key: str) -> float:
    return final.get(name, {}).get(key, float("nan")) / final.get(base, {}).get(key, float("nan"))


def summarize(benchmarks) -> str:
    """The comparison table and the acceptance lines of issue 15, per size (from the last row's
    ``final_comparison``)."""
    lines = []
    for b in benchmarks:
        final = b.get("extra_info", {}).get("final_comparison")
        if not final:
            continue
        info = b["extra_info"]
        lines += [f"**Whole TDM iteration, SD1.5-architecture UNet ({info['size']}: channels {info['block_out_channels']}, "
                  f"latent {info['latent']}, batch {info['batch']}, K = {info['K']}, {info['dtype']}, LoRA rank "
                  f"{info['lora_rank']}), {'interleaved runs' if info.get('interleaved') else 'one configuration at a time'} "
                  f"on {info['device']}.** Peak memory: {info['peak_memory_method']}.", "",
                  "| configuration | ms / iteration | × vs official-style | × vs plain (full) | × vs plain (LoRA) | "
                  "peak memory (MB) | memory vs official-style | tensor peak (MB) | `tdm-fast plan` (MB) | tensor peak / plan | "
                  "network calls / it | passes × batch / it |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, row in final.items():
            lines.append(f"| {cmp.LABELS.get(name, name)} | {row['ms_per_iteration']:.0f} | {row['speedup_vs_official_style']:.2f} | "
                         f"{row.get('speedup_vs_plain-full', float('nan')):.2f} | {row.get('speedup_vs_plain-lora', float('nan')):.2f} | "
                         f"{row['peak_memory_mb']:.0f} | {row['peak_memory_vs_official_style']:.2f} | "
                         f"{row.get('tensor_peak_memory_mb', float('nan')):.0f} | {row.get('planned_memory_mb', float('nan')):.0f} | "
                         f"{row.get('tensor_peak_vs_plan', float('nan')):.2f} | "
                         f"{row['network_calls']:g} | {row['network_passes_x_batch']:g} |")
        best = final.get("all")
        if best is None:
            lines += ["", "The all-options row did not run.", ""]
            continue
        nan = float("nan")
        lines += ["", "Acceptance (issue 15): all options vs official-style "
                  f"{best['speedup_vs_official_style']:.2f}× (goal ≥ 1.3×), vs plain {best.get('speedup_vs_plain-full', nan):.2f}× "
                  f"(full copies) / {best.get('speedup_vs_plain-lora', nan):.2f}× (LoRA roles) (goal ≥ 1.15×); peak memory with "
                  f"LoRA roles {final.get('plain-lora', {}).get('peak_memory_vs_official_style', nan):.2f}× the official-style "
                  f"loop's (goal ≤ 0.5×), {best['peak_memory_vs_official_style']:.2f}× with every option (compilation keeps its "
                  "graphs and code; on a CPU they are host memory like the tensors).",
                  "", "Memory plan check: `tdm-fast plan`'s accounting (every weight and AdamW state, one update's "
                  "gradients and saved activations; tdm_fast/perf/plan.py) for this UNet against the measured tensor "
                  "peak (allocations only: " + ("torch.cuda.max_memory_allocated" if info["device"].startswith("cuda") else
                  "torch.profiler's CPU memory events over build and iterations, in a fresh process") + "): "
                  + ", ".join(f"{name} {row['tensor_peak_vs_plan']:.2f}×" for name, row in final.items()
                              if "tensor_peak_vs_plan" in row) + " of the plan. Tensor peak with LoRA roles "
                  f"{_ratio(final, 'plain-lora', 'official', 'tensor_peak_memory_mb'):.2f}× the official-style loop's, "
                  f"{_ratio(final, 'all', 'official', 'tensor_peak_memory_mb'):.2f}× with every option.", ""]
    return "\n".join(lines)
