"""Papers in the store as the hostile review of issue 12 found them: identity and revisions."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from digest.paper import Paper, paper_id_for
from digest.store import MIGRATIONS, Store, _statements

TITLE = "Attention Is All You Need"


@pytest.fixture
def store(tmp_path: Path) -> Store:
    with Store(tmp_path / "state.sqlite3") as opened:
        yield opened


def listed(store: Store, *papers: Paper, updates: tuple[Paper, ...] = (), name: str = "x") -> int:
    return store.add_listing(f"sha-{name}", name, "test", list(papers), list(updates)).new


def by_title(title: str, abstract: str = "A page dump's abstract.") -> Paper:
    return Paper(id=paper_id_for(title, None), title=title, abstract=abstract)


def test_a_revision_reaches_a_paper_first_seen_in_a_page_dump(store: Store) -> None:
    listed(store, by_title("Sparse Mixtures for Tabular Streams"), name="page")
    listed(store, Paper(id="2409.00011", arxiv_id="2409.00011", version=1,
                        title="Sparse Mixtures for Tabular Streams", abstract="Short."),
           name="api")
    [stored] = store.all_papers()
    assert stored.id.startswith("t:") and stored.arxiv_id == "2409.00011"
    revision = Paper(id="2409.00011", arxiv_id="2409.00011", version=2,
                     title="Sparse Mixtures for Tabular Data Streams",
                     abstract="The revised abstract.")
    assert store.add_listing("sha-rss", "rss", "arxiv-rss", [], [revision]).updated == 1
    [stored] = store.all_papers()
    assert (stored.title, stored.abstract, stored.version) == (
        "Sparse Mixtures for Tabular Data Streams", "The revised abstract.", 2)


def test_two_arxiv_papers_with_the_same_title_are_two_papers(store: Store) -> None:
    first = Paper(id="2409.00001", arxiv_id="2409.00001", title=TITLE, abstract="Transformers.")
    second = Paper(id="2409.00002", arxiv_id="2409.00002", title="Attention is all you need!",
                   abstract="A different paper about attention in graphs.")
    assert listed(store, first, name="a") == 1
    assert listed(store, second, name="b") == 1
    assert sorted(p.id for p in store.all_papers()) == ["2409.00001", "2409.00002"]
    # A listing without ids still merges by title (into the first), not a third paper.
    assert listed(store, by_title(TITLE), name="c") == 0
    assert store.paper_count() == 2


def test_a_merge_without_a_version_keeps_null(store: Store, tmp_path: Path) -> None:
    listed(store, by_title(TITLE), name="page")
    listed(store, Paper(id="2409.00001", arxiv_id="2409.00001", title=TITLE, abstract="x"),
           name="api")
    [stored] = store.all_papers()
    assert stored.arxiv_id == "2409.00001"
    with sqlite3.connect(tmp_path / "state.sqlite3") as db:  # the column, not the Paper's view
        assert db.execute("SELECT arxiv_version FROM papers").fetchall() == [(None,)]
    listed(store, Paper(id="2409.00001", arxiv_id="2409.00001", version=3, title=TITLE,
                        abstract="x"), name="rss")
    listed(store, Paper(id="2409.00001", arxiv_id="2409.00001", title=TITLE, abstract="x"),
           name="api2")
    assert store.all_papers()[0].version == 3


def test_migration_8_keeps_every_paper_and_what_refers_to_it(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for version, script in enumerate(MIGRATIONS[:7], start=1):
        for statement in _statements(script):
            db.execute(statement)
        db.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
    db.execute("INSERT INTO papers (id, title_key, title, abstract, arxiv_id, ingested_at,"
               " arxiv_version) VALUES ('2409.00001', 'attention is all you need', ?, 'a',"
               " '2409.00001', '2026-03-01T00:00:00+00:00', NULL)", (TITLE,))
    db.execute("INSERT INTO feedback (subscriber, paper_id, signal, source, at)"
               " VALUES ('ada@example.org', '2409.00001', 'like', 'reply', '2026-03-02')")
    db.close()
    with Store(path) as store:
        assert store.schema_version == len(MIGRATIONS)
        assert [p.id for p in store.all_papers()] == ["2409.00001"]
        listed(store, Paper(id="2409.00002", arxiv_id="2409.00002", title=TITLE, abstract="b"))
        assert store.paper_count() == 2
    db = sqlite3.connect(path)
    assert db.execute("SELECT paper_id FROM feedback").fetchall() == [("2409.00001",)]
    assert db.execute("PRAGMA foreign_key_check").fetchall() == []
    db.close()
