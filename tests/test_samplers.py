"""The few-step samplers against independent implementations: DPM-Solver++(2M) against diffusers'
DPMSolverMultistepScheduler, DDIM against its eq. 12 written out here; each sampler's LinearStep
table (what the fast engine's CUDA graph replays) against its formula; determinism and batch-size
independence through sample()."""
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from fastddpm.diffusion import Diffusion
from fastddpm.model import UNet
from fastddpm.sampling import Clock, graph_chain, sample


class _Analytic(torch.nn.Module):
    """A smooth stand-in network: eps depends on x and t nonlinearly, so every coefficient matters."""

    def __init__(self, T, scale=1.0):
        super().__init__()
        self.T, self.scale = T, scale  # scale > 1: predictions of x0 well outside [-1, 1], for the clipping
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # sample() reads the device off a parameter

    def forward(self, x, t):
        s = (t.to(x.dtype) / self.T)[:, None, None, None]
        return self.scale * (torch.tanh(0.7 * x + s) * (0.5 + s) + 0.1 * torch.sin(3 * x)) + self.anchor


def _diffusers(T, steps, clip_x0=False):
    """diffusers' DPM-Solver++(2M); its thresholding with the bound sample_max_value = 1 is a plain clip
    of x0 to [-1, 1] (the quantile bound is clamped to [1, 1])."""
    sched = DPMSolverMultistepScheduler(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                                        algorithm_type="dpmsolver++", solver_order=2, thresholding=clip_x0,
                                        sample_max_value=1.0)
    sched.set_timesteps(steps)
    return sched


@pytest.mark.parametrize("clip_x0", [False, True], ids=["plain", "clip-x0"])
@pytest.mark.parametrize("T,steps", [(1000, 20), (1000, 10), (1000, 1), (1000, 2), (500, 15), (37, 7)])
def test_dpm_solver_matches_diffusers(T, steps, clip_x0):
    """Same x_T, same network, diffusers' defaults otherwise (linspace spacing, first order at the first
    and last step, the last step to sigma = 0). Tolerance 1e-4: diffusers keeps its sigmas and the
    update in float32 (relative error ~1e-7 per coefficient), ours are float64 until they meet x."""
    d, net, sched = Diffusion(T), _Analytic(T, scale=3.0 if clip_x0 else 1.0), _diffusers(T, steps, clip_x0)
    ts = d.dpm_solver_timesteps(steps)
    assert ts == sched.timesteps.tolist()
    g = torch.Generator().manual_seed(0)
    x_ref = torch.randn(2, 3, 8, 8, generator=g)
    x, x0, clipped = x_ref.double(), None, 0
    for i, t in enumerate(ts):
        x_ref = sched.step(net(x_ref, torch.full((2,), t)), t, x_ref).prev_sample
        x, x0 = d.dpm_solver_step(x, net(x, torch.full((2,), t)), ts, i, x0, clip_x0)
        clipped += int(x0.abs().max() >= 1.0)
        torch.testing.assert_close(x.float(), x_ref, atol=1e-4, rtol=1e-4)
    assert x_ref.abs().max() > 0.1  # a nontrivial result
    assert not clip_x0 or clipped  # the clip was reached


def test_dpm_solver_through_sample_matches_diffusers_images():
    """The whole API call (timesteps, multistep state, uint8 conversion) against a diffusers loop fed
    the same x_T: the same images up to one grey level of rounding."""
    T, steps = 1000, 12
    net, sched = _Analytic(T), _diffusers(T, steps)
    ours = sample(net, 3, T=T, sampler="dpm++", steps=steps, seed=4, progress=False)
    x = torch.randn((3, 3, 32, 32), generator=torch.Generator().manual_seed(4))  # sample()'s x_T
    for t in sched.timesteps:
        x = sched.step(net(x, torch.full((3,), int(t))), t, x).prev_sample
    theirs = ((x.clamp(-1, 1) + 1) * 127.5).round()
    assert (ours.float() - theirs).abs().max() <= 1


