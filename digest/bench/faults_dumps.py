"""Fault campaign, area "dumps": hostile and random dump files through the real scan.

Each case is one file dropped into an inbox of its own and scanned by
``scan_inbox`` into a real SQLite file, as the daemon's scan tick does. What
counts (``digest.bench.faults``):

- crash: the scan raised; or a restart (a new store on the same file, a new
  scan) met a failed file again;
- data lost: a file neither recorded as ingested nor in ``failed/`` with its
  bytes intact and a non-empty ``.reason``; a valid listing that failed;
- unclear error: a reason or log line that does not name the file, spans
  several lines, holds a traceback or is not valid UTF-8; a hostile file
  that was ingested without a word.

The hostile files are the kinds of issue 8 (huge numbers, deep nesting, lone
surrogates, impossible dates, odd file names, emoji titles, a page cut short,
titles of the wrong type or of 50 million characters); the random files are
valid listings of every format cut, spliced and bit-flipped with a fixed seed,
and plain random bytes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

from ..dumps import printable_name
from ..errors import StoreError
from ..ingest import FAILED_DIR, REASON_SUFFIX, IngestResult, scan_inbox
from ..store import Store
from .faults import AreaResult

# Seeded, so a run is repeatable and a failed case can be found again.
SEED = 20260312
RANDOM_CASES_QUICK = 300
RANDOM_CASES_FULL = 5_000
# The 50-million-character title of issue 8; the quick run (the test suite) uses
# 2 million, already 5,000 times the title limit.
HUGE_TITLE_FULL = 50_000_000
HUGE_TITLE_QUICK = 2_000_000


@dataclass(frozen=True)
class Case:
    """One dump file: its name as bytes (any byte but / and NUL), content, expected outcome."""

    what: str
    name: bytes
    data: bytes
    expect: str  # "ingested" | "failed" | "either"


PAGE = (b"new\n\nGet trending papers in your email inbox!\n\nMar 12\n\n"
        b"Sparse Mixtures of Tiny Experts\n\nWe route tokens to 4,096 tiny experts. "
        b"Code: https://github.com/example/tiny-experts.\n\n"
        b"Counting Sheep with Diffusion Models\n\nA diffusion model counts sheep.\n")
JSON = (b'[{"paper": {"id": "2603.01234", "title": "Sparse Mixtures of Tiny Experts", '
        b'"summary": "We route tokens to tiny experts.", "upvotes": 7, '
        b'"authors": [{"name": "Ada Lovelace"}, {"name": "Alan Turing"}]}, '
        b'"title": "Sparse Mixtures of Tiny Experts", "publishedAt": "2026-03-12T08:00:00Z"}]')
RSS = (b'<?xml version="1.0"?><rss version="2.0" xmlns:dc="http://purl.org/dc/elements/1.1/">'
       b"<channel><title>cs.LG updates on arXiv.org</title><link>http://rss.arxiv.org/rss/cs.LG"
       b"</link><item><title>Counting Sheep with Diffusion Models</title>"
       b"<link>https://arxiv.org/abs/2603.04321</link><description>arXiv:2603.04321v1 Announce "
       b"Type: new Abstract: A diffusion model counts sheep.</description>"
       b"<dc:creator>Grace Hopper, Edsger Dijkstra</dc:creator>"
       b"<pubDate>Thu, 12 Mar 2026 00:00:00 -0400</pubDate></item></channel></rss>")
ATOM = (b'<?xml version="1.0" encoding="UTF-8"?><feed xmlns="http://www.w3.org/2005/Atom">'
        b"<title>arXiv Query</title><entry><id>http://arxiv.org/abs/2603.05555v2</id>"
        b"<published>2026-03-12T00:00:00-04:00</published><title>Tiny Experts, Revisited</title>"
        b"<summary>Fewer experts suffice.</summary><author><name>Ada Lovelace</name></author>"
        b"</entry></feed>")
SEEDS = (PAGE, JSON, RSS, ATOM)


def hostile_cases(huge_title: int) -> list[Case]:
    """The hostile files of issue 8, each small but for the one huge title."""
    def api(title: str, extra: str = "") -> bytes:
        return (f'[{{"paper": {{"id": "2603.00001", "summary": "An abstract."{extra}}}, '
                f'"title": {title}}}]').encode()

    def atom(published: str) -> bytes:
        return ATOM.replace(b"2026-03-12T00:00:00-04:00", published.encode())

    return [
        Case("upvotes of 30 digits", b"upvotes.json", api('"Thirty Digits"',
             ', "upvotes": 123456789012345678901234567890'), "ingested"),
        Case("an integer of 5,000 digits", b"bigint.json",
             b'[{"title": "Big", "paper": {"upvotes": ' + b"9" * 5000 + b"}}]", "failed"),
        Case("100,000 nested [", b"nested.json", b"[" * 100_000, "failed"),
        Case("100,000 nested XML elements", b"nested.xml",
             b"<rss>" + b"<a>" * 100_000, "failed"),
        Case("a title with a lone surrogate escape", b"surrogate.json",
             api('"Lone \\ud800 surrogate"'), "ingested"),
        Case("Atom published in year 0000", b"year0.xml", atom("0000-01-01T00:00:00Z"),
             "ingested"),
        Case("Atom published in 9999, negative offset", b"year9999.xml",
             atom("9999-12-31T23:00:00-05:00"), "ingested"),
        Case("a valid dump named with a non-UTF-8 byte", b"listing-\xff\xfe.txt", PAGE,
             "ingested"),
        Case("a valid dump named with a newline", b"listing\nsecond line.json", JSON,
             "ingested"),
        Case("a broken dump named with a non-UTF-8 byte", b"broken-\xff.txt", b"just words",
             "failed"),
        Case("a broken dump named with a newline", b"broken\nname.txt", b"just words", "failed"),
        Case("two emoji-only titles", b"emoji.txt",
             b"Mar 12\n\n\xf0\x9f\x9a\x80\xf0\x9f\x9a\x80\n\nRockets.\n\n"
             b"\xf0\x9f\x94\xa5\n\nFire.\n", "ingested"),
        Case("a page cut mid-abstract", b"cut.txt", PAGE[:-12], "ingested"),
        Case("Mar 99", b"mar99.txt", PAGE.replace(b"Mar 12", b"Mar 99"), "failed"),
        Case("Mar 0", b"mar0.txt", PAGE.replace(b"Mar 12", b"Mar 0"), "failed"),
        Case("a title given as a list", b"title-list.json", api('["A", "list"]'), "failed"),
        Case("a title given as a number", b"title-number.json", api("42"), "failed"),
        Case(f"a {huge_title:,}-character title", b"huge-title.json",
             api('"' + "x" * huge_title + '"'), "failed"),
        Case("an abstract of 200,000 characters", b"huge-abstract.json",
             api('"Long Abstract"').replace(b"An abstract.", b"word " * 40_000), "ingested"),
        Case("10,000 authors of 1,000 characters", b"authors.json",
             api('"Many Authors"', ', "authors": [' + ", ".join(
                 ['{"name": "' + "n" * 1000 + '"}'] * 10_000) + "]"), "ingested"),
        Case("an empty RSS channel", b"weekend.xml",
             b'<?xml version="1.0"?><rss version="2.0"><channel><title>cs.LG</title>'
             b"</channel></rss>", "ingested"),
        Case("an HTML page", b"page.html", b"<html><body>Not a listing</body></html>",
             "failed"),
        Case("a PDF", b"paper.pdf", b"%PDF-1.7\n%\x00\x01\x02binary", "failed"),
        Case("Latin-1 text", b"latin1.txt", "Mar 12\n\nCaf\u00e9\n\nAbstract.\n".encode("latin-1"),
             "failed"),
    ]


def random_cases(rng: random.Random, count: int) -> list[Case]:
    """Listings of every format cut, spliced, bit-flipped; and plain random bytes."""
    cases = []
    for number in range(count):
        seed = rng.choice(SEEDS)
        kind = rng.randrange(5)
        if kind == 0:
            data = seed[: rng.randrange(len(seed) + 1)]
        elif kind == 1:
            flipped = bytearray(seed)
            for _ in range(rng.randint(1, 8)):
                flipped[rng.randrange(len(flipped))] = rng.randrange(256)
            data = bytes(flipped)
        elif kind == 2:
            cut = rng.randrange(len(seed) + 1)
            data = seed[:cut] + rng.choice(SEEDS)[rng.randrange(len(seed)):] + seed[cut:]
        elif kind == 3:
            cut = rng.randrange(len(seed) + 1)
            junk = rng.choice([b"\\ud800", b"[" * 50, b"\x00", b"\n\n", b"<", b"&#0;", b"Mar 31",
                               b'"', b"9" * 40, b"\xed\xa0\x80", b"\r"])
            data = seed[:cut] + junk * rng.randint(1, 3) + seed[cut:]
        else:
            data = rng.randbytes(rng.randrange(1, 400))
        name = f"random-{number:05d}".encode() + rng.choice([b".txt", b".json", b".xml", b"",
                                                             b"-\xff.txt", b"\n.txt"])
        cases.append(Case(f"random file {number}", name, data, "either"))
    return cases


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def run(workdir: Path, quick: bool) -> AreaResult:
    """Drop each case into its own inbox, scan it, check what became of it; then restart."""
    result = AreaResult("dumps")
    rng = random.Random(SEED)
    cases = hostile_cases(HUGE_TITLE_QUICK if quick else HUGE_TITLE_FULL)
    cases += random_cases(rng, RANDOM_CASES_QUICK if quick else RANDOM_CASES_FULL)
    handler = _Records()
    logger = logging.getLogger("digest")
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # hundreds of expected errors: counted here, not printed
    inboxes: list[tuple[Case, Path]] = []
    try:
        with Store(workdir / "state.sqlite3") as store:
            for number, case in enumerate(cases):
                inbox = workdir / f"inbox-{number:05d}"
                inboxes.append((case, inbox))
                handler.records.clear()
                _try_case(result, store, case, inbox, handler.records)
        _restart(result, workdir, inboxes)
        _database_failure(result, workdir)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate
    result.cases = len(cases) + 2  # the restart and the database failure count as cases
    return result


def _drop(inbox: Path, case: Case) -> Path:
    inbox.mkdir(parents=True, exist_ok=True)
    path = inbox / os.fsdecode(case.name)
    path.write_bytes(case.data)
    old = time.time() - 60
    os.utime(path, (old, old))
    return path


def _try_case(result: AreaResult, store: Store, case: Case, inbox: Path,
              records: list[logging.LogRecord]) -> None:
    path = _drop(inbox, case)
    try:
        outcome = scan_inbox(store, inbox, stable_seconds=0)
    except Exception as exc:  # noqa: BLE001 - the campaign counts what escaped the boundary
        result.crashes += 1
        result.notes.append(f"{case.what}: the scan raised {type(exc).__name__}: "
                            f"{str(exc)[:120]}")
        return
    if len(outcome) != 1:
        result.data_lost += 1
        result.notes.append(f"{case.what}: the scan reported {len(outcome)} files, not 1")
        return
    _check_outcome(result, store, case, path, outcome[0])
    _check_logs(result, case, records)


def _check_outcome(result: AreaResult, store: Store, case: Case, path: Path,
                   outcome: IngestResult) -> None:
    name = printable_name(path.name)
    if outcome.status in ("ingested", "duplicate"):
        if store.dump_record(hashlib.sha256(case.data).hexdigest()) is None or not path.exists():
            result.data_lost += 1
            result.notes.append(f"{case.what}: reported ingested but not recorded")
        elif case.expect == "failed":
            result.unclear_errors += 1
            result.notes.append(f"{case.what}: ingested without a word; expected a failure")
        return
    if outcome.status != "failed":
        result.data_lost += 1
        result.notes.append(f"{case.what}: left as {outcome.status!r}")
        return
    failed = path.parent / FAILED_DIR
    moved = [p for p in failed.iterdir() if not p.name.endswith(REASON_SUFFIX)] \
        if failed.is_dir() else []
    if len(moved) != 1 or moved[0].read_bytes() != case.data:
        result.data_lost += 1
        result.notes.append(f"{case.what}: not in {FAILED_DIR}/ with its bytes intact")
        return
    reason_file = moved[0].with_name(moved[0].name + REASON_SUFFIX)
    reason = reason_file.read_text(encoding="utf-8").strip() if reason_file.exists() else ""
    if not reason:
        result.data_lost += 1
        result.notes.append(f"{case.what}: in {FAILED_DIR}/ without a reason")
    elif name not in reason or "\n" in reason or "Traceback" in reason:
        result.unclear_errors += 1
        result.notes.append(f"{case.what}: unclear reason {reason[:120]!r}")
    if case.expect == "ingested":
        result.data_lost += 1
        result.notes.append(f"{case.what}: a valid listing failed: {reason[:120]}")


def _check_logs(result: AreaResult, case: Case, records: list[logging.LogRecord]) -> None:
    for record in records:
        if record.levelno < logging.INFO:
            continue
        try:
            message = record.getMessage()
            message.encode("utf-8")
        except (TypeError, ValueError) as exc:
            result.unclear_errors += 1
            result.notes.append(f"{case.what}: a log line that cannot be written: {exc}")
            continue
        if record.exc_info or "\n" in message or "\r" in message:
            result.unclear_errors += 1
            result.notes.append(f"{case.what}: a log line with a traceback or a line break: "
                                f"{message[:120]!r}")


def _restart(result: AreaResult, workdir: Path, inboxes: list[tuple[Case, Path]]) -> None:
    """A new store on the same database, every inbox scanned again: no failure twice."""
    met_again = 0
    with Store(workdir / "state.sqlite3") as store:
        for case, inbox in inboxes:
            try:
                outcome = scan_inbox(store, inbox, stable_seconds=0)
            except Exception as exc:  # noqa: BLE001 - counted, as in the first pass
                result.crashes += 1
                result.notes.append(f"restart, {case.what}: {type(exc).__name__}: {exc}")
                continue
            if any(r.status not in ("duplicate",) for r in outcome):
                met_again += 1
                result.notes.append(f"restart, {case.what}: met again as "
                                    f"{[r.status for r in outcome]}")
    result.crashes += met_again


def _database_failure(result: AreaResult, workdir: Path) -> None:
    """The database unusable mid-scan: the scan stops with StoreError, the file stays put."""
    inbox = workdir / "inbox-database-failure"
    path = _drop(inbox, Case("database failure", b"listing.txt", PAGE, "ingested"))
    store = Store(workdir / "closed.sqlite3")
    store.close()  # every statement now fails: the database is gone for this process
    try:
        scan_inbox(store, inbox, stable_seconds=0)
    except StoreError:
        pass
    except Exception as exc:  # noqa: BLE001 - anything but StoreError breaks the contract
        result.crashes += 1
        result.notes.append(f"database failure: {type(exc).__name__} instead of StoreError")
    else:
        result.crashes += 1
        result.notes.append("database failure: the scan went on without its database")
    if not path.exists() or (inbox / FAILED_DIR).exists():
        result.data_lost += 1
        result.notes.append("database failure: the file was moved although it was not at fault")
