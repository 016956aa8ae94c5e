"""``python -m bench.profile_step``: where one training step's (or sampling step's) time goes, per
implementation, dtype and memory layout, from ``torch.profiler``: the step time (CUDA events around
several steps), the time per kernel category (convolution, layout copies, matmul, attention,
GroupNorm, optimizer and EMA, other) and the top kernels. The same trainer and batch as the train bench
(``bench.test_train_step.trainer``); each setting also runs in NHWC (``--channels-last``), so the
layout question (``--layouts nchw,nhwc``) is answered by ratios measured in one process. On the CPU
it profiles operators (smoke size: it proves only that it runs).

    python -m bench.profile_step --impls eager,compiled,fast --dtype bf16 --layouts nchw,nhwc --json prof.json
    python -m bench.profile_step --impls compiled --layouts nchw,nhwc \
        --knobs none,cudnn_benchmark,force_layout,cudagraphs

``--knobs`` crosses each setting with backend switches the training step may gain from (hypothesis 1
of ../shared/notes/training-step-analysis.md): ``cudnn_benchmark`` (cuDNN picks its convolution
algorithms by timing them), ``force_layout`` (Inductor's NHWC layout optimisation, which its own
heuristic refuses for this training graph), ``cudagraphs`` (Inductor replays the compiled forward
and backward as CUDA graphs: ``--compile-mode reduce-overhead``, hypothesis 3's host cost),
and ``combo_kernels`` (Inductor fuses independent small kernels side by side, e.g. the per-weight
casts), ``+``-joined to combine them; ``none`` is today's step.

``--workload sample`` profiles instead one network call of the sampling chain at the bench's sampling
batch (no gradients, autocast, ``fastddpm.sampling.engine_model``'s network for the engines eager,
compiled and fast), outside the engine's CUDA graph so that its kernels show (the ``cudagraphs`` knob
replays Inductor's own graphs): where the forward's time goes, for the 5,120-images-in-30-s target.

    python -m bench.profile_step --workload sample --impls compiled,fast --layouts nchw,nhwc
"""
from __future__ import annotations

import argparse
import contextlib
import re
import sys
import time
from collections import defaultdict

import torch

from bench import common as C

# First match wins. Inductor names a kernel after every op it fused
# (triton_red_fused_convolution_native_group_norm_...), so GroupNorm is matched first, and the
# convolution/matmul patterns count only library kernels (cuDNN, CUTLASS, cuBLAS, aten on the CPU).
CATEGORIES = [
    ("groupnorm", r"group_norm|groupnorm|_gn_"),
    ("optimizer+ema", r"adam|foreach|multi_tensor|lerp"),
    ("attention", r"flash|fmha|attention|sdpa|efficient"),
    # the Up blocks' bilinear x2 and its backward (the gather's index_select on the Triton path, the
    # scatter's _unsafe_index_put on the torch one), which Inductor fuses with the casts around them:
    # the H100 profile of 2026-11-27 filed 1.81 ms of them under casts
    ("upsampling", r"upsample|_unsafe_index|index_select"),
    ("casts", r"_to_copy|convert|to_dtype"),
    ("layout", r"nchwtonhwc|nhwctonchw|transpose|permute|contiguous|clone|copy_|direct_copy"),
    ("convolution", r"^(?!triton_).*(conv|fprop|dgrad|wgrad|implicit_gemm|winograd)"),
    ("matmul", r"^(?!triton_).*(gemm|cutlass|matmul|\bmm\b|addmm|linear|xmma|cublas)"),
]


def category(name: str) -> str:
    low = name.lower()
    return next((c for c, pattern in CATEGORIES if re.search(pattern, low)), "other")


