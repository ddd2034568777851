"""Who is due: each subscriber's local send times and the one-digest-a-day rule.

A subscriber is due when the latest scheduled send time (their local
``send_at`` on one of their ``days``) has passed, no more than ``max_late``
ago, and no digest exists for that local date (or a later one). Time zones
come from zoneinfo, so daylight saving time neither skips nor doubles a day.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from datetime import time as dt_time
from typing import Protocol

from ..config import Config, Subscriber
from ..store import Store, SubscriberState


class Runtime(Protocol):
    """What ``due`` reads of the jobs' runtime: the store and the config (no import of jobs)."""

    @property
    def store(self) -> Store: ...

    @property
    def config(self) -> Config: ...

# How far back the latest scheduled send is looked for: a week covers any set of days.
SCHEDULE_LOOKBACK_DAYS = 7


@dataclass(frozen=True)
class Due:
    """Whether a subscriber is due now, and for which of their local dates."""

    status: str  # due | unsubscribed | paused | not-due | already-sent | late
    local_date: date  # the day the digest is (or would be) for
    scheduled: datetime | None = None  # that day's send time; None with --force


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


def due(runtime: Runtime, sub: Subscriber, now: datetime, *, force: bool = False,
        state: SubscriberState | None = None) -> Due:
    """Whether ``sub`` (the effective subscriber, reply-set state applied) is due now.

    Without ``force`` the day looked at is the one of the latest scheduled send
    time, which may be yesterday's for a daemon that was down over midnight.
    ``force`` ignores the time of day and the weekday, never the one-digest-a-day rule.
    ``state``: the subscriber's state as the caller just read it from the store
    (read here when not given): one query fewer per subscriber in a dispatch.
    """
    store = runtime.store
    today = local_now(sub, now).date()
    if state is None:
        state = store.subscriber_state(sub.email)
    if state.unsubscribed:
        return Due("unsubscribed", today)
    if is_paused(state, today):
        return Due("paused", today)
    if force:
        status = "already-sent" if store.digest_on(sub.email, today) is not None else "due"
        return Due(status, today)
    newest = store.digests_of(sub.email, limit=1)
    return judge(sub, state, newest[0].local_date if newest else None, now,
                 runtime.config.max_late)


def judge(sub: Subscriber, state: SubscriberState, newest: date | None, now: datetime,
          max_late: timedelta) -> Due:
    """``due`` without ``force``, from what the store holds: the subscriber's state and the
    local date of their newest digest (any status; None for none). A dispatch judges
    everyone with it from two bulk reads; ``due`` from the current rows."""
    today = local_now(sub, now).date()
    if state.unsubscribed:
        return Due("unsubscribed", today)
    if is_paused(state, today):
        return Due("paused", today)
    latest = latest_send_time(sub, now)
    if latest is None:  # pragma: no cover - days is never empty
        return Due("not-due", today)
    day, scheduled = latest
    if newest is not None and newest >= day:
        return Due("already-sent", day, scheduled)
    if is_paused(state, day):
        return Due("paused", day, scheduled)
    if now - scheduled > max_late:
        return Due("late", day, scheduled)
    return Due("due", day, scheduled)
