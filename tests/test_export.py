"""Issue 6: compiled and exported K-step samplers match the torch sampler.

Parity measure: max |a - b| / max |b| (``relative_error``). Tolerances: 1e-4 for fp32 (ONNX
Runtime and torch.compile); 2e-2 for fp16 graphs against the fp32 torch sampler (fp16 weights and
activations, float32 DDIM arithmetic inside the graph; ONNX Runtime's CPU provider runs these
graphs in fp16, measured ~1e-3).
"""
from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from tdm_fast.denoiser import Denoiser  # noqa: E402
from tdm_fast.sampling import ddim_sample, sample_student, stage_times  # noqa: E402
from tdm_fast.schedule import ScheduleConfig  # noqa: E402
from tdm_fast.demos.toy2d import TOY_SCHEDULE, ToyMLP  # noqa: E402

from tdm_fast.export import cli as export_cli  # noqa: E402
from tdm_fast.export.cli import relative_error  # noqa: E402
from tdm_fast.export.onnx import (  # noqa: E402
    UnsupportedOperatorError,
    count_ops,
    export_denoiser_onnx,
    export_sampler_onnx,
    read_metadata,
)
from tdm_fast.export.runtime import OrtDecoder, OrtDenoiser, OrtSampler  # noqa: E402
from tdm_fast.export.vae import LatentDecoder, export_vae_decoder_onnx, load_vae  # noqa: E402
from tdm_fast.export.sampler import StudentSampler, compile_sampler, ddim_loop  # noqa: E402
from tdm_fast.export import tensorrt as trt_export  # noqa: E402

FP32_TOL = 1e-4
FP16_TOL = 2e-2
STEPS = (1, 2, 4)


def _toy_student(hidden=64, depth=2, seed=0) -> Denoiser:
    torch.manual_seed(seed)
    model = ToyMLP(hidden=hidden, depth=depth)
    student = Denoiser(model, TOY_SCHEDULE, "epsilon", null_cond=model.config.num_classes, steps_set=STEPS)
    torch.nn.init.normal_(student.steps_embedding.embedding.weight, std=0.5)  # K must matter
    return student.eval()


def _tiny_unet(**extra):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8,),
        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
        cross_attention_dim=8, layers_per_block=1, attention_head_dim=4, norm_num_groups=4, **extra,
    )


@pytest.fixture(scope="module")
def toy():
    return _toy_student()


@pytest.fixture(scope="module")
def toy_inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 2, generator=g), torch.tensor([0, 1, 2])


