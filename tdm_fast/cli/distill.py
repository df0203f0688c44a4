"""``tdm-fast distill`` (a saved teacher, or a real backbone with ``--preset``) and ``tdm-fast plan``:
their flags, read into a :class:`~tdm_fast.config.TDMConfig` and a :class:`~tdm_fast.backbones.run.PresetRun`."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
import typing
from pathlib import Path

from ..backbones.presets import PRESETS
from ..backbones.run import PresetRun
from ..checkpoint import checkpoint_dirs
from ..config import TDMConfig
from ..denoiser import denoiser_folder, load_denoiser
from ..usage import UsageError, check_allocation, check_output_path, check_tracker, write_text_atomically

logger = logging.getLogger("tdm_fast")


def _optional_float(text: str) -> float | None:
    return None if text.lower() in ("none", "null", "mse") else float(text)


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TDMConfig field (``--fake-lr``, ``--no-importance-sampling`` …), with its help, default
    and choices; values left unset fall back to ``--config``, then to TDMConfig's defaults."""
    from ..config import CHOICES, HELP
    from ..recipes import recipe_help

    preset_help = recipe_help()

    group = parser.add_argument_group("TDM settings (override --config)")
    hints = typing.get_type_hints(TDMConfig)
    for field in dataclasses.fields(TDMConfig):
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        text = HELP[field.name]
        if "(default" not in text:
            text += f" (default: {' '.join(map(str, default)) if isinstance(default, tuple) else default}"
            text += f"; {preset_help[field.name]})" if field.name in preset_help else ")"
        if field.name == "steps":
            group.add_argument(flag, type=int, nargs="+", default=None, metavar="K", help=text)
        elif field.name == "steps_weights":
            group.add_argument(flag, type=float, nargs="+", default=None, metavar="W", help=text)
        elif kind in (bool, bool | None):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif kind == float | None:
            group.add_argument(flag, type=_optional_float, default=None, metavar="FLOAT|none", help=text)
        elif field.name in CHOICES:
            group.add_argument(flag, choices=CHOICES[field.name], default=None, help=text)
        else:
            base = kind if kind in (int, float, str) else str
            group.add_argument(flag, type=base, default=None, help=text)


def config_from_args(args, resumed: dict | None = None, recipe: dict | None = None) -> TDMConfig:
    """``recipe`` (a preset's defaults, :func:`preset_recipe_of`), overlaid with ``resumed`` (the settings of
    the checkpoint a run resumes), with ``--config``, with the flags given; an invalid value is reported with
    its flag's name. A recipe run that names no K draw weights anywhere gets the recipe's (:func:`steps_weights_for`)."""
    from ..recipes import steps_weights_for

    known = {field.name for field in dataclasses.fields(TDMConfig)}
    data = dict(recipe or {})
    data.update({k: v for k, v in (resumed or {}).items() if k in known})  # a key of an older version is not a setting now
    if args.config:
        data.update(TDMConfig.file_settings(args.config))
    given = []
    for field in dataclasses.fields(TDMConfig):
        value = getattr(args, field.name)
        if value is not None:
            data[field.name] = value
            given.append(field.name)
    if recipe is not None and "steps_weights" not in data:
        data["steps_weights"] = steps_weights_for(data.get("steps", TDMConfig.steps))
    try:
        return TDMConfig.from_dict(data)
    except ValueError as exc:
        message = str(exc)
        for name in given:  # name the flag the user typed, not the field behind it
            message = re.sub(rf"(?<![\w-]){name}(?!\w)", "--" + name.replace("_", "-"), message)
        raise ValueError(message) from None


def preset_recipe_of(args) -> dict | None:
    """The recipe defaults of a ``--preset`` run (None for ``--teacher``)."""
    from ..recipes import folder_recipe

    return folder_recipe(args.preset, args.model, args.full_finetune) if args.preset else None


def _override_keys(args) -> tuple[str, ...]:
    keys = tuple(k.replace("-", "_") for k in (args.override or ()))
    if keys and args.resume is None:
        raise UsageError("--override only applies to a resumed run: add --resume")
    return keys


