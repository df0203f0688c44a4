"""TDMScheduler against the contract of diffusers' schedulers (in the manner of diffusers' own
SchedulerCommonTest and its LCM/TCD tests), and against the stock samplers it reproduces."""
import json

import diffusers
import pytest
import torch

from tdm_fast.scheduler import TDMScheduler

PREDICTIONS = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
SANA = {  # Sana's DPM-Solver++(2M) config, as the official TDM README samples SD3 with it (flow_shift set by hand)
    "_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++", "beta_end": 0.02, "beta_schedule": "linear",
    "beta_start": 0.0001, "final_sigmas_type": "zero", "flow_shift": 3.0, "lower_order_final": True,
    "num_train_timesteps": 1000, "prediction_type": "flow_prediction", "solver_order": 2, "solver_type": "midpoint",
    "timestep_spacing": "linspace", "use_flow_sigmas": True,
}
CONFIGS = [dict(beta_schedule=b, prediction_type=p) for b in BETA_SCHEDULES for p in PREDICTIONS] + [FLOW]


def make(config: dict, **kwargs) -> TDMScheduler:
    return TDMScheduler.from_config(config, **kwargs) if "_class_name" in config else TDMScheduler(**config, **kwargs)


def dummy_model(x: torch.Tensor, t) -> torch.Tensor:
    """A deterministic stand-in for a network: smooth in x, depends on the timestep it is given."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1)[0]
    return torch.tanh(0.8 * x + 0.3) * (0.5 + t / 2000.0) + 0.1 * torch.sin(3 * x)


def sample_loop(scheduler, steps: int, x: torch.Tensor, **set_kwargs) -> torch.Tensor:
    scheduler.set_timesteps(steps, **set_kwargs) if steps else scheduler.set_timesteps(**set_kwargs)
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(dummy_model(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    return x


def settings(scheduler) -> dict:
    return {k: v for k, v in scheduler.config.items() if not k.startswith("_")}


def noise(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: json.dumps(c, sort_keys=True))
def test_save_load_round_trip_and_output_equivalence(config, tmp_path):
    scheduler = make(config, solver="dpmsolver")
    scheduler.save_pretrained(tmp_path)
    loaded = TDMScheduler.from_pretrained(tmp_path)
    assert settings(loaded) == settings(scheduler)
    assert torch.equal(sample_loop(loaded, 4, noise()), sample_loop(scheduler, 4, noise()))
    again = TDMScheduler.from_config(loaded.config)
    assert settings(again) == settings(scheduler)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: json.dumps(c, sort_keys=True))
def test_step_shape_and_return_dict(config):
    scheduler = make(config)
    scheduler.set_timesteps(3)
    x = noise()
    t0, t1 = scheduler.timesteps[:2]
    out0 = scheduler.step(dummy_model(x, t0), t0, x)
    assert out0.prev_sample.shape == x.shape and out0.pred_original_sample.shape == x.shape
    as_tuple = scheduler.step(dummy_model(x, t1), t1, x, return_dict=False)
    scheduler.set_timesteps(3)
    scheduler.step(dummy_model(x, t0), t0, x)
    as_output = scheduler.step(dummy_model(x, t1), t1, x)
    assert torch.equal(as_tuple[0], as_output.prev_sample) and torch.equal(as_tuple[1], as_output.pred_original_sample)


def test_public_api():
    scheduler = TDMScheduler()
    for name in ("init_noise_sigma", "order", "scale_model_input", "step", "set_timesteps", "add_noise", "betas",
                 "alphas", "alphas_cumprod", "timesteps", "sigmas", "step_index", "begin_index", "compatibles"):
        assert hasattr(scheduler, name), name
    assert scheduler.init_noise_sigma == 1.0 and scheduler.order == 1 and len(scheduler) == 1000
    x = noise()
    assert scheduler.scale_model_input(x, 10) is x


@pytest.mark.parametrize("name", TDMScheduler._compatibles)
def test_from_config_both_ways(name):
    stock_cls = getattr(diffusers, name)
    assert stock_cls in TDMScheduler().compatibles
    flow = "FlowMatch" in name
    ours = make(FLOW) if flow else TDMScheduler(beta_schedule="linear", beta_start=0.0002, beta_end=0.015, prediction_type="v_prediction")
    stock = stock_cls.from_config(ours.config)
    back = TDMScheduler.from_config(stock.config)
    assert back.config.schedule == ours.config.schedule and back.config.num_train_timesteps == ours.config.num_train_timesteps
    if flow:
        assert back.config.shift == ours.config.shift
    else:  # the stock class's own defaults (CogVideoX's SNR shift) are part of its forward process
        torch.testing.assert_close(back.alphas_cumprod, stock.alphas_cumprod.float(), rtol=2e-5, atol=1e-7)
        assert back.config.prediction_type == "v_prediction"


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
@pytest.mark.parametrize("zero_snr", [False, True])
def test_betas_as_diffusers(beta_schedule, zero_snr):
    kwargs = dict(beta_schedule=beta_schedule, beta_start=0.0001, beta_end=0.02, rescale_betas_zero_snr=zero_snr)
    ours, stock = TDMScheduler(**kwargs), diffusers.DDPMScheduler(**kwargs)
    torch.testing.assert_close(ours.betas, stock.betas, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.alphas, stock.alphas, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.alphas_cumprod, stock.alphas_cumprod, rtol=1e-4, atol=1e-6)
    if beta_schedule != "sigmoid":  # CogVideoX: ᾱ after its SNR shift (it keeps the betas as given)
        cog = diffusers.CogVideoXDDIMScheduler(**kwargs, snr_shift_scale=3.0)
        torch.testing.assert_close(TDMScheduler.from_config(cog).alphas_cumprod, cog.alphas_cumprod.float(), rtol=1e-4, atol=1e-6)


def test_trained_betas():
    betas = torch.linspace(1e-4, 2e-2, 1000).tolist()
    scheduler = TDMScheduler(trained_betas=betas)
    torch.testing.assert_close(scheduler.betas, torch.tensor(betas), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("config", CONFIGS[:4] + [FLOW], ids=lambda c: json.dumps(c, sort_keys=True))
def test_add_noise(config):
    scheduler = make(config)
    x0, eps = noise(1), noise(2)
    t = torch.tensor([10, 500])
    got = scheduler.add_noise(x0, eps, t)
    if "_class_name" in config:  # flow: integer training times, σ = shift(t/T)
        sigma = scheduler.noise_schedule.sigmas[t].float().reshape(-1, 1, 1, 1)
        expected = (1 - sigma) * x0 + sigma * eps
    else:
        expected = diffusers.DDPMScheduler(**config, beta_start=0.00085, beta_end=0.012).add_noise(x0, eps, t)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_add_noise_at_the_schedules_own_model_times():
    scheduler = TDMScheduler.from_sampler_config(dict(SANA, flow_shift=6.0))
    scheduler.set_timesteps(4)
    x0, eps = noise(1), noise(2)
    t = scheduler.timesteps[1:2].expand(2)  # int64(σ·T): the stage's exact σ, not σ at the truncated time
    sigma = float(scheduler.sigmas[1])
    torch.testing.assert_close(scheduler.add_noise(x0, eps, t), (1 - sigma) * x0 + sigma * eps)


@pytest.mark.parametrize("num_train_timesteps", [100, 500, 1000])
@pytest.mark.parametrize("spacing", [None, "trailing", "linspace", "leading"])
def test_num_train_timesteps(num_train_timesteps, spacing):
    scheduler = TDMScheduler(num_train_timesteps=num_train_timesteps, timestep_spacing=spacing)
    assert scheduler.total_steps == round(0.9 * num_train_timesteps)
    for k in (1, 2, 4, 10):
        scheduler.set_timesteps(k)
        times = scheduler.timesteps.tolist()
        assert len(times) == k and all(0 <= t < num_train_timesteps for t in times) and times == sorted(times, reverse=True)
        assert torch.isfinite(sample_loop(scheduler, k, noise())).all()


def test_many_steps_sample_without_training_intervals():
    scheduler = TDMScheduler()
    scheduler.set_timesteps(50)  # training refuses K=50 with T'=900 (empty τ-intervals); sampling does not
    assert len(scheduler.timesteps) == 50 and scheduler.timesteps[-1] >= 0
    with pytest.raises(ValueError, match="repeat"):
        TDMScheduler(num_train_timesteps=100, total_steps=20).set_timesteps(30)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_prediction_types_and_schedules_end_at_x0(prediction_type, beta_schedule):
    scheduler = TDMScheduler(prediction_type=prediction_type, beta_schedule=beta_schedule, solver="dpmsolver")
    scheduler.set_timesteps(3)
    x = noise()
    for t in scheduler.timesteps:
        out = scheduler.step(dummy_model(x, t), t, x)
        x = out.prev_sample
    assert torch.equal(out.prev_sample, out.pred_original_sample) and torch.isfinite(x).all()


def test_custom_timesteps_are_honoured():
    scheduler = TDMScheduler()
    scheduler.set_timesteps(timesteps=[999, 500, 20])
    assert scheduler.timesteps.tolist() == [999, 500, 20] and scheduler.num_inference_steps == 3
    ref = TDMScheduler(total_steps=1000)
    ref.set_timesteps(4)
    assert torch.equal(sample_loop(scheduler, 0, noise(), timesteps=[999, 749, 499, 249]), sample_loop(ref, 4, noise()))
    flow = make(FLOW)
    flow.set_timesteps(timesteps=[950.0, 500.0])
    torch.testing.assert_close(flow.sigmas, torch.tensor([0.95, 0.5]))
    flow.set_timesteps(sigmas=[0.9, 0.4, 0.0])  # a full σ schedule's final 0 is implied
    assert flow.timesteps.tolist() == pytest.approx([900.0, 400.0])


@pytest.mark.parametrize("call,match", [
    (dict(timesteps=[10, 500]), "strictly descending"),
    (dict(timesteps=[1000, 10]), r"\[0, 1000\)"),
    (dict(timesteps=[900, 10], sigmas=[0.9, 0.1]), "not both"),
    (dict(num_inference_steps=3, timesteps=[900, 10]), "num_inference_steps=3"),
    (dict(sigmas=[0.9, 0.1]), "flow-matching"),
    (dict(num_inference_steps=4, mu=0.5), "mu"),
    (dict(timesteps=[900.5, 10]), "integer"),
])
def test_custom_timesteps_refused(call, match):
    with pytest.raises(ValueError, match=match):
        TDMScheduler().set_timesteps(**call)


def test_old_saved_config_loads(tmp_path):
    (tmp_path / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "TDMScheduler", "_diffusers_version": "0.42.1", "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "num_train_timesteps": 1000, "prediction_type": "epsilon", "rescale_betas_zero_snr": False,
        "schedule": "vp", "shift": 1.0, "snr_shift_scale": None, "solver": "dpmsolver", "total_steps": 900, "trained_betas": None}))
    scheduler = TDMScheduler.from_pretrained(tmp_path)
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == [899, 674, 449, 224] and scheduler.config.solver == "dpmsolver"


def test_teacher_config_keeps_the_students_stage_times():
    """from_config of a teacher's DPM-Solver/DDIM config takes its forward process, never its spacing."""
    sd15 = diffusers.DDIMScheduler(beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1)
    scheduler = TDMScheduler.from_config(sd15.config)
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == [899, 674, 449, 224]
    sana = TDMScheduler.from_config(dict(SANA, flow_shift=6.0))
    assert sana.config.schedule == "flow" and sana.config.shift == 6.0 and not sana.config.use_flow_sigmas


