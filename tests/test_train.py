import contextlib
import json

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from fastddpm import train as train_mod
from fastddpm.checkpoint import load_checkpoint, read_checkpoint
from fastddpm.errors import DivergenceError, UsageError
from fastddpm.train import EMA, Trainer, read_metrics
from tests.conftest import tiny_config


def _losses(trainer, steps):
    indices = trainer.batches.epoch_indices(0)
    out = []
    for i in range(steps):
        out.append(trainer.train_step(trainer.batches.batch(indices[i % len(indices)], trainer.gen)).item())
        trainer.step += 1
    return out


def test_tiny_preset_learns_shapes(tmp_path):
    """120 steps of 16 at the demo's lr, in NHWC (the CPU's faster layout): the last 20 steps' loss at 0.21
    to 0.23 of the first 20's (seeds 0 and 1, 2026-11-28), 33 s on one core of CI's kind of CPU."""
    cfg = tiny_config(train_size=2048, batch_size=16, lr=2e-3, T=100, channels_last=True)
    trainer = Trainer(cfg, tmp_path, torch.device("cpu"), progress=False)
    losses = _losses(trainer, 120)
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.5 * first, (first, last)


def test_bf16_training_follows_the_fp32_loss_trajectory(tmp_path):
    """bf16 autocast (fp32 master weights, loss and optimizer) trains as fp32 does, which the test
    above shows learning: from the same weights, batches, t and noise, the losses of the first steps
    agree to bf16 rounding (0.1 % measured) and fall alike. Not a second 200-step run: on a CPU
    without native bf16 (AVX2 only, as CI's) a bf16 step costs ten fp32 ones
    (bench/results/2026-11-28-cpu-dtypes-layouts.json)."""
    runs = {dtype: _losses(Trainer(tiny_config(dtype=dtype, train_size=64, batch_size=8, T=100),
                                   tmp_path / dtype, torch.device("cpu"), progress=False), 8)
            for dtype in ("fp32", "bf16")}
    assert runs["bf16"] == pytest.approx(runs["fp32"], rel=2e-2)
    assert runs["bf16"] != runs["fp32"]  # autocast engaged: bf16 rounding shows in the losses
    assert runs["bf16"][-1] < 0.7 * runs["bf16"][0], runs["bf16"]


@pytest.mark.parametrize("avx512_bf16,amx,expected", [(False, False, "fp32"), (True, False, "bf16"),
                                                      (False, True, "bf16"), (None, None, "fp32")])
def test_the_demo_trains_in_bf16_only_where_the_cpu_computes_it(monkeypatch, avx512_bf16, amx, expected):
    """make demo's --dtype: bf16 on a CPU with AVX512-BF16 or AMX, fp32 on others (emulated bf16 is
    ten times slower there) and where torch cannot say (None: its private probes are gone)."""
    from fastddpm.config import fastest_cpu_dtype

    for name, value in (("_is_avx512_bf16_supported", avx512_bf16), ("_is_amx_tile_supported", amx)):
        if value is None:
            monkeypatch.delattr(torch.cpu, name, raising=False)
        else:
            monkeypatch.setattr(torch.cpu, name, lambda v=value: v)
    assert fastest_cpu_dtype() == expected


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
    # a short run drops too, mid-epoch: 80 % of 2 epochs is 1.6 (epoch-granular rounding never dropped it)
    two = tiny_config(epochs=2, lr=1e-3)
    assert [train_mod.lr_at(two, e) for e in (1.59, 1.6)] == pytest.approx([1e-3, 1e-4])