@pytest.fixture(scope="module")
def toy_onnx(toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("toy_onnx")
    noise, labels = torch.randn(2, 2), torch.tensor([0, 1])
    paths = {}
    for k in STEPS:
        paths[k] = out / f"sampler_k{k}_fp32.onnx"
        export_sampler_onnx(toy, paths[k], k, noise, labels)
    return paths


# -- ONNX: parity, structure, metadata ---------------------------------------------------------


@pytest.mark.parametrize("k", STEPS)
def test_onnx_sampler_matches_torch_toy(toy, toy_onnx, toy_inputs, k):
    noise, labels = toy_inputs  # batch 3: the graph was traced at batch 2 (dynamic batch)
    runner = OrtSampler(toy_onnx[k])
    got = runner(noise, labels)
    ref = sample_student(toy, noise, labels, k)
    assert got.shape == ref.shape
    assert relative_error(got, ref) <= FP32_TOL
    assert runner.run_count == 1  # one session.run produced the whole K-step sample
    assert relative_error(runner(noise[:1], labels[:1]), ref[:1]) <= FP32_TOL  # batch 1 too


def test_onnx_graph_is_unrolled(toy_onnx):
    ops = {k: count_ops(p) for k, p in toy_onnx.items()}
    for k, counts in ops.items():
        assert not {"Loop", "Scan", "If"} & set(counts), counts
        # K copies of the network: every matrix multiply appears K times.
        mm = counts.get("Gemm", 0) + counts.get("MatMul", 0)
        assert mm == k * (ops[1].get("Gemm", 0) + ops[1].get("MatMul", 0)) and mm > 0


def test_onnx_metadata(toy_onnx):
    meta = read_metadata(toy_onnx[4])
    assert meta["graph"] == "sampler"
    assert meta["steps"] == 4 and meta["timesteps"] == [899, 674, 449, 224] and meta["total_steps"] == 900
    assert meta["backbone"] == "ToyMLP" and meta["dtype"] == "fp32" and meta["steps_aware"] is True
    assert meta["tdm_fast_version"] and meta["opset"] == 18
    assert meta["inputs"] == [
        {"name": "noise", "shape": ["batch", 2], "dtype": "float32"},
        {"name": "class_labels", "shape": ["batch"], "dtype": "int64"},
    ]
    assert len(meta["alphas"]) == len(meta["sigmas"]) == 4
    onnx.checker.check_model(str(toy_onnx[4]), full_check=True)


def test_ort_bad_inputs_name_the_input(toy_onnx):
    runner = OrtSampler(toy_onnx[2])
    with pytest.raises(ValueError, match=r"'noise'.*\(3, 5\).*\('batch', 2\)"):
        runner(torch.randn(3, 5), torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match=r"'class_labels'.*float32.*int64"):
        runner(torch.randn(3, 2), torch.zeros(3))
    with pytest.raises(ValueError, match=r"'class_labels'.*\(2,\).*batch=3"):
        runner(torch.randn(3, 2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"'noise'.*float64"):
        runner(torch.randn(3, 2, dtype=torch.float64), torch.tensor([0, 1, 0]))
    with pytest.raises(TypeError, match="single condition tensor"):
        runner(torch.randn(3, 2), {"class_labels": torch.tensor([0, 1, 0])})
    assert runner.run_count == 0


class Float32FeaturesMLP(ToyMLP):
    """A ToyMLP that feeds float32 time features into its layers whatever their dtype: no fp16 export."""

    def forward(self, x_t, t, labels):
        from tdm_fast.demos.toy2d import timestep_features

        emb = self.time_embed(timestep_features(t, self.config.hidden)) + self.class_embed(labels)
        return self.out(self.inp(x_t) + emb)


def test_onnx_fp16_rejects_a_network_that_cannot_run_in_fp16(toy_inputs, tmp_path):
    noise, labels = toy_inputs
    bad = Denoiser(Float32FeaturesMLP(hidden=16, depth=1), TOY_SCHEDULE, "epsilon", null_cond=2).eval()
    with pytest.raises(TypeError, match="fp16"):
        export_sampler_onnx(bad, tmp_path / "bad.onnx", 1, noise, labels, dtype="fp16")


def test_onnx_fp16(toy_inputs, tmp_path):
    torch.manual_seed(0)
    model = ToyMLP(hidden=64, depth=2)
    toy = Denoiser(model, TOY_SCHEDULE, "epsilon", null_cond=2, steps_set=STEPS).eval()
    torch.nn.init.normal_(toy.steps_embedding.embedding.weight, std=0.5)
    noise, labels = toy_inputs
    path = tmp_path / "k2_fp16.onnx"
    meta = export_sampler_onnx(toy, path, 2, noise, labels, dtype="fp16")
    assert meta["dtype"] == "fp16" and meta["inputs"][0]["dtype"] == "float16"
    runner = OrtSampler(path)
    got = runner(noise.half(), labels)
    assert got.dtype == torch.float16
    assert relative_error(got, sample_student(toy, noise, labels, 2)) <= FP16_TOL
    with pytest.raises(ValueError, match=r"'noise'.*float32.*float16"):
        runner(noise, labels)


def test_per_network_export_and_teacher_cfg(tmp_path, toy_inputs):
    torch.manual_seed(0)
    teacher = Denoiser(ToyMLP(hidden=64, depth=2), TOY_SCHEDULE, "epsilon", null_cond=2).eval()  # no K embedding
    noise, labels = toy_inputs
    path = tmp_path / "denoiser.onnx"
    meta = export_denoiser_onnx(teacher, path, noise, labels)
    assert meta["graph"] == "denoiser" and [i["name"] for i in meta["inputs"]] == ["x_t", "t", "class_labels"]
    step = OrtDenoiser(path)
    t = torch.tensor([999, 500, 3])
    x0, eps = step(noise, t, labels)
    rx0, reps = teacher(noise, t, labels)
    assert relative_error(x0, rx0) <= FP32_TOL and relative_error(eps, reps) <= FP32_TOL
    times = list(range(999, 0, -100))
    ref = ddim_sample(teacher, noise, labels, times, cfg_scale=3.0)
    sched = teacher.schedule
    got = ddim_loop(step, noise, labels, times, lambda t: tuple(float(v) for v in sched(t)), 3.0,
                    teacher.uncond(labels))
    assert relative_error(got, ref) <= FP32_TOL


def test_unet_text_sampler_onnx(tmp_path):
    """A tiny SD-shaped UNet (cross-attention, steps-aware K embedding through the forward hook)."""
    from tdm_fast.backbones.unet import UNetAdapter

    student = Denoiser(UNetAdapter(_tiny_unet()), ScheduleConfig(), "epsilon", null_cond=torch.zeros(3, 8),
                       steps_set=STEPS).eval()
    torch.nn.init.normal_(student.steps_embedding.embedding.weight)
    g = torch.Generator().manual_seed(2)
    noise, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    path = tmp_path / "unet_k2.onnx"
    meta = export_sampler_onnx(student, path, 2, noise, text)
    assert meta["backbone"] == "UNetAdapter(UNet2DConditionModel)"
    runner = OrtSampler(path)
    for b in (1, 3):
        n, c = torch.randn(b, 4, 8, 8, generator=g), torch.randn(b, 3, 8, generator=g)
        assert relative_error(runner(n, c), sample_student(student, n, c, 2)) <= FP32_TOL
    assert count_ops(path)["Conv"] == 2 * sum(isinstance(m, torch.nn.Conv2d) for m in student.model.modules())
    # What TensorRT needs, checked without it: opset, operators, shape inference per profile, ORT runs.
    profiles = trt_export.default_profiles(path, batch=(1, 2, 4))
    report = trt_export.check_tensorrt_compatible(path, profiles)
    assert report["ok"] and report["profiles"]["max"]["x0"] == [4, 4, 8, 8]
    assert trt_export.check_profiles_run(path, profiles)["min"] == [[1, 4, 8, 8]]


def test_unet_sampler_onnx_opset23_has_fused_attention(tmp_path):
    """At opset 23 the exporter writes ONNX's Attention (and GroupNormalization) ops, which ONNX
    Runtime runs fused; TensorRT 10.0 parses opsets up to 20, and the check says so."""
    from tdm_fast.backbones.unet import UNetAdapter

    student = Denoiser(UNetAdapter(_tiny_unet()), ScheduleConfig(), "epsilon", null_cond=torch.zeros(3, 8)).eval()
    g = torch.Generator().manual_seed(4)
    noise, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    path = tmp_path / "unet_k2_opset23.onnx"
    export_sampler_onnx(student, path, 2, noise, text, opset=23)
    ops = count_ops(path)
    assert ops["Attention"] >= 2 and "Softmax" not in ops
    runner = OrtSampler(path)
    for b in (1, 3):
        n, c = torch.randn(b, 4, 8, 8, generator=g), torch.randn(b, 3, 8, generator=g)
        assert relative_error(runner(n, c), sample_student(student, n, c, 2)) <= FP32_TOL
    with pytest.raises(trt_export.TensorRTCompatibilityError, match=r"opset 23 is outside(.|\n)*\['Attention'\]"):
        trt_export.check_tensorrt_compatible(path, trt_export.default_profiles(path, batch=(1, 2, 4)))


def test_unet_sdxl_dict_condition_onnx(tmp_path):
    from tdm_fast.backbones.unet import UNetAdapter

    unet = _tiny_unet(addition_embed_type="text_time", addition_time_embed_dim=4,
                      projection_class_embeddings_input_dim=6 * 4 + 8)
    null = {"encoder_hidden_states": torch.zeros(3, 8), "text_embeds": torch.zeros(8),
            "time_ids": torch.tensor([8.0, 8, 0, 0, 8, 8])}
    student = Denoiser(UNetAdapter(unet), ScheduleConfig(), "epsilon", null_cond=null).eval()
    g = torch.Generator().manual_seed(3)
    cond = {"encoder_hidden_states": torch.randn(2, 3, 8, generator=g), "text_embeds": torch.randn(2, 8, generator=g),
            "time_ids": torch.tensor([[8.0, 8, 0, 0, 8, 8]] * 2)}
    noise = torch.randn(2, 4, 8, 8, generator=g)
    path = tmp_path / "sdxl_k1.onnx"
    meta = export_sampler_onnx(student, path, 1, noise, cond)
    assert [i["name"] for i in meta["inputs"]] == ["noise", "encoder_hidden_states", "text_embeds", "time_ids"]
    runner = OrtSampler(path)
    assert relative_error(runner(noise, cond), sample_student(student, noise, cond, 1)) <= FP32_TOL
    with pytest.raises(ValueError, match="missing"):
        runner(noise, {k: v for k, v in cond.items() if k != "time_ids"})
    with pytest.raises(ValueError, match=r"'text_embeds'.*\(2, 9\)"):
        runner(noise, {**cond, "text_embeds": torch.randn(2, 9)})


def test_lora_is_fused_before_export(tmp_path, toy_inputs):
    from peft import LoraConfig, inject_adapter_in_model

    student = _toy_student()
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["inp", "out.1"]), student.model)
    for name, p in student.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a LoRA that changes the output
    noise, labels = toy_inputs
    ref = sample_student(student, noise, labels, 2)
    path = tmp_path / "lora.onnx"
    export_sampler_onnx(student, path, 2, noise, labels)
    model = onnx.load(str(path))
    assert not [i.name for i in model.graph.initializer if "lora" in i.name.lower()]
    assert relative_error(OrtSampler(path)(noise, labels), ref) <= FP32_TOL
    assert any("lora" in n for n, _ in student.model.named_parameters())  # the student is untouched


