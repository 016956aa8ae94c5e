"""Training (section 3.3): ``python -m fastddpm.train --dtype bf16 --T 2000``.

Adam on the eq. 13 loss, lr divided by 10 for the last 20% of the run (of the epochs, or of the
--time-budget), mixed precision by autocast over fp32 master weights (fp16 with torch.amp's
GradScaler unless --no-grad-scaler), an EMA of the weights with warm-up, per-epoch train/validation
loss in OUT/metrics.jsonl and OUT/loss.png, atomic resumable checkpoints in OUT/checkpoint.pt, and
OUT/samples.png at the end.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from fastddpm import data as data_mod
from fastddpm.checkpoint import read_checkpoint, save_checkpoint
from fastddpm.config import DTYPES, PRESETS, TrainConfig
from fastddpm.diffusion import Diffusion
from fastddpm.errors import ArgumentParser, CompiledStepError, DivergenceError, UsageError, run_cli
from fastddpm.files import atomic_write
from fastddpm.model import UNet, auto_kernels
from fastddpm.progress import progress_bar, progress_enabled
from fastddpm.sampling import autocast, check_device

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CHECK_EVERY = 10  # steps between loss read-backs (divergence check, progress bar): no sync per step
# Changing these on --resume would silently train a different model.
FIXED_ON_RESUME = ("data", "T", "dtype", "grad_scaler", "preset", "beta_start", "beta_end", "batch_size", "seed",
                   "train_size")


# Before a compiled run trains, its step must agree with the eager model's on the same batch, t and noise:
# ||compiled - eager|| / ||eager|| of the loss and of all the gradients, per dtype (bench/common.py's guard
# uses the same bounds). The checked call comes after COMPILED_WARMUP_CALLS others on other inputs, so
# that under CUDA graphs (--compile-mode reduce-overhead: run, record, then replay) it is a replay.
COMPILE_CHECK_TOL = {"fp32": (2e-3, 2e-2), "fp16": (1e-2, 5e-2), "bf16": (5e-2, 1.5e-1)}
COMPILED_WARMUP_CALLS = 3
WARMUP_SEED_OFFSET = 7_919_333  # the warm-up passes' own random stream: cfg.seed + this
# dL/d(eps) at batch 256 is ~1e-7, under fp16's normal range: a moderate fixed scale (not the GradScaler's
# 65,536, which may overflow a first step) keeps the compared gradients representable
COMPILE_CHECK_FP16_SCALE = 2.0 ** 10


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp64 (inf when a is not finite)."""
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    if not torch.isfinite(a).all():
        return math.inf
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


class EMA:
    """Exponential moving average of the parameters only: the diffusion schedule is not a module
    buffer, so it can never be averaged. Warm-up decay min(decay, (1+n)/(10+n)) so that short runs
    do not sample from near-initial weights."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, _ in model.named_parameters()]
        self.params = [p.detach().clone().float() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.params, [p.detach() for p in model.parameters()], 1.0 - d)

    def state_dict(self) -> dict:
        return {n: p.clone() for n, p in zip(self.names, self.params)}

    def load_state_dict(self, state: dict) -> None:
        for n, p in zip(self.names, self.params):
            p.copy_(state[n])

    def copy_to(self, model: torch.nn.Module) -> torch.nn.Module:
        with torch.no_grad():
            for p, e in zip(model.parameters(), self.params):
                p.copy_(e)
        return model


@torch.no_grad()
def validation_loss(model, diffusion, images: torch.Tensor, batch_size: int, dtype, seed: int) -> float:
    """Eq. 13 on the validation images with t and noise from a fixed seed, so epochs compare."""
    gen = torch.Generator(images.device).manual_seed(seed + 7919)
    total, count = torch.zeros((), device=images.device), 0
    was_training = model.training
    model.eval()
    for s in range(0, len(images), batch_size):
        x0 = images[s:s + batch_size].float().div(127.5).sub(1.0)
        with autocast(images.device, dtype):
            total += diffusion.loss(model, x0, generator=gen) * len(x0)
        count += len(x0)
    model.train(was_training)
    return total.item() / max(count, 1)


def lr_at(cfg: TrainConfig, epochs_done: float, elapsed: float = 0.0) -> float:
    """The paper's schedule: lr / 10 for the last 20 % of the run, which ends after cfg.epochs epochs or,
    with a time budget, after cfg.time_budget minutes of training, whichever comes first: the drop
    comes at 80 % of either. ``epochs_done`` counts a started epoch's fraction, so that a short run drops
    too (2 epochs: at 1.6, not never); at 500 epochs the drop is epoch 400's start, as in the paper."""
    late = epochs_done >= cfg.epochs * cfg.lr_drop_at - 1e-9  # 3 * 0.8 is 2.4000000000000004 in floats
    if cfg.time_budget:
        late = late or elapsed >= cfg.lr_drop_at * cfg.time_budget * 60
    return cfg.lr / 10 if late else cfg.lr


def read_metrics(out: Path) -> list[dict]:
    path = out / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_metrics(out: Path, records: list[dict]) -> None:
    with atomic_write(out / METRICS) as f:
        f.write("".join(json.dumps(r) + "\n" for r in records).encode())


