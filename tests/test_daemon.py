"""The daemon's schedule and exactly-once rules, in-process, travelling in time (time-machine).

Each test dispatches as the daemon's ticks do, at chosen instants, against a
real aiosmtpd server, and reads back what the store recorded.
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import date, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import time_machine

from digest.cli import main
from digest.config import Subscriber, load_config
from digest.daemon import (
    Daemon,
    Runtime,
    claim,
    dispatch,
    latest_send_time,
    next_send_time,
    prepare,
    send_time,
)
from digest.daemon import jobs as jobs_module
from digest.daemon import loop as loop_module
from digest.mailer import Mailer
from digest.store import Store

from .daemon_helpers import Sim, fill_inbox, recipient, utc, write_daemon_config
from .dovecot_helpers import PASSWORD_ENV, Dovecot, dovecot_fixture  # noqa: F401  (fixture)
from .helpers import sample_dumps
from .smtp_helpers import (  # noqa: F401  (smtp_server_fixture provides the smtp_server fixture)
    SmtpServer,
    StartServer,
    smtp_server_fixture,
)

TEN_MINUTES = timedelta(minutes=10)


def make_sim(tmp_path: Path, server: SmtpServer, subscribers: list[dict[str, Any]],
             *, dumps: list[Path] | None = None, **digest: Any) -> Sim:
    fill_inbox(tmp_path, dumps)
    config = write_daemon_config(tmp_path, port=server.port, subscribers=subscribers,
                                 digest=digest)
    return Sim(config)


def sent_at(sim: Sim, email: str) -> dict[str, str]:
    """local date -> UTC send instant (HH:MM on its UTC date) of the subscriber's sent digests."""
    rows = sim.store.digests_of(email, limit=1000)
    assert all(r.status == "sent" for r in rows), [(r.local_date, r.status) for r in rows]
    return {r.local_date.isoformat(): (r.sent_at or "")[:16] for r in rows}


# --- send_time: DST gaps and folds ----------------------------------------------


def test_send_time_in_a_dst_gap_is_the_first_instant_after_it() -> None:
    berlin = Subscriber("a@example.org", "a", send_at=time(2, 30), timezone=ZoneInfo("Europe/Berlin"))
    moment = send_time(berlin, date(2026, 3, 29))  # clocks jump 02:00 -> 03:00
    assert moment.astimezone(ZoneInfo("UTC")) == utc("2026-03-29 01:00")
    assert moment.strftime("%H:%M %Z") == "03:00 CEST"
    new_york = Subscriber("b@example.org", "b", send_at=time(2, 0),
                          timezone=ZoneInfo("America/New_York"))
    assert send_time(new_york, date(2026, 3, 8)).astimezone(ZoneInfo("UTC")) == utc(
        "2026-03-08 07:00")


def test_send_time_in_a_dst_fold_is_the_first_occurrence() -> None:
    berlin = Subscriber("a@example.org", "a", send_at=time(2, 30), timezone=ZoneInfo("Europe/Berlin"))
    assert send_time(berlin, date(2026, 10, 25)).astimezone(ZoneInfo("UTC")) == utc(
        "2026-10-25 00:30")  # 02:30 CEST, not the 02:30 CET an hour later
    # The latest send at the second 02:30 is still the day's first one: due once only.
    day, scheduled = latest_send_time(berlin, utc("2026-10-25 01:30")) or (None, None)
    assert day == date(2026, 10, 25) and scheduled == send_time(berlin, day)
    assert next_send_time(berlin, utc("2026-10-25 00:30")) == send_time(berlin, date(2026, 10, 26))


# --- the schedule over days ------------------------------------------------------


