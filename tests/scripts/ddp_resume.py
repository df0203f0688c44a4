"""Run by tests/test_distributed.py under `accelerate launch` (data parallel, or FSDP with --use_fsdp):
TDM on 2 ranks with gradient accumulation,
resumed from the newest checkpoint in OUT when there is one. With KILL_AT, rank 1 SIGKILLs itself in
that iteration (before its checkpoint). At the end every rank writes its student, fake score, EMA and
optimizer moments (its own shards under FSDP), so the test can compare a killed-and-resumed run with an uninterrupted one."""
import os
import signal
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from tdm_fast import fsdp
from tdm_fast.checkpoint import checkpoint_dirs
from tdm_fast.config import TDMConfig
from tdm_fast.demos.toy2d import ToyMLP, toy_denoiser
from tdm_fast.trainer import ClassConditions, TDMTrainer

out, iterations, kill_at = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
teacher = toy_denoiser(ToyMLP(hidden=32, depth=1))
config = TDMConfig(steps=(1, 2), batch_size=8, iterations=iterations, fake_lr=1e-3, cfg_scale=3.0, kernels="reference",
                   warmup_steps=4, gradient_accumulation_steps=2, checkpoint_every=2, ema_decay=0.9, log_every=3)
trainer = TDMTrainer(teacher, config, ClassConditions(2), (2,), output_dir=out, progress=False)
saved = checkpoint_dirs(out / "checkpoints")
if saved:
    trainer.load_checkpoint(saved[-1])


def kill(t, record):
    if record["step"] == kill_at and t.accelerator.process_index == 1:
        os.kill(os.getpid(), signal.SIGKILL)


trainer.train(callback=kill if kill_at else None)
tensors = {f"student.{k}": v for k, v in trainer.student_core.state_dict().items()}
tensors.update({f"fake.{k}": v for k, v in trainer.fake_core.state_dict().items()})
tensors.update({f"ema.{i}": s for i, s in enumerate(trainer.ema.shadow)})
for name, opt in (("opt_g", trainer.opt_g), ("opt_f", trainer.opt_f)):
    for i, state in opt.state_dict()["state"].items():
        tensors.update({f"{name}.{i}.{k}": v for k, v in state.items()})
save_file({k: fsdp.local(v).contiguous() for k, v in tensors.items()}, out / f"rank{trainer.accelerator.process_index}.safetensors")
