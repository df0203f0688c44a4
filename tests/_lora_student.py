"""A steps-aware LoRA student of a shipped tiny pipeline as ``tdm-fast distill --preset`` leaves it (``lora/``,
``student/``), with random LoRA and K-embedding weights so that both visibly change the images."""
from __future__ import annotations

import torch

from tdm_fast.demos import t2i, t2i_demo


def random_lora_run(kind: str, root, steps=(1, 2, 4)):
    """(pipeline folder, run folder ``root``) of a random-weight steps-aware LoRA student of ``kind``."""
    from tdm_fast.backbones.run import build_preset_run, export_preset_student
    from tdm_fast.config import TDMConfig

    model = t2i.shipped_pipeline(kind)
    args = t2i_demo.preset_run(kind, model, t2i.write_prompt_file(root / "prompts.txt"), root / "cache", rank=4)
    config = TDMConfig(steps=tuple(steps), steps_conditioning=True)
    _, student, _, _, _ = build_preset_run(args, config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in student.model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
        student.steps_embedding.embedding.weight.copy_(0.3 * torch.randn(student.steps_embedding.embedding.weight.shape, generator=g))
    export_preset_student(args, student, config, root)
    student.save_pretrained(root / "student")
    return model, root
