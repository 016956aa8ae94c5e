"""The quality run's script (bench/quality.sh) in its smoke mode: the same script as the GPU run, on
the CPU with the tiny preset, a JPEG zip and seconds of budget. It must produce every file the GPU run
brings back, within the device's limits, and the record step must turn them into the results JSON."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT

# pytest-xdist (`make test`): the quality smoke run (the `returned` fixture, a minute) runs once, in one worker
pytestmark = pytest.mark.xdist_group("quality")


RETURNED = {"samples-ddim2.npz", "samples-ddpm20.npz", "ema-fp16.pt.part0", "metrics.jsonl", "run.json",
            "quality.log", "pictures.tar"}


@pytest.fixture(scope="session")  # not "module": xdist may run other modules' tests between this one's,
def returned(tmp_path_factory):  # and a module fixture is set up again after them (it once ran twice)
    out = tmp_path_factory.mktemp("returned")
    run_quality_smoke(out, {"PYTHON": sys.executable})
    return out


def run_quality_smoke(out, env: dict, expect: int = 0) -> None:
    """bench/quality.sh --smoke into ``out``, which must exit ``expect``; where it does not, the
    assertion shows the script's log (the GPU run's too)."""
    env = {**os.environ, "OUT": str(out), **env}
    proc = subprocess.run(["bash", "bench/quality.sh", "--smoke"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    log = out / "quality.log"
    assert proc.returncode == expect, (log.read_text()[-6000:] if log.is_file() else "") + proc.stderr[-3000:]


def stand_in_python(tmp_path, when: str, then: str):
    """A python that runs ``then`` (shell) when its arguments contain `` when ``, else the real one."""
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/bash\nif [[ " $* " == *" {when} "* ]]; then {then}; fi\nexec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    return fake


def test_smoke_run_brings_back_every_file_within_the_device_limits(returned):
    files = {p.name for p in returned.iterdir()}
    assert RETURNED <= files and len(files) <= 8, files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)  # the only names the device brings back
    assert all(p.stat().st_size < 16 * 2 ** 20 for p in returned.iterdir())
    for name in ("samples-ddim2.npz", "samples-ddpm20.npz"):
        images = np.load(returned / name)["images"]
        assert images.shape == (8, 32, 32, 3) and images.dtype == np.uint8
    run = json.loads((returned / "run.json").read_text())
    assert run["training"]["stopped_by_time_budget"] and run["training"]["steps"] >= 1
    assert run["samplers"]["ddim2"]["guard"]["passed"]  # the fast engine checked against eager
    assert run["samplers"]["ddim2"]["timings"]["engine"] == "fast"
    assert run["weights"] == ["ema-fp16.pt.part0"]
    import tarfile

    with tarfile.open(returned / "pictures.tar") as tar:
        names = {n.lstrip("./") for n in tar.getnames()}
    assert {"loss.png", "samples-ddim2.png", "samples-ddpm20.png", "nvidia-smi.txt"} <= names


def test_a_graphed_training_that_fails_goes_on_in_the_default_mode(tmp_path):
    """The GPU run trains with CUDA graphs; where that training fails (here a stand-in python that
    exits 4, the trainer's compiled-step check, whenever it is asked for reduce-overhead), the script
    trains again in the default mode with what is left of the budget, and says so in run.json (2 images a
    sampler: 12 s less than the smoke's 8)."""
    fake = stand_in_python(tmp_path, "--compile-mode reduce-overhead",
                           'echo "error: the compiled training step disagrees with eager" >&2; exit 4')
    out = tmp_path / "out"
    run_quality_smoke(out, {"PYTHON": str(fake), "TRAIN_COMPILE_MODE": "reduce-overhead", "QUALITY_N": "2"})
    log = (out / "quality.log").read_text()
    assert "train (0.05 min budget, reduce-overhead): exit 4" in log
    assert re.search(r"graphed training failed \(exit 4\) before a checkpoint: [0-9.]+ min afresh", log)
    run = json.loads((out / "run.json").read_text())
    assert "--compile-mode reduce-overhead" in run["command"]
    assert "(exit 4: again in the default mode)" in run["command"]
    assert run["train_exit_code"] == 0 and run["training"]["steps"] >= 1
    assert (out / "samples-ddpm20.npz").is_file()


def test_a_run_that_trained_nothing_fails_and_still_brings_back_its_log(tmp_path):
    """Where training crashes before its first checkpoint, the script still returns its log and pictures,
    but exits 1: a GPU call with nothing to score must not read as a success."""
    out = tmp_path / "out"
    run_quality_smoke(out, {"PYTHON": str(stand_in_python(tmp_path, "fastddpm.train", 'echo boom >&2; exit 1'))},
                      expect=1)
    assert {p.name for p in out.iterdir()} == {"quality.log", "pictures.tar"}
    log = (out / "quality.log").read_text()
    assert "boom" in log and "training left no checkpoint (exit 1): nothing to sample" in log


def test_sampling_cut_off_by_its_cap_exits_5_not_the_device_s_timeout(tmp_path):
    """A sampling stage cut off by its cap (timeout's 124) ends the script with 5: the device tool reads
    124 as "the call timed out", which this call did not."""
    out = tmp_path / "out"
    run_quality_smoke(out, {"PYTHON": str(stand_in_python(tmp_path, "bench.quality sample", "exit 124"))}, expect=5)
    assert {"quality.log", "pictures.tar", "metrics.jsonl"} <= {p.name for p in out.iterdir()}
    assert "(exit 5)" in (out / "quality.log").read_text()


def test_record_scores_the_returned_samples(returned, tmp_path):
    from bench import quality
    from fastddpm.checkpoint import load_checkpoint

    before = sorted(p.name for p in returned.iterdir())
    code = quality.main(["record", "--returned", str(returned), "--results", str(tmp_path), "--ref", "shapes:train",
                         "--subset", "8", "--card", "smoke", "--work", str(tmp_path / "work")])
    assert code == 0
    assert sorted(p.name for p in returned.iterdir()) == before  # the returned files may be read-only: untouched
    record = json.loads(next(tmp_path.glob("*-smoke-quality.json")).read_text())
    for name in ("ddim2", "ddpm20"):
        r = record["results"][name]
        assert np.isfinite(r["fid"]) and r["n"] == r["n_ref"] == 8 and r["ref"] == "shapes:train"
    assert record["subset"]["n"] == 8 and np.isfinite(record["subset"]["fid"])
    assert record["seed_table1"]["fid"] == 25.517 and record["data_label"] == "CIFAR-10 (JPEG copy)"
    assert record["training"]["images_seen"] == record["training"]["steps"] * 16
    rows = record["denoising_error"]["rows"]  # of the EMA weights on the reference's test split
    ts = [r["t"] for r in rows]
    assert ts[0] == 19 and ts[-1] == 0 and ts == sorted(set(ts), reverse=True) and len(ts) >= 5
    assert "shapes" in record["denoising_error"]["images"].lower()
    assert 0 < record["denoising_error"]["mean_image_rms_error"] < 1
    assert all(r["x0_rms_error"] == pytest.approx((r["eps_mse"] * (1 - r["alpha_bar"]) / r["alpha_bar"]) ** 0.5)
               for r in rows)
    for suffix in ("samples.npz", "grid.png", "loss.png"):
        assert next(tmp_path.glob(f"*-smoke-{suffix}")).stat().st_size > 0
    model, diffusion, config = load_checkpoint(tmp_path / "work" / "ema-fp16.pt")  # the joined export loads
    assert config.preset == "tiny" and diffusion.T == 20


def test_sampler_sweep_smoke_and_record(returned, tmp_path):
    """bench/sweep.sh --smoke on the quality run's returned weights: every sampler's samples within the
    device's limits, the fast engine guarded, then sweep-record scores them at one N."""
    from bench import quality

    weights = quality.join_parts(returned, tmp_path)
    out, n = tmp_path / "out", 4  # four images a sampler: the fast engine runs in Triton's interpreter here
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "SWEEP_WEIGHTS": str(weights),
           "SWEEP_N": str(n)}
    proc = subprocess.run(["bash", "bench/sweep.sh", "--smoke"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = {p.name for p in out.iterdir()}
    assert files == {"samples-dpmpp2-clip.npz", "samples-ddim2.npz", "samples-ddim2-eta1.npz", "samples-ddpm20.npz",
                     "sweep.json"}, files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)  # the only names the device brings back
    run = json.loads((out / "sweep.json").read_text())
    for name, calls in (("dpm++2-clip", 2), ("ddim2", 2), ("ddim2-eta1", 2), ("ddpm20", 20)):
        assert np.load(out / quality.npz_name(name))["images"].shape == (n, 32, 32, 3)
        assert run["samplers"][name]["network_calls"] == calls
    assert run["samplers"]["ddim2-eta1"]["settings"]["eta"] == 1.0
    assert run["samplers"]["dpm++2-clip"]["settings"]["clip_x0"] is True  # (that it clips: tests/test_samplers.py)
    assert run["samplers"]["dpm++2-clip"]["timings"]["clip_x0"] is True
    noisy, plain = (np.load(out / quality.npz_name(n))["images"] for n in ("ddim2-eta1", "ddim2"))
    assert not np.array_equal(noisy, plain)  # eta reached the sampler
    for name in ("dpm++2-clip", "ddim2", "ddim2-eta1"):  # the few-step samplers: on the fast engine, guarded
        assert run["samplers"][name]["timings"]["engine"] == "fast" and run["samplers"][name]["guard"]["passed"]
    code = quality.main(["sweep-record", "--returned", str(out), "--results", str(tmp_path / "results"),
                         "--ref", "shapes:train", "--card", "smoke", "--work", str(tmp_path / "work")])
    assert code == 0
    record = json.loads(next((tmp_path / "results").glob("*-smoke-samplers.json")).read_text())
    assert set(record["results"]) == {"dpm++2-clip", "ddim2", "ddim2-eta1", "ddpm20"}
    assert all(np.isfinite(r["fid"]) and r["n"] == r["n_ref"] == n for r in record["results"].values())
    assert all(r["steady_seconds"] > 0 and r["call_seconds"] > 0 for r in record["results"].values())
    table = quality.sweep_table(record).splitlines()
    rows = [line.split(" | ")[0] for line in table[2:]]
    assert rows == ["| dpm++2-clip", "| ddim2", "| ddim2-eta1", "| ddpm20"]  # by network calls


def test_sweep_names_are_checked():
    from bench import quality

    assert quality.sweep_settings("dpm++10") == {"sampler": "dpm++", "steps": 10}
    assert quality.sweep_settings("ddim100") == {"sampler": "ddim", "steps": 100}
    assert quality.sweep_settings("ddpm") == {"sampler": "ddpm"}
    assert quality.sweep_settings("ddim50-eta1") == {"sampler": "ddim", "steps": 50, "eta": 1.0}
    assert quality.sweep_settings("ddim20-eta0.5") == {"sampler": "ddim", "steps": 20, "eta": 0.5}
    assert quality.npz_name("ddim20-eta0.5") == "samples-ddim20-eta0.5.npz"  # a name the device brings back
    assert quality.sweep_settings("dpm++20-clip") == {"sampler": "dpm++", "steps": 20, "clip_x0": True}
    assert quality.sweep_settings("ddim50-eta1-clip") == {"sampler": "ddim", "steps": 50, "eta": 1.0, "clip_x0": True}
    assert quality.sweep_settings("ddpm-clip") == {"sampler": "ddpm", "clip_x0": True}
    bad_names = ("ddim", "dpm10", "ddpm1000x", "dpm++10-eta1", "ddim50-eta", "ddim50-eta-1", "ddim50-eta1.",
                 "ddpm-eta1", "ddim50-clip-eta1", "ddim50-clip-clip", "ddpm-clip-clip")
    for bad in bad_names:
        with pytest.raises(SystemExit, match=re.escape(f"--configs {bad}:")):
            quality.sweep_settings(bad)
    assert quality.sweep_configs("ddpm,ddim50-eta1") == [("ddpm", {"sampler": "ddpm"}),
                                                         ("ddim50-eta1", {"sampler": "ddim", "steps": 50, "eta": 1.0})]
    for twice in ("ddim50,ddim50-eta0", "ddim50-eta1,ddim50-eta1.0", "ddim50-clip,ddim50-eta0-clip"):
        with pytest.raises(SystemExit, match="are the same sampler"):
            quality.sweep_configs(twice)
    assert len(quality.sweep_configs("ddim50,ddim50-clip")) == 2  # clipped or not: two samplers
    assert len(quality.sweep_configs(quality.SWEEP)) == quality.SWEEP_MAX
    with pytest.raises(SystemExit, match="8 samplers; at most 7"):
        quality.sweep_configs(quality.SWEEP + ",ddim50-eta1")
