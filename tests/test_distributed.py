"""Multi-process training on PyTorch's own engine: torchrun + DDP, gloo on the CPU."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from fastddpm.checkpoint import read_checkpoint
from tests.conftest import ROOT

ARGS = ["--data", "shapes", "--preset", "tiny", "--T", "20", "--batch-size", "16", "--train-size", "256",
        "--val-size", "32", "--n-samples", "0", "--no-progress", "--lr", "1e-3"]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def _env(**extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def test_torchrun_two_processes_train_identical_replicas_and_resume(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([TORCHRUN, "--nproc_per_node=2", "--standalone", "-m", "fastddpm.train", *ARGS,
                           "--epochs", "3", "--out", str(out)], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # check_replicas broadcasts rank 0's weights and compares them on every rank after training
    assert "replicas identical: all 2 ranks" in proc.stdout
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["train_loss"] < 0.9 * records[0]["train_loss"]  # the loss falls
    # 256 images / (16 per rank x 2 ranks) = 8 steps per epoch: each rank drew a disjoint half
    assert read_checkpoint(out / "checkpoint.pt")["step"] == 24
    # --resume with a different number of processes (here 1) continues the same run
    proc = subprocess.run([sys.executable, "-m", "fastddpm.train", *ARGS, "--epochs", "4", "--out", str(out),
                           "--resume"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_checkpoint(out / "checkpoint.pt")["step"] == 24 + 16


def test_a_time_budget_stops_every_rank_at_the_same_step(tmp_path):
    """Each rank acts on rank 0's clock, so they drop the lr and stop together: a rank that stopped
    alone would hang the others, and ranks with different lr would hold different weights."""
    out = tmp_path / "run"
    proc = subprocess.run([TORCHRUN, "--nproc_per_node=2", "--standalone", "-m", "fastddpm.train", *ARGS,
                           "--epochs", "500", "--time-budget", "0.1", "--out", str(out)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "time budget of 0.1 min spent" in proc.stdout and "replicas identical: all 2 ranks" in proc.stdout
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["event"] == "time_budget"
    assert read_checkpoint(out / "checkpoint.pt")["step"] == records[-1]["step"]  # stopped with a checkpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_dead_rank_makes_the_other_exit_with_a_message_not_hang(tmp_path):
    """Without torchrun's agent (which would kill the survivors itself): our own process group
    error handling / timeout must end rank 0."""
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = _env(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, FASTDDPM_DIST_TIMEOUT="30")
        procs.append(subprocess.Popen([sys.executable, "-m", "fastddpm.train", *ARGS, "--epochs", "200",
                                       "--ckpt-every", "1", "--out", str(tmp_path / "run")],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.time() + 120
    while not (tmp_path / "run" / "checkpoint.pt").exists() and time.time() < deadline:
        assert procs[0].poll() is None, procs[0].communicate()[1][-2000:]
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGKILL)
    try:
        _, err = procs[0].communicate(timeout=90)
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode == 1, err[-2000:]
    assert "lost the other training processes" in err and "--resume" in err
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] >= 1
