"""The digits verbs' flags and what they run; :mod:`tdm_fast.cli` wires them.

    tdm-fast teacher train --dataset digits   add_teacher_arguments   / run_teacher_train
    tdm-fast classifier train                 add_classifier_arguments / run_classifier_train
    tdm-fast eval [STUDENT]                   add_eval_arguments      / run_eval
    tdm-fast eval --ablations                 add_eval_arguments      / run_eval (dispatches to run_ablations)
    tdm-fast demo                             add_demo_arguments      / run_demo
"""
from __future__ import annotations

import json
from pathlib import Path

from ..demos.digits import IMAGE_SIZE
from ..denoiser import load_denoiser
from ..sampling import check_steps
from ..usage import UsageError, add_once, check_allocation, check_output_path
from ..demos.demo_digits import DEMO_ITERATIONS, add_demo_arguments, run_digits_demo
from ..eval.classifier import CLASSIFIER_ASSET, add_classifier_arguments, train_digits_classifier

__all__ = [
    "add_classifier_arguments", "add_demo_arguments", "add_eval_arguments", "add_teacher_arguments",
    "run_classifier_train", "run_demo", "run_eval", "run_teacher_train",
]


def add_eval_arguments(parser) -> None:
    from ..argtypes import fid_sample_count, finite_float, non_negative_int, positive_int
    from ..demos.teachers import TEACHERS

    """``tdm-fast eval STUDENT`` scores a saved digits student; ``--ablations`` runs the reproduction table."""
    parser.add_argument("student", nargs="?", help="a saved student folder (Denoiser.save_pretrained)")
    parser.add_argument("--teacher", default=None, help="digits teacher folder (default: the shipped one)")
    parser.add_argument("--steps", type=positive_int, nargs="+", default=None, help="K values (default: the student's steps set, else 4)")
    parser.add_argument("--samples", type=fid_sample_count, default=2000, help="samples per seed scored by FID (at least 2)")
    parser.add_argument("--eval-seeds", type=int, nargs="+", default=[0, 1, 2])
    # any finite w: 1 is the plain conditional teacher, below 1 it leans toward the unconditional one
    parser.add_argument("--cfg-scale", type=finite_float, default=None, help="teacher CFG of the reference (default 2)")
    parser.add_argument("--json", default=None, help="write the results here")
    ablations = parser.add_argument_group("ablations (tdm-fast eval --ablations)")
    ablations.add_argument("--ablations", action="store_true", help="train and evaluate the ablation variants")
    ablations.add_argument("--builtin-teacher", choices=list(TEACHERS), default=None,
                           help="run them on this built-in teacher with its recipe (default: the shipped digits "
                                "teacher, or --teacher); e.g. with --out runs/ablations-NAME")
    ablations.add_argument("--pipeline", choices=["sd15", "sd3"], default=None,
                           help="run them on this shipped tiny text-to-image pipeline through the demo's path (--preset, "
                                "LoRA roles, its recipe; default variants tdm fisher dpmsolver), e.g. with --out "
                                "runs/ablations-sd15")
    if "--out" not in parser._option_string_actions:
        ablations.add_argument("--out", default="runs/ablations")
    ablations.add_argument("--iterations", type=positive_int, default=600, help="per student (600, as bench/bench_ablations.py)")
    ablations.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds of each variant")
    ablations.add_argument("--variants", nargs="+", default=None)
    ablations.add_argument("--curve-every", type=non_negative_int, default=None,
                           help="digits-scale teachers: a quality-vs-iterations curve every N iterations (default 50; 0: none)")


def _check_eval_args(args) -> None:
    """What ``tdm-fast eval`` refuses before it loads a network or writes a file (beyond the flags its mode does
    not read: tdm_fast/cli/modes.py)."""
    if args.ablations:
        from ..eval.ablations import VARIANTS

        if args.student:
            raise UsageError(f"--ablations trains its own students: give either a student folder ({args.student}) or --ablations")
        unknown = [v for v in args.variants or () if v not in VARIANTS]
        if unknown:
            raise UsageError(f"--variants {unknown[0]}: not a variant (choose among {', '.join(VARIANTS)})")
        if args.builtin_teacher:
            _check_builtin_teacher(args)
        check_output_path(args.out or "runs/ablations", "--out")
    elif not args.student:
        raise UsageError("tdm-fast eval: give a student folder, or --ablations")
    check_allocation("--samples", args.samples, (1, IMAGE_SIZE, IMAGE_SIZE))  # the noise and the images of one seed
    if args.teacher is not None and not Path(args.teacher).exists():
        raise UsageError(f"--teacher {args.teacher} does not exist")
    if args.json:
        check_output_path(args.json, "--json", folder=False)


def _check_builtin_teacher(args) -> None:
    from ..demos.teachers import TEACHERS

    name = args.builtin_teacher
    if args.teacher is not None:
        raise UsageError(f"give either --teacher ({args.teacher}) or --builtin-teacher ({name}), not both")
    asset = TEACHERS[name].asset
    missing = TEACHERS[name].missing_files()
    if missing:
        raise UsageError(f"--builtin-teacher {name}: no {' or '.join(map(str, missing))}; rebuild it with `tdm-fast teacher "
                         f"train --dataset digits --architecture {name} --out DIR` and copy DIR/{asset.name}.* into {asset.parent}")


def check_digits_student(student, teacher, path) -> None:
    """A student ``tdm-fast eval`` can score: it samples the digits teacher's shape and classes."""

    want = tuple(teacher.model.sample_shape)
    got = getattr(student.model, "sample_shape", None)
    if got is None or tuple(got) != want or student.null_cond != teacher.null_cond:
        what = f"samples of shape {tuple(got)}" if got is not None else f"a {type(student.model).__name__} network"
        raise UsageError(f"{path} is not a student of the digits teacher: it has {what} and null class {student.null_cond!r}, "
                         f"the teacher {want} and {teacher.null_cond!r}; tdm-fast eval scores digits students")


