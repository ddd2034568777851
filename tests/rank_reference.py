"""A frozen copy of the ranking model as it was before issue 13 (commit ab698ab).

The scoring, levels, reasons and exploration of ``digest.rank`` computed the
direct way (sparse products per subscriber, a phrase matched through
``TruncatedSVD.transform`` on every call), kept only so tests can check that
the memoised computation ranks exactly as this one does. Not used by the
product; do not "fix" it: it is the reference.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import sparse

from digest.config import RankingConfig
from digest.paper import Paper, normalise_title
from digest.rank import (
    CALIBRATION_MIN,
    CALIBRATION_PAPERS,
    CENTRALITY_PENALTY,
    COHESION_BROAD,
    COHESION_NARROW,
    DEFAULT_SETTINGS,
    FEEDBACK_TOP,
    FEEDBACK_WEIGHT_BROAD,
    NEGATIVE_WEIGHT,
    PHRASE_MATCHES,
    REASON_MIN_SIMILARITY,
    SPECIFIC_IDF_POWER,
    SPREAD_NOISE,
    STRONG_SIMILARITY,
    TITLE_REPEATS,
    TOPIC_MAX_SHARE,
    TOPIC_WEIGHT_BROAD,
    TOPIC_WEIGHT_NARROW,
    CorpusIndex,
    Levels,
    Profile,
    Ranked,
    _multi_scale,
    _unit_rows,
    explore_slots,
    is_personalised,
    recency,
)

log = logging.getLogger(__name__)


def _text_vectors(index: CorpusIndex, text: str) -> tuple[sparse.csr_matrix, np.ndarray | None]:
    weighted = index.vectorizer.transform([text]).astype(np.float32)
    specific = _unit_rows(weighted @ sparse.diags(index._idf ** (SPECIFIC_IDF_POWER - 1)))
    if index._svd is None or index._topic_mean is None or weighted.nnz == 0:
        return specific, None
    latent = index._svd.transform(_unit_rows(weighted)) - index._topic_mean
    return specific, _multi_scale(latent, index._scales)


def _phrase_matches(
    index: CorpusIndex, phrase: str
) -> tuple[np.ndarray, sparse.csr_matrix, np.ndarray | None]:
    weighted = index.vectorizer.transform([phrase]).astype(np.float32)
    specific = _unit_rows(weighted @ sparse.diags(index._idf ** (SPECIFIC_IDF_POWER - 1)))
    topic = None
    if index._svd is not None and index._topic_mean is not None:
        latent = index._svd.transform(_unit_rows(weighted)) - index._topic_mean
        topic = _multi_scale(latent, index._scales) * (weighted.nnz > 0)
    shared = _dense(index.specific @ specific.T).ravel()
    sims = shared.copy()
    if index.topic is not None and topic is not None:
        sims = (sims + index.topic @ topic[0]) / 2
    order = np.argsort(-sims, kind="stable")
    rows = order[shared[order] > 0][:PHRASE_MATCHES]
    return rows.astype(np.int64), specific, topic


def _model_for(index: CorpusIndex, profile: Profile, settings: RankingConfig) -> SubscriberModel | None:
    if not is_personalised(profile) and not profile.unrated:
        return None
    model = fit_model(index, profile, settings=settings)
    return model if model.has_positives or model.has_negatives else None


def score_candidates(index: CorpusIndex, profile: Profile, candidates: Sequence[str], *,
                     settings: RankingConfig = DEFAULT_SETTINGS) -> np.ndarray:
    return _scores(index, _model_for(index, profile, settings), candidates)


@dataclass
class SubscriberModel:
    """A subscriber's positives and negatives in both views; fitted once per state."""

    positive_ids: tuple[str, ...]  # liked then seed papers (deduplicated): the first points below
    positive_labels: tuple[str, ...]  # "you liked", "your seed paper", "in your library"
    positive_titles: tuple[str, ...]  # one per named point (library texts have no corpus row)
    interest_phrases: tuple[str, ...]
    pos_rows: np.ndarray  # index row of each positive point, -1 for a phrase's own vector
    pos_phrase: np.ndarray  # which interest phrase a point stands for, -1 for named papers
    pos_specific: sparse.csr_matrix  # one unit row per positive point
    pos_topic: np.ndarray | None
    pos_weights: np.ndarray  # 1 per named paper; an interest's points share 1
    negative_ids: tuple[str, ...]
    neg_specific: sparse.csr_matrix
    neg_topic: np.ndarray | None
    neg_weights: np.ndarray  # recency of each negative (1 = now, 0.5 = one half-life ago)
    neg_skipped: np.ndarray  # True for an explicit skip, False for a paper left unrated
    unrated_weight: float = 1.0  # how much the unrated negatives count against the skips
    unknown_seeds: tuple[str, ...] = ()

    def centroid(self) -> sparse.csr_matrix:
        """1 x terms: the weighted centroid of the positives in the specific view."""
        return sparse.csr_matrix(
            self.pos_weights @ self.pos_specific / max(float(self.pos_weights.sum()), 1e-9)
        )

    @property
    def has_positives(self) -> bool:
        return self.pos_specific.shape[0] > 0

    @property
    def has_negatives(self) -> bool:
        return self.neg_specific.shape[0] > 0