def test_one_digest_per_local_day_across_midnight(tmp_path: Path, smtp_server: StartServer) -> None:
    server = smtp_server()
    sim = make_sim(tmp_path, server, [
        {"email": "late@example.org", "send_at": "23:50", "timezone": "UTC", "send_empty": True},
        {"email": "tokyo@example.org", "send_at": "00:10", "timezone": "Asia/Tokyo",
         "send_empty": True},
        {"email": "weekdays@example.org", "send_at": "08:00", "timezone": "America/Los_Angeles",
         "days": ["mon", "wed"], "send_empty": True},
    ])
    sim.ingest(utc("2026-03-01 12:00"))
    # The daemon starts on Monday 2026-03-02 at 01:00 UTC and ticks every 10 minutes.
    sim.run(utc("2026-03-02 01:00"), utc("2026-03-05 01:00"), TEN_MINUTES)
    # Started 70 minutes after Sunday's 23:50: that digest is caught up once, at the start.
    assert sent_at(sim, "late@example.org") == {
        "2026-03-01": "2026-03-02T01:00", "2026-03-02": "2026-03-02T23:50",
        "2026-03-03": "2026-03-03T23:50", "2026-03-04": "2026-03-04T23:50"}
    # 00:10 in Tokyo is 15:10 UTC the day before: the local date is Tokyo's.
    assert sent_at(sim, "tokyo@example.org") == {
        "2026-03-02": "2026-03-02T01:00", "2026-03-03": "2026-03-02T15:10",
        "2026-03-04": "2026-03-03T15:10", "2026-03-05": "2026-03-04T15:10"}
    assert sent_at(sim, "weekdays@example.org") == {
        "2026-03-02": "2026-03-02T16:00", "2026-03-04": "2026-03-04T16:00"}
    assert len(server.messages) == 10
    sim.close()


def test_dst_changes_in_two_zones_neither_skip_nor_double(tmp_path: Path,
                                                          smtp_server: StartServer) -> None:
    server = smtp_server()
    zones = {"be": "Europe/Berlin", "ny": "America/New_York"}
    subscribers = []
    for prefix, zone in zones.items():
        for name, at in (("gap", "02:30"), ("fold", "02:30" if prefix == "be" else "01:30"),
                         ("eight", "08:00")):
            subscribers.append({"email": f"{prefix}-{name}@example.org", "send_at": at,
                                "timezone": zone, "send_empty": True})
    sim = make_sim(tmp_path, server, subscribers)
    sim.ingest(utc("2026-03-01 00:00"))
    # Spring forward: New York on 03-08, Berlin on 03-29. Fall back: Berlin 10-25, New York 11-01.
    # Ticks every 30 minutes (all send times are on :00 or :30), from the day before to
    # the end of the day after each change.
    for start in ("2026-03-07", "2026-03-28", "2026-10-24", "2026-10-31"):
        sim.run(utc(start), utc(start) + timedelta(hours=72), timedelta(minutes=30))
    sent = {sub["email"]: sent_at(sim, sub["email"]) for sub in subscribers}
    # A send time inside the gap goes at the first instant after it, the same day.
    assert sent["ny-gap@example.org"]["2026-03-08"] == "2026-03-08T07:00"  # 03:00 EDT
    assert sent["be-gap@example.org"]["2026-03-29"] == "2026-03-29T01:00"  # 03:00 CEST
    # A send time inside the repeated hour goes at its first occurrence, once.
    assert sent["be-fold@example.org"]["2026-10-25"] == "2026-10-25T00:30"  # 02:30 CEST
    assert sent["ny-fold@example.org"]["2026-11-01"] == "2026-11-01T05:30"  # 01:30 EDT
    # 08:00 stays 08:00 local: the UTC instant moves with the clocks.
    eight_be, eight_ny = sent["be-eight@example.org"], sent["ny-eight@example.org"]
    assert (eight_be["2026-03-28"], eight_be["2026-03-29"]) == (
        "2026-03-28T07:00", "2026-03-29T06:00")
    assert (eight_be["2026-10-24"], eight_be["2026-10-25"]) == (
        "2026-10-24T06:00", "2026-10-25T07:00")
    assert (eight_ny["2026-03-07"], eight_ny["2026-03-08"]) == (
        "2026-03-07T13:00", "2026-03-08T12:00")
    assert (eight_ny["2026-10-31"], eight_ny["2026-11-01"]) == (
        "2026-10-31T12:00", "2026-11-01T13:00")
    # Every local day inside each window has its digest; no day twice (one message each).
    for email, days in sent.items():
        for first in ("2026-03-08", "2026-03-29", "2026-10-25", "2026-11-01"):
            assert first in days, (email, first)
    assert len(server.messages) == sum(len(days) for days in sent.values())
    assert len({m.message["Message-ID"] for m in server.messages}) == len(server.messages)
    sim.close()


