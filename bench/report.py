"""``python -m bench.report RESULTS.json [MORE ...] [--merge OUT.json]``: the markdown tables.

Reads pytest-benchmark JSON (``--benchmark-json``), ``bench.run``'s JSON (same shape) or the
JSON-lines log of ``$FASTDDPM_BENCH_LOG``; several inputs are merged (a later result for the same
case replaces an earlier one), and ``--merge`` writes them as one JSON. Per workload and dtype:
each implementation's figure, fast/eager and fast/compiled, MFU or the share of the memory
roofline, and the projections: seconds to sample 5,120 images at T = 1000 and 2000, hours for the
paper's 500 epochs of 50,000 images, next to what the paper's RTX 4070 took. Then issue 11's
targets, and the entry of ``fastddpm/measured.py`` (what ``auto`` runs on this card) these results
support. A ``bench.profile_step``, ``bench.tune_groupnorm`` or ``bench.static_cost`` file is printed as its
tool's own table; any other file is refused in one line (exit code 2).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

IMPLS = ("eager", "compiled", "fast", "diffusers")
# training only (bench/test_train_step.py's PATHS): torch.compile's and our kernels' CUDA-graph paths, NCHW/NHWC
GRAPHED_COMPILED, GRAPHED_FAST = ("compiled-graphs", "compiled-graphs-nhwc"), ("fast-graphs", "fast-graphs-nhwc")
GRAPHED = GRAPHED_COMPILED + GRAPHED_FAST
# sampling (bench/test_sampling.py's PATHS): each engine per layout
SAMPLE_PATHS = {"fast": {"nchw": "fast", "nhwc": "fast-nhwc"},
                "compiled": {"nchw": "compiled", "nhwc": "compiled-nhwc"}}
SAMPLE_NHWC = tuple(SAMPLE_PATHS[engine]["nhwc"] for engine in ("compiled", "fast"))  # column order
DTYPES = ("fp32", "fp16", "bf16")
N_IMAGES, EPOCHS, TRAIN_IMAGES = 5120, 500, 50_000
# The paper's RTX 4070 (its Tables: T, dtype -> seconds for 5,120 images / hours for 500 epochs).
PAPER_SAMPLE_S = {(1000, "fp32"): 1861, (2000, "fp32"): 3595, (2000, "fp16"): 3101, (2000, "bf16"): 3126}
PAPER_TRAIN_H = {("T=1000", "fp32"): 7.71, ("T=2000", "fp32"): 8.51, ("T=2000", "fp16"): 7.35,
                 ("T=2000", "bf16"): 6.70}


# --- loading ------------------------------------------------------------------------------------
# The other tools' results files (one JSON document with "tool" and "rows"), each rendered by its own
# table function (they import torch; the benchmark tables do not need it).
TOOL_TABLES = {"bench.profile_step": "render", "bench.tune_groupnorm": "table", "bench.static_cost": "render",
               "bench.cpu_dtypes": "table"}
ACCEPTED = ("pytest-benchmark JSON, bench.run JSON lines, or a " + " / ".join(TOOL_TABLES) + " JSON")


class NotResults(ValueError):
    """A file that is none of the results this report reads (its message names the file and why)."""


def parse(path) -> tuple[str, object]:
    """("benchmarks", (rows, header)) or ("tool", document) for one results file; NotResults otherwise."""
    try:
        text = Path(path).read_text()
    except UnicodeDecodeError:
        raise NotResults(f"{path}: not text: expected {ACCEPTED}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        doc = None
    if isinstance(doc, dict) and "benchmarks" in doc:
        return "benchmarks", (doc["benchmarks"], {k: v for k, v in doc.items() if k != "benchmarks"})
    if isinstance(doc, dict) and doc.get("tool") in TOOL_TABLES and isinstance(doc.get("rows"), list):
        return "tool", doc
    if isinstance(doc, dict) and "extra_info" not in doc:  # (one line of JSON lines is a document too)
        raise NotResults(f"{path}: a JSON document with neither benchmarks nor a known tool's rows "
                         f"(tool={doc.get('tool')!r}): expected {ACCEPTED}")
    rows = []
    for n, line in enumerate(text.splitlines(), 1):  # JSON lines (one result a line)
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            row = None
        if line.strip() and not isinstance(row, dict):
            raise NotResults(f"{path}: line {n} is not a benchmark result: expected {ACCEPTED}")
        rows += [row] if row else []
    if rows and not any("extra_info" in r for r in rows):  # an empty log is a stage that finished nothing
        raise NotResults(f"{path}: JSON lines, but none is a benchmark result (no extra_info): "
                         f"expected {ACCEPTED}")
    return "benchmarks", (rows, {})


def load(paths, parsed=None) -> tuple[list[dict], dict]:
    """(benchmark entries, the first document's header fields) from JSON or JSON-lines files (or
    from ``parsed``, their ``parse`` results)."""
    entries, header = [], {}
    for path, (kind, doc) in zip(paths, parsed or [parse(p) for p in paths]):
        if kind != "benchmarks":
            raise NotResults(f"{path}: a {doc['tool']} file, not benchmark results")
        rows, head = doc
        header = header or head
        entries += [r for r in rows if r.get("extra_info", {}).get("workload")]
    merged = {}
    for e in entries:  # the last result of a case wins
        merged[key(e["extra_info"])] = e
    return list(merged.values()), header


def render_tool(doc: dict, source: str) -> str:
    """A profile, launch-sweep or static-cost file as its tool prints it, under the card, commit and
    command."""
    import importlib

    table_of = getattr(importlib.import_module(doc["tool"]), TOOL_TABLES[doc["tool"]])
    rows = doc["rows"]
    body = table_of(rows, (doc.get("args") or {}).get("top", 12)) if doc["tool"] == "bench.profile_step" \
        else table_of(rows)
    device = doc.get("card") or (doc.get("device") or {}).get("name", "?")
    commit = doc.get("commit") or (doc.get("git") or {}).get("id") or "?"
    return (f"# {doc['tool']}: {source}\n\n**device** {device} · commit {str(commit)[:12]} · "
            f"{doc.get('date', '?')}\n\n`{doc.get('command', '?')}`\n\n{body}\n")


def key(i: dict) -> tuple:
    return (i["workload"], i.get("variant"), str(i.get("shape")), i.get("batch"), i["dtype"], i["impl"])


# --- formatting ---------------------------------------------------------------------------------
def num(v, digits=3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def ratio(a, b) -> str:
    return f"{a / b:.2f}×" if a and b else "—"


def pct(v) -> str:
    return f"{100 * v:.1f}%" if v is not None else "—"


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def train_hours(i: dict):
    ips = i.get("items_per_s")
    return EPOCHS * TRAIN_IMAGES / ips / 3600 if ips else None


def sample_seconds(i: dict, T: int):
    """5,120 images at T steps with the measured per-step rate at the measured batch (5,120 in
    ceil(5120 / batch) chunks) plus the measured fixed cost of one call."""
    ips = i.get("items_per_s")
    if not ips:
        return None
    b = i["batch"]
    return (i.get("fixed_s") or 0.0) + math.ceil(N_IMAGES / b) * T * b / ips


# --- sections -----------------------------------------------------------------------------------
def by_impl(rows):
    out = {}
    for e in rows:
        out[e["extra_info"]["impl"]] = e["extra_info"]
    return out


def groups(entries, workload, fields):
    """{(field values...): {impl: info}} in a stable order."""
    out = {}
    for e in entries:
        i = e["extra_info"]
        if i["workload"] == workload:
            out.setdefault(tuple(str(i.get(f)) for f in fields), []).append(e)
    order = {d: n for n, d in enumerate(DTYPES)}

    def natural(values):  # batch 64 before 1024
        return tuple((0, int(v), "") if v.isdigit() else (1, 0, v) for v in values)

    return {k: by_impl(v) for k, v in sorted(out.items(), key=lambda kv: (natural(kv[0][:-1]),
                                                                          order.get(kv[0][-1], 9)))}


def mfu(i: dict):
    """The share of the bf16 peak at the result's (marginal) rate. Results written before the bench
    derived ``mfu`` from that rate counted a probed call's fixed cost in it; recomputed here so that
    a rate and its MFU always describe the same work."""
    if i.get("flops") and i.get("items") and i.get("items_per_s") and i.get("peak_bf16_tflops"):
        return i["flops"] / i["items"] * i["items_per_s"] / 1e12 / i["peak_bf16_tflops"]
    return i.get("mfu")


def header_text(entries, header) -> str:
    i = entries[0]["extra_info"]
    dev, v, git = i.get("device", {}), i.get("versions", {}), i.get("git", {})
    name = dev.get("nvml_name") or dev.get("name")
    bits = [f"**device** {name}" + (f" (driver {dev['driver']})" if dev.get("driver") else "")]
    if dev.get("memory_bytes"):
        bits.append(f"{dev['memory_bytes'] / 2**30:.0f} GiB")
    bits.append(f"torch {v.get('torch')}, triton {v.get('triton')}")
    if git.get("id"):
        bits.append(f"commit {git['id'][:12]}{' (dirty)' if git.get('dirty') else ''}")
    if header.get("datetime"):
        bits.append(header["datetime"][:19])
    lines = ["# fastddpm benchmarks", "", " · ".join(bits), ""]
    if i.get("peak_bf16_tflops"):
        lines.append(f"Measured in the same session: bf16 matmul peak **{i['peak_bf16_tflops']:.0f} TFLOP/s**, "
                     f"device-to-device copy **{i['copy_gb_per_s']:.0f} GB/s** (read + write). MFU and roofline "
                     "below are fractions of these.")
    else:
        lines.append("CPU run: no roofline is claimed (peaks, MFU and roofline are null), the Triton kernels ran "
                     "in Triton's interpreter, and the figures show that the suite runs, not how fast the "
                     f"project is. Sizes: `{i.get('size')}`.")
    if i.get("compile_backend") not in (None, "inductor"):
        lines.append(f"torch.compile backend: {i['compile_backend']} (a smoke run).")
    return "\n".join(lines)


def train_section(entries) -> str:
    g = groups(entries, "train_step", ("batch", "preset", "dtype"))
    if not g:
        return ""
    rows = []
    for (batch, preset, dtype), d in g.items():
        eager32 = g.get((batch, preset, "fp32"), {}).get("eager", {}).get("items_per_s")  # at the same batch
        ips = {m: d[m].get("items_per_s") if m in d else None for m in IMPLS[:3]}
        rows.append([dtype, f"{batch} ({preset})", *(num(ips[m]) for m in IMPLS[:3]),
                     ratio(ips["fast"], ips["eager"]), ratio(ips["fast"], ips["compiled"]),
                     ratio(ips["fast"], eager32), " / ".join(pct(mfu(d[m])) if m in d else "—"
                                                             for m in IMPLS[:3]),
                     " / ".join(num(train_hours(d[m])) if m in d else "—" for m in IMPLS[:3])])
    return "## Training step (images/s)\n\n" + table(
        ["dtype", "batch", "eager", "compiled", "fast", "fast/eager", "fast/compiled", "fast/eager fp32",
         "MFU eager / compiled / fast", "500 epochs (h) eager / compiled / fast"], rows) + \
        "\n\nThe paper's RTX 4070, 500 epochs: " + ", ".join(
            f"{h} h ({t}, {dt})" for (t, dt), h in PAPER_TRAIN_H.items()) + \
        " (the step's cost does not depend on T)." + graphed_train_table(g)


def measured(d: dict, impl: str) -> bool:
    """Whether ``d`` ({impl: info}) has a rate for ``impl``."""
    return bool(d.get(impl) and d[impl].get("items_per_s"))


def best(d: dict, impls) -> str | None:
    """The fastest of ``impls`` measured in ``d`` ({impl: info}): a side of a comparison in its best
    measured layout."""
    have = [m for m in impls if measured(d, m)]
    return max(have, key=lambda m: d[m]["items_per_s"]) if have else None


def unmeasured(d: dict) -> str:
    """Which graphed paths ``d`` lacks, for a best-layout comparison made without them."""
    missing = [m for m in GRAPHED if not measured(d, m)]
    return f"; {', '.join(missing)} not measured" if missing else ""


def graphed_train_table(g) -> str:
    """The CUDA-graph paths (--compile-mode reduce-overhead), where measured, beside plain compiled; the
    kernels' ratio takes each side in its best measured layout, named."""
    cols = [m for m in GRAPHED if any(d.get(m) for d in g.values())]
    rows = []
    for (batch, preset, dtype), d in g.items():
        ips = {m: d[m].get("items_per_s") if m in d else None for m in ("compiled", *cols)}
        if any(ips[m] for m in cols):
            fast, comp = best(d, GRAPHED_FAST), best(d, GRAPHED_COMPILED)
            rows.append([dtype, f"{batch} ({preset})", *(num(ips[m]) for m in ("compiled", *cols)),
                         *(ratio(ips[m], ips["compiled"]) for m in cols),
                         ratio(ips.get(fast), ips.get(comp)) + (f" ({fast} / {comp})" if fast and comp else ""),
                         " / ".join(pct(mfu(d[m])) if m in d else "—" for m in cols)])
    if not rows:
        return ""
    return "\n\nWith CUDA graphs (`--compile-mode reduce-overhead`), images/s:\n\n" + table(
        ["dtype", "batch", "compiled", *cols, *(f"{m}/compiled" for m in cols), "fast/compiled, graphed, best layouts",
         "MFU " + " / ".join(cols)], rows)


