"""The fast paths agree with the eager reference: compiled training, fused/graph sampling, DDIM."""
import math

import pytest
import torch

from fastddpm.diffusion import Diffusion
from fastddpm.model import UNet
from fastddpm.sampling import sample
from fastddpm.train import Trainer
from tests.conftest import run_main, tiny_config


def _trajectory(tmp_path, compile_, steps=4):
    trainer = Trainer(tiny_config(compile=compile_, batch_size=8), tmp_path, torch.device("cpu"), progress=False)
    indices = trainer.batches.epoch_indices(0)
    losses = []
    for i in range(steps):
        losses.append(trainer.train_step(trainer.batches.batch(indices[i], trainer.gen)).item())
        trainer.step += 1
    return losses


@pytest.fixture
def aot_eager(monkeypatch):
    """torch.compile through aot_eager: dynamo's graph and AOT autograd's forward and backward graphs,
    without Inductor's C++, which took 110 s cold for a tiny U-Net's training step and 99 s for its
    sampling graph on CI's kind of CPU (2026-11-28). These tests run on the CPU wherever they run, and a
    GPU's code is Triton's: on a GPU the trainer checks its Inductor step against eager before it trains,
    and the bench guards every compiled path against eager. Inductor on the CPU: the layout test in
    test_unet_triton.py (an inference graph)."""
    from bench.common import with_default_backend

    monkeypatch.setattr(torch, "compile", with_default_backend(torch.compile, "aot_eager"))


def test_compiled_training_follows_the_eager_loss_trajectory(tmp_path, aot_eager):
    """The trainer's compiled step trains as eager does (through aot_eager: the fixture)."""
    eager = _trajectory(tmp_path / "eager", False)
    compiled = _trajectory(tmp_path / "compiled", True)
    assert compiled == pytest.approx(eager, rel=2e-3)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return UNet(base_channels=8)


def test_fast_engine_matches_eager_given_the_same_noise():
    """The fast engine (Triton GroupNorm+GELU, fused reverse step with in-kernel Philox) against the
    eager loop fed the same Philox noise: the same images up to rounding, over chunks of 2 and 1 (each
    chunk's noise offset) and the last, noiseless step. Kept small: every step runs in the interpreter,
    at 2.4 s a forward for this U-Net of base width 4 (9.1 s at width 8)."""
    torch.manual_seed(0)
    model = UNet(base_channels=4)
    fast = sample(model, 3, T=4, seed=3, engine="fast", batch_size=2, progress=False)
    eager = sample(model, 3, T=4, seed=3, engine="eager", noise="philox", batch_size=3, progress=False)
    assert (fast.int() - eager.int()).abs().max() <= 1 and (fast.int() - eager.int()).abs().float().mean() < 0.5
    assert model.kernels == "auto"  # the caller's switch is restored


def test_compiled_engine_matches_eager(aot_eager):
    """The compiled engine's images are eager's (through aot_eager: the fixture)."""
    small = UNet(base_channels=4)
    compiled = sample(small, 2, T=3, seed=1, engine="compiled", progress=False)
    eager = sample(small, 2, T=3, seed=1, engine="eager", progress=False)
    assert (compiled.int() - eager.int()).abs().max() <= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph sampling needs a CUDA GPU")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cuda_graph_sampling_matches_the_eager_loop(channels_last):
    """The fast engine's graph, in either layout, against the eager NCHW loop fed the same noise."""
    torch.manual_seed(0)
    gpu_model = UNet(base_channels=16).cuda()
    kw = dict(T=20, seed=4, progress=False)
    graph = sample(gpu_model, 6, engine="fast", batch_size=4, channels_last=channels_last, **kw)  # captured + replayed
    eager = sample(gpu_model, 6, engine="eager", noise="philox", batch_size=6, channels_last=False, **kw)
    assert (graph.int() - eager.int()).abs().float().mean() < 1.0
    again = sample(gpu_model, 6, engine="fast", batch_size=3, channels_last=channels_last, **kw)
    assert (graph.int() - again.int()).abs().max() <= 1  # batch-size independent noise
    if channels_last:  # Inductor's own kernels in NHWC too
        compiled = sample(gpu_model, 6, engine="compiled", batch_size=6, channels_last=True, **kw)
        assert (compiled.int() - sample(gpu_model, 6, engine="eager", channels_last=False, **kw).int()
                ).abs().float().mean() < 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph sampling needs a CUDA GPU")
@pytest.mark.parametrize("sampler,steps,eta,clip_x0", [("ddim", 7, 0.0, False), ("ddim", 2, 1.0, False),
                                                       ("dpm++", 1, None, False), ("dpm++", 6, None, False),
                                                       ("ddim", 7, 0.0, True), ("dpm++", 6, None, True),
                                                       ("ddpm", None, None, True)])