def match_optimizer_layout(opt: torch.optim.Optimizer) -> None:
    """Give each optimizer state tensor its parameter's memory layout. ``load_state_dict`` keeps
    the strides of the run that saved it, and the fused Adam refuses moments laid out unlike
    their parameter (a --channels-last run resumed without the flag, or the reverse)."""
    for p, state in opt.state.items():
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and v.shape == p.shape and v.stride() != p.stride():
                state[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def training_kernels(kernels: str, device: torch.device, compiled: bool, compile_mode: str, dtype: str,
                     triton_ok: bool) -> tuple[str, str]:
    """(the GroupNorm+GELU path a training run uses, why). "auto" under torch.compile on CUDA is the
    path whose compiled step measured faster on this kind of card, in this dtype and compile mode
    (``fastddpm.measured``, which says what stands in for a measurement it lacks); torch where Triton
    is unavailable. On the H200 that is the torch path in every dtype: Inductor fuses GroupNorm+GELU
    itself, and that step ran 1.2 to 1.5x faster than the one with the Triton kernels. Uncompiled,
    or on the CPU, "auto" keeps the model's own rule (Triton on CUDA)."""
    if kernels != "auto" or not compiled or device.type != "cuda":
        return kernels, "asked for" if kernels != "auto" else "auto: the model's own rule"
    from fastddpm.measured import choice_for

    path, why = choice_for(device, dtype, compile_mode)
    if path == "triton" and not triton_ok:
        return "torch", f"auto: Triton is unavailable here, so not the Triton path that {why}"
    return path, f"auto: {why}"


def training_layout(channels_last: bool | None, device: torch.device, compiled: bool, compile_mode: str,
                    dtype: str, kernels: str) -> tuple[bool, str]:
    """(channels_last, why) for a training run on GroupNorm path ``kernels``. None (auto) under
    torch.compile on CUDA is the layout in which that path's compiled step measured faster on this
    kind of card, in this dtype and compile mode (``fastddpm.measured``; on the H100 in bf16 under
    reduce-overhead, the Triton path in NHWC); NCHW wherever that was not measured."""
    if channels_last is not None:
        return channels_last, "asked for"
    if not compiled or device.type != "cuda":
        return False, "auto: NCHW (layouts are measured for compiled steps on CUDA only)"
    from fastddpm.measured import layout_choice_for

    nhwc, why = layout_choice_for(device, dtype, compile_mode, kernels)
    return nhwc, f"auto: {why}"


class Trainer:
    """One training run. With ``world > 1`` (under torchrun) the model is wrapped in PyTorch's
    DistributedDataParallel, each rank draws a disjoint shard of every epoch, and rank 0 alone
    writes checkpoints, logs and samples."""

    def __init__(self, cfg: TrainConfig, out: Path, device: torch.device, progress: bool = True,
                 rank: int = 0, world: int = 1):
        self.cfg, self.out, self.device, self.rank, self.world = cfg, Path(out), device, rank, world
        self.progress = progress and rank == 0
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        compile_ = cfg.compile if cfg.compile is not None else device.type == "cuda"
        from fastddpm.kernels import unavailable_reason

        if cfg.kernels == "triton" and unavailable_reason(device):
            raise UsageError(f"--kernels triton: {unavailable_reason(device)}")
        kernels, why = training_kernels(cfg.kernels, device, compile_, cfg.compile_mode, cfg.dtype,
                                        unavailable_reason(device) is None)
        self.model = UNet(cfg.base_channels, kernels=kernels).to(device)
        # what runs, recorded with the compile check (the model resolves its own "auto" the same way)
        self.kernels = auto_kernels(device.type == "cuda") if kernels == "auto" else kernels
        if kernels != cfg.kernels:  # what "auto" became, and on what measurement
            self.log(f"GroupNorm+GELU kernels: {kernels} ({why})")
        channels_last, why = training_layout(cfg.channels_last, device, compile_, cfg.compile_mode, cfg.dtype,
                                             kernels)
        if cfg.channels_last is None and device.type == "cuda":  # what "auto" became, and on what measurement
            self.log(f"memory layout: {'NHWC' if channels_last else 'NCHW'} ({why})")
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model.to(memory_format=self.memory_format)
        self.net = self.model  # what the training step calls: DDP and/or compiled wrappers of the model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        if cfg.compile_mode != "default" and not compile_:
            raise UsageError(f"--compile-mode {cfg.compile_mode}: only with torch.compile (--compile; the default on "
                             f"CUDA), and this run does not compile")
        self.compiled = compile_
        if compile_:
            self.net = torch.compile(self.net, mode=None if cfg.compile_mode == "default" else cfg.compile_mode)
        self.diffusion = Diffusion(cfg.T, cfg.beta_start, cfg.beta_end, device=device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, fused=device.type == "cuda")
        use_scaler = cfg.dtype == "fp16" and cfg.grad_scaler
        self.scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
        self.ema = EMA(self.model, cfg.ema) if cfg.ema > 0 else None
        self.gen = torch.Generator(device).manual_seed(cfg.seed + 1_000_003 * rank)
        train = data_mod.load_images(cfg.data, "train", progress=self.progress)
        if cfg.train_size > len(train):  # said, not refused: a study's tiny default asks 8,192 of any data
            self.log(f"--train-size {cfg.train_size}: {data_mod.describe(cfg.data)} has {len(train):,} training "
                     "images; training on all of them")
        train = data_mod.subset(train, cfg.train_size)
        self.batches = data_mod.DeviceBatches(train, cfg.batch_size, device, seed=cfg.seed, rank=rank, world=world)
        val = (data_mod.subset(data_mod.load_images(cfg.data, "test", progress=self.progress), cfg.val_size)
               if cfg.val_size else None)
        self.val = None if val is None else torch.from_numpy(val).to(device).permute(0, 3, 1, 2)
        if self.val is None:  # said once, at the start, rather than "val n/a" on every line
            self.log("validation loss: off (--val-size 0)" if not cfg.val_size else
                     f"validation loss: off ({data_mod.describe(cfg.data)} has no test split here: for a folder or "
                     "zip, test/ or test.zip beside train/ or train.zip)")
        self.epoch, self.batch_in_epoch, self.step = 0, 0, 0
        self.epoch_sum, self.epoch_count, self.epoch_seconds = 0.0, 0, 0.0
        # Steady-state timing apart from the one-off first step of this process (compilation).
        self.steady_seconds, self.steady_steps, self.warmup_seconds = 0.0, 0, None
        self.train_seconds = 0.0  # the --time-budget clock: training wall time over all sessions of the run
        self.last_good, self.saved_step, self.saved_at, self.restored = None, None, 0.0, False
        self.clock, self.clock_start = time.perf_counter, None  # the wall clock (tests give a fake one)

    # --- checkpoints ------------------------------------------------------------------------
    @property
    def ran(self) -> dict:
        """How this process trains: what the config's "auto" (kernels, layout, compile) became here. The
        checkpoint keeps the latest session's, beside the config that asked for it."""
        return {"compile": self.compiled, "compile_mode": self.cfg.compile_mode if self.compiled else None,
                "kernels": self.kernels, "layout": "nhwc" if self.memory_format == torch.channels_last else "nchw",
                "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else self.device.type}

    def payload(self) -> dict:
        return {
            "config": self.cfg.to_dict(),
            "ran": self.ran,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "optimizer": self.opt.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "step": self.step, "world": self.world,
            "epoch_sum": self.epoch_sum, "epoch_count": self.epoch_count, "epoch_seconds": self.epoch_seconds,
            "steady_seconds": self.steady_seconds, "steady_steps": self.steady_steps,
            "train_seconds": self.elapsed(),
            "rng": {"train": self.gen.get_state(), "torch": torch.get_rng_state()},
        }

    def save(self) -> None:
        # Every rank checks (the replicas are identical, so they agree) and stops together.
        bad = [n for n, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        if bad or not math.isfinite(self.epoch_sum):
            raise DivergenceError(f"non-finite {'weights (' + bad[0] + ')' if bad else 'loss'}")
        if self.rank != 0:
            return
        save_checkpoint(self.payload(), self.out / CHECKPOINT)
        self.last_good, self.saved_step = (self.epoch, self.batch_in_epoch), self.step

    def restore(self, ckpt: dict) -> None:
        if "exported" in ckpt:
            raise UsageError("the checkpoint holds exported weights only (for sampling: no optimizer state); it "
                             "cannot be resumed: train from the full checkpoint it was exported from")
        if ckpt["batch_in_epoch"] and ckpt.get("world", 1) != self.world:
            raise UsageError(f"the checkpoint was written mid-epoch by {ckpt.get('world', 1)} process(es): resume it "
                             f"with {ckpt.get('world', 1)}, or from an epoch-end checkpoint with any number")
        self.model.load_state_dict(ckpt["model"])
        if self.ema and ckpt.get("ema"):
            self.ema.load_state_dict(ckpt["ema"])
        elif self.ema:  # EMA turned on at resume: start it from the trained weights, not the initial ones
            self.ema = EMA(self.model, self.cfg.ema)
        self.opt.load_state_dict(ckpt["optimizer"])
        match_optimizer_layout(self.opt)  # --channels-last is this run's choice, not the checkpoint's
        if self.scaler.is_enabled() and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.batch_in_epoch, self.step = ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["step"]
        self.epoch_sum, self.epoch_count = ckpt["epoch_sum"], ckpt["epoch_count"]
        self.epoch_seconds = ckpt["epoch_seconds"]
        self.steady_seconds, self.steady_steps = ckpt.get("steady_seconds", 0.0), ckpt.get("steady_steps", 0)
        self.train_seconds = ckpt.get("train_seconds", 0.0)  # a resumed budget continues its clock
        self.saved_at = self.train_seconds
        if self.rank == 0:
            self.gen.set_state(ckpt["rng"]["train"])  # exact resume (single process: all of it)
        else:  # only rank 0's stream is saved; the others restart theirs, keyed by the step
            self.gen.manual_seed(self.cfg.seed + 1_000_003 * self.rank + self.step)
        torch.set_rng_state(ckpt["rng"]["torch"])
        self.last_good, self.saved_step, self.restored = (self.epoch, self.batch_in_epoch), self.step, True

    # --- the loop ---------------------------------------------------------------------------
    def _forward_backward(self, net, x0: torch.Tensor, scale_loss) -> torch.Tensor:
        """Eq. 13's loss of ``net`` on ``x0`` (t and noise from the run's stream), and the gradients of
        ``scale_loss(loss)``; the training step and the compiled-step check share it."""
        if self.compiled and net is self.net:  # a new step for CUDA-graph trees (reduce-overhead):
            torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are dead
        # Gradients dropped before the forward: under CUDA-graph trees they may live in the graphs' memory
        self.opt.zero_grad(set_to_none=True)
        x0 = x0.contiguous(memory_format=self.memory_format)
        with autocast(self.device, self.cfg.torch_dtype):
            loss = self.diffusion.loss(net, x0, generator=self.gen)
        scale_loss(loss).backward()
        return loss

    def train_step(self, x0: torch.Tensor) -> torch.Tensor:
        loss = self._forward_backward(self.net, x0, self.scaler.scale)
        self.scaler.step(self.opt)
        self.scaler.update()
        if self.ema:
            self.ema.update(self.model, self.step)
        return loss.detach()

    def loss_and_grads(self, net, x0: torch.Tensor, rng_state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 13's loss and all gradients of one forward/backward of ``net`` on ``x0`` (in the run's
        memory format, as train_step gives it), t and noise drawn from ``rng_state``; no optimizer step.
        fp16 backpropagates a loss scaled by COMPILE_CHECK_FP16_SCALE (and unscales the gradients), so
        that small gradients are compared rather than flushed to zero differently by each path."""
        self.gen.set_state(rng_state)
        scale = COMPILE_CHECK_FP16_SCALE if self.cfg.dtype == "fp16" else 1.0
        loss = self._forward_backward(net, x0, lambda loss: loss * scale)
        grads = torch.cat([p.grad.detach().float().flatten() for p in self.model.parameters()]) / scale
        self.opt.zero_grad(set_to_none=True)
        return loss.detach().float(), grads

    def warm_up_compiled(self, x0: torch.Tensor) -> None:
        """COMPILED_WARMUP_CALLS passes of the compiled network on ``x0`` with t and noise from a stream
        of their own (never the run's, nor a checked pass's); the run's random stream is left as it was."""
        saved = self.gen.get_state()
        self.gen.manual_seed(self.cfg.seed + WARMUP_SEED_OFFSET)
        for _ in range(COMPILED_WARMUP_CALLS):
            self.loss_and_grads(self.net, x0, self.gen.get_state())
        self.gen.set_state(saved)

    @property
    def checks_compiled_step(self) -> bool:
        """A compiled single-process run checks its step before it trains (under DDP the gradients are
        averaged over ranks, which the eager model alone cannot match)."""
        return self.compiled and self.world == 1

    def check_compiled_step(self) -> dict:
        """The compiled step against the eager model's on this run's next batch (see COMPILE_CHECK_TOL);
        raises CompiledStepError when they disagree. Leaves the weights, the optimizer and the random
        stream as they were; its time (the compilation) is on the run's clock."""
        start, saved = self.clock(), self.gen.get_state()
        x0 = self.batches.batch(self.batches.epoch_indices(self.epoch)[self.batch_in_epoch], self.gen)
        inputs = self.gen.get_state()
        want = self.loss_and_grads(self.model, x0, inputs)
        if not torch.isfinite(want[0]):  # eager itself: the weights (a resumed run's), not the compiler
            self.gen.set_state(saved)
            raise DivergenceError(f"the loss is {want[0].item()} before the first step (the eager model's, "
                                  f"checking the compiled step)")
        self.warm_up_compiled(x0)  # other t and noise: a replay that ignores its new inputs shows
        got = self.loss_and_grads(self.net, x0, inputs)
        self.gen.set_state(saved)
        tol_loss, tol_grads = COMPILE_CHECK_TOL[self.cfg.dtype]
        report = {"loss_rel": relative_error(got[0], want[0]), "grads_rel": relative_error(got[1], want[1]),
                  "tol": [tol_loss, tol_grads], "mode": self.cfg.compile_mode, "kernels": self.ran["kernels"],
                  "layout": self.ran["layout"], "seconds": self.clock() - start}
        if not (report["loss_rel"] <= tol_loss and report["grads_rel"] <= tol_grads):  # NaN fails too
            raise CompiledStepError(
                f"the compiled training step ({self.cfg.compile_mode} mode) disagrees with eager: loss "
                f"{report['loss_rel']:.3g} (tolerance {tol_loss:g}), gradients {report['grads_rel']:.3g} (tolerance "
                f"{tol_grads:g}), relative; train with another --compile-mode or --no-compile")
        self.log(f"compiled step ({self.cfg.compile_mode} mode) agrees with eager: loss {report['loss_rel']:.1e}, "
                 f"gradients {report['grads_rel']:.1e} (relative; tolerances {tol_loss:g}, {tol_grads:g}); "
                 f"{report['seconds']:.1f} s, compilation included")
        return report

    def _check(self, window: torch.Tensor, n: int, bar) -> None:
        """Read the loss back (one sync per CHECK_EVERY steps); stop on NaN/Inf. Under DDP the
        window is averaged over ranks, so all of them see the same value and stop together."""
        if self.world > 1:
            torch.distributed.all_reduce(window)
            window /= self.world
        value = window.item()
        if not math.isfinite(value):
            raise DivergenceError(f"the loss became {value} within steps {self.step - n + 1}..{self.step}")
        self.epoch_sum += value
        self.epoch_count += n
        if bar is not None:
            bar.set_postfix(loss=f"{value / n:.4f}")

    def elapsed(self) -> float:
        """Seconds of training so far, over every session of this run (the --time-budget clock)."""
        running = self.clock() - self.clock_start if self.clock_start is not None else 0.0
        return self.train_seconds + running

    def shared_elapsed(self) -> float:
        """The clock every rank acts on: under DDP rank 0's (a collective: all ranks call it at the same
        points), so that they change the lr and stop at the same step and their replicas stay equal."""
        value = self.elapsed()
        # Only a budget or a checkpoint cadence acts on the clock: without them, no collective, no sync
        if self.world > 1 and (self.cfg.time_budget or self.cfg.ckpt_minutes):
            clock = torch.tensor([value], dtype=torch.float64, device=self.device)
            torch.distributed.broadcast(clock, src=0)
            value = clock.item()
        return value

    @property
    def epoch_label(self) -> int:
        """The epoch the latest step belongs to, numbered as the records number them (from 1): the epoch
        in progress where one is, else the last one finished (0 before any)."""
        return self.epoch + (1 if self.batch_in_epoch else 0)

    @property
    def epochs_done(self) -> float:
        """Epochs trained, a started one by its fraction (the lr schedule's clock)."""
        return self.epoch + self.batch_in_epoch / max(len(self.batches), 1)

    def budget_spent(self, elapsed: float) -> bool:
        return bool(self.cfg.time_budget) and elapsed >= self.cfg.time_budget * 60

    def set_lr(self, elapsed: float) -> float:
        lr = lr_at(self.cfg, self.epochs_done, elapsed)
        for group in self.opt.param_groups:
            group["lr"] = lr
        return lr

    def run_epoch(self) -> dict:
        """One epoch, or what the time budget leaves of it (then the record says "partial": true)."""
        cfg, steps = self.cfg, len(self.batches)
        elapsed = self.shared_elapsed()  # the budget's clock as of the last check: one value on every rank
        indices = self.batches.epoch_indices(self.epoch)
        of = f" ({cfg.time_budget:g} min budget)" if cfg.time_budget else f"/{cfg.epochs}"
        bar = progress_bar(total=steps, initial=self.batch_in_epoch, desc=f"epoch {self.epoch + 1}{of}", unit="batch",
                           enabled=self.progress)
        window, n = torch.zeros((), device=self.device), 0
        start, start_step, warmup = self.clock(), self.step, None
        stopped = False
        while self.batch_in_epoch < steps:
            first = self.warmup_seconds is None
            # Each step's lr: the drop at 80 % of the epochs comes at its step (mid-epoch too, the same step on
            # a resume), the budget's 80 % mark at the first step after the check that passed it.
            self.set_lr(elapsed)
            loss = self.train_step(self.batches.batch(indices[self.batch_in_epoch], self.gen))
            if first:  # compilation happens in this process's first step: time it apart
                loss.item()
                warmup = self.warmup_seconds = self.clock() - start
            window += loss
            self.batch_in_epoch += 1
            self.step += 1
            n += 1
            bar.update(1)
            at_end = self.batch_in_epoch == steps
            if n == CHECK_EVERY or at_end or (cfg.ckpt_every and self.step % cfg.ckpt_every == 0):
                self._check(window, n, bar)
                window, n = torch.zeros((), device=self.device), 0
                elapsed = self.shared_elapsed()  # the budget's 80 % mark is passed at most CHECK_EVERY steps late
                stopped = self.budget_spent(elapsed) and not at_end
                if stopped:
                    break
                if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and not at_end:
                    self._close_window(start, start_step, warmup)
                    start, start_step, warmup = self.clock(), self.step, None
                    self.save()
        bar.close()
        self._close_window(start, start_step, warmup)
        seen = self.epoch_count * cfg.batch_size * self.world
        record = {
            "epoch": self.epoch + 1, "step": self.step,
            "train_loss": self.epoch_sum / max(self.epoch_count, 1),
            "val_loss": (validation_loss(self.model, self.diffusion, self.val, cfg.batch_size, cfg.torch_dtype,
                                         cfg.seed) if self.val is not None else None),
            "lr": self.opt.param_groups[0]["lr"],
            # steady state: the first step of a process (compilation) is excluded, and reported apart
            "images_per_s": (self.steady_steps * cfg.batch_size * self.world / self.steady_seconds
                             if self.steady_steps and self.steady_seconds > 0  # else: the first step is all there is
                             else seen / max(self.epoch_seconds, 1e-9)),
            "epoch_seconds": self.epoch_seconds,
            "elapsed_seconds": self.elapsed(),
            "train_images": len(self.batches.data),
        }
        if self.steady_steps < self.epoch_count:  # this epoch holds the process's first step
            record["warmup_seconds"] = self.warmup_seconds
        if stopped:
            record["partial"] = True
        if record["val_loss"] is not None and not math.isfinite(record["val_loss"]):
            raise DivergenceError(f"the validation loss became {record['val_loss']}")
        if not stopped:
            self.epoch += 1
            self.batch_in_epoch, self.epoch_sum, self.epoch_count, self.epoch_seconds = 0, 0.0, 0, 0.0
            self.steady_seconds, self.steady_steps = 0.0, 0
        return record

    def _close_window(self, start: float, start_step: int, warmup: float | None) -> None:
        """Add the time since ``start`` to the epoch, and all of it but the warm-up step to the steady part."""
        seconds = self.clock() - start
        self.epoch_seconds += seconds
        self.steady_seconds += seconds - (warmup or 0.0)
        self.steady_steps += self.step - start_step - (1 if warmup is not None else 0)

    def fit(self) -> list[dict]:
        cfg = self.cfg
        # The history so far: every event, and the epoch records up to the checkpoint's step (a record logged
        # after it, by a session that stopped before saving, describes steps this one trains again). A fresh
        # run starts its own (a metrics file beside no checkpoint is a run that never saved).
        history = read_metrics(self.out) if self.restored else []
        records = [r for r in history if "event" in r or r.get("step", 0) <= self.step]
        title = f"{data_mod.describe(cfg.data)}, T={cfg.T}, {cfg.dtype}, preset {cfg.preset}"
        self.write_metrics(records, plot_title=title if any("event" not in r for r in records) else None)
        self.clock_start = self.clock()
        try:
            checked = False
            if self.checks_compiled_step and self.epoch < cfg.epochs and not self.budget_spent(self.elapsed()):
                records.append({"event": "compile_check", "epoch": self.epoch_label, "step": self.step,
                                **self.check_compiled_step()})
                self.write_metrics(records)
                checked = True
            # The run's end is always saved, with its clock: also where the compile check spent the budget
            # (a fresh run then saves step 0, so that --resume continues that clock), and where an epoch's
            # end was passed over below and the budget ran out while it was recorded.
            now, end_saved = self.shared_elapsed(), not (self.step == 0 or checked)
            while self.epoch < cfg.epochs and not self.budget_spent(now):
                record = self.run_epoch()
                now = self.shared_elapsed()  # one clock for every rank: they all save (and check) or none does
                end_saved = bool(record.get("partial") or self.epoch >= cfg.epochs or self.budget_spent(now) or
                                 now - self.saved_at >= cfg.ckpt_minutes * 60 or
                                 # run_epoch leaves a --ckpt-every step that ends an epoch to this save
                                 (cfg.ckpt_every and self.step % cfg.ckpt_every == 0))
                # An epoch's latest record stands for it: a partial one from an earlier session is superseded.
                records = [r for r in records if "event" in r or r["epoch"] != record["epoch"]] + [record]
                # The record before the checkpoint: a crash between them leaves a record --resume drops
                # (it is past the checkpoint), not a checkpoint whose epoch has no record.
                self.write_metrics(records, plot_title=title)
                if end_saved:
                    self.save()
                    self.saved_at = now
                val = f"{record['val_loss']:.4f}" if record["val_loss"] is not None else "off"
                compiling = self.compiled and not self.checks_compiled_step  # (the check compiled, where it ran)
                warm = (f" (first step {record['warmup_seconds']:.1f} s"
                        f"{', compilation included' if compiling else ''}, not counted)"
                        if "warmup_seconds" in record else "")
                of = "" if cfg.time_budget else f"/{cfg.epochs}"  # with a budget, the epochs are only a cap
                what = (f"epoch {record['epoch']} (partial, at step {record['step']})" if record.get("partial")
                        else f"epoch {record['epoch']}{of}")
                self.log(f"{what}  train {record['train_loss']:.4f}  val {val}  "
                         f"{record['images_per_s']:.0f} img/s{warm}  lr {record['lr']:.1e}  "
                         f"{record['elapsed_seconds'] / 60:.1f} min")
                now = self.shared_elapsed()  # read again: writing the record and its plot takes time
            if not end_saved:
                self.save()
            if self.budget_spent(now):
                # One record a stop: a re-run of the same budget that trained nothing adds none
                if not any(r.get("event") == "time_budget" and (r["step"], r["budget_minutes"]) ==
                           (self.step, cfg.time_budget) for r in records):
                    records.append({"event": "time_budget", "budget_minutes": cfg.time_budget,
                                    "elapsed_seconds": self.elapsed(), "epoch": self.epoch_label, "step": self.step,
                                    "images_seen": self.step * cfg.batch_size * self.world})
                    self.write_metrics(records)
                self.log(f"time budget of {cfg.time_budget:g} min spent ({self.elapsed() / 60:.2f} min of training, "
                         f"step {self.step}); continue with --resume and a larger --time-budget")
        except DivergenceError as e:
            records.append({"event": "diverged", "epoch": self.epoch_label, "step": self.step, "reason": str(e)})
            self.write_metrics(records)
            raise
        if self.world > 1:
            self.check_replicas()
        return records

    def log(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)

    def write_metrics(self, records: list[dict], plot_title: str | None = None) -> None:
        if self.rank != 0:
            return
        write_metrics(self.out, records)
        if plot_title is not None:
            from fastddpm.images import plot_loss

            plot_loss(records, self.out / "loss.png", title=plot_title)

    def check_replicas(self) -> None:
        """DDP keeps the ranks' weights identical; verify it (rank 0's broadcast vs each rank's own)."""
        dist = torch.distributed
        flat = torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])
        reference = flat.clone()
        dist.broadcast(reference, src=0)
        mismatch = torch.tensor([0.0 if torch.equal(flat, reference) else 1.0], device=flat.device)
        dist.all_reduce(mismatch)
        if mismatch.item():
            raise RuntimeError(f"{int(mismatch.item())} of {self.world} ranks hold weights that differ from rank 0's")
        self.log(f"replicas identical: all {self.world} ranks hold the same {flat.numel():,} weights")

    def write_samples(self, sampler: dict | None = None) -> Path | None:
        """OUT/samples.png: cfg.n_samples images from the EMA weights (raw without EMA), with this run's
        schedule; ``sampler``: sample()'s sampler arguments (default: the paper's DDPM chain)."""
        if not self.cfg.n_samples or self.rank != 0:
            return None
        from fastddpm.images import save_grid
        from fastddpm.sampling import sample

        model = self.ema.copy_to(copy.deepcopy(self.model)) if self.ema else self.model
        timings = {}
        images = sample(model, self.cfg.n_samples, diffusion=self.diffusion, dtype=self.cfg.torch_dtype,
                        seed=self.cfg.seed, progress=self.progress, timings=timings, **(sampler or {}))
        self.sample_timings = timings
        return save_grid(images, self.out / "samples.png")


# --- command line ---------------------------------------------------------------------------

def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m fastddpm.train", description="Train the paper's DDPM (section 3.3).")
    d = TrainConfig()
    # Config flags default to None so that --resume can tell what was given from what was not.
    p.add_argument("--data", help=f"cifar10 (default), cifar10-jpeg, shapes, or a path (default {d.data})")
    p.add_argument("--T", type=int, help=f"diffusion steps (default {d.T})")
    p.add_argument("--dtype", help=f"{', '.join(DTYPES)} (default {d.dtype})")
    p.add_argument("--no-grad-scaler", dest="grad_scaler", action="store_const", const=False,
                   help="fp16 without torch.amp's GradScaler (the paper's section 4.2.1 run)")
    p.add_argument("--epochs", type=int, help=f"default {d.epochs}")
    p.add_argument("--time-budget", type=float, metavar="MINUTES",
                   help="stop after this many minutes of training (compilation, validation and checkpoints "
                        "included; start-up and the final samples not), at a step boundary with a checkpoint; "
                        "the lr drop then comes at 80%% of the budget (or of --epochs, if that comes first); "
                        "--resume continues the clock (give a larger budget to train on)")
    p.add_argument("--batch-size", type=int, help=f"default {d.batch_size}")
    p.add_argument("--lr", type=float, help=f"default {d.lr}, divided by 10 for the last 20%% of the run")
    p.add_argument("--lr-drop-at", type=float, metavar="FRACTION",
                   help=f"where in the run (epochs or --time-budget) the lr is divided by 10 (default {d.lr_drop_at}, "
                        "the paper's 400 of 500 epochs)")
    p.add_argument("--ema", type=float, help=f"EMA decay (default {d.ema}; 0 turns it off)")
    p.add_argument("--preset", help=f"{', '.join(PRESETS)} (default {d.preset}: the paper's 12.9M-parameter U-Net)")
    p.add_argument("--seed", type=int, help=f"default {d.seed}")
    p.add_argument("--ckpt-every", type=int, help="also checkpoint every N steps (default: at epoch ends only)")
    p.add_argument("--ckpt-minutes", type=float, metavar="M",
                   help="at epoch ends, checkpoint only when M minutes of training have passed since the last one "
                        "(default 0: at every epoch end; short GPU epochs spend a few %% on 200 MB writes); the "
                        "run's end, and every --ckpt-every step, are always checkpointed")
    p.add_argument("--n-samples", type=int, help=f"images in OUT/samples.png at the end (default {d.n_samples})")
    p.add_argument("--val-size", type=int, help=f"validation images for the val loss (default {d.val_size})")
    p.add_argument("--train-size", type=int, help="train on a fixed random subset of N images (default, or 0: all)")
    p.add_argument("--out", default="runs/default", help="output directory (default runs/default)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--device", help="default: cuda if available, else cpu (under torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--compile", dest="compile", action="store_const", const=True,
                   help="torch.compile the model (default: on CUDA)")
    p.add_argument("--no-compile", dest="compile", action="store_const", const=False)
    p.add_argument("--compile-mode", help="torch.compile mode: default, reduce-overhead (the compiled forward and "
                                          "backward replayed as CUDA graphs), max-autotune, "
                                          "max-autotune-no-cudagraphs (default: default)")
    p.add_argument("--kernels", help="GroupNorm+GELU path: auto (default: under --compile the path measured "
                                     "faster on this kind of card, see fastddpm/measured.py; Triton on CUDA "
                                     "without it), triton, torch")
    p.add_argument("--channels-last", dest="channels_last", action="store_const", const=True,
                   help="NHWC memory layout for weights and activations (default: auto: under --compile on CUDA, "
                        "the layout in which the chosen GroupNorm path's step measured faster on this kind of "
                        "card, see fastddpm/measured.py; NCHW elsewhere)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_const", const=False,
                   help="NCHW whatever was measured")
    p.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="progress bars (default: when stderr is a terminal)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def config_from_args(args, base: TrainConfig, resumed: bool) -> TrainConfig:
    given = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__ and v is not None}
    if resumed:
        for key in FIXED_ON_RESUME:
            if key in given and given[key] != getattr(base, key):
                flag, what = ((f"--{key.replace('_', '-')}", f"{given[key]} disagrees with the checkpoint's "
                               f"{getattr(base, key)}") if key != "grad_scaler" else  # a flag without a value
                              ("--no-grad-scaler", "disagrees with the checkpoint, whose run trains with the "
                               "gradient scaler"))
                raise UsageError(f"{flag} {what}; drop {flag} to resume it, or train into a new --out")
    # How to run fast (compile and its mode, kernels, layout) is this run's choice, not the checkpoint's.
    speed = {k: getattr(TrainConfig(), k) for k in ("compile", "compile_mode", "kernels", "channels_last")}
    cfg = TrainConfig.from_dict({**base.to_dict(), **speed, **given})
    cfg.validate()
    if given.get("grad_scaler") is False and cfg.dtype != "fp16":  # here, not in validate: old checkpoints load
        raise UsageError(f"--no-grad-scaler with --dtype {cfg.dtype}: the gradient scaler is fp16's; give it with "
                         "--dtype fp16")
    return cfg