def _eq12_chain(T, ts, x, net, eta, noises):
    """DDIM (Song et al. 2021, eq. 12) from the betas, in float64, independent of fastddpm.diffusion."""
    ab = np.cumprod(1.0 - np.linspace(1e-4, 0.02, T))
    for i, t in enumerate(ts):
        prev = ts[i + 1] if i + 1 < len(ts) else None
        a_t, a_prev = ab[t], (ab[prev] if prev is not None else 1.0)
        eps = net(x, torch.full((len(x),), t)).double()
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
        pred_x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        x = math.sqrt(a_prev) * pred_x0 + math.sqrt(1 - a_prev - sigma ** 2) * eps + sigma * noises[i]
    return x


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_eq12_written_out(eta):
    T, steps = 200, 9
    d, net = Diffusion(T), _Analytic(T)
    ts = d.ddim_timesteps(steps)
    assert ts[0] == T - 1 and ts[-1] == 0 and len(ts) == steps
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    noises = [torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) for _ in ts]
    x = x0.float()
    for i, t in enumerate(ts):
        x = d.ddim_step(x, t, ts[i + 1] if i + 1 < len(ts) else -1, net(x, torch.full((2,), t)), eta, noises[i].float())
    torch.testing.assert_close(x.double(), _eq12_chain(T, ts, x0, net, eta, noises), atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_step_with_clipped_x0_matches_diffusers(eta):
    """Each step against diffusers' DDIMScheduler with clip_sample (its default) on its own (t, t_prev)
    pairs and the same noise: x0 clipped to [-1, 1], the direction still from the network's eps."""
    T, steps = 1000, 10
    d, net = Diffusion(T), _Analytic(T, scale=3.0)
    sched = DDIMScheduler(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                          clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(5)
    x_ref = torch.randn(2, 3, 8, 8, generator=g)
    x, clipped = x_ref.double(), 0
    for t in sched.timesteps.tolist():
        z = torch.randn(2, 3, 8, 8, generator=g)
        x_ref = sched.step(net(x_ref, torch.full((2,), t)), t, x_ref, eta=eta, variance_noise=z).prev_sample
        eps = net(x, torch.full((2,), t))
        ab = d.alpha_bars[t].item()
        clipped += int(((x - (1 - ab) ** 0.5 * eps) / ab ** 0.5).abs().max() > 1)
        x = d.ddim_step(x, t, t - T // steps, eps, eta, z.double(), clip_x0=True)
        torch.testing.assert_close(x.float(), x_ref, atol=1e-4, rtol=1e-4)
    assert clipped >= steps // 2  # the clip was reached at most steps


@pytest.mark.parametrize("clip_x0", [False, True], ids=["plain", "clip-x0"])
@pytest.mark.parametrize("sampler,steps,eta", [("ddpm", None, 0.0), ("ddim", 7, 0.0), ("ddim", 7, 0.6),
                                               ("dpm++", 8, 0.0), ("dpm++", 1, 0.0)])
def test_each_plan_row_is_its_formula(sampler, steps, eta, clip_x0):
    """x_next = a x + b eps + w x0 + c x0_prev + s z with x0 = p x + q eps (clipped to [-1, 1] with
    clip_x0), row by row, against the formula the eager engine runs, in float64."""
    T = 30
    d = Diffusion(T)
    plan = d.plan(sampler, steps, eta, clip_x0)
    ts = [r.t for r in plan]
    g = torch.Generator().manual_seed(2)
    x, eps, z, x0_prev = (torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) * 3 for _ in range(4))
    for i, row in enumerate(plan):
        x0 = row.p * x + row.q * eps
        x0 = x0.clamp(-1, 1) if clip_x0 else x0
        got = row.a * x + row.b * eps + row.w * x0 + row.c * x0_prev + row.s * z
        if sampler == "ddpm":
            want = d.reverse_step(x, row.t, eps, z, clip_x0)
        elif sampler == "ddim":
            want = d.ddim_step(x, row.t, ts[i + 1] if i + 1 < len(ts) else -1, eps, eta, z, clip_x0)
        else:
            want, x0_want = d.dpm_solver_step(x, eps, ts, i, x0_prev, clip_x0)
            torch.testing.assert_close(x0, x0_want.double(), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(got, want.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler,steps,eta,clip_x0", [("ddim", 6, 0.0, False), ("ddim", 6, 1.0, False),
                                                       ("dpm++", 6, 0.0, False), ("ddim", 6, 1.0, True),
                                                       ("dpm++", 6, 0.0, True), ("ddpm", None, 0.0, True)])
def test_the_fast_engines_step_loop_matches_the_eager_loop(sampler, steps, eta, clip_x0):
    """graph_chain (the loop a CUDA graph replays on the GPU; eagerly here) with the plan's rows,
    chunked, against the formula loop fed the same Philox noise."""
    T = 12 if sampler == "ddpm" else 50  # DDPM runs all T steps
    d, net = Diffusion(T), _Analytic(T, scale=3.0 if clip_x0 else 1.0)
    x = torch.randn((5, 3, 32, 32), generator=torch.Generator().manual_seed(3))
    fast, info = graph_chain(net, d, sampler, d.plan(sampler, steps, eta, clip_x0), x, 3, 2, torch.float32, False,
                             Clock(torch.device("cpu")), clip_x0)
    eager = sample(net, 5, T=T, sampler=sampler, steps=steps, eta=eta, seed=3, noise="philox", progress=False,
                   clip_x0=clip_x0)
    if clip_x0:  # the clipping changed the result
        unclipped = sample(net, 5, T=T, sampler=sampler, steps=steps, eta=eta, seed=3, noise="philox", progress=False)
        assert not torch.equal(unclipped, eager)
    assert info["chunks"] == 3 and info["network_calls"] == 3 * (steps or T)
    assert ((fast.clamp(-1, 1) + 1) * 127.5).round().sub(eager.float()).abs().max() <= 1


@pytest.mark.parametrize("sampler,steps,eta", [("ddim", 5, 1.0), ("dpm++", 5, None)])
def test_few_step_samplers_are_deterministic_and_batch_independent(sampler, steps, eta):
    torch.manual_seed(0)
    model = UNet(base_channels=4)
    a = sample(model, 5, T=40, sampler=sampler, steps=steps, eta=eta, batch_size=2, seed=7, progress=False)
    b = sample(model, 5, T=40, sampler=sampler, steps=steps, eta=eta, batch_size=5, seed=7, progress=False)
    c = sample(model, 5, T=40, sampler=sampler, steps=steps, eta=eta, batch_size=5, seed=8, progress=False)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_clip_x0_arguments():
    """clip_x0 is a bool; it reaches every sampler (DDPM's rows become the posterior form)."""
    net = _Analytic(20, scale=3.0)
    with pytest.raises(ValueError, match="clip_x0='yes': must be True or False"):
        sample(net, 2, T=20, sampler="ddim", clip_x0="yes")
    timings = {}
    clipped = sample(net, 2, T=20, clip_x0=True, timings=timings, progress=False)
    assert timings["clip_x0"] is True and not torch.equal(clipped, sample(net, 2, T=20, progress=False))


def test_eta_is_bounded_by_1_where_a_steps_noise_still_fits():
    """sigma_t^2 <= 1 - alpha_bar_{t-1} (all the variance x_{t-1} may hold) at every DDIM step for eta <= 1,
    but not above: the update's direction term is then clamped to 0 and the noise alone overshoots. So
    eta above 1 is refused."""
    d = Diffusion(1000)
    ts = d.ddim_timesteps(50)
    pairs = list(zip(ts, ts[1:]))

    def overfull(eta):
        return sum(d.ddim_sigma(t, t_prev, eta) ** 2 > 1 - float(d.alpha_bars[t_prev]) + 1e-12 for t, t_prev in pairs)

    assert overfull(1.0) == 0 and overfull(1.2) > 0 and overfull(5.0) > len(pairs) // 2
    net = _Analytic(20)
    sample(net, 1, T=20, sampler="ddim", steps=4, eta=1.0, progress=False)
    with pytest.raises(ValueError, match=r"^eta=1.01: the DDIM noise scale must be a number in \[0, 1\]"):
        sample(net, 1, T=20, sampler="ddim", steps=4, eta=1.01, progress=False)


@pytest.mark.parametrize("t", [999, 500, 37, 1, 0])
def test_ddpm_step_with_clipped_x0_matches_diffusers(t):
    """Eq. 5 with clip_x0 against diffusers' DDPMScheduler(clip_sample, variance "fixed_large": beta_t, as
    eq. 5) at single steps, x0 predictions well outside [-1, 1]: the posterior mean from the clipped x0
    plus the same noise (diffusers draws it with torch.randn from the generator given)."""
    T = 1000
    d, net = Diffusion(T), _Analytic(T, scale=3.0)
    sched = DDPMScheduler(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                          clip_sample=True, clip_sample_range=1.0, variance_type="fixed_large")
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    eps = net(x, torch.full((2,), t))
    want = sched.step(eps, t, x, generator=torch.Generator().manual_seed(7)).prev_sample
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    got = d.reverse_step(x.double(), t, eps.double(), z.double(), clip_x0=True)
    torch.testing.assert_close(got.float(), want, atol=1e-4, rtol=1e-4)
    ab = d.alpha_bars[t].item()
    assert ((x - (1 - ab) ** 0.5 * eps) / ab ** 0.5).abs().max() > 1  # the clip was reached
    assert not torch.allclose(d.reverse_step(x, t, eps, z), want, atol=1e-3)  # unclipped eq. 5 differs
