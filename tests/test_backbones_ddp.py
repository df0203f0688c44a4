"""Two CPU processes under `accelerate launch` run 3 LoRA iterations of the tiny SD1.5 preset.

accelerate 1.15 runs `--cpu --num_processes 2` as ONE process unless an mpirun hostfile is given;
two CPU ranks come from `--multi_gpu --num_processes 2` (torchrun) with ACCELERATE_USE_CPU=true and
no visible CUDA device (gloo backend, DistributedType.MULTI_CPU).
"""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import _backbone_tiny as tiny


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not installed")
def test_accelerate_launch_two_cpu_processes(tmp_path):
    model = tiny.build_sd15(tmp_path / "model")
    prompts = tiny.write_prompts(tmp_path / "prompts.txt")
    script = Path(__file__).with_name("backbone_ddp_script.py")
    env = dict(os.environ, ACCELERATE_USE_CPU="true", CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", "29517", str(script), str(model), str(prompts), str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = re.findall(r"RANK (\d)/2 steps=3 checksum=([-+0-9.e]+)", proc.stdout)
    assert sorted(r for r, _ in ranks) == ["0", "1"], proc.stdout[-2000:]
    assert ranks[0][1] == ranks[1][1]  # DDP kept the LoRA weights in sync
    assert (tmp_path / "out" / "student" / "model" / "lora.safetensors").is_file()
