"""Ranking at dispatch scale (issue 13): the memoised computation ranks exactly as the direct
one did (a frozen copy in tests/rank_reference.py), whatever the memo holds; phrases and
candidate rows are computed once per fitted index; every memo and the model cache are bounded."""

from __future__ import annotations

import pickle
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from digest.config import RankingConfig
from digest.paper import Paper
from digest.rank import (
    PHRASE_MATCHES,
    SCREEN_ERROR,
    SIMILARITY_TURNOVERS,
    CorpusIndex,
    ModelCache,
    Profile,
    Ranked,
    _multi_scale,
    _multi_scale_rows,
    _near_top,
    _top_rows,
    rank,
    score_candidates,
)

from . import rank_reference as reference
from .helpers import sample_papers

# Phrases of the sample titles, one the corpus has never seen, one of stop words only.
PHRASES = ("domain adaptation", "language model alignment", "diffusion", "video generation",
           "reinforcement learning", "zyxwvut qqqq", "the of and")
# Library entries outside the corpus (own texts), one on a corpus topic, one on none.
TEXTS = (("Adapting detectors across domains",
          "We adapt an object detector trained on one domain to another without labels."),
         ("Ancient pottery glazes", "Kiln temperature and glaze chemistry of Song dynasty ware."))


@pytest.fixture(scope="module")
def papers() -> list[Paper]:
    return sample_papers()


@pytest.fixture(scope="module")
def index(papers: list[Paper]) -> CorpusIndex:
    return CorpusIndex.fit(papers)


@pytest.fixture(scope="module")
def warmed(papers: list[Paper]) -> CorpusIndex:
    """An index whose phrases were all matched in one batch first, as a dispatch does."""
    fitted = CorpusIndex.fit(papers)
    assert fitted.warm_phrases(PHRASES) == len(PHRASES)
    return fitted


@pytest.fixture(scope="module")
def cramped(papers: list[Paper]) -> CorpusIndex:
    """An index whose memos hold 7 candidate rows and no phrase: eviction and direct fallback."""
    fitted = CorpusIndex.fit(papers)
    row_bytes = 4 * len(fitted) * (2 if fitted.topic is not None else 1)
    fitted.limit_memo(similarity_bytes=7 * row_bytes, phrase_bytes=0)
    return fitted


def _same(new: list[Ranked], old: list[Ranked],
          ties: dict[str, set[str]] | None = None) -> None:
    """Same papers, order, reasons, explore flags and levels; scores within float32 rounding.

    ``ties``: for a paper whose closest positives tie (``reference.reasons_within``), any
    of their reasons is right.
    """
    ties = ties or {}
    assert [(r.paper_id, r.explore, r.level) for r in new] == \
        [(r.paper_id, r.explore, r.level) for r in old]
    for got, want in zip(new, old, strict=True):
        assert got.reason == want.reason or got.reason in ties.get(want.paper_id, ()), \
            (got.paper_id, got.reason, want.reason)
    np.testing.assert_allclose([r.score for r in new], [r.score for r in old],
                               rtol=1e-4, atol=1e-5)


@st.composite
def cases(draw: st.DrawFn, ids: list[str]) -> tuple[Profile, list[str], int, RankingConfig]:
    picked = st.lists(st.sampled_from(ids), max_size=12, unique=True)
    liked, skipped, unrated = draw(picked), draw(picked), draw(picked)
    aged = draw(st.lists(st.sampled_from(ids), max_size=8, unique=True))
    profile = Profile(
        liked=tuple(liked), skipped=tuple(skipped), unrated=tuple(unrated),
        interests=tuple(draw(st.lists(st.sampled_from(PHRASES), max_size=3, unique=True))),
        seed_papers=tuple(draw(st.lists(st.sampled_from(ids), max_size=3, unique=True))),
        ages=tuple(sorted((i, draw(st.integers(1, 400))) for i in aged)),
        seed_texts=tuple(draw(st.lists(st.sampled_from(TEXTS), max_size=2, unique=True))),
    )
    candidates = draw(st.lists(st.sampled_from(ids), min_size=1, max_size=60, unique=True))
    config = RankingConfig(explore_fraction=draw(st.sampled_from((0.0, 0.1, 0.3))),
                           unrated_weight=draw(st.sampled_from((0.0, 0.3, 1.0))),
                           half_life_days=draw(st.sampled_from((30.0, 180.0))))
    return profile, candidates, draw(st.integers(1, 15)), config


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_ranks_as_the_direct_computation_did(
    papers: list[Paper], index: CorpusIndex, cramped: CorpusIndex, warmed: CorpusIndex,
    data: st.DataObject
) -> None:
    profile, candidates, limit, config = data.draw(cases([p.id for p in papers]))
    expected = reference.rank(index, profile, candidates, limit=limit, settings=config)
    got = rank(index, profile, candidates, limit=limit, settings=config)
    _same(got, expected)
    _same(rank(cramped, profile, candidates, limit=limit, settings=config), expected)
    assert rank(warmed, profile, candidates, limit=limit, settings=config) == got
    np.testing.assert_allclose(
        score_candidates(index, profile, candidates, settings=config),
        reference.score_candidates(index, profile, candidates, settings=config),
        rtol=1e-4, atol=1e-5)


