"""The store at dispatch scale: query plans, messages read only when asked, batch claims,
bulk reads that answer what the per-subscriber look-ups answer."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from digest.paper import Paper
from digest.store import MIGRATIONS, Claim, ItemRow, LibraryEntry, Store, _statements

DAY = date(2026, 3, 12)
READERS = [f"reader{n}@example.org" for n in range(4)]


def paper(n: int) -> Paper:
    return Paper(id=f"2603.{n:05d}", arxiv_id=f"2603.{n:05d}", title=f"Paper number {n} on graphs",
                 abstract=f"Abstract {n}.")


def claim_for(subscriber: str, day: date, papers: list[int], *, token: str | None = None,
              message: bytes = b"Subject: a digest\r\n\r\nbody\r\n") -> Claim:
    token = token or f"tok-{subscriber}-{day.isoformat()}"
    return Claim(subscriber=subscriber, local_date=day, token=token,
                 message_id=f"<{token}@example.org>", considered=len(papers), corpus_seq=0,
                 message=message,
                 items=[ItemRow(i, paper(n).id, 1.0 / i, "test", False)
                        for i, n in enumerate(papers, start=1)])


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """Papers 0-29 in three listings; each reader has sent digests and feedback."""
    with Store(tmp_path / "state.sqlite3") as opened:
        for part in range(3):
            opened.add_listing(f"sha-{part}", f"dump{part}", "test",
                               [paper(n) for n in range(part * 10, part * 10 + 10)])
        for k, reader in enumerate(READERS):
            for back in range(3):
                shown = [back * 3 + k, back * 3 + k + 1]
                [row] = opened.claim_digests([claim_for(reader, DAY - timedelta(days=3 - back),
                                                        shown)])
                assert row is not None and not isinstance(row, Exception)
                opened.mark_sent(row.id)
                opened.add_feedback(reader, paper(shown[0]).id, "like", source="reply",
                                    digest_id=row.id)
            opened.add_library_entries(reader, [LibraryEntry(title="A library paper")],
                                       source="config")
        yield opened


def plans(store: Store, call: Callable[[], object]) -> list[str]:
    """The query plan lines of every SELECT that ``call`` runs on the store's connection."""
    db: sqlite3.Connection = store._db
    statements: list[str] = []
    db.set_trace_callback(statements.append)
    try:
        call()
    finally:
        db.set_trace_callback(None)
    lines = []
    for sql in statements:
        if sql.lstrip().upper().startswith("SELECT"):
            lines += [f"{row[3]}  <- {sql}" for row in db.execute("EXPLAIN QUERY PLAN " + sql)]
    return lines


# The tables that grow with subscribers x days: a dispatch must never read them whole.
# Aliases as the store's SQL writes them.
_GROWING = {"digests", "digest_items", "feedback", "digest_messages", "library_entries",
            "subscriber_state", "confirmations", "d", "i", "f", "g", "e"}


# Partial indexes: they hold only the few rows a crash or an outage left claimed.
_PARTIAL = ("INDEX digests_claimed ",)


def full_scans(lines: list[str]) -> list[str]:
    """Plan lines that read a growing table whole (SCAN, with or without a full index)."""
    return [line for line in lines
            if (found := re.match(r"SCAN (\w+)", line)) and found.group(1) in _GROWING
            and not any(index in line for index in _PARTIAL)]


def test_no_query_of_a_dispatch_reads_a_growing_table_whole(store: Store) -> None:
    reader = READERS[0]
    sent = store.last_sent_digest(reader)
    assert sent is not None
    calls: dict[str, Callable[[], object]] = {
        "subscriber_state": lambda: store.subscriber_state(reader),
        "digest_on": lambda: store.digest_on(reader, DAY),
        "digests_of": lambda: store.digests_of(reader, limit=1),
        "last_sent_digest": lambda: store.last_sent_digest(reader),
        "last_sent_seq": lambda: store.last_sent_seq(reader),
        "first_seq_since": lambda: store.first_seq_since(datetime(2026, 3, 1, tzinfo=UTC)),
        "candidate_papers": lambda: store.candidate_papers(reader, 5),
        "sent_paper_ids": lambda: store.sent_paper_ids(reader, 5),
        "papers_since": lambda: store.papers_since(5),
        "latest_feedback": lambda: store.latest_feedback(reader),
        "latest_signals": lambda: store.latest_signals(reader),
        "shown_papers_at": lambda: store.shown_papers_at(reader),
        "shown_and_sent": lambda: store.shown_and_sent(reader),
        "library_entries": lambda: store.library_entries(reader),
        "library_file_hash": lambda: store.library_file_hash(reader, "lib.bib"),
        "digest_items": lambda: store.digest_items(sent.id),
        "digest_message": lambda: store.digest_message(sent.id),
        "digest_by_token": lambda: store.digest_by_token(sent.token),
        "unsent_digests": store.unsent_digests,
        "pending_confirmations": store.pending_confirmations,
        "probe": store.probe,
    }
    for name, call in calls.items():
        lines = plans(store, call)
        assert lines, f"{name} ran no SELECT"
        assert not full_scans(lines), f"{name} reads a table whole: {full_scans(lines)}"
    # The papers of the last week, found by when they came, not by walking every older paper.
    assert "USING COVERING INDEX papers_ingested_at (ingested_at>?)" in plans(
        store, calls["first_seq_since"])[0]


