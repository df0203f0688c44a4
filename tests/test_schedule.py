import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from tdm_fast.parameterization import PREDICTION_TYPES, from_x0_eps, to_x0_eps
from tdm_fast.sampling import nfe_matched_baselines, stage_times, trailing_times
from tdm_fast.schedule import NoiseSchedule, ScheduleConfig


def test_default_stage_times():
    assert stage_times(1) == [899]
    assert stage_times(2) == [899, 449]
    assert stage_times(4) == [899, 674, 449, 224]


def test_stage_times_follow_total_steps():
    assert stage_times(4, total_steps=1000) == [999, 749, 499, 249]


@pytest.mark.parametrize("bad", [0, -1, 2.0, "4", True])
def test_unsupported_steps(bad):
    with pytest.raises(ValueError, match="positive integer"):
        stage_times(bad)


def test_empty_stage_interval_is_refused():
    with pytest.raises(ValueError, match="empty noise interval"):
        stage_times(40, total_steps=900)
    with pytest.raises(ValueError, match="empty noise interval"):
        stage_times(1, total_steps=30)


def test_sampling_takes_any_k_without_the_training_interval_rule():
    """The τ-interval rule is training's (issue 34): sample_student, the teacher baselines at the student's
    times and the sample/export verbs' check run K = 40 of T' = 900, which training refuses."""
    from tdm_fast.demos.toy2d import TOY_SCHEDULE, ToyMLP
    from tdm_fast.denoiser import Denoiser
    from tdm_fast.sampling import check_steps, sample_student

    student = Denoiser(ToyMLP(hidden=16, depth=1), TOY_SCHEDULE, "epsilon", null_cond=0)
    x0, trajectory = sample_student(student, torch.randn(2, 2), torch.tensor([0, 1]), 40, return_trajectory=True)
    assert len(trajectory) == 40 and torch.isfinite(x0).all()
    check_steps([40], student)
    assert nfe_matched_baselines(40, 4.5)[0].times == tuple(stage_times(40, training=False))


VP_CASES = [(cls, beta, zero) for cls in ("DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "CogVideoXDDIMScheduler")
            for beta in ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid") for zero in (False, True)
            if beta != "sigmoid" or cls == "DDPMScheduler"]


@pytest.mark.parametrize("cls_name, beta_schedule, zero_snr", VP_CASES)
def test_vp_tables_match_diffusers(cls_name, beta_schedule, zero_snr):
    import diffusers

    kwargs = {"snr_shift_scale": 3.0} if cls_name.startswith("CogVideoX") else {}
    ref = getattr(diffusers, cls_name)(beta_schedule=beta_schedule, beta_start=0.00085, beta_end=0.012,
                                      rescale_betas_zero_snr=zero_snr, **kwargs)
    schedule = NoiseSchedule(ScheduleConfig.from_diffusers(ref.config))  # the saved-config path the presets use
    t = torch.arange(1000)
    alpha, sigma = schedule(t, dtype=torch.float64)
    torch.testing.assert_close(alpha**2, ref.alphas_cumprod.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(1000, dtype=torch.float64))
    if zero_snr:
        assert float(sigma[-1]) == pytest.approx(1.0, abs=1e-7)


@pytest.mark.parametrize("shift", [0.5, 1.0, 3.0])
def test_flow_tables_match_diffusers(shift):
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    schedule = NoiseSchedule(ScheduleConfig.from_diffusers(ref.config))
    # diffusers' training sigmas are shift(u) at u = (1000 - i) / 1000; i = 0 (u = 1) is past our [0, T) table
    t = 1000 - torch.arange(1, 1000)
    _, sigma = schedule(t, dtype=torch.float64)
    torch.testing.assert_close(sigma, ref.sigmas[1:].double(), rtol=1e-5, atol=1e-6)


def test_flow_schedules_with_a_per_call_shift_are_refused():
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        ScheduleConfig.from_diffusers({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True})


def test_flow_schedule_applies_shift():
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    config = ScheduleConfig.from_diffusers(ref)
    assert config.kind == "flow" and config.shift == 3.0
    schedule = NoiseSchedule(config)
    alpha, sigma = schedule(torch.tensor([0, 500, 999]), dtype=torch.float64)
    u = torch.tensor([0.0, 0.5, 0.999], dtype=torch.float64)
    torch.testing.assert_close(sigma, 3 * u / (1 + 2 * u))
    torch.testing.assert_close(alpha, 1 - sigma)


def test_schedule_rejects_bad_input():
    with pytest.raises(ValueError, match="beta_schedule"):
        ScheduleConfig(beta_schedule="cosine-ish")
    schedule = NoiseSchedule()
    with pytest.raises(ValueError, match="timesteps must lie"):
        schedule(torch.tensor([1000]))
    with pytest.raises(TypeError, match="integers"):
        schedule(torch.tensor([0.5]))


# v is defined for VP (α² + σ² = 1), the flow velocity for α = 1 - σ
VALID = [(p, "vp") for p in PREDICTION_TYPES if p != "flow"] + [(p, "flow") for p in PREDICTION_TYPES if p != "v_prediction"]


@pytest.mark.parametrize("prediction_type, kind", VALID)
def test_parameterization_round_trip(prediction_type, kind):
    schedule = NoiseSchedule(ScheduleConfig(kind=kind, shift=2.0))
    t = torch.tensor([20, 300, 899])
    alpha, sigma = schedule(t, dtype=torch.float64)
    x0 = torch.randn(3, 4, 5, dtype=torch.float64)
    eps = torch.randn(3, 4, 5, dtype=torch.float64)
    x_t = alpha[:, None, None] * x0 + sigma[:, None, None] * eps
    out = from_x0_eps(x0, eps, alpha, sigma, prediction_type)
    x0_back, eps_back = to_x0_eps(out, x_t, alpha, sigma, prediction_type)
    torch.testing.assert_close(x0_back, x0)
    torch.testing.assert_close(eps_back, eps)


def test_unknown_prediction_type():
    with pytest.raises(ValueError, match="prediction_type"):
        to_x0_eps(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1), torch.ones(1), "score")


def test_nfe_matched_baselines_never_exceed_k():
    for k in (1, 2, 4):
        samplers = nfe_matched_baselines(k, cfg_scale=3.0)
        assert all(s.nfe <= k for s in samplers)
        assert any(s.cfg_scale != 1.0 for s in samplers) == (k >= 2)
    assert trailing_times(4) == [999, 749, 499, 249]