def sample_section(entries) -> str:
    g = groups(entries, "sampling", ("batch", "steps", "dtype"))
    if not g:
        return ""
    nhwc = [m for m in SAMPLE_NHWC if any(measured(d, m) for d in g.values())]  # columns only where measured
    rows, proj = [], []
    for (batch, steps, dtype), d in g.items():
        ips = {m: d[m].get("items_per_s") if m in d else None for m in IMPLS + SAMPLE_NHWC}
        sides = [best(d, SAMPLE_PATHS[e].values()) for e in ("fast", "compiled")]
        rows.append([dtype, batch, *(num(ips[m]) for m in IMPLS), *(num(ips[m]) for m in nhwc),
                     ratio(ips["fast"], ips["eager"]), ratio(ips["fast"], ips["compiled"]),
                     *([ratio(ips.get(sides[0]), ips.get(sides[1])) + (f" ({sides[0]} / {sides[1]})" if all(sides)
                                                                        else "")] if nhwc else []),
                     ratio(ips["fast"], ips["diffusers"]), pct(mfu(d["fast"]) if "fast" in d else None)])
        for m in IMPLS + SAMPLE_NHWC:
            if m in d:
                proj.append([m, dtype, num(sample_seconds(d[m], 1000)), num(sample_seconds(d[m], 2000)),
                             num(d[m].get("fixed_s"))])
    paper = ", ".join(f"{s} s (T={t}, {dt})" for (t, dt), s in PAPER_SAMPLE_S.items())
    return ("## Sampling (image-steps/s: network + reverse step, marginal rate)\n\n" + table(
        ["dtype", "batch", "eager", "compiled", "fast", "diffusers", *nhwc, "fast/eager", "fast/compiled",
         *(["fast/compiled, best layouts"] if nhwc else []), "fast/diffusers", "MFU fast"], rows) +
        "\n\n### Projection: 5,120 images\n\n" + table(
            ["impl", "dtype", "T = 1000 (s)", "T = 2000 (s)", "fixed cost per call (s)"], proj) +
        f"\n\nThe paper's RTX 4070: {paper}.")


