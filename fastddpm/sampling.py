"""Sampling: the reverse chain from x_T ~ N(0, I) with the paper's sampler (eq. 5, all T steps) or a
few-step one (DDIM; DPM-Solver++(2M)). ``fastddpm.sample`` is ``sample`` here; ``python -m
fastddpm.sample`` runs ``main``.

``sample(model_or_checkpoint, n)`` is deterministic for a seed and independent of the batch size:
x_T and every step's noise z are drawn for all n images at once (from one generator seeded by
``seed``, or from the fused kernel's Philox stream keyed by (seed, t, element)), and the network is
evaluated batch by batch in between.
"""
from __future__ import annotations

import contextlib
import copy
import time

import torch

from fastddpm.config import DTYPES
from fastddpm.diffusion import Diffusion, LinearStep, _clipped
from fastddpm.errors import ArgumentParser, UsageError
from fastddpm.progress import progress_bar, progress_enabled

ENGINES = ("auto", "eager", "compiled", "fast")
SAMPLERS = ("ddpm", "ddim", "dpm++")
NOISES = ("auto", "torch", "philox")
DEFAULT_STEPS = {"ddim": 50, "dpm++": 20}
# Images per network call at most, by device: on CUDA the batch the bench measured (bench/results/
# 2026-11-26-h200.json, sampling at batch 2,560); n is split evenly into the fewest such chunks.
MAX_BATCH = {"cuda": 2560, "cpu": 256}


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype not in DTYPES:
        raise UsageError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision where asked for; fp32 runs plain."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 images in [0, 255]."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def chunk_size(n: int, batch_size: int | None, device: torch.device) -> int:
    """Images per network call: ``batch_size`` where given, else ``n`` split evenly into the fewest
    chunks of at most MAX_BATCH[device] (5,120 on CUDA: 2 x 2,560). The CUDA graph always runs whole
    chunks, so even chunks waste less than one image per chunk instead of most of a batch."""
    if batch_size:
        return min(batch_size, n)
    cap = MAX_BATCH.get(device.type, MAX_BATCH["cpu"])
    return -(-n // -(-n // cap))


def auto_engine(device: torch.device, dtype: torch.dtype, triton_ok: bool) -> tuple[str, str]:
    """(engine, why) for engine="auto": on CUDA the engine that sampled fastest in that dtype on this
    kind of card (``fastddpm.measured``), the compiled one where Triton is missing; elsewhere the
    eager loop (no compilation to wait for)."""
    if device.type != "cuda":
        return "eager", "not CUDA: no compilation to wait for"
    from fastddpm.config import dtype_name
    from fastddpm.measured import choice_for

    engine, why = choice_for(device, dtype_name(dtype))
    if engine == "fast" and not triton_ok:
        return "compiled", f"Triton is unavailable here, so not the fast engine that {why}"
    return engine, why


def _named(key: str, value, cli: bool) -> str:
    """How an error names what was given: ``steps=0`` from Python, ``--steps 0`` from a command."""
    return f"--{key.replace('_', '-')} {value}" if cli else f"{key}={value!r}"


def check_arguments(T: int, *, n, batch_size=None, sampler="ddpm", steps=None, eta=None, engine="auto",
                    noise="auto", seed=0, trajectory_at=None, clip_x0=False, channels_last=None,
                    cli: bool = False) -> None:
    """Every sampling argument against what is allowed; a UsageError (a ValueError) naming the value given."""
    def bad(key, value, allowed):
        return UsageError(f"{_named(key, value, cli)}: {allowed}")

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    if not is_int(n) or n < 1:
        raise bad("n", n, "the number of images must be a positive integer")
    if batch_size is not None and (not is_int(batch_size) or batch_size < 1):
        raise bad("batch_size", batch_size, "images per network call must be a positive integer (or None: "
                                            "fill the device)")
    if sampler not in SAMPLERS:
        raise bad("sampler", sampler, f"choose one of {', '.join(SAMPLERS)}")
    if engine not in ENGINES:
        raise bad("engine", engine, f"choose one of {', '.join(ENGINES)}")
    if noise not in NOISES:
        raise bad("noise", noise, f"choose one of {', '.join(NOISES)}")
    if not is_int(seed) or not 0 <= seed < 2 ** 63:
        raise bad("seed", seed, "must be an integer in [0, 2**63)")
    if steps is not None:
        if sampler == "ddpm" and steps != T:
            raise bad("steps", steps, f"the ddpm sampler runs all T={T} steps of the model; for fewer choose "
                                      "the ddim or dpm++ sampler")
        if not is_int(steps) or not 1 <= steps <= T:
            raise bad("steps", steps, f"must be an integer between 1 and the model's T={T}")
    if eta is not None:
        # Above 1 a step's noise variance sigma^2 can exceed 1 - alpha_bar_{t-1}, all the variance x_{t-1} may
        # hold: the update's direction term is then clamped to 0 and the noise alone overshoots.
        if not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
            raise bad("eta", eta, "the DDIM noise scale must be a number in [0, 1] (0: deterministic, 1: DDPM-like)")
        if sampler != "ddim" and eta != 0:
            raise bad("eta", eta, f"applies to the ddim sampler only (sampler is {sampler})")
    if not isinstance(clip_x0, bool):
        raise bad("clip_x0", clip_x0, "must be True or False")
    if channels_last is not None and not isinstance(channels_last, bool):
        raise bad("channels_last", channels_last, "must be True (NHWC), False (NCHW) or None (auto)")
    for t in trajectory_at or ():
        if not is_int(t) or not 0 <= t < T:
            raise bad("trajectory_at", t, f"step indices must be integers in [0, T={T})")
    # last: a value given is named before a default's consequence; else Diffusion.plan refuses it, a traceback
    if steps is None and DEFAULT_STEPS.get(sampler, 0) > T:
        raise bad("sampler", sampler, f"its default of {DEFAULT_STEPS[sampler]} steps exceeds the model's T={T}; "
                                      f"give {'--steps' if cli else 'steps'} between 1 and {T}")


def _resolve(model_or_path, T, diffusion, device, dtype):
    """(model, diffusion, dtype) from a bare model or a checkpoint path."""
    if diffusion is not None and not isinstance(diffusion, Diffusion):
        raise UsageError(f"diffusion={diffusion!r}: give a fastddpm.Diffusion (or leave it out)")
    if isinstance(model_or_path, torch.nn.Module):
        if diffusion is None:
            if T is None:
                raise UsageError("sample(model, n): give T= (the number of diffusion steps the model was trained "
                                 "with) or diffusion=, or pass a checkpoint path, which records both")
            diffusion = Diffusion(T)
        elif T is not None and T != diffusion.T:
            raise UsageError(f"T={T} disagrees with diffusion.T={diffusion.T}; give one of them")
        model = model_or_path
        param = next(model.parameters())
        device = check_device(device, cli=False) if device is not None else param.device
        if device.type == "cuda" and device.index is None:  # "cuda" is the current device: no needless copy
            device = torch.device("cuda", torch.cuda.current_device())
        if param.device != device:
            model = copy.deepcopy(model).to(device)
        return model, diffusion.to(device), resolve_dtype(dtype or "fp32")
    from fastddpm.checkpoint import load_checkpoint

    device = check_device(device, cli=False) if device is not None else default_device()
    model, recorded, config = load_checkpoint(model_or_path)
    if T is not None and T != recorded.T:
        raise UsageError(f"T={T} disagrees with the checkpoint's T={recorded.T}; leave T out")
    if diffusion is not None and diffusion.config() != recorded.config():
        raise UsageError(f"diffusion {diffusion.config()} disagrees with the checkpoint's {recorded.config()}; "
                         "leave diffusion out")
    return model.to(device), recorded.to(device), resolve_dtype(dtype or config.dtype)


def sampling_layout(channels_last: bool | None, device: torch.device, engine: str, dtype: torch.dtype
                    ) -> tuple[bool, str]:
    """(channels_last, why) for sampling with ``engine``. None (auto) on CUDA is the layout in which
    that engine sampled faster on this kind of card, in this dtype, where that figure chose the
    engine; on the CPU, the eager engine's faster layout on a CPU of this vector capability
    (``fastddpm.measured``); NCHW wherever that was not measured."""
    if channels_last is not None:
        return channels_last, "asked for"
    from fastddpm.config import dtype_name
    from fastddpm.measured import cpu_sample_layout_choice, sample_layout_choice_for

    if device.type == "cuda":
        nhwc, why = sample_layout_choice_for(device, dtype_name(dtype), engine)
    elif device.type == "cpu":
        nhwc, why = cpu_sample_layout_choice(torch.backends.cpu.get_cpu_capability(), dtype_name(dtype), engine)
    else:
        nhwc, why = False, f"NCHW: sampling layouts are not measured on {device.type}"
    return nhwc, f"auto: {why}"


@contextlib.contextmanager
def engine_model(model, engine: str, device: torch.device, channels_last: bool = False):
    """The network as ``engine`` runs it: "eager" as given; "compiled" torch kernels under
    torch.compile; "fast" Triton kernels (+ torch.compile on CUDA); with ``channels_last`` its
    weights and every input in NHWC (cuDNN's convolutions then need no layout transposes). The
    caller's model keeps its kernel setting and its weights' layout afterwards (the very tensors:
    an optimizer holding them sees no change)."""
    previous = getattr(model, "kernels", None)
    weights = {p: p.data for p in model.parameters() if p.dim() == 4}
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    try:
        if previous is not None and engine in ("compiled", "fast"):
            model.set_kernels("torch" if engine == "compiled" else "triton")
        for p in weights:
            p.data = p.data.contiguous(memory_format=fmt)
        net = torch.compile(model) if engine == "compiled" or (engine == "fast" and device.type == "cuda") else model
        yield (lambda x, t: net(x.contiguous(memory_format=fmt), t)) if channels_last else net
    finally:
        for p, data in weights.items():
            p.data = data
        if previous is not None:
            model.set_kernels(previous)


class NoiseStream:
    """z for each step. "torch": a torch.Generator on the device, continuing after x_T.
    "philox": the fused kernel's counter-based Philox, a function of (seed, t, element) only."""

    def __init__(self, kind: str, gen: torch.Generator, seed: int):
        self.kind, self.gen, self.seed = kind, gen, seed

    def __call__(self, t: int, like: torch.Tensor) -> torch.Tensor | None:
        if t == 0:
            return None
        if self.kind == "philox":
            from fastddpm.kernels.reverse_step import reverse_step_noise

            return reverse_step_noise(like.shape, t, self.seed, device=like.device)
        return torch.randn(like.shape, generator=self.gen, device=like.device)


def predict_eps(net, x: torch.Tensor, t: int, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
    """eps_theta(x_t, t) for all images, batch by batch, in fp32."""
    eps = torch.empty_like(x)
    for s in range(0, len(x), batch_size):
        xb = x[s:s + batch_size]
        with autocast(x.device, dtype):
            eps[s:s + batch_size] = net(xb, torch.full((len(xb),), t, device=x.device, dtype=torch.long)).float()
    return eps


class Clock:
    """Wall time of a sampling call, split into the one-off part (compilation, CUDA-graph capture, the
    first step) and the steady part, so that a short call does not look slow nor a long one fast."""

    def __init__(self, device: torch.device):
        self.device, self.start, self.warm = device, time.perf_counter(), None

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def warmed_up(self):
        """The one-off work is done (call once, after it)."""
        if self.warm is None:
            self.sync()
            self.warm = time.perf_counter()

    def report(self, image_steps: int, computed_image_steps: int, steady_image_steps: int, **info) -> dict:
        self.sync()
        end = time.perf_counter()
        warm = self.warm if self.warm is not None else self.start
        steady = end - warm
        return {"seconds": end - self.start, "warmup_seconds": warm - self.start, "steady_seconds": steady,
                "image_steps": image_steps, "computed_image_steps": computed_image_steps,
                "steady_image_steps_per_s": steady_image_steps / steady if steady > 0 else None, **info}


def _capture(step, reset):
    """Warm ``step`` up on a side stream (compilation, autotuning, allocator), then capture one call
    of it as a CUDA graph. ``reset`` runs before each warm-up call (the step index must stay in its
    table, however few steps the plan has)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            reset()
            step()
    torch.cuda.current_stream().wait_stream(side)
    reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def graph_chain(net, diffusion: Diffusion, sampler: str, plan: list[LinearStep], x: torch.Tensor, seed: int, b: int,
                dtype: torch.dtype, progress, clock: Clock, clip_x0: bool = False) -> tuple[torch.Tensor, dict]:
    """The fast engine: one network call and one update captured once as a CUDA graph (on CUDA; on
    other devices the same step runs eagerly) and replayed for every step of ``plan``; the step index,
    the seed and the chunk offset live in device tensors, so there is no host sync inside the loop.
    DDPM updates with the fused reverse-step kernel (eq. 5, in-kernel Philox noise); the few-step
    samplers, and DDPM with ``clip_x0``, with the plan's LinearStep rows (noise from the same Philox
    stream), their x0 clipped to [-1, 1] with ``clip_x0``."""
    from fastddpm.kernels.reverse_step import reverse_step, reverse_step_noise

    device, n, shape = x.device, len(x), (b, *x.shape[1:])
    fused_ddpm = sampler == "ddpm" and not clip_x0  # the fused kernel is eq. 5, unclipped
    rows = None if fused_ddpm else torch.tensor([r[1:] for r in plan], dtype=torch.float32,
                                                device=device).view(len(plan), 7, 1, 1, 1, 1)
    ts = torch.tensor([r.t for r in plan], device=device)
    stochastic = any(r.s > 0 for r in plan)
    multistep = any(r.c != 0 for r in plan)  # DPM++ reads the last x0; DDIM never does: no copy for it
    # which terms the rows use (DDIM has no a*x, DPM++ no b*eps): no pass over the images for a zero one
    use_a, use_b = any(r.a != 0 for r in plan), any(r.b != 0 for r in plan)
    tables = diffusion.reverse_tables(device) if fused_ddpm else None
    i_dev = torch.zeros(1, dtype=torch.long, device=device)
    seed_dev = torch.tensor([seed], device=device)
    offset_dev = torch.zeros(1, dtype=torch.long, device=device)
    xs, x0s = torch.zeros(shape, device=device), torch.zeros(shape, device=device)

    def step():
        t = ts.index_select(0, i_dev)
        with autocast(device, dtype):
            eps = net(xs, t.expand(b))
        if fused_ddpm:
            reverse_step(xs, eps, t, seed_dev, **tables, offset=offset_dev, out=xs)
        else:
            a, b_, c, s, p, q, w = rows.index_select(0, i_dev)[0]
            eps = eps.float()
            x0 = _clipped(p * xs + q * eps, clip_x0)
            nxt = w * x0
            if use_a:
                nxt += a * xs
            if use_b:
                nxt += b_ * eps
            if multistep:
                nxt += c * x0s
                x0s.copy_(x0)
            if stochastic:
                nxt += s * reverse_step_noise(shape, t, seed_dev, offset_dev, device=device)
            xs.copy_(nxt)
        i_dev.add_(1)

    replay = step
    if device.type == "cuda":
        replay = _capture(step, i_dev.zero_).replay
    clock.warmed_up()
    out = torch.empty_like(x)
    chunks = -(-n // b)
    bar = progress_bar(total=len(plan) * chunks, desc="sampling (CUDA graph)" if device.type == "cuda" else "sampling",
                       unit="step", enabled=progress)
    for s in range(0, n, b):
        m = min(b, n - s)
        xs[:m].copy_(x[s:s + m])
        i_dev.zero_()
        offset_dev.fill_(s * x[0].numel())
        for _ in plan:
            replay()
            bar.update(1)
        out[s:s + m] = xs[:m]
    bar.close()
    return out, {"batch_size": b, "chunks": chunks, "network_calls": chunks * len(plan),
                 "computed_image_steps": chunks * b * len(plan), "cuda_graph": device.type == "cuda"}


@torch.no_grad()
def sample(model_or_checkpoint_path, n: int, *, T: int | None = None, diffusion: Diffusion | None = None,
           batch_size: int | None = None, device=None, dtype=None, seed: int = 0, progress: bool | None = None,
           trajectory_at=None, sampler: str = "ddpm", steps: int | None = None, eta: float | None = None,
           engine: str = "auto", noise: str = "auto", clip_x0: bool = False, channels_last: bool | None = None,
           timings: dict | None = None):
    """Generate ``n`` images: a uint8 tensor (n, 3, 32, 32) on the CPU.

    With a checkpoint path, the schedule (T, betas) and the default dtype come from the checkpoint
    (EMA weights are used where it has them); with a bare model give ``T=`` (the paper's linear
    schedule over T steps) or ``diffusion=`` (any ``fastddpm.Diffusion``).
    ``sampler``: "ddpm" (eq. 5, all T steps), "ddim" (``steps`` strided steps, default 50; ``eta``
    in [0, 1], 0 = deterministic) or "dpm++" (DPM-Solver++(2M), ``steps`` steps, default 20, deterministic).
    ``clip_x0``: each step's predicted clean image clipped to [-1, 1] before the update (DDPM: eq. 5's
    mean written as the posterior's (Ho et al.'s eq. 7) from the clipped x0, as their released sampler;
    DDIM: diffusers' clip_sample, its default; DPM++: thresholding with the bound 1).
    ``engine``: "eager", "compiled", "fast" (Triton kernels, fused update, one CUDA graph replayed
    for every step on CUDA) or "auto" (on CUDA the measured fastest on this kind of card, per
    ``fastddpm.measured``; eager elsewhere; ``timings["engine_chosen_by"]`` says why).
    ``channels_last``: run the network in NHWC (True) or NCHW (False); None (auto): on CUDA the layout
    in which the chosen engine measured faster on this kind of card, on the CPU the one measured faster
    on a CPU of the same vector capability (``fastddpm.measured``), NCHW where none was measured
    (``timings["layout_chosen_by"]`` says why). The caller's model is left as it was.
    ``noise``: "torch" (a torch.Generator: the eager engines' default) or "philox" (the fused
    kernel's stream: the fast engine's); x_T always comes from the torch.Generator. Deterministic
    for (seed, engine) and independent of batch_size (default: ``n`` split evenly into chunks of at
    most 2,560 on CUDA, 256 elsewhere).
    ``trajectory_at``: step indices at which to also keep x_t (the paper's Figs. 19-20); then returns
    (images, {t: uint8 images}). ``timings``: a dict to fill with the wall time, split into the
    one-off part (compile, capture, first step) and the steady part, and the work done.
    ``progress``: a bar on stderr (default: when stderr is a terminal).
    Bad arguments raise a ValueError naming the value given and what is allowed.
    """
    model, diffusion, dtype = _resolve(model_or_checkpoint_path, T, diffusion, device, dtype)
    check_arguments(diffusion.T, n=n, batch_size=batch_size, sampler=sampler, steps=steps, eta=eta, engine=engine,
                    noise=noise, seed=seed, trajectory_at=trajectory_at, clip_x0=clip_x0,
                    channels_last=channels_last)
    device = next(model.parameters()).device
    from fastddpm.kernels import unavailable_reason

    chosen_by = "asked for"
    if engine == "auto":
        engine, chosen_by = auto_engine(device, dtype, unavailable_reason(device) is None)
        chosen_by = f"auto: {chosen_by}"
    if engine == "fast" or noise == "philox":
        if unavailable_reason(device):
            raise UsageError(f"engine {engine!r} / noise {noise!r}: {unavailable_reason(device)}")
    noise = ("philox" if engine == "fast" else "torch") if noise == "auto" else noise
    channels_last, layout_chosen_by = sampling_layout(channels_last, device, engine, dtype)
    steps = steps or DEFAULT_STEPS.get(sampler, diffusion.T)
    eta = eta or 0.0
    b = chunk_size(n, batch_size, device)
    plan = diffusion.plan(sampler, steps, eta, clip_x0)
    keep = set(trajectory_at or ())
    trajectory = {}
    progress = progress_enabled(progress)
    clock = Clock(device)
    gen = torch.Generator(device).manual_seed(seed)
    x = torch.randn((n, 3, 32, 32), generator=gen, device=device)
    draw = NoiseStream(noise, gen, seed)
    was_training = model.training
    model.eval()
    try:
        with engine_model(model, engine, device, channels_last) as net:
            if engine == "fast" and noise == "philox" and not keep:
                with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
                    x, info = graph_chain(net, diffusion, sampler, plan, x, seed, b, dtype, progress, clock, clip_x0)
            else:
                ts = [r.t for r in plan]
                x0 = None
                for i, t in enumerate(progress_bar(ts, desc="sampling", unit="step", enabled=progress)):
                    if t in keep:
                        trajectory[t] = to_uint8(x).cpu()
                    eps = predict_eps(net, x, t, b, dtype)
                    if sampler == "ddpm":
                        x = diffusion.reverse_step(x, t, eps, draw(t, x), clip_x0)
                    elif sampler == "ddim":
                        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
                        x = diffusion.ddim_step(x, t, t_prev, eps, eta, draw(t, x) if eta > 0 else None, clip_x0)
                    else:
                        x, x0 = diffusion.dpm_solver_step(x, eps, ts, i, x0, clip_x0)
                    clock.warmed_up()
                info = {"batch_size": b, "chunks": -(-n // b), "network_calls": -(-n // b) * len(plan),
                        "computed_image_steps": n * len(plan), "cuda_graph": False}
    finally:
        model.train(was_training)
    images = to_uint8(x).cpu()
    if timings is not None:
        steady_steps = info["computed_image_steps"] - (0 if info["cuda_graph"] else n)
        timings.update(clock.report(n * len(plan), steady_image_steps=steady_steps, engine=engine,
                                    engine_chosen_by=chosen_by, layout="nhwc" if channels_last else "nchw",
                                    layout_chosen_by=layout_chosen_by, sampler=sampler, steps=len(plan),
                                    clip_x0=clip_x0, **info))
    return (images, trajectory) if trajectory_at is not None else images


def save_npz(images: torch.Tensor, path) -> None:
    """uint8 (N, 3, 32, 32) -> .npz holding one array 'images' (N, 32, 32, 3), the evaluator's format."""
    import numpy as np

    from fastddpm.files import atomic_write

    with atomic_write(path) as f:
        np.savez(f, images=images.permute(0, 2, 3, 1).numpy())


def describe_timings(t: dict) -> str:
    """'12.3 s (compile/capture/first step 4.0 s, then 123,456 image-steps/s; fast engine, auto: ...;
    NCHW (auto: ...))'."""
    rate = t["steady_image_steps_per_s"]
    steady = f", then {rate:,.0f} image-steps/s" if rate else ""
    engine = f"; {t['engine']} engine, {t['engine_chosen_by']}" if "engine_chosen_by" in t else ""
    layout = f"; {t['layout'].upper()} ({t['layout_chosen_by']})" if "layout_chosen_by" in t else ""
    return f"{t['seconds']:.1f} s (compile/capture/first step {t['warmup_seconds']:.1f} s{steady}{engine}{layout})"


def add_sampler_flags(p) -> list:
    """How images are sampled: the flags shared by the sample, evaluate and study commands. Returns their
    argparse actions (``fastddpm.errors.flags_given`` says which of them a command line set)."""
    add = p.add_argument
    return [
        add("--sampler", choices=SAMPLERS, default="ddpm",
            help="ddpm: the paper's eq. 5 over all T steps (default); ddim: --steps strided steps; "
                 "dpm++: DPM-Solver++(2M) in --steps steps"),
        add("--steps", type=int, help="steps of the ddim (default 50) or dpm++ (default 20) sampler"),
        add("--eta", type=float, help="DDIM eta in [0, 1] (default 0: deterministic; 1: DDPM-like)"),
        add("--clip-x0", action="store_true",
            help="clip each step's predicted clean image to [-1, 1] (DDPM: Ho et al.'s released sampler; "
                 "DDIM: diffusers' default)"),
        add("--engine", choices=ENGINES, default="auto",
            help="auto (default: on CUDA the measured fastest on this kind of card, see "
                 "fastddpm/measured.py; eager elsewhere), eager, compiled, fast"),
        add("--channels-last", dest="channels_last", action="store_const", const=True,
            help="sample with the network in NHWC (default: the layout the engine measured fastest in on "
                 "this kind of card, or of CPU, see fastddpm/measured.py; NCHW where none was measured)"),
        add("--no-channels-last", dest="channels_last", action="store_const", const=False,
            help="sample with the network in NCHW"),
    ]


def sampler_settings(a) -> dict:
    """sample()'s keyword arguments for the flags of ``add_sampler_flags``."""
    settings = {"sampler": a.sampler, "engine": a.engine}
    if a.steps is not None:
        settings["steps"] = a.steps
    if a.eta is not None:
        settings["eta"] = a.eta
    if a.clip_x0:
        settings["clip_x0"] = True
    if a.channels_last is not None:
        settings["channels_last"] = a.channels_last
    return settings


def describe_sampler(settings: dict, T: int | None = None) -> str:
    sampler = settings["sampler"]
    if sampler == "ddpm":
        how = f"DDPM, all {T or 'T'} steps"
    else:
        steps = settings.get("steps", DEFAULT_STEPS[sampler])
        how = {"ddim": f"DDIM {steps} steps, eta {settings.get('eta', 0.0)}",
               "dpm++": f"DPM++(2M) {steps} steps"}[sampler]
    layout = {True: ", NHWC", False: ", NCHW"}.get(settings.get("channels_last"), "")
    return f"{how}{', x0 clipped' if settings.get('clip_x0') else ''}, engine {settings['engine']}{layout}"


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m fastddpm.sample", description="Generate images from a checkpoint.")
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by fastddpm.train")
    p.add_argument("--n", type=int, default=64, help="number of images (default 64)")
    p.add_argument("--out", default="samples.png", help="PNG grid to write (default samples.png)")
    p.add_argument("--npz", help="also write the images as .npz (N, 32, 32, 3) uint8 for fastddpm.evaluate")
    p.add_argument("--batch-size", type=int, help=f"images per network call (default: --n split evenly into chunks "
                                                  f"of at most {MAX_BATCH['cuda']} on CUDA, {MAX_BATCH['cpu']} on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=list(DTYPES), help="default: the checkpoint's training dtype")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    add_sampler_flags(p)
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bar (default: a bar when stderr is a terminal)")
    a = p.parse_args(argv)
    device = check_device(a.device)
    from fastddpm.checkpoint import read_checkpoint
    from fastddpm.images import check_png, save_grid

    check_png(a.out, "--out")  # now, not after sampling

    T = read_checkpoint(a.checkpoint)["config"]["T"]
    settings = sampler_settings(a)
    check_arguments(T, n=a.n, batch_size=a.batch_size, seed=a.seed, cli=True, **settings)
    timings = {}
    images = sample(a.checkpoint, a.n, batch_size=a.batch_size, device=device, dtype=a.dtype, seed=a.seed,
                    progress=a.progress, timings=timings, **settings)
    save_grid(images, a.out)
    print(f"wrote {a.out} ({a.n} images, {describe_sampler(settings, T)}, {describe_timings(timings)} on {device})")
    if a.npz:
        save_npz(images, a.npz)
        print(f"wrote {a.npz}")
    return 0


def check_device(name, cli: bool = True) -> torch.device:
    """--device (or device=), validated: a CUDA device on a machine without one is a UsageError."""
    if name is None:
        return default_device()
    given = _named("device", name, cli)
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UsageError(f"{given}: not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{given}: CUDA is not available here; use cpu")
    if device.type == "cuda" and device.index is not None:
        if device.index >= torch.cuda.device_count():
            raise UsageError(f"{given}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        if cli:
            torch.cuda.set_device(device)  # Triton launches and CUDA graphs use the current device
    return device

