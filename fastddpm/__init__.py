"""fastddpm: the DDPM of Ho et al. (2020) as recreated in ../shared/seed/ddpm-recreation-paper.txt,
engineered for speed. Public API: UNet, Diffusion, sample, save_grid, load_checkpoint."""
from __future__ import annotations

import importlib.util as _ilu
import os as _os
import sys as _sys

# kernels/ sits at the repository top (one file per fused op); setup.py installs it as
# fastddpm.kernels. From a source checkout (PYTHONPATH=.) register it under the same name.
_src_kernels = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "kernels")
if "fastddpm.kernels" not in _sys.modules and not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "kernels")) \
        and _os.path.isfile(_os.path.join(_src_kernels, "__init__.py")):
    _spec = _ilu.spec_from_file_location("fastddpm.kernels", _os.path.join(_src_kernels, "__init__.py"),
                                         submodule_search_locations=[_src_kernels])
    _mod = _ilu.module_from_spec(_spec)
    _sys.modules["fastddpm.kernels"] = _mod
    _spec.loader.exec_module(_mod)
    kernels = _mod

from fastddpm.model import UNet  # noqa: E402

__version__ = "0.1.0"
__all__ = ["UNet", "Diffusion", "sample", "save_grid", "load_checkpoint"]


def __getattr__(name):
    # Lazy: `import fastddpm` stays light (no matplotlib / PIL) until these are used.
    if name == "Diffusion":
        from fastddpm.diffusion import Diffusion
        return Diffusion
    if name == "sample":
        from fastddpm.sample import sample
        return sample
    if name == "save_grid":
        from fastddpm.images import save_grid
        return save_grid
    if name == "load_checkpoint":
        from fastddpm.checkpoint import load_checkpoint
        return load_checkpoint
    raise AttributeError(f"module 'fastddpm' has no attribute {name!r}")
