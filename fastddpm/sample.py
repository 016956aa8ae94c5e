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


@torch.no_grad()
def sample(model_or_checkpoint_path, n: int, *, T: int | None = None, batch_size: int | None = None,
           device=None, dtype=None, seed: int = 0, progress: bool = True, trajectory_at=None):
    """Generate ``n`` images: a uint8 tensor (n, 3, 32, 32) on the CPU.

    With a checkpoint path, T and the default dtype come from the checkpoint (EMA weights are used
    where it has them); with a bare model, T must be given. ``trajectory_at``: step indices at which
    to also keep x_t (the paper's Figs. 19-20); then returns (images, {t: uint8 images}).
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    model, diffusion, dtype = _resolve(model_or_checkpoint_path, T, device, dtype)
    device = next(model.parameters()).device
    batch_size = batch_size or (1024 if device.type == "cuda" else 256)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    keep = set(trajectory_at or ())
    trajectory = {}
    gen = torch.Generator(device).manual_seed(seed)
    x = torch.randn((n, 3, 32, 32), generator=gen, device=device)
    was_training = model.training
    model.eval()
    try:
        for t in tqdm(range(diffusion.T - 1, -1, -1), desc="sampling", unit="step", disable=not progress,
                      file=sys.stderr, leave=False):
            if t in keep:
                trajectory[t] = to_uint8(x).cpu()
            eps = torch.empty_like(x)
            for s in range(0, n, batch_size):
                xb = x[s:s + batch_size]
                tb = torch.full((xb.shape[0],), t, device=device, dtype=torch.long)
                with autocast(device, dtype):
                    eps[s:s + batch_size] = model(xb, tb).float()
            z = torch.randn(x.shape, generator=gen, device=device) if t > 0 else None
            x = diffusion.reverse_step(x, t, eps, z)
    finally:
        model.train(was_training)
    images = to_uint8(x).cpu()
    return (images, trajectory) if trajectory_at is not None else images


def save_npz(images: torch.Tensor, path) -> None:
    """uint8 (N, 3, 32, 32) -> .npz holding one array 'images' (N, 32, 32, 3), the evaluator's format."""
    import os

    import numpy as np

    tmp = f"{path}.{os.getpid()}.tmp.npz"
    np.savez(tmp, images=images.permute(0, 2, 3, 1).numpy())
    os.replace(tmp, path)


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
    images = sample(a.checkpoint, a.n, batch_size=a.batch_size, device=device, dtype=a.dtype, seed=a.seed,
                    progress=not a.no_progress)
    seconds = time.perf_counter() - start
    save_grid(images, a.out)
    print(f"wrote {a.out} ({a.n} images, {seconds:.1f} s on {device})")
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
    return device


if __name__ == "__main__":
    sys.exit(run_cli(main))
