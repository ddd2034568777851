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
    CorpusIndex,
    Profile,
    UnknownPaper,
    _best_positive,
    _days_since,
    _evidence_weights,
    _familiarity,
    _model_for,
    _Pool,
    _pool_scores,
    _positive_similarities,
    _signal_ages,
    _standardise,
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
