"""The corpus fit's own vocabulary counting is scikit-learn's fit, bit for bit: the same
terms, columns, idf and rows (each row's terms in scikit-learn's order, so sums over a row
add in the same order), and a term table that weighs new texts as ``transform`` does."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import sparse

from digest.rank import (
    SMALL_CORPUS,
    _fit_vocabulary,
    _make_vectorizer,
    _paper_text,
    _term_table,
    _weigh,
)

from .helpers import sample_papers

WORDS = st.sampled_from(
    ["graph", "neural", "network", "the", "of", "Diffusion", "model", "a", "RNA", "x2",
     "é", "self-supervised", "l'attention", "_", "42", "and", "über", "policy", "gradient",
     "ΣΑΣ", "graphs", "gra", "net-work", "İstanbul"]
)
TEXT = st.lists(WORDS, max_size=30).map(" ".join) | st.text(max_size=80)


def _same_fit(texts: list[str], corpus_size: int, max_terms: int | None) -> None:
    expected_vectorizer = _make_vectorizer(corpus_size, max_terms)
    try:
        expected = sparse.csr_matrix(expected_vectorizer.fit_transform(texts))
    except ValueError:  # no term at all: the fit must refuse too (CorpusIndex.fit falls back)
        expected = None
    vectorizer = _make_vectorizer(corpus_size, max_terms)
    try:
        got = _fit_vocabulary(vectorizer, texts)
    except ValueError:
        assert expected is None
        return
    assert expected is not None
    assert vectorizer.vocabulary_ == expected_vectorizer.vocabulary_
    assert list(vectorizer.get_feature_names_out()) == \
        list(expected_vectorizer.get_feature_names_out())
    assert vectorizer.idf_.dtype == expected_vectorizer.idf_.dtype
    assert np.array_equal(vectorizer.idf_, expected_vectorizer.idf_)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    for part in ("indptr", "indices", "data"):  # unsorted rows too: the same order
        assert np.array_equal(getattr(got, part), getattr(expected, part)), part
    # The term table kept by the fit weighs new texts as scikit-learn's transform does.
    assert _term_table(vectorizer).vocabulary is vectorizer.vocabulary_
    new = [*texts[:3], "graph neural network model", "unknown words only"]
    weighed = _weigh(vectorizer, new)
    transformed = expected_vectorizer.transform(new).tocsr()
    transformed.sort_indices()
    assert (weighed != transformed).nnz == 0


@settings(max_examples=150, deadline=None)
@given(texts=st.lists(TEXT, min_size=1, max_size=14),
       corpus_size=st.sampled_from([1, 3, 4, 20, SMALL_CORPUS]),
       max_terms=st.sampled_from([None, 1, 3, 8, 40]))
def test_vocabulary_fit_equals_scikit_learns(texts: list[str], corpus_size: int,
                                             max_terms: int | None) -> None:
    _same_fit(texts, corpus_size, max_terms)


def test_vocabulary_fit_equals_scikit_learns_on_real_papers() -> None:
    texts = [_paper_text(p) for p in sample_papers()]
    for corpus_size, max_terms in [(len(texts), None), (len(texts), 500),
                                   (SMALL_CORPUS, 2000), (SMALL_CORPUS, None)]:
        _same_fit(texts, corpus_size, max_terms)