def test_unsupported_operator_is_named(tmp_path):
    class SvdNet(torch.nn.Module):
        def forward(self, x, t, labels):
            return x * torch.linalg.svdvals(x.reshape(x.shape[0], 1, -1)).reshape(-1, 1)

    student = Denoiser(SvdNet(), TOY_SCHEDULE, "epsilon", null_cond=2)
    with pytest.raises(UnsupportedOperatorError, match="svd") as info:
        export_sampler_onnx(student, tmp_path / "svd.onnx", 1, torch.randn(2, 2), torch.tensor([0, 1]))
    assert "svd" in info.value.op


# -- torch.compile ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_toy():
    return _toy_student(hidden=32, depth=1, seed=4)


@pytest.mark.parametrize("k", STEPS)
def test_compiled_matches_eager(small_toy, toy_inputs, k):
    noise, labels = toy_inputs
    sampler = compile_sampler(small_toy, k)
    ref = sample_student(small_toy, noise, labels, k)
    assert relative_error(sampler(noise, labels), ref) <= FP32_TOL
    assert compile_sampler(small_toy, k) is sampler  # the compiled module is kept and reused
    assert relative_error(sampler(noise, labels), ref) <= FP32_TOL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graphs, channels_last)")
@pytest.mark.parametrize("k", STEPS)
def test_cuda_graph_sampler_matches_eager(k):
    """The GPU default path: CUDA-graph replay, channels_last weights, cloned outputs. fp32 parity is
    checked with TF32 off (cuDNN convolutions use TF32 by default, which alone moves the result by
    ~1e-4, in eager as well)."""
    from tdm_fast.backbones.unet import UNetAdapter

    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        student = Denoiser(UNetAdapter(_tiny_unet()), ScheduleConfig(), "epsilon", null_cond=torch.zeros(3, 8),
                           steps_set=STEPS).cuda().eval()
        torch.nn.init.normal_(student.steps_embedding.embedding.weight)
        g = torch.Generator(device="cuda").manual_seed(3)
        noise, text = torch.randn(2, 4, 8, 8, generator=g, device="cuda"), torch.randn(2, 3, 8, generator=g, device="cuda")
        sampler = compile_sampler(student, k, mode="reduce-overhead")
        with torch.no_grad():
            ref = sample_student(student, noise, text, k)
        first = sampler(noise, text)
        second = sampler(noise * 0.5, text)  # a replay must not overwrite what the first call returned
        assert relative_error(first, ref) <= FP32_TOL
        with torch.no_grad():
            assert relative_error(second, sample_student(student, noise * 0.5, text, k)) <= FP32_TOL
        assert relative_error(sampler(noise, text), ref) <= FP32_TOL
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
        torch._dynamo.reset()


