"""Issue 8, dump files: whatever a file holds, it fails alone, readably, and only once.

Every hostile input of the issue is a small file written here, scanned by the
real scan into a real SQLite file.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from datetime import date
from pathlib import Path

import pytest

import digest.ingest
from digest.bench.faults import run_area
from digest.dumps import (
    ABSTRACT_MAX_CHARS,
    AUTHOR_MAX_CHARS,
    AUTHORS_MAX,
    TITLE_MAX_CHARS,
    parse_bytes,
    printable_name,
)
from digest.errors import DumpError, StoreError
from digest.ingest import FAILED_DIR, ingest_file, scan_inbox
from digest.store import Store

from .daemon_helpers import daemon_process, fill_inbox, wait_until, write_daemon_config
from .helpers import sample_dumps
from .smtp_helpers import (  # noqa: F401  (smtp_server_fixture provides the smtp_server fixture)
    StartServer,
    smtp_server_fixture,
)

DAY = date(2026, 3, 12)
PAGE = ("header line\n\nMar 12\n\nA Paper About Sheep\n\nSheep are counted by a model.\n\n"
        "A Paper About Goats\n\nGoats are counted too. Code: https://github.com/x/goats\n")


def drop(inbox: Path, name: str | bytes, data: bytes | str) -> Path:
    """Write a dump into the inbox, a minute old so the scan takes it."""
    inbox.mkdir(parents=True, exist_ok=True)
    path = inbox / (os.fsdecode(name) if isinstance(name, bytes) else name)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    os.utime(path, (time.time() - 60,) * 2)
    return path


def api(title: str = '"A Title"', **paper: object) -> bytes:
    """A daily-papers API listing of one entry; ``title`` is raw JSON."""
    inner = {"id": "2603.00001", "summary": "An abstract.", **paper}
    return f'[{{"paper": {json.dumps(inner)}, "title": {title}}}]'.encode()


def scan(store: Store, inbox: Path) -> dict[str, str]:
    return {r.path.name: r.status for r in scan_inbox(store, inbox, stable_seconds=5)}


def reason_of(inbox: Path, name: str) -> str:
    return (inbox / FAILED_DIR / (name + ".reason")).read_text(encoding="utf-8")


@pytest.fixture
def store(tmp_path: Path) -> Store:
    with Store(tmp_path / "state.sqlite3") as opened:
        yield opened


# --- numbers, nesting, text that cannot be stored ------------------------------------


def test_upvotes_of_30_digits_are_ignored_with_a_warning(
        store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    inbox = tmp_path / "inbox"
    drop(inbox, "votes.json", api(upvotes=123456789012345678901234567890))
    with caplog.at_level(logging.WARNING, logger="digest"):
        assert scan(store, inbox) == {"votes.json": "ingested"}
    (paper,) = store.all_papers()
    assert paper.upvotes is None and paper.arxiv_id == "2603.00001"
    assert "entry 0 (2603.00001): upvotes a 30-digit number is out of range" in caplog.text


def test_an_integer_of_5000_digits_fails_the_file_alone(store: Store, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    drop(inbox, "a-bigint.json", b'[{"title": "Big", "paper": {"upvotes": ' + b"7" * 5000
         + b"}}]")
    drop(inbox, "b-page.txt", PAGE)
    assert scan(store, inbox) == {"a-bigint.json": "failed", "b-page.txt": "ingested"}
    reason = reason_of(inbox, "a-bigint.json")
    assert "a-bigint.json: invalid JSON: Exceeds the limit (4300 digits)" in reason
    assert "set_int_max_str_digits" not in reason  # Python's advice is not the user's fix


def test_100000_nested_brackets_fail_readably(store: Store, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    drop(inbox, "nested.json", b"[" * 100_000)
    drop(inbox, "nested.xml", b"<rss>" + b"<a>" * 100_000)
    assert scan(store, inbox) == {"nested.json": "failed", "nested.xml": "failed"}
    assert "JSON nested too deeply to be a listing" in reason_of(inbox, "nested.json")
    assert "nested.xml" in reason_of(inbox, "nested.xml")


def test_a_lone_surrogate_in_a_title_is_stored_as_a_replacement_character(
        store: Store, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    drop(inbox, "surrogate.json", api('"Lone \\ud800 surrogate"', summary="Bad \\udfff too"))
    assert scan(store, inbox) == {"surrogate.json": "ingested"}
    (paper,) = store.all_papers()
    assert paper.title == "Lone \ufffd surrogate"
    paper.title.encode("utf-8")  # storable, sendable


@pytest.mark.parametrize("published", ["0000-01-01T00:00:00Z", "9999-12-31T23:00:00-05:00"])
def test_atom_dates_at_the_ends_of_time_are_ignored(published: str, store: Store,
                                                    tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    drop(inbox, "edge.xml", f"""<?xml version="1.0"?>
