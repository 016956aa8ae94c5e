"""``python -m bench.cpu_dtypes --json OUT``: what ``make demo`` runs on, measured on this CPU. The tiny
U-Net's training step (forward, eq. 13 loss, backward, Adam) and its sampling forward, per dtype
(fp32, bf16 autocast) and layout (NCHW, NHWC), torch kernels, median seconds of a few calls after one
warm-up call. Whether the CPU computes bf16 natively (AVX512-BF16, AMX) is recorded beside them: the
demo trains in bf16 only there (``fastddpm.config.fastest_cpu_dtype``) and samples in NHWC.

    python -m bench.cpu_dtypes --json bench/results/<date>-cpu-dtypes-layouts.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from bench import common as C

LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def seconds(fn, calls: int) -> float:
    fn()  # warm-up: oneDNN picks and caches its kernels
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(dtype: str, layout: str, train_batch: int, sample_batch: int, calls: int) -> dict:
    from fastddpm.config import DTYPES, PRESETS
    from fastddpm.model import UNet
    from fastddpm.sampling import autocast

    torch.manual_seed(0)
    fmt, dt = LAYOUTS[layout], DTYPES[dtype]
    model = UNet(PRESETS["tiny"], kernels="torch").to(memory_format=fmt)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x = torch.randn(train_batch, 3, 32, 32).contiguous(memory_format=fmt)
    t = torch.randint(0, 500, (train_batch,))

    def train_step():
        with autocast(x.device, dt):
            loss = (model(x, t).float() - x).pow(2).mean()  # eq. 13's form; the target does not matter here
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    xs = torch.randn(sample_batch, 3, 32, 32).contiguous(memory_format=fmt)
    ts = torch.randint(0, 500, (sample_batch,))

    @torch.no_grad()
    def forward():
        with autocast(xs.device, dt):
            model(xs, ts)

    train_s = seconds(train_step, calls)
    model.eval()
    return {"dtype": dtype, "layout": layout, "train_batch": train_batch, "train_step_s": train_s,
            "train_images_per_s": train_batch / train_s, "sample_batch": sample_batch,
            "forward_s": seconds(forward, calls)}


def table(rows: list[dict]) -> str:
    """The rows as markdown, each time also as a multiple of fp32 NCHW's where that row is there."""
    base = next((r for r in rows if (r["dtype"], r["layout"]) == ("fp32", "nchw")), None)

    def vs(r, key):
        return f"{r[key] / base[key]:.2f}x" if base else "—"

    b, s = rows[0]["train_batch"], rows[0]["sample_batch"]
    lines = [f"| dtype | layout | training step (batch {b}), s | × fp32 NCHW | images/s | sampling forward "
             f"(batch {s}), s | × fp32 NCHW |", "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['dtype']} | {r['layout']} | {r['train_step_s']:.3f} | {vs(r, 'train_step_s')} | "
              f"{r['train_images_per_s']:.0f} | {r['forward_s']:.3f} | {vs(r, 'forward_s')} |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_dtypes", description=__doc__.split("\n\n")[0])
    p.add_argument("--train-batch", type=int, default=32)
    p.add_argument("--sample-batch", type=int, default=256, help="the demo's sampling chunk")
    p.add_argument("--calls", type=int, default=3, help="timed calls per figure (after one warm-up call)")
    p.add_argument("--json", help="write the rows here, with the CPU, versions and commit")
    a = p.parse_args(argv)
    from fastddpm.config import cpu_bf16_support, fastest_cpu_dtype

    cpu = {"capability": torch.backends.cpu.get_cpu_capability(), "fastest_cpu_dtype": fastest_cpu_dtype(),
           **cpu_bf16_support()}
    rows = []
    for dtype in ("fp32", "bf16"):
        for layout in LAYOUTS:
            rows.append(measure(dtype, layout, a.train_batch, a.sample_batch, a.calls))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    if a.json:
        C.write_json(a.json, {"tool": "bench.cpu_dtypes", "args": vars(a), "date": time.strftime("%Y-%m-%d"),
                              "command": " ".join(["python -m bench.cpu_dtypes",
                                                             *(argv if argv is not None else sys.argv[1:])]),
                              "device": C.device_info(), "cpu": cpu, "versions": C.versions(), "git": C.git_commit(),
                              "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
