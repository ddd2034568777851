"""A subscriber's own library as seed papers: runs when a library file is imported.

A library arrives three ways: the ``library = "alice.bib"`` key of a
subscriber (read again whenever the file changes), ``digest import --user
EMAIL FILE``, and a reply with such a file attached. :func:`parse_library`
turns a BibTeX, CSL-JSON (as Zotero exports it) or RIS export into
:class:`~digest.store.LibraryEntry` items (title, abstract, arXiv id);
:func:`import_library` hands them to the store, which keeps every entry until
its paper arrives. Ranking reads them back: an entry with an abstract is a
positive at once, an entry with only a title or an arXiv id counts when a
paper with that id or title is stored.

The format is detected from the content, not the file name: CSL-JSON starts
with ``[`` or ``{``, RIS with a ``TY  -`` tag line, anything with an ``@type{``
entry is BibTeX.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from .config import Subscriber, read_regular_file
from .errors import InputFileError
from .store import LibraryEntry, Store

log = logging.getLogger(__name__)

MAX_LIBRARY_BYTES = 5_000_000  # a Zotero export of ~10,000 entries with abstracts
MAX_LIBRARY_ENTRIES = 2_000  # the most a profile needs; more only slows every digest
FORMATS = ("bibtex", "csl-json", "ris")

_ARXIV_ID = re.compile(r"(?<!\d)(\d{4}\.\d{4,5})(?:v\d+)?(?![\d])")
_ARXIV_HINT = re.compile(r"arxiv", re.IGNORECASE)
_SPACE = re.compile(r"\s+")
_RIS_TAG = re.compile(r"^TY  - ", re.MULTILINE)
_BIBTEX_ENTRY = re.compile(r"@\s*[A-Za-z]+\s*[{(]")


class LibraryError(InputFileError):
    """A library file cannot be read: too large, an unknown format, or malformed."""


@dataclass(frozen=True)
class ParsedLibrary:
    """What a library file gave: its entries (up to the limit) and what was left out."""

    format: str
    entries: tuple[LibraryEntry, ...]
    skipped: int  # entries with neither a title nor an arXiv id, or malformed blocks
    over_limit: int  # entries beyond MAX_LIBRARY_ENTRIES, not taken


def parse_library(data: bytes, name: str) -> ParsedLibrary:
    """Parse a library export; ``name`` names it in errors (a path or an attachment name).

    Raises LibraryError when the file is larger than MAX_LIBRARY_BYTES, is not
    UTF-8 text, or is none of BibTeX, CSL-JSON and RIS. Entries past
    MAX_LIBRARY_ENTRIES are counted, not taken; duplicates count once.
    """
    if len(data) > MAX_LIBRARY_BYTES:
        raise LibraryError(name, f"{len(data)} bytes; a library may hold at most "
                           f"{MAX_LIBRARY_BYTES} (export a collection, not everything)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LibraryError(name, f"not UTF-8 text (byte {exc.start}); export as UTF-8") from exc
    stripped = text.lstrip()
    if stripped.startswith(("[", "{")):
        fmt, raw, bad = "csl-json", _csl_entries(text, name), 0
    elif _RIS_TAG.search(text):
        fmt, raw, bad = "ris", *_ris_entries(text, name)
    elif _BIBTEX_ENTRY.search(text):
        fmt, raw, bad = "bibtex", *_bibtex_entries(text)
    else:
        raise LibraryError(name, "not a library export: expected BibTeX (@article{...}), "
                           "CSL-JSON (a JSON list) or RIS (TY  - lines)")
    kept: dict[str, LibraryEntry] = {}
    skipped = bad
    for entry in raw:
        if not entry.title and not entry.arxiv_id:
            skipped += 1
            continue
        kept.setdefault(entry.key, entry)
    entries = tuple(kept.values())
    return ParsedLibrary(fmt, entries[:MAX_LIBRARY_ENTRIES], skipped,
                         max(len(entries) - MAX_LIBRARY_ENTRIES, 0))


def _clean(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        value = " ".join(str(v) for v in value)
    return _SPACE.sub(" ", str(value).replace("{", "").replace("}", "")).strip()


def _arxiv_in(values: Iterable[Any]) -> str | None:
    """An arXiv id in any of these fields (eprint, URL, DOI 10.48550/arXiv.X, 'arXiv:X')."""
    for value in values:
        text = _clean(value)
        match = _ARXIV_ID.search(text)
        if match:
            return match.group(1)
    return None


def _entry(title: Any, abstract: Any, arxiv_fields: Iterable[Any]) -> LibraryEntry:
    return LibraryEntry(_clean(title), _clean(abstract), _arxiv_in(arxiv_fields))


def _bibtex_entries(text: str) -> tuple[list[LibraryEntry], int]:
    import bibtexparser
    from bibtexparser.middlewares import LatexDecodingMiddleware

    library = bibtexparser.parse_string(text, append_middleware=[LatexDecodingMiddleware()])
    entries = []
    for item in library.entries:
        fields = {k.lower(): f.value for k, f in item.fields_dict.items()}
        prefix = str(fields.get("archiveprefix", "")) + str(fields.get("eprinttype", ""))
        arxiv = [fields.get("arxivid"), fields.get("url"), fields.get("doi"),
                 fields.get("journal"), fields.get("note")]
        if _ARXIV_HINT.search(prefix) or _ARXIV_ID.fullmatch(_clean(fields.get("eprint"))):
            arxiv.insert(0, fields.get("eprint"))
        entries.append(_entry(fields.get("title"), fields.get("abstract"),
                              [a for a in arxiv if a and _is_arxiv_field(a)]))
    return entries, len(library.failed_blocks)


def _is_arxiv_field(value: Any) -> bool:
    """A URL, DOI or journal field names an arXiv paper only when it says arXiv."""
    text = _clean(value)
    return bool(_ARXIV_HINT.search(text)) or bool(_ARXIV_ID.fullmatch(text))


def _csl_entries(text: str, name: str) -> list[LibraryEntry]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LibraryError(name, f"not valid JSON: {exc.msg}", exc.lineno) from exc
    if isinstance(data, dict):
        data = data.get("items", [data])
    if not isinstance(data, list):
        raise LibraryError(name, "expected a CSL-JSON list of items")
    entries = []
    for item in data:
        if not isinstance(item, dict):
            continue
        arxiv = [item.get(k) for k in ("number", "URL", "DOI", "archive_location", "id")]
        entries.append(_entry(item.get("title"), item.get("abstract"),
                              [a for a in arxiv if a and _is_arxiv_field(a)]))
    return entries


def _ris_entries(text: str, name: str) -> tuple[list[LibraryEntry], int]:
    import rispy

    try:
        records = rispy.loads(text, skip_unknown_tags=True)
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise LibraryError(name, f"not a readable RIS file: {exc}") from exc
    entries = []
    for record in records:
        title = record.get("title") or record.get("primary_title") or ""
        arxiv = [*record.get("urls", []), record.get("doi"), record.get("notes"),
                 record.get("journal_name"), record.get("number")]
        entries.append(_entry(title, record.get("abstract"),
                              [a for a in arxiv if a and _is_arxiv_field(a)]))
    return entries, 0


@dataclass(frozen=True)
class ImportResult:
    """What an import did: entries read, newly stored, already known, not taken."""

    format: str
    read: int
    added: int
    skipped: int
    over_limit: int

    def summary(self) -> str:
        """One line for the CLI and a reply's confirmation."""
        line = (f"{self.read} library entries taken ({self.format}), {self.added} new, "
                f"{self.read - self.added} already known")
        if self.skipped:
            line += f"; {self.skipped} without a title or arXiv id skipped"
        if self.over_limit:
            line += f"; {self.over_limit} over the limit of {MAX_LIBRARY_ENTRIES} not taken"
        return line


