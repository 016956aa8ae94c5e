import re

import pytest
import torch

from fastddpm.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from fastddpm.errors import UsageError
from fastddpm.train import Trainer
from tests.conftest import tiny_config


@pytest.fixture
def trainer(tmp_path):
    t = Trainer(tiny_config(), tmp_path, torch.device("cpu"), progress=False)
    t.fit()
    return t


def test_round_trip_with_weights_only_and_ema(trainer, tmp_path):
    raw = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # plain tensors and data only
    assert raw["format"] == "fastddpm-checkpoint" and raw["config"]["T"] == 20
    # what the config's "auto" became, beside it: on the CPU, eager PyTorch in NCHW
    assert (raw["config"]["kernels"], raw["config"]["channels_last"]) == ("auto", None)
    assert raw["ran"] == {"compile": False, "compile_mode": None, "kernels": "torch", "layout": "nchw", "device": "cpu"}
    model, diffusion, config = load_checkpoint(tmp_path / "checkpoint.pt")
    assert not model.training and config.preset == "tiny"
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    ema_model = trainer.ema.copy_to(type(trainer.model)(trainer.cfg.base_channels))
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), ema_model(x, t))
    raw_model = load_checkpoint(tmp_path / "checkpoint.pt", ema=False).model
    for a, b in zip(raw_model.parameters(), trainer.model.parameters()):
        assert torch.equal(a, b)
    torch.testing.assert_close(diffusion.alpha_bars, trainer.diffusion.alpha_bars)


def test_exported_weights_sample_like_the_checkpoint_and_cannot_be_resumed(trainer, tmp_path):
    from fastddpm.checkpoint import export_weights

    export_weights(tmp_path / "checkpoint.pt", tmp_path / "ema-fp16.pt")
    full, exported = tmp_path / "checkpoint.pt", tmp_path / "ema-fp16.pt"
    assert exported.stat().st_size < 0.3 * full.stat().st_size  # no optimizer state, one copy, fp16
    assert read_checkpoint(exported)["ran"] == read_checkpoint(full)["ran"]  # what auto became, kept
    model, _, config = load_checkpoint(exported)
    for p in model.parameters():
        assert p.dtype == torch.float32  # loaded back into the fp32 model
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    with torch.no_grad():  # the EMA weights, rounded to fp16
        torch.testing.assert_close(model(x, t), load_checkpoint(full).model(x, t), rtol=2e-2, atol=2e-2)
    with pytest.raises(UsageError, match="exported weights only"):
        Trainer(config, tmp_path / "again", torch.device("cpu"), progress=False).restore(read_checkpoint(exported))


def test_a_failed_write_leaves_the_previous_checkpoint_intact(trainer, tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    before = path.read_bytes()

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"config": {}}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    read_checkpoint(path)


def test_version_and_header_are_checked(trainer, tmp_path):
    raw = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    raw["version"] = 99
    torch.save(raw, tmp_path / "future.pt")
    with pytest.raises(UsageError, match="format version 99"):
        read_checkpoint(tmp_path / "future.pt")
    with pytest.raises(UsageError, match="no such file"):
        read_checkpoint(tmp_path / "missing.pt")


@pytest.mark.parametrize("damage", ["no-model", "unknown-preset", "no-config"])
def test_damaged_checkpoints_are_one_line_errors(trainer, tmp_path, damage):
    raw = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    if damage == "no-model":
        del raw["model"]
    elif damage == "no-config":
        del raw["config"]
    else:
        raw["config"]["preset"] = "huge"
    torch.save(raw, tmp_path / "damaged.pt")
    with pytest.raises(UsageError, match="damaged fastddpm checkpoint") as err:
        load_checkpoint(tmp_path / "damaged.pt")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("content", ["text", "truncated"])
def test_unreadable_files_are_named_without_torchs_text(tmp_path, content):
    """No pickle opcode ("101" for a text file) nor torch's long zip message, cut off mid-word."""
    path = tmp_path / "bad.pt"
    torch.save({"weights": torch.zeros(1000)}, path)
    path.write_bytes(b"hello\n" if content == "text" else path.read_bytes()[:500])
    with pytest.raises(UsageError) as err:
        read_checkpoint(path)
    assert str(err.value) == (f"checkpoint {path}: not a fastddpm checkpoint (truncated or foreign file); point at a "
                              "file written by fastddpm.train")


def test_a_directory_is_not_a_checkpoint(tmp_path):
    expected = f"checkpoint {tmp_path}: is a directory; give a checkpoint file in it, e.g. {tmp_path / 'checkpoint.pt'}"
    with pytest.raises(UsageError, match=f"^{re.escape(expected)}$"):
        read_checkpoint(tmp_path)


def test_an_unreadable_checkpoint_says_so(tmp_path, monkeypatch):
    """Not "truncated or foreign": the file may be fine (tests run as root, so torch.load is made to refuse)."""
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    (tmp_path / "c.pt").write_bytes(b"x")
    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(UsageError, match=r"c\.pt: permission denied; make it readable$"):
        read_checkpoint(tmp_path / "c.pt")
