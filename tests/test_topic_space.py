"""The topic space of a small window is the exact truncated SVD: the top right singular
vectors, scikit-learn's sign rule, empty directions for duplicate texts, the same bits in
any process whatever its BLAS thread count; a larger window keeps the randomized SVD."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import sparse
from sklearn.decomposition import TruncatedSVD

import digest.rank as rank_module
from digest.paper import Paper
from digest.rank import (
    SVD_SEED,
    CorpusIndex,
    FitBounds,
    _exact_components,
    _fit_svd,
    _unit_rows,
)

from .helpers import sample_papers

ROOT = Path(__file__).resolve().parents[1]


@st.composite
def windows(draw: st.DrawFn) -> sparse.csr_matrix:
    """Unit rows of a papers x terms count matrix, more terms than papers; some papers may
    repeat another's text (a rank-deficient window)."""
    papers = draw(st.integers(3, 9))
    terms = draw(st.integers(papers + 1, 30))
    counts = draw(st.lists(st.lists(st.integers(0, 3), min_size=terms, max_size=terms),
                           min_size=papers, max_size=papers))
    copies = draw(st.lists(st.tuples(st.integers(0, papers - 1), st.integers(0, papers - 1)),
                           max_size=2))
    for source, target in copies:
        counts[target] = list(counts[source])
    for row in counts:
        if not any(row):
            row[0] = 1
    return _unit_rows(sparse.csr_matrix(np.array(counts, dtype=np.float32)))


@settings(max_examples=80, deadline=None)
@given(window=windows())
def test_exact_components_are_the_top_singular_vectors(window: sparse.csr_matrix) -> None:
    k = window.shape[0] - 1
    components = _exact_components(window, k)
    assert components.shape == (k, window.shape[1]) and components.dtype == np.float32
    assert np.isfinite(components).all()
    _, singular, right = np.linalg.svd(window.toarray().astype(np.float64))
    for i in range(k):
        row = components[i].astype(np.float64)
        if singular[i] <= 1e-5 * singular[0]:  # no paper in that direction: left empty
            assert not row.any() or abs(np.linalg.norm(row) - 1) < 1e-4
            continue
        assert abs(np.linalg.norm(row) - 1) < 1e-4
        biggest = np.argmax(np.abs(row))
        assert row[biggest] > 0  # scikit-learn's sign rule
        gap = min(abs(singular[i] - singular[j]) for j in range(len(singular)) if j != i)
        if gap > 1e-3 * singular[0]:  # a single direction: the vector itself, up to sign
            assert abs(abs(row @ right[i]) - 1) < 1e-4


def test_small_window_gets_the_exact_space_and_a_large_one_the_randomized(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    papers = sample_papers()
    index = CorpusIndex.fit(papers)
    assert len(index) <= rank_module.EXACT_TOPIC_PAPERS
    window = _unit_rows(sparse.csr_matrix(index.vectorizer.transform(
        [rank_module._paper_text(p) for p in papers]), dtype=np.float32))
    exact, scales = _fit_svd(window, FitBounds())
    assert exact is not None and scales == (16, 32, 64)
    assert np.array_equal(exact.components_, _exact_components(window, 64))
    monkeypatch.setattr(rank_module, "EXACT_TOPIC_PAPERS", len(papers) - 1)
    randomized, _ = _fit_svd(window, FitBounds(svd_iterations=3))
    expected = TruncatedSVD(64, algorithm="randomized", n_iter=3, random_state=SVD_SEED)
    with rank_module._one_blas_thread():  # as the fit runs it: the same bits on any machine
        expected.fit(window)
    assert randomized is not None
    assert np.array_equal(randomized.components_, expected.components_)
    assert np.array_equal(randomized.transform(window[:5]), expected.transform(window[:5]))


def _synthetic_papers(count: int = 700) -> list[Paper]:
    """Papers of made-up words, enough of them that BLAS would split the fit's products over
    threads (a 116-paper window is too small for that)."""
    rng = np.random.default_rng(7)
    words = [f"w{n}x{n * 7919 % 1000}" for n in range(3000)]
    return [Paper(id=f"p{n}", title=" ".join(rng.choice(words, 6)),
                  abstract=" ".join(rng.choice(words, 60))) for n in range(count)]


def _fingerprint(index: CorpusIndex) -> str:
    assert index._svd is not None and index.topic is not None
    digest = hashlib.sha256(index._svd.components_.tobytes())
    digest.update(index.topic.tobytes())
    return digest.hexdigest()


FINGERPRINT = """
import sys
sys.path.insert(0, {root!r})
from digest.rank import CorpusIndex
from tests.test_topic_space import _fingerprint, _synthetic_papers
print(_fingerprint(CorpusIndex.fit(_synthetic_papers())))
"""


def test_topic_space_is_the_same_in_any_process_and_blas_thread_count() -> None:
    here = _fingerprint(CorpusIndex.fit(_synthetic_papers()))
    script = FINGERPRINT.format(root=str(ROOT))
    for threads in ("1", "2"):
        env = dict(os.environ, OPENBLAS_NUM_THREADS=threads, OMP_NUM_THREADS=threads)
        out = subprocess.run([sys.executable, "-c", script], env=env, check=True, cwd=ROOT,
                             capture_output=True, text=True).stdout.split()[-1]
        assert out == here