def test_a_phrase_is_matched_once_per_index(papers: list[Paper]) -> None:
    index = CorpusIndex.fit(papers)
    candidates = [p.id for p in papers[:40]]
    for n in range(12):
        interests = (PHRASES[n % 3], PHRASES[(n + 1) % 3])
        rank(index, Profile(interests=interests), candidates, limit=10)
    assert index.memo_counts()[0] == 3
    rows, specific, _ = index.phrase_matches(PHRASES[0])
    assert index.memo_counts()[0] == 3 and len(rows) > 0 and specific.nnz > 0


def test_a_candidate_row_is_computed_once_for_all_subscribers(papers: list[Paper]) -> None:
    index = CorpusIndex.fit(papers)
    candidates = [p.id for p in papers[:50]]
    others = [p.id for p in papers[50:]]
    for n in range(10):  # one like each (no calibration papers): only the candidates' rows
        rank(index, Profile(liked=(others[n],), skipped=(others[-1 - n],)), candidates, limit=10)
    assert index.memo_counts()[1] == len(candidates)


def test_past_its_bound_the_memo_drops_the_least_recently_used_rows(
    papers: list[Paper]
) -> None:
    index = CorpusIndex.fit(papers)
    row_bytes = 4 * len(index) * (2 if index.topic is not None else 1)
    index.limit_memo(similarity_bytes=30 * row_bytes, phrase_bytes=0)
    first, second = [p.id for p in papers[:20]], [p.id for p in papers[20:40]]
    profile = Profile(liked=(papers[-1].id,))
    before = rank(index, profile, first, limit=5)  # asked once: computed directly
    assert index.memo_counts()[1] == 0
    assert rank(index, profile, first, limit=5) == before  # asked again: kept
    rank(index, profile, second, limit=5)
    rank(index, profile, second, limit=5)  # kept too: 10 of the first day's rows go
    assert index.memo_counts()[1] == 40
    rank(index, profile, first, limit=5)
    assert rank(index, profile, first, limit=5) == before
    assert index.memo_counts()[1] == 50  # the 10 dropped rows computed again, the same numbers
    held = index._memo._row_of_slot
    assert len(held) == 30 and np.count_nonzero(held >= 0) == 30


def test_a_thrashing_memo_stops_computing_whole_rows(papers: list[Paper]) -> None:
    """Candidates far beyond what the memo holds (each asked twice, then never again): once
    its rows were replaced SIMILARITY_TURNOVERS times over, rows are computed for the columns
    asked only, and the rankings stay what they were."""
    index = CorpusIndex.fit(papers)
    row_bytes = 4 * len(index) * (2 if index.topic is not None else 1)
    index.limit_memo(similarity_bytes=5 * row_bytes, phrase_bytes=0)
    profile = Profile(liked=(papers[-1].id,))
    groups = [[p.id for p in papers[i : i + 5]] for i in range(0, 60, 5)]
    for group in groups:
        alone = rank(index, profile, group, limit=3)
        assert rank(index, profile, group, limit=3) == alone
    computed = index.memo_counts()[1]
    assert SIMILARITY_TURNOVERS * 5 < computed <= SIMILARITY_TURNOVERS * 5 + 5
    fresh = CorpusIndex.fit(papers)
    fresh.limit_memo(similarity_bytes=0, phrase_bytes=0)
    for group in groups:
        assert rank(index, profile, group, limit=3) == rank(fresh, profile, group, limit=3)
    assert index.memo_counts()[1] == computed


def test_the_specific_view_is_the_same_memoised_or_direct(
    papers: list[Paper], index: CorpusIndex
) -> None:
    rows = np.arange(0, len(index), 3)
    cols = np.arange(1, len(index), 2)
    index.similarities(rows, cols, shared=True, asker=1)  # a first ask: computed directly
    spec, topic = index.similarities(rows, cols, shared=True, asker=2)
    direct_spec, direct_topic = index.direct_similarities(rows, cols)
    assert np.array_equal(spec, direct_spec)  # the same products summed in the same order
    assert topic is not None and direct_topic is not None
    np.testing.assert_allclose(topic, direct_topic, atol=1e-6)


