"""``digest bench dispatch``: one day's dispatch to N subscribers, against raw SMTP.

Builds a realistic state once per run of the command, with the project's own
code: D days of the real daily listings rendered as page dumps and ingested
one day after another through ``ingest_file``; N subscribers in a config file
(interests drawn from phrases of the real titles, a spread of time zones,
everyone's send time a little before "now"); a share ``--history`` of them
with a digest on each of the last ``HISTORY_DAYS`` listing days before today,
sent and rated (likes and skips), written by the store's bulk
``add_sent_digests``/``add_feedback_events`` (the rows ``claim_digest``,
``mark_sent`` and ``add_feedback`` would write, in a fraction of the time).

Each run copies that SQLite file afresh (so every run sends the same day),
starts the dispatch in a fresh process (so its peak RSS, its own VmHWM, and
its CPU time are the dispatch's own) and calls ``dispatch`` as the daemon's
dispatch tick does (only ``now`` is given, see below), with the real
``Mailer``, to an SMTP sink in a separate process (``--sink``: aiosmtpd, or
the lean server of ``lean_smtp``; either records recipients and Message-ID
per message). Every subscriber must receive exactly one message, each
Message-ID once, else the benchmark fails. In the same run, raw aiosmtplib
sends messages of the same bytes to the same sink over 1 and over 8
concurrent connections: the ceiling the dispatch is compared with. While the
dispatch runs, its process sends itself a signal every half second and
times the event loop's answer (``SignalProbe``).

Per-stage times come from timing wrappers the dispatch process puts around
the daemon's own stage functions (``prepare``, ``rank``, ``render_digest_bytes``,
``claim_batch``, the corpus fit); no daemon code is changed. These stages run
on the event loop one at a time, so their CPU seconds are their own; the
deliveries run concurrently (several SMTP sessions), so what is left of the
process's CPU time is reported as one line: sending, the SMTP client and
marking sent. Clock: papers of the last 7 listing days are ingested at least one
second after the older ones, and the dispatch runs at ``now`` = that instant
plus 7 days, so a first digest covers the last 7 listing days as it would in
a deployment that ingested one dump a day (``FIRST_DIGEST_WINDOW``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import multiprocessing
import os
import random
import re
import resource
import shutil
import signal
import statistics
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self
from zoneinfo import ZoneInfo

from tqdm import tqdm

from ..errors import DigestError
from .interrupt import ignore_sigint, run_stoppable, start_helper
from .lean_smtp import LeanSmtpThread, Recorder

if TYPE_CHECKING:  # the sink process imports this module: it stays light
    from ..paper import Paper
    from ..store import Claim, Store

log = logging.getLogger(__name__)

DOMAIN = "bench.example.org"
SENDER = f"Paper Digest <digest@{DOMAIN}>"
# A history subscriber has had a digest on each of this many listing days before today:
# a month of daily digests, enough likes and skips for a personal model.
HISTORY_DAYS = 30
# The first digest covers papers ingested in the last week (daemon.FIRST_DIGEST_WINDOW).
FIRST_DIGEST_DAYS = 7
# How many messages each raw-SMTP measurement sends (fewer when N is smaller): enough
# for a steady rate, few enough that a 10,000-subscriber run does not double in length.
RAW_MESSAGES_MAX = 2000
RAW_CONNECTIONS = (1, 8)
# Each subscriber's send time lies this many minutes before the dispatch's "now", so
# everyone is due and none is later than max_late (12 h).
SEND_OFFSET_MINUTES = (5, 240)
# Shares of a history subscriber's feedback: an item whose title shares a word with
# one of their interests is liked this often, any other item liked or skipped so often.
LIKE_MATCHING, LIKE_OTHER, SKIP_OTHER = 0.5, 0.05, 0.15
TIMEZONES = ("UTC", "Europe/Berlin", "Europe/London", "Europe/Paris", "America/New_York",
             "America/Los_Angeles", "America/Sao_Paulo", "Asia/Shanghai", "Asia/Tokyo",
             "Asia/Kolkata", "Australia/Sydney", "Africa/Nairobi")
SINK_START_TIMEOUT = 30.0  # seconds for the sink process to listen
SINKS = ("aiosmtpd", "lean")  # --sink: the first is the default
# The dispatch process sends itself a signal this often (seconds) to time its answer.
SIGNAL_PROBE_PERIOD = 0.5
STAGES = ("corpus_fit", "prepare", "ranking", "rendering", "claiming")

_WORD = re.compile(r"[a-z][a-z0-9\-]+")
# Words that make a phrase no topic ("learning", "model": every title has them).
_STOPWORDS = frozenset((
    "a", "an", "and", "are", "as", "at", "by", "for", "from", "in", "into", "is", "of", "on",
    "or", "the", "to", "via", "with", "without", "towards", "toward", "using", "use", "based",
    "beyond", "through", "over", "under", "its", "their", "can", "do", "does", "how", "what",
    "when", "why", "large", "new", "model", "models", "learning"))


# --- the state ----------------------------------------------------------------


@dataclass(frozen=True)
class BenchState:
    """A built state: the pristine SQLite file, who subscribes, and the dispatch's "now"."""

    folder: Path
    pristine: Path  # copied to ``state`` before each run
    state: Path
    inbox: Path
    subscribers: tuple[dict[str, Any], ...]  # config tables, email/name/interests/timezone
    history: frozenset[str]  # emails of the subscribers with past digests
    now: datetime
    papers: int
    build_s: float


