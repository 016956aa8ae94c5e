"""The whole tiny U-Net with the fused Triton kernels vs the eager torch kernels: one model, same
weights, switched with ``set_kernels``. Output and every parameter gradient, per dtype, and a
``torch.compile(fullgraph=True)`` trace of the Triton path.

fp16/bf16 are exercised the way training runs them: ``torch.autocast`` (on the CPU when there is
no GPU), which feeds the fused op half-precision conv outputs with fp32 weight/bias. The eager path
runs GroupNorm in fp32 under autocast while the fused op keeps the input's half precision, so the
two paths are compared to each other loosely and, more sharply, each to the fp32 model: the fused
path may not lose more accuracy than the eager one does.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastddpm.model import UNet  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def no_tf32():
    """fp32 comparisons on a GPU: TF32 convolutions would round away the differences under test."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="module")
def model_and_batch():
    torch.manual_seed(0)
    model = UNet(base_channels=8).to(DEVICE)
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    t = torch.tensor([17, 873], device=DEVICE)
    return model, x, t


def _run(model, x, t, kernels, dtype=None):
    """Output (fp32) and {name: grad} of a forward + backward on the chosen path."""
    model.set_kernels(kernels)
    model.zero_grad(set_to_none=True)
    with torch.autocast(device_type=x.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        y = model(x, t)
    y.float().square().mean().backward()
    return y.detach().float(), {n: p.grad.detach().float().clone() for n, p in model.named_parameters()}


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _flat(grads):
    return torch.cat([g.flatten() for g in grads.values()])


@pytest.mark.parametrize("launch", ["default", "gpu"])
def test_fp32_matches_torch_path(model_and_batch, no_tf32, launch):
    """"gpu": the GroupNorm kernels with a GPU's launch defaults (the interpreter's own give a group one
    program): the 32x32 groups split over several programs, inside the whole U-Net."""
    from fastddpm.kernels import groupnorm_gelu as gng

    model, x, t = model_and_batch
    y_ref, g_ref = _run(model, x, t, "torch")
    settings = gng.GPU_LAUNCH_DEFAULTS if launch == "gpu" else {}
    with gng.launch_settings(**settings):
        b = model.base_channels  # its largest groups, b x 32 x 32: several programs each on a GPU's defaults
        split = launch == "gpu" or not gng._interpreted()  # (natively on a GPU, "default" is the GPU's)
        assert (gng._launch_config(b, 32 * 32, x.shape[0], 32 * 32, 1).s > 1) == split
        y, g = _run(model, x, t, "triton")
    assert y.shape == x.shape
    torch.testing.assert_close(y, y_ref, atol=1e-5 * y_ref.abs().max().item(), rtol=1e-4)
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        assert _rel(g[name], g_ref[name]) < 1e-4, name


# (max relative norm error of the output / all grads / any one parameter's grad, between the paths)
HALF_TOL = {torch.float16: (5e-3, 1e-2, 0.15), torch.bfloat16: (3e-2, 4e-2, 0.25)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_autocast_matches_torch_path(model_and_batch, dtype, no_tf32):
    model, x, t = model_and_batch
    y32, g32 = _run(model, x, t, "torch")
    y_ref, g_ref = _run(model, x, t, "torch", dtype)
    y, g = _run(model, x, t, "triton", dtype)
    tol_y, tol_g, tol_param = HALF_TOL[dtype]
    assert torch.isfinite(y).all()
    assert _rel(y, y_ref) < tol_y
    assert _rel(_flat(g), _flat(g_ref)) < tol_g
    for name in g_ref:
        assert _rel(g[name], g_ref[name]) < tol_param, name
    # against the fp32 model the fused path is no less accurate than the eager path (2x slack)
    assert _rel(y, y32) < 2 * _rel(y_ref, y32) + 1e-4
    assert _rel(_flat(g), _flat(g32)) < 2 * _rel(_flat(g_ref), _flat(g32)) + 1e-4


def test_torch_compile_fullgraph(no_tf32):
    """The fused op is traced by torch.compile with no graph break (fullgraph=True raises on one),
    forward and backward, and the compiled model matches eager. Inductor on a GPU (the GPU run's native
    tests); on the CPU aot_eager, AOT autograd's forward and backward graphs through the op's fake kernel
    and autograd formula without Inductor's C++ (100 s cold on CI's kind of CPU, 2026-11-28). Inductor
    with the fused op on the CPU: the next test."""
    torch.manual_seed(1)
    model = UNet(base_channels=4, kernels="triton").to(DEVICE)
    x = torch.randn(1, 3, 32, 32, device=DEVICE)
    t = torch.tensor([250], device=DEVICE)
    y_ref, g_ref = _run(model, x, t, "triton")
    compiled = torch.compile(model, fullgraph=True, backend="inductor" if DEVICE == "cuda" else "aot_eager")
    model.zero_grad(set_to_none=True)
    y = compiled(x, t)
    y.float().square().mean().backward()
    torch.testing.assert_close(y.detach(), y_ref, atol=1e-5 * y_ref.abs().max().item(), rtol=1e-4)
    for name, p in model.named_parameters():
        assert _rel(p.grad, g_ref[name]) < 1e-4, name


def test_compiled_layout_optimisation_hands_the_fused_op_channels_last(monkeypatch, no_tf32):
    """Inductor's layout optimisation (on by itself for a GPU's inference graph, the sampling engines')
    computes the convolutions channels_last. The fused op is tagged flexible_layout, so Inductor hands it
    those tensors as they are: every call sees channels_last input, where the default (exact eager
    strides) had Inductor copy each one back to NCHW and the result forward again. The output still
    matches the eager Triton path. (The backward op's handling of any strides: opcheck in
    test_kernels_groupnorm_gelu.py; a training graph, which Inductor keeps NCHW: the fullgraph test
    above, with Inductor on a GPU.)"""
    import torch._inductor.config as inductor_config

    from fastddpm.kernels import groupnorm_gelu as gng

    monkeypatch.setattr(inductor_config, "force_layout_optimization", True)
    layouts = []
    forward = gng._forward

    def recording(x, *args):
        layouts.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        return forward(x, *args)

    monkeypatch.setattr(gng, "_forward", recording)
    torch.manual_seed(2)
    model = UNet(base_channels=4, kernels="triton").to(DEVICE).eval()
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    t = torch.tensor([3, 640], device=DEVICE)
    with torch.no_grad():
        y_ref = model(x, t)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    layouts.clear()
    with torch.no_grad():
        y = compiled(x, t)
    assert len(layouts) == 26 and all(layouts)  # every GroupNorm of the U-Net, none converted back
    torch.testing.assert_close(y, y_ref, atol=1e-5 * y_ref.abs().max().item(), rtol=1e-4)
    torch._dynamo.reset()
