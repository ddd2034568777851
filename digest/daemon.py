"""The daemon: the jobs that wire the stages together, and the loop that runs them.

``scan`` (inbox -> store), ``dispatch`` (store -> rank -> render -> send) are
plain functions that both the scheduler of ``digest run`` and the one-shot CLI
commands call, so ``digest send --dry-run`` runs exactly what the daemon's
dispatch runs, minus the SMTP conversation.

APScheduler is only the timer. Who is due and what was sent live in the
store: a subscriber is due when their local send time has passed on one of
their days and no digest exists for that local date. A digest is claimed in
the store (with its rendered message) before the SMTP conversation and marked
sent after it, so a day is sent at most once; a digest left claimed by a crash
or an outage is resent with the same Message-ID on the next dispatch.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from datetime import time as dt_time
from email import message_from_bytes, policy
from email.message import EmailMessage

from .config import Config, Subscriber, load_config
from .errors import DigestError, SendError
from .ingest import IngestResult, scan_inbox
from .mailer import LocalSink, Mailer
from .rank import CorpusIndex, Profile, Ranked, is_personalised, rank
from .render import DigestContent, DigestItem, message_id_for, new_token, render_digest
from .store import DigestRow, ItemRow, Store, SubscriberState, utc_now

log = logging.getLogger(__name__)

# A subscriber new to the store gets the papers of the last week, not the whole archive.
FIRST_DIGEST_WINDOW = timedelta(days=7)
# A digest the SMTP server keeps refusing with 4xx is given up after this many dispatches.
MAX_DELIVERY_ATTEMPTS = 10


@dataclass
class Runtime:
    """What the jobs share between ticks: config, store and fitted models."""

    config: Config
    store: Store
    _index: CorpusIndex | None = None
    _index_seq: int = -1

    def corpus_index(self) -> CorpusIndex:
        """The corpus features, refitted only when papers were added."""
        seq = self.store.corpus_seq()
        if self._index is None or seq != self._index_seq:
            self._index = CorpusIndex.fit(self.store.all_papers())
            self._index_seq = seq
        return self._index


@dataclass(frozen=True)
class Prepared:
    """A digest ranked and rendered, not yet claimed."""

    subscriber: Subscriber
    local_date: date
    content: DigestContent
    message: EmailMessage
    corpus_seq: int


@dataclass(frozen=True)
class Outcome:
    subscriber: str
    status: str  # sent | failed | retry | dry-run | empty | not-due | already-sent | late
    detail: str = ""
    digest_id: int | None = None
    shown: int = 0
    considered: int = 0


# --- scanning -----------------------------------------------------------------


def scan(runtime: Runtime) -> list[IngestResult]:
    config = runtime.config
    return scan_inbox(runtime.store, config.inbox, stable_seconds=config.stable_seconds)


# --- who is due ---------------------------------------------------------------


def local_now(sub: Subscriber, now: datetime) -> datetime:
    return now.astimezone(sub.timezone)


def send_time(sub: Subscriber, day: date) -> datetime:
    """The subscriber's send time on ``day``, as an aware datetime (DST-correct)."""
    naive = datetime.combine(day, sub.send_at)
    aware = naive.replace(tzinfo=sub.timezone)
    # A send time inside a spring-forward gap does not exist: send at the first
    # real instant after it rather than skipping the day.
    round_trip = aware.astimezone(UTC).astimezone(sub.timezone)
    if round_trip.replace(tzinfo=None) != naive:
        aware = naive.replace(tzinfo=sub.timezone, fold=1)
    return aware


def effective_subscriber(sub: Subscriber, state: SubscriberState) -> Subscriber:
    """The config's subscriber with what they set by reply applied (the reply wins)."""
    changes: dict[str, object] = {}
    if state.send_at:
        hours, minutes = state.send_at.split(":")
        changes["send_at"] = dt_time(int(hours), int(minutes))
    if state.max_papers:
        changes["max_papers"] = state.max_papers
    if state.interests_added or state.interests_removed:
        removed = {phrase.casefold() for phrase in state.interests_removed}
        interests = [p for p in (*sub.interests, *state.interests_added)
                     if p.casefold() not in removed]
        changes["interests"] = tuple(dict.fromkeys(interests))
    return replace(sub, **changes) if changes else sub  # type: ignore[arg-type]


def is_paused(state: SubscriberState, today: date) -> bool:
    return state.paused and (state.paused_until is None or today < state.paused_until)


def due_status(runtime: Runtime, sub: Subscriber, now: datetime, *, force: bool) -> str:
    """``due``, or why not: ``unsubscribed``, ``paused``, ``not-due``, ``already-sent``, ``late``.

    ``sub`` is the effective subscriber (reply-set state applied).
    """
    today = local_now(sub, now).date()
    state = runtime.store.subscriber_state(sub.email)
    if state.unsubscribed:
        return "unsubscribed"
    if is_paused(state, today):
        return "paused"
    if runtime.store.digest_on(sub.email, today) is not None:
        return "already-sent"
    if force:
        return "due"
    if today.weekday() not in sub.days:
        return "not-due"
    scheduled = send_time(sub, today)
    if now < scheduled:
        return "not-due"
    if now - scheduled > runtime.config.max_late:
        return "late"
    return "due"


