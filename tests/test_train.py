import json

import pytest
import torch

from fastddpm import train as train_mod
from fastddpm.checkpoint import load_checkpoint, read_checkpoint
from fastddpm.errors import DivergenceError
from fastddpm.train import EMA, Trainer, training_kernels
from tests.conftest import tiny_config


def _losses(trainer, steps):
    indices = trainer.batches.epoch_indices(0)
    out = []
    for i in range(steps):
        out.append(trainer.train_step(trainer.batches.batch(indices[i % len(indices)], trainer.gen)).item())
        trainer.step += 1
    return out


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_tiny_preset_learns_shapes(tmp_path, dtype):
    trainer = Trainer(tiny_config(dtype=dtype, train_size=2048, batch_size=32, T=100), tmp_path, torch.device("cpu"),
                      progress=False)
    losses = _losses(trainer, 200)
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.5 * first, (first, last)


@pytest.mark.parametrize("dtype,expected", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)])
def test_autocast_engages_for_the_requested_dtype(tmp_path, dtype, expected):
    trainer = Trainer(tiny_config(dtype=dtype), tmp_path, torch.device("cpu"), progress=False)
    seen = []
    trainer.model.up3.conv_out.conv2.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    _losses(trainer, 1)
    assert seen == [expected]
    assert next(trainer.model.parameters()).dtype == torch.float32  # fp32 master weights
    assert trainer.scaler.is_enabled() == (dtype == "fp16")
    if dtype == "fp16":
        no_scaler = Trainer(tiny_config(dtype="fp16", grad_scaler=False), tmp_path, torch.device("cpu"), progress=False)
        assert not no_scaler.scaler.is_enabled()


def test_ema_warms_up_and_keeps_the_schedule_out(tmp_path):
    trainer = Trainer(tiny_config(ema=0.9999), tmp_path, torch.device("cpu"), progress=False)
    assert len(trainer.ema.params) == len(list(trainer.model.parameters()))  # parameters only: no schedule
    assert not any("beta" in n or "alpha" in n for n in trainer.ema.names)
    start = [p.clone() for p in trainer.model.parameters()]
    _losses(trainer, 30)
    # with warm-up the EMA has moved most of the way to the trained weights after 30 steps, far more
    # than a plain 0.9999 average (which would still be ~99.7% initial weights)
    moved = sum((e - s).norm() for e, s in zip(trainer.ema.params, start))
    trained = sum((p.detach() - s).norm() for p, s in zip(trainer.model.parameters(), start))
    assert moved > 0.5 * trained


def test_fit_writes_metrics_plot_checkpoint_and_samples(tmp_path):
    cfg = tiny_config(epochs=2, n_samples=4)
    trainer = Trainer(cfg, tmp_path, torch.device("cpu"), progress=False)
    trainer.fit()
    trainer.write_samples()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(r["val_loss"] > 0 and r["train_loss"] > 0 for r in records)
    assert records[0]["lr"] == pytest.approx(1e-3)
    for name in ("loss.png", "samples.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model, diffusion, config = load_checkpoint(tmp_path / "checkpoint.pt")
    assert config == cfg and diffusion.T == cfg.T
    ema = read_checkpoint(tmp_path / "checkpoint.pt")["ema"]
    for name, p in model.named_parameters():  # load_checkpoint gives the EMA weights
        torch.testing.assert_close(p, ema[name])


def _train_cli(tmp_path, *extra):
    from tests.conftest import run_main

    argv = ["--data", "shapes", "--preset", "tiny", "--T", "20", "--batch-size", "16", "--train-size", "64",
            "--val-size", "16", "--n-samples", "0", "--lr", "1e-3", "--out", str(tmp_path), "--no-progress", *extra]
    return run_main(train_mod.main, argv)


def test_resume_is_exact(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _train_cli(straight, "--epochs", "2")[0] == 0
    assert _train_cli(split, "--epochs", "1")[0] == 0
    code, out, _ = _train_cli(split, "--epochs", "2", "--resume")
    assert code == 0 and "resuming" in out
    a, b = read_checkpoint(straight / "checkpoint.pt"), read_checkpoint(split / "checkpoint.pt")
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    assert a["step"] == b["step"] == 8
    lines = (split / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]


def test_resume_mid_epoch_is_exact(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _train_cli(straight, "--epochs", "1")[0] == 0
    trainer = Trainer(tiny_config(), split, torch.device("cpu"), progress=False)
    indices = trainer.batches.epoch_indices(0)
    for i in range(2):  # half an epoch, then a mid-epoch checkpoint, as --ckpt-every writes
        trainer.epoch_sum += trainer.train_step(trainer.batches.batch(indices[i], trainer.gen)).item()
        trainer.epoch_count += 1
        trainer.batch_in_epoch += 1
        trainer.step += 1
    trainer.save()
    assert _train_cli(split, "--epochs", "1", "--resume")[0] == 0
    a, b = read_checkpoint(straight / "checkpoint.pt"), read_checkpoint(split / "checkpoint.pt")
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert a["epoch_sum"] == 0 and b["step"] == a["step"]


def test_divergence_stops_with_exit_3_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    assert _train_cli(tmp_path, "--epochs", "1")[0] == 0
    good = read_checkpoint(tmp_path / "checkpoint.pt")
    real_step = Trainer.train_step

    def poisoned(self, x0):
        loss = real_step(self, x0)
        return loss * float("nan") if self.step >= 5 else loss

    monkeypatch.setattr(Trainer, "train_step", poisoned)
    code, _, err = _train_cli(tmp_path, "--epochs", "2", "--resume")
    assert code == 3
    assert "diverged at step" in err and "last good checkpoint" in err and err.count("\n") == 1
    after = read_checkpoint(tmp_path / "checkpoint.pt")
    assert after["step"] == good["step"] == 4
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["event"] == "diverged" and records[-1]["step"] <= 4 + train_mod.CHECK_EVERY


def test_save_refuses_non_finite_weights(tmp_path):
    trainer = Trainer(tiny_config(), tmp_path, torch.device("cpu"), progress=False)
    with torch.no_grad():
        next(trainer.model.parameters())[0] = float("inf")
    with pytest.raises(DivergenceError, match="non-finite weights"):
        trainer.save()
    assert not (tmp_path / "checkpoint.pt").exists()


def test_lr_is_divided_by_10_for_the_last_20_percent_of_epochs():
    cfg = tiny_config(epochs=500, lr=2e-4)
    assert [train_mod.lr_at(cfg, e) for e in (0, 399)] == [2e-4, 2e-4]
    assert [train_mod.lr_at(cfg, e) for e in (400, 499)] == pytest.approx([2e-5, 2e-5])
    assert train_mod.lr_at(tiny_config(epochs=5, lr=1e-3), 4) == pytest.approx(1e-4)


def test_ema_lerp_matches_the_formula():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, 0.9)
    before = [p.clone() for p in ema.params]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model, step=100)  # decay min(0.9, 101/110) = 0.9
    for e, b, p in zip(ema.params, before, model.parameters()):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * p.detach())


