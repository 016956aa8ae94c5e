"""Pictures a user looks at: sample grids (the paper's Figs. 6-18) and loss curves (Figs. 5-17)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from fastddpm.errors import UsageError
from fastddpm.files import atomic_write


def check_png(path, flag: str | None = None) -> Path:
    """``path``, where it names a .png file: pictures are written as PNG (lossless; JPEG would blur 32x32
    images), and a file must not say it is another format than it holds. ``flag``: how a command names it."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        given = f"{flag} {path}" if flag else f"path={str(path)!r}"
        raise UsageError(f"{given}: pictures are written as PNG; give a file name ending in .png")
    return path


def grid_array(images, nrow: int | None = None, pad: int = 2, scale: int = 2) -> np.ndarray:
    """uint8 images (N, 3, H, W) or (N, H, W, 3) -> one uint8 (rows*H', cols*W', 3) array."""
    a = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if a.dtype != np.uint8 or a.ndim != 4 or 3 not in (a.shape[1], a.shape[-1]) or not len(a):
        raise ValueError(f"images: a {a.dtype} array of shape {a.shape}; expected uint8 images (N, 3, H, W) or "
                         "(N, H, W, 3), N >= 1, as fastddpm.sample returns them")
    for name, value, least in (("nrow", nrow, 1), ("pad", pad, 0), ("scale", scale, 1)):
        if value is not None and (not isinstance(value, int) or value < least):
            raise ValueError(f"{name}={value!r}: must be an integer >= {least}")
    if a.shape[1] == 3 and a.shape[-1] != 3:
        a = a.transpose(0, 2, 3, 1)
    if scale > 1:
        a = a.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, _ = a.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    out = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = a[i]
    return out


def save_grid(images, path, nrow: int | None = None, scale: int = 2) -> Path:
    """Write uint8 images (as ``fastddpm.sample`` returns them) as one PNG grid (``path`` ends in .png)."""
    from PIL import Image

    check_png(path)
    with atomic_write(path) as f:
        Image.fromarray(grid_array(images, nrow=nrow, scale=scale)).save(f, format="PNG")
    return Path(path)


def save_comparison(real, samples, path, title: str = "", count: int = 64) -> Path:
    """Real images beside generated ones (the first ``count`` generated ones and as many real ones, uint8
    (N, 32, 32, 3) or (N, 3, 32, 32)), as one PNG with a caption per side: the picture a demo ends with."""
    check_png(path)
    count = min(count, len(samples))  # more real images than generated ones would compare unlike with like
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10.5, 5.8), dpi=110)
    for ax, images, caption in zip(axes, (real, samples), ("real (reference)", "generated")):
        ax.imshow(grid_array(images[:count], nrow=8, scale=1), interpolation="nearest")
        ax.set_title(caption, fontsize=11)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return Path(path)


def plot_curves(series: dict[str, tuple[list, list]], path, title: str = "", ylabel: str = "loss",
                xlabel: str = "epoch") -> Path:
    """Overlaid curves ``{label: (xs, ys)}`` on a log scale, written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for label, (xs, ys) in series.items():
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y) and y > 0]
        if pts:
            ax.plot(*zip(*pts), marker="o" if len(pts) < 30 else None, ms=3, label=label)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return Path(path)


def plot_loss(records: list[dict], path, title: str = "") -> Path:
    """Train and validation loss per epoch from metrics.jsonl records."""
    epochs = [r["epoch"] for r in records]
    return plot_curves({"train": (epochs, [r.get("train_loss") for r in records]),
                        "validation": (epochs, [r.get("val_loss") for r in records])}, path, title=title)