# --- building a digest --------------------------------------------------------


def build_profile(store: Store, sub: Subscriber) -> Profile:
    feedback = store.latest_feedback(sub.email)
    rated = {row.paper_id for row in feedback}
    unrated = tuple(dict.fromkeys(p for p in store.shown_papers(sub.email) if p not in rated))
    return Profile(
        liked=tuple(row.paper_id for row in feedback if row.signal == "like"),
        skipped=tuple(row.paper_id for row in feedback if row.signal == "skip"),
        unrated=unrated,
        interests=sub.interests,
        seed_papers=sub.seed_papers,
    )


def candidate_seq(store: Store, sub: Subscriber, now: datetime) -> int:
    """Papers after this ingest sequence number are new to the subscriber."""
    last = store.last_sent_digest(sub.email)
    if last is not None:
        return last.corpus_seq
    return store.first_seq_since(now - FIRST_DIGEST_WINDOW)


def prepare(runtime: Runtime, sub: Subscriber, now: datetime) -> Prepared | None:
    """Rank and render the subscriber's digest; None when there is nothing to send."""
    store = runtime.store
    corpus_seq = store.corpus_seq()
    candidates = store.candidate_papers(sub.email, candidate_seq(store, sub, now))
    if not candidates and not sub.send_empty:
        return None
    profile = build_profile(store, sub)
    ranked: list[Ranked] = []
    if candidates:
        ranked = rank(runtime.corpus_index(), profile, [p.id for p in candidates],
                      limit=sub.max_papers, settings=runtime.config.ranking)
    by_id = {p.id: p for p in candidates}
    items = tuple(
        DigestItem(position=i, paper=by_id[r.paper_id], score=r.score, reason=r.reason,
                   explore=r.explore)
        for i, r in enumerate(ranked, start=1)
    )
    content = DigestContent(
        subscriber=sub,
        token=new_token(),
        local_date=local_now(sub, now).date(),
        considered=len(candidates),
        items=items,
        personalised=is_personalised(profile),
    )
    message = render_digest(content, runtime.config.smtp, now=now)
    return Prepared(sub, content.local_date, content, message, corpus_seq)


def claim(runtime: Runtime, prepared: Prepared) -> DigestRow | None:
    content = prepared.content
    return runtime.store.claim_digest(
        subscriber=prepared.subscriber.email,
        local_date=prepared.local_date,
        token=content.token,
        message_id=message_id_for(content.token, runtime.config.smtp.sender),
        considered=content.considered,
        corpus_seq=prepared.corpus_seq,
        message=prepared.message.as_bytes(),
        items=[ItemRow(item.position, item.paper.id, item.score, item.reason, item.explore)
               for item in content.items],
    )


# --- sending ------------------------------------------------------------------


async def deliver(runtime: Runtime, mailer: Mailer, row: DigestRow) -> Outcome:
    """Send a claimed digest and record the result; one subscriber's failure stays theirs."""
    message = message_from_bytes(row.message, policy=policy.default)
    assert isinstance(message, EmailMessage)  # policy.default parses to EmailMessage
    shown = len(runtime.store.digest_items(row.id))
    try:
        await mailer.send(message)
    except SendError as exc:
        give_up = exc.permanent or row.attempts + 1 >= MAX_DELIVERY_ATTEMPTS
        runtime.store.mark_failed(row.id, str(exc), permanent=give_up)
        if exc.permanent:
            runtime.store.update_subscriber_state(
                row.subscriber, bouncing_since=row.claimed_at, bounce_reason=str(exc))
        status = "failed" if give_up else "retry"
        log.error("subscriber %s: %s digest of %s: %s", row.subscriber,
                  "failed to send" if give_up else "will retry the", row.local_date, exc)
        return Outcome(row.subscriber, status, str(exc), row.id, shown, row.considered)
    runtime.store.mark_sent(row.id)
    if runtime.store.subscriber_state(row.subscriber).bouncing:
        runtime.store.update_subscriber_state(row.subscriber, bouncing_since=None,
                                              bounce_reason=None)
    log.info("subscriber %s: sent %d of %d papers (digest %s)", row.subscriber, shown,
             row.considered, row.local_date)
    return Outcome(row.subscriber, "sent", "", row.id, shown, row.considered)


def select_subscribers(config: Config, only: str | None) -> Sequence[Subscriber]:
    if only is None:
        return config.subscribers
    sub = config.subscriber(only)
    if sub is None:
        from .errors import UnknownSubscriber

        raise UnknownSubscriber(f"no subscriber {only!r} in {config.path}")
    return (sub,)


