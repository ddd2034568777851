"""Dump files: detect the format from content and parse papers out of it.

Runs on every inbox scan, before anything is stored. Hands a ``ParsedDump``
(papers with title, abstract, listing date, code links) to the store, or
raises ``DumpError`` naming the file, the line and what was expected.

Formats (DESIGN.md "Dump formats"):
  page   the trending-papers page saved as text: header lines, a ``Mar 12``
         date line, then title / abstract pairs separated by blank lines;
  json   the daily-papers API: a list of objects with ``paper.id``,
         ``title``, ``paper.summary``, ``paper.upvotes``, ``publishedAt``;
  feed   an arXiv Atom or RSS listing (parsed by feedparser).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from .errors import DumpError
from .paper import Paper, is_arxiv_id, paper_id_for

MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_DATE_LINE = re.compile(r"^(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)[a-z]*\.? (\d{1,2})$",
                        re.IGNORECASE)
_NAME_DATE = re.compile(r"(20\d\d)[-_.]?(0[1-9]|1[0-2])[-_.]?(0[1-9]|[12]\d|3[01])")
_URL = re.compile(r"https?://[^\s<>\"'\]\[]+")
_URL_TRAILING = ".,;:!?)}'\""
# How far into a page dump the date line may stand (it follows 4 header lines).
HEADER_LINES_MAX = 12
# A title longer than this is an abstract out of place: the pairs are misaligned.
TITLE_MAX_CHARS = 400


@dataclass(frozen=True)
class ParsedDump:
    format: str
    listed_on: date | None
    papers: list[Paper]


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parse_file(path: Path, data: bytes | None = None) -> ParsedDump:
    """Parse one dump file; ``data`` saves a second read when the caller has it."""
    if data is None:
        data = path.read_bytes()
    return parse_bytes(data, name=str(path), fallback_date=_date_from_file(path))


def parse_bytes(data: bytes, *, name: str, fallback_date: date) -> ParsedDump:
    """Detect the format from the content, not the file name, and parse it."""
    if not data.strip():
        raise DumpError(name, "empty file")
    if b"\x00" in data[:8192]:
        raise DumpError(name, "binary file (contains NUL bytes), not a dump")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DumpError(name, f"not UTF-8 text (byte {exc.start})", line=line) from exc
    stripped = text.lstrip()
    if stripped.startswith(("[", "{")):
        return parse_api_json(text, name=name)
    if stripped.startswith("<"):
        return parse_feed(data, name=name)
    return parse_page(text, name=name, fallback_date=fallback_date)


def _date_from_file(path: Path) -> date:
    """The date a file name holds (2026-03-12, 20260312), else the file's time."""
    match = _NAME_DATE.search(path.name)
    if match:
        try:
            return date(int(match.group(1)), int(match.group(2)), int(match.group(3)))
        except ValueError:
            pass
    try:
        return datetime.fromtimestamp(path.stat().st_mtime, UTC).date()
    except OSError:
        return datetime.now(UTC).date()


def listing_date(month: int, day: int, reference: date) -> date:
    """The date ``month``/``day`` nearest before (or on) ``reference``.

    A page dump says ``Dec 31`` with no year; saved on Jan 2 it is last year's.
    """
    for year in (reference.year, reference.year - 1):
        try:
            candidate = date(year, month, day)
        except ValueError:  # Feb 29 in a common year
            continue
        if candidate <= reference or (candidate - reference).days <= 1:
            return candidate
    return date(reference.year, month, min(day, 28))


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


def parse_page(text: str, *, name: str, fallback_date: date) -> ParsedDump:
    """The page dump: header, date line, then title / abstract pairs."""
    lines = [(number, line.strip()) for number, line in enumerate(text.splitlines(), start=1)]
    content = [(number, line) for number, line in lines if line]
    date_index = None
    for index, (_, line) in enumerate(content[:HEADER_LINES_MAX]):
        if _DATE_LINE.match(line):
            date_index = index
            break
    if date_index is None:
        raise DumpError(
            name,
            f"no listing date line such as 'Mar 12' in the first {HEADER_LINES_MAX} lines: "
            "not a page dump of the trending-papers page",
        )
    date_match = _DATE_LINE.match(content[date_index][1])
    assert date_match is not None  # matched just above
    month = MONTHS.index(date_match.group(1).lower()) + 1
    try:
        listed_on = listing_date(month, int(date_match.group(2)), fallback_date)
    except ValueError as exc:
        raise DumpError(name, f"impossible date {content[date_index][1]!r}",
                        line=content[date_index][0]) from exc
    body = content[date_index + 1:]
    if not body:
        raise DumpError(name, "no papers after the date line", line=content[date_index][0])
    if len(body) % 2:
        last_line, last = body[-1]
        raise DumpError(name, f"title without an abstract: {last[:60]!r} "
                        "(file cut short, or still being written?)", line=last_line)
    papers = []
    for rank, start in enumerate(range(0, len(body), 2), start=1):
        (title_line, title), (_, abstract) = body[start], body[start + 1]
        if len(title) > TITLE_MAX_CHARS:
            raise DumpError(name, f"expected a title, found {len(title)} characters of text "
                            "(titles and abstracts out of step)", line=title_line)
        papers.append(Paper(
            id=paper_id_for(title, None),
            title=title,
            abstract=abstract,
            listed_on=listed_on,
            code_links=code_links(abstract),
            listing_rank=rank,
        ))
    return ParsedDump(format="page", listed_on=listed_on, papers=_unique(papers))


