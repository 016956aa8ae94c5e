import pickle
import re
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from fastddpm import data
from fastddpm.errors import UsageError
from tests.conftest import shared_data


def test_shapes_is_deterministic_uint8_rgb():
    a, b = data.make_shapes(50, seed=3), data.make_shapes(50, seed=3)
    assert a.dtype == np.uint8 and a.shape == (50, 32, 32, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, data.make_shapes(50, seed=4))
    assert a.std() > 30  # not a blank image set
    train, test = data.load_images("shapes", "train"), data.load_images("shapes", "test")
    assert len(train) == data.SHAPES_SIZES["train"] and len(test) == data.SHAPES_SIZES["test"]


def _write_folder(root, split, sizes=((32, 32),), mode="RGB", n=3):
    rng = np.random.default_rng(0)
    images = []
    for cls in ("cat", "dog"):
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            w, h = sizes[i % len(sizes)]
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(arr).convert(mode).save(root / split / cls / f"{i:03d}.png")
            images.append(arr)
    return images


def test_image_folder_as_directory_and_zip(tmp_path):
    root = tmp_path / "set"
    expected = _write_folder(root, "train")
    _write_folder(root, "test", n=1)
    got = data.load_images(str(root), "train")
    assert got.shape == (6, 32, 32, 3)
    np.testing.assert_array_equal(got, np.stack(expected))  # sorted by class then name
    assert data.load_images(str(root), "test").shape == (2, 32, 32, 3)
    archive = tmp_path / "set.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in sorted(root.rglob("*.png")):
            z.write(p, p.relative_to(root).as_posix())
    np.testing.assert_array_equal(data.load_images(str(archive), "train"), got)
    # decoded once, then served from the cache keyed by the source's hash
    cached = list((data.cache_dir() / "decoded").glob("train-*.npy"))
    assert len(cached) >= 1


def test_image_folder_rejects_wrong_size_with_a_clear_error(tmp_path):
    _write_folder(tmp_path / "bad", "train", sizes=((32, 32), (64, 48)))
    with pytest.raises(UsageError, match="64x48.*32x32 RGB"):
        data.load_images(str(tmp_path / "bad"), "train")


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        data.load_images(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="train/<class>"):
        data.load_images(str(tmp_path / "empty"))
    assert data.load_images(str(tmp_path / "empty"), "test") is None  # no test split: no validation set
    (tmp_path / "no-images" / "train").mkdir(parents=True)
    with pytest.raises(UsageError, match=re.escape(f"no .png/.jpg images under {tmp_path}/no-images/train/<class>/")):
        data.load_images(str(tmp_path / "no-images"))


def test_missing_jpeg_copy_names_the_folder_looked_in(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDDPM_DATA", str(tmp_path / "elsewhere"))
    looked = re.escape(f"(looked for {tmp_path}/elsewhere/cifar10-jpeg; set FASTDDPM_DATA")
    with pytest.raises(UsageError, match=looked):
        data.load_images("cifar10-jpeg")


def test_official_python_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    raw = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        raw[name] = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": raw[name], b"labels": [0] * 4}, f)
    train = data.load_images(str(folder), "train")
    assert train.shape == (20, 32, 32, 3)
    # the official layout is channel-major: R plane, G plane, B plane
    np.testing.assert_array_equal(train[0, :, :, 1], raw["data_batch_1"][0, 1024:2048].reshape(32, 32))
    assert data.load_images(str(folder), "test").shape == (4, 32, 32, 3)
    # an empty (truncated) or a text batch: a one-line error, not EOFError's traceback nor a pickle opcode
    for content in (b"", b"hello\n"):
        (folder / "data_batch_3").write_bytes(content)
        with pytest.raises(UsageError, match=r"data_batch_3 is not a CIFAR-10 python batch \(truncated or foreign "
                                             r"file\); re-extract cifar-10-python.tar.gz$"):
            data.load_images(str(folder), "train")


def test_cifar10_offline_gives_one_line_naming_data(monkeypatch):
    import urllib.request

    def offline(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(UsageError) as err:
        data.load_images("cifar10")
    message = str(err.value)
    assert "--data" in message and "offline" in message and "\n" not in message


def test_jpeg_copy_of_cifar10():
    if not (shared_data() / "cifar10-jpeg" / "test.zip").is_file():
        pytest.skip(f"no CIFAR-10 JPEG copy under {shared_data()} (set FASTDDPM_DATA)")
    test = data.load_images("cifar10-jpeg", "test")
    assert test.shape == (10000, 32, 32, 3) and test.dtype == np.uint8
    assert abs(test.mean() / 255 - 0.47) < 0.02
    assert data.describe("cifar10-jpeg") == "CIFAR-10 (JPEG copy)"
    # the train.zip path finds its test split in the sibling test.zip
    np.testing.assert_array_equal(data.load_images(str(shared_data() / "cifar10-jpeg" / "train.zip"), "test"), test)


def test_device_batches_permute_shard_and_scale():
    images = data.make_shapes(40)
    full = data.DeviceBatches(images, batch_size=8, device="cpu", seed=1)
    assert len(full) == 5
    e0, e0b, e1 = full.epoch_indices(0), full.epoch_indices(0), full.epoch_indices(1)
    assert torch.equal(e0, e0b) and not torch.equal(e0, e1)
    assert sorted(e0.flatten().tolist()) == list(range(40))
    ranks = [data.DeviceBatches(images, 8, "cpu", seed=1, rank=r, world=2).epoch_indices(0) for r in range(2)]
    assert set(ranks[0].flatten().tolist()).isdisjoint(ranks[1].flatten().tolist())
    x = full.batch(e0[0], torch.Generator().manual_seed(0))
    assert x.shape == (8, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    everything = torch.arange(40)
    x, plain = full.batch(everything, torch.Generator().manual_seed(0)), full.batch(everything, flip=False)
    assert torch.equal(plain[0], torch.from_numpy(images[0]).permute(2, 0, 1).float() / 127.5 - 1)
    same = [torch.equal(a, b) for a, b in zip(x, plain)]
    mirrored = [torch.equal(a, b.flip(2)) for a, b in zip(x, plain)]
    assert all(s or m for s, m in zip(same, mirrored))  # each image is itself or its mirror
    assert 8 <= sum(not s for s in same) <= 32  # about half are flipped
    with pytest.raises(UsageError, match="--batch-size"):
        data.DeviceBatches(images, batch_size=41, device="cpu")


def test_subset_is_random_not_leading():
    ordered = np.repeat(np.arange(10, dtype=np.uint8), 100)[:, None, None, None] * np.ones((1, 32, 32, 3), np.uint8)
    sub = data.subset(ordered, 50)
    assert len(sub) == 50 and len(np.unique(sub[:, 0, 0, 0])) > 5
    assert data.subset(ordered, 0) is ordered