def kernel_section(entries) -> str:
    g = groups(entries, "groupnorm_gelu", ("variant", "shape", "dtype"))
    g.update(groups(entries, "reverse_step", ("variant", "shape", "dtype")))
    if not g:
        return ""
    rows = []
    for (variant, shape, dtype), d in g.items():
        us = {m: d[m]["seconds"] * 1e6 if m in d and d[m].get("seconds") else None for m in IMPLS[:3]}
        fast = d.get("fast", {})
        kernel = next(iter(d.values()))["workload"]
        rows.append([kernel, variant, shape.replace(" ", ""), dtype, *(num(us[m]) for m in IMPLS[:3]),
                     ratio(us["eager"], us["fast"]), ratio(us["compiled"], us["fast"]), num(fast.get("gb_per_s")),
                     pct(fast.get("roofline")), pct(d.get("compiled", {}).get("roofline"))])
    return "## Kernels (µs per call; speed-ups; fast's GB/s and share of the copy roofline)\n\n" + table(
        ["kernel", "variant", "shape", "dtype", "eager µs", "compiled µs", "fast µs", "fast/eager", "fast/compiled",
         "fast GB/s", "roofline fast", "roofline compiled"], rows)


def settings_section(entries) -> str:
    """The paths timed with GroupNorm launch settings (``path@knob=value+...``, bench.common.split_impl),
    each beside the same path on the defaults and the compiled path it would have to beat (for a
    graphed training path or a sampling engine, the compiled one's faster layout measured). The
    targets and ``auto`` read only the defaults: a setting that wins here has to become the default
    first."""
    rows = []
    for workload, fields, unit in (("train_step", ("batch", "preset", "dtype"), "images/s"),
                                   ("sampling", ("batch", "steps", "dtype"), "image-steps/s")):
        for values, d in groups(entries, workload, fields).items():
            for impl, i in d.items():
                base = impl.partition("@")[0]
                if base == impl:
                    continue
                rival = (best(d, GRAPHED_COMPILED) if base in GRAPHED else
                         best(d, SAMPLE_PATHS["compiled"].values()) if workload == "sampling" else "compiled")
                ips = i.get("items_per_s")
                rows.append([workload, values[-1], values[0], f"`{impl}`", f"{num(ips)} {unit}",
                             ratio(ips, (d.get(base) or {}).get("items_per_s")) + f" ({base})",
                             ratio(ips, (d.get(rival) or {}).get("items_per_s")) + f" ({rival})" if rival else "—"])
    if not rows:
        return ""
    return "## GroupNorm launch settings in the whole step\n\n" + table(
        ["workload", "dtype", "batch", "path@settings", "rate", "vs its defaults", "vs compiled"], rows) + \
        "\n\nThe targets and `auto` read the defaults only: a setting that wins here becomes the default first."