def interest_phrases(titles: Sequence[str], *, minimum: int = 3) -> list[tuple[str, int]]:
    """Two-word phrases that recur in the titles, most frequent first: (phrase, count).

    The part before a colon is usually a system's name and is left out. Falls
    back to phrases seen once when fewer than 20 recur (a tiny corpus).
    """
    counts: Counter[str] = Counter()
    for title in titles:
        text = title.split(":", 1)[1] if ":" in title else title
        words = _WORD.findall(text.lower())
        for first, second in itertools.pairwise(words):
            if first not in _STOPWORDS and second not in _STOPWORDS:
                counts[f"{first} {second}"] += 1
    common = [(p, c) for p, c in counts.most_common() if c >= minimum]
    if len(common) < 20:
        common = counts.most_common()
    return common


def _send_at(now: datetime, zone: str, rng: random.Random) -> str:
    """A local "HH:MM" a little before ``now`` in ``zone``, so the subscriber is due."""
    moment = now - timedelta(minutes=rng.randint(*SEND_OFFSET_MINUTES))
    return moment.astimezone(ZoneInfo(zone)).strftime("%H:%M")


def _wait_for_next_second() -> datetime:
    """Sleep to the next whole UTC second and return it (the store keeps whole seconds)."""
    current = datetime.now(UTC)
    boundary = current.replace(microsecond=0) + timedelta(seconds=1)
    time.sleep((boundary - current).total_seconds())
    while datetime.now(UTC) < boundary:  # a sleep may end a hair early
        time.sleep(0.001)
    return boundary


@dataclass(frozen=True)
class PastDigest:
    """One past digest of a history subscriber: the digest as claimed, then its ratings."""

    claim: Claim
    feedback: tuple[tuple[str, str], ...]  # (paper id, "like" or "skip"), in item order


# Writes one listing day's past digests into the store (``write_past_digests``).
PastDigestWriter = Callable[["Store", Sequence[PastDigest]], None]


def write_past_digests(store: Store, digests: Sequence[PastDigest]) -> None:
    """Store a day's past digests as sent, then their likes and skips: two transactions.

    The rows are those ``claim_digest``, ``mark_sent`` and ``add_feedback``
    write one by one (a test compares the two), at a fraction of the cost:
    30 days of 30,000 history subscribers took the per-row calls ~15 minutes.
    Raises StoreError when the store refuses them.
    """
    from ..store import FeedbackEvent

    ids = store.add_sent_digests([past.claim for past in digests])
    store.add_feedback_events([
        FeedbackEvent(past.claim.subscriber, paper_id, signal, "reply", digest_id)
        for past, digest_id in zip(digests, ids, strict=True)
        for paper_id, signal in past.feedback])


def build_state(folder: Path, data: Path, *, subscribers: int, days: int, history: float,
                seed: int = 13, progress: bool = True,
                write_past: PastDigestWriter = write_past_digests) -> BenchState:
    """Ingest ``days`` listing days and create ``subscribers`` subscribers, a share with history.

    ``write_past`` stores each listing day's past digests (after that day's
    dump is ingested). Raises DigestError when the data file is missing or a
    dump fails to ingest or the store refuses the past digests.
    """
    from ..ingest import ingest_file
    from ..store import Store
    from .ingest import load_listings, render_page_dump

    started = time.perf_counter()
    listings = load_listings(data, days)
    if not listings:
        raise DigestError(f"{data}: no listing days")
    rng = random.Random(seed)
    phrases = interest_phrases([str(row["title"]) for rows in listings.values() for row in rows])
    pool, weights = [p for p, _ in phrases], [c for _, c in phrases]
    emails = [f"reader{n:06d}@{DOMAIN}" for n in range(subscribers)]
    interests = {email: sorted(set(rng.choices(pool, weights, k=rng.choice((0, 1, 2, 2, 3, 4)))))
                 for email in emails}
    with_history = frozenset(rng.sample(emails, round(subscribers * history)))
    history_order = [e for e in emails if e in with_history]
    inbox = folder / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    pristine = folder / "pristine.sqlite3"
    ordered = list(listings.items())
    split = max(0, len(ordered) - FIRST_DIGEST_DAYS)  # the last week is ingested after this
    history_from = max(0, len(ordered) - 1 - HISTORY_DAYS)  # digests on days before today
    recent_since: datetime | None = None
    with Store(pristine) as store:
        for number, (day, rows) in enumerate(tqdm(ordered, desc="state: days",
                                                  disable=not progress)):
            if number == split:
                recent_since = _wait_for_next_second()
            path = inbox / f"{day.isoformat()}_trending.txt"
            path.write_text(render_page_dump(day, rows), encoding="utf-8")
            before = store.corpus_seq()
            try:
                ingest_file(store, path)
            except DigestError as exc:
                raise DigestError(f"bench dispatch: {path.name} did not ingest: {exc}") from exc
            if history_from <= number < len(ordered) - 1:
                todays = store.candidate_papers("", before)  # what this dump added
                past = past_digests(history_order, interests, todays, day, store.corpus_seq(),
                                    rng)
                try:
                    write_past(store, past)
                except DigestError as exc:
                    raise DigestError(f"bench dispatch: the past digests of {day} were not "
                                      f"stored: {exc}") from exc
        papers = store.paper_count()
    if recent_since is None:  # pragma: no cover - split < len(ordered) always
        raise DigestError("bench dispatch: no listing day to ingest")
    now = recent_since + timedelta(days=FIRST_DIGEST_DAYS)
    tables = []
    for n, email in enumerate(emails):
        zone = rng.choice(TIMEZONES)
        tables.append({"email": email, "name": f"Reader {n}", "interests": interests[email],
                       "timezone": zone, "send_at": _send_at(now, zone, rng)})
    return BenchState(folder=folder, pristine=pristine, state=folder / "state.sqlite3",
                      inbox=inbox, subscribers=tuple(tables), history=with_history, now=now,
                      papers=papers, build_s=time.perf_counter() - started)