<feed xmlns="http://www.w3.org/2005/Atom"><title>arXiv Query</title>
<entry><id>http://arxiv.org/abs/2603.00002v1</id><published>{published}</published>
<title>At the End of Time</title><summary>Dates.</summary></entry></feed>""")
    assert scan(store, inbox) == {"edge.xml": "ingested"}
    (paper,) = store.all_papers()
    assert paper.listed_on is None and paper.arxiv_id == "2603.00002"


# --- file names ----------------------------------------------------------------------


@pytest.mark.parametrize("name", [b"listing-\xff.txt", b"listing\nsecond line.txt"])
def test_a_valid_dump_with_an_odd_name_is_ingested_and_logged_on_one_line(
        name: bytes, store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    inbox = tmp_path / "inbox"
    drop(inbox, name, PAGE)
    with caplog.at_level(logging.INFO, logger="digest"):
        assert list(scan(store, inbox).values()) == ["ingested"]
    escaped = printable_name(os.fsdecode(name))
    assert "\n" not in escaped and ("\\xff" in escaped or "\\n" in escaped)
    lines = [r.getMessage() for r in caplog.records]
    assert any(escaped in line and "2 papers" in line for line in lines)
    for line in lines:
        assert "\n" not in line
        line.encode("utf-8")
    assert escaped in store.recent_dumps()[0].path


@pytest.mark.parametrize("name", [b"broken-\xff.txt", b"broken\nname.txt"])
def test_a_broken_dump_with_an_odd_name_gets_its_reason(
        name: bytes, store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    inbox = tmp_path / "inbox"
    drop(inbox, name, b"no date line here\n")
    with caplog.at_level(logging.INFO, logger="digest"):
        assert list(scan(store, inbox).values()) == ["failed"]
    failed = inbox / FAILED_DIR
    assert (failed / os.fsdecode(name)).read_bytes() == b"no date line here\n"
    reason = (failed / (os.fsdecode(name) + ".reason")).read_text(encoding="utf-8")
    assert printable_name(os.fsdecode(name)) in reason and reason.count("\n") == 1
    (error,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "\n" not in error and printable_name(os.fsdecode(name)) in error


# --- identity and completion ---------------------------------------------------------


def test_two_emoji_only_titles_stay_two_papers(store: Store, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    drop(inbox, "emoji.txt", "Mar 12\n\n\U0001F680\U0001F680\n\nRockets.\n\n\U0001F525\n\nFire.\n")
    drop(inbox, "emoji.json", '[{"title": "\U0001F9EA"}, {"title": "\U0001F9EB"}]'.encode())
    assert scan(store, inbox) == {"emoji.txt": "ingested", "emoji.json": "ingested"}
    assert sorted(p.title for p in store.all_papers()) == sorted(
        ["\U0001F680\U0001F680", "\U0001F525", "\U0001F9EA", "\U0001F9EB"])


def test_a_page_cut_mid_abstract_is_completed_later_never_shortened(
        store: Store, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    whole = PAGE.encode()
    cut = whole[: whole.index(b"counted too.") + len(b"counted")]
    drop(inbox, "a-cut.txt", cut)
    assert scan(store, inbox) == {"a-cut.txt": "ingested"}
    goats = next(p for p in store.all_papers() if "Goats" in p.title)
    assert goats.abstract == "Goats are counted"
    drop(inbox, "b-whole.txt", whole)
    scan(store, inbox)
    goats = next(p for p in store.all_papers() if "Goats" in p.title)
    assert goats.abstract == "Goats are counted too. Code: https://github.com/x/goats"
    assert goats.code_links == ("https://github.com/x/goats",)
    drop(inbox, "c-cut-again.txt", cut + b" ")  # the short one again, later: changes nothing
    scan(store, inbox)
    goats = next(p for p in store.all_papers() if "Goats" in p.title)
    assert goats.abstract.endswith("https://github.com/x/goats")
    assert store.paper_count() == 2


def test_a_page_cut_mid_url_leaves_no_broken_code_link(store: Store, tmp_path: Path) -> None:
    """Issue 8 review: the cut link stayed beside the whole one forever."""
    inbox = tmp_path / "inbox"
    whole = PAGE.encode()
    drop(inbox, "a-cut.txt", whole[: whole.index(b"/goats") + len(b"/go")])
    scan(store, inbox)
    assert next(p for p in store.all_papers() if "Goats" in p.title).code_links == (
        "https://github.com/x/go",)
    drop(inbox, "b-whole.txt", whole)
    scan(store, inbox)
    goats = next(p for p in store.all_papers() if "Goats" in p.title)
    assert goats.code_links == ("https://github.com/x/goats",)


def test_a_page_cut_inside_its_last_character_is_ingested(store: Store, tmp_path: Path) -> None:
    """Issue 8 review: a cut inside a multi-byte UTF-8 character at the end lost the file."""
    whole = PAGE.replace("goats\n", "goats \u00e9t\u00e9\n").encode()
    cut = whole[: whole.index("\u00e9".encode()) + 1]  # half of the "é"
    parsed = parse_bytes(cut, name="d.txt", fallback_date=DAY)
    assert parsed.papers[-1].abstract.endswith("https://github.com/x/goats")
    assert parsed.warnings[0].startswith("the file ends inside a UTF-8 character")
    drop(tmp_path / "inbox", "cut.txt", cut)
    assert scan(store, tmp_path / "inbox") == {"cut.txt": "ingested"}


def test_an_invalid_byte_before_the_end_still_fails() -> None:
    whole = PAGE.encode()
    with pytest.raises(DumpError, match="not UTF-8"):
        parse_bytes(whole[:-5] + b"\xc3" + whole[-5:], name="d.txt", fallback_date=DAY)
    with pytest.raises(DumpError, match="not UTF-8"):
        parse_bytes(whole + b"\xff", name="d.txt", fallback_date=DAY)  # invalid, not cut


def test_a_page_cut_inside_its_last_title_keeps_the_others(store: Store,
                                                           tmp_path: Path) -> None:
    drop(tmp_path / "inbox", "cut.txt", PAGE + "\nA Paper About Ca")
    assert scan(store, tmp_path / "inbox") == {"cut.txt": "ingested"}
    assert sorted(p.title for p in store.all_papers()) == ["A Paper About Goats",
                                                           "A Paper About Sheep"]


@pytest.mark.parametrize("line", ["Dec 31, 9999", "Jan 1, 0001", "Jul 31, 1991"])
def test_an_explicit_year_out_of_bounds_is_ignored_with_a_warning(line: str) -> None:
    """Issue 8 review: an explicit year skipped the bounds every other date has."""
    parsed = parse_bytes(PAGE.replace("Mar 12", line).encode(), name="d.txt",
                         fallback_date=DAY)
    assert parsed.listed_on is None
    assert all(p.listed_on is None for p in parsed.papers) and len(parsed.papers) == 2
    assert any("line 3: date" in w and "not a plausible listing date" in w
               for w in parsed.warnings), parsed.warnings


def test_an_explicit_year_in_bounds_is_kept() -> None:
    parsed = parse_bytes(PAGE.replace("Mar 12", "Mar 10, 2026").encode(), name="d.txt",
                         fallback_date=DAY)
    assert parsed.listed_on == date(2026, 3, 10) and parsed.warnings == []


# --- dates, types, sizes -------------------------------------------------------------


@pytest.mark.parametrize("line", ["Mar 99", "Mar 0", "Feb 30"])
def test_impossible_dates_are_errors(line: str) -> None:
    with pytest.raises(DumpError, match=f"impossible date '{line}'") as info:
        parse_bytes(PAGE.replace("Mar 12", line).encode(), name="d.txt", fallback_date=DAY)
    assert info.value.line == 3


@pytest.mark.parametrize(("title", "kind"), [('["A", "list"]', "a list"), ("42", "a number"),
                                             ("{}", "an object"), ("true", "a boolean")])
def test_a_title_of_the_wrong_type_names_the_entry(title: str, kind: str) -> None:
    data = b'[{"title": "Fine"}, ' + api(title)[1:]
    with pytest.raises(DumpError) as info:
        parse_bytes(data, name="t.json", fallback_date=DAY)
    assert str(info.value) == f"t.json: entry 1 (2603.00001): 'title' must be text, found {kind}"


def test_a_50_million_character_title_is_refused(store: Store, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    drop(inbox, "huge.json", api('"' + "x" * 50_000_000 + '"'))
    drop(inbox, "page.txt", PAGE)
    assert scan(store, inbox) == {"huge.json": "failed", "page.txt": "ingested"}
    assert ("entry 0 (2603.00001): a title of 50,000,000 characters (at most "
            f"{TITLE_MAX_CHARS}): not a title") in reason_of(inbox, "huge.json")


def test_abstracts_and_authors_are_bounded() -> None:
    authors = [{"name": "n" * 1000}] * (AUTHORS_MAX + 5)
    data = api('"Bounded"', summary="word " * 50_000, authors=authors)
    parsed = parse_bytes(data, name="b.json", fallback_date=DAY)
    (paper,) = parsed.papers
    assert len(paper.abstract) <= ABSTRACT_MAX_CHARS and paper.abstract.endswith("word\u2026")
    assert len(paper.authors) == AUTHORS_MAX
    assert all(len(name) <= AUTHOR_MAX_CHARS for name in paper.authors)
    assert len(parsed.warnings) == 3  # the abstract, the list, the names: one line each


# --- the boundary as a mechanism ----------------------------------------------------


@pytest.mark.parametrize("error", [
    RecursionError("maximum recursion depth exceeded"),
    OverflowError("Python int too large to convert to SQLite INTEGER"),
    UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"),
    ValueError("year 0 is out of range"),
    KeyError("paper"),
    MemoryError(),
])
def test_any_exception_of_one_file_is_that_file_failure(
        error: Exception, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Exceptions no parser foresees (injected into the parse) stay in their file."""
    real_parse = digest.ingest.parse_file

    def parse(path: Path, data: bytes | None = None):  # type: ignore[no-untyped-def]
        if path.name == "a-poison.txt":
            raise error
        return real_parse(path, data)

    monkeypatch.setattr(digest.ingest, "parse_file", parse)
    inbox = tmp_path / "inbox"
    drop(inbox, "a-poison.txt", PAGE)
    drop(inbox, "b-fine.txt", PAGE.replace("Sheep", "Cows"))
    with caplog.at_level(logging.INFO, logger="digest"):
        assert scan(store, inbox) == {"a-poison.txt": "failed", "b-fine.txt": "ingested"}
    reason = reason_of(inbox, "a-poison.txt")
    assert reason.startswith(str(inbox / "a-poison.txt") + ": ")
    assert "did not foresee" in reason and reason.count("\n") == 1
    assert "Traceback" not in caplog.text
    # A restart never meets it again; nothing was deleted.
    assert scan(store, inbox) == {"b-fine.txt": "duplicate"}
    assert (inbox / FAILED_DIR / "a-poison.txt").read_text() == PAGE


