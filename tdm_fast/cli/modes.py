"""Which flags each mode of a verb reads, in one table: a flag given in a mode that does not read it is an
error (the README's promise), not silently dropped.

``MODE_FLAGS[verb]`` maps each mode to the flags that only some modes read; every other flag of the verb is
listed in ``SHARED_FLAGS[verb]`` (read in every mode). A verb of a group is named with its group (``teacher
train``). tests/test_cli_modes.py checks that every flag of every verb's parser is in one of the two, so a new
flag has to be placed here.
"""
from __future__ import annotations

from ..usage import UsageError

_LORA = ("--lora-rank", "--lora-alpha", "--lora-targets", "--fake-copy", "--export-kohya", "--init-lora")
# --export-fused: a full fine-tune writes fused/ anyway, so asking for it there is not a flag doing nothing
_HUB = ("--revision", "--variant", "--cache-dir")  # how the Hub model id a folder flag names is resolved
_PRESET = ("--preset", "--model", "--prompts", "--resolution", "--num-frames", "--max-sequence-length", "--embedding-cache",
           "--full-finetune", "--gradient-checkpointing", "--use-8bit-adam", "--export-fused", "--validation-prompt",
           "--push-to-hub") + _HUB
_ONNX = ("--dtype", "--per-network", "--vae", "--pipeline", "--dynamic-resolution", "--opset", "--exporter") + _HUB
_TENSORRT = ("--trt-batch", "--trt-resolution", "--trt-precision", "--timing-cache")
_DIGITS_TRAINING = ("--batch-size", "--lr", "--cond-dropout")

# verb -> mode -> (how the mode reads in an error, the flags only some modes read that this one does)
MODE_FLAGS = {
    "distill": {
        "teacher": ("distill --teacher (a saved denoiser)", ("--teacher", "--conditions", "--sample-shape")),
        "preset-lora": ("distill --preset (a LoRA student)", _PRESET + _LORA),
        "preset-full": ("distill --preset --full-finetune (no LoRA)", _PRESET),
    },
    "export": {
        "compile": ("export --format compile", ("--compile-mode",)),
        "onnx": ("export --format onnx", _ONNX),
        "tensorrt": ("export --format tensorrt", _ONNX + _TENSORRT),
    },
    "sample": {
        "labels": ("sample --checkpoint (class labels)", ("--checkpoint", "--num", "--labels", "--solver")),
        "prompt": ("sample --prompt (an exported pipeline: the graphs fix the model and its solver)", ("--prompt",)),
    },
    "demo": {
        "digits": ("demo (the digits teacher)", ("--samples", "--eval-seeds", "--digits-teacher")),
        "pipeline": ("demo --pipeline (a digits text-to-image pipeline)", ("--pipeline", "--model", "--onnx", "--samples",
                                                                            "--eval-seeds")),
        "toy2d": ("demo --dataset toy2d", ()),
    },
    "eval": {
        "score": ("eval STUDENT (scoring a saved student)", ("--teacher", "--steps", "--eval-seeds", "--cfg-scale", "--json")),
        "ablations": ("eval --ablations", ("--teacher", "--builtin-teacher", "--out", "--iterations", "--seeds", "--variants",
                                           "--curve-every")),
        "ablations-pipeline": ("eval --ablations --pipeline (the shipped pipeline, no curve)",
                               ("--pipeline", "--out", "--iterations", "--seeds", "--variants")),
    },
    "teacher train": {
        "toy2d": ("teacher train --dataset toy2d", ("--hidden",)),
        "digits": ("teacher train --dataset digits (its UNet has a fixed size)", ("--architecture",) + _DIGITS_TRAINING),
        "digits-t2i": ("teacher train --dataset digits-t2i", ("--pipeline", "--vae-iterations", "--threads", "--eval-samples")
                       + _DIGITS_TRAINING),
    },
}
SHARED_FLAGS = {
    "distill": ("--out", "--config", "--resume", "--override", "--quiet", "--help", "<every TDMConfig flag>"),
    "export": ("--format", "--checkpoint", "--out", "--steps", "--total-steps", "--solver", "--batch-size", "--shape",
               "--cond-shape", "--no-verify", "--device", "--quiet", "--help"),
    "sample": ("--steps", "--seed", "--out", "--backend", "--engine", "--quiet", "--help"),
    "demo": ("--dataset", "--out", "--iterations", "--seed", "--quiet", "--help"),
    "eval": ("--ablations", "--samples", "--quiet", "--help"),
    "teacher train": ("--dataset", "--out", "--iterations", "--seed", "--quiet", "--help"),
}


def mode_of(verb: str, args) -> str | None:
    """The mode ``args`` select (None: a verb without modes in the table)."""
    if verb == "distill":
        return "teacher" if not args.preset else "preset-full" if args.full_finetune else "preset-lora"
    if verb == "export":
        return args.format
    if verb == "sample":
        return "prompt" if args.prompt is not None else "labels"
    if verb == "demo":
        return "toy2d" if args.dataset == "toy2d" else "pipeline" if args.pipeline is not None else "digits"
    if verb == "eval":
        return ("ablations-pipeline" if args.pipeline is not None else "ablations") if args.ablations else "score"
    if verb == "teacher train":
        return args.dataset
    return None


def given_flags(verb_parser, argv: list[str]) -> list[str]:
    """The flags of ``verb_parser`` that ``argv`` names (abbreviations resolved as argparse resolves them)."""
    options = verb_parser._option_string_actions
    given = []
    for token in argv:
        name = token.split("=", 1)[0]
        if not name.startswith("--"):
            continue
        matches = [name] if name in options else [o for o in options if o.startswith(name) and o.startswith("--")]
        if len(matches) == 1:
            given.append(max(options[matches[0]].option_strings, key=len))
    return given


def refuse_unread_flags(verb: str, args, verb_parser, argv: list[str]) -> None:
    """A flag given in a mode of ``verb`` that does not read it: one line naming it and the mode."""
    mode = mode_of(verb, args)
    if mode is None:
        return
    described, reads = MODE_FLAGS[verb][mode]
    only_some = {flag for _, flags in MODE_FLAGS[verb].values() for flag in flags}
    unread = [flag for flag in dict.fromkeys(given_flags(verb_parser, argv)) if flag in only_some and flag not in reads]
    if unread:
        readers = [d for m, (d, flags) in MODE_FLAGS[verb].items() if unread[0] in flags]
        raise UsageError(f"{' and '.join(unread)} {'does' if len(unread) == 1 else 'do'} nothing in {described}: "
                         f"{unread[0]} applies to {' or '.join(readers)}; drop it")