def test_phrase_vectors_match_the_svd_transform(index: CorpusIndex) -> None:
    for phrase in PHRASES[:5]:
        _, specific, topic = index.phrase_matches(phrase)
        _, old_specific, old_topic = reference._phrase_matches(index, phrase)
        assert (specific != old_specific).nnz == 0
        assert topic is not None and old_topic is not None
        np.testing.assert_allclose(topic, old_topic, atol=1e-6)
    latent = np.random.default_rng(0).normal(size=(3, 128)).astype(np.float32)
    latent[1] = 0.0  # a zero row stays zero, as sklearn's normalize leaves it
    np.testing.assert_allclose(_multi_scale_rows(latent, (16, 32, 64, 128)),
                               _multi_scale(latent, (16, 32, 64, 128)), atol=1e-7)


def test_the_model_cache_keeps_only_the_most_recent_subscribers(
    papers: list[Paper], index: CorpusIndex
) -> None:
    cache = ModelCache(max_entries=3)
    candidates = [p.id for p in papers[:30]]
    for n in range(5):
        rank(index, Profile(liked=(papers[40 + n].id,)), candidates, limit=5, cache=cache,
             key=f"reader{n}@example.org")
    assert len(cache) == 3 and cache.fits == 5
    rank(index, Profile(liked=(papers[44].id,)), candidates, limit=5, cache=cache,
         key="reader4@example.org")
    assert cache.fits == 5  # still held
    rank(index, Profile(liked=(papers[40].id,)), candidates, limit=5, cache=cache,
         key="reader0@example.org")
    assert cache.fits == 6 and len(cache) == 3  # dropped earlier, fitted again


def test_a_model_is_refitted_for_a_new_index_of_the_same_papers(papers: list[Paper]) -> None:
    cache = ModelCache()
    first, second = CorpusIndex.fit(papers), CorpusIndex.fit(papers)
    profile = Profile(liked=(papers[3].id,))
    candidates = [p.id for p in papers[10:30]]
    a = rank(first, profile, candidates, limit=5, cache=cache, key="a@example.org")
    b = rank(second, profile, candidates, limit=5, cache=cache, key="a@example.org")
    assert cache.fits == 2 and a == b  # a model holds index rows: never reused across indexes


def test_threads_sharing_an_index_rank_as_one_thread_does(papers: list[Paper]) -> None:
    index = CorpusIndex.fit(papers)
    ids = [p.id for p in papers]
    profiles = [Profile(liked=tuple(ids[n::17][:4]), skipped=tuple(ids[n + 5::23][:3]),
                        interests=(PHRASES[n % 5],)) for n in range(16)]
    candidates = ids[: len(ids) // 2]
    expected = [reference.rank(index, p, candidates, limit=10) for p in profiles]
    results: dict[int, list[Ranked]] = {}
    cache = ModelCache()

    def work(start: int) -> None:
        for n in range(start, len(profiles), 4):
            results[n] = rank(index, profiles[n], candidates, limit=10, cache=cache,
                              key=f"r{n}")

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for n, want in enumerate(expected):
        ties = {r.paper_id: reference.reasons_within(index, profiles[n], r.paper_id,
                                                     considered=len(candidates), limit=10)
                for r in want if not r.explore}
        _same(results[n], want, ties)


def test_a_pickled_index_ranks_the_same_with_fresh_memos(
    papers: list[Paper], index: CorpusIndex
) -> None:
    profile = Profile(liked=(papers[2].id, papers[7].id), interests=(PHRASES[0],))
    candidates = [p.id for p in papers[20:80]]
    before = rank(index, profile, candidates, limit=10)
    copy = pickle.loads(pickle.dumps(index))
    assert copy.memo_counts() == (0, 0)
    assert rank(copy, profile, candidates, limit=10) == before


# --- phrases matched in batches (warm_phrases) ------------------------------------------

# Phrases as subscribers type them: spaces around, case, a repeated word, words of several
# interests at once, one word, stop words with a known word, nothing at all.
MORE_PHRASES = PHRASES + ("  domain adaptation ", "Diffusion Models", "video video",
                          "language models for video generation", "alignment", "the diffusion",
                          "", "   ", "qqqq diffusion")


def _match(index: CorpusIndex, phrase: str) -> tuple[np.ndarray, object, np.ndarray | None]:
    rows, specific, topic = index.phrase_matches(phrase)
    return rows, specific, topic


def _same_match(a: tuple[np.ndarray, object, np.ndarray | None],
                b: tuple[np.ndarray, object, np.ndarray | None]) -> None:
    assert np.array_equal(a[0], b[0])
    assert (a[1] != b[1]).nnz == 0  # type: ignore[attr-defined]
    assert (a[2] is None) == (b[2] is None)
    if a[2] is not None and b[2] is not None:
        assert np.array_equal(a[2], b[2])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(st.sampled_from(MORE_PHRASES), max_size=12))