def import_library(
    store: Store, subscriber: str, data: bytes, name: str, *, source: str,
    db: sqlite3.Connection | None = None,
) -> ImportResult:
    """Parse a library file and store its entries for ``subscriber``; raises LibraryError.

    Pass ``db`` to join a caller's transaction (a reply's commands).
    """
    parsed = parse_library(data, name)
    added = store.add_library_entries(subscriber, parsed.entries, source=source, db=db)
    log.info("subscriber %s: %d library entries from %s (%d new)", subscriber,
             len(parsed.entries), name, added)
    return ImportResult(parsed.format, len(parsed.entries), added, parsed.skipped,
                        parsed.over_limit)


def sync_config_library(store: Store, sub: Subscriber) -> ImportResult | None:
    """Import the subscriber's ``library`` file when it is new or changed; None otherwise.

    Raises LibraryError (the file is unreadable or malformed): the caller
    records it as that subscriber's failure.
    """
    if sub.library is None:
        return None
    try:
        data = read_regular_file(sub.library, MAX_LIBRARY_BYTES)  # parse_library refuses more
    except OSError as exc:
        raise LibraryError(str(sub.library), f"cannot read: {exc.strerror or exc}") from exc
    digest = hashlib.sha256(data).hexdigest()
    if store.library_file_hash(sub.email, str(sub.library)) == digest:
        return None
    result = import_library(store, sub.email, data, str(sub.library), source="config")
    store.record_library_file(sub.email, str(sub.library), digest)
    return result


