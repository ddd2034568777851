"""The SQLite store: the only module that holds SQL.

Every stage hands its results here and reads its inputs from here: ingest
writes papers and dump records, dispatch claims digests and freezes their
items, replies append feedback events. The schema is versioned by numbered
migrations recorded in ``schema_version``; upgrades migrate in place and
never drop feedback.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Self

from .errors import StoreError, StoreWriteError
from .paper import Paper, normalise_title

# Each entry upgrades the schema by one version; never edit one that has shipped.
MIGRATIONS: tuple[str, ...] = (
    # 1: papers, dumps, digests and their frozen items, feedback events.
    """
    CREATE TABLE papers (
        seq          INTEGER PRIMARY KEY,       -- ingest order: "new since the last digest"
        id           TEXT NOT NULL UNIQUE,      -- arXiv id, else "t:" + title hash
        title_key    TEXT NOT NULL UNIQUE,      -- normalised title: one paper across formats
        title        TEXT NOT NULL,
        abstract     TEXT NOT NULL,
        arxiv_id     TEXT,
        listed_on    TEXT,
        code_links   TEXT NOT NULL DEFAULT '[]',
        upvotes      INTEGER,
        listing_rank INTEGER,
        ingested_at  TEXT NOT NULL
    );
    CREATE TABLE dumps (
        sha256       TEXT PRIMARY KEY,
        path         TEXT NOT NULL,
        format       TEXT NOT NULL,
        papers       INTEGER NOT NULL,
        new_papers   INTEGER NOT NULL,
        ingested_at  TEXT NOT NULL
    );
    CREATE TABLE digests (
        id           INTEGER PRIMARY KEY,
        subscriber   TEXT NOT NULL,             -- lower-cased email
        local_date   TEXT NOT NULL,             -- the subscriber's date the digest is for
        token        TEXT NOT NULL UNIQUE,
        message_id   TEXT NOT NULL UNIQUE,
        status       TEXT NOT NULL CHECK (status IN ('claimed', 'sent', 'failed')),
        considered   INTEGER NOT NULL,
        corpus_seq   INTEGER NOT NULL,          -- papers up to this seq were considered
        message      BLOB NOT NULL,             -- the rendered email, resent as is after a crash
        attempts     INTEGER NOT NULL DEFAULT 0,
        error        TEXT,
        claimed_at   TEXT NOT NULL,
        sent_at      TEXT,
        UNIQUE (subscriber, local_date)
    );
    CREATE TABLE digest_items (
        digest_id    INTEGER NOT NULL REFERENCES digests(id),
        position     INTEGER NOT NULL,          -- 1-based: what "like 3" means
        paper_id     TEXT NOT NULL REFERENCES papers(id),
        score        REAL NOT NULL,
        reason       TEXT NOT NULL,
        explore      INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (digest_id, position)
    );
    CREATE INDEX digest_items_paper ON digest_items(paper_id);
    CREATE TABLE feedback (
        id           INTEGER PRIMARY KEY,
        subscriber   TEXT NOT NULL,
        paper_id     TEXT NOT NULL REFERENCES papers(id),
        signal       TEXT NOT NULL CHECK (signal IN ('like', 'skip')),
        source       TEXT NOT NULL,             -- 'reply', 'cli', ...
        digest_id    INTEGER REFERENCES digests(id),
        at           TEXT NOT NULL
    );
    CREATE INDEX feedback_subscriber ON feedback(subscriber, paper_id);
    """,
    # 2: what a subscriber set by reply (wins over the config until changed by reply).
    """
    CREATE TABLE subscriber_state (
        subscriber        TEXT PRIMARY KEY,
        paused            INTEGER NOT NULL DEFAULT 0,
        paused_until      TEXT,                 -- local date the pause ends; NULL: until resume
        unsubscribed_at   TEXT,
        send_at           TEXT,                 -- "HH:MM" set by the "time" command
        max_papers        INTEGER,              -- set by the "size" command
        interests_added   TEXT NOT NULL DEFAULT '[]',
        interests_removed TEXT NOT NULL DEFAULT '[]',
        bouncing_since    TEXT,                 -- a permanent SMTP failure; cleared by a reply
        bounce_reason     TEXT,
        updated_at        TEXT NOT NULL
    );
    """,
    # 3: replies read from the mailbox (once each, by Message-ID) and their confirmations.
    """
    CREATE TABLE replies (
        key          TEXT PRIMARY KEY,          -- Message-ID, else "sha256:" + hash of the bytes
        sender       TEXT NOT NULL,             -- lower-cased From address ('' when none)
        digest_id    INTEGER REFERENCES digests(id),
        outcome      TEXT NOT NULL,             -- applied | ignored | rejected | error
        detail       TEXT NOT NULL DEFAULT '',
        commands     TEXT NOT NULL DEFAULT '[]', -- the commands applied, as JSON
        processed_at TEXT NOT NULL
    );
    CREATE INDEX replies_sender ON replies(sender, processed_at);
    CREATE TABLE confirmations (
        id           INTEGER PRIMARY KEY,
        subscriber   TEXT NOT NULL,
        reply_key    TEXT NOT NULL REFERENCES replies(key),
        status       TEXT NOT NULL CHECK (status IN ('pending', 'sent', 'failed')),
        message      BLOB NOT NULL,             -- queued with the commands, sent after commit
        attempts     INTEGER NOT NULL DEFAULT 0,
        error        TEXT,
        created_at   TEXT NOT NULL,
        sent_at      TEXT
    );
    CREATE INDEX confirmations_subscriber ON confirmations(subscriber, created_at);
    CREATE INDEX confirmations_status ON confirmations(status);
    """,
    # 4: what listings say about a paper beyond title and abstract (shown in the digest).
    """
    ALTER TABLE papers ADD COLUMN authors TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE papers ADD COLUMN arxiv_version INTEGER;
    ALTER TABLE papers ADD COLUMN source TEXT;
    ALTER TABLE papers ADD COLUMN abstract_is_summary INTEGER NOT NULL DEFAULT 0;
    """,
    # 5: [[sources]]: what each listing URL last answered (for conditional GET) and each
    # source's last fetch (for its schedule and ``digest status``).
    """
    CREATE TABLE fetched_urls (
        source        TEXT NOT NULL,            -- the [[sources]] name
        url           TEXT NOT NULL,            -- {date} filled in
        etag          TEXT,                     -- sent back as If-None-Match
        last_modified TEXT,                     -- sent back as If-Modified-Since
        sha256        TEXT,                     -- of the body last written: the same is not rewritten
        file          TEXT,                     -- the inbox file it was written to
        bytes         INTEGER,
        fetched_at    TEXT NOT NULL,            -- the last 200 or 304
        PRIMARY KEY (source, url)
    );
    CREATE TABLE source_runs (
        source        TEXT PRIMARY KEY,
        started_at    TEXT NOT NULL,            -- the last fetch, scheduled or by hand
        outcome       TEXT NOT NULL CHECK (outcome IN ('ok', 'failed')),
        detail        TEXT NOT NULL DEFAULT '',
        failures      INTEGER NOT NULL DEFAULT 0,  -- failed fetches in a row
        last_ok_at    TEXT,
        retry_at      TEXT,                     -- a failed fetch is tried again from then on
        not_before    TEXT                      -- the server's Retry-After: not asked before
    );
    """,
    # 6: who claimed a digest ("host:pid" of the sending process): a claimed digest is
    # resent only by its owner, or by a sender holding the state lock once the owner is dead.
    """
    ALTER TABLE digests ADD COLUMN owner TEXT;
    """,
    # 7: a subscriber's own library (BibTeX, CSL-JSON, RIS) as seed papers. An entry stays
    # here, pending, until a paper with its arXiv id or title arrives; with an abstract it
    # counts as a positive even before that.
    """
    CREATE TABLE library_entries (
        id           INTEGER PRIMARY KEY,
        subscriber   TEXT NOT NULL,             -- lower-cased email
        entry_key    TEXT NOT NULL,             -- arXiv id, else normalised title: once each
        title        TEXT NOT NULL DEFAULT '',
        title_key    TEXT NOT NULL DEFAULT '',  -- matched against papers.title_key
        abstract     TEXT NOT NULL DEFAULT '',
        arxiv_id     TEXT,
        source       TEXT NOT NULL,             -- 'config', 'import', 'reply'
        added_at     TEXT NOT NULL,
        UNIQUE (subscriber, entry_key)
    );
    CREATE TABLE library_files (
        subscriber   TEXT NOT NULL,
        path         TEXT NOT NULL,
        sha256       TEXT NOT NULL,             -- the config's file is read again when it changes
        imported_at  TEXT NOT NULL,
        PRIMARY KEY (subscriber, path)
    );
    """,
    # 8: a normalised title no longer names one paper: two arXiv papers with different
    # ids and the same title are two papers. SQLite cannot drop a column's UNIQUE, so the
    # table is rebuilt (https://www.sqlite.org/lang_altertable.html, "other kinds of
    # changes"; _migrate turns foreign keys off around it) with every row kept.
    """
    CREATE TABLE papers_rebuilt (
        seq          INTEGER PRIMARY KEY,
        id           TEXT NOT NULL UNIQUE,
        title_key    TEXT NOT NULL,             -- normalised title; not unique (see above)
        title        TEXT NOT NULL,
        abstract     TEXT NOT NULL,
        arxiv_id     TEXT,
        listed_on    TEXT,
        code_links   TEXT NOT NULL DEFAULT '[]',
        upvotes      INTEGER,
        listing_rank INTEGER,
        ingested_at  TEXT NOT NULL,
        authors      TEXT NOT NULL DEFAULT '[]',
        arxiv_version INTEGER,
        source       TEXT,
        abstract_is_summary INTEGER NOT NULL DEFAULT 0
    );
    INSERT INTO papers_rebuilt (seq, id, title_key, title, abstract, arxiv_id, listed_on,
        code_links, upvotes, listing_rank, ingested_at, authors, arxiv_version, source,
        abstract_is_summary)
    SELECT seq, id, title_key, title, abstract, arxiv_id, listed_on, code_links, upvotes,
        listing_rank, ingested_at, authors, arxiv_version, source, abstract_is_summary
    FROM papers;
    DROP TABLE papers;
    ALTER TABLE papers_rebuilt RENAME TO papers;
    CREATE INDEX papers_title_key ON papers(title_key);
    CREATE INDEX papers_arxiv_id ON papers(arxiv_id);
    """,
    # 9: a dispatch at 100,000 subscribers. The rendered message (30-50 KB) moves to a table
    # of its own: SQLite keeps a row's later columns (sent_at, owner) behind the BLOB's
    # overflow pages, so every look-up of a digest read the whole message. digests.message
    # stays, empty (a column cannot be dropped before SQLite 3.35). Then an index for each
    # query of a dispatch that had to scan (tests/test_store.py checks every plan).
    """
    CREATE TABLE digest_messages (
        digest_id    INTEGER PRIMARY KEY REFERENCES digests(id),
        message      BLOB NOT NULL              -- the rendered email, resent as is after a crash
    );
    INSERT INTO digest_messages (digest_id, message) SELECT id, message FROM digests;
    UPDATE digests SET message = x'';
    CREATE INDEX digests_claimed ON digests(claimed_at, id) WHERE status = 'claimed';
    CREATE INDEX digests_sent ON digests(subscriber, local_date, corpus_seq)
        WHERE status = 'sent';
    CREATE INDEX papers_ingested_at ON papers(ingested_at);
    """,
)

# The stored arXiv version after a merge or a revision giving version ? (three times):
# the newer one; no version given keeps what is stored (NULL stays NULL, never 0).
_NEWER_VERSION = ("CASE WHEN ? IS NULL THEN arxiv_version WHEN arxiv_version IS NULL THEN ?"
                  " ELSE MAX(arxiv_version, ?) END")

# SQLite's answers that mean "no room or no permission to write", not a broken database:
# https://www.sqlite.org/rescode.html (SQLITE_FULL, SQLITE_READONLY*, SQLITE_IOERR*,
# SQLITE_CANTOPEN for a journal file the folder does not let us create).
_WRITE_ERRORS = ("SQLITE_FULL", "SQLITE_READONLY", "SQLITE_IOERR", "SQLITE_CANTOPEN")


def is_write_failure(exc: BaseException) -> bool:
    """Whether a sqlite3 error means the disk is full or read-only (see ``_WRITE_ERRORS``)."""
    name = getattr(exc, "sqlite_errorname", None) or ""
    if name.startswith(_WRITE_ERRORS):
        return True
    text = str(exc).lower()
    return any(words in text for words in ("database or disk is full", "readonly database",
                                           "disk i/o error"))


def utc_now() -> datetime:
    """The one clock of the store; tests move it with time-machine."""
    return datetime.now(UTC)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class DumpRecord:
    sha256: str
    path: str
    format: str
    papers: int
    new_papers: int
    ingested_at: str


@dataclass(frozen=True)
class ListingStored:
    """What storing one listing did: papers added, stored papers revised."""

    new: int
    updated: int


@dataclass(frozen=True)
class DigestRow:
    """A digest's row, without its message unless it was at hand (see ``message``)."""

    id: int
    subscriber: str
    local_date: date
    token: str
    message_id: str
    status: str
    considered: int
    corpus_seq: int
    attempts: int
    error: str | None
    claimed_at: str
    sent_at: str | None
    owner: str | None = None  # "host:pid" of the process that claimed it (None: before v5)
    # The rendered email when it came with the row (a claim has it in hand); else None and
    # ``message`` reads it through ``reader`` (``Store.digest_message``) when asked.
    body: bytes | None = field(default=None, repr=False, compare=False)
    reader: Callable[[int], bytes] | None = field(default=None, repr=False, compare=False)

    @property
    def message(self) -> bytes:
        """The rendered email (bytes, 30-50 KB): the one read of its BLOB, when it is needed.

        Raises StoreError when the row came with no way to read it.
        """
        if self.body is not None:
            return self.body
        if self.reader is None:
            raise StoreError(f"digest {self.id}: its message was not read with the row")
        return self.reader(self.id)


