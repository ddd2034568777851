"""The jobs that wire the stages together: scan (inbox -> store) and dispatch
(store -> rank -> render -> send).

Plain functions that both the daemon's scheduler and the one-shot CLI commands
call, so ``digest send --dry-run`` runs exactly what the daemon's dispatch
runs, minus the SMTP conversation. Exactly once: a digest is claimed in the
store (with its rendered message and its owner) before the SMTP conversation
and marked sent right after the server's 250; one left claimed is resent byte
for byte, same Message-ID, by its owner or, once the owner is dead, by the
process holding the state lock.

Containment: one subscriber's digest and one queued confirmation are units.
Whatever a unit raises is that unit's failure (logged with a readable reason,
returned as an ``Outcome``) and the dispatch goes on; only an unusable
database (``Store.probe`` fails) stops it, and a full or read-only disk
(``StoreWriteError``) ends this dispatch, to be tried again on the next tick.
A mail server that cannot be used ends the dispatch too: the rest waits for
the next tick, and a configuration error (login refused, TLS) holds all
sending back for a growing interval (``SmtpHold``).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import sqlite3
import time
import traceback
import zlib
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from email import message_from_bytes
from typing import Any, TypeVar

from ..config import Config, SmtpConfig, Subscriber
from ..errors import ConfigError, DigestError, SendError, StoreError, StoreWriteError
from ..ingest import IngestResult, scan_inbox
from ..library import refresh_library
from ..mailer import Mailer
from ..paper import Paper
from ..rank import CorpusIndex, ModelCache, Ranked, build_profile, is_personalised, rank
from ..render import (
    EMAIL_POLICY,
    DigestContent,
    DigestItem,
    RenderedDigest,
    message_id_for,
    new_token,
    render_digest_bytes,
)
from ..replies.process import CONFIRMATION_ATTEMPTS
from ..store import Claim, DigestRow, ItemRow, Store, SubscriberState, utc_now
from .lock import StateLock, owner_alive, process_owner
from .outcomes import Outcome, Outcomes
from .prepare_worker import PrepareWorkers
from .schedule import (
    SCHEDULE_LOOKBACK_DAYS,
    due,
    effective_subscriber,
    judge,
    local_now,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

# A subscriber new to the store gets the papers of the last week, not the whole archive.
FIRST_DIGEST_WINDOW = timedelta(days=7)
# Errors that mean the daemon itself is broken (the database is gone, not one subscriber).
FATAL_ERRORS: tuple[type[BaseException], ...] = (StoreError, sqlite3.Error)
# After a configuration error (login refused, TLS), sending waits this long, doubling up to
# the maximum, or until the [smtp] settings change (a reload). 5 min .. 6 h means at most
# ~10 bad logins in a day: a provider that locks an account after repeated failures
# (commonly 10-20 in a short while) is not provoked, and a fixed password is used soon.
SMTP_HOLD_FIRST = timedelta(minutes=5)
SMTP_HOLD_MAX = timedelta(hours=6)
# Outcomes of a tick that did nothing: they do not replace the STATUS= line of the last
# dispatch that sent, failed or deferred something.
IDLE_OUTCOMES = frozenset({"not-due", "already-sent", "empty", "late"})
MAX_REASON = 300  # characters of an exception kept as a unit's reason


@dataclass
class SmtpHold:
    """Sending held back after a configuration error, for these [smtp] settings."""

    smtp: SmtpConfig
    reason: str
    until: datetime
    delay: timedelta

    def active(self, smtp: SmtpConfig, now: datetime) -> bool:
        return smtp == self.smtp and now < self.until


# Bits of a corpus_seq in ``EmptyDays``' packed form (a trillion ingested papers).
_SEQ_BITS = 40


class EmptyDays:
    """Per subscriber, the one local day found with no new papers, and the corpus_seq then.

    One remembered day per subscriber is enough: a later day replaces it. Kept
    compact, as a daemon keeps it for its life and a day without a listing
    fills it for every subscriber: one int per subscriber (the day's ordinal and
    the sequence number packed, ~32 bytes) under the address's own string when
    it is lower-case already (else a lower-cased copy), where a dict of
    ``(address, date)`` tuples took ~250 bytes and a scan of every entry for
    each subscriber noted.
    """

    def __init__(self) -> None:
        self._by_email: dict[str, int] = {}

    @staticmethod
    def _key(email: str) -> str:
        key = email.lower()
        return email if key == email else key

    def note(self, email: str, day: date, corpus_seq: int) -> None:
        """Remember ``day`` as empty at ``corpus_seq`` (0 <= corpus_seq < 2**40)."""
        self._by_email[self._key(email)] = (day.toordinal() << _SEQ_BITS) | corpus_seq

    def seq(self, email: str, day: date) -> int | None:
        """The corpus_seq at which ``day`` was found empty, None when it was not."""
        packed = self._by_email.get(email.lower())
        if packed is None or packed >> _SEQ_BITS != day.toordinal():
            return None
        return packed & ((1 << _SEQ_BITS) - 1)

    def empty_at(self, email: str, corpus_seq: int) -> bool:
        """Whether the subscriber's remembered day was found empty at ``corpus_seq``."""
        packed = self._by_email.get(email.lower())
        return packed is not None and packed & ((1 << _SEQ_BITS) - 1) == corpus_seq

    def forget(self, email: str, day: date) -> None:
        """Drop the remembered day when it is ``day`` (it has papers now)."""
        if self.seq(email, day) is not None:
            del self._by_email[email.lower()]

    def __len__(self) -> int:
        return len(self._by_email)


