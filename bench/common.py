"""The one helper module of the bench suite: sizes, the Case every workload builds, the guard,
timing, FLOP/byte accounting, the session's measured peaks, device/version facts, and the JSON.

A workload module (bench/test_*.py) defines ``CASES`` (a list of parameter dicts) and
``build(**params) -> Case``; its one pytest function hands ``build`` to :func:`run` with the
pytest-benchmark fixture. ``python -m bench.run`` (no pytest-benchmark needed) hands the same
``build`` to the same :func:`run` with :class:`Timer`, so both write the same ``extra_info``.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
if not CUDA:  # Triton reads this when a kernel is defined: before any fastddpm.kernels import
    os.environ.setdefault("TRITON_INTERPRET", "1")  # (the kernels then size their split for it themselves)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Run order, so that a run cut short by its time limit still has what matters most on record: the
# eager baselines of every dtype first (cheap: nothing to compile), then bf16, fp32, fp16.
# FASTDDPM_BENCH_DTYPES=bf16,fp32 runs a subset.
DTYPE_ORDER = tuple(os.environ.get("FASTDDPM_BENCH_DTYPES", "bf16,fp32,fp16").split(","))
if not set(DTYPE_ORDER) <= set(DTYPES):
    raise SystemExit(f"FASTDDPM_BENCH_DTYPES={','.join(DTYPE_ORDER)}: choose from {', '.join(DTYPES)}")
IMPLS = ("eager", "compiled", "fast")


def split_impl(impl: str) -> tuple[str, dict]:
    """``"fast-graphs-nhwc@tile=8192+persistent=2"`` -> ``("fast-graphs-nhwc", {"tile": 8192, "persistent":
    2})``: a path timed with these GroupNorm launch knobs (``LAUNCH_KNOBS`` of
    ``fastddpm/kernels/groupnorm_gelu.py``, the names ``bench.tune_groupnorm`` sweeps), so that a setting
    the kernel sweep favours is timed in a whole step, side by side with the defaults. ValueError on a
    bad knob or value."""
    base, at, text = impl.partition("@")
    if not at:
        return impl, {}
    from fastddpm.kernels.groupnorm_gelu import parse_launch_settings

    return base, parse_launch_settings(text)


def impl_error(impl: str, paths, triton_paths) -> Optional[str]:
    """Why ``impl`` cannot be a case (not one of ``paths``; launch settings on a path that does not run
    the Triton kernels, i.e. not in ``triton_paths``; a bad knob), or None."""
    try:
        base, knobs = split_impl(impl)
    except ValueError as e:
        return f"{impl}: {e}"
    if base not in paths:
        return f"unknown implementation {base!r}: choose from {', '.join(paths)}"
    if knobs and base not in triton_paths:
        return f"{impl}: launch settings apply to the Triton paths only ({', '.join(triton_paths)})"
    return None


def impls_from_env(var: str, default, paths, triton_paths) -> tuple:
    """The implementations an environment variable lists (comma-separated; ``default`` if unset), each
    checked by ``impl_error``: a bad one stops the bench module with one line naming it."""
    impls = tuple(i for i in os.environ.get(var, ",".join(default)).split(",") if i)
    for impl in impls:
        if error := impl_error(impl, paths, triton_paths):
            raise SystemExit(f"{var}={','.join(impls)}: {error}")
    return impls


def impl_launch_settings(impl: str):
    """The GroupNorm launch settings ``impl`` names, in force while the context is open (none: nothing)."""
    knobs = split_impl(impl)[1]
    if not knobs:
        return contextlib.nullcontext()
    from fastddpm.kernels.groupnorm_gelu import launch_settings as settings

    return settings(**knobs)


def grid(impls=IMPLS, triton_paths=()) -> list[dict]:
    """CASES of a model-level workload: [{dtype, impl}] in run order; the paths on our Triton kernels
    (``triton_paths``) in the size's ``triton_dtypes`` only, where it names them (in the run's first
    dtype where the run has none of them)."""
    triton_dtypes = [d for d in DTYPE_ORDER if d in S.get("triton_dtypes", DTYPE_ORDER)] or DTYPE_ORDER[:1]
    return [dict(dtype=d, impl="eager") for d in DTYPE_ORDER] + \
        [dict(dtype=d, impl=i) for d in DTYPE_ORDER for i in impls
         if i != "eager" and (split_impl(i)[0] not in triton_paths or d in triton_dtypes)]


# --- sizes --------------------------------------------------------------------------------------
# gpu: the paper's model at full size; cpu: the tiny preset, small enough for Triton's interpreter;
# smoke: the CI pass (--benchmark-disable) that only proves the files still run.
SIZES = {
    "gpu": dict(preset="seed", train_batch=256, train_batches=(64, 128, 256, 512, 1024), train_rounds=10,
                sample_batch=2560, sample_steps=10, sample_probe_steps=2, sample_rounds=3, kernel_batch=256,
                gn_shapes=((64, 32, 32), (128, 16, 16), (256, 8, 8), (256, 4, 4)),
                gn_variant_shapes=((64, 32, 32), (256, 8, 8)), step_shape=(2560, 3, 32, 32),
                kernel_rounds=5, warmup=1),  # warm-up rounds of train steps and kernels
    "cpu": dict(preset="tiny", train_batch=2, train_batches=(1, 3), train_rounds=2, sample_batch=1,
                sample_steps=2, sample_probe_steps=1, sample_rounds=2, kernel_batch=2, gn_shapes=((16, 16, 16),),
                gn_variant_shapes=((16, 16, 16),), step_shape=(2, 3, 32, 32), kernel_rounds=3, warmup=0),
    # smoke: the model-level Triton paths in bf16 only (in the interpreter, 10 s a case); the kernels in
    # every dtype: here in bench/test_kernels.py, and tests/test_kernels_*.py
    "smoke": dict(preset="tiny", train_batch=1, train_batches=(1, 3), train_rounds=1, sample_batch=1,
                  sample_steps=2, sample_probe_steps=1, sample_rounds=1, kernel_batch=1, gn_shapes=((8, 8, 8),),
                  gn_variant_shapes=((8, 8, 8),), step_shape=(1, 3, 8, 8), kernel_rounds=1, warmup=0,
                  triton_dtypes=("bf16",)),
}
SIZE = os.environ.get("FASTDDPM_BENCH_SIZE") or ("gpu" if CUDA else "cpu")
if SIZE not in SIZES:
    raise SystemExit(f"FASTDDPM_BENCH_SIZE={SIZE}: choose one of {', '.join(SIZES)}")
S = SIZES[SIZE]

# Relative-norm tolerances of the guard, per dtype: (model outputs/loss, gradients). A wrong path
# is off by O(1); these only absorb rounding and reordering. The trainer checks its compiled step
# against eager with the same bounds before it trains.
from fastddpm.train import COMPILE_CHECK_TOL as TOL, relative_error as rel  # noqa: E402, F401 (C.TOL, C.rel)
KERNEL_TOL = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 3e-2}
# Sampling compares uint8 images: mean |difference| in grey levels (of 255).
SAMPLE_TOL = {"fp32": 0.5, "fp16": 1.5, "bf16": 4.0}


def configure() -> None:
    """Process-wide settings for a bench session (pytest's or bench.run's)."""
    # Every case compiles its own model; the default limit (8 per code object) would make later
    # cases fall back to eager silently. Each case also resets dynamo (see run()).
    torch._dynamo.config.cache_size_limit = 64
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 64
    backend = os.environ.get("FASTDDPM_BENCH_COMPILE_BACKEND")
    if backend and not getattr(torch.compile, "default_backend", None):
        # The CI smoke pass only: a cheap backend ("eager": dynamo's capture, through the custom ops'
        # fake kernels, without AOT autograd or codegen) so that the plumbing and the guards run without
        # minutes of compiling; tests/test_unet_triton.py traces the Triton path's forward and backward
        # (aot_eager) and compiles its inference graph with Inductor.
        torch.compile = with_default_backend(torch.compile, backend)


def with_default_backend(compile_fn, backend: str):
    """``compile_fn`` (torch.compile) with ``backend`` wherever a call names none."""
    @functools.wraps(compile_fn)
    def compile_with_backend(*args, **kwargs):
        kwargs.setdefault("backend", backend)
        return compile_fn(*args, **kwargs)

    compile_with_backend.default_backend = backend
    return compile_with_backend


# --- cases --------------------------------------------------------------------------------------
try:  # an unavailable implementation is a pytest skip, and a plain exception for bench.run
    import pytest as _pytest

    _SkipBase = _pytest.skip.Exception
except ImportError:  # pragma: no cover
    _SkipBase = Exception


class Unavailable(_SkipBase):
    """This implementation cannot run here (e.g. diffusers not importable)."""

    def __init__(self, msg: str):
        if _SkipBase is Exception:  # pragma: no cover
            super().__init__(msg)
        else:
            super().__init__(msg=msg, pytrace=False)
        self.reason = msg


class GuardError(AssertionError):
    """A non-eager implementation disagrees with eager: it posts no number."""


@dataclass
class Case:
    """One workload x implementation x dtype, ready to time.

    ``fn`` does ``calls`` operations and returns once the device is idle; each operation handles
    ``items`` units (images, image-steps, elements) and costs ``flops`` / moves ``bytes`` (compulsory
    traffic). ``check`` runs before timing: the guard, raising GuardError on disagreement (None for
    eager, the reference). ``probe`` (optional) is the same work with ``probe_items`` units: one
    timed call of it separates the per-item cost from a fixed per-call cost.
    """
    workload: str
    impl: str
    dtype: str
    fn: Callable[[], Any]
    items: float
    unit: str
    calls: int = 1
    flops: Optional[float] = None
    bytes: Optional[float] = None
    check: Optional[Callable[[], dict]] = None
    probe: Optional[Callable[[], Any]] = None
    probe_items: float = 0.0
    rounds: int = 3
    warmup: int = 0
    info: dict = field(default_factory=dict)  # workload-specific facts (batch, shape, preset, ...)
    group_norm_kernels: bool = False  # runs our GroupNorm kernels: the result records their launch settings

    @property
    def group(self) -> str:
        keys = ("variant", "shape", "steps") if "shape" in self.info else ("batch", "steps")
        return " ".join([self.workload] + [f"{k}={self.info[k]}" for k in keys if k in self.info]) + \
            f" {self.dtype}"


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def synced(fn: Callable[[], Any]) -> Callable[[], Any]:
    def call():
        out = fn()
        sync()
        return out
    return call


def guard(what: str, value: float, tol: float) -> dict:
    if not value <= tol:  # also catches NaN
        raise GuardError(f"{what}: {value:.3g} exceeds the tolerance {tol:.3g}: this implementation "
                         "disagrees with eager and posts no number")
    return {"metric": what, "value": value, "tol": tol}


_REFS: dict = {}


def reference(key, compute: Callable[[], Any]):
    """The eager reference for ``key``, computed once per process."""
    if key not in _REFS:
        _REFS[key] = compute()
    return _REFS[key]


# --- timing -------------------------------------------------------------------------------------
def summarize(times: list[float]) -> dict:
    """pytest-benchmark's stats fields, from per-round seconds."""
    n = len(times)
    mean = sum(times) / n
    s = sorted(times)
    median = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    stddev = math.sqrt(sum((t - mean) ** 2 for t in times) / (n - 1)) if n > 1 else 0.0
    return {"min": s[0], "max": s[-1], "mean": mean, "stddev": stddev, "median": median, "rounds": n,
            "iterations": 1, "total": sum(times), "ops": 1 / mean if mean else None}