def _known(index: CorpusIndex, ids: Sequence[str], what: str) -> list[str]:
    kept = [i for i in dict.fromkeys(ids) if i in index]
    if len(kept) < len(set(ids)):
        log.debug(
            "profile: %d %s papers are not in the corpus, ignored", len(set(ids)) - len(kept), what
        )
    return kept


def _positive_points(
    index: CorpusIndex,
    papers: list[str],
    recency: np.ndarray,
    texts: Sequence[tuple[str, str]],
    phrases: tuple[str, ...],
) -> tuple[np.ndarray, np.ndarray, sparse.csr_matrix, np.ndarray | None, np.ndarray]:
    """Rows, phrase tags, vectors and weights of every positive point.

    Named papers count their recency each (1 when fresh); a library entry's
    own text counts 1 (it has no corpus row, so its row is -1); an interest
    phrase counts 1 in all, shared by the phrase itself and its best matches
    in the corpus.
    """
    rows = [index.rows(papers)]
    tags = [np.full(len(papers), -1)]
    weights = [recency.astype(np.float64)]
    spec = [index.specific[rows[0]]]
    topic = [index.topic[rows[0]]] if index.topic is not None else None
    for title, abstract in texts:
        own_specific, own_topic = _text_vectors(index, 
            " ".join([title] * TITLE_REPEATS + [abstract]))
        rows.append(np.array([-1]))
        tags.append(np.array([-1]))
        weights.append(np.ones(1))
        spec.append(own_specific)
        if topic is not None:
            topic.append(own_topic if own_topic is not None
                         else np.zeros((1, topic[0].shape[1]), dtype=np.float32))
    for j, phrase in enumerate(phrases):
        matched, own_specific, own_topic = _phrase_matches(index, phrase)
        if own_specific.nnz == 0:
            log.info("profile: interest %r has no word the corpus knows yet, ignored", phrase)
            continue
        if len(matched) == 0:
            log.info("profile: interest %r matches no stored paper yet", phrase)
        rows.append(np.concatenate([[-1], matched]))
        spec.append(sparse.vstack([own_specific, index.specific[matched]]))
        if topic is not None and own_topic is not None and index.topic is not None:
            topic.append(np.vstack([own_topic, index.topic[matched]]))
        tags.append(np.full(len(rows[-1]), j))
        weights.append(np.full(len(rows[-1]), 1.0 / len(rows[-1])))
    return (
        np.concatenate(rows).astype(np.int64),
        np.concatenate(tags).astype(np.int64),
        sparse.vstack(spec).tocsr(),
        np.vstack(topic).astype(np.float32) if topic is not None else None,
        np.concatenate(weights).astype(np.float32),
    )