# -- the stock samplers TDMScheduler reproduces --------------------------------------------------
STOCK = {
    "dpmsolver-vp-linspace": dict(_class_name="DPMSolverMultistepScheduler", beta_schedule="scaled_linear",
                                  beta_start=0.00085, beta_end=0.012, timestep_spacing="linspace"),
    "dpmsolver-vp-leading-v": dict(_class_name="DPMSolverMultistepScheduler", prediction_type="v_prediction",
                                   timestep_spacing="leading", steps_offset=1),
    "dpmsolver-vp-trailing-order1": dict(_class_name="DPMSolverMultistepScheduler", solver_order=1, timestep_spacing="trailing"),
    "dpmsolver-vp-linspace-order1-sample": dict(_class_name="DPMSolverMultistepScheduler", solver_order=1, prediction_type="sample"),
    "dpmsolver-flow-shift6": dict(SANA, flow_shift=6.0),
    "dpmsolver-flow-shift3": SANA,
    "cogvideox-ddim-trailing": dict(_class_name="CogVideoXDDIMScheduler", beta_schedule="scaled_linear", beta_start=0.00085,
                                    beta_end=0.012, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                    snr_shift_scale=3.0, timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True),
    "ddim-leading": dict(_class_name="DDIMScheduler", timestep_spacing="leading", steps_offset=1, clip_sample=False),
    "ddim-linspace-sample": dict(_class_name="DDIMScheduler", timestep_spacing="linspace", clip_sample=False,
                                 prediction_type="sample"),
}