def test_every_compiled_sampler_of_a_process_is_compiled(toy_inputs):
    """More samplers than Dynamo's per-code-object recompile limit (8): none may fall back to eager."""
    noise, labels = toy_inputs
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    for seed in range(4):
        student = _toy_student(hidden=16, depth=1, seed=10 + seed)
        for k in STEPS:
            out = compile_sampler(student, k, backend=counting_backend)(noise, labels)
            assert relative_error(out, sample_student(student, noise, labels, k)) <= FP32_TOL
    assert len(graphs) == 4 * len(STEPS)


def test_student_sampler_module_is_the_sampler(toy, toy_inputs):
    noise, labels = toy_inputs
    for k in STEPS:
        module = StudentSampler(toy, k)
        assert module.times == tuple(stage_times(k))
        with torch.no_grad():
            assert torch.equal(module(noise, labels), sample_student(toy, noise, labels, k))
    with pytest.raises(ValueError, match="not in the trained set"):
        StudentSampler(toy, 3)


def test_onnx_dpmsolver_sampler_matches_torch(toy, toy_inputs, tmp_path):
    """Issue 19: the DPM-Solver++(2M) trajectory exports too (the unrolled graph carries the previous
    stage's x̂0); ONNX Runtime matches sample_student(solver="dpmsolver") to the fp32 tolerance."""
    noise, labels = toy_inputs
    path = tmp_path / "sampler_k4_fp32.onnx"
    meta = export_sampler_onnx(toy, path, 4, torch.randn(2, 2), torch.tensor([0, 1]), solver="dpmsolver")
    assert meta["solver"] == "dpmsolver" and read_metadata(path)["solver"] == "dpmsolver"
    runner = OrtSampler(path)
    assert runner.solver == "dpmsolver" and runner.steps == 4
    ref = sample_student(toy, noise, labels, 4, solver="dpmsolver")
    with torch.no_grad():
        assert relative_error(StudentSampler(toy, 4, solver="dpmsolver")(noise, labels), ref) <= 1e-6
    got = runner(noise, labels)
    assert relative_error(got, ref) <= FP32_TOL and runner.run_count == 1
    assert relative_error(got, sample_student(toy, noise, labels, 4)) > 100 * FP32_TOL  # the solvers do differ
    with pytest.raises(ValueError, match="dpmsolver solver, not ddim"):
        export_cli.load_runner("onnx", path, 4)
    assert relative_error(export_cli.load_runner("onnx", path, 4, solver="dpmsolver")(noise, labels), ref) <= FP32_TOL