def parse_api_json(text: str, *, name: str) -> ParsedDump:
    """The daily-papers API JSON: a list of entries with a nested ``paper``."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DumpError(name, f"invalid JSON: {exc.msg}", line=exc.lineno) from exc
    if isinstance(data, dict):
        data = data.get("papers") or data.get("items") or [data]
    if not isinstance(data, list) or not data:
        raise DumpError(name, "JSON dump must be a non-empty list of papers")
    return _listing("json", [_api_entry(entry, i, name) for i, entry in enumerate(data)])


def _api_entry(entry: Any, index: int, name: str) -> Paper:
    where = f"entry {index}"
    if not isinstance(entry, dict):
        raise DumpError(name, f"{where}: expected an object")
    nested = entry.get("paper")
    inner: dict[str, Any] = nested if isinstance(nested, dict) else entry
    title = str(entry.get("title") or inner.get("title") or "").strip()
    abstract = str(inner.get("summary") or entry.get("summary") or inner.get("abstract") or "")
    if not title:
        raise DumpError(name, f"{where}: no title")
    arxiv = str(inner.get("id") or entry.get("arxiv_id") or "").strip()
    arxiv_id = arxiv if is_arxiv_id(arxiv) else None
    upvotes = inner.get("upvotes", entry.get("upvotes"))
    published = entry.get("publishedAt") or inner.get("publishedAt")
    listed_on = None
    if isinstance(published, str) and len(published) >= 10:
        try:
            listed_on = date.fromisoformat(published[:10])
        except ValueError:
            listed_on = None
    abstract = " ".join(abstract.split())
    return Paper(
        id=paper_id_for(title, arxiv_id),
        title=" ".join(title.split()),
        abstract=abstract,
        arxiv_id=arxiv_id,
        listed_on=listed_on,
        code_links=code_links(abstract),
        upvotes=int(upvotes) if isinstance(upvotes, int) else None,
        listing_rank=index + 1,
    )


_ARXIV_IN_LINK = re.compile(r"arxiv\.org/(?:abs|pdf)/(\d{4}\.\d{4,5})")
# arXiv's RSS puts "arXiv:2403.01234v1 Announce Type: new Abstract:" before the abstract.
_RSS_PREAMBLE = re.compile(r"^arXiv:\S+\s+Announce Type:\s*\S+\s+Abstract:\s*", re.IGNORECASE)
_TAGS = re.compile(r"<[^>]+>")
_SPACE_BEFORE_PUNCTUATION = re.compile(r"\s+([.,;:!?])")


def parse_feed(data: bytes, *, name: str) -> ParsedDump:
    """An Atom or RSS listing, e.g. arXiv's daily feed of a category."""
    import feedparser  # imported late: only feed dumps need it

    feed = feedparser.parse(data)
    if not feed.entries:
        reason = getattr(feed, "bozo_exception", None)
        detail = f" ({reason})" if reason else ""
        raise DumpError(name, f"an XML file with no feed entries{detail}: not an Atom or RSS listing")
    return _listing("feed", [_feed_entry(entry, i, name) for i, entry in enumerate(feed.entries)])


def _feed_entry(entry: Any, index: int, name: str) -> Paper:
    title = " ".join(str(entry.get("title", "")).split())
    if not title:
        raise DumpError(name, f"feed entry {index}: no title")
    summary = _TAGS.sub(" ", str(entry.get("summary", "")))
    abstract = _RSS_PREAMBLE.sub("", " ".join(summary.split()))
    abstract = _SPACE_BEFORE_PUNCTUATION.sub(r"\1", abstract)  # left where a tag was cut out
    match = None
    for field_value in (entry.get("id", ""), entry.get("link", "")):
        match = match or _ARXIV_IN_LINK.search(str(field_value))
    arxiv_id = match.group(1) if match else None
    stamp = entry.get("published_parsed") or entry.get("updated_parsed")
    listed_on = date(stamp.tm_year, stamp.tm_mon, stamp.tm_mday) if stamp else None
    return Paper(
        id=paper_id_for(title, arxiv_id),
        title=title,
        abstract=abstract,
        arxiv_id=arxiv_id,
        listed_on=listed_on,
        code_links=code_links(abstract),
        listing_rank=index + 1,
    )


def _listing(fmt: str, papers: list[Paper]) -> ParsedDump:
    """Papers whose entries carry their own dates: the listing is of the newest one."""
    dates = [paper.listed_on for paper in papers if paper.listed_on]
    return ParsedDump(format=fmt, listed_on=max(dates) if dates else None, papers=_unique(papers))


def _unique(papers: list[Paper]) -> list[Paper]:
    """One paper per id, first listing wins (a page may repeat a paper)."""
    seen: dict[str, Paper] = {}
    for paper in papers:
        seen.setdefault(paper.id, paper)
    return list(seen.values())
