"""FLOP model: the counter against hand counts, the TDM composition, and `tdm-fast bench plan`."""
import argparse

import pytest
import torch

from tdm_fast.perf.flops import (IterationSettings, count_flops, device_peak, gpu_key, projected_gpu_hours,
                            tdm_iteration_flops)


def test_counter_matches_hand_count_linear_and_conv():
    m, k, n = 8, 32, 16
    linear = torch.nn.Linear(k, n)
    assert count_flops(linear, torch.randn(m, k)) == 2 * m * n * k
    conv = torch.nn.Conv2d(3, 4, kernel_size=3, padding=1)
    x = torch.randn(2, 3, 5, 5)
    # per output element: 3 x 3 x 3 multiply-adds; outputs: 2 x 4 x 5 x 5
    assert count_flops(conv, x) == 2 * (2 * 4 * 5 * 5) * (3 * 3 * 3)


def _tensor_peak_bytes(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"):
        live += nbytes
        peak = max(peak, live)
    return peak


def test_counting_a_checkpointed_iteration_takes_no_memory_of_its_own():
    """The real-size row counts the FLOPs of a whole iteration of SDXL's UNet with gradient checkpointing:
    the count must be torch's FlopCounterMode's, without the memory its per-module gradient hooks keep
    (at SDXL's size that was what got the row killed)."""
    from torch.utils.checkpoint import checkpoint
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
                                 for _ in range(6))
    x = torch.randn(512, 64)

    def iteration():
        h = x
        for block in blocks:
            h = h + checkpoint(block, h, use_reentrant=False)
        h.square().mean().backward()

    iteration()
    with FlopCounterMode(display=False) as reference:
        iteration()
    assert count_flops(iteration) == reference.get_total_flops() > 0
    assert _tensor_peak_bytes(lambda: count_flops(iteration)) <= _tensor_peak_bytes(iteration)


def test_counter_works_on_meta_and_backward_is_twice_forward():
    with torch.device("meta"):
        linear = torch.nn.Linear(64, 32)
        x = torch.zeros(16, 64, requires_grad=True)
    fwd = count_flops(linear, x)
    total = count_flops(lambda: linear(x).sum().backward())
    assert fwd == 2 * 16 * 32 * 64 and total == 3 * fwd  # input grad + weight grad = 2 x forward
    linear.requires_grad_(False)  # LoRA-like frozen weight: input grad only
    assert count_flops(lambda: linear(x).sum().backward()) == 2 * fwd


def test_tdm_iteration_composition():
    full = tdm_iteration_flops(1.0, IterationSettings(steps=(4,)))
    # rollout 3 + fake update (1/4 + 1 + 2: the student runs on the last stage's draws only) + generator (1 + 2 + 2 + 1)
    assert full["total"] == pytest.approx(12.25)
    lora = tdm_iteration_flops(1.0, IterationSettings(steps=(4,), lora=True))
    assert lora["total"] == pytest.approx(10.25)
    unify = tdm_iteration_flops(1.0, IterationSettings(steps=(1, 2, 4), fake_updates=2, checkpointing=True))
    assert unify["rollout: student fwd (no grad) x (K-1)"] == pytest.approx(4 / 3)
    assert unify["fake update: fake bwd"] == pytest.approx(2 * 3.0)
    assert unify["fake update: student fwd (no grad), last-stage draws (1/K)"] == pytest.approx(2 * (1 + 1 / 2 + 1 / 4) / 3)


def test_lora_adapter_flops_equal_what_peft_adapters_add():
    """The adapters' count from the targeted layers' outputs, against FlopCounterMode on the same network with
    peft's adapters attached (linears, a 3x3 convolution with stride, a grouped one left untargeted)."""
    from peft import LoraConfig, inject_adapter_in_model

    from tdm_fast.perf.flops import lora_adapter_flops

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.depthwise = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.proj_in = torch.nn.Linear(8, 12)
            self.to_q = torch.nn.Linear(12, 12)

        def forward(self, x):
            h = self.depthwise(self.conv1(x)).flatten(2).transpose(1, 2)
            return self.to_q(self.proj_in(h))

    torch.manual_seed(0)
    net, x, rank, targets = Net(), torch.randn(2, 3, 9, 9), 4, ("conv1", "proj_in", "to_q")
    base = count_flops(net, x)
    counted = lora_adapter_flops(net, lambda: net(x), targets, rank)
    inject_adapter_in_model(LoraConfig(r=rank, target_modules=list(targets)), net)
    assert counted > 0 and count_flops(net, x) - base == counted


