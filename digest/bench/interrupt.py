"""A benchmark stopped by SIGINT (Ctrl-C) or SIGTERM: its children ended, its folder removed.

A benchmark builds a temporary state folder and starts helper processes (an SMTP sink,
the dispatch or a config load in a fresh interpreter, daemons, Dovecot). Stopped by a
signal, it must not leave them behind nor print a traceback per process: ``stoppable``
turns the first SIGINT or SIGTERM into ``BenchInterrupted``, raised in the main thread,
after ending the ``multiprocessing`` children, so every ``with`` block on the way out
(temporary folders, sinks, servers) cleans up as on an error. The CLI then prints one
line and exits 128 + the signal's number (130, 143). The helper processes are started
with ``start_helper`` and call ``ignore_sigint`` first: a Ctrl-C reaches the terminal's
whole process group, and only the benchmark's own process decides what happens then.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
from collections.abc import Iterator
from multiprocessing.process import BaseProcess
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# How long each child process may take to end on SIGTERM before it is killed (seconds).
CHILD_STOP_SECONDS = 5.0


class BenchInterrupted(BaseException):
    """The benchmark was stopped by ``signum``.

    A ``BaseException``, as ``KeyboardInterrupt`` is: an ``except Exception`` on the
    way out (a unit's containment) does not swallow it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a process a signal ended."""
        return 128 + self.signum


def end_children() -> None:
    """SIGTERM every live ``multiprocessing`` child, then SIGKILL what did not end."""
    children = multiprocessing.active_children()
    for child in children:
        with contextlib.suppress(OSError):
            child.terminate()
    for child in children:
        child.join(CHILD_STOP_SECONDS)
        if child.is_alive():
            with contextlib.suppress(OSError):
                child.kill()
            child.join(CHILD_STOP_SECONDS)


@contextlib.contextmanager
def stoppable() -> Iterator[None]:
    """Within it, the first SIGINT or SIGTERM raises ``BenchInterrupted`` in the main thread.

    Later signals are ignored while the benchmark cleans up. A signal the
    process was started ignoring stays ignored. The previous handlers are put
    back on the way out. Call from the main thread only (Python's signal rule).
    """
    def interrupted(signum: int, frame: FrameType | None) -> None:
        for each in STOP_SIGNALS:  # the cleanup is not interrupted in its turn
            signal.signal(each, signal.SIG_IGN)
        end_children()
        raise BenchInterrupted(signum)

    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    for signum, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(signum, interrupted)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            if handler is not None:  # None: a handler not set from Python, left alone
                signal.signal(signum, handler)


def start_helper(process: BaseProcess) -> None:
    """Start a benchmark's helper process with SIGINT blocked in it from its first instruction.

    The signal mask is inherited through fork and exec, so a Ctrl-C reaches
    only the benchmark's own process (which ends the helper), even one that
    comes while the helper's interpreter is still starting (the helper then
    calls ``ignore_sigint``: a mask is per thread, a disposition per process).
    This process's mask is put back at once: a SIGINT meanwhile is delivered
    then, not lost.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        process.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def ignore_sigint() -> None:
    """In a benchmark's helper process, first thing: ignore SIGINT in every thread."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