def prepare_out(out: Path, resume: bool) -> dict | None:
    """Create OUT; refuse to overwrite a run; return the checkpoint to resume from."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test.{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write there ({e.strerror}); choose a writable directory") from None
    ckpt_path = out / CHECKPOINT
    if resume:
        if not ckpt_path.is_file():
            raise UsageError(f"--resume: no {CHECKPOINT} in {out}; start without --resume")
        return read_checkpoint(ckpt_path)
    if ckpt_path.exists():
        raise UsageError(f"--out {out} already holds a run ({CHECKPOINT}); add --resume to continue it or "
                         "choose another --out")
    return None


def init_distributed(device_arg) -> tuple[int, int, torch.device]:
    """(rank, world, device). Under torchrun (WORLD_SIZE > 1) join the process group: NCCL on GPUs,
    gloo on CPUs, with a timeout so that a rank that dies makes the others fail instead of hang."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, check_device(device_arg)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = check_device(device_arg)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=float(os.environ.get("FASTDDPM_DIST_TIMEOUT", "600")))
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return rank, world, device


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    rank, world, device = init_distributed(args.device)
    try:
        return _train(args, out, rank, world, device)
    except (RuntimeError, torch.distributed.DistBackendError) as e:
        if world == 1:
            raise
        sys.stderr.write(f"error: rank {rank}: lost the other training processes ({str(e).splitlines()[0][:160]}); "
                         f"see the failing rank's output, then continue with --resume\n")
        return 1
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(args, out: Path, rank: int, world: int, device: torch.device) -> int:
    created = not out.exists()
    try:
        return _run(args, out, rank, world, device)
    except UsageError:
        if created:  # a run refused before it wrote anything leaves no empty OUT behind
            with contextlib.suppress(OSError):
                out.rmdir()
        raise