def past_digests(emails: Sequence[str], interests: dict[str, list[str]],
                 todays: Sequence[Paper], day: date, corpus_seq: int,
                 rng: random.Random) -> list[PastDigest]:
    """One sent digest of ``day``'s papers per history subscriber, with their likes and skips.

    The items are the papers whose titles share a word with the subscriber's
    interests first, then the listing's order (a stand-in for the ranking, which
    would take as long as the benchmark itself). The stored message is a short
    placeholder: only a digest left claimed is ever resent. ``rng`` is drawn
    once per item, in subscriber then item order.
    """
    from ..render import message_id_for, new_token
    from ..store import Claim, ItemRow

    if not todays:
        return []
    # Which of today's papers each title word appears in, so a subscriber's matches
    # are a union of a few sets instead of a scan of every title.
    papers_with: defaultdict[str, set[int]] = defaultdict(set)
    for index, paper in enumerate(todays):
        for word in _WORD.findall(paper.title.lower()):
            papers_with[word].add(index)
    everyone = range(len(todays))
    result: list[PastDigest] = []
    for email in emails:
        words = {w for phrase in interests[email] for w in phrase.split()}
        matching = set().union(*(papers_with.get(w, ()) for w in words))
        chosen = ([i for i in everyone if i in matching]
                  + [i for i in everyone if i not in matching])[:10]
        token = new_token()
        claim = Claim(subscriber=email, local_date=day, token=token,
                      message_id=message_id_for(token, SENDER), considered=len(todays),
                      corpus_seq=corpus_seq, message=b"(bench dispatch: a past digest)",
                      items=tuple(ItemRow(position, todays[i].id, 1.0 - position / 100,
                                          "bench history", False)
                                  for position, i in enumerate(chosen, start=1)))
        feedback = []
        for i in chosen:
            signal = _feedback_signal(i in matching, rng.random())
            if signal is not None:
                feedback.append((todays[i].id, signal))
        result.append(PastDigest(claim, tuple(feedback)))
    return result


def _feedback_signal(matches_interest: bool, draw: float) -> str | None:
    """Like, skip or nothing for one item, from a uniform ``draw`` in [0, 1)."""
    if matches_interest:
        return "like" if draw < LIKE_MATCHING else None
    if draw < LIKE_OTHER:
        return "like"
    return "skip" if draw < LIKE_OTHER + SKIP_OTHER else None


