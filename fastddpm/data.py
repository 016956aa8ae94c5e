"""Datasets as uint8 arrays (N, 32, 32, 3), and the device-resident batch source used in training.

``--data`` accepts: ``cifar10`` (the official python batches from the cache, downloaded on request),
``cifar10-jpeg`` (the JPEG copy under $FASTDDPM_DATA), ``shapes`` (built-in, procedural), a path to
the official ``cifar-10-batches-py`` folder, or an image folder (a directory, a ``.zip``, or a
directory holding ``train.zip``/``test.zip``) laid out ``train/<class>/*.png|jpg``, ``test/<class>/*``.
"""
from __future__ import annotations

import functools
import hashlib
import io
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from fastddpm.errors import UsageError
from fastddpm.files import atomic_write
from fastddpm.progress import progress_bar

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SPLITS = ("train", "test")
SHAPES_SIZES = {"train": 8192, "test": 1024}
NAMED = ("cifar10", "cifar10-jpeg", "shapes")


def data_root() -> Path:
    """$FASTDDPM_DATA, else ../shared/data next to the checkout (or the working directory)."""
    if os.environ.get("FASTDDPM_DATA"):
        return Path(os.environ["FASTDDPM_DATA"])
    here = Path(__file__).resolve().parent.parent / ".." / "shared" / "data"
    return here.resolve() if here.is_dir() else Path("../shared/data").resolve()


def cache_dir() -> Path:
    """$FASTDDPM_CACHE, else ~/.cache/fastddpm: decoded arrays and downloaded CIFAR-10 live here."""
    return Path(os.environ.get("FASTDDPM_CACHE", Path.home() / ".cache" / "fastddpm"))


def describe(spec: str) -> str:
    """How a figure measured on this data must be labelled."""
    if spec == "cifar10-jpeg" or "cifar10-jpeg" in str(spec):
        return "CIFAR-10 (JPEG copy)"
    return {"cifar10": "CIFAR-10", "shapes": "shapes (procedural)"}.get(spec, str(spec))


