"""Ranking CPU per subscriber (issue 13): each restructured step gives exactly the floats, ids
and ages the straightforward computation it replaced gave (written out here as it was), so a
digest is the same to the last bit, not just within rounding."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from digest.config import RankingConfig
from digest.paper import Paper
from digest.rank import (
    PHRASE_MEMO_BYTES,
    SIMILARITY_MEMO_BYTES,
    CorpusIndex,
    Profile,
    UnknownPaper,
    _best_positive,
    _calibration_papers,
    _days_since,
    _evidence_weights,
    _familiarity,
    _levels,
    _model_for,
    _Pool,
    _pool_scores,
    _positive_similarities,
    _signal_ages,
    _standardise,
    _standardise_all,
    _topic_products,
    rank,
)

from .helpers import sample_papers
from .test_rank_scale import PHRASES, TEXTS

SPREAD_NOISE_VALUES = [0.0, 0.1, 0.25, 0.25, 0.5, 1.0, -0.3, 1e-7, -1e-7]


@pytest.fixture(scope="module")
def papers() -> list[Paper]:
    return sample_papers()


@pytest.fixture(scope="module")
def index(papers: list[Paper]) -> CorpusIndex:
    return CorpusIndex.fit(papers)


def _standardise_as_before(values: np.ndarray) -> np.ndarray:
    """The function as it was: numpy's std and mean methods."""
    spread = float(values.std())
    scale = float(np.abs(values).max(initial=0.0))
    if not np.isfinite(spread) or spread < max(1e-9, 1e-5 * scale):
        return np.zeros_like(values, dtype=np.float64)
    return (values - values.mean()) / spread


