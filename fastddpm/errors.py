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


def flags_given(actions, args: argparse.Namespace) -> list[str]:
    """The flags among ``actions`` (argparse actions) that ``args`` holds other than their defaults: the
    ones a command line set (one given at its default value looks unset)."""
    def given(action):
        value = getattr(args, action.dest)
        # a store_const/store_true flag is set where its dest holds its constant (two may share a dest)
        return value == action.const if action.nargs == 0 else value != action.default

    return [action.option_strings[0] for action in actions if given(action)]


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
