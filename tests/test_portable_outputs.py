"""Portable outputs (issue 14): the student's lora_role.json names its base by a relative path, lora/ and
fused/ carry a TDMScheduler config, fused/ is a complete pipeline folder, and the model cards are
huggingface_hub ModelCards without local paths. Tiny random SD1.5 pipeline, 3 LoRA iterations, offline."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import _backbone_tiny as tiny
from tdm_fast.backbones.run import build_preset_run, export_preset_student
from tdm_fast.backbones.presets import missing_components, prompt_conditions
from tdm_fast.config import TDMConfig
from tdm_fast.denoiser import Denoiser
from tdm_fast.sampling import sample_student
from tdm_fast.scheduler import TDMScheduler
from tdm_fast.trainer import TDMTrainer

PROMPTS = ["a photo of a cat", "a red car"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("portable")
    project = root / "project"
    tiny.build_sd15(project / "model")
    args = tiny.preset_args("sd15", project / "model", tiny.write_prompts(project / "prompts.txt"), embedding_cache="none",
                            export_fused=True)
    # not the default T' = 900 nor the default DDIM trajectory: the saved scheduler must carry the run's
    config = TDMConfig(steps=(4,), batch_size=2, iterations=3, cfg_scale=2.0, fake_lr=1e-2, kernels="reference", log_every=1,
                       total_steps=800, student_solver="dpmsolver")
    teacher, student, fake, conditions, shape = build_preset_run(args, config)
    trainer = TDMTrainer(teacher, config, conditions, shape, project / "out", student, fake, progress=False)
    trainer.train()
    student = trainer.final_student()
    export_preset_student(args, student, config, project / "out")
    cond, _ = prompt_conditions("sd15", project / "model", PROMPTS, teacher.model.shared.adapter.inner, 64, cache_dir=None)
    latents = torch.randn((2, *shape), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = sample_student(student, latents.clone(), cond, 4, total_steps=config.total_steps, solver=config.student_solver)
    return dict(root=root, project=project, out=project / "out", config=config, student=student, cond=cond, latents=latents,
                ours=ours, results={})


def _latents(pipe, latents, steps=4):
    with torch.no_grad():
        return pipe(prompt=PROMPTS, num_inference_steps=steps, guidance_scale=1.0, latents=latents.clone(), output_type="latent",
                    height=64, width=64).images


def test_student_folder_loads_after_moving_base_and_run_together(run, tmp_path):
    meta_file = run["out"] / "student" / "model" / "lora_role.json"
    stored = json.loads(meta_file.read_text())["source"]["path"]
    assert stored == "../../../model"  # relative to the folder of lora_role.json, not absolute
    assert str(run["root"]) not in meta_file.read_text()

    moved = tmp_path / "elsewhere" / "project"
    shutil.copytree(run["project"], moved)
    hidden = run["project"].with_name("project.hidden")
    run["project"].rename(hidden)  # the old absolute location is gone while the moved copy loads
    try:
        reloaded = Denoiser.from_pretrained(moved / "out" / "student")
        with torch.no_grad():
            again = sample_student(reloaded, run["latents"].clone(), run["cond"], 4, total_steps=800, solver="dpmsolver")
        torch.testing.assert_close(again, run["ours"], rtol=1e-5, atol=1e-5)

        # the run folder moved without its base: a ValueError naming the file, the expected path and the fix
        alone = tmp_path / "alone" / "out"
        shutil.copytree(moved / "out" / "student", alone / "student")
        with pytest.raises(ValueError) as info:
            Denoiser.from_pretrained(alone / "student")
        message = str(info.value)
        assert str(alone / "student" / "model" / "lora_role.json") in message
        assert f"not found at {tmp_path / 'alone' / 'model'}" in message and "source.path" in message and "move the base folder" in message
    finally:
        hidden.rename(run["project"])

    # files of older versions (absolute path of the base) still load
    old = tmp_path / "old" / "student"
    shutil.copytree(run["out"] / "student", old)
    meta = json.loads((old / "model" / "lora_role.json").read_text())
    meta["source"]["path"] = str((run["project"] / "model").resolve())
    (old / "model" / "lora_role.json").write_text(json.dumps(meta))
    with torch.no_grad():
        torch.testing.assert_close(sample_student(Denoiser.from_pretrained(old), run["latents"].clone(), run["cond"], 4, total_steps=800,
                                                  solver="dpmsolver"), run["ours"], rtol=1e-5, atol=1e-5)


def test_lora_folder_runs_in_the_stock_pipeline_with_its_scheduler(run):
    from diffusers import StableDiffusionPipeline

    model, lora = run["project"] / "model", run["out"] / "lora"
    assert json.loads((lora / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "TDMScheduler"
    pipe = StableDiffusionPipeline.from_pretrained(model, **missing_components(model, StableDiffusionPipeline))
    pipe.scheduler = TDMScheduler.from_pretrained(lora, subfolder="scheduler")
    assert pipe.scheduler.config.total_steps == run["config"].total_steps == 800
    assert pipe.scheduler.config.solver == run["config"].student_solver == "dpmsolver"
    pipe.load_lora_weights(lora)
    images = _latents(pipe, run["latents"])
    torch.testing.assert_close(images, run["ours"], rtol=1e-4, atol=1e-5)
    run["results"]["lora"] = images


def test_fused_folder_is_a_complete_pipeline_with_tdm_scheduler(run, monkeypatch):
    import huggingface_hub.constants
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model, fused = run["project"] / "model", run["out"] / "fused"
    index = json.loads((fused / "model_index.json").read_text())
    assert index["scheduler"] == ["tdm_fast.scheduler", "TDMScheduler"] and index["unet"] == ["diffusers", "UNet2DConditionModel"]
    # the base's other components are copied as they are
    for name in ("text_encoder", "tokenizer"):
        base_files = sorted(p.relative_to(model / name) for p in (model / name).rglob("*") if p.is_file())
        assert base_files == sorted(p.relative_to(fused / name) for p in (fused / name).rglob("*") if p.is_file())
        assert all((model / name / f).read_bytes() == (fused / name / f).read_bytes() for f in base_files)
    # the tiny base has no VAE ([null, null] in model_index.json): diffusers wants it passed as None, as for the base itself
    pipe = DiffusionPipeline.from_pretrained(fused, **missing_components(fused, StableDiffusionPipeline))
    assert isinstance(pipe, StableDiffusionPipeline) and isinstance(pipe.scheduler, TDMScheduler)
    assert pipe.scheduler.config.total_steps == 800 and pipe.scheduler.config.solver == "dpmsolver"
    assert not any("lora" in k for k in pipe.unet.state_dict())
    images = _latents(pipe, run["latents"])
    lora_images = run["results"].get("lora")
    if lora_images is None:  # this test run alone
        test_lora_folder_runs_in_the_stock_pipeline_with_its_scheduler(run)
        lora_images = run["results"]["lora"]
    torch.testing.assert_close(images, lora_images, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(images, run["ours"], rtol=1e-4, atol=1e-5)


def test_the_fused_cards_imports_let_a_fresh_interpreter_load_the_pipeline(run):
    """diffusers loads a scheduler class that model_index.json names only from a module already imported; the
    card's imports, and nothing else of tdm_fast, must be enough (``import tdm_fast`` alone imports no submodule)."""
    fused = run["out"] / "fused"
    imports = [line for line in (fused / "README.md").read_text().splitlines() if line.startswith("import ")]
    code = "\n".join([*imports, "import json, sys", "from diffusers import DiffusionPipeline",
                      "index = json.load(open(sys.argv[1] + '/model_index.json'))",
                      "absent = {k: None for k, v in index.items() if isinstance(v, list) and v[0] is None}",
                      "pipe = DiffusionPipeline.from_pretrained(sys.argv[1], **absent)",
                      "print(type(pipe.scheduler).__module__, type(pipe.scheduler).__name__)"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code, str(fused)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["tdm_fast.scheduler", "TDMScheduler"]


@pytest.mark.parametrize("folder", ["lora", "fused"])
def test_model_cards_hold_no_local_path_and_parse(run, folder):
    from huggingface_hub import ModelCard

    readme = run["out"] / folder / "README.md"
    text = readme.read_text()
    assert str(run["root"]) not in text and str(run["root"].resolve()) not in text
    card = ModelCard.load(readme)
    data = card.data.to_dict()
    assert data["library_name"] == "diffusers" and data["pipeline_tag"] == "text-to-image" and data["license"]
    assert ("lora" in data["tags"]) == (folder == "lora") and "tdm" in data["tags"]
    assert "base_model" not in data  # a local base has no model id: named by its folder name, said to be local
    assert "local pipeline folder `model`" in text
    assert "TDMScheduler" in text and "guidance_scale=1" in text and "num_inference_steps=4" in text
    if folder == "fused":
        assert 'DiffusionPipeline.from_pretrained("fused")' in text and "import tdm_fast.scheduler" in text
    else:
        assert 'TDMScheduler.from_pretrained("lora", subfolder="scheduler")' in text


def test_model_card_names_a_model_id_and_the_base_license(tmp_path):
    from huggingface_hub import ModelCard

    from tdm_fast.publish import base_model_reference, write_model_card

    card = dict(backbone="sd15", pipeline="StableDiffusionPipeline", steps=(4,), total_steps=900, cfg_scale=3.0,
                prediction_type="epsilon", lora=True)
    write_model_card(tmp_path / "a", base_model="org/base-model", folder_name="lora", **card)
    data = ModelCard.load(tmp_path / "a" / "README.md").data
    assert data.base_model == "org/base-model" and data.license == "other"
    # a Hugging Face cache snapshot is named by its model id; its README's license carries over
    snapshot = tmp_path / "hub" / "models--org--sd-base" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "README.md").write_text("---\nlicense: creativeml-openrail-m\n---\n# base\n")
    assert base_model_reference(str(snapshot))["model_id"] == "org/sd-base"
    write_model_card(tmp_path / "b", base_model=str(snapshot), folder_name="lora", **card)
    text = (tmp_path / "b" / "README.md").read_text()
    data = ModelCard.load(tmp_path / "b" / "README.md").data
    assert data.base_model == "org/sd-base" and data.license == "creativeml-openrail-m" and str(tmp_path) not in text