def test_the_lr_drops_at_its_step_mid_epoch_and_a_resume_keeps_that_step(tmp_path):
    """2 epochs of 7 steps: the drop at 1.6 epochs comes before the 13th step (after 5 of the second
    epoch's 7 batches), in one run and in one interrupted after its checkpoint at step 9, then resumed."""
    cfg = tiny_config(epochs=2, train_size=112, batch_size=16, val_size=0, lr=1e-3, ckpt_every=9)

    def lrs(trainer, stop_at=None):
        seen, real_step = [], trainer.train_step

        def step(x0):
            if trainer.step == stop_at:
                raise KeyboardInterrupt
            seen.append(trainer.opt.param_groups[0]["lr"])
            return real_step(x0)

        trainer.train_step = step
        with contextlib.suppress(KeyboardInterrupt):
            trainer.fit()
        return seen

    whole = lrs(Trainer(cfg, tmp_path / "whole", torch.device("cpu"), progress=False))
    assert whole == pytest.approx([1e-3] * 12 + [1e-4] * 2)
    assert lrs(Trainer(cfg, tmp_path / "r", torch.device("cpu"), progress=False), stop_at=10) == whole[:10]
    resumed = Trainer(cfg, tmp_path / "r", torch.device("cpu"), progress=False)
    resumed.restore(read_checkpoint(tmp_path / "r" / "checkpoint.pt"))
    assert resumed.step == 9 and lrs(resumed) == pytest.approx(whole[9:])


def test_a_train_size_above_the_data_s_is_said_and_trains_on_all(tmp_path, capsys):
    trainer = Trainer(tiny_config(train_size=100_000), tmp_path, torch.device("cpu"), progress=False)
    assert len(trainer.batches.data) == 8192
    said = "--train-size 100000: shapes (procedural) has 8,192 training images; training on all of them"
    assert said in capsys.readouterr().out


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
    trainer = Trainer(tiny_config(), tmp_path, torch.device("cpu"), progress=False)
    trainer.batch_in_epoch = 1
    trainer.save()
    ckpt = read_checkpoint(tmp_path / "checkpoint.pt")
    ckpt["world"] = 2
    with pytest.raises(UsageError, match="mid-epoch by 2 process"):
        Trainer(tiny_config(), tmp_path, torch.device("cpu"), progress=False).restore(ckpt)


def test_the_trainer_builds_its_model_with_the_kernels_training_kernels_chooses(tmp_path, monkeypatch):
    """(What "auto" chooses per card is tests/test_measured.py's.)"""
    cpu = torch.device("cpu")
    asked = []
    def chooser(kernels, device, compiled, mode, dtype, triton_ok):
        asked.append((kernels, compiled, mode, dtype))
        return "torch", ""

    monkeypatch.setattr(train_mod, "training_kernels", chooser)
    trainer = Trainer(tiny_config(compile=False, kernels="auto"), tmp_path, cpu, progress=False)
    assert asked == [("auto", False, "default", "fp32")] and trainer.model.kernels == "torch"


def test_compile_mode_reaches_torch_compile_and_marks_each_step(tmp_path, monkeypatch):
    """--compile-mode is handed to torch.compile ("default": torch's own default), and a compiled
    trainer opens every step for CUDA-graph trees, whose outputs a step may not read from the last."""
    modes, steps = [], []
    monkeypatch.setattr(torch, "compile", lambda net, mode=None: modes.append(mode) or net)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(1))
    cpu = torch.device("cpu")
    for mode in ("default", "reduce-overhead"):
        trainer = Trainer(tiny_config(compile=True, compile_mode=mode), tmp_path / mode, cpu, progress=False)
        _losses(trainer, 2)
    assert modes == [None, "reduce-overhead"] and len(steps) == 4
    _losses(Trainer(tiny_config(compile=False), tmp_path / "eager", cpu, progress=False), 2)
    assert len(steps) == 4
    with pytest.raises(UsageError, match="--compile-mode reduce-overhead: only with torch.compile"):
        Trainer(tiny_config(compile=False, compile_mode="reduce-overhead"), tmp_path / "x", cpu, progress=False)
    # a speed setting: this run's choice, not the checkpoint's
    args = train_mod.build_parser().parse_args(["--compile-mode", "max-autotune"])
    assert train_mod.config_from_args(args, tiny_config(compile_mode="reduce-overhead"), True).compile_mode == \
        "max-autotune"
    args = train_mod.build_parser().parse_args([])
    assert train_mod.config_from_args(args, tiny_config(compile_mode="reduce-overhead"), True).compile_mode == \
        "default"


