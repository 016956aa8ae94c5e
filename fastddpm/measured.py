"""What ``auto`` runs on a GPU, per kind of card, and the results file each choice rests on.

An entry of ``MEASURED`` is what ``bench.report.auto_choices`` derives from one bench results file
(``bench/results/<date>-<card>.json``): per dtype, the path that posted the most images/s on that
card, every figure having passed its guard against eager first. ``python -m bench.report FILE``
prints the entry for a new file (its section "What auto chooses"), and ``tests/test_measured.py``
checks every entry against its file, so the table cannot drift from the measurements.
A card with no entry takes the choices of ``FALLBACK``, the one card measured so far, and says so.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Measured:
    source: str  # the results file, relative to the repository root
    # sampling (batch 2,560): dtype -> "fast" or "compiled", the faster of the two there
    sample_engine: dict[str, str]
    # a compiled training step (batch 256): --compile-mode -> dtype -> "triton" or "torch", the
    # GroupNorm path whose step was faster in that mode ("default": bench paths compiled vs fast;
    # "reduce-overhead": compiled-graphs vs fast-graphs)
    train_kernels: dict[str, dict[str, str]] = field(default_factory=dict)


MEASURED = {
    "h200": Measured(
        source="bench/results/2026-11-26-h200.json",
        sample_engine={"fp32": "compiled", "fp16": "compiled", "bf16": "fast"},
        train_kernels={"default": {"fp32": "torch", "fp16": "torch", "bf16": "torch"}},
    ),
}
FALLBACK = "h200"


def card_slug(name: str) -> str:
    """A card's name as results files spell it: 'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-")


def measured_for(device: torch.device) -> tuple[str, Measured]:
    """(why, the entry) for a CUDA device: its own card's entry, else FALLBACK's, and ``why`` says which."""
    card = card_slug(torch.cuda.get_device_name(device))
    if card in MEASURED:
        return f"measured fastest on this card ({MEASURED[card].source})", MEASURED[card]
    entry = MEASURED[FALLBACK]
    return f"{card} not measured: the {FALLBACK}'s choice ({entry.source})", entry


def dtype_name(dtype: torch.dtype) -> str:
    from fastddpm.config import DTYPES

    return next(name for name, d in DTYPES.items() if d == dtype)