def test_lora_iterations_count_the_adapters_on_the_student_and_fake_passes_only():
    plain = tdm_iteration_flops(1.0, IterationSettings(steps=(4,), lora=True))
    adapted = tdm_iteration_flops(1.0, IterationSettings(steps=(4,), lora=True, adapter_fraction=0.1))
    assert adapted["generator: teacher fwd (cond+uncond, 2B)"] == plain["generator: teacher fwd (cond+uncond, 2B)"]
    assert adapted["generator: student fwd"] == pytest.approx(1.1)
    assert adapted["generator: student bwd"] == pytest.approx(1.2)  # input grads + the adapters' input and weight grads
    # 3 + 0.25 rollout/fake-student forwards, fake fwd, generator student fwd, fake fwd (no grad): 6.25 adapted forwards
    assert adapted["total"] - plain["total"] == pytest.approx(0.1 * 6.25 + 2 * 0.2)
    full = tdm_iteration_flops(1.0, IterationSettings(steps=(4,), adapter_fraction=0.1))
    assert full["total"] == pytest.approx(12.25)  # no LoRA, no adapters


def test_peaks_and_hours():
    assert gpu_key("NVIDIA H100 80GB HBM3") == "h100" and gpu_key("NVIDIA A800-SXM4-80GB") == "a800"
    assert device_peak("a800") == 312e12
    assert projected_gpu_hours(312e12 * 3600, 1, 312e12, 0.5) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        device_peak("abacus")


def test_bench_plan_sdxl_prints_flops_and_paper_figure(capsys):
    from tdm_fast.cli.tools import cmd_bench
    from tdm_fast.perf.bench_report import add_bench_arguments

    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    args = parser.parse_args("plan --preset sdxl --steps 4 --batch 16 --iters 2000 --gpu a800".split())
    assert cmd_bench(args) == 0
    out = capsys.readouterr().out
    assert "FLOPs per iteration" in out and "PFLOP" in out
    assert "2 A800-days" in out and "160 A100-days" in out and "32 A100-days" in out
    assert "GPU-hours" in out and "a800" in out
    # SDXL UNet at 1024²: ~6.7 TFLOP per sample forward (published estimates: 6.6–6.8)
    fwd = [line for line in out.splitlines() if line.startswith("one network forward")][0]
    per_sample = float(fwd.split("(")[-1].split(" TFLOP")[0])
    assert 6.0 < per_sample < 7.5


def test_projection_says_which_inputs_are_measured_and_which_assumed():
    from tdm_fast.perf.flops import UTILISATION_SOURCE, plan_flops, projection_inputs

    plan = plan_flops("sd15", steps=(4,), batch=2, lora=True)
    measured = {"size": "sd15-real", "config": "plain-lora", "batch": 1, "dtype": "fp32", "device": "cpu",
                "flops_measured": 8.2e12, "flops_measured_vs_model": 0.98, "network_passes_x_batch": 8.0,
                "tensor_peak_vs_plan": 1.02}
    other_preset = {**measured, "size": "sdxl-real"}
    full_copies = {**measured, "config": "plain-full"}
    lines = projection_inputs(plan, [measured, other_preset, full_copies], UTILISATION_SOURCE)
    rows = [line for line in lines if line.lstrip().startswith("measured")]
    assert len(rows) == 1 and "sd15-real plain-lora" in rows[0] and "0.980x the model" in rows[0]
    assert any(line.lstrip().startswith("assumed") and "PaLM" in line for line in lines)
    lines = projection_inputs(plan, [], "given by --mfu")
    assert any("no real-size measurement of sd15" in line for line in lines)
    assert lines[-1].lstrip().startswith("given")
