"""Dump files: detect the format from content and parse papers out of it.

Runs on every inbox scan, before anything is stored. Hands a ``ParsedDump``
(the listing's papers with title, abstract, authors, listing date, code links;
the revised papers it announces; what was repaired on the way) to the store,
or raises ``DumpError`` naming the file, the line or entry, and what was
expected. ``DumpError`` is the only exception a parser raises for bad input:
whatever the bytes, the result is papers or a readable reason.

Formats (DESIGN.md "Dump formats"); ``ParsedDump.format`` and ``Paper.source``:
  page          the trending-papers page saved as text: header lines (the site's
                menu too), a ``Mar 12`` date line, then title / abstract pairs
                separated by blank lines;
  daily-papers  the daily-papers API JSON: a list of objects with ``paper.id``,
                ``title``, ``paper.summary`` (else ``ai_summary``),
                ``paper.upvotes``, ``paper.authors[].name``, ``publishedAt``;
                search-shaped answers (``{"papers": [...]}``) and flat entries too;
  arxiv-rss     arXiv's RSS (the 2024 format, ``Announce Type: new|cross|replace|
                replace-cross``); ``rss`` for another site's RSS;
  arxiv-atom    arXiv's Atom API answer; ``atom`` for another site's Atom.

An empty listing (a weekend: an RSS channel without items, an Atom answer with
``opensearch:totalResults`` 0, the API's ``[]``) is a valid listing of 0 papers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from email.utils import parsedate_to_datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from .errors import DumpError
from .paper import ArxivId, Paper, find_arxiv_id, paper_id_for, parse_arxiv_id

MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
# "Mar 12", "March 12", "Mar. 12", "Mar 12, 2026". Any one- or two-digit day matches, so
# that "Mar 99" is reported as an impossible date rather than as a missing date line.
# The month is a whole name or abbreviation, so a menu line such as "Decoding 2" is no date.
_DATE_LINE = re.compile(
    r"^(jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?"
    r"|sept?(?:ember)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\.?\s+(\d{1,2})"
    r"(?:,?\s+(\d{4}))?$",
    re.IGNORECASE)
# An XML declaration naming its encoding (any but UTF-8 needs it, XML 1.0 4.3.3).
_XML_ENCODING = re.compile(rb"\s*<\?xml[^>]*\sencoding\s*=\s*[\"'][A-Za-z][\w.:-]*[\"']")
_HTML_START = re.compile(r"<!doctype\s+html|<html[\s>]", re.IGNORECASE)
_NAME_DATE = re.compile(r"(20\d\d)[-_.]?(0[1-9]|1[0-2])[-_.]?(0[1-9]|[12]\d|3[01])")
_URL = re.compile(r"https?://[^\s<>\"'\]\[]+")
_URL_TRAILING = ".,;:!?)}'\""
# What is never part of a title or an abstract: control characters (C0, DEL, C1;
# they become spaces, collapsed with the rest) and lone surrogates (they cannot be
# stored or sent as UTF-8). Format characters (the zero-width joiner of emoji) stay.
_UNSTORABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")

# Limits on what one dump may hold. Each bounds the memory and the time a hostile
# or broken file can cost, and each sits far above what real listings hold.
# A dump larger than this is refused unread: arXiv's largest daily RSS (cs.LG) is
# about 3 MB and a 2,000-entry Atom answer about 5 MB.
MAX_DUMP_BYTES = 64 * 1024 * 1024
# How many non-blank lines of a page dump may come before its date line: the page
# has 4 header lines, a site menu copied with it a few dozen more.
DATE_LINE_SEARCH_LINES = 200
# A longer title is not a title: arXiv titles stay under about 300 characters. In
# a page dump it means the title / abstract pairs are out of step; elsewhere the
# entry is an error.
TITLE_MAX_CHARS = 400
# arXiv limits abstracts to 1,920 characters; a longer one is cut at a word
# boundary and marked with an ellipsis, so one entry cannot bloat every digest.
ABSTRACT_MAX_CHARS = 10_000
# One author's name; a longer one is cut (real names stay under 100 characters).
AUTHOR_MAX_CHARS = 200
# Author list length; the largest real ones (LHC collaborations) have about 5,200
# names; further names are dropped (the digest shows three and the count).
AUTHORS_MAX = 6_000
# An upvote count outside this range is not a count; it is ignored (SQLite's
# integers stop at 2**63, and 30-digit numbers have been seen in broken dumps).
UPVOTES_MAX = 10**9
# Listing dates outside this range are typing or clock errors: arXiv opened in
# August 1991, and a listing is never dated more than a year after its file.
EARLIEST_LISTING = date(1991, 8, 1)
LATEST_LISTING_YEARS_AHEAD = 1
# A page's date line may be this many days after the file's date: the file's date
# is the saver's (or the file system's) day, the listing's can be a time zone ahead.
LISTING_AHEAD_DAYS = 2

# arXiv's RSS announce types: "new" and "cross" are the day's papers; "replace"
# and "replace-cross" are revisions of papers announced before.
ANNOUNCE_NEW = frozenset({"new", "cross"})
ANNOUNCE_REVISED = frozenset({"replace", "replace-cross"})


@dataclass(frozen=True)
class ParsedDump:
    """What one dump file holds.

    ``papers`` are the listing's papers (new candidates); ``updates`` are papers
    the listing says were revised (arXiv's ``replace``): they only update a
    stored paper's metadata. ``warnings`` say what was repaired or ignored
    (an upvote count out of range, an abstract cut), one line each, for the log.
    """

    format: str
    listed_on: date | None
    papers: list[Paper]
    updates: list[Paper] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def printable_name(name: str) -> str:
    """A file name or path fit for a log line or a message: one line, valid UTF-8.

    Bytes that are not UTF-8 (kept by Python as surrogate escapes) become
    ``\\xff``, and control or invisible characters (a newline in a name)
    become escapes such as ``\\n``, so the name is readable and unambiguous.
    """
    text = os.fsencode(name).decode("utf-8", "backslashreplace")
    return "".join(ch if ch.isprintable() or ch == " " else _escape_char(ch) for ch in text)


def _escape_char(ch: str) -> str:
    return ch.encode("unicode_escape").decode("ascii")


def parse_file(path: Path, data: bytes | None = None) -> ParsedDump:
    """Parse one dump file; ``data`` saves a second read when the caller has it.

    Raises DumpError (a file larger than ``MAX_DUMP_BYTES`` is refused unread)
    and OSError when the file cannot be read.
    """
    name = printable_name(str(path))
    if data is None:
        with path.open("rb") as handle:
            data = handle.read(MAX_DUMP_BYTES + 1)
    if len(data) > MAX_DUMP_BYTES:
        raise DumpError(name, f"larger than {MAX_DUMP_BYTES // (1024 * 1024)} MiB: "
                        "not a listing (the largest real ones are a few MB)")
    return parse_bytes(data, name=name, fallback_date=date_from_file(path))


def parse_bytes(data: bytes, *, name: str, fallback_date: date) -> ParsedDump:
    """Detect the format from the content, not the file name, and parse it.

    ``fallback_date`` is the file's date (from its name, else its time): it
    gives a page dump's date line its year and bounds the dates a listing may
    hold. Raises DumpError, and only DumpError, for any content it cannot use.
    """
    if not data.strip():
        raise DumpError(name, "empty file")
    if b"\x00" in data[:8192]:
        raise DumpError(name, "binary file (contains NUL bytes), not a dump")
    cut: str | None = None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        if _XML_ENCODING.match(data):  # e.g. encoding="ISO-8859-1": the feed parser reads it
            return parse_feed(data, name=name, fallback_date=fallback_date)
        # A file cut inside its last character (a copy or download stopped mid-way): drop
        # that partial character. Invalid bytes anywhere else still make it not UTF-8.
        if exc.reason != "unexpected end of data" or exc.end != len(data):
            line = data[: exc.start].count(b"\n") + 1
            raise DumpError(name, f"not UTF-8 text (byte {exc.start})", line=line) from exc
        text = data[: exc.start].decode("utf-8-sig")
        cut = (f"the file ends inside a UTF-8 character (byte {exc.start}; cut short?): "
               f"its last {len(data) - exc.start} byte(s) dropped")
    stripped = text.lstrip()
    if _HTML_START.match(stripped):
        raise DumpError(name, "an HTML page, not a listing (a page dump is the page's text, "
                        "copied from the browser; a feed or the API's JSON is a listing)")
    if stripped.startswith(("[", "{")):
        parsed = parse_api_json(text, name=name, fallback_date=fallback_date)
    elif stripped.startswith("<"):
        parsed = parse_feed(data, name=name, fallback_date=fallback_date)
    else:
        parsed = parse_page(text, name=name, fallback_date=fallback_date)
    if cut is not None:
        parsed = replace(parsed, warnings=[cut, *parsed.warnings])
    return parsed


def listing_format(data: bytes, *, name: str, fallback_date: date) -> str:
    """The format of a listing (``"daily-papers"``, ``"arxiv-rss"``, ``"page"``, ...) when
    ``data`` is one the scan would ingest; DumpError saying what it is otherwise.

    The scan's own detection and parse (``parse_bytes``), for a producer of dump
    files (``sources``) to refuse what the scan would only move to ``failed/``.
    """
    return parse_bytes(data, name=name, fallback_date=fallback_date).format


def date_from_file(path: Path) -> date:
    """The date a file name holds (2026-03-12, 20260312), else the file's time."""
    match = _NAME_DATE.search(path.name)
    if match:
        try:
            return date(int(match.group(1)), int(match.group(2)), int(match.group(3)))
        except ValueError:  # 2026-02-31: not a date, so the file's time decides
            pass
    try:
        return datetime.fromtimestamp(path.stat().st_mtime, UTC).date()
    except (OSError, OverflowError, ValueError):  # a time stamp beyond what a date holds
        return datetime.now(UTC).date()


def listing_date(month: int, day: int, reference: date) -> date:
    """The date ``month``/``day`` nearest to ``reference`` (the file's date), not after it.

    A page dump says ``Dec 31`` with no year: in a file of 2026-01-02 it is
    2025-12-31, and ``Jan 1`` in a file of 2025-12-31 is 2026-01-01. A page is
    saved on or after its listing day, so a date more than
    ``LISTING_AHEAD_DAYS`` after the file's is last year's (``Mar 12`` in a
    file of November is the March before, not the March after). Raises
    ValueError for a day no year around has (``Mar 0``, ``Mar 99``, ``Feb 30``).
    """
    latest = reference + timedelta(days=LISTING_AHEAD_DAYS) \
        if reference < date.max - timedelta(days=LISTING_AHEAD_DAYS) else date.max
    candidates = []
    for year in (reference.year - 1, reference.year, reference.year + 1):
        try:
            candidate = date(year, month, day)
        except ValueError:
            continue
        if candidate <= latest:
            candidates.append(candidate)
    if not candidates:
        raise ValueError(f"no {MONTHS[month - 1].title()} {day} near {reference.isoformat()}")
    return max(candidates)


def code_links(abstract: str) -> tuple[str, ...]:
    """Links written in an abstract (code, models, project pages), cleaned and unique."""
    links: list[str] = []
    for raw in _URL.findall(abstract):
        link = raw.rstrip(_URL_TRAILING)
        if link.count("(") < link.count(")"):
            link = link.rstrip(")")
        if len(link) > len("https://x.y") and link not in links:
            links.append(link)
    return tuple(links)


def clean_text(text: str) -> str:
    """Text as stored: one line, whitespace collapsed, no control characters.

    A lone surrogate (``\\ud800`` written as an escape in JSON) cannot be
    stored or sent as UTF-8: it becomes U+FFFD, the replacement character.
    """
    if not text.isprintable():  # checked in C; most text needs only the whitespace pass
        text = _UNSTORABLE.sub(_replacement, text)
    return " ".join(text.split())


def _replacement(match: re.Match[str]) -> str:
    return "\ufffd" if match.group() >= "\ud800" else " "


def _cut(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters at a word boundary, with an ellipsis."""
    if len(text) <= limit:
        return text
    head = text[: limit - 1]
    space = head.rfind(" ")
    if space > limit // 2:
        head = head[:space]
    return head.rstrip() + "\u2026"


# --- the page dump ------------------------------------------------------------


def parse_page(text: str, *, name: str, fallback_date: date) -> ParsedDump:
    """The page dump: header (and menu) lines, the date line, then title / abstract pairs."""
    # Each line cleaned once: a line of nothing but control characters is blank too.
    cleaned = ((number, clean_text(line)) for number, line in enumerate(text.splitlines(), 1))
    content = [(number, line) for number, line in cleaned if line]
    searched = content[:DATE_LINE_SEARCH_LINES]
    date_index = next((i for i, (_, line) in enumerate(searched) if _DATE_LINE.match(line)), None)
    if date_index is None:
        last_line = searched[-1][0] if searched else 1
        raise DumpError(
            name,
            f"no listing date line such as 'Mar 12' in lines 1-{last_line} (the first "
            f"{len(searched)} non-blank lines, where the page puts it after its header): "
            "not a page dump of the trending-papers page",
        )
    date_line_no, date_text = content[date_index]
    warnings_of_date: list[str] = []
    listed_on = _page_date(date_text, fallback_date, name=name, line=date_line_no,
                           warnings=warnings_of_date)
    body = content[date_index + 1:]
    if not body:
        raise DumpError(name, "no papers after the date line", line=date_line_no)
    warnings = warnings_of_date
    if len(body) % 2:
        last_line, last = body[-1]
        if len(body) == 1:
            raise DumpError(name, f"title without an abstract: {last[:60]!r} "
                            "(file cut short, or still being written?)", line=last_line)
        # A page cut inside its last title: that entry is lost, the others are whole.
        warnings.append(f"line {last_line}: title without an abstract: {last[:60]!r} (file "
                        "cut short?): that last entry is dropped")
        body = body[:-1]
    papers = []
    for rank, start in enumerate(range(0, len(body), 2), start=1):
        (title_line, raw_title), (abstract_line, raw_abstract) = body[start], body[start + 1]
        if len(raw_title) > TITLE_MAX_CHARS:
            raise DumpError(name, f"expected a title, found {len(raw_title):,} characters of "
                            "text (titles and abstracts out of step)", line=title_line)
        title = raw_title
        abstract = _bounded_abstract(raw_abstract, f"line {abstract_line}", warnings)
        papers.append(Paper(
            id=paper_id_for(title, None),
            title=title,
            abstract=abstract,
            listed_on=listed_on,
            code_links=code_links(abstract),
            listing_rank=rank,
            source="page",
        ))
    return ParsedDump(format="page", listed_on=listed_on, papers=_unique(papers),
                      warnings=warnings)


def _page_date(text: str, fallback_date: date, *, name: str, line: int,
               warnings: list[str]) -> date | None:
    """The date line's date; an explicit year outside the plausible range gives None and a warning."""
    match = _DATE_LINE.match(text)
    if match is None:  # pragma: no cover - the caller found the line with this pattern
        raise DumpError(name, f"not a date line: {text!r}", line=line)
    month = MONTHS.index(match.group(1)[:3].lower()) + 1
    day = int(match.group(2))
    try:
        if match.group(3):
            # The same bounds as every other listing date (_plausible): not before arXiv.
            return _plausible(date(int(match.group(3)), month, day), f"line {line}",
                              fallback_date, warnings)
        return listing_date(month, day, fallback_date)
    except ValueError as exc:
        raise DumpError(name, f"impossible date {text!r}: {exc}", line=line) from exc


# --- the daily-papers API JSON --------------------------------------------------

# Where a JSON object wraps its list of papers (the API's search answers, exports).
_LIST_KEYS = ("papers", "items", "results", "data", "hits")


def parse_api_json(text: str, *, name: str, fallback_date: date) -> ParsedDump:
    """The daily-papers API JSON: a list of entries, each a nested ``paper`` or flat."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DumpError(name, f"invalid JSON: {exc.msg}", line=exc.lineno) from exc
    except RecursionError as exc:
        raise DumpError(name, "JSON nested too deeply to be a listing") from exc
    except ValueError as exc:  # an integer of thousands of digits, past Python's limit
        detail = _first_line(exc).split("; use ")[0]  # not Python's advice to raise its limit
        raise DumpError(name, f"invalid JSON: {detail}") from exc
    entries = _json_entries(data, name)
    warnings: list[str] = []
    papers = [_api_entry(entry, i, name, fallback_date, warnings)
              for i, entry in enumerate(entries)]
    return _listing("daily-papers", papers, [], warnings)


def _json_entries(data: Any, name: str) -> list[Any]:
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        for key in _LIST_KEYS:
            if isinstance(data.get(key), list):
                return list(data[key])
        if "title" in data or "paper" in data:
            return [data]  # one flat entry: a single paper's page
    raise DumpError(name, "a JSON dump must be a list of papers (or an object with a "
                    f"'papers' list, or one paper); found {_kind(data)}")


def _api_entry(entry: Any, index: int, name: str, reference: date | None,
               warnings: list[str]) -> Paper:
    where = f"entry {index}"
    if not isinstance(entry, dict):
        raise DumpError(name, f"{where}: expected an object, found {_kind(entry)}")
    nested = entry.get("paper")
    if nested is not None and not isinstance(nested, dict):
        raise DumpError(name, f"{where}: 'paper' must be an object, found {_kind(nested)}")
    inner: dict[str, Any] = nested if nested is not None else entry
    arxiv = _api_arxiv_id(inner.get("id"), entry.get("arxiv_id"), entry.get("arxivId"),
                          inner.get("arxiv_id"), entry.get("id"))
    if arxiv:
        where = f"entry {index} ({arxiv.id})"
    raw_title = _text_field(name, where, "title", entry.get("title"), inner.get("title"))
    title = _title(raw_title, name, where)
    summary = _text_field(name, where, "summary", inner.get("summary"), entry.get("summary"),
                          inner.get("abstract"), entry.get("abstract"))
    is_summary = False
    if not summary.strip():  # the API's generated summary stands in, and the paper says so
        summary = _text_field(name, where, "ai_summary", inner.get("ai_summary"),
                              entry.get("ai_summary"))
        is_summary = bool(summary.strip())
    abstract = _abstract(summary, where, warnings)
    published = _text_field(name, where, "publishedAt", entry.get("publishedAt"),
                            inner.get("publishedAt"))
    return Paper(
        id=paper_id_for(title, arxiv.id if arxiv else None),
        title=title,
        abstract=abstract,
        arxiv_id=arxiv.id if arxiv else None,
        listed_on=_iso_date(published, where, reference, warnings),
        code_links=code_links(abstract),
        upvotes=_upvotes(inner.get("upvotes", entry.get("upvotes")), where, warnings),
        listing_rank=index + 1,
        authors=_api_authors(inner.get("authors", entry.get("authors")), name, where, warnings),
        version=arxiv.version if arxiv else None,
        source="daily-papers",
        abstract_is_summary=is_summary,
    )


def _api_arxiv_id(*values: Any) -> ArxivId | None:
    """The first value that is an arXiv id in any form (the API's own ids are others)."""
    for value in values:
        parsed = parse_arxiv_id(value) if isinstance(value, str) else None
        if parsed is not None:
            return parsed
    return None


def _text_field(name: str, where: str, key: str, *values: Any) -> str:
    """The first of ``values`` that is given; it must be text (a title as a list is an error)."""
    for value in values:
        if value is None:
            continue
        if not isinstance(value, str):
            raise DumpError(name, f"{where}: {key!r} must be text, found {_kind(value)}")
        if value.strip():
            return value
    return ""


def _api_authors(value: Any, name: str, where: str, warnings: list[str]) -> tuple[str, ...]:
    """``[{"name": "A"}, ...]`` or ``["A", ...]``; hidden or nameless entries are skipped."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise DumpError(name, f"{where}: 'authors' must be a list, found {_kind(value)}")
    names = []
    for item in value:
        raw = item.get("name") if isinstance(item, dict) else item
        if raw is None:
            continue
        if not isinstance(raw, str):
            raise DumpError(name, f"{where}: an author's name must be text, found {_kind(raw)}")
        names.append(raw)
    return _authors(names, where, warnings)


def _upvotes(value: Any, where: str, warnings: list[str]) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        warnings.append(f"{where}: upvotes {_kind(value)} is not a count; ignored")
        return None
    if not 0 <= value <= UPVOTES_MAX:
        digits = len(str(abs(value)))
        shown = str(value) if digits <= 12 else f"a {digits}-digit number"
        warnings.append(f"{where}: upvotes {shown} is out of range (0-{UPVOTES_MAX:,}); ignored")
        return None
    return value


def _iso_date(text: str, where: str, reference: date | None, warnings: list[str]) -> date | None:
    """The date an ISO 8601 time stamp names, as written (its own offset, not UTC)."""
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        try:
            moment = datetime.fromisoformat(text.strip()[:10])
        except ValueError:
            warnings.append(f"{where}: date {clean_text(text[:40])!r} is not a date; ignored")
            return None
    return _plausible(moment.date(), where, reference, warnings)


def _plausible(day: date, where: str, reference: date | None, warnings: list[str]) -> date | None:
    if EARLIEST_LISTING <= day and (reference is None
                                    or day.year <= reference.year + LATEST_LISTING_YEARS_AHEAD):
        return day
    warnings.append(f"{where}: date {day.isoformat()} is not a plausible listing date; ignored")
    return None


# --- shared by the structured formats -------------------------------------------


def _title(raw: str, name: str, where: str) -> str:
    if len(raw) > 4 * TITLE_MAX_CHARS:  # checked before cleaning: 50 MB of title costs nothing
        raise DumpError(name, f"{where}: a title of {len(raw):,} characters (at most "
                        f"{TITLE_MAX_CHARS}): not a title")
    title = clean_text(raw)
    if not title:
        raise DumpError(name, f"{where}: no title")
    if len(title) > TITLE_MAX_CHARS:
        raise DumpError(name, f"{where}: a title of {len(title):,} characters (at most "
                        f"{TITLE_MAX_CHARS}): not a title")
    return title


def _abstract(raw: str, where: str, warnings: list[str]) -> str:
    if len(raw) > 4 * ABSTRACT_MAX_CHARS:
        raw = raw[: 4 * ABSTRACT_MAX_CHARS]  # the rest would be cut below anyway
    return _bounded_abstract(clean_text(raw), where, warnings)


def _bounded_abstract(abstract: str, where: str, warnings: list[str]) -> str:
    if len(abstract) > ABSTRACT_MAX_CHARS:
        warnings.append(f"{where}: abstract of {len(abstract):,}+ characters cut to "
                        f"{ABSTRACT_MAX_CHARS:,}")
        abstract = _cut(abstract, ABSTRACT_MAX_CHARS)
    return abstract


def _authors(raw: list[str], where: str, warnings: list[str]) -> tuple[str, ...]:
    if len(raw) > AUTHORS_MAX:
        warnings.append(f"{where}: {len(raw):,} authors; the first {AUTHORS_MAX:,} kept")
        raw = raw[:AUTHORS_MAX]
    names = []
    cut = 0
    for value in raw:
        author = clean_text(value[: 4 * AUTHOR_MAX_CHARS])
        if len(author) > AUTHOR_MAX_CHARS:
            cut += 1
            author = _cut(author, AUTHOR_MAX_CHARS)
        if author:
            names.append(author)
    if cut:
        warnings.append(f"{where}: {cut:,} author names longer than {AUTHOR_MAX_CHARS} "
                        "characters cut")
    return tuple(names)


# --- Atom and RSS -----------------------------------------------------------------

# arXiv's RSS description: "arXiv:2409.11074v1 Announce Type: new Abstract: ...".
_RSS_PREAMBLE = re.compile(
    r"^\s*arXiv:(\S+)\s+Announce\s+Type:\s*([\w-]+)\s+(?:Abstract:\s*)?", re.IGNORECASE)
_ABSTRACT_LABEL = re.compile(r"^\s*Abstract:\s*", re.IGNORECASE)
# arXiv's RSS before 2024 put the id in the title: "Title. (arXiv:2409.11074v2 [cs.CL] UPDATED)".
_OLD_RSS_TITLE = re.compile(
    r"\.?\s*\(arXiv:(\S+?)\s*\[[^\]]*\]\s*(UPDATED|CROSS LISTED)?\)\s*$", re.IGNORECASE)
_OLD_ANNOUNCE = {"updated": "replace", "cross listed": "cross"}
_SPACE_BEFORE_PUNCTUATION = re.compile(r"\s+([.,;:!?])")
# XML parse errors (expat's, through feedparser) mean a broken file, not an odd feed.
_HARMLESS_BOZO = ("CharacterEncodingOverride", "NonXMLContentType")


def parse_feed(data: bytes, *, name: str, fallback_date: date) -> ParsedDump:
    """An Atom or RSS listing, e.g. arXiv's daily RSS of a category or an Atom API answer."""
    import feedparser  # imported late: only feed dumps need it

    feed = feedparser.parse(data)
    broken = feed.get("bozo") and type(feed.get("bozo_exception")).__name__ not in _HARMLESS_BOZO
    if not feed.entries:
        if not feed.get("version"):
            detail = f" ({_first_line(feed.bozo_exception)})" if broken else ""
            raise DumpError(name, f"an XML file with no feed entries{detail}: "
                            "not an Atom or RSS listing")
        if broken:
            raise DumpError(name, f"a broken {feed.version} listing with no entries: "
                            f"{_first_line(feed.bozo_exception)} (file cut short?)")
    kind = "atom" if str(feed.get("version", "")).startswith("atom") else "rss"
    channel_date = _feed_date(feed.feed, "feed", fallback_date, [])
    warnings: list[str] = []
    papers: list[Paper] = []
    updates: list[Paper] = []
    arxiv_entries = 0
    for index, entry in enumerate(feed.entries):
        where = f"feed entry {index}"
        _arxiv_api_error(entry, name)
        if not clean_text(str(entry.get("title", ""))[: 4 * TITLE_MAX_CHARS + 1]):
            # One item without a title is that item's problem, not the day's listing's.
            warnings.append(f"{where}: no title; skipped")
            continue
        announce, paper = _feed_entry(entry, index, name, where, fallback_date, warnings,
                                      rss=kind == "rss")
        if paper.listed_on is None and channel_date is not None:
            paper = replace(paper, listed_on=channel_date)
        arxiv_entries += paper.arxiv_id is not None
        if announce in ANNOUNCE_REVISED:
            updates.append(paper)
        elif announce is None or announce in ANNOUNCE_NEW:
            papers.append(paper)
        else:
            warnings.append(f"{where}: announce type {announce!r} is neither new, cross nor "
                            "replace; skipped")
    is_arxiv = arxiv_entries > 0 or "arxiv" in str(feed.feed.get("link", "")).lower()
    fmt = f"arxiv-{kind}" if is_arxiv else kind
    papers = [replace(p, source=fmt) for p in papers]
    updates = [replace(p, source=fmt) for p in updates]
    parsed = _listing(fmt, papers, updates, warnings)
    if parsed.listed_on is None and channel_date is not None:
        return ParsedDump(fmt, channel_date, parsed.papers, parsed.updates, parsed.warnings)
    return parsed


def _arxiv_api_error(entry: Any, name: str) -> None:
    """arXiv's API answers a bad query with one entry whose id is an error link."""
    if "arxiv.org/api/errors" in str(entry.get("id", "")):
        raise DumpError(name, f"an arXiv API error, not a listing: "
                        f"{clean_text(str(entry.get('summary', '')))[:200]}")


def _feed_entry(entry: Any, index: int, name: str, where: str, reference: date | None,
                warnings: list[str], *, rss: bool) -> tuple[str | None, Paper]:
    """One entry: its announce type (None when the feed has none) and the paper."""
    # Cut before the HTML pass: the abstract is cut at ABSTRACT_MAX_CHARS anyway, and
    # markup rarely takes more room than the text it wraps.
    summary = str(entry.get("summary", ""))[: 8 * ABSTRACT_MAX_CHARS]
    detail = entry.get("summary_detail") or {}
    if "html" in str(detail.get("type", "")):
        summary = _html_text(summary)
    summary = clean_text(summary)
    announce = str(entry.get("arxiv_announce_type", "")).strip().lower() or None
    preamble = _RSS_PREAMBLE.match(summary)
    arxiv: ArxivId | None = None
    if preamble:
        arxiv = parse_arxiv_id(preamble.group(1))
        announce = preamble.group(2).lower()
        summary = summary[preamble.end():]
    else:  # the type only in <arxiv:announce_type>: the label still starts the text
        summary = _ABSTRACT_LABEL.sub("", summary, count=1)
    raw_title = str(entry.get("title", ""))
    old_style = (_OLD_RSS_TITLE.search(raw_title) if len(raw_title) <= 4 * TITLE_MAX_CHARS
                 else None)  # an overlong title is refused below, whatever it ends with
    if old_style:
        raw_title = raw_title[: old_style.start()]
        arxiv = arxiv or parse_arxiv_id(old_style.group(1))
        marker = (old_style.group(2) or "").lower()
        announce = announce or _OLD_ANNOUNCE.get(" ".join(marker.split()), "new")
    for value in (entry.get("id", ""), entry.get("link", ""), entry.get("guid", "")):
        arxiv = arxiv or find_arxiv_id(str(value))
    if arxiv is not None:
        where = f"{where} ({arxiv.id})"
    title = _title(raw_title, name, where)
    abstract = _abstract(_SPACE_BEFORE_PUNCTUATION.sub(r"\1", summary), where, warnings)
    return announce, Paper(
        id=paper_id_for(title, arxiv.id if arxiv else None),
        title=title,
        abstract=abstract,
        arxiv_id=arxiv.id if arxiv else None,
        listed_on=_feed_date(entry, where, reference, warnings),
        code_links=code_links(abstract),
        listing_rank=index + 1,
        authors=_feed_authors(entry, where, warnings, rss=rss),
        version=arxiv.version if arxiv else None,
    )


def _feed_date(item: Any, where: str, reference: date | None, warnings: list[str]) -> date | None:
    """The date an entry (or channel) was published, as written: RFC 822 or ISO 8601."""
    for key in ("published", "updated"):
        raw = str(dict.get(item, key) or "").strip()  # not feedparser's updated->published alias
        if not raw:
            continue
        try:
            moment = parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError, OverflowError):
            return _iso_date(raw, where, reference, warnings)
        return _plausible(moment.date(), where, reference, warnings)
    return None


def _feed_authors(entry: Any, where: str, warnings: list[str], *,
                  rss: bool) -> tuple[str, ...]:
    """Atom: one ``author/name`` each, taken whole ("Doe, Jane" is one author); RSS: a
    ``dc:creator`` of "A, B and C", split, and in arXiv's RDF before 2024 each name
    wrapped in an ``<a href=...>`` link, of which the text is kept."""
    names: list[str] = []
    for author in entry.get("authors") or []:
        value = author.get("name") if isinstance(author, dict) else None
        if not isinstance(value, str):
            continue
        if not rss:
            names.append(value)
            continue
        if "<" in value:
            value = _html_text(value[: AUTHORS_MAX * AUTHOR_MAX_CHARS])
        names.extend(_split_names(value))
    return _authors(names, where, warnings)


def _split_names(value: str) -> list[str]:
    parts = re.split(r",\s*|\s+and\s+", value)
    return [part for part in (p.strip() for p in parts) if part]


class _TextOnly(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


def _html_text(markup: str) -> str:
    """The text of an HTML fragment: tags dropped, entities decoded, ``5 < 6`` kept."""
    parser = _TextOnly()
    try:
        parser.feed(markup)
        parser.close()
    except AssertionError:  # html.parser's way of refusing "<![bogus[": keep the text as is
        return markup
    return " ".join(parser.parts)


# --- the listing as a whole --------------------------------------------------------


def _listing(fmt: str, papers: list[Paper], updates: list[Paper],
             warnings: list[str]) -> ParsedDump:
    """Papers whose entries carry their own dates: the listing is of the newest one."""
    dates = [paper.listed_on for paper in papers if paper.listed_on]
    return ParsedDump(format=fmt, listed_on=max(dates) if dates else None,
                      papers=_unique(papers), updates=_unique(updates), warnings=warnings)


def _unique(papers: list[Paper]) -> list[Paper]:
    """One paper per id, first listing wins (a page may repeat a paper)."""
    seen: dict[str, Paper] = {}
    for paper in papers:
        seen.setdefault(paper.id, paper)
    return list(seen.values())


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _first_line(exc: BaseException) -> str:
    """An exception's message as one short line, for a reason."""
    return clean_text(str(exc) or type(exc).__name__)[:200]
