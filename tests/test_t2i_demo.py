"""``tdm-fast demo --pipeline``: the user's path (--preset, LoRA roles, unify K, cached prompt
embeddings, stock pipeline + TDMScheduler + load_lora_weights + apply_steps_embedding), shortened;
and the library defects this path exposed."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from tdm_fast.demos import t2i, t2i_demo


@pytest.fixture(scope="module")
def short_runs(tmp_path_factory):
    cache = {}

    def run(pipeline):
        if pipeline not in cache:
            out = tmp_path_factory.mktemp(f"demo-{pipeline}")
            results = t2i_demo.run_t2i_demo(
                pipeline, out, iterations=40, samples=200, bootstrap=0, columns=4, progress=False, reference_steps=20,
                warmup_steps=5, batch_size=32, score_at=(20,) if pipeline == "sd15" else (),
            )
            cache[pipeline] = (out, results)
        return cache[pipeline]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", t2i.PIPELINES)
def test_short_demo_runs_the_whole_path_and_moves_fid_toward_teacher(short_runs, pipeline):
    out, results = short_runs(pipeline)
    for name in ("grid.png", "metrics.md", "metrics.json", "train_log.jsonl", "lora/pytorch_lora_weights.safetensors",
                 "lora/tdm_steps_embedding.safetensors"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved["comparisons"]) == {"K=1", "K=2", "K=4"}
    if pipeline == "sd15":  # scored on the way too (score_at=20): the same files, for the 20-iteration student
        halfway = json.loads((out / "iterations-20" / "metrics.json").read_text())
        assert halfway["training"]["iterations"] == 20 and saved["training"]["iterations"] == 40
        assert halfway["distill_argv"][halfway["distill_argv"].index("--iterations") + 1] == "20"
        assert set(halfway["comparisons"]) == set(saved["comparisons"])
        assert (out / "iterations-20" / "grid.png").is_file() and (out / "iterations-20" / "lora").is_dir()
    for key, comp in saved["comparisons"].items():
        assert comp["fid_ratio"] > 0 and comp["baseline"] in comp["candidates"]
    assert all(isinstance(v, bool) for v in saved["acceptance"].values())
    assert saved["teacher_unchanged"] and saved["teacher_equals_fresh_base"]  # adapters off in the teacher's calls
    assert saved["acceptance"]["teacher outputs bit-identical after distillation"]
    assert saved["pipeline_parity_max_abs"] < 1e-3  # stock pipeline == the engine's sampler
    rows = saved["samplers"]
    step = "euler" if pipeline == "sd3" else "ddim"
    # the untrained student is the teacher at the student's times (LoRA B = 0, K embedding = 0): after
    # tens of iterations the student must be closer to the teacher's 50-step CFG samples than that
    for k in (1, 2, 4):
        assert rows[f"tdm-{k}"]["fid_teacher"] < rows[f"{step}{k}-student-times"]["fid_teacher"], k


def _students_at(lengths, folder) -> dict:
    """The student's tensors at each of ``lengths`` of one demo run (the demo's training, without its scoring)."""
    model = t2i.shipped_pipeline("sd15")
    config = t2i_demo.demo_config("sd15", max(lengths), warmup_steps=1, batch_size=4)
    run = t2i_demo.preset_run("sd15", model, t2i.write_prompt_file(folder / "prompts.txt"), folder / "embeddings")
    torch.manual_seed(0)
    return {n: {k: v.clone() for k, v in student.state_dict().items()}
            for n, student, *_ in t2i_demo._distil("sd15", model, run, config, folder, False, lengths)}


def test_a_run_scored_on_the_way_is_the_shorter_run_and_goes_on_unchanged(tmp_path):
    """``score_at``: the student scored at iteration 2 of a 4-iteration run is bit for bit the 2-iteration run's
    (constant rates after warm-up), and looking at it on the way leaves the rest of the run as it would have been."""
    looked_at = _students_at([2, 4], tmp_path)
    for n in (2, 4):
        alone = _students_at([n], tmp_path)[n]
        assert looked_at[n].keys() == alone.keys() and all(torch.equal(looked_at[n][k], alone[k]) for k in alone), n
    assert any(not torch.equal(looked_at[2][k], looked_at[4][k]) for k in looked_at[2])  # the last two iterations trained
    assert (tmp_path / "iterations-2" / "train_log.jsonl").read_text().count("\n") == 2


def test_scoring_on_the_way_is_refused_where_the_rates_follow_the_length():
    config = t2i_demo.demo_config("sd3", 10)  # a flow preset's rates decay to the run's end
    assert t2i_demo.scoring_lengths(config) == [10]
    with pytest.raises(ValueError, match="constant rates"):
        t2i_demo.scoring_lengths(config, (5,))
    with pytest.raises(ValueError, match=r"1\.\.10"):
        t2i_demo.scoring_lengths(t2i_demo.demo_config("sd15", 10), (20,))


def test_onnx_export_of_the_demo_student_samples_what_torch_samples(tmp_path):
    """``--onnx``: the student folder the demo leaves is exported by ``tdm-fast export`` (sampler graphs and
    VAE decoder), ONNX Runtime images match torch's, and the FIDs, bootstrap std and acceptance are recorded."""
    pytest.importorskip("onnxruntime")  # the `export` extra
    results = t2i_demo.run_t2i_demo("sd15", tmp_path, iterations=2, samples=40, bootstrap=5, columns=2, progress=False,
                                    reference_steps=4, warmup_steps=1, batch_size=4, onnx=True, onnx_exporter="torchscript")
    assert (tmp_path / "student" / "denoiser.json").is_file() and (tmp_path / "onnx" / "vae_decoder_fp32.onnx").is_file()
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == results
    for k in (1, 2, 4):
        entry = saved["comparisons"][f"K={k}"]
        assert (tmp_path / "onnx" / f"sampler_k{k}_fp32.onnx").is_file()
        assert entry["onnx_max_abs_diff"] < 1e-3, entry  # images in [0, 1]
        assert entry["fid_bootstrap_std"] > 0 and abs(entry["onnx_fid"] - entry["torch_fid"]) < 1e-2 * (1 + entry["torch_fid"])
        assert isinstance(saved["acceptance"][f"K={k} ONNX FID within the bootstrap std of torch's"], bool)
    assert saved["onnx"]["export_argv"][:3] == ["export", "--checkpoint", str(tmp_path / "student")]
    assert "ONNX FID to teacher-50" in (tmp_path / "metrics.md").read_text()