class _Scaled(torch.nn.Module):
    """A "compiled" network that is wrong by a factor."""

    def __init__(self, net, factor):
        super().__init__()
        self.net, self.factor = net, factor

    def forward(self, x, t):
        return self.net(x, t) * self.factor


class _Stale(torch.nn.Module):
    """A "compiled" network whose outputs keep the values of its first call, as a CUDA-graph replay
    that never reads its new inputs would; its gradients are those of the present call."""

    def __init__(self, net):
        super().__init__()
        self.net, self.first = net, None

    def forward(self, x, t):
        out = self.net(x, t)
        if self.first is None:
            self.first = out.detach()
        return self.first + (out - out.detach())


def test_compiled_step_is_checked_against_eager_before_training(tmp_path, monkeypatch, capsys):
    """A compiled run first compares its step with the eager model's on the same batch, t and noise
    (after warm-up calls on other inputs, so that a CUDA-graph replay is what is checked), records it,
    and leaves the run exactly as it was: the losses match an uncompiled run's step for step."""
    cpu = torch.device("cpu")
    cfg = dict(epochs=2, train_size=48, val_size=0)
    monkeypatch.setattr(torch, "compile", lambda net, mode=None: _Scaled(net, 1.0))
    compiled = Trainer(tiny_config(compile=True, **cfg), tmp_path / "c", cpu, progress=False)
    records = compiled.fit()
    check = next(r for r in records if r.get("event") == "compile_check")
    assert check["loss_rel"] == 0.0 and check["grads_rel"] == 0.0 and check["tol"] == [2e-3, 2e-2]
    assert (check["kernels"], check["layout"]) == ("torch", "nchw")  # what "auto" became on the CPU
    assert "agrees with eager" in capsys.readouterr().out
    assert any(json.loads(line).get("event") == "compile_check" for line in
               (tmp_path / "c" / "metrics.jsonl").read_text().splitlines())
    eager = Trainer(tiny_config(compile=False, **cfg), tmp_path / "e", cpu, progress=False)
    assert [r["train_loss"] for r in records if "event" not in r] == [r["train_loss"] for r in eager.fit()]
    assert all(torch.equal(a, b) for a, b in zip(compiled.model.parameters(), eager.model.parameters()))


def test_non_finite_weights_stop_the_compile_check_as_a_divergence(tmp_path, monkeypatch):
    """Weights that are already NaN (a resumed run's) make the eager loss NaN: that is a divergence
    (exit 3, recorded), not a compiler fault (exit 4)."""
    monkeypatch.setattr(torch, "compile", lambda net, mode=None: _Scaled(net, 1.0))
    trainer = Trainer(tiny_config(compile=True, val_size=0), tmp_path, torch.device("cpu"), progress=False)
    with torch.no_grad():
        trainer.model.outc.bias.fill_(float("nan"))
    with pytest.raises(DivergenceError, match="before the first step"):
        trainer.fit()
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "diverged" and trainer.step == 0


class _Layouts(torch.nn.Module):
    """A "compiled" network that records whether each input came in channels_last."""

    def __init__(self, net, seen):
        super().__init__()
        self.net, self.seen = net, seen

    def forward(self, x, t):
        self.seen.append(x.is_contiguous(memory_format=torch.channels_last))
        return self.net(x, t)