# The headline sizes of bench.common.SIZES["gpu"]: a target is read at these, not at a batch sweep's.
HEADLINE_BATCH = {"train_step": 256, "sampling": 2560}
GN_TARGET_SHAPES = ([256, 64, 32, 32], [256, 128, 16, 16])


def headline(info: list[dict], workload: str, dtype: str, impl: str) -> dict | None:
    """The result of ``impl`` at the bench's headline batch: never a batch sweep's point."""
    return next((i for i in info if i["workload"] == workload and i["dtype"] == dtype and i["impl"] == impl
                 and i.get("batch") == HEADLINE_BATCH[workload]), None)


def verdict(ok: bool) -> str:
    return "met" if ok else "not met"


def targets_section(entries) -> str:
    """Issue 11's targets (one GPU, bf16 unless said), read from the results; not asserted anywhere."""
    if not entries or entries[0]["extra_info"].get("device_type") != "cuda":
        return "## Targets\n\nThe targets are for an H100/H200; this run is not on a GPU: not assessed."
    info = [e["extra_info"] for e in entries]

    def speedup(workload, dtype):
        fast, compiled = headline(info, workload, dtype, "fast"), headline(info, workload, dtype, "compiled")
        if fast and compiled and fast.get("items_per_s") and compiled.get("items_per_s"):
            return fast["items_per_s"] / compiled["items_per_s"]
        return None

    lines = []
    b = HEADLINE_BATCH["train_step"]
    r, fast = speedup("train_step", "bf16"), headline(info, "train_step", "bf16", "fast")
    if r is not None:
        lines.append(f"- training, bf16, batch {b}: fast ≥ 1.5× compiled: **{r:.2f}×** — {verdict(r >= 1.5)}")
    graphed = {m: headline(info, "train_step", "bf16", m) for m in ("compiled", *GRAPHED)}
    fg_name, cg_name = best(graphed, GRAPHED_FAST), best(graphed, GRAPHED_COMPILED)
    fg_best, cg_best, cg_nchw, c = (graphed[m]["items_per_s"] if m and graphed[m] and graphed[m].get("items_per_s")
                                    else None for m in (fg_name, cg_name, "compiled-graphs", "compiled"))
    if cg_nchw and c:  # what CUDA graphs alone give torch.compile's path: not a kernel's merit
        lines.append(f"- training, bf16, batch {b}: compiled-graphs / compiled **{cg_nchw / c:.2f}×** "
                     f"(CUDA graphs alone)")
    if fg_best and cg_best:  # the kernels' target, CUDA graphs on both sides, each side in its best layout
        r = fg_best / cg_best
        # a side measured in one layout only bounds its best: "met" needs compiled's every layout,
        # "not met" ours
        lacking = [m for m in (GRAPHED_COMPILED if r >= 1.5 else GRAPHED_FAST) if not measured(graphed, m)]
        lines.append(f"- training, bf16, batch {b}, CUDA graphs on both: {fg_name} ≥ 1.5× {cg_name}: "
                     f"**{r:.2f}×** — {'not assessed' if lacking else verdict(r >= 1.5)} (each side's best "
                     f"layout{unmeasured(graphed)})")
    for name, i in (("fast", fast), (fg_name, graphed.get(fg_name))):
        if i and mfu(i) is not None:
            lines.append(f"- training, bf16, batch {b}: {name} ≥ 25% of the bf16 matmul peak: "
                         f"**{pct(mfu(i))}** — {verdict(mfu(i) >= 0.25)}")
    engines = {}  # dtype -> ({bench path: result} of the sampling engines, fast's best path, compiled's best)
    for d in DTYPES:
        got = {m: headline(info, "sampling", d, m) for layouts in SAMPLE_PATHS.values() for m in layouts.values()}
        engines[d] = got, best(got, SAMPLE_PATHS["fast"].values()), best(got, SAMPLE_PATHS["compiled"].values())
    any_nhwc = any(measured(got, m) for got, _, _ in engines.values() for m in SAMPLE_NHWC)  # else NCHW alone
    sampled, fast_best, _ = engines["bf16"]
    s = sampled[fast_best] if fast_best else None
    if s and s.get("items_per_s"):
        secs = sample_seconds(s, 1000)
        floor = ""
        if s.get("flops") and s.get("items") and s.get("peak_bf16_tflops"):  # what stands in the way: arithmetic
            flop_s = s["flops"] / s["items"] * N_IMAGES * 1000 / (s["peak_bf16_tflops"] * 1e12)
            floor = (f" (the network's FLOPs alone take {flop_s:.1f} s at the measured bf16 peak: 30 s needs "
                     f"{pct(flop_s / 30)} of it sustained over the whole chain; measured {pct(mfu(s))})")
        # once a layout was measured, "not met" needs the fast engine's every layout
        missing = [m for m in SAMPLE_PATHS["fast"].values() if any_nhwc and secs > 30 and not measured(sampled, m)]
        said = f"not assessed ({', '.join(missing)} not measured)" if missing else verdict(secs <= 30)
        lines.append(f"- sampling 5,120 images at T = 1000 (bf16 {fast_best}) in ≤ 30 s: **{secs:.1f} s** — "
                     f"{said}{floor}")
    sp = {}  # dtype -> (fast side / compiled side, "(fast-nhwc / compiled)", the layouts its verdict lacks)
    for d in DTYPES:
        sampled, f, c = engines[d]
        if f and c:
            r = sampled[f]["items_per_s"] / sampled[c]["items_per_s"]
            # once a layout was measured: "met" needs compiled's every layout, "not met" ours
            side = SAMPLE_PATHS["compiled" if r >= 1.3 else "fast"].values()
            sp[d] = r, f" ({f} / {c})" if any_nhwc else "", [m for m in side if any_nhwc and not measured(sampled, m)]
    if sp:
        lacking = sorted({m for _, _, missing in sp.values() for m in missing})
        lines.append("- sampling: fast ≥ 1.3× compiled in every dtype" +
                     (", each side's best layout" if any_nhwc else "") + ": " +
                     ", ".join(f"{d} **{v:.2f}×**{names}" for d, (v, names, _) in sp.items()) + " — " +
                     ("not met" if any(v < 1.3 and not missing for v, _, missing in sp.values()) else
                      f"not assessed ({', '.join(lacking)} not measured)" if lacking else
                      "met" if len(sp) == len(DTYPES) else
                      f"not assessed (measured in {len(sp)} of {len(DTYPES)} dtypes)"))
    gn = {str(i.get("shape")): i for i in info if i["workload"] == "groupnorm_gelu" and i.get("variant") == "fwd+bwd"
          and i["dtype"] == "bf16" and i["impl"] == "fast" and i.get("roofline") is not None}
    got = [(shape, gn.get(str(shape))) for shape in GN_TARGET_SHAPES]
    if any(i for _, i in got):
        lines.append("- GroupNorm+GELU fwd+bwd (bf16) ≥ 70% of the copy bandwidth: " + ", ".join(
            f"{'×'.join(map(str, shape))} **{pct(i['roofline']) if i else 'not measured'}**" for shape, i in got) +
            " — " + ("not met" if any(i and i["roofline"] < 0.7 for _, i in got) else "met" if all(i for _, i in got)
                     else "not assessed (a shape not measured)"))
    return "## Targets (issue 11; read from this JSON)\n\n" + ("\n".join(lines) or "No result for a target.")