def test_a_sqlite_error_for_one_file_rows_fails_that_file_only(store: Store,
                                                               tmp_path: Path) -> None:
    # A trigger refuses one paper, as a constraint would: a real SQLite error for one row.
    with sqlite3.connect(store.path) as other:
        other.execute("CREATE TRIGGER refuse BEFORE INSERT ON papers WHEN NEW.title = 'Cows'"
                      " BEGIN SELECT RAISE(ABORT, 'this paper is refused'); END")
    inbox = tmp_path / "inbox"
    drop(inbox, "a-cows.txt", PAGE.replace("A Paper About Sheep", "Cows"))
    drop(inbox, "b-fine.txt", PAGE)
    assert scan(store, inbox) == {"a-cows.txt": "failed", "b-fine.txt": "ingested"}
    assert "IntegrityError: this paper is refused" in reason_of(inbox, "a-cows.txt")
    assert store.paper_count() == 2  # the failed file's other paper was rolled back with it
    assert len(store.recent_dumps()) == 1


def test_only_a_database_failure_stops_the_scan(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    drop(inbox, "page.txt", PAGE)
    store = Store(tmp_path / "state.sqlite3")
    store.close()  # the database is gone for this process
    with pytest.raises(StoreError, match="state.sqlite3"):
        scan_inbox(store, inbox, stable_seconds=5)
    assert (inbox / "page.txt").exists() and not (inbox / FAILED_DIR).exists()
    with Store(tmp_path / "state.sqlite3") as reopened:  # back: the file is ingested then
        assert scan(reopened, inbox) == {"page.txt": "ingested"}


def test_a_file_that_cannot_be_moved_aside_stays_and_says_so(
        store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    inbox = tmp_path / "inbox"
    drop(inbox, "junk.txt", "junk")
    (inbox / FAILED_DIR).symlink_to(tmp_path / "nowhere")  # failed/ cannot be made
    with caplog.at_level(logging.ERROR, logger="digest"):
        assert scan(store, inbox) == {"junk.txt": "failed"}
    assert (inbox / "junk.txt").read_text() == "junk"
    assert "cannot be moved to failed/" in caplog.text and "next scan" in caplog.text


def test_a_long_name_fits_failed_with_its_reason(store: Store, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    name = "\u00e9" * 125 + ".txt"  # 254 bytes: the longest name a file system allows
    drop(inbox, name, "junk")
    drop(inbox, "e" * 250 + ".txt", "more junk")
    assert sorted(scan(store, inbox).values()) == ["failed", "failed"]
    kept = sorted(p for p in (inbox / FAILED_DIR).iterdir() if p.suffix == ".txt")
    assert sorted(p.read_text() for p in kept) == ["junk", "more junk"]
    for path in kept:
        assert path.with_name(path.name + ".reason").read_text(encoding="utf-8").strip()
    assert not list(inbox.glob("*.txt"))


def test_an_unreadable_named_file_is_a_dump_error(store: Store, tmp_path: Path) -> None:
    with pytest.raises(DumpError, match="missing.txt: cannot read: No such file"):
        ingest_file(store, tmp_path / "missing.txt")
    with pytest.raises(DumpError, match="a-folder: cannot read: Is a directory"):
        (tmp_path / "a-folder").mkdir()
        ingest_file(store, tmp_path / "a-folder")


def test_a_file_larger_than_the_limit_is_refused_unread(
        store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import digest.dumps

    monkeypatch.setattr(digest.dumps, "MAX_DUMP_BYTES", 1024)
    monkeypatch.setattr(digest.ingest, "MAX_DUMP_BYTES", 1024)
    inbox = tmp_path / "inbox"
    drop(inbox, "big.txt", PAGE * 20)
    assert scan(store, inbox) == {"big.txt": "failed"}
    assert "larger than" in reason_of(inbox, "big.txt")


def test_the_cli_reports_a_hostile_named_file_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from digest.cli import main

    from .helpers import write_config

    config = write_config(tmp_path, """
        [digest]
        inbox = "inbox"
        state = "state.sqlite3"
        [smtp]
        sink = "outbox"
        from = "Digest <d@example.org>"
        reply_to = "d+{token}@example.org"
        [[subscribers]]
        email = "a@example.org"
    """)
    nested = drop(tmp_path, "nested.json", b"[" * 100_000)
    odd = drop(tmp_path, b"odd-\xff.txt", PAGE)
    code = main(["--config", str(config), "ingest", str(nested), str(odd)])
    out, err = capsys.readouterr()
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: {nested}: JSON nested too deeply to be a listing"]
    assert "Traceback" not in err
    assert "odd-\\xff.txt: 2 papers, 2 new" in out


# --- the daemon and the campaign -------------------------------------------------------


def test_the_fault_campaign_for_dumps_is_clean(tmp_path: Path) -> None:
    result = run_area("dumps", tmp_path, quick=True)
    assert result.cases > 300, result
    assert result.clean, result.notes


def test_samples_still_ingest_after_hostile_files(store: Store, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    for number, data in enumerate([b"[" * 100_000, b"\xff\xfe", b"<html/>", b"Mar 99\n\nx\n\ny"]):
        drop(inbox, f"0-hostile-{number}.txt", data)
    for sample in sample_dumps():
        drop(inbox, sample.name, sample.read_bytes())
    statuses = scan(store, inbox)
    assert sorted(statuses.values()) == ["failed"] * 4 + ["ingested"] * 2
    assert store.paper_count() == 116


@pytest.mark.slow
def test_the_daemon_sends_its_first_digest_past_hostile_files(tmp_path: Path,
                                                              smtp_server: StartServer) -> None:
    """``digest run`` as a child process: hostile files fail alone, the digest goes out."""
    server = smtp_server()
    inbox = fill_inbox(tmp_path)
    hostile = {"0-nested.json": b"[" * 100_000,
               "0-bigint.json": b'[{"title": "Big", "paper": {"upvotes": ' + b"7" * 5000 + b"}}]",
               "0-huge-title.json": api('"' + "x" * 1_000_000 + '"'),
               "0-mar99.txt": PAGE.replace("Mar 12", "Mar 99").encode(),
               "0-bad-\udcff-name.txt": b"not a dump\n"}
    for name, data in hostile.items():
        drop(inbox, name, data)
    config = write_daemon_config(tmp_path, port=server.port, digest={
        "scan_seconds": 0.2, "dispatch_seconds": 0.2, "max_late_hours": 24},
        subscribers=[{"email": "reader@example.org", "send_at": "00:00", "timezone": "UTC"}])
    with daemon_process(config, tmp_path / "daemon.log") as daemon:
        # The corpus fit takes seconds; on a busy CI machine, many.
        wait_until(lambda: len(server.messages) == 1, timeout=180, what="the first digest")
        assert daemon.proc.poll() is None  # still running
    failed = inbox / FAILED_DIR
    for name, data in hostile.items():
        assert (failed / name).read_bytes() == data
        assert (failed / (name + ".reason")).read_text(encoding="utf-8").strip()
    log = daemon.log()
    assert "Traceback" not in log and "stopping" not in log
    assert "0-bad-\\xff-name.txt" in log
