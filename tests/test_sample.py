import contextlib

import numpy as np
import pytest
import torch

from fastddpm import sampling as sample_mod
from fastddpm.images import grid_array, save_grid
from fastddpm.measured import CPU_SAMPLE_LAYOUT
from fastddpm.model import UNet
from fastddpm.sampling import sample


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return UNet(base_channels=8)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])  # (auto differs by CPU)
def test_sample_is_deterministic_batch_independent_uint8(model, channels_last):
    kw = dict(T=6, progress=False, channels_last=channels_last)
    a = sample(model, 8, batch_size=3, seed=5, **kw)
    b = sample(model, 8, batch_size=8, seed=5, **kw)
    c = sample(model, 8, batch_size=8, seed=6, **kw)
    assert a.dtype == torch.uint8 and a.shape == (8, 3, 32, 32)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert int(a.min()) >= 0 and int(a.max()) <= 255 and a.float().std() > 0


def test_sampling_records_no_autograd_graph(model):
    grad_modes = []
    handle = model.register_forward_hook(lambda m, i, o: grad_modes.append(torch.is_grad_enabled()))
    try:
        for sampler in ("ddpm", "ddim", "dpm++"):
            sample(model, 1, T=3, sampler=sampler, steps=2 if sampler != "ddpm" else None, progress=False)
    finally:
        handle.remove()
    assert grad_modes and not any(grad_modes)


def test_sample_restores_the_callers_train_state(model):
    model.train()
    sample(model, 2, T=2, progress=False)
    assert model.training
    model.eval()
    sample(model, 2, T=2, progress=False)
    assert not model.training


def test_trajectory_keeps_requested_steps(model):
    images, traj = sample(model, 2, T=5, seed=1, progress=False, trajectory_at=[4, 2])
    assert sorted(traj) == [2, 4] and traj[4].dtype == torch.uint8
    assert torch.equal(images, sample(model, 2, T=5, seed=1, progress=False))


def test_sample_in_bf16_runs_and_stays_close(model):
    fp32 = sample(model, 2, T=3, seed=2, progress=False).float()
    bf16 = sample(model, 2, T=3, seed=2, progress=False, dtype="bf16").float()
    assert (fp32 - bf16).abs().mean() < 8  # same noise; only the network's precision differs


@contextlib.contextmanager
def convolution_layouts():
    """Yields a list that gets, per convolution call inside, whether its input and weight were both NHWC."""
    nhwc_convs = []

    def record(module, args):
        if isinstance(module, torch.nn.Conv2d):
            fmt = torch.channels_last
            nhwc_convs.append(args[0].is_contiguous(memory_format=fmt)
                              and module.weight.is_contiguous(memory_format=fmt))

    hook = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        yield nhwc_convs
    finally:
        hook.remove()


def test_channels_last_runs_the_network_in_nhwc_and_leaves_the_model_as_it_was(model):
    """channels_last=True: every convolution sees NHWC inputs and weights, the images are NCHW's up
    to rounding, and afterwards the caller's parameters are the very tensors they were (an optimizer
    holding them sees no change), whatever layout the caller's model was in."""
    try:
        with convolution_layouts() as nhwc_convs:
            for layout in (torch.contiguous_format, torch.channels_last):  # the caller's model in either layout
                model.to(memory_format=layout)
                before = {name: (p, p.data_ptr(), p.stride()) for name, p in model.named_parameters()}
                timings = {}
                nhwc = sample(model, 3, T=4, seed=7, progress=False, channels_last=True, timings=timings)
                assert nhwc_convs and all(nhwc_convs)
                assert (timings["layout"], timings["layout_chosen_by"]) == ("nhwc", "asked for")
                nhwc_convs.clear()
                nchw = sample(model, 3, T=4, seed=7, progress=False, channels_last=False)
                assert nhwc_convs and not any(nhwc_convs)  # NCHW asked: so even a channels_last model runs
                nhwc_convs.clear()
                assert (nhwc.int() - nchw.int()).abs().max() <= 1
                after = dict(model.named_parameters())
                assert all(after[n] is p and p.data_ptr() == ptr and p.stride() == stride
                           for n, (p, ptr, stride) in before.items())
    finally:
        model.to(memory_format=torch.contiguous_format)