def test_a_daemon_down_over_a_send_time_sends_once_or_skips_the_day_logged_once(
        tmp_path: Path, smtp_server: StartServer, caplog: pytest.LogCaptureFixture) -> None:
    server = smtp_server()
    sim = make_sim(tmp_path, server, [
        {"email": "morning@example.org", "send_at": "08:00", "send_empty": True},
        {"email": "night@example.org", "send_at": "23:00", "send_empty": True},
    ])
    sim.ingest(utc("2026-03-01 06:00"))
    sim.run(utc("2026-03-02 06:00"), utc("2026-03-02 07:50"), TEN_MINUTES)
    # Down from 07:50 to 10:00: one digest when it is back, not one per missed tick.
    sim.run(utc("2026-03-02 10:00"), utc("2026-03-02 11:00"), TEN_MINUTES)
    assert sent_at(sim, "morning@example.org") == {"2026-03-02": "2026-03-02T10:00"}
    # Down from 03-02 11:00 to 03-03 21:00: 13 h after 08:00 is beyond max_late (12 h).
    # night@'s 03-02 23:00 digest is 22 h late as well.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="digest.daemon"):
        sim.run(utc("2026-03-03 21:00"), utc("2026-03-03 22:50"), TEN_MINUTES)
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert skipped == [
        ("subscriber morning@example.org: the 2026-03-03 send time (08:00 UTC) passed more "
        "than 12 h ago; that day is skipped"),
        ("subscriber night@example.org: the 2026-03-02 send time (23:00 UTC) passed more "
        "than 12 h ago; that day is skipped"),
    ]
    # Down over midnight (22:50 to 01:00): night@'s 03-03 digest goes at 01:00, once.
    sim.run(utc("2026-03-04 01:00"), utc("2026-03-04 23:00"), TEN_MINUTES)
    assert sent_at(sim, "night@example.org") == {
        "2026-03-01": "2026-03-02T06:00",  # the first start, 7 h after 03-01's 23:00
        "2026-03-03": "2026-03-04T01:00", "2026-03-04": "2026-03-04T23:00"}
    assert sent_at(sim, "morning@example.org") == {
        "2026-03-02": "2026-03-02T10:00", "2026-03-04": "2026-03-04T08:00"}
    assert len(server.messages) == 5
    sim.close()


def test_a_time_changed_by_reply_applies_from_the_next_tick(tmp_path: Path,
                                                            smtp_server: StartServer) -> None:
    server = smtp_server()
    email = "alice@example.org"
    sim = make_sim(tmp_path, server, [
        {"email": email, "send_at": "08:00", "timezone": "Europe/Berlin", "send_empty": True}])
    sim.ingest(utc("2026-03-01 06:00"))
    sim.run(utc("2026-03-02 05:00"), utc("2026-03-02 06:00"), TEN_MINUTES)  # 07:00 local
    sim.store.update_subscriber_state(email, send_at="18:30")  # what "time 18:30" does
    sim.run(utc("2026-03-02 06:10"), utc("2026-03-03 17:50"), TEN_MINUTES)
    assert sent_at(sim, email) == {"2026-03-02": "2026-03-02T17:30",
                                   "2026-03-03": "2026-03-03T17:30"}
    # A later time set after today's digest went does not send today again.
    sim.store.update_subscriber_state(email, send_at="19:30")
    sim.run(utc("2026-03-03 18:00"), utc("2026-03-04 19:00"), TEN_MINUTES)
    assert sent_at(sim, email)["2026-03-04"] == "2026-03-04T18:30"
    assert len(server.messages) == 3
    sim.close()


