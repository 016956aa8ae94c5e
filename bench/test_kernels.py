"""The fused kernels alone, at the U-Net's shapes: GroupNorm+GELU forward and forward+backward, with
and without the residual, with the time-encoding epilogue; the DDPM reverse step. eager = the
model's torch path (``GroupNormGELU`` with kernels="torch"; ``Diffusion.reverse_step`` + randn);
compiled = that under torch.compile; fast = the Triton kernel. Timed as CUDA-graph replays over
inputs that do not fit in L2 (bench.common.repeated); ``roofline`` = compulsory bytes / time / the
measured copy bandwidth. Guard: outputs (and gradients) against eager's on the same input."""
import pytest
import torch

from bench import common as C

# variant: (residual, time encoding, backward); the model's uses: norm1 of every DoubleConv (fwd),
# the end of a residual DoubleConv (res), the end of a Down/Up block (temb: GN + t, no GELU).
# Run order (a run cut short by its time cap keeps what comes first): the reverse step (one case
# per implementation), then forward+backward (the training kernel), then the forward variants.
GN_VARIANTS = {"fwd+bwd": (False, False, True), "fwd": (False, False, False), "fwd+bwd+res": (True, False, True),
               "fwd+res": (True, False, False), "fwd+temb": (False, True, False)}
CASES = [dict(kernel="reverse_step", variant="philox", shape=C.S["step_shape"][1:], dtype=d, impl=i)
         for d in C.DTYPE_ORDER for i in C.IMPLS]
CASES += [dict(kernel="groupnorm_gelu", variant=v, shape=s, dtype=d, impl=i)
          for d in C.DTYPE_ORDER for v in GN_VARIANTS
          for s in (C.S["gn_shapes"] if v in ("fwd", "fwd+bwd") else C.S["gn_variant_shapes"]) for i in C.IMPLS]


def gn_case(variant, shape, dtype, impl, layout="nchw"):
    """The case's (fn, calls, timing mode, bytes moved, elements, guard); ``layout`` nhwc makes every
    input channels_last (bench.tune_groupnorm's layout axis; the bench's own cases are NCHW)."""
    from fastddpm.model import GroupNormGELU

    res, temb, bwd = GN_VARIANTS[variant]
    dt, full = C.DTYPES[dtype], (C.S["kernel_batch"], *shape)
    torch.manual_seed(0)
    mod = GroupNormGELU(1, shape[0], gelu=not temb).to(C.DEVICE, dt)
    with torch.no_grad():
        mod.weight.normal_(1.0, 0.1)
        mod.bias.normal_(0.0, 0.1)
    mod.kernels = "triton" if impl == "fast" else "torch"
    f = torch.compile(mod) if impl == "compiled" else mod

    def make_input(i):
        g = torch.Generator(C.DEVICE).manual_seed(i)
        fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format

        def rnd():
            return torch.randn(full, generator=g, device=C.DEVICE, dtype=dt).contiguous(memory_format=fmt)

        return dict(x=rnd().requires_grad_(bwd), r=rnd().requires_grad_(bwd) if res else None,
                    t=torch.randint(0, 1000, (full[0],), generator=g, device=C.DEVICE) if temb else None,
                    dy=rnd() if bwd else None)

    def op(inp, fn=f):
        y = fn(inp["x"], residual=inp["r"], t=inp["t"])
        if not bwd:
            return y
        wrt = [inp["x"], mod.weight, mod.bias] + ([inp["r"]] if res else [])
        return torch.autograd.grad(y, wrt, inp["dy"])

    def eager_op(inp):
        kernels, mod.kernels = mod.kernels, "torch"
        try:
            return op(inp, mod)
        finally:
            mod.kernels = kernels

    n, e = torch.Size(full).numel(), dt.itemsize
    moved = n * e * ((5 + 3 * res) if bwd else (2 + res))  # x, r, dy read; y, dx, dr written
    fn, calls, mode, first = C.repeated(op, make_input, n * e * (2 + res + bwd))
    return fn, calls, mode, moved, n, lambda: C.compare(op(first), eager_op(first), dtype, f"{variant} vs eager")


def step_case(shape, dtype, impl):
    from fastddpm.diffusion import Diffusion
    from fastddpm.kernels.reverse_step import reverse_step, reverse_step_noise

    dt, full, t = C.DTYPES[dtype], (C.S["step_shape"][0], *shape), 500
    diffusion = Diffusion(1000, device=C.DEVICE)
    tables = diffusion.reverse_tables(C.DEVICE)
    t_dev, seed_dev = torch.tensor([t], device=C.DEVICE), torch.tensor([7], device=C.DEVICE)

    def eager(x, eps):  # the eager sampling loop's step: noise drawn, then eq. 5
        return diffusion.reverse_step(x, t, eps, torch.randn(x.shape, device=x.device))

    fns = {"eager": eager, "compiled": torch.compile(eager),
           "fast": lambda x, eps: reverse_step(x, eps, t_dev, seed_dev, **tables)}

    def make_input(i):
        g = torch.Generator(C.DEVICE).manual_seed(i)
        return tuple(torch.randn(full, generator=g, device=C.DEVICE, dtype=dt) for _ in range(2))

    def check():
        x, eps = first
        out = fns[impl](x, eps).float()
        if impl == "fast":  # exact: eq. 5 in torch with the kernel's own z
            z = reverse_step_noise(full, t_dev, seed_dev, device=C.DEVICE)
            return C.compare(out, diffusion.reverse_step(x, t, eps, z), dtype, "reverse step vs eq. 5")
        # compiled draws its own z: what it adds to eq. 5's mean must be sigma_t * N(0, 1)
        z = (out - diffusion.reverse_step(x, t, eps, None)) / diffusion.betas[t].sqrt().item()
        tol = 6 / z.numel() ** 0.5 + C.KERNEL_TOL[dtype]
        C.guard("reverse step noise mean", abs(z.mean().item()), tol)
        return C.guard("reverse step noise |std - 1|", abs(z.std().item() - 1), tol)

    n, e = torch.Size(full).numel(), dt.itemsize
    fn, calls, mode, first = C.repeated(lambda inp: fns[impl](*inp), make_input, 2 * n * e)
    return fn, calls, mode, 3 * n * e, n, check  # x, eps read; x_{t-1} written


def build(kernel, variant, shape, dtype, impl):
    if kernel == "groupnorm_gelu":
        fn, calls, mode, moved, n, check = gn_case(variant, shape, dtype, impl)
    else:
        fn, calls, mode, moved, n, check = step_case(shape, dtype, impl)
    batch = C.S["step_shape"][0] if kernel == "reverse_step" else C.S["kernel_batch"]
    return C.Case(kernel, impl, dtype, fn=fn, calls=calls, items=n, unit="elements", bytes=moved,
                  check=None if impl == "eager" else check, rounds=C.S["kernel_rounds"], warmup=C.S["warmup"],
                  info=dict(variant=variant, shape=[batch, *shape], batch=batch, timing=mode),
                  group_norm_kernels=kernel == "groupnorm_gelu" and impl == "fast")


@pytest.mark.parametrize("params", CASES, ids=C.case_id)
def test_kernels(benchmark, params):
    C.run(benchmark, lambda: build(**params))
