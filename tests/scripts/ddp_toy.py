"""Run by tests/test_distributed.py under `accelerate launch`: a few TDM iterations, then every rank
writes its student weights and its generator learning rate after each iteration, so the test can check
they are identical and that the warm-up counts iterations, not processes."""
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from tdm_fast.config import TDMConfig
from tdm_fast.demos.toy2d import ToyMLP, toy_denoiser
from tdm_fast.trainer import ClassConditions, TDMTrainer

out = Path(sys.argv[1])
torch.manual_seed(0)
teacher = toy_denoiser(ToyMLP(hidden=32, depth=1))
config = TDMConfig(steps=(1, 2), batch_size=8, iterations=3, fake_lr=1e-3, generator_lr_ratio=0.2, cfg_scale=3.0,
                   kernels="reference", warmup_steps=4, lr_decay="constant", gradient_accumulation_steps=2)
trainer = TDMTrainer(teacher, config, ClassConditions(2), (2,), output_dir=out, progress=False)
first_noise = torch.randn(4, generator=trainer.rng.clone_state())
lrs = []
trainer.train(callback=lambda t, record: lrs.append(t.opt_g.param_groups[0]["lr"]))
rank = trainer.accelerator.process_index
save_file(
    {**{k: v.contiguous() for k, v in trainer.student_core.state_dict().items()}, "first_noise": first_noise,
     "lrs": torch.tensor(lrs, dtype=torch.float64)},
    out / f"rank{rank}.safetensors",
    metadata={"world_size": str(trainer.accelerator.num_processes)},
)
