"""The daemon: the jobs that wire the stages together, and the loop that runs them.

``scan`` (inbox -> store) and ``dispatch`` (store -> rank -> render -> send)
are plain functions that both the scheduler of ``digest run`` and the one-shot
CLI commands call, so ``digest send --dry-run`` runs exactly what the daemon's
dispatch runs, minus the SMTP conversation. ``status_report`` is what
``digest status`` shows.

APScheduler is only the timer. Who is due and what was sent live in the
store. A subscriber is due when the latest scheduled send time (their local
``send_at`` on one of their ``days``) has passed, no more than ``max_late``
ago, and no digest exists for that local date (or a later one). A daemon that
was down over a send time therefore sends once when it comes back, whatever
the number of ticks it missed; later than ``max_late`` the day is skipped.

Exactly once: a digest is claimed in the store (with its rendered message)
before the SMTP conversation and marked sent after it. A digest left claimed
(a crash between the two, or a 4xx answer) is resent, byte for byte with the
same Message-ID, on the next dispatch; the daemon reports such digests when it
starts. Only a crash in the instant between the server's "250 OK" and the
commit can make a subscriber receive a message twice, and then both copies
carry the same Message-ID, which mail clients use to de-duplicate.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sqlite3
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from datetime import time as dt_time
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from .config import DEFAULT_REPLY_POLL_SECONDS, WEEKDAYS, Config, Subscriber, load_config
from .errors import DigestError, SendError, StoreError
from .ingest import FAILED_DIR, IngestResult, scan_inbox
from .mailer import LocalSink, Mailer
from .rank import CorpusIndex, ModelCache, Profile, Ranked, is_personalised, rank
from .render import DigestContent, DigestItem, message_id_for, new_token, render_digest
from .store import DigestRow, ItemRow, Store, SubscriberState, utc_now

log = logging.getLogger(__name__)

# A subscriber new to the store gets the papers of the last week, not the whole archive.
FIRST_DIGEST_WINDOW = timedelta(days=7)
# How far back the latest scheduled send is looked for: a week covers any set of days.
SCHEDULE_LOOKBACK_DAYS = 7
# After SIGTERM, how long the job in flight may take to finish before it is cancelled
# (its digest then stays claimed and is resent with the same Message-ID on the next start).
STOP_GRACE_SECONDS = 5.0
# ``digest status`` asks an IMAP server for its unseen count, but does not wait long.
STATUS_IMAP_TIMEOUT = 5.0
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


@dataclass(frozen=True)
class Due:
    """Whether a subscriber is due now, and for which of their local dates."""

    status: str  # due | unsubscribed | paused | not-due | already-sent | late
    local_date: date  # the day the digest is (or would be) for
    scheduled: datetime | None = None  # that day's send time; None with --force


# --- scanning -----------------------------------------------------------------


def scan(runtime: Runtime) -> list[IngestResult]:
    config = runtime.config
    return scan_inbox(runtime.store, config.inbox, stable_seconds=config.stable_seconds)


# --- who is due ---------------------------------------------------------------


def local_now(sub: Subscriber, now: datetime) -> datetime:
    return now.astimezone(sub.timezone)


def send_time(sub: Subscriber, day: date) -> datetime:
    """The subscriber's send time on ``day``, as an aware datetime (DST-correct).

    On a fall-back day a send time in the repeated hour means its first
    occurrence (``fold=0``); since a day is sent at most once, the second
    occurrence sends nothing. A send time inside a spring-forward gap does not
    exist: it becomes the first real instant after the gap (02:30 on a day the
    clocks jump from 02:00 to 03:00 sends at 03:00), so the day is not skipped.
    """
    naive = datetime.combine(day, sub.send_at)
    aware = naive.replace(tzinfo=sub.timezone)
    if aware.astimezone(UTC).astimezone(sub.timezone).replace(tzinfo=None) == naive:
        return aware
    # In a gap: fold=1 reads the time with the offset after the jump (an instant
    # before the gap), fold=0 with the offset before it (an instant after the gap).
    before = naive.replace(tzinfo=sub.timezone, fold=1).astimezone(UTC)
    after = aware.astimezone(UTC)
    offset_after = after.astimezone(sub.timezone).utcoffset()
    while after - before > timedelta(seconds=1):  # bisect for the instant of the jump
        middle = before + (after - before) / 2
        if middle.astimezone(sub.timezone).utcoffset() == offset_after:
            after = middle
        else:
            before = middle
    return after.replace(microsecond=0).astimezone(sub.timezone)


def latest_send_time(sub: Subscriber, now: datetime) -> tuple[date, datetime] | None:
    """The subscriber's most recent scheduled send at or before ``now``: (local date, time)."""
    today = local_now(sub, now).date()
    for back in range(SCHEDULE_LOOKBACK_DAYS + 1):
        day = today - timedelta(days=back)
        if day.weekday() in sub.days:
            scheduled = send_time(sub, day)
            if scheduled <= now:
                return day, scheduled
    return None


