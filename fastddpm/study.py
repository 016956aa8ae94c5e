"""The paper's two studies (section 4) as commands: Table 1 (diffusion steps) and Table 2 (precision).

    python -m fastddpm.study timesteps --T 100 500 1000 2000 --data cifar10-jpeg --out runs/table1
    python -m fastddpm.study precision --T 2000 --dtypes fp32 fp16 fp16-noscaler bf16 --out runs/table2

Each row trains one model with otherwise identical settings into OUT/<row>/ (through
``fastddpm.train``; a finished run there is reused, an unfinished one resumed, a diverged one reported),
then samples the evaluation set, scores it (FID, KID, and IS where the Inception has logits) and
writes OUT/table.md, OUT/table.json, OUT/loss_curves.png, OUT/grid_<row>.png (64 of the evaluation
samples) and OUT/trajectory_<row>.png (x_t at evenly spaced t, the paper's Figs. 19-20).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastddpm import data as data_mod
from fastddpm import evaluate
from fastddpm.errors import ArgumentParser, UsageError, run_cli
from fastddpm.progress import progress_enabled
from fastddpm.sampling import add_sampler_flags, describe_sampler, sampler_settings

PAPER_T = [100, 500, 1000, 2000]
PAPER_DTYPES = ["fp32", "fp16", "fp16-noscaler", "bf16"]
DTYPE_LABELS = {"fp32": "float32", "fp16": "float16", "fp16-noscaler": "float16, no grad scaler", "bf16": "bfloat16"}
# With --preset tiny, the flags left unset take these values: a study sized for a CPU.
TINY = {"T": [10, 25, 50, 100], "T_precision": 100, "n": 64, "train_size": 8192, "batch_size": 64, "val_size": 256,
        "lr": 1e-3, "n_samples": 16}
TINY_FLAGS = ("n", "train_size", "batch_size", "val_size", "lr", "n_samples")
# Flags handed to fastddpm.train unchanged, where given.
TRAIN_FLAGS = ("data", "preset", "epochs", "batch_size", "lr", "ema", "seed", "train_size", "val_size", "n_samples",
               "ckpt_every", "device")
EVAL_FILE = "eval.json"
EVAL_SAMPLES = "eval_samples.npz"


@dataclass
class Row:
    name: str  # OUT/<name>/, grid_<name>.png
    label: str  # the table's first column
    T: int
    dtype: str | None  # None: train's default
    grad_scaler: bool = True

    @property
    def caption(self) -> str:
        """For figures: "T=500", or "bfloat16"."""
        return f"T={self.T}" if self.label == str(self.T) else self.label


def rows_for(a) -> list[Row]:
    if a.study == "timesteps":
        return [Row(f"T{T}", str(T), T, a.dtype) for T in a.T]
    return [Row(d, DTYPE_LABELS[d], a.T, d.removesuffix("-noscaler"), not d.endswith("-noscaler")) for d in a.dtypes]


# --- training -----------------------------------------------------------------------------------

def train_argv(a, row: Row, out: Path) -> list[str]:
    argv = ["--T", str(row.T), "--out", str(out)]
    for key in TRAIN_FLAGS:
        value = getattr(a, key)
        if value is not None:
            argv += [f"--{key.replace('_', '-')}", str(value)]
    if row.dtype:
        argv += ["--dtype", row.dtype]
    if not row.grad_scaler:
        argv.append("--no-grad-scaler")
    if a.progress is not None:
        argv.append("--progress" if a.progress else "--no-progress")
    return argv


def diverged_step(out: Path) -> int | None:
    """The step of the run's divergence record, if its last record is one."""
    from fastddpm.train import read_metrics

    records = read_metrics(out)
    return records[-1]["step"] if records and records[-1].get("event") == "diverged" else None


