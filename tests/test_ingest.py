from __future__ import annotations

import os
import time
from datetime import date
from pathlib import Path

import pytest

from digest.dumps import code_links, listing_date, parse_bytes, parse_file
from digest.errors import DumpError
from digest.ingest import ingest_file, scan_inbox
from digest.paper import normalise_title
from digest.store import Store

from .helpers import sample_dumps


def copy_samples(inbox: Path, *, age_seconds: float = 60) -> list[Path]:
    inbox.mkdir(parents=True, exist_ok=True)
    copies = []
    for sample in sample_dumps():
        target = inbox / sample.name
        target.write_bytes(sample.read_bytes())
        old = time.time() - age_seconds
        os.utime(target, (old, old))
        copies.append(target)
    return copies


def test_parses_both_samples() -> None:
    first, second = (parse_file(path) for path in sample_dumps())
    assert (first.format, len(first.papers)) == ("page", 61)
    assert len(second.papers) == 71
    assert (first.listed_on.month, first.listed_on.day) == (3, 12)
    assert (second.listed_on.month, second.listed_on.day) == (3, 11)
    top = first.papers[0]
    assert top.title == "Pareto Domain Adaptation"
    assert top.abstract.startswith("Domain adaptation (DA) attempts to transfer")
    assert top.listing_rank == 1 and top.id.startswith("t:")
    shared = {p.id for p in first.papers} & {p.id for p in second.papers}
    assert len(shared) == 16


def test_code_links_found_in_abstracts() -> None:
    papers = parse_file(sample_dumps()[0]).papers
    udim = next(p for p in papers if p.title.startswith("Unknown Domain Inconsistency"))
    assert udim.code_links == ("https://github.com/SJShin-AI/UDIM",)
    assert code_links("code at https://github.com/a/b}. and (https://x.org/y)") == (
        "https://github.com/a/b", "https://x.org/y")


def test_year_comes_from_file_name_else_file_time(tmp_path: Path) -> None:
    text = sample_dumps()[0].read_bytes()
    named = tmp_path / "dump-2024-03-20.txt"
    named.write_bytes(text)
    assert parse_file(named).listed_on == date(2024, 3, 12)
    unnamed = tmp_path / "dump.txt"
    unnamed.write_bytes(text)
    stamp = time.mktime((2025, 6, 1, 12, 0, 0, 0, 0, -1))
    os.utime(unnamed, (stamp, stamp))
    assert parse_file(unnamed).listed_on == date(2025, 3, 12)


def test_listing_date_across_new_year() -> None:
    assert listing_date(12, 31, date(2026, 1, 2)) == date(2025, 12, 31)
    assert listing_date(1, 2, date(2026, 1, 2)) == date(2026, 1, 2)


