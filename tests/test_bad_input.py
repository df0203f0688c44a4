"""The bad-input table (issue 16): every foreseeable user mistake, verb by verb.

Each case must end with exit code 2, exactly one stderr line ``tdm-fast: error: …`` naming the
offending flag or file, no traceback, and the directory trees untouched: the shared fixtures
(teacher, a trained run, corrupt copies, a tiny SD 1.5 pipeline) and the test's own folder, which is
also the working directory (so a default output path such as ``runs/demo`` would show up too).
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from tdm_fast.cli import main
from tdm_fast.demos.toy2d import ToyMLP, toy_denoiser

TINY = ["--batch-size", "16", "--fake-lr", "1e-3", "--cfg-scale", "3", "--kernels", "reference", "--quiet"]


# -- fixtures ------------------------------------------------------------------------------------
def _truncate(file, keep: float = 0.5):
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


def _edit_json(file, **changes):
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Everything the cases point at, built once: W/teacher, W/run (student K ∈ {1, 2, 4}), W/bad/* and W/sd/*."""
    root = tmp_path_factory.mktemp("world")
    teacher = root / "teacher"
    torch.manual_seed(0)
    toy_denoiser(ToyMLP(hidden=32, depth=1)).save_pretrained(teacher)
    run = root / "run"
    assert main(["distill", "--teacher", str(teacher), "--out", str(run), "--iterations", "2", "--steps", "1", "2", "4", *TINY]) == 0
    bad = root / "bad"
    bad.mkdir()

    def teacher_copy(name):
        shutil.copytree(teacher, bad / name)
        return bad / name

    def student_copy(name):
        shutil.copytree(run / "student", bad / name)
        return bad / name

    _truncate(teacher_copy("teacher-trunc") / "model" / "diffusion_pytorch_model.safetensors")
    (teacher_copy("teacher-garbage") / "denoiser.safetensors").write_bytes(b"garbage")
    (teacher_copy("teacher-trunc-denoiser") / "denoiser.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{")
    shutil.rmtree(teacher_copy("teacher-no-model") / "model")
    (teacher_copy("teacher-model-config") / "model" / "config.json").write_text("{ not json")
    _edit_json(teacher_copy("teacher-os-system") / "denoiser.json", model_class="os:system")
    _edit_json(teacher_copy("teacher-evil") / "denoiser.json", model_class="evil_mod:X")
    _edit_json(teacher_copy("teacher-not-a-net") / "denoiser.json", model_class="tdm_fast.demos.toy2d:NUM_CLASSES")
    (teacher_copy("teacher-json") / "denoiser.json").write_text("{ model_class: ")
    (teacher_copy("teacher-json-keys") / "denoiser.json").write_text(json.dumps({"model_class": "tdm_fast.demos.toy2d:ToyMLP"}))
    (teacher_copy("teacher-json-list") / "denoiser.json").write_text("[1, 2, 3]")
    _edit_json(teacher_copy("teacher-schedule") / "denoiser.json", schedule={"kind": "banana"})
    (teacher_copy("teacher-empty-json") / "denoiser.json").write_bytes(b"")

    _truncate(student_copy("student-trunc") / "model" / "diffusion_pytorch_model.safetensors")
    (student_copy("student-garbage") / "denoiser.safetensors").write_bytes(b"garbage")
    save_file({}, student_copy("student-no-k") / "denoiser.safetensors")
    (student_copy("student-empty-json") / "denoiser.json").write_bytes(b"")

    (bad / "afile").write_text("a regular file\n")
    (bad / "clf.safetensors").mkdir()
    (bad / "types.yaml").write_text("fake_lr: fast\n")
    (bad / "bool.json").write_text(json.dumps({"batch_size": True}))
    (bad / "syntax.yaml").write_text("fake_lr: [1e-3,\nbatch_size: 4\n")
    (bad / "list.yaml").write_text("- fake_lr\n- 1e-3\n")
    (bad / "unknown.yaml").write_text("fake_lrr: 1e-3\n")
    (bad / "broken.json").write_text('{"fake_lr": 1e-3,')
    (bad / "range.yaml").write_text("log_every: 0\n")
    (bad / "cond-garbage.safetensors").write_bytes(b"garbage")
    save_file({}, bad / "cond-empty.safetensors")
    save_file({"a": torch.zeros(2, 3), "b": torch.zeros(3, 3)}, bad / "cond-mismatch.safetensors")
    (bad / "empty-prompts.txt").write_text("# only a comment\n\n   \n")
    (bad / "bad-prompts.jsonl").write_text('{"prompt": "a cat"}\nnot json\n')
    (bad / "prompts.txt").write_text("a photo of a cat\n")
    (bad / "prompts-utf16.txt").write_text("a photo of a cat\n", encoding="utf-16")
    (bad / "prompts-binary.txt").write_bytes(bytes(range(128, 256)))
    (bad / "garbage.onnx").write_bytes(b"\x08\x07garbage, not a protobuf")
    (bad / "lock-is-folder" / ".lock").mkdir(parents=True)

    from _backbone_tiny import build_sd15

    sd = root / "sd"
    build_sd15(sd / "full")
    shutil.rmtree(sd / "full" / "_tok", ignore_errors=True)
    for name, missing in (("no-unet", "unet"), ("no-scheduler", "scheduler"), ("no-text-encoder", "text_encoder")):
        shutil.copytree(sd / "full", sd / name)
        shutil.rmtree(sd / name / missing)
    shutil.copytree(sd / "full", sd / "trunc-unet")
    _truncate(next((sd / "trunc-unet" / "unet").glob("*.safetensors")))
    _sd3_and_lora_runs(root)
    return root