def write_config(state: BenchState, port: int) -> Path:
    """The TOML config of the benchmark's daemon: the state file, the sink, the subscribers."""
    lines = [
        "# Written by digest bench dispatch.",
        "[digest]",
        f"inbox = {json.dumps(str(state.inbox))}",
        f"state = {json.dumps(str(state.state))}",
        "[smtp]",
        'host = "127.0.0.1"',
        f"port = {port}",
        'security = "none"',
        f"from = {json.dumps(SENDER)}",
        f'reply_to = "digest+{{token}}@{DOMAIN}"',
    ]
    for table in state.subscribers:
        lines.append("[[subscribers]]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in table.items())
    path = state.folder / "bench.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- the SMTP sink, in a process of its own -----------------------------------------


class _CountingHandler:
    """aiosmtpd handler: records recipients and Message-ID of each message, keeps nothing else."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.recorder.record(list(envelope.rcpt_tos),
                             envelope.original_content or envelope.content or b"")
        return "250 2.0.0 Accepted"


def _sink_main(conn: Connection, port: int, kind: str) -> None:
    """The sink process: listen on ``port``, answer "counts", "reset" and "stop" on ``conn``."""
    ignore_sigint()  # a Ctrl-C is the benchmark's to handle: it ends this process
    recorder = Recorder()
    server: Any
    if kind == "lean":
        server = LeanSmtpThread(recorder, "127.0.0.1", port)
    else:
        from aiosmtpd.controller import Controller

        server = Controller(_CountingHandler(recorder), hostname="127.0.0.1", port=port)
    server.start()
    recorder.reset()  # the CPU of starting up is no message's
    conn.send("ready")
    try:
        while True:
            command = conn.recv()
            if command == "counts":
                conn.send(recorder.snapshot())
            elif command == "reset":
                recorder.reset()
                conn.send("ok")
            else:
                break
    finally:
        server.stop()


class SmtpSink:
    """A counting SMTP sink on 127.0.0.1 in a separate process (its CPU is not ours).

    ``kind`` is "aiosmtpd" (the aiosmtpd server with a recording handler) or
    "lean" (``lean_smtp.LeanSmtp``, a minimal server that costs about what a
    relay in C does). Either records per message the recipients and the
    Message-ID (see ``lean_smtp.Recorder``).
    """

    def __init__(self, kind: str = "aiosmtpd") -> None:
        from ..mailer import free_port

        if kind not in SINKS:
            raise DigestError(f"bench dispatch: unknown sink {kind!r}: one of {', '.join(SINKS)}")
        self.kind = kind
        self.port = free_port()
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_sink_main, args=(child, self.port, kind),
                                        name="bench-smtp-sink", daemon=True)

    def start(self) -> None:
        start_helper(self._process)
        if not self._conn.poll(SINK_START_TIMEOUT):
            self.stop()
            raise DigestError(f"bench dispatch: the SMTP sink did not start within "
                              f"{SINK_START_TIMEOUT:.0f} s")
        self._conn.recv()

    def counts(self) -> dict[str, Any]:
        self._conn.send("counts")
        result: dict[str, Any] = self._conn.recv()
        return result

    def reset(self) -> None:
        self._conn.send("reset")
        self._conn.recv()

    def stop(self) -> None:
        if self._process.is_alive():
            self._conn.send("stop")
            self._process.join(10)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- the dispatch, in a process of its own -------------------------------------------


class StageTimes:
    """Wall and CPU seconds spent in each named stage (summed over subscribers), and calls.

    CPU time is the process's (all threads): the dispatch runs one stage at a
    time, so on a shared machine it says what a stage costs when wall time
    says mostly how busy the machine was.
    """

    def __init__(self) -> None:
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.cpu: defaultdict[str, float] = defaultdict(float)
        self.calls: Counter[str] = Counter()

    def add(self, name: str, wall_started: float, cpu_started: float) -> None:
        self.seconds[name] += time.perf_counter() - wall_started
        self.cpu[name] += time.process_time() - cpu_started
        self.calls[name] += 1

    def sync(self, name: str, func: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return func(*args, **kwargs)
            finally:
                self.add(name, wall, cpu)
        return timed

    def coroutine(self, name: str, func: Callable[..., Any]) -> Callable[..., Any]:
        async def timed(*args: Any, **kwargs: Any) -> Any:
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return await func(*args, **kwargs)
            finally:
                self.add(name, wall, cpu)
        return timed


@contextmanager
def timed_stages(times: StageTimes) -> Iterator[None]:
    """Wrap the dispatch's stage functions in timers; put the originals back on exit.

    The dispatch looks these names up in ``digest.daemon.jobs`` at each call,
    so wrapping them there times them without a change to the daemon. Only
    the benchmark's own dispatch process does this.
    """
    from ..daemon import jobs

    wrapped: dict[str, Any] = {
        "prepare": times.sync("prepare", jobs.prepare),
        "rank": times.sync("ranking", jobs.rank),
        "render_digest_bytes": times.sync("rendering", jobs.render_digest_bytes),
        "claim_batch": times.sync("claiming", jobs.claim_batch),
    }
    originals = {name: getattr(jobs, name) for name in wrapped}
    for name, value in wrapped.items():
        setattr(jobs, name, value)
    try:
        yield
    finally:
        for name, value in originals.items():
            setattr(jobs, name, value)


class SignalProbe:
    """How long the event loop takes to answer a signal while the dispatch runs.

    The daemon answers SIGTERM and SIGHUP through ``loop.add_signal_handler``:
    Python notes the signal at once, but its handler runs only when the
    callback holding the loop (ranking, rendering a digest) returns. So a
    thread sends SIGUSR1 to this process every ``period`` seconds, once the
    previous one was answered, and a handler added the daemon's way records
    how many seconds each took to run.
    """

    def __init__(self, period: float = SIGNAL_PROBE_PERIOD) -> None:
        self.period = period
        self.answers: list[float] = []  # seconds from os.kill to the handler, in order
        self._sent_at = 0.0
        self._answered = threading.Event()
        self._stopping = threading.Event()

    @contextmanager
    def running(self, loop: asyncio.AbstractEventLoop) -> Iterator[None]:
        """Probe while the block runs on ``loop`` (the running loop of this main thread)."""
        loop.add_signal_handler(signal.SIGUSR1, self._answer)
        sender = threading.Thread(target=self._send, name="bench-signal-probe", daemon=True)
        sender.start()
        try:
            yield
        finally:
            self._stopping.set()
            sender.join()
            loop.remove_signal_handler(signal.SIGUSR1)

    def _answer(self) -> None:
        self.answers.append(time.perf_counter() - self._sent_at)
        self._answered.set()

    def _send(self) -> None:
        while not self._stopping.wait(self.period):
            self._answered.clear()
            self._sent_at = time.perf_counter()
            os.kill(os.getpid(), signal.SIGUSR1)
            while not self._answered.wait(self.period) and not self._stopping.is_set():
                pass  # still unanswered: the loop is busy; a new signal would merge with it


class ChildMemory:
    """The largest private memory of this process's children (its prepare workers), sampled.

    A forked worker's RSS (and so its ``ru_maxrss``) counts every page it shares
    with the dispatching process: the fitted index, the config, whatever that
    process held at the fork. Added to the dispatch's, it counts them twice. A
    thread reads each child's ``/proc/PID/smaps_rollup`` every ``period``
    seconds and keeps the largest ``Private_Clean + Private_Dirty`` (the pages
    only that child holds): what the worker adds. 0.0 where /proc cannot tell.
    A read walks the child's page tables (1-5 ms of this process's CPU for a
    250 MB worker), so it is done every 2 s, not more: the worker's own memory
    grows with its bounded memos and then stays, so a sample every 2 s finds
    its peak to within what the last 2 s added.
    """

    def __init__(self, period: float = 2.0) -> None:
        self.period = period
        self.peak_mb = 0.0
        self._stopping = threading.Event()

    @contextmanager
    def running(self) -> Iterator[None]:
        sampler = threading.Thread(target=self._sample, name="bench-child-memory", daemon=True)
        sampler.start()
        try:
            yield
        finally:
            self._stopping.set()
            sampler.join()

    def _sample(self) -> None:
        while not self._stopping.wait(self.period):
            for pid in _children():
                self.peak_mb = max(self.peak_mb, _private_mb(pid))


def _children() -> list[int]:
    """This process's child process ids (from /proc; empty where it cannot tell)."""
    pids: list[int] = []
    try:
        for task in Path(f"/proc/{os.getpid()}/task").iterdir():
            pids.extend(int(pid) for pid in (task / "children").read_text().split())
    except (OSError, ValueError):
        return pids
    return pids