def test_ema_turned_on_at_resume_starts_from_the_trained_weights(tmp_path):
    assert _train_cli(tmp_path, "--epochs", "1", "--ema", "0")[0] == 0
    assert read_checkpoint(tmp_path / "checkpoint.pt")["ema"] is None
    trainer = Trainer(tiny_config(epochs=2, ema=0.9999), tmp_path, torch.device("cpu"), progress=False)
    ckpt = read_checkpoint(tmp_path / "checkpoint.pt")
    trainer.restore(ckpt)
    for name, e in zip(trainer.ema.names, trainer.ema.params):
        assert torch.equal(e, ckpt["model"][name])


def test_mid_epoch_checkpoint_resumes_only_with_the_same_number_of_processes(tmp_path):
    from fastddpm.errors import UsageError

    trainer = Trainer(tiny_config(), tmp_path, torch.device("cpu"), progress=False)
    trainer.batch_in_epoch = 1
    trainer.save()
    ckpt = read_checkpoint(tmp_path / "checkpoint.pt")
    ckpt["world"] = 2
    with pytest.raises(UsageError, match="mid-epoch by 2 process"):
        Trainer(tiny_config(), tmp_path, torch.device("cpu"), progress=False).restore(ckpt)


def test_auto_kernels_for_training_follow_the_measured_faster_path(tmp_path, monkeypatch):
    """Compiled on CUDA, "auto" means Inductor's own GroupNorm fusion (the H200 run measured it
    faster); an explicit choice is always kept, and without compile the model's rule applies."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert training_kernels("auto", cuda, compiled=True) == "torch"
    assert training_kernels("auto", cuda, compiled=False) == "auto"
    assert training_kernels("auto", cpu, compiled=True) == "auto"
    assert training_kernels("triton", cuda, compiled=True) == "triton"
    # the Trainer builds its model with that choice
    asked = []
    monkeypatch.setattr(train_mod, "training_kernels", lambda k, d, compiled: asked.append((k, compiled)) or "torch")
    trainer = Trainer(tiny_config(compile=False, kernels="auto"), tmp_path, cpu, progress=False)
    assert asked == [("auto", False)] and trainer.model.kernels == "torch"


def test_channels_last_trains_like_nchw(tmp_path):
    """--channels-last changes the memory layout only: same weights in NHWC, same loss trajectory."""
    nchw = Trainer(tiny_config(), tmp_path / "nchw", torch.device("cpu"), progress=False)
    nhwc = Trainer(tiny_config(channels_last=True), tmp_path / "nhwc", torch.device("cpu"), progress=False)
    assert nhwc.model.inc.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not nchw.model.inc.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert _losses(nhwc, 3) == pytest.approx(_losses(nchw, 3), rel=1e-4)


def test_resume_with_another_layout_keeps_the_fused_optimizer_working(tmp_path):
    """A --channels-last checkpoint resumed without the flag: the Adam moments take the NCHW
    layout of their parameters, which the fused Adam (used on CUDA) requires."""
    first = Trainer(tiny_config(channels_last=True), tmp_path, torch.device("cpu"), progress=False)
    _losses(first, 2)
    first.save()
    again = Trainer(tiny_config(), tmp_path, torch.device("cpu"), progress=False)
    again.restore(read_checkpoint(tmp_path / "checkpoint.pt"))
    for p, state in again.opt.state.items():
        assert state["exp_avg"].stride() == p.stride() and state["exp_avg_sq"].stride() == p.stride()
    params = list(again.model.parameters())
    fused = torch.optim.Adam(params, lr=1e-3, fused=True)
    fused.load_state_dict(again.opt.state_dict())
    for p in params:
        p.grad = torch.ones_like(p)
    fused.step()  # raises on moments laid out unlike their parameter
    assert all(torch.isfinite(p).all() for p in params)
