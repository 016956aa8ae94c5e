"""Fused GroupNorm (+ residual) + GELU (+ time encoding) vs the eager ``GroupNormGELU`` (kernels="torch").

The reference runs in float64 on the same (upcast) inputs; forward and every gradient (x, weight,
bias, residual) are compared with a per-dtype tolerance. Shapes are not powers of two. Runs under
TRITON_INTERPRET=1 on a CPU-only machine, natively on a GPU otherwise.
"""
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fastddpm.kernels import groupnorm_gelu as gng  # noqa: E402
from fastddpm.kernels.groupnorm_gelu import group_norm_gelu  # noqa: E402
from fastddpm.model import GroupNormGELU  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# max |kernel - reference| <= TOL * (1 + max |reference|), per dtype of x
TOL = {torch.float32: 5e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


@pytest.fixture(autouse=True)
def gpu_launch_defaults():
    """The GPU's defaults in the interpreter too (which sizes its split for its own speed:
    gng.INTERPRETER_LAUNCH_DEFAULTS), so that a default here is the path a GPU launch takes."""
    with gng.launch_settings(**gng.GPU_LAUNCH_DEFAULTS):
        yield


def _fresh_process(code: str, **variables):
    """``code`` run in a new interpreter-mode process, with only these FASTDDPM_GN_* variables set."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTDDPM_GN_")}
    return subprocess.run([sys.executable, "-c", code], env=dict(env, TRITON_INTERPRET="1", **variables),
                          capture_output=True, text=True, timeout=300)


def test_the_interpreter_sizes_its_own_split_and_a_variable_still_wins():
    """Where the kernels run in the interpreter, the split's two sizing knobs default to its values,
    one program a group in one tile; GPU_LAUNCH_DEFAULTS keeps the GPU's; a FASTDDPM_GN_* variable
    sets both, as on a GPU."""
    code = ("from fastddpm.kernels import groupnorm_gelu as g; s = g.current_launch_settings(); "
            "print(s['tile'], s['programs'], g.GPU_LAUNCH_DEFAULTS['tile'], g.GPU_LAUNCH_DEFAULTS['programs'])")
    for variables, expected in (({}, ["16384", "1", "2048", "528"]),
                                ({"FASTDDPM_GN_TILE": "4096"}, ["4096", "1", "4096", "528"])):
        out = _fresh_process(code, **variables)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split() == expected
    with gng.launch_settings(**gng.INTERPRETER_LAUNCH_DEFAULTS):  # the tiny preset's largest group
        cfg = gng._launch_config(16, 1024, 8, 1024, 1)
    assert cfg.s == 1 and (cfg.block_c, cfg.block_hw) == (16, 1024)


@pytest.fixture
def force_split(monkeypatch):
    """Take the split-reduction path even for tiny groups: 64 elements per program (the resident paths
    off, whatever FASTDDPM_GN_* say)."""
    monkeypatch.setattr(gng, "SPLIT_THRESHOLD", 0)
    monkeypatch.setattr(gng, "ELEMS_PER_PROGRAM", 64)
    monkeypatch.setattr(gng, "RESIDENT_MAX", 0)
    monkeypatch.setattr(gng, "COOP_TILE", 0)


def _use_reduction(monkeypatch, lane: bool) -> bool:
    """One of the two ways the kernels reduce a group (see groupnorm_gelu._LANE_ACCUMULATE), in every
    pass: tile-reduce also turns off the backward's per-lane default for channels_last groups."""
    monkeypatch.setattr(gng, "_LANE_ACCUMULATE", lane)
    monkeypatch.setattr(gng, "_LANE_BWD_CHANNELS_LAST", lane)
    return lane


@pytest.fixture(params=[False, True], ids=["tile-reduce", "lane-accumulate"])
def reduction(request, monkeypatch):
    """Both ways the kernels reduce a group (``_use_reduction``)."""
    return _use_reduction(monkeypatch, request.param)


@pytest.fixture
def resident(monkeypatch):
    """Every group of the test on the resident path: one program, each input loaded once."""
    monkeypatch.setattr(gng, "RESIDENT_MAX", 1 << 16)


@pytest.fixture
def coop(monkeypatch):
    """Every group of the test on the resident path over several programs (COOP_TILE): tiles of at
    most 64 elements, one program each, a row's programs meeting at a barrier on a GPU (two
    launches in the interpreter)."""
    monkeypatch.setattr(gng, "COOP_TILE", 64)
    monkeypatch.setattr(gng, "RESIDENT_MAX", 0)


def _coop_config(cg, hw, rows, channels_last, c):
    """The launch config of a (cg, hw) group of a tensor of c channels on this device, which must be
    the cooperative resident path (several programs)."""
    cfg = gng._launch_config(cg, hw, rows, *((1, c) if channels_last else (hw, 1)),
                             gng._row_programs(torch.device(DEVICE)))
    assert cfg.resident and cfg.s > 1, cfg
    return cfg


def _reference(x, weight, bias, num_groups, residual, t, gelu, dy):
    """Eager GroupNormGELU in float64: output and grads of (x, weight, bias, residual)."""
    mod = GroupNormGELU(num_groups, x.shape[1], gelu=gelu).to(device=x.device, dtype=torch.float64)
    with torch.no_grad():
        mod.weight.copy_(weight)
        mod.bias.copy_(bias)
    x = x.detach().double().requires_grad_()
    r = residual.detach().double().requires_grad_() if residual is not None else None
    y = mod(x, residual=r, t=t)
    y.backward(dy.double())
    return y.detach(), x.grad, mod.weight.grad, mod.bias.grad, (r.grad if r is not None else None)


def _assert_close(actual, expected, tol, what):
    assert actual.shape == expected.shape, what
    err = (actual.double() - expected).abs().max().item()
    bound = tol * (1 + expected.abs().max().item())
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def _check(shape, num_groups, *, dtype=F32, w_dtype=None, channels_last=False, residual=True, t=True,
           gelu=True, seed=0, x_scale=2.0, x_shift=0.5):
    """Run the kernel forward + backward and compare everything with the float64 reference."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    w_dtype = w_dtype or dtype
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def make(*s, scale=1.0, shift=0.0, dt=dtype):
        return (torch.randn(*s, generator=g) * scale + shift).to(device=DEVICE, dtype=dt)

    x = make(n, c, h, w, scale=x_scale, shift=x_shift).contiguous(memory_format=fmt).requires_grad_()
    weight = make(c, scale=0.5, shift=1.0, dt=w_dtype).requires_grad_()
    bias = make(c, scale=0.5, dt=w_dtype).requires_grad_()
    res = make(n, c, h, w).contiguous(memory_format=fmt).requires_grad_() if residual else None
    steps = torch.randint(0, 1000, (n,), generator=g).to(DEVICE) if t else None
    dy = make(n, c, h, w).contiguous(memory_format=fmt)

    y = group_norm_gelu(x, weight, bias, num_groups, 1e-5, residual=res, t=steps, gelu=gelu)
    assert y.dtype == dtype and y.shape == x.shape
    assert y.is_contiguous(memory_format=fmt), "output keeps the input's memory layout"
    y.backward(dy)
    ref = _reference(x, weight, bias, num_groups, res, steps, gelu, dy)

    tol = TOL[dtype]
    _assert_close(y, ref[0], tol, "y")
    _assert_close(x.grad, ref[1], tol, "dx")
    # dweight/dbias sum over N*H*W products of rounded values: relative error grows like sqrt(count)
    _assert_close(weight.grad, ref[2], 4 * tol, "dweight")
    _assert_close(bias.grad, ref[3], 4 * tol, "dbias")
    assert x.grad.dtype == dtype and weight.grad.dtype == w_dtype and bias.grad.dtype == w_dtype
    if residual:
        _assert_close(res.grad, ref[4], tol, "dresidual")
        assert res.grad.dtype == dtype


# Every input dtype x both layouts on one shape (fp16/bf16 also with the fp32 weights of autocast).
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype,w_dtype", [(F32, F32), (F16, F16), (BF16, BF16), (F16, F32), (BF16, F32)],
                         ids=["fp32", "fp16", "bf16", "fp16-w32", "bf16-w32"])
def test_dtypes_and_layouts(dtype, w_dtype, channels_last, reduction):
    _check((3, 12, 7, 7), 4, dtype=dtype, w_dtype=w_dtype, channels_last=channels_last)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype,w_dtype", [(F32, F32), (F16, F16), (BF16, BF16), (F16, F32), (BF16, F32)],
                         ids=["fp32", "fp16", "bf16", "fp16-w32", "bf16-w32"])
def test_resident_dtypes_and_layouts(resident, dtype, w_dtype, channels_last):
    """The same checks on the resident kernels; groups of 3 x 49 padded to a 4 x 64 tile."""
    assert gng._launch_config(3, 49, 12, *((1, 12) if channels_last else (49, 1))).resident
    _check((3, 12, 7, 7), 4, dtype=dtype, w_dtype=w_dtype, channels_last=channels_last)


@pytest.mark.parametrize("dtype,w_dtype,channels_last", [(F32, F32, False), (F16, F16, True), (BF16, F32, False),
                                                           (BF16, BF16, True)],
                         ids=["fp32-nchw", "fp16-nhwc", "bf16-w32-nchw", "bf16-nhwc"])
def test_resident_coop_dtypes_and_layouts(coop, dtype, w_dtype, channels_last):
    """The same checks with each group held by several programs: 3 x 49 in tiles of 1 x 64 (NCHW, 3
    programs) or 4 x 16 (NHWC, 4 programs: masked channels and pixels); every dtype, each layout
    twice (the kernels are the resident path's, which the full grid above runs)."""
    assert _coop_config(3, 49, 12, channels_last, 12).s == (4 if channels_last else 3)
    _check((3, 12, 7, 7), 4, dtype=dtype, w_dtype=w_dtype, channels_last=channels_last)


def test_resident_coop_tiles_and_limits(monkeypatch):
    """COOP_TILE cuts a group the resident path does not take whole into tiles of at most that many
    elements, the contiguous axis first (the U-Net's 64 x 32 x 32 group: 32 programs of 2 x 1,024 in
    NCHW, of 64 x 32 in NHWC, each row of the dw/db table a pixel chunk); a group that needs more
    programs than may meet (``row_programs``) takes the split path; the resident path keeps the
    groups it holds whole; 0 is off; a bad value is refused naming it and what is allowed."""
    monkeypatch.setattr(gng, "COOP_TILE", 2048)
    monkeypatch.setattr(gng, "RESIDENT_MAX", 0)
    nchw, nhwc = gng._launch_config(64, 1024, 256, 1024, 1), gng._launch_config(64, 1024, 256, 1, 64)
    assert (nchw.resident, nchw.s, nchw.block_c, nchw.block_hw, nchw.hw_split) == (True, 32, 2, 1024, 1)
    assert (nhwc.resident, nhwc.s, nhwc.block_c, nhwc.block_hw, nhwc.hw_split) == (True, 32, 64, 32, 32)
    assert nchw.chunks == (2, 1024, 1, 32) and nchw.num_warps == 8 and "LANE" not in nchw.meta_bwd
    assert gng._launch_config(64, 1024, 256, 1024, 1, 32).resident  # 32 programs may meet
    assert not gng._launch_config(64, 1024, 256, 1024, 1, 31).resident  # they may not: split
    monkeypatch.setattr(gng, "RESIDENT_MAX", 16384)
    assert gng._launch_config(256, 64, 256, 64, 1).s == 1  # 8x8: whole, one program
    assert gng._launch_config(128, 256, 256, 256, 1).s == 16  # 16x16: 32,768 in 16 tiles
    monkeypatch.setattr(gng, "COOP_TILE", 0)
    assert not gng._launch_config(128, 256, 256, 256, 1).resident
    for value in (3, 32768, -2048):
        with pytest.raises(ValueError, match=f"coop={value}: must be 0 or a power of two up to 16384"):
            gng.launch_knob("coop", value)
    assert gng.parse_launch_settings("coop=4096+resident=16384") == {"coop": 4096, "resident": 16384}


def test_resident_coop_many_rows_and_the_most_programs_a_row_may_have(monkeypatch):
    """On a GPU: the U-Net's 64 x 32 x 32 groups at batch 256 (8,192 programs of 2 x 1,024, more than
    run at once: a program waits only for programs that have taken earlier tickets), and groups of
    exactly as many programs as may meet (a channel of 32 x 32 each). On the CPU, 32 programs a group
    and 12, at a size the interpreter runs."""
    most = gng._row_programs(torch.device(DEVICE)) or 12
    monkeypatch.setattr(gng, "RESIDENT_MAX", 0)
    big, tile = ((256, 64, 32, 32), 2048) if DEVICE == "cuda" else ((2, 32, 8, 8), 64)
    monkeypatch.setattr(gng, "COOP_TILE", tile)
    assert _coop_config(big[1], big[2] * big[3], big[0], False, big[1]).s == 32
    _check(big, 1, dtype=BF16, w_dtype=F32)
    monkeypatch.setattr(gng, "COOP_TILE", 1024 if DEVICE == "cuda" else 64)
    hw = 32 if DEVICE == "cuda" else 8
    assert _coop_config(most, hw * hw, 2, False, most).s == most
    _check((2, most, hw, hw), 1, dtype=BF16, w_dtype=F32, t=False)


def test_resident_coop_meets_in_one_launch_on_a_gpu_in_two_in_the_interpreter():
    """On a GPU a row's programs meet at a barrier within one launch (its counters zeroed per call),
    at most half the SMs of them a row; the interpreter, which runs programs one after another,
    runs the kernels in two stages instead, with no limit. S = 1 needs neither."""
    cfg = gng._Launch(2, 1024, 1, 32, 2, 1024, num_warps=8, lane=False, resident=True)
    stages, part, sync = gng._resident_stages(cfg, 5, 3, torch.device(DEVICE))
    assert part.numel() == 5 * 32 * 3 and sync.dtype == torch.int32 and sync.numel() == 6
    if DEVICE == "cuda":
        assert gng._programs_meet() and stages == (0,)
        assert gng._row_programs(torch.device(DEVICE)) == torch.cuda.get_device_properties(0).multi_processor_count // 2
    else:
        assert not gng._programs_meet() and stages == (1, 2)
        assert gng._row_programs(torch.device(DEVICE)) is None
    stages, part, sync = gng._resident_stages(cfg._replace(s=1), 5, 3, torch.device(DEVICE))
    assert stages == (0,) and part is None and sync.dtype == torch.int32  # a placeholder typed as the counters


# The four uses in the U-Net (and their mix) for every group count, fp32.
VARIANTS = {  # (residual, gelu, t)
    "gn-gelu": (False, True, False),  # inside a DoubleConv
    "res-gelu": (True, True, False),  # end of a residual DoubleConv
    "gn": (False, False, False),  # end of a DoubleConv
    "gn-time": (False, False, True),  # end of a Down/Up block
    "res-time": (True, False, True),
}


@triton.jit
def _cdf_pdf_probe(U, CDF, PDF, n, GELU: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    cdf, pdf = gng._normal_cdf_pdf(tl.load(U + offs, mask=mask, other=0.0), GELU)
    tl.store(CDF + offs, cdf, mask=mask)
    tl.store(PDF + offs, pdf, mask=mask)


def _cdf_pdf(u: torch.Tensor, gelu: int) -> tuple[torch.Tensor, torch.Tensor]:
    cdf, pdf = torch.empty_like(u), torch.empty_like(u)
    _cdf_pdf_probe[(triton.cdiv(u.numel(), 4096),)](u, cdf, pdf, u.numel(), GELU=gelu, BLOCK=4096)
    return cdf.double().cpu(), pdf.double().cpu()


def test_normal_cdf_and_pdf_against_the_standard_library():
    """The GELU's Phi and phi (``_normal_cdf_pdf``), the kernels' own and libdevice's erf, against
    Python's math.erfc in float64 on 28,001 points of [-14, 14] (phi is normal in fp32 up to 13):
    both are within 1e-6 in Phi, the GELU and its derivative; the kernels' own also keeps Phi's lower
    tail to a relative error that only the rounding of exp2's argument (u^2 / 2) grows, where 1 + erf
    cancels (libdevice's: 100 % wrong beyond u = -5.5). In the interpreter, whose float64 rsqrt and
    exp2 are exact (a GPU's float64 rsqrt is an approximation), the fit's own error shows: 1.6e-7."""
    u64 = torch.linspace(-14, 14, 28001, dtype=torch.float64)
    cdf_ref = torch.tensor([0.5 * math.erfc(-v / math.sqrt(2)) for v in u64.tolist()], dtype=torch.float64)
    pdf_ref = torch.exp(-u64 * u64 / 2) / math.sqrt(2 * math.pi)
    lower, normal = u64 <= 0, u64.abs() <= 13

    def rel(a, b, where):
        return ((a - b).abs() / b)[where].max().item()

    for gelu in (gng.GELU_ON.value, gng.GELU_LIBDEVICE.value):
        cdf, pdf = _cdf_pdf(u64.float().to(DEVICE), gelu)
        what = "own" if gelu == gng.GELU_ON.value else "libdevice"
        assert (cdf - cdf_ref).abs().max() <= 1e-6, what
        assert (u64 * cdf - u64 * cdf_ref).abs().max() <= 1e-6, what  # GELU
        assert (cdf + u64 * pdf - (cdf_ref + u64 * pdf_ref)).abs().max() <= 1e-6, what  # GELU'
        assert rel(pdf, pdf_ref, normal) <= 4e-5, what
    own, _ = _cdf_pdf(u64.float().to(DEVICE), gng.GELU_ON.value)
    libdevice, _ = _cdf_pdf(u64.float().to(DEVICE), gng.GELU_LIBDEVICE.value)
    assert rel(own, cdf_ref, lower & (u64 >= -5)) <= 4e-6
    assert rel(own, cdf_ref, lower & normal) <= 4e-5
    assert rel(libdevice, cdf_ref, lower & normal) > 0.5  # why the kernels have their own
    if DEVICE == "cpu":
        own64, pdf64 = _cdf_pdf(u64, gng.GELU_ON.value)
        assert rel(own64, cdf_ref, lower) <= 2e-7
        assert rel(pdf64, pdf_ref, normal) <= 1e-12
    special = torch.tensor([float("-inf"), float("inf"), float("nan"), 0.0])
    cdf, pdf = _cdf_pdf(special.to(DEVICE), gng.GELU_ON.value)
    assert cdf[:2].tolist() == [0.0, 1.0] and pdf[:2].tolist() == [0.0, 0.0]
    assert cdf[2].isnan() and pdf[2].isnan()
    # at 0, a GPU's approximate rsqrt and exp2 (2^-22 relative or so) may cost a few 1e-7
    assert abs(cdf[3].item() - 0.5) <= 5e-7 and abs(pdf[3].item() - 1 / math.sqrt(2 * math.pi)) <= 3e-7


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_libdevice_erf_knob(monkeypatch, dtype):
    """The libdevice_erf launch knob (the GELU of every GPU run before 2026-11-28) passes the same
    check against eager as the kernels' own Phi, and is a different computation (fp32 outputs differ)."""
    outputs = []
    for libdevice in (False, True):
        monkeypatch.setattr(gng, "_LIBDEVICE_ERF", libdevice)
        _check((3, 12, 5, 7), 4, dtype=dtype)
        x = torch.randn(3, 12, 5, 7, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
        outputs.append(group_norm_gelu(x, torch.ones(12, device=DEVICE), torch.zeros(12, device=DEVICE), 4))
    if dtype == F32:
        assert not torch.equal(*outputs)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("num_groups", [1, 4, 20])
def test_variants_and_groups(num_groups, variant):
    residual, gelu, t = VARIANTS[variant]
    _check((2, 20, 5, 5), num_groups, residual=residual, gelu=gelu, t=t)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_resident_variants(resident, variant):
    residual, gelu, t = VARIANTS[variant]
    _check((2, 20, 5, 5), 1, residual=residual, gelu=gelu, t=t)
    _check((2, 20, 5, 5), 4, residual=residual, gelu=gelu, t=t, channels_last=True)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_resident_coop_variants(coop, variant):
    """The variants with a residual in four groups of 5 x 25, 4 programs of 8 x 8 each (NHWC); the
    others in one group of 20 x 25, 10 programs of 2 x 32 (NCHW)."""
    residual, gelu, t = VARIANTS[variant]
    if residual:
        assert _coop_config(5, 25, 8, True, 20).s == 4
        _check((2, 20, 5, 5), 4, residual=residual, gelu=gelu, t=t, channels_last=True)
    else:
        assert _coop_config(20, 25, 2, False, 20).s == 10
        _check((2, 20, 5, 5), 1, residual=residual, gelu=gelu, t=t)


def test_backward_accumulates_per_lane_over_channels_last_groups(monkeypatch):
    """Where the dw/db sums run across a tile's strided axis (channels_last), the backward's
    reduction pass accumulates per lane by default; NCHW keeps _LANE_ACCUMULATE's choice, and so
    does the forward in both layouts."""
    monkeypatch.setattr(gng, "_LANE_ACCUMULATE", False)
    monkeypatch.setattr(gng, "_LANE_BWD_CHANNELS_LAST", True)  # the default
    nhwc, nchw = gng._launch_config(64, 1024, 256, 1, 64), gng._launch_config(64, 1024, 256, 1024, 1)
    assert (nhwc.lane, nhwc.lane_bwd, nhwc.meta_bwd["LANE"], nhwc.meta["LANE"]) == (False, True, True, False)
    assert (nchw.lane, nchw.lane_bwd) == (False, False)
    monkeypatch.setattr(gng, "_LANE_BWD_CHANNELS_LAST", False)
    assert not gng._launch_config(64, 1024, 256, 1, 64).lane_bwd


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("cg,hw,rows", [(64, 1024, 256), (128, 256, 256), (64, 1024, 1), (3, 4900, 2)])
def test_split_programs_share_the_work_evenly(cg, hw, rows, channels_last):
    """Along each axis the largest chunk (the critical path) is as small as its number of chunks
    allows: ceil(tiles / chunks) tiles. The model's 64-channel 32x32 group was once cut into 30, 30
    and 4 channels; now 22, 22 and 20."""
    cfg = gng._launch_config(cg, hw, rows, *((1, cg) if channels_last else (hw, 1)))
    assert cfg.s > 1
    for size, chunk, block in ((cg, cfg.c_chunk, cfg.block_c), (hw, cfg.hw_chunk, cfg.block_hw)):
        tiles, chunks = -(-size // block), -(-size // chunk)
        assert chunk % block == 0 and chunk // block == -(-tiles // chunks)
    assert cfg.s == -(-cg // cfg.c_chunk) * cfg.hw_split
    if (cg, hw, rows, channels_last) == (64, 1024, 256, False):
        assert cfg.c_chunk == 22 and cfg.s == 3


def test_resident_only_up_to_its_tile_budget(monkeypatch):
    """RESIDENT_MAX counts the padded tile: 12 x 49 -> 16 x 64 = 1,024 fits 1,024, 12 x 65 -> 16 x
    128 does not (it takes the other paths, still correct); never above _RESIDENT_LIMIT (16,384:
    registers); 0 turns the path off."""
    monkeypatch.setattr(gng, "RESIDENT_MAX", 1024)
    assert gng._launch_config(12, 49, 2, 49, 1).resident
    _check((2, 12, 7, 7), 1)  # exactly at the budget
    assert not gng._launch_config(12, 65, 2, 65, 1).resident
    _check((2, 12, 5, 13), 1)
    monkeypatch.setattr(gng, "RESIDENT_MAX", 1 << 20)
    assert gng._launch_config(64, 256, 2, 256, 1).resident  # 16,384
    assert not gng._launch_config(128, 256, 2, 256, 1).resident  # 32,768: over the limit
    monkeypatch.setattr(gng, "RESIDENT_MAX", 0)
    assert not gng._launch_config(1, 1, 2, 1, 1).resident


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("num_groups", [1, 4])
def test_forced_split(force_split, num_groups, channels_last, reduction):
    n, c, h, w = 3, 12, 7, 7
    cfg = gng._launch_config(c // num_groups, h * w, n * num_groups, *( (1, c) if channels_last else (h * w, 1)))
    assert cfg.s > 1
    _check((n, c, h, w), num_groups, channels_last=channels_last)


def test_forced_split_multi_tile(force_split, monkeypatch, reduction):
    """Split programs that each walk several tiles along both axes."""
    monkeypatch.setattr(gng, "_TILE", 16)
    monkeypatch.setattr(gng, "ELEMS_PER_PROGRAM", 256)
    cfg = gng._launch_config(12, 49, 3, 49, 1)
    assert cfg.s > 1 and cfg.c_chunk > cfg.block_c and cfg.hw_chunk > cfg.block_hw
    _check((3, 12, 7, 7), 1)
    _check((3, 12, 7, 7), 1, channels_last=True, gelu=False)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_large_group_takes_split_path(dtype, reduction):
    """With the default settings a 12x24x24 = 6912-element group is split over several programs."""
    assert gng._launch_config(12, 24 * 24, 2, 24 * 24, 1).s > 1
    _check((2, 12, 24, 24), 1, dtype=dtype, w_dtype=F32)


@pytest.mark.parametrize("shape,num_groups", [((2, 3, 33, 33), 1), ((1, 2, 45, 47), 2)], ids=["c-loop", "hw-loop"])
def test_single_program_several_tiles(shape, num_groups, reduction):
    """Groups under the split threshold but over one tile: one program loops over channel blocks
    (3 x 1089) or pixel blocks (1 x 2115)."""
    n, c, h, w = shape
    cfg = gng._launch_config(c // num_groups, h * w, n * num_groups, h * w, 1)
    assert cfg.s == 1 and (cfg.block_c < c // num_groups or cfg.block_hw < h * w)
    _check(shape, num_groups, residual=False)


@pytest.mark.parametrize("dtype,w_dtype,channels_last,split", [
    (F32, F32, False, False), (F32, F32, True, True), (F16, F16, True, False), (BF16, F32, False, True)],
    ids=["fp32-nchw-program-per-group", "fp32-nhwc-split", "fp16-nhwc-program-per-group", "bf16-w32-nchw-split"])
def test_persistent_programs_stride_over_rows(monkeypatch, dtype, w_dtype, channels_last, split):
    """PERSISTENT: 3 programs for 20 (sample, group) rows (not a divisor: the last program does 6), each
    kernel looping over the rows its program id strides to; every output and gradient matches."""
    monkeypatch.setattr(gng, "_multiprocessors", lambda device: 1)  # on a GPU too: 3 programs in all
    monkeypatch.setattr(gng, "PERSISTENT", 3)
    if split:
        monkeypatch.setattr(gng, "SPLIT_THRESHOLD", 0)
        monkeypatch.setattr(gng, "ELEMS_PER_PROGRAM", 32)
    assert gng._grid(20, 2, torch.device(DEVICE)) == ((3, 2), {"PERSIST": True})
    assert gng._grid(2, 1, torch.device(DEVICE))[0] == (2, 1)  # never more programs than rows
    assert (gng._launch_config(3, 49, 20, 49, 1).s > 1) == split
    _check((5, 12, 7, 7), 4, dtype=dtype, w_dtype=w_dtype, channels_last=channels_last)


def test_environment_sets_the_defaults_checked():
    """FASTDDPM_GN_* set a process's defaults; a bad value stops the import with one line naming the
    variable, the value and what is allowed."""
    code = "from fastddpm.kernels import groupnorm_gelu as g; print(g.current_launch_settings())"
    env = dict(FASTDDPM_GN_TILE="8192", FASTDDPM_GN_PERSISTENT="2", FASTDDPM_GN_LANE_ACCUMULATE="1",
               FASTDDPM_GN_ELEMS_PER_PROGRAM="512")
    out = _fresh_process(code, **env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "'tile': 8192" in out.stdout and "'persistent': 2" in out.stdout and "'lane': True" in out.stdout
    assert "'elems': 512" in out.stdout
    out = _fresh_process(code, **{**env, "FASTDDPM_GN_TILE": "3000"})
    assert out.returncode != 0
    assert "FASTDDPM_GN_TILE='3000': GroupNorm launch knob tile='3000': must be a power of two" in out.stderr


def test_launch_settings_set_and_restore(monkeypatch):
    """launch_settings sets the knobs by name for its block and restores them after, on error too;
    a bad name or value is refused before anything changes, naming it and what is allowed."""
    before = gng.current_launch_settings()
    with gng.launch_settings(tile=4096, persistent=2, lane=1):
        assert (gng._TILE, gng.PERSISTENT, gng._LANE_ACCUMULATE) == (4096, 2, True)
    assert gng.current_launch_settings() == before
    with pytest.raises(RuntimeError), gng.launch_settings(split=0):
        assert gng.SPLIT_THRESHOLD == 0
        raise RuntimeError("inside")
    assert gng.current_launch_settings() == before
    for knobs, message in [(dict(tiles=4096), "unknown GroupNorm launch knob 'tiles'"),
                           (dict(tile=3000), "tile=3000: must be a power of two"),
                           (dict(threads="eight"), "threads='eight': must be a power of two"),
                           (dict(programs=0), "programs=0: must be a positive integer"),
                           (dict(persistent=-1), "persistent=-1: must be an integer >= 0"),
                           (dict(lane=2), "lane=2: must be 0 or 1"),
                           (dict(tile=2048.5), "tile=2048.5: must be a power of two"),
                           (dict(resident=32768), "resident=32768: must be an integer from 0 to 16384")]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            with gng.launch_settings(**{"persistent": 1, **knobs}):
                pass
        assert gng.current_launch_settings() == before
    assert gng.parse_launch_settings("tile=8192+ persistent=2+lane_bwd_nhwc=0") == \
        {"tile": 8192, "persistent": 2, "lane_bwd_nhwc": False}
    with pytest.raises(ValueError, match="'tile': expected knob=value"):
        gng.parse_launch_settings("tile")
    with pytest.raises(ValueError, match="split='x': must be an integer >= 0"):
        gng.parse_launch_settings("split=x")
    with pytest.raises(ValueError, match="'tile=8\\+tile=16': tile given twice"):
        gng.parse_launch_settings("tile=8+tile=16")
    monkeypatch.setattr(gng, "PERSISTENT", 0)
    assert gng._grid(20, 2, torch.device(DEVICE)) == ((20, 2), {"PERSIST": False})  # the one-row kernels


@pytest.mark.parametrize("path", ["force_split", "coop"], ids=["split", "resident-coop"])
def test_deterministic_backward(request, path):
    """No atomics in the sums: two backward passes give bit-identical gradients (the resident
    programs of a row take their tickets in any order, and sum their partials in program order)."""
    request.getfixturevalue(path)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 12, 7, 7, generator=g).to(DEVICE).requires_grad_()
    w = torch.randn(12, generator=g).to(DEVICE).requires_grad_()
    b = torch.randn(12, generator=g).to(DEVICE).requires_grad_()
    dy = torch.randn(2, 12, 7, 7, generator=g).to(DEVICE)
    grads = []
    for _ in range(2):
        y = group_norm_gelu(x, w, b, 1)
        grads.append(torch.autograd.grad(y, (x, w, b), dy))
    for a, b_ in zip(*grads):
        assert torch.equal(a, b_)


@pytest.mark.parametrize("view", ["w-strided", "c-strided"])
def test_other_strides(view):
    """Non-dense inputs, a residual in the other layout and an expanded (stride-0) grad."""
    g = torch.Generator().manual_seed(2)
    if view == "w-strided":  # no flat pixel axis: copied
        x = torch.randn(2, 6, 5, 10, generator=g).to(DEVICE)[..., ::2]
    else:  # a flat pixel axis, but outputs cannot share these strides: copied too
        x = torch.randn(2, 12, 5, 5, generator=g).to(DEVICE)[:, ::2]
    x.requires_grad_()
    w = torch.rand(6, generator=g).to(DEVICE).requires_grad_()
    b = torch.rand(6, generator=g).to(DEVICE).requires_grad_()
    r = torch.randn(2, 6, 5, 5, generator=g).to(DEVICE).contiguous(memory_format=torch.channels_last)
    r.requires_grad_()
    y = group_norm_gelu(x, w, b, 2, residual=r)
    y.sum().backward()  # dy is an expanded scalar
    ref = _reference(x, w, b, 2, r, None, True, torch.ones_like(y))
    for got, want, what in zip((y, x.grad, w.grad, b.grad, r.grad), ref, ("y", "dx", "dw", "db", "dres")):
        _assert_close(got, want, TOL[F32], what)


def test_module_switch_and_opcheck():
    """GroupNormGELU(kernels="triton") calls the op; the op's fake/autograd registrations pass
    torch.library.opcheck."""
    mod = GroupNormGELU(2, 6).to(DEVICE)
    x = torch.randn(2, 6, 3, 5, device=DEVICE)
    t = torch.tensor([3, 999], device=DEVICE)
    r = torch.randn_like(x)
    ref = mod(x, residual=r, t=t)
    mod.kernels = "triton"
    torch.testing.assert_close(mod(x, residual=r, t=t), ref, atol=1e-5, rtol=1e-5)
    args = (x.requires_grad_(), mod.weight, mod.bias, 2, 1e-5, r.requires_grad_(), t, True)
    torch.library.opcheck(torch.ops.fastddpm.group_norm_gelu.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_opcheck_on_the_strides_flexible_layout_lets_through():
    """Tagged flexible_layout, the ops may get any strides under torch.compile: their fake (meta)
    versions must still give the real outputs' strides, for channels_last x with an NCHW residual, a
    channel slice of a wider tensor, strided weights, and the backward op with dy in another layout."""
    assert torch.Tag.flexible_layout in torch.ops.fastddpm.group_norm_gelu.default.tags
    assert torch.Tag.flexible_layout in torch.ops.fastddpm.group_norm_gelu_backward.default.tags
    g = torch.Generator().manual_seed(4)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE)

    nhwc = rnd(2, 6, 3, 5).contiguous(memory_format=torch.channels_last)
    sliced = rnd(2, 10, 3, 5)[:, 2:8]  # neither NCHW- nor channels_last-contiguous
    w, b = rnd(12)[::2], rnd(6)  # a strided weight
    t = torch.tensor([3, 999], device=DEVICE)
    utils = ("test_schema", "test_faketensor")
    for x, r in ((nhwc, rnd(2, 6, 3, 5)), (sliced, None), (nhwc, nhwc.clone())):
        torch.library.opcheck(torch.ops.fastddpm.group_norm_gelu.default, (x, w, b, 2, 1e-5, r, t, True),
                              test_utils=utils)
        y, mean, rstd = torch.ops.fastddpm.group_norm_gelu.default(x, w, b, 2, 1e-5, r, t, True)
        ref = GroupNormGELU(2, 6).to(DEVICE)
        with torch.no_grad():
            ref.weight.copy_(w)
            ref.bias.copy_(b)
        _assert_close(y, ref(x, residual=r, t=t).double(), TOL[F32], "y")
        dy = rnd(2, 6, 3, 5)  # NCHW, whatever x's layout
        torch.library.opcheck(torch.ops.fastddpm.group_norm_gelu_backward.default,
                              (dy, x, w, b, r, mean, rstd, 2, True), test_utils=utils)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("path,lane", [("one-program", False), ("one-program", True), ("split", False),
                                       ("split", True), ("resident", False), ("resident-coop", False)],
                         ids=["one-program-tile-reduce", "one-program-lane", "split-tile-reduce", "split-lane",
                              "resident", "resident-coop"])
def test_statistics_of_a_mean_far_above_the_spread(monkeypatch, path, lane, channels_last):
    """x = 100 + 0.1 * noise: naive fp32 sums of x and x^2 lose the variance (100^2 * 2^-24 is 6e-4 of
    a 1e-2 variance at every add), and a running mean of x rounds at x's scale at every merge; both
    reductions on the one-program and split paths (tiles of 32 elements: each program sums several),
    and the resident path (which has one, over one program or several), keep every output and
    gradient within fp32's tolerance of the float64 reference. The interpreter's sums are numpy's
    pairwise ones, accurate enough to hide a plain fp32 sum of x: the resident path's, before its
    mean was corrected, passed here and failed natively (an H200, 2026-11-28, NHWC)."""
    _use_reduction(monkeypatch, lane)
    monkeypatch.setattr(gng, "_TILE", 32)
    if path == "split":
        monkeypatch.setattr(gng, "SPLIT_THRESHOLD", 0)
        monkeypatch.setattr(gng, "ELEMS_PER_PROGRAM", 128)
    if path == "resident":  # over the registers: the mean corrected by the centred values' own, centred squares
        monkeypatch.setattr(gng, "RESIDENT_MAX", 1 << 16)
    if path == "resident-coop":  # the same a tile, the tiles' partials combined about the first one's mean
        monkeypatch.setattr(gng, "COOP_TILE", 64)  # 12 x 49 in 12 programs (NCHW) or 13 (NHWC)
        monkeypatch.setattr(gng, "RESIDENT_MAX", 0)
    _check((2, 12, 7, 7), 1, channels_last=channels_last, x_scale=0.1, x_shift=100.0)
