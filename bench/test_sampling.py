"""Sampling: ``fastddpm.sample`` over ``steps`` reverse steps (network + eq. 5 each) of a batch,
per engine and dtype, in image-steps/s; a second, shorter call separates the per-step cost from
the per-call cost (compilation excluded, CUDA-graph capture included). ``diffusers``: its
DDPMScheduler (same linear schedule, sigma_t^2 = beta_t) driving our eager model, where importable.
The ``-nhwc`` engines run the network in channels_last (``sample(channels_last=True)``: weights and
inputs), where cuDNN's convolutions need no NCHW<->NHWC transposes (3.04 of 13.4 ms of an H100
training step with our kernels, bench/results/2026-11-27-h100-80gb-hbm3-profile-fast.json).
Guard: the images against eager's (NCHW) for the same seed and noise stream (the fast engine draws
the fused kernel's Philox noise, so its reference is the eager engine fed that stream)."""
import pytest
import torch

from bench import common as C

# FASTDDPM_BENCH_SAMPLE_IMPLS picks the non-eager engines (default: compiled, fast, diffusers; also
# compiled-nhwc, fast-nhwc); a fast engine may carry GroupNorm launch settings, e.g.
# "fast-nhwc@tile=8192+persistent=2" (C.split_impl).
PATHS = {"compiled": ("compiled", False), "fast": ("fast", False), "diffusers": ("diffusers", False),
         "compiled-nhwc": ("compiled", True), "fast-nhwc": ("fast", True)}  # bench path -> (engine, channels_last)
TRITON_PATHS = tuple(i for i, (engine, _) in PATHS.items() if engine == "fast")  # our kernels run there
IMPLS = C.impls_from_env("FASTDDPM_BENCH_SAMPLE_IMPLS", ("compiled", "fast", "diffusers"), tuple(PATHS),
                         TRITON_PATHS)
CASES = C.grid(("eager",) + IMPLS, TRITON_PATHS)


def network():
    from fastddpm.model import UNet
    from fastddpm.config import PRESETS

    torch.manual_seed(0)
    return UNet(PRESETS[C.S["preset"]], kernels="torch").to(C.DEVICE).eval()


def ours(net, dtype, engine, steps, channels_last=False, **kw):
    from fastddpm.sampling import sample

    b = C.S["sample_batch"]
    return lambda: sample(net, b, T=steps, batch_size=b, device=C.DEVICE, dtype=dtype, seed=0, progress=False,
                          engine=engine, channels_last=channels_last, **kw)


def diffusers_loop(net, dtype, steps):
    try:
        from diffusers import DDPMScheduler
    except Exception as e:  # noqa: BLE001 - not installed, or broken against this torch
        raise C.Unavailable(f"diffusers is not importable ({type(e).__name__})")
    from fastddpm.sampling import autocast, to_uint8

    sched = DDPMScheduler(num_train_timesteps=steps, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                          variance_type="fixed_large", clip_sample=False)
    sched.set_timesteps(steps)
    b, dt = C.S["sample_batch"], C.DTYPES[dtype]

    @torch.no_grad()
    def loop():  # what a diffusers user writes; x_T and z from one generator, as our eager loop
        gen = torch.Generator(C.DEVICE).manual_seed(0)
        x = torch.randn((b, 3, 32, 32), generator=gen, device=C.DEVICE)
        for t in sched.timesteps:
            with autocast(C.DEVICE, dt):
                eps = net(x, torch.full((b,), int(t), device=C.DEVICE, dtype=torch.long)).float()
            x = sched.step(eps, t, x, generator=gen).prev_sample
        return to_uint8(x).cpu()
    return loop


def build(dtype, impl):
    b, steps, probe_steps = C.S["sample_batch"], C.S["sample_steps"], C.S["sample_probe_steps"]
    net = network()
    # its launch settings are in force around the whole case (C.run)
    engine, channels_last = ("eager", False) if impl == "eager" else PATHS[C.split_impl(impl)[0]]
    if engine == "diffusers":
        fn, probe = diffusers_loop(net, dtype, steps), diffusers_loop(net, dtype, probe_steps)
    else:
        fn, probe = (ours(net, dtype, engine, n, channels_last) for n in (steps, probe_steps))
    noise = "philox" if engine == "fast" else "torch"

    def eager_images():
        return ours(network(), dtype, "eager", steps, noise=noise)()

    if impl == "eager":
        C.reference(("sample", dtype, noise), fn)
        check = None
    else:
        def check():
            ref = C.reference(("sample", dtype, noise), eager_images)
            diff = (fn().float() - ref.float()).abs().mean().item()
            return C.guard(f"mean |images - eager's| ({dtype}, {noise} noise), grey levels", diff,
                           C.SAMPLE_TOL[dtype])
    return C.Case(
        "sampling", impl, dtype, fn=C.synced(fn), items=b * steps, unit="image-steps",
        flops=C.model_flops(net.base_channels, False) * b * steps, check=check, probe=C.synced(probe),
        probe_items=b * probe_steps, rounds=C.S["sample_rounds"], warmup=0,  # the guard/reference call warmed it
        info=dict(batch=b, steps=steps, preset=C.S["preset"], noise=noise, layout="nhwc" if channels_last else "nchw"),
        group_norm_kernels=engine == "fast")


@pytest.mark.parametrize("params", CASES, ids=C.case_id)
def test_sampling(benchmark, params):
    C.run(benchmark, lambda: build(**params), impl=params["impl"])
