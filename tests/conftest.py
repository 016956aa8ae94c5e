import contextlib
import io
import os
import sys
from pathlib import Path

# Inductor's C++ code for the CPU without vector kernels: with them it generates and compiles two variants
# of every kernel (a cold-cache Inductor training-step test took 188 s with them, 107 s without, on CI's
# kind of CPU on 2026-11-28). What the tests check (graphs, custom ops, numerics) does not depend on it,
# and a GPU's code is Triton's. Read when torch._inductor.config is imported; subprocesses inherit it.
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "0")

# Under pytest-xdist (`make test` runs a worker a core) each worker takes its share of the cores, and so
# do the processes its tests start: torch's threads and OpenBLAS's (numpy, scipy, torch-fidelity's FID),
# read when each library loads. Two workers of two threads each on CI's two cores spin against each
# other: torch-fidelity's FID took 9.3 s of CPU with two OpenBLAS threads, 6.5 s with one.
WORKER_THREADS = None
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    WORKER_THREADS = max(1, cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(variable, str(WORKER_THREADS))

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Without a GPU every Triton kernel runs in the interpreter. Triton reads this when a kernel is
# defined, so it must be set before any test module imports fastddpm.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if WORKER_THREADS:
    torch.set_num_threads(WORKER_THREADS)


def pytest_configure(config):
    # pytest-xdist registers it too; without xdist (a plain `pytest tests`) the marks stay silent
    config.addinivalue_line("markers", "xdist_group(name): run these tests in one pytest-xdist worker")


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Decoded-data caches and downloads go to a per-session folder, never the user's cache."""
    os.environ["FASTDDPM_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield


def tiny_config(**overrides):
    """The smallest real training setup: tiny U-Net on a subset of shapes, a few steps."""
    from fastddpm.config import TrainConfig

    base = dict(data="shapes", preset="tiny", T=20, epochs=1, batch_size=16, train_size=64, val_size=32,
                n_samples=0, lr=1e-3, ema=0.999)
    return TrainConfig(**{**base, **overrides})


def run_main(main, argv):
    """Run a CLI entry point in-process: (exit code, stdout, stderr), as the shell would see them."""
    from fastddpm.errors import run_cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = run_cli(main, argv)
        except SystemExit as e:  # argparse
            code = e.code
    return code, out.getvalue(), err.getvalue()


def shared_data() -> Path:
    from fastddpm.data import data_root

    return data_root()