@pytest.mark.parametrize(("data", "expected"), [
    (b"", "empty file"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00", "binary file"),
    (b"\xff\xfe\xfa not utf-8", "not UTF-8"),
    (b"hello\n\nworld\n", "no listing date line"),
    (b"new\n\nMar 12\n\nA title cut short", "title without an abstract"),
    (b"[{\"paper\": {\"id\": \"1\"}}]", "entry 0: no title"),
    (b"[1, 2", "invalid JSON"),
])
def test_broken_dumps_are_errors(data: bytes, expected: str) -> None:
    with pytest.raises(DumpError, match=expected) as info:
        parse_bytes(data, name="x.txt", fallback_date=date(2026, 3, 12))
    assert str(info.value).startswith("x.txt")


def test_a_dump_cut_in_its_last_title_keeps_the_whole_entries() -> None:
    """Issue 8 review: the incomplete last entry is dropped with a warning naming its line."""
    data = b"new\n\nMar 12\n\nA title\n\nIts abstract.\n\nA title cut short"
    parsed = parse_bytes(data, name="x.txt", fallback_date=date(2026, 3, 12))
    assert [p.title for p in parsed.papers] == ["A title"]
    assert parsed.warnings == [("line 9: title without an abstract: 'A title cut short' (file "
                               "cut short?): that last entry is dropped")]


def test_api_json_dump() -> None:
    data = b"""[{"paper": {"id": "2405.15738", "summary": "Code: https://github.com/a/b.",
                 "upvotes": 12}, "title": "ConvLLaVA", "publishedAt": "2024-05-27T10:00:00Z"}]"""
    parsed = parse_bytes(data, name="api.json", fallback_date=date(2026, 1, 1))
    paper = parsed.papers[0]
    assert (parsed.format, paper.id, paper.arxiv_id, paper.upvotes) == (
        "daily-papers", "2405.15738", "2405.15738", 12)
    assert paper.listed_on == date(2024, 5, 27) and paper.code_links == ("https://github.com/a/b",)
    assert paper.link == "https://arxiv.org/abs/2405.15738"


def test_scan_stores_shared_papers_once(tmp_path: Path) -> None:
    copy_samples(tmp_path / "inbox")
    with Store(tmp_path / "s.sqlite3") as store:
        results = scan_inbox(store, tmp_path / "inbox", stable_seconds=5)
        assert [r.status for r in results] == ["ingested", "ingested"]
        assert [r.new_papers for r in results] == [61, 71 - 16]
        assert store.paper_count() == 61 + 71 - 16
        titles = [normalise_title(p.title) for p in store.all_papers()]
        assert len(titles) == len(set(titles))


def test_same_dump_dropped_twice_is_a_no_op(tmp_path: Path) -> None:
    first, _ = copy_samples(tmp_path / "inbox")
    again = tmp_path / "inbox" / "copy-of-first.txt"
    again.write_bytes(first.read_bytes())
    os.utime(again, (time.time() - 60,) * 2)
    with Store(tmp_path / "s.sqlite3") as store:
        results = {r.path.name: r.status for r in scan_inbox(store, tmp_path / "inbox",
                                                               stable_seconds=5)}
        count = store.paper_count()
        assert sorted(results.values()) == ["duplicate", "ingested", "ingested"]
        rescan = scan_inbox(store, tmp_path / "inbox", stable_seconds=5)
        assert {r.status for r in rescan} == {"duplicate"}
        assert store.paper_count() == count
        assert len(store.recent_dumps()) == 2
    assert again.exists() and first.exists()  # ingested files stay where they are


def test_file_being_written_is_left_for_the_next_scan(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    partial = inbox / "today.txt"
    partial.write_bytes(b"new\n\nMar 12\n\nA title\n\nIts abs")  # mtime: now
    with Store(tmp_path / "s.sqlite3") as store:
        assert [r.status for r in scan_inbox(store, inbox, stable_seconds=5)] == ["unstable"]
        assert partial.exists() and store.paper_count() == 0
        partial.write_bytes(sample_dumps()[0].read_bytes())  # the writer finishes
        os.utime(partial, (time.time() - 60,) * 2)
        assert [r.status for r in scan_inbox(store, inbox, stable_seconds=5)] == ["ingested"]
        assert store.paper_count() == 61


def test_broken_dump_moves_to_failed_with_reason_and_scan_goes_on(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    copy_samples(inbox)
    for name, data in (("a-binary.pdf", b"%PDF-1.4\x00\x01"), ("b-empty.txt", b""),
                       ("c-notes.txt", b"shopping list\n\nmilk\n")):
        (inbox / name).write_bytes(data)
        os.utime(inbox / name, (time.time() - 60,) * 2)
    with Store(tmp_path / "s.sqlite3") as store:
        results = scan_inbox(store, inbox, stable_seconds=5)
        assert sorted(r.status for r in results) == ["failed"] * 3 + ["ingested"] * 2
        assert store.paper_count() == 116
    failed = inbox / "failed"
    assert sorted(p.name for p in failed.iterdir()) == [
        "a-binary.pdf", "a-binary.pdf.reason", "b-empty.txt", "b-empty.txt.reason",
        "c-notes.txt", "c-notes.txt.reason"]
    assert "binary file" in (failed / "a-binary.pdf.reason").read_text()
    assert "no listing date line" in (failed / "c-notes.txt.reason").read_text()
    assert (failed / "a-binary.pdf").read_bytes() == b"%PDF-1.4\x00\x01"  # nothing lost


def test_failed_names_never_overwrite(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    with Store(tmp_path / "s.sqlite3") as store:
        for content in (b"first junk", b"second junk"):
            (inbox / "junk.txt").write_bytes(content)
            os.utime(inbox / "junk.txt", (time.time() - 60,) * 2)
            scan_inbox(store, inbox, stable_seconds=5)
    names = sorted(p.name for p in (inbox / "failed").iterdir())
    assert names == ["junk.1.txt", "junk.1.txt.reason", "junk.txt", "junk.txt.reason"]


def test_a_file_named_failed_in_the_inbox_is_named_in_the_error(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Where failed/ should go sits a file: bad dumps stay put, the log says which file to move."""
    inbox = tmp_path / "inbox"
    copy_samples(inbox)
    for name, data in (("failed", b"notes of mine\n"), ("junk.txt", b"not a dump\n")):
        (inbox / name).write_bytes(data)
        os.utime(inbox / name, (time.time() - 60,) * 2)
    with Store(tmp_path / "s.sqlite3") as store:
        results = scan_inbox(store, inbox, stable_seconds=5)
        assert sorted(r.status for r in results) == ["failed"] * 2 + ["ingested"] * 2
    assert (inbox / "junk.txt").read_bytes() == b"not a dump\n"  # kept, tried again later
    assert (inbox / "failed").read_bytes() == b"notes of mine\n"
    assert "failed in the inbox is a file, not a folder: rename or move that file" in caplog.text


def test_explicit_file_ingest(tmp_path: Path) -> None:
    with Store(tmp_path / "s.sqlite3") as store:
        result = ingest_file(store, sample_dumps()[1])
        assert (result.status, result.papers, result.new_papers) == ("ingested", 71, 71)
        assert ingest_file(store, sample_dumps()[1]).status == "duplicate"


def test_store_reopens_and_keeps_schema(tmp_path: Path) -> None:
    with Store(tmp_path / "s.sqlite3") as store:
        ingest_file(store, sample_dumps()[0])
        version = store.schema_version
    with Store(tmp_path / "s.sqlite3") as store:
        assert store.schema_version == version and store.paper_count() == 61


ARXIV_RSS = b"""<?xml version='1.0' encoding='UTF-8'?>
<rss xmlns:arxiv="http://arxiv.org/schemas/atom" xmlns:dc="http://purl.org/dc/elements/1.1/"
     version="2.0">
  <channel>
    <title>cs.CL updates on arXiv.org</title>
    <link>http://rss.arxiv.org/rss/cs.CL</link>
    <item>
      <title>Pareto Domain Adaptation</title>
      <link>https://arxiv.org/abs/2112.04137</link>
      <description>arXiv:2112.04137v1 Announce Type: new
Abstract: Domain adaptation (DA) attempts to transfer knowledge. Code: https://github.com/x/y.</description>
      <guid isPermaLink="false">oai:arXiv.org:2112.04137v1</guid>
      <pubDate>Thu, 12 Mar 2026 00:00:00 -0400</pubDate>
    </item>
    <item>
      <title>A Second Paper &amp; More</title>
      <link>https://arxiv.org/abs/2603.00001</link>
      <description>arXiv:2603.00001v1 Announce Type: cross
Abstract: Another &lt;b&gt;abstract&lt;/b&gt;.</description>
      <pubDate>Thu, 12 Mar 2026 00:00:00 -0400</pubDate>
    </item>
  </channel>
</rss>"""


def test_arxiv_rss_feed() -> None:
    parsed = parse_bytes(ARXIV_RSS, name="cs.CL.xml", fallback_date=date(2026, 1, 1))
    first, second = parsed.papers
    assert parsed.format == "arxiv-rss" and parsed.listed_on == date(2026, 3, 12)
    assert (first.id, first.arxiv_id, first.title) == (
        "2112.04137", "2112.04137", "Pareto Domain Adaptation")
    assert first.abstract.startswith("Domain adaptation (DA)")
    assert first.code_links == ("https://github.com/x/y",)
    assert second.title == "A Second Paper & More" and second.abstract == "Another abstract."


def test_feed_paper_merges_with_the_same_paper_from_a_page_dump(tmp_path: Path) -> None:
    with Store(tmp_path / "s.sqlite3") as store:
        ingest_file(store, sample_dumps()[0])  # has "Pareto Domain Adaptation" without an id
        feed = tmp_path / "feed.xml"
        feed.write_bytes(ARXIV_RSS)
        assert ingest_file(store, feed).new_papers == 1
        pareto = next(p for p in store.all_papers() if p.title == "Pareto Domain Adaptation")
        assert pareto.arxiv_id == "2112.04137"  # the id learnt from the feed fills the gap


def test_xml_that_is_not_a_feed() -> None:
    with pytest.raises(DumpError, match="no feed entries"):
        parse_bytes(b"<?xml version='1.0'?><body>hello</body>", name="x.xml",
                    fallback_date=date(2026, 1, 1))
    with pytest.raises(DumpError, match="an HTML page, not a listing"):
        parse_bytes(b"<html><body>hello</body></html>", name="x.html",
                    fallback_date=date(2026, 1, 1))


def test_a_file_from_the_future_is_not_left_waiting_forever(tmp_path: Path) -> None:
    from digest.ingest import is_stable

    path = tmp_path / "skewed.txt"
    path.write_bytes(b"x")
    now = time.time()
    os.utime(path, (now + 3600, now + 3600))  # another machine's clock, an hour ahead
    assert is_stable(path, 5, now=now)
    os.utime(path, (now - 2, now - 2))
    assert not is_stable(path, 5, now=now)