def test_an_empty_day_sends_nothing_and_the_next_digest_covers_everything_since(
        tmp_path: Path, smtp_server: StartServer, caplog: pytest.LogCaptureFixture) -> None:
    server = smtp_server()
    first, second = sample_dumps()
    email = "alice@example.org"
    sim = make_sim(tmp_path, server, [{"email": email, "send_at": "08:00"}], dumps=[first])
    sim.ingest(utc("2026-03-01 12:00"))
    after_first = sim.store.paper_count()
    sim.run(utc("2026-03-02 07:50"), utc("2026-03-02 08:10"), TEN_MINUTES)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="digest.daemon"):  # "no new papers": a debug line
        sim.run(utc("2026-03-03 07:00"), utc("2026-03-03 21:50"), TEN_MINUTES)
        # The second dump arrives after 03-03's send time + max_late: it waits for 03-04.
        fill_inbox(tmp_path, [second])
        sim.ingest(utc("2026-03-03 22:00"))
        sim.run(utc("2026-03-03 22:00"), utc("2026-03-04 08:00"), TEN_MINUTES)
    messages = [r.getMessage() for r in caplog.records]
    assert [m for m in messages if "no new papers" in m] == [
        (f"subscriber {email}: no new papers for 2026-03-03; nothing sent (looked again when "
        "papers arrive)")]
    assert not [m for m in messages if "skipped" in m]  # an empty day is not a skipped one
    rows = list(reversed(sim.store.digests_of(email)))
    assert [(r.local_date.isoformat(), r.status) for r in rows] == [
        ("2026-03-02", "sent"), ("2026-03-04", "sent")]
    assert rows[0].considered == after_first
    assert rows[1].considered == sim.store.paper_count() - after_first
    shown = [{i.paper_id for i in sim.store.digest_items(r.id)} for r in rows]
    assert not shown[0] & shown[1]
    assert len(server.messages) == 2
    sim.close()


def test_an_empty_day_is_sent_once_papers_arrive_within_max_late(
        tmp_path: Path, smtp_server: StartServer) -> None:
    server = smtp_server()
    first, second = sample_dumps()
    sim = make_sim(tmp_path, server, [{"email": "a@example.org", "send_at": "08:00"}],
                   dumps=[first])
    sim.ingest(utc("2026-03-01 12:00"))
    sim.run(utc("2026-03-02 08:00"), utc("2026-03-03 09:00"), TEN_MINUTES)
    assert len(server.messages) == 1
    fill_inbox(tmp_path, [second])
    sim.ingest(utc("2026-03-03 09:05"))
    sim.run(utc("2026-03-03 09:10"), utc("2026-03-03 10:00"), TEN_MINUTES)
    assert sent_at(sim, "a@example.org")["2026-03-03"] == "2026-03-03T09:10"
    assert len(server.messages) == 2
    sim.close()


# --- exactly once: claimed before SMTP, marked sent after ---------------------------


def test_a_digest_left_claimed_is_resent_with_the_same_message_id(
        tmp_path: Path, smtp_server: StartServer) -> None:
    server = smtp_server()
    sim = make_sim(tmp_path, server, [{"email": "a@example.org", "send_at": "08:00"},
                                      {"email": "b@example.org", "send_at": "08:00"}])
    sim.ingest(utc("2026-03-01 12:00"))
    now = utc("2026-03-02 08:00")
    with time_machine.travel(now, tick=False):
        # A crash after the claim, before (a) or after (b) the server accepted the message.
        rows = {}
        for email in ("a@example.org", "b@example.org"):
            prepared = prepare(sim.runtime, sim.config.subscribers[0 if email[0] == "a" else 1],
                               now)
            assert prepared is not None
            rows[email] = claim(sim.runtime, prepared)

        async def deliver_b_only() -> None:
            row = rows["b@example.org"]
            assert row is not None
            async with Mailer(sim.config.smtp) as mailer:
                from email import message_from_bytes, policy
                await mailer.send(message_from_bytes(row.message, policy=policy.default))

        asyncio.run(deliver_b_only())
    # The next dispatch (the restarted daemon's first) resends both, byte for byte.
    sim.run(utc("2026-03-02 08:10"), utc("2026-03-02 08:30"), TEN_MINUTES)
    ids = [(recipient(m.message), str(m.message["Message-ID"])) for m in server.messages]
    a_row, b_row = rows["a@example.org"], rows["b@example.org"]
    assert a_row is not None and b_row is not None
    assert sorted(ids) == sorted([("a@example.org", a_row.message_id),
                                  ("b@example.org", b_row.message_id),
                                  ("b@example.org", b_row.message_id)])
    # a: delivered once. b: the crash fell after "250 OK": a copy with the same Message-ID.
    assert [r.status for r in sim.store.unsent_digests()] == []
    assert sent_at(sim, "a@example.org") == {"2026-03-02": "2026-03-02T08:10"}
    sim.close()