# A digest's columns in DigestRow's order, without the message.
_DIGEST_COLUMNS = ("id, subscriber, local_date, token, message_id, status, considered, corpus_seq,"
                   " attempts, error, claimed_at, sent_at, owner")


@dataclass(frozen=True)
class ItemRow:
    position: int
    paper_id: str
    score: float
    reason: str
    explore: bool


@dataclass(frozen=True)
class Claim:
    """One digest to claim (``Store.claim_digests``): what ``claim_digest`` takes."""

    subscriber: str
    local_date: date
    token: str
    message_id: str
    considered: int
    corpus_seq: int
    message: bytes
    items: Sequence[ItemRow]
    owner: str | None = None


@dataclass(frozen=True)
class SubscriberState:
    """Subscription settings a subscriber changed by reply; None/empty: the config decides."""

    subscriber: str
    paused: bool = False
    paused_until: date | None = None
    unsubscribed_at: str | None = None
    send_at: str | None = None
    max_papers: int | None = None
    interests_added: tuple[str, ...] = ()
    interests_removed: tuple[str, ...] = ()
    bouncing_since: str | None = None
    bounce_reason: str | None = None
    updated_at: str | None = None

    @property
    def unsubscribed(self) -> bool:
        return self.unsubscribed_at is not None

    @property
    def bouncing(self) -> bool:
        return self.bouncing_since is not None


# Addresses per ``IN (...)`` query: well under SQLite's limit on bound parameters.
IN_CHUNK = 500


def _in_chunks(subscribers: Sequence[str]) -> Iterator[list[str]]:
    """The lower-cased addresses, ``IN_CHUNK`` at a time."""
    for start in range(0, len(subscribers), IN_CHUNK):
        yield [email.lower() for email in subscribers[start:start + IN_CHUNK]]


_STATE_FIELDS = ("paused", "paused_until", "unsubscribed_at", "send_at", "max_papers",
                 "interests_added", "interests_removed", "bouncing_since", "bounce_reason")


@dataclass(frozen=True)
class FeedbackRow:
    paper_id: str
    signal: str
    source: str
    digest_id: int | None
    at: str


@dataclass(frozen=True)
class FeedbackEvent:
    """One like or skip to append (``Store.add_feedback_events``): ``add_feedback``'s arguments."""

    subscriber: str
    paper_id: str
    signal: str  # 'like' or 'skip'
    source: str  # 'reply', 'cli', ...
    digest_id: int | None = None


@dataclass(frozen=True)
class LibraryEntry:
    """One entry of a subscriber's library: a title, an abstract, an arXiv id (any may be empty)."""

    title: str = ""
    abstract: str = ""
    arxiv_id: str | None = None

    @property
    def key(self) -> str:
        """What makes two entries the same paper: the arXiv id, else the normalised title."""
        return f"arxiv:{self.arxiv_id}" if self.arxiv_id else f"title:{normalise_title(self.title)}"


