"""``tdm-fast``: distil, sample, demo, and the built-in teachers.

Errors a user can fix (bad flags, bad configs, missing or corrupt checkpoints) end in one line
``tdm-fast: error: …`` and exit code 2, before anything on disk is touched.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path

from .argtypes import positive_int
from .checkpoint import CheckpointError, checkpoint_dirs
from .config import TDMConfig
from .runlock import RunLockedError
from .solvers import SOLVERS, trained_solver


class UsageError(Exception):
    """A mistake in the command line or its inputs, reported as one line."""


def check_output_path(path: str | Path, flag: str, folder: bool = True) -> Path:
    """Refuses an output path that cannot be created, before anything is written: a path under a
    regular file, a folder given where a file is (or the reverse), a parent that is not writable."""
    import os

    path = Path(path)
    if path.exists() and folder != path.is_dir():
        raise UsageError(f"{flag} {path} is {'a file' if folder else 'a folder'}, not {'a folder' if folder else 'a file'}")
    parent = path if folder else path.parent  # an existing file may be replaced: what matters is its folder
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: {parent} is a file, so nothing can be created under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: {parent} is not writable")
    return path


# -- TDMConfig <-> flags -------------------------------------------------------------------------
def _optional_float(text: str) -> float | None:
    return None if text.lower() in ("none", "null", "mse") else float(text)


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TDMConfig field (``--fake-lr``, ``--no-importance-sampling`` …), with its help, default
    and choices; values left unset fall back to ``--config``, then to TDMConfig's defaults."""
    from .config import CHOICES, HELP

    group = parser.add_argument_group("TDM settings (override --config)")
    hints = typing.get_type_hints(TDMConfig)
    for field in dataclasses.fields(TDMConfig):
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        text = HELP[field.name]
        if "(default" not in text:
            text += f" (default: {' '.join(map(str, default)) if isinstance(default, tuple) else default})"
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


def config_from_args(args) -> TDMConfig:
    """``--config`` overlaid with the flags given; an invalid value is reported with its flag's name."""
    import re

    data = TDMConfig.from_file(args.config).to_dict() if args.config else {}
    given = []
    for field in dataclasses.fields(TDMConfig):
        value = getattr(args, field.name)
        if value is not None:
            data[field.name] = value
            given.append(field.name)
    try:
        return TDMConfig.from_dict(data)
    except ValueError as exc:
        message = str(exc)
        for name in given:  # name the flag the user typed, not the field behind it
            message = re.sub(rf"(?<![\w-]){name}(?!\w)", "--" + name.replace("_", "-"), message)
        raise ValueError(message) from None


def _override_keys(args) -> tuple[str, ...]:
    keys = tuple(k.replace("-", "_") for k in (args.override or ()))
    if keys and args.resume is None:
        raise UsageError("--override only applies to a resumed run: add --resume")
    return keys


# -- teachers and conditions --------------------------------------------------------------------
def load_denoiser(path: str):
    from .denoiser import Denoiser

    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path} does not exist")
    if (path / "student").is_dir() and not (path / "denoiser.json").exists():
        path = path / "student"
    if not (path / "denoiser.json").is_file() and (path / "pytorch_lora_weights.safetensors").is_file():
        student = path.parent / "student"
        raise UsageError(f"{path} is a diffusers LoRA (for pipe.load_lora_weights on its base pipeline), not a saved denoiser: "
                         f"give the run's student folder{f' ({student})' if student.is_dir() else ''} or the run folder")
    if not (path / "denoiser.json").is_file():
        raise UsageError(f"{path} is not a saved denoiser (expected {path / 'denoiser.json'})")
    return Denoiser.from_pretrained(path)


def _conditions_for(teacher, conditions_file: str | None):
    from safetensors.torch import load_file

    from .trainer import ClassConditions, EmbeddingConditions

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


