"""Errors a user can fix. Command-line entry points print them as one line and exit with 2."""
from __future__ import annotations

import argparse
import sys


class UsageError(ValueError):
    """Bad input (argument, flag, path, file): the message names the value given and what is allowed.
    A ValueError, so that Python callers of the API catch it as one."""


class DivergenceError(Exception):
    """The training loss became NaN or Inf."""


class CompiledStepError(Exception):
    """The compiled training step disagrees with the eager one (a compiler or CUDA-graph fault)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (and exit 2), not usage + error."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def run_cli(main, argv=None) -> int:
    """Run ``main(argv)``; a UsageError becomes one line on stderr and exit code 2."""
    try:
        return main(argv) or 0
    except UsageError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
