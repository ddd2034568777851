"""Every signal at its own strength: skips over unrated papers, unrated_weight, feedback ages,
library entries as positives, relevance levels and honest reasons, on the real sample papers."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest
import time_machine
from hypothesis import given, settings
from hypothesis import strategies as st

from digest.config import RankingConfig, Subscriber
from digest.paper import Paper
from digest.rank import (
    LEVELS,
    CorpusIndex,
    Profile,
    build_profile,
    explain,
    levels_for,
    rank,
    recency,
    score_candidates,
)
from digest.store import ItemRow, LibraryEntry, Store, utc_now

from .helpers import sample_papers

NO_EXPLORE = RankingConfig(explore_fraction=0.0)
LIKED = ("Pareto Domain Adaptation",
         "Unknown Domain Inconsistency Minimization for Domain Generalization")
NEGATIVE = ("Large Language Model Alignment: A Survey",
            "DeAL: Decoding-time Alignment for Large Language Models",
            "Aligning Large Language Models with Human: A Survey")


@pytest.fixture(scope="module")
def papers() -> list[Paper]:
    return sample_papers()


@pytest.fixture(scope="module")
def index(papers: list[Paper]) -> CorpusIndex:
    return CorpusIndex.fit(papers)


def ids(papers: list[Paper], titles: tuple[str, ...]) -> tuple[str, ...]:
    by_title = {p.title: p.id for p in papers}
    return tuple(by_title[t] for t in titles)


def order(index: CorpusIndex, profile: Profile, candidates: list[str],
          settings: RankingConfig = NO_EXPLORE) -> list[str]:
    return [r.paper_id for r in rank(index, profile, candidates, limit=len(candidates),
                                     settings=settings)]


def test_a_skip_weighs_more_than_the_same_paper_left_unrated(
        papers: list[Paper], index: CorpusIndex) -> None:
    liked, negative = ids(papers, LIKED), ids(papers, NEGATIVE)
    candidates = [p.id for p in papers if p.id not in set(liked) | set(negative)]
    skipped = score_candidates(index, Profile(liked=liked, skipped=negative), candidates,
                               settings=NO_EXPLORE)
    unrated = score_candidates(index, Profile(liked=liked, unrated=negative), candidates,
                               settings=NO_EXPLORE)
    assert order(index, Profile(liked=liked, skipped=negative), candidates) != \
        order(index, Profile(liked=liked, unrated=negative), candidates)
    # Papers that resemble the negatives lose more when they were skipped.
    alignment = [i for i, c in enumerate(candidates) if "align" in index.paper(c).title.lower()]
    assert alignment
    assert (skipped[alignment] - unrated[alignment]).mean() < 0


def test_unrated_weight_changes_the_order_when_all_negatives_are_unrated(
        papers: list[Paper], index: CorpusIndex) -> None:
    liked, negative = ids(papers, LIKED), ids(papers, NEGATIVE)
    candidates = [p.id for p in papers if p.id not in set(liked) | set(negative)]
    profile = Profile(liked=liked, unrated=negative)
    none = order(index, profile, candidates, RankingConfig(unrated_weight=0.0,
                                                           explore_fraction=0.0))
    full = order(index, profile, candidates, RankingConfig(unrated_weight=1.0,
                                                           explore_fraction=0.0))
    assert none != full
    # Weight 0: the unrated papers count for nothing, as if never shown.
    assert none == order(index, Profile(liked=liked), candidates)


def test_old_feedback_counts_less_than_last_weeks(papers: list[Paper],
                                                  index: CorpusIndex) -> None:
    domain = ids(papers, LIKED[:1])
    alignment = ids(papers, NEGATIVE[:1])
    liked = domain + alignment
    candidates = [p.id for p in papers if p.id not in liked]
    old_domain = Profile(liked=liked, ages=((domain[0], 720), (alignment[0], 3)))
    old_alignment = Profile(liked=liked, ages=((domain[0], 3), (alignment[0], 720)))
    top_a = [index.paper(i).title.lower() for i in order(index, old_domain, candidates)[:5]]
    top_b = [index.paper(i).title.lower() for i in order(index, old_alignment, candidates)[:5]]
    assert sum("align" in t for t in top_a) > sum("align" in t for t in top_b)
    assert sum("domain" in t for t in top_b) > sum("domain" in t for t in top_a)


def test_recency_halves_per_half_life() -> None:
    assert recency(None, 180) == 1.0
    assert recency(0, 180) == 1.0
    assert recency(180, 180) == pytest.approx(0.5)
    assert recency(360, 180) == pytest.approx(0.25)


def test_a_library_entry_outside_the_corpus_is_a_positive(papers: list[Paper],
                                                          index: CorpusIndex) -> None:
    entry = ("Bridging source and target domains without labels",
             ("We adapt a classifier trained on a labelled source domain to an unlabelled "
             "target domain by aligning feature distributions across domains (domain "
             "adaptation, domain shift, transfer)."))
    candidates = [p.id for p in papers]
    ranked = rank(index, Profile(seed_texts=(entry,)), candidates, limit=5, settings=NO_EXPLORE)
    assert "domain" in index.paper(ranked[0].paper_id).title.lower()
    assert any(r.reason.endswith("in your library") for r in ranked)


def test_levels_are_monotone_in_the_score(papers: list[Paper], index: CorpusIndex) -> None:
    liked, negative = ids(papers, LIKED), ids(papers, NEGATIVE)
    candidates = [p.id for p in papers if p.id not in set(liked) | set(negative)]
    for profile in (Profile(liked=liked, skipped=negative), Profile(liked=liked[:1]),
                    Profile(interests=("language model alignment",))):
        ranked = rank(index, profile, candidates, limit=len(candidates), settings=NO_EXPLORE)
        levels = [LEVELS.index(r.level) for r in ranked if r.level is not None]
        assert len(levels) == len(ranked)
        assert levels == sorted(levels), "a higher score never gets a lower level"
        assert levels[0] < LEVELS.index("weak") or profile.interests
        assert levels[-1] == LEVELS.index("weak")
    assert all(r.level is None for r in rank(index, Profile(), candidates, limit=5))


def test_weak_evidence_never_names_a_liked_paper(papers: list[Paper],
                                                 index: CorpusIndex) -> None:
    liked = ids(papers, LIKED)
    candidates = [p.id for p in papers if p.id not in liked]
    profile = Profile(liked=liked)
    ranked = rank(index, profile, candidates, limit=10, settings=NO_EXPLORE)
    for item in ranked:
        exp = explain(index, profile, item.paper_id, candidates=candidates, limit=10,
                      settings=NO_EXPLORE)
        best = exp.nearest_liked[0].similarity if exp.nearest_liked else 0.0
        if item.reason.startswith("close to"):
            assert best >= 0.2
        else:
            assert best < 0.2 and item.reason.startswith("weak match")
    assert any(not r.reason.startswith("close to") for r in ranked)
    few = [c for c in candidates if "align" in index.paper(c).title.lower()][:4]
    short = rank(index, profile, few, limit=10, settings=NO_EXPLORE)
    assert len(short) == 4
    assert all(r.reason == "filling: only 4 new papers today" for r in short)


def test_explain_says_left_unrated_and_how_the_level_was_set(
        papers: list[Paper], index: CorpusIndex) -> None:
    liked, negative = ids(papers, LIKED), ids(papers, NEGATIVE)
    candidates = [p.id for p in papers if p.id not in set(liked) | set(negative)]
    profile = Profile(liked=liked, unrated=negative)
    target = next(c for c in candidates if "align" in index.paper(c).title.lower())
    exp = explain(index, profile, target, candidates=candidates, settings=NO_EXPLORE)
    assert exp.nearest_skipped == ()
    assert {n.paper_id for n in exp.nearest_unrated} <= set(negative)
    assert exp.nearest_unrated
    assert exp.level in LEVELS
    assert "your own papers" in exp.level_method
    levels = levels_for(index, profile, candidates, settings=NO_EXPLORE)
    assert levels is not None and levels.strong >= levels.good


def test_build_profile_reads_ages_library_and_unrated(tmp_path, papers: list[Paper]) -> None:
    sub = Subscriber("ann@example.org", "Ann", seed_papers=("2401.00001",))
    with Store(tmp_path / "state.sqlite3") as store:
        store.add_dump("d1", "d1", "page", papers[:12])
        row = store.claim_digest(
            subscriber=sub.email, local_date=utc_now().date(), token="t1", message_id="<m1>",
            considered=12, corpus_seq=store.corpus_seq(), message=b"x",
            items=[ItemRow(i + 1, p.id, 1.0, "r", False) for i, p in enumerate(papers[:3])])
        assert row is not None
        store.mark_sent(row.id)
        store.add_feedback(sub.email, papers[0].id, "like", source="reply", digest_id=row.id)
        store.add_feedback(sub.email, papers[1].id, "skip", source="reply", digest_id=row.id)
        store.add_library_entries(sub.email, [
            LibraryEntry("A paper not stored", "An abstract about graphs."),
            LibraryEntry("", "", "2501.12345"),
        ], source="import")
        with time_machine.travel(utc_now() + timedelta(days=30), tick=False):
            profile = build_profile(store, sub)
    assert profile.liked == (papers[0].id,) and profile.skipped == (papers[1].id,)
    assert profile.unrated == (papers[2].id,)
    assert dict(profile.ages) == {papers[0].id: 30, papers[1].id: 30, papers[2].id: 30}
    assert profile.seed_texts == (("A paper not stored", "An abstract about graphs."),)
    assert set(profile.seed_papers) == {"2401.00001", "A paper not stored", "2501.12345"}


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-50, 50, allow_nan=False), min_size=1, max_size=30))
def test_level_thresholds_order_any_scores(scores: list[float]) -> None:
    from digest.rank import Levels

    levels = Levels(strong=5.0, good=-1.0, method="test")
    ordered = sorted(scores, reverse=True)
    ranks = [LEVELS.index(levels.level(s)) for s in ordered]
    assert ranks == sorted(ranks)
    assert np.all(np.diff(ranks) >= 0)