LIBRARY_SUFFIXES = (".bib", ".bibtex", ".json", ".ris")
LIBRARY_TYPES = ("application/x-bibtex", "text/x-bibtex", "application/x-research-info-systems",
                 "application/vnd.citationstyles.csl+json")
MAX_ATTACHMENTS = 3  # library files read from one reply; more is a mistake or an attack


def import_attachments(
    store: Store, subscriber: str, message: EmailMessage, *, db: sqlite3.Connection | None = None
) -> tuple[list[str], list[str]]:
    """Import the library files attached to a reply: (confirmation lines, commands applied).

    An attachment counts when its name ends in LIBRARY_SUFFIXES or its type is
    one of LIBRARY_TYPES; a bad file gives a line saying why, the others still count.
    """
    lines: list[str] = []
    commands: list[str] = []
    files = [part for part in message.iter_attachments()
             if Path(part.get_filename() or "").suffix.lower() in LIBRARY_SUFFIXES
             or part.get_content_type() in LIBRARY_TYPES]
    for n, part in enumerate(files):
        name = Path(part.get_filename() or f"attachment {n + 1}").name
        if n >= MAX_ATTACHMENTS:
            lines.append(f"Library file {name}: not read (at most {MAX_ATTACHMENTS} per reply)")
            continue
        payload = part.get_payload(decode=True)
        data = payload if isinstance(payload, bytes) else b""
        try:
            result = import_library(store, subscriber, data, name, source="reply", db=db)
        except LibraryError as exc:
            lines.append(f"Library file {name}: not imported: {exc.message}")
            continue
        lines.append(f"Library file {name}: {result.summary()}")
        commands.append(f"library {name} ({result.read} entries)")
    return lines, commands


def refresh_library(store: Store, sub: Subscriber) -> None:
    """:func:`sync_config_library` for the daemon: a bad file is logged, the digest still goes."""
    try:
        sync_config_library(store, sub)
    except LibraryError as exc:
        log.warning("subscriber %s: library file not imported (the digest goes on without "
                    "it): %s", sub.email, exc)


def unresolved_seeds(store: Store, sub: Subscriber) -> list[str]:
    """The config's ``seed_papers`` that match no stored paper (by id, arXiv id or title)."""
    return [ref for ref in sub.seed_papers if not store.has_paper(ref)]


__all__ = [
    "FORMATS", "MAX_LIBRARY_BYTES", "MAX_LIBRARY_ENTRIES", "ImportResult", "LibraryError",
    "ParsedLibrary", "import_attachments", "import_library", "parse_library", "refresh_library", "sync_config_library",
    "unresolved_seeds",
]
