"""Digests prepared in worker processes, on the other cores, while the loop claims and sends.

A dispatch with enough subscribers forks the workers once the corpus index is fitted,
so each inherits the fitted index copy-on-write (nothing of it is pickled). In the
child, ``setup`` runs once (the dispatch opens a read-only connection to the state
database there), then the worker answers chunks of jobs with what ``build`` returns for
each. What crosses the pipes is small: a job is a subscriber and the day of the digest,
an answer a ``Ready`` with its rendered bytes (or why there is none). Claims, sends
and marks stay in the dispatching process, so claim before send is unchanged.

Bounded: at most ``ahead`` jobs are submitted and not yet taken back by the loop, so
memory does not grow with the number of subscribers and the workers are never more than
a few claim batches ahead of the deliveries.

Affinity: each worker fills its own memos (a ranking shared by subscribers with the same
interests, a phrase's block of similarities, a paper's rendered view), so a job whose memo
another worker already filled costs that work again. Given ``affinity`` (an int per job
that is equal for jobs sharing memo keys), a job goes to the worker it names, unless that
worker has ``slack`` more jobs than the least busy one: the load stays balanced and
both cores stay fed, and most jobs still find their memos warm.

With several workers, each holds at most ``in_pipe`` jobs; the others submitted wait
here, and a worker that runs out takes the last ones queued for another: the end of a
dispatch is spread over every worker.

A worker that dies (killed, out of memory) is noticed when its result pipe ends: the
jobs it had not answered come back from ``next`` without an answer, for the caller to
prepare itself, and no more jobs go to it. A worker ends when its request pipe ends (the
dispatch is over, or the parent died), at once on SIGTERM or SIGINT (it writes nothing,
so nothing needs finishing), and ignores SIGHUP (a reload is the parent's business). A
SIGINT the process was started ignoring (``nohup``-style wrappers, ``trap '' INT``, a
service manager) stays ignored in the worker: a Ctrl-C meant for the terminal's other
jobs does not end it.
This module knows nothing of digests: ``jobs`` gives it ``setup`` and ``build``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import fcntl
import functools
import gc
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

J = TypeVar("J")
A = TypeVar("A")

# Jobs submitted and not yet taken back: two claim batches (jobs.CLAIM_BATCH = 32) keep
# the deliveries fed while the worker prepares the next ones, and hold ~3 MB of messages.
AHEAD = 64
# Jobs per message to a worker: a pipe round trip per few digests, not per digest.
CHUNK = 8
# Jobs sent to a worker and not answered yet, at most, when there are other workers: three
# chunks (~0.1 s of its work at ~3.4 ms a digest) keep it busy
# while the loop claims a batch. The rest of the ``ahead`` wait in this process, where they
# can still go to whichever worker runs out first. A lone worker gets all ``ahead``: nobody else could take them.
IN_PIPE = 3 * CHUNK
# Request pipe size asked of Linux: AHEAD jobs (about 1 KB each) always fit, so sending a
# chunk never blocks the event loop on a busy worker.
PIPE_BYTES = 1 << 20
# How long ``close`` waits for a worker to end after SIGTERM before it sends SIGKILL.
STOP_SECONDS = 5.0
# A worker holding jobs that answers nothing for this long is stuck (stopped with SIGSTOP,
# swapping, a bug): it is killed and its jobs come back to be prepared in the loop. A chunk
# takes well under a second; a worker's own refit after a scan, ~10 s at 33,000 papers.
STALL_SECONDS = 120.0
# Whether this process was started with SIGINT ignored. Read at import, before the daemon's
# event loop puts its own SIGINT handler in place (after which the inherited "ignore" can
# no longer be seen): the worker keeps an ignored SIGINT ignored.
SIGINT_IGNORED_AT_START = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
# The signals blocked across a fork, until the worker's own handlers are in place.
HELD_AT_FORK = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


@dataclass
class _Worker(Generic[J]):
    process: BaseProcess
    requests: Connection  # the parent's sending end
    results: Connection  # the parent's receiving end
    sent: dict[int, J] = field(default_factory=dict)  # key -> job, not answered yet
    pending: list[tuple[int, J]] = field(default_factory=list)  # for it, not sent yet
    alive: bool = True
    reader: threading.Thread | None = None


class PrepareWorkers(Generic[J, A]):
    """``count`` forked processes answering ``build(job)`` for jobs keyed by an int.

    ``submit(key, job)`` never blocks (check ``full`` first); ``next()`` waits
    for an answer and returns ``(key, job, answer)``, the answer None when the
    worker died before answering: the caller prepares that job itself. ``affinity``
    (an int per job) sends jobs with equal values to the same worker while
    the load allows (see the module's docstring).
    ``build`` must not raise: it returns the failure as an answer. Start and
    use it from the event loop's thread; ``close`` ends and reaps every worker.
    ``stopping()`` true means the caller is stopping (SIGTERM): a worker that
    ends then is not logged as a failure.
    """

    def __init__(self, build: Callable[[J], A], setup: Callable[[], None], *, count: int,
                 ahead: int = AHEAD, chunk: int = CHUNK, name: str = "digest-prepare",
                 stopping: Callable[[], bool] = lambda: False,
                 stall_seconds: float = STALL_SECONDS,
                 affinity: Callable[[J], int] | None = None, slack: int | None = None,
                 in_pipe: int | None = None) -> None:
        if (count < 1 or ahead < 1 or chunk < 1 or (in_pipe is not None and in_pipe < 1)
                or (slack is not None and slack < 0)):
            raise ValueError("count, ahead, chunk and in_pipe must be at least 1, slack at "
                             "least 0")
        self.build = build
        self.setup = setup
        self.count = count
        self.ahead = ahead
        self.chunk = chunk
        self.name = name
        self.stopping = stopping  # the dispatch is stopping: a worker's end is expected
        self.stall_seconds = stall_seconds  # see STALL_SECONDS
        self.affinity = affinity  # see the module's docstring
        # How many more jobs than the least busy worker the job's own worker may hold before
        # the job goes to the least busy one instead: two chunks, so that a worker never
        # waits for work while the other has a backlog of its own keys.
        self.slack = 2 * chunk if slack is None else slack
        if in_pipe is None:  # see IN_PIPE
            in_pipe = IN_PIPE if count > 1 else ahead
        self.in_pipe = in_pipe
        self._workers: list[_Worker[J]] = []
        self._ready: deque[tuple[int, J, A | None]] = deque()  # answered, not taken yet
        self._arrival = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self.died = 0  # workers that ended before ``close``

    # --- starting ---

    def start(self) -> None:
        """Fork the workers. Raises OSError when a process or pipe cannot be made."""
        self._loop = asyncio.get_running_loop()
        context = multiprocessing.get_context("fork")
        release_free_heap()
        try:
            for number in range(1, self.count + 1):
                self._workers.append(self._fork(context, number))
        except BaseException:
            self._kill_all()
            raise

    def _fork(self, context: multiprocessing.context.ForkContext, number: int) -> _Worker[J]:
        request_out, request_in = context.Pipe(duplex=False)
        result_out, result_in = context.Pipe(duplex=False)
        with contextlib.suppress(OSError, AttributeError):  # Linux only; the default 64 KB
            fcntl.fcntl(request_in.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)  # works, slower
        # The child closes every parent end it inherits (its own and earlier workers'),
        # so its pipes end when the parent's do: a dead parent ends its workers.
        inherited = [request_in, result_out]
        for earlier in self._workers:
            inherited += [earlier.requests, earlier.results]
        # A signal sent to the new worker before ``_serve`` puts its own handlers in place
        # would run the parent's inherited handler and reach the parent's event loop through
        # the inherited wakeup fd, as if sent to the daemon (a stop's SIGTERM to a worker
        # just forked read as a second SIGTERM): held back until then. ``_serve`` restores
        # the mask the parent had.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, HELD_AT_FORK)
        process = context.Process(
            target=_serve, args=(request_out, result_in, inherited, self.setup, self.build),
            kwargs={"mask": mask},
            name=f"{self.name}-{number}", daemon=not multiprocessing.current_process().daemon)
        # Frozen, the inherited objects are never scanned by the child's garbage collector,
        # which would otherwise write to (and so copy) every page of the shared index.
        gc.freeze()
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            gc.unfreeze()
            request_out.close()
            result_in.close()
        worker: _Worker[J] = _Worker(process, request_in, result_out)
        worker.reader = threading.Thread(target=self._read, args=(worker,),
                                         name=f"{self.name}-{number}-reader", daemon=True)
        worker.reader.start()
        log.debug("dispatch: prepare worker %d started (pid %s)", number, process.pid)
        return worker

    # --- the pipeline ---

    @property
    def outstanding(self) -> int:
        """Jobs submitted and not taken back yet."""
        return len(self._ready) + sum(len(w.sent) + len(w.pending) for w in self._workers)

    @property
    def full(self) -> bool:
        """``ahead`` jobs are out: take one back (``next``) before submitting another."""
        return self.outstanding >= self.ahead

    @property
    def has_answer(self) -> bool:
        """An answer is waiting: ``next`` returns at once."""
        return bool(self._ready)

    def submit(self, key: int, job: J) -> None:
        """Queue ``job`` for its worker; it goes with that worker's next chunk (at once if
        the worker has less than a chunk to do)."""
        worker = self._worker_for(job)
        if worker is None:  # every worker died: the caller prepares it itself
            self._ready.append((key, job, None))
            self._arrival.set()
            return
        worker.pending.append((key, job))
        self._top_up(worker)

    def _worker_for(self, job: J) -> _Worker[J] | None:
        """The live worker ``job`` goes to (None: all died): the least busy without an
        affinity; else the affinity's, unless it has ``slack`` more jobs than the least
        busy, or the least busy has less than a chunk to do while it has more."""
        live = [worker for worker in self._workers if worker.alive]
        if not live:
            return None
        least = min(live, key=_load)
        if self.affinity is None:
            return least
        wanted = self.affinity(job)
        own = self._workers[wanted % len(self._workers)]
        if not own.alive:
            own = live[wanted % len(live)]
        own_load, least_load = _load(own), _load(least)
        if own_load - least_load > self.slack or least_load < self.chunk <= own_load:
            return least
        return own

    def flush(self) -> None:
        """Send each worker what its pipe has room for now, even less than a chunk."""
        for worker in self._workers:
            self._top_up(worker, now=True)

    def _top_up(self, worker: _Worker[J], *, now: bool = False) -> None:
        """Send ``worker`` queued jobs, up to ``in_pipe`` unanswered: a whole chunk, or what
        there is when it has less than a chunk to do (or ``now``). A worker with nothing
        of its own queued takes the others' (the last ones queued, so that a dispatch's
        last jobs are spread over every worker)."""
        if not worker.alive:
            return
        room = self.in_pipe - len(worker.sent)
        if room <= 0:
            return
        if not worker.pending and len(worker.sent) < self.chunk:
            self._take_over(worker, room)
        if not worker.pending:
            return
        if len(worker.pending) < self.chunk and len(worker.sent) >= self.chunk and not now:
            return  # busy: the rest go with a whole chunk, or when it runs low
        chunk, worker.pending = worker.pending[:room], worker.pending[room:]
        worker.sent.update(chunk)  # before sending: if the worker dies, its end returns them
        try:
            worker.requests.send(chunk)
        except (OSError, ValueError):
            # The worker is ending: its result pipe ends too, and ``_ended`` hands back
            # everything in ``sent``, this chunk included.
            log.debug("dispatch: prepare worker %s did not take a chunk", worker.process.pid)

    def _take_over(self, worker: _Worker[J], room: int) -> None:
        """Move up to ``room`` (and a chunk at most) of the busiest other worker's queued
        jobs to ``worker``, from the end of its queue."""
        others = [w for w in self._workers if w is not worker and w.alive and w.pending]
        if not others:
            return
        busiest = max(others, key=_load)
        count = min(room, self.chunk, len(busiest.pending))
        worker.pending.extend(busiest.pending[-count:])
        del busiest.pending[-count:]

    async def next(self) -> tuple[int, J, A | None]:
        """The next answer: (key, job, answer), the answer None when its worker died.

        Raises LookupError when nothing is outstanding.
        """
        while not self._ready:
            if not self.outstanding:
                raise LookupError("no job is outstanding")
            self.flush()  # about to wait: the workers get whatever their pipes can take
            if self._ready:
                break
            self._arrival.clear()
            try:
                await asyncio.wait_for(self._arrival.wait(), self.stall_seconds)
            except TimeoutError:
                self._kill_stalled()
        return self._ready.popleft()

    def _kill_stalled(self) -> None:
        """SIGKILL the workers that hold jobs and answered nothing for ``stall_seconds``.

        Their reader threads then see the pipe end, and ``_ended`` hands their
        jobs back (answer None), as for a worker that died by itself.
        """
        for worker in self._workers:
            if worker.alive and worker.sent and worker.process.is_alive():
                log.error("dispatch: prepare worker %s answered nothing for %gs; it is "
                          "stopped and its digests are prepared in the dispatching process",
                          worker.process.pid, self.stall_seconds)
                worker.process.kill()

    # --- answers (the reader threads hand them to the loop) ---

    def _read(self, worker: _Worker[J]) -> None:
        """A worker's answers, read off the loop (a large answer never stalls it)."""
        answers: list[tuple[int, A]] | None
        while True:
            try:
                answers = worker.results.recv()
            except (EOFError, OSError):
                answers = None
            except Exception:  # an answer that cannot be read: the pipe is no use any more
                log.exception("dispatch: an answer of prepare worker %s cannot be read",
                              worker.process.pid)
                answers = None
            if answers is None:
                worker.process.join(timeout=1.0)  # its exit code, for the log
            loop = self._loop
            if loop is None or loop.is_closed():
                return
            try:
                loop.call_soon_threadsafe(self._arrived, worker, answers)
            except RuntimeError:  # the loop closed meanwhile: nobody is waiting
                return
            if answers is None:
                return

    def _arrived(self, worker: _Worker[J], answers: list[tuple[int, A]] | None) -> None:
        if answers is None:
            self._ended(worker)
        else:
            for key, answer in answers:
                job = worker.sent.pop(key)
                self._ready.append((key, job, answer))
            self._top_up(worker)
        self._arrival.set()

    def _ended(self, worker: _Worker[J]) -> None:
        """A worker's result pipe ended: what it had not answered comes back unanswered."""
        if not worker.alive:
            return
        worker.alive = False
        orphans = list(worker.sent.items())
        worker.sent.clear()
        self._ready.extend((key, job, None) for key, job in orphans)
        queued, worker.pending = worker.pending, []
        for key, job in queued:  # never sent to it: to the others (or back, if none lives)
            self.submit(key, job)
        if self._closing or self.stopping():  # SIGTERM reached the worker with the daemon
            return
        self.died += 1
        if worker.process.is_alive():  # its pipe broke while it lives on: end it
            worker.process.kill()
        # SIGTERM or SIGINT is someone's stop (systemd's reaches the daemon a moment later);
        # anything else is a crash: the OOM killer, a segfault, a kill -9.
        stopped = worker.process.exitcode in (-signal.SIGTERM, -signal.SIGINT)
        log.log(logging.WARNING if stopped else logging.ERROR,
                "dispatch: prepare worker %s (pid %s) ended %s (%s); the %d digests it had "
                "not answered are prepared in the dispatching process", worker.process.name,
                worker.process.pid, "by a signal" if stopped else "unexpectedly",
                _exit_text(worker.process), len(orphans))

    # --- stopping ---

    async def close(self) -> None:
        """End every worker (SIGTERM, then SIGKILL after STOP_SECONDS) and reap it."""
        self._closing = True
        try:
            for worker in self._workers:
                with contextlib.suppress(OSError):
                    worker.requests.close()
                if worker.process.is_alive():
                    worker.process.terminate()
            deadline = time.monotonic() + STOP_SECONDS
            while any(w.process.is_alive() for w in self._workers):
                if time.monotonic() > deadline:
                    log.warning("dispatch: a prepare worker did not end on SIGTERM within "
                                "%gs; killing it", STOP_SECONDS)
                    break
                await asyncio.sleep(0.01)
        finally:
            self._kill_all()

    def _kill_all(self) -> None:
        """SIGKILL whatever still runs and reap it (the synchronous last resort)."""
        self._closing = True
        for worker in self._workers:
            if worker.process.is_alive():
                worker.process.kill()
            worker.process.join(timeout=STOP_SECONDS)
            with contextlib.suppress(OSError):
                worker.requests.close()
            if worker.reader is not None:
                worker.reader.join(timeout=STOP_SECONDS)
            with contextlib.suppress(OSError):
                worker.results.close()

    @property
    def pids(self) -> list[int]:
        """The workers' process ids (for tests and logs)."""
        return [w.process.pid for w in self._workers if w.process.pid is not None]


