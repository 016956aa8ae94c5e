"""Sampling: the full reverse chain (eq. 5) from x_T ~ N(0, I).

``sample(model_or_checkpoint, n)`` is deterministic for a seed and independent of the batch size:
x_T and every step's noise z are drawn for all n images at once from one generator seeded by
``seed`` on the sampling device, and the network is evaluated batch by batch in between.
"""
from __future__ import annotations

import contextlib
import copy
import sys

import torch
from tqdm import tqdm

from fastddpm.config import DTYPES
from fastddpm.diffusion import Diffusion
from fastddpm.errors import ArgumentParser, UsageError, run_cli


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
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


def _resolve(model_or_path, T, device, dtype):
    """(model, diffusion, dtype) from a bare model or a checkpoint path."""
    if isinstance(model_or_path, torch.nn.Module):
        if T is None:
            raise ValueError("sample(model, n): give T= (the number of diffusion steps the model was trained "
                             "with), or pass a checkpoint path, which records it")
        model = model_or_path
        param = next(model.parameters())
        device = torch.device(device) if device is not None else param.device
        if param.device != device:
            model = copy.deepcopy(model).to(device)
        return model, Diffusion(T), resolve_dtype(dtype or "fp32")
    from fastddpm.checkpoint import load_checkpoint

    model, diffusion, config = load_checkpoint(model_or_path)
    if T is not None and T != diffusion.T:
        raise UsageError(f"T={T} disagrees with the checkpoint's T={diffusion.T}; leave T out")
    device = torch.device(device) if device is not None else default_device()
    return model.to(device), diffusion, resolve_dtype(dtype or config.dtype)


ENGINES = ("auto", "eager", "compiled", "fast")
SAMPLERS = ("ddpm", "ddim")


def default_batch_size(device: torch.device, n: int) -> int:
    """Enough images per network call to fill the device (the CUDA default fills an H100 with the
    seed model in bf16 within a few GB)."""
    return min(n, 2048 if device.type == "cuda" else 256)


@contextlib.contextmanager
def engine_model(model, engine: str, device: torch.device):
    """The network as ``engine`` runs it: "eager" as given; "compiled" torch kernels under
    torch.compile; "fast" Triton kernels (+ torch.compile on CUDA). The caller's model keeps its
    kernel setting afterwards."""
    previous = getattr(model, "kernels", None)
    if previous is not None and engine in ("compiled", "fast"):
        model.set_kernels("torch" if engine == "compiled" else "triton")
    try:
        yield torch.compile(model) if engine == "compiled" or (engine == "fast" and device.type == "cuda") else model
    finally:
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