@dataclass
class Runtime:
    """What the jobs share between ticks: config, store, fitted models, what was logged."""

    config: Config
    store: Store
    models: ModelCache = field(default_factory=ModelCache)  # refitted on new feedback only
    _index: CorpusIndex | None = None
    _index_seq: int = -1
    # Per subscriber, the day that had no new papers and the corpus_seq then: the day is
    # looked at again only when papers were added (no work, no log every tick).
    empty_days: EmptyDays = field(default_factory=lambda: EmptyDays())
    # (subscriber, local date, what) already logged: "late" is said once per day.
    _noted: set[tuple[str, date, str]] = field(default_factory=set)
    owner: str = field(default_factory=process_owner)  # recorded in each claim
    # The sender lock; the daemon holds it for its life, else dispatch takes it per run.
    lock: StateLock | None = None
    smtp_hold: SmtpHold | None = None
    # The papers after the lowest "since" a subscriber asked for, read once per corpus
    # version and shared: (corpus_seq, since_seq, seqs, papers); see ``papers_after``.
    _recent: tuple[int, int, list[int], list[Paper]] | None = None
    # ((moment, corpus_seq), seq): the last ``first_seq_since`` answer.
    _first_seq: tuple[tuple[datetime, int], int] | None = None
    # A config a SIGHUP loaded and validated while a dispatch runs, applied in full once it
    # ends: meanwhile the dispatch claims nobody it removed or no longer finds due (see
    # ``reloaded_verdict``). None when no reload waits.
    reloaded: Config | None = None
    last_dispatch: str = ""  # one line about the last dispatch, for systemd's STATUS=
    progress_at: float = 0.0  # time.monotonic() of the last subscriber a dispatch finished
    # The deliveries of the dispatch under way (a stop asks them what they wait for).
    deliveries: Deliveries | None = None

    def sender_lock(self) -> StateLock:
        if self.lock is None or self.lock.state != self.config.state:
            self.lock = StateLock(self.config.state)
        return self.lock

    def hold_smtp(self, error: SendError | ConfigError, now: datetime) -> SmtpHold:
        """Hold sending after a configuration error: 5 min, then doubling up to 6 h."""
        smtp = self.config.smtp
        previous = self.smtp_hold
        delay = SMTP_HOLD_FIRST
        if previous is not None and previous.smtp == smtp:
            delay = min(previous.delay * 2, SMTP_HOLD_MAX)
        self.smtp_hold = SmtpHold(smtp, str(error), now + delay, delay)
        log.error("smtp: sending held until %s (next try in %s; the wait doubles up to %s; "
                  "a config reload tries again at once): %s",
                  self.smtp_hold.until.strftime("%H:%M:%S %Z"), _span(delay),
                  _span(SMTP_HOLD_MAX), error)
        return self.smtp_hold

    async def refresh_corpus_index(self) -> None:
        """Refit the corpus features in a worker thread when papers were added.

        A fit takes seconds on a large corpus; off the event loop, signals and
        the other jobs are still heard meanwhile. SQLite is read on this thread.
        """
        seq = self.store.corpus_seq()
        if self._index is not None and seq == self._index_seq:
            return
        papers = self.store.all_papers()
        phrases = [phrase for sub in self.config.subscribers for phrase in sub.interests]
        self._index = await asyncio.to_thread(_fit_and_warm, papers, phrases)
        self._index_seq = seq

    def fitted_corpus_index(self) -> CorpusIndex:
        """The index ``refresh_corpus_index`` fitted last, even if a scan added papers since.

        For the reply loop: it awaits the off-loop refresh first, so a fit on
        the event loop happens only when none was ever made.
        """
        if self._index is not None:
            return self._index
        return self.corpus_index()

    def corpus_index(self, corpus_seq: int | None = None) -> CorpusIndex:
        """The corpus features, refitted only when papers were added (``corpus_seq``: the
        store's, when the caller has just read it)."""
        seq = self.store.corpus_seq() if corpus_seq is None else corpus_seq
        if self._index is None or seq != self._index_seq:
            self._index = CorpusIndex.fit(self.store.all_papers())
            self._index_seq = seq
        return self._index

    def papers_after(self, since_seq: int, corpus_seq: int | None = None) -> list[Paper]:
        """The stored papers ingested after ``since_seq``, in ingest order.

        Read from the store once per corpus version for the lowest ``since_seq``
        asked (a day's subscribers share most of their candidates), then sliced.
        ``corpus_seq``: the store's, when the caller has just read it.
        """
        if corpus_seq is None:
            corpus_seq = self.store.corpus_seq()
        recent = self._recent
        if recent is None or recent[0] != corpus_seq or since_seq < recent[1]:
            rows = self.store.papers_since(since_seq)
            recent = (corpus_seq, since_seq, [seq for seq, _ in rows], [p for _, p in rows])
            self._recent = recent
        _, _, seqs, papers = recent
        return papers[bisect.bisect_right(seqs, since_seq):]

    def first_seq_since(self, moment: datetime, corpus_seq: int) -> int:
        """``store.first_seq_since(moment)``, asked once per moment and corpus version: a
        dispatch asks it with the same moment for every subscriber without a digest."""
        key = (moment, corpus_seq)
        if self._first_seq is None or self._first_seq[0] != key:
            self._first_seq = (key, self.store.first_seq_since(moment))
        return self._first_seq[1]

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
    message: RenderedDigest  # the bytes claimed and sent as they are
    corpus_seq: int

    def ready(self) -> Ready:
        """What claiming and sending this digest need, without the papers themselves."""
        return Ready(self.subscriber, self.local_date, self.content.token,
                     self.content.considered,
                     tuple(ItemRow(item.position, item.paper.id, item.score, item.reason,
                                   item.explore) for item in self.content.items),
                     self.message.data, self.message.subject, self.corpus_seq)


@dataclass(frozen=True, slots=True)
class Ready:
    """A prepared digest as the claim and the send need it: a prepare worker's answer.

    ``Prepared`` holds the ranked papers themselves (titles, abstracts, authors: hundreds
    of objects, about as many bytes again as the message); a claim stores only each
    item's paper id, score and reason, and the send only the message's bytes. So a
    worker answers this (about half the bytes to pickle and unpickle), and a claim
    batch holds this: a dozen objects per digest, not hundreds made and freed per digest
    in the dispatching process. ``items`` are the digest's rows as claimed (``shown`` of
    them); ``data`` the message as claimed and sent; ``subject`` its subject (dry run).
    """

    subscriber: Subscriber
    local_date: date
    token: str
    considered: int
    items: tuple[ItemRow, ...]
    data: bytes
    subject: str
    corpus_seq: int

    @property
    def shown(self) -> int:
        """How many papers the digest shows."""
        return len(self.items)


def _fit_and_warm(papers: Sequence[Paper], phrases: Sequence[str]) -> CorpusIndex:
    """The corpus index, with the config's interest phrases matched in batches already.

    One batch costs about what a handful of phrases matched one at a time do
    (0.27 s for the 781 distinct phrases of 1,000 bench subscribers on 9,877
    papers, against about 6 ms each), and a forked prepare worker inherits the
    matches. Done before the index is published: its memo is not shared
    between threads.
    """
    index = CorpusIndex.fit(papers)
    index.warm_phrases(phrases)
    return index


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
    runtime: Runtime, sub: Subscriber, now: datetime, local_date: date | None = None, *,
    library: bool = True,
) -> Prepared | None:
    """Rank and render the subscriber's digest; None when there is nothing to send.

    ``local_date`` is the day the digest is for (default: the subscriber's today).
    ``library=False`` leaves the subscriber's library file alone (a prepare worker
    only reads the store: the dispatching process imported it before).
    """
    store = runtime.store
    corpus_seq = store.corpus_seq()
    last_seq = store.last_sent_seq(sub.email)
    # As candidate_seq, the first digest's window read once per dispatch (the same "now").
    since = last_seq if last_seq is not None else runtime.first_seq_since(
        now - FIRST_DIGEST_WINDOW, corpus_seq)
    # The past digests read once for both: what was sent (not a candidate again) and shown.
    shown, sent = store.shown_and_sent(sub.email)
    candidates = [p for p in runtime.papers_after(since, corpus_seq) if p.id not in sent]
    if not candidates and not sub.send_empty:
        return None
    if library:
        refresh_library(store, sub)
    # Never sent a digest: no paper was shown (a digest claimed and not sent shows none).
    profile = build_profile(store, sub, shown=shown if last_seq is not None else ())
    ranked: list[Ranked] = []
    if candidates:
        ranked = rank(runtime.corpus_index(corpus_seq), profile, [p.id for p in candidates],
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
    message = render_digest_bytes(content, runtime.config.smtp, now=now)
    return Prepared(sub, content.local_date, content, message, corpus_seq)


def claim(runtime: Runtime, prepared: Prepared | Ready) -> DigestRow | None:
    """Claim one prepared digest (None when its day was claimed already)."""
    row = claim_batch(runtime, [prepared])[0]
    if isinstance(row, Exception):
        raise row
    return row


def claim_batch(runtime: Runtime,
                batch: Sequence[Prepared | Ready]) -> list[DigestRow | None | Exception]:
    """Claim prepared digests in one transaction, each with its rendered bytes and owner.

    Per digest: its row; None where the day was claimed already (by another
    process, or an earlier dispatch); the exception where the database refused
    that digest's own rows (it alone is undone). Raises what the database as a
    whole raises (``StoreWriteError``, ``StoreError``): nothing is claimed then.
    """
    smtp = runtime.config.smtp
    claims = []
    for prepared in batch:
        ready = prepared.ready() if isinstance(prepared, Prepared) else prepared
        claims.append(Claim(subscriber=ready.subscriber.email, local_date=ready.local_date,
                            token=ready.token,
                            message_id=message_id_for(ready.token, smtp.sender),
                            considered=ready.considered, corpus_seq=ready.corpus_seq,
                            message=ready.data, items=ready.items, owner=runtime.owner))
    return runtime.store.claim_digests(claims)


# --- sending ------------------------------------------------------------------


async def deliver(runtime: Runtime, mailer: Mailer, row: DigestRow, recipient: str, *,
                  shown: int | None = None, marks: SentMarks | None = None) -> Outcome:
    """Send a claimed digest and record the result; one subscriber's failure stays theirs.

    Marked sent right after the server's 250 (the only window in which a crash
    can make a second copy). What a failure does depends on its kind (see
    ``SendError``): ``recipient`` fails the digest and marks the address
    bouncing; ``message`` fails the digest only; ``deferred``, ``server`` and
    ``config`` leave it claimed, to be resent on a later dispatch, until it has
    been claimed for longer than ``max_late``: then it is marked failed (its
    papers stay candidates for the next digest). ``recipient`` is the
    subscriber's address as configured; ``shown`` the digest's item count
    (read from the store when not given). ``marks``: record the delivery with
    the others of this turn of the event loop (one commit), else at once.
    """
    store = runtime.store
    if shown is None:
        shown = len(store.digest_items(row.id))
    try:
        await _send_claimed(mailer, row, recipient)
    except SendError as exc:
        age = utc_now() - datetime.fromisoformat(row.claimed_at)
        give_up = exc.permanent or age > runtime.config.max_late
        store.mark_failed(row.id, str(exc), permanent=give_up)
        if exc.kind == "recipient":
            store.update_subscriber_state(
                row.subscriber, bouncing_since=row.claimed_at, bounce_reason=str(exc))
        status = "failed" if give_up else "retry"
        if exc.kind == "message":
            log.error("subscriber %s: the digest of %s was rejected as a message (the address "
                      "is fine; not retried): %s", row.subscriber, row.local_date, exc)
        elif give_up:
            log.error("subscriber %s: failed to send the digest of %s: %s", row.subscriber,
                      row.local_date, exc)
        elif not exc.session:  # a session failure is logged once, by the mailer
            log.warning("subscriber %s: digest of %s not sent yet, will retry: %s",
                        row.subscriber, row.local_date, exc)
        return Outcome(row.subscriber, status, str(exc), row.id, shown, row.considered,
                       held_back=exc.held_back and not give_up)
    if marks is not None:
        marks.add(row.id)
    else:
        store.mark_sent(row.id, clear_bounce=True)  # delivered: the address works
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
) -> Outcomes:
    """Send every digest that is due (and resend any left claimed); return what happened.

    Holds the state's sender lock while it runs (raises ``StateLocked`` when
    another process holds it; a dry run claims nothing and needs no lock).
    ``stop`` set between messages ends the run after the message in flight.
    One subscriber's failure is logged and returned; the others still go.
    When the mail server cannot be used, the subscribers not reached yet get
    ``deferred`` and wait for the next dispatch. Raises ``StoreError`` only
    when the database is unusable, ``StoreWriteError`` when it cannot be
    written (disk full, read-only): nothing is half-written either way.
    """
    now = now or utc_now()
    subscribers = select_subscribers(runtime.config, only)
    if dry_run:
        return await _dispatch(runtime, subscribers, now, force, dry_run, stop)
    lock = runtime.sender_lock()
    if lock.held:
        return await _dispatch(runtime, subscribers, now, force, dry_run, stop)
    lock.acquire("send")
    try:
        return await _dispatch(runtime, subscribers, now, force, dry_run, stop)
    finally:
        lock.release()


