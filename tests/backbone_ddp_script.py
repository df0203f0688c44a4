"""Launched by tests/test_backbones_ddp.py: `accelerate launch --multi_gpu --num_processes 2 this.py MODEL PROMPTS OUT` (ACCELERATE_USE_CPU=true).

Runs 3 LoRA TDM iterations of the tiny SD1.5 preset on every rank and prints the student's LoRA
checksum, which DDP keeps identical across ranks.
"""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))

import _backbone_tiny as tiny  # noqa: E402
from tdm_fast.backbones.run import build_preset_run  # noqa: E402
from tdm_fast.config import TDMConfig  # noqa: E402
from tdm_fast.trainer import TDMTrainer  # noqa: E402


def main():
    model, prompts, out = sys.argv[1:4]
    args = tiny.preset_args("sd15", model, prompts, embedding_cache="none")
    config = TDMConfig(steps=(4,), batch_size=2, iterations=3, cfg_scale=2.0, fake_lr=1e-2, kernels="reference", log_every=1)
    teacher, student, fake, conditions, shape = build_preset_run(args, config)
    trainer = TDMTrainer(teacher, config, conditions, shape, out, student, fake, progress=False)
    history = trainer.train()
    checksum = sum(float(p.detach().double().sum()) for p in trainer.student_core.parameters())
    print(f"RANK {trainer.accelerator.process_index}/{trainer.accelerator.num_processes} steps={len(history)} checksum={checksum:.10e}", flush=True)


if __name__ == "__main__":
    main()
