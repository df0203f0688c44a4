"""FSDP2 (issue 14): the shipped tiny SD1.5 pipeline distilled through `tdm-fast distill --preset sd15`, as LoRA
roles on one shared base and as a full fine-tune (with the Fisher objective), under `accelerate launch --use_fsdp --fsdp_version 2` on 2
CPU processes (gloo). The sharded run resumes exactly, writes a loadable student and pipeline, and trains
the same student as data parallel; what FSDP does not do is refused with the alternative named."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from tdm_fast import fsdp
from tdm_fast.checkpoint import CheckpointError, load_checkpoint, read_meta
from tdm_fast.demos import t2i

RUN = ["--resolution", "32", "--export-fused", "--batch-size", "2", "--kernels", "reference", "--steps", "1", "2", "4",
       "--checkpoint-every", "2", "--ema-decay", "0.9", "--gradient-accumulation-steps", "2", "--quiet"]
VALIDATION = ["--validation-every", "2"]  # the straight run's; validation draws from its own generator
FOLDED = "time_embedding.linear_2.bias"  # a fused pipeline runs one K: its embedding is folded into this bias


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distill(out, prompts, *flags, fsdp_on: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           *(["--use_fsdp", "--fsdp_version", "2"] if fsdp_on else ["--multi_gpu"]), "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_port()),
           "-m", "tdm_fast", "distill", "--preset", "sd15", "--model", str(t2i.shipped_pipeline("sd15")),
           "--prompts", str(prompts), "--embedding-cache", str(out.parent / "cache"), "--out", str(out), *RUN, *map(str, flags)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def _student(out) -> dict:
    return {**load_file(out / "student" / "denoiser.safetensors"),
            **{f"model.{k}": v for f in (out / "student" / "model").rglob("*.safetensors") for k, v in load_file(f).items()}}


def _fused_unet(out) -> dict:
    return load_file(out / "fused" / "unet" / "diffusion_pytorch_model.safetensors")


def _rank_tensors(step, rank: int) -> dict:
    """Every tensor of a rank's checkpoint file by its path in the saved state."""
    _, rank_state = load_checkpoint(step, rank_file=f"rank-{rank}")
    flat = {}

    def walk(value, path):
        if torch.is_tensor(value):
            flat[path] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{path}.{k}")

    walk(rank_state, "")
    return flat


@pytest.fixture(scope="module", params=["lora-roles", "full-finetune"])
def runs(tmp_path_factory, request):
    root = tmp_path_factory.mktemp(request.param)
    prompts = t2i.write_prompt_file(root / "prompts.txt")
    # the full fine-tune also runs the Fisher objective: its generator loss backpropagates through the
    # sharded teacher and fake score
    layout = ["--full-finetune", "--objective", "fisher"] if request.param == "full-finetune" else []
    for name, flags, fsdp_on in (("straight", ["--iterations", 4, *VALIDATION], True), ("ddp", ["--iterations", 4], False)):
        result = _distill(root / name, prompts, *layout, *flags, fsdp_on=fsdp_on)
        assert result.returncode == 0, result.stderr[-3000:]
    # "cut": the straight run as a kill after its step-2 checkpoint leaves it (the launch that would stop there
    # writes the same files), resumed to step 4
    cut = shutil.copytree(root / "straight", root / "cut")
    for written_after_step_2 in ("checkpoints/step-00000004", "student", "fused"):
        shutil.rmtree(cut / written_after_step_2)
    result = _distill(cut, prompts, *layout, "--iterations", 4, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def test_sharded_checkpoints_hold_each_process_its_own_shards(runs):
    step = runs / "straight" / "checkpoints" / "step-00000004"
    # the group files hold no tensors under FSDP, only the digest of state.json
    assert sorted(p.name for p in step.iterdir()) == ["meta.safetensors", "optimizers.safetensors", "rank-0.safetensors",
                                                      "rank-1.safetensors", "state.json"]
    first, second = (_rank_tensors(step, r) for r in (0, 1))
    weights = [k for k in first if k.startswith(".shards.student.")]
    moments = [k for k in first if k.startswith(".shards.optimizers.generator.state.") and k.endswith("exp_avg")]
    assert weights and moments and any(".shards.ema." in k for k in first)
    # every rank holds its own part of each sharded weight (a role's steps embedding stays replicated)
    sharded = [k for k in weights if "steps_embedding" not in k]
    assert sharded and all(not torch.equal(first[k], second[k]) for k in sharded if first[k].numel() > 1)


def test_an_edited_state_json_of_a_sharded_checkpoint_is_refused(runs, tmp_path):
    copy = shutil.copytree(runs / "straight" / "checkpoints" / "step-00000004", tmp_path / "step-00000004")
    state = json.loads((copy / "state.json").read_text())
    state["meta"]["__dict__"]["step"] = 2
    (copy / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="does not match the tensors written with it"):
        read_meta(copy)


def test_validation_samples_the_sharded_student(runs):
    assert sorted(p.name for p in (runs / "straight" / "validation").iterdir()) == ["gap.json", "step-00000002.png", "step-00000004.png"]


def test_a_sharded_run_resumes_exactly(runs):
    straight, resumed = _student(runs / "straight"), _student(runs / "cut")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    for rank in (0, 1):
        a = _rank_tensors(runs / "straight" / "checkpoints" / "step-00000004", rank)
        b = _rank_tensors(runs / "cut" / "checkpoints" / "step-00000004", rank)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)  # weights, EMA, optimizer moments, RNG streams


def test_fsdp_trains_the_student_data_parallel_trains(runs):
    for read in (_student, _fused_unet):
        sharded, replicated = read(runs / "straight"), read(runs / "ddp")
        assert sharded.keys() == replicated.keys()
        for k in sharded:
            torch.testing.assert_close(sharded[k], replicated[k], rtol=1e-4, atol=1e-5)


def test_the_gathered_student_loads_into_the_stock_pipeline(runs):
    import tdm_fast.scheduler  # noqa: F401 (diffusers loads model_index.json's TDMScheduler only from an imported module)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(runs / "straight" / "fused")
    assert type(pipe.scheduler).__name__ == "TDMScheduler"
    fused = _fused_unet(runs / "straight")
    assert all(torch.equal(v, fused[k]) for k, v in pipe.unet.state_dict().items())
    if (runs / "straight" / "lora").is_dir():  # LoRA roles: the LoRA in the stock pipeline gives the fused UNet
        base = StableDiffusionPipeline.from_pretrained(t2i.shipped_pipeline("sd15"))
        before = {k: v.clone() for k, v in base.unet.state_dict().items()}
        base.load_lora_weights(runs / "straight" / "lora")
        base.fuse_lora()
        base.unload_lora_weights()
        after = base.unet.state_dict()
        moved = [k for k in after if not torch.equal(after[k], before[k])]
        assert moved and all(torch.allclose(after[k], fused[k], atol=1e-5) for k in moved)
    else:  # full fine-tune: the fused UNet is the student's
        student = _student(runs / "straight")
        assert [k for k in fused if not torch.equal(fused[k], student[f"model.{k}"])] == [FOLDED]


@pytest.mark.parametrize("version, precision, message", [
    (1, "no", "FSDP1 is not supported.*--fsdp_version 2"),
    (2, "fp16", "fp16.*--mixed-precision bf16"),
])
def test_what_fsdp_does_not_do_is_refused_with_the_alternative(version, precision, message):
    with pytest.raises(ValueError, match=message):
        fsdp.check_supported(SimpleNamespace(fsdp_version=version), SimpleNamespace(mixed_precision=precision))