# Two paths within this fraction of each other tie; a tie goes to the preferred one: for sampling the
# fast engine (its noise does not depend on the batch size, one CUDA graph), for training the torch
# path (no Triton needed).
TIE = 0.02
TIE_PREFERENCE = {"sampling": "fast", "train_step": "torch"}


# Training's compiled paths per compile mode: GroupNorm path -> layout -> its bench path.
TRAIN_PATHS = {"default": {"triton": {"nchw": "fast"}, "torch": {"nchw": "compiled"}},
               "reduce-overhead": {"triton": dict(zip(("nchw", "nhwc"), GRAPHED_FAST)),
                                   "torch": dict(zip(("nchw", "nhwc"), GRAPHED_COMPILED))}}


def auto_choices(entries) -> dict:
    """What ``auto`` should choose on the card of ``entries`` (fastddpm.measured.Measured's fields but
    ``source``): per dtype, the faster of two paths measured side by side at the headline batch,
    within ``TIE`` the preferred one, each side at the figure of the layout it would run in (NHWC
    only where it beat that side's NCHW beyond a tie, or ran alone). Sampling: engine fast or
    compiled (``SAMPLE_PATHS``). Training, compiled, per compile mode: GroupNorm path "triton" (our
    kernels) or "torch" (default: fast vs compiled, NCHW; reduce-overhead: fast-graphs(-nhwc) vs
    compiled-graphs(-nhwc)). A dtype or mode missing a side has no entry."""
    info = [e["extra_info"] for e in entries]

    def faster(a, b, names, preference):  # names[0] if rate a wins beyond a tie, names[1] if b does
        return preference if abs(a / b - 1) < TIE else names[0] if a > b else names[1]

    def chosen(workload, dtype, sides, preference):
        """(the winning side of ``sides`` ({side: {layout: bench path}}), the layout it would run in) or None."""
        runs = {}  # side -> (the layout it would run in, its rate there)
        for side, impls in sides.items():
            r = {layout: v for layout, impl in impls.items()
                 if (v := (headline(info, workload, dtype, impl) or {}).get("items_per_s"))}
            if r:
                layout = faster(r["nhwc"], r["nchw"], ("nhwc", "nchw"), "nchw") if len(r) == 2 else next(iter(r))
                runs[side] = layout, r[layout]
        if len(runs) < 2:
            return None
        side = faster(*(runs[k][1] for k in sides), tuple(sides), preference)
        return side, runs[side][0]

    got = {"sample_engine": {}, "train_kernels": {}, "train_layout": {}, "sample_layout": {}}
    for d in DTYPES:
        if c := chosen("sampling", d, SAMPLE_PATHS, TIE_PREFERENCE["sampling"]):
            got["sample_engine"][d], got["sample_layout"][d] = c
    for mode, sides in TRAIN_PATHS.items():
        for d in DTYPES:
            if c := chosen("train_step", d, sides, TIE_PREFERENCE["train_step"]):
                got["train_kernels"].setdefault(mode, {})[d], got["train_layout"].setdefault(mode, {})[d] = c
    return got


