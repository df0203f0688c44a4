"""``tdm-fast sample`` (a class-conditional student, or prompts through an exported pipeline),
``tdm-fast export`` (torch.compile / ONNX / TensorRT of the K-step sampler) and ``tdm-fast convert`` (an
official TDM release as a student folder that the other two take)."""
from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

from ..denoiser import load_denoiser
from ..export.cli import add_backend_arguments, add_export_arguments
from ..sampling import check_steps
from ..solvers import SOLVERS, trained_solver
from ..usage import UsageError, check_allocation, check_output_path


def _check_backend(backend: str, engine: str | None) -> None:
    if engine is not None:
        if backend not in ("compile", "onnx", "tensorrt"):
            raise UsageError(f"--engine is an exported program, graph or engine: use it with --backend compile, onnx or "
                             f"tensorrt, not {backend}")
        if not Path(engine).exists():
            raise UsageError(f"--engine {engine} does not exist")
        if backend == "compile" and Path(engine).is_file() and not zipfile.is_zipfile(engine):  # torch.export.save writes a zip
            raise UsageError(f"--engine {engine} is not a torch.export program: give a .pt2 file written by "
                             "tdm-fast export --format compile")
        if backend == "onnx" and Path(engine).is_file():  # parsed here: ONNX Runtime's own error is a traceback
            import onnx

            try:
                onnx.load(engine, load_external_data=False)
            except Exception as exc:  # protobuf's DecodeError, or a file cut short
                raise UsageError(f"--engine {engine} is not an ONNX graph ({str(exc).strip() or type(exc).__name__}): "
                                 "give a file written by tdm-fast export") from None
    if backend == "tensorrt":
        from ..export.tensorrt import tensorrt_available

        ok, why = tensorrt_available()
        if not ok:
            raise UsageError(f"--backend tensorrt: {why}")


def cmd_sample(args) -> int:
    if args.prompt is not None:
        return _sample_prompts(args)
    if args.checkpoint is None:
        raise UsageError("--checkpoint is required (or --prompt with --backend onnx --engine EXPORT_DIR)")
    import torch

    from ..sampling import sample_student

    if args.num < 1:
        raise UsageError(f"--num must be >= 1, got {args.num}")
    out = check_output_path(args.out, "--out", folder=False)
    check_output_path(out.with_suffix(".safetensors"), "--out", folder=False)
    check_output_path(out.with_suffix(".png"), "--out", folder=False)
    _check_backend(args.backend, args.engine)
    student = load_denoiser(args.checkpoint).eval()
    steps = args.steps
    check_steps([steps], student)
    if not isinstance(student.null_cond, int):
        raise UsageError("tdm-fast sample draws class labels; for text models use the diffusers pipeline with TDMScheduler")
    if getattr(student.model, "sample_shape", None) is None:
        raise UsageError(f"{type(student.model).__name__} does not say its sample shape; sample it from Python")
    bad = [label for label in args.labels or () if not 0 <= label < student.null_cond]
    if bad:
        raise UsageError(f"--labels {bad[0]}: this student's classes are 0..{student.null_cond - 1}")
    check_allocation("--num", args.num, student.model.sample_shape)
    g = torch.Generator().manual_seed(args.seed)
    labels = torch.tensor(args.labels) if args.labels else torch.randint(0, student.null_cond, (args.num,), generator=g)
    noise = torch.randn((labels.shape[0], *student.model.sample_shape), generator=g)
    solver = args.solver or trained_solver(args.checkpoint)
    if args.backend == "torch":
        samples = sample_student(student, noise, labels, steps, solver=solver)
    else:
        from ..export.cli import load_runner

        runner = load_runner(args.backend, args.checkpoint, steps, engine=args.engine, student=None if args.engine else student,
                             device="cpu" if args.backend == "onnx" else None, solver=solver)
        samples = runner(noise, labels).cpu()
    from safetensors.torch import save_file

    from ..atomic import atomic_files
    from ..plotting import save_samples_png

    with atomic_files([out.with_suffix(".safetensors"), out.with_suffix(".png")]) as (tensors_file, image_file):
        save_file({"samples": samples.contiguous(), "labels": labels}, tensors_file)
        save_samples_png(samples, labels, image_file, title=f"TDM student, K={steps}")
    print(f"wrote {out.with_suffix('.safetensors')} and {out.with_suffix('.png')}")
    return 0