def _sd3_and_lora_runs(root):
    """W/sd3/* (a tiny SD3 pipeline and copies missing a component) and W/lora: a preset run of each backbone,
    their students pointed at the other backbone's pipeline (and at an SD 1.5 pipeline of another size)."""
    from _backbone_tiny import build_sd3

    from tdm_fast.demos import t2i

    sd3 = root / "sd3"
    build_sd3(sd3 / "full")
    shutil.rmtree(sd3 / "full" / "_tok", ignore_errors=True)
    for name, missing in (("no-transformer", "transformer"), ("no-scheduler", "scheduler"), ("no-text-encoder-2", "text_encoder_2")):
        shutil.copytree(sd3 / "full", sd3 / name)
        shutil.rmtree(sd3 / name / missing)
    shutil.copytree(sd3 / "full", sd3 / "trunc-transformer")
    _truncate(next((sd3 / "trunc-transformer" / "transformer").glob("*.safetensors")))
    lora = root / "lora"
    for preset, model in (("sd15", root / "sd" / "full"), ("sd3", sd3 / "full")):
        assert main(["distill", "--preset", preset, "--model", str(model), "--prompts", str(root / "bad" / "prompts.txt"),
                     "--out", str(lora / preset), "--iterations", "1", "--steps", "1", "2", "4", "--lora-rank", "2",
                     "--embedding-cache", "none", *TINY]) == 0
        shutil.rmtree(lora / preset / "checkpoints")
    for name, run, base in (("sd15-on-sd3", "sd15", sd3 / "full"), ("sd3-on-sd15", "sd3", root / "sd" / "full"),
                            ("sd15-other-size", "sd15", t2i.shipped_pipeline("sd15"))):
        shutil.copytree(lora / run / "student", lora / name)
        _edit_json(lora / name / "model" / "lora_role.json", source={
            **json.loads((lora / name / "model" / "lora_role.json").read_text())["source"], "path": str(base)})