def test_role_layouts_start_as_one_student_and_write_their_table(tmp_path):
    """LoRA roles, --fake-copy and --full-finetune are one algorithm: after one iteration from the same
    start (LoRA B = 0, copies of the teacher) their students score alike; the table and JSON are written."""
    from tdm_fast.demos import t2i_layouts

    result = t2i_layouts.run_layouts("sd15", tmp_path, seeds=(0, 1), iterations=1, samples=40, say=lambda _m: None)
    assert set(result["runs"]) == set(t2i_layouts.LAYOUTS)
    fids = [row["K=4"][0] for row in result["table"].values()]
    assert max(fids) - min(fids) < 1e-2 * max(fids), result["table"]
    assert json.loads((tmp_path / "layouts.json").read_text())["table"].keys() == result["table"].keys()
    assert "full-finetune" in (tmp_path / "layouts.md").read_text()


@pytest.mark.parametrize("item", ["fake_lr", "fake_lr=fast", "fake_lrr=3e-4", "fake_lr=-1"])
def test_layouts_refuse_a_bad_recipe_override_before_training(tmp_path, item):
    from tdm_fast.demos import t2i_layouts

    with pytest.raises(SystemExit) as exit_info:
        t2i_layouts.main(["--out", str(tmp_path / "out"), "--set", item])
    assert exit_info.value.code == 2 and not (tmp_path / "out").exists()