def test_cuda_graph_few_step_sampling_matches_the_eager_loop(sampler, steps, eta, clip_x0):
    """The generic step's graph (the plan's rows, the step index in a device tensor: the few-step
    samplers, and DDPM with a clipped x0) against the eager formulas fed the same Philox noise; plans
    shorter than the three warm-up calls included."""
    torch.manual_seed(0)
    gpu_model = UNet(base_channels=16).cuda()
    kw = dict(T=40, seed=4, sampler=sampler, steps=steps, eta=eta, clip_x0=clip_x0, progress=False)
    graph = sample(gpu_model, 6, engine="fast", batch_size=4, **kw)
    eager = sample(gpu_model, 6, engine="eager", noise="philox", batch_size=6, **kw)
    assert (graph.int() - eager.int()).abs().float().mean() < 1.0
    again = sample(gpu_model, 6, engine="fast", batch_size=3, **kw)
    assert (graph.int() - again.int()).abs().max() <= 1  # batch-size independent


def test_ddim_with_all_steps_and_eta_1_is_ddpm_posterior():
    d = Diffusion(40)
    g = torch.Generator().manual_seed(0)
    x, eps, z = (torch.randn(3, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    assert d.ddim_timesteps(40) == list(range(39, -1, -1))
    ab, betas = d.alpha_bars.tolist(), d.betas.tolist()
    for t in (39, 17, 1):
        x0 = (x - math.sqrt(1 - ab[t]) * eps) / math.sqrt(ab[t])
        # q(x_{t-1} | x_t, x_0): Ho et al. eq. 7
        mean = (math.sqrt(ab[t - 1]) * betas[t] / (1 - ab[t])) * x0 + \
               (math.sqrt(1 - betas[t]) * (1 - ab[t - 1]) / (1 - ab[t])) * x
        var = (1 - ab[t - 1]) / (1 - ab[t]) * betas[t]
        got = d.ddim_step(x.float(), t, t - 1, eps.float(), 1.0, z.float())
        torch.testing.assert_close(got, (mean + math.sqrt(var) * z).float(), rtol=1e-4, atol=1e-4)
        # its mean is eq. 9's mu_theta, i.e. DDPM's step without noise
        torch.testing.assert_close(d.ddim_step(x.float(), t, t - 1, eps.float(), 1.0, None),
                                   d.reverse_step(x.float(), t, eps.float(), None), rtol=1e-4, atol=1e-4)


def test_ddim_eta_0_is_deterministic_given_x_T(model):
    d = Diffusion(10)
    x, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert torch.equal(d.ddim_step(x, 5, 2, eps, 0.0, torch.randn(2, 3, 4, 4)), d.ddim_step(x, 5, 2, eps, 0.0, None))
    a = sample(model, 3, T=30, sampler="ddim", steps=5, eta=0.0, seed=2, noise="torch", progress=False)
    b = sample(model, 3, T=30, sampler="ddim", steps=5, eta=0.0, seed=2, noise="philox", progress=False)
    assert torch.equal(a, b)  # same x_T, different noise streams, no noise used
    c = sample(model, 3, T=30, sampler="ddim", steps=5, eta=1.0, seed=2, noise="torch", progress=False)
    assert not torch.equal(a, c)
    assert d.ddim_timesteps(1) == [9] and d.ddim_timesteps(4) == [9, 6, 3, 0]


@pytest.mark.parametrize("sampler,what", [("ddim", "DDIM 50 steps"), ("dpm++", "DPM++(2M) 20 steps")])
def test_few_step_samplers_from_the_cli(tmp_path, sampler, what):
    from fastddpm import sampling as sample_mod
    from fastddpm import train as train_mod

    argv = ["--data", "shapes", "--preset", "tiny", "--T", "60", "--epochs", "1", "--batch-size", "16",
            "--train-size", "16", "--val-size", "0", "--n-samples", "0", "--no-progress", "--out", str(tmp_path)]
    assert run_main(train_mod.main, argv)[0] == 0
    ckpt = ["--checkpoint", str(tmp_path / "checkpoint.pt"), "--sampler", sampler]
    steps = ["--steps", "50"] if sampler == "ddim" else ["--steps", "20"]
    code, out, err = run_main(sample_mod.main, ckpt + steps + ["--n", "4", "--out", str(tmp_path / "g.png"),
                                                              "--no-progress"])
    assert code == 0, err
    assert what in out and (tmp_path / "g.png").is_file()
    for bad in ("0", "100"):
        code, _, err = run_main(sample_mod.main, ckpt + ["--steps", bad])
        assert code == 2 and f"--steps {bad}:" in err and "T=60" in err and err.count("\n") == 1, err
    code, _, err = run_main(sample_mod.main, ckpt + ["--eta", "-1"])
    assert code == 2 and "--eta -1.0" in err and err.count("\n") == 1, err
    clipped = ["--clip-x0", "--n", "2", "--out", str(tmp_path / "c.png"), "--no-progress"]
    code, out, err = run_main(sample_mod.main, ckpt + steps + clipped)
    assert code == 0 and what in out and ", x0 clipped, engine" in out, err
    if sampler == "ddim":  # the layout flag reaches sample(), and the line says what ran
        code, out, err = run_main(sample_mod.main, ckpt + steps + ["--channels-last"] + clipped)
        assert code == 0 and ", engine auto, NHWC" in out and "; NHWC (asked for))" in out, err