def _conditions_for(teacher, conditions_file: str | None):
    from safetensors.torch import load_file

    from ..training.conditions import ClassConditions, EmbeddingConditions

    if conditions_file:
        if not Path(conditions_file).is_file():
            raise UsageError(f"--conditions {conditions_file} does not exist")
        try:
            tensors = load_file(conditions_file)
        except Exception as exc:  # safetensors' own error type on a damaged header
            raise UsageError(f"--conditions {conditions_file} is not a readable safetensors file ({exc})") from None
        if not tensors or len({v.shape[0] for v in tensors.values()}) != 1:
            raise UsageError(f"--conditions {conditions_file} must hold tensors with one shared first (batch) dimension")
        return EmbeddingConditions(tensors["cond"] if set(tensors) == {"cond"} else tensors)
    if isinstance(teacher.null_cond, int):
        return ClassConditions(teacher.null_cond)
    raise UsageError("this teacher is not class-conditional: pass --conditions EMBEDDINGS.safetensors")


def _sample_shape(model, flag) -> tuple[int, ...]:
    if flag:
        return tuple(flag)
    if hasattr(model, "sample_shape"):
        return tuple(model.sample_shape)
    raise UsageError("cannot tell the sample shape of this model: pass --sample-shape")


def _resumed_settings(args) -> dict | None:
    """The settings of the checkpoint ``--resume`` names (the run's own, as its config.json has them): a
    resumed run starts from them, and the flags given beside ``--resume`` are its changes. None when not
    resuming, or where no checkpoint is found (reported, in its turn, by ``resolve_checkpoint``)."""
    from ..checkpoint import CheckpointError, read_meta

    if args.resume is None:
        return None
    try:
        return read_meta(args.resume or args.out)["config"]
    except (CheckpointError, KeyError):
        return None  # _check_resume_record names the damaged file


def _check_precision_fits_device(config: TDMConfig) -> None:
    """fp16 mixed precision needs a GPU (accelerate's loss scaling, half matmuls): on a CPU the teacher's
    first call would end in a dtype mismatch that names a shape, not the precision."""
    if config.effective_mixed_precision != "fp16":
        return
    from accelerate import PartialState

    if PartialState().device.type == "cpu":
        source = "--mixed-precision fp16" if config.mixed_precision else "mixed precision fp16 (accelerate's setting)"
        raise UsageError(f"{source} needs a GPU, and this run's device is the CPU: use --mixed-precision bf16 "
                         "(half-precision base weights on a CPU) or --mixed-precision no")


def cmd_distill(args) -> int:
    """``_distill`` with the ``tdm_fast`` logger's INFO records (the start-up summary) on stderr unless
    ``--quiet``, where the application has not routed that logger itself."""
    handler = None
    if not args.quiet and not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("tdm-fast: %(message)s"))
        logger.addHandler(handler)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
    try:
        return _distill(args)
    finally:
        if handler is not None:
            logger.removeHandler(handler)


def log_startup_summary(trainer, config: TDMConfig, model: str, resumed_from: Path | None) -> None:
    """Model, trainable parameters (and LoRA modules) per role, K set and weights, effective batch and
    precision, through the ``tdm_fast`` logger (INFO)."""
    from ..lora import LoRARole, wrapped_modules

    roles = []
    for name, core in (("student", trainer.student_core), ("fake", trainer.fake_core)):
        count = sum(p.numel() for p in core.parameters() if p.requires_grad)
        lora = f" in {wrapped_modules(core.model)} LoRA modules" if isinstance(core.model, LoRARole) else ""
        roles.append(f"{name} {count:,} trainable parameters{lora}")
    weights = config.steps_weights or "uniform"
    batch = config.batch_size * config.gradient_accumulation_steps * trainer.accelerator.num_processes
    logger.info("model %s; %s", model, "; ".join(roles))
    logger.info("K in %s (weights %s); effective batch %d (%d x %d accumulation x %d processes); precision %s; %s",
                list(config.steps), weights, batch, config.batch_size, config.gradient_accumulation_steps,
                trainer.accelerator.num_processes, config.mixed_precision,
                f"resumed from {resumed_from} at step {trainer.step}" if resumed_from is not None else "from step 0")
    logger.info("memory before activations: %s", _state_memory(trainer))


def _state_memory(trainer) -> str:
    """What the run holds whatever its activations: every weight once (LoRA roles share their base), and per
    trainable parameter its fp32 gradient and two AdamW moments, plus the student's EMA copy."""
    networks = (trainer.teacher, trainer.student_core, trainer.fake_core)
    params = {id(p): p for network in networks for p in network.parameters()}
    weights = sum(p.numel() * p.element_size() for p in params.values())
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    ema = sum(p.numel() for p in trainer.student_core.parameters() if p.requires_grad) if trainer.config.ema_decay else 0
    state = 4 * (3 * trainable + ema)
    gib = 2 ** 30
    return (f"weights {weights / gib:.2f} GiB, gradients + AdamW moments + EMA {state / gib:.2f} GiB per process "
            "(activations come on top: `tdm-fast plan` estimates them for the published backbones)")