def cuda_graph_chain(net, diffusion: Diffusion, x: torch.Tensor, seed: int, batch_size: int, dtype: torch.dtype,
                     progress: bool) -> torch.Tensor:
    """The DDPM chain with one network call + fused reverse step captured once as a CUDA graph and
    replayed for all T steps; t, the seed and the chunk offset live in device tensors, so there is no
    host sync inside the loop. Noise: the kernel's Philox stream (batch-size independent)."""
    from fastddpm.kernels.reverse_step import reverse_step

    device, n = x.device, len(x)
    b = min(batch_size, n)
    tables = diffusion.reverse_tables(device)
    steps = torch.arange(diffusion.T - 1, -1, -1, device=device)
    t_dev = steps[:1].clone()
    seed_dev = torch.tensor([seed], device=device)
    offset_dev = torch.zeros(1, dtype=torch.long, device=device)
    xs = torch.zeros((b, *x.shape[1:]), device=device)

    def step():
        with autocast(device, dtype):
            eps = net(xs, t_dev.expand(b))
        reverse_step(xs, eps, t_dev, seed_dev, **tables, offset=offset_dev, out=xs)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compilation, autotuning, allocator
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    out = torch.empty_like(x)
    bar = tqdm(total=diffusion.T * -(-n // b), desc="sampling (CUDA graph)", unit="step", disable=not progress,
               file=sys.stderr, leave=False)
    for s in range(0, n, b):
        m = min(b, n - s)
        xs[:m].copy_(x[s:s + m])
        offset_dev.fill_(s * x[0].numel())
        for i in range(diffusion.T):
            t_dev.copy_(steps[i:i + 1])
            graph.replay()
            bar.update(1)
        out[s:s + m] = xs[:m]
    bar.close()
    return out


@torch.no_grad()
def sample(model_or_checkpoint_path, n: int, *, T: int | None = None, batch_size: int | None = None,
           device=None, dtype=None, seed: int = 0, progress: bool = True, trajectory_at=None,
           sampler: str = "ddpm", steps: int | None = None, eta: float = 0.0, engine: str = "auto",
           noise: str = "auto"):
    """Generate ``n`` images: a uint8 tensor (n, 3, 32, 32) on the CPU.

    With a checkpoint path, T and the default dtype come from the checkpoint (EMA weights are used
    where it has them); with a bare model, T must be given. ``sampler``: "ddpm" (eq. 5, all T steps)
    or "ddim" (``steps`` strided steps, ``eta`` 0 = deterministic). ``engine``: "eager", "compiled",
    "fast" (Triton kernels, fused reverse step, CUDA graph on CUDA) or "auto" (fast on CUDA).
    ``noise``: "torch" (a torch.Generator: the eager engines' default) or "philox" (the fused
    kernel's stream: the fast engine's); x_T always comes from the torch.Generator. Deterministic
    for (seed, engine) and independent of batch_size. ``trajectory_at``: step indices at which to
    also keep x_t (the paper's Figs. 19-20); then returns (images, {t: uint8 images}).
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    model, diffusion, dtype = _resolve(model_or_checkpoint_path, T, device, dtype)
    device = next(model.parameters()).device
    from fastddpm.kernels import unavailable_reason

    if engine == "auto":
        engine = "fast" if device.type == "cuda" and not unavailable_reason(device) else "eager"
    if engine == "fast" or noise == "philox":
        if unavailable_reason(device):
            raise UsageError(f"engine {engine!r} / noise {noise!r}: {unavailable_reason(device)}")
    noise = ("philox" if engine == "fast" else "torch") if noise == "auto" else noise
    batch_size = batch_size or default_batch_size(device, n)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if sampler == "ddim":
        steps = steps or 50
        if not 1 <= steps <= diffusion.T:
            raise UsageError(f"DDIM steps {steps}: must be between 1 and the model's T={diffusion.T} (--steps)")
        ts = diffusion.ddim_timesteps(steps)
        pairs = list(zip(ts, ts[1:] + [-1]))
    else:
        pairs = [(t, t - 1) for t in range(diffusion.T - 1, -1, -1)]
    keep = set(trajectory_at or ())
    trajectory = {}
    gen = torch.Generator(device).manual_seed(seed)
    x = torch.randn((n, 3, 32, 32), generator=gen, device=device)
    draw = NoiseStream(noise, gen, seed)
    fused = engine == "fast" and sampler == "ddpm" and noise == "philox"
    was_training = model.training
    model.eval()
    try:
        with engine_model(model, engine, device) as net:
            if fused and device.type == "cuda" and not keep:
                with torch.cuda.device(device):  # streams, graphs and Triton launches use the current device
                    x = cuda_graph_chain(net, diffusion, x, seed, batch_size, dtype, progress)
            else:
                if fused:
                    from fastddpm.kernels.reverse_step import reverse_step

                    tables = diffusion.reverse_tables(device)
                for t, t_prev in tqdm(pairs, desc="sampling", unit="step", disable=not progress, file=sys.stderr,
                                      leave=False):
                    if t in keep:
                        trajectory[t] = to_uint8(x).cpu()
                    eps = predict_eps(net, x, t, batch_size, dtype)
                    if fused:
                        x = reverse_step(x, eps, t, seed, **tables)
                    elif sampler == "ddim":
                        x = diffusion.ddim_step(x, t, t_prev, eps, eta, draw(t, x) if eta > 0 else None)
                    else:
                        x = diffusion.reverse_step(x, t, eps, draw(t, x))
    finally:
        model.train(was_training)
    images = to_uint8(x).cpu()
    return (images, trajectory) if trajectory_at is not None else images


def save_npz(images: torch.Tensor, path) -> None:
    """uint8 (N, 3, 32, 32) -> .npz holding one array 'images' (N, 32, 32, 3), the evaluator's format."""
    import numpy as np

    from fastddpm.files import atomic_write

    with atomic_write(path) as f:
        np.savez(f, images=images.permute(0, 2, 3, 1).numpy())


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m fastddpm.sample", description="Generate images from a checkpoint.")
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by fastddpm.train")
    p.add_argument("--n", type=int, default=64, help="number of images (default 64)")
    p.add_argument("--out", default="samples.png", help="PNG grid to write (default samples.png)")
    p.add_argument("--npz", help="also write the images as .npz (N, 32, 32, 3) uint8 for fastddpm.evaluate")
    p.add_argument("--batch-size", type=int, help="images per network call (default: 1024 on GPU, 256 on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=list(DTYPES), help="default: the checkpoint's training dtype")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddpm",
                   help="ddpm: the paper's eq. 5 over all T steps (default); ddim: --steps strided steps")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 deterministic (default), 1 DDPM-like")
    p.add_argument("--engine", choices=ENGINES, default="auto",
                   help="auto (fast on CUDA, eager elsewhere), eager, compiled, fast")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.n < 1:
        raise UsageError(f"--n {a.n}: must be at least 1")
    if a.batch_size is not None and a.batch_size < 1:
        raise UsageError(f"--batch-size {a.batch_size}: must be at least 1")
    device = check_device(a.device)
    import time

    from fastddpm.images import save_grid

    start = time.perf_counter()
    if a.sampler == "ddim" and a.steps < 1:
        raise UsageError(f"--steps {a.steps}: must be at least 1")
    images = sample(a.checkpoint, a.n, batch_size=a.batch_size, device=device, dtype=a.dtype, seed=a.seed,
                    progress=not a.no_progress, sampler=a.sampler, steps=a.steps, eta=a.eta, engine=a.engine)
    seconds = time.perf_counter() - start
    save_grid(images, a.out)
    what = f"DDIM {a.steps} steps" if a.sampler == "ddim" else "DDPM"
    print(f"wrote {a.out} ({a.n} images, {what}, {seconds:.1f} s on {device})")
    if a.npz:
        save_npz(images, a.npz)
        print(f"wrote {a.npz}")
    return 0


def check_device(name) -> torch.device:
    """--device, validated: a CUDA device on a machine without one is a UsageError."""
    if name is None:
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available here; use --device cpu")
    if device.type == "cuda" and device.index is not None:
        if device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(device)  # Triton launches and CUDA graphs use the current device
    return device


if __name__ == "__main__":
    sys.exit(run_cli(main))