async def _dispatch(runtime: Runtime, subscribers: Sequence[Subscriber], now: datetime,
                    force: bool, dry_run: bool, stop: asyncio.Event | None) -> Outcomes:
    # Every subscriber's outcome, in the subscribers' order (resends first) whatever order
    # the concurrent deliveries end in; ~25 bytes each, not an object each (``Outcomes``).
    outcomes = Outcomes(subscribers)
    smtp = runtime.config.smtp
    hold = runtime.smtp_hold
    if not dry_run and hold is not None and hold.active(smtp, now):
        outcomes.append(Outcome("(smtp)", "held", f"{hold.reason} (held until "
                                f"{hold.until.strftime('%H:%M:%S %Z')})"))
        return outcomes

    def stopped() -> bool:
        return stop is not None and stop.is_set()

    async with Mailer(smtp, attempts=smtp.attempts, base_delay=smtp.retry_seconds) as mailer:
        deliveries = Deliveries(runtime, mailer, window=delivery_window(smtp), stop=stop)
        # (place, outcome) pairs just settled, moved into ``outcomes`` as the dispatch goes
        # (``_collect``), so that only a claim batch's worth of them are objects at a time.
        placed: list[tuple[int, Outcome]] = []
        workers: Workers | None = None
        batch: list[tuple[int, Ready]] = []

        async def take(place: int, result: Ready | Outcome | None) -> None:
            """A subscriber's digest prepared (claimed with the next batch) or settled."""
            nonlocal batch
            runtime.progress_at = time.monotonic()
            if isinstance(result, Ready):
                batch.append((place, result))
            elif result is not None:
                placed.append((place, result))
            if len(batch) >= deliveries.batch or (batch and deliveries.idle):
                await _claim_and_send(runtime, deliveries, batch, placed, now=now, force=force)
                batch = []
            _collect(outcomes, placed, deliveries)

        pending: list[DigestRow] = []  # the claimed digests this dispatch resends
        try:
            if not dry_run:
                pending = await _resend_unsent(runtime, mailer, deliveries, subscribers,
                                               stopped, placed)
            quick = await _quick_outcomes(runtime.store, subscribers, now,
                                          runtime.config.max_late, force)
            # A worker may inherit a resend's SMTP socket: harmless, it never touches it and
            # ends (``close`` below) before the mailer closes its sessions.
            # Not for a dispatch that is stopping, nor one whose server already went away
            # (every subscriber is deferred): a fork a tick would buy nothing.
            workers = None if stopped() or mailer.unavailable is not None else (
                await _start_workers(runtime, now, _to_prepare(runtime, subscribers, quick),
                                     dry_run, stopped))
            for place, sub in enumerate(subscribers, start=1):
                if stopped():
                    break
                if (known := quick.get(place)) is not None:
                    outcomes.add(place, known)
                    continue
                if runtime.reloaded is not None:  # a SIGHUP meanwhile: its definition counts
                    reloaded = runtime.reloaded.subscriber(sub.email)
                    if reloaded is None:
                        placed.append((place, _removed(sub.email)))
                        continue
                    sub = reloaded
                if mailer.unavailable is not None:
                    placed.append((place, Outcome(sub.email, "deferred",
                                                  _reason(mailer.unavailable))))
                    continue
                if workers is None:
                    await take(place, await _unit(
                        runtime, sub.email, _prepare_one(runtime, sub, now, force, dry_run)))
                else:
                    judged = await _unit(runtime, sub.email,
                                         _judge_one(runtime, sub, now, force, library=True))
                    if isinstance(judged, PrepareJob):
                        while workers.full and not stopped():  # bounded: answers taken first
                            await take(*await _from_worker(runtime, workers, now))
                        workers.submit(place, judged)
                    else:
                        await take(place, judged)
                    while workers.has_answer and not stopped():
                        await take(*await _from_worker(runtime, workers, now))
                _collect(outcomes, placed, deliveries)
                await asyncio.sleep(0)  # deliveries, signals and the other jobs get their turn
            del quick
            while workers is not None and workers.outstanding and not stopped():
                await take(*await _from_worker(runtime, workers, now))
            if batch:
                await _claim_and_send(runtime, deliveries, batch, placed, now=now, force=force)
            if not stopped():
                await deliveries.retry_held_back(stopped)
        finally:
            if workers is not None:
                await workers.close()
            placed.extend(await deliveries.drain())
            outcomes.add_pairs(placed)
            _count_once(outcomes, pending)
        if not dry_run and mailer.unavailable is None and not stopped() and only_all(
                runtime, subscribers):
            outcomes.extend(await send_confirmations(runtime, mailer, stop))
    _after_dispatch(runtime, mailer, outcomes, now)
    return outcomes


def _removed(email: str) -> Outcome:
    log.info("subscriber %s: not in the reloaded config; no digest is sent", email)
    return Outcome(email, "removed")


def reloaded_verdict(runtime: Runtime, email: str, now: datetime, force: bool) -> Outcome | None:
    """After a reload during the dispatch, whether a digest prepared before it may still go.

    None when it may (no reload waits, or the subscriber is still in the
    reloaded config and due by its definition and their current state);
    else the outcome instead: ``removed``, or what ``due`` says (``paused``,
    ``unsubscribed``, ``not-due`` ...). A query or two per digest, only while
    a reload waits for the dispatch to end.
    """
    config = runtime.reloaded
    if config is None:
        return None
    sub = config.subscriber(email)
    if sub is None:
        return _removed(email)
    verdict = due(runtime, effective_subscriber(sub, runtime.store.subscriber_state(email)),
                  now, force=force)
    if verdict.status == "due":
        return None
    log.info("subscriber %s: %s by the reloaded config; the digest prepared before the "
             "reload is not sent", email, verdict.status)
    return Outcome(email, verdict.status)


