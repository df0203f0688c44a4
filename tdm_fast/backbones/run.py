"""A distillation run of a real diffusers backbone (``tdm-fast distill --preset ...``) as values.

:class:`PresetRun` holds what the ``--preset`` flags say; :func:`build_preset_run` loads the teacher and
its student and fake score from it, and :func:`export_preset_student` writes what a user deploys. The
command line (:mod:`tdm_fast.cli.distill`) reads its flags into a :class:`PresetRun`; Python callers build
one directly.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch

from .presets import (check_resolution, get_preset, load_teacher, native_resolution, prompt_conditions, sample_shape,
                      vae_scale_factor)


@dataclasses.dataclass(frozen=True)
class PresetRun:
    """The backbone side of a ``--preset`` run (the TDM settings are the :class:`~tdm_fast.config.TDMConfig`).

    ``resolution`` None: the denoiser's native one; ``embedding_cache`` None or "none": no cache;
    ``lora_targets``: comma-separated module names (None: the backbone's default). ``init_lora``: a LoRA folder
    (``tdm-fast convert``'s, or a run's ``lora/``) the student starts from, in its own layout (rank, alpha,
    targets: the ``lora_*`` settings are then the fake score's). ``model`` is a local folder (a Hub model id is
    resolved to its snapshot first: :func:`tdm_fast.hub.resolve_model`); ``variant``: the weight files to load
    (diffusers' ``variant``, e.g. ``fp16``)."""

    preset: str
    model: str | Path
    prompts: str | Path
    resolution: int | tuple[int, int] | None = None
    num_frames: int = 49
    max_sequence_length: int | None = None
    embedding_cache: str | Path | None = "default"
    full_finetune: bool = False
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_targets: str | None = None
    fake_copy: bool = False
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False
    export_kohya: bool = False
    export_fused: bool = False
    init_lora: str | Path | None = None
    variant: str | None = None


def _dtype_of(mixed_precision: str | None):
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision or "no")


def build_preset_run(run: PresetRun, config=None):
    """(teacher, student, fake, conditions, sample_shape) of ``run``.

    ``config`` is the run's :class:`~tdm_fast.config.TDMConfig` (its steps decide whether student and
    fake get a K embedding; default ``TDMConfig(steps=(4,))``). With LoRA (default) the three Denoisers
    share one base; with ``full_finetune`` student and fake are None (the trainer copies the teacher).
    """
    from ..config import TDMConfig
    from ..lora import (LoRASettings, check_lora_fits, fill_lora, lora_denoisers, read_lora_folder, role_of,
                        unmatched_lora_targets)
    from ..prompts import read_prompts
    from ..training.conditions import EmbeddingConditions
    from .validate import TEXT_COMPONENTS, check_loaded_weights, check_pipeline_folder

    if not run.preset or not run.model or not run.prompts:
        raise ValueError("--preset, --model and --prompts are required together")
    config = config or TDMConfig(steps=(4,))
    preset = get_preset(run.preset)
    if not Path(run.model).is_dir():
        raise ValueError(f"--model {run.model} is not a folder: give a local diffusers pipeline folder (a Hub model id "
                         "is resolved to its snapshot folder first: tdm_fast.hub.resolve_model)")
    prompts = read_prompts(run.prompts)  # the cheap checks first: a bad prompt file is refused before the load
    if run.init_lora is not None and run.full_finetune:
        raise ValueError("--init-lora starts a LoRA student from a LoRA: not with --full-finetune")
    try:
        student_lora, init_weights = read_lora_folder(run.init_lora) if run.init_lora is not None else (None, None)
    except ValueError as exc:
        raise ValueError(f"--init-lora {exc}") from None
    # damaged files refused before the load (and before any cache or --out); the text encoders when the prompts
    # are encoded (a cached run never loads them), the denoiser's values as it is loaded (its files read once)
    check_pipeline_folder(run.model, skip=TEXT_COMPONENTS, values_on_load=(preset.subfolder,))
    teacher, source = load_teacher(preset, run.model, variant=run.variant)
    check_loaded_weights(teacher.model.inner, Path(run.model) / preset.subfolder)
    targets = tuple(t.strip() for t in run.lora_targets.split(",")) if run.lora_targets else None
    unmatched = unmatched_lora_targets(teacher.model.inner, targets) if targets and not run.full_finetune else []
    if unmatched:  # peft would wrap the other targets and ignore it: a silently smaller LoRA
        raise ValueError(f"--lora-targets {run.lora_targets}: {unmatched[0]!r} matches no module of the {preset.name} "
                         f"{type(teacher.model.inner).__name__} (a module name, or its last dotted parts, e.g. to_q or "
                         "attn1.to_q); fix or drop it")
    if init_weights is not None:
        try:
            check_lora_fits(teacher.model.inner, init_weights)  # before the prompts are encoded (and cached)
        except ValueError as exc:
            raise ValueError(f"--init-lora {run.init_lora}: {exc}") from None
    cache = None if run.embedding_cache is None or str(run.embedding_cache).lower() == "none" else run.embedding_cache
    # latents are pixels / the folder's own VAE factor (2 ** (len(vae block_out_channels) - 1); 8 without vae/),
    # and the default resolution is the one the denoiser was built for (its sample_size × that factor)
    scale = vae_scale_factor(run.model)
    resolution = run.resolution or native_resolution(preset, teacher.model.config, scale)
    check_resolution(preset, teacher.model.config, resolution, scale)  # before the prompts are encoded (and cached)
    cond, null = prompt_conditions(preset, run.model, prompts, teacher.model.inner, resolution, cache,
                                   max_sequence_length=run.max_sequence_length, variant=run.variant)
    teacher.null_cond = null
    shape = sample_shape(preset, teacher.model.config, resolution, run.num_frames, scale=scale)
    if run.full_finetune:
        if run.gradient_checkpointing:
            teacher.model.inner.enable_gradient_checkpointing()  # the copies inherit it
        return teacher, None, None, EmbeddingConditions(cond), shape
    lora = LoRASettings.for_backbone(preset.backbone, rank=run.lora_rank, alpha=run.lora_alpha, target_modules=targets,
                                     fake="copy" if run.fake_copy else "shared")
    teacher, student, fake = lora_denoisers(teacher, config, lora, source, gradient_checkpointing=run.gradient_checkpointing,
                                            student_lora=student_lora)
    if init_weights is not None:
        fill_lora(role_of(student).shared.adapter.inner, init_weights, "student")
    dtype = _dtype_of(config.effective_mixed_precision)
    if dtype is not None:  # frozen base weights in half precision; LoRA weights stay fp32
        for d in {id(x.model.shared): x.model.shared for x in (student, fake)}.values():
            d.cast_base(dtype)
    return teacher, student, fake, EmbeddingConditions(cond), shape


def optimizer_class(use_8bit_adam: bool = False):
    """``bitsandbytes.optim.AdamW8bit`` with ``use_8bit_adam``, else ``torch.optim.AdamW``."""
    if use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ValueError("--use-8bit-adam needs bitsandbytes (pip install bitsandbytes)") from None
        return bnb.optim.AdamW8bit
    return torch.optim.AdamW


def _fused_model(student, k: int):
    """The student's network with its LoRA (and the K = ``k`` embedding) folded into plain weights."""
    from ..lora import LoRARole, fold_into_last_linear, fuse_student

    if isinstance(student.model, LoRARole):
        return fuse_student(student, steps=k if student.steps_set else None)
    model = copy.deepcopy(student.model.inner)
    for m in model.modules():
        m._forward_hooks.clear()
    if student.steps_embedding is not None:
        target = model.get_submodule(student.time_embedding.removeprefix("inner."))
        fold_into_last_linear(target, student.steps_embedding.embedding.weight[student.steps_set.index(k)].detach().float())
    return model


def export_preset_student(run: PresetRun, student, config, output_dir) -> Path:
    """Writes ``<output_dir>/lora`` (diffusers LoRA; kohya with ``export_kohya``), ``<output_dir>/fused``
    (with ``export_fused``, or always for full fine-tuning) and a README.md model card in each.

    Both folders hold ``scheduler/``: the TDMScheduler built from the teacher's scheduler config with the
    run's ``total_steps`` and ``student_solver`` (``TDMScheduler.from_pretrained(folder, subfolder="scheduler")``). ``fused/`` is
    a complete pipeline folder (the base's other components copied, the fused denoiser in place of the
    base's, TDMScheduler in ``model_index.json``) that ``DiffusionPipeline.from_pretrained`` loads. Each
    folder is written beside its final place and renamed into it (a kill leaves the old or the new one)."""
    from ..checkpoint import replace_folder
    from ..lora import LoRARole
    from ..publish import save_lora, save_tdm_scheduler, write_model_card, write_pipeline_folder
    from .presets import read_scheduler_config

    preset = get_preset(run.preset)
    output_dir = Path(output_dir)
    teacher_scheduler = read_scheduler_config(run.model)
    card = dict(base_model=str(run.model), backbone=preset.name, pipeline=preset.pipeline, steps=tuple(config.steps),
                total_steps=config.total_steps, cfg_scale=config.cfg_scale, prediction_type=student.prediction_type)
    is_lora = isinstance(student.model, LoRARole)
    if is_lora:
        def write_lora(folder: Path) -> None:
            save_lora(student, folder, kohya=run.export_kohya)
            save_tdm_scheduler(folder, teacher_scheduler, config.total_steps, config.student_solver, config.steps)
            write_model_card(folder, lora=True, folder_name="lora", **card)

        replace_folder(output_dir / "lora", write_lora)  # a kill leaves the old complete folder or the new one
    if not is_lora or run.export_fused:
        model = _fused_model(student, max(config.steps))
        fused_steps = (max(config.steps),) if student.steps_embedding is not None else config.steps  # the folded K only

        def write_fused(folder: Path) -> None:
            write_pipeline_folder(folder, run.model, preset.subfolder, model, teacher_scheduler, config.total_steps,
                                  config.student_solver, fused_steps)
            write_model_card(folder, lora=False, folder_name="fused", **card)

        replace_folder(output_dir / "fused", write_fused)
    return output_dir