def _sample_prompts(args) -> int:
    """``sample --prompt``: prompt → image through a ``tdm-fast export --pipeline`` folder, ONNX Runtime only
    (:class:`~tdm_fast.export.runtime.TextToImage`); one image per prompt."""
    import warnings

    if args.backend != "onnx" or args.engine is None:
        raise UsageError("--prompt samples a `tdm-fast export --pipeline` folder: add --backend onnx --engine EXPORT_DIR")
    out = check_output_path(args.out, "--out", folder=False)
    for suffix in (".safetensors", ".png"):
        check_output_path(out.with_suffix(suffix), "--out", folder=False)
    if not Path(args.engine).is_dir():
        raise UsageError(f"--engine {args.engine} is not a folder written by tdm-fast export --pipeline")
    from ..export.runtime import TextToImage, save_png

    runner = TextToImage(args.engine, steps=args.steps)  # refuses a bad folder before anything is written
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = runner(args.prompt, steps=args.steps, seed=args.seed, output_type="np").arrays
    for warning in caught:  # a truncated prompt: said once, in the CLI's format
        print(f"tdm-fast: warning: {warning.message}", file=sys.stderr)
    from safetensors.numpy import save_file

    from ..atomic import atomic_files

    with atomic_files([out.with_suffix(".safetensors"), out.with_suffix(".png")]) as (tensors_file, image_file):
        save_file({"images": images}, tensors_file,
                  metadata={"prompts": json.dumps(args.prompt), "steps": str(args.steps), "seed": str(args.seed)})
        save_png(images, image_file)
    print(f"wrote {out.with_suffix('.safetensors')} and {out.with_suffix('.png')}")
    return 0


def _hub_keywords(args) -> dict:
    return {"revision": args.revision, "variant": args.variant, "cache_dir": args.cache_dir}


def _resolve_export_models(args) -> None:
    """``--pipeline`` and ``--vae`` given as Hub model ids become their snapshot folders, before anything is
    loaded or written."""
    from ..hub import resolve_model

    if not (args.pipeline or args.vae):
        if any(_hub_keywords(args).values()):
            raise UsageError("--revision, --variant and --cache-dir select the files of --pipeline or --vae: add one")
        return
    if args.pipeline:
        args.pipeline = resolve_model(args.pipeline, "--pipeline", **_hub_keywords(args))
    if args.vae:
        args.vae = resolve_model(args.vae, "--vae", kind="vae", **_hub_keywords(args))


def cmd_export(args) -> int:
    from ..export.cli import check_export_args, run_export

    check_output_path(args.out, "--out")
    _resolve_export_models(args)
    check_export_args(args)
    student = load_denoiser(args.checkpoint)
    check_steps(args.steps, student, args.total_steps)
    run_export(args, student=student)
    return 0


def cmd_convert(args) -> int:
    from ..convert import convert_checkpoint
    from ..hub import resolve_model

    check_output_path(args.out, "--out")
    base = resolve_model(args.base, "--base", **_hub_keywords(args))
    out = convert_checkpoint(args.checkpoint, base, args.out, args.recipe, lora_scale=args.lora_scale,
                             max_sequence_length=args.max_sequence_length, variant=args.variant)
    print(f"wrote {out} (LoRA, scheduler/, student/, README.md)")
    return 0


def add_sample_parsers(verbs) -> None:
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
    add_backend_arguments(p)
    p.set_defaults(func=cmd_sample)

    p = verbs.add_parser("export", help="torch.export / ONNX / TensorRT export of the K-step sampler")
    add_export_arguments(p)
    p.set_defaults(func=cmd_export)

    from ..argtypes import positive_float, positive_int
    from ..convert import RECIPES
    from .hub_flags import add_hub_arguments

    p = verbs.add_parser("convert", help="an official TDM release (Hub file) as a student folder for sample/export")
    p.add_argument("--checkpoint", required=True, help="the release's LoRA/EMA file, or the folder it was downloaded to")
    p.add_argument("--base", required=True,
                   help="the base diffusers pipeline folder the release was distilled from, or its Hub model id")
    add_hub_arguments(p)
    p.add_argument("--recipe", required=True, choices=sorted(RECIPES), help="which release: its format and its authors' sampler")
    p.add_argument("--lora-scale", type=positive_float, default=None,
                   help="adapter scale folded into the LoRA's alpha (default: the release README's, 0.125 for tdm-sd3)")
    p.add_argument("--max-sequence-length", type=positive_int, default=None,
                   help="T5 tokens of the prompts (SD3; default: the pipeline's) for the student's empty-prompt condition")
    p.add_argument("--out", required=True, help="the student folder to write")
    p.set_defaults(func=cmd_convert)