def test_the_check_runs_the_compiled_network_in_the_run_s_memory_format(tmp_path, monkeypatch):
    """Under --channels-last the checked passes get NHWC inputs like every training step: a different
    layout would compile (and check) another graph than the one that trains."""
    seen = []
    monkeypatch.setattr(torch, "compile", lambda net, mode=None: _Layouts(net, seen))
    trainer = Trainer(tiny_config(compile=True, channels_last=True, epochs=1, train_size=32, val_size=0),
                      tmp_path, torch.device("cpu"), progress=False)
    trainer.fit()
    assert len(seen) == 1 + 3 + 2 and all(seen)  # 3 warm-up passes, the checked one, 2 training steps


@pytest.mark.parametrize("wrong", ["scaled", "stale"])
def test_a_compiled_step_that_disagrees_stops_the_run(tmp_path, monkeypatch, wrong):
    """Off by 2 %, or a replay of stale inputs: the run stops before its first step, exit 4, one line."""
    monkeypatch.setattr(torch, "compile",
                        lambda net, mode=None: _Scaled(net, 1.02) if wrong == "scaled" else _Stale(net))
    trainer = Trainer(tiny_config(compile=True, val_size=0), tmp_path / "t", torch.device("cpu"), progress=False)
    with pytest.raises(train_mod.CompiledStepError, match="disagrees with eager"):
        trainer.fit()
    assert trainer.step == 0 and not (tmp_path / "t" / "checkpoint.pt").exists()
    from tests.conftest import run_main

    code, _, err = run_main(train_mod.main, ["--data", "shapes", "--preset", "tiny", "--T", "20", "--epochs", "1",
                                             "--train-size", "32", "--batch-size", "16", "--val-size", "0",
                                             "--n-samples", "0", "--compile", "--device", "cpu",
                                             "--out", str(tmp_path / "cli")])
    assert code == 4 and err.count("\n") == 1 and err.startswith("error: the compiled training step (default mode) ")


def test_channels_last_trains_like_nchw(tmp_path):
    """--channels-last changes the memory layout only: same weights in NHWC, same loss trajectory."""
    nchw = Trainer(tiny_config(), tmp_path / "nchw", torch.device("cpu"), progress=False)
    nhwc = Trainer(tiny_config(channels_last=True), tmp_path / "nhwc", torch.device("cpu"), progress=False)
    assert nhwc.model.inc.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not nchw.model.inc.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert _losses(nhwc, 3) == pytest.approx(_losses(nchw, 3), rel=1e-4)


class _LayoutAudit(TorchDispatchMode):
    """Records every op whose output is an activation of the model (4D, one of its channel counts, one
    of its image sizes) newly stored in another layout than channels_last, and every fastddpm kernel
    called with inputs of mixed strides (the kernel would copy one of them to match)."""

    def __init__(self, channels: set, sizes: set):
        super().__init__()
        self.channels, self.sizes, self.nchw, self.mixed, self.ops = channels, sizes, [], [], set()

    def _activation(self, t) -> bool:
        return (isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[1] in self.channels
                and t.shape[2] == t.shape[3] and t.shape[2] in self.sizes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        self.ops.add(name)
        if name.startswith("fastddpm."):
            strides = {t.stride() for t in pytree.tree_leaves((args, kwargs)) if self._activation(t)}
            if len(strides) > 1:
                self.mixed.append(name)
        inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        storages = {t.untyped_storage().data_ptr() for t in inputs}
        # Views copy nothing (a consumer that needs another layout copies, and shows here); factories
        # (the noise's randn, copied into x0's layout) derive from no activation.
        self.nchw += [name for t in pytree.tree_leaves(out) if inputs and self._activation(t)
                      and t.untyped_storage().data_ptr() not in storages
                      and not t.is_contiguous(memory_format=torch.channels_last)]
        return out


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_a_channels_last_step_keeps_every_activation_channels_last(tmp_path, kernels):
    """--channels-last is NHWC end to end on the CPU, forward and backward, on both kernel paths: no op
    turns an activation back to NCHW (on a GPU each such flip costs a transpose, as cuDNN's NHWC
    convolutions do for NCHW inputs: 3.0 of 13.3 ms of the H100's compiled NCHW step of 2026-11-27)."""
    trainer = Trainer(tiny_config(channels_last=True, kernels=kernels, batch_size=2, train_size=8, val_size=0),
                      tmp_path, torch.device("cpu"), progress=False)
    model = trainer.model
    channels = {m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)} - {1}
    audit = _LayoutAudit(channels, {32, 16, 8, 4})
    x0 = torch.rand(2, 3, 32, 32) * 2 - 1  # two samples: a batch, at half the interpreter's time
    with audit:
        trainer.train_step(x0)
    assert len(audit.nchw) == 0 and len(audit.mixed) == 0, (audit.nchw, audit.mixed)
    # it saw the step: the backward's convolutions and, on the Triton path, both fused kernels
    seen = {"aten.convolution_backward.default"} | ({"fastddpm.group_norm_gelu.default",
                                                       "fastddpm.group_norm_gelu_backward.default"}
                                                      if kernels == "triton" else {"aten.native_group_norm.default"})
    assert seen <= audit.ops, seen - audit.ops
    c = max(channels)
    with _LayoutAudit(channels, {32, 16, 8, 4}) as control:  # the audit sees a flip or a mix where there is one
        x = torch.randn(2, c, 8, 8)
        torch.nn.functional.gelu(x)
        if kernels == "triton":
            from fastddpm.kernels.groupnorm_gelu import group_norm_gelu

            group_norm_gelu(x.contiguous(memory_format=torch.channels_last), torch.ones(c), torch.zeros(c), 1,
                            residual=x)
    assert control.nchw and bool(control.mixed) == (kernels == "triton")


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