def _resume_point(resume: str | None, out: Path) -> Path | None:
    """The checkpoint to continue from (None: a new run), refused where continuing would fork the run's history."""
    from ..checkpoint import resolve_checkpoint

    if checkpoint_dirs(out / "checkpoints") and resume is None:
        raise UsageError(f"{out} already holds checkpoints: pass --resume to continue, or choose another --out")
    resume_from = resolve_checkpoint(resume or out) if resume is not None else None
    if resume_from is not None and resume_from.resolve().parent == (out / "checkpoints").resolve():
        newer = [c.name for c in checkpoint_dirs(out / "checkpoints") if c.name > resume_from.name]
        if newer:  # continuing in place would put a second history beside the newer checkpoints
            raise UsageError(f"--resume {resume_from}: {out} holds newer checkpoints ({', '.join(newer)}), so the run "
                             f"cannot go back to {resume_from.name} in place; resume it into another run folder "
                             f"(--resume {resume_from} --out NEW_FOLDER), or resume the newest with --resume alone")
    return resume_from


def _check_resume_record(resume_from: Path | None, teacher_fingerprint: str | None) -> None:
    """The checkpoint's own record (its state.json against its tensor files, the teacher it was trained from)
    checked before the teacher is loaded and its prompts encoded and cached."""
    from ..checkpoint import read_meta
    from ..training.resume_record import check_teacher_fingerprint

    if resume_from is not None:
        check_teacher_fingerprint(read_meta(resume_from), teacher_fingerprint, resume_from)


def _teacher_fingerprint(args) -> str | None:
    """The fingerprint of the teacher's weight files: the --teacher folder, or --model's denoiser (None: no
    --model, refused later)."""
    from ..training.resume_record import weights_fingerprint

    if args.preset:
        from ..backbones.presets import get_preset

        return weights_fingerprint(Path(args.model) / get_preset(args.preset).subfolder) if args.model else None
    return weights_fingerprint(denoiser_folder(args.teacher))


def _networks(args, config):
    """Teacher, student, fake score, conditions, sample shape, optimizer class and validation of the run."""
    if args.preset:
        from ..backbones.run import build_preset_run, optimizer_class

        run = preset_run_from_args(args)
        teacher, student, fake, conditions, shape = build_preset_run(run, config)
        validation = _preset_validation(run, teacher, conditions, shape, args.validation_prompt) if config.validation_every else None
        return teacher, student, fake, conditions, shape, optimizer_class(run.use_8bit_adam), validation
    import torch

    teacher = load_denoiser(args.teacher)
    conditions = _conditions_for(teacher, args.conditions)
    shape = _sample_shape(teacher.model, args.sample_shape)
    # validation None: the trainer's default, the run's own conditions with samples shown as images
    return teacher, None, None, conditions, shape, torch.optim.AdamW, None


def _resolve_hub_flags(args) -> None:
    """``--model`` given as a Hub model id becomes its snapshot folder (before the recipe reads its scheduler,
    before anything is written), and an upload ``--push-to-hub`` could not make is refused before training."""
    from ..hub import check_push_to_hub, resolve_model

    if args.push_to_hub:
        check_push_to_hub(args.push_to_hub)
    if args.preset and args.model:
        args.model = resolve_model(args.model, "--model", revision=args.revision, variant=args.variant,
                                   cache_dir=args.cache_dir)
    elif args.revision or args.cache_dir:
        raise UsageError(f"{'--revision' if args.revision else '--cache-dir'} selects the Hub snapshot of --model: add --model")


def _push(args, out: Path) -> None:
    """``--push-to-hub``: the run's LoRA folder (a full fine-tune: its fused folder), with its model card."""
    from ..hub import push_folder

    folder = out / ("fused" if args.full_finetune else "lora")
    url = push_folder(folder, args.push_to_hub, commit_message=f"TDM student of {args.preset} (tdm-fast)")
    print(f"uploaded {folder} to {url}")


RUN_SOURCE = "run.json"  # what a run distils: its --teacher folder, or its --preset flags


def _run_source(args) -> dict:
    """What ``run.json`` records of this run's networks, for a later ``--resume`` given without them."""
    if args.preset:
        preset = {field.name: getattr(args, field.name) for field in dataclasses.fields(PresetRun)}
        return {"preset": {key: str(value) if isinstance(value, Path) else value for key, value in preset.items()}}
    return {"teacher": str(Path(args.teacher).resolve())}


