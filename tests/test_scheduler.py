"""TDMScheduler: spec §2's times and DDIM (or DPM-Solver++(2M), issue 19) jumps, as a diffusers scheduler."""
import pytest
import torch
from torch import nn

from tdm_fast.denoiser import Denoiser
from tdm_fast.parameterization import from_x0_eps
from tdm_fast.sampling import sample_student, stage_times
from tdm_fast.schedule import ScheduleConfig
from tdm_fast.scheduler import TDMScheduler


class Toy(nn.Module):
    def forward(self, x, t, cond):
        return torch.tanh(x * 0.7 + cond.reshape(-1, 1, 1, 1)) * (1 + t.float().reshape(-1, 1, 1, 1) / 1000)


def test_timesteps_match_spec():
    s = TDMScheduler()
    for k, times in ((4, [899, 674, 449, 224]), (2, [899, 449]), (1, [899])):
        s.set_timesteps(k)
        assert s.timesteps.tolist() == times
    assert s.init_noise_sigma == 1.0 and s.order == 1
    x = torch.randn(1, 4, 2, 2)
    assert s.scale_model_input(x, 899) is x


@pytest.mark.parametrize("solver", ["ddim", "dpmsolver"])
@pytest.mark.parametrize("prediction_type,schedule", [("epsilon", "vp"), ("v_prediction", "vp"), ("flow", "flow")])
def test_step_loop_equals_sample_student(prediction_type, schedule, solver):
    if schedule == "flow":
        cfg = ScheduleConfig(kind="flow", shift=3.0)
        sched = TDMScheduler.from_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "num_train_timesteps": 1000},
                                         solver=solver)
    else:
        cfg = ScheduleConfig.from_diffusers({"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"})
        sched = TDMScheduler(prediction_type=prediction_type, solver=solver)
    den = Denoiser(Toy(), cfg, prediction_type)
    noise, cond = torch.randn(2, 4, 3, 3), torch.tensor([0.1, -0.3])
    for k in (1, 2, 3, 4):
        ours = sample_student(den, noise, cond, k, solver=solver)
        # sigmas= is honoured: the student's own σ give its own trajectory
        times = stage_times(k, 900)
        own = den.schedule.sigmas[times].tolist()
        sched.set_timesteps(k, sigmas=own) if schedule == "flow" else sched.set_timesteps(k)
        x = noise
        for t in sched.timesteps:
            if schedule == "flow":
                t_int = torch.tensor([times[sched.index_for_timestep(t)]] * 2)
                assert abs(float(t) - float(den.schedule(t_int[:1])[1]) * 1000) < 1e-3  # σ·1000
            else:
                t_int = t.expand(2)
            x = sched.step(den.model(x, t_int, cond), t, x).prev_sample
        torch.testing.assert_close(x, ours, rtol=0, atol=1e-6)


def test_from_teacher_configs():
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", prediction_type="v_prediction")
    s = TDMScheduler.from_config(ddim.config, total_steps=1000)
    assert s.config.prediction_type == "v_prediction" and s.config.beta_schedule == "linear"
    s.set_timesteps(4)
    assert s.timesteps.tolist() == [999, 749, 499, 249]
    with pytest.raises(ValueError):
        s.step(torch.zeros(1, 1), 500, torch.zeros(1, 1))


def test_x0_from_last_step():
    s = TDMScheduler()
    s.set_timesteps(1)
    x0, eps = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    alpha, sigma = s.noise_schedule(torch.tensor([899]))
    x = alpha * x0 + sigma * eps
    out = s.step(from_x0_eps(x0, eps, alpha, sigma, "epsilon"), 899, x)
    torch.testing.assert_close(out.prev_sample, x0, rtol=1e-4, atol=1e-4)


def test_solver_is_saved_with_the_config(tmp_path):
    s = TDMScheduler(solver="dpmsolver")
    s.save_pretrained(tmp_path)
    loaded = TDMScheduler.from_pretrained(tmp_path)
    assert loaded.config.solver == "dpmsolver"
    loaded.set_timesteps(4)
    assert loaded.coefficients[1] > 0
    assert TDMScheduler().config.solver == "ddim"
    with pytest.raises(ValueError, match="solver must be one of"):
        TDMScheduler(solver="euler")


def test_dpmsolver_started_mid_trajectory_steps_first_order_first():
    """img2img-style: the first step taken has no previous x̂0, so it is the DDIM step."""
    den = Denoiser(Toy(), ScheduleConfig(), "epsilon")
    x, cond = torch.randn(2, 4, 3, 3), torch.tensor([0.1, -0.3])
    outs = {}
    for solver in ("ddim", "dpmsolver"):
        s = TDMScheduler(solver=solver)
        s.set_timesteps(4)
        t = s.timesteps[2]
        outs[solver] = s.step(den.model(x, t.expand(2), cond), t, x).prev_sample
    assert torch.equal(outs["ddim"], outs["dpmsolver"])
