"""``tdm-fast demo``, ``eval``, ``classifier train``, ``bench`` and ``teacher train``: the built-in teachers,
their demos and the benchmark suites."""
from __future__ import annotations

from pathlib import Path

from ..argtypes import positive_int
from ..usage import UsageError, check_output_path
from . import digits as digits_cli
from .digits import run_demo, run_teacher_train


def cmd_demo(args) -> int:
    # which flags each --dataset / --pipeline reads: tdm_fast/cli/modes.py
    if args.onnx and args.pipeline != "sd15":
        raise UsageError(f"--onnx scores the exported student of --pipeline sd15, not --pipeline {args.pipeline}")
    if args.pipeline is not None:
        from ..demos.t2i_demo import run_t2i_demo

        out = Path(args.out or f"runs/demo-{args.pipeline}")
        run_t2i_demo(args.pipeline, out, iterations=args.iterations, samples=args.samples or 2000, seed=args.seed,
                     eval_seed=(args.eval_seeds or [0])[0], model=args.model, progress=not args.quiet, onnx=args.onnx)
        print((out / "metrics.md").read_text())
        print(f"sample grid: {out / 'grid.png'}")
        return 0
    if args.dataset == "digits":

        args.out = args.out or "runs/demo"
        check_output_path(args.out, "--out")
        args.samples = args.samples or 2000
        run_demo(args)
        print(f"sample grid: {Path(args.out) / 'grid.png'}")
        return 0
    from ..demos.demo_toy import run_toy_demo

    out = check_output_path(args.out or "runs/demo-toy", "--out")
    run_toy_demo(out, iterations=args.iterations or 600, progress=not args.quiet, seed=args.seed)
    print((out / "metrics.md").read_text())
    print(f"scatter plot: {out / 'scatter.png'}")
    return 0


def cmd_teacher_train(args) -> int:
    from ..atomic import refuse_foreign_folder

    check_output_path(args.out, "--out")
    refuse_foreign_folder(args.out, "--out", ("denoiser.json", "model_index.json"))  # the new teacher replaces the folder
    # which flags each --dataset reads: tdm_fast/cli/modes.py
    if args.dataset == "digits-t2i":
        if args.pipeline is None:
            raise UsageError("--dataset digits-t2i needs --pipeline sd15 or sd3")
        _build_t2i_pipeline(args)
        return 0
    if args.dataset == "digits":
        args.batch_size = 128 if args.batch_size is None else args.batch_size
        if args.architecture == "digits":
            args.lr = 2e-3 if args.lr is None else args.lr
        args.cond_dropout = 0.15 if args.cond_dropout is None else args.cond_dropout
        run_teacher_train(args)
        return 0
    from ..demos.toy2d import train_toy_teacher

    teacher = train_toy_teacher(iterations=args.iterations or 2000, seed=args.seed or 0, hidden=args.hidden or 128,
                                progress=not args.quiet)
    from ..atomic import atomic_folder

    with atomic_folder(args.out) as folder:  # a kill or a full disk leaves the previous teacher folder whole
        teacher.save_pretrained(folder)
    print(f"teacher saved to {args.out}")
    return 0


def cmd_bench(args) -> int:
    """``tdm-fast bench [suite ...]`` or ``tdm-fast bench plan ...``; returns the exit code."""
    from ..perf.bench_report import bench_plan, run_bench

    suites = list(args.suites)
    if "plan" in suites:
        if suites != ["plan"]:
            raise ValueError("'plan' is not a suite: run `tdm-fast bench plan ...` on its own")
        bench_plan(args.preset, steps=tuple(args.steps), batch=args.batch, iters=args.iters, gpu=args.gpu,
                   peak_tflops=args.peak_tflops, mfu=args.mfu, resolution=args.resolution, num_frames=args.num_frames,
                   lora=args.lora, checkpointing=args.checkpointing, fake_updates=args.fake_updates,
                   exact_backward=args.exact_backward)
        return 0
    return run_bench(tuple(suites), render_only=args.render_only, results_dir=args.results_dir,
                     project_record=args.project_record, k=args.k, min_rel=args.min_rel,
                     fail_on_regression=args.fail_on_regression, pytest_args=args.pytest_args)


def _build_t2i_pipeline(args) -> dict:
    """``tdm-fast teacher train --dataset digits-t2i --pipeline sd15|sd3 --out DIR``."""
    from ..demos.t2i import build_pipeline

    recipe = {key: value for key, value in (("batch_size", args.batch_size), ("lr", args.lr), ("cond_dropout", args.cond_dropout))
              if value is not None}
    info = build_pipeline(args.pipeline, args.out, iterations=args.iterations, vae_iterations=args.vae_iterations,
                          seed=args.seed or 0, progress=not args.quiet, evaluate=args.eval_samples or 0,
                          threads=args.threads or 2, **recipe)
    acc = f"; {info['eval']['accuracy']:.1%} class accuracy at 50 steps CFG {info['eval']['guidance_scale']}" if "eval" in info else ""
    print(f"saved the digits-t2i {args.pipeline} pipeline to {args.out} ({info['build_wall_s']:.0f} s{acc}); "
          f"to ship it, copy the folder to tdm_fast/assets/t2i/{args.pipeline}/")
    return info


def add_tool_parsers(verbs, nested, verb) -> None:
    """``nested(parser, dest)``: a verb group's own sub-commands; ``verb(run)``: a verb whose work is ``run(args)``."""
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
    p.set_defaults(func=verb(digits_cli.run_eval))

    classifier = nested(verbs.add_parser("classifier", help="the digits classifier behind FID"), "classifier_verb")
    p = classifier.add_parser("train", help="train the digits classifier (the shipped one: defaults)")
    digits_cli.add_classifier_arguments(p)
    p.set_defaults(func=verb(digits_cli.run_classifier_train))

    from ..perf.bench_report import add_bench_arguments

    p = verbs.add_parser("bench", help="run benchmark suites -> bench/RESULTS.md; `bench plan`: FLOPs and GPU-hours of a real backbone")
    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)

    teacher = nested(verbs.add_parser("teacher", help="built-in teachers"), "teacher_verb")
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
    g.add_argument("--vae-iterations", type=positive_int, default=None, help="AutoencoderKL iterations (default 400)")
    g.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default 2)")
    g.add_argument("--eval-samples", type=int, default=None, help="also score this many 50-step CFG images with the digits classifier")
    # --batch-size/--lr/--cond-dropout: digits 128/2e-3/0.15, digits-t2i 128/2e-3/0.1
    p.set_defaults(func=cmd_teacher_train, batch_size=None, lr=None, cond_dropout=None)
