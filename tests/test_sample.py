import numpy as np
import pytest
import torch

from fastddpm import sample as sample_mod
from fastddpm.images import grid_array, save_grid
from fastddpm.model import UNet
from fastddpm.sample import sample


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return UNet(base_channels=8)


def test_sample_is_deterministic_batch_independent_uint8(model):
    a = sample(model, 8, T=6, batch_size=3, seed=5, progress=False)
    b = sample(model, 8, T=6, batch_size=8, seed=5, progress=False)
    c = sample(model, 8, T=6, batch_size=8, seed=6, progress=False)
    assert a.dtype == torch.uint8 and a.shape == (8, 3, 32, 32)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert int(a.min()) >= 0 and int(a.max()) <= 255 and a.float().std() > 0


def test_sample_restores_the_callers_train_state(model):
    model.train()
    sample(model, 2, T=2, progress=False)
    assert model.training
    model.eval()
    sample(model, 2, T=2, progress=False)
    assert not model.training


def test_bare_model_needs_T(model):
    with pytest.raises(ValueError, match="give T="):
        sample(model, 2)


def test_trajectory_keeps_requested_steps(model):
    images, traj = sample(model, 2, T=5, seed=1, progress=False, trajectory_at=[4, 2])
    assert sorted(traj) == [2, 4] and traj[4].dtype == torch.uint8
    assert torch.equal(images, sample(model, 2, T=5, seed=1, progress=False))


def test_sample_in_bf16_runs_and_stays_close(model):
    fp32 = sample(model, 2, T=3, seed=2, progress=False).float()
    bf16 = sample(model, 2, T=3, seed=2, progress=False, dtype="bf16").float()
    assert (fp32 - bf16).abs().mean() < 8  # same noise; only the network's precision differs


def test_grid_layout_and_png(tmp_path):
    images = torch.arange(5 * 3 * 2 * 2, dtype=torch.uint8).reshape(5, 3, 2, 2)
    grid = grid_array(images, nrow=3, pad=1, scale=1)
    assert grid.shape == (2 * 3 + 1, 3 * 3 + 1, 3)
    np.testing.assert_array_equal(grid[1:3, 1:3], images[0].permute(1, 2, 0).numpy())
    np.testing.assert_array_equal(grid[4:6, 1:3], images[3].permute(1, 2, 0).numpy())
    path = save_grid(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), tmp_path / "g.png")
    from PIL import Image

    assert Image.open(path).size == (2 * 66 + 2, 2 * 66 + 2)
    with pytest.raises(ValueError, match="uint8"):
        grid_array(torch.zeros(1, 3, 2, 2))


def test_to_uint8_maps_the_range():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0])
    assert sample_mod.to_uint8(x).tolist() == [0, 0, 128, 255, 255]


class _Oracle(torch.nn.Module):
    """The exact noise predictor for a one-image data set x0*: eps = (x_t - sqrt(ab) x0*) / sqrt(1 - ab)."""

    def __init__(self, x0, diffusion):
        super().__init__()
        self.register_buffer("x0", x0)
        self.ab = diffusion.alpha_bars.float()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # sample() reads the device off a parameter

    def forward(self, x, t):
        ab = self.ab[t][:, None, None, None]
        return (x - ab.sqrt() * self.x0) / (1 - ab).sqrt()


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_the_reverse_chain_recovers_the_data_with_an_exact_noise_predictor(sampler):
    from fastddpm.diffusion import Diffusion

    target = torch.linspace(-0.8, 0.8, 3 * 32 * 32).reshape(1, 3, 32, 32)
    oracle = _Oracle(target, Diffusion(200))
    images = sample(oracle, 4, T=200, seed=0, progress=False, sampler=sampler, steps=20)
    expected = ((target + 1) * 127.5).round().expand(4, -1, -1, -1)
    assert (images.float() - expected).abs().max() <= 2