def test_the_bulk_reads_scan_indexes_not_rows(store: Store) -> None:
    # One pass for everyone is fine, but over an index: never the rows (nor their BLOBs).
    for call in (store.last_sent_seqs, store.newest_digest_dates):
        lines = plans(store, call)
        assert lines and all("INDEX" in line for line in lines if line.startswith("SCAN")), lines


def test_a_listing_never_reads_a_message(store: Store) -> None:
    rows = store.digests_of(READERS[0])
    for sql in ("digests_of", "last_sent_digest", "unsent_digests", "digest_on"):
        statements: list[str] = []
        store._db.set_trace_callback(statements.append)
        getattr(store, sql)(*{"digests_of": (READERS[0],), "last_sent_digest": (READERS[0],),
                             "unsent_digests": (), "digest_on": (READERS[0], DAY)}[sql])
        store._db.set_trace_callback(None)
        assert not any("message " in s or "digest_messages" in s or "*" in s
                       for s in statements), statements
    # Asked for, it is there, the bytes that were claimed.
    assert rows[0].message == b"Subject: a digest\r\n\r\nbody\r\n"
    assert store.digest_message(rows[0].id) == rows[0].message


def test_claim_digests_is_claim_digest_per_claim(store: Store) -> None:
    today = DAY + timedelta(days=1)
    message = b"Subject: today\r\n\r\n" + b"x" * 40_000
    answers = store.claim_digests([
        claim_for(READERS[0], today, [20, 21], message=message),
        claim_for(READERS[1], today - timedelta(days=2), [22]),   # that day was sent: None
        claim_for(READERS[2], today, [23]),
        claim_for(READERS[2], today, [24], token="another"),      # twice in a batch: None
    ])
    first, sent_before, third, twice = answers
    assert sent_before is None and twice is None
    assert isinstance(first, type(store.digest_on(READERS[0], today)))
    stored = store.digest_on(READERS[0], today)
    assert stored == first and stored is not None
    assert (stored.status, stored.owner, stored.considered) == ("claimed", None, 2)
    assert first.message == message and stored.message == message
    assert [i.paper_id for i in store.digest_items(stored.id)] == [paper(20).id, paper(21).id]
    assert third is not None and not isinstance(third, Exception)
    assert [row.subscriber for row in store.unsent_digests()] == [READERS[0], READERS[2]]
    # The single claim answers the same: a day already claimed is None.
    assert store.claim_digest(subscriber=READERS[0], local_date=today, token="t2",
                              message_id="<t2@x>", considered=0, corpus_seq=0, message=b"",
                              items=[]) is None


def test_a_refused_claim_is_its_own_failure_the_batch_stands(store: Store) -> None:
    today = DAY + timedelta(days=1)
    bad = Claim(subscriber=READERS[1], local_date=today, token="bad", message_id="<bad@x>",
                considered=1, corpus_seq=0, message=b"m",
                items=[ItemRow(1, "no-such-paper", 1.0, "test", False)])
    answers = store.claim_digests([claim_for(READERS[0], today, [20]), bad,
                                   claim_for(READERS[2], today, [21])])
    assert isinstance(answers[1], sqlite3.IntegrityError)
    assert all(a is not None and not isinstance(a, Exception) for a in (answers[0], answers[2]))
    assert store.digest_on(READERS[1], today) is None  # nothing of it half-written
    assert store._db.execute("SELECT COUNT(*) FROM digest_messages m LEFT JOIN digests d"
                             " ON d.id = m.digest_id WHERE d.id IS NULL").fetchone()[0] == 0
    assert {r.subscriber for r in store.unsent_digests()} == {READERS[0], READERS[2]}


