"""The corpus fit stays bounded (issue 13): a window of recent papers and a vocabulary cap,
the fast weighting of old papers, determinism, and ``digest bench corpus``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from digest.bench.corpus import repeated, run_corpus_bench
from digest.cli import main
from digest.dumps import parse_file
from digest.errors import DigestError
from digest.paper import Paper
from digest.rank import (
    CORPUS_FIT,
    UNBOUNDED_FIT,
    CorpusIndex,
    FitBounds,
    _make_vectorizer,
    _paper_text,
    _weigh,
)

from .helpers import sample_dumps


@pytest.fixture(scope="module")
def papers() -> list[Paper]:
    """The bundled real sample dumps' papers (116 distinct), in listing order."""
    found = [p for path in sample_dumps() for p in parse_file(path).papers]
    return list({p.id: p for p in found}.values())


def _paper(pid: str, title: str, abstract: str) -> Paper:
    return Paper(id=pid, title=title, abstract=abstract)


# --- the fast weighting is scikit-learn's transform, bit for bit ------------------------

WORDS = st.sampled_from(
    ["graph", "neural", "network", "the", "of", "Diffusion", "model", "a", "RNA", "x2",
     "é", "self-supervised", "l'attention", "_", "42", "and", "über", "policy", "gradient"]
)
TEXT = st.lists(WORDS, max_size=30).map(" ".join) | st.text(max_size=80)


@settings(max_examples=60, deadline=None)
@given(fitted=st.lists(TEXT, min_size=4, max_size=12), weighed=st.lists(TEXT, min_size=1, max_size=8))
def test_weighing_old_papers_equals_the_vectorizers_transform(
    fitted: list[str], weighed: list[str]
) -> None:
    vectorizer = _make_vectorizer(len(fitted), max_terms=8)
    try:
        vectorizer.fit(fitted)
    except ValueError:  # no term at all in these texts: nothing to compare
        return
    expected = vectorizer.transform(weighed).tocsr()
    expected.sort_indices()
    got = _weigh(vectorizer, weighed)
    assert got.shape == expected.shape
    assert np.array_equal(got.indptr, expected.indptr)
    assert np.array_equal(got.indices, expected.indices)
    assert np.array_equal(got.data, expected.data)


def test_weighing_in_chunks_gives_the_same_rows(papers: list[Paper]) -> None:
    texts = [_paper_text(p) for p in papers]
    vectorizer = _make_vectorizer(40, max_terms=300).fit(texts[-40:])
    whole = vectorizer.transform(texts).tocsr()
    whole.sort_indices()
    got = _weigh(vectorizer, texts)  # 116 texts; FIT_CHUNK is larger, so check many chunks too
    import digest.rank as rank_module

    chunk, rank_module.FIT_CHUNK = rank_module.FIT_CHUNK, 7
    try:
        chunked = _weigh(vectorizer, texts)
    finally:
        rank_module.FIT_CHUNK = chunk
    assert (got != whole).nnz == 0
    assert (chunked != whole).nnz == 0


# --- the window and the cap -------------------------------------------------------------


def test_window_fits_terms_on_recent_papers_and_indexes_every_paper() -> None:
    old = [_paper(f"o{i}", "Quasar spectra survey", "Quasar spectra of galaxies.") for i in range(3)]
    recent = [
        _paper(f"r{i}", f"Graph networks {i}", "Graph neural networks learn molecule graphs.")
        for i in range(3)
    ] + [_paper(f"s{i}", "Stellar spectra", "Spectra of young stars.") for i in range(3)]
    index = CorpusIndex.fit(old + recent, FitBounds(window=len(recent)))
    terms = set(index.vectorizer.vocabulary_)
    assert "quasar" not in terms  # seen only before the window
    assert {"graph", "spectra", "neural networks"} <= terms
    assert len(index) == len(old) + len(recent)
    old_rows = index.rows([p.id for p in old])
    # an old paper is weighted on the window's terms it shares ("spectra")
    assert all(index.specific[r].nnz > 0 for r in old_rows)
    assert index.topic is not None and index.topic.shape[0] == len(index)


def test_cap_keeps_the_most_frequent_terms_and_explain_names_them(papers: list[Paper]) -> None:
    full = CorpusIndex.fit(papers, UNBOUNDED_FIT)
    capped = CorpusIndex.fit(papers, FitBounds(max_terms=200))
    assert len(capped.vectorizer.vocabulary_) == 200 < len(full.vectorizer.vocabulary_)
    row = capped.specific[capped.rows([papers[0].id])[0]]
    names = [capped.term(int(c)) for c in row.indices]
    assert names and all(name in capped.vectorizer.vocabulary_ for name in names)
    assert capped.vocabulary_key != full.vocabulary_key


