"""Finished δs of the edit in progress, kept in the run directory, so that a run stopped while it optimises a large
batch's δs (MEMIT's 10,000 requests take hours) resumes from them instead of optimising them again.

The runner opens `resumable_deltas(folder, identity)` around an editor's `apply` of one group. Inside it, every
`optimize_delta` call (the editors' δ of one request, `delta.py`) is counted: the i-th call of a block with the same
`identity` and the same request returns the i-th result kept by an earlier block, on the model's device, and any
other call optimises. This holds for every editor whose edit is a function of its δs and the model it started from:
MEMIT, PMET and AlphaEdit optimise every δ on the same model, and ROME optimises each on the model its earlier
requests edited, which replaying their kept δs rebuilds. Results are kept as plain data (`DeltaResult.as_plain`), a
chunk file (CRC-checked, as cache entries) at most every `every_seconds` and whenever the block is left, by an error
or Ctrl-C too, so a kill loses at most that long. The runner removes the folder once the group's rows (or a
sequential run's checkpoint) are written. Each result keeps the seconds its optimisation took, which the edit's δ
seconds (`delta`; ROME's `v_star`, timed by `timed_deltas`) count for a result read back.
"""
from __future__ import annotations

import logging
import shutil
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from sadr.cache import TORCH, read_entry, write_atomically
from sadr.editors.base import timed
from sadr.interrupts import interrupts_deferred

log = logging.getLogger(__name__)

SAVE_SECONDS = 60.0
FORMAT = 2  # chunks of format 1 (2026-12-06) lack each result's seconds: they are optimised again
R = TypeVar("R")


@dataclass
class _Kept:
    folder: Path
    identity: dict
    every_seconds: float
    earlier: list[tuple[str, dict, float]]  # (request, encoded result, its seconds) of the earlier blocks, in order
    new: list[tuple[str, dict, float]] = field(default_factory=list)  # not yet written
    calls: int = 0
    chunks: int = 0
    saved: float = field(default_factory=lambda: time.monotonic())
    reused: int = 0
    seconds_read_back: float = 0.0  # what the results read back took to optimise, when they were

    def save(self) -> None:
        if self.new:
            chunk = {"format": FORMAT, "identity": self.identity, "first": self.calls - len(self.new),
                     "results": self.new}
            write_atomically(chunk, self.folder / f"{self.chunks:06d}.pt", TORCH)
            self.chunks += 1
            self.new = []
        self.saved = time.monotonic()


_ACTIVE: ContextVar[_Kept | None] = ContextVar("resumable_deltas", default=None)


def _earlier_results(folder: Path, identity: dict) -> tuple[list[tuple[str, dict, float]], int]:
    """The results kept for `identity`, in call order, and how many chunk files hold them. Files after the first
    that is another group's, damaged (read_entry warns), out of order or of another format are removed: their δs
    are optimised again."""
    files = sorted(folder.glob("*.pt")) if folder.is_dir() else []
    results: list[tuple[str, dict, float]] = []
    for index, file in enumerate(files):
        chunk = read_entry(file, TORCH)
        if (chunk is None or chunk.get("format") != FORMAT or chunk.get("identity") != identity
                or chunk.get("first") != len(results)):
            for later in files[index:]:
                later.unlink(missing_ok=True)  # read_entry may have removed a damaged one
            return results, index
        results += chunk["results"]
    return results, len(files)


@contextmanager
def resumable_deltas(folder: Path, identity: dict, every_seconds: float = SAVE_SECONDS) -> Iterator[None]:
    earlier, chunks = _earlier_results(folder, identity)
    kept = _Kept(folder, identity, every_seconds, earlier, chunks=chunks)
    token = _ACTIVE.set(kept)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
        with interrupts_deferred():  # a second Ctrl-C would cut the save short: up to a minute's δs lost
            kept.save()
        if kept.reused:
            log.info("%d δ(s) read back from %s, optimised before the run was stopped", kept.reused, folder)


def discard_deltas(folder: Path) -> None:
    """Remove the kept δs of a group whose results are written."""
    shutil.rmtree(folder, ignore_errors=True)


def kept_or_optimised(request, optimise: Callable[[], R], encode: Callable[[R], dict],
                      decode: Callable[[dict], R]) -> R:
    """Inside `resumable_deltas`, the kept result of this call if it is this request's (`decode`d), or `optimise()`,
    kept (`encode`d: tensors on the host, numbers, lists and dicts); outside, `optimise()`."""
    kept = _ACTIVE.get()
    if kept is None:
        return optimise()
    call, key = kept.calls, repr(request)  # calls: the results of this block so far
    if call < len(kept.earlier) and kept.earlier[call][0] == key:
        _, plain, seconds = kept.earlier[call]
        kept.reused += 1
        kept.calls += 1
        kept.seconds_read_back += seconds
        return decode(plain)
    if call < len(kept.earlier):  # another request than the kept one (not in a resumed run): from here on afresh
        kept.new, kept.earlier, kept.chunks = kept.earlier[:call], [], 0
        shutil.rmtree(kept.folder, ignore_errors=True)
    start = time.perf_counter()
    result = optimise()
    kept.new.append((key, encode(result), time.perf_counter() - start))
    kept.calls += 1
    if time.monotonic() - kept.saved >= kept.every_seconds:
        kept.save()
    return result


@contextmanager
def timed_deltas(seconds: dict[str, float], name: str) -> Iterator[None]:
    """`timed`, with each result read back inside counted at the seconds its optimisation took: a resumed edit's δ
    seconds are those of the edit never stopped, not only of the δs this invocation optimised."""
    kept = _ACTIVE.get()
    before = kept.seconds_read_back if kept is not None else 0.0
    with timed(seconds, name):
        yield
    if kept is not None:
        seconds[name] += kept.seconds_read_back - before