def test_pipeline_ablations_write_the_digits_tables_shape(tmp_path, capsys):
    """`tdm-fast eval --ablations --pipeline sd15`: the variants trained through the demo's path, scored by
    the engine beside the stock pipeline's baselines and the measure's floor, in the ablation table's shape
    (the 2 × 2 solver table included)."""
    from tdm_fast.cli import main

    out = tmp_path / "abl"
    assert main(["eval", "--ablations", "--pipeline", "sd15", "--iterations", "2", "--seeds", "0", "1", "--samples", "40",
                 "--variants", "tdm", "dpmsolver", "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "ablations.json").read_text())
    assert results["recipe"] == "t2i_demo_config" and results["fid_floor"] > 0
    assert set(results["runs"]) == {"tdm", "dpmsolver"} and all(set(r) == {"0", "1"} for r in results["runs"].values())
    assert {results["best_baseline"][k] for k in ("1", "2", "4")} <= set(results["teacher"])
    for variant, trained in (("tdm", "ddim"), ("dpmsolver", "dpmsolver")):
        run = results["runs"][variant]["0"]
        assert {"fid_teacher", "fid_data", "accuracy"} <= set(run["K=4"])
        assert run["test_solvers"]["K=4"][trained] == run["K=4"] and len(run["test_solvers"]["K=4"]) == 2
    table = (out / "ablations.md").read_text()
    assert "trained on | tested with DDIM" in table and "the measure's floor" in table
    assert table.strip() in capsys.readouterr().out


def test_preset_shape_uses_the_folders_vae_factor_and_native_resolution(tmp_path):
    """Defect found on this path: the latent shape assumed a VAE factor of 8 (and a default resolution of
    512), so a pipeline whose VAE downsamples 2× got 2×2 latents from --resolution 16, and 256×256 by default."""
    from tdm_fast.backbones.run import PresetRun, build_preset_run

    prompts = t2i.write_prompt_file(tmp_path / "p.txt")
    for extra in ({}, {"resolution": 16}):
        args = PresetRun(preset="sd15", model=t2i.shipped_pipeline("sd15"), prompts=prompts,
                         embedding_cache=tmp_path / "cache", lora_rank=2, **extra)
        _, _, _, conditions, shape = build_preset_run(args)
        assert shape == (4, 8, 8)


def test_embedding_cache_follows_rebuilt_text_encoders(tmp_path):
    """Defect found on this path: the prompt-embedding cache was keyed by the folder's path only, so a
    pipeline rebuilt in place (``teacher train --out`` the same DIR) silently trained on stale embeddings."""
    import diffusers

    from tdm_fast.backbones.presets import prompt_conditions

    model = tmp_path / "model"
    pipe = t2i.assemble_pipeline("sd15", t2i.make_vae())
    pipe.save_pretrained(model)
    prompts = ["the number 7", "a handwritten digit one"]
    first, _ = prompt_conditions("sd15", model, prompts, pipe.unet, 16, tmp_path / "cache")
    encoder = diffusers.StableDiffusionPipeline.from_pretrained(model, safety_checker=None, feature_extractor=None,
                                                                requires_safety_checker=False).text_encoder
    with torch.no_grad():
        for p in encoder.parameters():
            p.mul_(1.5)
    encoder.save_pretrained(model / "text_encoder")
    second, _ = prompt_conditions("sd15", model, prompts, pipe.unet, 16, tmp_path / "cache")
    fresh, _ = prompt_conditions("sd15", model, prompts, pipe.unet, 16, None)
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, fresh)


@pytest.mark.parametrize("pipeline", t2i.PIPELINES)
def test_lora_on_every_layer_kind_round_trips_into_the_stock_pipeline(pipeline, tmp_path):
    """Defect found on this path: save_lora wrote a UNet LoRA half in diffusers' legacy naming (the
    attention projections) and half in peft's (convs, feed-forward, proj_in/out); the stock pipeline's
    loader picks one naming from the first key and silently dropped the other half (max |Δ| 3.3 between
    the pipeline's and the engine's student)."""
    from tdm_fast.backbones.run import build_preset_run, export_preset_student
    from tdm_fast.config import TDMConfig

    model = t2i.shipped_pipeline(pipeline)
    args = t2i_demo.preset_run(pipeline, model, t2i.write_prompt_file(tmp_path / "p.txt"), tmp_path / "cache", 4)
    config = TDMConfig(steps=(1, 2, 4), cfg_scale=4.5, kernels="reference")
    _, student, _, _, _ = build_preset_run(args, config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained-looking student: every LoRA factor and the K embedding non-zero
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    export_preset_student(args, student, config, tmp_path / "run")
    for k in (1, 4):
        assert t2i_demo.pipeline_parity(pipeline, model, tmp_path / "run" / "lora", student, k, samples=4) < 1e-4


def test_steps_embedding_folds_into_the_base_layer_of_a_lora_wrapped_time_embedding(tmp_path):
    """Defect found on this path: apply_steps_embedding folded the K embedding into the bias of the
    last nn.Linear inside the time embedding, which is the LoRA ``lora_B`` when the time embedding's own
    linear layers are LoRA targets: the embedding was then scaled by alpha/rank (and lost by fuse_lora)."""
    from tdm_fast.backbones.run import build_preset_run, export_preset_student
    from tdm_fast.config import TDMConfig

    model = t2i.shipped_pipeline("sd15")
    args = dataclasses.replace(t2i_demo.preset_run("sd15", model, t2i.write_prompt_file(tmp_path / "p.txt"), tmp_path / "cache", 4,
                                                   "to_q,to_k,to_v,to_out.0,linear_1,linear_2"), lora_alpha=8.0)
    config = TDMConfig(steps=(1, 2, 4), cfg_scale=4.5, kernels="reference")
    _, student, _, _, _ = build_preset_run(args, config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    export_preset_student(args, student, config, tmp_path / "run")
    assert t2i_demo.pipeline_parity("sd15", model, tmp_path / "run" / "lora", student, 2, samples=4) < 1e-4


def test_baselines_are_nfe_matched():
    for pipeline in t2i.PIPELINES:
        for k in (1, 2, 4):
            samplers = t2i_demo.teacher_samplers(pipeline, k, 4.5)
            assert all(s["nfe"] <= k for s in samplers)
            assert any(s["scheduler"] == "tdm" and s["guidance"] == 1.0 and s["steps"] == k for s in samplers)
            assert any(s["guidance"] > 1 for s in samplers) == (k >= 2)
