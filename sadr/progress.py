"""Progress over a run's cases (or a statistics pass's texts): a tqdm bar on an interactive terminal, a log line a
minute elsewhere.

On a terminal the bar stays at the bottom of stderr while console log lines print above it
(`logging_redirect_tqdm`); the run's log file (Hydra's `run.log`) never sees the bar. Without a
terminal (a SLURM or nohup log) the same rate and ETA go out as one INFO line at most every
`interval` seconds, so the log stays readable.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger(__name__)


class Progress(contextlib.AbstractContextManager):
    def __init__(self, total: int, enabled: bool, *, interval: float = 60.0, interactive: bool | None = None,
                 unit: str = "case", label: str = "progress", initial: int = 0):
        """`initial`: the items done before this process took over (a resumed pass's), counted as done but not in the
        rate, so the ETA is that of this process's pace."""
        self.total, self.enabled, self.interval = total, enabled and total > 0, interval
        self.unit, self.label, self.initial = unit, label, initial
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self.done, self._started, self._last_line = initial, time.monotonic(), time.monotonic()
        self._stack = contextlib.ExitStack()
        self._bar = None

    def __enter__(self) -> Progress:
        if self.enabled and self.interactive:
            self._stack.enter_context(logging_redirect_tqdm())
            self._bar = self._stack.enter_context(tqdm(total=self.total, initial=self.initial, unit=self.unit,
                                                       file=sys.stderr, dynamic_ncols=True))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def advance(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last_line >= self.interval or self.done >= self.total:
            self._last_line = now
            log.info("%s: %s", self.label, self.line())

    def line(self) -> str:
        """`30% 12/40 [01:10<02:43,  5.83s/case]`: the share and count done, elapsed, ETA and rate."""
        return tqdm.format_meter(self.done, self.total, time.monotonic() - self._started, unit=self.unit, ncols=0,
                                 initial=self.initial)