# -- TensorRT --------------------------------------------------------------------------------


def test_tensorrt_readiness_toy(toy_onnx):
    profiles = trt_export.default_profiles(toy_onnx[4], batch=(1, 4, 16))
    assert profiles == {"noise": ((1, 2), (4, 2), (16, 2)), "class_labels": ((1,), (4,), (16,))}
    report = trt_export.check_tensorrt_compatible(toy_onnx[4], profiles)
    assert report["ok"] and report["opset"] <= trt_export.TENSORRT_MAX_OPSET
    assert set(report["ops"]) <= trt_export.TENSORRT_SUPPORTED_OPS
    assert report["profiles"]["max"] == {"x0": [16, 2]}
    assert trt_export.check_profiles_run(toy_onnx[4], profiles)["max"] == [[16, 2]]


def test_tensorrt_check_rejects_unsupported_ops():
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Unique", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(trt_export.TensorRTCompatibilityError, match="Unique"):
        trt_export.check_tensorrt_compatible(model)


_TRT_OK, _TRT_REASON = trt_export.tensorrt_available()


@pytest.mark.skipif(_TRT_OK, reason="TensorRT is installed here")
def test_tensorrt_missing_gives_install_hint(toy_onnx, tmp_path):
    with pytest.raises((ImportError, RuntimeError), match="TensorRT|CUDA"):
        trt_export.build_engine(toy_onnx[2], tmp_path / "x.engine")
    with pytest.raises((ImportError, RuntimeError), match="TensorRT|CUDA"):
        trt_export.TensorRTRunner(tmp_path / "x.engine")