def test_bounded_fit_is_deterministic(papers: list[Paper]) -> None:
    bounds = FitBounds(window=60, max_terms=500)
    first, second = CorpusIndex.fit(papers, bounds), CorpusIndex.fit(list(papers), bounds)
    assert first.vocabulary_key == second.vocabulary_key
    assert (first.specific != second.specific).nnz == 0
    assert first.topic is not None and second.topic is not None
    assert np.array_equal(first.topic, second.topic)


@pytest.mark.parametrize("bounds", [FitBounds(window=50, max_terms=400),
                                    FitBounds(window=40, spread=True), UNBOUNDED_FIT])
def test_fitting_in_chunks_gives_the_same_index(
    papers: list[Paper], bounds: FitBounds, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The corpus is weighted and projected a chunk at a time; the chunk size changes nothing
    (window rows are reused in their corpus places, a spread sample's too)."""
    whole = CorpusIndex.fit(papers, bounds)  # FIT_CHUNK is larger than the corpus
    monkeypatch.setattr("digest.rank.FIT_CHUNK", 7)
    chunked = CorpusIndex.fit(papers, bounds)
    assert chunked.vocabulary_key == whole.vocabulary_key
    assert (chunked.specific != whole.specific).nnz == 0
    assert chunked.topic is not None and whole.topic is not None
    np.testing.assert_allclose(chunked.topic, whole.topic, atol=1e-6)  # the mean sums in chunks
    # every paper's row is its own text's: weighted with the fitted vocabulary as one text
    texts = [_paper_text(p) for p in papers]
    expected = _weigh(whole.vectorizer, texts)
    again = CorpusIndex.fit(papers, bounds)
    rows = again.rows([p.id for p in papers[::9]])
    for row in rows:
        mine = again.specific[row]
        ref = expected[row].multiply(again._idf ** (2.0 - 1)).tocsr()
        ref = ref / np.sqrt(ref.multiply(ref).sum())
        assert set(mine.indices) == set(ref.indices)
        np.testing.assert_allclose(mine.toarray(), ref.toarray(), rtol=1e-5, atol=1e-7)


def test_shipped_bounds_leave_a_small_corpus_as_it_was(papers: list[Paper]) -> None:
    """Below the window and the cap the shipped fit is the unbounded one."""
    assert CORPUS_FIT.window is not None and CORPUS_FIT.max_terms is not None
    shipped, unbounded = CorpusIndex.fit(papers), CorpusIndex.fit(papers, UNBOUNDED_FIT)
    assert shipped.vocabulary_key == unbounded.vocabulary_key
    assert unbounded.topic is not None and shipped.topic is not None
    assert np.allclose(shipped.topic, unbounded.topic, atol=1e-5)


# --- digest bench corpus ------------------------------------------------------------------


def _dataset(folder: Path, papers: list[Paper]) -> Path:
    folder.mkdir()
    lines = [json.dumps({"id": p.id, "title": p.title, "abstract": p.abstract}) for p in papers]
    (folder / "papers.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    case = {"case": "c1", "user": "u1", "liked": [papers[0].id], "skipped": [],
            "candidates": [papers[1].id, papers[2].id], "relevant": [papers[1].id]}
    (folder / "cases.jsonl").write_text(json.dumps(case) + "\n", encoding="utf-8")
    (folder / "meta.json").write_text('{"name": "tiny"}', encoding="utf-8")
    return folder


def test_repeated_corpus_has_distinct_ids(papers: list[Paper]) -> None:
    grown = repeated(papers[:5], 3)
    assert len(grown) == 15 and len({p.id for p in grown}) == 15
    assert grown[7].title == papers[2].title
    with pytest.raises(DigestError, match="at least 1"):
        repeated(papers, 0)


def test_bench_measures_each_method_in_a_fresh_process(tmp_path: Path, papers: list[Paper]) -> None:
    folder = _dataset(tmp_path / "tiny", papers)
    result = run_corpus_bench(folder, methods=("all", "window-8k-cap-50k"), runs=1, repeat=2)
    assert list(result["methods"]) == ["all", "window-8k-cap-50k"]
    for row in result["methods"].values():
        assert row["papers"] == 2 * len(papers)
        assert row["terms"] > 100
        assert row["wall_s"] > 0 and row["cpu_s"] > 0 and row["peak_mb"] >= 0
    assert "window-8k-cap-50k" in result["table"] and "x2" in result["table"]


def test_bench_corpus_command(tmp_path: Path, papers: list[Paper],
                              capsys: pytest.CaptureFixture[str]) -> None:
    folder = _dataset(tmp_path / "tiny", papers)
    assert main(["bench", "corpus", "--dataset", str(folder), "--runs", "1", "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert set(line["methods"]) == {"all", "shipped"}
    assert line["methods"]["shipped"]["papers"] == len(papers)

    assert main(["bench", "corpus", "--dataset", str(tmp_path / "absent"), "--runs", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error:") and "absent" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as usage:
        main(["bench", "corpus", "--method", "nonsense"])
    assert usage.value.code == 2
