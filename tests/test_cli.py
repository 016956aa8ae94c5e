"""Every bad input: exit code 2 and one line naming the problem and the fix, never a traceback."""
import shutil
import subprocess
import sys

import pytest
import torch

from fastddpm import sampling as sample_mod
from fastddpm import train as train_mod
from tests.conftest import ROOT, run_main

# pytest-xdist (`make test`): the training run of the module fixture runs once, in one worker
pytestmark = pytest.mark.xdist_group("cli")

SMALL = ["--preset", "tiny", "--data", "shapes", "--epochs", "1", "--T", "10", "--batch-size", "16",
         "--train-size", "32", "--val-size", "16", "--n-samples", "0", "--no-progress"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    code, stdout, stderr = run_main(train_mod.main, SMALL + ["--out", str(out)])
    assert code == 0, stderr
    return out


def _one_line_error(code, err, *words):
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)


@pytest.mark.parametrize("argv,words", [
    (["--dtype", "fp8"], ["--dtype fp8", "fp32"]),
    (["--T", "0"], ["--T 0", "at least 1"]),
    (["--batch-size", "0"], ["--batch-size 0"]),
    (["--epochs", "-1"], ["--epochs"]),
    (["--ema", "1.5"], ["--ema"]),
    (["--data", "/no/such/dir"], ["--data /no/such/dir", "no such file"]),
    (["--preset", "huge"], ["--preset huge"]),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu"], ["--device"]),
    (["--lr", "abc"], ["--lr", "invalid float"]),
    (["--compile-mode", "fastest"], ["--compile-mode fastest", "reduce-overhead"]),
    (["--dtype", "bf16", "--no-grad-scaler"], ["--no-grad-scaler with --dtype bf16", "--dtype fp16"]),
])
def test_bad_train_flags(tmp_path, argv, words):
    code, _, err = run_main(train_mod.main, SMALL + ["--out", str(tmp_path / "o")] + argv)
    _one_line_error(code, err, *words)
    assert not (tmp_path / "o").exists()  # a refused fresh run leaves no empty OUT behind


def test_unwritable_out(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_main(train_mod.main, SMALL + ["--out", str(blocker / "sub")])
    _one_line_error(code, err, "--out", "cannot write")


def test_existing_run_is_not_overwritten(run_dir):
    before = (run_dir / "checkpoint.pt").read_bytes()
    code, _, err = run_main(train_mod.main, SMALL + ["--out", str(run_dir)])
    _one_line_error(code, err, "already holds a run", "--resume")
    assert (run_dir / "checkpoint.pt").read_bytes() == before


def test_resume_with_disagreeing_T_or_nothing_to_resume(run_dir, tmp_path):
    code, _, err = run_main(train_mod.main, SMALL + ["--out", str(run_dir), "--resume", "--T", "50"])
    _one_line_error(code, err, "--T 50", "checkpoint's 10")
    code, _, err = run_main(train_mod.main, SMALL + ["--out", str(tmp_path), "--resume"])
    _one_line_error(code, err, "--resume", "no checkpoint.pt")


def test_resuming_a_finished_run_says_so(run_dir, tmp_path):
    shutil.copytree(run_dir, tmp_path / "run")  # a copy: resuming rewrites the metrics the other tests share
    code, out, _ = run_main(train_mod.main, SMALL + ["--out", str(tmp_path / "run"), "--resume"])
    assert code == 0 and "has finished its epochs (1, step 2): nothing to train; raise --epochs" in out, out


def test_ctrl_c_names_the_checkpoint_kept(run_dir, tmp_path, monkeypatch):
    def interrupted(trainer):
        trainer.save()
        trainer.step += 3
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod.Trainer, "fit", interrupted)
    code, _, err = run_main(train_mod.main, SMALL + ["--out", str(tmp_path / "o")])
    assert code == 130 and err.count("\n") == 1, err
    assert f"interrupted at step 3: {tmp_path / 'o' / 'checkpoint.pt'} (step 0) is kept; continue with --resume" in err