class _FakeClock:
    """Wall time that moves only when a training step runs: one second a step."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _budgeted(tmp_path, budget_minutes, clock, resume=None, **overrides):
    # 7 steps an epoch by default: budget checks fall at epoch ends and every 10 steps
    cfg = tiny_config(**{**dict(time_budget=budget_minutes, epochs=10_000, train_size=112, batch_size=16, val_size=0),
                         **overrides})
    trainer = Trainer(cfg, tmp_path, torch.device("cpu"), progress=False)
    if resume:
        trainer.restore(read_checkpoint(tmp_path / "checkpoint.pt"))
    trainer.clock = clock
    seen = []  # (training seconds when the step starts, its lr)
    real_step = trainer.train_step

    def step(x0):
        seen.append((trainer.elapsed(), trainer.opt.param_groups[0]["lr"]))
        clock.now += 1.0
        return real_step(x0)

    trainer.train_step = step
    return trainer, seen


def _saved_steps(trainer, monkeypatch) -> list[int]:
    """The step of each checkpoint ``trainer`` writes from now on."""
    saved, real_save = [], trainer.save
    monkeypatch.setattr(trainer, "save", lambda: saved.append(trainer.step) or real_save())
    return saved


def test_time_budget_stops_the_run_drops_the_lr_at_80_percent_and_resumes_its_clock(tmp_path):
    clock = _FakeClock()
    trainer, seen = _budgeted(tmp_path, 1.0, clock)  # 60 s: 60 steps of one second
    records = trainer.fit()
    assert 60 <= trainer.step <= 60 + train_mod.CHECK_EVERY  # stops at the first check past the budget
    drop = next(t for t, lr in seen if lr < 1e-3)
    assert 48 <= drop <= 48 + train_mod.CHECK_EVERY and all(lr == pytest.approx(1e-4) for t, lr in seen if t > drop)
    assert records[-1]["event"] == "time_budget" and records[-1]["step"] == trainer.step
    assert read_checkpoint(tmp_path / "checkpoint.pt")["step"] == trainer.step  # stopped with a checkpoint
    stopped_at = trainer.step
    # --resume with a larger budget continues the clock where it stopped instead of restarting it
    again, seen = _budgeted(tmp_path, 1.5, _FakeClock(), resume=True)
    again.fit()
    assert seen[0][0] >= stopped_at and 90 <= again.step <= 90 + train_mod.CHECK_EVERY
    assert seen[0][1] == pytest.approx(1e-3)  # 80 % of 90 s is 72 s: full lr again until then
    assert next(t for t, lr in seen if lr < 1e-3) >= 72
    metrics = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics if r.get("event") == "time_budget"] == [stopped_at, again.step]  # both stops
    assert metrics[-1]["elapsed_seconds"] >= 90


def test_a_resume_keeps_the_history_and_an_epoch_s_latest_record_stands_for_it(tmp_path):
    """40-step epochs, a 15 s budget: the run stops at the check of step 20 with a partial record of epoch
    1. A re-run that trains nothing keeps it (and adds no second stop) and redraws the loss plot; a
    larger budget trains on, and the epoch's new partial record at step 30 supersedes the one of step 20."""
    def session(minutes, resume=None):
        trainer, _ = _budgeted(tmp_path, minutes, _FakeClock(), resume=resume, train_size=640)
        trainer.fit()
        return read_metrics(tmp_path)

    first = session(0.25)
    assert [(r.get("event"), r["epoch"], r["step"], r.get("partial")) for r in first] == [
        (None, 1, 20, True), ("time_budget", 1, 20, None)]  # the stop names the epoch it cut, as the record
    (tmp_path / "loss.png").unlink()
    assert session(0.25, resume=True) == first and (tmp_path / "loss.png").is_file()
    third = session(0.5, resume=True)
    assert [(r.get("event"), r["step"]) for r in third] == [("time_budget", 20), (None, 30), ("time_budget", 30)]


