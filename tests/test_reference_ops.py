"""The pure-torch twins against the spec's formulas written out by hand in float64."""
import math

import pytest
import torch

from tdm_fast.kernels import reference


def _scalars(b, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, 400, (b,), generator=g)
    tau = s + 1 + torch.randint(0, 400, (b,), generator=g)
    abar = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0)
    return abar[s].sqrt(), (1 - abar[s]).sqrt(), abar[tau].sqrt(), (1 - abar[tau]).sqrt()


def test_renoise_matches_hand_formula():
    b, d = 3, 7
    x0, eps, z = (torch.randn(b, d, dtype=torch.float64) for _ in range(3))
    a_s, s_s, a_t, s_t = _scalars(b)
    x_tau, log_w = reference.renoise(x0, eps, z, a_s, s_s, a_t, s_t)
    for i in range(b):
        x_s = [a_s[i] * x0[i, j] + s_s[i] * eps[i, j] for j in range(d)]
        beta = math.sqrt(s_t[i] ** 2 - (a_t[i] * s_s[i] / a_s[i]) ** 2)
        want = [a_t[i] / a_s[i] * x_s[j] + beta * z[i, j] for j in range(d)]
        mix = [((a_t[i] / a_s[i]) * s_s[i] * eps[i, j] + beta * z[i, j]) / s_t[i] for j in range(d)]
        want_lw = -0.5 * sum(m * m for m in mix) / d + 0.5 * sum(float(z[i, j]) ** 2 for j in range(d)) / d
        torch.testing.assert_close(x_tau[i], torch.tensor([float(w) for w in want], dtype=torch.float64))
        assert abs(float(log_w[i]) - want_lw) < 1e-12
        # x_tau = alpha_tau x0 + sigma_tau eps_mix: the matched sample is a forward-process sample of x0
        torch.testing.assert_close(x_tau[i], a_t[i] * x0[i] + s_t[i] * torch.tensor([float(m) for m in mix], dtype=torch.float64))


@pytest.mark.parametrize("huber_c", [1e-3, None])
@pytest.mark.parametrize("normalize", [True, False])
def test_generator_loss_value_and_gradient(huber_c, normalize):
    b, d, w = 3, 5, 4.5
    x0 = torch.randn(b, d, dtype=torch.float64, requires_grad=True)
    d_c, d_u, d_f = (torch.randn(b, d, dtype=torch.float64) for _ in range(3))
    loss = reference.tdm_generator_loss(x0, d_c, d_u, d_f, w, huber_c=huber_c, normalize=normalize)
    loss.backward()
    d_cfg = d_u + w * (d_c - d_u)
    u = d_f - d_cfg
    n = (x0.detach() - d_cfg).abs().mean(1).clamp_min(1e-6) if normalize else torch.ones(b, dtype=torch.float64)
    if huber_c is None:
        elem, grad = u**2, 2 * u
    else:
        elem, grad = torch.sqrt(u**2 + huber_c**2) - huber_c, u / torch.sqrt(u**2 + huber_c**2)
    want = sum(float(elem[i].sum()) / d / float(n[i]) for i in range(b)) / b
    assert abs(float(loss) - want) < 1e-12
    torch.testing.assert_close(x0.grad, grad / (n[:, None] * b * d))


def test_fake_score_loss_weights():
    b, d = 4, 6
    d_fake = torch.randn(b, d, dtype=torch.float64, requires_grad=True)
    target = torch.randn(b, d, dtype=torch.float64)
    snr = torch.tensor([0.5, 3.0, 7.0, 100.0], dtype=torch.float64)
    log_w = torch.tensor([0.1, -0.2, 0.0, 0.3], dtype=torch.float64)
    loss = reference.fake_score_loss(d_fake, target, snr, log_w, snr_cap=5.0)
    w = torch.exp(log_w) / torch.exp(log_w).sum() * b
    want = (snr.clamp(max=5.0) * w * ((d_fake.detach() - target) ** 2).mean(1)).mean()
    assert abs(float(loss) - float(want)) < 1e-6
    loss.backward()
    assert d_fake.grad is not None and torch.isfinite(d_fake.grad).all()


def test_importance_weights_off_is_uniform():
    torch.testing.assert_close(reference.importance_weights(torch.zeros(5)), torch.ones(5))