@dataclass(frozen=True)
class LibraryCounts:
    entries: int
    matched: int  # entries whose paper is stored (by arXiv id or title)
    with_text: int  # entries with an abstract: a positive even before the paper arrives

    @property
    def pending(self) -> int:
        return self.entries - self.matched


class Store:
    """One SQLite database file (WAL), migrated on open."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"{self.path}: cannot open the state database: {exc}") from exc

    @classmethod
    def reader(cls, path: str | Path) -> Store:
        """A read-only connection to an existing state database (a prepare worker's).

        No migration and no write: SQLite refuses any (``query_only``), so a
        process that only ranks and renders can never change the state. Raises
        ``StoreError`` when the file cannot be opened.
        """
        store = cls.__new__(cls)
        store.path = Path(path)
        try:
            uri = f"{store.path.resolve().as_uri()}?mode=ro"
            store._db = sqlite3.connect(uri, uri=True, timeout=30, isolation_level=None)
            store._db.row_factory = sqlite3.Row
            store._db.execute("PRAGMA query_only=ON")
            store._db.execute("SELECT MAX(version) FROM schema_version").fetchone()
        except (OSError, ValueError, sqlite3.Error) as exc:
            raise StoreError(f"{store.path}: cannot open the state database to read: {exc}"
                             ) from exc
        return store

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT: one writer at a time, all or nothing.

        Raises ``StoreWriteError`` (after rolling back) when the disk is full or
        the file or folder is read-only, at any statement or at the commit.
        """
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._rollback()
                raise
        except sqlite3.Error as exc:
            if is_write_failure(exc):
                raise StoreWriteError(
                    f"{self.path}: cannot write the state database ({exc}): free some disk "
                    f"space or make the file and its folder writable; nothing was half-written"
                ) from exc
            raise

    def _rollback(self) -> None:
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error:
            # SQLite rolls back by itself after some errors (SQLITE_FULL at commit);
            # "no transaction is active" then only confirms it.
            if self._db.in_transaction:
                raise

    def probe(self) -> None:
        """Raise ``StoreError`` unless the database can still be read (one row, a few pages).

        Tells a failure of one row or one subscriber's data (the probe passes) from a
        database that is unusable (gone, corrupt, closed), which stops the daemon.
        """
        try:
            self._db.execute("SELECT MAX(version) FROM schema_version").fetchone()
            self._db.execute("SELECT COUNT(*) FROM digests WHERE status = 'claimed'").fetchone()
        except (sqlite3.Error, ValueError) as exc:
            raise StoreError(f"{self.path}: the state database is unusable: {exc}") from exc

    def _migrate(self) -> None:
        self._db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = self._db.execute("SELECT MAX(version) FROM schema_version").fetchone()
        current = row[0] or 0
        if current > len(MIGRATIONS):
            raise StoreError(
                f"{self.path}: schema version {current} is newer than this paper-digest "
                f"understands ({len(MIGRATIONS)}); upgrade paper-digest"
            )
        if current == len(MIGRATIONS):
            return
        # A migration that rebuilds a table (8) must not have the drop delete the rows
        # that refer to it; the keys are checked before each commit instead.
        self._db.execute("PRAGMA foreign_keys=OFF")
        try:
            for version in range(current + 1, len(MIGRATIONS) + 1):
                with self.transaction() as db:
                    for statement in _statements(MIGRATIONS[version - 1]):
                        db.execute(statement)
                    broken = db.execute("PRAGMA foreign_key_check").fetchone()
                    if broken is not None:
                        raise StoreError(f"{self.path}: migration {version} would break a "
                                         f"reference from table {broken[0]}; not applied")
                    db.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
        finally:
            self._db.execute("PRAGMA foreign_keys=ON")

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("SELECT MAX(version) FROM schema_version").fetchone()[0])

    # --- dumps and papers ---------------------------------------------------

    def dump_record(self, sha256: str) -> DumpRecord | None:
        """The dump recorded with this content hash; StoreError when the database fails."""
        with self._database_errors("cannot read the dump records"):
            row = self._db.execute("SELECT * FROM dumps WHERE sha256 = ?", (sha256,)).fetchone()
        return DumpRecord(**dict(row)) if row else None

    def recent_dumps(self, limit: int = 10) -> list[DumpRecord]:
        rows = self._db.execute(
            "SELECT * FROM dumps ORDER BY ingested_at DESC, rowid DESC LIMIT ?", (limit,)
        )
        return [DumpRecord(**dict(row)) for row in rows]

    def add_dump(self, sha256: str, path: str, fmt: str, papers: Sequence[Paper]) -> int:
        """Store a dump's papers and its record in one transaction; return how many were new."""
        return self.add_listing(sha256, path, fmt, papers).new

    def add_listing(
        self, sha256: str, path: str, fmt: str, papers: Sequence[Paper],
        updates: Sequence[Paper] = (),
    ) -> ListingStored:
        """Store a listing in one transaction: its papers, its revisions, its dump record.

        A paper already stored (same id, or same normalised title) keeps its id
        and gains what it lacked (see ``_upsert_paper``). ``updates`` (arXiv's
        ``replace`` entries) change a stored paper's title, abstract and version
        and never add a paper, so a revised old paper is no new candidate.
        An empty listing is recorded too, as a dump of 0 papers.

        Raises StoreError when the database itself fails (locked, read-only,
        full, corrupt): the daemon's failure, not the file's. An error about one
        of this file's rows (a constraint, a value SQLite cannot hold) is raised
        as it is, after the rollback, for the caller to record as the file's.
        """
        now = _iso(utc_now())
        new = updated = 0
        with self._database_errors(f"cannot store the dump {path}"), \
                self.transaction() as db:
            for paper in papers:
                new += self._upsert_paper(db, paper, now)
            for paper in updates:
                updated += self._revise_paper(db, paper)
            db.execute(
                "INSERT INTO dumps (sha256, path, format, papers, new_papers, ingested_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (sha256, path, fmt, len(papers), new, now),
            )
        return ListingStored(new=new, updated=updated)

    @contextmanager
    def _database_errors(self, doing: str) -> Iterator[None]:
        """Turn a failure of the database itself into StoreError; let row errors pass.

        Only IntegrityError (a constraint), DataError (a value too big) and
        InterfaceError (a value of a type SQLite cannot bind) are about the
        statement's values, so about the file they came from; so are Python's
        own OverflowError and UnicodeEncodeError, which are no sqlite3 errors.
        Every other sqlite3 error (OperationalError: locked, read-only, full,
        I/O; DatabaseError: corrupt; ProgrammingError: a closed connection)
        is the database's, whatever file was being stored.
        """
        try:
            yield
        except (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.InterfaceError):
            raise
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {doing}: {exc}") from exc

    def _upsert_paper(self, db: sqlite3.Connection, paper: Paper, now: str) -> int:
        """Insert a paper, or complete the stored one; 1 when it was new, else 0.

        Completing never loses what is stored: the id stays (digests and
        feedback refer to it), missing fields are filled, upvotes only grow.
        The abstract is replaced only by a longer one that continues it (a page
        dump cut mid-abstract, completed by a later listing) or by the authors'
        abstract where only a generated summary was stored; never the reverse.
        """
        title_key = normalise_title(paper.title)
        existing = self._same_paper(db, paper, title_key)
        if existing is None:
            db.execute(
                "INSERT INTO papers (id, title_key, title, abstract, arxiv_id, listed_on,"
                " code_links, upvotes, listing_rank, ingested_at, authors, arxiv_version,"
                " source, abstract_is_summary)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (paper.id, title_key, paper.title, paper.abstract, paper.arxiv_id,
                 paper.listed_on.isoformat() if paper.listed_on else None,
                 json.dumps(list(paper.code_links)), paper.upvotes, paper.listing_rank, now,
                 json.dumps(list(paper.authors)), paper.version, paper.source,
                 int(paper.abstract_is_summary)),
            )
            return 1
        # A stored link that a new one extends was cut with its page (mid-URL): drop it.
        links = [link for link in json.loads(existing["code_links"])
                 if not any(new != link and new.startswith(link) for new in paper.code_links)]
        merged_links = links + [link for link in paper.code_links if link not in links]
        abstract, is_summary = existing["abstract"], bool(existing["abstract_is_summary"])
        if _completes(abstract, is_summary, paper.abstract, paper.abstract_is_summary):
            abstract, is_summary = paper.abstract, paper.abstract_is_summary
        db.execute(
            "UPDATE papers SET arxiv_id = COALESCE(arxiv_id, ?),"
            " upvotes = MAX(COALESCE(upvotes, 0), COALESCE(?, 0)), code_links = ?,"
            " authors = CASE WHEN authors = '[]' THEN ? ELSE authors END,"
            f" arxiv_version = {_NEWER_VERSION},"
            " source = COALESCE(source, ?), abstract = ?, abstract_is_summary = ?"
            " WHERE seq = ?",
            (paper.arxiv_id, paper.upvotes, json.dumps(merged_links),
             json.dumps(list(paper.authors)), paper.version, paper.version, paper.version,
             paper.source, abstract,
             int(is_summary), existing["seq"]),
        )
        return 0

    @staticmethod
    def _same_paper(db: sqlite3.Connection, paper: Paper, title_key: str) -> sqlite3.Row | None:
        """The stored paper ``paper`` is: the same id, else the same arXiv id (a paper first
        stored by title), else the same normalised title unless both have arXiv ids and
        they differ (two papers that happen to share a title)."""
        columns = "seq, abstract, abstract_is_summary, code_links"
        row: sqlite3.Row | None = db.execute(
            f"SELECT {columns} FROM papers WHERE id = ?", (paper.id,)).fetchone()
        if row is None and paper.arxiv_id:
            row = db.execute(f"SELECT {columns} FROM papers WHERE arxiv_id = ? ORDER BY seq",
                             (paper.arxiv_id,)).fetchone()
        if row is None:
            row = db.execute(
                f"SELECT {columns} FROM papers WHERE title_key = ?"
                " AND (? IS NULL OR arxiv_id IS NULL OR arxiv_id = ?) ORDER BY seq",
                (title_key, paper.arxiv_id, paper.arxiv_id)).fetchone()
        return row

    def _revise_paper(self, db: sqlite3.Connection, paper: Paper) -> int:
        """Apply a revision (arXiv ``replace``) to the stored paper of that id; 1 if stored.

        An older version than the stored one changes nothing. The title changes
        unless another stored paper already has the new title.
        """
        existing = db.execute(
            "SELECT seq, COALESCE(arxiv_version, 0) AS version FROM papers"
            " WHERE id = ? OR (arxiv_id IS NOT NULL AND arxiv_id = ?)"
            " ORDER BY id = ? DESC, seq LIMIT 1",
            (paper.id, paper.arxiv_id, paper.id),
        ).fetchone()
        if existing is None or (paper.version or 0) < existing["version"]:
            return 0
        title_key = normalise_title(paper.title)
        clash = db.execute("SELECT 1 FROM papers WHERE title_key = ? AND seq != ?",
                           (title_key, existing["seq"])).fetchone()
        db.execute(
            "UPDATE papers SET"
            " title = CASE WHEN ? THEN title ELSE ? END,"
            " title_key = CASE WHEN ? THEN title_key ELSE ? END,"
            " abstract = CASE WHEN ? = '' THEN abstract ELSE ? END,"
            " abstract_is_summary = CASE WHEN ? = '' THEN abstract_is_summary ELSE 0 END,"
            " authors = CASE WHEN ? = '[]' THEN authors ELSE ? END,"
            f" arxiv_version = {_NEWER_VERSION}"
            " WHERE seq = ?",
            (clash is not None, paper.title, clash is not None, title_key,
             paper.abstract, paper.abstract, paper.abstract,
             json.dumps(list(paper.authors)), json.dumps(list(paper.authors)),
             paper.version, paper.version, paper.version, existing["seq"]),
        )
        return 1

    def paper_count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM papers").fetchone()[0])

    def corpus_seq(self) -> int:
        """The newest paper's ingest sequence number (0 with no papers)."""
        return int(self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM papers").fetchone()[0])

    def all_papers(self) -> list[Paper]:
        rows = self._db.execute("SELECT * FROM papers ORDER BY seq")
        return [_paper(row) for row in rows]

    def papers_by_id(self, ids: Iterable[str]) -> dict[str, Paper]:
        wanted = list(dict.fromkeys(ids))
        found: dict[str, Paper] = {}
        for start in range(0, len(wanted), 500):
            chunk = wanted[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self._db.execute(f"SELECT * FROM papers WHERE id IN ({marks})", chunk):
                found[row["id"]] = _paper(row)
        return found

    # --- digests ------------------------------------------------------------

    def candidate_papers(self, subscriber: str, since_seq: int) -> list[Paper]:
        """Papers ingested after ``since_seq`` that this subscriber was never sent."""
        rows = self._db.execute(
            "SELECT * FROM papers WHERE seq > ? AND id NOT IN ("
            "  SELECT i.paper_id FROM digest_items i JOIN digests d ON d.id = i.digest_id"
            "  WHERE d.subscriber = ? AND d.status IN ('sent', 'claimed'))"
            " ORDER BY seq",
            (since_seq, subscriber.lower()),
        )
        return [_paper(row) for row in rows]

    def papers_since(self, since_seq: int) -> list[tuple[int, Paper]]:
        """(seq, paper) for the papers ingested after ``since_seq``, in ingest order.

        A dispatch reads them once, from the lowest ``since`` of its subscribers, and
        takes each one's candidates from them: the papers after that subscriber's own
        ``since`` (bisect on seq) without ``sent_paper_ids``.
        """
        rows = self._db.execute("SELECT * FROM papers WHERE seq > ? ORDER BY seq", (since_seq,))
        return [(int(row["seq"]), _paper(row)) for row in rows]

    def _tuples(self, sql: str, params: Sequence[object]) -> list[tuple[Any, ...]]:
        """All rows of a query as plain tuples: the per-subscriber queries of a dispatch read
        hundreds of rows each, and a ``sqlite3.Row`` per row costs ~15% of their time."""
        cursor = self._db.cursor()
        cursor.row_factory = None
        try:
            return cursor.execute(sql, params).fetchall()
        finally:
            cursor.close()

    def sent_paper_ids(self, subscriber: str, since_seq: int) -> set[str]:
        """Ids of the papers ingested after ``since_seq`` that the subscriber was sent (or has
        claimed): ``candidate_papers(s, n)`` is ``papers_since(n)`` without these."""
        rows = self._tuples(
            "SELECT i.paper_id FROM digests d JOIN digest_items i ON i.digest_id = d.id"
            " JOIN papers p ON p.id = i.paper_id"
            " WHERE d.subscriber = ? AND d.status IN ('sent', 'claimed') AND p.seq > ?",
            (subscriber.lower(), since_seq),
        )
        return {row[0] for row in rows}

    def last_sent_seqs(self) -> dict[str, int]:
        """Every subscriber's last sent digest's ``corpus_seq`` (``last_sent_digest(s).corpus_seq``
        for all at once; a subscriber never sent a digest is absent)."""
        # SQLite takes the bare column corpus_seq from the row holding MAX(local_date)
        # (https://www.sqlite.org/lang_select.html#bareagg); (subscriber, local_date) is unique.
        rows = self._db.execute(
            "SELECT subscriber, corpus_seq, MAX(local_date) FROM digests WHERE status = 'sent'"
            " GROUP BY subscriber")
        return {row[0]: int(row[1]) for row in rows}

    def newest_digest_dates(self, subscribers: Sequence[str] | None = None) -> dict[str, date]:
        """Every subscriber's newest digest's local date, whatever its status
        (``digests_of(s, limit=1)[0].local_date`` for all at once), keyed by lower-cased
        address; only those of ``subscribers`` (addresses, any case) when given, so a
        dispatch reads them a bounded chunk at a time."""
        if subscribers is None:
            rows = self._db.execute("SELECT subscriber, MAX(local_date) FROM digests"
                                    " GROUP BY subscriber")
            return {row[0]: date.fromisoformat(row[1]) for row in rows}
        found: dict[str, date] = {}
        for chunk in _in_chunks(subscribers):
            rows = self._db.execute(
                "SELECT subscriber, MAX(local_date) FROM digests WHERE subscriber IN"
                f" ({', '.join('?' * len(chunk))}) GROUP BY subscriber", chunk)
            found.update((row[0], date.fromisoformat(row[1])) for row in rows)
        return found

    def first_seq_since(self, moment: datetime) -> int:
        """The seq just before the first paper ingested at or after ``moment``."""
        # Without INDEXED BY SQLite walks the rowids up from the oldest paper looking for the
        # first recent one (MIN(seq) on the primary key): nearly the whole table, per subscriber.
        row = self._db.execute(
            "SELECT MIN(seq) FROM papers INDEXED BY papers_ingested_at WHERE ingested_at >= ?",
            (_iso(moment),)
        ).fetchone()
        return (row[0] - 1) if row[0] is not None else self.corpus_seq()

    def last_sent_seq(self, subscriber: str) -> int | None:
        """``last_sent_digest(subscriber).corpus_seq``, None when none was sent: read from the
        index alone (digests_sent), once per subscriber and dispatch."""
        row = self._db.execute(
            "SELECT corpus_seq FROM digests WHERE subscriber = ? AND status = 'sent'"
            " ORDER BY local_date DESC, id DESC LIMIT 1", (subscriber.lower(),)).fetchone()
        return int(row[0]) if row else None

    def last_sent_digest(self, subscriber: str) -> DigestRow | None:
        row = self._db.execute(
            f"SELECT {_DIGEST_COLUMNS} FROM digests WHERE subscriber = ? AND status = 'sent'"
            " ORDER BY local_date DESC, id DESC LIMIT 1",
            (subscriber.lower(),),
        ).fetchone()
        return self._digest(row) if row else None

    def digest_on(self, subscriber: str, local_date: date) -> DigestRow | None:
        row = self._db.execute(
            f"SELECT {_DIGEST_COLUMNS} FROM digests WHERE subscriber = ? AND local_date = ?",
            (subscriber.lower(), local_date.isoformat()),
        ).fetchone()
        return self._digest(row) if row else None

    def digest_by_token(self, token: str) -> DigestRow | None:
        row = self._db.execute(f"SELECT {_DIGEST_COLUMNS} FROM digests WHERE token = ?",
                               (token,)).fetchone()
        return self._digest(row) if row else None

    def digests_of(self, subscriber: str, limit: int = 30) -> list[DigestRow]:
        rows = self._db.execute(
            f"SELECT {_DIGEST_COLUMNS} FROM digests WHERE subscriber = ?"
            " ORDER BY local_date DESC, id DESC LIMIT ?",
            (subscriber.lower(), limit),
        )
        return [self._digest(row) for row in rows]

    def digest_message(self, digest_id: int) -> bytes:
        """The rendered email of a digest (30-50 KB), as claimed: what a resend sends.

        Raises StoreError when no digest has that id.
        """
        row = self._db.execute("SELECT message FROM digest_messages WHERE digest_id = ?",
                               (digest_id,)).fetchone()
        if row is None:
            raise StoreError(f"{self.path}: digest {digest_id} has no stored message")
        return bytes(row[0])

    def _digest(self, row: sqlite3.Row) -> DigestRow:
        """A row of ``SELECT {_DIGEST_COLUMNS}``; its message is read when asked for."""
        return DigestRow(row[0], row[1], date.fromisoformat(row[2]), row[3], row[4], row[5],
                         row[6], row[7], row[8], row[9], row[10], row[11], row[12],
                         reader=self.digest_message)

    def claim_digest(
        self,
        *,
        subscriber: str,
        local_date: date,
        token: str,
        message_id: str,
        considered: int,
        corpus_seq: int,
        message: bytes,
        items: Sequence[ItemRow],
        owner: str | None = None,
    ) -> DigestRow | None:
        """Claim the subscriber's digest for ``local_date`` with its frozen items.

        Returns None when a digest for that date already exists: whoever
        claimed it first sends it, so a day is never sent twice. ``owner``
        ("host:pid") is recorded: only that process resends the digest while
        it lives (see ``take_over_claim``).
        """
        claim = Claim(subscriber=subscriber, local_date=local_date, token=token,
                      message_id=message_id, considered=considered, corpus_seq=corpus_seq,
                      message=message, items=tuple(items), owner=owner)
        with self.transaction() as db:
            return self._claim(db, claim, _iso(utc_now()))

    def claim_digests(self, claims: Sequence[Claim]) -> list[DigestRow | None | Exception]:
        """Claim many digests in one transaction; one answer per claim, in order.

        Each claim has exactly ``claim_digest``'s meaning: its row (claimed,
        with its frozen items), or None when that subscriber's day already has
        a digest (claimed or sent before, or earlier in this batch). A claim
        whose own rows the database refuses (a constraint, such as an item
        naming no stored paper; a value SQLite cannot hold) is undone alone,
        to its savepoint, and its exception is its answer (as
        ``asyncio.gather(..., return_exceptions=True)`` answers): that
        subscriber's failure, the other claims stand. A failure of the
        database itself (full, read-only: StoreWriteError; locked, corrupt)
        raises and claims nothing. One transaction instead of one per claim
        spares a lock, a commit and a WAL frame per subscriber.
        """
        answers: list[DigestRow | None | Exception] = []
        now = _iso(utc_now())
        with self.transaction() as db:
            for claim in claims:
                db.execute("SAVEPOINT claim")
                try:
                    answers.append(self._claim(db, claim, now))
                except (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.InterfaceError,
                        OverflowError, UnicodeEncodeError) as exc:
                    db.execute("ROLLBACK TO claim")
                    answers.append(exc)
                db.execute("RELEASE claim")
        return answers

    def _claim(self, db: sqlite3.Connection, claim: Claim, now: str) -> DigestRow | None:
        """Insert one claim's digest, message and items inside the caller's transaction."""
        subscriber = claim.subscriber.lower()
        day = claim.local_date.isoformat()
        cursor = db.execute(
            "INSERT OR IGNORE INTO digests (subscriber, local_date, token, message_id, status,"
            " considered, corpus_seq, message, claimed_at, owner)"
            " VALUES (?, ?, ?, ?, 'claimed', ?, ?, x'', ?, ?)",
            (subscriber, day, claim.token, claim.message_id, claim.considered,
             claim.corpus_seq, now, claim.owner),
        )
        if cursor.rowcount == 0:
            return None
        digest_id = int(cursor.lastrowid or 0)
        db.execute("INSERT INTO digest_messages (digest_id, message) VALUES (?, ?)",
                   (digest_id, claim.message))
        db.executemany(
            "INSERT INTO digest_items (digest_id, position, paper_id, score, reason, explore)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [(digest_id, item.position, item.paper_id, item.score, item.reason,
              int(item.explore)) for item in claim.items],
        )
        return DigestRow(digest_id, subscriber, claim.local_date, claim.token, claim.message_id,
                         "claimed", claim.considered, claim.corpus_seq, 0, None, now, None,
                         claim.owner, body=claim.message, reader=self.digest_message)

    def add_sent_digests(self, claims: Sequence[Claim]) -> list[int]:
        """Store digests that were already sent, all in one transaction: their ids, in order.

        A bulk import (the dispatch benchmark's month of past digests): each
        claim is stored as ``claim_digest`` followed by ``mark_sent`` leaves it
        (status 'sent', one attempt, no error, ``claimed_at`` and ``sent_at``
        now, its message and frozen items), with the ids SQLite would have
        given one by one (the largest id plus one, in order). Raises
        StoreError, storing nothing, when a subscriber's day already has a
        digest or a row is refused (a token used twice, an item naming no
        stored paper); StoreWriteError when the disk is full or read-only.
        """
        if not claims:
            return []
        now = _iso(utc_now())
        try:
            with self.transaction() as db:
                first = int(db.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM digests")
                            .fetchone()[0])
                ids = list(range(first, first + len(claims)))
                db.executemany(
                    "INSERT INTO digests (id, subscriber, local_date, token, message_id, status,"
                    " considered, corpus_seq, message, attempts, error, claimed_at, sent_at,"
                    " owner) VALUES (?, ?, ?, ?, ?, 'sent', ?, ?, x'', 1, NULL, ?, ?, ?)",
                    [(digest_id, claim.subscriber.lower(), claim.local_date.isoformat(),
                      claim.token, claim.message_id, claim.considered, claim.corpus_seq, now,
                      now, claim.owner) for digest_id, claim in zip(ids, claims, strict=True)],
                )
                db.executemany(
                    "INSERT INTO digest_messages (digest_id, message) VALUES (?, ?)",
                    [(digest_id, claim.message)
                     for digest_id, claim in zip(ids, claims, strict=True)],
                )
                db.executemany(
                    "INSERT INTO digest_items (digest_id, position, paper_id, score, reason,"
                    " explore) VALUES (?, ?, ?, ?, ?, ?)",
                    [(digest_id, item.position, item.paper_id, item.score, item.reason,
                      int(item.explore))
                     for digest_id, claim in zip(ids, claims, strict=True)
                     for item in claim.items],
                )
        except sqlite3.IntegrityError as exc:
            raise StoreError(f"{self.path}: {len(claims)} sent digests were refused, none "
                             f"stored: {exc}") from exc
        return ids

    def take_over_claim(self, digest_id: int, previous: str | None, owner: str) -> bool:
        """Make ``owner`` the owner of a claimed digest still owned by ``previous``.

        The caller must know ``previous`` dead (it holds the state lock, which
        every sender holds while it sends). False when the row changed
        meanwhile (sent, failed, or taken by someone else): then leave it alone.
        """
        with self.transaction() as db:
            cursor = db.execute(
                "UPDATE digests SET owner = ? WHERE id = ? AND status = 'claimed'"
                " AND owner IS ?", (owner, digest_id, previous))
            return cursor.rowcount == 1

    def mark_sent(self, digest_id: int, *, clear_bounce: bool = False) -> None:
        """Record a delivered digest (the server's 250), in one transaction.

        ``clear_bounce``: the delivery proves the address works, so its owner's
        bouncing state (``bouncing_since``, ``bounce_reason``) is cleared in the
        same transaction; a statement that changes nothing when it is not
        bouncing, instead of a read of its state per message.
        """
        self.mark_sent_many([digest_id], clear_bounce=clear_bounce)

    def mark_sent_many(self, digest_ids: Sequence[int], *, clear_bounce: bool = False) -> None:
        """``mark_sent`` for several delivered digests in one transaction (one commit).

        Raises ``StoreWriteError`` (nothing marked) when the disk is full or read-only.
        """
        if not digest_ids:
            return
        now = _iso(utc_now())
        with self.transaction() as db:
            db.executemany(
                "UPDATE digests SET status = 'sent', sent_at = ?, error = NULL,"
                " attempts = attempts + 1 WHERE id = ?",
                [(now, digest_id) for digest_id in digest_ids],
            )
            if clear_bounce:
                db.executemany(
                    "UPDATE subscriber_state SET bouncing_since = NULL, bounce_reason = NULL,"
                    " updated_at = ? WHERE subscriber = (SELECT subscriber FROM digests"
                    " WHERE id = ?) AND bouncing_since IS NOT NULL",
                    [(now, digest_id) for digest_id in digest_ids],
                )

    def mark_failed(self, digest_id: int, error: str, *, permanent: bool) -> None:
        """Record a failed delivery: permanent ends the day's digest, else it stays claimed."""
        with self.transaction() as db:
            db.execute(
                "UPDATE digests SET status = ?, error = ?, attempts = attempts + 1 WHERE id = ?",
                ("failed" if permanent else "claimed", error, digest_id),
            )

    def unsent_digests(self) -> list[DigestRow]:
        """Digests claimed and not (yet) delivered: a crash or an outage left them.

        Without their messages (``DigestRow.message`` reads each when it is resent):
        after an outage at 100,000 subscribers they would be gigabytes.
        """
        rows = self._db.execute(
            f"SELECT {_DIGEST_COLUMNS} FROM digests WHERE status = 'claimed'"
            " ORDER BY claimed_at, id"
        )
        return [self._digest(row) for row in rows]

    def digest_items(self, digest_id: int) -> list[ItemRow]:
        rows = self._db.execute(
            "SELECT position, paper_id, score, reason, explore FROM digest_items"
            " WHERE digest_id = ? ORDER BY position",
            (digest_id,),
        )
        return [ItemRow(row[0], row[1], row[2], row[3], bool(row[4])) for row in rows]

    def shown_papers(self, subscriber: str) -> list[str]:
        """Every paper this subscriber was sent, oldest digest first."""
        rows = self._db.execute(
            "SELECT i.paper_id FROM digest_items i JOIN digests d ON d.id = i.digest_id"
            " WHERE d.subscriber = ? AND d.status = 'sent' ORDER BY d.local_date, i.position",
            (subscriber.lower(),),
        )
        return [row[0] for row in rows]

    # --- feedback -----------------------------------------------------------

    def add_feedback(
        self,
        subscriber: str,
        paper_id: str,
        signal: str,
        *,
        source: str,
        digest_id: int | None = None,
        db: sqlite3.Connection | None = None,
    ) -> None:
        """Append a feedback event; pass ``db`` to join a caller's transaction."""
        values = (subscriber.lower(), paper_id, signal, source, digest_id, _iso(utc_now()))
        sql = ("INSERT INTO feedback (subscriber, paper_id, signal, source, digest_id, at)"
               " VALUES (?, ?, ?, ?, ?, ?)")
        if db is not None:
            db.execute(sql, values)
            return
        with self.transaction() as tx:
            tx.execute(sql, values)

    def add_feedback_events(self, events: Sequence[FeedbackEvent]) -> None:
        """Append many feedback events in one transaction, in order, as ``add_feedback`` would.

        Every event gets the same ``at`` (now). Raises StoreError, storing
        nothing, when a row is refused (a signal other than like or skip, a
        paper or digest that is not stored); StoreWriteError when the disk is
        full or read-only.
        """
        if not events:
            return
        now = _iso(utc_now())
        try:
            with self.transaction() as db:
                db.executemany(
                    "INSERT INTO feedback (subscriber, paper_id, signal, source, digest_id, at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    [(event.subscriber.lower(), event.paper_id, event.signal, event.source,
                      event.digest_id, now) for event in events],
                )
        except sqlite3.IntegrityError as exc:
            raise StoreError(f"{self.path}: {len(events)} feedback events were refused, none "
                             f"stored: {exc}") from exc

    def shown_papers_at(self, subscriber: str) -> list[tuple[str, str]]:
        """(paper id, ISO time the digest was sent) for every paper sent, oldest first."""
        return self._tuples(
            "SELECT i.paper_id, COALESCE(d.sent_at, d.claimed_at) FROM digest_items i"
            " JOIN digests d ON d.id = i.digest_id"
            " WHERE d.subscriber = ? AND d.status = 'sent' ORDER BY d.local_date, i.position",
            (subscriber.lower(),),
        )

    def shown_and_sent(self, subscriber: str) -> tuple[list[tuple[str, str]], set[str]]:
        """``(shown_papers_at(s), ids)``: ``ids`` holds every paper of the subscriber's sent
        or claimed digests, so ``p.id not in ids`` for the papers after any ``since`` is
        ``p.id not in sent_paper_ids(s, since)`` (a paper has one seq).

        What a digest's preparation reads of the subscriber's past digests, in two reads
        where ``sent_paper_ids`` and ``shown_papers_at`` made two walks over every item
        (one of them looking each item's paper up for its seq) and one time string per
        item: each digest's time is read once, its items as (digest id, paper id) rows.
        """
        key = subscriber.lower()
        digests = self._tuples(
            "SELECT id, status = 'sent', COALESCE(sent_at, claimed_at) FROM digests"
            " WHERE subscriber = ? AND status IN ('sent', 'claimed')", (key,))
        if not digests:
            return [], set()
        items = self._tuples(
            "SELECT i.digest_id, i.paper_id FROM digests d JOIN digest_items i"
            " ON i.digest_id = d.id WHERE d.subscriber = ? AND d.status IN ('sent', 'claimed')"
            " ORDER BY d.local_date, i.position", (key,))
        sent_at = {digest_id: at for digest_id, sent, at in digests if sent}
        shown = [(paper_id, sent_at[digest_id]) for digest_id, paper_id in items
                 if digest_id in sent_at]
        return shown, {paper_id for _, paper_id in items}

    # --- a subscriber's library (seed papers) --------------------------------

    def add_library_entries(
        self, subscriber: str, entries: Sequence[LibraryEntry], *, source: str,
        db: sqlite3.Connection | None = None,
    ) -> int:
        """Store entries not stored yet (by :attr:`LibraryEntry.key`); returns how many were new.

        Pass ``db`` to join a caller's transaction (a reply's commands).
        """
        sql = ("INSERT OR IGNORE INTO library_entries (subscriber, entry_key, title, title_key,"
               " abstract, arxiv_id, source, added_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
        now = _iso(utc_now())
        values = [(subscriber.lower(), e.key, e.title, normalise_title(e.title) if e.title else "",
                   e.abstract, e.arxiv_id, source, now) for e in entries]
        if db is not None:
            return sum(db.execute(sql, v).rowcount for v in values)
        with self.transaction() as tx:
            return sum(tx.execute(sql, v).rowcount for v in values)

    def has_paper(self, reference: str) -> bool:
        """True when a paper with this id, arXiv id (with or without "arXiv:") or title is stored."""
        ref = reference.strip()
        bare = ref.removeprefix("arXiv:").removeprefix("arxiv:")
        row = self._db.execute(
            "SELECT 1 FROM papers WHERE id = ? OR id = ? OR arxiv_id = ? OR title_key = ? LIMIT 1",
            (ref, bare, bare, normalise_title(ref))).fetchone()
        return row is not None

    def library_entries(self, subscriber: str) -> list[LibraryEntry]:
        """The subscriber's library entries, in the order they were added."""
        rows = self._db.execute(
            "SELECT title, abstract, arxiv_id FROM library_entries WHERE subscriber = ?"
            " ORDER BY id", (subscriber.lower(),))
        return [LibraryEntry(row[0], row[1], row[2]) for row in rows]

    def library_counts(self, subscriber: str) -> LibraryCounts:
        """How many entries the subscriber's library holds and how many match a stored paper."""
        row = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(EXISTS (SELECT 1 FROM papers p WHERE"
            "   (e.arxiv_id IS NOT NULL AND p.arxiv_id = e.arxiv_id)"
            "   OR (e.title_key != '' AND p.title_key = e.title_key))), 0),"
            " COALESCE(SUM(e.abstract != ''), 0)"
            " FROM library_entries e WHERE e.subscriber = ?", (subscriber.lower(),)).fetchone()
        return LibraryCounts(int(row[0]), int(row[1]), int(row[2]))

    def library_file_hash(self, subscriber: str, path: str) -> str | None:
        """The content hash of the config library file when it was last imported, if ever."""
        row = self._db.execute(
            "SELECT sha256 FROM library_files WHERE subscriber = ? AND path = ?",
            (subscriber.lower(), path)).fetchone()
        return row[0] if row else None

    def record_library_file(self, subscriber: str, path: str, sha256: str) -> None:
        with self.transaction() as tx:
            tx.execute(
                "INSERT INTO library_files (subscriber, path, sha256, imported_at)"
                " VALUES (?, ?, ?, ?) ON CONFLICT(subscriber, path) DO UPDATE SET"
                " sha256 = excluded.sha256, imported_at = excluded.imported_at",
                (subscriber.lower(), path, sha256, _iso(utc_now())))

    # --- subscription state set by reply -------------------------------------

    def subscriber_state(self, subscriber: str) -> SubscriberState:
        row = self._db.execute("SELECT * FROM subscriber_state WHERE subscriber = ?",
                               (subscriber.lower(),)).fetchone()
        return _state(row) if row else SubscriberState(subscriber.lower())

    def all_subscriber_states(self, subscribers: Sequence[str] | None = None
                              ) -> dict[str, SubscriberState]:
        """The reply-set states stored, keyed by lower-cased address (a subscriber without
        a row has none); only those of ``subscribers`` (addresses, any case) when given."""
        if subscribers is None:
            rows = self._db.execute("SELECT * FROM subscriber_state")
            return {row["subscriber"]: _state(row) for row in rows}
        found: dict[str, SubscriberState] = {}
        for chunk in _in_chunks(subscribers):
            rows = self._db.execute("SELECT * FROM subscriber_state WHERE subscriber IN"
                                    f" ({', '.join('?' * len(chunk))})", chunk)
            found.update((row["subscriber"], _state(row)) for row in rows)
        return found

    def update_subscriber_state(
        self, subscriber: str, *, db: sqlite3.Connection | None = None, **changes: object
    ) -> SubscriberState:
        """Set some fields of the subscriber's reply-set state; pass ``db`` to join a transaction.

        Fields: paused (bool), paused_until (date | None), unsubscribed_at (str | None),
        send_at ("HH:MM" | None), max_papers (int | None), interests_added /
        interests_removed (sequences of phrases), bouncing_since, bounce_reason.
        """
        unknown = set(changes) - set(_STATE_FIELDS)
        if unknown:
            raise ValueError(f"unknown subscriber state fields: {sorted(unknown)}")
        values: dict[str, object] = {}
        for name, value in changes.items():
            if name == "paused":
                value = int(bool(value))
            elif name == "paused_until" and isinstance(value, date):
                value = value.isoformat()
            elif name in ("interests_added", "interests_removed"):
                value = json.dumps(list(value))  # type: ignore[call-overload]
            values[name] = value
        values["updated_at"] = _iso(utc_now())
        columns = ", ".join(values)
        marks = ", ".join("?" * len(values))
        updates = ", ".join(f"{name} = excluded.{name}" for name in values)
        sql = (f"INSERT INTO subscriber_state (subscriber, {columns}) VALUES (?, {marks})"
               f" ON CONFLICT(subscriber) DO UPDATE SET {updates}")
        params = (subscriber.lower(), *values.values())
        if db is not None:
            db.execute(sql, params)
        else:
            with self.transaction() as tx:
                tx.execute(sql, params)
        return self.subscriber_state(subscriber)

    def latest_signals(self, subscriber: str) -> list[tuple[str, str, str]]:
        """``latest_feedback`` as (paper id, signal, ISO time) tuples, what a profile reads:
        oldest first, the latest event per paper."""
        rows = self._tuples("SELECT paper_id, signal, at FROM feedback WHERE subscriber = ?"
                            " ORDER BY id", (subscriber.lower(),))
        return list(_latest_per_paper(rows).values())

    def latest_feedback(self, subscriber: str) -> list[FeedbackRow]:
        """The latest event per paper (the one that wins), oldest first."""
        # Every event, the latest per paper kept here: a look-up of MAX(id) per row in SQL
        # cost more than the few events a paper has (mostly one).
        rows = self._tuples(
            "SELECT paper_id, signal, source, digest_id, at FROM feedback"
            " WHERE subscriber = ? ORDER BY id",
            (subscriber.lower(),),
        )
        return [FeedbackRow(*row) for row in _latest_per_paper(rows).values()]

    # --- replies --------------------------------------------------------------

    def reply_record(self, key: str) -> ReplyRecord | None:
        """The reply processed under ``key`` (its Message-ID), or None when it is new."""
        row = self._db.execute("SELECT * FROM replies WHERE key = ?", (key,)).fetchone()
        return ReplyRecord(**dict(row)) if row else None

    def record_reply(
        self,
        key: str,
        *,
        sender: str,
        outcome: str,
        detail: str = "",
        digest_id: int | None = None,
        commands: Sequence[str] = (),
        at: datetime | None = None,
        db: sqlite3.Connection | None = None,
    ) -> bool:
        """Record a reply as processed; False when ``key`` was already recorded.

        Pass ``db`` to join the transaction that applies the reply's commands, so
        that "applied" and "recorded" are one atomic step.
        """
        sql = ("INSERT OR IGNORE INTO replies (key, sender, digest_id, outcome, detail, commands,"
               " processed_at) VALUES (?, ?, ?, ?, ?, ?, ?)")
        values = (key, sender.lower(), digest_id, outcome, detail, json.dumps(list(commands)),
                  _iso(at or utc_now()))
        if db is not None:
            return db.execute(sql, values).rowcount == 1
        with self.transaction() as tx:
            return tx.execute(sql, values).rowcount == 1

    def reply_outcomes(self) -> dict[str, int]:
        """How many replies were recorded with each outcome."""
        rows = self._db.execute("SELECT outcome, COUNT(*) FROM replies GROUP BY outcome")
        return {row[0]: int(row[1]) for row in rows}

    def signals_for(self, subscriber: str, paper_ids: Iterable[str]) -> dict[str, str]:
        """The subscriber's latest signal (like or skip) for each of these papers that has one."""
        wanted = list(dict.fromkeys(paper_ids))
        found: dict[str, str] = {}
        for start in range(0, len(wanted), 500):
            chunk = wanted[start:start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                "SELECT paper_id, signal FROM feedback WHERE subscriber = ?"
                f" AND paper_id IN ({marks}) ORDER BY id",
                (subscriber.lower(), *chunk),
            )
            for row in rows:
                found[row[0]] = row[1]
        return found

    def feedback_log(self, subscriber: str) -> list[FeedbackEntry]:
        """Every feedback event of a subscriber, oldest first, with titles and digests."""
        rows = self._db.execute(
            "SELECT f.paper_id, COALESCE(p.title, ''), f.signal, f.source, f.at, f.digest_id,"
            " d.local_date FROM feedback f LEFT JOIN papers p ON p.id = f.paper_id"
            " LEFT JOIN digests d ON d.id = f.digest_id WHERE f.subscriber = ? ORDER BY f.id",
            (subscriber.lower(),),
        )
        return [FeedbackEntry(*row) for row in rows]

    # --- sources fetched by the daemon ----------------------------------------------

    def fetched_url(self, source: str, url: str) -> FetchedUrl | None:
        row = self._db.execute("SELECT * FROM fetched_urls WHERE source = ? AND url = ?",
                               (source, url)).fetchone()
        return FetchedUrl(**dict(row)) if row else None

    def record_fetched_url(self, row: FetchedUrl) -> None:
        """Remember what ``row.url`` answered (a 200 or a 304), replacing what was there."""
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO fetched_urls (source, url, etag, last_modified, sha256,"
                " file, bytes, fetched_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (row.source, row.url, row.etag, row.last_modified, row.sha256, row.file,
                 row.bytes, row.fetched_at),
            )

    def source_run(self, source: str) -> SourceRun | None:
        row = self._db.execute("SELECT * FROM source_runs WHERE source = ?",
                               (source,)).fetchone()
        return SourceRun(**dict(row)) if row else None

    def record_source_run(
        self,
        source: str,
        *,
        started_at: datetime,
        ok: bool,
        detail: str = "",
        retry_at: datetime | None = None,
        not_before: datetime | None = None,
    ) -> SourceRun:
        """Record a source's fetch: failures in a row are counted, a success resets them."""
        started = _iso(started_at)
        with self.transaction() as db:
            db.execute(
                "INSERT INTO source_runs (source, started_at, outcome, detail, failures,"
                " last_ok_at, retry_at, not_before) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(source) DO UPDATE SET started_at = excluded.started_at,"
                " outcome = excluded.outcome, detail = excluded.detail,"
                " failures = CASE WHEN excluded.outcome = 'ok' THEN 0"
                "   ELSE source_runs.failures + 1 END,"
                " last_ok_at = COALESCE(excluded.last_ok_at, source_runs.last_ok_at),"
                " retry_at = excluded.retry_at, not_before = excluded.not_before",
                (source, started, "ok" if ok else "failed", detail, 0 if ok else 1,
                 started if ok else None,
                 _iso(retry_at) if retry_at else None, _iso(not_before) if not_before else None),
            )
        run = self.source_run(source)
        if run is None:  # pragma: no cover - written just above
            raise StoreError(f"{self.path}: the fetch of source {source} was not recorded")
        return run

    def queue_confirmation(
        self,
        subscriber: str,
        reply_key: str,
        message: bytes,
        *,
        at: datetime | None = None,
        db: sqlite3.Connection | None = None,
    ) -> int:
        """Queue a confirmation email (sent after the transaction commits); return its id."""
        sql = ("INSERT INTO confirmations (subscriber, reply_key, status, message, created_at)"
               " VALUES (?, ?, 'pending', ?, ?)")
        values = (subscriber.lower(), reply_key, message, _iso(at or utc_now()))
        if db is not None:
            return int(db.execute(sql, values).lastrowid or 0)
        with self.transaction() as tx:
            return int(tx.execute(sql, values).lastrowid or 0)

    def confirmations_since(self, subscriber: str, since: datetime) -> int:
        """How many confirmations were queued for the subscriber since ``since``."""
        row = self._db.execute(
            "SELECT COUNT(*) FROM confirmations WHERE subscriber = ? AND created_at >= ?",
            (subscriber.lower(), _iso(since)),
        ).fetchone()
        return int(row[0])

    def pending_confirmations(self) -> list[ConfirmationRow]:
        rows = self._db.execute(
            "SELECT id, subscriber, reply_key, status, message, attempts, error, created_at,"
            " sent_at FROM confirmations WHERE status = 'pending' ORDER BY id"
        )
        return [ConfirmationRow(**dict(row)) for row in rows]

    def confirmations_for(self, reply_key: str) -> list[ConfirmationRow]:
        rows = self._db.execute(
            "SELECT id, subscriber, reply_key, status, message, attempts, error, created_at,"
            " sent_at FROM confirmations WHERE reply_key = ? ORDER BY id", (reply_key,)
        )
        return [ConfirmationRow(**dict(row)) for row in rows]

    def mark_confirmation(self, confirmation_id: int, *, sent: bool, error: str | None = None,
                          give_up: bool = False) -> None:
        """Record a delivery attempt: sent, failed for good (``give_up``), or still pending."""
        status = "sent" if sent else "failed" if give_up else "pending"
        with self.transaction() as db:
            db.execute(
                "UPDATE confirmations SET status = ?, error = ?, attempts = attempts + 1,"
                " sent_at = ? WHERE id = ?",
                (status, error, _iso(utc_now()) if sent else None, confirmation_id),
            )


@dataclass(frozen=True)
class FetchedUrl:
    """What a listing URL answered last: its validators and the body written from it."""

    source: str
    url: str
    etag: str | None
    last_modified: str | None
    sha256: str | None
    file: str | None
    bytes: int | None
    fetched_at: str


@dataclass(frozen=True)
class SourceRun:
    """A source's last fetch (times are ISO 8601 UTC strings)."""

    source: str
    started_at: str
    outcome: str  # ok | failed
    detail: str
    failures: int
    last_ok_at: str | None
    retry_at: str | None
    not_before: str | None


@dataclass(frozen=True)
class ReplyRecord:
    key: str
    sender: str
    digest_id: int | None
    outcome: str
    detail: str
    commands: str
    processed_at: str


@dataclass(frozen=True)
class ConfirmationRow:
    id: int
    subscriber: str
    reply_key: str
    status: str
    message: bytes
    attempts: int
    error: str | None
    created_at: str
    sent_at: str | None


@dataclass(frozen=True)
class FeedbackEntry:
    """One feedback event as the admin sees it."""

    paper_id: str
    title: str
    signal: str
    source: str
    at: str
    digest_id: int | None
    digest_date: str | None


def _latest_per_paper(rows: Iterable[tuple[Any, ...]]) -> dict[str, tuple[Any, ...]]:
    """Rows (paper id first) in event order, the latest per paper kept, in its order."""
    latest: dict[str, tuple[Any, ...]] = {}
    for row in rows:
        latest.pop(row[0], None)  # re-inserted: the dict keeps the order of the latest
        latest[row[0]] = row
    return latest


def _statements(script: str) -> Iterator[str]:
    """Split a migration into statements (a ';' inside a comment does not end one)."""
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            yield pending
            pending = ""
    if pending.strip():
        raise StoreError(f"incomplete SQL statement in a migration: {pending.strip()[:60]}")


def _completes(stored: str, stored_is_summary: bool, offered: str, offered_is_summary: bool) -> bool:
    """True when ``offered`` should replace the stored abstract.

    A page dump cut mid-abstract stores the start of it: a longer abstract
    that begins with the stored text completes it. The authors' abstract
    replaces a generated summary. A shorter or different text never replaces.
    """
    if not offered or offered == stored:
        return False
    if stored_is_summary and not offered_is_summary:
        return True
    if offered_is_summary and not stored_is_summary and stored:
        return False
    return len(offered) > len(stored) and offered.startswith(stored.rstrip(" .\u2026"))


def _state(row: sqlite3.Row) -> SubscriberState:
    values = dict(row)
    values["paused"] = bool(values["paused"])
    values["paused_until"] = (date.fromisoformat(values["paused_until"])
                              if values["paused_until"] else None)
    values["interests_added"] = tuple(json.loads(values["interests_added"]))
    values["interests_removed"] = tuple(json.loads(values["interests_removed"]))
    return SubscriberState(**values)


def _paper(row: sqlite3.Row) -> Paper:
    return Paper(
        id=row["id"],
        title=row["title"],
        abstract=row["abstract"],
        arxiv_id=row["arxiv_id"],
        listed_on=date.fromisoformat(row["listed_on"]) if row["listed_on"] else None,
        code_links=tuple(json.loads(row["code_links"])),
        upvotes=row["upvotes"],
        listing_rank=row["listing_rank"],
        authors=tuple(json.loads(row["authors"])),
        version=row["arxiv_version"] or None,
        source=row["source"],
        abstract_is_summary=bool(row["abstract_is_summary"]),
    )
