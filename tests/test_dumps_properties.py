"""Property-based tests (hypothesis) of the dump parsers and of the scan, issue 8.

EXAMPLES examples per property, in the suite and in CI (issue 8 asks for at least
2,000). Inputs are kept small (a few hundred bytes) so the three properties
together take well under a minute; ``deadline=None`` because a shared CI
machine's pauses are not the code's.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from datetime import date
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from digest.dumps import (
    ABSTRACT_MAX_CHARS,
    AUTHOR_MAX_CHARS,
    AUTHORS_MAX,
    TITLE_MAX_CHARS,
    UPVOTES_MAX,
    ParsedDump,
    parse_bytes,
)
from digest.errors import DumpError
from digest.ingest import FAILED_DIR, scan_inbox
from digest.paper import parse_arxiv_id
from digest.store import Store

EXAMPLES = 2_000
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# --- what a dump may hold: each format, well-formed or not --------------------------

texts = st.text(max_size=40)
MONTH_NAMES = ["Jan", "Feb", "Mar", "March", "Apr", "May", "Jun", "Jul", "Aug", "Sep",
               "Sept.", "Oct", "Nov", "Dec", "Foo"]


@st.composite
def page_dumps(draw: st.DrawFn) -> bytes:
    header = draw(st.lists(texts, max_size=4))
    date_line = f"{draw(st.sampled_from(MONTH_NAMES))} {draw(st.integers(0, 120))}"
    if draw(st.booleans()):
        date_line += f", {draw(st.integers(0, 9999))}"
    body = draw(st.lists(texts, max_size=6))
    lines = [*header, date_line, *body]
    separator = draw(st.sampled_from(["\n\n", "\n", "\r\n\r\n", "\n \n"]))
    return separator.join(lines).encode("utf-8")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**40), 10**40) | st.floats() | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8,
)
field_values = st.one_of(json_values, texts, st.sampled_from(
    ["2409.11074v2", "arXiv:2409.11074", "hep-th/9901001", "2026-03-12T00:00:00Z", "0000-01-01",
     "9999-12-31T23:00:00-05:00", "\ud800"]))
PAPER_KEYS = ["id", "title", "summary", "ai_summary", "abstract", "upvotes", "authors",
              "publishedAt", "arxiv_id"]


@st.composite
def api_dumps(draw: st.DrawFn) -> bytes:
    def entry() -> dict[str, object]:
        inner = draw(st.dictionaries(st.sampled_from(PAPER_KEYS), field_values, max_size=6))
        if draw(st.booleans()):
            inner["authors"] = draw(st.lists(st.fixed_dictionaries({"name": field_values}),
                                             max_size=3))
        if draw(st.booleans()):
            return inner  # a flat entry
        outer = draw(st.dictionaries(st.sampled_from(PAPER_KEYS), field_values, max_size=3))
        return {**outer, "paper": inner}

    entries = [entry() for _ in range(draw(st.integers(0, 3)))]
    shape = draw(st.sampled_from(["list", "papers", "one", "any"]))
    document: object = {"list": entries, "papers": {"papers": entries},
                        "one": entries[0] if entries else {},
                        "any": draw(json_values)}[shape]
    # Not ASCII-escaped, a lone surrogate becomes bytes that are not UTF-8: another case.
    return json.dumps(document, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")


xml_texts = texts.map(lambda t: t.replace("&", "&amp;").replace("<", "&lt;"))


@st.composite
def feed_dumps(draw: st.DrawFn) -> bytes:
    def item() -> str:
        announce = draw(st.sampled_from(["new", "cross", "replace", "replace-cross", "odd", ""]))
        arxiv = draw(st.sampled_from(["2409.11074v1", "math/0611846v2", "x", "2413.00001"]))
        title = draw(st.one_of(xml_texts, st.just("T (arXiv:2409.11074v2 [cs.CL] UPDATED)")))
        when = draw(st.sampled_from(["Thu, 12 Mar 2026 00:00:00 -0400", "0000-01-01T00:00:00Z",
                                     "9999-12-31T23:00:00-05:00", "yesterday", ""]))
        return (f"<item><title>{title}</title><link>https://arxiv.org/abs/{arxiv}</link>"
                f"<description>arXiv:{arxiv} Announce Type: {announce} Abstract: "
                f"{draw(xml_texts)}</description><pubDate>{when}</pubDate>"
                f"<dc:creator>{draw(xml_texts)}</dc:creator></item>")

    def entry() -> str:
        return (f"<entry><id>http://arxiv.org/abs/{draw(xml_texts)}</id>"
                f"<published>{draw(xml_texts)}</published><title>{draw(xml_texts)}</title>"
                f"<summary>{draw(xml_texts)}</summary>"
                f"<author><name>{draw(xml_texts)}</name></author></entry>")

    if draw(st.booleans()):
        items = "".join(item() for _ in range(draw(st.integers(0, 3))))
        return (f'<rss version="2.0" xmlns:dc="http://purl.org/dc/elements/1.1/"><channel>'
                f"<title>{draw(xml_texts)}</title>{items}</channel></rss>").encode()
    entries = "".join(entry() for _ in range(draw(st.integers(0, 3))))
    return (f'<feed xmlns="http://www.w3.org/2005/Atom"><title>{draw(xml_texts)}</title>'
            f"{entries}</feed>").encode()


@st.composite
def mutated(draw: st.DrawFn, documents: st.SearchStrategy[bytes]) -> bytes:
    """A document cut, spliced with junk, or with bytes overwritten."""
    data = draw(documents)
    start = draw(st.integers(0, len(data)))
    end = draw(st.integers(start, len(data)))
    return data[:start] + draw(st.binary(max_size=12)) + data[end:]


well_formed = st.one_of(page_dumps(), api_dumps(), feed_dumps())
any_dump = st.one_of(st.binary(max_size=200), well_formed, mutated(well_formed))
file_dates = st.dates(min_value=date(1, 1, 1), max_value=date(9999, 12, 31))


@PROPERTY
@given(data=any_dump, fallback_date=file_dates)
def test_parsing_any_bytes_gives_bounded_papers_or_a_dump_error(data: bytes,
                                                                fallback_date: date) -> None:
    try:
        parsed = parse_bytes(data, name="x.dump", fallback_date=fallback_date)
    except DumpError as exc:
        assert str(exc).startswith("x.dump") and "\n" not in str(exc)
        return
    assert isinstance(parsed, ParsedDump)
    for paper in [*parsed.papers, *parsed.updates]:
        assert 0 < len(paper.title) <= TITLE_MAX_CHARS
        assert len(paper.abstract) <= ABSTRACT_MAX_CHARS
        assert len(paper.authors) <= AUTHORS_MAX
        assert all(0 < len(a) <= AUTHOR_MAX_CHARS for a in paper.authors)
        assert paper.upvotes is None or 0 <= paper.upvotes <= UPVOTES_MAX
        for text in (paper.title, paper.abstract, *paper.authors):
            text.encode("utf-8")  # storable and sendable: no lone surrogates
            assert "\n" not in text
    assert len({p.id for p in parsed.papers}) == len(parsed.papers)


# --- the scan -------------------------------------------------------------------------

# Any file name the scan takes (not hidden, no backup "~"), text or raw bytes. The
# name "failed" is left out: it is the scan's own folder.
name_text = st.text(st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)),
                    min_size=1, max_size=30)
name_bytes = st.binary(min_size=1, max_size=30).filter(
    lambda b: b"/" not in b and b"\x00" not in b).map(os.fsdecode)
file_names = st.one_of(name_text, name_bytes).filter(
    lambda n: not n.startswith((".", "~")) and not n.endswith("~") and n != FAILED_DIR)
inbox_contents = st.dictionaries(file_names, any_dump, min_size=1, max_size=4)


def test_a_scan_leaves_every_file_ingested_or_failed_with_a_reason(tmp_path: Path) -> None:
    numbers = itertools.count()
    with Store(tmp_path / "state.sqlite3") as store:

        @PROPERTY
        @given(files=inbox_contents)
        def scan_any_files(files: dict[str, bytes]) -> None:
            inbox = tmp_path / f"inbox-{next(numbers)}"
            inbox.mkdir()
            for name, data in files.items():
                (inbox / name).write_bytes(data)
                os.utime(inbox / name, (0, 0))  # long stable
            results = scan_inbox(store, inbox, stable_seconds=5)
            assert sorted(r.path.name for r in results) == sorted(files)
            failed = inbox / FAILED_DIR
            kept = {p.read_bytes(): p for p in failed.iterdir()
                    if not p.name.endswith(".reason")} if failed.is_dir() else {}
            for result in results:
                data = files[result.path.name]
                if result.status in ("ingested", "duplicate"):
                    assert store.dump_record(hashlib.sha256(data).hexdigest()) is not None
                    assert result.path.read_bytes() == data  # ingested files stay
                    continue
                assert result.status == "failed", result
                assert not result.path.exists()
                moved = kept[data]
                reason = moved.with_name(moved.name + ".reason").read_text(encoding="utf-8")
                assert reason.strip() and reason.count("\n") == 1

        scan_any_files()


# --- arXiv ids ------------------------------------------------------------------------


@st.composite
def written_ids(draw: st.DrawFn) -> tuple[str, str, int | None]:
    """An arXiv id written in one of its forms, with the id and version it stands for."""
    month = draw(st.integers(1, 12))
    if draw(st.booleans()):
        digits = draw(st.sampled_from([4, 5]))
        bare = f"{draw(st.integers(7, 99)):02d}{month:02d}.{draw(st.integers(0, 10**digits - 1)):0{digits}d}"
    else:
        archive = draw(st.sampled_from(["math", "hep-th", "cond-mat", "astro-ph", "cs"]))
        bare = f"{archive}/{draw(st.integers(91, 99)):02d}{month:02d}{draw(st.integers(0, 999)):03d}"
    version = draw(st.none() | st.integers(1, 30))
    body = bare + (f"v{version}" if version else "")
    form = draw(st.sampled_from(["{}", "arXiv:{}", "arxiv:{}", "https://arxiv.org/abs/{}",
                                 "http://arxiv.org/pdf/{}.pdf", "oai:arXiv.org:{}", " {} "]))
    return form.format(body), bare, version


@PROPERTY
@given(written=written_ids())
def test_every_written_form_of_an_id_is_the_same_paper(written: tuple[str, str, int | None]
                                                       ) -> None:
    text, bare, version = written
    parsed = parse_arxiv_id(text)
    assert parsed is not None and (parsed.id, parsed.version) == (bare, version)
    assert parse_arxiv_id(parsed.id) == type(parsed)(bare)  # normalised stays normalised
