"""The fast path's bilinear x2 upsampling (kernels/upsample_bilinear.py) against PyTorch's
``F.interpolate(..., mode="bilinear", align_corners=True)``: the same forward, bit for bit; the
gather backward against PyTorch's own scatter backward, per dtype, in both memory layouts, on square,
non-square, odd and size-1 inputs; and the whole op eagerly and under a full-graph ``torch.compile``
(where the gather runs), with the gradient in the input's layout when it comes through a concat."""
import pytest
import torch
import torch.nn.functional as F

from fastddpm.kernels.upsample_bilinear import gather_backward, upsample_bilinear2x

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # bench/gpu.sh runs these natively too
# max |gradient - reference| <= TOL * max (the backward of |dy|): both sum 2 to 4 products per input
# pixel per axis, in another order (and the reference, in fp16/bf16, in that dtype), so the rounding
# scales with the summands, not with a sum that may cancel (1x1x1x1: the sum of 4 dy; on an H100 a
# 0.054 from summands near 1 differed by 1.1e-6 of itself)
TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}
SHAPES = [(2, 3, 4, 4), (1, 5, 8, 8), (1, 2, 16, 16), (2, 3, 5, 7), (1, 2, 1, 3), (1, 2, 3, 1), (1, 1, 1, 1),
          (1, 2, 31, 17)]
NHWC = torch.channels_last


def _input(shape, dtype, channels_last, seed=0):
    torch.manual_seed(seed + sum(shape))
    x = torch.randn(shape, dtype=dtype, device=DEVICE)
    return x.contiguous(memory_format=NHWC) if channels_last else x


def _relative_error(got, ref, scale):
    return ((got.double() - ref.double()).abs().max() / scale.double().abs().max()).item()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", list(TOL), ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gather_backward_matches_pytorchs_backward(shape, dtype, channels_last):
    x = _input(shape, dtype, channels_last).requires_grad_()
    y = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
    dy = torch.randn_like(y)
    ref, scale = (torch.autograd.grad(y, x, g, retain_graph=True)[0] for g in (dy, dy.abs()))
    fmt = NHWC if channels_last else torch.contiguous_format
    got = gather_backward(dy, dtype, fmt)
    assert got.dtype == dtype and got.stride() == x.stride()
    assert _relative_error(got, ref, scale) <= TOL[dtype]


def test_gather_backward_is_the_transpose_of_the_forward():
    """Independently of PyTorch's backward: <dy, up(x)> = <up^T(dy), x> (float64)."""
    x = _input((2, 3, 6, 9), torch.float64, False)
    y = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
    dy = torch.randn_like(y)
    g = gather_backward(dy, torch.float64, torch.contiguous_format)
    assert torch.allclose((dy * y).sum(), (g * x).sum(), rtol=1e-12, atol=0)


def _through_concat(fn, x, skip, dy):
    """The Up block's use: upsample, then concat after a skip tensor; (output, x's gradient)."""
    x = x.detach().requires_grad_()
    out = fn(x, skip)
    (g,) = torch.autograd.grad(out, x, dy)
    return out, g


def _up_cat(x, skip):
    return torch.cat([skip, upsample_bilinear2x(x)], dim=1)


def _ref_cat(x, skip):
    return torch.cat([skip, F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)], dim=1)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_the_op_through_a_concat_keeps_values_and_layout(channels_last, compiled):
    """Eagerly the backward is PyTorch's kernel; compiled, the gather. Either way the gradient
    equals PyTorch's and comes back in x's layout, though dy is a slice of the concat's gradient."""
    x = _input((2, 3, 8, 8), torch.float32, channels_last)
    skip = _input((2, 4, 16, 16), torch.float32, channels_last, seed=1)
    ref, ref_g = _through_concat(_ref_cat, x, skip, dy := torch.randn_like(_ref_cat(x, skip)))
    backward_graphs = []
    if compiled:
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        def record(gm, _inputs):
            backward_graphs.append(str(gm.graph))
            return make_boxed_func(gm.forward)

        backend = aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm.forward), bw_compiler=record)
    fn = torch.compile(_up_cat, fullgraph=True, backend=backend) if compiled else _up_cat
    out, g = _through_concat(fn, x, skip, dy)
    if compiled:  # the traced backward is the gather, not PyTorch's scatter
        assert "index_select" in backward_graphs[0] and "upsample_bilinear2d_backward" not in backward_graphs[0]
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)  # compiled, the forward is decomposed
    torch.testing.assert_close(g, ref_g, rtol=1e-6, atol=1e-6)
    assert g.is_contiguous(memory_format=NHWC if channels_last else torch.contiguous_format)


def test_rejects_a_tensor_that_is_not_4d():
    with pytest.raises(ValueError, match=r"expected \(N, C, H, W\), got shape \(3, 4\)"):
        upsample_bilinear2x(torch.zeros(3, 4))