def _still_wanted(runtime: Runtime, batch: list[tuple[int, Ready]],
                  placed: list[tuple[int, Outcome]], now: datetime,
                  force: bool) -> list[tuple[int, Ready]]:
    """The batch less the digests a reload during the dispatch took back (their outcome
    goes to ``placed``): checked right before the claim, so none of them is claimed."""
    if runtime.reloaded is None:
        return batch
    kept: list[tuple[int, Ready]] = []
    for place, prepared in batch:
        instead = reloaded_verdict(runtime, prepared.subscriber.email, now, force)
        if instead is None:
            kept.append((place, prepared))
        else:
            placed.append((place, instead))
    return kept


# Subscribers judged per pair of bulk reads (``_Settled``): the rows of this many at a
# time are all a dispatch holds of them, whatever the subscriber count.
SETTLE_CHUNK = 1000


async def _quick_outcomes(store: Store, subscribers: Sequence[Subscriber], now: datetime,
                          max_late: timedelta, force: bool) -> Outcomes:
    """At each subscriber's place (1..N), the outcome the bulk reads settle (a status of
    ``SETTLED``); no outcome for those to be looked at closely.

    Counted before the loop, to decide whether the dispatch is worth a worker.
    Read and judged ``SETTLE_CHUNK`` subscribers at a time, the event loop
    getting a turn after each chunk; what stays is ~25 bytes per subscriber
    (``Outcomes``), whatever is settled. ``force`` settles nobody.
    """
    quick = Outcomes(subscribers)
    if force:
        return quick
    warned = False
    for start in range(0, len(subscribers), SETTLE_CHUNK):
        chunk = subscribers[start:start + SETTLE_CHUNK]
        settled = _Settled.read_or_none(store, [sub.email for sub in chunk], warn=not warned)
        if settled is None:
            warned = True
        else:
            for place, sub in enumerate(chunk, start=start + 1):
                if (outcome := settled.outcome(sub, now, max_late)) is not None:
                    quick.add(place, outcome)
        del settled
        await asyncio.sleep(0)
    return quick


def _to_prepare(runtime: Runtime, subscribers: Sequence[Subscriber], quick: Outcomes) -> int:
    """About how many digests this dispatch will prepare: those not settled by the bulk
    reads, less those whose day had no new papers at this corpus version (a day without a
    listing keeps thousands due and empty for hours: no worker is forked for them)."""
    seq = runtime.store.corpus_seq()
    empty = runtime.empty_days
    return sum(1 for place, sub in enumerate(subscribers, start=1)
               if not quick.has(place) and not empty.empty_at(sub.email, seq))


# What a bulk read can settle for good during one dispatch (see ``_Settled``).
SETTLED = frozenset({"unsubscribed", "paused", "not-due", "already-sent"})


@dataclass(frozen=True)
class _Settled:
    """What a tick can settle from two bulk reads, without a query per subscriber.

    At 100,000 subscribers most ticks find nearly everyone already sent,
    paused or unsubscribed; a query or two each would make every tick cost
    minutes. Both reads can only be stale in the safe direction for the
    dispatch's span: a newest digest date only grows, and a state changed by a
    reply meanwhile is seen on the next tick. Whoever is not settled here goes
    through ``due`` with the store's current rows.
    """

    states: dict[str, SubscriberState]
    newest: dict[str, date]  # each subscriber's newest digest's local date, any status

    @classmethod
    def read_or_none(cls, store: Store, emails: Sequence[str], *,
                     warn: bool = True) -> _Settled | None:
        """Both reads for these subscribers, or None when a row cannot be read (each of them
        is then looked at alone, so a damaged row fails only its subscriber; ``warn``: say
        so in the log); an unusable database raises."""
        try:
            return cls(store.all_subscriber_states(emails), store.newest_digest_dates(emails))
        except StoreWriteError:
            raise
        except FATAL_ERRORS as exc:
            store.probe()
            reason = _exc_reason(exc)
        except (ValueError, TypeError, KeyError) as exc:  # a damaged row: bad JSON, a bad date
            reason = _exc_reason(exc)
        if warn:
            log.warning("dispatch: the subscriber states cannot all be read at once (%s); "
                        "each subscriber is looked at alone", reason)
        return None

    def outcome(self, sub: Subscriber, now: datetime, max_late: timedelta) -> Outcome | None:
        """``unsubscribed``, ``paused``, ``not-due`` or ``already-sent`` (with the day it
        was sent for, see ``_count_once``), or None: look closer (``due`` and ``late`` are
        judged again from the current rows)."""
        key = sub.email.lower()
        state = self.states.get(key) or SubscriberState(subscriber=key)
        verdict = judge(effective_subscriber(sub, state), state, self.newest.get(key), now,
                        max_late)
        if verdict.status not in SETTLED:
            return None
        return Outcome(sub.email, verdict.status, local_date=verdict.local_date)


# At most this many digests are claimed in one transaction (one commit for the batch). A
# batch is claimed only when the deliveries have room for all of it, so a claim is never
# further from its send than the deliveries in flight, and a mail server that goes away
# leaves only those claimed and unsent (resent, same bytes, on the next dispatch).
CLAIM_BATCH = 32
# ... and a batch is this share of the delivery window: the next batch is claimed while
# the rest of the window still sends. A whole window per batch (issue 13) waited for the
# window to drain to empty, so the sessions idled during every claim.
CLAIM_WINDOW_SHARE = 2


# After a stop (SIGTERM), how long the deliveries under way may take to finish before those
# not waiting on the reply to a message written whole are cancelled (their digests stay
# claimed and are resent, same Message-ID, on the next start: the server has no whole
# message of theirs, so that is no second copy).
STOP_GRACE_SECONDS = 5.0
# The longest a stop waits for the reply to a message written whole (``[smtp]
# data_timeout``, never longer): the relay may be taking it, and cancelling the delivery
# then sends it twice (the resend on the next start). 10 minutes is RFC 5321 4.5.3.2.6's
# limit for that reply; systemd/paper-digest.service's TimeoutStopSec= must exceed
# STOP_GRACE_SECONDS + this (tests/test_systemd.py checks it).
STOP_REPLY_WAIT_MAX_SECONDS = 600.0


def stop_reply_wait(smtp: SmtpConfig) -> float:
    """Seconds a stop waits for the reply to a message written whole: the wait the delivery
    itself allows that reply (``data_timeout``, at least ``timeout``), at most
    ``STOP_REPLY_WAIT_MAX_SECONDS``."""
    return min(max(smtp.timeout, smtp.data_timeout), STOP_REPLY_WAIT_MAX_SECONDS)


# The name of each delivery's task starts so: ``digest send`` stopped by a signal cancels
# those still waiting on the server after the grace period (their digests stay claimed).
DELIVERY_TASK_PREFIX = "deliver-"


def delivery_window(smtp: SmtpConfig) -> int:
    """Deliveries in flight at once: two per SMTP connection keeps every session busy."""
    return 2 * smtp.connections


def _claim_each(runtime: Runtime, batch: list[tuple[int, Ready]]
                ) -> list[DigestRow | None | Outcome]:
    """Claim a batch; a digest whose rows the database refused fails its subscriber alone."""
    results: list[DigestRow | None | Outcome] = []
    rows = claim_batch(runtime, [prepared for _, prepared in batch])
    for (_, prepared), row in zip(batch, rows, strict=True):
        if isinstance(row, Exception):
            reason = _exc_reason(row)
            log.error("subscriber %s: the digest could not be claimed in the state database: "
                      "%s", prepared.subscriber.email, reason)
            results.append(Outcome(prepared.subscriber.email, "failed", reason))
        else:
            results.append(row)
    return results


