"""``python -m fastddpm.sample``: the sampling command. The code is in ``fastddpm.sampling``.

The package's public function ``fastddpm.sample`` is ``fastddpm.sampling.sample``; this module only
gives the command its name, and importing it never rebinds that function (see fastddpm/__init__.py).
"""
import sys

from fastddpm.errors import run_cli
from fastddpm.sampling import main, sample  # noqa: F401  (``from fastddpm.sampling import sample`` keeps working)

if __name__ == "__main__":
    sys.exit(run_cli(main))
