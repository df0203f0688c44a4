"""Command-line pieces for real backbones: ``tdm-fast distill --preset ...`` and ``tdm-fast plan``.

The main CLI (``tdm_fast/cli.py``) adds these arguments and calls :func:`build_preset_run`, then
trains with :class:`~tdm_fast.trainer.TDMTrainer` and calls :func:`export_preset_student`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .presets import PRESETS, get_preset, load_teacher, native_resolution, prompt_conditions, sample_shape, vae_scale_factor


def add_distill_preset_arguments(parser: argparse.ArgumentParser) -> None:
    from ..argtypes import positive_float, positive_int

    g = parser.add_argument_group("real backbones (diffusers)")
    g.add_argument("--preset", choices=sorted(PRESETS), help="backbone family of --model")
    g.add_argument("--model", help="local diffusers pipeline folder (unet/ or transformer/, scheduler/, text encoders)")
    g.add_argument("--prompts", help="prompt file: .txt (one per line) or .jsonl ({\"prompt\": ...})")
    g.add_argument("--resolution", type=positive_int, default=None,
                   help="pixel resolution (default: the denoiser's sample_size x the VAE factor, e.g. 512 for SD1.5)")
    g.add_argument("--num-frames", type=positive_int, default=49, help="video frames (cogvideox)")
    g.add_argument("--max-sequence-length", type=positive_int, default=None, help="T5 tokens (pixart, sd3, cogvideox)")
    g.add_argument("--embedding-cache", default="default", help="folder of cached text embeddings ('none' disables)")
    g.add_argument("--full-finetune", action="store_true", help="student and fake as full copies instead of LoRA")
    g.add_argument("--lora-rank", type=positive_int, default=None, help="LoRA rank (default per backbone)")
    g.add_argument("--lora-alpha", type=positive_float, default=None, help="LoRA alpha (default: rank)")
    g.add_argument("--lora-targets", default=None, help="comma-separated LoRA target modules (default per backbone)")
    g.add_argument("--fake-copy", action="store_true", help="the fake score gets its own base copy (default: second adapter on the shared base)")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--use-8bit-adam", action="store_true", help="bitsandbytes AdamW8bit (needs bitsandbytes)")
    g.add_argument("--export-kohya", action="store_true", help="also write the LoRA in kohya format")
    g.add_argument("--export-fused", action="store_true", help="also write fused full student weights")


def _dtype_of(mixed_precision: str | None):
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision or "no")


def build_preset_run(args, config=None):
    """(teacher, student, fake, conditions, sample_shape) for ``--preset``.

    ``config`` is the run's :class:`~tdm_fast.config.TDMConfig` (its steps decide whether student and
    fake get a K embedding); default ``TDMConfig(steps=args.steps)`` when ``args`` has ``steps``.
    With LoRA (default) the three Denoisers share one base; with ``--full-finetune`` student and
    fake are None (the trainer copies the teacher).
    """
    from ..config import TDMConfig
    from ..lora import LoRASettings, lora_denoisers
    from ..prompts import read_prompts
    from ..trainer import EmbeddingConditions

    if not args.preset or not args.model or not args.prompts:
        raise ValueError("--preset, --model and --prompts are required together")
    if config is None:
        steps = getattr(args, "steps", None) or (4,)
        config = TDMConfig(steps=tuple(steps) if isinstance(steps, (list, tuple)) else (int(steps),))
    preset = get_preset(args.preset)
    if not Path(args.model).is_dir():
        raise ValueError(f"--model {args.model} is not a folder: give a local diffusers pipeline folder")
    prompts = read_prompts(args.prompts)  # the cheap checks first: a bad prompt file is refused before the load
    teacher, source = load_teacher(preset, args.model)
    cache = None if str(args.embedding_cache).lower() == "none" else args.embedding_cache
    # latents are pixels / the folder's own VAE factor (2 ** (len(vae block_out_channels) - 1); 8 without vae/),
    # and the default resolution is the one the denoiser was built for (its sample_size × that factor)
    scale = vae_scale_factor(args.model)
    resolution = args.resolution or native_resolution(preset, teacher.model.config, scale)
    cond, null = prompt_conditions(preset, args.model, prompts, teacher.model.inner, resolution, cache,
                                   max_sequence_length=args.max_sequence_length)
    teacher.null_cond = null
    shape = sample_shape(preset, teacher.model.config, resolution, getattr(args, "num_frames", 49), scale=scale)
    if getattr(args, "full_finetune", False):
        if args.gradient_checkpointing:
            teacher.model.inner.enable_gradient_checkpointing()  # the copies inherit it
        return teacher, None, None, EmbeddingConditions(cond), shape
    targets = tuple(t.strip() for t in args.lora_targets.split(",")) if args.lora_targets else None
    lora = LoRASettings.for_backbone(preset.backbone, rank=args.lora_rank, alpha=args.lora_alpha, target_modules=targets,
                                     fake="copy" if args.fake_copy else "shared")
    teacher, student, fake = lora_denoisers(teacher, config, lora, source, gradient_checkpointing=args.gradient_checkpointing)
    dtype = _dtype_of(config.effective_mixed_precision)
    if dtype is not None:  # frozen base weights in half precision; LoRA weights stay fp32
        for d in {id(x.model.shared): x.model.shared for x in (student, fake)}.values():
            d.cast_base(dtype)
    return teacher, student, fake, EmbeddingConditions(cond), shape


def optimizer_class(args):
    """``bitsandbytes.optim.AdamW8bit`` with ``--use-8bit-adam``, else ``torch.optim.AdamW``."""
    if getattr(args, "use_8bit_adam", False):
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ValueError("--use-8bit-adam needs bitsandbytes (pip install bitsandbytes)") from None
        return bnb.optim.AdamW8bit
    return torch.optim.AdamW


def export_preset_student(args, student, config, output_dir) -> Path:
    """Writes ``<output_dir>/lora`` (diffusers LoRA; kohya with --export-kohya), ``<output_dir>/fused``
    (with --export-fused, or always for full fine-tuning) and a README.md model card in each.

    Both folders hold ``scheduler/``: the TDMScheduler built from the teacher's scheduler config with the
    run's ``total_steps`` and ``student_solver`` (``TDMScheduler.from_pretrained(folder, subfolder="scheduler")``). ``fused/`` is
    a complete pipeline folder (the base's other components copied, the fused denoiser in place of the
    base's, TDMScheduler in ``model_index.json``) that ``DiffusionPipeline.from_pretrained`` loads. Each
    folder is written beside its final place and renamed into it (a kill leaves the old or the new one)."""
    from ..checkpoint import replace_folder
    from ..lora import LoRARole, fuse_student, save_lora, save_tdm_scheduler, write_model_card, write_pipeline_folder
    from .presets import read_scheduler_config

    preset = get_preset(args.preset)
    output_dir = Path(output_dir)
    teacher_scheduler = read_scheduler_config(args.model)
    card = dict(base_model=str(args.model), backbone=preset.name, pipeline=preset.pipeline, steps=tuple(config.steps),
                total_steps=config.total_steps, cfg_scale=config.cfg_scale, prediction_type=student.prediction_type)
    is_lora = isinstance(student.model, LoRARole)
    if is_lora:
        def write_lora(folder: Path) -> None:
            save_lora(student, folder, kohya=args.export_kohya)
            save_tdm_scheduler(folder, teacher_scheduler, config.total_steps, config.student_solver)
            write_model_card(folder, lora=True, folder_name="lora", **card)

        replace_folder(output_dir / "lora", write_lora)  # a kill leaves the old complete folder or the new one
    if not is_lora or args.export_fused:
        k = max(config.steps)
        if is_lora:
            model = fuse_student(student, steps=k if student.steps_set else None)
        else:
            import copy

            from ..lora import _fold_into_last_linear

            model = copy.deepcopy(student.model.inner)
            for m in model.modules():
                m._forward_hooks.clear()
            if student.steps_embedding is not None:
                target = model.get_submodule(student.time_embedding.removeprefix("inner."))
                _fold_into_last_linear(target, student.steps_embedding.embedding.weight[student.steps_set.index(k)].detach().float())
        def write_fused(folder: Path) -> None:
            write_pipeline_folder(folder, args.model, preset.subfolder, model, teacher_scheduler, config.total_steps,
                                  config.student_solver)
            write_model_card(folder, lora=False, folder_name="fused", **card)

        replace_folder(output_dir / "fused", write_fused)
    return output_dir


# -- tdm-fast plan --------------------------------------------------------------------------------
def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    from ..argtypes import positive_float, positive_int
    from ..perf.plan import PLAN_CONFIGS

    parser.add_argument("--preset", required=True, choices=sorted(PLAN_CONFIGS))
    parser.add_argument("--batch", type=positive_int, default=1, help="per-GPU batch size")
    parser.add_argument("--resolution", type=positive_int, default=None, help="pixel resolution (default: the preset's)")
    parser.add_argument("--num-frames", type=positive_int, default=49)
    parser.add_argument("--gpu-memory", type=positive_float, default=80.0, help="GPU memory in GiB")
    parser.add_argument("--lora-rank", type=positive_int, default=None)
    parser.add_argument("--no-activations", action="store_true", help="skip the (meta-device) activation estimate")


def run_plan(args) -> dict:
    from ..perf.plan import format_plan, memory_plan

    plan = memory_plan(args.preset, batch=args.batch, resolution=args.resolution, num_frames=args.num_frames,
                       lora_rank=args.lora_rank, activations=not args.no_activations)
    print(format_plan(plan, args.gpu_memory))
    return plan