def train_row(a, row: Row, out: Path) -> int | None:
    """Train (or reuse, or resume) one row's model; the divergence step where it diverged."""
    from fastddpm import train
    from fastddpm.checkpoint import read_checkpoint
    from fastddpm.config import TrainConfig

    step = diverged_step(out)
    if step is not None:
        print(f"{row.name}: diverged at step {step} in an earlier run (kept; delete {out} to train it again)")
        return step
    argv = train_argv(a, row, out)
    ckpt_path = out / train.CHECKPOINT
    if ckpt_path.is_file():
        ckpt = read_checkpoint(ckpt_path)
        try:
            cfg = train.config_from_args(train.build_parser().parse_args(argv),
                                         TrainConfig.from_dict(ckpt["config"]), resumed=True)
            if cfg.grad_scaler != row.grad_scaler and cfg.dtype == "fp16":
                raise UsageError(f"its fp16 run is {'with' if cfg.grad_scaler else 'without'} the grad scaler")
            # fastddpm.train lets a resume change these; a study's rows must share them (and the table says them)
            asked = settings_for(a)
            for key in ("lr", "ema", "lr_drop_at"):
                had, wants = ckpt["config"][key], getattr(asked, key)
                if had != wants:
                    raise UsageError(f"it trains with {key} {had:g}, the study asks {wants:g}")
        except UsageError as e:
            raise UsageError(f"{out} holds a different run ({e}); give another --out") from None
        if ckpt["epoch"] >= cfg.epochs:
            print(f"{row.name}: reusing the finished run in {out} ({ckpt['epoch']} epochs)")
            return None
        argv.append("--resume")
    print(f"== {row.name}: python -m fastddpm.train {' '.join(argv)}", flush=True)
    code = train.main(argv)
    if code == 130:  # Ctrl-C in the training: the study stops as interrupted, not as a failed row
        raise KeyboardInterrupt
    if code == 3:
        return diverged_step(out)
    if code:
        raise UsageError(f"training {row.name} failed with exit code {code}")
    return None


# --- evaluation ---------------------------------------------------------------------------------

def evaluate_row(a, row: Row, out: Path, reference, inception, progress: bool) -> dict:
    """Sample the evaluation set from OUT/<row>/checkpoint.pt (timed) and score it; reuses
    OUT/<row>/eval.json where it was made from the same checkpoint step and settings."""
    from fastddpm.checkpoint import read_checkpoint
    from fastddpm.images import save_grid
    from fastddpm.metrics import score
    from fastddpm.sampling import save_npz
    from fastddpm.train import CHECKPOINT

    ckpt_path = out / CHECKPOINT
    # What the scores depend on; the reference's cache name holds its content hash, size and extractor.
    key = {"step": read_checkpoint(ckpt_path)["step"], "n": a.n, "reference": reference.path.stem,
           "seed": a.sample_seed, "sampler": a.sampler_settings}
    cached = out / EVAL_FILE
    saved = json.loads(cached.read_text()) if cached.is_file() else {}
    grid, trajectory = a.out / f"grid_{row.name}.png", a.out / f"trajectory_{row.name}.png"
    fresh = saved.get("key") != key
    if fresh:
        print(f"{row.name}: sampling {a.n} images (T={row.T})", flush=True)
        images, timings = evaluate.generate(ckpt_path, a.n, batch_size=a.sample_batch_size, device=a.device,
                                            seed=a.sample_seed, progress=progress, **a.sampler_settings)
        save_npz(images, out / EVAL_SAMPLES)
        save_grid(images[:64], grid)
        saved = {**score(evaluate.to_hwc(images), reference, inception, progress=progress),
                 "sampling_seconds": timings["seconds"], "sampling_warmup_seconds": timings["warmup_seconds"],
                 "sampling": timings, "key": key}
        evaluate.write_json(saved, cached)
    else:
        print(f"{row.name}: reusing {cached}")
        if not grid.is_file():
            with np.load(out / EVAL_SAMPLES) as z:
                save_grid(z["images"][:64], grid)
    if fresh or not trajectory.is_file():
        draw_trajectory(ckpt_path, row, trajectory, a, progress)
    return saved


def trajectory_steps(T: int, columns: int) -> list[int]:
    """Evenly spaced t from T (pure noise x_T) down to 0 (the sample x_0), at most ``columns`` of them."""
    return sorted({int(round(t)) for t in np.linspace(T, 0, columns)}, reverse=True)