def test_ckpt_minutes_spaces_epoch_end_checkpoints_and_the_end_is_always_saved(tmp_path, monkeypatch):
    clock = _FakeClock()
    trainer, _ = _budgeted(tmp_path, 1.0, clock, ckpt_minutes=0.5)  # 7-second epochs, a checkpoint every 30 s
    saved = _saved_steps(trainer, monkeypatch)
    trainer.fit()
    assert saved[-1] == trainer.step and len(saved) <= 3, saved
    assert all(b - a >= 28 for a, b in zip(saved, saved[1:-1]))


def test_a_budget_spent_while_an_epoch_is_logged_still_ends_with_a_checkpoint(tmp_path, monkeypatch):
    """The budget runs out after a whole epoch's last check but before the next epoch starts (here while
    the epoch's record is written, as a slow loss plot does): the run must stop with that epoch saved.
    CI caught the trainer reading the clock twice there and ending without a checkpoint."""
    clock = _FakeClock()
    trainer, _ = _budgeted(tmp_path, 0.25, clock, ckpt_minutes=10)  # 15 s; epochs of 7 s; no cadence saves
    real_write = trainer.write_metrics

    def write_metrics(records, plot_title=None):
        if plot_title is not None and trainer.step == 14:  # the second epoch ends at 14 s: 1 s short
            clock.now += 5.0
        real_write(records, plot_title)

    monkeypatch.setattr(trainer, "write_metrics", write_metrics)
    records = trainer.fit()
    assert trainer.step == 14 and records[-1]["event"] == "time_budget"
    ckpt = read_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["step"] == 14 and ckpt["epoch"] == 2
    assert [r["epoch"] for r in read_metrics(tmp_path) if "event" not in r] == [1, 2]  # a record per saved epoch


def _with_a_slow_compile_check(trainer, clock, seconds: float, monkeypatch):
    """``trainer`` checks a compiled step first, and the check takes ``seconds`` of ``clock``."""
    monkeypatch.setattr(type(trainer), "checks_compiled_step", property(lambda self: True))

    def check():
        clock.now += seconds
        return {}

    monkeypatch.setattr(trainer, "check_compiled_step", check)


