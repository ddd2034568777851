"""The jobs that wire the stages together: scan (inbox -> store) and dispatch
(store -> rank -> render -> send).

Plain functions that both the daemon's scheduler and the one-shot CLI commands
call, so ``digest send --dry-run`` runs exactly what the daemon's dispatch
runs, minus the SMTP conversation. Exactly once: a digest is claimed in the
store (with its rendered message) before the SMTP conversation and marked sent
after it; one left claimed is resent byte for byte, same Message-ID.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage

from ..config import Config, Subscriber
from ..errors import DigestError, SendError, StoreError
from ..ingest import IngestResult, scan_inbox
from ..library import refresh_library
from ..mailer import Mailer
from ..rank import CorpusIndex, ModelCache, Ranked, build_profile, is_personalised, rank
from ..render import DigestContent, DigestItem, message_id_for, new_token, render_digest
from ..store import DigestRow, ItemRow, Store, utc_now
from .schedule import SCHEDULE_LOOKBACK_DAYS, due, effective_subscriber, local_now

log = logging.getLogger(__name__)

# A subscriber new to the store gets the papers of the last week, not the whole archive.
FIRST_DIGEST_WINDOW = timedelta(days=7)
# Errors that mean the daemon itself is broken (the database is gone, not one subscriber).
FATAL_ERRORS: tuple[type[BaseException], ...] = (StoreError, sqlite3.Error)


@dataclass
class Runtime:
    """What the jobs share between ticks: config, store, fitted models, what was logged."""

    config: Config
    store: Store
    models: ModelCache = field(default_factory=ModelCache)  # refitted on new feedback only
    _index: CorpusIndex | None = None
    _index_seq: int = -1
    # (subscriber, local date) -> corpus_seq at which the day had no new papers: the
    # day is looked at again only when papers were added (no work, no log every tick).
    empty_days: dict[tuple[str, date], int] = field(default_factory=dict)
    # (subscriber, local date, what) already logged: "late" is said once per day.
    _noted: set[tuple[str, date, str]] = field(default_factory=set)

    async def refresh_corpus_index(self) -> None:
        """Refit the corpus features in a worker thread when papers were added.

        A fit takes seconds on a large corpus; off the event loop, signals and
        the other jobs are still heard meanwhile. SQLite is read on this thread.
        """
        seq = self.store.corpus_seq()
        if self._index is not None and seq == self._index_seq:
            return
        papers = self.store.all_papers()
        self._index = await asyncio.to_thread(CorpusIndex.fit, papers)
        self._index_seq = seq

    def corpus_index(self) -> CorpusIndex:
        """The corpus features, refitted only when papers were added."""
        seq = self.store.corpus_seq()
        if self._index is None or seq != self._index_seq:
            self._index = CorpusIndex.fit(self.store.all_papers())
            self._index_seq = seq
        return self._index

    def first_time(self, email: str, day: date, what: str) -> bool:
        """True the first time (per process) this is noted for the subscriber's day."""
        key = (email.lower(), day, what)
        if key in self._noted:
            return False
        if len(self._noted) > 10_000:  # a long-running daemon forgets old days
            cutoff = day - timedelta(days=SCHEDULE_LOOKBACK_DAYS)
            self._noted = {k for k in self._noted if k[1] >= cutoff}
        self._noted.add(key)
        return True


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
    status: str  # sent | failed | retry | dry-run | empty | not-due | already-sent | late ...
    detail: str = ""
    digest_id: int | None = None
    shown: int = 0
    considered: int = 0


# --- scanning -----------------------------------------------------------------


def scan(runtime: Runtime) -> list[IngestResult]:
    config = runtime.config
    return scan_inbox(runtime.store, config.inbox, stable_seconds=config.stable_seconds)


# --- building a digest --------------------------------------------------------


def candidate_seq(store: Store, sub: Subscriber, now: datetime) -> int:
    """Papers after this ingest sequence number are new to the subscriber."""
    last = store.last_sent_digest(sub.email)
    if last is not None:
        return last.corpus_seq
    return store.first_seq_since(now - FIRST_DIGEST_WINDOW)