def step_seconds(step, steps: int) -> float:
    C.sync()
    if C.CUDA:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / steps
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def kernel_times(step, steps: int) -> dict[str, tuple[float, float]]:
    """{kernel (or, on the CPU, operator) name: (seconds per step, calls per step)}."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if C.CUDA else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        C.sync()
    out = {}
    for e in prof.key_averages():
        if C.CUDA:
            if e.device_type != DeviceType.CUDA:
                continue
            us = getattr(e, "self_device_time_total", None)
            us = us if us is not None else e.self_cuda_time_total
        else:
            us = e.self_cpu_time_total
        if us > 0:
            out[e.key] = (us / 1e6 / steps, e.count / steps)
    return out


KNOBS = ("cudnn_benchmark", "force_layout", "cudagraphs", "combo_kernels")


def set_knobs(knobs: str) -> list[str]:
    """Switch the backend settings named in ``knobs`` ("none", or names from KNOBS joined by "+") on,
    the others off; the settings in force."""
    names = [] if knobs == "none" else knobs.split("+")
    torch.backends.cudnn.benchmark = "cudnn_benchmark" in names
    import torch._inductor.config as inductor_config

    inductor_config.force_layout_optimization = "force_layout" in names
    inductor_config.triton.cudagraphs = "cudagraphs" in names  # what mode="reduce-overhead" sets
    # Inductor's horizontal fusion of independent kernels: the H100 profile of the fast NHWC step
    # (...-profile-fast.json) ran 642 kernels a step, 347 of them under 10 us (1.03 ms in all); 165
    # are casts by CATEGORIES (0.55 ms), many of them fused with layer norms, copies or indexing
    inductor_config.combo_kernels = "combo_kernels" in names
    return names


WORKLOADS = ("train", "sample")
SAMPLE_IMPLS = ("eager", "compiled", "fast")  # fastddpm.sampling's engines


def training_step(impl: str, dtype: str, layout: str, stack: contextlib.ExitStack):
    """(one training step of the train bench's trainer on its fixed batch, the batch size)."""
    from bench.test_train_step import fixed_batch, trainer

    x0 = fixed_batch()
    tr = trainer(dtype, impl, channels_last=layout == "nhwc")
    return lambda: tr.train_step(x0), C.S["train_batch"]


def sampling_forward(impl: str, dtype: str, layout: str, stack: contextlib.ExitStack):
    """(one network call of the sampling chain, as engine ``impl`` runs it while ``stack`` is open, at
    the bench's sampling batch, the batch size)."""
    from bench.test_sampling import network
    from fastddpm.sampling import autocast, engine_model

    b = C.S["sample_batch"]
    x = torch.randn(b, 3, 32, 32, device=C.DEVICE)  # NCHW, as sample's state: the network takes it in its layout
    t = torch.randint(0, 1000, (b,), device=C.DEVICE)
    net = stack.enter_context(engine_model(network(), impl, C.DEVICE, channels_last=layout == "nhwc"))

    @torch.no_grad()
    def step():
        with autocast(C.DEVICE, C.DTYPES[dtype]):
            return net(x, t)
    return step, b


def profile_one(impl: str, dtype: str, layout: str, steps: int, knobs: str = "none", workload: str = "train") -> dict:
    C.fresh()
    set_knobs(knobs)
    with contextlib.ExitStack() as stack:
        stack.enter_context(C.impl_launch_settings(impl))  # "fast@tile=8192": the kernels' launch knobs
        step, b = (training_step if workload == "train" else sampling_forward)(C.split_impl(impl)[0], dtype,
                                                                                  layout, stack)
        for _ in range(3):  # compilation, autotuning, allocator
            step()
        sec = step_seconds(step, steps)
        kernels = kernel_times(step, steps)
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])
    listed = [{"name": n, "s": s, "calls": c, "category": category(n)} for n, (s, c) in top]
    return {"workload": workload, "impl": impl, "dtype": dtype, "layout": layout, "knobs": knobs, "batch": b,
            "preset": C.S["preset"], "step_s": sec, "images_per_s": b / sec,
            "profiled_s": sum(s for s, _ in kernels.values()), "categories": categories(listed), "kernels": listed}


def categories(kernels: list[dict]) -> dict[str, float]:
    """Seconds per step by category, largest first, of a row's complete kernel list; named by today's
    CATEGORIES, so that a file profiled before a category existed renders like a new one."""
    by_cat = defaultdict(float)
    for k in kernels:
        by_cat[category(k["name"])] += k["s"]
    return dict(sorted(by_cat.items(), key=lambda kv: -kv[1]))