class Timer:
    """The slice of pytest-benchmark's fixture that :func:`run` uses, for ``python -m bench.run``."""

    def __init__(self, name: str = ""):
        self.name, self.group, self.extra_info, self.stats = name, None, {}, None

    def pedantic(self, target, rounds=1, warmup_rounds=0, iterations=1):
        for _ in range(warmup_rounds):
            target()
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(iterations):
                target()
            times.append((time.perf_counter() - start) / iterations)
        self.stats = summarize(times)


def _median(benchmark) -> tuple[Optional[float], Optional[dict]]:
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: the function ran once, untimed
        return None, None
    if isinstance(stats, dict):
        return stats["median"], stats
    s = stats.stats
    return s.median, {k: getattr(s, k, None) for k in ("min", "max", "mean", "stddev", "median", "rounds", "ops")}


def fresh() -> None:
    """Before each case: the session settings, no compiled code and no memory left by the last one."""
    configure()
    torch.compiler.reset()  # each case compiles from scratch (the on-disk caches still help)
    gc.collect()  # the previous case's models, graphs and buffers
    if CUDA:
        torch.cuda.empty_cache()


def run(benchmark, build: Callable[[], Case], impl: str = "") -> dict:
    """Build a case, guard it, time it, and record everything in ``benchmark.extra_info``; with the
    GroupNorm launch settings ``impl`` names (``split_impl``) in force from the build to the last timing."""
    fresh()
    precision = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        with impl_launch_settings(impl):
            return _run(benchmark, build)
    finally:  # no implementation may leave TF32 on for the cases after it
        torch.set_float32_matmul_precision(precision[0])
        torch.backends.cudnn.allow_tf32 = precision[1]


