"""What ``auto`` runs on a GPU, per kind of card, and the results file each choice rests on (and on the
CPU, the eager engine's sampling layout per kind of CPU: ``CPU_SAMPLE_LAYOUT``).
An entry (``Measured``) is what ``bench.report.auto_choices`` derives from one bench results file
(``bench/results/<date>-<card>.json``): per dtype, the path with the higher rate there (images/s of
a training step, image-steps/s of sampling), every figure having passed its guard against eager
first; within 2 % (a tie) the preferred path of ``bench.report.TIE_PREFERENCE``. A compiled
training step's GroupNorm path is chosen with each side in its faster measured layout, and that
layout is the training's ``--channels-last`` default (``layout_choice``): on the H200 of 2026-11-28, in
bf16, under CUDA graphs, the Triton kernels' step in NHWC (23,974 images/s against 18,795 for
Inductor's in NCHW, one call). Sampling's engine is chosen the same way, each engine in its faster
measured layout, and that layout is ``sample``'s ``channels_last`` default (``sample_layout_choice``).
``python -m bench.report FILE`` prints the entry for a new file (section "What auto chooses"), and
``tests/test_measured.py`` checks every entry against its file, so the table cannot drift from the
measurements. A card keeps its entries newest first: a GPU call measures a few dtypes and modes, and
what the newest lacks comes from the card's earlier entries (figures are compared within one file
only, never across two). Whatever the card's entries lack (the card, a dtype, a compile mode) comes
from the next measurement that has it, and ``choice``'s reason says which: the card's default compile
mode, then ``FALLBACK``, the card measured in every dtype. A layout is never borrowed: unmeasured is
NCHW.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Measured:
    source: str  # the results file, relative to the repository root
    # sampling (batch 2,560): dtype -> "fast" or "compiled", the faster of the two there, each in its
    # faster measured layout
    sample_engine: dict[str, str]
    # a compiled training step (batch 256): --compile-mode -> dtype -> "triton" or "torch", the
    # GroupNorm path whose step was faster in that mode, each in its faster measured layout
    # ("default": bench paths compiled vs fast; "reduce-overhead": compiled-graphs(-nhwc) vs fast-graphs(-nhwc))
    train_kernels: dict[str, dict[str, str]] = field(default_factory=dict)
    # --compile-mode -> dtype -> "nhwc" or "nchw": the layout whose figure chose that path (its faster one
    # where it ran in both, NCHW on a tie)
    train_layout: dict[str, dict[str, str]] = field(default_factory=dict)
    # sampling: dtype -> "nhwc" or "nchw", the layout whose figure chose that engine (as train_layout)
    sample_layout: dict[str, str] = field(default_factory=dict)


MEASURED: dict[str, tuple[Measured, ...]] = {  # card -> its entries, newest first
    "h200": (
        Measured(  # bf16; sampling in both layouts of each engine, training under CUDA graphs (reduce-overhead)
            # with Inductor's step in NCHW and ours in NHWC only
            source="bench/results/2026-11-28-h200.json",
            sample_engine={"bf16": "fast"},
            train_kernels={"reduce-overhead": {"bf16": "triton"}},
            train_layout={"reduce-overhead": {"bf16": "nhwc"}},
            sample_layout={"bf16": "nchw"},
        ),
        Measured(  # every dtype, the default compile mode, NCHW
            source="bench/results/2026-11-26-h200.json",
            sample_engine={"fp32": "compiled", "fp16": "compiled", "bf16": "fast"},
            train_kernels={"default": {"fp32": "torch", "fp16": "torch", "bf16": "torch"}},
            train_layout={"default": {"fp32": "nchw", "fp16": "nchw", "bf16": "nchw"}},
            sample_layout={"fp32": "nchw", "fp16": "nchw", "bf16": "nchw"},
        ),
    ),
    "h100-80gb-hbm3": (
        Measured(
            source="bench/results/2026-11-27-h100-80gb-hbm3-f2564d9.json",
            sample_engine={"fp32": "fast", "fp16": "fast", "bf16": "fast"},
            train_kernels={"reduce-overhead": {"bf16": "triton"}},
            train_layout={"reduce-overhead": {"bf16": "nhwc"}},
            sample_layout={"fp32": "nchw", "fp16": "nchw", "bf16": "nchw"},
        ),
    ),
}
FALLBACK = "h200"

# On the CPU, the eager engine's sampling layout (what a CPU samples with), per torch's vector
# capability (torch.backends.cpu.get_cpu_capability()): capability -> (the results file of
# bench.cpu_dtypes, dtype -> the layout of its faster network forward at batch 256). Unmeasured is NCHW.
CPU_SAMPLE_LAYOUT = {
    "AVX2": ("bench/results/2026-11-28-cpu-dtypes-layouts.json", {"fp32": "nhwc", "bf16": "nhwc"}),
}


def card_slug(name: str) -> str:
    """A card's name as results files spell it: 'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-")