# -- verbs ---------------------------------------------------------------------------------------
def cmd_distill(args) -> int:
    from . import runlock
    from .checkpoint import resolve_checkpoint

    config = config_from_args(args)
    out = check_output_path(args.out, "--out")
    overrides = _override_keys(args)
    if bool(args.teacher) == bool(args.preset):
        raise UsageError("give either --teacher (a saved denoiser) or --preset with --model and --prompts")
    runlock.check_free(out)
    if checkpoint_dirs(out / "checkpoints") and args.resume is None:
        raise UsageError(f"{out} already holds checkpoints: pass --resume to continue, or choose another --out")
    resume_from = resolve_checkpoint(args.resume or out) if args.resume is not None else None

    from accelerate.utils import set_seed

    from .trainer import TDMTrainer

    set_seed(config.seed)  # LoRA initialisation and anything else drawn from the global generators
    if args.preset:
        from .backbones.cli import build_preset_run, optimizer_class

        teacher, student, fake, conditions, shape = build_preset_run(args, config)
        optimizer_cls = optimizer_class(args)
        validation = _preset_validation(args.model, conditions, shape) if config.validation_every else None
    else:
        teacher = load_denoiser(args.teacher)
        student = fake = None
        conditions = _conditions_for(teacher, args.conditions)
        shape = _sample_shape(teacher.model, args.sample_shape)
        import torch

        optimizer_cls = torch.optim.AdamW
        validation = None  # the trainer's default: the run's own conditions, samples shown as images
    try:
        trainer = TDMTrainer(
            teacher, config, conditions, shape, output_dir=out, student=student, fake=fake,
            progress=not args.quiet, optimizer_cls=optimizer_cls, validation=validation,
        )
    except ValueError as exc:  # the trainer's shape check, reported under the flag that set the shape
        if args.sample_shape and str(exc).startswith("sample_shape "):
            raise UsageError("--sample-shape " + str(exc)[len("sample_shape "):]) from None
        raise
    if resume_from is not None:
        trainer.load_checkpoint(resume_from, overrides)
    main_process = trainer.accelerator.is_main_process
    if main_process:
        runlock.acquire(out)  # held until this process ends; the checks above are repeated under it
    try:
        if main_process:
            newest = checkpoint_dirs(out / "checkpoints")
            if resume_from is None and newest:
                raise UsageError(f"{out} gained checkpoints from another run while this one started")
            if resume_from is not None and resume_from.parent == out / "checkpoints" and newest[-1:] != [resume_from]:
                raise UsageError(f"{out} gained newer checkpoints than {resume_from.name} while this run started")
            _write_text_atomically(out / "config.json", json.dumps(config.to_dict(), indent=2))
        trainer.train()
        student = trainer.final_student() if args.preset else None  # every process: FSDP gathers it
        if main_process:
            if args.preset:
                from .backbones.cli import export_preset_student

                export_preset_student(args, student, config, out)
            print(f"student saved to {out}")
    finally:
        if main_process:
            runlock.release(out)
    return 0


def _preset_validation(model: str, conditions, shape):
    """Validation grids of a latent model decoded by the pipeline's own VAE (latents if it has none)."""
    from .validation import Validation

    decode = None
    if (Path(model) / "vae" / "config.json").is_file():
        import torch

        from .export.vae import LatentDecoder, load_vae

        decoder = LatentDecoder(load_vae(model))

        def decode(latents):
            with torch.no_grad():
                return decoder.to(latents.device)(latents.float())

    return Validation.from_conditions(conditions, shape, count=8, decode=decode)


def _write_text_atomically(path: Path, text: str) -> None:
    import os

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _check_steps(steps: list[int], student, total_steps: int = 900) -> None:
    from .sampling import stage_times

    for k in steps:
        try:
            stage_times(k, total_steps)
        except ValueError as exc:
            raise UsageError(f"--steps {k}: {exc}") from None
        if student.steps_set and k not in student.steps_set:
            raise UsageError(f"--steps {k}: this student was trained for K in {list(student.steps_set)}")


