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

Knobs (environment): ``TDM_BENCH_ROUNDS`` (default 8), ``TDM_BENCH_TTQ_ITERS`` (default 300).
"""
from __future__ import annotations

import os
import time

import pytest
import torch

from tdm_fast.perf.step_profiler import StepProfiler, make_trainer

ROUNDS = int(os.environ.get("TDM_BENCH_ROUNDS", "8"))
TTQ_ITERS = int(os.environ.get("TDM_BENCH_TTQ_ITERS", "300"))
EVAL_EVERY = 25
WARMUP = 3


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
    from tdm_fast.toy2d import NUM_CLASSES, train_toy_teacher

    cfg, k, samples = 3.0, 4, 2000
    teacher = train_toy_teacher(iterations=400, batch_size=512, hidden=128, progress=False)
    g = torch.Generator().manual_seed(1234)
    labels = torch.randint(0, NUM_CLASSES, (samples,), generator=g)
    noise = torch.randn(samples, 2, generator=g)
    reference = reference_sampler(100, cfg)(teacher, noise, labels)
    baseline = min(sliced_wasserstein(s(teacher, noise, labels), reference) for s in nfe_matched_baselines(k, cfg))
    curve = {"iteration": [], "wall_s": [], "swd": []}

    def run():
        # the toy demo's recipe (tdm_fast.demo_toy.toy_config): batch 256, fake lr 1e-3
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
