"""Issue 19, item 2: the DPM-Solver++(2M) student trajectory equals diffusers' DPMSolverMultistepScheduler.

Both samplers are driven by the same network on the same stage times; diffusers' scheduler gets those
times through ``set_timesteps(timesteps=...)`` (VP) or, for flow, its sigmas at those times (its
``use_flow_sigmas`` path builds its own spacing and takes no custom timesteps). Its defaults
``lower_order_final=True`` / ``final_sigmas_type="zero"`` make the last step first order to σ = 0, i.e.
the output is the last x̂0, which is what our sampler returns.
"""
import pytest
import torch
from torch import nn

from tdm_fast.denoiser import Denoiser
from tdm_fast.sampling import sample_student, stage_times
from tdm_fast.schedule import ScheduleConfig
from tdm_fast.solvers import multistep_coefficients

TOL = 1e-5


class Toy(nn.Module):
    """A deterministic network whose output depends on x, t and the condition."""

    def forward(self, x, t, cond):
        return torch.tanh(x * 0.7 + cond.reshape(-1, 1, 1, 1)) * (1 + t.float().reshape(-1, 1, 1, 1) / 1000)


def _diffusers_dpmsolver(den: Denoiser, times: list[int], prediction_type: str):
    from diffusers import DPMSolverMultistepScheduler

    common = dict(algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True, final_sigmas_type="zero")
    if den.schedule.is_flow:
        sched = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=den.schedule.config.shift,
                                            prediction_type="flow_prediction", **common)
        sched.set_timesteps(len(times))
        sigmas = den.schedule.sigmas[torch.tensor(times)]
        sched.sigmas = torch.cat([sigmas, torch.zeros(1, dtype=sigmas.dtype)]).float()
        sched.timesteps = torch.tensor(times)
    else:
        cfg = den.schedule.config
        sched = DPMSolverMultistepScheduler(beta_start=cfg.beta_start, beta_end=cfg.beta_end, beta_schedule=cfg.beta_schedule,
                                            prediction_type=prediction_type, **common)
        sched.set_timesteps(timesteps=times)
    assert sched.timesteps.tolist() == times
    return sched


CASES = [("epsilon", "vp"), ("v_prediction", "vp"), ("flow", "flow")]


@pytest.mark.parametrize("prediction_type,schedule", CASES)
@pytest.mark.parametrize("k", [1, 2, 3, 4, 6])
def test_dpmsolver_student_equals_diffusers(prediction_type, schedule, k):
    cfg = ScheduleConfig(kind="flow", shift=3.0) if schedule == "flow" else ScheduleConfig()
    den = Denoiser(Toy(), cfg, prediction_type)
    noise, cond = torch.randn(2, 4, 3, 3), torch.tensor([0.1, -0.3])
    ours, trajectory = sample_student(den, noise, cond, k, return_trajectory=True, solver="dpmsolver")

    times = stage_times(k)
    sched = _diffusers_dpmsolver(den, times, "flow_prediction" if prediction_type == "flow" else prediction_type)
    x, states = noise, []
    for t in sched.timesteps:
        states.append(x)
        x = sched.step(den.model(x, t.expand(2), cond), t, x).prev_sample
    for mine, theirs in zip(trajectory, states):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=TOL)
    torch.testing.assert_close(ours, x, rtol=0, atol=TOL)


def test_solvers_differ_only_from_the_second_step_on():
    den = Denoiser(Toy(), ScheduleConfig(), "epsilon")
    noise, cond = torch.randn(2, 4, 3, 3), torch.tensor([0.1, -0.3])
    for k in (1, 2):  # first step first order, last step x̂0: nothing left for the multistep term
        assert torch.equal(sample_student(den, noise, cond, k, solver="dpmsolver"), sample_student(den, noise, cond, k))
    _, ddim = sample_student(den, noise, cond, 4, return_trajectory=True)
    _, dpm = sample_student(den, noise, cond, 4, return_trajectory=True, solver="dpmsolver")
    assert torch.equal(ddim[1], dpm[1]) and not torch.allclose(ddim[2], dpm[2])


def test_coefficients():
    den = Denoiser(Toy(), ScheduleConfig(), "epsilon")
    times = stage_times(4)
    assert multistep_coefficients(den.schedule, times, "ddim") == [0.0] * 4
    c = multistep_coefficients(den.schedule, times, "dpmsolver")
    assert c[0] == 0 and c[-1] == 0 and all(v > 0 for v in c[1:-1])
    with pytest.raises(ValueError, match="solver must be one of"):
        multistep_coefficients(den.schedule, times, "euler")
    with pytest.raises(ValueError, match="solver must be one of"):
        sample_student(den, torch.randn(1, 4, 3, 3), torch.tensor([0.0]), 4, solver="heun")
