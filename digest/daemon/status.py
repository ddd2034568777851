"""``digest status``: per subscriber their state and next send, then the store's news."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from ..config import WEEKDAYS, Config, Subscriber
from ..errors import DigestError
from ..ingest import FAILED_DIR
from ..library import unresolved_seeds
from ..sources import source_status
from ..store import Store, utc_now
from .jobs import Runtime
from .schedule import due, effective_subscriber, is_paused, local_now, next_send_time

# ``digest status`` asks an IMAP server for its unseen count, but does not wait long.
STATUS_IMAP_TIMEOUT = 5.0


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
        "seeds": _seeds(store, sub),
    }


def _seeds(store: Store, sub: Subscriber) -> dict[str, Any]:
    """Seed papers and library entries, and which of them match no stored paper yet."""
    counts = store.library_counts(sub.email)
    return {
        "seed_papers": len(sub.seed_papers),
        "unresolved_seed_papers": unresolved_seeds(store, sub),
        "library_entries": counts.entries,
        "library_matched": counts.matched,
        "library_pending": counts.pending,
        "library_with_abstract": counts.with_text,
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
        "sources": [source_status(source, store, now) for source in config.sources],
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
        from ..replies.mailboxes import ImapMailbox, MaildirMailbox
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
        seeds = sub["seeds"]
        if seeds["seed_papers"] or seeds["library_entries"]:
            lines.append(f"    seeds      {seeds['seed_papers']} seed papers, "
                         f"{len(seeds['unresolved_seed_papers'])} not found; library "
                         f"{seeds['library_entries']} entries, {seeds['library_matched']} "
                         f"matched, {seeds['library_pending']} pending")
        for ref in seeds["unresolved_seed_papers"]:
            lines.append(f"    warning    seed paper {ref!r} matches no stored paper yet")
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
    lines.extend(_source_lines(report["sources"]))
    return "\n".join(lines)


def _local(moment: str, source: dict[str, Any]) -> str:
    """A recorded UTC instant in the source's own zone, as its fetch times are written."""
    local = datetime.fromisoformat(moment).astimezone(ZoneInfo(source["timezone"]))
    return f"{local:%a %Y-%m-%d %H:%M} {source['timezone']}"


def _source_lines(sources: list[dict[str, Any]]) -> list[str]:
    """``[[sources]]``: each one's last fetch (and why it failed) and its next."""
    lines = ["sources:" if sources else "sources: none (listings are dropped into the inbox)"]
    for source in sources:
        last = source["last_fetch"]
        if last is None:
            lines.append(f"- {source['name']}: never fetched ({source['url']})")
        elif last["outcome"] == "ok":
            lines.append(f"- {source['name']}: ok, fetched {_local(last['started_at'], source)} "
                         f"({last['detail']})")
        else:
            since = (f"; last ok {_local(last['last_ok_at'], source)}" if last["last_ok_at"]
                     else "; never fetched successfully")
            lines.append(f"- {source['name']}: FAILED {last['failures_in_a_row']} time(s) in a "
                         f"row, last {_local(last['started_at'], source)}: {last['detail']}"
                         f"{since}")
        local = datetime.fromisoformat(source["next_fetch_local"])
        when = "due now" if source["due"] else f"{local:%a %Y-%m-%d %H:%M} {source['timezone']}"
        wait = (f" (the server asked to wait until {source['not_before']})"
                if source["not_before"] else "")
        lines.append(f"    next fetch {when}{wait}")
    return lines