def _run(benchmark, build: Callable[[], Case]) -> dict:
    try:
        return _run_case(benchmark, build)
    except Exception as e:  # a size this device cannot hold is a skip that says so, not a crash
        cause = e
        while cause is not None and not isinstance(cause, torch.OutOfMemoryError):
            cause = cause.__cause__ or cause.__context__  # torch.compile wraps what its backend raised
        if cause is None:
            raise
        raise Unavailable(f"out of memory on {DEVICE.type}: {str(cause).splitlines()[0][:200]}") from None


def _run_case(benchmark, build: Callable[[], Case]) -> dict:
    case = build()  # may raise Unavailable
    guard_info = case.check() if case.check else {"metric": "reference", "value": 0.0, "tol": 0.0}
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    benchmark.group = case.group
    benchmark.pedantic(case.fn, rounds=case.rounds, warmup_rounds=case.warmup, iterations=1)
    median, stats = _median(benchmark)
    probe_s = None
    if case.probe is not None and median is not None:
        start = time.perf_counter()
        case.probe()
        probe_s = time.perf_counter() - start
    info = extra_info(case, median, probe_s, guard_info)
    benchmark.extra_info.update(info)
    log(getattr(benchmark, "name", "") or case.group, case.group, info, stats)
    return info


# --- accounting ---------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def model_flops(base_channels: int, train: bool) -> float:
    """FLOPs of one image through the U-Net (forward, or forward + backward), counted once by
    torch's FlopCounterMode at batch 1 on the CPU (the network is linear in the batch)."""
    from torch.utils.flop_counter import FlopCounterMode

    from fastddpm.model import UNet

    torch.manual_seed(0)
    model = UNet(base_channels, kernels="torch").train(train)
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([500])
    with FlopCounterMode(display=False) as counter:
        if train:
            model(x, t).square().mean().backward()
        else:
            with torch.no_grad():
                model(x, t)
    return float(counter.get_total_flops())


