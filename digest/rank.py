"""Ranking: runs once per subscriber at dispatch, after ingest.

Takes the stored corpus (fitted once into a :class:`CorpusIndex`), one
subscriber's :class:`Profile` and today's candidate paper ids, and hands
:func:`rank`'s list of :class:`Ranked` items (score and a short human reason)
on to rendering.

This first version ranks by TF-IDF cosine similarity to the subscriber's
interest phrases; with no interests it keeps the listing's own order.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from sklearn.feature_extraction.text import TfidfVectorizer

from .config import RankingConfig
from .paper import Paper

log = logging.getLogger(__name__)


def _paper_text(paper: Paper) -> str:
    """The text a paper is known by: its title (counted twice) and abstract."""
    return f"{paper.title}. {paper.title}. {paper.abstract}"


class CorpusIndex:
    """Features fitted (unsupervised) on the stored corpus of papers."""

    def __init__(self, papers: Sequence[Paper], vectorizer: TfidfVectorizer, matrix: sparse.csr_matrix):
        self._papers = list(papers)
        self._row = {p.id: i for i, p in enumerate(self._papers)}
        self.vectorizer = vectorizer
        self.matrix = matrix
        vocabulary = sorted(vectorizer.vocabulary_)
        self.vocabulary_key = hashlib.sha256("\n".join(vocabulary).encode("utf-8")).hexdigest()[:16]

    @classmethod
    def fit(cls, papers: Sequence[Paper]) -> CorpusIndex:
        """Fit TF-IDF on the corpus; an empty corpus still gives a usable index."""
        unique = list({p.id: p for p in papers}.values())
        vectorizer = TfidfVectorizer(stop_words="english", sublinear_tf=True, min_df=1, max_df=0.5)
        texts = [_paper_text(p) for p in unique] or ["empty"]
        try:
            matrix = vectorizer.fit_transform(texts)
        except ValueError:  # every document empty or stop words only
            vectorizer = TfidfVectorizer(min_df=1)
            matrix = vectorizer.fit_transform(["empty"] * len(texts))
        return cls(unique, vectorizer, matrix[: len(unique)].tocsr())

    def __contains__(self, paper_id: object) -> bool:
        return paper_id in self._row

    def __len__(self) -> int:
        return len(self._papers)

    def paper(self, paper_id: str) -> Paper:
        return self._papers[self._row[paper_id]]

    def rows(self, paper_ids: Sequence[str]) -> np.ndarray:
        return np.fromiter((self._row[i] for i in paper_ids), dtype=np.int64, count=len(paper_ids))


@dataclass(frozen=True)
class Profile:
    """What one subscriber has told us, as paper ids and phrases."""

    liked: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    unrated: tuple[str, ...] = ()
    interests: tuple[str, ...] = ()
    seed_papers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Ranked:
    paper_id: str
    score: float
    reason: str
    explore: bool


def is_personalised(profile: Profile) -> bool:
    """True when the subscriber gave anything to learn from."""
    return bool(profile.liked or profile.skipped or profile.interests or profile.seed_papers)


def _fallback_scores(index: CorpusIndex, candidates: Sequence[str]) -> np.ndarray:
    """Upvotes first, then the listing's own order, then candidate order (stable sort)."""
    scores = np.zeros(len(candidates))
    for i, pid in enumerate(candidates):
        paper = index.paper(pid)
        upvotes = paper.upvotes or 0
        rank_bonus = 1.0 / paper.listing_rank if paper.listing_rank else 0.0
        scores[i] = upvotes + rank_bonus
    return scores


def _interest_similarity(index: CorpusIndex, profile: Profile, candidates: Sequence[str]) -> np.ndarray:
    """Cosine similarity of each candidate (rows) to each interest phrase (columns)."""
    phrases = index.vectorizer.transform(list(profile.interests))
    cand = index.matrix[index.rows(candidates)]
    return np.asarray((cand @ phrases.T).todense())


def score_candidates(
    index: CorpusIndex,
    profile: Profile,
    candidates: Sequence[str],
    *,
    settings: RankingConfig = RankingConfig(),
) -> np.ndarray:
    """The model's scores, no exploration: what rank() sorts by."""
    if not candidates:
        return np.zeros(0)
    if not profile.interests:
        return _fallback_scores(index, candidates)
    return _interest_similarity(index, profile, candidates).max(axis=1)


def rank(
    index: CorpusIndex,
    profile: Profile,
    candidates: Sequence[str],
    *,
    limit: int,
    settings: RankingConfig = RankingConfig(),
) -> list[Ranked]:
    """The top `limit` candidates, best first."""
    candidates = [c for c in dict.fromkeys(candidates) if c in index]
    scores = score_candidates(index, profile, candidates, settings=settings)
    order = np.argsort(-scores, kind="stable")[:limit]
    sims = _interest_similarity(index, profile, candidates) if profile.interests else None
    items = []
    for i in order:
        if sims is not None and sims[i].max() > 0:
            reason = f'matches your interest "{profile.interests[int(sims[i].argmax())]}"'
        else:
            reason = "top of today's listing"
        items.append(Ranked(candidates[i], float(scores[i]), reason, False))
    return items