def _load(worker: _Worker[J]) -> int:
    """A worker's jobs not answered yet: sent to it or queued for it."""
    return len(worker.sent) + len(worker.pending)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    return trim


def release_free_heap() -> None:
    """Give the C heap's free pages back to the system before a fork.

    What the corpus fit and the config load freed stays mapped in this
    process (glibc keeps freed memory for reuse, in the fit thread's arena as
    in the main one): a forked worker inherits those pages, and they count in
    its RSS and get copied when its allocations reuse them. ``malloc_trim(0)``
    returns every whole free page (measured on the bench's 5,000 subscribers:
    the dispatching process 243 -> 213 MB at the fork, the worker's peak 284 ->
    254 MB). Nothing where the C library has no ``malloc_trim``.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _exit_text(process: BaseProcess) -> str:
    code = process.exitcode
    if code is None:
        return "still running, its pipe broke"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit code {code}"


def sigint_disposition() -> signal.Handlers:
    """What a worker does on SIGINT: ignore it when the process was started ignoring it, or
    ignores it now (SIG_IGN); else end at once (SIG_DFL)."""
    if SIGINT_IGNORED_AT_START or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        return signal.SIG_IGN
    return signal.SIG_DFL


def _serve(requests: Connection, results: Connection, inherited: list[Connection],
           setup: Callable[[], None], build: Callable[[J], A], *,
           mask: set[signal.Signals] | None = None) -> None:
    """The worker's life: set up, then answer chunks until the request pipe ends.

    ``mask``: the parent's signal mask before the fork (``HELD_AT_FORK`` are blocked
    until this worker's own handlers are in place; a signal held meanwhile is acted on
    then, by them).
    """
    # The parent's event loop set a wakeup fd and handlers that would turn a signal sent
    # to this worker into one the parent acts on: this process has its own.
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, sigint_disposition())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if mask is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    for conn in inherited:
        conn.close()
    try:
        setup()
    except Exception as exc:  # noqa: BLE001 - e.g. no database: the parent prepares all
        log.error("dispatch: prepare worker (pid %d) cannot start: %s", os.getpid(), exc)
        os._exit(1)
    while True:
        try:
            chunk: list[tuple[int, J]] = requests.recv()
        except (EOFError, OSError):
            return  # the dispatch is over, or the parent died
        try:
            results.send([(key, build(job)) for key, job in chunk])
        except (BrokenPipeError, ConnectionResetError):
            return  # the parent is gone