def _recall_run_source(args) -> None:
    """``--resume`` given neither ``--teacher`` nor ``--preset``: the ones the run was started with, from the
    ``run.json`` of ``--out`` or of the run that holds the ``--resume`` checkpoint."""
    if args.resume is None or args.teacher or args.preset:
        return
    folders = [Path(args.out)]
    if args.resume:
        folders += [Path(args.resume), Path(args.resume).parent, Path(args.resume).parent.parent]
    for folder in folders:
        try:
            source = json.loads((folder / RUN_SOURCE).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(source, dict) and isinstance(source.get("teacher"), str):
            args.teacher = source["teacher"]
            return
        if isinstance(source, dict) and isinstance(source.get("preset"), dict):
            known = {field.name for field in dataclasses.fields(PresetRun)}
            for key, value in source["preset"].items():
                if key in known:
                    setattr(args, key, tuple(value) if isinstance(value, list) else value)
            return
        raise UsageError(f"{folder / RUN_SOURCE} is damaged: give --teacher, or --preset with --model and --prompts")


def _distill(args) -> int:
    from .. import runlock

    _recall_run_source(args)
    _resolve_hub_flags(args)
    config = config_from_args(args, _resumed_settings(args), preset_recipe_of(args))
    check_tracker(config.report_to)
    _check_precision_fits_device(config)
    # the precision accelerate will use, not None: config.json and the checkpoints record what ran
    config = dataclasses.replace(config, mixed_precision=config.effective_mixed_precision)
    out = check_output_path(args.out, "--out")
    overrides = _override_keys(args)
    if bool(args.teacher) == bool(args.preset):
        raise UsageError("give either --teacher (a saved denoiser) or --preset with --model and --prompts (a run "
                         f"folder with a {RUN_SOURCE} recalls them: --resume alone continues it)")
    if args.validation_prompt and not (args.preset and config.validation_every):
        raise UsageError("--validation-prompt sets what a text model's validation samples: it needs --preset and "
                         "--validation-every N")
    runlock.check_free(out)
    resume_from = _resume_point(args.resume, out)
    teacher_fingerprint = _teacher_fingerprint(args)
    _check_resume_record(resume_from, teacher_fingerprint)

    from accelerate.utils import set_seed

    from ..trainer import TDMTrainer

    set_seed(config.seed)  # LoRA initialisation and anything else drawn from the global generators
    teacher, student, fake, conditions, shape, optimizer_cls, validation = _networks(args, config)
    if min(shape) < 1:
        raise UsageError(f"--sample-shape {' '.join(map(str, shape))}: sizes must be >= 1")
    check_allocation("--batch-size", config.batch_size, shape)
    try:
        trainer = TDMTrainer(
            teacher, config, conditions, shape, output_dir=out, student=student, fake=fake,
            progress=not args.quiet, optimizer_cls=optimizer_cls, validation=validation,
            teacher_fingerprint=teacher_fingerprint,
        )
    except ValueError as exc:  # the trainer's shape check, reported under the flag that set the shape
        if args.sample_shape and str(exc).startswith("sample_shape "):
            raise UsageError("--sample-shape " + str(exc)[len("sample_shape "):]) from None
        raise
    if resume_from is not None:
        trainer.load_checkpoint(resume_from, overrides)
    main_process = trainer.accelerator.is_main_process
    if main_process:
        log_startup_summary(trainer, config, f"{args.preset} {args.model}" if args.preset else args.teacher, resume_from)
    if main_process:
        runlock.acquire(out)  # held until this process ends; the checks above are repeated under it
    try:
        if main_process:
            newest = checkpoint_dirs(out / "checkpoints")
            if resume_from is None and newest:
                raise UsageError(f"{out} gained checkpoints from another run while this one started")
            if resume_from is not None and resume_from.parent == out / "checkpoints" and newest[-1:] != [resume_from]:
                raise UsageError(f"{out} gained newer checkpoints than {resume_from.name} while this run started")
            write_text_atomically(out / "config.json", json.dumps(config.to_dict(), indent=2))
            write_text_atomically(out / RUN_SOURCE, json.dumps(_run_source(args), indent=2))
        trainer.train()
        student = trainer.final_student() if args.preset else None  # every process: FSDP gathers it
        if main_process:
            if args.preset:
                from ..backbones.run import export_preset_student

                export_preset_student(preset_run_from_args(args), student, config, out)
            print(f"student saved to {out}")
            if args.push_to_hub:
                _push(args, out)
    finally:
        if main_process:
            runlock.release(out)
    return 0


def _preset_validation(run: PresetRun, teacher, conditions, shape, prompts: list[str] | None = None):
    """Validation grids of a latent model decoded by the pipeline's own VAE (latents if it has none): of
    ``prompts`` (encoded here, captioned on the grids), else 8 draws of the run's own prompts."""
    import torch

    from ..validation import Validation

    model = run.model
    decode = None
    if (Path(model) / "vae" / "config.json").is_file():
        from ..export.vae import LatentDecoder, load_vae

        decoder = LatentDecoder(load_vae(model, variant=run.variant))

        def decode(latents):
            with torch.no_grad():
                return decoder.to(latents.device)(latents.float())

    if not prompts:
        return Validation.from_conditions(conditions, shape, count=8, decode=decode)
    from ..backbones.presets import get_preset, native_resolution, prompt_conditions, vae_scale_factor

    preset = get_preset(run.preset)
    adapter = teacher.model.shared.adapter if hasattr(teacher.model, "shared") else teacher.model  # LoRA roles: the base
    resolution = run.resolution or native_resolution(preset, adapter.config, vae_scale_factor(model))
    cond, _ = prompt_conditions(preset, model, list(prompts), adapter.inner, resolution, None,
                                max_sequence_length=run.max_sequence_length, variant=run.variant)
    noise = torch.randn((len(prompts), *shape), generator=torch.Generator().manual_seed(0))
    return Validation(cond, noise, decode=decode, captions=list(prompts))


def add_distill_preset_arguments(parser: argparse.ArgumentParser) -> None:
    from ..argtypes import positive_float, positive_int
    from .hub_flags import add_hub_arguments

    g = parser.add_argument_group("real backbones (diffusers)")
    g.add_argument("--preset", choices=sorted(PRESETS), help="backbone family of --model")
    g.add_argument("--model", help="diffusers pipeline folder (unet/ or transformer/, scheduler/, text encoders), or its "
                   "Hub model id (org/name: resolved as diffusers' from_pretrained does, through the Hub cache; "
                   "HF_HUB_OFFLINE=1 reads the cache only)")
    add_hub_arguments(g)
    g.add_argument("--push-to-hub", default=None, metavar="REPO_ID",
                   help="upload the LoRA folder (a full fine-tune: the fused folder) with its model card to this Hub "
                        "model repository when the run ends (created if missing; needs a token: hf auth login)")
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
    g.add_argument("--validation-prompt", action="append", default=None, metavar="PROMPT",
                   help="a prompt the validation grids show at every K, captioned (repeatable; with --validation-every; "
                        "default: 8 of --prompts)")
    g.add_argument("--init-lora", default=None, metavar="DIR",
                   help="start the student from this LoRA folder (`tdm-fast convert`'s output, or a run's lora/), in its "
                        "rank, alpha and targets; --lora-rank/--lora-alpha/--lora-targets then set the fake score's")


def preset_run_from_args(args) -> PresetRun:
    """The ``--preset`` flags as values."""
    return PresetRun(**{field.name: getattr(args, field.name) for field in dataclasses.fields(PresetRun)})


def add_distill_parser(verbs) -> None:
    p = verbs.add_parser("distill", help="distil a teacher into a K-step student")
    p.add_argument("--teacher", help="a saved Denoiser folder (e.g. from `tdm-fast teacher train`)")
    p.add_argument("--out", required=True, help="run folder: checkpoints/, metrics.jsonl, student/")
    p.add_argument("--config", help="YAML or JSON file of TDM settings; flags override it")
    p.add_argument("--conditions", help="safetensors of condition embeddings (text teachers)")
    p.add_argument("--sample-shape", type=int, nargs="+", help="shape of one sample, if the model does not say")
    p.add_argument("--resume", nargs="?", const="", default=None,
                   help="continue from the newest checkpoint (of --out, or PATH) with that run's own settings: flags "
                        "given beside it are changes (see --override); PATH, a checkpoint of this --out older than its "
                        "newest, continues only into another --out")
    p.add_argument("--override", nargs="+", metavar="KEY", default=None,
                   help="with --resume: settings (e.g. fake_lr batch_size) that may differ from the checkpoint's. "
                        "A raised --iterations alone keeps the cosine LR decay of the original length and continues at "
                        "its floor; --override iterations stretches the decay to the new length instead")
    _add_config_flags(p)
    add_distill_preset_arguments(p)
    p.set_defaults(func=cmd_distill)

    p = verbs.add_parser("plan", help="memory estimate of a real backbone's TDM run (meta device, no weights)")
    add_plan_arguments(p)
    p.set_defaults(func=cmd_plan)


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


def cmd_plan(args) -> int:
    run_plan(args)
    return 0