def auto_section(entries, source: str | None) -> str:
    """The fastddpm.measured entry this results file supports, and whether the code has it."""
    if not entries or entries[0]["extra_info"].get("device_type") != "cuda":
        return ""
    from fastddpm.measured import MEASURED, card_slug

    card = card_slug(entries[0]["extra_info"].get("device", {}).get("name") or "") or "unnamed-card"
    got = auto_choices(entries)
    if not got["sample_engine"] and not got["train_kernels"]:
        return ""
    fields = ", ".join(f"{k}={json.dumps(v)}" for k, v in got.items() if v or k == "sample_engine")
    entry = f'Measured(source="{source or "bench/results/<this file>.json"}", {fields}),'
    have = MEASURED.get(card, ())
    same = any(e.source == source and all(getattr(e, k) == v for k, v in got.items()) for e in have)
    if same:
        status, paste = "`fastddpm/measured.py` has this entry", entry
    elif have:
        status = (f"`fastddpm/measured.py` has other entries for {card}, from {', '.join(e.source for e in have)}: "
                  f"put this one first in its tuple (newest first)")
        paste = entry
    else:
        status = f"`fastddpm/measured.py` has no entry for {card}: it falls back to another card's; add it whole"
        paste = f'"{card}": (  # newest first\n    {entry}\n),'
    return (f"## What `auto` chooses on this card\n\nThe faster path per dtype, measured side by side here; "
            f"{status}.\n\n```\n{paste}\n```")