def _tree(root):
    """Every path under ``root`` with its bytes (None for a folder): what a case must leave as it was."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def _paths(world, tmp_path) -> dict:
    return {"T": world / "teacher", "R": world / "run", "S": world / "run" / "student", "B": world / "bad",
            "F": world / "bad" / "afile", "SD": world / "sd", "SD3": world / "sd3", "L": world / "lora", "O": tmp_path / "out",
            "tmp": tmp_path}


CASE_SECONDS = int(os.environ.get("TDM_FAST_CASE_SECONDS", "30"))  # a rejected input is rejected up front: a case still running by then started real work


class CaseTooSlow(BaseException):
    pass


def _too_slow(*_):
    raise CaseTooSlow(f"still running after {CASE_SECONDS} s: the input was not rejected before the work began")


def _check(argv: str, needle: str, world, tmp_path, capsys, monkeypatch):
    paths = _paths(world, tmp_path)
    monkeypatch.chdir(tmp_path)
    args = shlex.split(argv.format(**paths))
    before_world, before_tmp = _tree(world), _tree(tmp_path)
    capsys.readouterr()
    previous = signal.signal(signal.SIGALRM, _too_slow)
    signal.alarm(CASE_SECONDS)
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own exit path
        code = exc.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert code == 2, f"exit {code}: {err}"
    assert len(lines) == 1 and lines[0].startswith("tdm-fast: error: "), err
    assert needle.format(**paths) in lines[0], lines[0]
    assert _tree(tmp_path) == before_tmp, "the case wrote into its folder / the working directory"
    assert _tree(world) == before_world, "the case changed the shared fixtures"


def _table(cases):
    return pytest.mark.parametrize("argv, needle", [c[1:] for c in cases], ids=[c[0] for c in cases])


# -- distill -------------------------------------------------------------------------------------
DISTILL = [
    # teachers
    ("teacher-missing", "distill --teacher {B}/nowhere --out {O}", "{B}/nowhere"),
    ("teacher-is-file", "distill --teacher {F} --out {O}", "{F}"),
    ("teacher-trunc-weights", "distill --teacher {B}/teacher-trunc --out {O}", "{B}/teacher-trunc/model"),
    ("teacher-garbage-denoiser", "distill --teacher {B}/teacher-garbage --out {O}", "{B}/teacher-garbage/denoiser.safetensors"),
    ("teacher-trunc-denoiser", "distill --teacher {B}/teacher-trunc-denoiser --out {O}", "denoiser.safetensors"),
    ("teacher-no-model", "distill --teacher {B}/teacher-no-model --out {O}", "{B}/teacher-no-model/model"),
    ("teacher-model-config", "distill --teacher {B}/teacher-model-config --out {O}", "{B}/teacher-model-config/model"),
    ("model-class-os-system", "distill --teacher {B}/teacher-os-system --out {O}", "{B}/teacher-os-system/denoiser.json"),
    ("model-class-evil", "distill --teacher {B}/teacher-evil --out {O}", "'evil_mod:X'"),
    ("model-class-not-a-net", "distill --teacher {B}/teacher-not-a-net --out {O}", "NUM_CLASSES"),
    ("denoiser-json-syntax", "distill --teacher {B}/teacher-json --out {O}", "{B}/teacher-json/denoiser.json"),
    ("denoiser-json-keys", "distill --teacher {B}/teacher-json-keys --out {O}", "{B}/teacher-json-keys/denoiser.json"),
    ("denoiser-json-list", "distill --teacher {B}/teacher-json-list --out {O}", "{B}/teacher-json-list/denoiser.json"),
    ("denoiser-json-empty", "distill --teacher {B}/teacher-empty-json --out {O}", "{B}/teacher-empty-json/denoiser.json"),
    ("denoiser-schedule", "distill --teacher {B}/teacher-schedule --out {O}", "{B}/teacher-schedule/denoiser.json"),
    ("teacher-and-preset", "distill --teacher {T} --preset sd15 --out {O}", "--teacher"),
    ("neither-teacher-nor-preset", "distill --out {O}", "--teacher"),
    ("out-required", "distill --teacher {T}", "--out"),
    # config files
    ("config-missing", "distill --teacher {T} --out {O} --config {B}/nowhere.yaml", "{B}/nowhere.yaml"),
    ("config-wrong-type", "distill --teacher {T} --out {O} --config {B}/types.yaml", "{B}/types.yaml"),
    ("config-bool-for-int", "distill --teacher {T} --out {O} --config {B}/bool.json", "batch_size"),
    ("config-yaml-syntax", "distill --teacher {T} --out {O} --config {B}/syntax.yaml", "{B}/syntax.yaml"),
    ("config-list", "distill --teacher {T} --out {O} --config {B}/list.yaml", "{B}/list.yaml"),
    ("config-unknown-key", "distill --teacher {T} --out {O} --config {B}/unknown.yaml", "fake_lrr"),
    ("config-json-syntax", "distill --teacher {T} --out {O} --config {B}/broken.json", "{B}/broken.json"),
    ("config-range", "distill --teacher {T} --out {O} --config {B}/range.yaml", "log_every"),
    ("config-is-folder", "distill --teacher {T} --out {O} --config {B}", "{B}"),
    # settings
    ("log-every-0", "distill --teacher {T} --out {O} --log-every 0", "--log-every"),
    ("checkpoint-every-neg", "distill --teacher {T} --out {O} --checkpoint-every -1", "--checkpoint-every"),
    ("keep-last-neg", "distill --teacher {T} --out {O} --keep-last -2", "--keep-last"),
    ("warmup-neg", "distill --teacher {T} --out {O} --warmup-steps -3", "--warmup-steps"),
    ("fake-lr-inf", "distill --teacher {T} --out {O} --fake-lr inf", "--fake-lr"),
    ("fake-lr-nan", "distill --teacher {T} --out {O} --fake-lr nan", "--fake-lr"),
    ("fake-lr-neg", "distill --teacher {T} --out {O} --fake-lr -1", "--fake-lr"),
    ("fake-lr-text", "distill --teacher {T} --out {O} --fake-lr fast", "--fake-lr"),
    ("max-grad-norm-nan", "distill --teacher {T} --out {O} --max-grad-norm nan", "--max-grad-norm"),
    ("ema-decay-1.5", "distill --teacher {T} --out {O} --ema-decay 1.5", "--ema-decay"),
    ("ema-decay-0", "distill --teacher {T} --out {O} --ema-decay 0", "--ema-decay"),
    ("guidance-max-sigma-0", "distill --teacher {T} --out {O} --guidance-max-sigma 0", "--guidance-max-sigma"),
    ("guidance-max-sigma-nan", "distill --teacher {T} --out {O} --guidance-max-sigma nan", "--guidance-max-sigma"),
    ("guidance-max-below-min", "distill --teacher {T} --out {O} --guidance-min-sigma 2 --guidance-max-sigma 1",
     "--guidance-max-sigma"),
    ("adam-beta2-neg", "distill --teacher {T} --out {O} --adam-beta2 -0.1", "--adam-beta2"),
    ("total-steps-0", "distill --teacher {T} --out {O} --total-steps 0", "--total-steps"),
    ("huber-c-neg", "distill --teacher {T} --out {O} --huber-c -1", "--huber-c"),
    ("cfg-scale-nan", "distill --teacher {T} --out {O} --cfg-scale nan", "--cfg-scale"),
    ("weight-decay-neg", "distill --teacher {T} --out {O} --weight-decay -0.1", "--weight-decay"),
    ("adam-beta1-1", "distill --teacher {T} --out {O} --adam-beta1 1.0", "--adam-beta1"),
    ("steps-0", "distill --teacher {T} --out {O} --steps 0", "--steps"),
    ("steps-text", "distill --teacher {T} --out {O} --steps four", "--steps"),
    ("steps-duplicate", "distill --teacher {T} --out {O} --steps 2 2", "--steps"),
    ("steps-4-total-60", "distill --teacher {T} --out {O} --steps 4 --total-steps 60", "--steps"),
    ("steps-weights-count", "distill --teacher {T} --out {O} --steps 1 2 4 --steps-weights 1 2", "--steps-weights"),
    ("steps-weights-negative", "distill --teacher {T} --out {O} --steps 1 4 --steps-weights 1 -1", "--steps-weights"),
    ("steps-weights-zero", "distill --teacher {T} --out {O} --steps 1 4 --steps-weights 0 0", "--steps-weights"),
    ("batch-size-0", "distill --teacher {T} --out {O} --batch-size 0", "--batch-size"),
    ("iterations-neg", "distill --teacher {T} --out {O} --iterations -5", "--iterations"),
    ("matching-unknown", "distill --teacher {T} --out {O} --matching blurry", "--matching"),
    ("kernels-unknown", "distill --teacher {T} --out {O} --kernels cuda", "--kernels"),
    ("compile-scope-unknown", "distill --teacher {T} --out {O} --compile --compile-scope everything", "--compile-scope"),
    ("mixed-precision-unknown", "distill --teacher {T} --out {O} --mixed-precision fp8", "--mixed-precision"),
    ("max-nonfinite-skips-0", "distill --teacher {T} --out {O} --max-nonfinite-skips 0", "--max-nonfinite-skips"),
    ("sample-shape-wrong", "distill --teacher {T} --out {O} --sample-shape 3", "--sample-shape"),
    ("sample-shape-negative", "distill --teacher {T} --out {O} --sample-shape -3", "--sample-shape"),
    ("batch-size-huge", "distill --teacher {T} --out {O} --batch-size 1000000000000", "--batch-size 1000000000000"),
    ("seed-negative", "distill --teacher {T} --out {O} --seed -1", "--seed"),
    ("report-to-unknown", "distill --teacher {T} --out {O} --report-to banana", "--report-to"),
    ("unknown-flag", "distill --teacher {T} --out {O} --fake-lrr 1e-3", "--fake-lrr"),
    # output folder
    ("out-under-file", "distill --teacher {T} --out {F}/run", "--out"),
    ("out-is-file", "distill --teacher {T} --out {F}", "--out"),
    ("out-holds-run", "distill --teacher {T} --out {R} --iterations 4", "--resume"),
    ("lock-is-folder", "distill --teacher {T} --out {B}/lock-is-folder", "{B}/lock-is-folder/.lock is not a file"),
    # flags the mode does not read (tdm_fast/cli/modes.py)
    ("lora-rank-with-teacher", "distill --teacher {T} --out {O} --lora-rank 8", "--lora-rank does nothing"),
    ("conditions-with-preset", "distill --preset sd15 --model {SD}/full --prompts {B}/prompts.txt --out {O} "
     "--conditions {B}/cond-empty.safetensors", "--conditions does nothing"),
    # resume
    ("override-without-resume", "distill --teacher {T} --out {O} --override fake_lr", "--override"),
    ("resume-missing", "distill --teacher {T} --out {O} --resume {B}/nowhere", "{B}/nowhere"),
    ("resume-empty-out", "distill --teacher {T} --out {O} --resume", "{O}"),
    ("resume-override-steps", "distill --teacher {T} --out {R} --resume --steps 1 2 4 --override steps " + " ".join(TINY), "--override steps"),
    # iterations may be named (it stretches the LR decay); the other bookkeeping settings change freely, so naming them is an error
    ("resume-override-bookkeeping", "distill --teacher {T} --out {R} --resume --steps 1 2 4 --override keep_last " + " ".join(TINY),
     "--override keep_last"),
    ("resume-override-unknown", "distill --teacher {T} --out {R} --resume --steps 1 2 4 --override fake_lrr " + " ".join(TINY), "--override fake_lrr"),
    ("resume-changed-fake-lr", "distill --teacher {T} --out {R} --resume --steps 1 2 4 --iterations 4 " + " ".join(TINY).replace("1e-3", "2e-3"), "fake_lr"),
    ("resume-changed-steps", "distill --teacher {T} --out {R} --resume --steps 4 " + " ".join(TINY), "steps"),
    # conditions
    ("conditions-missing", "distill --teacher {T} --out {O} --conditions {B}/nowhere.safetensors", "--conditions"),
    ("conditions-garbage", "distill --teacher {T} --out {O} --conditions {B}/cond-garbage.safetensors", "--conditions"),
    ("conditions-empty", "distill --teacher {T} --out {O} --conditions {B}/cond-empty.safetensors", "--conditions"),
    ("conditions-mismatch", "distill --teacher {T} --out {O} --conditions {B}/cond-mismatch.safetensors", "--conditions"),
]


@_table(DISTILL)
def test_distill(argv, needle, world, tmp_path, capsys, monkeypatch):
    _check(argv, needle, world, tmp_path, capsys, monkeypatch)


# -- distill --preset (a tiny random SD 1.5 pipeline) --------------------------------------------
PRESET = "distill --preset sd15 --out {O} --iterations 1 --embedding-cache {tmp}/cache --quiet "
PRESET3 = PRESET.replace("--preset sd15", "--preset sd3")
DISTILL_PRESET = [
    ("model-missing", PRESET + "--model {SD}/nowhere --prompts {B}/prompts.txt", "{SD}/nowhere"),
    ("model-is-file", PRESET + "--model {F} --prompts {B}/prompts.txt", "--model {F}"),
    ("model-without-unet", PRESET + "--model {SD}/no-unet --prompts {B}/prompts.txt", "{SD}/no-unet/unet"),
    ("model-without-scheduler", PRESET + "--model {SD}/no-scheduler --prompts {B}/prompts.txt", "{SD}/no-scheduler/scheduler"),
    ("model-without-text-encoder", PRESET + "--model {SD}/no-text-encoder --prompts {B}/prompts.txt", "{SD}/no-text-encoder/text_encoder"),
    ("model-truncated-unet", PRESET + "--model {SD}/trunc-unet --prompts {B}/prompts.txt", "{SD}/trunc-unet/unet"),
    ("prompts-no-usable-line", PRESET + "--model {SD}/full --prompts {B}/empty-prompts.txt", "{B}/empty-prompts.txt"),
    ("prompts-bad-jsonl", PRESET + "--model {SD}/full --prompts {B}/bad-prompts.jsonl", "{B}/bad-prompts.jsonl"),
    ("prompts-missing", PRESET + "--model {SD}/full --prompts {B}/nowhere.txt", "{B}/nowhere.txt"),
    ("without-model", PRESET + "--prompts {B}/prompts.txt", "--model"),
    ("lora-rank-0", PRESET + "--model {SD}/full --prompts {B}/prompts.txt --lora-rank 0", "--lora-rank"),
    ("resolution-0", PRESET + "--model {SD}/full --prompts {B}/prompts.txt --resolution 0", "--resolution"),
    ("model-of-sd3", PRESET + "--model {SD3}/full --prompts {B}/prompts.txt", "--preset sd3"),
    ("init-lora-without-lora", PRESET + "--model {SD}/full --prompts {B}/prompts.txt --init-lora {B}",
     "--init-lora {B} holds no pytorch_lora_weights.safetensors"),
    ("init-lora-of-sd3", PRESET + "--model {SD}/full --prompts {B}/prompts.txt --init-lora {L}/sd3/lora",
     "has no place in this base's UNet2DConditionModel: a LoRA of another backbone"),
    ("init-lora-full-finetune", PRESET + "--model {SD}/full --prompts {B}/prompts.txt --init-lora {L}/sd15/lora --full-finetune",
     "--full-finetune"),
    # the flow-matching backbone (a tiny random SD3 pipeline)
    ("sd3-model-without-transformer", PRESET3 + "--model {SD3}/no-transformer --prompts {B}/prompts.txt", "{SD3}/no-transformer/transformer"),
    ("sd3-model-without-scheduler", PRESET3 + "--model {SD3}/no-scheduler --prompts {B}/prompts.txt", "{SD3}/no-scheduler/scheduler"),
    ("sd3-model-without-text-encoder", PRESET3 + "--model {SD3}/no-text-encoder-2 --prompts {B}/prompts.txt",
     "{SD3}/no-text-encoder-2/text_encoder_2"),
    ("sd3-model-truncated-transformer", PRESET3 + "--model {SD3}/trunc-transformer --prompts {B}/prompts.txt",
     "{SD3}/trunc-transformer/transformer"),
    ("sd3-prompts-no-usable-line", PRESET3 + "--model {SD3}/full --prompts {B}/empty-prompts.txt", "{B}/empty-prompts.txt"),
    ("sd3-model-of-sd15", PRESET3 + "--model {SD}/full --prompts {B}/prompts.txt", "--preset sd15"),
    *((f"prompts-{kind}", PRESET + f"--model {{SD}}/full --prompts {{B}}/prompts-{kind}.txt", f"{{B}}/prompts-{kind}.txt is not UTF-8")
      for kind in ("utf16", "binary")),
    # a size the VAE, then the UNet's downsamplings or the transformer's patches, cannot divide
    *((f"{name}-resolution-{size}", f"{argv}--model {{{model}}}/full --prompts {{B}}/prompts.txt --resolution {size}", f"--resolution {size}")
      for name, argv, model in (("sd15", PRESET, "SD"), ("sd3", PRESET3, "SD3")) for size in (17, 18)),
    ("full-finetune-lora-rank", PRESET + "--model {SD}/full --prompts {B}/prompts.txt --full-finetune --lora-rank 8",
     "--lora-rank does nothing"),
    ("lora-targets-bogus", PRESET + "--model {SD}/full --prompts {B}/prompts.txt --lora-targets to_q,to_v,bogus",
     "--lora-targets to_q,to_v,bogus: 'bogus' matches no module"),
    *([] if torch.cuda.is_available() else [  # fp16 runs on a GPU
        ("mixed-precision-fp16-on-cpu", PRESET + "--model {SD}/full --prompts {B}/prompts.txt --mixed-precision fp16",
         "--mixed-precision fp16 needs a GPU")]),
]


@_table(DISTILL_PRESET)
def test_distill_preset(argv, needle, world, tmp_path, capsys, monkeypatch):
    _check(argv, needle, world, tmp_path, capsys, monkeypatch)


# -- sample --------------------------------------------------------------------------------------
SAMPLE = [
    ("labels-out-of-range", "sample --checkpoint {R} --labels 5 --out {O}", "--labels"),
    ("labels-negative", "sample --checkpoint {R} --labels 0 -1 --out {O}", "--labels"),
    ("steps-3-on-124", "sample --checkpoint {R} --steps 3 --out {O}", "--steps"),
    ("steps-0", "sample --checkpoint {R} --steps 0 --out {O}", "--steps"),
    ("num-0", "sample --checkpoint {R} --num 0 --out {O}", "--num"),
    ("num-neg", "sample --checkpoint {R} --num -3 --out {O}", "--num"),
    ("engine-missing", "sample --checkpoint {R} --backend onnx --engine {B}/nowhere.onnx --out {O}", "--engine"),
    ("engine-with-torch", "sample --checkpoint {R} --engine {F} --backend torch --out {O}", "--engine"),
    ("backend-tensorrt", "sample --checkpoint {R} --backend tensorrt --out {O}", "--backend tensorrt"),
    ("backend-unknown", "sample --checkpoint {R} --backend jax --out {O}", "--backend"),
    ("checkpoint-missing", "sample --checkpoint {B}/nowhere --out {O}", "{B}/nowhere"),
    ("checkpoint-not-denoiser", "sample --checkpoint {B} --out {O}", "{B}"),
    ("student-trunc-weights", "sample --checkpoint {B}/student-trunc --out {O}", "{B}/student-trunc/model"),
    ("student-garbage-denoiser", "sample --checkpoint {B}/student-garbage --out {O}", "{B}/student-garbage/denoiser.safetensors"),
    ("student-no-k-embedding", "sample --checkpoint {B}/student-no-k --out {O}", "{B}/student-no-k/denoiser.safetensors"),
    ("student-empty-json", "sample --checkpoint {B}/student-empty-json --out {O}", "{B}/student-empty-json/denoiser.json"),
    ("out-under-file", "sample --checkpoint {R} --out {F}/samples", "--out"),
    ("out-is-folder", "sample --checkpoint {R} --out {B}", "--out"),
    ("seed-text", "sample --checkpoint {R} --seed abc --out {O}", "--seed"),
    ("num-huge", "sample --checkpoint {R} --num 1000000000000 --out {O}", "--num 1000000000000"),
    # LoRA students of the real backbones: a base of another backbone, the diffusers LoRA instead of the student
    ("lora-sd15-on-sd3-base", "sample --checkpoint {L}/sd15-on-sd3 --out {O}", "distilled on a sd15 UNet2DConditionModel"),
    ("lora-sd3-on-sd15-base", "sample --checkpoint {L}/sd3-on-sd15 --out {O}", "is a StableDiffusionPipeline folder (sd15"),
    ("lora-base-other-size", "sample --checkpoint {L}/sd15-other-size --out {O}", "{L}/sd15-other-size/model/lora_role.json"),
    ("diffusers-lora-folder", "sample --checkpoint {L}/sd15/lora --out {O}", "{L}/sd15/student"),
    ("engine-garbage-onnx", "sample --checkpoint {R} --backend onnx --engine {B}/garbage.onnx --out {O}",
     "--engine {B}/garbage.onnx is not an ONNX graph"),
    ("prompt-with-num", "sample --prompt a-cat --backend onnx --engine {B} --num 4 --out {O}", "--num does nothing"),
]


@_table(SAMPLE)
def test_sample(argv, needle, world, tmp_path, capsys, monkeypatch):
    _check(argv, needle, world, tmp_path, capsys, monkeypatch)


# -- export --------------------------------------------------------------------------------------
EXPORT = [
    ("format-tensorrt", "export --checkpoint {S} --out {O} --format tensorrt --steps 4", "--format tensorrt"),
    ("opset-11-dynamo", "export --checkpoint {S} --out {O} --opset 11", "--opset"),
    ("steps-0", "export --checkpoint {S} --out {O} --steps 0", "--steps"),
    ("steps-3-on-124", "export --checkpoint {S} --out {O} --steps 1 3", "--steps 3"),
    ("steps-4-total-2", "export --checkpoint {S} --out {O} --steps 4 --total-steps 2", "--steps 4"),  # stage times repeat
    ("shape-text", "export --checkpoint {S} --out {O} --shape abc", "--shape"),
    ("shape-zero", "export --checkpoint {S} --out {O} --shape 0,2", "--shape"),
    ("cond-shape-text", "export --checkpoint {S} --out {O} --cond-shape x", "--cond-shape"),
    ("vae-missing", "export --checkpoint {S} --out {O} --vae {B}/nowhere", "--vae"),
    ("vae-with-compile", "export --checkpoint {S} --out {O} --format compile --vae {B}", "--vae"),
    ("batch-size-0", "export --checkpoint {S} --out {O} --batch-size 0", "--batch-size"),
    ("out-is-file", "export --checkpoint {S} --out {F}", "--out"),
    ("out-under-file", "export --checkpoint {S} --out {F}/x", "--out"),
    ("checkpoint-missing", "export --checkpoint {B}/nowhere --out {O}", "{B}/nowhere"),
    ("checkpoint-garbage", "export --checkpoint {B}/student-garbage --out {O}", "{B}/student-garbage/denoiser.safetensors"),
    ("checkpoint-trunc", "export --checkpoint {B}/student-trunc --out {O}", "{B}/student-trunc/model"),
    ("format-unknown", "export --checkpoint {S} --out {O} --format tflite", "--format"),
    ("dtype-unknown", "export --checkpoint {S} --out {O} --dtype fp8", "--dtype"),
    ("opset-21-torchscript", "export --checkpoint {S} --out {O} --exporter torchscript --opset 21", "--opset"),
    ("lora-sd15-on-sd3-base", "export --checkpoint {L}/sd15-on-sd3 --out {O}", "is a StableDiffusion3Pipeline folder (sd3"),
    ("lora-sd3-on-sd15-base", "export --checkpoint {L}/sd3-on-sd15 --out {O}", "distilled on a sd3 SD3Transformer2DModel"),
    ("lora-base-other-size", "export --checkpoint {L}/sd15-other-size --out {O}", "size mismatch"),
    ("diffusers-lora-folder", "export --checkpoint {L}/sd3/lora --out {O}", "diffusers LoRA"),
    ("shape-negative", "export --checkpoint {S} --out {O} --shape=-2,2", "--shape"),
    ("device-unknown", "export --checkpoint {S} --out {O} --device banana", "--device banana"),
    *([] if torch.cuda.is_available() else [("device-cuda-without-gpu", "export --checkpoint {S} --out {O} --device cuda",
                                             "--device cuda: torch sees no CUDA GPU")]),
    ("trt-precision-with-onnx", "export --checkpoint {S} --out {O} --format onnx --trt-precision fp16", "--trt-precision does nothing"),
    ("dtype-with-compile", "export --checkpoint {S} --out {O} --format compile --dtype fp16", "--dtype does nothing"),
]


@_table(EXPORT)
def test_export(argv, needle, world, tmp_path, capsys, monkeypatch):
    _check(argv, needle, world, tmp_path, capsys, monkeypatch)


# -- convert (an official TDM release; issue 34) -------------------------------------------------
class RunsCode:
    """Unpickled, it would run code: a checkpoint that a weights-only load must refuse."""

    def __reduce__(self):
        return (print, ("this pickle runs code",))


@pytest.fixture(scope="module")
def release_files(world, tmp_path_factory):
    """C/*: files in the releases' formats that convert must refuse, for the tiny SD3 and SD 1.5 pipelines."""
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig

    from tdm_fast.convert import EMA_TARGETS

    root = tmp_path_factory.mktemp("releases")
    transformer = SD3Transformer2DModel.from_pretrained(world / "sd3" / "full" / "transformer")
    transformer.add_adapter(LoraConfig(r=32, lora_alpha=64, target_modules=list(EMA_TARGETS)))  # the authors' wrapper
    ema = [p.detach().clone() for p in transformer.parameters() if p.requires_grad]
    torch.save({"decay": 0.999, "ema_parameters": ema[:-2]}, root / "ema-truncated.pt")
    torch.save({"decay": 0.999, "ema_parameters": [ema[1], ema[0], *ema[2:]]}, root / "ema-misshapen.pt")
    torch.save({"decay": 0.999, "ema_parameters": [RunsCode()]}, root / "ema-code.pt")
    torch.save({"lora_unet_down_blocks_9_attn_to_q.lora_down.weight": torch.zeros(2, 8),
                "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 8)}, root / "kohya-unknown.pt")
    (root / "two").mkdir()
    for name in ("a.safetensors", "b.safetensors"):
        shutil.copy(world / "lora" / "sd15" / "lora" / "pytorch_lora_weights.safetensors", root / "two" / name)
    return root


CONVERT = [
    ("another-backbones-lora", "convert --checkpoint {L}/sd15/lora/pytorch_lora_weights.safetensors --base {SD3}/full "
     "--recipe tdm-sd3 --out {O}", "name no layer of this sd3 base"),
    ("another-backbones-kohya", "convert --checkpoint {L}/sd3/lora/pytorch_lora_weights.safetensors --base {SD}/full "
     "--recipe tdm-dreamshaper --out {O}", "are not kohya LoRA keys"),
    ("ema-list-truncated", "convert --checkpoint {C}/ema-truncated.pt --base {SD3}/full --recipe tdm-sd35 --out {O}",
     "EMA tensors, but the peft wrapper"),
    ("ema-list-misshapen", "convert --checkpoint {C}/ema-misshapen.pt --base {SD3}/full --recipe tdm-sd35 --out {O}",
     "EMA tensor 0 has shape"),
    ("pickle-with-code", "convert --checkpoint {C}/ema-code.pt --base {SD3}/full --recipe tdm-sd35 --out {O}", "never unpickles"),
    ("kohya-unknown-keys", "convert --checkpoint {C}/kohya-unknown.pt --base {SD}/full --recipe tdm-dreamshaper --out {O}",
     "2 of its keys are not kohya LoRA keys"),
    ("checkpoint-missing", "convert --checkpoint {B}/nowhere.pt --base {SD}/full --recipe tdm-dreamshaper --out {O}", "{B}/nowhere.pt"),
    ("checkpoint-folder-of-two", "convert --checkpoint {C}/two --base {SD}/full --recipe tdm-dreamshaper --out {O}",
     "holds 2 weight files"),
    ("base-missing", "convert --checkpoint {C}/kohya-unknown.pt --base {B}/nowhere --recipe tdm-dreamshaper --out {O}", "--base"),
    ("recipe-unknown", "convert --checkpoint {C}/kohya-unknown.pt --base {SD}/full --recipe tdm-sdxl --out {O}", "--recipe"),
    ("lora-scale-0", "convert --checkpoint {C}/kohya-unknown.pt --base {SD}/full --recipe tdm-dreamshaper --lora-scale 0 "
     "--out {O}", "--lora-scale"),
    ("out-is-file", "convert --checkpoint {C}/kohya-unknown.pt --base {SD}/full --recipe tdm-dreamshaper --out {F}", "--out"),
]


@_table(CONVERT)
def test_convert(argv, needle, world, release_files, tmp_path, capsys, monkeypatch):
    _check(argv.replace("{C}", str(release_files)), needle, world, tmp_path, capsys, monkeypatch)


# -- eval ----------------------------------------------------------------------------------------
EVAL = [
    ("toy-student", "eval {S} --samples 50 --eval-seeds 0", "{S}"),
    ("student-missing", "eval {B}/nowhere", "{B}/nowhere"),
    ("student-garbage", "eval {B}/student-garbage", "{B}/student-garbage/denoiser.safetensors"),
    ("no-student", "eval", "student"),
    ("teacher-missing", "eval {S} --teacher {B}/nowhere", "--teacher"),
    ("samples-0", "eval {S} --samples 0", "--samples"),
    ("samples-1", "eval {S} --samples 1", "argument --samples: must be at least 2"),  # FID needs a covariance
    ("samples-huge", "eval {S} --samples 1000000000000", "--samples 1000000000000"),
    ("ablations-samples-1", "eval --ablations --samples 1 --out {O}", "argument --samples: must be at least 2"),
    ("eval-seeds-text", "eval {S} --eval-seeds one", "--eval-seeds"),
    ("steps-0", "eval {S} --steps 0", "--steps"),
    ("cfg-scale-nan", "eval {S} --cfg-scale nan", "--cfg-scale"),
    ("json-under-file", "eval {S} --json {F}/results.json", "--json"),
    ("ablations-iterations-0", "eval --ablations --iterations 0 --out {O}", "--iterations"),
    ("ablations-iterations-neg", "eval --ablations --iterations -5 --out {O}", "--iterations"),
    ("ablations-unknown-variant", "eval --ablations --variants tdm sharp --out {O}", "sharp"),
    ("ablations-curve-every-neg", "eval --ablations --curve-every -1 --out {O}", "--curve-every"),
    ("ablations-out-under-file", "eval --ablations --out {F}/abl", "--out"),
    ("ablations-with-student", "eval {S} --ablations --out {O}", "--ablations"),
    ("ablations-corrupt-teacher", "eval --ablations --teacher {B}/teacher-garbage --out {O}", "{B}/teacher-garbage/denoiser.safetensors"),
    ("ablations-builtin-unknown", "eval --ablations --builtin-teacher cifar --out {O}", "--builtin-teacher"),
    ("ablations-builtin-and-teacher", "eval --ablations --teacher {T} --builtin-teacher digits-dit --out {O}", "--builtin-teacher"),
    ("builtin-teacher-without-ablations", "eval {S} --builtin-teacher digits-dit", "--builtin-teacher"),
    ("ablations-pipeline-unknown", "eval --ablations --pipeline sdxl --out {O}", "--pipeline"),
    ("ablations-pipeline-and-teacher", "eval --ablations --pipeline sd15 --teacher {T} --out {O}", "--teacher"),
    ("ablations-pipeline-and-builtin", "eval --ablations --pipeline sd15 --builtin-teacher digits-dit --out {O}", "--builtin-teacher"),
    ("ablations-pipeline-curve", "eval --ablations --pipeline sd3 --curve-every 100 --out {O}", "--curve-every"),
    ("pipeline-without-ablations", "eval {S} --pipeline sd15", "--pipeline"),
    ("toy-teacher", "eval {S} --teacher {T}", "{T}"),
]


@_table(EVAL)
def test_eval(argv, needle, world, tmp_path, capsys, monkeypatch):
    _check(argv, needle, world, tmp_path, capsys, monkeypatch)


@pytest.mark.parametrize("argv, needle", [("distill --teacher {T} --out {O}", "TDM_FAST_KERNELS=bogus"),
                                          ("sample --checkpoint {R} --out {O}", "TDM_FAST_KERNELS=bogus")])
def test_environment_is_checked_before_anything_is_written(argv, needle, world, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TDM_FAST_KERNELS", "bogus")
    _check(argv, needle, world, tmp_path, capsys, monkeypatch)


def test_eval_ablations_builtin_teacher_not_built(world, tmp_path, capsys, monkeypatch):
    """A checkout without a built-in teacher's asset: one line on how to rebuild it, before any work."""
    from tdm_fast.demos import teachers

    monkeypatch.setattr(teachers, "ASSETS", tmp_path / "no-assets")
    _check("eval --ablations --builtin-teacher digits-dit --out {O}", "digits_dit_teacher.safetensors", world, tmp_path,
           capsys, monkeypatch)


# -- optional packages (pyproject's extras) ------------------------------------------------------
MISSING_PACKAGE = [
    ("digits-demo-without-scikit-learn", "sklearn", "demo --out {O}", "tdm-fast[digits]"),
    ("digits-teacher-without-scikit-learn", "sklearn", "teacher train --dataset digits --out {O}", "tdm-fast[digits]"),
    ("t2i-teacher-without-scikit-learn", "sklearn", "teacher train --dataset digits-t2i --pipeline sd15 --out {O}",
     "tdm-fast[digits]"),
    ("eval-without-scikit-learn", "sklearn", "eval {S} --samples 50", "tdm-fast[digits]"),
    ("tracker-wandb-missing", "wandb", "distill --teacher {T} --out {O} --report-to wandb", "--report-to wandb"),
    ("tracker-mlflow-missing", "mlflow", "distill --teacher {T} --out {O} --report-to mlflow", "--report-to mlflow"),
]


@pytest.mark.parametrize("module, argv, needle", [c[1:] for c in MISSING_PACKAGE], ids=[c[0] for c in MISSING_PACKAGE])
def test_missing_package(module, argv, needle, world, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # what an environment without it gives import and find_spec
    _check(argv, needle, world, tmp_path, capsys, monkeypatch)


# -- demo ----------------------------------------------------------------------------------------
DEMO = [
    ("iterations-0", "demo --iterations 0", "--iterations"),
    ("iterations-neg", "demo --iterations -5", "--iterations"),
    ("toy-iterations-0", "demo --dataset toy2d --iterations 0", "--iterations"),
    ("samples-0", "demo --samples 0", "--samples"),
    ("samples-1", "demo --samples 1", "argument --samples: must be at least 2"),
    ("model-without-pipeline", "demo --model {SD}/full", "--model does nothing in demo"),
    ("toy-with-pipeline", "demo --dataset toy2d --pipeline sd15", "--pipeline does nothing in demo --dataset toy2d"),
    ("out-is-file", "demo --out {F}", "--out"),
    ("out-under-file", "demo --out {F}/demo", "--out"),
    ("toy-out-under-file", "demo --dataset toy2d --out {F}/demo", "--out"),
    ("digits-teacher-missing", "demo --digits-teacher {B}/nowhere", "{B}/nowhere"),
    ("digits-teacher-corrupt", "demo --digits-teacher {B}/teacher-garbage", "{B}/teacher-garbage/denoiser.safetensors"),
    ("toy-with-digits-teacher", "demo --dataset toy2d --digits-teacher {T}", "--digits-teacher"),
    ("digits-teacher-is-toy", "demo --digits-teacher {T}", "{T}"),
    ("toy-with-samples", "demo --dataset toy2d --samples 100", "--samples"),
    ("dataset-unknown", "demo --dataset cifar", "--dataset"),
    ("onnx-with-sd3", "demo --pipeline sd3 --onnx", "--onnx"),
    ("onnx-without-pipeline", "demo --onnx", "--onnx"),
]


@_table(DEMO)
def test_demo(argv, needle, world, tmp_path, capsys, monkeypatch):
    _check(argv, needle, world, tmp_path, capsys, monkeypatch)


# -- teacher train -------------------------------------------------------------------------------
TEACHER = [
    ("toy-cond-dropout", "teacher train --out {O} --cond-dropout 0.1", "--cond-dropout"),
    ("toy-lr", "teacher train --dataset toy2d --out {O} --lr 1e-3", "--lr"),
    ("toy-batch-size", "teacher train --dataset toy2d --out {O} --batch-size 64", "--batch-size"),
    ("digits-hidden", "teacher train --dataset digits --out {O} --hidden 64", "--hidden"),
    ("toy-architecture", "teacher train --out {O} --architecture digits-dit", "--architecture does nothing"),
    ("digits-threads", "teacher train --dataset digits --out {O} --threads 2", "--threads does nothing"),
    ("toy-iterations-0", "teacher train --out {O} --iterations 0", "--iterations"),
    ("digits-iterations-0", "teacher train --dataset digits --out {O} --iterations 0", "--iterations"),
    ("iterations-neg", "teacher train --out {O} --iterations -5", "--iterations"),
    ("hidden-0", "teacher train --out {O} --hidden 0", "--hidden"),
    ("digits-cond-dropout-1.5", "teacher train --dataset digits --out {O} --cond-dropout 1.5", "--cond-dropout"),
    ("digits-lr-neg", "teacher train --dataset digits --out {O} --lr -1", "--lr"),
    ("digits-lr-nan", "teacher train --dataset digits --out {O} --lr nan", "--lr"),
    ("digits-batch-size-0", "teacher train --dataset digits --out {O} --batch-size 0", "--batch-size"),
    ("vae-iterations-neg", "teacher train --dataset digits-t2i --pipeline sd15 --out {O} --vae-iterations -1", "--vae-iterations"),
    ("threads-0", "teacher train --dataset digits-t2i --pipeline sd15 --out {O} --threads 0", "--threads"),
    ("out-is-file", "teacher train --out {F}", "--out"),
    ("out-under-file", "teacher train --out {F}/teacher", "--out"),
    ("out-required", "teacher train", "--out"),
]


@_table(TEACHER)
def test_teacher_train(argv, needle, world, tmp_path, capsys, monkeypatch):
    _check(argv, needle, world, tmp_path, capsys, monkeypatch)


# -- classifier train ----------------------------------------------------------------------------
CLASSIFIER = [
    ("iterations-0", "classifier train --out {O}/clf --iterations 0", "--iterations"),
    ("iterations-neg", "classifier train --out {O}/clf --iterations -5", "--iterations"),
    ("out-under-file", "classifier train --out {F}/clf", "--out"),
    ("out-stem-is-folder", "classifier train --out {B}/clf", "--out"),  # {B}/clf.safetensors is a folder
    ("seed-text", "classifier train --out {O}/clf --seed abc", "--seed"),
    ("no-verb", "classifier", "classifier"),
]


@_table(CLASSIFIER)
def test_classifier_train(argv, needle, world, tmp_path, capsys, monkeypatch):
    _check(argv, needle, world, tmp_path, capsys, monkeypatch)


# -- plan ----------------------------------------------------------------------------------------
PLAN = [
    ("batch-0", "plan --preset sd15 --batch 0", "--batch"),
    ("batch-neg", "plan --preset sd15 --batch -2", "--batch"),
    ("resolution-0", "plan --preset sd15 --resolution 0", "--resolution"),
    ("num-frames-0", "plan --preset cogvideox --num-frames 0", "--num-frames"),
    ("gpu-memory-0", "plan --preset sd15 --gpu-memory 0", "--gpu-memory"),
    ("gpu-memory-nan", "plan --preset sd15 --gpu-memory nan", "--gpu-memory"),
    ("lora-rank-0", "plan --preset sd15 --lora-rank 0", "--lora-rank"),
    ("preset-unknown", "plan --preset sd99", "--preset"),
]


@_table(PLAN)
def test_plan(argv, needle, world, tmp_path, capsys, monkeypatch):
    _check(argv, needle, world, tmp_path, capsys, monkeypatch)


# -- bench ---------------------------------------------------------------------------------------
BENCH = [
    ("plan-batch-0", "bench plan --preset sd15 --batch 0", "--batch"),
    ("plan-iters-0", "bench plan --preset sd15 --iters 0", "--iters"),
    ("plan-steps-0", "bench plan --preset sd15 --steps 0", "--steps"),
    ("plan-mfu-text", "bench plan --preset sd15 --mfu lots", "--mfu"),
    ("plan-mfu-1.5", "bench plan --preset sd15 --mfu 1.5", "--mfu"),
    ("plan-gpu-unknown", "bench plan --preset sd15 --gpu tpu9", "--gpu"),
    ("plan-peak-neg", "bench plan --preset sd15 --peak-tflops -1", "--peak-tflops"),
    ("plan-fake-updates-0", "bench plan --preset sd15 --fake-updates 0", "--fake-updates"),
    ("plan-resolution-0", "bench plan --preset sd15 --resolution 0", "--resolution"),
    ("plan-with-suite", "bench plan training", "plan"),
    ("unknown-suite", "bench no_such_suite --results-dir {O}", "no_such_suite"),
    ("results-dir-under-file", "bench --render-only --results-dir {F}/results", "--results-dir"),
    ("k-neg", "bench --render-only --results-dir {O} --k -1", "--k"),
    ("min-rel-neg", "bench --render-only --results-dir {O} --min-rel -0.5", "--min-rel"),
]


@_table(BENCH)
def test_bench(argv, needle, world, tmp_path, capsys, monkeypatch):
    _check(argv, needle, world, tmp_path, capsys, monkeypatch)


def test_the_table_is_large_enough():
    tables = (DISTILL, DISTILL_PRESET, SAMPLE, EXPORT, CONVERT, EVAL, DEMO, TEACHER, CLASSIFIER, PLAN, BENCH)
    ids = [(id(t), c[0]) for t in tables for c in t]
    assert len(ids) == len(set(ids)) and len(ids) >= 60


# -- the real exit path: subprocesses ------------------------------------------------------------
SUBPROCESS = [
    ("distill --teacher {T} --out {O} --log-every 0", "--log-every"),  # a library check
    ("distill --teacher {T} --out {O} --steps four", "--steps"),  # argparse's own exit path
    ("teacher train --out {O} --cond-dropout 0.1", "--cond-dropout"),
]


def test_subprocess_exit_code_and_one_line(world, tmp_path):
    """The console entry point: exit status 2 and one ``tdm-fast: error:`` line on stderr (the runs overlap)."""
    paths = _paths(world, tmp_path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}
    before_world, before_tmp = _tree(world), _tree(tmp_path)
    procs = [(needle, subprocess.Popen([sys.executable, "-m", "tdm_fast", *shlex.split(argv.format(**paths))], cwd=tmp_path,
                                       env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
             for argv, needle in SUBPROCESS]
    for needle, proc in procs:
        out, err = proc.communicate(timeout=120)
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode == 2, err
        assert len(lines) == 1 and lines[0].startswith("tdm-fast: error: ") and needle in lines[0], err
    assert _tree(tmp_path) == before_tmp and _tree(world) == before_world


def test_an_existing_output_file_may_be_replaced(tmp_path):
    """check_output_path refuses what cannot be created, not a file that a rerun overwrites."""
    from tdm_fast.cli import UsageError, check_output_path

    (tmp_path / "s.safetensors").write_bytes(b"old samples")
    assert check_output_path(tmp_path / "s.safetensors", "--out", folder=False) == tmp_path / "s.safetensors"
    assert check_output_path(tmp_path / "new" / "deeper", "--out") == tmp_path / "new" / "deeper"
    with pytest.raises(UsageError, match="is a file, not a folder"):
        check_output_path(tmp_path / "s.safetensors", "--out")
    with pytest.raises(UsageError, match="so nothing can be created under it"):
        check_output_path(tmp_path / "s.safetensors" / "x.png", "--out", folder=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors"]
