"""Progress of long work (training epochs, evaluation, decoding images, checking archives).

On a terminal it is a tqdm bar. Where standard error is not a terminal (a SLURM job's output
file, a run piped with `2>&1 | tee`), a bar's carriage returns would pile up, and tqdm's own
default is to show nothing: a job would be silent for the minutes an epoch or a cache build takes. There, work
that lasts longer than `LOG_INTERVAL_S` logs tqdm's status line (count, percentage, elapsed, time
left, rate) every `LOG_INTERVAL_S` seconds through the `aomd.progress` logger, so the line lands
in the job's log file too; shorter work logs nothing.
"""
from __future__ import annotations

import io
import logging
import re
import sys
from typing import Any, Iterable

from tqdm import tqdm

LOG_INTERVAL_S = 60.0
LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%) [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
LOG_FORMAT_UNSIZED = "{desc}: {n_fmt} {unit} [{elapsed}, {rate_fmt}{postfix}]"
_TERMINAL_CODES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # cursor moves of nested bars

log = logging.getLogger("aomd.progress")


class _StatusLines(io.TextIOBase):
    """A file for tqdm that logs each status line written to it, once (a bar closing with the
    line it showed last writes it again)."""

    def __init__(self) -> None:
        super().__init__()
        self._last = ""

    def write(self, text: str) -> int:
        for line in _TERMINAL_CODES.sub("", text).replace("\r", "\n").split("\n"):
            line = line.strip()
            if line and line != self._last:
                log.info(line)
                self._last = line
        return len(text)

    def flush(self) -> None:
        pass


def progress_bar(iterable: Iterable | None = None, *, enabled: bool = True, **options: Any) -> tqdm:
    """`tqdm(iterable, **options)`: a bar on a terminal, a log line every `LOG_INTERVAL_S`
    seconds elsewhere (none for work shorter than that), nothing when `enabled` is false."""
    if not enabled:
        return tqdm(iterable, disable=True, **options)
    if sys.stderr.isatty():
        return tqdm(iterable, **options)
    sized = options.get("total") is not None or hasattr(iterable, "__len__")
    return tqdm(iterable, file=_StatusLines(), mininterval=LOG_INTERVAL_S, maxinterval=LOG_INTERVAL_S,
                delay=LOG_INTERVAL_S, bar_format=LOG_FORMAT if sized else LOG_FORMAT_UNSIZED, **options)
