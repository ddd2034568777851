"""Issue 12 (listings as they come) and issue 11 (authors): each kind of listing, own small files."""

from __future__ import annotations

import json
import os
import time
from datetime import date
from pathlib import Path

import pytest

from digest.dumps import listing_date, parse_bytes, parse_file
from digest.errors import DumpError
from digest.ingest import FAILED_DIR, scan_inbox
from digest.paper import ArxivId, find_arxiv_id, is_arxiv_id, normalise_arxiv_id, parse_arxiv_id
from digest.store import Store

DAY = date(2026, 3, 12)


def drop(inbox: Path, name: str, data: bytes | str) -> Path:
    inbox.mkdir(parents=True, exist_ok=True)
    path = inbox / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    os.utime(path, (time.time() - 60,) * 2)
    return path


def scan(store: Store, inbox: Path) -> dict[str, str]:
    return {r.path.name: r.status for r in scan_inbox(store, inbox, stable_seconds=5)}


@pytest.fixture
def store(tmp_path: Path) -> Store:
    with Store(tmp_path / "state.sqlite3") as opened:
        yield opened


def rss_item(arxiv: str, title: str, announce: str, abstract: str,
             creators: str = "Ann Example, Bo Sample and Cy Test") -> str:
    return f"""
    <item>
      <title>{title}</title>
      <link>https://arxiv.org/abs/{arxiv.split('v')[0]}</link>
      <description>arXiv:{arxiv} Announce Type: {announce}
Abstract: {abstract}</description>
      <guid isPermaLink="false">oai:arXiv.org:{arxiv}</guid>
      <category>cs.LG</category>
      <pubDate>Wed, 11 Mar 2026 00:00:00 -0400</pubDate>
      <arxiv:announce_type>{announce}</arxiv:announce_type>
      <dc:creator>{creators}</dc:creator>
    </item>"""


def rss(*items: str) -> bytes:
    return f"""<?xml version='1.0' encoding='UTF-8'?>
<rss xmlns:arxiv="http://arxiv.org/schemas/atom" xmlns:dc="http://purl.org/dc/elements/1.1/"
     version="2.0">
  <channel>
    <title>cs.LG updates on arXiv.org</title>
    <link>http://rss.arxiv.org/rss/cs.LG</link>
    <pubDate>Wed, 11 Mar 2026 00:00:00 -0400</pubDate>
    {''.join(items)}
  </channel>
</rss>""".encode()


# --- arXiv's RSS, 2024 format -------------------------------------------------------


