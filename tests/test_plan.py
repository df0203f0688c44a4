"""tdm-fast plan: parameter counts of the real published configs, built on the meta device."""
import argparse

import pytest

from tdm_fast.backbones.cli import add_plan_arguments, run_plan


@pytest.mark.parametrize("preset,expected", [("sd15", 859.5e6), ("sdxl", 2567.5e6), ("pixart", 611.3e6)])
def test_plan_parameter_counts(preset, expected, capsys):
    parser = argparse.ArgumentParser()
    add_plan_arguments(parser)
    plan = run_plan(parser.parse_args(["--preset", preset, "--batch", "2", "--no-activations", "--gpu-memory", "24"]))
    assert abs(plan["parameters"] - expected) / expected < 0.002
    out = capsys.readouterr().out
    assert f"{plan['parameters'] / 1e6:,.1f} M" in out and "fits in 24 GiB" in out
    assert 0 < plan["lora_parameters"] < plan["parameters"] / 20


def test_network_bytes_savers():
    from tdm_fast.perf.plan import network_bytes

    plan = {"parameters": 10**9, "lora_parameters": 10**7, "activations": {"none": 8 * 2**30, "checkpointing": 2**30}}
    full = network_bytes(plan, lora=False, checkpointing=False, mixed_precision=False, adam8bit=False)
    lean = network_bytes(plan, lora=True, checkpointing=True, mixed_precision=True, adam8bit=True)
    assert full["networks"]["student"]["optimizer"] == 8 * 10**9
    assert lean["total"] < full["total"] / 5
