"""Training throughput against batch size (sizes' ``train_batches``: 64 to 1,024 on a GPU): the
training step of bench/test_train_step.py, the same guard and accounting, at each batch, so that the
report shows where the GPU saturates (images/s and MFU stop rising). The eager steps of every batch
run first (nothing to compile), then each compiled path from the smallest batch up, so a run cut
short by its cap still has the curve's start. A batch the device cannot hold is reported as out of
memory (a skip), not a crash. FASTDDPM_BENCH_BATCH_IMPLS picks the non-eager paths (default:
compiled, the training default on CUDA; launch settings as in the train bench); FASTDDPM_BENCH_DTYPES
the dtypes (default bf16 only).
"""
import os

import pytest

from bench import common as C
from bench.test_train_step import PATHS, TRITON_PATHS, build

IMPLS = C.impls_from_env("FASTDDPM_BENCH_BATCH_IMPLS", ("compiled",), list(PATHS)[1:], TRITON_PATHS)

# bf16 unless FASTDDPM_BENCH_DTYPES says otherwise: the headline module covers every dtype at batch 256
DTYPES = C.DTYPE_ORDER if os.environ.get("FASTDDPM_BENCH_DTYPES") else ("bf16",)
CASES = [dict(dtype=d, impl="eager", batch=b) for d in DTYPES for b in C.S["train_batches"]] + \
    [dict(dtype=d, impl=i, batch=b) for d in DTYPES for i in IMPLS for b in C.S["train_batches"]]


@pytest.mark.parametrize("params", CASES, ids=C.case_id)
def test_train_batch(benchmark, params):
    C.run(benchmark, lambda: build(**params), impl=params["impl"])
