"""The public API as a new user meets it: the names `import fastddpm` promises are what they say
after any sequence of imports and calls (each import order in a fresh interpreter, since this test
process has imported everything already), the commands print no warnings, and every bad argument
is one clear error naming the value given and what is allowed."""
import subprocess
import sys

import pytest
import torch

import fastddpm
from fastddpm.errors import UsageError
from tests.conftest import ROOT

PUBLIC = {"UNet": "class", "Diffusion": "class", "sample": "function", "save_grid": "function",
          "load_checkpoint": "function"}


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-W", "error", *args, *(["-c", code] if code else [])], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("first", ["", "import fastddpm.sample", "import fastddpm.train",
                                   "from fastddpm.sample import main", "import fastddpm.sampling, fastddpm.images",
                                   "from fastddpm import sample, save_grid, load_checkpoint"])
def test_public_names_survive_any_import_order(first):
    """The README's snippet, twice, after ``first``: `fastddpm.sample` is the function every time."""
    code = f"""{first}
import inspect
import fastddpm
kinds = {PUBLIC!r}
for name, kind in kinds.items():
    obj = getattr(fastddpm, name)
    assert (inspect.isclass(obj) if kind == "class" else inspect.isfunction(obj)), (name, obj)
m = fastddpm.UNet(base_channels=4)
for _ in range(2):
    images = fastddpm.sample(m, 2, T=3, progress=False)
    assert images.shape == (2, 3, 32, 32) and images.dtype.is_floating_point is False
import fastddpm.sample, fastddpm.sampling, fastddpm.checkpoint, fastddpm.images, fastddpm.diffusion
assert inspect.isfunction(fastddpm.sample) and fastddpm.sample(m, 1, T=2, progress=False).shape[0] == 1
print("ok")
"""
    proc = _python(code)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.mark.parametrize("module", ["fastddpm.sample", "fastddpm.train", "fastddpm.evaluate", "fastddpm.study"])
def test_commands_print_no_warnings(module):
    proc = _python("", "-m", module, "--help")
    assert proc.returncode == 0 and proc.stderr == "" and proc.stdout.startswith("usage:"), proc.stderr


@pytest.fixture(scope="module")
def model():
    return fastddpm.UNet(base_channels=4)


def _bad_calls(model, tmp_path):
    """(what is called, its arguments, words the message must hold): the given value, and what is allowed."""
    S = fastddpm.sample
    ok = dict(T=10, progress=False)
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    return [
        (S, (model, 0), ok, ["n=0", "positive integer"]),
        (S, (model, 2.5), ok, ["n=2.5", "positive integer"]),
        (S, (model, 2), {**ok, "batch_size": 0}, ["batch_size=0", "positive integer"]),
        (S, (model, 2), {**ok, "sampler": "euler"}, ["sampler='euler'", "ddpm, ddim, dpm++"]),
        (S, (model, 2), {**ok, "sampler": "ddim", "steps": 0}, ["steps=0", "between 1 and", "T=10"]),
        (S, (model, 2), {**ok, "sampler": "dpm++", "steps": 11}, ["steps=11", "between 1 and", "T=10"]),
        (S, (model, 2), {**ok, "steps": 5}, ["steps=5", "ddpm sampler runs all T=10"]),
        (S, (model, 2), {**ok, "sampler": "ddim"}, ["sampler='ddim'", "default of 50 steps", "T=10", "give steps"]),
        (S, (model, 2), {**ok, "sampler": "ddim", "eta": -1.0}, ["eta=-1.0", "[0, 1]"]),
        (S, (model, 2), {**ok, "sampler": "ddim", "eta": 5}, ["eta=5", "[0, 1]"]),
        (S, (model, 2), {**ok, "sampler": "dpm++", "eta": 0.5}, ["eta=0.5", "ddim sampler only"]),
        (S, (model, 2), {**ok, "engine": "turbo"}, ["engine='turbo'", "eager"]),
        (S, (model, 2), {**ok, "noise": "white"}, ["noise='white'", "philox"]),
        (S, (model, 2), {**ok, "channels_last": "yes"}, ["channels_last='yes'", "True (NHWC), False (NCHW) or None"]),
        (S, (model, 2), {**ok, "seed": -1}, ["seed=-1", "[0, 2**63)"]),
        (S, (model, 2), {**ok, "dtype": "fp8"}, ["fp8", "fp32, fp16, bf16"]),
        (S, (model, 2), {**ok, "trajectory_at": [10]}, ["trajectory_at=10", "[0, T=10)"]),
        (S, (model, 2), {**ok, "device": "tpu"}, ["device='tpu'", "cpu, cuda or cuda:N"]),
        (S, (model, 2), {"progress": False}, ["give T=", "diffusion="]),
        (S, (model, 2), {**ok, "diffusion": fastddpm.Diffusion(20)}, ["T=10", "diffusion.T=20"]),
        (S, (model, 2), {"diffusion": "linear"}, ["diffusion='linear'", "fastddpm.Diffusion"]),
        (S, (tmp_path / "none.pt", 2), {}, ["none.pt", "no such file"]),
        (fastddpm.UNet, (), {"base_channels": 6}, ["base_channels=6", "multiple of 4"]),
        (fastddpm.UNet, (), {"in_channels": 0}, ["in_channels=0", "positive integer"]),
        (fastddpm.UNet, (), {"kernels": "cuda"}, ["kernels='cuda'", "auto, triton, torch"]),
        (fastddpm.Diffusion, (0,), {}, ["T=0", "positive integer"]),
        (fastddpm.Diffusion, (2.5,), {}, ["T=2.5", "positive integer"]),
        (fastddpm.Diffusion, (10,), {"beta_start": 0.1, "beta_end": 0.01}, ["beta_start=0.1", "beta_end=0.01",
                                                                            "0 < beta_start <= beta_end < 1"]),
        (fastddpm.save_grid, (images.float(), tmp_path / "g.png"), {}, ["float32", "uint8"]),
        (fastddpm.save_grid, (images, tmp_path / "g.png"), {"nrow": 0}, ["nrow=0", ">= 1"]),
        (fastddpm.save_grid, (images, tmp_path / "g.png"), {"scale": 0}, ["scale=0", ">= 1"]),
        (fastddpm.save_grid, (images, tmp_path / "g.jpg"), {}, ["g.jpg", "written as PNG", ".png"]),
        (fastddpm.load_checkpoint, (tmp_path / "none.pt",), {}, ["none.pt", "no such file"]),
        (fastddpm.load_checkpoint, (tmp_path / "none.pt",), {"device": "gpu0"}, ["device='gpu0'", "cpu, cuda"]),
    ]


def test_every_bad_argument_is_one_clear_error(model, tmp_path):
    for fn, args, kwargs, words in _bad_calls(model, tmp_path):
        with pytest.raises(ValueError) as err:
            fn(*args, **kwargs)
        message = str(err.value)
        assert "\n" not in message and all(w in message for w in words), (fn.__name__, kwargs, message)


def test_usage_errors_are_value_errors():
    assert issubclass(UsageError, ValueError)
