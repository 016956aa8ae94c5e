"""The diffusion process (section 3.1), apart from the network: a linear beta schedule kept as plain
tensors, the forward noising, the training loss and the reverse update."""
from __future__ import annotations

import torch
import torch.nn.functional as F


class Diffusion:
    """Linear schedule over ``T`` steps. Index ``i`` in ``[0, T)`` is the paper's ``t = i + 1``.

    ``betas``, ``alphas`` and ``alpha_bars`` are float64 tensors computed once; per-step
    coefficients are gathered from them and cast to float32 where they meet the images. They are
    plain attributes, not module buffers, so no EMA or optimizer ever touches them.
    """

    def __init__(self, T: int, beta_start: float = 1e-4, beta_end: float = 0.02, device=None):
        if int(T) != T or T < 1:
            raise ValueError(f"T must be a positive integer, got {T!r}")
        if not 0 < beta_start <= beta_end < 1:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
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
        eps = model(self.q_sample(x0, t, noise), t)
        return F.mse_loss(eps.float(), noise.float())

    def reverse_step(self, x_t: torch.Tensor, t: int, eps: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """One step of p(x_{t-1} | x_t)  (eq. 5 with sigma_t^2 = beta_t, eq. 10); no noise at t index 0."""
        t = int(t)
        beta, alpha, ab = (table[t] for table in self._host)
        mean = (x_t - (beta / (1.0 - ab) ** 0.5) * eps.float()) / alpha ** 0.5  # eq. 9
        if t == 0 or noise is None:
            return mean
        return mean + beta ** 0.5 * noise

    def reverse_tables(self, device=None) -> dict[str, torch.Tensor]:
        """Eq. 5's per-step coefficients as fp32 tables for the fused reverse-step kernel."""
        tables = {"inv_sqrt_alpha": self.alphas.rsqrt(), "eps_coef": self.betas / (1.0 - self.alpha_bars).sqrt(),
                  "sigma": self.betas.sqrt()}
        return {k: v.to(device=device, dtype=torch.float32) for k, v in tables.items()}

    # --- DDIM (Song et al., 2021), beyond the paper: fewer steps for a DDPM-trained model -----------

    def ddim_timesteps(self, steps: int) -> list[int]:
        """``steps`` indices evenly spaced over [0, T), T-1 (and 0 when steps > 1) included, descending."""
        if not 1 <= steps <= self.T:
            raise ValueError(f"DDIM steps must be in [1, T={self.T}], got {steps}")
        if steps == 1:
            return [self.T - 1]
        return torch.linspace(0, self.T - 1, steps, dtype=torch.float64).round().long().unique().flip(0).tolist()

    def ddim_step(self, x_t: torch.Tensor, t: int, t_prev: int, eps: torch.Tensor, eta: float,
                  noise: torch.Tensor | None) -> torch.Tensor:
        """x_{t_prev} from x_t (Song et al. eq. 12); t_prev = -1 is the clean image (alpha_bar = 1).
        eta = 1 with t_prev = t - 1 is DDPM's posterior with variance beta~_t; eta = 0 is deterministic."""
        ab = self._host[2][t]
        ab_prev = self._host[2][t_prev] if t_prev >= 0 else 1.0
        eps = eps.float()
        x0 = (x_t - (1.0 - ab) ** 0.5 * eps) / ab ** 0.5
        sigma = eta * ((1.0 - ab_prev) / (1.0 - ab) * (1.0 - ab / ab_prev)) ** 0.5
        x = ab_prev ** 0.5 * x0 + max(1.0 - ab_prev - sigma ** 2, 0.0) ** 0.5 * eps
        if sigma > 0 and noise is not None:
            x = x + sigma * noise
        return x