def _run(args, out: Path, rank: int, world: int, device: torch.device) -> int:
    ckpt = prepare_out(out, args.resume)
    base = TrainConfig.from_dict(ckpt["config"]) if ckpt else TrainConfig()
    cfg = config_from_args(args, base, resumed=ckpt is not None)
    progress = progress_enabled(args.progress)
    if world > 1:
        if rank == 0:  # download / decode once, into the shared cache, before the others read it
            data_mod.load_images(cfg.data, "train", progress=progress)
            if cfg.val_size:
                data_mod.load_images(cfg.data, "test", progress=progress)
        torch.distributed.barrier()  # also: every rank has checked OUT before rank 0 writes into it
    trainer = Trainer(cfg, out, device, progress=progress, rank=rank, world=world)
    if ckpt:
        trainer.restore(ckpt)
        if trainer.epoch >= cfg.epochs:
            trainer.log(f"{out / CHECKPOINT} has finished its epochs ({trainer.epoch}, step {trainer.step}): "
                        f"nothing to train; raise --epochs to train on")
        else:
            trainer.log(f"resuming {out / CHECKPOINT} at epoch {trainer.epoch + 1}, step {trainer.step}")
            was, its_lr = ckpt["optimizer"]["param_groups"][0]["lr"], ckpt["config"]["lr"]
            lr = lr_at(cfg, trainer.epochs_done, trainer.train_seconds)
            if was < its_lr and lr > was:  # the schedule follows this session's --epochs / --time-budget
                trainer.log(f"lr back up to {lr:.1e} (the checkpoint's run had dropped it to {was:.1e}): the drop "
                            f"now comes at {cfg.lr_drop_at:.0%} of the new --epochs or --time-budget, whichever "
                            "is first")
    n_params = sum(p.numel() for p in trainer.model.parameters())
    trainer.log(f"training {cfg.preset} U-Net ({n_params:,} parameters) on {data_mod.describe(cfg.data)} "
                f"({len(trainer.batches.data)} images), T={cfg.T}, {cfg.dtype}"
                f"{' without grad scaler' if cfg.dtype == 'fp16' and not cfg.grad_scaler else ''}, {device}"
                f"{f' x {world} processes (DDP)' if world > 1 else ''}")
    try:
        trainer.fit()
    except KeyboardInterrupt:
        if rank == 0:
            kept = (f"{out / CHECKPOINT} (step {trainer.saved_step}) is kept; continue with --resume"
                    if trainer.saved_step is not None else "no checkpoint was written this session")
            sys.stderr.write(f"interrupted at step {trainer.step}: {kept}\n")
        return 130
    except CompiledStepError as e:
        sys.stderr.write(f"error: {e}\n")
        return 4
    except DivergenceError as e:
        where = (f"{out / CHECKPOINT} (epoch {trainer.last_good[0]}, batch {trainer.last_good[1]})"
                 if trainer.last_good else "none (no checkpoint was written before)")
        hint = ("; fp16 needs the gradient scaler (drop --no-grad-scaler) or use --dtype bf16"
                if cfg.dtype == "fp16" and not cfg.grad_scaler else "; try a lower --lr")
        if rank == 0:
            sys.stderr.write(f"error: training diverged at step {trainer.step} (epoch {trainer.epoch_label}): {e}; "
                             f"last good checkpoint: {where}{hint}\n")
        return 3
    path = trainer.write_samples()
    if path:
        from fastddpm.sampling import describe_timings

        trainer.log(f"wrote {path} ({cfg.n_samples} images, {'EMA' if trainer.ema else 'raw'} weights, DDPM, "
                    f"{describe_timings(trainer.sample_timings)})")
    trainer.log(f"done: {out / CHECKPOINT}, {out / METRICS}, {out / 'loss.png'}")
    if world > 1:  # no rank tears its process group down while another still writes: gloo aborts on a closed peer
        torch.distributed.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