def fit_model(
    index: CorpusIndex, profile: Profile, *, settings: RankingConfig = DEFAULT_SETTINGS
) -> SubscriberModel:
    """Turn a profile into the model's positives and negatives (no candidates needed).

    Every signal keeps its own strength: a like or seed paper pulls up by its
    recency; an explicit skip pushes down at full strength, a paper left
    unrated at ``settings.unrated_weight`` (see :func:`_negative_score`); both
    by recency too (``settings.half_life_days``).
    """
    ages = dict(profile.ages)
    liked = _known(index, profile.liked, "liked")
    seeds, unknown = [], []
    for ref in profile.seed_papers:
        found = index.resolve(ref)
        if found is None:
            unknown.append(ref)
        elif found not in liked and found not in seeds:
            seeds.append(found)
    if unknown:
        log.info("profile: %d seed papers not in the corpus yet (pending): %s", len(unknown),
                 ", ".join(unknown[:5]))
    positives = liked + seeds
    known_titles = {normalise_title(index.paper(i).title) for i in positives}
    texts = [(t, a) for t, a in dict.fromkeys(profile.seed_texts)
             if a.strip() and normalise_title(t) not in known_titles
             and index.resolve(t) is None]
    labels = tuple(["you liked"] * len(liked) + ["your seed paper"] * len(seeds)
                   + ["in your library"] * len(texts))
    titles = tuple([index.paper(i).title for i in positives] + [t for t, _ in texts])
    phrases = tuple(p for p in dict.fromkeys(s.strip() for s in profile.interests) if p)
    half_life = settings.half_life_days
    pos_recency = np.array([recency(ages.get(i), half_life) for i in positives])

    points = _positive_points(index, positives, pos_recency, texts, phrases)
    pos_rows, pos_phrase, pos_specific, pos_topic, pos_weights = points

    skipped = [i for i in _known(index, profile.skipped, "skipped") if i not in positives]
    unrated = [
        i
        for i in _known(index, profile.unrated, "unrated")
        if i not in positives and i not in skipped
    ]
    negatives = skipped + unrated
    neg_rows = index.rows(negatives)
    neg_weights = np.array([recency(ages.get(i), half_life) for i in negatives],
                           dtype=np.float32)
    return SubscriberModel(
        positive_ids=tuple(positives) + tuple(f"library:{n}" for n in range(len(texts))),
        positive_labels=labels,
        positive_titles=titles,
        interest_phrases=phrases,
        pos_rows=pos_rows,
        pos_phrase=pos_phrase,
        pos_specific=pos_specific,
        pos_topic=pos_topic,
        pos_weights=pos_weights,
        negative_ids=tuple(negatives),
        neg_specific=index.specific[neg_rows],
        neg_topic=index.topic[neg_rows] if index.topic is not None else None,
        neg_weights=neg_weights,
        neg_skipped=np.array([True] * len(skipped) + [False] * len(unrated), dtype=bool),
        unrated_weight=settings.unrated_weight,
        unknown_seeds=tuple(unknown),
    )


# --- Scoring ----------------------------------------------------------------------


def _standardise(values: np.ndarray) -> np.ndarray:
    """Zero mean, unit spread over today's candidates (all zero when they are all equal)."""
    spread = float(values.std())
    # The one change since ab698ab (in both): a spread within float32 rounding counts as none.
    scale = float(np.abs(values).max(initial=0.0))
    if not math.isfinite(spread) or spread < max(1e-9, SPREAD_NOISE * scale):
        return np.zeros_like(values, dtype=np.float64)
    return (values - values.mean()) / spread


def _cohesion(topic: np.ndarray) -> float:
    """Mean pairwise topic cosine of the candidates: ~0 for a random pool, high for one field."""
    n = topic.shape[0]
    if n < 2:
        return 0.0
    total = topic.sum(axis=0)
    return float((total @ total - n) / (n * (n - 1)))


def _narrowness(topic: np.ndarray | None) -> float:
    """0 for a pool as diverse as the corpus, 1 for one field's listing; linear between."""
    if topic is None:
        return 1.0
    span = COHESION_NARROW - COHESION_BROAD
    return min(max((_cohesion(topic) - COHESION_BROAD) / span, 0.0), 1.0)


def _evidence_weights(cand_rows: np.ndarray, model: SubscriberModel) -> np.ndarray:
    """Candidates x positive points: each point's weight, 0 where a paper would vouch for itself.

    An interest phrase's best matches are often among today's candidates; a
    candidate must not count its own similarity of 1 as evidence.
    """
    weights = np.broadcast_to(model.pos_weights, (len(cand_rows), len(model.pos_weights)))
    return np.where(cand_rows[:, None] == model.pos_rows[None, :], 0.0, weights)


def _weighted_mean(sims: np.ndarray, weights: np.ndarray) -> np.ndarray:
    total = weights.sum(axis=1)
    return np.divide((sims * weights).sum(axis=1), total, out=np.zeros(len(sims)), where=total > 0)


