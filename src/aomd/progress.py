"""Progress of long work (training epochs, evaluation, decoding images, checking archives).

On a terminal it is a tqdm bar. Where standard error is not a terminal (a SLURM job's output
file, a run piped to `tee`), a bar's carriage returns would pile up, and tqdm's own default is to
show nothing: a job would be silent for the minutes an epoch or a cache build takes. There, work
that lasts longer than `LOG_INTERVAL_S` logs tqdm's status line (count, percentage, elapsed, time
left, rate) every `LOG_INTERVAL_S` seconds through the `aomd.progress` logger, so the line lands
in the job's log file too; shorter work logs nothing.
"""
from __future__ import annotations

import io
import logging
import sys
from typing import Any, Iterable

from tqdm import tqdm

LOG_INTERVAL_S = 60.0
LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%) [{elapsed}<{remaining}, {rate_fmt}{postfix}]"

log = logging.getLogger("aomd.progress")


class _StatusLines(io.TextIOBase):
    """A file for tqdm that logs each non-empty status line written to it."""

    def write(self, text: str) -> int:
        for line in text.replace("\r", "\n").split("\n"):
            if line.strip():
                log.info(line.strip())
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
    return tqdm(iterable, file=_StatusLines(), mininterval=LOG_INTERVAL_S, maxinterval=LOG_INTERVAL_S,
                delay=LOG_INTERVAL_S, bar_format=LOG_FORMAT if options.get("total") else None, **options)