def choice(card: str, dtype: str, mode: str | None = None) -> tuple[str, str]:
    """(what auto runs, why) on ``card`` in ``dtype``: the sampling engine, or with ``mode`` (a
    --compile-mode) the GroupNorm path of a compiled training step."""
    def lookup(entry: Measured, m: str | None):
        return entry.sample_engine.get(dtype) if m is None else entry.train_kernels.get(m, {}).get(dtype)

    modes = [mode] if mode in (None, "default") else [mode, "default"]
    for name in dict.fromkeys([card, FALLBACK]):  # this card first, then the fallback card
        for m in modes:  # the mode asked for in any of the card's entries before another mode
            entry = _deciding(name, lambda e: lookup(e, m))
            if entry:
                lacking = f"{card or 'this card'} not measured"
                if MEASURED.get(card):  # measured, but not in this dtype (or not in this compile mode)
                    lacking += f" in {dtype}" + (f" under --compile-mode {mode}" if mode else "")
                where = "measured fastest on this card" if name == card else f"{lacking}: the {name}'s choice"
                if m != mode:
                    where += f", in the default compile mode ({mode} not measured in {dtype})"
                return lookup(entry, m), f"{where} ({entry.source})"
    raise LookupError(f"fastddpm.measured: {FALLBACK!r} has no {dtype} entry")  # a test keeps it complete


def _deciding(card: str, pick) -> Measured | None:
    """The newest of ``card``'s entries for which ``pick(entry)`` has an answer."""
    return next((entry for entry in MEASURED.get(card, ()) if pick(entry)), None)


def _measured_layout(card: str, entry: Measured | None, chosen: str | None, layout: str | None, path: str,
                     kind: str, where: str) -> tuple[bool, str]:
    """(channels_last, why): ``layout`` where ``chosen`` (what ``card``'s ``entry`` chose ``where``)
    is ``path`` (a ``kind``: "path" or "engine"); else NCHW. A layout is never borrowed from another
    card, path, dtype, mode or entry."""
    if entry and chosen == path and layout:
        return layout == "nhwc", (f"{layout.upper()}, the layout the {path} {kind} was measured and chosen in "
                                  f"({entry.source})")
    return False, f"NCHW: no measured layout for the {path} {kind} on {card or 'this card'} {where}"


def layout_choice(card: str, dtype: str, mode: str, kernels: str) -> tuple[bool, str]:
    """(channels_last, why) for a compiled training step on ``card`` with GroupNorm path ``kernels``:
    the layout whose figure chose that path on this card, in this dtype and compile mode; NCHW where
    this card's measurement did not choose it."""
    entry = _deciding(card, lambda e: e.train_kernels.get(mode, {}).get(dtype))
    return _measured_layout(card, entry, entry and entry.train_kernels[mode][dtype],
                            entry and entry.train_layout.get(mode, {}).get(dtype), kernels, "path",
                            f"in {dtype} under --compile-mode {mode}")


def sample_layout_choice(card: str, dtype: str, engine: str) -> tuple[bool, str]:
    """(channels_last, why) for sampling on ``card`` with ``engine``: the layout whose figure chose
    that engine on this card in this dtype; NCHW where this card's measurement did not choose it."""
    entry = _deciding(card, lambda e: e.sample_engine.get(dtype))
    return _measured_layout(card, entry, entry and entry.sample_engine[dtype], entry and entry.sample_layout.get(dtype),
                            engine, "engine", f"in {dtype}")


def cpu_sample_layout_choice(capability: str, dtype: str, engine: str) -> tuple[bool, str]:
    """(channels_last, why) for sampling on a CPU of ``capability`` with ``engine``: the layout of the
    faster forward there in this dtype (``CPU_SAMPLE_LAYOUT``); NCHW where that was not measured."""
    source, layouts = CPU_SAMPLE_LAYOUT.get(capability, (None, {}))
    layout = layouts.get(dtype) if engine == "eager" else None
    if layout:
        return layout == "nhwc", f"{layout.upper()}, measured faster on a CPU of this kind ({capability}) ({source})"
    return False, f"NCHW: no measured layout for the {engine} engine in {dtype} on a CPU of this kind ({capability})"


def _card(device) -> str:
    import torch

    return card_slug(torch.cuda.get_device_name(device))


def choice_for(device, dtype: str, mode: str | None = None) -> tuple[str, str]:
    """``choice`` for a CUDA device."""
    return choice(_card(device), dtype, mode)


def layout_choice_for(device, dtype: str, mode: str, kernels: str) -> tuple[bool, str]:
    """``layout_choice`` for a CUDA device."""
    return layout_choice(_card(device), dtype, mode, kernels)


def sample_layout_choice_for(device, dtype: str, engine: str) -> tuple[bool, str]:
    """``sample_layout_choice`` for a CUDA device."""
    return sample_layout_choice(_card(device), dtype, engine)
