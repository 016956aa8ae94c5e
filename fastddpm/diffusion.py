"""The diffusion process (section 3.1), apart from the network: a linear beta schedule kept as plain
tensors, the forward noising, the training loss and the reverse updates of three samplers (the
paper's eq. 5; DDIM; DPM-Solver++(2M)), each also written as a table of ``LinearStep`` rows for the
fast engine."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Network outputs in half precision meet the images in fp32; fp64 (tests) stays fp64."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _clipped(x0: torch.Tensor, clip: bool) -> torch.Tensor:
    """The predicted clean image, clipped to the data's range [-1, 1] when ``clip``."""
    return x0.clamp(-1.0, 1.0) if clip else x0


class LinearStep(NamedTuple):
    """One sampler step as a linear map, so one generic (graph-captured) step serves every sampler:
    ``x_next = a*x + b*eps + w*x0 + c*x0_prev + s*z`` with ``x0 = p*x + q*eps`` (this step's
    prediction of the clean image, clipped to [-1, 1] where the sampler clips it, and the ``x0_prev``
    of the next step). ``t`` is the step index the network is called with."""
    t: int
    a: float
    b: float
    c: float
    s: float
    p: float
    q: float
    w: float = 0.0


class Diffusion:
    """Linear schedule over ``T`` steps. Index ``i`` in ``[0, T)`` is the paper's ``t = i + 1``.

    ``betas``, ``alphas`` and ``alpha_bars`` are float64 tensors computed once; per-step
    coefficients are gathered from them and cast to float32 where they meet the images. They are
    plain attributes, not module buffers, so no EMA or optimizer ever touches them.
    """

    def __init__(self, T: int, beta_start: float = 1e-4, beta_end: float = 0.02, device=None):
        if isinstance(T, bool) or not isinstance(T, (int, float)) or int(T) != T or T < 1:
            raise ValueError(f"T={T!r}: the number of diffusion steps must be a positive integer")
        if not 0 < beta_start <= beta_end < 1:
            raise ValueError(f"beta_start={beta_start!r}, beta_end={beta_end!r}: need 0 < beta_start <= beta_end < 1")
        self.T, self.beta_start, self.beta_end = int(T), float(beta_start), float(beta_end)
        self.betas = torch.linspace(beta_start, beta_end, self.T, dtype=torch.float64, device=device)  # eq. 4
        self.alphas = 1.0 - self.betas  # eq. 6
        self.alpha_bars = torch.cumprod(self.alphas, dim=0)  # eq. 3
        # Host copies for the sampling loop, so a step index never costs a device sync.
        self._host = (self.betas.tolist(), self.alphas.tolist(), self.alpha_bars.tolist())

    @property
    def device(self) -> torch.device:
        return self.betas.device

    def to(self, device) -> "Diffusion":
        return Diffusion(self.T, self.beta_start, self.beta_end, device=device)

    def config(self) -> dict:
        return {"T": self.T, "beta_start": self.beta_start, "beta_end": self.beta_end}

    def _at(self, table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """table[t] as float32, shaped to broadcast over (N, C, H, W)."""
        if table.device != t.device:
            raise ValueError(f"schedule on {table.device} but t on {t.device}: use diffusion.to(device)")
        return table[t].float()[:, None, None, None]

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t ~ q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)  (eq. 2)."""
        ab = self._at(self.alpha_bars, t)
        return ab.sqrt() * x0 + (1.0 - ab).sqrt() * noise

    def loss(self, model, x0: torch.Tensor, t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """||eps - eps_theta(x_t, t)||^2 with t uniform over all T steps  (eq. 13)."""
        if t is None:
            t = torch.randint(0, self.T, (x0.shape[0],), device=x0.device, generator=generator)
        if noise is None:
            noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
            if x0.dim() == 4 and not x0.is_contiguous() and x0.is_contiguous(memory_format=torch.channels_last):
                # the same values, stored like x0: an NCHW noise would make the loss's gradient NCHW
                noise = noise.contiguous(memory_format=torch.channels_last)
        eps = model(self.q_sample(x0, t, noise), t)
        # The mean squared error, as a sum over the count: F.mse_loss's and mean()'s backwards return NCHW
        # gradients whatever the layout of eps (a channels_last step would turn NCHW at its last layer).
        return (eps.float() - noise.float()).square().sum() / eps.numel()

    def reverse_step(self, x_t: torch.Tensor, t: int, eps: torch.Tensor, noise: torch.Tensor | None,
                     clip_x0: bool = False) -> torch.Tensor:
        """One step of p(x_{t-1} | x_t)  (eq. 5 with sigma_t^2 = beta_t, eq. 10); no noise at t index 0.
        ``clip_x0``: the same mean written as the posterior's (Ho et al.'s eq. 7) from x0 = (x_t - sqrt(1 - ab) eps)
        / sqrt(ab), x0 clipped to [-1, 1] first: Ho et al.'s released sampler (clip_denoised). Unclipped,
        the two forms are the same mean."""
        t = int(t)
        beta, alpha, ab = (table[t] for table in self._host)
        eps = _at_least_fp32(eps)
        if clip_x0:
            c_x0, c_xt = self._posterior_coefficients(t)
            mean = c_x0 * _clipped((x_t - (1.0 - ab) ** 0.5 * eps) / ab ** 0.5, True) + c_xt * x_t  # Ho et al. eq. 7
        else:
            mean = (x_t - (beta / (1.0 - ab) ** 0.5) * eps) / alpha ** 0.5  # eq. 9
        if t == 0 or noise is None:
            return mean
        return mean + beta ** 0.5 * noise

    def _posterior_coefficients(self, t: int) -> tuple[float, float]:
        """The mean of q(x_{t-1} | x_t, x0) (Ho et al.'s eq. 7) as c_x0 * x0 + c_xt * x_t; at t index 0, x0."""
        beta, alpha, ab = (table[t] for table in self._host)
        ab_prev = self._host[2][t - 1] if t > 0 else 1.0
        return ab_prev ** 0.5 * beta / (1.0 - ab), alpha ** 0.5 * (1.0 - ab_prev) / (1.0 - ab)

    def reverse_tables(self, device=None) -> dict[str, torch.Tensor]:
        """Eq. 5's per-step coefficients as fp32 tables for the fused reverse-step kernel."""
        tables = {"inv_sqrt_alpha": self.alphas.rsqrt(), "eps_coef": self.betas / (1.0 - self.alpha_bars).sqrt(),
                  "sigma": self.betas.sqrt()}
        return {k: v.to(device=device, dtype=torch.float32) for k, v in tables.items()}

    def ddpm_plan(self, clip_x0: bool = False) -> list[LinearStep]:
        """Eq. 5 over all T steps as LinearStep rows; with ``clip_x0``, in ``reverse_step``'s posterior
        form (Ho et al.'s eq. 7), whose x0 term the step clips."""
        beta, alpha, ab = self._host
        rows = []
        for t in range(self.T - 1, -1, -1):
            p, q, s = ab[t] ** -0.5, -((1.0 - ab[t]) / ab[t]) ** 0.5, beta[t] ** 0.5 if t > 0 else 0.0
            if clip_x0:
                c_x0, c_xt = self._posterior_coefficients(t)
                rows.append(LinearStep(t, c_xt, 0.0, 0.0, s, p, q, w=c_x0))
            else:
                rows.append(LinearStep(t, alpha[t] ** -0.5, -alpha[t] ** -0.5 * beta[t] / (1.0 - ab[t]) ** 0.5, 0.0,
                                       s, p, q))
        return rows

    # --- DDIM (Song et al., 2021), beyond the paper: fewer steps for a DDPM-trained model -----------

    def ddim_timesteps(self, steps: int) -> list[int]:
        """``steps`` indices evenly spaced over [0, T), T-1 (and 0 when steps > 1) included, descending."""
        if not 1 <= steps <= self.T:
            raise ValueError(f"DDIM steps must be in [1, T={self.T}], got {steps}")
        if steps == 1:
            return [self.T - 1]
        return torch.linspace(0, self.T - 1, steps, dtype=torch.float64).round().long().unique().flip(0).tolist()

    def ddim_step(self, x_t: torch.Tensor, t: int, t_prev: int, eps: torch.Tensor, eta: float,
                  noise: torch.Tensor | None, clip_x0: bool = False) -> torch.Tensor:
        """x_{t_prev} from x_t (Song et al. eq. 12); t_prev = -1 is the clean image (alpha_bar = 1).
        eta = 1 with t_prev = t - 1 is DDPM's posterior with variance beta~_t; eta = 0 is deterministic.
        ``clip_x0``: the predicted x0 clipped to the data's range [-1, 1] first (diffusers' clip_sample)."""
        ab = self._host[2][t]
        ab_prev = self._host[2][t_prev] if t_prev >= 0 else 1.0
        eps = _at_least_fp32(eps)
        x0 = _clipped((x_t - (1.0 - ab) ** 0.5 * eps) / ab ** 0.5, clip_x0)
        sigma = self.ddim_sigma(t, t_prev, eta)
        x = ab_prev ** 0.5 * x0 + max(1.0 - ab_prev - sigma ** 2, 0.0) ** 0.5 * eps
        if sigma > 0 and noise is not None:
            x = x + sigma * noise
        return x

    def ddim_sigma(self, t: int, t_prev: int, eta: float) -> float:
        """The noise scale of a DDIM step (Song et al. eq. 16)."""
        ab, ab_prev = self._host[2][t], (self._host[2][t_prev] if t_prev >= 0 else 1.0)
        return eta * ((1.0 - ab_prev) / (1.0 - ab) * (1.0 - ab / ab_prev)) ** 0.5

    def ddim_plan(self, steps: int, eta: float) -> list[LinearStep]:
        """``ddim_step`` over ``ddim_timesteps(steps)`` as LinearStep rows."""
        ts = self.ddim_timesteps(steps)
        rows = []
        for t, t_prev in zip(ts, ts[1:] + [-1]):
            ab, ab_prev = self._host[2][t], (self._host[2][t_prev] if t_prev >= 0 else 1.0)
            sigma = self.ddim_sigma(t, t_prev, eta)
            direction = max(1.0 - ab_prev - sigma ** 2, 0.0) ** 0.5
            p, q = ab ** -0.5, -((1.0 - ab) / ab) ** 0.5  # x0 = p x + q eps
            rows.append(LinearStep(t, 0.0, direction, 0.0, sigma, p, q, w=ab_prev ** 0.5))
        return rows

    # --- DPM-Solver++(2M) (Lu et al., 2022), beyond the paper: 10 to 20 steps, no retraining ---------

    def dpm_solver_timesteps(self, steps: int) -> list[int]:
        """diffusers' "linspace" spacing: ``steps`` indices from T-1 down, 0 excluded (the last step goes
        to sigma = 0, the clean image). Where rounding repeats an index (steps = T only) it is kept once,
        which diffusers does not do (its update then divides by zero)."""
        if not 1 <= steps <= self.T:
            raise ValueError(f"DPM-Solver++ steps must be in [1, T={self.T}], got {steps}")
        ts = torch.linspace(0, self.T - 1, steps + 1, dtype=torch.float64).round().long().flip(0)[:-1].tolist()
        return list(dict.fromkeys(ts))

    def _alpha_sigma_lambda(self, t: int) -> tuple[float, float, float]:
        """VP alpha_t = sqrt(alpha_bar), sigma_t = sqrt(1 - alpha_bar) and the log-SNR lambda = log(alpha/sigma);
        t = -1 is the clean image (sigma = 0, lambda = inf)."""
        if t < 0:
            return 1.0, 0.0, math.inf
        ab = self._host[2][t]
        alpha, sigma = ab ** 0.5, (1.0 - ab) ** 0.5
        return alpha, sigma, math.log(alpha) - math.log(sigma)

    def dpm_solver_step(self, x: torch.Tensor, eps: torch.Tensor, ts: list[int], i: int,
                        x0_prev: torch.Tensor | None, clip_x0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Step ``i`` of DPM-Solver++(2M) over ``ts`` (Lu et al. 2022, Algorithm 2 with the data prediction
        x0 = (x - sigma eps) / alpha): first order at the first step and at the last (to sigma = 0), second
        order (the multistep midpoint update) between. Returns (x at the next step, x0). ``clip_x0``: x0
        clipped to [-1, 1] (Lu et al.'s thresholding for pixel-space models, with the static bound 1)."""
        t, t_next = ts[i], (ts[i + 1] if i + 1 < len(ts) else -1)
        alpha_s, sigma_s, lambda_s = self._alpha_sigma_lambda(t)
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(t_next)
        x0 = _clipped((x - sigma_s * _at_least_fp32(eps)) / alpha_s, clip_x0)
        k = -alpha_t * math.expm1(-(lambda_t - lambda_s))  # -alpha_t (e^{-h} - 1)
        if i == 0 or t_next < 0:
            return sigma_t / sigma_s * x + k * x0, x0
        r = (lambda_s - self._alpha_sigma_lambda(ts[i - 1])[2]) / (lambda_t - lambda_s)  # r0 = h_0 / h
        return sigma_t / sigma_s * x + k * (x0 + 0.5 / r * (x0 - x0_prev)), x0

    def dpm_solver_plan(self, steps: int) -> list[LinearStep]:
        """``dpm_solver_step`` over ``dpm_solver_timesteps(steps)`` as LinearStep rows."""
        ts = self.dpm_solver_timesteps(steps)
        rows = []
        for i, t in enumerate(ts):
            t_next = ts[i + 1] if i + 1 < len(ts) else -1
            alpha_s, sigma_s, lambda_s = self._alpha_sigma_lambda(t)
            alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(t_next)
            p, q = 1.0 / alpha_s, -sigma_s / alpha_s
            k = -alpha_t * math.expm1(-(lambda_t - lambda_s))
            w0, w1 = k, 0.0  # x_next = sigma_t/sigma_s x + w0 x0 + w1 x0_prev
            if i > 0 and t_next >= 0:
                half_over_r = 0.5 * (lambda_t - lambda_s) / (lambda_s - self._alpha_sigma_lambda(ts[i - 1])[2])
                w0, w1 = k * (1.0 + half_over_r), -k * half_over_r
            rows.append(LinearStep(t, sigma_t / sigma_s, 0.0, w1, 0.0, p, q, w=w0))
        return rows

    def plan(self, sampler: str, steps: int | None = None, eta: float = 0.0,
             clip_x0: bool = False) -> list[LinearStep]:
        """The LinearStep rows of ``sampler``: "ddpm" (all T steps), "ddim" or "dpm++" (``steps`` steps).
        (``clip_x0`` changes DDPM's rows to the posterior form; the others always carry their x0 term.)"""
        if sampler == "ddpm":
            return self.ddpm_plan(clip_x0)
        if sampler == "ddim":
            return self.ddim_plan(steps, eta)
        if sampler == "dpm++":
            return self.dpm_solver_plan(steps)
        raise ValueError(f"sampler {sampler!r}: choose ddpm, ddim or dpm++")
