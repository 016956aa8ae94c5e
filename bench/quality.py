"""The quality run (issue 10): the paper's model trained on CIFAR-10 (JPEG copy) for a time budget on
one GPU, sampled with its EMA weights, scored here on the CPU.

    bash bench/quality.sh                               # GPU: train, then `sample`, then pack into $OUT
    bash bench/quality.sh --smoke                       # the same on the CPU in about a minute (CI)
    python -m bench.quality record --returned DIR       # here: FID/KID by fastddpm.evaluate, the record

``sample`` (run by quality.sh after training): the EMA weights exported (fp16, split under the
device's 16 MiB per file), DDIM-``--ddim-steps`` then DDPM-T samples (uint8 .npz) with the fast engine,
the DDIM run checked against the eager engine fed the same noise (a fast path that disagrees posts
no time, and its images are replaced by the compiled engine's), 64-image grids, and run.json (card,
commit, command, the training summary from metrics.jsonl, each sampler's timings).

``record``: scores both .npz files with ``fastddpm.evaluate`` (N images against N of the training
set), writes ``bench/results/<date>-<card>-quality.json``, a 1,024-image subset of the DDPM samples
as ``<date>-<card>-samples.npz`` with its own FID@1,024, and the grid and loss curve as PNGs.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The seed paper's Table 1 row this run is compared with (../shared/seed/ddpm-recreation-paper.txt).
SEED_TABLE1 = {"T": 1000, "fid": 25.517, "is": 7.5891, "training_hours": 7.71, "epochs": 500,
               "sampling_seconds": 1861, "val_loss": 0.0319, "gpu": "NVIDIA RTX 4070", "ema": False,
               "n": 5120, "n_ref": 5120, "ref": "CIFAR-10 train (official)"}
PART_BYTES = 15 * 2 ** 20  # under the device's 16 MiB a returned file
WEIGHTS = "ema-fp16.pt"


def training_summary(metrics_path: Path) -> dict:
    """What metrics.jsonl says of the run: steps, images, minutes, steady throughput, the last losses."""
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    epochs = [r for r in records if "event" not in r]
    if not epochs:
        return {"records": 0}
    last = epochs[-1]
    budget = next((r for r in records if r.get("event") == "time_budget"), None)
    warm = [r["warmup_seconds"] for r in epochs if "warmup_seconds" in r]
    steady = [r["images_per_s"] for r in epochs if "warmup_seconds" not in r] or [last["images_per_s"]]
    return {"steps": last["step"], "epochs_completed": sum(1 for r in epochs if not r.get("partial")),
            "training_minutes": last["elapsed_seconds"] / 60, "warmup_seconds": warm[0] if warm else None,
            "steady_images_per_s_median": float(np.median(steady)), "final_train_loss": last["train_loss"],
            "train_images": last.get("train_images"),
            "final_val_loss": last["val_loss"], "final_lr": last["lr"], "stopped_by_time_budget": budget is not None,
            "budget_minutes": budget["budget_minutes"] if budget else None}


def split_file(path: Path, part_bytes: int = PART_BYTES) -> list[Path]:
    """``path`` -> path.part0, path.part1, ... (each under the device's per-file limit); rejoin with cat."""
    data, parts = path.read_bytes(), []
    for i in range(0, max(len(data), 1), part_bytes):
        part = path.with_name(f"{path.name}.part{len(parts)}")
        part.write_bytes(data[i:i + part_bytes])
        parts.append(part)
    path.unlink()
    return parts


def join_parts(folder: Path, dest: Path, name: str = WEIGHTS) -> Path | None:
    """folder/name.part0, part1, ... joined into dest/name."""
    parts = sorted(folder.glob(f"{name}.part*"), key=lambda p: int(p.suffix.removeprefix(".part")))
    if not parts:
        return None
    out = dest / name
    out.write_bytes(b"".join(p.read_bytes() for p in parts))
    return out


# --- on the GPU: sample -----------------------------------------------------------------------

def _sample(loaded, n: int, seed: int, **settings):
    """sample() on the one loaded model, so that every call after the first reuses its compiled code."""
    from fastddpm.sampling import sample

    model, diffusion, config = loaded
    timings = {}
    images = sample(model, n, diffusion=diffusion, dtype=config.dtype, seed=seed, progress=False, timings=timings,
                    **settings)
    return images, timings


def cmd_sample(a) -> int:
    import torch

    from bench.common import SAMPLE_TOL, device_info, git_commit, versions
    from fastddpm.checkpoint import export_weights, read_checkpoint
    from fastddpm.images import save_grid
    from fastddpm.sampling import describe_timings, save_npz

    run, out, work = Path(a.run), Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = run / "checkpoint.pt"
    config = read_checkpoint(ckpt)["config"]
    info = {"kind": "fastddpm quality run", "date": datetime.date.today().isoformat(), "smoke": a.smoke,
            "command": a.command, "git": git_commit(), "device": device_info(), "versions": versions(),
            "config": config, "training": training_summary(run / "metrics.jsonl"),
            "train_exit_code": a.train_exit, "n": a.n, "seed": a.seed, "samplers": {}}
    write = lambda: (out / "run.json").write_text(json.dumps(info, indent=2) + "\n")  # noqa: E731
    write()
    export_weights(ckpt, out / WEIGHTS)  # first: the weights come back even if sampling fails
    info["weights"] = [p.name for p in split_file(out / WEIGHTS)]  # (in OUT itself: nothing moves across disks)
    write()
    from fastddpm.checkpoint import load_checkpoint
    from fastddpm.sampling import default_device

    device = default_device()
    loaded = load_checkpoint(ckpt, device=device)  # the EMA weights
    T = config["T"]
    ddpm_engine = a.ddpm_engine or a.engine
    for name, settings in ((f"ddim{a.ddim_steps}", {"sampler": "ddim", "steps": a.ddim_steps}),
                           (f"ddpm{T}", {"sampler": "ddpm"})):
        engine = a.engine if settings["sampler"] == "ddim" else ddpm_engine
        start = time.perf_counter()
        record = {"settings": settings}
        try:
            images, timings = _sample(loaded, a.n, a.seed, engine=engine, **settings)
        except Exception as e:  # noqa: BLE001 - say what broke, keep the other sampler's result
            record["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            print(f"{name}: engine {engine} failed ({record['error']}); sampling with the compiled engine",
                  flush=True)
            images, timings = _sample(loaded, a.n, a.seed, engine="compiled", **settings)
        record["timings"] = timings
        if settings["sampler"] == "ddim" and timings["engine"] == "fast":
            # The guard: the same call on the eager engine with PyTorch's own GroupNorm (the model's
            # "auto" would be the Triton kernels on CUDA), fed the fast engine's noise stream.
            loaded.model.set_kernels("torch")
            try:
                eager, eager_timings = _sample(loaded, a.n, a.seed, engine="eager", noise="philox", **settings)
            finally:
                loaded.model.set_kernels("auto")
            diff = (images.float() - eager.float()).abs()
            record["guard"] = {"against": "eager engine, same x_T and Philox noise",
                               "mean_abs_grey": diff.mean().item(), "max_abs_grey": diff.max().item(),
                               "eager_timings": eager_timings}
            tol = SAMPLE_TOL[loaded.config.dtype]  # the bench's own sampling guard, per dtype
            record["guard"].update(tol=tol, passed=record["guard"]["mean_abs_grey"] <= tol)
            if not record["guard"]["passed"]:  # no fast figure, and the images the reference engine makes
                print(f"{name}: the fast engine disagrees with eager (mean {diff.mean():.2f} grey levels); "
                      "its timings are withheld and the compiled engine's images kept", flush=True)
                record["fast_timings_withheld"] = True
                images, timings = _sample(loaded, a.n, a.seed, engine="compiled", **settings)
                record["timings"] = timings
                ddpm_engine = "compiled"  # the DDPM run shares the engine that just failed
        save_npz(images, out / f"samples-{name}.npz")
        save_grid(images[:64], work / f"samples-{name}.png")
        record["wall_seconds"] = time.perf_counter() - start
        info["samplers"][name] = record
        write()
        print(f"{name}: {a.n} images in {describe_timings(timings)} (engine {timings['engine']})", flush=True)
    if torch.cuda.is_available():
        info["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    write()
    return 0


# --- here: record -----------------------------------------------------------------------------

def _evaluate(samples: Path, ref: str, n: int, json_path: Path, progress: bool) -> dict:
    from fastddpm import evaluate

    argv = ["--samples", str(samples), "--ref", ref, "--n", str(n), "--json", str(json_path)]
    code = evaluate.main(argv + ([] if progress else ["--no-progress"]))
    if code:
        raise SystemExit(f"fastddpm.evaluate {' '.join(argv)} failed with exit code {code}")
    return json.loads(json_path.read_text())


def cmd_record(a) -> int:
    import tarfile

    from fastddpm.images import plot_loss, save_grid
    from fastddpm.sampling import save_npz

    returned, results = Path(a.returned), Path(a.results)
    run = json.loads((returned / "run.json").read_text())
    card = a.card or _card(run["device"])
    stem = f"{run['date']}-{card}"
    work = Path(a.work or ROOT / "runs" / f"quality-scored-{stem}")  # the returned files may be read-only
    work.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    if (returned / "pictures.tar").is_file():
        with tarfile.open(returned / "pictures.tar") as tar:
            tar.extractall(work, filter="data")
    weights = join_parts(returned, work)
    scores = {}
    for name in [k for k in run["samplers"] if (returned / f"samples-{k}.npz").is_file()]:
        npz = returned / f"samples-{name}.npz"
        n = min(a.n or run["n"], len(np.load(npz)["images"]))
        scores[name] = _evaluate(npz, a.ref, n, work / f"eval-{name}.json", a.progress)
        print(f"{name}: FID {scores[name]['fid']:.2f} (N={scores[name]['n']} vs {scores[name]['n_ref']} "
              f"{scores[name]['ref_label']})", flush=True)
    scored = [k for k in run["samplers"] if (returned / f"samples-{k}.npz").is_file()]
    if not scored:
        raise SystemExit(f"{returned}: no samples-*.npz came back; nothing to score (see quality.log)")
    ddpm = next((k for k in scored if k.startswith("ddpm")), scored[0])  # the paper's sampler where it finished
    with np.load(returned / f"samples-{ddpm}.npz") as z:
        subset = z["images"][:a.subset]
    import torch

    images = torch.from_numpy(subset).permute(0, 3, 1, 2).contiguous()
    save_npz(images, results / f"{stem}-samples.npz")
    subset_score = _evaluate(results / f"{stem}-samples.npz", a.ref, len(subset), work / "eval-subset.json", a.progress)
    save_grid(images[:64], results / f"{stem}-grid.png", nrow=8)
    records = [json.loads(x) for x in (returned / "metrics.jsonl").read_text().splitlines() if x.strip()]
    plot_loss([r for r in records if "event" not in r], results / f"{stem}-loss.png",
              title=f"{run['config']['data']}, T={run['config']['T']}, {run['config']['dtype']}, "
                    f"{run['training'].get('training_minutes', 0):.1f} min on {run['device'].get('name')}")
    cfg, tr = run["config"], run["training"]
    record = {
        "kind": "fastddpm quality run", "card": run["device"].get("name"), "date": run["date"], "git": run["git"],
        "command": run["command"], "scored_with": "python -m bench.quality record (fastddpm.evaluate per .npz)",
        "data": cfg["data"], "data_label": "CIFAR-10 (JPEG copy)" if "jpeg" in cfg["data"] else cfg["data"],
        "model": {"preset": cfg["preset"], "T": cfg["T"], "dtype": cfg["dtype"], "batch_size": cfg["batch_size"],
                  "lr": cfg["lr"], "ema_decay": cfg["ema"], "ema_warmup": "min(decay, (1+n)/(10+n))"},
        "training": {**tr, "images_seen": tr.get("steps", 0) * cfg["batch_size"],
                     "epochs_equivalent": (tr.get("steps", 0) * cfg["batch_size"] / tr["train_images"]
                                           if tr.get("train_images") else None)},
        "results": {name: {"fid": s["fid"], "kid_mean": s["kid_mean"], "kid_std": s["kid_std"], "n": s["n"],
                           "n_ref": s["n_ref"], "ref": a.ref, "ref_label": s["ref_label"],
                           "extractor": s.get("extractor"),
                           "sampling": run["samplers"][name].get("timings"),
                           "guard": run["samplers"][name].get("guard"),
                           "error": run["samplers"][name].get("error")}
                    for name, s in scores.items()},
        "subset": {"file": f"{stem}-samples.npz", "n": subset_score["n"], "fid": subset_score["fid"],
                   "kid_mean": subset_score["kid_mean"], "n_ref": subset_score["n_ref"], "ref": a.ref,
                   "of": f"the first {len(subset)} of the {ddpm} samples"},
        "seed_table1": SEED_TABLE1,
        "weights": {"returned_as": run.get("weights"), "joined": str(weights) if weights else None},
        "run": {"device": run["device"], "versions": run["versions"], "train_exit_code": run["train_exit_code"],
                "peak_memory_bytes": run.get("peak_memory_bytes"), "smoke": run.get("smoke")},
    }
    from fastddpm.evaluate import write_json

    write_json(record, results / f"{stem}-quality.json")
    print(f"wrote {results / f'{stem}-quality.json'}, {stem}-samples.npz (FID@{subset_score['n']} "
          f"{subset_score['fid']:.2f}), {stem}-grid.png, {stem}-loss.png")
    return 0


def _card(device: dict) -> str:
    import re

    name = device.get("name") or "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-")


# --- smoke data -------------------------------------------------------------------------------

def cmd_smoke_data(a) -> int:
    """A small cifar10-jpeg look-alike (train.zip, test.zip of class folders of 32x32 JPEGs) made from
    the built-in shapes, so that the smoke run reads data the way the GPU run does."""
    import io
    import zipfile

    from PIL import Image

    from fastddpm.data import make_shapes

    folder = Path(a.dir) / "cifar10-jpeg"
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", a.n, 0), ("test", max(a.n // 4, 16), 1)):
        with zipfile.ZipFile(folder / f"{split}.zip", "w") as z:
            for i, img in enumerate(make_shapes(n, seed)):
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="JPEG", quality=95)
                z.writestr(f"{split}/class{i % 3}/{i:05d}.jpg", buf.getvalue())
    print(f"wrote {folder}/train.zip and test.zip")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample", help="on the GPU, after training: weights, samples, guard, run.json")
    s.add_argument("--run", required=True, help="the training run's folder (checkpoint.pt, metrics.jsonl)")
    s.add_argument("--out", required=True, help="what comes back ($OUT)")
    s.add_argument("--work", required=True, help="scratch folder (grids before they are packed)")
    s.add_argument("--n", type=int, default=5120)
    s.add_argument("--ddim-steps", type=int, default=50)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--engine", default="auto", help="sampling engine (default auto: in bf16 on CUDA, fast)")
    s.add_argument("--ddpm-engine", help="the DDPM run's engine, where it differs (the smoke run: eager, since "
                                         "the fast engine runs in Triton's interpreter on the CPU)")
    s.add_argument("--command", default="", help="the command that made the run, for the record")
    s.add_argument("--train-exit", type=int, default=None)
    s.add_argument("--smoke", action="store_true")
    r = sub.add_parser("record", help="here: score the returned samples, write bench/results/<date>-<card>-*")
    r.add_argument("--returned", required=True, help="the folder the GPU call's files came back to")
    r.add_argument("--results", default=str(ROOT / "bench" / "results"))
    r.add_argument("--ref", default="cifar10-jpeg:train", help="reference set (default cifar10-jpeg:train)")
    r.add_argument("--n", type=int, help="images scored per sampler (default: all returned, 5,120)")
    r.add_argument("--subset", type=int, default=1024)
    r.add_argument("--card", help="card name in the file names (default: from run.json)")
    r.add_argument("--work", help="scratch folder (default runs/quality-scored-<date>-<card>: the returned files "
                                  "may be read-only)")
    r.add_argument("--progress", action="store_true")
    d = sub.add_parser("smoke-data", help="a small JPEG zip data set from the shapes (the smoke run's data)")
    d.add_argument("dir")
    d.add_argument("--n", type=int, default=256)
    a = p.parse_args(argv)
    return {"sample": cmd_sample, "record": cmd_record, "smoke-data": cmd_smoke_data}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
