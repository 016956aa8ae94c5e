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