def run_eval(args) -> dict:
    _check_eval_args(args)
    if args.ablations:
        from ..eval.ablations import VARIANTS, run_ablations

        if args.pipeline:
            from ..demos.t2i_ablations import DEFAULT_VARIANTS, run_pipeline_ablations

            say = (lambda _m: None) if getattr(args, "quiet", False) else print
            table, results = run_pipeline_ablations(args.pipeline, args.out or "runs/ablations", tuple(args.variants or DEFAULT_VARIANTS),
                                                    tuple(args.seeds), args.iterations, args.samples, say=say)
            print(table)
            return results
        table, results = run_ablations(
            args.out or "runs/ablations", iterations=args.iterations, seeds=tuple(args.seeds),
            variants=tuple(args.variants or VARIANTS), samples=args.samples,
            curve_every=50 if args.curve_every is None else args.curve_every,
            teacher_path=args.teacher, builtin_teacher=args.builtin_teacher, progress=not getattr(args, "quiet", False),
        )
        print(table)
        return results
    from ..demos.digits import DIGITS_CFG_SCALE, load_digits_teacher
    from ..eval.digits import evaluate_digits, format_table

    teacher = load_digits_teacher(args.teacher)
    student = load_denoiser(args.student).eval()
    check_digits_student(student, teacher, args.student)
    steps = args.steps or list(student.steps_set or (4,))
    check_steps(steps, student)
    results = evaluate_digits(
        teacher, {k: student for k in steps}, args.cfg_scale or DIGITS_CFG_SCALE, samples=args.samples,
        seeds=tuple(args.eval_seeds), progress=None if getattr(args, "quiet", False) else print,
    )
    print(format_table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


def add_teacher_arguments(parser) -> None:
    """argparse options of ``tdm-fast teacher train --dataset digits`` (progress: the CLI's --quiet)."""
    add_once(parser, "--out", default="runs/digits_teacher", help="folder for the trained teacher")
    from ..argtypes import positive_float, positive_int, probability

    add_once(parser, "--iterations", type=positive_int, default=None, help="default 2500 (the shipped teacher)")
    add_once(parser, "--seed", type=int, default=0)
    add_once(parser, "--batch-size", type=positive_int, default=128)
    add_once(parser, "--lr", type=positive_float, default=2e-3)
    add_once(parser, "--cond-dropout", type=probability, default=0.15, help="rate of null-class labels (for CFG), in [0, 1)")
    add_once(parser, "--architecture", default="digits", choices=["digits", "digits-small-v", "digits-dit"],
                 help="which built-in digits teacher (tdm_fast.demos.teachers): the shipped UNet, a smaller v-predicting "
                  "UNet, or a flow-matching transformer")


def run_teacher_train(args) -> dict:
    architecture = getattr(args, "architecture", "digits")
    if architecture != "digits":
        from ..demos.teachers import TEACHERS, train_builtin_teacher

        settings = {"iterations": getattr(args, "iterations", None) or TEACHERS[architecture].training["iterations"],
                    "batch_size": getattr(args, "batch_size", 128), "lr": getattr(args, "lr", None) or TEACHERS[architecture].training["lr"],
                    "cond_dropout": getattr(args, "cond_dropout", 0.15)}
        if getattr(args, "seed", None) is not None:
            settings["seed"] = args.seed
        teacher = train_builtin_teacher(architecture, args.out, progress=not getattr(args, "quiet", False), **settings)
        stem = TEACHERS[architecture].asset.name
        print(f"saved the {architecture} teacher to {args.out} ({teacher.training_info['wall_s']:.0f} s); "
              f"to ship it, copy {args.out}/{stem}.safetensors and .json into tdm_fast/assets/")
        return teacher.training_info
    from ..demos.digits import TEACHER_ASSET, train_digits_teacher

    teacher = train_digits_teacher(
        args.out, iterations=getattr(args, "iterations", None) or 2500, batch_size=getattr(args, "batch_size", 128),
        lr=getattr(args, "lr", 2e-3), cond_dropout=getattr(args, "cond_dropout", 0.15), seed=getattr(args, "seed", None) or 0,
        progress=not getattr(args, "quiet", False),
    )
    print(f"saved the digits teacher to {args.out} ({teacher.training_info['wall_s']:.0f} s); "
          f"to ship it, copy {args.out}/{TEACHER_ASSET}.safetensors and .json into tdm_fast/assets/")
    return teacher.training_info


def run_demo(args) -> dict:
    results = run_digits_demo(
        args.out, iterations=getattr(args, "iterations", None) or DEMO_ITERATIONS, samples=getattr(args, "samples", None) or 2000,
        seeds=tuple(getattr(args, "eval_seeds", None) or [0]), seed=getattr(args, "seed", 0),
        teacher_path=getattr(args, "digits_teacher", None), progress=not getattr(args, "quiet", False),
    )
    print((Path(args.out) / "metrics.md").read_text())
    return results


def run_classifier_train(args) -> dict:
    for suffix in (".safetensors", ".json"):  # --out is a path stem: both files must be creatable
        check_output_path(Path(args.out).with_suffix(suffix), "--out", folder=False)
    _, info = train_digits_classifier(args.out, iterations=getattr(args, "iterations", None) or 1500,
                                      seed=getattr(args, "seed", 0), progress=not getattr(args, "quiet", False))
    print(f"held-out accuracy {info['heldout_accuracy']:.4f}; saved {args.out}.safetensors and .json "
          f"(copy them to tdm_fast/assets/{CLASSIFIER_ASSET}.* to ship)")
    return info
