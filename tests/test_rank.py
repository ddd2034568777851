"""Ranking: the learned model on real sample papers, exploration, the model cache,
determinism, and the benchmark's metric code on hand-computed cases."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest

from digest.bench.quality import (
    DatasetError,
    case_metrics,
    expected_random_ndcg,
    format_table,
    load_dataset,
    ndcg_at,
    ranked_relevance,
    recall_at,
    reciprocal_rank,
    roc_auc,
    run_quality,
)
from digest.config import RankingConfig
from digest.dumps import parse_file
from digest.errors import DigestError
from digest.paper import Paper
from digest.rank import (
    CorpusIndex,
    ModelCache,
    Profile,
    UnknownPaper,
    explain,
    explain_top,
    explore_slots,
    is_personalised,
    rank,
    score_candidates,
)

from .helpers import SHARED, sample_dumps

CITEULIKE = SHARED / "bench" / "datasets" / "citeulike-public"
NO_EXPLORE = RankingConfig(explore_fraction=0.0)

# Two topics of the real sample dumps (titles as listed on Mar 11/12).
DOMAIN_ADAPTATION_LIKED = (
    "Pareto Domain Adaptation",
    "Unknown Domain Inconsistency Minimization for Domain Generalization",
    "Memory-Assisted Sub-Prototype Mining for Universal Domain Adaptation",
)
LLM_ALIGNMENT_SKIPPED = (
    "Large Language Model Alignment: A Survey",
    "DeAL: Decoding-time Alignment for Large Language Models",
    "Aligning Large Language Models with Human: A Survey",
)


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"needs {path} (the shared folder beside the checkout), absent here")
    return path


@pytest.fixture(scope="module")
def dumps() -> list[list[Paper]]:
    """The papers of each real sample dump (bundled in examples/inbox), in listing order."""
    return [parse_file(path).papers for path in sample_dumps()]


@pytest.fixture(scope="module")
def papers(dumps: list[list[Paper]]) -> list[Paper]:
    return list({p.id: p for dump in dumps for p in dump}.values())


@pytest.fixture(scope="module")
def index(papers: list[Paper]) -> CorpusIndex:
    return CorpusIndex.fit(papers)


def _by_title(papers: list[Paper], title: str) -> str:
    [found] = [p.id for p in papers if p.title == title]
    return found


def _domain_adaptation(p: Paper) -> bool:
    t = p.title.lower()
    return "domain adaptation" in t or "domain generalization" in t


def _llm_alignment(p: Paper) -> bool:
    t = p.title.lower()
    return ("align" in t) and ("language model" in t or "llm" in t)


# --- the model on real papers ------------------------------------------------------


def test_likes_promote_one_topic_and_skips_demote_another(
    papers: list[Paper], index: CorpusIndex
) -> None:
    liked = tuple(_by_title(papers, t) for t in DOMAIN_ADAPTATION_LIKED)
    skipped = tuple(_by_title(papers, t) for t in LLM_ALIGNMENT_SKIPPED)
    rated = set(liked) | set(skipped)
    topic_a = [p.id for p in papers if _domain_adaptation(p) and p.id not in rated]
    topic_b = [p.id for p in papers if _llm_alignment(p) and p.id not in rated]
    assert len(topic_a) >= 5 and len(topic_b) >= 5
    candidates = [p.id for p in papers if p.id not in rated]

    ranked = rank(
        index,
        Profile(liked=liked, skipped=skipped),
        candidates,
        limit=len(candidates),
        settings=NO_EXPLORE,
    )
    position = {r.paper_id: i for i, r in enumerate(ranked)}
    worst_a = max(position[p] for p in topic_a)
    best_b = min(position[p] for p in topic_b)
    assert worst_a < best_b, (
        "every domain-adaptation paper should rank above every LLM-alignment paper"
    )
    assert "domain" in index.paper(ranked[0].paper_id).title.lower()
    assert ranked[0].reason.startswith('close to "') and ranked[0].reason.endswith("you liked")


def test_skips_push_their_topic_down(papers: list[Paper], index: CorpusIndex) -> None:
    liked = tuple(_by_title(papers, t) for t in DOMAIN_ADAPTATION_LIKED)
    skipped = tuple(_by_title(papers, t) for t in LLM_ALIGNMENT_SKIPPED)
    candidates = [p.id for p in papers if p.id not in set(liked) | set(skipped)]
    topic_b = [p.id for p in papers if _llm_alignment(p) and p.id in candidates]

    def mean_position(profile: Profile) -> float:
        order = [
            r.paper_id
            for r in rank(index, profile, candidates, limit=len(candidates), settings=NO_EXPLORE)
        ]
        return float(np.mean([order.index(p) for p in topic_b]))

    assert mean_position(Profile(liked=liked, skipped=skipped)) > mean_position(
        Profile(liked=liked)
    )


def test_a_skip_alone_demotes_its_neighbours(papers: list[Paper], index: CorpusIndex) -> None:
    skipped = tuple(_by_title(papers, t) for t in LLM_ALIGNMENT_SKIPPED)
    candidates = [p.id for p in papers if p.id not in skipped]
    topic_b = {p.id for p in papers if _llm_alignment(p)} - set(skipped)
    ranked = rank(index, Profile(skipped=skipped), candidates, limit=10, settings=NO_EXPLORE)
    assert not topic_b & {r.paper_id for r in ranked}


def test_an_interest_phrase_is_a_cold_start(papers: list[Paper], index: CorpusIndex) -> None:
    candidates = [p.id for p in papers]
    profile = Profile(interests=("domain adaptation",))
    ranked = rank(index, profile, candidates, limit=5, settings=NO_EXPLORE)
    titles = [index.paper(r.paper_id).title.lower() for r in ranked]
    assert all("domain" in t or "adapt" in t for t in titles), titles
    assert ranked[0].reason == 'matches your interest "domain adaptation"'


def test_separate_interests_each_count(papers: list[Paper], index: CorpusIndex) -> None:
    liked = (
        _by_title(papers, "Pareto Domain Adaptation"),
        _by_title(papers, "Large Language Model Alignment: A Survey"),
    )
    profile = Profile(liked=liked, interests=("diffusion models",))
    candidates = [p.id for p in papers if p.id not in liked]
    reasons = {r.reason for r in rank(index, profile, candidates, limit=10) if not r.explore}
    assert reasons == {
        'close to "Pareto Domain Adaptation" you liked',
        'close to "Large Language Model Alignment: A Survey" you liked',
        'matches your interest "diffusion models"',
    }


def test_an_interest_with_no_known_word_changes_nothing(dumps: list[list[Paper]]) -> None:
    listing = dumps[0]
    index = CorpusIndex.fit(listing)
    candidates = [p.id for p in listing]
    profile = Profile(interests=("xyzzy plugh",))
    ranked = rank(index, profile, candidates, limit=5)
    assert [r.paper_id for r in ranked] == [
        r.paper_id for r in rank(index, Profile(), candidates, limit=5)
    ]
    assert explain(index, profile, candidates[0], candidates=candidates).interests == (
        ("xyzzy plugh", -1.0),
    )


def test_seed_papers_resolve_by_title_and_unknown_ones_are_logged(
    papers: list[Paper], index: CorpusIndex, caplog: pytest.LogCaptureFixture
) -> None:
    seed_title = "Domain-Adversarial Training of Neural Networks"
    candidates = [p.id for p in papers if p.title != seed_title]
    profile = Profile(seed_papers=(seed_title.upper(), "2401.99999"))
    with caplog.at_level(logging.INFO, logger="digest.rank"):
        ranked = rank(index, profile, candidates, limit=3, settings=NO_EXPLORE)
    assert "2401.99999" in caplog.text and "pending" in caplog.text
    assert ranked[0].reason.endswith("your seed paper")
    assert (
        _domain_adaptation(index.paper(ranked[0].paper_id))
        or "domain" in index.paper(ranked[0].paper_id).title.lower()
    )


def test_no_feedback_keeps_the_listing_order(dumps: list[list[Paper]]) -> None:
    listing = dumps[0]
    index = CorpusIndex.fit(listing)
    candidates = [p.id for p in reversed(listing)]  # the store's order need not be the listing's
    ranked = rank(index, Profile(), candidates, limit=10)
    expected = [p.id for p in sorted(listing, key=lambda p: p.listing_rank or 0)][:10]
    assert [r.paper_id for r in ranked] == expected
    # An unpersonalised digest is the listing's order: there is no profile to explore from.
    assert not any(r.explore for r in ranked)
    assert ranked[0].reason == "#1 in today's listing"
    assert not is_personalised(Profile())


def test_no_feedback_puts_upvotes_first(dumps: list[list[Paper]]) -> None:
    listing = [dataclasses.replace(p, upvotes=None) for p in dumps[0]]
    listing[7] = dataclasses.replace(listing[7], upvotes=40)
    listing[3] = dataclasses.replace(listing[3], upvotes=12)
    index = CorpusIndex.fit(listing)
    ranked = rank(index, Profile(), [p.id for p in listing], limit=4)
    assert [r.paper_id for r in ranked] == [
        listing[7].id,
        listing[3].id,
        listing[0].id,
        listing[1].id,
    ]
    assert ranked[0].reason == "popular today (40 upvotes)"


def test_without_upvotes_or_listing_rank_candidate_order_stands(papers: list[Paper]) -> None:
    plain = [dataclasses.replace(p, upvotes=None, listing_rank=None) for p in papers[:20]]
    index = CorpusIndex.fit(plain)
    candidates = [p.id for p in plain][::-1]
    assert [r.paper_id for r in rank(index, Profile(), candidates, limit=20)] == candidates


# --- exploration --------------------------------------------------------------------


def test_one_slot_in_ten_explores_by_default(papers: list[Paper], index: CorpusIndex) -> None:
    liked = tuple(_by_title(papers, t) for t in DOMAIN_ADAPTATION_LIKED)
    candidates = [p.id for p in papers if p.id not in liked]
    ranked = rank(
        index,
        Profile(liked=liked),
        candidates,
        limit=10,
        settings=RankingConfig(explore_fraction=0.1),
    )
    explore = [r for r in ranked if r.explore]
    assert len(ranked) == 10 and len(explore) == 1
    assert ranked[-1].explore and ranked[-1].reason.startswith("explore")
    model_top = [
        r.paper_id
        for r in rank(index, Profile(liked=liked), candidates, limit=9, settings=NO_EXPLORE)
    ]
    assert [r.paper_id for r in ranked[:9]] == model_top
    assert explore[0].paper_id not in model_top


def test_exploration_zero_is_off(papers: list[Paper], index: CorpusIndex) -> None:
    liked = tuple(_by_title(papers, t) for t in DOMAIN_ADAPTATION_LIKED)
    ranked = rank(
        index, Profile(liked=liked), [p.id for p in papers], limit=10, settings=NO_EXPLORE
    )
    assert len(ranked) == 10 and not any(r.explore for r in ranked)


def test_explore_slot_count() -> None:
    assert explore_slots(10, 0.1) == 1
    assert explore_slots(20, 0.1) == 2
    assert explore_slots(5, 0.1) == 1  # at least one from five papers on
    assert explore_slots(3, 0.1) == 0
    assert explore_slots(10, 0.0) == 0
    assert explore_slots(4, 0.9) == 3  # never the whole digest


# --- determinism and the cache ---------------------------------------------------------


def test_same_state_gives_the_same_digest(papers: list[Paper], index: CorpusIndex) -> None:
    liked = tuple(_by_title(papers, t) for t in DOMAIN_ADAPTATION_LIKED)
    profile = Profile(
        liked=liked, skipped=tuple(_by_title(papers, t) for t in LLM_ALIGNMENT_SKIPPED)
    )
    candidates = [p.id for p in papers if p.id not in set(profile.liked) | set(profile.skipped)]
    first = rank(index, profile, candidates, limit=10)
    again = rank(index, profile, candidates, limit=10)
    refitted = rank(CorpusIndex.fit(papers), profile, candidates, limit=10)
    assert first == again
    assert [r.paper_id for r in refitted] == [r.paper_id for r in first]
    assert CorpusIndex.fit(papers).vocabulary_key == index.vocabulary_key


def test_equal_scores_keep_candidate_order(papers: list[Paper], index: CorpusIndex) -> None:
    liked = (_by_title(papers, DOMAIN_ADAPTATION_LIKED[0]),)
    twin = [p for p in papers if p.id != liked[0]][:1] * 1
    candidates = [twin[0].id, twin[0].id]  # a repeated id counts once
    assert [r.paper_id for r in rank(index, Profile(liked=liked), candidates, limit=5)] == [
        twin[0].id
    ]


def test_cache_refits_only_when_feedback_or_vocabulary_change(
    papers: list[Paper], index: CorpusIndex
) -> None:
    cache = ModelCache()
    liked = tuple(_by_title(papers, t) for t in DOMAIN_ADAPTATION_LIKED)
    candidates = [p.id for p in papers if p.id not in liked]
    profile = Profile(liked=liked[:2])
    first = rank(index, profile, candidates, limit=10, cache=cache, key="alice@example.org")
    assert cache.fits == 1
    second = rank(index, profile, candidates, limit=10, cache=cache, key="alice@example.org")
    score_candidates(index, profile, candidates, cache=cache, key="alice@example.org")
    assert cache.fits == 1 and first == second

    rank(index, Profile(liked=liked), candidates, limit=10, cache=cache, key="alice@example.org")
    assert cache.fits == 2  # a new like
    rank(index, Profile(liked=liked), candidates, limit=10, cache=cache, key="bob@example.org")
    assert cache.fits == 3  # another subscriber has a model of their own
    grown = CorpusIndex.fit(
        papers
        + [Paper(id="t:new", title="Quantum error correction codes", abstract="Surface codes.")]
    )
    assert grown.vocabulary_key != index.vocabulary_key
    rank(grown, Profile(liked=liked), candidates, limit=10, cache=cache, key="alice@example.org")
    assert cache.fits == 4  # the vocabulary changed
    assert len(cache) == 2


def test_unknown_candidates_are_dropped_and_scores_need_known_ids(
    papers: list[Paper], index: CorpusIndex
) -> None:
    ranked = rank(index, Profile(), ["nope", papers[0].id], limit=5)
    assert [r.paper_id for r in ranked] == [papers[0].id]
    with pytest.raises(UnknownPaper):
        score_candidates(index, Profile(liked=(papers[1].id,)), ["nope"])
    assert isinstance(UnknownPaper("x"), DigestError)


def test_scores_are_finite_for_tiny_and_degenerate_corpora() -> None:
    tiny = [
        Paper(id="a", title="Alpha", abstract=""),
        Paper(id="b", title="the of and", abstract=""),
    ]
    index = CorpusIndex.fit(tiny)
    scores = score_candidates(index, Profile(liked=("a",)), ["a", "b"])
    assert np.all(np.isfinite(scores))
    assert rank(CorpusIndex.fit([]), Profile(), [], limit=3) == []


# --- explanations ---------------------------------------------------------------------


def test_explain_names_shared_terms_and_nearest_liked(
    papers: list[Paper], index: CorpusIndex
) -> None:
    liked = tuple(_by_title(papers, t) for t in DOMAIN_ADAPTATION_LIKED)
    candidates = [p.id for p in papers if p.id not in liked]
    top = explain_top(index, Profile(liked=liked), candidates, 3, settings=NO_EXPLORE)
    assert [e.position for e in top] == [1, 2, 3]
    first = top[0]
    assert first.nearest_liked and first.nearest_liked[0].paper_id in liked
    assert any("domain" in term for term, _ in first.shared_terms)
    alone = explain(
        index, Profile(liked=liked), first.paper_id, candidates=candidates, settings=NO_EXPLORE
    )
    assert alone.position == 1 and math.isclose(alone.score, first.score)
    assert str(alone).startswith(f"{alone.reason} (score ") and "nearest liked:" in str(alone)


def test_explain_places_a_paper_outside_the_digest_by_model_order(
    papers: list[Paper], index: CorpusIndex
) -> None:
    liked = tuple(_by_title(papers, t) for t in DOMAIN_ADAPTATION_LIKED)
    candidates = [p.id for p in papers if p.id not in liked]
    scores = score_candidates(index, Profile(liked=liked), candidates, settings=NO_EXPLORE)
    last = candidates[int(np.argsort(-scores, kind="stable")[-1])]
    far = explain(index, Profile(liked=liked), last, candidates=candidates, limit=10)
    assert far.position == len(candidates) and not far.explore
    # Without a candidate list a paper is placed among the papers of its listing day.
    day = explain(index, Profile(liked=liked), candidates[0])
    assert day.position is not None and 1 <= day.position <= len(papers)


# --- the benchmark's metrics -----------------------------------------------------------


def test_metrics_on_a_hand_computed_order() -> None:
    # Final order: r n r n n (relevant at ranks 1 and 3).
    rel = np.array([True, False, True, False, False])
    assert math.isclose(ndcg_at(rel), (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3)))
    assert recall_at(rel) == 1.0 and recall_at(rel, 2) == 0.5
    assert reciprocal_rank(rel) == 1.0
    assert reciprocal_rank(np.array([False, False, True])) == pytest.approx(1 / 3)
    # pairs (relevant, non-relevant): rank1 beats 3 of 3, rank3 beats 2 of 3
    assert roc_auc(rel) == pytest.approx(5 / 6)


def test_ties_are_broken_by_candidate_order() -> None:
    relevant_last = [False, False, True]
    assert list(ranked_relevance([0.0, 0.0, 0.0], relevant_last)) == [False, False, True]
    metrics = case_metrics([0.0, 0.0, 0.0], relevant_last)
    assert metrics["mrr"] == pytest.approx(1 / 3) and metrics["auc"] == 0.0
    assert case_metrics([1.0, 5.0, 5.0], relevant_last)["mrr"] == pytest.approx(1 / 2)


def test_a_perfect_and_a_reversed_ranking() -> None:
    relevant = [True, True, False, False]
    best = case_metrics([4, 3, 2, 1], relevant)
    worst = case_metrics([1, 2, 3, 4], relevant)
    assert best == {"ndcg@10": 1.0, "recall@10": 1.0, "mrr": 1.0, "auc": 1.0}
    assert worst["auc"] == 0.0 and worst["mrr"] == pytest.approx(1 / 3)


def test_a_broken_line_names_its_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "meta.json").write_text(json.dumps({"name": "tiny"}))
    paper = {"id": "1", "title": "A", "abstract": "", "date": None}
    (tmp_path / "papers.jsonl").write_text(json.dumps(paper) + "\n{not json\n")
    (tmp_path / "cases.jsonl").write_text("")
    with pytest.raises(DatasetError) as caught:
        load_dataset(tmp_path)
    assert str(caught.value).startswith(f"{tmp_path / 'papers.jsonl'}:2: ")
    assert isinstance(caught.value, DigestError)


def test_a_case_breaking_the_format_is_refused(tmp_path: Path) -> None:
    (tmp_path / "meta.json").write_text(json.dumps({"name": "tiny"}))
    rows = [
        {"id": str(i), "title": f"Paper {i}", "abstract": "", "date": "2025-03-01"}
        for i in range(4)
    ]
    (tmp_path / "papers.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    case = {
        "case": "c",
        "user": "u",
        "liked": ["0"],
        "skipped": [],
        "candidates": ["1", "2"],
        "relevant": ["3"],
    }
    (tmp_path / "cases.jsonl").write_text(json.dumps(case) + "\n")
    with pytest.raises(DatasetError, match=r"cases.jsonl:1: 'relevant' must be a subset"):
        load_dataset(tmp_path)


def test_the_benchmark_table_says_exploration_is_off() -> None:
    result = {
        "dataset": "d", "ranker": "model", "max_liked": 1, "ndcg@10": 0.5, "recall@10": 0.5,
        "mrr": 0.5, "auc": 0.5, "cases": 3, "cases_per_s": 300.0, "fit_seconds": 1.0,
        "seconds": 2.0,
    }  # fmt: skip
    table = format_table(result)
    assert "exploration slots off" in table and "max liked 1" in table


def test_a_random_ranker_on_citeulike_scores_about_0_077() -> None:
    dataset = _require(CITEULIKE)
    result = run_quality(dataset, max_liked=None, progress=False, ranker="random")
    expected = expected_random_ndcg(load_dataset(dataset))
    assert expected == pytest.approx(0.077, abs=0.002)
    assert result["ndcg@10"] == pytest.approx(expected, abs=0.003)
    assert result["ndcg@10"] == pytest.approx(0.077, abs=0.004)
    assert result["auc"] == pytest.approx(0.5, abs=0.02)
    assert "checks the metric code" in format_table(result)