def _same_bits(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()


@settings(max_examples=400, deadline=None)
@given(values=st.lists(st.sampled_from(SPREAD_NOISE_VALUES) | st.floats(-1e3, 1e3, width=32)
                       | st.sampled_from([np.nan, np.inf, -np.inf]), max_size=150),
       wide=st.booleans(), scale=st.sampled_from([1.0, 1e-6, 3.0, 1e6]))
def test_standardise_gives_the_same_floats_as_std_and_mean(
    values: list[float], wide: bool, scale: float
) -> None:
    array = np.array(values, dtype=np.float64 if wide else np.float32) * (
        scale if wide else np.float32(scale))
    with np.errstate(all="ignore"):
        expected = _standardise_as_before(array) if len(array) else np.zeros(0)
        _same_bits(_standardise(array), expected)


@settings(max_examples=200, deadline=None)
@given(signals=st.lists(
    st.tuples(st.sampled_from(["a", "b", "c", "d", "e"]),
              st.sampled_from(["2026-01-01T08:00:00+00:00", "2026-01-01T08:00:00+00:00",
                               "2026-02-11T23:59:59+00:00", "2025-12-31T00:00:01+00:00",
                               "2026-03-01T00:00:00+00:00", "not a time", "2026-02-28"])),
    max_size=30),
    hours=st.integers(0, 24 * 90))
def test_signal_ages_are_each_signal_parsed_on_its_own(
    signals: list[tuple[str, str]], hours: int
) -> None:
    """The last signal per paper wins; a time parsed once gives the age each parse gave."""
    now = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(hours=hours)
    expected: dict[str, int] = {}
    for paper_id, at in signals:
        try:
            expected[paper_id] = _days_since(at, now)
        except TypeError:  # a date without a zone against an aware now: as before, it raises
            with pytest.raises(TypeError):
                _signal_ages(signals, now)
            return
    assert _signal_ages(signals, now) == expected


def test_known_and_rows_are_the_corpus_lookup(index: CorpusIndex, papers: list[Paper]) -> None:
    ids = [papers[3].id, "nope", papers[0].id, papers[3].id, "2401.99999", papers[-1].id]
    assert index.known(ids) == [i for i in ids if i in index]
    assert index.rows(index.known(ids)).tolist() == \
        [[p.id for p in papers].index(i) for i in index.known(ids)]
    with pytest.raises(UnknownPaper, match="nope"):
        index.rows(ids)


@st.composite
def pools(draw: st.DrawFn, ids: list[str]) -> tuple[Profile, list[str], RankingConfig]:
    picked = st.lists(st.sampled_from(ids), max_size=12, unique=True)
    profile = Profile(
        liked=tuple(draw(picked)), skipped=tuple(draw(picked)), unrated=tuple(draw(picked)),
        interests=tuple(draw(st.lists(st.sampled_from(PHRASES), max_size=3, unique=True))),
        seed_papers=tuple(draw(st.lists(st.sampled_from(ids), max_size=3, unique=True))),
        seed_texts=tuple(draw(st.lists(st.sampled_from(TEXTS), max_size=2, unique=True))),
    )
    candidates = draw(st.lists(st.sampled_from(ids), min_size=1, max_size=60, unique=True))
    config = RankingConfig(unrated_weight=draw(st.sampled_from((0.0, 0.3, 1.0))))
    return profile, candidates, config


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_evidence_matrix_rows_are_the_per_paper_similarities(
    papers: list[Paper], index: CorpusIndex, data: st.DataObject
) -> None:
    """Reasons, levels and exploration read one matrix per pool: each row, each maximum and
    each familiarity is what the per-paper computation gave, to the bit; so are the
    evidence weights, without the broadcast copy."""
    profile, candidates, config = data.draw(pools([p.id for p in papers]))
    model = _model_for(index, profile, config, None, None)
    if model is None:
        return
    pool = _Pool(index, model, index.rows(candidates))
    _pool_scores(index, model, pool)
    weights = np.broadcast_to(model.pos_weights, (len(pool), len(model.pos_weights)))
    _same_bits(_evidence_weights(pool.rows, model),
               np.where(pool.rows[:, None] == model.pos_rows[None, :], 0.0, weights))
    spec, topic = pool.positives()
    for at in range(len(pool)):
        row = spec[at] if topic is None else (spec[at] + topic[at]) / 2
        _same_bits(_positive_similarities(pool, at),
                   np.where(model.pos_rows == pool.rows[at], -1.0, row))
    if len(model.pos_rows):
        mixed = spec if topic is None else (spec + topic) / 2
        before = np.where(pool.rows[:, None] == model.pos_rows[None, :], -1.0, mixed).max(axis=1)
        _same_bits(_best_positive(pool), np.asarray(before))
    chosen = np.arange(len(pool))[::2]
    best = np.full(len(chosen), -np.inf)
    for count, similarities in ((len(model.pos_rows), pool.positives),
                                (len(model.neg_rows), pool.negatives)):
        if count:
            s, t = similarities()
            sims = s[chosen] if t is None else (s[chosen] + t[chosen]) / 2
            best = np.maximum(best, sims.max(axis=1))
    _same_bits(_familiarity(pool, chosen), np.where(np.isfinite(best), best, 0.0))


@pytest.fixture(scope="module")
def bounded(papers: list[Paper]) -> dict[int | None, CorpusIndex]:
    """Indexes keeping 0, 1 or 2 phrase rows, and one with the shipped bound (None)."""
    indexes: dict[int | None, CorpusIndex] = {None: CorpusIndex.fit(papers)}
    for kept in (0, 1, 2):
        indexes[kept] = CorpusIndex.fit(papers)
        indexes[kept].limit_memo(similarity_bytes=0, phrase_bytes=0,
                                 phrase_row_bytes=kept * 4 * len(indexes[kept]))
    return indexes


@settings(max_examples=80, deadline=None)
@given(phrases=st.lists(st.sampled_from(PHRASES + ("graph neural networks", "large language")),
                        min_size=1, max_size=6),
       picks=st.lists(st.integers(0, 10_000), max_size=40),
       kept=st.sampled_from([0, 1, 2, None]))
def test_phrase_products_are_the_postings_walk(
    bounded: dict[int | None, CorpusIndex], phrases: list[str], picks: list[int],
    kept: int | None
) -> None:
    """A phrase's kept row gives each pool exactly the postings walk's floats, whether the
    row was kept, dropped for another phrase or never kept (a bound of 0 or 1 row)."""
    index = bounded[kept]
    rows = np.array([p % len(index) for p in picks], dtype=np.int64)
    for phrase in phrases:
        vector = index._phrase(phrase).specific
        _same_bits(index.phrase_products(phrase, vector, rows),
                   index.postings_products(rows, vector))


@settings(max_examples=300, deadline=None)
@given(data=st.data(), wide=st.booleans(), count=st.integers(1, 5), length=st.integers(0, 140))
def test_standardise_all_gives_each_vector_its_own_floats(
    data: st.DataObject, wide: bool, count: int, length: int
) -> None:
    """Stacked, each vector is standardised to the bits it gets alone, flat ones included."""
    element = (st.sampled_from(SPREAD_NOISE_VALUES) | st.floats(-1e3, 1e3, width=32)
               | st.sampled_from([np.nan, np.inf]))
    dtype = np.float64 if wide else np.float32
    vectors = [np.array(data.draw(st.lists(element, min_size=length, max_size=length)),
                        dtype=dtype) for _ in range(count)]
    with np.errstate(all="ignore"):
        got = _standardise_all(vectors)
        assert len(got) == count
        for vector, result in zip(vectors, got, strict=True):
            _same_bits(np.asarray(result), _standardise(vector))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_candidates_pooled_with_calibration_papers_score_as_alone(
    papers: list[Paper], index: CorpusIndex, data: st.DataObject
) -> None:
    """A digest's candidates computed together with its calibration papers (the first rows of
    one pool) get the scores and levels a pool of the candidates alone gives, to the bit, and
    so do the calibration's scores."""
    profile, candidates, config = data.draw(pools([p.id for p in papers]))
    model = _model_for(index, profile, config, None, None)
    if model is None:
        return
    rows = index.rows(candidates)
    calib = index.rows(_calibration_papers(index, model, candidates))
    alone = _Pool(index, model, rows)
    together = _Pool(index, model, np.concatenate([rows, calib])).prefix(len(rows))
    scores = _pool_scores(index, model, alone)
    _same_bits(_pool_scores(index, model, together), scores)
    for kind in ("positives", "negatives"):
        for mine, theirs in zip(getattr(together, kind)(), getattr(alone, kind)(), strict=True):
            if theirs is not None:
                _same_bits(np.ascontiguousarray(mine), theirs)
    if len(calib):
        assert together.extended(calib) is together._whole
        _same_bits(_pool_scores(index, model, together.extended(calib)),
                   _pool_scores(index, model, alone.extended(calib)))
    assert _levels(index, together, candidates, scores) == \
        _levels(index, alone, candidates, scores)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_shared_profile_is_ranked_once_and_reused(
    papers: list[Paper], data: st.DataObject
) -> None:
    """Profiles without feedback (a first digest) with equal fields get the items ranking them
    alone gives, the second one from the memo; a profile with feedback is never reused."""
    ids = [p.id for p in papers]
    index = CorpusIndex.fit(papers)
    alone = CorpusIndex.fit(papers)
    alone.limit_memo(similarity_bytes=SIMILARITY_MEMO_BYTES, phrase_bytes=PHRASE_MEMO_BYTES,
                     result_entries=0)
    interests = data.draw(st.lists(st.sampled_from(PHRASES), max_size=3, unique=True))
    seeds = data.draw(st.lists(st.sampled_from(ids), max_size=2, unique=True))
    candidates = data.draw(st.lists(st.sampled_from(ids), min_size=1, max_size=60, unique=True))
    limit = data.draw(st.integers(1, 12))
    config = RankingConfig(explore_fraction=data.draw(st.sampled_from((0.0, 0.2))))

    def profile(**feedback: tuple[str, ...]) -> Profile:  # new objects each time
        return Profile(interests=tuple(f"{p}" for p in interests),
                       seed_papers=tuple(seeds), **feedback)

    expected = rank(alone, profile(), candidates, limit=limit, settings=config)
    assert rank(index, profile(), candidates, limit=limit, settings=config) == expected
    assert index.shared_results_reused() == 0
    assert rank(index, profile(), list(candidates), limit=limit, settings=config) == expected
    assert index.shared_results_reused() == 1
    liked = profile(liked=(ids[0],))
    for _ in range(2):
        assert rank(index, liked, candidates, limit=limit, settings=config) == \
            rank(alone, liked, candidates, limit=limit, settings=config)
    assert index.shared_results_reused() == 1 and alone.shared_results_reused() == 0


def test_the_shared_rankings_are_bounded(papers: list[Paper]) -> None:
    index = CorpusIndex.fit(papers)
    index.limit_memo(similarity_bytes=SIMILARITY_MEMO_BYTES, phrase_bytes=PHRASE_MEMO_BYTES,
                     result_entries=2)
    candidates = [p.id for p in papers[:40]]
    for phrase in (PHRASES[0], PHRASES[1], PHRASES[2], PHRASES[2], PHRASES[0]):
        rank(index, Profile(interests=(phrase,)), candidates, limit=5)
    assert index.shared_results_reused() == 1  # the third phrase again; the first was dropped


def test_a_profile_fingerprint_follows_its_fields_not_its_objects() -> None:
    fields = {"liked": ("a", "b"), "skipped": ("c",), "unrated": ("d", "e"),
              "interests": ("graph networks",), "seed_papers": ("2401.00001",),
              "ages": (("a", 3), ("d", 40)), "seed_texts": (("T", "An abstract."),)}
    profile = Profile(**fields)
    copied = Profile(**{k: tuple("".join(x) if isinstance(x, str) else x for x in v)
                        for k, v in fields.items()})
    assert profile.fingerprint() == copied.fingerprint()
    seen = {profile.fingerprint()}
    for name, value in fields.items():
        changed = Profile(**{**fields, name: value[:-1]})
        seen.add(changed.fingerprint())
    seen.add(Profile(**{**fields, "ages": (("a", 3), ("d", 41))}).fingerprint())
    seen.add(Profile(**{**fields, "liked": ("b", "a")}).fingerprint())
    assert len(seen) == len(fields) + 3


def _positives_column_by_column(pool: _Pool) -> tuple[np.ndarray, np.ndarray | None]:
    """A pool's positive similarities as the general path computes them: the named points in
    one gather, each phrase through its postings row, every own point's topic in one product."""
    index, model, rows = pool.index, pool.model, pool.rows
    named = model.pos_rows >= 0
    spec = np.empty((len(rows), len(model.pos_rows)), dtype=np.float32)
    topic = np.empty_like(spec) if index.topic is not None else None
    got_spec, got_topic = index.direct_similarities(rows, model.pos_rows[named])
    spec[:, named] = got_spec
    own = np.flatnonzero(~named)
    for k, phrase in enumerate(model.own_phrase):
        assert phrase is not None
        spec[:, own[k]] = index.postings_products(rows, model.own_specific[k])
    if topic is not None and got_topic is not None and model.own_topic is not None:
        topic[:, named] = got_topic
        topic[:, own] = _topic_products(index.topic[rows], model.own_topic)
    return spec, topic


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_interest_blocks_are_the_column_by_column_similarities(
    papers: list[Paper], index: CorpusIndex, data: st.DataObject
) -> None:
    """A model of interests only reads each phrase's block of similarities, computed once per
    set of papers and then kept: the floats the general path computes, first time and next."""
    ids = [p.id for p in papers]
    interests = data.draw(st.lists(st.sampled_from(PHRASES), min_size=1, max_size=4,
                                   unique=True))
    candidates = data.draw(st.lists(st.sampled_from(ids), min_size=1, max_size=60, unique=True))
    model = _model_for(index, Profile(interests=tuple(interests)), RankingConfig(), None, None)
    if model is None:
        return
    rows = index.rows(candidates)
    expected = _positives_column_by_column(_Pool(index, model, rows))
    for _ in range(2):  # computed, then read from the memo
        for got, want in zip(_Pool(index, model, rows).positives(), expected, strict=True):
            if want is None:
                assert got is None
            else:
                _same_bits(np.asarray(got), want)