def load_images(spec: str, split: str = "train", progress: bool | None = None) -> np.ndarray | None:
    """The images of ``split`` as uint8 (N, 32, 32, 3); None where the source has no such split.
    ``progress``: bars while downloading or decoding (default: when stderr is a terminal)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    if spec == "shapes":
        return _cached_shapes(SHAPES_SIZES[split], SPLITS.index(split)).copy()
    if spec == "cifar10":
        return _load_cifar_batches(_cifar10_folder(progress), split)
    path = data_root() / "cifar10-jpeg" if spec == "cifar10-jpeg" else Path(spec).expanduser()
    if not path.exists():
        # the named JPEG copy lives where data_root() points: say where that was, so a wrong one shows
        hint = (f" (looked for {path}; set FASTDDPM_DATA to the folder holding cifar10-jpeg/)"
                if spec == "cifar10-jpeg" else "")
        raise UsageError(f"--data {spec}: no such file or directory{hint}; give one of {', '.join(NAMED)} "
                         "or a path to cifar-10-batches-py or an image folder/zip")
    if path.is_dir() and (path / "data_batch_1").is_file():
        return _load_cifar_batches(path, split)
    return _load_image_folder(path, split, progress)


# --- shapes: the embedded default -------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _cached_shapes(n: int, seed: int) -> np.ndarray:
    return make_shapes(n, seed)


def make_shapes(n: int, seed: int = 0) -> np.ndarray:
    """Deterministic 32x32 RGB images: one or two coloured circles/squares/triangles on a two-colour
    gradient background. Learnable by the tiny preset in minutes on a CPU."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32) + 0.5
    c0, c1 = rng.uniform(0, 1, (2, n, 1, 1, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi, (n, 1, 1)).astype(np.float32)
    ramp = ((np.cos(angle) * (xx - 16) + np.sin(angle) * (yy - 16)) / 45 + 0.5)[..., None]
    img = c0 * (1 - ramp) + c1 * ramp
    for k in range(2):
        kind = rng.integers(0, 3, (n, 1, 1))
        cx, cy = rng.uniform(9, 23, (2, n, 1, 1)).astype(np.float32)
        r = rng.uniform(4, 9, (n, 1, 1)).astype(np.float32)
        colour = rng.uniform(0, 1, (n, 1, 1, 3)).astype(np.float32)
        present = np.ones((n, 1, 1), bool) if k == 0 else rng.uniform(0, 1, (n, 1, 1)) < 0.5
        dx, dy = xx - cx, yy - cy
        circle = dx ** 2 + dy ** 2 <= r ** 2
        square = np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r
        triangle = (dy <= 0.8 * r) & (np.abs(dx) <= (dy + r) * 0.6)
        mask = np.where(kind == 0, circle, np.where(kind == 1, square, triangle)) & present
        img = np.where(mask[..., None], colour, img)
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


# --- official CIFAR-10 python batches ---------------------------------------------------------

def _cifar10_folder(progress: bool | None) -> Path:
    folder = cache_dir() / "cifar-10-batches-py"
    if (folder / "data_batch_1").is_file():
        return folder
    _download_cifar10(cache_dir(), progress)
    return folder


def _download_cifar10(dest: Path, progress: bool | None) -> None:
    import urllib.request

    offline = (f"--data cifar10: the official batches are not in {dest / 'cifar-10-batches-py'} and the "
               f"download from {CIFAR10_URL} failed ({{}}); offline, extract cifar-10-python.tar.gz there "
               "(or set FASTDDPM_CACHE), or pass --data PATH to cifar-10-batches-py or an image folder/zip "
               "such as cifar10-jpeg")
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / "cifar-10-python.tar.gz"
    partial = archive.with_suffix(".part")
    try:
        with urllib.request.urlopen(CIFAR10_URL, timeout=30) as resp, open(partial, "wb") as f:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with progress_bar(total=total, unit="B", unit_scale=True, desc="CIFAR-10", enabled=progress) as bar:
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    except OSError as e:
        partial.unlink(missing_ok=True)
        raise UsageError(offline.format(e)) from None
    md5 = hashlib.md5(partial.read_bytes()).hexdigest()
    if md5 != CIFAR10_MD5:
        partial.unlink(missing_ok=True)
        raise UsageError(offline.format(f"checksum {md5} != {CIFAR10_MD5}"))
    os.replace(partial, archive)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    archive.unlink()


def _load_cifar_batches(folder: Path, split: str) -> np.ndarray:
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    arrays = []
    for name in names:
        try:
            with open(folder / name, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            arrays.append(np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        except OSError as e:
            raise UsageError(f"--data {folder}: cannot read {name} ({e.strerror or type(e).__name__}); re-extract "
                             "cifar-10-python.tar.gz") from None
        except Exception:  # unpickling a foreign file raises many types, whose texts name no fix
            raise UsageError(f"--data {folder}: {name} is not a CIFAR-10 python batch (truncated or foreign file); "
                             "re-extract cifar-10-python.tar.gz") from None
    return np.ascontiguousarray(np.concatenate(arrays))


# --- image folders and zips -------------------------------------------------------------------

def _image_source(path: Path, split: str):
    """(kind, location, prefix) of the split's images: a directory, or a zip with a prefix."""
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise UsageError(f"--data {path}: not a zip archive; give an image folder, a .zip of one, "
                             "or cifar-10-batches-py")
        with zipfile.ZipFile(path) as z:
            if any(n.startswith(f"{split}/") for n in z.namelist()):
                return "zip", path, f"{split}/"
        sibling = path.with_name(f"{split}.zip")  # train.zip beside test.zip (the shared JPEG copy)
        return ("zip", sibling, f"{split}/") if sibling.is_file() else None
    if (path / split).is_dir():
        return "dir", path / split, ""
    if (path / f"{split}.zip").is_file():
        return "zip", path / f"{split}.zip", f"{split}/"
    return None


def _fingerprint(kind: str, loc: Path) -> str:
    h = hashlib.sha256()
    if kind == "zip":
        with open(loc, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    else:
        for p in sorted(loc.rglob("*")):
            if p.suffix.lower() in IMAGE_SUFFIXES:
                st = p.stat()
                h.update(f"{p.relative_to(loc)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def _load_image_folder(path: Path, split: str, progress: bool | None) -> np.ndarray | None:
    source = _image_source(path, split)
    if source is None:
        if split == "train":
            raise UsageError(f"--data {path}: no train/<class>/*.png|jpg images found; lay the folder or zip "
                             "out as train/<class>/... and test/<class>/...")
        return None
    kind, loc, prefix = source
    cached = cache_dir() / "decoded" / f"{split}-{_fingerprint(kind, loc)}.npy"
    if cached.is_file():
        return np.load(cached)
    images = decode_images(kind, loc, prefix, progress)
    with atomic_write(cached) as f:
        np.save(f, images)
    return images


def decode_images(kind: str, loc: Path, prefix: str, progress: bool | None = None) -> np.ndarray:
    from PIL import Image

    if kind == "zip":
        z = zipfile.ZipFile(loc)
        names = sorted(n for n in z.namelist() if n.startswith(prefix) and n.lower().endswith(IMAGE_SUFFIXES))
        read = lambda n: io.BytesIO(z.read(n))  # noqa: E731
    else:
        names = sorted(str(p) for p in loc.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        read = lambda n: n  # noqa: E731
    if not names:
        where = prefix if kind == "zip" else f"{loc}/"  # a zip's prefix ends in "/" already
        raise UsageError(f"--data {loc}: no .png/.jpg images under {where}<class>/")
    out = np.empty((len(names), 32, 32, 3), np.uint8)
    for i, name in enumerate(progress_bar(names, desc=f"decoding {loc.name}", unit="img",
                                          enabled=progress if len(names) >= 2000 else False)):
        with Image.open(read(name)) as im:
            if im.size != (32, 32) or im.mode != "RGB":
                raise UsageError(f"--data {loc}: {name} is {im.size[0]}x{im.size[1]} {im.mode}; fastddpm "
                                 "trains on 32x32 RGB images: resize/convert the dataset first")
            out[i] = np.asarray(im)
    return out


def subset(images: np.ndarray | None, n: int) -> np.ndarray | None:
    """A fixed random subset of n images (0 or n >= len: all). Random, not the first n: some sources
    (the JPEG copy) are ordered by class."""
    if images is None or not n or n >= len(images):
        return images
    return images[np.sort(np.random.default_rng(0).permutation(len(images))[:n])]


# --- the training-time batch source -----------------------------------------------------------

class DeviceBatches:
    """The whole split as one uint8 tensor on the training device; batches by a per-epoch
    permutation, random horizontal flips and scaling to [-1, 1], all on the device.

    The permutation of epoch e depends only on (seed, e), so a run resumed mid-epoch sees the same
    batches; ``rank``/``world`` give each process a disjoint shard of every epoch.
    """

    def __init__(self, images: np.ndarray, batch_size: int, device, seed: int = 0, rank: int = 0, world: int = 1):
        self.data = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32) uint8
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.steps_per_epoch = len(self.data) // (batch_size * world)
        if self.steps_per_epoch < 1:
            raise UsageError(f"--batch-size {batch_size} x {world} process(es) exceeds the {len(self.data)} "
                             "training images; lower --batch-size")

    def __len__(self):
        return self.steps_per_epoch

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """This rank's (steps_per_epoch, batch_size) index table for ``epoch`` (last partial batch dropped:
        static shapes for torch.compile and CUDA graphs)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.data), generator=g)
        used = self.steps_per_epoch * self.batch_size * self.world
        return perm[:used].view(self.steps_per_epoch, self.world, self.batch_size)[:, self.rank].to(self.data.device)

    def batch(self, idx: torch.Tensor, generator: torch.Generator | None = None, flip: bool = True) -> torch.Tensor:
        x = self.data[idx].float().div_(127.5).sub_(1.0)
        if flip:
            mask = torch.rand(x.shape[0], 1, 1, 1, device=x.device, generator=generator) < 0.5
            x = torch.where(mask, x.flip(3), x)
        return x


def to_model_range(images: np.ndarray | torch.Tensor, device=None) -> torch.Tensor:
    """uint8 (N, 32, 32, 3) -> float (N, 3, 32, 32) in [-1, 1]."""
    x = torch.as_tensor(images).to(device)
    return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