@pytest.mark.parametrize("content", ["truncated", "foreign-zip", "foreign-pickle", "text"])
def test_bad_checkpoint_files(run_dir, tmp_path, content):
    good = (run_dir / "checkpoint.pt").read_bytes()
    bad = {"truncated": good[: len(good) // 2], "text": b"hello\n"}.get(content)
    path = tmp_path / "bad.pt"
    if bad is None:
        torch.save({"weights": torch.zeros(2)} if content == "foreign-zip" else [1, 2, 3], path)
    else:
        path.write_bytes(bad)
    code, _, err = run_main(sample_mod.main, ["--checkpoint", str(path), "--out", str(tmp_path / "g.png")])
    unreadable = ["not a fastddpm checkpoint (truncated or foreign file); point at"]  # no torch text, cut or not
    _one_line_error(code, err, str(path), *(unreadable if content in ("truncated", "text") else []))
    out = tmp_path / "resume"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(path.read_bytes())
    code, _, err = run_main(train_mod.main, SMALL + ["--out", str(out), "--resume"])
    _one_line_error(code, err, "checkpoint")


def test_checkpoint_for_another_architecture(run_dir, tmp_path):
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    ckpt["config"]["preset"] = "seed"
    torch.save(ckpt, tmp_path / "other.pt")
    code, _, err = run_main(sample_mod.main, ["--checkpoint", str(tmp_path / "other.pt")])
    _one_line_error(code, err, "do not fit", "'seed' U-Net")


def test_sample_cli_writes_grid_and_npz(run_dir, tmp_path):
    import numpy as np

    code, out, err = run_main(sample_mod.main, ["--checkpoint", str(run_dir / "checkpoint.pt"), "--n", "5",
                                                "--out", str(tmp_path / "g.png"), "--npz", str(tmp_path / "s.npz"),
                                                "--no-progress"])
    assert code == 0, err
    images = np.load(tmp_path / "s.npz")["images"]
    assert images.shape == (5, 32, 32, 3) and images.dtype == np.uint8
    assert (tmp_path / "g.png").is_file()
    code, _, err = run_main(sample_mod.main, ["--checkpoint", str(run_dir / "checkpoint.pt"), "--n", "0"])
    _one_line_error(code, err, "--n 0")


@pytest.mark.parametrize("argv,words", [
    (["--out", "{tmp}/g.jpg"], ["--out {tmp}/g.jpg", "written as PNG", ".png"]),  # never PNG bytes named .jpg
    (["--sampler", "ddim", "--steps", "4", "--eta", "5"], ["--eta 5.0", "[0, 1]"]),
    (["--sampler", "dpm++"], ["--sampler dpm++", "default of 20 steps", "T=10", "--steps between 1 and 10"]),
    (["--checkpoint", "{run}"], ["{run}: is a directory", "e.g. {run}/checkpoint.pt"]),
])
def test_bad_sample_flags(run_dir, tmp_path, argv, words):
    def fill(items):
        return [w.format(tmp=tmp_path, run=run_dir) for w in items]

    code, _, err = run_main(sample_mod.main, ["--checkpoint", str(run_dir / "checkpoint.pt"), "--n", "2",
                                              "--out", str(tmp_path / "g.png"), "--no-progress", *fill(argv)])
    _one_line_error(code, err, *fill(words))
    assert list(tmp_path.iterdir()) == []  # refused before sampling: nothing written


def test_real_process_exit_codes(tmp_path):
    """The shell sees exit 2 and one line (argparse and our own errors alike)."""
    for argv in (["--dtype", "fp8"], ["--T", "0"]):
        proc = subprocess.run([sys.executable, "-m", "fastddpm.train", *argv, "--out", str(tmp_path)],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        _one_line_error(proc.returncode, proc.stderr)


def test_sigkill_during_training_leaves_a_loadable_checkpoint(tmp_path):
    """Kill -9 at an arbitrary moment while checkpoints are being written every step; the
    checkpoint on disk always loads, and --resume finishes the run."""
    import signal
    import time

    from fastddpm.checkpoint import load_checkpoint, read_checkpoint

    argv = [sys.executable, "-m", "fastddpm.train", *SMALL, "--epochs", "50", "--ckpt-every", "1",
            "--out", str(tmp_path)]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (tmp_path / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.7)  # somewhere in the middle of steps and saves
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    step = read_checkpoint(tmp_path / "checkpoint.pt")["step"]
    assert step >= 1
    load_checkpoint(tmp_path / "checkpoint.pt")
    code, out, err = run_main(train_mod.main, SMALL + ["--epochs", str(step // 2 + 2), "--out", str(tmp_path),
                                                       "--resume"])
    assert code == 0, err
    assert read_checkpoint(tmp_path / "checkpoint.pt")["step"] == (step // 2 + 2) * 2