class SentMarks:
    """Digests the server took (its 250), marked sent together: one commit for a few.

    A mark waits only for the end of the event loop's current turn: the
    deliveries whose 250 arrived in the same turn add theirs, and the first
    mark schedules one commit for all of them (``call_soon``), which runs
    before the loop waits for the network again. So the span in which a
    crash leaves a delivered digest claimed (resent after a restart, same
    Message-ID) is still the one turn of the loop it always was, with no
    await in between, while the commits go from one per message to one per
    turn. A commit that fails (a full disk) keeps its marks pending (tried
    again by the next commit) and is raised by the next ``add`` (ending the
    dispatch, as a failed ``mark_sent`` did) or by ``flush``.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.pending: list[int] = []
        self.commits = 0  # how many commits carried marks (for the tests and the curious)
        self._scheduled = False
        self._failure: BaseException | None = None

    def add(self, digest_id: int) -> None:
        """Mark ``digest_id`` sent at the end of this turn of the event loop.

        Raises the failure of an earlier commit (its marks, and this one, stay pending).
        """
        self.pending.append(digest_id)
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_soon)

    def _flush_soon(self) -> None:
        self._scheduled = False
        try:
            self.flush()
        except (StoreError, sqlite3.Error) as exc:  # raised by the next add (or flush)
            self._failure = exc

    def flush(self) -> None:
        """Commit the pending marks now (all or none); raises what the store raises."""
        if not self.pending:
            return
        self.store.mark_sent_many(self.pending, clear_bounce=True)  # delivered: addresses work
        self.pending = []
        self._failure = None
        self.commits += 1


class Deliveries:
    """Claimed digests being sent concurrently, at most ``window`` at a time.

    Each delivery is its own unit (``_unit``); its outcome is collected by
    ``drain``. A failure that is not the unit's own (the database, a full
    disk) is re-raised by ``drain`` once every delivery in flight has ended.
    ``stop`` set (SIGTERM) stops them at once (``stop``): none starts after it.
    """

    def __init__(self, runtime: Runtime, mailer: Mailer, *, window: int,
                 stop: asyncio.Event | None = None) -> None:
        self.runtime = runtime
        self.mailer = mailer
        self.window = window
        self.stopping = False
        # Watches ``stop`` so that a delivery waiting for a session does not start in the
        # moments before the dispatch loop looks at the event again.
        self._stop_watch = None if stop is None else asyncio.create_task(
            self._stop_when(stop), name="digest-deliveries-stop")
        runtime.deliveries = self
        # Slow start: one delivery at a time until the server has accepted a message. A
        # server that refuses everything (relay denied, the same 5xx for every address)
        # then costs one claimed digest, not a window of them, and a refusal is judged
        # after an accepted address, as on one connection.
        self.accepted = False
        self._slots = asyncio.Semaphore(window)
        self._tasks: set[asyncio.Task[Outcome | None]] = set()
        # Ended deliveries' (place, outcome), kept until ``drain``: the outcome alone, not
        # its task (a task and its coroutine are ~1 KB; a dispatch ends 100,000 of them).
        self._done: list[tuple[int, Outcome]] = []
        self._fatal: BaseException | None = None  # the first failure not a unit's own
        self._places: dict[asyncio.Task[Outcome | None], int] = {}
        # What each delivery in flight sends (dropped when it ends) ...
        self._sending: dict[asyncio.Task[Outcome | None], tuple[DigestRow, str]] = {}
        # ... and the ended deliveries that were held back, with what they sent: their
        # outcome is not final until ``retry_held_back`` (or ``drain``) says.
        self._held: list[tuple[int, Outcome, DigestRow, str]] = []
        self.marks = SentMarks(runtime.store)

    @property
    def batch(self) -> int:
        """How many prepared digests to claim at once."""
        if not self.accepted:
            return 1
        return max(1, min(self.window // CLAIM_WINDOW_SHARE, CLAIM_BATCH))

    @property
    def idle(self) -> bool:
        """Nothing in flight: the network waits for the next claimed digest."""
        return not self._tasks

    async def room(self, count: int) -> None:
        """Wait until ``count`` more deliveries fit in the window."""
        while self._tasks and len(self._tasks) + count > (self.window if self.accepted else 1):
            await asyncio.wait(set(self._tasks), return_when=asyncio.FIRST_COMPLETED)

    async def _stop_when(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self.stop()

    def stop(self) -> None:
        """A stop (SIGTERM): no delivery starts from now on.

        The deliveries with no transaction under way (waiting for a session or a
        slot, or between two attempts) are cancelled at once: their digests stay
        claimed and are resent, same Message-ID, on the next start; a digest
        submitted later is not started either (``retry``). Those under way get
        ``STOP_GRACE_SECONDS`` in ``drain``, and one whose message is written
        whole is waited for up to ``stop_reply_wait``.
        """
        if self.stopping:
            return
        self.stopping = True
        self.mailer.stop_starting()
        for task in list(self._tasks):
            if not self.mailer.in_attempt(task):
                task.cancel()

    def awaiting_replies(self) -> int:
        """How many deliveries have written their message whole and wait for its reply."""
        return sum(1 for task in self._tasks if self.mailer.awaiting_reply(task))

    def _not_started(self, place: int, row: DigestRow,
                     work: Coroutine[Any, Any, Outcome | None]) -> None:
        work.close()
        self._done.append((place, Outcome(row.subscriber, "retry",
                                          "not sent: the dispatch is stopping", row.id,
                                          considered=row.considered)))

    async def submit(self, place: int, row: DigestRow, recipient: str,
                     work: Coroutine[Any, Any, Outcome | None]) -> None:
        """Start sending ``row`` (waits for a free slot first); ``place`` orders its outcome.

        After ``stop`` nothing starts: the digest stays claimed (``retry``).
        """
        if self.stopping:
            self._not_started(place, row, work)
            return
        await self._slots.acquire()
        if self.stopping:
            self._slots.release()
            self._not_started(place, row, work)
            return
        task = asyncio.create_task(_unit(self.runtime, recipient, work),
                                   name=f"{DELIVERY_TASK_PREFIX}{row.id}")
        self._tasks.add(task)
        self._places[task] = place
        self._sending[task] = (row, recipient)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Outcome | None]) -> None:
        self._tasks.discard(task)
        place = self._places.pop(task)
        self._slots.release()
        sending = self._sending.pop(task, None)
        self.runtime.progress_at = time.monotonic()
        if task.cancelled():  # a stop (or the dispatch's end) cut it: the digest stays claimed
            if sending is not None:  # said once, so its day is counted once (``_count_once``)
                row = sending[0]
                self._done.append((place, Outcome(row.subscriber, "retry",
                                                  "not sent: the dispatch is stopping", row.id,
                                                  considered=row.considered)))
            return
        error = task.exception()
        if error is not None:
            self._fatal = self._fatal or error
            for other in self._tasks:  # not a unit's own failure (the database): stop sending
                other.cancel()
            return
        outcome = task.result()
        if outcome is None:
            return
        self.accepted = self.accepted or outcome.status == "sent"
        if outcome.held_back and sending is not None:
            self._held.append((place, outcome, *sending))
        else:
            self._done.append((place, outcome))

    async def retry_held_back(self, stopped: Callable[[], bool]) -> None:
        """Send once more the digests refused before the server accepted any address.

        Waits for the deliveries in flight. When the server has accepted an
        address since (and is still usable), those refusals are about the
        addresses: each is sent again (its new outcome replaces the old one),
        and a refusal now is final. Otherwise they stay claimed (``retry``).
        """
        # Until they end, or a stop: then ``drain`` decides what to wait for.
        watch = set() if self._stop_watch is None else {self._stop_watch}
        while self._tasks and not self.stopping:
            await asyncio.wait({*self._tasks, *watch}, return_when=asyncio.FIRST_COMPLETED)
        if not self.accepted or self.mailer.unavailable is not None or stopped():
            return
        again, self._held = self._held, []
        for place, outcome, row, recipient in again:
            shown = outcome.shown
            log.info("subscriber %s: the server accepts addresses now; the digest of %s, "
                     "refused before it accepted any, is sent again", recipient, row.local_date)
            await self.submit(place, row, recipient,
                              deliver(self.runtime, self.mailer, row, recipient, shown=shown,
                                      marks=self.marks))

    def take_ended(self) -> list[tuple[int, Outcome]]:
        """The (place, outcome) pairs of the deliveries ended since the last call (so they
        are not held until ``drain``); the held-back ones stay until their retry."""
        ended, self._done = self._done, []
        return ended

    async def drain(self) -> list[tuple[int, Outcome]]:
        """Wait for every delivery in flight; their (place, outcome) pairs.

        When stopping: the deliveries under way get ``STOP_GRACE_SECONDS``; then
        those not waiting on the reply to a message written whole are cancelled,
        and those waiting are given up to ``stop_reply_wait`` (a relay may take a
        minute over a message: cancelled, it would be sent twice). Cancelled
        itself, it cancels every delivery in flight (their digests stay claimed).
        """
        try:
            if self._tasks and not self.stopping:
                await asyncio.wait(set(self._tasks))
            if self._tasks:
                await self._settle_stopping()
        except asyncio.CancelledError:
            for task in self._tasks:
                task.cancel()
            raise
        finally:
            if self._stop_watch is not None:
                self._stop_watch.cancel()
            if self.runtime.deliveries is self:
                self.runtime.deliveries = None
        outcomes = self.take_ended()
        outcomes.extend((place, outcome) for place, outcome, _, _ in self._held)
        self._held = []
        fatal, self._fatal = self._fatal, None
        try:
            self.marks.flush()  # every delivery that ended is marked before the dispatch ends
        except (StoreError, sqlite3.Error):
            if fatal is None:
                raise
            log.exception("dispatch: the digests sent could not be marked sent")
        if fatal is not None:
            raise fatal
        return outcomes


    async def _settle_stopping(self) -> None:
        """``drain`` after ``stop``: see there."""
        await asyncio.wait(set(self._tasks), timeout=STOP_GRACE_SECONDS)
        for task in list(self._tasks):
            if not self.mailer.awaiting_reply(task):
                task.cancel()
        waiting = {task for task in self._tasks if not task.cancelled()}
        if waiting:
            limit = stop_reply_wait(self.runtime.config.smtp)
            log.info("dispatch: stopping: waiting up to %gs for the server's reply to %d "
                     "message(s) sent whole (the relay may be taking them; cancelled now, they "
                     "would be sent twice)", limit, len(waiting))
            await asyncio.wait(waiting, timeout=limit)
        for task in list(self._tasks):  # no reply in time: the digest stays claimed
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks))


async def _resend_unsent(runtime: Runtime, mailer: Mailer, deliveries: Deliveries,
                         subscribers: Sequence[Subscriber], stopped: Callable[[], bool],
                         placed: list[tuple[int, Outcome]]) -> list[DigestRow]:
    """Resend the digests left claimed (by this process, or by one that has stopped).

    Returns the rows of this dispatch's subscribers looked at. Those not tried
    (the server went away, or the dispatch is stopping) get a ``retry``
    outcome in ``placed``: they stay claimed and are resent next time.
    """
    unsent = runtime.store.unsent_digests()
    if not unsent:  # the usual case: no look-up of 100,000 addresses built for nothing
        return []
    wanted = {s.email.lower(): s.email for s in subscribers}
    rows = [row for row in unsent if row.subscriber in wanted]
    for row in rows:
        if stopped() or mailer.unavailable is not None:
            reason = _reason(mailer.unavailable) if mailer.unavailable is not None else \
                "the dispatch is stopping"
            placed.append((0, Outcome(row.subscriber, "retry", reason, row.id,
                                      considered=row.considered)))
            continue
        await deliveries.submit(0, row, row.subscriber,
                                _resend(runtime, mailer, row, wanted[row.subscriber],
                                        deliveries.marks))
    return rows


def _collect(outcomes: Outcomes, placed: list[tuple[int, Outcome]],
             deliveries: Deliveries) -> None:
    """Move the outcomes settled so far into ``outcomes``: those in ``placed`` and the ended
    deliveries' (which ``drain`` would otherwise hold to the end)."""
    outcomes.add_pairs(placed)
    outcomes.add_pairs(deliveries.take_ended())


