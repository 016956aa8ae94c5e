"""fastddpm: the DDPM of Ho et al. (2020) as recreated in ../shared/seed/ddpm-recreation-paper.txt,
engineered for speed. Public API: UNet, Diffusion, sample, save_grid, load_checkpoint."""
from __future__ import annotations

import importlib.util as _ilu
import os as _os
import sys as _sys
import types as _types

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
# The public functions and where they live. Loaded on first use: `import fastddpm` stays light.
_LAZY = {"Diffusion": "fastddpm.diffusion", "sample": "fastddpm.sampling", "save_grid": "fastddpm.images",
         "load_checkpoint": "fastddpm.checkpoint"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastddpm' has no attribute {name!r}")


class _Package(_types.ModuleType):
    """The package keeps its public names. Importing a submodule binds it as an attribute of its
    package, and the command `python -m fastddpm.sample` needs a submodule of that name: without this,
    `import fastddpm.sample` (or any import of it) would replace the function fastddpm.sample."""

    def __setattr__(self, name, value):
        if name in __all__ and isinstance(value, _types.ModuleType):
            return
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