def test_one_subscribers_failure_is_theirs_alone(tmp_path: Path, smtp_server: StartServer,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    server = smtp_server()
    sim = make_sim(tmp_path, server, [
        {"email": "a@example.org", "send_at": "08:00"},
        {"email": "boom@example.org", "send_at": "08:00", "interests": ["boom"]},
        {"email": "c@example.org", "send_at": "08:00"}])
    sim.ingest(utc("2026-03-01 12:00"))
    real_rank = jobs_module.rank

    def rank(index: Any, profile: Any, *args: Any, **kwargs: Any) -> Any:
        if "boom" in profile.interests:
            raise ValueError("a bug in ranking")
        return real_rank(index, profile, *args, **kwargs)

    monkeypatch.setattr(jobs_module, "rank", rank)
    outcomes = sim.tick(utc("2026-03-02 08:00"))
    assert [(o.subscriber, o.status) for o in outcomes] == [
        ("a@example.org", "sent"), ("boom@example.org", "failed"), ("c@example.org", "sent")]
    assert "subscriber boom@example.org: the digest failed" in caplog.text
    assert sorted(recipient(m.message) for m in server.messages) == ["a@example.org",
                                                                     "c@example.org"]
    sim.close()


def test_the_dispatch_tick_refits_nothing_when_nothing_is_due(
        tmp_path: Path, smtp_server: StartServer, monkeypatch: pytest.MonkeyPatch) -> None:
    server = smtp_server()
    sim = make_sim(tmp_path, server, [{"email": "a@example.org", "send_at": "08:00"}])
    sim.ingest(utc("2026-03-01 12:00"))
    fits: list[int] = []
    real_fit = jobs_module.CorpusIndex.fit
    monkeypatch.setattr(jobs_module.CorpusIndex, "fit",
                        classmethod(lambda cls, papers: fits.append(1) or real_fit(papers)))
    sim.run(utc("2026-03-02 07:00"), utc("2026-03-03 07:50"), TEN_MINUTES)  # 150 ticks
    assert len(fits) == 1 and len(server.messages) == 1
    sim.close()


# --- the replies tick ------------------------------------------------------------------


def test_the_reply_tick_takes_the_writer_lock_only_for_store_work_and_survives_a_failed_run(
        tmp_path: Path, smtp_server: StartServer, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    import importlib

    replies = importlib.import_module("digest.replies")
    server = smtp_server()
    fill_inbox(tmp_path)
    (tmp_path / "Maildir").mkdir()
    config_path = write_daemon_config(
        tmp_path, port=server.port, subscribers=[{"email": "a@example.org"}],
        digest={"scan_seconds": 0.05, "dispatch_seconds": 0.05},
        extra='[maildir]\npath = "Maildir"\npoll_seconds = 0.05\n')
    daemon = Daemon(config_path)
    runs: list[tuple[bool, bool]] = []

    async def process_replies(config: Any, store: Any, **options: Any) -> replies.ReplyReport:
        # The network part runs without the lock; the store part takes it through guard().
        async with options["guard"]():
            held = daemon._busy.locked()
        runs.append((daemon._busy.locked(), held))
        if len(runs) == 1:
            raise RuntimeError("the IMAP server said something odd")
        if len(runs) == 3:
            daemon.stop.set()
        return replies.ReplyReport()

    async def wait_for_replies(config: Any, stop: asyncio.Event) -> None:
        try:
            await asyncio.wait_for(stop.wait(), timeout=0.05)
        except TimeoutError:
            pass

    monkeypatch.setattr(replies, "process_replies", process_replies, raising=False)
    monkeypatch.setattr(replies, "wait_for_replies", wait_for_replies, raising=False)
    with caplog.at_level(logging.INFO, logger="digest"):  # earlier CLI tests may raise its level
        assert asyncio.run(asyncio.wait_for(daemon.run(), timeout=20)) == 0
    assert runs == [(False, True)] * 3
    assert "replies: this run failed; trying again later" in caplog.text
    assert "daemon: stopped (exit 0)" in caplog.text


def test_a_reload_adds_removes_and_changes_subscribers_or_keeps_the_old_config(
        tmp_path: Path, smtp_server: StartServer, caplog: pytest.LogCaptureFixture) -> None:
    server = smtp_server()
    fill_inbox(tmp_path)
    digest = {"scan_seconds": 0.05, "dispatch_seconds": 0.05}
    config_path = write_daemon_config(tmp_path, port=server.port, digest=digest, subscribers=[
        {"email": "a@example.org", "send_at": "08:00"}, {"email": "b@example.org"}])
    daemon = Daemon(config_path)

    async def scenario() -> None:
        running = asyncio.create_task(daemon.run())
        await asyncio.sleep(0.3)
        config_path.write_text("[digest\n")  # a syntax error: rejected, the old config kept
        daemon._request_reload()
        await asyncio.sleep(0.2)
        assert [s.email for s in daemon.runtime.config.subscribers] == [
            "a@example.org", "b@example.org"]
        write_daemon_config(tmp_path, port=server.port, digest=digest, subscribers=[
            {"email": "a@example.org", "send_at": "09:15"}, {"email": "c@example.org"}])
        daemon._request_reload()
        for _ in range(1000):  # applied once the dispatch in flight is done (a corpus fit)
            if daemon.runtime.config.subscribers[-1].email == "c@example.org":
                break
            await asyncio.sleep(0.02)
        subs = daemon.runtime.config.subscribers
        assert [(s.email, s.send_at) for s in subs] == [
            ("a@example.org", time(9, 15)), ("c@example.org", time(8, 0))]
        assert daemon.runtime.config.smtp.port == server.port
        daemon.stop.set()
        assert await running == 0

    with caplog.at_level(logging.INFO, logger="digest.daemon"):
        asyncio.run(asyncio.wait_for(scenario(), timeout=20))
    assert "daemon: config reload rejected, keeping the running config: " in caplog.text
    assert ("daemon: config reloaded: 2 subscribers (added: c@example.org; removed: "
            "b@example.org; changed: a@example.org)") in caplog.text


# --- failures of the daemon itself ----------------------------------------------------


def test_run_with_an_unreadable_config_or_database_exits_1(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(tmp_path / "missing.toml"), "run"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and "cannot read config" in err
    (tmp_path / "not-a-dir").write_text("x")
    config = write_daemon_config(tmp_path, port=25, subscribers=[],
                                 digest={"state": "not-a-dir/state.sqlite3"})
    assert main(["--config", str(config), "run"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and "cannot open the state database" in err
    assert err.count("\n") == 1


def test_a_database_failure_while_running_stops_the_daemon_with_exit_1(
        tmp_path: Path, smtp_server: StartServer, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    import sqlite3

    server = smtp_server()
    fill_inbox(tmp_path)
    config_path = write_daemon_config(tmp_path, port=server.port,
                                      subscribers=[{"email": "a@example.org"}],
                                      digest={"scan_seconds": 0.05, "dispatch_seconds": 0.05})

    def broken_scan(runtime: Runtime) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(loop_module, "scan", broken_scan)
    with caplog.at_level(logging.INFO):
        assert asyncio.run(asyncio.wait_for(Daemon(config_path).run(), timeout=20)) == 1
    assert ("daemon: scan: the state database failed: disk I/O error; stopping (exit 1)"
            in caplog.text)
    assert server.messages == []  # stopped before the dispatch that was queued behind it


# --- status ---------------------------------------------------------------------------


def test_status_shows_states_schedule_and_what_waits(
        tmp_path: Path, smtp_server: StartServer, capsys: pytest.CaptureFixture[str]) -> None:
    server = smtp_server()
    subs = [{"email": f"{name}@example.org", "send_at": "08:00", "timezone": "Europe/Berlin"}
            for name in ("active", "paused", "gone", "bouncing")]
    sim = make_sim(tmp_path, server, subs)
    maildir = tmp_path / "Maildir"
    for folder in ("new", "cur", "tmp"):
        (maildir / folder).mkdir(parents=True)
    (maildir / "new" / "1.eml").write_text("x")
    (maildir / "cur" / "2.eml:2,S").write_text("x")  # seen
    (maildir / "cur" / "3.eml:2,").write_text("x")
    config_path = sim.config_path
    config_path.write_text(config_path.read_text() + '\n[maildir]\npath = "Maildir"\n')
    (tmp_path / "inbox" / "failed").mkdir()
    (tmp_path / "inbox" / "failed" / "broken.txt").write_text("?")
    (tmp_path / "inbox" / "failed" / "broken.txt.reason").write_text("not a dump")
    sim.ingest(utc("2026-03-01 12:00"))
    sim.tick(utc("2026-03-02 07:00"))  # 08:00 CET: everyone gets a digest
    store = sim.store
    store.update_subscriber_state("paused@example.org", paused=True,
                                  paused_until=date(2026, 3, 5))
    store.update_subscriber_state("gone@example.org", unsubscribed_at="2026-03-02T09:00:00")
    store.update_subscriber_state("bouncing@example.org", bouncing_since="2026-03-02T07:00:00",
                                  bounce_reason="550 no such user")
    store.add_feedback("active@example.org", store.digest_items(
        store.digests_of("active@example.org")[0].id)[0].paper_id, "like", source="reply")
    sim.close()
    with time_machine.travel(utc("2026-03-02 12:00"), tick=False):
        assert main(["--config", str(config_path), "status"]) == 0
        text = capsys.readouterr().out
        assert main(["--config", str(config_path), "status", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
    assert "- active@example.org: active" in text
    assert "next send  Tue 2026-03-03 08:00 Europe/Berlin (07:00 UTC)" in text
    assert "last       2026-03-02 sent, 10 of 116 papers" in text
    assert "feedback   1 liked, 0 skipped" in text
    assert "- paused@example.org: paused until 2026-03-05" in text
    assert "next send  Thu 2026-03-05 08:00 Europe/Berlin" in text
    assert "- gone@example.org: unsubscribed" in text
    assert "- bouncing@example.org: bouncing (550 no such user)" in text
    assert "failed dumps waiting in failed/: 1 (broken.txt)" in text
    assert f"replies waiting: 2 (maildir {maildir})" in text
    assert "recent ingests:" in text and "000_" in text
    by_email = {s["email"]: s for s in report["subscribers"]}
    assert by_email["active@example.org"]["next_send_utc"] == "2026-03-03T07:00:00+00:00"
    assert by_email["active@example.org"]["last_digest"]["items"] == 10
    assert by_email["gone@example.org"]["next_send_utc"] is None
    assert report["replies_waiting"] == {"source": "maildir", "path": str(maildir), "count": 2}
    assert report["failed_dumps"] == ["broken.txt"]


def test_status_of_a_subscriber_due_now_shows_the_overdue_send(
        tmp_path: Path, smtp_server: StartServer) -> None:
    server = smtp_server()
    sim = make_sim(tmp_path, server, [{"email": "a@example.org", "send_at": "08:00"}])
    from digest.daemon import status_report

    report = status_report(load_config(sim.config_path), sim.store, utc("2026-03-02 09:00"))
    assert report["subscribers"][0]["next_send_utc"] == "2026-03-02T08:00:00+00:00"
    assert report["replies_waiting"] is None
    sim.close()


def test_status_counts_unseen_imap_replies_or_says_unknown(
        tmp_path: Path, smtp_server: StartServer, dovecot: Dovecot) -> None:
    from dataclasses import replace

    from imapclient import IMAPClient

    from digest.daemon import replies_waiting

    client = IMAPClient("127.0.0.1", port=dovecot.port, ssl=False, timeout=10)
    client.login(dovecot.user, dovecot.password)
    for n in range(3):
        client.append("INBOX", f"Subject: reply {n}\r\n\r\nlike 1\r\n".encode())
    client.select_folder("INBOX")
    client.add_flags(client.search(["ALL"])[:1], [b"\\Seen"])
    client.logout()
    server = smtp_server()
    config = load_config(write_daemon_config(tmp_path, port=server.port, subscribers=[]))
    imap = dovecot.imap_config(password_env=PASSWORD_ENV)
    waiting = replies_waiting(replace(config, imap=imap))
    assert waiting is not None and (waiting["source"], waiting["count"]) == ("imap", 2)
    dovecot.stop()
    waiting = replies_waiting(replace(config, imap=imap))
    assert waiting is not None and waiting["count"] is None and "cannot connect" in waiting["error"]


def test_runtime_is_what_the_cli_imports() -> None:
    from digest.cli import build_parser

    assert callable(Runtime) and callable(dispatch)
    assert "status" in build_parser().format_help()
    _ = Store  # the store the status command opens