def _check_backend(backend: str, engine: str | None) -> None:
    if engine is not None:
        if backend not in ("onnx", "tensorrt"):
            raise UsageError(f"--engine is an exported graph or engine: use it with --backend onnx or tensorrt, not {backend}")
        if not Path(engine).exists():
            raise UsageError(f"--engine {engine} does not exist")
    if backend == "tensorrt":
        from .export.tensorrt import tensorrt_available

        ok, why = tensorrt_available()
        if not ok:
            raise UsageError(f"--backend tensorrt: {why}")


def cmd_sample(args) -> int:
    if args.prompt is not None:
        return _sample_prompts(args)
    if args.checkpoint is None:
        raise UsageError("--checkpoint is required (or --prompt with --backend onnx --engine EXPORT_DIR)")
    import torch

    from .sampling import sample_student

    if args.num < 1:
        raise UsageError(f"--num must be >= 1, got {args.num}")
    out = check_output_path(args.out, "--out", folder=False)
    check_output_path(out.with_suffix(".safetensors"), "--out", folder=False)
    check_output_path(out.with_suffix(".png"), "--out", folder=False)
    _check_backend(args.backend, args.engine)
    student = load_denoiser(args.checkpoint).eval()
    steps = args.steps
    _check_steps([steps], student)
    if not isinstance(student.null_cond, int):
        raise UsageError("tdm-fast sample draws class labels; for text models use the diffusers pipeline with TDMScheduler")
    if getattr(student.model, "sample_shape", None) is None:
        raise UsageError(f"{type(student.model).__name__} does not say its sample shape; sample it from Python")
    bad = [label for label in args.labels or () if not 0 <= label < student.null_cond]
    if bad:
        raise UsageError(f"--labels {bad[0]}: this student's classes are 0..{student.null_cond - 1}")
    g = torch.Generator().manual_seed(args.seed)
    labels = torch.tensor(args.labels) if args.labels else torch.randint(0, student.null_cond, (args.num,), generator=g)
    noise = torch.randn((labels.shape[0], *student.model.sample_shape), generator=g)
    solver = args.solver or trained_solver(args.checkpoint)
    if args.backend == "torch":
        samples = sample_student(student, noise, labels, steps, solver=solver)
    else:
        from .export.cli import load_runner

        runner = load_runner(args.backend, args.checkpoint, steps, engine=args.engine, student=None if args.engine else student,
                             device="cpu" if args.backend == "onnx" else None, solver=solver)
        samples = runner(noise, labels).cpu()
    out.parent.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file({"samples": samples.contiguous(), "labels": labels}, out.with_suffix(".safetensors"))
    from .plotting import save_samples_png

    save_samples_png(samples, labels, out.with_suffix(".png"), title=f"TDM student, K={steps}")
    print(f"wrote {out.with_suffix('.safetensors')} and {out.with_suffix('.png')}")
    return 0


