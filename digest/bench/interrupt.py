"""A benchmark stopped by SIGINT (Ctrl-C) or SIGTERM: its children ended, its folder removed.

A benchmark builds a temporary state folder and starts helper processes (an SMTP sink,
the dispatch or a config load in a fresh interpreter, daemons, Dovecot). Stopped by a
signal, it must not leave them behind nor print a traceback per process: ``stoppable``
turns the first SIGINT or SIGTERM into ``BenchInterrupted``, raised in the main thread,
after ending the ``multiprocessing`` children, so every ``with`` block on the way out
(temporary folders, sinks, servers) cleans up as on an error. The CLI then prints one
line and exits 128 + the signal's number (130, 143); a phase that runs an event loop in
this process runs it with ``run_stoppable``, which turns the signal into a cancellation
of the loop's work, then the same ``BenchInterrupted``. The helper processes are started
with ``start_helper`` and call ``ignore_sigint`` first: a Ctrl-C reaches the terminal's
whole process group, and only the benchmark's own process decides what happens then.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import signal
from collections.abc import Callable, Coroutine, Iterator
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any, TypeVar

T = TypeVar("T")

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
        if _stop_loop is not None:  # an event loop runs (``run_stoppable``): it ends itself
            _stop_loop(signum)
            return
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


# Set while ``run_stoppable``'s event loop runs: stops it from a signal handler.
_stop_loop: Callable[[int], None] | None = None


def run_stoppable(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` for a benchmark phase, stopped cleanly by ``stoppable``'s signal.

    An exception raised by a signal handler inside an event loop does not reach the
    caller: asyncio logs it from a callback (a traceback) and goes on, or it ends one
    task among several. Here the first SIGINT or SIGTERM (after ``stoppable`` ended the
    helper processes) cancels ``main`` instead, and ``BenchInterrupted`` is raised once
    the loop is closed, whatever ``main`` ended with (its connections to an ended helper
    fail meanwhile). Call from the main thread, inside ``stoppable``.
    """
    global _stop_loop
    stopped: list[int] = []

    async def guarded() -> T:
        global _stop_loop
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()

        def stop(signum: int) -> None:
            stopped.append(signum)
            if task is not None:
                loop.call_soon_threadsafe(task.cancel)

        _stop_loop = stop
        try:
            return await main
        finally:
            _stop_loop = None

    try:
        result = asyncio.run(guarded())
    except BaseException:
        if stopped:
            raise BenchInterrupted(stopped[0]) from None
        raise
    finally:
        _stop_loop = None
    if stopped:
        raise BenchInterrupted(stopped[0])
    return result


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
