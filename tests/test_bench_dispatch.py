"""``digest bench dispatch``: a tiny run delivers exactly one message per subscriber.

No timing is asserted: the benchmark's figures are for people, the test checks
that it runs the real dispatch, checks delivery and reports every field.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import signal
import sqlite3
import time
from collections.abc import Sequence
from datetime import date
from multiprocessing.connection import Connection
from pathlib import Path

import pytest

from digest.bench.dispatch import (
    SENDER,
    PastDigest,
    SignalProbe,
    SmtpSink,
    _check_once,
    build_state,
    interest_phrases,
    peak_rss_mb,
)
from digest.cli import main
from digest.errors import DigestError, StoreError
from digest.paper import Paper
from digest.render import message_id_for
from digest.store import Claim, FeedbackEvent, ItemRow, Store

from .helpers import require_shared

JSON_KEYS = {
    "bench", "subscribers", "days", "history", "papers", "runs", "load_avg_1m", "build_s",
    "config_load_s", "wall_s", "messages_per_s", "cpu_s", "cpu_ms_per_subscriber",
    "peak_rss_mb", "sink_cpu_s", "message_kb", "raw_1_messages_per_s", "raw_8_messages_per_s",
    "ratio_to_raw_1", "ratio_to_raw_8", "ranking_subscribers_per_s", "candidates_mean_history",
    "candidates_mean_new", "stages_s", "delivered_exactly_once", "wall_s_runs",
    "stages_cpu_s", "ranking_subscribers_per_cpu_s", "sink", "sink_cpu_ms_per_message",
    "raw_1_sink_cpu_ms_per_message", "raw_8_sink_cpu_ms_per_message", "signals_answered",
    "signal_answer_median_s", "signal_answer_max_s",
    "prepare_workers", "dispatch_cpu_s", "worker_cpu_s", "worker_peak_rss_mb",
    "worker_private_peak_mb",
}
STAGE_KEYS = {"corpus_fit", "prepare", "ranking", "rendering", "claiming", "sending",
              "prepare_other"}


def test_tiny_dispatch_delivers_once_per_subscriber_in_every_run(
        capsys: pytest.CaptureFixture[str]) -> None:
    data = require_shared("data", "hf-daily-papers.jsonl")
    code = main(["bench", "dispatch", "--subscribers", "20", "--days", "2", "--runs", "2",
                 "--data", str(data), "--json"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, "--json prints one line only"
    result = json.loads(lines[0])
    assert set(result) == JSON_KEYS
    assert set(result["stages_s"]) == STAGE_KEYS
    assert set(result["stages_cpu_s"]) == STAGE_KEYS
    assert result["bench"] == "dispatch"
    assert result["subscribers"] == 20 and result["days"] == 2 and result["runs"] == 2
    # The second run sends the same day again: it worked on a fresh copy of the state.
    assert len(result["wall_s_runs"]) == 2
    assert result["delivered_exactly_once"] is True
    assert result["papers"] > 10
    # 6 of 20 have history: yesterday's digest, so only today's papers are new to them.
    assert 0 < result["candidates_mean_history"] < result["candidates_mean_new"]
    assert result["message_kb"] > 1
    for key in ("wall_s", "messages_per_s", "cpu_s", "peak_rss_mb", "raw_1_messages_per_s",
                "raw_8_messages_per_s", "ratio_to_raw_1", "ratio_to_raw_8"):
        assert result[key] > 0, key
    for stage in ("ranking", "rendering", "claiming", "sending"):
        assert result["stages_s"][stage] > 0, stage
        assert result["stages_cpu_s"][stage] > 0, stage
    assert result["ranking_subscribers_per_cpu_s"] > 0
    assert result["sink"] == "aiosmtpd"
    for key in ("sink_cpu_s", "sink_cpu_ms_per_message", "raw_1_sink_cpu_ms_per_message",
                "raw_8_sink_cpu_ms_per_message"):
        assert result[key] > 0, key
    assert result["signals_answered"] >= 0
    # 20 subscribers are prepared in the dispatching process: no worker is forked for so few.
    assert result["prepare_workers"] == 1 and result["worker_cpu_s"] == 0
    assert result["cpu_s"] == result["dispatch_cpu_s"]


def test_the_lean_sink_receives_the_dispatch_and_the_raw_sends(
        capsys: pytest.CaptureFixture[str]) -> None:
    data = require_shared("data", "hf-daily-papers.jsonl")
    assert main(["bench", "dispatch", "--subscribers", "12", "--days", "2", "--runs", "1",
                 "--sink", "lean", "--data", str(data), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result) == JSON_KEYS
    assert result["sink"] == "lean" and result["delivered_exactly_once"] is True
    assert result["message_kb"] > 1
    for key in ("sink_cpu_ms_per_message", "raw_1_messages_per_s", "raw_8_messages_per_s",
                "raw_1_sink_cpu_ms_per_message", "raw_8_sink_cpu_ms_per_message"):
        assert result[key] > 0, key


def test_an_unknown_sink_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "dispatch", "--subscribers", "1", "--sink", "postfix"])
    assert exit_.value.code == 2
    assert "invalid choice: 'postfix'" in capsys.readouterr().err
    with pytest.raises(DigestError, match="unknown sink 'postfix'"):
        SmtpSink("postfix")


def test_the_table_names_the_dispatch_raw_rates_and_stages(
        capsys: pytest.CaptureFixture[str]) -> None:
    data = require_shared("data", "hf-daily-papers.jsonl")
    assert main(["bench", "dispatch", "--subscribers", "3", "--days", "1", "--runs", "1",
                 "--history", "0", "--data", str(data)]) == 0
    out = capsys.readouterr().out
    for words in ("dispatch (as the daemon)", "raw aiosmtplib, 1 connection",
                  "raw aiosmtplib, 8 connections", "ranking", "claiming", "sending + SMTP",
                  "every subscriber received exactly one message"):
        assert words in out
    assert json.loads(out.strip().splitlines()[-1])["candidates_mean_history"] is None


def test_delivery_check_fails_loudly_on_a_missing_or_second_copy() -> None:
    expected = ["a@example.org", "b@example.org", "c@example.org"]
    ids = ["<1@x>", "<2@x>", "<3@x>"]
    _check_once({"counts": {"a@example.org": 1, "b@example.org": 1, "c@example.org": 1},
                 "message_ids": ids}, expected, "ok")
    with pytest.raises(DigestError, match="1 recipient.s. got nothing"):
        _check_once({"counts": {"a@example.org": 1, "b@example.org": 1},
                     "message_ids": ids[:2]}, expected, "missing")
    with pytest.raises(DigestError, match="1 got more than one"):
        _check_once({"counts": {"a@example.org": 1, "b@example.org": 2, "c@example.org": 1},
                     "message_ids": [*ids, "<4@x>"]}, expected, "twice")
    with pytest.raises(DigestError, match="1 unexpected"):
        _check_once({"counts": {"a@example.org": 1, "b@example.org": 1, "c@example.org": 1,
                                "x@example.org": 1}, "message_ids": [*ids, "<4@x>"]},
                    expected, "stranger")
    everyone = {"a@example.org": 1, "b@example.org": 1, "c@example.org": 1}
    with pytest.raises(DigestError, match="1 Message-ID.s. received more than once"):
        _check_once({"counts": everyone, "message_ids": ["<1@x>", "<2@x>", "<1@x>"]},
                    expected, "the same message to two recipients")
    with pytest.raises(DigestError, match="1 message.s. without a Message-ID"):
        _check_once({"counts": everyone, "message_ids": ["<1@x>", "", "<3@x>"]},
                    expected, "no Message-ID")


def test_interest_phrases_come_from_titles_without_system_names() -> None:
    titles = ["ConvLLaVA: Hierarchical Backbones for Visual Encoders",
              "Visual Encoders Revisited", "Scaling Visual Encoders Further",
              "Diffusion Transformers at Scale"]
    phrases = dict(interest_phrases(titles, minimum=3))
    assert phrases["visual encoders"] == 3
    assert not any("convllava" in phrase for phrase in phrases)


# --- the state, written in bulk -------------------------------------------------------


def _write_past_per_row(store: Store, digests: Sequence[PastDigest]) -> None:
    """The bench's old way: claim_digest, mark_sent, then add_feedback in one transaction."""
    ids = []
    for past in digests:
        claim = past.claim
        row = store.claim_digest(
            subscriber=claim.subscriber, local_date=claim.local_date, token=claim.token,
            message_id=claim.message_id, considered=claim.considered,
            corpus_seq=claim.corpus_seq, message=claim.message, items=claim.items)
        if row is None:
            raise DigestError(f"{claim.subscriber} already has a digest of {claim.local_date}")
        store.mark_sent(row.id)
        ids.append(row.id)
    with store.transaction() as db:
        for past, digest_id in zip(digests, ids, strict=True):
            for paper_id, signal in past.feedback:
                store.add_feedback(past.claim.subscriber, paper_id, signal, source="reply",
                                   digest_id=digest_id, db=db)