def _topic_affinity(sims: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted mean similarity with a share of the maximum, so each separate interest counts."""
    best = np.where(weights > 0, sims, -np.inf).max(axis=1, initial=-np.inf)
    best = np.where(np.isfinite(best), best, 0.0)
    return (1 - TOPIC_MAX_SHARE) * _weighted_mean(sims, weights) + TOPIC_MAX_SHARE * best


@dataclass(frozen=True)
class _Candidates:
    """Today's candidates in both views, sliced from the index once per scoring."""

    rows: np.ndarray
    specific: sparse.csr_matrix
    topic: np.ndarray | None

    @classmethod
    def of(cls, index: CorpusIndex, candidates: Sequence[str]) -> _Candidates:
        rows = index.rows(candidates)
        topic = index.topic[rows] if index.topic is not None else None
        return cls(rows, index.specific[rows], topic)


def _dense(product: sparse.spmatrix | np.ndarray) -> np.ndarray:
    if isinstance(product, np.ndarray):
        return product
    return np.asarray(product.toarray())


def _positive_score(
    index: CorpusIndex, model: SubscriberModel, cands: _Candidates
) -> tuple[np.ndarray, float]:
    """Standardised closeness to the positives, and the topic weight used for it."""
    weights = _evidence_weights(cands.rows, model)
    sims = _dense(cands.specific @ model.pos_specific.T)
    specific = _weighted_mean(sims, weights) - CENTRALITY_PENALTY * index.centrality[cands.rows]
    if cands.topic is None or model.pos_topic is None:
        return _standardise(specific), 0.0
    topic = _topic_affinity(cands.topic @ model.pos_topic.T, weights)
    narrow = _narrowness(cands.topic)
    weight = TOPIC_WEIGHT_BROAD + (TOPIC_WEIGHT_NARROW - TOPIC_WEIGHT_BROAD) * narrow
    score = _standardise(specific) + weight * _standardise(topic)
    feedback = FEEDBACK_WEIGHT_BROAD * (1.0 - narrow)
    if feedback > 0 and len(score) > FEEDBACK_TOP + 1:
        score = score + feedback * _agreement(cands.specific, cands.topic, score, weight)
    return score, weight


def _agreement(
    specific: sparse.csr_matrix, topic: np.ndarray, score: np.ndarray, weight: float
) -> np.ndarray:
    """How close each candidate is to today's best picks (pseudo relevance feedback).

    Papers a subscriber wants on one day tend to resemble each other; the top
    picks vote for their neighbours. Each pick's own vote for itself is left out.
    """
    top = np.argsort(-score, kind="stable")[:FEEDBACK_TOP]
    own = np.zeros((len(score), len(top)), dtype=bool)
    own[top, np.arange(len(top))] = True
    counts = len(top) - own.sum(axis=1)
    spec = np.where(own, 0.0, _dense(specific @ specific[top].T)).sum(axis=1) / counts
    topi = np.where(own, 0.0, topic @ topic[top].T).sum(axis=1) / counts
    return (_standardise(spec) + weight * _standardise(topi)) / (1.0 + weight)


def _negative_score(model: SubscriberModel, cands: _Candidates, weight: float) -> np.ndarray:
    """Closeness to the nearest negative, per kind, each kind at its own strength.

    The nearest one, not the centroid: one skipped paper says little about a
    whole field, but much about papers that are almost the same. Skips and
    papers left unrated are standardised apart and then weighted (1 and
    ``unrated_weight``), so the weight survives standardisation: a profile
    whose negatives are all unrated is pushed down less than the same papers
    skipped. Within a kind, an older negative's similarity counts less.
    """
    result = np.zeros(len(cands.rows))
    for kind, strength in ((True, 1.0), (False, model.unrated_weight)):
        chosen = model.neg_skipped == kind
        if strength <= 0 or not chosen.any():
            continue
        result += strength * _nearest_negative(model, cands, weight, chosen)
    return result


def _nearest_negative(
    model: SubscriberModel, cands: _Candidates, weight: float, chosen: np.ndarray
) -> np.ndarray:
    decay = model.neg_weights[chosen]
    spec = _aged(_dense(cands.specific @ model.neg_specific[np.flatnonzero(chosen)].T), decay)
    result = _standardise(spec.max(axis=1))
    if cands.topic is not None and model.neg_topic is not None:
        topi = _aged(cands.topic @ model.neg_topic[chosen].T, decay)
        result = (result + weight * _standardise(topi.max(axis=1))) / (1.0 + weight)
    return result


def _aged(sims: np.ndarray, decay: np.ndarray) -> np.ndarray:
    """Positive similarities shrink with the negative's age; negative ones are left alone."""
    return np.where(sims > 0, sims * decay, sims)


def _popularity(index: CorpusIndex, candidates: Sequence[str]) -> np.ndarray:
    """Upvotes first, then the listing's own order; equal values keep candidate order."""
    scores = np.zeros(len(candidates))
    for i, pid in enumerate(candidates):
        paper = index.paper(pid)
        rank_part = (
            0.5 / paper.listing_rank if paper.listing_rank and paper.listing_rank > 0 else 0.0
        )
        scores[i] = float(paper.upvotes or 0) + rank_part
    return scores


def _model_scores(
    index: CorpusIndex, model: SubscriberModel, candidates: Sequence[str]
) -> np.ndarray:
    """Positives pull up, negatives push down; popularity stands in when there are no positives."""
    cands = _Candidates.of(index, candidates)
    if not model.has_positives:  # skips only: today's order, minus what resembles a skip
        order = np.argsort(-_popularity(index, candidates), kind="stable")
        place = np.empty(len(order))
        place[order] = np.arange(len(order))
        return _standardise(-place) - _negative_score(model, cands, TOPIC_WEIGHT_NARROW)
    score, weight = _positive_score(index, model, cands)
    if model.has_negatives:
        score = score - NEGATIVE_WEIGHT * _negative_score(model, cands, weight)
    if float(np.ptp(score)) == 0.0:  # the profile says nothing about today's papers
        return _popularity(index, candidates)
    return score


def _scores(
    index: CorpusIndex, model: SubscriberModel | None, candidates: Sequence[str]
) -> np.ndarray:
    if model is None:
        return _popularity(index, candidates)
    return np.nan_to_num(_model_scores(index, model, candidates), nan=0.0, posinf=0.0, neginf=0.0)


# --- Digest: ranking with exploration and reasons ---------------------------------


def _short(title: str, width: int = 70) -> str:
    title = " ".join(title.split())
    return title if len(title) <= width else title[: width - 1].rstrip() + "…"


def _positive_similarities(index: CorpusIndex, model: SubscriberModel, row: int) -> np.ndarray:
    """Similarity of one paper to each positive point, both views averaged.

    A point that is the paper itself (an interest's match) says -1: no evidence.
    """
    sims = np.asarray((index.specific[row] @ model.pos_specific.T).todense()).ravel()
    if index.topic is not None and model.pos_topic is not None:
        sims = (sims + index.topic[row] @ model.pos_topic.T) / 2
    return np.where(model.pos_rows == row, -1.0, sims)


def _best_positive(index: CorpusIndex, model: SubscriberModel, rows: np.ndarray) -> np.ndarray:
    """Per paper, :func:`_positive_similarities`' maximum (-1 without a positive), vectorised."""
    if model.pos_specific.shape[0] == 0:
        return np.full(len(rows), -1.0)
    sims = _dense(index.specific[rows] @ model.pos_specific.T)
    if index.topic is not None and model.pos_topic is not None:
        sims = (sims + index.topic[rows] @ model.pos_topic.T) / 2
    sims = np.where(rows[:, None] == model.pos_rows[None, :], -1.0, sims)
    return np.asarray(sims.max(axis=1))


def _negative_similarities(index: CorpusIndex, model: SubscriberModel, row: int) -> np.ndarray:
    spec = np.asarray((index.specific[row] @ model.neg_specific.T).todense()).ravel()
    if index.topic is None or model.neg_topic is None:
        return spec
    return (spec + index.topic[row] @ model.neg_topic.T) / 2


def _model_reason(
    index: CorpusIndex, model: SubscriberModel, paper_id: str, considered: int, limit: int
) -> str:
    """The positive (liked paper, seed, library entry or interest) this paper is closest to.

    Named only when the similarity reaches REASON_MIN_SIMILARITY; below it the
    item says what it is: filling a short day, popular today, or a weak match.
    """
    sims = _positive_similarities(index, model, int(index.rows([paper_id])[0]))
    paper = index.paper(paper_id)
    if len(sims) == 0:  # skips only: the listing's order, skip-like papers pushed down
        return _popularity_reason(paper)
    best = int(np.argmax(sims))
    if sims[best] < REASON_MIN_SIMILARITY:
        if considered <= limit:
            return f"filling: only {considered} new papers today"
        if paper.upvotes:
            return f"weak match; popular today ({paper.upvotes} upvotes)"
        return f"weak match (closest to your likes at {max(float(sims[best]), 0.0):.2f})"
    if model.pos_phrase[best] >= 0:
        return f'matches your interest "{model.interest_phrases[model.pos_phrase[best]]}"'
    title = _short(model.positive_titles[best])
    return f'close to "{title}" {model.positive_labels[best]}'


def reasons_within(index: CorpusIndex, profile: Profile, paper_id: str, *, considered: int,
                   limit: int, settings: RankingConfig = DEFAULT_SETTINGS,
                   tolerance: float = 1e-5) -> set[str]:
    """Every reason :func:`rank` could give ``paper_id`` when positives tie: the reason of
    each positive point whose similarity is within ``tolerance`` of the best one.

    Two points can tie exactly (a liked paper that is also one of an interest's matches);
    which of them argmax names then rests on the last bit of float32 sums that the
    production code adds in another order. Any of them is a right reason.
    """
    model = _model_for(index, profile, settings)
    reasons = {_item_reason(index, model, paper_id, considered, limit)}
    if model is None or len(model.pos_rows) == 0:
        return reasons
    sims = _positive_similarities(index, model, int(index.rows([paper_id])[0]))
    if sims.max() < REASON_MIN_SIMILARITY:
        return reasons
    for point in np.flatnonzero(sims >= sims.max() - tolerance):
        if model.pos_phrase[point] >= 0:
            reasons.add(f'matches your interest "{model.interest_phrases[model.pos_phrase[point]]}"')
        else:
            reasons.add(f'close to "{_short(model.positive_titles[point])}" '
                        f'{model.positive_labels[point]}')
    return reasons


def _item_reason(
    index: CorpusIndex, model: SubscriberModel | None, paper_id: str, considered: int, limit: int
) -> str:
    if model is None:
        return _popularity_reason(index.paper(paper_id))
    return _model_reason(index, model, paper_id, considered, limit)


def _popularity_reason(paper: Paper) -> str:
    if paper.upvotes:
        return f"popular today ({paper.upvotes} upvotes)"
    if paper.listing_rank:
        return f"#{paper.listing_rank} in today's listing"
    return "in today's listing"


def _familiarity(index: CorpusIndex, model: SubscriberModel, rows: np.ndarray) -> np.ndarray:
    """Per paper, its similarity to the closest thing the subscriber rated (both views averaged)."""
    parts = [(model.pos_specific, model.pos_topic), (model.neg_specific, model.neg_topic)]
    best = np.full(len(rows), -np.inf)
    for spec_rows, topic_rows in parts:
        if spec_rows.shape[0] == 0:
            continue
        sims = _dense(index.specific[rows] @ spec_rows.T)
        if index.topic is not None and topic_rows is not None:
            sims = (sims + index.topic[rows] @ topic_rows.T) / 2
        best = np.maximum(best, sims.max(axis=1))
    return np.where(np.isfinite(best), best, 0.0)


def _pick_explore(
    index: CorpusIndex,
    model: SubscriberModel | None,
    candidates: list[str],
    remaining: list[int],
    count: int,
) -> list[tuple[int, str]]:
    """Candidates outside the top picks that the model knows least about.

    Least known = lowest similarity to anything the subscriber rated (liked,
    skipped, seed or interest), so a profile keeps seeing new ground; among
    those, the more popular first when the listing says so. Deterministic.
    """
    if not remaining or count <= 0:
        return []
    pops = _popularity(index, [candidates[i] for i in remaining])
    familiarity = np.zeros(len(remaining))
    if model is not None:
        rows = index.rows([candidates[i] for i in remaining])
        familiarity = _familiarity(index, model, rows)
    # The least familiar half (at least `count`), then most popular, then least familiar.
    order = np.lexsort((np.arange(len(remaining)), familiarity))
    pool = sorted(
        order[: max(count, (len(remaining) + 1) // 2)], key=lambda j: (-pops[j], familiarity[j], j)
    )
    picks = []
    for j in pool[:count]:
        paper = index.paper(candidates[remaining[j]])
        if paper.upvotes:
            why = f"explore: popular today ({paper.upvotes} upvotes), outside your usual topics"
        elif paper.listing_rank:
            why = f"explore: #{paper.listing_rank} in today's listing, outside your usual topics"
        else:
            why = "explore: unlike anything you have rated"
        picks.append((remaining[j], why))
    return picks


def rank(
    index: CorpusIndex,
    profile: Profile,
    candidates: Sequence[str],
    *,
    limit: int,
    settings: RankingConfig = DEFAULT_SETTINGS,
) -> list[Ranked]:
    """The top `limit` candidates, best first, exploration slots included.

    Exploration (settings.explore_fraction; 0 = off) applies to personalised
    profiles only: an unpersonalised digest (or one whose feedback matches
    nothing stored) is the listing's order already.
    Explore items come last, marked ``explore=True``. Candidates not in the
    index are dropped (logged); repeated ids count once.
    """
    unique = list(dict.fromkeys(candidates))
    known = [c for c in unique if c in index]
    if len(known) < len(unique):
        log.warning(
            "rank: %d candidates are not in the corpus index, dropped", len(unique) - len(known)
        )
    if limit <= 0 or not known:
        return []
    model = _model_for(index, profile, settings)
    scores = _scores(index, model, known)
    order = [int(i) for i in np.argsort(-scores, kind="stable")]
    personal = model is not None and is_personalised(profile)
    explore = explore_slots(limit, settings.explore_fraction) if personal else 0
    explore = min(explore, max(len(order) - (limit - explore), 0))
    top = order[: min(limit, len(order)) - explore]
    levels = _levels(index, model, known, scores) if personal and model is not None else None
    items = []
    for i in top:
        why = _item_reason(index, model, known[i], len(known), limit)
        items.append(Ranked(known[i], float(scores[i]), why, False,
                            levels.level(float(scores[i])) if levels else None))
    for i, why in _pick_explore(index, model, known, order[len(top) :], explore):
        items.append(Ranked(known[i], float(scores[i]), why, True,
                            levels.level(float(scores[i])) if levels else None))
    return items


def _levels(
    index: CorpusIndex, model: SubscriberModel, candidates: list[str], scores: np.ndarray
) -> Levels:
    """Levels calibrated against the subscriber's own positives.

    With at least CALIBRATION_MIN positives that are corpus papers (likes,
    seed papers), the most recent CALIBRATION_PAPERS of them are scored among
    today's candidates, each judged by the others (a paper never vouches for
    itself): a candidate that scores at least their median is "strong", one
    that scores at least the lowest of them is "good". On citeulike-public
    (300 cases, 5.0% of candidates relevant) that makes strong items relevant
    23% of the time, good ones 8%, weak ones 1.6%. With fewer, the counts come
    from the evidence thresholds of the reasons (nearest positive at
    STRONG_SIMILARITY / REASON_MIN_SIMILARITY). Either way the counts are
    turned into score thresholds, so the level is monotone in the score.
    """
    order = np.sort(scores)[::-1]
    named = [p for p, phrase in zip(model.positive_ids, model.pos_phrase, strict=False)
             if phrase < 0 and p in index and p not in set(candidates)]
    calib = list(dict.fromkeys(reversed(named)))[:CALIBRATION_PAPERS]
    if len(calib) >= CALIBRATION_MIN:
        pooled = _scores(index, model, candidates + calib)
        own, theirs = pooled[: len(candidates)], pooled[len(candidates):]
        strong_n = int((own >= np.median(theirs)).sum())
        good_n = int((own >= theirs.min()).sum())
        method = (f"against {len(calib)} of your own papers scored among today's: strong = at "
                  f"least their median, good = at least the lowest of them")
    else:
        best = _best_positive(index, model, index.rows(candidates))
        strong_n = int((best >= STRONG_SIMILARITY).sum())
        good_n = int((best >= REASON_MIN_SIMILARITY).sum())
        method = (f"too few rated papers to calibrate: strong = nearest positive at least "
                  f"{STRONG_SIMILARITY}, good = at least {REASON_MIN_SIMILARITY}")
    strong = float(order[strong_n - 1]) if strong_n > 0 else math.inf
    good = float(order[max(good_n, strong_n) - 1]) if max(good_n, strong_n) > 0 else math.inf
    return Levels(strong, good, method)


