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

``sweep`` (run by bench/sweep.sh, issue 13) and ``sweep-record``: the same weights sampled by every
sampler of ``SWEEP`` at one N and seed (few-step samplers guarded like DDIM above), then scored here
into ``bench/results/<date>-<card>-samplers.json`` and a table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
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


def training_summary(run: Path) -> dict:
    """What the run's metrics.jsonl says: steps, images, minutes, steady throughput, the last losses."""
    from fastddpm.train import read_metrics

    records = read_metrics(run)
    epochs = [r for r in records if "event" not in r]
    if not epochs:
        return {"records": 0}
    last = epochs[-1]
    # the latest session's (a resumed run keeps every session's events); a budget stopped the run only at its end
    budget = next((r for r in reversed(records) if r.get("event") == "time_budget" and r["step"] == last["step"]),
                  None)
    check = next((r for r in reversed(records) if r.get("event") == "compile_check"), None)
    warm = [r["warmup_seconds"] for r in epochs if "warmup_seconds" in r]
    steady = [r["images_per_s"] for r in epochs if "warmup_seconds" not in r] or [last["images_per_s"]]
    return {"steps": last["step"], "epochs_completed": sum(1 for r in epochs if not r.get("partial")),
            "training_minutes": last["elapsed_seconds"] / 60, "warmup_seconds": warm[0] if warm else None,
            "steady_images_per_s_median": float(np.median(steady)), "final_train_loss": last["train_loss"],
            "train_images": last.get("train_images"),
            "final_val_loss": last["val_loss"], "final_lr": last["lr"], "stopped_by_time_budget": budget is not None,
            "budget_minutes": budget["budget_minutes"] if budget else None,
            "compile_check": ({k: v for k, v in check.items() if k not in ("event", "epoch", "step")}
                              if check else None)}


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