@pytest.mark.parametrize("capability", ["AVX2", "AVX512"])
def test_auto_layout_on_the_cpu_is_the_one_measured_faster_on_that_kind_of_cpu(model, monkeypatch, capability):
    """Auto on the CPU (the eager engine): NHWC where bench.cpu_dtypes measured it faster on a CPU of
    this vector capability, citing the file; NCHW, saying so, where it measured nothing."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    timings = {}
    with convolution_layouts() as nhwc_convs:  # batch 1: its strides once made the attention blocks hand
        sample(model, 1, T=2, progress=False, timings=timings)  # the next convolutions NCHW (see SelfAttention)
    source, layouts = CPU_SAMPLE_LAYOUT.get(capability, (None, {}))
    layout = layouts.get("fp32", "nchw")
    assert timings["engine"] == "eager" and timings["layout"] == layout
    assert nhwc_convs and set(nhwc_convs) == {layout == "nhwc"}  # every convolution ran in that layout
    why = timings["layout_chosen_by"]
    assert why.startswith(f"auto: {layout.upper()}") and (source or "no measured layout") in why
    assert sample_mod.describe_timings(timings).endswith(f"; {layout.upper()} ({why}))")
    assert (capability == "AVX2") == (layout == "nhwc")  # the one CPU measured so far: CI's kind


def test_grid_layout_and_png(tmp_path):
    images = torch.arange(5 * 3 * 2 * 2, dtype=torch.uint8).reshape(5, 3, 2, 2)
    grid = grid_array(images, nrow=3, pad=1, scale=1)
    assert grid.shape == (2 * 3 + 1, 3 * 3 + 1, 3)
    np.testing.assert_array_equal(grid[1:3, 1:3], images[0].permute(1, 2, 0).numpy())
    np.testing.assert_array_equal(grid[4:6, 1:3], images[3].permute(1, 2, 0).numpy())
    path = save_grid(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), tmp_path / "g.png")
    from PIL import Image

    assert Image.open(path).size == (2 * 66 + 2, 2 * 66 + 2)


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


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++"])
def test_the_reverse_chain_recovers_the_data_with_an_exact_noise_predictor(sampler):
    from fastddpm.diffusion import Diffusion

    target = torch.linspace(-0.8, 0.8, 3 * 32 * 32).reshape(1, 3, 32, 32)
    oracle = _Oracle(target, Diffusion(200))
    images = sample(oracle, 4, T=200, seed=0, progress=False, sampler=sampler, steps=20 if sampler != "ddpm" else None)
    expected = ((target + 1) * 127.5).round().expand(4, -1, -1, -1)
    assert (images.float() - expected).abs().max() <= 2


def test_default_chunks_split_n_evenly_so_the_graph_wastes_under_one_image_a_chunk():
    from fastddpm.sampling import MAX_BATCH, chunk_size

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert chunk_size(5120, None, cuda) == 2560 == MAX_BATCH["cuda"]  # the bench's measured batch, no waste
    for n in (1, 2559, 2561, 5121, 7000, 50_000):
        b = chunk_size(n, None, cuda)
        chunks = -(-n // b)
        assert b <= MAX_BATCH["cuda"] and chunks == -(-n // MAX_BATCH["cuda"]) and chunks * b - n < chunks
    assert chunk_size(1000, None, cpu) == 250 and chunk_size(10, 4, cpu) == 4 and chunk_size(3, 8, cpu) == 3


def test_timings_split_the_one_off_part_from_the_steady_part(model):
    """A network whose first call is slow (as a compiling one is): the one-off second lands in
    warmup_seconds, and the steady rate is that of the other calls."""
    import time

    class FirstCallSlow(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net, self.calls = net, 0

        def forward(self, x, t):
            self.calls += 1
            if self.calls == 1:
                time.sleep(1.0)
            return self.net(x, t)

    timings = {}
    start = time.perf_counter()
    sample(FirstCallSlow(model), 3, T=4, batch_size=2, progress=False, timings=timings)
    wall = time.perf_counter() - start
    assert 1.0 <= timings["warmup_seconds"] and timings["steady_seconds"] < wall - 1.0
    assert timings["image_steps"] == 12 and timings["chunks"] == 2 and timings["network_calls"] == 8
    assert timings["steady_image_steps_per_s"] == pytest.approx((12 - 3) / timings["steady_seconds"])
    assert timings["engine"] == "eager"


def test_a_custom_schedule_reaches_the_sampler(model):
    from fastddpm.diffusion import Diffusion

    custom = sample(model, 2, diffusion=Diffusion(8, 1e-3, 0.2), seed=3, progress=False)
    default = sample(model, 2, T=8, seed=3, progress=False)
    again = sample(model, 2, diffusion=Diffusion(8, 1e-3, 0.2), seed=3, progress=False)
    assert torch.equal(custom, again) and not torch.equal(custom, default)


def test_progress_bars_follow_one_rule(capsys, monkeypatch, tmp_path):
    """No bar into a log (stderr not a terminal) unless asked for; --no-progress always wins; the data
    decoder passes the caller's choice on."""
    import io
    import sys as _sys
    import zipfile

    from PIL import Image

    from fastddpm import data
    from fastddpm.progress import progress_bar

    monkeypatch.setattr(_sys.stderr, "isatty", lambda: False)
    list(progress_bar(range(3000), enabled=None))
    assert capsys.readouterr().err == ""
    list(progress_bar(range(3000), enabled=True))
    assert "\r" in capsys.readouterr().err
    monkeypatch.setattr(_sys.stderr, "isatty", lambda: True)
    list(progress_bar(range(3000), enabled=False))
    assert capsys.readouterr().err == ""
    png = io.BytesIO()
    Image.new("RGB", (32, 32)).save(png, format="PNG")
    with zipfile.ZipFile(tmp_path / "d.zip", "w") as z:
        for i in range(2000):  # the decoder shows a bar from 2,000 images on
            z.writestr(f"train/a/{i}.png", png.getvalue())
    asked = []
    monkeypatch.setattr(data, "progress_bar", lambda it, enabled, **kw: asked.append(enabled) or it)
    for choice in (False, None, True):
        data.decode_images("zip", tmp_path / "d.zip", "train/", progress=choice)
    assert asked == [False, None, True]

