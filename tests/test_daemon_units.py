"""Containment in the daemon's dispatch: one subscriber's failure is theirs alone; a scan
goes on while a dispatch waits on a silent mail server."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from digest.bench.smtp_servers import RawServer
from digest.config import load_config
from digest.daemon import Daemon, Runtime, dispatch
from digest.ingest import scan_inbox
from digest.store import Store

from .daemon_helpers import fill_inbox, recipient, write_daemon_config
from .helpers import sample_dumps
from .smtp_helpers import (  # noqa: F401  (smtp_server_fixture provides the smtp_server fixture)
    StartServer,
    smtp_server_fixture,
)

DUE = {"send_at": "00:00", "timezone": "UTC", "max_papers": 3}


def readers(*names: str) -> list[dict[str, str | int]]:
    return [{"email": f"{name}@example.org", **DUE} for name in names]


def test_one_subscribers_bad_row_or_refused_claim_fails_them_alone(
        tmp_path: Path, smtp_server: StartServer) -> None:
    server = smtp_server()
    fill_inbox(tmp_path)
    path = write_daemon_config(tmp_path, port=server.port, subscribers=readers("ann", "bob", "cat"),
                               digest={"max_late_hours": 24})
    config = load_config(path)
    with Store(config.state) as store:
        scan_inbox(store, config.inbox, stable_seconds=0)
        store.update_subscriber_state("bob@example.org", send_at="00:00")
    with sqlite3.connect(config.state) as db:  # damage written by hand, as a bad disk or bug would
        db.execute("UPDATE subscriber_state SET interests_added = '[\"unfinished'"
                   " WHERE subscriber = 'bob@example.org'")
        db.execute("CREATE TRIGGER refuse_cat BEFORE INSERT ON digests"
                   " WHEN NEW.subscriber = 'cat@example.org'"
                   " BEGIN SELECT RAISE(ABORT, 'row refused'); END")

    with Store(config.state) as store:
        outcomes = {o.subscriber: o for o in asyncio.run(dispatch(Runtime(config, store)))}
        assert store.digests_of("cat@example.org") == []  # nothing half-written

    assert outcomes["ann@example.org"].status == "sent"
    assert outcomes["bob@example.org"].status == "failed"
    assert outcomes["bob@example.org"].detail.startswith("JSONDecodeError: Unterminated string")
    assert (outcomes["cat@example.org"].status, outcomes["cat@example.org"].detail) == (
        "failed", "IntegrityError: row refused")
    assert [recipient(m.message) for m in server.messages] == ["ann@example.org"]


def test_an_unusable_database_is_the_daemons_failure_not_a_subscribers(
        tmp_path: Path, smtp_server: StartServer) -> None:
    server = smtp_server()
    fill_inbox(tmp_path)
    path = write_daemon_config(tmp_path, port=server.port, subscribers=readers("ann"),
                               digest={"max_late_hours": 24})
    config = load_config(path)
    store = Store(config.state)
    scan_inbox(store, config.inbox, stable_seconds=0)
    store.close()  # as good as a database gone: every statement fails

    with pytest.raises(sqlite3.ProgrammingError):
        asyncio.run(dispatch(Runtime(config, store)))
    assert server.messages == []


def test_scans_go_on_while_a_dispatch_waits_on_a_silent_server(tmp_path: Path) -> None:
    silent = RawServer("hang")
    fill_inbox(tmp_path, sample_dumps()[:1])
    path = write_daemon_config(tmp_path, port=silent.port, subscribers=readers("ann", "bob"),
                               digest={"max_late_hours": 24, "scan_seconds": 0.05,
                                       "dispatch_seconds": 0.05})
    path.write_text(path.read_text().replace("timeout = 10", "timeout = 4"))
    daemon = Daemon(path)

    async def scenario() -> tuple[int, bool]:
        running = asyncio.create_task(daemon.run())
        while silent.connections == 0:  # the dispatch is now waiting for a greeting
            await asyncio.sleep(0.01)
        before = daemon.runtime.store.paper_count()
        fill_inbox(tmp_path, sample_dumps()[1:])  # a new dump arrives meanwhile
        for _ in range(300):
            if daemon.runtime.store.paper_count() > before:
                break
            await asyncio.sleep(0.01)
        # Still inside that first dispatch (its one connection, its lock held):
        scanned_while_waiting = silent.connections == 1 and daemon._dispatching.locked()
        after = daemon.runtime.store.paper_count()
        daemon.stop.set()
        await running
        return after - before, scanned_while_waiting

    try:
        added, while_waiting = asyncio.run(asyncio.wait_for(scenario(), timeout=60))
    finally:
        silent.stop()
    assert added > 0 and while_waiting


def test_each_queued_confirmation_is_its_own_unit(tmp_path: Path,
                                                  smtp_server: StartServer) -> None:
    """A confirmation that cannot go (no address, a refused one) is given up alone."""
    from email.message import EmailMessage

    server = smtp_server(reject=["gone@example.org"])
    path = write_daemon_config(tmp_path, port=server.port, subscribers=readers("ann"),
                               digest={"max_late_hours": 24})
    config = load_config(path)

    def confirmation(to: str | None) -> bytes:
        message = EmailMessage()
        message["From"] = "Paper Digest <digest@papers.example.org>"
        if to is not None:
            message["To"] = to
        message["Subject"] = "Re: your digest"
        message.set_content("Done: like 2.\n")
        return message.as_bytes()

    with Store(config.state) as store:
        for n, to in enumerate(["ann@example.org", None, "gone@example.org", "bob@example.org"]):
            store.record_reply(f"<reply{n}@example.org>", sender=to or "", outcome="applied")
            store.queue_confirmation(to or "", f"<reply{n}@example.org>", confirmation(to))
        outcomes = asyncio.run(dispatch(Runtime(config, store)))
        left = store.pending_confirmations()

    confirmations = [(o.subscriber, o.status) for o in outcomes if "confirmation" in o.status]
    assert confirmations == [("ann@example.org", "confirmation-sent"),
                             ("", "confirmation-failed"),
                             ("gone@example.org", "confirmation-failed"),
                             ("bob@example.org", "confirmation-sent")]
    assert left == []  # the two that failed for good are not tried again
    assert sorted(recipient(m.message) for m in server.messages if "Re:" in
                  str(m.message["Subject"])) == ["ann@example.org", "bob@example.org"]


def test_marks_of_one_turn_of_the_event_loop_are_one_commit_made_before_the_next_turn(
        tmp_path: Path) -> None:
    """Issue 13: the deliveries whose 250 arrived together are marked sent in one commit,
    made before the loop waits again; a bouncing address is cleared by its delivery."""
    from datetime import date

    from digest.daemon.jobs import SentMarks

    with Store(tmp_path / "state.sqlite3") as store:
        rows = [store.claim_digest(subscriber=f"r{n}@example.org", local_date=date(2026, 3, 2),
                                   token=f"tok{n:04d}", message_id=f"<m{n}@example.org>",
                                   considered=1, corpus_seq=1, message=b"Subject: x\r\n\r\nx\r\n",
                                   items=[]) for n in range(5)]
        ids = [row.id for row in rows if row is not None]
        store.update_subscriber_state("r0@example.org", bouncing_since="2026-03-01T00:00:00Z",
                                      bounce_reason="550 earlier")

        async def turns() -> tuple[list[str], list[str], int]:
            marks = SentMarks(store)
            for digest_id in ids[:3]:  # three 250s handled in one turn
                marks.add(digest_id)
            during = [row.status for row in store.unsent_digests()]
            await asyncio.sleep(0)  # the next turn: committed
            after = [row.status for row in store.unsent_digests()]
            marks.add(ids[3])
            marks.flush()  # the end of a dispatch commits at once
            return during, after, marks.commits

        during, after, commits = asyncio.run(turns())
        assert during == ["claimed"] * 5  # nothing committed in the turn itself
        assert after == ["claimed"] * 2
        assert commits == 2
        assert [row.id for row in store.unsent_digests()] == [ids[4]]
        assert not store.subscriber_state("r0@example.org").bouncing


def test_the_next_batch_is_claimed_while_the_window_still_sends(
        tmp_path: Path, smtp_server: StartServer) -> None:
    """Issue 13: a claim batch is half the delivery window (2 per connection), so the
    next batch is claimed while the other half sends (the sessions do not idle through
    the claim), and the claimed and unsent never exceed the window."""
    from digest.daemon.jobs import delivery_window

    server = smtp_server(delay=0.15)
    fill_inbox(tmp_path)
    names = [f"r{n:02d}" for n in range(12)]
    path = write_daemon_config(tmp_path, port=server.port, subscribers=readers(*names),
                               digest={"max_late_hours": 24}, smtp={"connections": 2})
    config = load_config(path)
    window = delivery_window(config.smtp)
    with Store(config.state) as store:
        scan_inbox(store, config.inbox, stable_seconds=0)
        claim_digests = store.claim_digests
        in_flight_at_claims: list[tuple[int, int]] = []  # (claimed and unsent, batch size)

        def claim_digests_seen(claims):  # type: ignore[no-untyped-def]
            in_flight_at_claims.append((len(store.unsent_digests()), len(claims)))
            return claim_digests(claims)

        store.claim_digests = claim_digests_seen  # type: ignore[method-assign]
        outcomes = asyncio.run(dispatch(Runtime(config, store)))

    assert [o.status for o in outcomes] == ["sent"] * 12
    assert sorted(recipient(m.message) for m in server.messages) == [
        f"{name}@example.org" for name in names]
    assert all(before + batch <= window for before, batch in in_flight_at_claims)
    assert any(before > 0 for before, _ in in_flight_at_claims[1:])  # claimed while sending
    assert max(batch for _, batch in in_flight_at_claims) == window // 2


def test_empty_days_remember_one_day_per_subscriber_in_a_few_bytes() -> None:
    """A day without a listing notes every subscriber's day as empty: one small entry each
    (a daemon keeps them for its life), the later day replacing the earlier one."""
    import gc
    import tracemalloc
    from datetime import date

    from digest.daemon.jobs import EmptyDays

    days = EmptyDays()
    emails = [f"reader{n:06d}@empty.example.org" for n in range(5000)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for email in emails:
            days.note(email, date(2026, 3, 1), 1234)
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept / len(emails) < 100, f"{kept / len(emails):.0f} bytes per subscriber"
    days.note("Reader000001@Empty.example.org", date(2026, 3, 2), 1240)
    assert days.seq("reader000001@empty.example.org", date(2026, 3, 1)) is None
    assert days.seq("READER000001@empty.example.org", date(2026, 3, 2)) == 1240
    assert days.empty_at("reader000002@empty.example.org", 1234)
    assert not days.empty_at("reader000001@empty.example.org", 1234)
    days.forget("reader000002@empty.example.org", date(2026, 3, 2))  # another day: kept
    assert days.seq("reader000002@empty.example.org", date(2026, 3, 1)) == 1234
    days.forget("reader000002@empty.example.org", date(2026, 3, 1))
    assert days.seq("reader000002@empty.example.org", date(2026, 3, 1)) is None
    assert len(days) == len(emails) - 1