def _private_mb(pid: int) -> float:
    """A process's private resident memory in MB (0.0 when it has ended or /proc cannot tell)."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text(encoding="ascii")
    except OSError:
        return 0.0
    kb = sum(int(line.split()[1]) for line in rollup.splitlines()
             if line.startswith(("Private_Clean:", "Private_Dirty:")))
    return kb / 1024


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MB (``VmHWM`` of /proc/self/status).

    Not ``ru_maxrss``: Linux carries it over an exec from the process that
    started this one (a spawned process starts with its parent's peak, 800 MB
    for a 15 MB child of an 800 MB parent), so a dispatch process started by
    a bench that holds 100,000 subscribers would report the bench's memory.
    VmHWM belongs to this process's own memory since it started (all its
    threads; not its children). Falls back to ``ru_maxrss`` where there is
    no /proc.
    """
    try:
        status = Path("/proc/self/status").read_text(encoding="ascii")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def copy_flushed(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` and wait until the copy is on disk.

    The dispatch's first commit makes SQLite sync the database file: without
    the wait it would also write back the whole fresh copy (1.6 GB at 100,000
    subscribers: a 2.5 s stall of the event loop in the first claim, seen in
    a run), a cost of the benchmark's copying, not of a dispatch. Raises
    ``OSError`` as ``shutil.copyfile`` and ``os.fsync`` do.
    """
    shutil.copyfile(source, target)
    with open(target, "rb") as copy:  # fsync needs no write access on Linux
        os.fsync(copy.fileno())


def _dispatch_main(conn: Connection, config_path: str, now_iso: str,
                   prepare_workers: int | None = None) -> None:
    """The dispatch process: load the config, dispatch once as the daemon does, report."""
    ignore_sigint()  # a Ctrl-C is the benchmark's to handle: it ends this process
    try:
        conn.send(_dispatch_once(Path(config_path), datetime.fromisoformat(now_iso),
                                 prepare_workers))
    except (DigestError, OSError) as exc:  # the parent reports it as one line
        conn.send({"error": str(exc)})
    # Anything else is a bug: its traceback goes to stderr and the parent sees the exit code.


def _dispatch_once(config_path: Path, now: datetime,
                   prepare_workers: int | None = None) -> dict[str, Any]:
    from dataclasses import replace

    from ..config import load_config
    from ..daemon import Runtime, dispatch
    from ..store import Store

    logging.getLogger("digest").setLevel(logging.WARNING)  # a line per message drowns the table
    started = time.perf_counter()
    config = load_config(config_path)
    config_load_s = time.perf_counter() - started
    if prepare_workers is not None:  # --prepare-workers: the same state, another setting
        config = replace(config, prepare_workers=prepare_workers)
    times = StageTimes()
    with Store(config.state) as store, timed_stages(times):
        runtime = Runtime(config, store)
        refresh = runtime.refresh_corpus_index
        runtime.refresh_corpus_index = times.coroutine("corpus_fit", refresh)  # type: ignore[method-assign]
        before = resource.getrusage(resource.RUSAGE_SELF)
        # The prepare workers are this process's only children: their CPU (and the peak of
        # the largest one) is read once the dispatch has reaped them.
        before_workers = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()

        probe = SignalProbe()
        children = ChildMemory()

        async def tick() -> Sequence[Any]:  # as the daemon's tick calls it, at the bench's "now"
            with probe.running(asyncio.get_running_loop()), children.running():
                return await dispatch(runtime, now=now, stop=asyncio.Event())

        outcomes = asyncio.run(tick())
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_SELF)
        after_workers = resource.getrusage(resource.RUSAGE_CHILDREN)
        # Read before the tallies below (a dict of N subscribers is the bench's, not the
        # dispatch's): the peak of loading the config and dispatching, nothing else.
        peak_rss = peak_rss_mb()
    # The corpus fit runs once; its later calls find the index fresh and return at once.
    considered: dict[str, int] = {o.subscriber.lower(): o.considered for o in outcomes}
    return {
        "wall_s": wall,
        "config_load_s": config_load_s,
        "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "peak_rss_mb": peak_rss,
        "signal_answers_s": probe.answers,
        "prepare_workers": config.prepare_workers,
        "worker_cpu_s": ((after_workers.ru_utime - before_workers.ru_utime)
                         + (after_workers.ru_stime - before_workers.ru_stime)),
        # The largest worker's peak, pages shared with the dispatch process (the fitted
        # index, copy-on-write) included: the sum with the dispatch's is an upper bound.
        "worker_peak_rss_mb": (after_workers.ru_maxrss / 1024
                               if after_workers.ru_maxrss != before_workers.ru_maxrss else 0.0),
        "worker_private_peak_mb": children.peak_mb,
        "statuses": dict(Counter(o.status for o in outcomes)),
        "problems": [f"{o.subscriber}: {o.status}: {o.detail}" for o in outcomes
                     if o.status != "sent"][:5],
        "considered": considered,
        "stages": dict(times.seconds),
        "stages_cpu": dict(times.cpu),
        "calls": dict(times.calls),
    }


def run_dispatch_process(config_path: Path, now: datetime,
                         prepare_workers: int | None = None) -> dict[str, Any]:
    """One dispatch in a fresh process; raises DigestError when it failed."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_dispatch_main, args=(sender, str(config_path),
                                                           now.isoformat(), prepare_workers),
                              name="bench-dispatch")
    start_helper(process)
    sender.close()
    try:
        result: dict[str, Any] = receiver.recv()
    except EOFError as exc:
        process.join()
        raise DigestError(f"bench dispatch: the dispatch process died (exit code "
                          f"{process.exitcode})") from exc
    process.join()
    if "error" in result:
        raise DigestError(f"bench dispatch: the dispatch failed: {result['error']}")
    return result


# --- raw SMTP ---------------------------------------------------------------------


async def _raw_send(port: int, messages: Sequence[bytes], connections: int) -> float:
    """Send each message to its own recipient over ``connections`` connections; wall s."""
    import aiosmtplib

    queue: list[tuple[int, bytes]] = list(enumerate(messages))
    queue.reverse()

    async def worker() -> None:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False,
                                 use_tls=False, timeout=60)
        await client.connect()
        try:
            while queue:
                n, data = queue.pop()
                await client.sendmail(f"digest@{DOMAIN}", [f"raw{n:06d}@{DOMAIN}"], data)
        except BaseException:
            client.close()  # stopped or failed: no QUIT to a sink that may be gone
            raise
        await client.quit()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    return time.perf_counter() - started


def raw_rate(sink: SmtpSink, messages: Sequence[bytes], connections: int) -> dict[str, float]:
    """Raw aiosmtplib to the sink: messages/s and the sink's CPU ms per message.

    Checks each message arrived once (DigestError otherwise).
    """
    sink.reset()
    # A SIGINT or SIGTERM meanwhile cancels the sends (interrupt.run_stoppable).
    wall = run_stoppable(_raw_send(sink.port, messages, connections))
    received = sink.counts()
    _check_once(received, [f"raw{n:06d}@{DOMAIN}" for n in range(len(messages))],
                f"raw aiosmtplib over {connections} connection(s)")
    return {"rate": len(messages) / wall,
            "sink_cpu_ms": 1000 * received["cpu_s"] / max(received["messages"], 1)}


def _check_once(snapshot: dict[str, Any], expected: Sequence[str], what: str) -> None:
    """Raise DigestError unless each expected recipient got exactly one message, nobody else any,
    and every message had a Message-ID of its own (a digest sent twice repeats its own)."""
    counts: dict[str, int] = snapshot["counts"]
    missing = [r for r in expected if counts.get(r, 0) == 0]
    twice = [r for r in expected if counts.get(r, 0) > 1]
    wanted = set(expected)
    strangers = [r for r in counts if r not in wanted]
    if missing or twice or strangers:
        raise DigestError(
            f"bench dispatch: {what}: {len(missing)} recipient(s) got nothing "
            f"{missing[:3]}, {len(twice)} got more than one {twice[:3]}, "
            f"{len(strangers)} unexpected {strangers[:3]} (of {len(expected)})")
    ids: list[str] = snapshot["message_ids"]
    without = ids.count("")
    repeated = [i for i, n in Counter(ids).items() if n > 1 and i]
    if without or repeated:
        raise DigestError(
            f"bench dispatch: {what}: {without} message(s) without a Message-ID, "
            f"{len(repeated)} Message-ID(s) received more than once {repeated[:3]}")


def _sample_messages(state_path: Path, emails: Sequence[str], count: int) -> list[bytes]:
    """The claimed bytes of the first ``count`` subscribers' newest digests."""
    from ..store import Store

    with Store(state_path) as store:
        return [store.digests_of(email, limit=1)[0].message for email in emails[:count]]


# --- the benchmark ------------------------------------------------------------------


def run_dispatch_bench(data: Path, *, subscribers: int, days: int = 60, history: float = 0.3,
                       runs: int = 3, sink: str = "aiosmtpd", progress: bool = True,
                       prepare_workers: int | None = None) -> dict[str, Any]:
    """Build the state, then ``runs`` times: dispatch, check delivery, measure raw SMTP.

    Returns the medians (a dict with a ``table`` string besides the JSON
    fields). ``sink`` is the SMTP server that receives (``SmtpSink``).
    ``prepare_workers`` overrides the config's ``[digest] prepare_workers``
    (None: the default). Raises DigestError when the data is missing, a
    subscriber did not get exactly one message, or the dispatch failed.
    """
    if subscribers < 1 or days < 1 or runs < 1 or not 0 <= history <= 1:
        raise DigestError("bench dispatch: --subscribers, --days and --runs must be at least 1 "
                          "and --history between 0 and 1")
    from ..config import MAX_PREPARE_WORKERS

    if prepare_workers is not None and not 0 <= prepare_workers <= MAX_PREPARE_WORKERS:
        raise DigestError(f"bench dispatch: --prepare-workers must be 0 to "
                          f"{MAX_PREPARE_WORKERS}")
    load = os.getloadavg()
    per_run: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="digest-bench-dispatch-") as tmp:
        state = build_state(Path(tmp), data, subscribers=subscribers, days=days,
                            history=history, progress=progress)
        emails = [table["email"] for table in state.subscribers]
        with SmtpSink(sink) as receiver:
            config_path = write_config(state, receiver.port)
            for _ in tqdm(range(runs), desc="dispatch runs", disable=not progress):
                for leftover in state.folder.glob(state.state.name + "*"):
                    leftover.unlink()
                copy_flushed(state.pristine, state.state)
                receiver.reset()
                result = run_dispatch_process(config_path, state.now, prepare_workers)
                delivered = receiver.counts()
                if result["statuses"] != {"sent": subscribers}:
                    raise DigestError(f"bench dispatch: not every digest was sent: "
                                      f"{result['statuses']}; first: {result['problems']}")
                _check_once(delivered, emails, "the dispatch")
                result["sink_cpu_s"] = delivered["cpu_s"]  # since the reset: this run's
                result["sink_messages"] = delivered["messages"]
                result["message_bytes"] = delivered["bytes"] / max(delivered["messages"], 1)
                sample = _sample_messages(state.state, emails, min(subscribers, RAW_MESSAGES_MAX))
                # A bar of its own: a progress line says when this phase starts (closed on
                # the way out, before the CLI's last line, when a signal stops it).
                with tqdm(total=len(RAW_CONNECTIONS), desc="raw aiosmtplib phase",
                          leave=False, disable=not progress) as bar:
                    result["raw"] = {}
                    for n in RAW_CONNECTIONS:
                        result["raw"][n] = raw_rate(receiver, sample, n)
                        bar.update()
                per_run.append(result)
    return summarise(state, per_run, days=days, history=history, load=load, sink=sink)


def summarise(state: BenchState, per_run: list[dict[str, Any]], *, days: int, history: float,
              load: tuple[float, float, float], sink: str = "aiosmtpd") -> dict[str, Any]:
    """Medians over the runs, as the JSON fields plus a ``table``."""
    def median(get: Callable[[dict[str, Any]], float]) -> float:
        return float(statistics.median(get(run) for run in per_run))

    n = len(state.subscribers)
    wall = median(lambda r: r["wall_s"])
    rate = n / wall
    raw = {c: median(lambda r, c=c: r["raw"][c]["rate"])  # type: ignore[misc]
           for c in RAW_CONNECTIONS}
    raw_sink = {c: median(lambda r, c=c: r["raw"][c]["sink_cpu_ms"])  # type: ignore[misc]
                for c in RAW_CONNECTIONS}
    dispatch_cpu = median(lambda r: r["cpu_s"])
    worker_cpu = median(lambda r: r.get("worker_cpu_s", 0.0))
    cpu = median(lambda r: r["cpu_s"] + r.get("worker_cpu_s", 0.0))  # both processes
    worker_rss = median(lambda r: r.get("worker_peak_rss_mb", 0.0))
    worker_private = median(lambda r: r.get("worker_private_peak_mb", 0.0))
    stages = _stage_medians(per_run, "stages", wall)
    stages_cpu = _stage_medians(per_run, "stages_cpu", dispatch_cpu)
    considered = per_run[0]["considered"]
    old = [v for k, v in considered.items() if k in state.history]
    new = [v for k, v in considered.items() if k not in state.history]
    ranking_s, ranking_cpu = stages["ranking"], stages_cpu["ranking"]
    result: dict[str, Any] = {
        "bench": "dispatch",
        "subscribers": n,
        "days": days,
        "history": history,
        "papers": state.papers,
        "runs": len(per_run),
        "load_avg_1m": round(load[0], 2),
        "build_s": round(state.build_s, 1),
        "config_load_s": round(median(lambda r: r["config_load_s"]), 3),
        "wall_s": round(wall, 2),
        "messages_per_s": round(rate, 1),
        "cpu_s": round(cpu, 2),
        "cpu_ms_per_subscriber": round(1000 * cpu / n, 2),
        "peak_rss_mb": round(median(lambda r: r["peak_rss_mb"]), 1),
        "signals_answered": sum(len(r["signal_answers_s"]) for r in per_run),
        "signal_answer_median_s": round(median(lambda r: _median_or_zero(r["signal_answers_s"])),
                                        3),
        "signal_answer_max_s": round(max(max(r["signal_answers_s"], default=0.0)
                                         for r in per_run), 3),
        "sink": sink,
        "prepare_workers": per_run[0].get("prepare_workers", 0),
        "dispatch_cpu_s": round(dispatch_cpu, 2),
        "worker_cpu_s": round(worker_cpu, 2),
        "worker_peak_rss_mb": round(worker_rss, 1),
        "worker_private_peak_mb": round(worker_private, 1),
        "sink_cpu_s": round(median(lambda r: r["sink_cpu_s"]), 2),
        "sink_cpu_ms_per_message": round(median(
            lambda r: 1000 * r["sink_cpu_s"] / max(r["sink_messages"], 1)), 2),
        "raw_1_sink_cpu_ms_per_message": round(raw_sink[1], 2),
        "raw_8_sink_cpu_ms_per_message": round(raw_sink[8], 2),
        "message_kb": round(median(lambda r: r["message_bytes"]) / 1024, 1),
        "raw_1_messages_per_s": round(raw[1], 1),
        "raw_8_messages_per_s": round(raw[8], 1),
        "ratio_to_raw_1": round(rate / raw[1], 3),
        "ratio_to_raw_8": round(rate / raw[8], 3),
        # With workers, the dispatching process ranks only the digests it prepares itself (a
        # dead worker's): n over its ranking time is no rate.
        "ranking_subscribers_per_s": (round(n / ranking_s, 1) if ranking_s and not worker_cpu
                                      else None),
        "ranking_subscribers_per_cpu_s": (round(n / ranking_cpu, 1)
                                          if ranking_cpu and not worker_cpu else None),
        "candidates_mean_history": round(statistics.fmean(old), 1) if old else None,
        "candidates_mean_new": round(statistics.fmean(new), 1) if new else None,
        "stages_s": stages,
        "stages_cpu_s": stages_cpu,
        "delivered_exactly_once": True,
        "wall_s_runs": [round(r["wall_s"], 2) for r in per_run],
    }
    result["table"] = _table(result)
    return result


def _median_or_zero(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def _stage_medians(per_run: list[dict[str, Any]], key: str, total: float) -> dict[str, float]:
    """Median seconds per stage, plus the parts no wrapper times (``*_other``, ``other``)."""
    stages = {name: round(float(statistics.median(r[key].get(name, 0.0) for r in per_run)), 3)
              for name in STAGES}
    stages["prepare_other"] = round(stages["prepare"] - stages["ranking"] - stages["rendering"], 3)
    # Deliveries overlap each other and the stages above: what is left is theirs (SMTP
    # client, marking sent) and the schedule's, the event loop's and the log's.
    stages["sending"] = round(total - stages["corpus_fit"] - stages["prepare"]
                              - stages["claiming"], 3)
    return stages


def _table(r: dict[str, Any]) -> str:
    s, c = r["stages_s"], r["stages_cpu_s"]
    wall = r["wall_s"] or 1.0
    rows = [
        (f"dispatch benchmark: {r['subscribers']} subscribers ({r['history']:.0%} with history), "
         f"{r['days']} listing days, {r['papers']} papers; median of {r['runs']} run(s); "
         f"load {r['load_avg_1m']} at start"),
        (f"candidates per digest: {r['candidates_mean_history']} (history), "
         f"{r['candidates_mean_new']} (first digest); message {r['message_kb']} KB; "
         f"state built in {r['build_s']} s; config loaded in {r['config_load_s']} s"),
        (f"SMTP sink: {r['sink']}, in its own process; peak RSS is the dispatch process's "
         f"own (VmHWM)"),
        (f"{'':<34}{'wall s':>9}{'msg/s':>9}{'CPU s':>8}{'peak RSS MB':>13}"
         f"{'sink CPU ms/msg':>17}"),
        (f"{'dispatch (as the daemon)':<34}{r['wall_s']:>9.2f}{r['messages_per_s']:>9.1f}"
         f"{r['dispatch_cpu_s']:>8.1f}{r['peak_rss_mb']:>13.0f}"
         f"{r['sink_cpu_ms_per_message']:>17.2f}"),
        (f"{'  its prepare worker(s): ' + str(r['prepare_workers']):<34}{'':>9}{'':>9}"
         f"{r['worker_cpu_s']:>8.1f}{r['worker_peak_rss_mb']:>13.0f}"
         f"   (the largest; {r['worker_private_peak_mb']:.0f} MB of it its own, the rest "
         "shared with the dispatch)"),
        (f"{'signals answered during it':<34}{r['signals_answered']:>9}   in "
         f"{r['signal_answer_median_s']:.3f} s (median), {r['signal_answer_max_s']:.3f} s "
         f"(slowest)"),
        (f"{'raw aiosmtplib, 1 connection':<34}{'':>9}{r['raw_1_messages_per_s']:>9.1f}"
         f"{'':>8}{'':>13}{r['raw_1_sink_cpu_ms_per_message']:>17.2f}"
         f"   ratio {r['ratio_to_raw_1']:.3f}"),
        (f"{'raw aiosmtplib, 8 connections':<34}{'':>9}{r['raw_8_messages_per_s']:>9.1f}"
         f"{'':>8}{'':>13}{r['raw_8_sink_cpu_ms_per_message']:>17.2f}"
         f"   ratio {r['ratio_to_raw_8']:.3f}"),
        f"{'stage':<34}{'wall s':>9}{'share':>9}{'CPU s':>9}{'share':>9}{'CPU ms/sub':>12}",
    ]
    for label, key in (("corpus fit", "corpus_fit"), ("ranking", "ranking"),
                       ("rendering", "rendering"),
                       ("candidates + profile", "prepare_other"), ("claiming", "claiming"),
                       ("sending + SMTP + the rest", "sending")):
        rows.append(f"{label:<34}{s[key]:>9.2f}{s[key] / wall:>9.0%}"
                    f"{c[key]:>9.2f}{c[key] / (r['cpu_s'] or 1.0):>9.0%}"
                    f"{1000 * c[key] / r['subscribers']:>12.2f}")
    if r["worker_cpu_s"]:
        rows.append("ranking, rendering and candidates ran in the prepare worker(s): their CPU "
                    "is the worker row's; the stage rows hold only the digests the dispatch "
                    "prepared itself (a dead worker's)")
    if r["ranking_subscribers_per_s"] is None:  # ranked in the workers: not timed apart
        rows.append("ranking: in the prepare worker(s), not timed apart (--prepare-workers 0 "
                    "times it); every subscriber received exactly one message")
    else:
        rows.append(f"ranking: {r['ranking_subscribers_per_s']} subscribers/s "
                    f"({r['ranking_subscribers_per_cpu_s']} per CPU second); "
                    f"every subscriber received exactly one message")
    return "\n".join(rows)