@pytest.mark.gpu
@pytest.mark.skipif(not _TRT_OK, reason=f"TensorRT unavailable: {_TRT_REASON}")
def test_tensorrt_engine_matches_torch(toy, toy_onnx, toy_inputs, tmp_path):
    noise, labels = toy_inputs
    engine = trt_export.build_engine(toy_onnx[4], tmp_path / "k4.engine", batch=(1, 4, 8), fp16=False)
    ref = sample_student(toy, noise, labels, 4)
    runner = trt_export.TensorRTRunner(engine)
    got = runner(noise.cuda(), labels.cuda())
    assert got.is_cuda and relative_error(got, ref) <= 1e-3  # TF32 may be used by TensorRT for fp32 GEMMs
    assert relative_error(runner(noise.cuda() * 0.5, labels.cuda()), sample_student(toy, noise * 0.5, labels, 4)) <= 1e-3
    assert relative_error(got, ref) <= 1e-3  # the first result survives the second call (buffers are reused)


# -- VAE decoder -------------------------------------------------------------------------------


def _tiny_vae(**extra):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                         sample_size=16, **extra).eval()


def _pipeline_decode(vae, latents):
    """What a diffusers pipeline does with the final latents (SD1.5/SDXL/SD3 ``__call__``)."""
    from diffusers.image_processor import VaeImageProcessor

    config = vae.config
    if config.latents_mean is not None:
        mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (config.latents_mean, config.latents_std))
        z = latents * std / config.scaling_factor + mean
    else:
        z = latents / config.scaling_factor + (config.shift_factor or 0.0)
    with torch.no_grad():
        return VaeImageProcessor().postprocess(vae.decode(z).sample, output_type="pt")


@pytest.fixture(scope="module")
def vae_onnx(tmp_path_factory):
    """A tiny AutoencoderKL saved as a pipeline's vae/ folder, loaded back and exported."""
    root = tmp_path_factory.mktemp("vae")
    _tiny_vae().save_pretrained(root / "pipe" / "vae")
    vae = load_vae(root / "pipe")
    meta = export_vae_decoder_onnx(vae, root / "vae_decoder.onnx", (4, 8, 8), dynamic_resolution=True)
    return vae, root / "vae_decoder.onnx", meta


def test_vae_decoder_onnx_matches_the_pipeline(vae_onnx):
    vae, path, meta = vae_onnx
    decoder = OrtDecoder(path)
    g = torch.Generator().manual_seed(5)
    for shape in ((1, 4, 8, 8), (3, 4, 8, 8), (2, 4, 12, 10)):  # dynamic batch and resolution
        latents = torch.randn(*shape, generator=g)
        images = decoder(latents)
        assert images.shape == (shape[0], 3, 2 * shape[2], 2 * shape[3])
        assert relative_error(images, _pipeline_decode(vae, latents)) <= FP32_TOL
        assert 0 <= float(images.min()) and float(images.max()) <= 1
    assert meta["graph"] == "vae_decoder" and meta["scaling_factor"] == vae.config.scaling_factor and meta["upscale"] == 2
    assert read_metadata(path)["outputs"][0]["range"] == [0, 1]
    with pytest.raises(ValueError, match=r"input 'latents' has shape \(2, 3, 8, 8\), expected shape \('batch', 4, 'height', 'width'\)"):
        decoder(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="not a sampler graph"):
        OrtSampler(path)
    # What TensorRT needs, checked without it, over a resolution profile.
    profiles = trt_export.default_profiles(path, batch=(1, 2, 4), resolution=((8, 8), (12, 12), (16, 16)))
    report = trt_export.check_tensorrt_compatible(path, profiles)
    assert report["ok"] and report["profiles"]["max"]["images"] == [4, 3, 32, 32]
    assert trt_export.check_profiles_run(path, profiles)["opt"] == [[2, 3, 24, 24]]


