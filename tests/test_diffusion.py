import numpy as np
import pytest
import torch

from fastddpm.diffusion import Diffusion


@pytest.mark.parametrize("T", [1, 100, 1000, 2000])
def test_linear_schedule_eq_4(T):
    d = Diffusion(T)
    assert d.betas.dtype == torch.float64 and d.betas.shape == (T,)
    assert d.betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    if T > 1:
        assert d.betas[-1].item() == pytest.approx(0.02, rel=1e-12)
        assert torch.all(torch.diff(d.betas) > 0)
        assert torch.all(torch.diff(d.alpha_bars) < 0)  # strictly decreasing
    np.testing.assert_allclose(d.alpha_bars.numpy(), np.cumprod(1 - d.betas.numpy()), rtol=1e-12)


def test_q_sample_has_the_mean_and_variance_of_eq_2():
    d = Diffusion(1000)
    n = 200_000
    x0 = torch.full((n, 1, 1, 1), 0.7)
    for step in (0, 250, 999):
        t = torch.full((n,), step)
        xt = d.q_sample(x0, t, torch.randn_like(x0))
        ab = d.alpha_bars[step].item()
        assert xt.mean().item() == pytest.approx(ab ** 0.5 * 0.7, abs=5 * (1 - ab) ** 0.5 / n ** 0.5 + 1e-4)
        assert xt.var().item() == pytest.approx(1 - ab, rel=0.02, abs=1e-6)


def test_reverse_step_is_eq_5():
    d = Diffusion(50)
    g = torch.Generator().manual_seed(1)
    x, eps, z = (torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64) for _ in range(3))
    betas = np.linspace(1e-4, 0.02, 50)
    for step in (49, 20, 1):
        a, ab = 1 - betas[step], np.prod(1 - betas[:step + 1])
        expected = (1 / np.sqrt(a) * (x.numpy() - (1 - a) / np.sqrt(1 - ab) * eps.numpy())
                    + np.sqrt(betas[step]) * z.numpy())
        got = d.reverse_step(x.float(), step, eps.float(), z.float())
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)
    # the last step (the paper's t = 1) adds no noise
    np.testing.assert_allclose(d.reverse_step(x.float(), 0, eps.float(), z.float()).numpy(),
                               d.reverse_step(x.float(), 0, eps.float(), None).numpy())


class _Recorder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def forward(self, x, t):
        self.seen.append(t.clone())
        return x * self.w


def test_loss_draws_t_uniformly_over_all_steps_and_is_mse_on_noise():
    d = Diffusion(10)
    model = _Recorder()
    g = torch.Generator().manual_seed(0)
    x0 = torch.zeros(20_000, 1, 1, 1)
    loss = d.loss(model, x0, generator=g)
    t = model.seen[0]
    counts = torch.bincount(t, minlength=10).float()
    assert t.min() == 0 and t.max() == 9
    chi2 = ((counts - 2000) ** 2 / 2000).sum().item()
    assert chi2 < 27.9  # 9 dof, p = 0.001
    # with eps_theta = 0 the loss is E[noise^2] = 1
    assert loss.item() == pytest.approx(1.0, abs=0.05)
    noise = torch.randn(x0.shape, generator=g)
    assert d.loss(model, x0, t=torch.zeros(20_000, dtype=torch.long), noise=noise).item() == pytest.approx(
        noise.square().mean().item())