def render(entries, header=None, source: str | None = None) -> str:
    if not entries:
        return "# fastddpm benchmarks\n\nNo results.\n"
    parts = [header_text(entries, header or {}), train_section(entries), sample_section(entries),
             settings_section(entries), kernel_section(entries), targets_section(entries),
             auto_section(entries, source)]
    guards = [e["extra_info"] for e in entries if e["extra_info"].get("guard", {}).get("metric") not in
              (None, "reference")]
    parts.append(f"Every non-eager figure passed its guard against eager ({len(guards)} checks; each result's "
                 "`extra_info.guard` holds the measured disagreement and its tolerance).")
    return "\n\n".join(p for p in parts if p) + "\n"


def record(entries: list[dict], commands: list[str], when: str | None) -> dict:
    """What a results file must say at the top: the card, the date, the commit measured and the
    commands. The commit comes from the results (FASTDDPM_GIT_COMMIT on a machine whose copy of
    the tree has no usable .git), not from pytest-benchmark's own look at the checkout."""
    infos = [e["extra_info"] for e in entries]
    ids = sorted({(i.get("git") or {}).get("id") for i in infos} - {None})
    cards = sorted({(i.get("device") or {}).get("name") for i in infos} - {None})
    out = {"card": ", ".join(cards) or None, "date": (when or "")[:10] or None, "commands": commands}
    if ids:
        out["commit_info"] = {"id": ids[0] if len(ids) == 1 else ids, "source": "the results' extra_info.git"}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="pytest-benchmark / bench.run JSON, or JSON lines; or "
                   "bench.profile_step / bench.tune_groupnorm / bench.static_cost JSON files (their tables)")
    p.add_argument("--merge", help="also write the merged results as one JSON here")
    p.add_argument("--command", action="append", default=[],
                   help="the command that produced the results (repeat for several runs): kept in the merged JSON")
    a = p.parse_args(argv)
    existing = [r for r in a.results if Path(r).is_file()]
    if not existing:
        sys.stderr.write(f"error: none of {', '.join(a.results)} exists\n")
        return 2
    try:
        parsed = [(path, *parse(path)) for path in existing]
    except NotResults as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    tools = [(path, doc) for path, kind, doc in parsed if kind == "tool"]
    if tools and (a.merge or len(tools) < len(parsed)):
        sys.stderr.write(f"error: {tools[0][0]} is a {tools[0][1]['tool']} file: give it alone or with other "
                         f"such files (no --merge, no benchmark results beside it)\n")
        return 2
    if tools:
        sys.stdout.write("\n".join(render_tool(doc, path) for path, doc in tools))
        return 0
    entries, header = load(existing, [(kind, doc) for _, kind, doc in parsed])
    if a.merge:
        from bench.common import results_json, write_json  # imports torch (as does the "auto" section)

        doc = {**results_json(entries), **{k: v for k, v in header.items() if k != "benchmarks"}}
        commands = a.command or header.get("commands", [])
        write_json(a.merge, {**doc, **record(entries, commands, str(doc.get("datetime") or ""))})
    # The file an entry of fastddpm.measured would cite: a merged JSON is committed as bench/results/<its name>.
    source = f"bench/results/{Path(a.merge).name}" if a.merge else existing[0] if len(existing) == 1 else None
    if source and not a.merge:
        path, root = Path(source).resolve(), Path(__file__).resolve().parent.parent
        source = str(path.relative_to(root)) if path.is_relative_to(root) else source
    sys.stdout.write(render(entries, header, source))
    return 0


if __name__ == "__main__":
    sys.exit(main())