def test_vae_decoder_fp16(tmp_path):
    vae = _tiny_vae()
    meta = export_vae_decoder_onnx(vae, tmp_path / "vae16.onnx", (4, 8, 8), dtype="fp16")
    latents = torch.randn(2, 4, 8, 8)
    images = OrtDecoder(tmp_path / "vae16.onnx")(latents.half())
    assert meta["dtype"] == "fp16" and images.dtype == torch.float32
    assert relative_error(images, _pipeline_decode(vae, latents)) <= FP16_TOL


@pytest.mark.parametrize("config", [dict(shift_factor=0.1159, scaling_factor=1.5305),  # SD3
                                    dict(latents_mean=(0.1, -0.2, 0.3, 0.0), latents_std=(1.1, 0.9, 1.0, 1.2),
                                         scaling_factor=0.13025)])  # SDXL-style statistics
def test_latent_decoder_unscales_like_the_pipelines(config):
    vae = _tiny_vae(**config)
    latents = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert relative_error(LatentDecoder(vae)(latents), _pipeline_decode(vae, latents)) <= 1e-5  # x·(1/s) vs x/s
    with pytest.raises(ValueError, match=r"latents must be \(B, 4, h, w\)"):
        LatentDecoder(vae)(torch.randn(2, 3, 8, 8))