async def dispatch(
    runtime: Runtime,
    *,
    now: datetime | None = None,
    only: str | None = None,
    force: bool = False,
    dry_run: bool = False,
    stop: asyncio.Event | None = None,
) -> list[Outcome]:
    """Send every digest that is due (and resend any left claimed); return what happened.

    ``stop`` set between messages ends the run after the message in flight.
    """
    now = now or utc_now()
    outcomes: list[Outcome] = []
    subscribers = select_subscribers(runtime.config, only)
    smtp = runtime.config.smtp
    async with Mailer(smtp, attempts=smtp.attempts, base_delay=smtp.retry_seconds) as mailer:
        if not dry_run:
            wanted = {s.email.lower() for s in subscribers}
            for row in runtime.store.unsent_digests():
                if stop is not None and stop.is_set():
                    return outcomes
                if row.subscriber in wanted:
                    log.info("subscriber %s: resending the digest of %s claimed at %s",
                             row.subscriber, row.local_date, row.claimed_at)
                    outcomes.append(await deliver(runtime, mailer, row))
        for sub in subscribers:
            if stop is not None and stop.is_set():
                break
            outcomes.append(await _dispatch_one(runtime, mailer, sub, now, force, dry_run))
    return outcomes


async def _dispatch_one(
    runtime: Runtime, mailer: Mailer, sub: Subscriber, now: datetime, force: bool, dry_run: bool
) -> Outcome:
    sub = effective_subscriber(sub, runtime.store.subscriber_state(sub.email))
    status = due_status(runtime, sub, now, force=force)
    if status != "due":
        if status == "late":
            log.warning("subscriber %s: send time passed more than %s ago; skipping today",
                        sub.email, runtime.config.max_late)
        return Outcome(sub.email, status)
    try:
        prepared = prepare(runtime, sub, now)
    except DigestError as exc:
        log.error("subscriber %s: cannot build the digest: %s", sub.email, exc)
        return Outcome(sub.email, "failed", str(exc))
    if prepared is None:
        log.info("subscriber %s: no new papers; nothing sent", sub.email)
        return Outcome(sub.email, "empty")
    shown = len(prepared.content.items)
    considered = prepared.content.considered
    if dry_run:
        return Outcome(sub.email, "dry-run", str(prepared.message["Subject"]), None, shown,
                       considered)
    row = claim(runtime, prepared)
    if row is None:  # another process claimed the day between our check and now
        return Outcome(sub.email, "already-sent")
    return await deliver(runtime, mailer, row)


# --- the daemon loop ----------------------------------------------------------


class Daemon:
    """``digest run``: ticks for scan and dispatch; SIGINT/SIGTERM stop it cleanly."""

    def __init__(self, config: Config):
        self.config = config
        self.sink: LocalSink | None = None
        self.stop = asyncio.Event()
        self._runtime: Runtime | None = None
        self._busy = asyncio.Lock()

    async def run(self) -> int:
        from apscheduler.schedulers.asyncio import AsyncIOScheduler

        config = self._start_sink(self.config)
        store = Store(config.state)
        self._runtime = Runtime(config, store)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._request_stop, signum)
        scheduler = AsyncIOScheduler(event_loop=loop)
        scheduler.add_job(self._scan_tick, "interval", seconds=config.scan_seconds,
                          id="scan", max_instances=1, coalesce=True)
        scheduler.add_job(self._dispatch_tick, "interval", seconds=config.dispatch_seconds,
                          id="dispatch", max_instances=1, coalesce=True)
        log.info("daemon: watching %s, state %s, %d subscribers", config.inbox, config.state,
                 len(config.subscribers))
        try:
            await self._scan_tick()
            await self._dispatch_tick()
            scheduler.start()
            await self.stop.wait()
        finally:
            scheduler.shutdown(wait=False)
            async with self._busy:  # let the job in flight finish and commit
                store.close()
            if self.sink is not None:
                self.sink.stop()
            log.info("daemon: stopped")
        return 0

    def _start_sink(self, config: Config) -> Config:
        if config.smtp.sink is None:
            return config
        self.sink = LocalSink.from_config(config.smtp)
        self.sink.start()
        log.info("daemon: local mail sink on 127.0.0.1:%d writes messages to %s",
                 self.sink.port, self.sink.folder)
        return replace(config, smtp=self.sink.smtp_config())

    def _request_stop(self, signum: int) -> None:
        if self.stop.is_set():
            log.warning("daemon: second %s, exiting at once", signal.Signals(signum).name)
            raise SystemExit(1)
        log.info("daemon: %s received, finishing the work in flight", signal.Signals(signum).name)
        self.stop.set()

    async def _scan_tick(self) -> None:
        assert self._runtime is not None
        async with self._busy:
            if self.stop.is_set():
                return
            scan(self._runtime)

    async def _dispatch_tick(self) -> None:
        assert self._runtime is not None
        async with self._busy:
            if self.stop.is_set():
                return
            await dispatch(self._runtime, stop=self.stop)


def run_daemon(config_path: str) -> int:
    config = load_config(config_path)
    return asyncio.run(Daemon(config).run())