def next_send_time(sub: Subscriber, after: datetime) -> datetime:
    """The subscriber's first scheduled send strictly after ``after``."""
    day = local_now(sub, after).date()
    for ahead in range(SCHEDULE_LOOKBACK_DAYS + 2):
        candidate = day + timedelta(days=ahead)
        if candidate.weekday() in sub.days:
            scheduled = send_time(sub, candidate)
            if scheduled > after:
                return scheduled
    raise ValueError(f"subscriber {sub.email}: no send day in a week")  # days is never empty


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


def due(runtime: Runtime, sub: Subscriber, now: datetime, *, force: bool = False) -> Due:
    """Whether ``sub`` (the effective subscriber, reply-set state applied) is due now.

    Without ``force`` the day looked at is the one of the latest scheduled send
    time, which may be yesterday's for a daemon that was down over midnight.
    ``force`` ignores the time of day and the weekday, never the one-digest-a-day rule.
    """
    store = runtime.store
    today = local_now(sub, now).date()
    state = store.subscriber_state(sub.email)
    if state.unsubscribed:
        return Due("unsubscribed", today)
    if is_paused(state, today):
        return Due("paused", today)
    if force:
        status = "already-sent" if store.digest_on(sub.email, today) is not None else "due"
        return Due(status, today)
    latest = latest_send_time(sub, now)
    if latest is None:  # pragma: no cover - days is never empty
        return Due("not-due", today)
    day, scheduled = latest
    newest = store.digests_of(sub.email, limit=1)
    if newest and newest[0].local_date >= day:
        return Due("already-sent", day, scheduled)
    if is_paused(state, day):
        return Due("paused", day, scheduled)
    if now - scheduled > runtime.config.max_late:
        return Due("late", day, scheduled)
    return Due("due", day, scheduled)