def _sample_prompts(args) -> int:
    """``sample --prompt``: prompt → image through a ``tdm-fast export --pipeline`` folder, ONNX Runtime only
    (:class:`~tdm_fast.export.runtime.TextToImage`); one image per prompt."""
    import warnings

    if args.backend != "onnx" or args.engine is None:
        raise UsageError("--prompt samples a `tdm-fast export --pipeline` folder: add --backend onnx --engine EXPORT_DIR")
    _refuse_flags(args, (("--checkpoint", "checkpoint"), ("--labels", "labels"), ("--solver", "solver")),
                  "to --prompt (the exported graphs fix the model and its solver)")
    out = check_output_path(args.out, "--out", folder=False)
    for suffix in (".safetensors", ".png"):
        check_output_path(out.with_suffix(suffix), "--out", folder=False)
    if not Path(args.engine).is_dir():
        raise UsageError(f"--engine {args.engine} is not a folder written by tdm-fast export --pipeline")
    from .export.runtime import TextToImage, save_png

    runner = TextToImage(args.engine, steps=args.steps)  # refuses a bad folder before anything is written
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = runner(args.prompt, steps=args.steps, seed=args.seed)
    for warning in caught:  # a truncated prompt: said once, in the CLI's format
        print(f"tdm-fast: warning: {warning.message}", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    from safetensors.numpy import save_file

    save_file({"images": images}, out.with_suffix(".safetensors"),
              metadata={"prompts": json.dumps(args.prompt), "steps": str(args.steps), "seed": str(args.seed)})
    save_png(images, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.safetensors')} and {out.with_suffix('.png')}")
    return 0


def cmd_export(args) -> int:
    from .export.cli import check_export_args, run_export

    check_output_path(args.out, "--out")
    check_export_args(args)
    student = load_denoiser(args.checkpoint)
    _check_steps(args.steps, student, args.total_steps)
    run_export(args, student=student)
    return 0


def _refuse_flags(args, flags: tuple[tuple[str, str], ...], why: str) -> None:
    """A flag that the chosen mode would ignore is an error, not silently dropped (its default is None)."""
    given = [flag for flag, dest in flags if getattr(args, dest, None) is not None]
    if given:
        raise UsageError(f"{' and '.join(given)} {'does' if len(given) == 1 else 'do'} not apply {why}")


def cmd_demo(args) -> int:
    if args.onnx and args.pipeline != "sd15":
        raise UsageError(f"--onnx scores the exported student of --pipeline sd15, not {'--pipeline ' + args.pipeline if args.pipeline else '--dataset ' + args.dataset}")
    if args.pipeline is not None:
        if args.dataset != "digits":
            raise UsageError(f"--pipeline distils a digits text-to-image pipeline; it does not go with --dataset {args.dataset}")
        from .demos.t2i_demo import run_demo as run_t2i_demo

        args.out = args.out or f"runs/demo-{args.pipeline}"
        run_t2i_demo(args)
        print(f"sample grid: {Path(args.out) / 'grid.png'}")
        return 0
    if args.model is not None:
        raise UsageError("--model goes with --pipeline sd15|sd3 (a pipeline folder to distil instead of the shipped one)")
    if args.dataset == "digits":
        from .eval.cli import run_demo

        args.out = args.out or "runs/demo"
        check_output_path(args.out, "--out")
        args.samples = args.samples or 2000
        run_demo(args)
        print(f"sample grid: {Path(args.out) / 'grid.png'}")
        return 0
    from .demos.demo_toy import run_toy_demo

    _refuse_flags(args, (("--samples", "samples"), ("--eval-seeds", "eval_seeds"), ("--digits-teacher", "digits_teacher")),
                  "to --dataset toy2d")
    out = check_output_path(args.out or "runs/demo-toy", "--out")
    run_toy_demo(out, iterations=args.iterations or 600, progress=not args.quiet, seed=args.seed)
    print((out / "metrics.md").read_text())
    print(f"scatter plot: {out / 'scatter.png'}")
    return 0


def cmd_teacher_train(args) -> int:
    check_output_path(args.out, "--out")
    if args.dataset != "digits" and args.architecture != "digits":
        raise UsageError(f"--architecture {args.architecture} goes with --dataset digits (the built-in digits teachers)")
    if args.dataset == "digits-t2i":
        if args.pipeline is None:
            raise UsageError("--dataset digits-t2i needs --pipeline sd15 or sd3")
        from .demos.t2i import run_build

        run_build(args)
        return 0
    t2i_only = [flag for flag, value in (("--pipeline", args.pipeline), ("--vae-iterations", args.vae_iterations),
                                         ("--threads", args.threads), ("--eval-samples", args.eval_samples)) if value is not None]
    if t2i_only:
        raise UsageError(f"{', '.join(t2i_only)} only go with --dataset digits-t2i (the text-to-image pipelines)")
    if args.dataset == "digits":
        from .eval.cli import run_teacher_train

        _refuse_flags(args, (("--hidden", "hidden"),), "to --dataset digits (its UNet has a fixed size)")
        args.batch_size = 128 if args.batch_size is None else args.batch_size
        if args.architecture == "digits":
            args.lr = 2e-3 if args.lr is None else args.lr
        args.cond_dropout = 0.15 if args.cond_dropout is None else args.cond_dropout
        run_teacher_train(args)
        return 0
    from .demos.toy2d import train_toy_teacher

    _refuse_flags(args, (("--batch-size", "batch_size"), ("--lr", "lr"), ("--cond-dropout", "cond_dropout")),
                  "to --dataset toy2d (they set the digits teachers' training)")
    teacher = train_toy_teacher(iterations=args.iterations or 2000, seed=args.seed or 0, hidden=args.hidden or 128,
                                progress=not args.quiet)
    teacher.save_pretrained(args.out)
    print(f"teacher saved to {args.out}")
    return 0


def _verb(run):
    """A verb whose work is ``run(args)``; what ``run`` returns is a report, not an exit code."""

    def call(args) -> int:
        run(args)
        return 0

    return call


class _Parser(argparse.ArgumentParser):
    """argparse's own errors (a missing or unknown flag, a value of the wrong type or out of range)
    in the format of every other user error: one line ``tdm-fast: error: ...``, exit code 2 (no usage block;
    ``--help`` shows it)."""

    def error(self, message: str):
        where = f" (see {self.prog} --help)" if self.prog != "tdm-fast" else ""
        self.exit(2, f"tdm-fast: error: {' '.join(message.split())}{where}\n")


class _Verbs:
    """Sub-command factory that gives every verb the common flags (so ``--quiet`` goes anywhere)."""

    def __init__(self, subparsers, common: argparse.ArgumentParser):
        self.subparsers, self.common = subparsers, common

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        return self.subparsers.add_parser(name, parents=[self.common], **kwargs)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tdm-fast")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tdm-fast", description="Trajectory Distribution Matching: few-step distillation")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    common = _Parser(add_help=False)
    # SUPPRESS: a verb without --quiet must not reset a --quiet given before it
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    verbs = _Verbs(parser.add_subparsers(dest="verb", required=True), common)

    p = verbs.add_parser("distill", help="distil a teacher into a K-step student")
    p.add_argument("--teacher", help="a saved Denoiser folder (e.g. from `tdm-fast teacher train`)")
    p.add_argument("--out", required=True, help="run folder: checkpoints/, metrics.jsonl, student/")
    p.add_argument("--config", help="YAML or JSON file of TDM settings; flags override it")
    p.add_argument("--conditions", help="safetensors of condition embeddings (text teachers)")
    p.add_argument("--sample-shape", type=int, nargs="+", help="shape of one sample, if the model does not say")
    p.add_argument("--resume", nargs="?", const="", default=None, help="continue from the newest checkpoint (of --out, or PATH)")
    p.add_argument("--override", nargs="+", metavar="KEY", default=None,
                   help="with --resume: settings (e.g. fake_lr batch_size) that may differ from the checkpoint's")
    _add_config_flags(p)
    from .backbones.cli import add_distill_preset_arguments, add_plan_arguments, run_plan

    add_distill_preset_arguments(p)
    p.set_defaults(func=cmd_distill)

    p = verbs.add_parser("plan", help="memory estimate of a real backbone's TDM run (meta device, no weights)")
    add_plan_arguments(p)
    p.set_defaults(func=_verb(run_plan))

    p = verbs.add_parser("sample", help="sample a class-conditional student, or prompts through an exported pipeline")
    p.add_argument("--checkpoint", default=None, help="a student folder or a run folder")
    p.add_argument("--prompt", nargs="+", default=None,
                   help="prompts, one image each, through a `tdm-fast export --pipeline` folder (--backend onnx --engine DIR): "
                        "ONNX Runtime only, no torch in the path")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--num", type=int, default=16)
    p.add_argument("--labels", type=int, nargs="+")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/samples")
    p.add_argument("--solver", choices=SOLVERS, default=None,
                   help="the trajectory to sample: ddim or dpmsolver (default: the run's student_solver, else ddim)")
    from .export.cli import add_backend_arguments, add_export_arguments

    add_backend_arguments(p)
    p.set_defaults(func=cmd_sample)

    p = verbs.add_parser("export", help="torch.compile / ONNX / TensorRT export of the K-step sampler")
    add_export_arguments(p)
    p.set_defaults(func=cmd_export)

    from .eval import cli as digits_cli

    p = verbs.add_parser("demo", help="distil a built-in teacher in minutes and compare with the NFE-matched baselines")
    p.add_argument("--dataset", choices=["digits", "toy2d"], default="digits")
    p.add_argument("--out", default=None, help="default runs/demo (digits) or runs/demo-toy (toy2d)")
    p.add_argument("--iterations", type=positive_int, default=None, help="TDM iterations (default: 200 digits, 600 per K toy2d; with --pipeline 1000 sd15, 500 sd3)")
    digits_cli.add_demo_arguments(p)
    p.add_argument("--pipeline", choices=["sd15", "sd3"], default=None,
                   help="distil the shipped digits text-to-image pipeline (stock diffusers classes) through --preset "
                        "and judge it through the stock pipeline; writes runs/demo-<pipeline>/")
    p.add_argument("--model", default=None, help="with --pipeline: a pipeline folder of that kind instead of the shipped one")
    p.add_argument("--onnx", action="store_true",
                   help="with --pipeline sd15: also `tdm-fast export` the student and score its ONNX Runtime samples "
                        "against torch's (FID, bootstrap std; a few minutes more)")
    p.set_defaults(func=cmd_demo, samples=None)  # --samples: 2000 (digits and --pipeline); refused for toy2d

    p = verbs.add_parser("eval", help="score a digits student against the NFE-matched baselines; --ablations: reproduction table")
    digits_cli.add_eval_arguments(p)
    p.set_defaults(func=_verb(digits_cli.run_eval))

    classifier = _Verbs(verbs.add_parser("classifier", help="the digits classifier behind FID").add_subparsers(dest="classifier_verb", required=True), common)
    p = classifier.add_parser("train", help="train the digits classifier (the shipped one: defaults)")
    digits_cli.add_classifier_arguments(p)
    p.set_defaults(func=_verb(digits_cli.run_classifier_train))

    from .perf.bench_report import add_bench_arguments, run_bench

    p = verbs.add_parser("bench", help="run benchmark suites -> bench/RESULTS.md; `bench plan`: FLOPs and GPU-hours of a real backbone")
    add_bench_arguments(p)
    p.set_defaults(func=run_bench)

    teacher = _Verbs(verbs.add_parser("teacher", help="built-in teachers").add_subparsers(dest="teacher_verb", required=True), common)
    p = teacher.add_parser("train", help="train a built-in teacher")
    p.add_argument("--dataset", choices=["toy2d", "digits", "digits-t2i"], default="toy2d",
                   help="digits-t2i: a tiny text-to-image pipeline of stock diffusers classes (needs --pipeline)")
    p.add_argument("--out", required=True)
    p.add_argument("--iterations", type=positive_int, default=None,
                   help="default 2000 (toy2d), 2500 (digits, the shipped teacher), 2000 (digits-t2i denoiser)")
    p.add_argument("--hidden", type=positive_int, default=None, help="toy2d MLP width (default 128)")
    p.add_argument("--seed", type=int, default=None, help="default 0, or the built-in teacher's own (--architecture)")
    digits_cli.add_teacher_arguments(p)
    g = p.add_argument_group("digits-t2i (tdm-fast teacher train --dataset digits-t2i --pipeline sd15|sd3 --out DIR)")
    g.add_argument("--pipeline", choices=["sd15", "sd3"], default=None, help="StableDiffusionPipeline or StableDiffusion3Pipeline folder")
    g.add_argument("--vae-iterations", type=int, default=None, help="AutoencoderKL iterations (default 400)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 2)")
    g.add_argument("--eval-samples", type=int, default=None, help="also score this many 50-step CFG images with the digits classifier")
    # --batch-size/--lr/--cond-dropout: digits 128/2e-3/0.15, digits-t2i 128/2e-3/0.1
    p.set_defaults(func=cmd_teacher_train, batch_size=None, lr=None, cond_dropout=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .trainer import NonFiniteError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or argparse's one-line error: an exit code, not an exception
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.func(args)
    except (UsageError, CheckpointError, ValueError, FileNotFoundError, RunLockedError, NonFiniteError) as exc:
        print(f"tdm-fast: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