def test_rss_new_and_cross_are_papers_replace_only_revises(store: Store, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    drop(inbox, "a-monday.xml", rss(rss_item("2003.01111v1", "Old Paper From 2020", "new",
                                            "The first abstract.")))
    scan(store, inbox)
    seq_before = store.corpus_seq()
    parsed = parse_bytes(rss(
        rss_item("2603.02222v1", "A New Paper", "new", "New today."),
        rss_item("2603.03333v1", "A Cross-listed Paper", "cross", "From another category."),
        rss_item("2003.01111v3", "Old Paper From 2020, Revised", "replace",
                 "The revised abstract."),
        rss_item("1901.09999v2", "Never Seen Here", "replace-cross", "Revised elsewhere."),
    ), name="tuesday.xml", fallback_date=DAY)
    assert parsed.format == "arxiv-rss"
    assert [p.arxiv_id for p in parsed.papers] == ["2603.02222", "2603.03333"]
    assert [p.arxiv_id for p in parsed.updates] == ["2003.01111", "1901.09999"]
    drop(inbox, "b-tuesday.xml", rss(
        rss_item("2603.02222v1", "A New Paper", "new", "New today."),
        rss_item("2603.03333v1", "A Cross-listed Paper", "cross", "From another category."),
        rss_item("2003.01111v3", "Old Paper From 2020, Revised", "replace",
                 "The revised abstract."),
        rss_item("1901.09999v2", "Never Seen Here", "replace-cross", "Revised elsewhere."),
    ))
    (result,) = [r for r in scan_inbox(store, inbox, stable_seconds=5)
                 if r.path.name == "b-tuesday.xml"]
    assert (result.papers, result.new_papers, result.revised) == (2, 2, 1)
    # Today's candidates: the new and the cross-listed paper, not the 2020 revision.
    candidates = store.candidate_papers("reader@example.org", seq_before)
    assert sorted(p.arxiv_id for p in candidates) == ["2603.02222", "2603.03333"]
    old = store.papers_by_id(["2003.01111"])["2003.01111"]
    assert (old.title, old.abstract, old.version) == (
        "Old Paper From 2020, Revised", "The revised abstract.", 3)
    assert "1901.09999" not in store.papers_by_id(["1901.09999"])  # no paper from a revision


def test_rss_fields_authors_version_source() -> None:
    parsed = parse_bytes(rss(rss_item("2603.02222v2", "Sheep &amp; Goats", "new",
                                      "Counting &lt;b&gt;fast&lt;/b&gt;: 5 &amp;lt; 6.")),
                         name="cs.LG.xml", fallback_date=DAY)
    (paper,) = parsed.papers
    assert paper.title == "Sheep & Goats"
    assert paper.abstract == "Counting fast: 5 < 6."
    assert paper.authors == ("Ann Example", "Bo Sample", "Cy Test")
    assert (paper.version, paper.source, paper.listed_on) == (2, "arxiv-rss", date(2026, 3, 11))


def test_rss_before_2024_with_the_id_in_the_title() -> None:
    item = """<item><title>Goats Counted. (arXiv:2301.04444v2 [cs.CV] UPDATED)</title>
      <link>http://arxiv.org/abs/2301.04444</link><description>&lt;p&gt;Goats.&lt;/p&gt;
      </description></item>
      <item><title>Sheep Counted. (arXiv:2301.05555v1 [cs.CV])</title>
      <link>http://arxiv.org/abs/2301.05555</link><description>Sheep.</description></item>"""
    parsed = parse_bytes(f'<rss version="2.0"><channel><title>cs.CV</title>{item}'
                         "</channel></rss>".encode(), name="old.xml", fallback_date=DAY)
    assert [(p.title, p.arxiv_id, p.version) for p in parsed.papers] == [
        ("Sheep Counted", "2301.05555", 1)]
    assert [(p.title, p.arxiv_id, p.version) for p in parsed.updates] == [
        ("Goats Counted", "2301.04444", 2)]


# --- empty listings ------------------------------------------------------------------


EMPTY_RSS = rss()
EMPTY_ATOM = b"""<?xml version="1.0" encoding="UTF-8"?>
<feed xmlns="http://www.w3.org/2005/Atom" xmlns:opensearch="http://a9.com/-/spec/opensearch/1.1/">
  <title>arXiv Query: search_query=cat:cs.LG</title>
  <id>http://arxiv.org/api/abc</id>
  <updated>2026-03-14T00:00:00-04:00</updated>
  <opensearch:totalResults>0</opensearch:totalResults>
  <opensearch:startIndex>0</opensearch:startIndex>
</feed>"""


@pytest.mark.parametrize(("name", "data", "fmt"), [
    ("saturday.xml", EMPTY_RSS, "arxiv-rss"),
    ("saturday-atom.xml", EMPTY_ATOM, "arxiv-atom"),
    ("saturday.json", b"[]", "daily-papers"),
    ("saturday-search.json", b'{"papers": []}', "daily-papers"),
])
def test_an_empty_listing_is_a_listing_of_0_papers(name: str, data: bytes, fmt: str,
                                                   store: Store, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    drop(inbox, name, data)
    assert scan(store, inbox) == {name: "ingested"}
    assert not (inbox / FAILED_DIR).exists()
    (record,) = store.recent_dumps()
    assert (record.format, record.papers, record.new_papers) == (fmt, 0, 0)
    assert scan(store, inbox) == {name: "duplicate"}


def test_an_empty_listing_shows_in_status(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from digest.cli import main

    from .helpers import write_config

    config = write_config(tmp_path, """
        [digest]
        inbox = "inbox"
        state = "state.sqlite3"
        stable_seconds = 0
        [smtp]
        sink = "outbox"
        from = "Digest <d@example.org>"
        reply_to = "d+{token}@example.org"
        [[subscribers]]
        email = "a@example.org"
    """)
    drop(tmp_path / "inbox", "sunday.xml", EMPTY_RSS)
    assert main(["--config", str(config), "ingest"]) == 0
    capsys.readouterr()
    assert main(["--config", str(config), "status", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(d["format"], d["papers"]) for d in report["recent_ingests"]] == [("arxiv-rss", 0)]
    assert report["failed_dumps"] == []
    assert main(["--config", str(config), "status"]) == 0
    assert "sunday.xml: 0 papers, 0 new (arxiv-rss)" in capsys.readouterr().out


@pytest.mark.parametrize("data", [b"<?xml version='1.0'?><config><key>1</key></config>",
                                  b"<svg xmlns='http://www.w3.org/2000/svg'/>"])
def test_xml_that_is_no_listing_keeps_its_reason(data: bytes) -> None:
    with pytest.raises(DumpError, match="not an Atom or RSS listing"):
        parse_bytes(data, name="x.xml", fallback_date=DAY)


def test_a_feed_cut_short_with_no_entries_is_an_error_not_an_empty_listing() -> None:
    with pytest.raises(DumpError, match="broken rss20 listing with no entries"):
        parse_bytes(EMPTY_RSS[:EMPTY_RSS.index(b"<title>")], name="cut.xml", fallback_date=DAY)


def test_an_arxiv_api_error_answer_is_an_error() -> None:
    data = b"""<?xml version="1.0"?><feed xmlns="http://www.w3.org/2005/Atom"><title>arXiv</title>
    <entry><id>http://arxiv.org/api/errors#incorrect_id_format_for_1234</id><title>Error</title>
    <summary>incorrect id format for 1234</summary></entry></feed>"""
    with pytest.raises(DumpError, match="arXiv API error.*incorrect id format for 1234"):
        parse_bytes(data, name="api.xml", fallback_date=DAY)


# --- arXiv ids in every form --------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("2409.11074", ArxivId("2409.11074")),
    ("2409.11074v2", ArxivId("2409.11074", 2)),
    ("arXiv:2409.11074", ArxivId("2409.11074")),
    ("https://arxiv.org/abs/2409.11074v3", ArxivId("2409.11074", 3)),
    ("http://arxiv.org/pdf/2409.11074v3.pdf", ArxivId("2409.11074", 3)),
    ("oai:arXiv.org:2409.11074v1", ArxivId("2409.11074", 1)),
    ("math/0611846v1", ArxivId("math/0611846", 1)),
    ("hep-th/9901001", ArxivId("hep-th/9901001")),
    ("math.GT/0309136", ArxivId("math/0309136")),
    ("0704.0001", ArxivId("0704.0001")),
])
def test_arxiv_ids_in_every_form(text: str, expected: ArxivId) -> None:
    assert parse_arxiv_id(text) == expected
    assert normalise_arxiv_id(text) == expected.id
    assert is_arxiv_id(expected.id)


@pytest.mark.parametrize("text", ["2413.00001", "12.34", "2409.110", "hello/0611846",
                                  "https://example.org/abs/2409.11074", "2409.11074 extra"])
def test_what_is_not_an_arxiv_id(text: str) -> None:
    assert parse_arxiv_id(text) is None


def test_an_id_in_prose_is_found_only_where_it_is_marked() -> None:
    assert find_arxiv_id("see arXiv:2409.11074v2, section 3") == ArxivId("2409.11074", 2)
    assert find_arxiv_id("https://arxiv.org/abs/hep-th/9901001v1") == ArxivId("hep-th/9901001", 1)
    assert find_arxiv_id("we used 2409.11074 samples") is None


def test_every_form_of_an_id_is_one_paper_with_its_version(store: Store, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    forms = ["2409.11074", "2409.11074v2", "arXiv:2409.11074", "https://arxiv.org/abs/2409.11074v3"]
    for number, form in enumerate(forms):
        drop(inbox, f"{number}.json", json.dumps(
            [{"paper": {"id": form, "summary": "One paper."}, "title": f"Title form {number}"}]))
    drop(inbox, "old.json", json.dumps([
        {"id": "math/0611846v1", "title": "An Old Maths Paper"},
        {"id": "math/0611846", "title": "An Old Maths Paper, Again"},
        {"id": "hep-th/9901001", "title": "Strings"}]))
    scan(store, inbox)
    papers = {p.id: p for p in store.all_papers()}
    assert sorted(papers) == ["2409.11074", "hep-th/9901001", "math/0611846"]
    assert papers["2409.11074"].version == 3 and papers["math/0611846"].version == 1
    assert papers["math/0611846"].link == "https://arxiv.org/abs/math/0611846"


# --- the page dump's year and date line ---------------------------------------------


@pytest.mark.parametrize(("month", "day", "file_date", "expected"), [
    (1, 1, date(2025, 12, 31), date(2026, 1, 1)),
    (12, 31, date(2026, 1, 2), date(2025, 12, 31)),
    (3, 12, date(2026, 3, 12), date(2026, 3, 12)),
    (3, 12, date(2026, 11, 30), date(2026, 3, 12)),  # saved months later: not next March
    (2, 29, date(2028, 3, 1), date(2028, 2, 29)),
])
def test_page_year_is_the_listing_date_nearest_the_file_date(
        month: int, day: int, file_date: date, expected: date) -> None:
    assert listing_date(month, day, file_date) == expected


def test_page_year_from_the_file_name_across_new_year(tmp_path: Path) -> None:
    page = "Jan 1\n\nA Paper\n\nIts abstract.\n"
    path = tmp_path / "trending-2025-12-31.txt"
    path.write_text(page)
    assert parse_file(path).listed_on == date(2026, 1, 1)
    path = tmp_path / "trending-2026-01-02.txt"
    path.write_text(page.replace("Jan 1", "Dec 31"))
    assert parse_file(path).listed_on == date(2025, 12, 31)


def test_a_date_line_with_its_year_is_taken_as_written() -> None:
    parsed = parse_bytes(b"March 12, 2024\n\nA Paper\n\nIts abstract.\n", name="p.txt",
                         fallback_date=DAY)
    assert parsed.listed_on == date(2024, 3, 12)


MENU_LINES = ("Hugging Face", "Models", "Datasets", "Spaces", "Posts", "Docs", "Enterprise",
              "Pricing", "Log In", "Sign Up", "Daily Papers", "by AK and the research community",
              "Search papers", "Submit", "Previous", "Next", "Daily", "Weekly", "Monthly")
MENU = "\n".join(MENU_LINES)


def test_a_page_with_a_site_menu_still_finds_its_date_line() -> None:
    page = f"{MENU}\n\nMar 12\n\nA Paper\n\nIts abstract.\n\nAnother\n\nAnother abstract.\n"
    parsed = parse_bytes(page.encode(), name="menu.txt", fallback_date=DAY)
    assert parsed.listed_on == DAY
    assert [p.title for p in parsed.papers] == ["A Paper", "Another"]
    assert {p.source for p in parsed.papers} == {"page"}
    assert parsed.papers[0].authors == ()  # a page has none; nothing is invented


def test_no_date_line_says_where_it_looked() -> None:
    with pytest.raises(DumpError) as info:
        parse_bytes(f"{MENU}\n\nA Paper\n\nIts abstract.\n".encode(), name="nodate.txt",
                    fallback_date=DAY)
    assert "no listing date line such as 'Mar 12' in lines 1-23 (the first 21 non-blank " \
           "lines" in str(info.value)


# --- the daily-papers API ------------------------------------------------------------


DAILY = [{
    "paper": {
        "id": "2603.04444",
        "authors": [{"_id": "a1", "name": "Ada Lovelace", "hidden": False},
                    {"_id": "a2", "name": "Alan Turing", "hidden": False}, {"_id": "a3"}],
        "publishedAt": "2026-03-10T17:59:59.000Z",
        "title": "Tiny Experts",
        "ai_summary": "A generated one-line summary.",
        "upvotes": 42,
    },
    "publishedAt": "2026-03-12T01:02:03.000Z",
    "title": "Tiny Experts",
    "numComments": 2,
}]


def test_daily_papers_falls_back_to_ai_summary_and_says_so() -> None:
    (paper,) = parse_bytes(json.dumps(DAILY).encode(), name="d.json", fallback_date=DAY).papers
    assert paper.abstract == "A generated one-line summary." and paper.abstract_is_summary
    assert paper.authors == ("Ada Lovelace", "Alan Turing")
    assert (paper.upvotes, paper.listed_on, paper.source) == (42, DAY, "daily-papers")
    with_summary = json.loads(json.dumps(DAILY))
    with_summary[0]["paper"]["summary"] = "The authors' abstract."
    (paper,) = parse_bytes(json.dumps(with_summary).encode(), name="d.json",
                           fallback_date=DAY).papers
    assert paper.abstract == "The authors' abstract." and not paper.abstract_is_summary


def test_the_authors_abstract_replaces_a_stored_summary(store: Store, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    drop(inbox, "a-summary.json", json.dumps(DAILY))
    scan(store, inbox)
    drop(inbox, "b-rss.xml", rss(rss_item("2603.04444v1", "Tiny Experts", "new",
                                          "The authors' own abstract, longer than a summary.")))
    scan(store, inbox)
    (paper,) = store.all_papers()
    assert paper.abstract.startswith("The authors' own") and not paper.abstract_is_summary
    assert paper.authors == ("Ada Lovelace", "Alan Turing")  # kept: not replaced
    assert paper.upvotes == 42


@pytest.mark.parametrize("shape", ["search", "flat", "flat-list", "items"])
def test_search_shaped_and_flat_entries(shape: str) -> None:
    flat = {"id": "2603.05555", "title": "Flat Entry", "summary": "Flat.", "upvotes": 3,
            "authors": [{"name": "Grace Hopper"}], "publishedAt": "2026-03-11T00:00:00Z"}
    data = {"search": {"papers": [{"paper": flat, "title": "Flat Entry"}]},
            "flat": flat, "flat-list": [flat], "items": {"items": [flat]}}[shape]
    (paper,) = parse_bytes(json.dumps(data).encode(), name="s.json", fallback_date=DAY).papers
    assert (paper.arxiv_id, paper.title, paper.abstract, paper.authors, paper.upvotes) == (
        "2603.05555", "Flat Entry", "Flat.", ("Grace Hopper",), 3)


def test_json_that_is_no_listing_says_what_it_found() -> None:
    with pytest.raises(DumpError, match="entry 0: expected an object, found a number"):
        parse_bytes(b"[42]", name="n.json", fallback_date=DAY)
    with pytest.raises(DumpError, match="must be a list of papers .* found an object"):
        parse_bytes(b'{"error": "rate limited"}', name="e.json", fallback_date=DAY)


# --- Atom --------------------------------------------------------------------------


def test_atom_authors_version_and_source() -> None:
    data = b"""<?xml version="1.0" encoding="UTF-8"?>
<feed xmlns="http://www.w3.org/2005/Atom">
  <title>arXiv Query</title>
  <entry>
    <id>http://arxiv.org/abs/2603.06666v4</id>
    <published>2026-03-11T17:00:00-05:00</published>
    <updated>2026-03-12T10:00:00Z</updated>
    <title>Atoms
      Everywhere</title>
    <summary>  An abstract
      over two lines. </summary>
    <author><name>Marie Curie</name></author>
    <author><name>Pierre Curie</name></author>
  </entry>
</feed>"""
    parsed = parse_bytes(data, name="a.xml", fallback_date=DAY)
    (paper,) = parsed.papers
    assert (paper.id, paper.version, paper.source, parsed.format) == (
        "2603.06666", 4, "arxiv-atom", "arxiv-atom")
    assert (paper.title, paper.abstract) == ("Atoms Everywhere", "An abstract over two lines.")
    assert paper.authors == ("Marie Curie", "Pierre Curie")
    assert paper.listed_on == date(2026, 3, 11)  # the date as written, not shifted to UTC


# --- the hostile review (issue 12) ------------------------------------------------------


def test_a_menu_line_starting_like_a_month_is_no_date_line() -> None:
    page = ("Decoding 2\nMarketplace 7\nJunk 3\n\nMarch 12\n\nA Paper\n\nIts abstract.\n"
            "\nSept. 1 Review\n\nAn abstract.\n")
    parsed = parse_bytes(page.encode(), name="menu.txt", fallback_date=DAY)
    assert parsed.listed_on == DAY
    assert parsed.papers[0].title == "A Paper"
    for line, month in (("Sept 3", 9), ("june 4", 6), ("DEC. 5", 12), ("Feb 6, 2026", 2)):
        dated = parse_bytes(f"{line}\n\nA Paper\n\nIts abstract.\n".encode(), name="p.txt",
                            fallback_date=DAY)
        assert dated.listed_on is not None and dated.listed_on.month == month
    with pytest.raises(DumpError, match="no listing date line"):
        parse_bytes(b"Decoding 2\n\nA Paper\n\nIts abstract.\n", name="d.txt", fallback_date=DAY)


@pytest.mark.parametrize("start", ["<!DOCTYPE html>", "<html lang=\"en\">", "\n  <HTML>",
                                   "<html><body><p>Sign in</p>"])
def test_an_html_file_is_reported_as_an_html_page(start: str) -> None:
    data = f"{start}<head><title>Daily Papers</title></head><body>Mar 12</body></html>"
    with pytest.raises(DumpError, match="an HTML page, not a listing"):
        parse_bytes(data.encode(), name="saved.html", fallback_date=DAY)


def test_old_rdf_creators_are_names_not_links() -> None:
    data = b"""<?xml version="1.0" encoding="UTF-8"?>
<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#" xmlns="http://purl.org/rss/1.0/"
         xmlns:dc="http://purl.org/dc/elements/1.1/">
<channel rdf:about="http://arxiv.org/rss/cs.CV"><title>cs.CV updates on arXiv.org</title>
<link>http://arxiv.org/</link><description>cs.CV</description></channel>
<item rdf:about="http://arxiv.org/abs/2301.07777">
<title>Counting Herons. (arXiv:2301.07777v1 [cs.CV])</title>
<link>http://arxiv.org/abs/2301.07777</link>
<description>&lt;p&gt;We count herons.&lt;/p&gt;</description>
<dc:creator> &lt;a href="http://arxiv.org/find/cs/1/au:+Wader_H/0/1/0/all/0/1"&gt;Hanna Wader&lt;/a&gt;,
 &lt;a href="http://arxiv.org/find/cs/1/au:+Reed_P/0/1/0/all/0/1"&gt;Piet Reed&lt;/a&gt;</dc:creator>
</item></rdf:RDF>"""
    (paper,) = parse_bytes(data, name="old.rdf", fallback_date=DAY).papers
    assert paper.authors == ("Hanna Wader", "Piet Reed")


def test_atom_author_names_are_never_split() -> None:
    data = b"""<?xml version="1.0" encoding="UTF-8"?>
<feed xmlns="http://www.w3.org/2005/Atom"><title>arXiv Query</title>
  <entry><id>http://arxiv.org/abs/2603.06667v1</id><title>Cats</title><summary>Cats.</summary>
    <author><name>Doe, Jane</name></author><author><name>Tom and Jerry Studio</name></author>
  </entry></feed>"""
    (paper,) = parse_bytes(data, name="a.xml", fallback_date=DAY).papers
    assert paper.authors == ("Doe, Jane", "Tom and Jerry Studio")


def test_rss_declared_iso_8859_1_is_read_as_declared() -> None:
    data = rss(rss_item("2603.03333v1", "Caf\u00e9 Networks", "new", "R\u00e9sum\u00e9 of it.")
               ).decode().replace("encoding='UTF-8'", "encoding='ISO-8859-1'").encode("latin-1")
    (paper,) = parse_bytes(data, name="latin.xml", fallback_date=DAY).papers
    assert (paper.title, paper.abstract) == ("Caf\u00e9 Networks", "R\u00e9sum\u00e9 of it.")


def test_a_replace_without_the_preamble_drops_the_abstract_label() -> None:
    item = rss_item("2003.01111v3", "Old Paper, Revised", "replace", "The revised text.")
    item = item.replace("arXiv:2003.01111v3 Announce Type: replace\n", "")
    parsed = parse_bytes(rss(item), name="r.xml", fallback_date=DAY)
    (update,) = parsed.updates
    assert update.abstract == "The revised text." and parsed.papers == []


def test_one_item_without_a_title_is_skipped_with_a_warning() -> None:
    untitled = rss_item("2603.04445v1", "", "new", "No title here.")
    parsed = parse_bytes(rss(untitled, rss_item("2603.04446v1", "Titled", "new", "Fine.")),
                         name="t.xml", fallback_date=DAY)
    assert [p.title for p in parsed.papers] == ["Titled"]
    assert any("no title; skipped" in w for w in parsed.warnings)
