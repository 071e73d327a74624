"""How Ctrl-C (SIGINT) and SIGTERM stop work: each raises an exception in the run (KeyboardInterrupt, `Terminated`),
so the code on the way out keeps what is finished; work that must not stop halfway holds them until it ends.

Python runs signal handlers in the main thread only, so off it every context here does nothing.
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

HELD = (signal.SIGINT, signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised inside a run as Ctrl-C is: the same code then keeps the finished work (the δs of the edit in
    progress among it, which a kill would lose) and says how to resume."""


def _off_the_main_thread() -> bool:
    return threading.current_thread() is not threading.main_thread()


@contextmanager
def sigterm_stops_the_run() -> Iterator[None]:
    """SIGTERM raises `Terminated` inside the block, where it would kill the process: a SLURM job's time limit sends
    it, and the job's log then ends with what is kept and how to resume. A handler already set is left alone
    (submitit's jobs log SIGTERM and go on, and requeue on a signal of their own)."""
    if _off_the_main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def stop(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextmanager
def further_interrupts_ignored() -> Iterator[None]:
    """SIGINT and SIGTERM ignored while a stopped process saves its work (a statistics pass's sums) or says what it
    keeps: a second Ctrl-C, or `timeout -s INT`, which signals the process and then its whole group, would cut that
    short, and a SIGTERM (SLURM's at a time limit, after a Ctrl-C) would kill it before its line. The handlers before
    are back afterwards."""
    if _off_the_main_thread():
        yield
        return
    before = {signum: signal.signal(signum, signal.SIG_IGN) for signum in HELD}
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Ctrl-C or SIGTERM arriving inside the block is held, and delivered to the handler it had once the block ends
    (or raises), so the block finishes its work first: a statistics pass's batch is then in every layer's sums or in
    none, and the sums can be kept. A signal whose handler was not set from Python is left alone."""
    if _off_the_main_thread():
        yield
        return
    held: list[int] = []
    before = {signum: signal.getsignal(signum) for signum in HELD}
    deferred = [signum for signum, handler in before.items() if handler is not None]
    for signum in deferred:
        signal.signal(signum, lambda received, frame: held.append(received))
    try:
        yield
    finally:
        for signum in deferred:
            signal.signal(signum, before[signum])
        for signum in dict.fromkeys(held):
            signal.raise_signal(signum)