# Columns that differ between two builds by nature: the clock, the random tokens
# (checked separately), where the dumps were written.
_VARYING = {"papers": {"ingested_at"}, "dumps": {"ingested_at", "path"},
            "digests": {"token", "message_id", "claimed_at", "sent_at"},
            "feedback": {"at"}}
_TABLES = ("papers", "dumps", "digests", "digest_messages", "digest_items", "feedback",
           "subscriber_state")


def _rows(path: Path, table: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as db:
        columns = [row[1] for row in db.execute(f"PRAGMA table_info({table})")
                   if row[1] not in _VARYING.get(table, set())]
        return list(db.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY rowid"))


def test_the_bulk_state_equals_the_per_row_state_row_for_row(tmp_path: Path) -> None:
    data = require_shared("data", "hf-daily-papers.jsonl")
    bulk = build_state(tmp_path / "bulk", data, subscribers=30, days=5, history=0.5,
                       progress=False)
    per_row = build_state(tmp_path / "per-row", data, subscribers=30, days=5, history=0.5,
                          progress=False, write_past=_write_past_per_row)
    assert bulk.subscribers == per_row.subscribers and bulk.history == per_row.history
    for table in _TABLES:
        assert _rows(bulk.pristine, table) == _rows(per_row.pristine, table), table
    # 15 history subscribers x 4 past days, each with a few items and some ratings.
    digests = _rows(bulk.pristine, "digests")
    assert len(digests) == 60
    assert len(_rows(bulk.pristine, "digest_items")) > 60
    assert len(_rows(bulk.pristine, "feedback")) > 0
    for state in (bulk, per_row):
        with sqlite3.connect(state.pristine) as db:
            rows = list(db.execute("SELECT token, message_id, status, attempts, error,"
                                   " claimed_at, sent_at FROM digests"))
        assert len({token for token, *_ in rows}) == len(rows)
        for token, message_id, status, attempts, error, claimed_at, sent_at in rows:
            assert message_id == message_id_for(token, SENDER)
            assert (status, attempts, error) == ("sent", 1, None)
            assert claimed_at <= sent_at
    # The store's own reads see the same history.
    with Store(bulk.pristine) as one, Store(per_row.pristine) as other:
        assert one.last_sent_seqs() == other.last_sent_seqs()
        assert one.newest_digest_dates() == other.newest_digest_dates()
        for email in sorted(bulk.history):
            assert one.shown_papers(email) == other.shown_papers(email)
            assert ([(f.paper_id, f.signal, f.source) for f in one.latest_feedback(email)]
                    == [(f.paper_id, f.signal, f.source) for f in other.latest_feedback(email)])


def _store_with_papers(path: Path) -> Store:
    store = Store(path)
    store.add_listing("0" * 64, "listing.txt", "page",
                      [Paper(id=f"2401.0000{n}", title=f"Paper number {n}", abstract="A.")
                       for n in range(3)])
    return store


def _claim(subscriber: str, day: date, token: str, paper_ids: Sequence[str]) -> Claim:
    return Claim(subscriber=subscriber, local_date=day, token=token,
                 message_id=f"<digest.{token}@example.org>", considered=3, corpus_seq=3,
                 message=b"message of " + token.encode(),
                 items=[ItemRow(n, paper_id, 0.5, "why", n == 2)
                        for n, paper_id in enumerate(paper_ids, start=1)])


def test_bulk_digests_get_the_next_ids_and_read_back_as_sent(tmp_path: Path) -> None:
    with _store_with_papers(tmp_path / "state.sqlite3") as store:
        first = store.claim_digest(
            subscriber="Ann@Example.org", local_date=date(2024, 1, 1), token="t0",
            message_id="<digest.t0@example.org>", considered=3, corpus_seq=3, message=b"m",
            items=[])
        assert first is not None
        ids = store.add_sent_digests([
            _claim("Ann@Example.org", date(2024, 1, 2), "t1", ["2401.00000", "2401.00001"]),
            _claim("bob@example.org", date(2024, 1, 2), "t2", ["2401.00002"])])
        assert ids == [first.id + 1, first.id + 2]
        row = store.digest_by_token("t1")
        assert row is not None and row.id == ids[0]
        assert (row.subscriber, row.status, row.attempts, row.error) == (
            "ann@example.org", "sent", 1, None)
        assert row.message == b"message of t1"
        assert [(i.position, i.paper_id, i.explore) for i in store.digest_items(ids[0])] == [
            (1, "2401.00000", False), (2, "2401.00001", True)]
        store.add_feedback_events([
            FeedbackEvent("ANN@example.org", "2401.00001", "like", "reply", ids[0]),
            FeedbackEvent("bob@example.org", "2401.00002", "skip", "reply", ids[1])])
        assert store.signals_for("ann@example.org", ["2401.00001"]) == {"2401.00001": "like"}
        assert [(e.paper_id, e.signal, e.digest_date) for e in store.feedback_log(
            "bob@example.org")] == [("2401.00002", "skip", "2024-01-02")]
        assert store.add_sent_digests([]) == []
        store.add_feedback_events([])


def test_bulk_writes_refuse_all_or_nothing(tmp_path: Path) -> None:
    with _store_with_papers(tmp_path / "state.sqlite3") as store:
        store.add_sent_digests([_claim("ann@example.org", date(2024, 1, 1), "t1", [])])
        # The same subscriber's day twice: nothing of the batch is stored.
        with pytest.raises(StoreError, match="2 sent digests were refused, none stored"):
            store.add_sent_digests([
                _claim("bob@example.org", date(2024, 1, 1), "t2", ["2401.00000"]),
                _claim("ANN@example.org", date(2024, 1, 1), "t3", [])])
        assert store.digest_by_token("t2") is None
        with pytest.raises(StoreError, match="refused"):  # an item naming no stored paper
            store.add_sent_digests([_claim("cy@example.org", date(2024, 1, 1), "t4",
                                           ["2401.99999"])])
        assert store.digest_by_token("t4") is None
        with pytest.raises(StoreError, match="2 feedback events were refused, none stored"):
            store.add_feedback_events([
                FeedbackEvent("ann@example.org", "2401.00000", "like", "reply"),
                FeedbackEvent("ann@example.org", "2401.00001", "maybe", "reply")])
        assert store.signals_for("ann@example.org", ["2401.00000"]) == {}


# --- what the dispatch process measures about itself ------------------------------------


def _child_peak(conn: Connection) -> None:
    conn.send(peak_rss_mb())


def test_the_peak_rss_is_the_spawned_process_own_not_its_parents() -> None:
    # Linux starts a spawned child's ru_maxrss at its parent's peak; VmHWM is its own.
    ballast = bytearray(400 * 1024 * 1024)
    for offset in range(0, len(ballast), 4096):
        ballast[offset] = 1
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_child_peak, args=(sender,))
    child.start()
    try:
        child_peak = receiver.recv()
    finally:
        child.join()
    ours = peak_rss_mb()
    assert ours > 400
    assert 0 < child_peak < ours - 300
    del ballast


def test_the_signal_probe_counts_answers_while_the_loop_is_busy() -> None:
    probe = SignalProbe(period=0.02)

    def hold() -> None:
        time.sleep(0.03)  # a callback holding the loop, as ranking a digest does

    async def busy() -> None:
        loop = asyncio.get_running_loop()
        with probe.running(loop):
            for _ in range(10):
                loop.call_soon(hold)
                await asyncio.sleep(0.04)

    asyncio.run(busy())
    assert len(probe.answers) >= 1
    assert all(answer >= 0 for answer in probe.answers)
    # The handler is gone: SIGUSR1 is no longer the probe's.
    assert signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None)


def test_child_memory_reads_a_childs_private_pages() -> None:
    """The worker row's "its own" MB: a child's private pages, read from /proc."""
    import subprocess
    import sys

    from digest.bench.dispatch import ChildMemory, _children, _private_mb

    if not Path(f"/proc/{os.getpid()}/task").is_dir():
        pytest.skip("no /proc here: the bench reports 0.0 for the workers' own memory")
    code = ("import sys, time; b = bytearray(64 << 20); b[::4096] = b'x' * len(b[::4096]); "
            "sys.stdout.write('ready\\n'); sys.stdout.flush(); time.sleep(30)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        assert child.pid in _children()
        assert _private_mb(child.pid) >= 64  # the 64 MB it wrote are its own
        memory = ChildMemory(period=0.01)
        with memory.running():
            time.sleep(0.2)
        assert memory.peak_mb >= 64
    finally:
        child.kill()
        child.wait()
    assert _private_mb(child.pid) == 0.0  # ended: nothing to read
