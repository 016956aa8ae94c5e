import contextlib
import io
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Without a GPU every Triton kernel runs in the interpreter. Triton reads this when a kernel is
# defined, so it must be set before any test module imports fastddpm.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