@functools.lru_cache(maxsize=None)
def peaks() -> dict:
    """bf16 matmul TFLOP/s and device-to-device copy GB/s (bytes read + written), measured in this
    process on this device; None on the CPU (no number there would be a roofline)."""
    if not CUDA:
        return {"peak_bf16_tflops": None, "copy_gb_per_s": None}

    def best(fn, reps=10):
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / reps

    def matmul_tflops(n=8192):  # each measure's tensors are freed when it returns
        a, b = (torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
        return 2 * n ** 3 / best(lambda: torch.mm(a, b)) / 1e12

    def copy_gb_per_s():
        src = torch.empty(1 << 28, device=DEVICE, dtype=torch.float32)  # 1 GiB
        dst = torch.empty_like(src)
        return 2 * src.numel() * 4 / best(lambda: dst.copy_(src)) / 1e9

    mm = matmul_tflops()
    copy = copy_gb_per_s()
    torch.cuda.empty_cache()
    return {"peak_bf16_tflops": mm, "copy_gb_per_s": copy}


def device_info() -> dict:
    """What the device is, as NVML reports it where pynvml (nvidia-ml-py) imports; read per
    result, so power draw and SM clock are those just after the timing."""
    if not CUDA:
        return {"name": platform.processor() or platform.machine(), "type": "cpu",
                "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()}
    p = torch.cuda.get_device_properties(DEVICE)
    info = {"type": "cuda", "name": p.name, "memory_bytes": p.total_memory, "sms": p.multi_processor_count,
            "capability": f"{p.major}.{p.minor}"}
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        reads = {
            "nvml_name": lambda: pynvml.nvmlDeviceGetName(h),
            "driver": pynvml.nvmlSystemGetDriverVersion,
            "nvml_memory_bytes": lambda: pynvml.nvmlDeviceGetMemoryInfo(h).total,
            "power_w": lambda: pynvml.nvmlDeviceGetPowerUsage(h) / 1e3,
            "power_limit_w": lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1e3,
            "sm_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
            "sm_clock_max_mhz": lambda: pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
            "temperature_c": lambda: pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU),
        }
        for key, read in reads.items():
            try:
                v = read()
                info[key] = v.decode() if isinstance(v, bytes) else v
            except Exception:  # noqa: BLE001 - a counter this driver does not expose
                pass
    except Exception as e:  # noqa: BLE001 - no pynvml, or no NVML library
        info["nvml"] = f"unavailable ({type(e).__name__})"
    return info


@functools.lru_cache(maxsize=None)
def git_commit() -> dict:
    """The commit measured: FASTDDPM_GIT_COMMIT where the checkout has no .git (the GPU machine
    gets a copy of the tree: pass it in), else git's own answer."""
    given = os.environ.get("FASTDDPM_GIT_COMMIT")
    if given:
        return {"id": given, "dirty": None}
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip() != ""
        return {"id": sha or None, "dirty": dirty if sha else None}
    except Exception:  # noqa: BLE001 - no git
        return {"id": None, "dirty": None}


@functools.lru_cache(maxsize=None)
def versions() -> dict:
    v = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("triton", "diffusers"):
        try:
            v[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            v[name] = None
    v["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    v["tf32_cudnn"] = torch.backends.cudnn.allow_tf32
    return v


def extra_info(case: Case, median: Optional[float], probe_s: Optional[float], guard_info: dict) -> dict:
    """Everything a result records. ``seconds`` is per operation; with a probe, ``items_per_s`` is
    the marginal rate (fixed per-call cost split off into ``fixed_s``), and so are the TFLOP/s, GB/s,
    MFU and roofline share derived from it: a rate and its share of the peak describe the same work."""
    pk = peaks()
    sec = median / case.calls if median is not None else None
    per_item = fixed = None
    if sec is not None and probe_s is not None and case.items > case.probe_items:
        per_item = max((median - probe_s) / (case.items - case.probe_items), 1e-12)
        fixed = max(median - case.items * per_item, 0.0)
    elif sec is not None:
        per_item = sec / case.items
    tflops = case.flops / case.items / per_item / 1e12 if per_item and case.flops else None
    gbps = case.bytes / case.items / per_item / 1e9 if per_item and case.bytes else None
    info = {
        "workload": case.workload, "impl": case.impl, "dtype": case.dtype, **case.info,
        "size": SIZE, "device_type": DEVICE.type,
        "seconds": sec, "seconds_per_call": median, "calls": case.calls, "probe_seconds": probe_s,
        "fixed_s": fixed, "unit": case.unit, "items": case.items,
        "items_per_s": 1 / per_item if per_item else None,
        "flops": case.flops, "tflops": tflops, "bytes": case.bytes, "gb_per_s": gbps, **pk,
        "mfu": tflops / pk["peak_bf16_tflops"] if tflops and pk["peak_bf16_tflops"] else None,
        "roofline": gbps / pk["copy_gb_per_s"] if gbps and pk["copy_gb_per_s"] else None,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if CUDA else None,
        "guard": guard_info, "device": device_info(), "versions": versions(), "git": git_commit(),
        "compile_backend": os.environ.get("FASTDDPM_BENCH_COMPILE_BACKEND") or "inductor",
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }
    if case.group_norm_kernels:  # every launch knob in force while it ran: defaults, FASTDDPM_GN_*, path@settings
        from fastddpm.kernels.groupnorm_gelu import current_launch_settings

        info["launch_settings"] = current_launch_settings()
    return info


# --- output -------------------------------------------------------------------------------------
def log(name: str, group: str, info: dict, stats: Optional[dict]) -> None:
    """Append the result as one JSON line to $FASTDDPM_BENCH_LOG (if set) at once: a run cut off
    by its time limit keeps every result it finished."""
    path = os.environ.get("FASTDDPM_BENCH_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"name": name, "group": group, "extra_info": info, "stats": stats},
                               default=str) + "\n")


def write_json(path, doc: dict) -> None:
    """Write ``doc`` as JSON atomically (a reader never sees half a file)."""
    from fastddpm.files import atomic_write

    with atomic_write(path) as f:
        f.write(json.dumps(doc, indent=1, default=str).encode())


def results_json(benchmarks: list[dict]) -> dict:
    """A pytest-benchmark-shaped document (the fields bench.report reads)."""
    return {
        "machine_info": {"node": platform.node(), "python_version": platform.python_version(),
                         "machine": platform.machine(), "device": device_info()},
        "commit_info": git_commit(),
        "benchmarks": benchmarks,
        "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "version": "fastddpm-bench",
    }


# --- helpers for the workload modules -----------------------------------------------------------
def case_id(params: dict) -> str:
    """pytest id of a CASES entry: values joined by '-', shapes as 64x32x32."""
    return "-".join("x".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in params.values())


ROTATE_BYTES = 256 << 20  # inputs cycled per timing: well past the L2 of any current GPU


def repeated(op: Callable[[Any], Any], make_input: Callable[[int], Any], bytes_per_input: float):
    """(fn, calls, mode, first_input): ``fn`` applies ``op`` ``calls`` times, cycling through enough
    copies of the input that the data does not sit in L2 between calls, and returns when the device
    is idle. On CUDA the calls are captured once as a CUDA graph, so launch overhead (which CUDA
    graphs remove in the real model too) does not hide the kernel's own time."""
    if not CUDA:
        first = make_input(0)
        return synced(lambda: op(first)), 1, "loop", first
    copies = max(1, min(64, math.ceil(ROTATE_BYTES / max(bytes_per_input, 1))))
    calls = copies * math.ceil(50 / copies)  # enough that the one sync per replay is noise
    inputs = [make_input(i) for i in range(copies)]

    def loop():
        for i in range(calls):
            op(inputs[i % copies])

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture: compilation, autotuning, allocator
        for inp in inputs[:2]:
            op(inp)
    torch.cuda.current_stream().wait_stream(side)
    sync()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loop()
        return synced(graph.replay), calls, "cuda_graph", inputs[0]
    except Exception as e:  # noqa: BLE001 - record how it was timed instead of failing the bench
        sync()
        return synced(loop), calls, f"launch loop ({type(e).__name__} in graph capture)", inputs[0]


def compare(outputs, references, dtype: str, what: str) -> dict:
    """Guard: every tensor of ``outputs`` against ``references`` (relative norm, KERNEL_TOL)."""
    if isinstance(outputs, torch.Tensor):
        outputs, references = (outputs,), (references,)
    worst = max(rel(o, r) for o, r in zip(outputs, references))
    return guard(what, worst, KERNEL_TOL[dtype])