def stock_scheduler(config: dict):
    return getattr(diffusers, config["_class_name"]).from_config({k: v for k, v in config.items() if k != "_class_name"})


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("name", sorted(STOCK))
def test_stock_sampler_reproduced(name, steps):
    stock = stock_scheduler(STOCK[name])
    ours = TDMScheduler.from_sampler_config(stock)
    expected = sample_loop(stock, steps, noise())
    got = sample_loop(ours, steps, noise())
    assert ours.timesteps.tolist() == stock.timesteps.tolist() and ours.timesteps.dtype == stock.timesteps.dtype
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # fp32 rounding


def test_published_timesteps():
    """The 4-step times of the official TDM samplers (issue 34's table)."""
    cases = {"dpmsolver-flow-shift6": [999, 947, 856, 666], "dpmsolver-vp-linspace": [999, 749, 500, 250],
             "cogvideox-ddim-trailing": [999, 749, 499, 249]}
    for name, times in cases.items():
        scheduler = TDMScheduler.from_sampler_config(STOCK[name])
        scheduler.set_timesteps(4)
        assert scheduler.timesteps.tolist() == times
    scheduler = TDMScheduler.from_sampler_config(STOCK["dpmsolver-flow-shift6"])
    scheduler.set_timesteps(4)
    assert scheduler.sigmas.tolist() == pytest.approx([0.999833, 0.947169, 0.856898, 0.666370], abs=1e-6)


@pytest.mark.parametrize("config,key", [
    (dict(_class_name="DPMSolverMultistepScheduler", final_sigmas_type="sigma_min"), "final_sigmas_type"),
    (dict(_class_name="DPMSolverMultistepScheduler", use_karras_sigmas=True), "use_karras_sigmas"),
    (dict(_class_name="DPMSolverMultistepScheduler", solver_type="heun"), "solver_type"),
    (dict(_class_name="DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver++"), "algorithm_type"),
    (dict(_class_name="DPMSolverMultistepScheduler", solver_order=3), "solver_order"),
    (dict(_class_name="DDIMScheduler", set_alpha_to_one=False, clip_sample=False), "set_alpha_to_one"),
    (dict(_class_name="DDIMScheduler"), "clip_sample"),
    (FLOW, "FlowMatchEulerDiscreteScheduler"),
])
def test_unreproducible_sampler_refused(config, key):
    with pytest.raises(ValueError, match=key):
        TDMScheduler.from_sampler_config(config)
