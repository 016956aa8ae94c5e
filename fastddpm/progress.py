"""One rule for every progress bar (training, sampling, data decoding, downloads, Inception): shown
when asked for, and by default only when stderr is a terminal, so that logs never collect a bar's
carriage returns."""
from __future__ import annotations

import sys


def progress_enabled(flag: bool | None) -> bool:
    """``flag`` where given (--progress / --no-progress, progress=True/False), else: is stderr a terminal?"""
    return sys.stderr.isatty() if flag is None else bool(flag)


def progress_bar(iterable=None, *, enabled: bool | None, **kwargs):
    """A tqdm bar on stderr that follows ``progress_enabled(enabled)``."""
    from tqdm import tqdm

    kwargs.setdefault("leave", False)
    return tqdm(iterable, disable=not progress_enabled(enabled), file=sys.stderr, dynamic_ncols=True, **kwargs)
