"""Work that must not stop halfway: SIGINT and SIGTERM held until it ends, then delivered."""
from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

HELD = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Ctrl-C or SIGTERM arriving inside the block is held, and delivered to the handler it had once the block ends
    (or raises), so the block finishes its work first: a statistics pass's batch is then in every layer's sums or in
    none, and the sums can be kept. Python runs signal handlers in the main thread only, so elsewhere this does
    nothing; a signal whose handler was not set from Python is left alone."""
    if threading.current_thread() is not threading.main_thread():
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