def _count_once(outcomes: Outcomes, pending: Sequence[DigestRow]) -> None:
    """Drop from ``outcomes`` the ``already-sent`` of a day whose claimed digest was resent.

    A digest left claimed makes its day look sent to ``due``; the resend's own
    outcome (sent, retry, failed, ...) is what happened to it, so the day is
    counted once, in that bucket (issue 13). A resend that left the claim to
    its living owner (no outcome) keeps the ``already-sent``.
    """
    if not pending:
        return
    days = {row.id: (row.subscriber, row.local_date) for row in pending}
    resent: dict[str, date] = {}
    for _, outcome in outcomes.placed():
        if outcome.digest_id in days and outcome.status != "already-sent":
            who, day = days[outcome.digest_id]
            resent[who] = max(day, resent.get(who, day))
    if not resent:
        return
    twice = [(place, outcome) for place, outcome in outcomes.placed()
             if outcome.status == "already-sent" and outcome.local_date is not None
             and resent.get(outcome.subscriber.lower(), date.min) >= outcome.local_date]
    for place, outcome in twice:
        outcomes.discard(place, outcome)


async def _claim_and_send(runtime: Runtime, deliveries: Deliveries,
                          batch: list[tuple[int, Ready]],
                          placed: list[tuple[int, Outcome]], *, now: datetime | None = None,
                          force: bool = False) -> None:
    """Claim a batch of prepared digests in one transaction, then start sending each.

    A digest whose day another process claimed meanwhile is ``already-sent``.
    When the mail server went away after the claim, the claimed digests wait
    for the next dispatch (``retry``), which resends the same bytes. After a
    reload during the dispatch, the digests it took back are not claimed
    (``reloaded_verdict``; ``now`` and ``force`` are the dispatch's).
    """
    mailer = deliveries.mailer
    await deliveries.room(len(batch))
    if deliveries.stopping:  # SIGTERM came while waiting for room: claim nothing more
        return
    batch = _still_wanted(runtime, batch, placed, now or utc_now(), force)
    if not batch:
        return
    if mailer.unavailable is not None:  # the server went away meanwhile: claim nothing
        placed.extend((place, Outcome(prepared.subscriber.email, "deferred",
                                      _reason(mailer.unavailable)))
                      for place, prepared in batch)
        return
    for (place, prepared), row in zip(batch, _claim_each(runtime, batch), strict=True):
        email = prepared.subscriber.email
        if isinstance(row, Outcome):
            placed.append((place, row))
        elif row is None:
            placed.append((place, Outcome(email, "already-sent",
                                          local_date=prepared.local_date)))
        elif mailer.unavailable is not None:
            placed.append((place, Outcome(email, "retry", _reason(mailer.unavailable), row.id,
                                          prepared.shown, prepared.considered)))
        else:
            await deliveries.submit(place, row, email, deliver(
                runtime, mailer, row, email, shown=prepared.shown,
                marks=deliveries.marks))


def only_all(runtime: Runtime, subscribers: Sequence[Subscriber]) -> bool:
    """Whether this dispatch is for everyone (``--user`` sends one digest, nothing else)."""
    return len(subscribers) == len(runtime.config.subscribers)


def _after_dispatch(runtime: Runtime, mailer: Mailer, outcomes: Outcomes,
                    now: datetime) -> None:
    """Hold sending after a configuration error; remember a line for STATUS=."""
    counts = outcomes.counts()
    error = mailer.unavailable
    if error is not None and error.kind == "config":
        runtime.hold_smtp(error, now)
    elif counts.get("sent"):
        runtime.smtp_hold = None
    if runtime.last_dispatch and not counts.keys() - IDLE_OUTCOMES:
        return  # an idle tick: STATUS= keeps the last dispatch that did something
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "nothing due"
    runtime.last_dispatch = f"last dispatch {now.strftime('%Y-%m-%d %H:%M UTC')}: {summary}"
    # One line per dispatch that did something (a subscriber's own lines say what it was;
    # "no new papers" is a debug line each, counted here as "empty").
    log.info("dispatch: %s", summary)