def draw_trajectory(ckpt_path: Path, row: Row, path: Path, a, progress: bool) -> Path:
    """x_t for a few images at evenly spaced t (one image per line), the paper's Figs. 19-20."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from fastddpm.images import grid_array
    from fastddpm.sampling import sample

    ts = trajectory_steps(row.T, a.trajectory_steps)
    # sample() keeps x_t as it enters reverse step index t-1 (0-based): that is the paper's x_t.
    # Always the full DDPM chain: the figure shows every x_t the model passes through.
    images, kept = sample(ckpt_path, a.trajectory_images, device=a.device, seed=a.sample_seed, progress=progress,
                          trajectory_at=[t - 1 for t in ts if t > 0], engine=a.engine)
    columns = [kept[t - 1] if t > 0 else images for t in ts]
    tiles = torch.stack(columns, 1).reshape(-1, 3, 32, 32)  # image-major: one line per image
    scale, pad = 2, 2
    picture = grid_array(tiles, nrow=len(ts), pad=pad, scale=scale)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.75 * len(ts)), 0.8 * a.trajectory_images + 0.8), dpi=110)
    ax.imshow(picture, interpolation="nearest")
    ax.set_xticks([pad + i * (32 * scale + pad) + 32 * scale / 2 for i in range(len(ts))], [f"t={t}" for t in ts],
                  fontsize=7)
    ax.set_yticks([])
    ax.set_title(f"denoising trajectory, {row.caption}" + ("" if row.caption.startswith("T=") else f", T={row.T}"),
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


# --- the table ----------------------------------------------------------------------------------

def training_summary(out: Path) -> dict:
    """Training time (sum of epoch_seconds), epochs and final validation loss from metrics.jsonl."""
    from fastddpm.train import read_metrics

    epochs = [r for r in read_metrics(out) if "event" not in r]
    seconds = sum(r["epoch_seconds"] for r in epochs)
    vals = [r["val_loss"] for r in epochs if r.get("val_loss") is not None]
    return {"epochs": len(epochs), "train_seconds": seconds, "train_hours": seconds / 3600,
            "val_loss": vals[-1] if vals else None}


COLUMNS = ["FID", "IS", "KID", "Training Time (hr)", "Training Time (s)", "Sampling Time (s)", "Val Loss"]


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def markdown(first_column: str, rows: list[dict]) -> str:
    lines = [f"| {first_column} | " + " | ".join(COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 1)]
    for r in rows:
        if r["diverged_at_step"] is not None:
            cells = [f"diverged at step {r['diverged_at_step']}"] + ["—"] * (len(COLUMNS) - 1)
        else:
            cells = [_fmt(r["fid"], ".3f"), _fmt(r["isc_mean"], ".3f"), _fmt(r["kid_mean"], ".4f"),
                     _fmt(r["train_hours"], ".2f"), _fmt(r["train_seconds"], ".0f"),
                     _fmt(r["sampling_seconds"], ".1f"), _fmt(r["val_loss"], ".4f")]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def settings_for(a):
    """The training settings every row shares, as fastddpm.train resolves them."""
    from fastddpm.config import TrainConfig

    given = {k: getattr(a, k) for k in TRAIN_FLAGS if k != "device" and getattr(a, k) is not None}
    if a.study == "timesteps" and a.dtype:
        given["dtype"] = a.dtype  # checked now, before any training
    return TrainConfig.from_dict({**TrainConfig().to_dict(), **given})


# --- command line -------------------------------------------------------------------------------

def build_parser() -> ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", help="study folder (default runs/study-timesteps or runs/study-precision)")
    g = common.add_argument_group("training (identical for every row; passed to fastddpm.train)")
    g.add_argument("--data", help="what --data of fastddpm.train accepts (default cifar10)")
    g.add_argument("--preset", help="seed (default, the paper's U-Net) or tiny (a CPU-sized study, see below)")
    g.add_argument("--epochs", type=int, help="default 500, as in the paper")
    for flag, kind in (("--batch-size", int), ("--lr", float), ("--ema", float), ("--seed", int),
                       ("--train-size", int), ("--val-size", int), ("--n-samples", int), ("--ckpt-every", int)):
        g.add_argument(flag, type=kind, help="as fastddpm.train")
    e = common.add_argument_group("evaluation")
    e.add_argument("--n", type=int, help=f"images sampled and scored per row (default {evaluate.PAPER_N})")
    e.add_argument("--ref", help="reference image set (default DATA:train: the training data); see fastddpm.evaluate")
    e.add_argument("--n-ref", type=int, help="reference images (default: as many as --n)")
    e.add_argument("--inception-weights", help="as fastddpm.evaluate (torch-fidelity's weights give IS too)")
    add_sampler_flags(e)
    e.add_argument("--sample-batch-size", type=int, help="images per U-Net call when sampling")
    e.add_argument("--inception-batch-size", type=int, default=64)
    e.add_argument("--trajectory-images", type=int, default=4, help="images in each trajectory figure (default 4)")
    e.add_argument("--trajectory-steps", type=int, default=11, help="x_t columns, x_T to x_0 (default 11)")
    common.add_argument("--device", help="default: cuda if available, else cpu")
    common.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                        help="no progress bars (default: bars when stderr is a terminal)")

    tiny = (f"With --preset tiny, flags left unset default to a CPU-sized study: --T {' '.join(map(str, TINY['T']))} "
            f"(precision: --T {TINY['T_precision']}), "
            + ", ".join(f"--{k.replace('_', '-')} {TINY[k]}" for k in TINY_FLAGS)
            + "; e.g. --preset tiny --data shapes --epochs 2 (a study sized for a CPU).")
    p = ArgumentParser(prog="python -m fastddpm.study", description=__doc__.split("\n\n")[0], epilog=tiny)
    sub = p.add_subparsers(dest="study", required=True, metavar="{timesteps,precision}")
    t = sub.add_parser("timesteps", parents=[common], help="Table 1: one model per number of diffusion steps",
                       description="Table 1: one model per --T, all else equal.", epilog=tiny)
    t.add_argument("--T", type=int, nargs="+",
                   help=f"diffusion steps, one row each (default {' '.join(map(str, PAPER_T))})")
    t.add_argument("--dtype", help="training precision of every row (default fp32)")
    q = sub.add_parser("precision", parents=[common], help="Table 2: one model per training precision",
                       description="Table 2: one model per precision at one T, all else equal.", epilog=tiny)
    q.add_argument("--T", type=int, help="diffusion steps of every row (default 2000)")
    q.add_argument("--dtypes", nargs="+", choices=PAPER_DTYPES, default=None,
                   help=f"one row each (default {' '.join(PAPER_DTYPES)}); fp16-noscaler: fp16 without the grad scaler")
    return p


def resolve_args(a) -> None:
    """Defaults (the paper's, or the tiny preset's) and checks, in place."""
    tiny = a.preset == "tiny"
    if a.study == "timesteps":
        a.T = a.T or (TINY["T"] if tiny else PAPER_T)
        if len(set(a.T)) != len(a.T):
            raise UsageError(f"--T {' '.join(map(str, a.T))}: each value once")
    else:
        a.T = a.T or (TINY["T_precision"] if tiny else 2000)
        a.dtypes = a.dtypes or PAPER_DTYPES
        if len(set(a.dtypes)) != len(a.dtypes):
            raise UsageError(f"--dtypes {' '.join(a.dtypes)}: each value once")
    if tiny:
        for key in TINY_FLAGS:
            if getattr(a, key) is None:
                setattr(a, key, TINY[key])
    a.n = a.n or evaluate.PAPER_N
    for flag, value, least in (("--T", min(a.T) if isinstance(a.T, list) else a.T, 1), ("--n", a.n, 2),
                               ("--n-ref", a.n_ref, 2), ("--trajectory-images", a.trajectory_images, 1),
                               ("--trajectory-steps", a.trajectory_steps, 2), ("--epochs", a.epochs, 1)):
        if value is not None and value < least:
            raise UsageError(f"{flag} {value}: must be at least {least}")
    a.out = Path(a.out or f"runs/study-{a.study}")
    a.ref = a.ref or f"{a.data or 'cifar10'}:train"


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    resolve_args(a)
    from fastddpm.sampling import check_device

    device = check_device(a.device)
    progress = progress_enabled(a.progress)
    cfg = settings_for(a)
    cfg.validate()
    a.sample_seed, a.sampler_settings = cfg.seed, sampler_settings(a)
    rows = rows_for(a)
    from fastddpm.sampling import check_arguments

    for row in rows:  # the sampling flags fail now, not after every row has trained
        check_arguments(row.T, n=a.n, batch_size=a.sample_batch_size, seed=cfg.seed, cli=True, **a.sampler_settings)
    try:
        a.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {a.out}: cannot create it ({e.strerror})") from None
    # The reference and the Inception are checked (and the reference statistics cached) before the
    # long training, so a bad --ref fails in seconds, not after days.
    metrics = evaluate.metrics_module()
    inception = metrics.load_inception(a.inception_weights, device, a.inception_batch_size)
    reference = evaluate.reference_for(evaluate.load_image_set(a.ref, "--ref"), a.n_ref, a.n, inception, progress)

    results = []
    for row in rows:
        out = a.out / row.name
        step = train_row(a, row, out)
        result = {"row": row.name, "label": row.label, "T": row.T, "dtype": row.dtype or cfg.dtype,
                  "grad_scaler": row.grad_scaler, "out": str(out), "diverged_at_step": step,
                  **training_summary(out)}
        if step is None:
            scored = evaluate_row(a, row, out, reference, inception, progress)
            result.update({k: scored.get(k) for k in ("fid", "kid_mean", "kid_std", "isc_mean", "isc_std",
                                                      "sampling_seconds", "sampling_warmup_seconds")})
        results.append(result)

    write_outputs(a, cfg, rows, results, reference, inception)
    return 0


def write_outputs(a, cfg, rows: list[Row], results: list[dict], reference, inception) -> None:
    from fastddpm.images import plot_curves
    from fastddpm.train import read_metrics

    data = data_mod.describe(cfg.data)
    number, first, what = ((1, "Time Steps", "number of diffusion steps") if a.study == "timesteps" else
                           (2, "Precision", f"training precision at T={a.T}"))
    title = (f"Table {number}: {what}; {data}, preset {cfg.preset}, {cfg.epochs} epochs; FID/KID/IS of {a.n} "
             f"samples vs {reference.n} {reference.label} images")
    notes = []
    if not inception.has_logits:
        notes.append("IS n/a: the offline TorchScript Inception has no logits (pass --inception-weights with "
                     "torch-fidelity's weights-inception-2015-12-05-6726825d.pth for IS).")
    notes.append("Training time: sum of epoch_seconds in OUT/<row>/metrics.jsonl (validation excluded). Sampling "
                 f"time: the {a.n} evaluation images, in each model's training precision ("
                 f"{describe_sampler(a.sampler_settings)}), compile/capture included (table.json has it apart as "
                 "sampling_warmup_seconds).")
    table = markdown(first, results)
    text = f"{title}\n\n{table}\n\n" + "\n".join(notes) + "\n"
    print()
    print(text)
    (a.out / "table.md").write_text(text)
    settings = cfg.to_dict() | {"T": a.T} | ({"dtype": a.dtypes} if a.study == "precision" else {})
    evaluate.write_json({"study": a.study, "title": title, "data": cfg.data, "data_label": data, "settings": settings,
                         "n": a.n, "n_ref": reference.n, "ref": a.ref, "extractor": inception.id, "notes": notes,
                         "rows": results}, a.out / "table.json")
    series = {}
    for row in rows:
        records = [r for r in read_metrics(a.out / row.name) if "event" not in r]
        epochs = [r["epoch"] for r in records]
        series[f"{row.caption} train"] = (epochs, [r.get("train_loss") for r in records])
        series[f"{row.caption} val"] = (epochs, [r.get("val_loss") for r in records])
    plot_curves(series, a.out / "loss_curves.png", title=f"{what}: loss, {data}")
    print(f"wrote {a.out / 'table.md'}, {a.out / 'table.json'}, {a.out / 'loss_curves.png'}, "
          f"{a.out}/grid_<row>.png, {a.out}/trajectory_<row>.png")


if __name__ == "__main__":
    sys.exit(run_cli(main))
