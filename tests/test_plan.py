"""tdm-fast plan: parameter counts of the real published configs, built on the meta device; the peak
rule and the activations it counts."""
import argparse

import pytest

from tdm_fast.cli.distill import add_plan_arguments, run_plan


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


def test_peak_holds_one_update_at_a_time():
    from tdm_fast.perf.plan import network_bytes

    plan = {"parameters": 1000, "lora_parameters": 10, "activations": {"none": 5000, "checkpointing": 500}}
    full = network_bytes(plan, lora=False, checkpointing=False, mixed_precision=False, adam8bit=False, overhead_gib=0)
    # teacher, student and fake weights + two AdamW states + one network's gradients and activations
    assert full["total"] == 3 * 4000 + 2 * 8000 + 4000 + 5000


def test_saved_activations_on_meta_equal_the_real_forward():
    """The plan counts on meta tensors what a real CPU forward saves: attention as the fused kernel (the
    meta device's math path would save the attention probabilities), each storage once, no weights."""
    import torch
    from diffusers import UNet2DConditionModel

    from tdm_fast.perf.plan import _counting, saved_activation_bytes

    config = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                  norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4)
    counted = {}
    for device in ("meta", "cpu"):
        with torch.device(device):
            unet = UNet2DConditionModel(**config)
            x, t, text = torch.zeros(3, 4, 16, 16), torch.zeros(3, dtype=torch.long), torch.zeros(3, 7, 32)
        counted[device] = saved_activation_bytes(unet, lambda: unet(x, t, encoder_hidden_states=text))
    assert counted["meta"] == counted["cpu"] > 0
    # left to the meta device's math path, the attention probabilities would be counted as well
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
        x, t, text = torch.zeros(3, 4, 16, 16), torch.zeros(3, dtype=torch.long), torch.zeros(3, 7, 32)
    with _counting(unet) as math_path:
        unet(x, t, encoder_hidden_states=text)
    probabilities = 3 * 256 * 256 * 4  # the 16 x 16 latent's self-attention, one head's worth at least
    assert math_path.bytes >= counted["meta"] + probabilities


def test_readme_plan_table_is_what_the_model_prints():
    """The README's memory table per configuration is reproducible: ``python -m tdm_fast.perf.plan``."""
    from pathlib import Path

    from tdm_fast.perf.plan import plan_table

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert plan_table() in readme