def prepare(
    runtime: Runtime, sub: Subscriber, now: datetime, local_date: date | None = None
) -> Prepared | None:
    """Rank and render the subscriber's digest; None when there is nothing to send.

    ``local_date`` is the day the digest is for (default: the subscriber's today).
    """
    store = runtime.store
    corpus_seq = store.corpus_seq()
    candidates = store.candidate_papers(sub.email, candidate_seq(store, sub, now))
    if not candidates and not sub.send_empty:
        return None
    refresh_library(store, sub)
    profile = build_profile(store, sub)
    ranked: list[Ranked] = []
    if candidates:
        ranked = rank(runtime.corpus_index(), profile, [p.id for p in candidates],
                      limit=sub.max_papers, settings=runtime.config.ranking,
                      cache=runtime.models, key=sub.email.lower())
    # Levels are given exactly when the ranking learned from something that resolved.
    personalised = any(r.level is not None for r in ranked) if ranked else is_personalised(profile)
    by_id = {p.id: p for p in candidates}
    items = tuple(
        DigestItem(position=i, paper=by_id[r.paper_id], score=r.score, reason=r.reason,
                   explore=r.explore, relevance=r.level)
        for i, r in enumerate(ranked, start=1)
    )
    content = DigestContent(
        subscriber=sub,
        token=new_token(),
        local_date=local_date or local_now(sub, now).date(),
        considered=len(candidates),
        items=items,
        personalised=personalised,
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
    """Send a claimed digest and record the result; one subscriber's failure stays theirs.

    A transient failure leaves the digest claimed, to be resent on the next
    dispatch, until it has been claimed for longer than ``max_late``: then it
    is marked failed (its papers stay candidates for the next digest).
    """
    store = runtime.store
    message = message_from_bytes(row.message, policy=policy.default)
    if not isinstance(message, EmailMessage):  # pragma: no cover - policy.default makes one
        raise TypeError("policy.default did not parse to an EmailMessage")
    shown = len(store.digest_items(row.id))
    try:
        await mailer.send(message)
    except SendError as exc:
        age = utc_now() - datetime.fromisoformat(row.claimed_at)
        give_up = exc.permanent or age > runtime.config.max_late
        store.mark_failed(row.id, str(exc), permanent=give_up)
        if exc.permanent:
            store.update_subscriber_state(
                row.subscriber, bouncing_since=row.claimed_at, bounce_reason=str(exc))
        status = "failed" if give_up else "retry"
        if give_up:
            log.error("subscriber %s: failed to send the digest of %s: %s", row.subscriber,
                      row.local_date, exc)
        else:
            log.warning("subscriber %s: digest of %s not sent yet, will retry: %s",
                        row.subscriber, row.local_date, exc)
        return Outcome(row.subscriber, status, str(exc), row.id, shown, row.considered)
    store.mark_sent(row.id)
    if store.subscriber_state(row.subscriber).bouncing:
        store.update_subscriber_state(row.subscriber, bouncing_since=None, bounce_reason=None)
    log.info("subscriber %s: sent %d of %d papers (digest of %s)", row.subscriber, shown,
             row.considered, row.local_date)
    return Outcome(row.subscriber, "sent", "", row.id, shown, row.considered)


def select_subscribers(config: Config, only: str | None) -> Sequence[Subscriber]:
    if only is None:
        return config.subscribers
    sub = config.subscriber(only)
    if sub is None:
        from ..errors import UnknownSubscriber

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
    One subscriber's failure is logged and returned; the others still go.
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
                    outcomes.append(await _resend(runtime, mailer, row))
        for sub in subscribers:
            if stop is not None and stop.is_set():
                break
            try:
                outcomes.append(await _dispatch_one(runtime, mailer, sub, now, force, dry_run))
            except FATAL_ERRORS:
                raise
            except Exception as exc:  # a bug or bad data for one subscriber: theirs alone
                log.exception("subscriber %s: the digest failed", sub.email)
                outcomes.append(Outcome(sub.email, "failed", f"{type(exc).__name__}: {exc}"))
    return outcomes


async def _resend(runtime: Runtime, mailer: Mailer, row: DigestRow) -> Outcome:
    """A digest claimed and not marked sent: resend the stored bytes (same Message-ID)."""
    if runtime.store.subscriber_state(row.subscriber).unsubscribed:
        runtime.store.mark_failed(row.id, "not sent: unsubscribed before delivery",
                                  permanent=True)
        log.info("subscriber %s: unsubscribed; the pending digest of %s is dropped",
                 row.subscriber, row.local_date)
        return Outcome(row.subscriber, "unsubscribed", "", row.id)
    log.info("subscriber %s: resending the digest of %s (claimed at %s, %s)", row.subscriber,
             row.local_date, row.claimed_at, row.message_id)
    return await deliver(runtime, mailer, row)


async def _dispatch_one(
    runtime: Runtime, mailer: Mailer, sub: Subscriber, now: datetime, force: bool, dry_run: bool
) -> Outcome:
    sub = effective_subscriber(sub, runtime.store.subscriber_state(sub.email))
    verdict = due(runtime, sub, now, force=force)
    if verdict.status == "late":
        was_empty = (sub.email.lower(), verdict.local_date) in runtime.empty_days
        if runtime.first_time(sub.email, verdict.local_date, "late") and not was_empty:
            log.warning("subscriber %s: the %s send time (%s) passed more than %s ago; "
                        "that day is skipped", sub.email, verdict.local_date,
                        _when(verdict.scheduled), _hours(runtime.config.max_late))
        return Outcome(sub.email, "late")
    if verdict.status != "due":
        return Outcome(sub.email, verdict.status)
    empty_key = (sub.email.lower(), verdict.local_date)
    if not sub.send_empty and runtime.empty_days.get(empty_key) == runtime.store.corpus_seq():
        return Outcome(sub.email, "empty")  # nothing was added since we last looked
    await runtime.refresh_corpus_index()
    try:
        prepared = prepare(runtime, sub, now, verdict.local_date)
    except DigestError as exc:
        log.error("subscriber %s: cannot build the digest: %s", sub.email, exc)
        return Outcome(sub.email, "failed", str(exc))
    if prepared is None:
        for key in [k for k in runtime.empty_days if k[0] == empty_key[0]]:
            del runtime.empty_days[key]  # one remembered day per subscriber is enough
        runtime.empty_days[empty_key] = runtime.store.corpus_seq()
        log.info("subscriber %s: no new papers for %s; nothing sent (looked again when "
                 "papers arrive)", sub.email, verdict.local_date)
        return Outcome(sub.email, "empty")
    runtime.empty_days.pop(empty_key, None)
    shown = len(prepared.content.items)
    considered = prepared.content.considered
    if dry_run:
        return Outcome(sub.email, "dry-run", str(prepared.message["Subject"]), None, shown,
                       considered)
    row = claim(runtime, prepared)
    if row is None:  # another process claimed the day between our check and now
        return Outcome(sub.email, "already-sent")
    return await deliver(runtime, mailer, row)


def _when(moment: datetime | None) -> str:
    return moment.strftime("%H:%M %Z") if moment is not None else "?"


def _hours(span: timedelta) -> str:
    hours = span.total_seconds() / 3600
    return f"{hours:g} h"
