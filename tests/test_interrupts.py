"""Ctrl-C and SIGTERM held while work that must not stop halfway finishes, then delivered as they would have been."""
from __future__ import annotations

import os
import signal
import threading

import pytest

from sadr.interrupts import further_interrupts_ignored, interrupts_deferred


@pytest.fixture
def handlers():
    """SIGTERM recorded, for the test's duration (SIGINT raises KeyboardInterrupt in every test: conftest.py)."""
    received: list[int] = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    yield received
    signal.signal(signal.SIGTERM, before)


def test_ctrl_c_inside_the_block_comes_when_the_block_has_finished(handlers):
    finished = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # pressed twice: one interrupt
            finished.append(True)
    assert finished == [True]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigterm_reaches_its_own_handler_once_after_the_block(handlers):
    recorder = signal.getsignal(signal.SIGTERM)
    with interrupts_deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        assert handlers == []
    assert handlers == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) is recorder


def test_a_block_that_raises_still_restores_and_delivers(handlers):
    with pytest.raises(KeyboardInterrupt) as stopped:
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            raise RuntimeError("a bug")
    assert isinstance(stopped.value.__context__, RuntimeError)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigterm_sent_twice_inside_the_block_reaches_its_handler_once(handlers):
    with interrupts_deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
    assert handlers == [signal.SIGTERM]


def test_a_handler_not_set_from_python_is_left_alone(handlers, monkeypatch):
    """`signal.getsignal` gives None for a handler set outside Python (inherited at startup, say), which could not be
    set back: that signal is not held."""
    recorder, getsignal = signal.getsignal(signal.SIGTERM), signal.getsignal
    monkeypatch.setattr(signal, "getsignal", lambda signum: None if signum == signal.SIGTERM else getsignal(signum))
    with interrupts_deferred():
        assert getsignal(signal.SIGTERM) is recorder and getsignal(signal.SIGINT) is not signal.default_int_handler
    assert getsignal(signal.SIGINT) is signal.default_int_handler


def test_off_the_main_thread_nothing_changes(handlers):
    """Only the main thread may set handlers: elsewhere each context would raise."""
    seen = []

    def work():
        for context in (interrupts_deferred, further_interrupts_ignored):
            with context():
                seen.append(signal.getsignal(signal.SIGINT))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert seen == [signal.default_int_handler] * 2
