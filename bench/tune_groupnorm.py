"""``python -m bench.tune_groupnorm``: sweep the GroupNorm+GELU kernels' launch parameters at the
U-Net's shapes and print, per shape and variant, the best setting next to the default (timed
whether the sweep names it or not) and to ``torch.compile`` (Inductor's own fusion, the bar to beat).

The swept knobs are ``fastddpm.kernels.groupnorm_gelu.LAUNCH_KNOBS``, set through its
``launch_settings()`` (the same names as a bench path's ``@knob=value`` settings): ``_LANE_ACCUMULATE``
(per-lane accumulators vs a block reduction per tile), ``_TILE`` (elements per loaded tile),
``_TARGET_PROGRAMS`` (how finely a large group is split), ``ELEMS_PER_PROGRAM`` (``--elems``: a split
program's elements, fixed, instead of derived from the target programs), ``_ELEMS_PER_THREAD`` (sets num_warps) and
``SPLIT_THRESHOLD`` (groups up to this many elements get one program, whose second pass over its
group should find it in L1/L2 rather than DRAM; larger ones are split over programs, two kernels)
and ``RESIDENT_MAX`` (groups whose padded tile holds up to this many elements, 16,384 at most, are
loaded once into one program's registers: the compulsory traffic; 0 = off). With it on, the other
knobs still set the paths of the larger groups, and "threads" the resident program's warps.
``COOP_TILE`` (``--coop``: the larger groups resident too, in tiles of this many elements, one program
each, a group's programs meeting at a barrier in the kernel; 0 = off) extends that to every level.
``_LANE_BWD_CHANNELS_LAST`` (the backward's reduction pass over a channels_last group accumulates per
lane) matters only with ``--layouts nhwc``, which makes every input channels_last. ``_LIBDEVICE_ERF``
(``--libdevice-erf``: the GELU's Phi from libdevice's erf, as every run up to 2026-11-27 had it, instead
of the kernels' own, which issues less than half its instructions). ``PERSISTENT``
(``--persistent``: k row programs per SM, each looping over (sample, group) rows, times a row's split
programs; 0 = a program per row) bounds the groups in flight, so that a program's second pass over its
group can find it in L2. It changes nothing on the resident path (those rows time as the default).
Each setting is built, guarded against eager and timed exactly as the kernel bench does
(``bench.test_kernels.gn_case``: CUDA-graph replays over inputs larger than L2). On the CPU it runs
at the smoke size through Triton's interpreter, which proves only that it runs.

    python -m bench.tune_groupnorm --json tune.json          # the full grid, bf16 (200 timed settings)
    python -m bench.tune_groupnorm --lane 0,1 --tile 2048 --programs 528 --threads 8   # a slice
    python -m bench.tune_groupnorm --lane 0 --tile 2048 --programs 528 --threads 8,16 \
        --split 4096,16384,65536      # one program per sample up to the 8x8 / 32x32 levels (8 settings)
    python -m bench.tune_groupnorm --lane 0 --tile 2048 --programs 528 --threads 8,16,32 \
        --resident 0,4096,16384   # one load per input at the 4x4 / 8x8 levels (16,384 at most: registers)
    python -m bench.tune_groupnorm --lane 0 --tile 2048 --programs 528 --threads 8,16 --resident 16384 \
        --coop 0,1024,2048,4096   # every input read once at every level (a barrier a group)
    python -m bench.tune_groupnorm --variants fwd --batch 2560 --programs 528,2112,8448   # sampling's batch
    python -m bench.tune_groupnorm --variants fwd+bwd --layouts nchw,nhwc --lane 0 --tile 2048 \
        --programs 528 --threads 8 --lane-bwd-nhwc 0,1   # channels_last inputs: the backward's reduction
    python -m bench.tune_groupnorm --lane 0 --tile 2048,8192 --programs 528 --threads 8 --split 65536 \
        --persistent 0,1,2   # one program per group, its second pass from L2 (the groups in flight bounded)
    python -m bench.tune_groupnorm --lane 0,1 --tile 2048 --programs 528,2112 --threads 8 \
        --libdevice-erf 0,1   # the GELU's Phi: what fewer instructions buy, beside the reduction style
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time

from bench import common as C

def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def time_case(variant, shape, dtype, impl, rounds, layout="nchw") -> dict:
    """Build, guard and time one kernel case: µs per call, GB/s and the share of copy bandwidth."""
    from bench.test_kernels import gn_case

    C.fresh()
    fn, calls, mode, moved, _n, check = gn_case(variant, shape, dtype, impl, layout)
    guard = check() if impl != "eager" else None
    timer = C.Timer()
    timer.pedantic(fn, rounds=rounds, warmup_rounds=1)
    sec = timer.stats["median"] / calls
    copy = C.peaks()["copy_gb_per_s"]
    return {"us": sec * 1e6, "gb_per_s": moved / sec / 1e9,
            "roofline": moved / sec / 1e9 / copy if copy else None, "timing": mode, "guard": guard}


def save(args, rows: list[dict]) -> None:
    """The JSON so far (rewritten after every row: a sweep stopped at its time cap keeps its rows)."""
    if args.json:
        flags = {k: v for k, v in vars(args).items() if k != "command"}
        C.write_json(args.json, {"tool": "bench.tune_groupnorm", "args": flags, "date": time.strftime("%Y-%m-%d"),
                                 "command": args.command, "device": C.device_info(), "versions": C.versions(),
                                 "git": C.git_commit(), **C.peaks(), "rows": rows})


def sweep(args) -> list[dict]:
    from fastddpm.kernels import groupnorm_gelu as gng

    default = gng.current_launch_settings()
    axes = {"lane": args.lane, "tile": args.tile, "programs": args.programs, "threads": args.threads,
            "split": args.split, "elems": args.elems, "resident": args.resident, "coop": args.coop,
            "lane_bwd_nhwc": args.lane_bwd_nhwc, "libdevice_erf": args.libdevice_erf, "persistent": args.persistent}
    assert set(axes) == set(gng.LAUNCH_KNOBS), "a launch knob without a sweep axis"
    # each knob's values as launch_settings takes them (bools for the switches), its default if not swept
    values = [[gng.launch_knob(k, v) for v in axes[k]] if axes[k] else [default[k]] for k in axes]
    grid = [dict(zip(axes, combo)) for combo in itertools.product(*values)]
    if default not in grid:  # the defaults always timed beside: the bar a setting must clear to become one
        grid.append(dict(default))
    rows = []
    for layout in args.layouts:
        # the channels_last knob changes nothing in NCHW: its default there, not repeated rows
        knob_grid = grid if layout == "nhwc" else \
            list({str(k): k for k in ({**k, "lane_bwd_nhwc": default["lane_bwd_nhwc"]} for k in grid)}.values())
        for variant in args.variants:
            for shape in C.S["gn_shapes"]:
                base = {"variant": variant, "shape": [C.S["kernel_batch"], *shape], "dtype": args.dtype,
                        "layout": layout}
                rows.append({**base, "impl": "compiled",
                             **time_case(variant, shape, args.dtype, "compiled", args.rounds, layout)})
                for knobs in knob_grid:
                    with gng.launch_settings(**knobs):
                        rows.append({**base, "impl": "fast", "knobs": knobs, "default": knobs == default,
                                     **time_case(variant, shape, args.dtype, "fast", args.rounds, layout)})
                    print(f"{layout} {variant} {shape} {knobs}: {rows[-1]['us']:.1f} µs", file=sys.stderr, flush=True)
                    save(args, rows)
    return rows


def table(rows: list[dict]) -> str:
    """Per (variant, shape): compiled, the default setting, the best setting and its knobs."""
    lines = ["| variant | shape | layout | compiled µs | default µs | best µs | best/compiled | best roofline "
             "| best knobs |", "|---|---|---|---|---|---|---|---|---|"]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["variant"], str(r["shape"]), r.get("layout", "nchw")), []).append(r)
    for (variant, shape, layout), rs in groups.items():
        compiled = next(r for r in rs if r["impl"] == "compiled")
        fast = [r for r in rs if r["impl"] == "fast"]
        best = min(fast, key=lambda r: r["us"])
        default = next((f"{r['us']:.1f}" for r in fast if r["default"]), "—")
        roof = f"{best['roofline']:.1%}" if best["roofline"] else "—"
        lines.append(f"| {variant} | {shape} | {layout} | {compiled['us']:.1f} | {default} | {best['us']:.1f} | "
                     f"{compiled['us'] / best['us']:.2f}× | {roof} | {best['knobs']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tune_groupnorm", description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="bf16", choices=list(C.DTYPES))
    p.add_argument("--variants", default="fwd+bwd,fwd", type=lambda s: s.split(","))
    p.add_argument("--lane", default="0,1", type=ints, help="per-lane accumulation off/on")
    p.add_argument("--tile", default="1024,2048,4096", type=ints)
    p.add_argument("--programs", default="528,2112", type=ints, help="target programs for a split group")
    p.add_argument("--threads", default="8,16", type=ints, help="elements per thread (sets num_warps)")
    p.add_argument("--split", type=ints, help="largest group given one program (default: the kernel's own)")
    p.add_argument("--elems", type=ints,
                   help="elements per split program, 0 = derived from --programs (default: the kernel's own)")
    p.add_argument("--resident", type=ints,
                   help="largest padded tile loaded once, 0 = off (default: the kernel's own)")
    p.add_argument("--coop", type=ints,
                   help="the tile of each of the resident programs that share a larger group, meeting at a "
                        "barrier, 0 = off (default: the kernel's own)")
    p.add_argument("--persistent", type=ints,
                   help="row programs per SM looping over rows (times a row's split programs), 0 = a program "
                        "per row (default: the kernel's own); no effect on the resident path")
    p.add_argument("--lane-bwd-nhwc", default=None, type=ints,
                   help="the backward's per-lane accumulation over channels_last groups off/on (default: the "
                        "kernel's own); swept in the nhwc layout only; with --lane 1 it is on whatever this says")
    p.add_argument("--libdevice-erf", default=None, type=ints,
                   help="the GELU's Phi from libdevice's erf (1) or the kernels' own (0) (default: the kernel's own)")
    p.add_argument("--layouts", default="nchw", type=lambda s: [v for v in s.split(",") if v],
                   help="nchw and/or nhwc (channels_last inputs; Inductor compiles each layout on its own)")
    p.add_argument("--batch", type=int,
                   help="images per call (default: the kernel bench's, 256 on a GPU); 2560 is the sampling batch")
    p.add_argument("--rounds", default=5, type=int)
    p.add_argument("--json", help="write every timing here, with the device, versions and commit")
    a = p.parse_args(argv)
    a.command = " ".join(["python -m bench.tune_groupnorm", *(argv if argv is not None else sys.argv[1:])])
    from bench.test_kernels import GN_VARIANTS

    unknown = [v for v in a.variants if v not in GN_VARIANTS]
    if unknown:
        p.error(f"unknown variant {unknown[0]!r}: choose from {', '.join(GN_VARIANTS)}")
    if a.batch is not None:
        if a.batch < 1:
            p.error(f"--batch {a.batch}: must be a positive integer")
        C.S["kernel_batch"] = a.batch  # gn_case and the rows read it
    bad = [v for v in a.layouts if v not in ("nchw", "nhwc")]
    if bad or not a.layouts:
        p.error(f"--layouts {','.join(a.layouts)}: choose from nchw, nhwc")
    start = time.perf_counter()
    rows = sweep(a)
    out = table(rows)
    print(f"GroupNorm+GELU launch sweep, {a.dtype}, size {C.SIZE}, {time.perf_counter() - start:.0f} s\n\n{out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