def render(rows: list[dict], top: int) -> str:
    # a file written before the workload axis existed profiled training steps; its categories are
    # recomputed from its kernels (a row lists them all)
    rows = [{"workload": "train", **r, "categories": categories(r["kernels"]),
             "kernels": [{**k, "category": category(k["name"])} for k in r["kernels"]]} for r in rows]
    cats = [c for c, _ in CATEGORIES] + ["other"]
    head = ("| step | impl | dtype | layout | knobs | step ms | images/s | " + " | ".join(f"{c} ms" for c in cats)
            + " |")
    lines = [head, "|" + "---|" * (7 + len(cats))]
    for r in rows:
        lines.append(f"| {r['workload']} (batch {r['batch']}) | {r['impl']} | {r['dtype']} | {r['layout']} | "
                     f"{r['knobs']} | {r['step_s'] * 1e3:.2f} | "
                     f"{r['images_per_s']:,.0f} | " + " | ".join(f"{r['categories'].get(c, 0) * 1e3:.2f}" for c in cats)
                     + " |")
    for r in rows:
        lines += ["", f"### {r['workload']} {r['impl']} {r['dtype']} {r['layout']} {r['knobs']}: top {top} of "
                      f"{len(r['kernels'])} "
                      f"({r['profiled_s'] * 1e3:.2f} ms profiled per step)", "",
                  "| ms/step | calls/step | category | kernel |", "|---|---|---|---|"]
        lines += [f"| {k['s'] * 1e3:.3f} | {k['calls']:g} | {k['category']} | `{k['name'][:90]}` |"
                  for k in r["kernels"][:top]]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_step", description=__doc__.split("\n\n")[0])
    split = lambda s: [v for v in s.split(",") if v]  # noqa: E731
    p.add_argument("--workload", default="train", choices=WORKLOADS,
                   help="train: one training step; sample: one network call of the sampling chain")
    p.add_argument("--impls", default="eager,compiled,fast", type=split,
                   help=f"train: the train bench's paths; sample: the engines {', '.join(SAMPLE_IMPLS)}; a Triton "
                        "path may carry GroupNorm launch settings, e.g. fast@tile=8192+persistent=2")
    p.add_argument("--dtype", default="bf16", choices=list(C.DTYPES))
    p.add_argument("--layouts", default="nchw,nhwc", type=split)
    p.add_argument("--knobs", default="none", type=split,
                   help=f"backend settings crossed with each row: none, or {' / '.join(KNOBS)} joined by + "
                        "(default none)")
    p.add_argument("--steps", default=5, type=int, help="steps timed, then steps profiled")
    p.add_argument("--top", default=12, type=int)
    p.add_argument("--json", help="write every row (all kernels) here, with the device, versions and commit")
    a = p.parse_args(argv)
    from bench.test_train_step import PATHS, TRITON_PATHS

    # the layout is this tool's own axis (--layouts): the benches' -nhwc paths would contradict it
    if any(v.partition("@")[0].endswith("-nhwc") for v in a.impls):
        p.error(f"--impls {','.join(a.impls)}: this tool has its own layout axis: name the path without "
                f"-nhwc and add --layouts nhwc")
    impls = [i for i, path in PATHS.items() if not path.channels_last] if a.workload == "train" else SAMPLE_IMPLS
    triton = [i for i in TRITON_PATHS if i in impls] if a.workload == "train" else ["fast"]
    error = next((e for v in a.impls if (e := C.impl_error(v, impls, triton))), None)  # a path@launch settings
    if error:
        p.error(f"--impls: {error}")
    bad = [v for v in a.layouts if v not in ("nchw", "nhwc")] + \
        [k for v in a.knobs if v != "none" for k in v.split("+") if k not in KNOBS]
    if bad:
        p.error(f"unknown layout or knob {bad[0]!r}: layouts nchw, nhwc; knobs none, {', '.join(KNOBS)}")
    command = " ".join(["python -m bench.profile_step", *(argv if argv is not None else sys.argv[1:])])
    rows = []
    try:
        for impl in a.impls:
            for layout in a.layouts:
                for knobs in a.knobs:
                    rows.append(profile_one(impl, a.dtype, layout, a.steps, knobs, a.workload))
                    print(f"{a.workload} {impl} {a.dtype} {layout} {knobs}: {rows[-1]['step_s'] * 1e3:.2f} ms/step",
                          file=sys.stderr, flush=True)
                    if a.json:  # after every row: a run stopped at its time cap keeps what it finished
                        C.write_json(a.json, {"tool": "bench.profile_step", "args": vars(a), "size": C.SIZE,
                                              "date": time.strftime("%Y-%m-%d"), "command": command,
                                              "device": C.device_info(), "versions": C.versions(),
                                              "git": C.git_commit(), "rows": rows})
    finally:
        set_knobs("none")
    print(render(rows, a.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
