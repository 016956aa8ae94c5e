"""The fast path's bilinear x2 upsampling (kernels/upsample_bilinear.py) against PyTorch's
``F.interpolate(..., mode="bilinear", align_corners=True)``: the same forward, bit for bit, and the
same gradient (PyTorch's own scatter backward is the reference), per dtype, in both memory layouts,
on square, non-square, odd and size-1 inputs; and a full-graph ``torch.compile`` trace."""
import pytest
import torch
import torch.nn.functional as F

from fastddpm.kernels.upsample_bilinear import upsample_bilinear2x

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # bench/gpu.sh runs these natively too

# max |gradient - reference| <= TOL * max |reference|: both sum 2 to 4 products per input pixel per
# axis, in another order (and the reference, in fp16/bf16, in that dtype)
TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}
SHAPES = [(2, 3, 4, 4), (1, 5, 8, 8), (1, 2, 16, 16), (2, 3, 5, 7), (1, 2, 1, 3), (1, 2, 3, 1), (1, 1, 1, 1),
          (1, 2, 31, 17)]


def _pair(shape, dtype, channels_last):
    torch.manual_seed(sum(shape))
    x = torch.randn(shape, dtype=dtype, device=DEVICE)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.clone().requires_grad_(), x.clone().requires_grad_()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", list(TOL), ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_same_forward_and_gradient_as_interpolate(shape, dtype, channels_last):
    ref_x, x = _pair(shape, dtype, channels_last)
    ref = F.interpolate(ref_x, scale_factor=2, mode="bilinear", align_corners=True)
    y = upsample_bilinear2x(x)
    assert torch.equal(y, ref)
    dy = torch.randn_like(ref)
    ref.backward(dy)
    y.backward(dy)
    assert x.grad.dtype == dtype and x.grad.stride() == x.stride()  # an NHWC step stays NHWC
    err = (x.grad.double() - ref_x.grad.double()).abs().max() / ref_x.grad.double().abs().max()
    assert err <= TOL[dtype], f"relative gradient error {err:.3g} > {TOL[dtype]}"


def test_gradient_is_the_transpose_of_the_forward():
    """Independently of PyTorch's backward: <dy, up(x)> = <up^T(dy), x> for random x, dy (float64)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 9, dtype=torch.float64, device=DEVICE, requires_grad=True)
    y = upsample_bilinear2x(x)
    dy = torch.randn_like(y)
    (g,) = torch.autograd.grad(y, x, dy)
    assert torch.allclose((dy * y).sum(), (g * x).sum(), rtol=1e-12, atol=0)


def test_traces_under_torch_compile_fullgraph():
    ref_x, x = _pair((2, 3, 8, 8), torch.float32, True)
    y = torch.compile(upsample_bilinear2x, fullgraph=True, backend="aot_eager")(x)
    ref = F.interpolate(ref_x, scale_factor=2, mode="bilinear", align_corners=True)
    dy = torch.randn_like(ref)
    y.backward(dy)
    ref.backward(dy)
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)  # compiled, the forward is decomposed
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-6, atol=1e-6)


def test_rejects_a_tensor_that_is_not_4d():
    with pytest.raises(ValueError, match=r"expected \(N, C, H, W\), got shape \(3, 4\)"):
        upsample_bilinear2x(torch.zeros(3, 4))
