"""A TDM LoRA applied unchanged to an unseen customised teacher (paper Table 2, at digits scale).

1. Distil the shipped digits teacher into a 4-step student whose only trainable weights are a LoRA
   (peft ``LoraConfig`` on the UNet's convolutions and embedding projections); the fake score is a
   full copy of the teacher.
2. Fine-tune the teacher on stroke-thickened digits (:func:`tdm_fast.demos.digits.finetune_variant`) —
   the "customised model" the LoRA never saw.
3. Inject the same LoRA weights into the variant and sample 4 steps; compare its FID to the
   variant's own 50-step CFG samples with the variant's best NFE-matched DDIM baseline.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

from safetensors.torch import save_file

from ..denoiser import Denoiser
from ..demos.digits import IMAGE_SIZE, NUM_CLASSES, finetune_variant, load_digits_teacher
from ..trainer import ClassConditions, TDMTrainer
from .digits import DigitsMetrics, evaluate_digits, shipped_reference_cache

LORA_TARGETS = ["conv1", "conv2", "emb", "downsample", "upsample", "conv_in", "conv_out"]


def lora_config(rank: int = 8):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS, lora_dropout=0.0, init_lora_weights=True)


def with_lora(denoiser: Denoiser, rank: int = 8) -> Denoiser:
    """A copy of ``denoiser`` whose network carries a fresh (zero-effect) LoRA; only the LoRA trains."""
    from peft import inject_adapter_in_model

    model = copy.deepcopy(denoiser.model)
    model.requires_grad_(False)
    model = inject_adapter_in_model(lora_config(rank), model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return Denoiser(model, denoiser.schedule, denoiser.prediction_type, denoiser.null_cond)


def lora_state(denoiser: Denoiser) -> dict:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(denoiser.model).items()}


def apply_lora(base: Denoiser, state: dict, rank: int = 8) -> Denoiser:
    """``base`` plus the LoRA weights ``state`` (trained on another base), unchanged."""
    from peft import set_peft_model_state_dict

    target = with_lora(base, rank)
    result = set_peft_model_state_dict(target.model, state)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"LoRA keys do not fit the base network: {result.unexpected_keys[:5]}")
    return target.eval().requires_grad_(False)


def run_lora_transfer(
    out_dir: str | Path = "runs/lora_transfer",
    iterations: int = 500,
    variant_iterations: int = 500,
    rank: int = 8,
    samples: int = 1000,
    seeds: tuple[int, ...] = (0,),
    fake_lr: float = 1e-3,
    lora_lr_ratio: float = 1.0,
    thickness: float = 0.5,
    progress: bool = True,
) -> dict:
    """Runs the three steps above; writes ``lora_transfer.json`` / ``.md`` and the LoRA weights."""
    from ..demos.demo_digits import early_stop_config
    from .digits import format_table

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    teacher = load_digits_teacher()
    # LoRA parameters tolerate (and need) a larger learning rate than full fine-tuning.
    config = early_stop_config(iterations, steps=(4,), steps_conditioning=False, fake_lr=fake_lr, generator_lr_ratio=lora_lr_ratio)
    student = with_lora(teacher, rank)
    fake = copy.deepcopy(teacher)
    fake.model.requires_grad_(True).train()
    trainer = TDMTrainer(teacher, config, ClassConditions(NUM_CLASSES), (1, IMAGE_SIZE, IMAGE_SIZE), student=student, fake=fake, progress=progress)
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    lora = lora_state(trainer.final_student())
    save_file({k: v.contiguous() for k, v in lora.items()}, str(out_dir / "tdm_lora.safetensors"))

    start = time.perf_counter()
    variant = finetune_variant(teacher, out_dir / "variant_teacher", iterations=variant_iterations,
                               amount=thickness, progress=progress)
    variant_s = time.perf_counter() - start
    metrics = DigitsMetrics()
    on_teacher = evaluate_digits(teacher, {4: apply_lora(teacher, lora, rank)}, config.cfg_scale, samples=samples,
                                 seeds=seeds, metrics=metrics, latency=False,
                                 cache=shipped_reference_cache(teacher, samples, seeds, 50, config.cfg_scale))
    on_variant = evaluate_digits(variant, {4: apply_lora(variant, lora, rank)}, config.cfg_scale, samples=samples,
                                 seeds=seeds, metrics=metrics, latency=False)
    results = {
        "lora_rank": rank, "iterations": iterations, "train_s": train_s,
        "variant_iterations": variant_iterations, "variant_s": variant_s, "thickness": thickness,
        "lora_parameters": sum(v.numel() for v in lora.values()),
        "on_teacher": on_teacher, "on_variant": on_variant,
    }
    (out_dir / "lora_transfer.json").write_text(json.dumps(results, indent=2))
    md = [
        "# TDM LoRA transferred to an unseen customised teacher (stroke-thickened digits)",
        "",
        f"LoRA rank {rank} ({results['lora_parameters']} parameters), {iterations} TDM iterations on the shipped teacher; "
        f"variant = teacher fine-tuned {variant_iterations} iterations on thickened digits. FID to each model's own 50-step CFG samples.",
        "", "## On the teacher it was trained on", "", format_table(on_teacher),
        "", "## On the unseen variant (LoRA applied unchanged)", "", format_table(on_variant), "",
    ]
    (out_dir / "lora_transfer.md").write_text("\n".join(md))
    return results