def guarded_sample(loaded, n: int, seed: int, engine: str, settings: dict):
    """(images, record): ``n`` samples with ``engine`` (the compiled engine where it raises). A few-step
    sampler on the fast engine is checked against the eager engine with PyTorch's own GroupNorm (the
    model's "auto" would be the Triton kernels on CUDA), fed the same x_T and Philox noise, within the
    bench's sampling tolerance: a fast path that disagrees posts no time, and its images are replaced
    by the compiled engine's. (DDPM's fused reverse step is checked by its native kernel tests; DDPM
    with a clipped x0 runs the few-step samplers' generic step instead, and is guarded like them.)"""
    from bench.common import SAMPLE_TOL

    record = {"settings": settings}
    try:
        images, timings = _sample(loaded, n, seed, engine=engine, **settings)
    except Exception as e:  # noqa: BLE001 - say what broke, sample with the reference engine
        record["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        print(f"{settings}: engine {engine} failed ({record['error']}); sampling with the compiled engine", flush=True)
        images, timings = _sample(loaded, n, seed, engine="compiled", **settings)
    record["timings"] = timings
    if (settings["sampler"] != "ddpm" or settings.get("clip_x0")) and timings["engine"] == "fast":
        loaded.model.set_kernels("torch")
        try:
            eager, eager_timings = _sample(loaded, n, seed, engine="eager", noise="philox", **settings)
        finally:
            loaded.model.set_kernels("auto")
        diff = (images.float() - eager.float()).abs()
        tol = SAMPLE_TOL[loaded.config.dtype]
        record["guard"] = {"against": "eager engine, same x_T and Philox noise", "mean_abs_grey": diff.mean().item(),
                           "max_abs_grey": diff.max().item(), "eager_timings": eager_timings, "tol": tol,
                           "passed": diff.mean().item() <= tol}
        if not record["guard"]["passed"]:
            print(f"{settings}: the fast engine disagrees with eager (mean {diff.mean():.2f} grey levels); its "
                  "timings are withheld and the compiled engine's images kept", flush=True)
            record["fast_timings_withheld"] = True
            images, timings = _sample(loaded, n, seed, engine="compiled", **settings)
            record["timings"] = timings
    return images, record


def cmd_sample(a) -> int:
    from bench.common import device_info, git_commit, versions
    from fastddpm.evaluate import write_json
    from fastddpm.checkpoint import export_weights, read_checkpoint
    from fastddpm.images import save_grid
    from fastddpm.sampling import save_npz

    run, out, work = Path(a.run), Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = run / "checkpoint.pt"
    config = read_checkpoint(ckpt)["config"]
    info = {"kind": "fastddpm quality run", "date": datetime.date.today().isoformat(), "smoke": a.smoke,
            "command": a.command, "git": git_commit(), "device": device_info(), "versions": versions(),
            "config": config, "training": training_summary(run),
            "train_exit_code": a.train_exit, "n": a.n, "seed": a.seed, "samplers": {}}
    write = lambda: write_json(info, out / "run.json")  # noqa: E731 - atomic: a stage cut off mid-write
    write()
    export_weights(ckpt, out / WEIGHTS)  # first: the weights come back even if sampling fails
    info["weights"] = [p.name for p in split_file(out / WEIGHTS)]  # (in OUT itself: nothing moves across disks)
    write()
    from fastddpm.checkpoint import load_checkpoint
    from fastddpm.sampling import default_device

    device = default_device()
    loaded = load_checkpoint(ckpt, device=device)  # the EMA weights
    T = config["T"]
    configs = [(f"ddim{a.ddim_steps}", {"sampler": "ddim", "steps": a.ddim_steps}), (f"ddpm{T}", {"sampler": "ddpm"})]

    def save(name, images, record):
        save_npz(images, out / f"samples-{name}.npz")
        save_grid(images[:64], work / f"samples-{name}.png")

    run_samplers(loaded, configs, a, info, write, save)
    return 0


def run_samplers(loaded, configs, a, info: dict, write, save) -> None:
    """Each (name, settings) of ``configs`` in turn, ``a.n`` images with ``a.seed``: sampled and guarded
    (guarded_sample), handed to ``save(name, images, record)``, recorded in ``info["samplers"]`` and
    written at once (a run cut off keeps what finished). DDPM runs on ``a.ddpm_engine`` where given,
    and on the compiled engine after a failed guard (it would share the engine that just failed)."""
    import torch

    from fastddpm.sampling import describe_timings

    ddpm_engine = a.ddpm_engine or a.engine
    for name, settings in configs:
        engine = ddpm_engine if settings["sampler"] == "ddpm" else a.engine
        start = time.perf_counter()
        images, record = guarded_sample(loaded, a.n, a.seed, engine, settings)
        if not record.get("guard", {}).get("passed", True):
            ddpm_engine = "compiled"
        record["network_calls"] = settings.get("steps", loaded.diffusion.T)
        save(name, images, record)
        record["wall_seconds"] = time.perf_counter() - start
        info["samplers"][name] = record
        write()
        print(f"{name}: {a.n} images in {describe_timings(record['timings'])}", flush=True)  # it names the engine
    if torch.cuda.is_available():
        info["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    write()


# --- on the GPU: the sampler sweep (issue 13) ----------------------------------------------------

SWEEP = "dpm++10,ddim10,dpm++20,ddim20,ddim50,ddim100,ddpm"  # cheapest first: a cut-off run keeps those
SWEEP_MAX = 7  # samplers in one call: their .npz and sweep.json are the 8 files the device brings back
SWEEP_NAME = re.compile(r"(?:(?P<sampler>dpm\+\+|ddim)(?P<steps>[0-9]+)"
                        r"|ddim(?P<ddim>[0-9]+)-eta(?P<eta>[0-9]+(\.[0-9]+)?)|(?P<ddpm>ddpm))(?P<clip>-clip)?")


def sweep_settings(name: str) -> dict:
    """"ddpm" (all T steps), "ddimK", "dpm++K", "ddimK-etaE", each with "-clip" -> sample()'s settings.
    Plain "ddimK" has sample()'s default eta 0 (deterministic, as in the DDIM paper's FID tables);
    "-etaE" adds noise (eta 1: DDPM-like variances on the strided steps); "-clip" clips each step's
    predicted x0 to [-1, 1]."""
    m = SWEEP_NAME.fullmatch(name)
    if m is None:
        raise SystemExit(f"--configs {name}: each is ddpm, ddimK, ddimK-etaE or dpm++K (K steps, E the DDIM eta), "
                         f"each optionally with -clip (x0 clipped), e.g. {SWEEP}")
    clip = {"clip_x0": True} if m["clip"] else {}
    if m["sampler"]:
        return {"sampler": m["sampler"], "steps": int(m["steps"]), **clip}
    if m["ddim"]:
        return {"sampler": "ddim", "steps": int(m["ddim"]), "eta": float(m["eta"]), **clip}
    return {"sampler": "ddpm", **clip}


def sweep_configs(names: str) -> list[tuple[str, dict]]:
    """--configs -> [(name, settings)]: each name checked, none the same sampler twice (ddim50 and
    ddim50-eta0 would be sampled twice and scored as two rows), at most SWEEP_MAX."""
    configs, seen = [], {}
    for name in names.split(","):
        settings = sweep_settings(name)
        key = (settings["sampler"], settings.get("steps"), settings.get("eta", 0.0),  # sample()'s default eta is 0
               settings.get("clip_x0", False))
        if key in seen:
            raise SystemExit(f"--configs {names}: {seen[key]} and {name} are the same sampler")
        seen[key] = name
        configs.append((name, settings))
    if len(configs) > SWEEP_MAX:
        raise SystemExit(f"--configs {names}: {len(configs)} samplers; at most {SWEEP_MAX} in one call (the device "
                         f"brings back 8 files: their .npz and sweep.json)")
    return configs


def npz_name(name: str) -> str:
    """The returned file of one sampler: the device brings back only names of letters, digits, ".", "_"
    and "-" ("dpm++10" -> samples-dpmpp10.npz)."""
    return f"samples-{name.replace('+', 'p')}.npz"


def cmd_sweep(a) -> int:
    """One trained model, every sampler of the sweep, the same N and seed: samples-<name>.npz each
    (written as it finishes) and sweep.json (timings, guards) into --out."""
    from bench.common import device_info, git_commit, versions
    from fastddpm.evaluate import write_json
    from fastddpm.checkpoint import load_checkpoint
    from fastddpm.sampling import default_device, save_npz

    configs = sweep_configs(a.configs)  # bad names fail before loading
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_checkpoint(a.weights, device=default_device())
    T = loaded.diffusion.T
    info = {"kind": "fastddpm sampler sweep", "date": datetime.date.today().isoformat(), "smoke": a.smoke,
            "command": a.command, "git": git_commit(), "device": device_info(), "versions": versions(),
            "weights": str(a.weights), "config": loaded.config.to_dict(), "n": a.n, "seed": a.seed, "samplers": {}}
    write = lambda: write_json(info, out / "sweep.json")  # noqa: E731 - atomic: a stage cut off mid-write
    write()
    configs = [(f"ddpm{T}" if name == "ddpm" else name, settings) for name, settings in configs]
    run_samplers(loaded, configs, a, info, write, lambda name, images, record: save_npz(images, out / npz_name(name)))
    return 0


def cmd_sweep_record(a) -> int:
    """Score every returned samples-*.npz of a sweep (the same N each, against N training images) and
    write bench/results/<date>-<card>-samplers.json; print the README's table."""
    returned, results = Path(a.returned), Path(a.results)
    run = json.loads((returned / "sweep.json").read_text())
    stem = f"{run['date']}-{a.card or _card(run['device'])}"
    work = Path(a.work or ROOT / "runs" / f"sweep-scored-{stem}")
    work.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name, r in run["samplers"].items():
        npz = returned / npz_name(name)
        if not npz.is_file():
            print(f"{name}: no {npz.name} came back (cut off?): not scored", flush=True)
            continue
        score = _evaluate(npz, a.ref, run["n"], work / f"eval-{name}.json", a.progress)
        t = r["timings"]
        rows[name] = {"settings": r["settings"], "network_calls": r["network_calls"], "fid": score["fid"],
                      "kid_mean": score["kid_mean"], "kid_std": score["kid_std"], "n": score["n"],
                      "n_ref": score["n_ref"], "ref": a.ref, "ref_label": score["ref_label"],
                      "extractor": score.get("extractor"), "engine": t.get("engine"),
                      # all N images at the steady rate (comparable across engines and rows), and the
                      # call as it went (its one-off part: compilation on the first row only, capture)
                      "steady_seconds": (t["image_steps"] / t["steady_image_steps_per_s"]
                                         if t.get("steady_image_steps_per_s") else None),
                      "call_seconds": t.get("seconds"), "timings": t, "guard": r.get("guard"),
                      "fast_timings_withheld": bool(r.get("fast_timings_withheld")), "error": r.get("error")}
        print(f"{name}: FID {score['fid']:.2f} (N={score['n']} vs {score['n_ref']} {score['ref_label']})", flush=True)
    if not rows:
        raise SystemExit(f"{returned}: no samples-*.npz came back; nothing to score")
    results.mkdir(parents=True, exist_ok=True)
    record = {"kind": "fastddpm sampler sweep", "card": run["device"].get("name"), "date": run["date"],
              "git": run["git"], "command": run["command"], "weights": run["weights"], "config": run["config"],
              "n": run["n"], "seed": run["seed"], "scored_with": "python -m bench.quality sweep-record",
              "results": rows, "run": {"device": run["device"], "versions": run["versions"],
                                       "peak_memory_bytes": run.get("peak_memory_bytes"), "smoke": run.get("smoke")}}
    from fastddpm.evaluate import write_json

    write_json(record, results / f"{stem}-samplers.json")
    print(sweep_table(record))
    print(f"wrote {results / f'{stem}-samplers.json'}")
    return 0


def sweep_table(record: dict) -> str:
    """The README's table, from a samplers JSON."""
    rows = sorted(record["results"].items(), key=lambda kv: kv[1]["network_calls"])
    head = ["sampler", "network calls", f"FID (N = {record['n']:,})", "KID", f"seconds for {record['n']:,}, steady",
            "seconds, the call (compile on the first row)", "engine"]
    fmt = lambda v, f: "—" if v is None else format(v, f)  # noqa: E731
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows:
        lines.append(f"| {name} | {r['network_calls']:,} | {r['fid']:.2f} | {r['kid_mean']:.4f} | "
                     f"{fmt(r['steady_seconds'], '.1f')} | {fmt(r['call_seconds'], '.1f')} | {r['engine']} |")
    return "\n".join(lines)


# --- here: record -----------------------------------------------------------------------------

def _evaluate(samples: Path, ref: str, n: int, json_path: Path, progress: bool) -> dict:
    from fastddpm import evaluate

    argv = ["--samples", str(samples), "--ref", ref, "--n", str(n), "--json", str(json_path)]
    code = evaluate.main(argv + ([] if progress else ["--no-progress"]))
    if code:
        raise SystemExit(f"fastddpm.evaluate {' '.join(argv)} failed with exit code {code}")
    return json.loads(json_path.read_text())


def denoising_record(weights, images: str | None, n: int) -> dict:
    """fastddpm.evaluate.denoising_error of the weights on the first n images of the set ``images`` (None:
    the test split of the data the weights were trained on), on the CPU: why the deterministic samplers
    do or do not work on this model."""
    from fastddpm.checkpoint import load_checkpoint
    from fastddpm.evaluate import denoising_error, load_image_set

    model, diffusion, config = load_checkpoint(weights, device="cpu")
    ref = load_image_set(images or held_out(f"{config.data}:train"), "--images")
    x0 = ref.images[:n].astype(np.float64) / 127.5 - 1.0
    # the x0 error of a guess that ignores x_t: the images' mean, for scale
    mean_image_rms = float(np.sqrt(np.mean((x0 - x0.mean(axis=0)) ** 2)))
    return {"images": f"the first {n} of {ref.label}", "mean_image_rms_error": mean_image_rms,
            "rows": denoising_error(model, diffusion, ref.images[:n])}


def held_out(ref: str) -> str:
    """The test split of the reference's data (cifar10-jpeg:train -> cifar10-jpeg:test); a file or folder
    reference stands for itself."""
    from fastddpm.evaluate import data_split

    split = data_split(ref)
    return f"{split[0]}:test" if split else ref


def cmd_denoising(a) -> int:
    """The denoising error by t of some weights, printed and (--into) added to a record JSON."""
    from fastddpm.evaluate import write_json

    rec = denoising_record(a.weights, a.images, a.n)
    print(f"{rec['images']}: guessing their mean image would be off by {rec['mean_image_rms_error']:.3f} RMS")
    for r in rec["rows"]:
        print(f"t={r['t']:4d}  alpha_bar {r['alpha_bar']:.2e}  eps mse {r['eps_mse']:.2e}  "
              f"x0 rms error {r['x0_rms_error']:.3f}")
    if a.into:
        doc = json.loads(Path(a.into).read_text())
        doc["denoising_error"] = {**rec, "weights": str(a.weights)}
        write_json(doc, Path(a.into))
        print(f"added to {a.into}")
    return 0


def cmd_record(a) -> int:
    import tarfile

    from fastddpm.evaluate import write_json
    from fastddpm.images import plot_loss, save_grid
    from fastddpm.sampling import save_npz
    from fastddpm.train import read_metrics

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
    scored = [k for k in run["samplers"] if (returned / f"samples-{k}.npz").is_file()]
    if not scored:
        raise SystemExit(f"{returned}: no samples-*.npz came back; nothing to score (see quality.log)")
    scores = {}
    for name in scored:
        npz = returned / f"samples-{name}.npz"
        n = min(a.n or run["n"], len(np.load(npz)["images"]))
        scores[name] = _evaluate(npz, a.ref, n, work / f"eval-{name}.json", a.progress)
        print(f"{name}: FID {scores[name]['fid']:.2f} (N={scores[name]['n']} vs {scores[name]['n_ref']} "
              f"{scores[name]['ref_label']})", flush=True)
    ddpm = next((k for k in scored if k.startswith("ddpm")), scored[0])  # the paper's sampler where it finished
    with np.load(returned / f"samples-{ddpm}.npz") as z:
        subset = z["images"][:a.subset]
    import torch

    images = torch.from_numpy(subset).permute(0, 3, 1, 2).contiguous()
    save_npz(images, results / f"{stem}-samples.npz")
    subset_score = _evaluate(results / f"{stem}-samples.npz", a.ref, len(subset), work / "eval-subset.json", a.progress)
    save_grid(images[:64], results / f"{stem}-grid.png", nrow=8)
    records = read_metrics(returned)
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
        "denoising_error": ({**denoising_record(weights, held_out(a.ref), 256), "weights": "the EMA weights"}
                            if weights else None),
        "weights": {"returned_as": run.get("weights"), "joined": str(weights) if weights else None},
        "run": {"device": run["device"], "versions": run["versions"], "train_exit_code": run["train_exit_code"],
                "peak_memory_bytes": run.get("peak_memory_bytes"), "smoke": run.get("smoke")},
    }
    write_json(record, results / f"{stem}-quality.json")
    print(f"wrote {results / f'{stem}-quality.json'}, {stem}-samples.npz (FID@{subset_score['n']} "
          f"{subset_score['fid']:.2f}), {stem}-grid.png, {stem}-loss.png")
    return 0


def _card(device: dict) -> str:
    from fastddpm.measured import card_slug

    return card_slug(device.get("name") or "cpu")


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
    w = sub.add_parser("sweep", help="on the GPU: every sampler of the sweep on one model, the same N")
    w.add_argument("--weights", required=True, help="a checkpoint or exported weights (ema-fp16.pt)")
    w.add_argument("--out", required=True, help="what comes back ($OUT)")
    w.add_argument("--configs", default=SWEEP,
                   help=f"comma-separated, at most {SWEEP_MAX}: ddpm, ddimK, ddimK-etaE, dpm++K (default {SWEEP})")
    w.add_argument("--n", type=int, default=2048, help="images per sampler (default 2,048: 7 .npz of 6 MiB, "
                                                       "42 MiB of the device's 64 MiB return)")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--engine", default="auto")
    w.add_argument("--ddpm-engine", help="DDPM's engine, where it differs from --engine")
    w.add_argument("--command", default="")
    w.add_argument("--smoke", action="store_true")
    wr = sub.add_parser("sweep-record",
                        help="here: score a returned sweep, write bench/results/<date>-<card>-samplers.json")
    wr.add_argument("--returned", required=True)
    wr.add_argument("--results", default=str(ROOT / "bench" / "results"))
    wr.add_argument("--ref", default="cifar10-jpeg:train")
    wr.add_argument("--card")
    wr.add_argument("--work")
    wr.add_argument("--progress", action="store_true")
    e = sub.add_parser("denoising", help="here: eq. 13's error by t of some weights, and the x0 error it implies")
    e.add_argument("--weights", required=True, help="a checkpoint or exported weights")
    e.add_argument("--images", help="an image set, as fastddpm.evaluate names them (default: the test split of "
                                    "the data the weights were trained on)")
    e.add_argument("--n", type=int, default=256)
    e.add_argument("--into", help="a record JSON to add the result to (key denoising_error)")
    d = sub.add_parser("smoke-data", help="a small JPEG zip data set from the shapes (the smoke run's data)")
    d.add_argument("dir")
    d.add_argument("--n", type=int, default=256)
    a = p.parse_args(argv)
    return {"sample": cmd_sample, "record": cmd_record, "sweep": cmd_sweep, "sweep-record": cmd_sweep_record,
            "smoke-data": cmd_smoke_data, "denoising": cmd_denoising}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
