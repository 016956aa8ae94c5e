"""Training configuration: one dataclass, two presets."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch

# base_channels of the U-Net: "seed" is the paper's model (12,920,323 parameters); "tiny" trains in
# minutes on a CPU (tests, the demo).
PRESETS = {"seed": 64, "tiny": 16}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def cpu_bf16_support() -> dict[str, bool | None]:
    """Whether this CPU computes bf16 natively, per feature (AVX512-BF16, AMX tiles), as torch's
    private probes say; None where a probe is gone."""
    return {name: getattr(torch.cpu, f"_is_{name}_supported", lambda: None)() for name in ("avx512_bf16", "amx_tile")}


def fastest_cpu_dtype() -> str:
    """The training dtype of ``make demo``: bf16 where this CPU computes it natively
    (``cpu_bf16_support``), fp32 elsewhere. Without it bf16 is emulated: on an AVX2-only CPU (CI's)
    the demo's NHWC step at batch 32 took 2.56 s in bf16 against 0.27 s in fp32
    (bench/results/2026-11-28-cpu-dtypes-layouts.json)."""
    return "bf16" if any(cpu_bf16_support().values()) else "fp32"


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bf16" (DTYPES' key)."""
    return next(name for name, d in DTYPES.items() if d == dtype)


@dataclass
class TrainConfig:
    data: str = "cifar10"
    T: int = 1000
    dtype: str = "fp32"
    grad_scaler: bool = True  # fp16 only; False is the paper's section 4.2.1 run
    epochs: int = 500
    batch_size: int = 256
    lr: float = 2e-4
    lr_drop_at: float = 0.8  # lr / 10 for the last 20% of epochs (400 of 500 in the paper)
    ema: float = 0.9999  # 0 turns EMA off
    preset: str = "seed"
    seed: int = 0
    ckpt_every: int = 0  # extra checkpoints every N steps
    # at epoch ends, checkpoint only after this many minutes of training since the last (0: every epoch end)
    ckpt_minutes: float = 0.0
    beta_start: float = 1e-4
    beta_end: float = 0.02
    n_samples: int = 64  # images in OUT/samples.png at the end
    val_size: int = 10000  # validation images (the test split) used for the per-epoch val loss
    compile: bool | None = None  # torch.compile the model; None: on CUDA only
    # torch.compile's mode: "reduce-overhead" replays the compiled forward and backward as CUDA graphs
    # (no per-kernel launch cost on the host; the faster in the bench); "default" until a whole training run
    # confirms it on a GPU
    compile_mode: str = "default"
    kernels: str = "auto"  # GroupNormGELU path: auto (see train.training_kernels, measured.py), triton, torch
    # NHWC activations and weights; None: auto (train.training_layout: where the card measured it faster)
    channels_last: bool | None = None
    train_size: int = 0  # a fixed random subset of N training images (0: all); quick experiments and tests
    time_budget: float = 0.0  # minutes of training wall clock (compilation, validation, checkpoints included); 0: off

    @property
    def base_channels(self) -> int:
        return PRESETS[self.preset]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def validate(self) -> None:
        from fastddpm.errors import UsageError

        checks = [
            (self.dtype in DTYPES, f"--dtype {self.dtype}: choose one of {', '.join(DTYPES)}"),
            (self.preset in PRESETS, f"--preset {self.preset}: choose one of {', '.join(PRESETS)}"),
            (self.T >= 1, f"--T {self.T}: the number of diffusion steps must be at least 1"),
            (self.epochs >= 1, f"--epochs {self.epochs}: must be at least 1"),
            (self.batch_size >= 1, f"--batch-size {self.batch_size}: must be at least 1"),
            (self.lr > 0, f"--lr {self.lr}: must be positive"),
            (0 <= self.lr_drop_at <= 1, f"--lr-drop-at {self.lr_drop_at}: a fraction of the run in [0, 1] "
                                        "(1: never)"),
            (0 <= self.ema < 1, f"--ema {self.ema}: the EMA decay must be in [0, 1) (0 turns EMA off)"),
            (self.ckpt_every >= 0, f"--ckpt-every {self.ckpt_every}: must be 0 (epoch ends only) or positive"),
            (0 <= self.ckpt_minutes < float("inf"), f"--ckpt-minutes {self.ckpt_minutes}: must be 0 (every epoch end) "
                                                     "or positive"),
            (0 < self.beta_start <= self.beta_end < 1,
             f"beta_start {self.beta_start}, beta_end {self.beta_end}: need 0 < beta_start <= beta_end < 1"),
            (self.n_samples >= 0, f"--n-samples {self.n_samples}: must be 0 or positive"),
            (self.val_size >= 0, f"--val-size {self.val_size}: must be 0 or positive"),
            (self.kernels in ("auto", "triton", "torch"), f"--kernels {self.kernels}: choose auto, triton or torch"),
            (self.compile_mode in COMPILE_MODES,
             f"--compile-mode {self.compile_mode}: choose one of {', '.join(COMPILE_MODES)}"),
            (self.train_size >= 0, f"--train-size {self.train_size}: must be 0 (all) or positive"),
            (0 <= self.time_budget < float("inf"),
             f"--time-budget {self.time_budget}: minutes must be 0 (no budget) or positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