@pytest.mark.parametrize("resumed", [False, True])
def test_a_compile_check_that_spends_the_budget_still_ends_with_a_checkpoint(tmp_path, monkeypatch, resumed):
    """A run whose compile check outlasts its budget trains no further, but ends as every budgeted run
    does: with a checkpoint whose clock counts the check (a fresh run's at step 0), for --resume."""
    before = 0
    if resumed:  # 15 s of training first, without a check
        trainer, _ = _budgeted(tmp_path, 0.25, _FakeClock())
        trainer.fit()
        before = trainer.step
    clock = _FakeClock()
    trainer, _ = _budgeted(tmp_path, 0.5, clock, resume=resumed)
    _with_a_slow_compile_check(trainer, clock, 40.0, monkeypatch)
    records = trainer.fit()
    assert trainer.step == before and records[-1]["event"] == "time_budget"
    ckpt = read_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["step"] == before and ckpt["train_seconds"] >= before + 40.0


def test_ckpt_every_on_an_epoch_end_saves_there_whatever_the_minutes_cadence(tmp_path, monkeypatch):
    trainer, _ = _budgeted(tmp_path, 0.5, _FakeClock(), ckpt_every=7, ckpt_minutes=10)  # 7-step epochs, 30 s
    saved = _saved_steps(trainer, monkeypatch)
    trainer.fit()
    assert saved == [7, 14, 21, 28, 35], saved


def test_epoch_records_time_the_first_step_apart(tmp_path):
    """A first step that takes a second longer (as a compiling one does) is reported as warmup_seconds
    and left out of images_per_s."""
    import time

    trainer = Trainer(tiny_config(epochs=2), tmp_path, torch.device("cpu"), progress=False)
    real_step = trainer.train_step

    def step(x0):
        if trainer.step == 0:
            time.sleep(1.0)
        return real_step(x0)

    trainer.train_step = step
    records = trainer.fit()
    first, second = records
    assert first["warmup_seconds"] >= 1.0 and "warmup_seconds" not in second
    # the 3 steady steps' images over the epoch's time without the first step's, whatever the machine's
    # speed (a fixed factor over the epoch's rate failed under pytest-xdist's contention), so above the
    # epoch's rate with the slow step in it
    steady = 3 * 16 / (first["epoch_seconds"] - first["warmup_seconds"])
    assert first["images_per_s"] == pytest.approx(steady, rel=1e-9) and steady > 4 * 16 / first["epoch_seconds"]
    assert first["train_images"] == 64


def test_validation_off_is_said_once_at_the_start(tmp_path, capsys):
    trainer = Trainer(tiny_config(val_size=0, epochs=2), tmp_path / "a", torch.device("cpu"), progress=False)
    trainer.fit()
    out = capsys.readouterr().out
    assert out.count("validation loss: off (--val-size 0)") == 1 and "val n/a" not in out
    folder = tmp_path / "only-train"
    (folder / "train" / "a").mkdir(parents=True)
    from PIL import Image

    for i in range(16):
        Image.new("RGB", (32, 32), (i * 10, 0, 0)).save(folder / "train" / "a" / f"{i}.png")
    Trainer(tiny_config(data=str(folder), train_size=0), tmp_path / "b", torch.device("cpu"), progress=False)
    out = capsys.readouterr().out
    assert out.count("validation loss: off") == 1 and "has no test split" in out, out


def test_samples_use_the_runs_own_schedule(tmp_path, monkeypatch):
    """write_samples hands sample() the trainer's Diffusion, so custom betas reach the sampler."""
    trainer = Trainer(tiny_config(beta_start=1e-3, beta_end=0.05, n_samples=2), tmp_path, torch.device("cpu"),
                      progress=False)
    from fastddpm import sampling

    got = {}
    real = sampling.sample
    monkeypatch.setattr(sampling, "sample", lambda *a, **k: got.update(k) or real(*a, **k))
    trainer.write_samples()
    assert got["diffusion"].config() == {"T": 20, "beta_start": 1e-3, "beta_end": 0.05}