def test_the_bulk_reads_answer_what_the_lookups_answer(store: Store) -> None:
    today = DAY + timedelta(days=1)
    store.claim_digests([claim_for(READERS[3], today, [25, 26])])  # claimed, not sent
    seqs = store.last_sent_seqs()
    newest = store.newest_digest_dates()
    for reader in [*READERS, "nobody@example.org"]:
        last = store.last_sent_digest(reader)
        assert seqs.get(reader) == (last.corpus_seq if last else None)
        latest = store.digests_of(reader, limit=1)
        assert newest.get(reader) == (latest[0].local_date if latest else None)
        for since in (4, 12, 25, 30):
            shared = store.papers_since(4)  # read once for all, from the lowest since
            left_out = store.sent_paper_ids(reader, since)
            assert [p for seq, p in shared if seq > since and p.id not in left_out] == (
                store.candidate_papers(reader, since)), (reader, since)
            # What a digest's preparation reads instead: the same candidates, the same shown.
            shown, sent = store.shown_and_sent(reader)
            assert [p for seq, p in shared if seq > since and p.id not in sent] == (
                store.candidate_papers(reader, since)), (reader, since)
            assert shown == store.shown_papers_at(reader)
            assert [seq for seq, _ in store.papers_since(since)] == list(range(since + 1, 31))
    assert store.subscriber_state(READERS[0]) == store.all_subscriber_states().get(
        READERS[0], store.subscriber_state(READERS[0]))


def test_the_bulk_reads_for_some_subscribers_answer_as_for_all(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    # A dispatch reads them a chunk of subscribers at a time (any case; some unknown).
    import digest.store as store_module

    monkeypatch.setattr(store_module, "IN_CHUNK", 2)
    store.update_subscriber_state(READERS[1], paused=True)
    store.update_subscriber_state(READERS[3], max_papers=4)
    asked = [READERS[1].upper(), "nobody@example.org", READERS[2], READERS[3]]
    wanted = {email.lower() for email in asked}
    assert store.newest_digest_dates(asked) == {
        k: v for k, v in store.newest_digest_dates().items() if k in wanted}
    assert store.all_subscriber_states(asked) == {
        k: v for k, v in store.all_subscriber_states().items() if k in wanted}
    assert set(store.all_subscriber_states(asked)) == {READERS[1], READERS[3]}
    assert store.newest_digest_dates([]) == {} and store.all_subscriber_states([]) == {}


def test_migration_9_moves_the_messages_and_keeps_every_digest(tmp_path: Path) -> None:
    path = tmp_path / "v8.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for version, script in enumerate(MIGRATIONS[:8], start=1):
        for statement in _statements(script):
            db.execute(statement)
        db.execute("INSERT INTO schema_version VALUES (?)", (version,))
    db.execute("INSERT INTO papers (id, title_key, title, abstract, ingested_at) VALUES"
               " ('p1', 'k', 'T', 'A', '2026-03-01T00:00:00+00:00')")
    for n, status in enumerate(("sent", "claimed")):
        db.execute("INSERT INTO digests (subscriber, local_date, token, message_id, status,"
                   " considered, corpus_seq, message, claimed_at, owner) VALUES"
                   " ('a@example.org', ?, ?, ?, ?, 1, 1, ?, '2026-03-01T00:00:00+00:00', 'h:1')",
                   (f"2026-03-0{n + 1}", f"t{n}", f"<t{n}@x>", status, b"message %d" % n))
    db.execute("INSERT INTO digest_items VALUES (1, 1, 'p1', 1.0, 'r', 0)")
    db.close()
    with Store(path) as store:
        assert store.schema_version == len(MIGRATIONS)
        rows = store.digests_of("a@example.org")
        assert [(r.local_date.day, r.status, r.message, r.owner) for r in rows] == [
            (2, "claimed", b"message 1", "h:1"), (1, "sent", b"message 0", "h:1")]
        assert [r.message for r in store.unsent_digests()] == [b"message 1"]
        assert store.digest_items(rows[1].id)[0].paper_id == "p1"
        assert store._db.execute("SELECT MAX(LENGTH(message)) FROM digests").fetchone()[0] == 0


def test_last_sent_seq_is_the_last_sent_digests_corpus_seq(store: Store) -> None:
    for reader in READERS:
        last = store.last_sent_digest(reader)
        assert store.last_sent_seq(reader) == (last.corpus_seq if last else None)
    assert store.last_sent_seq("nobody@example.org") is None


def test_latest_feedback_keeps_the_latest_event_per_paper_in_the_order_of_those_events(
        store: Store) -> None:
    reader = "several@example.org"
    ids = [p.id for p in store.all_papers()[:3]]
    for paper_id, signal in ((ids[0], "like"), (ids[1], "skip"), (ids[0], "skip"),
                             (ids[2], "like"), (ids[1], "like")):
        store.add_feedback(reader, paper_id, signal, source="cli")
    assert [(row.paper_id, row.signal) for row in store.latest_feedback(reader)] == [
        (ids[0], "skip"), (ids[2], "like"), (ids[1], "like")]