async def _unit(runtime: Runtime, who: str, work: Awaitable[T]) -> T | Outcome:
    """Run one unit (a subscriber's digest): whatever it raises is its own failure.

    Re-raises only what is not the unit's: a full or read-only disk
    (``StoreWriteError``: the dispatch stops and is tried again next tick) and
    a database that fails ``Store.probe`` (unusable: the daemon stops).
    """
    try:
        return await work
    except StoreWriteError:
        raise
    except (StoreError, sqlite3.Error) as exc:
        runtime.store.probe()  # unusable: StoreError, the daemon's own failure
        reason = _exc_reason(exc)
        log.error("subscriber %s: the digest failed on its data in the state database: %s",
                  who, reason)
        return Outcome(who, "failed", reason)
    except ConfigError:
        raise  # a missing password: the whole dispatch's problem, not this subscriber's
    except Exception as exc:  # a bug or bad data for one subscriber: theirs alone
        reason = _exc_reason(exc)
        log.error("subscriber %s: the digest failed: %s", who, reason, exc_info=exc)
        return Outcome(who, "failed", reason)


def _exc_reason(exc: BaseException) -> str:
    """A readable one-line reason: the exception's kind and message, escaped and bounded."""
    text = str(exc) if not isinstance(exc, RecursionError) else "nesting too deep"
    text = text.encode("unicode_escape", "backslashreplace").decode("ascii")
    if len(text) > MAX_REASON:
        text = text[:MAX_REASON] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _reason(error: SendError) -> str:
    return str(error).removeprefix(f"{error.recipient}: ")


async def _send_claimed(mailer: Mailer, row: DigestRow, recipient: str) -> None:
    """The claimed bytes, sent as they are (the same Message-ID on every attempt).

    SMTPUTF8 is asked for exactly when the address is not ASCII: the renderer
    wrote UTF-8 headers for such a recipient, and only for one.
    """
    await mailer.send_bytes(row.message, recipients=[recipient],
                            smtputf8=not recipient.isascii(), label=row.message_id,
                            tried_before=row.attempts > 0)


async def _resend(runtime: Runtime, mailer: Mailer, row: DigestRow,
                  recipient: str, marks: SentMarks | None = None) -> Outcome | None:
    """A digest claimed and not marked sent: resend the stored bytes (same Message-ID).

    Only by its owner, or, when another process claimed it, once that owner is
    known dead: this process holds the state lock, which every sender holds
    while it sends, and the owner's pid is not alive on this host (``owner_alive``);
    otherwise the claim is left alone (None).
    """
    store = runtime.store
    if row.owner != runtime.owner:
        lock = runtime.lock
        if lock is None or not lock.held or owner_alive(row.owner):
            return None  # its owner lives: only it resends, never a second copy from here
        if not store.take_over_claim(row.id, row.owner, runtime.owner):
            return None
        log.info("subscriber %s: the digest of %s was claimed by %s, which has stopped; "
                 "this process (%s) sends it", row.subscriber, row.local_date,
                 row.owner or "an older version", runtime.owner)
    if store.subscriber_state(row.subscriber).unsubscribed:
        store.mark_failed(row.id, "not sent: unsubscribed before delivery", permanent=True)
        log.info("subscriber %s: unsubscribed; the pending digest of %s is dropped",
                 row.subscriber, row.local_date)
        return Outcome(row.subscriber, "unsubscribed", "", row.id)
    log.info("subscriber %s: resending the digest of %s (claimed at %s, %s)", row.subscriber,
             row.local_date, row.claimed_at, row.message_id)
    return await deliver(runtime, mailer, row, recipient, marks=marks)


@dataclass(frozen=True)
class PrepareJob:
    """A digest to prepare: what crosses to a prepare worker (a few hundred bytes)."""

    subscriber: Subscriber  # the effective subscriber (reply-set state applied)
    local_date: date


@dataclass(frozen=True)
class Unprepared:
    """Why no digest was prepared: ``empty`` (nothing new) or a failure and its reason.

    ``status`` is ``empty``, ``digest-error`` (a ``DigestError``: the data cannot
    make a digest), ``store-error`` (the database refused a read) or ``error``
    (a bug or bad data); ``trace`` is a worker's traceback text for the log.
    """

    status: str
    reason: str = ""
    corpus_seq: int = 0
    trace: str = ""


async def _prepare_one(
    runtime: Runtime, sub: Subscriber, now: datetime, force: bool, dry_run: bool
) -> Ready | Outcome:
    """The subscriber's digest ranked and rendered when it is due, else what happened instead."""
    job = await _judge_one(runtime, sub, now, force)
    if isinstance(job, Outcome):
        return job
    return await _prepare_here(runtime, job, now, dry_run=dry_run)


async def _judge_one(runtime: Runtime, sub: Subscriber, now: datetime, force: bool, *,
                     library: bool = False) -> PrepareJob | Outcome:
    """Whether the subscriber's digest is to be prepared now (a job), else what happened.

    ``library=True`` imports a changed library file here, for a job prepared by a
    worker that only reads.
    """
    state = runtime.store.subscriber_state(sub.email)
    sub = effective_subscriber(sub, state)
    verdict = due(runtime, sub, now, force=force, state=state)  # no second read of the row
    if verdict.status == "late":
        was_empty = runtime.empty_days.seq(sub.email, verdict.local_date) is not None
        if runtime.first_time(sub.email, verdict.local_date, "late") and not was_empty:
            log.warning("subscriber %s: the %s send time (%s) passed more than %s ago; "
                        "that day is skipped", sub.email, verdict.local_date,
                        _when(verdict.scheduled), _hours(runtime.config.max_late))
        return Outcome(sub.email, "late")
    if verdict.status != "due":
        return Outcome(sub.email, verdict.status, local_date=verdict.local_date)
    if not sub.send_empty and (runtime.empty_days.seq(sub.email, verdict.local_date)
                               == runtime.store.corpus_seq()):
        return Outcome(sub.email, "empty")  # nothing was added since we last looked
    if library:
        refresh_library(runtime.store, sub)
    return PrepareJob(sub, verdict.local_date)


async def _prepare_here(runtime: Runtime, job: PrepareJob, now: datetime, *,
                        dry_run: bool = False, library: bool = True) -> Ready | Outcome:
    """Prepare a job in this process (the in-loop path, or a dead worker's job)."""
    await runtime.refresh_corpus_index()
    result: Prepared | Unprepared | None
    try:
        result = prepare(runtime, job.subscriber, now, job.local_date, library=library)
    except DigestError as exc:
        result = Unprepared("digest-error", str(exc))
    return _settle(runtime, job, result, dry_run=dry_run)


def _settle(runtime: Runtime, job: PrepareJob,
            result: Prepared | Ready | Unprepared | None, *,
            dry_run: bool = False) -> Ready | Outcome:
    """A prepared digest, or the outcome (and log line) for what came instead.

    The same for a digest prepared here and one a worker prepared, so a
    subscriber's failure reads the same either way.
    """
    sub = job.subscriber
    if isinstance(result, Unprepared):
        if result.status == "digest-error":
            log.error("subscriber %s: cannot build the digest: %s", sub.email, result.reason)
            return Outcome(sub.email, "failed", result.reason)
        if result.status == "store-error":
            runtime.store.probe()  # unusable: StoreError, the daemon's own failure
            log.error("subscriber %s: the digest failed on its data in the state database: %s",
                      sub.email, result.reason)
            return Outcome(sub.email, "failed", result.reason)
        if result.status == "error":
            log.error("subscriber %s: the digest failed: %s\n%s", sub.email, result.reason,
                      result.trace.rstrip())
            return Outcome(sub.email, "failed", result.reason)
    if result is None or isinstance(result, Unprepared):  # nothing new for the day
        seq = result.corpus_seq if result is not None else runtime.store.corpus_seq()
        runtime.empty_days.note(sub.email, job.local_date, seq)
        log.debug("subscriber %s: no new papers for %s; nothing sent (looked again when "
                  "papers arrive)", sub.email, job.local_date)
        return Outcome(sub.email, "empty")
    runtime.empty_days.forget(sub.email, job.local_date)
    ready = result.ready() if isinstance(result, Prepared) else result
    if dry_run:
        return Outcome(sub.email, "dry-run", ready.subject, None, ready.shown, ready.considered)
    return ready


