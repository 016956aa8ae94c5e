"""``python -m bench.static_cost``: what the fast path's Triton kernels cost per element, read from their
sm_90 machine code, on a machine without a GPU.

Each GroupNorm call of the paper's U-Net (every distinct shape and residual / time-encoding / GELU
combination, found by running the eager model) is launched once through Triton's interpreter at batch 2
(recorded, not run), with the launch configuration of the batch it stands for (``--batch``, 256 by
default: the training bench's). Each distinct launch is recorded as a GPU launch specialises it (integer
arguments equal to 1 made constants, pointers and integers divisible by 16 marked so) and compiled in
fresh processes through Triton's own pipeline to an sm_90 cubin. From its SASS (``cuobjdump``, shipped
with Triton) and ``ptxas -v``: the registers a thread holds (occupancy), its stack and spill bytes, and
for each innermost loop that loads 64 or 128 bits at a time (the hot loops), the instructions a thread
issues per element it handles, the MUFU (special-function unit) ones among them, and the barriers per
iteration. A kernel without such a loop (the resident path) is counted whole.

Why it matters: an H100 SM issues at most four warp-instructions a clock, so 132 SMs at the 1.98 GHz
boost clock issue at most 33.5 T lane-instructions a second. A pass that moves 4 bytes an element (two
bf16 reads) at the 3.0 TB/s copy rate measured on an H100 handles 750 G elements a second, which
leaves it 45 instructions an element (fewer in practice: no kernel issues every clock) before it is
issue-bound instead of memory-bound. These are static counts of one compiler (this machine's Triton;
the GPU machine's may differ), not speeds: only a GPU times.

    python -m bench.static_cost                                     # the defaults, both layouts
    python -m bench.static_cost --settings none,libdevice_erf=1,lane=1 --json static.json
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
         torch.int32: "i32", torch.uint8: "u8", torch.bool: "i1"}
# The recorder hooks the launcher of Triton's interpreter, which TRITON_INTERPRET=1 selects when a kernel
# is defined (the tests' conftest sets it without a GPU, main() itself); importing this module sets nothing.
NOT_INTERPRETED = ("the kernels were not defined under Triton's interpreter: set TRITON_INTERPRET=1 before "
                   "fastddpm.kernels is imported (python -m bench.static_cost does)")


def _key(launch: dict) -> str:
    """What makes two launches one compiled kernel."""
    return json.dumps({k: v for k, v in launch.items() if k != "tag"}, sort_keys=True)


@contextlib.contextmanager
def recorded_launches(tag=lambda: None):
    """Record every Triton launch made through the interpreter's launcher inside the block, as a GPU
    launch specialises it, without running it: yields the list of launches (file, kernel, signature,
    constexprs, divisible-by-16 argument indices, options, and ``tag()`` at launch), filled as they
    come; a launch repeated with the same tag is listed once, and so are the two stages that stand in
    for a GPU's one launch. The kernels' outputs keep whatever their memory held: a launch depends on
    shapes, dtypes, strides and settings, never on values (the kernel tests run them; the interpreter
    runs a GPU launch's programs one by one, in Python: recording only, the native-compile test's pass
    over every path went from 53 to 3 s). The GroupNorm launch knobs take a GPU's defaults inside
    (gng.GPU_LAUNCH_DEFAULTS, not the interpreter's own)."""
    from triton.runtime.interpreter import InterpretedFunction

    from fastddpm.kernels import groupnorm_gelu as gng

    if not isinstance(gng._gn_fwd_kernel, InterpretedFunction):
        raise RuntimeError(NOT_INTERPRETED)
    launches, seen = [], set()
    real_run = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        sig = inspect.signature(self.fn)
        params = sig.parameters
        options = {k: v for k, v in kwargs.items() if k not in params}  # launch options: num_warps, ...
        bound = sig.bind(*args, **{k: v for k, v in kwargs.items() if k in params})
        bound.apply_defaults()
        signature, constexprs, divisible = {}, {}, []
        for i, (name, value) in enumerate(bound.arguments.items()):
            if "constexpr" in str(params[name].annotation) or value is None:
                signature[name], constexprs[name] = "constexpr", value
            elif isinstance(value, torch.Tensor):
                signature[name] = "*" + TYPES[value.dtype]
                if value.data_ptr() % 16 == 0:
                    divisible.append(i)
            elif isinstance(value, bool):  # Triton's launcher types every bool as u1
                signature[name] = "u1"
            elif isinstance(value, int) and value == 1:  # as Triton's launcher specialises it on a GPU
                signature[name], constexprs[name] = "constexpr", 1
            elif isinstance(value, int):
                signature[name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
                if value % 16 == 0:
                    divisible.append(i)
            elif isinstance(value, float):
                signature[name] = "fp32"
            else:
                raise TypeError(f"{self.fn.__name__}: argument {name} of type {type(value).__name__}")
        if "resident" in self.fn.__name__ and constexprs.get("STAGE"):  # a row's programs staged for the
            constexprs["STAGE"] = 0  # interpreter: one launch on a GPU, meeting at a barrier (_programs_meet)
        launch = {"file": inspect.getsourcefile(self.fn), "kernel": self.fn.__name__, "signature": signature,
                  "constexprs": constexprs, "divisible": divisible, "options": options, "tag": tag()}
        key = _key(launch) + json.dumps(launch["tag"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            launches.append(launch)
        return None  # recorded, not run

    InterpretedFunction.run = run
    try:
        with gng.launch_settings(**gng.GPU_LAUNCH_DEFAULTS):
            yield launches
    finally:
        InterpretedFunction.run = real_run


# Compiles (and with "analyse", reads) the launches listed in a JSON file, in a process without the interpreter.
_COMPILE = r"""
import collections, contextlib, importlib.util, io, json, os, re, subprocess, sys, tempfile
import triton
from triton import knobs
from triton.backends import nvidia
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

launches, analyse = json.load(open(sys.argv[1]))
knobs.nvidia.dump_ptxas_log = analyse  # Triton's own ptxas run prints its -v report (the cache is fresh)
BIN = os.path.join(os.path.dirname(nvidia.__file__), "bin")
LINE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)([^;]*);", re.M)
WIDE = re.compile(r"LDG\.E(\.\w+)*\.(64|128)$")  # a 64- or 128-bit global load, any cache hint
modules, out = {}, []
for launch in launches:
    path = launch["file"]
    if path not in modules:
        spec = importlib.util.spec_from_file_location(f"native_{len(modules)}", path)
        modules[path] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(modules[path])
    kernel = getattr(modules[path], launch["kernel"])
    try:
        attrs = {(i,): [["tt.divisibility", 16]] for i in launch["divisible"]}
        src = ASTSource(fn=kernel, signature=launch["signature"], constexprs=launch["constexprs"], attrs=attrs)
        with contextlib.redirect_stdout(io.StringIO()) as log:
            compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=launch["options"])
        assert compiled.asm.get("cubin"), "no cubin"
    except Exception as e:
        out.append({"error": f"{launch['kernel']} {launch['constexprs']}: {str(e).strip().splitlines()[-1][:300]}"})
        continue
    if not analyse:
        out.append({})
        continue
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        open(cubin, "wb").write(compiled.asm["cubin"])
        sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", cubin], capture_output=True, text=True).stdout
    info = log.getvalue()
    used = {k: int(re.search(pattern, info).group(1)) for k, pattern in
            (("registers", r"Used (\d+) registers"), ("stack_bytes", r"(\d+) bytes stack frame"),
             ("spill_bytes", r"(\d+) bytes spill stores"))}
    code = [(int(a, 16), op, rest) for a, op, rest in LINE.findall(sass)]
    loops = []
    for addr, op, rest in code:
        target = re.search(r"0x([0-9a-f]+)", rest)
        if op.startswith("BRA") and target and int(target.group(1), 16) < addr:
            lo = int(target.group(1), 16)
            body = [o for a, o, _ in code if lo <= a <= addr]
            if any(WIDE.match(o) for o in body):
                loops.append((lo, addr, body))
    inner = [l for l in loops if not any(o is not l and l[0] <= o[0] and o[1] <= l[1] for o in loops)]
    bodies = [body for _, _, body in inner] or [[o for _, o, _ in code]]
    def count(body):
        ops = collections.Counter(o.split(".")[0] for o in body)
        wide = sum(bool(WIDE.match(o)) for o in body)
        return {"instructions": len(body), "mufu": ops["MUFU"], "barriers": ops["BAR"],
                "wide_loads": wide, "narrow_loads": ops["LDG"] - wide}
    out.append({**used, "loop": bool(inner), "bodies": [count(b) for b in bodies]})
print(json.dumps(out))
"""


def compile_launches(launches: list[dict], analyse: bool = False, timeout: int = 900) -> list[dict]:
    """Compile each launch for sm_90 in fresh processes (no interpreter), one a CPU core, each distinct
    launch once: per launch ``{"error": ...}``, or with ``analyse`` its registers, stack and spill
    bytes and hot-loop bodies' counts."""
    distinct = list({_key(launch): launch for launch in launches}.values())
    workers = max(1, min(len(distinct), os.cpu_count() or 1))
    chunks = [distinct[i::workers] for i in range(workers)]
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        if analyse:  # no cached kernel: every compile runs (and reports) ptxas
            env["TRITON_CACHE_DIR"] = os.path.join(tmp, "cache")
        procs = []
        for i, chunk in enumerate(chunks):
            path = os.path.join(tmp, f"launches-{i}.json")
            with open(path, "w") as f:
                json.dump([chunk, analyse], f)
            out, err = open(os.path.join(tmp, f"out-{i}"), "w+"), open(os.path.join(tmp, f"err-{i}"), "w+")
            procs.append((subprocess.Popen([sys.executable, "-c", _COMPILE, path], cwd=ROOT, env=env, stdout=out,
                                           stderr=err, text=True), out, err))
        results = {}
        try:
            for chunk, (proc, out, err) in zip(chunks, procs):
                proc.wait(timeout=timeout)
                out.seek(0), err.seek(0)
                if proc.returncode != 0:
                    raise RuntimeError(err.read()[-3000:])
                results.update(zip((_key(launch) for launch in chunk), json.loads(out.read().strip().splitlines()[-1])))
        finally:
            for proc, out, err in procs:  # none left running on an error or a timeout
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
                out.close(), err.close()
    return [results[_key(launch)] for launch in launches]


def unet_norm_calls(base_channels: int = 64) -> list[dict]:
    """The U-Net's distinct GroupNorm calls: (C, H, W), groups, whether each takes a residual, a time
    encoding and the GELU, and how many times a forward makes it (``count``), read from an eager
    forward."""
    from fastddpm.model import GroupNormGELU, UNet

    calls = {}

    def hook(module, args, kwargs, _):
        x = args[0]
        call = {"c": x.shape[1], "h": x.shape[2], "w": x.shape[3], "groups": module.num_groups,
                "residual": kwargs.get("residual") is not None, "t": kwargs.get("t") is not None,
                "gelu": module.gelu}
        calls.setdefault(json.dumps(call, sort_keys=True), {**call, "count": 0})["count"] += 1

    model = UNet(base_channels, kernels="torch")
    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in model.modules()
               if isinstance(m, GroupNormGELU)]
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.long))
    for h in handles:
        h.remove()
    return list(calls.values())


def record_calls(calls: list[dict], batch: int, layout: str, settings: dict) -> list[dict]:
    """The launches of each call's forward and backward in bf16 (autocast's: fp32 weights), under
    ``settings``, launched as at ``batch`` (the launch configuration's rows) while made at batch 2.
    Integer arguments that scale with the batch (the rows of the persistent loop, the dw/db table's
    stride) are recorded at batch 2, so their divisible-by-16 marks can differ from the batch's: they
    index no hot loop."""
    from fastddpm.kernels import groupnorm_gelu as gng

    real_config, current = gng._launch_config, {}

    def config_at_batch(cg, hw, rows, *strides):
        return real_config(cg, hw, rows * batch // 2, *strides)

    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    with recorded_launches(lambda: dict(current)) as launches, gng.launch_settings(**settings):
        gng._launch_config = config_at_batch
        try:
            for call in calls:
                current.update(call)
                x = torch.randn(2, call["c"], call["h"], call["w"], dtype=torch.bfloat16)
                x = x.contiguous(memory_format=fmt).requires_grad_()
                r = torch.randn_like(x) if call["residual"] else None
                t = torch.tensor([3, 900]) if call["t"] else None
                y = gng.group_norm_gelu(x, torch.ones(call["c"]), torch.zeros(call["c"]), call["groups"],
                                        residual=r, t=t, gelu=call["gelu"])
                y.backward(torch.randn_like(y))
        finally:
            gng._launch_config = real_config
    return launches


def _hot_loops(launch: dict) -> int:
    """How many innermost loops a GroupNorm kernel's code should show: none on the resident path (one
    tile), two where one program makes both passes over its group (SINGLE), else one."""
    if "resident" in launch["kernel"]:
        return 0
    return 2 if launch["constexprs"].get("SINGLE") else 1


def rows_for(launches: list[dict], results: list[dict], layout: str, setting: str) -> list[dict]:
    """One row per call and kernel: its tile, registers, spills and counts per element a thread handles.
    A kernel whose hot loops are not the ones its code has (an unrolled or peeled copy, a loop not
    found) is an error row, not a count."""
    rows = []
    for launch, res in zip(launches, results):
        base = {"layout": layout, "setting": setting, "call": launch["tag"], "kernel": launch["kernel"]}
        expected = _hot_loops(launch)
        if "error" not in res and len(res["bodies"]) * res["loop"] != expected:
            res = {"error": f"{len(res['bodies']) * res['loop']} hot loops read in the code, {expected} expected"}
        if "error" in res:
            rows.append({**base, **res})
            continue
        k, warps = launch["constexprs"], launch["options"].get("num_warps", 4)
        per_thread = k["BLOCK_C"] * k["BLOCK_HW"] / (32 * warps)
        bodies = [{"instructions_per_element": round(b["instructions"] / per_thread, 2),
                   "mufu_per_element": round(b["mufu"] / per_thread, 2), **b} for b in res["bodies"]]
        rows.append({**base, "gelu": k.get("GELU"), "lane": k.get("LANE"), "tile": [k["BLOCK_C"], k["BLOCK_HW"]],
                     "warps": warps, "elements_per_thread": per_thread,
                     **{key: res[key] for key in ("registers", "stack_bytes", "spill_bytes", "loop")},
                     "bodies": bodies})
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Per setting and layout: the lane-instructions a sample costs in all the U-Net's GroupNorm
    forward and backward kernels (each hot loop's count per element times the call's elements, times
    the calls a forward makes), the most registers and spilled bytes of any kernel, the error rows."""
    out: dict = {}
    for r in rows:
        s = out.setdefault((r["setting"], r["layout"]), {"setting": r["setting"], "layout": r["layout"],
                                                         "forward": 0.0, "backward": 0.0, "registers": 0,
                                                         "spill_bytes": 0, "errors": 0})
        if "error" in r:
            s["errors"] += 1
            continue
        elements = r["call"]["c"] * r["call"]["h"] * r["call"]["w"] * r["call"].get("count", 1)
        s["backward" if "bwd" in r["kernel"] else "forward"] += elements * sum(
            b["instructions_per_element"] for b in r["bodies"])
        s["registers"] = max(s["registers"], r["registers"])
        s["spill_bytes"] = max(s["spill_bytes"], r["spill_bytes"])
    return list(out.values())


def _call_name(call: dict) -> str:
    flags = "".join(f" +{k}" for k in ("residual", "t", "gelu") if call[k])
    times = f" (×{call['count']})" if call.get("count", 1) > 1 else ""
    return f"{call['c']}×{call['h']}×{call['w']}{flags}{times}"


def render(rows: list[dict], detail: bool = False) -> str:
    lines = ["| setting | layout | forward M instr/sample | backward M instr/sample | most regs | most spill B | "
             "errors |", "|---|---|---|---|---|---|---|"]
    for s in summary(rows):
        lines.append(f"| {s['setting']} | {s['layout']} | {s['forward'] / 1e6:.1f} | {s['backward'] / 1e6:.1f} | "
                     f"{s['registers']} | {s['spill_bytes']} | {s['errors']} |")
    if not detail:
        return "\n".join(lines)
    lines += ["", "| setting | layout | call | kernel | tile × warps | regs | spill B | instr/elem | MUFU/elem | "
              "bar/iter |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['setting']} | {r['layout']} | {_call_name(r['call'])} | {r['kernel']} | "
        if "error" in r:
            lines.append(head + f"error: {r['error']} | | | | | |")
            continue
        bodies = r["bodies"]
        bars = " + ".join(str(b["barriers"]) for b in bodies) if r["loop"] else "—"
        lines.append(head + f"{r['tile'][0]}×{r['tile'][1]} × {r['warps']} | {r['registers']} | {r['spill_bytes']} | "
                     + " + ".join(f"{b['instructions_per_element']:.1f}" for b in bodies) + " | "
                     + " + ".join(f"{b['mufu_per_element']:.1f}" for b in bodies) + f" | {bars} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.static_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--layouts", default="nchw,nhwc", type=lambda s: s.split(","))
    p.add_argument("--settings", default="none", type=lambda s: s.split(","),
                   help="GroupNorm launch settings, each 'none' (the defaults) or knob=value joined by '+'")
    p.add_argument("--batch", default=256, type=int, help="the batch whose launch configuration is read")
    p.add_argument("--base-channels", default=64, type=int)
    p.add_argument("--detail", action="store_true", help="also a row per call and kernel")
    p.add_argument("--json", help="write every row here, with the versions and commit")
    args = p.parse_args(argv)
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the launches are recorded through its launcher
    from fastddpm.kernels import groupnorm_gelu as gng

    bad = [v for v in args.layouts if v not in ("nchw", "nhwc")]
    if bad or args.batch < 2 or args.batch % 2:
        print(f"python -m bench.static_cost: layouts {','.join(args.layouts)} and batch {args.batch}: layouts "
              "are nchw and nhwc, the batch an even number >= 2", file=sys.stderr)
        return 2
    try:
        settings = {s: ({} if s == "none" else gng.parse_launch_settings(s)) for s in args.settings}
    except ValueError as e:
        print(f"python -m bench.static_cost: {e}", file=sys.stderr)
        return 2
    calls = unet_norm_calls(args.base_channels)
    rows = []
    for setting, knobs in settings.items():
        for layout in args.layouts:
            launches = record_calls(calls, args.batch, layout, knobs)
            rows += rows_for(launches, compile_launches(launches, analyse=True), layout, setting)
            print(f"{setting} {layout}: {len(launches)} launches", file=sys.stderr, flush=True)
    print(render(rows, args.detail))
    if args.json:
        from bench import common as C

        card = f"no GPU: sm_90 code compiled on the CPU by Triton {C.versions()['triton']}"
        C.write_json(args.json, {"tool": "bench.static_cost", "date": time.strftime("%Y-%m-%d"),
                                 "command": "python -m bench.static_cost " + " ".join(argv or sys.argv[1:]),
                                 "card": card, "target": "sm_90", "batch": args.batch, "versions": C.versions(),
                                 "git": C.git_commit(),
                                 "defaults": {**gng.current_launch_settings(), **gng.GPU_LAUNCH_DEFAULTS},
                                 "summary": summary(rows), "rows": rows})
    errors = sum(s["errors"] for s in summary(rows))
    if errors:
        print(f"python -m bench.static_cost: {errors} kernel(s) not compiled or not read (the error rows)",
              file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