class _TraceOnlyPathNet(torch.nn.Module):
    """A network with a code path taken only while being exported (libraries keep such paths for
    tracers): the graph then computes something else than the module."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)

    def forward(self, x_t, t, labels):
        return self.lin(x_t) * (2.0 if torch.compiler.is_exporting() else 1.0)


def test_cli_export_refuses_a_graph_that_does_not_match_torch(tmp_path):
    student = Denoiser(_TraceOnlyPathNet(), TOY_SCHEDULE, "epsilon", null_cond=2).eval()
    parser = export_cli.add_export_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--format", "onnx", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "out"),
                              "--steps", "2", "--shape", "2"])
    with pytest.raises(ValueError, match=r"do not compute what the torch model computes: K=2 \(.*\) exceed the fp32 tolerance 0.0001"):
        export_cli.run_export(args, student=student)
    assert not (tmp_path / "out").exists()  # nothing deployable-looking is left behind
    assert export_cli.parity_tolerance("onnx", "fp16", "cpu") == 2e-2


def test_cli_exports_the_vae_decoder_beside_the_sampler(tmp_path):
    from tdm_fast.backbones.unet import UNetAdapter

    student = Denoiser(UNetAdapter(_tiny_unet()), ScheduleConfig(), "epsilon", null_cond=torch.zeros(3, 8)).eval()
    student.save_pretrained(tmp_path / "ckpt")
    _tiny_vae().save_pretrained(tmp_path / "vae")
    parser = export_cli.add_export_arguments(argparse.ArgumentParser())
    common = ["--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"), "--steps", "1"]
    result = export_cli.run_export(parser.parse_args(["--format", "onnx", "--vae", str(tmp_path / "vae"), *common]))
    assert set(result["parity"]) == {1, "vae_decoder"} and max(result["parity"].values()) <= FP32_TOL
    assert str(tmp_path / "out" / "vae_decoder_fp32.onnx") in result["files"]
    latents = export_cli.load_runner("onnx", tmp_path / "out", 1)(torch.randn(2, 4, 8, 8), torch.randn(2, 3, 8))
    assert OrtDecoder(tmp_path / "out" / "vae_decoder_fp32.onnx")(latents).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="--format onnx or tensorrt"):
        export_cli.run_export(parser.parse_args(["--format", "compile", "--vae", str(tmp_path / "vae"), *common]))
    with pytest.raises(FileNotFoundError, match="no VAE at"):
        load_vae(tmp_path / "ckpt")


# -- CLI helpers -------------------------------------------------------------------------------


def test_cli_export_and_runners(tmp_path, toy_inputs):
    student = _toy_student(hidden=32, depth=1, seed=5)
    ckpt = tmp_path / "ckpt"
    student.save_pretrained(ckpt)
    parser = export_cli.add_export_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--format", "onnx", "--checkpoint", str(ckpt), "--out", str(tmp_path / "out"),
                              "--steps", "1", "2"])
    result = export_cli.run_export(args)
    assert all(err <= FP32_TOL for err in result["parity"].values()) and set(result["parity"]) == {1, 2}
    noise, labels = toy_inputs
    torch_runner = export_cli.load_runner("torch", ckpt, 2)
    onnx_runner = export_cli.load_runner("onnx", tmp_path / "out", 2)
    assert relative_error(onnx_runner(noise, labels), torch_runner(noise, labels)) <= FP32_TOL
    with pytest.raises(ValueError, match="K=1, not 2"):
        export_cli.load_runner("onnx", tmp_path / "out" / "sampler_k1_fp32.onnx", 2)
    with pytest.raises(FileNotFoundError, match="tdm-fast export"):
        export_cli.load_runner("onnx", tmp_path / "out", 4)
    if not _TRT_OK:
        with pytest.raises((ImportError, RuntimeError, FileNotFoundError)):
            export_cli.load_runner("tensorrt", tmp_path / "out", 2)
    sub = export_cli.add_backend_arguments(argparse.ArgumentParser())
    assert sub.parse_args(["--backend", "compile"]).backend == "compile"
    assert np.isfinite(onnx_runner(noise, labels).numpy()).all()


def test_compile_export_writes_a_program_that_sample_runs(tmp_path, capsys):
    """Issue 35 item 11: `export --format compile` writes the K-step sampler as a torch.export program, which
    `sample --backend compile --engine` loads, compiles and runs: the eager student's samples to fp32 rounding.
    The file alone is the sampler (no checkpoint beside it); a wrong K or a file that is no program is refused."""
    from safetensors.torch import load_file

    from tdm_fast.cli import main

    student = _toy_student(hidden=32, depth=1, seed=7)
    ckpt, out, samples = tmp_path / "ckpt", tmp_path / "out", tmp_path / "samples" / "s"
    student.save_pretrained(ckpt)
    assert main(["--quiet", "export", "--format", "compile", "--checkpoint", str(ckpt), "--out", str(out), "--steps", "2"]) == 0
    program = out / "sampler_k2_fp32.pt2"
    assert sorted(p.name for p in out.iterdir()) == [program.name]
    assert main(["--quiet", "sample", "--checkpoint", str(ckpt), "--backend", "compile", "--engine", str(program), "--steps", "2",
                 "--num", "2", "--labels", "0", "1", "--out", str(samples)]) == 0
    saved = load_file(samples.with_suffix(".safetensors"))
    noise = torch.randn((2, 2), generator=torch.Generator().manual_seed(0))  # the sample command's draw for --seed 0
    assert relative_error(saved["samples"], sample_student(student, noise, saved["labels"], 2)) <= FP32_TOL

    moved = tmp_path / "elsewhere" / program.name
    moved.parent.mkdir()
    program.rename(moved)
    ckpt.rename(tmp_path / "gone")
    runner = export_cli.load_runner("compile", moved, 2)
    assert (runner.steps, runner.solver) == (2, "ddim")
    assert relative_error(runner(noise, saved["labels"]), saved["samples"]) <= FP32_TOL
    with pytest.raises(ValueError, match="K=2, not 1"):
        export_cli.load_runner("compile", moved, 1)
    not_a_program = tmp_path / "sampler_k2_fp32.onnx"
    not_a_program.write_bytes(b"not a zip")
    assert main(["sample", "--checkpoint", str(tmp_path / "gone"), "--backend", "compile", "--engine", str(not_a_program),
                 "--steps", "2", "--out", str(tmp_path / "refused" / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tdm-fast: error:") and "is not a torch.export program" in err and "\n" not in err
    assert not (tmp_path / "refused").exists()