def due_status(runtime: Runtime, sub: Subscriber, now: datetime, *, force: bool) -> str:
    """``due``, or why not: ``unsubscribed``, ``paused``, ``not-due``, ``already-sent``, ``late``."""
    return due(runtime, sub, now, force=force).status


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
    profile = build_profile(store, sub)
    ranked: list[Ranked] = []
    if candidates:
        ranked = rank(runtime.corpus_index(), profile, [p.id for p in candidates],
                      limit=sub.max_papers, settings=runtime.config.ranking,
                      cache=runtime.models, key=sub.email.lower())
    by_id = {p.id: p for p in candidates}
    items = tuple(
        DigestItem(position=i, paper=by_id[r.paper_id], score=r.score, reason=r.reason,
                   explore=r.explore)
        for i, r in enumerate(ranked, start=1)
    )
    content = DigestContent(
        subscriber=sub,
        token=new_token(),
        local_date=local_date or local_now(sub, now).date(),
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


# --- status -------------------------------------------------------------------


def subscriber_status(runtime: Runtime, sub: Subscriber, now: datetime) -> dict[str, Any]:
    """One subscriber's state, schedule, last digest and feedback, for ``digest status``."""
    store = runtime.store
    state = store.subscriber_state(sub.email)
    sub = effective_subscriber(sub, state)
    today = local_now(sub, now).date()
    if state.unsubscribed:
        label = "unsubscribed"
    elif state.bouncing:
        label = "bouncing"
    elif is_paused(state, today):
        label = "paused"
    else:
        label = "active"
    next_send: datetime | None = None
    if not state.unsubscribed:
        verdict = due(runtime, sub, now)
        if verdict.status == "due" and verdict.scheduled is not None:
            next_send = verdict.scheduled  # overdue: the next dispatch sends it
        else:
            next_send = next_send_time(sub, now)
            if state.paused and state.paused_until is None:
                next_send = None  # paused until they reply "resume"
            while next_send is not None and is_paused(state, local_now(sub, next_send).date()):
                next_send = next_send_time(sub, next_send)
    last = store.digests_of(sub.email, limit=1)
    feedback = store.latest_feedback(sub.email)
    return {
        "email": sub.email,
        "state": label,
        "paused_until": state.paused_until.isoformat() if state.paused_until else None,
        "bounce_reason": state.bounce_reason,
        "send_at": sub.send_at.strftime("%H:%M"),
        "timezone": sub.timezone.key,
        "days": [WEEKDAYS[d] for d in sorted(sub.days)],
        "next_send_local": next_send.isoformat() if next_send else None,
        "next_send_utc": next_send.astimezone(UTC).isoformat() if next_send else None,
        "last_digest": None if not last else {
            "local_date": last[0].local_date.isoformat(),
            "status": last[0].status,
            "items": len(store.digest_items(last[0].id)),
            "considered": last[0].considered,
            "sent_at": last[0].sent_at,
            "error": last[0].error,
        },
        "likes": sum(row.signal == "like" for row in feedback),
        "skips": sum(row.signal == "skip" for row in feedback),
    }


def status_report(config: Config, store: Store, now: datetime | None = None) -> dict[str, Any]:
    """Everything ``digest status`` shows, as plain data (``--json`` prints it as is)."""
    now = now or utc_now()
    runtime = Runtime(config, store)
    failed_dir = config.inbox / FAILED_DIR
    failed = sorted(p.name for p in failed_dir.iterdir()
                    if p.is_file() and not p.name.endswith(".reason")) \
        if failed_dir.is_dir() else []
    return {
        "now_utc": now.astimezone(UTC).isoformat(timespec="seconds"),
        "config": str(config.path),
        "state": str(config.state),
        "subscribers": [subscriber_status(runtime, sub, now) for sub in config.subscribers],
        "unsent_digests": [
            {"subscriber": row.subscriber, "local_date": row.local_date.isoformat(),
             "claimed_at": row.claimed_at, "attempts": row.attempts, "error": row.error}
            for row in store.unsent_digests()
        ],
        "recent_ingests": [
            {"path": d.path, "format": d.format, "papers": d.papers, "new_papers": d.new_papers,
             "ingested_at": d.ingested_at}
            for d in store.recent_dumps(5)
        ],
        "papers": store.paper_count(),
        "failed_dumps": failed,
        "replies_waiting": replies_waiting(config),
    }


def replies_waiting(config: Config) -> dict[str, Any] | None:
    """Replies not yet read, as the reply tick would see them; None without [imap]/[maildir].

    A Maildir is counted (new/ and unseen cur/). An IMAP mailbox is asked for its
    UNSEEN count with a short timeout; when it cannot be reached the count is
    None ("unknown") and ``error`` says why.
    """
    if config.maildir is None and config.imap is None:
        return None
    try:
        from .replies.mailboxes import ImapMailbox, MaildirMailbox
    except ImportError as exc:  # pragma: no cover - a broken install
        return {"source": "imap" if config.imap else "maildir", "count": None, "error": str(exc)}
    if config.maildir is not None:
        where = str(config.maildir.path)
        try:  # not open(): that would create the folders
            count: int | None = len(MaildirMailbox(config.maildir).waiting_ids())
        except DigestError as exc:
            return {"source": "maildir", "path": where, "count": None, "error": str(exc)}
        return {"source": "maildir", "path": where, "count": count}
    if config.imap is None:  # pragma: no cover - one of the two is set (checked above)
        return None
    imap = replace(config.imap, timeout=min(config.imap.timeout, STATUS_IMAP_TIMEOUT))
    where = f"{imap.username}@{imap.host}:{imap.port}/{imap.mailbox}"
    try:
        with ImapMailbox(imap) as mailbox:
            count = len(mailbox.waiting_ids())
    except DigestError as exc:
        return {"source": "imap", "path": where, "count": None, "error": str(exc)}
    return {"source": "imap", "path": where, "count": count}


def format_status(report: dict[str, Any]) -> str:
    """The human-readable ``digest status``."""
    lines = [(f"{report['config']}: state {report['state']}, {report['papers']} papers, "
              f"now {report['now_utc']}")]
    for sub in report["subscribers"]:
        state = sub["state"]
        if state == "paused" and sub["paused_until"]:
            state += f" until {sub['paused_until']}"
        if state == "bouncing" and sub["bounce_reason"]:
            state += f" ({sub['bounce_reason']})"
        lines.append(f"- {sub['email']}: {state}")
        if sub["next_send_local"]:
            local = datetime.fromisoformat(sub["next_send_local"])
            utc = datetime.fromisoformat(sub["next_send_utc"])
            lines.append(f"    next send  {local:%a %Y-%m-%d %H:%M} {sub['timezone']}"
                         f" ({utc:%H:%M} UTC)")
        last = sub["last_digest"]
        if last is None:
            lines.append("    last       none yet")
        else:
            extra = f": {last['error']}" if last["error"] else ""
            lines.append(f"    last       {last['local_date']} {last['status']}, "
                         f"{last['items']} of {last['considered']} papers{extra}")
        lines.append(f"    feedback   {sub['likes']} liked, {sub['skips']} skipped")
    for row in report["unsent_digests"]:
        lines.append(f"pending: {row['subscriber']} digest of {row['local_date']} claimed "
                     f"{row['claimed_at']}, {row['attempts']} attempt(s)"
                     + (f": {row['error']}" if row["error"] else ""))
    lines.append("recent ingests:" if report["recent_ingests"] else "recent ingests: none")
    for dump in report["recent_ingests"]:
        lines.append(f"    {dump['ingested_at']}  {Path(dump['path']).name}: "
                     f"{dump['papers']} papers, {dump['new_papers']} new ({dump['format']})")
    failed = report["failed_dumps"]
    lines.append(f"failed dumps waiting in failed/: {len(failed)}"
                 + (f" ({', '.join(failed)})" if failed else ""))
    replies = report["replies_waiting"]
    if replies is None:
        lines.append("replies waiting: (no [imap] or [maildir] configured)")
    else:
        count = "unknown" if replies["count"] is None else replies["count"]
        why = f": {replies['error']}" if replies.get("error") else ""
        lines.append(f"replies waiting: {count} ({replies['source']} {replies['path']}){why}")
    return "\n".join(lines)


# --- the daemon loop ----------------------------------------------------------


class Daemon:
    """``digest run``: timer ticks for scan, dispatch and replies; signals for reload and stop.

    Every job that writes to the store (scan, dispatch, a reply run, a reload)
    runs on the event loop thread under one lock, so the single SQLite
    connection has one writer at a time and a reload never lands mid-dispatch.
    APScheduler's jobs only start those tasks: they are ours, so stopping the
    scheduler never cancels a message in flight.
    """

    def __init__(self, config_path: str | os.PathLike[str], config: Config | None = None):
        self.config_path = config_path
        self.config = config if config is not None else load_config(config_path)
        self.sink: LocalSink | None = None
        self.stop = asyncio.Event()
        self.exit_code = 0
        self._runtime: Runtime | None = None
        self._busy = asyncio.Lock()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._scheduler: Any = None
        self._reply_task: asyncio.Task[None] | None = None
        self._said_schedule = False

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            raise RuntimeError("the daemon is not running")
        return self._runtime

    async def run(self) -> int:
        from apscheduler.schedulers.asyncio import AsyncIOScheduler

        self.config.smtp.password()  # a missing secret stops the start, not every send
        config = self._start_sink(self.config)
        try:
            store = Store(config.state)
        except BaseException:
            self._stop_sink()
            raise
        self._runtime = Runtime(config, store)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._request_stop, signum)
        loop.add_signal_handler(signal.SIGHUP, self._request_reload)
        self._scheduler = scheduler = AsyncIOScheduler(event_loop=loop)
        for name, seconds in self._intervals(config).items():
            scheduler.add_job(self._kick, "interval", args=[name], seconds=seconds, id=name,
                              max_instances=1, coalesce=True, misfire_grace_time=None)
        log.info("daemon: started (pid %d): inbox %s, state %s, subscribers: %d, scan every "
                 "%gs, dispatch every %gs%s", os.getpid(), config.inbox, config.state,
                 len(config.subscribers), config.scan_seconds, config.dispatch_seconds,
                 ", replies on" if _replies_configured(config) else "")
        try:
            self._report_claimed()
            await self._kick("scan")
            await self._kick("dispatch")
            scheduler.start()
            self._start_replies()
            await self.stop.wait()
        finally:
            scheduler.shutdown(wait=False)
            await self._drain()
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(signum)
            self.runtime.store.close()
            self._stop_sink()
            log.info("daemon: stopped (exit %d)", self.exit_code)
        return self.exit_code

    # --- jobs ---

    @staticmethod
    def _intervals(config: Config) -> dict[str, float]:
        return {"scan": config.scan_seconds, "dispatch": config.dispatch_seconds}

    async def _kick(self, name: str) -> None:
        """Start job ``name`` unless it is already waiting or running (ticks coalesce)."""
        task = self._tasks.get(name)
        if self.stop.is_set() or (task is not None and not task.done()):
            return
        self._tasks[name] = asyncio.create_task(self._job(name), name=f"digest-{name}")

    async def _job(self, name: str) -> None:
        async with self._busy:
            if self.stop.is_set():
                return
            try:
                if name == "scan":
                    scan(self.runtime)
                else:
                    await dispatch(self.runtime, stop=self.stop)
                    if not self._said_schedule:
                        self._said_schedule = True
                        self._log_schedule()
            except FATAL_ERRORS as exc:
                self._fail(f"{name}: the state database failed: {exc}")
            except Exception as exc:
                log.exception("daemon: %s failed unexpectedly", name)
                self._fail(f"{name}: {type(exc).__name__}: {exc}")

    def _log_schedule(self) -> None:
        """After the first dispatch, one line per subscriber: when their next digest goes."""
        now = utc_now()
        for sub in self.runtime.config.subscribers:
            info = subscriber_status(self.runtime, sub, now)
            when = info["next_send_local"]
            if when is None:
                log.info("subscriber %s: %s; no digest scheduled", sub.email, info["state"])
                continue
            local = datetime.fromisoformat(when)
            log.info("subscriber %s: next digest %s %s", sub.email,
                     local.strftime("%a %Y-%m-%d %H:%M"), info["timezone"])

    def _fail(self, reason: str) -> None:
        """The daemon itself is broken: stop with a non-zero exit so systemd restarts it."""
        log.critical("daemon: %s; stopping (exit 1)", reason)
        self.exit_code = 1
        self.stop.set()

    def _report_claimed(self) -> None:
        """Say what a crash left claimed and not sent; the first dispatch resends it."""
        config = self.runtime.config
        for row in self.runtime.store.unsent_digests():
            if config.subscriber(row.subscriber) is None:
                log.warning("subscriber %s: not in the config any more; the digest of %s "
                            "claimed at %s stays unsent until they are back", row.subscriber,
                            row.local_date, row.claimed_at)
            else:
                log.warning("subscriber %s: the digest of %s was claimed at %s and is not "
                            "marked sent (a stop mid-send, or a deferred delivery); resending "
                            "it with the same Message-ID %s",
                            row.subscriber, row.local_date, row.claimed_at, row.message_id)

    # --- replies ---

    def _start_replies(self) -> None:
        if self._reply_task is None and _replies_configured(self.runtime.config):
            self._reply_task = asyncio.create_task(self._reply_loop(), name="digest-replies")

    async def _reply_loop(self) -> None:
        """Read replies, then wait for more (IDLE or poll), until stopped or unconfigured."""
        from . import replies  # looked up per run: tests stand in for process_replies

        try:
            while not self.stop.is_set() and _replies_configured(self.runtime.config):
                failed = False
                async with self._busy:
                    if self.stop.is_set():
                        break
                    config, store = self.runtime.config, self.runtime.store
                    try:
                        await replies.process_replies(config, store, stop=self.stop,
                                                      corpus=self.runtime.corpus_index)
                    except FATAL_ERRORS as exc:
                        self._fail(f"replies: the state database failed: {exc}")
                        break
                    except DigestError as exc:  # the mailbox is unreachable, a secret missing
                        log.error("replies: %s; trying again in %gs", exc,
                                  _reply_poll_seconds(config))
                        failed = True
                    except Exception:
                        log.exception("replies: this run failed; trying again later")
                        failed = True
                if failed:
                    await self._sleep(_reply_poll_seconds(config))
                    continue
                try:
                    await replies.wait_for_replies(config, self.stop)
                except Exception:
                    log.exception("replies: waiting for mail failed; polling again later")
                    await self._sleep(_reply_poll_seconds(config))
        finally:
            self._reply_task = None

    async def _sleep(self, seconds: float) -> None:
        """Wait ``seconds`` or until stopped."""
        try:
            await asyncio.wait_for(self.stop.wait(), timeout=seconds)
        except TimeoutError:
            pass

    # --- signals ---

    def _request_stop(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.stop.is_set():
            log.warning("daemon: second %s, exiting at once", name)
            logging.shutdown()
            os._exit(128 + signum)
        log.info("daemon: %s received, finishing the work in flight", name)
        self.stop.set()

    def _request_reload(self) -> None:
        log.info("daemon: SIGHUP received, reloading %s", self.config_path)
        task = asyncio.create_task(self._reload(), name="digest-reload")
        self._tasks[f"reload-{id(task)}"] = task
        task.add_done_callback(lambda t: self._tasks.pop(f"reload-{id(t)}", None))

    async def _reload(self) -> None:
        try:
            new = load_config(self.config_path)
            new.smtp.password()
        except DigestError as exc:
            log.error("daemon: config reload rejected, keeping the running config: %s", exc)
            return
        async with self._busy:
            if self.stop.is_set():
                return
            try:
                self._apply(new)
            except DigestError as exc:
                log.error("daemon: config reload rejected, keeping the running config: %s", exc)

    def _apply(self, new: Config) -> None:
        """Switch to a new, valid config: the next tick uses it."""
        self._said_schedule = False  # the next dispatch says the new schedule
        old_raw, runtime = self.config, self.runtime
        store = runtime.store
        if new.state != runtime.config.state:
            store = Store(new.state)  # a StoreError rejects the reload
        if new.smtp != old_raw.smtp:
            self._stop_sink()
            effective = self._start_sink(new)
        else:
            effective = replace(new, smtp=runtime.config.smtp)
        if store is not runtime.store:
            runtime.store.close()
            self._runtime = Runtime(effective, store)
        else:
            runtime.config = effective
        self.config = new
        if self._scheduler is not None:
            old_intervals = self._intervals(old_raw)
            for name, seconds in self._intervals(new).items():
                if seconds != old_intervals[name]:
                    self._scheduler.reschedule_job(name, trigger="interval", seconds=seconds)
        self._start_replies()
        before = {s.email.lower(): s for s in old_raw.subscribers}
        after = {s.email.lower(): s for s in new.subscribers}
        added = sorted(after.keys() - before.keys())
        removed = sorted(before.keys() - after.keys())
        changed = sorted(e for e in after.keys() & before.keys() if after[e] != before[e])
        log.info("daemon: config reloaded: %d subscribers (added: %s; removed: %s; changed: %s)",
                 len(new.subscribers), ", ".join(added) or "none", ", ".join(removed) or "none",
                 ", ".join(changed) or "none")

    # --- stopping ---

    async def _drain(self) -> None:
        """Let the job in flight finish (up to STOP_GRACE_SECONDS), then cancel what is left."""
        pending = [t for t in (*self._tasks.values(), self._reply_task)
                   if t is not None and not t.done()]
        if not pending:
            return
        _done, late = await asyncio.wait(pending, timeout=STOP_GRACE_SECONDS)
        for task in late:
            task.cancel()
        if late:
            log.warning("daemon: the work in flight did not finish within %gs and was "
                        "cancelled; a digest it left claimed is resent on the next start",
                        STOP_GRACE_SECONDS)
            await asyncio.wait(late, timeout=1)

    def _start_sink(self, config: Config) -> Config:
        if config.smtp.sink is None:
            return config
        self.sink = LocalSink.from_config(config.smtp)
        self.sink.start()
        log.info("daemon: local mail sink on 127.0.0.1:%d writes messages to %s",
                 self.sink.port, self.sink.folder)
        return replace(config, smtp=self.sink.smtp_config())

    def _stop_sink(self) -> None:
        if self.sink is not None:
            self.sink.stop()
            self.sink = None


def _replies_configured(config: Config) -> bool:
    return config.imap is not None or config.maildir is not None


def _reply_poll_seconds(config: Config) -> float:
    source = config.imap or config.maildir
    return source.poll_seconds if source is not None else float(DEFAULT_REPLY_POLL_SECONDS)


def run_daemon(config_path: str) -> int:
    """``digest run``: a bad config or an unusable database raises (the CLI exits 1)."""
    config = load_config(config_path)
    code = asyncio.run(Daemon(config_path, config).run())
    sys.stderr.flush()
    return code