# --- preparing in worker processes ----------------------------------------------

# A dispatch with at least this many digests to prepare forks the prepare workers. Measured
# (README "Scaling"): at 30 digests the fork, the pipes and the pickling cost ~0.03 CPU s and
# the dispatch already ends sooner (0.63 s against 1.14 s in the loop); a tick with a
# handful due stays in the loop, where a fork would cost more than it saves.
PREPARE_WORKER_MIN = 30


class _WorkerSide:
    """What a prepare worker holds: its own read-only store, the fitted index inherited.

    Built in the parent before the fork (nothing is pickled); ``setup`` and
    ``build`` run in the forked child only.
    """

    def __init__(self, runtime: Runtime, now: datetime) -> None:
        self.parent = runtime
        self.now = now
        self.runtime: Runtime | None = None

    def setup(self) -> None:
        parent = self.parent
        if parent.lock is not None:
            parent.lock.forget_in_child()  # the parent's lock must end with the parent
        # The inherited connection is the parent's: never used here (SQLite forbids it).
        self.runtime = Runtime(parent.config, Store.reader(parent.config.state),
                               models=parent.models, _index=parent._index,
                               _index_seq=parent._index_seq, _recent=parent._recent,
                               owner=parent.owner)

    def build(self, job: PrepareJob) -> Ready | Unprepared:
        """The job's digest, or why there is none; never raises (a failure is an answer)."""
        runtime = self.runtime
        if runtime is None:  # pragma: no cover - setup runs first
            return Unprepared("error", "RuntimeError: the worker was not set up")
        try:
            prepared = prepare(runtime, job.subscriber, self.now, job.local_date, library=False)
        except DigestError as exc:
            return Unprepared("digest-error", str(exc))
        except sqlite3.Error as exc:
            return Unprepared("store-error", _exc_reason(exc))
        except Exception as exc:  # noqa: BLE001 - a bug or bad data: this subscriber's alone,
            return Unprepared("error", _exc_reason(exc), trace=traceback.format_exc())  # logged there
        if prepared is None:
            return Unprepared("empty", corpus_seq=runtime.store.corpus_seq())
        return prepared.ready()  # the papers stay here: see ``Ready``


Workers = PrepareWorkers[PrepareJob, Ready | Unprepared]


def memo_affinity(job: PrepareJob) -> int:
    """Which prepare worker the job prefers (modulo their count): equal for jobs whose
    preparing shares memo keys, so that one worker's memos serve them all.

    The smallest CRC-32 of the subscriber's interest phrases (stripped, lower
    case) and seed papers; 0 with neither. Subscribers with the same interests
    (whose first digests share one ranking, ``rank.SHARED_RESULT_ENTRIES``)
    always get the same value; two subscribers whose interests overlap get it
    with a chance of their Jaccard similarity (the min-hash property, Broder
    1997), so a phrase's memoised block is mostly filled by one worker. The
    hash is CRC-32, not ``hash``: the same on every run, for tests and reruns.
    """
    sub = job.subscriber
    keys = [phrase.strip().lower() for phrase in sub.interests]
    keys.extend(f"seed:{seed}" for seed in sub.seed_papers)
    return min((zlib.crc32(key.encode()) for key in keys if key), default=0)


async def _start_workers(runtime: Runtime, now: datetime, to_look_at: int,
                         dry_run: bool, stopped: Callable[[], bool]) -> Workers | None:
    """Fork the prepare workers when the dispatch is large enough, else None (in the loop).

    The corpus index is fitted first, so the workers share it copy-on-write. A
    worker that cannot be started leaves the preparing to this process.
    """
    count = runtime.config.prepare_workers
    if dry_run or count < 1 or to_look_at < PREPARE_WORKER_MIN:
        return None
    await runtime.refresh_corpus_index()
    if stopped():  # the fit takes seconds: a SIGTERM meanwhile forks nothing
        return None
    side = _WorkerSide(runtime, now)
    # The loop does not prepare queued digests itself while it waits (tried: it claimed
    # subscribers late in the config before the first ones, and a reload during the
    # dispatch then found them sent; README "Scaling").
    workers: Workers = PrepareWorkers(side.build, side.setup, count=count, stopping=stopped,
                                      affinity=memo_affinity)
    try:
        workers.start()
    except OSError as exc:
        log.warning("dispatch: cannot start a prepare worker (%s); digests are prepared in "
                    "the dispatching process", exc)
        return None
    log.info("dispatch: %d prepare worker(s) for %d subscribers (pid %s)", count, to_look_at,
             ", ".join(str(pid) for pid in workers.pids))
    return workers


async def _from_worker(runtime: Runtime, workers: Workers,
                       now: datetime) -> tuple[int, Ready | Outcome]:
    """The next answer of the workers, as the loop would have prepared it."""
    place, job, answer = await workers.next()
    email = job.subscriber.email
    if answer is None:  # its worker died first: prepared here (the library is imported)
        return place, await _unit(runtime, email, _prepare_here(runtime, job, now,
                                                                library=False))
    return place, await _unit(runtime, email, _settled_async(runtime, job, answer))


async def _settled_async(runtime: Runtime, job: PrepareJob,
                         answer: Ready | Unprepared) -> Ready | Outcome:
    return _settle(runtime, job, answer)


# --- confirmations ------------------------------------------------------------


async def send_confirmations(runtime: Runtime, mailer: Mailer,
                             stop: asyncio.Event | None = None) -> list[Outcome]:
    """Send the reply confirmations queued in the store, each its own unit.

    A confirmation the server refuses (5xx) or that fails ``CONFIRMATION_ATTEMPTS``
    times is given up; anything else it raises is recorded as its failure and
    given up (it would fail the same way again); a server or configuration
    failure leaves the rest queued for the next dispatch.
    """
    store = runtime.store
    outcomes: list[Outcome] = []
    for row in store.pending_confirmations():
        if (stop is not None and stop.is_set()) or mailer.unavailable is not None:
            break
        try:
            message = message_from_bytes(row.message, policy=EMAIL_POLICY)
            await mailer.send(message)
        except SendError as exc:
            give_up = exc.permanent or (not exc.session
                                        and row.attempts + 1 >= CONFIRMATION_ATTEMPTS)
            store.mark_confirmation(row.id, sent=False, error=str(exc), give_up=give_up)
            log.warning("subscriber %s: confirmation %d %s: %s", row.subscriber, row.id,
                        "given up" if give_up else "not sent yet", exc)
            outcomes.append(Outcome(row.subscriber, "confirmation-failed", str(exc)))
            continue
        except (StoreError, sqlite3.Error, ConfigError):
            raise
        except Exception as exc:  # a confirmation that cannot be read or sent: its own failure
            reason = _exc_reason(exc)
            log.error("subscriber %s: confirmation %d failed and is given up: %s",
                      row.subscriber, row.id, reason, exc_info=exc)
            store.mark_confirmation(row.id, sent=False, error=reason, give_up=True)
            outcomes.append(Outcome(row.subscriber, "confirmation-failed", reason))
            continue
        store.mark_confirmation(row.id, sent=True)
        outcomes.append(Outcome(row.subscriber, "confirmation-sent"))
    return outcomes


def _span(delta: timedelta) -> str:
    minutes = delta.total_seconds() / 60
    return f"{minutes:g} min" if minutes < 60 else f"{minutes / 60:g} h"


def _when(moment: datetime | None) -> str:
    return moment.strftime("%H:%M %Z") if moment is not None else "?"


def _hours(span: timedelta) -> str:
    hours = span.total_seconds() / 3600
    return f"{hours:g} h"