def test_a_batch_of_phrases_matches_each_as_one_phrase_alone(
    papers: list[Paper], index: CorpusIndex, batch: list[str]
) -> None:
    alone, together = pickle.loads(pickle.dumps(index)), pickle.loads(pickle.dumps(index))
    wanted = {p.strip() for p in batch if p.strip()}
    assert together.warm_phrases(batch) == len(wanted)
    assert together.memo_counts()[0] == len(wanted)
    for phrase in wanted:
        _same_match(_match(together, phrase), _match(alone, phrase))
    assert together.memo_counts()[0] == len(wanted)  # nothing matched again
    assert together.warm_phrases(batch) == 0


def test_batched_matches_are_the_full_ranking_of_the_corpus(index: CorpusIndex) -> None:
    """The screened top rows are the rows a stable sort of every paper's exact score gives."""
    phrases = [p.strip() for p in MORE_PHRASES if p.strip()]
    fresh = pickle.loads(pickle.dumps(index))  # memos start empty
    fresh.warm_phrases(phrases)
    for phrase in phrases:
        rows, specific, topic = fresh.phrase_matches(phrase)
        shared = np.asarray((specific @ fresh.specific.T).todense()).ravel()
        sims = shared.copy()
        if topic is not None and fresh.topic is not None:
            exact = (fresh.topic.astype(np.float64) @ topic[0].astype(np.float64))
            sims = (sims + exact.astype(np.float32)) / 2
        order = np.argsort(-sims, kind="stable")
        assert rows.tolist() == order[shared[order] > 0][:PHRASE_MATCHES].tolist()
        if specific.nnz == 0:  # no known term: nothing to match, no topic either
            assert len(rows) == 0 and (topic is None or not topic.any())


def test_equal_papers_tie_in_corpus_order() -> None:
    """Five copies of one paper and one near copy: a phrase's matches keep corpus order."""
    copy = ("Sparse attention for long documents",
            "We study sparse attention patterns for transformers on long documents.")
    papers = [Paper(id=f"c{i}", title=copy[0], abstract=copy[1]) for i in range(7)]
    papers += [Paper(id=f"o{i}", title=f"Protein folding {i}", abstract="Folding proteins with "
                     f"graph networks and energy {i}.") for i in range(12)]
    index = CorpusIndex.fit(papers)
    batch = CorpusIndex.fit(papers)
    batch.warm_phrases(["sparse attention", "protein folding", "long documents"])
    rows, _, _ = batch.phrase_matches("sparse attention")
    assert rows.tolist() == list(range(PHRASE_MATCHES))  # seven equal papers: the first five
    for phrase in ("sparse attention", "protein folding", "long documents"):
        _same_match(_match(batch, phrase), _match(index, phrase))


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.sampled_from([0.0, 0.1, 0.25, 0.25, 0.5, 1.0, -0.3]) |
                       st.floats(-1, 1, width=32), max_size=40),
       k=st.integers(1, 8))
def test_top_rows_is_a_stable_sort_cut_at_k(values: list[float], k: int) -> None:
    array = np.array(values, dtype=np.float32)
    assert _top_rows(array, k).tolist() == np.argsort(-array, kind="stable")[:k].tolist()


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.floats(-1, 1, width=32), min_size=1, max_size=40),
       noise=st.lists(st.floats(-SCREEN_ERROR, SCREEN_ERROR), min_size=40, max_size=40),
       k=st.integers(1, 8))
def test_screening_keeps_every_exact_top_row(
    values: list[float], noise: list[float], k: int
) -> None:
    """Rough values within SCREEN_ERROR of the exact ones keep every exact top-k position."""
    exact = np.array(values, dtype=np.float64)
    rough = exact + np.array(noise[: len(values)])
    near = _near_top(rough, k)
    top = np.argsort(-exact, kind="stable")[:k]
    tied = np.flatnonzero(exact >= exact[top[-1]])  # ties at the cut may take any of them
    assert set(tied.tolist()) <= set(near.tolist())
    assert np.all(np.diff(near) > 0)


def test_postings_products_are_the_phrase_against_every_paper(index: CorpusIndex) -> None:
    """A phrase's cosines to some papers, through postings, are its row of vector @ corpus.T."""
    rows = np.array([5, 0, 77, 3, 3, len(index) - 1, 40], dtype=np.int64)
    for phrase in ("domain adaptation", "diffusion", "zyxwvut qqqq", "video generation model"):
        _, specific, _ = index.phrase_matches(phrase)
        whole = np.asarray((specific @ index._memo.transposed()).todense()).ravel()
        assert np.array_equal(index.postings_products(rows, specific), whole[rows])
