"""Ranking: runs once per subscriber at dispatch, after ingest.

Takes the stored corpus (fitted once, unsupervised, into a :class:`CorpusIndex`),
one subscriber's :class:`Profile` (likes, skips, papers left unrated, interest
phrases, seed papers) and today's candidate paper ids, and hands :func:`rank`'s
list of :class:`Ranked` items (score, a short human reason, explore flag) on to
rendering. :func:`score_candidates` is the model alone, without exploration:
the ranking benchmark (``digest.bench.quality``) measures exactly that.

The model, and why it has this shape (numbers from ``digest bench quality``):

* Two views of every paper, both fitted on the corpus. The **specific** view is
  TF-IDF over words and word pairs with the inverse document frequency counted
  twice (tf * idf^2): on daily listings, where every candidate is on related
  topics, what singles out a subscriber's paper is its rare, specific terms.
  The **topic** view is a low-rank (LSA) space of the TF-IDF matrix, compared
  at several ranks at once (16, 32, 64, 128 dimensions, cosine averaged over
  the scales): in a broad pool of papers it finds related work that shares
  few exact words. The title counts twice in both.
* A subscriber's positives (likes, seed papers, library entries, interest
  phrases) become a centroid in the specific view and a set of points in the
  topic view (mean plus a share of the maximum similarity, so separate
  interests each count); negatives push down candidates close to them, each
  kind at its own strength: skips fully, papers left unrated at
  ``unrated_weight`` (the kinds are standardised apart, then weighted, so the
  weight survives). Every signal ages: one ``half_life_days`` old counts half.
* Each item gets a relevance level (:class:`Levels`, calibrated on the
  subscriber's own papers, monotone in the score) and a reason that names a
  liked paper or interest only above REASON_MIN_SIMILARITY.
* How much the topic view counts is decided per digest from the candidates
  themselves: when today's candidates are as diverse as the corpus, topic
  evidence (and agreement with the other top candidates) weighs a lot; when
  they all sit in one region (one day's listing of one archive), the specific
  terms decide. One rule, no per-dataset switch.
* Scores of each view are standardised over the candidates before they are
  mixed, so the mix does not depend on the scale of either similarity.

A subscriber with nothing to learn from gets the listing's own order
(upvotes, then listing rank, then candidate order).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import logging
import marshal
import math
import numbers
import threading
import uuid
import weakref
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from itertools import filterfalse, repeat

import numpy as np
from scipy import linalg, sparse
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import TfidfTransformer, TfidfVectorizer
from sklearn.preprocessing import normalize
from threadpoolctl import ThreadpoolController

from .config import RankingConfig, Subscriber
from .errors import DigestError
from .paper import Paper, normalise_title
from .store import Store, utc_now

log = logging.getLogger(__name__)

DEFAULT_SETTINGS = RankingConfig()  # frozen: safe to share as a default argument

# --- Feature settings (fitted on the corpus), each with its reason -------------
TITLE_REPEATS = 2  # a title is the author's own summary: count it twice
NGRAMS = (1, 2)  # word pairs ("domain adaptation") are more specific than words
MAX_DF = 0.5  # a term in half the corpus says nothing about a paper
SMALL_CORPUS = 1000  # below this many papers keep terms seen once (interest phrases may match them)
SPECIFIC_IDF_POWER = 2.0  # rare terms decide on daily listings; idf^2 favours them
PHRASE_MATCHES = 5  # an interest phrase shares its weight with its 5 best-matching corpus papers
TOPIC_SCALES = (16, 32, 64, 128)  # LSA ranks compared at once: coarse topics and finer ones
SVD_SEED = 0  # the topic space must be the same on every fit of the same corpus
# Window papers up to which the topic space is the exact SVD (see _fit_svd), above which the
# randomized one. CPU s on one BLAS thread, this 2-core machine under load, arxiv-authors' last
# N papers (terms capped at 50,000): exact 0.4 / 2.1 / 5.7 / 12.5 at N = 1,000 / 2,000 / 3,000 /
# 4,000 (the eigendecomposition grows as N^3), randomized 0.7 / 1.5 / 2.2 / -; at the bench's
# 830 papers 0.4 vs 2.1. The bound keeps citeulike-public (1,906 papers) on the exact path, so
# `digest bench quality` measures it: nDCG@10 0.5750 (randomized 0.5733).
EXACT_TOPIC_PAPERS = 2000
SINGULAR_FLOOR = 1e-6  # relative singular value below which a direction is rounding, not data

# --- What a fitted index keeps between subscribers (issue 13), each with its reason ----
# Today's candidates are shared by thousands of subscribers: each candidate's cosines to the
# whole corpus (both views, float32) are computed once and kept. A row costs 8 bytes per
# corpus paper (80 KB at 10,000 papers, 264 KB at 33,000), so 256 MiB holds a week of daily
# listings (~1,000 rows) even at 33,000 papers, a quarter of the 1 GB the issue allows.
SIMILARITY_MEMO_BYTES = 256 * 2**20
SIMILARITY_BATCH = 256  # candidate rows per product: bounds the temporary sparse result
# A memo whose rows were all replaced this many times over is thrashing: the candidates asked
# about are far more than it holds (the quality benchmark's 2,667 cases, each with candidates
# of its own, at 33,000 papers: a whole-corpus row computed for each, then dropped unused,
# made it 30x slower). Past it, rows are computed for the columns asked only, as before the
# memo; a dispatch asks about a day's candidates, a few hundred, and never gets near it.
SIMILARITY_TURNOVERS = 4
SMALL_PRODUCT = 65536  # entries below which a topic product skips BLAS (see _topic_products)
# A kept phrase match is its 5 best rows and its own vectors, about 2.5 KB (measured with
# tracemalloc; the objects cost more than the arrays), its similarities being computed with
# the papers scored: 32 MiB holds ~13,000 distinct phrases, more than a lab's subscribers have
# (1,000 bench subscribers have 781 on 580 days). Bounded by this, not by the corpus size.
PHRASE_MEMO_BYTES = 32 * 2**20
PHRASE_OVERHEAD = 1500  # bytes a kept match costs beyond its arrays (objects, dict entry)
# A phrase's specific cosines to every corpus paper (float32, 4 bytes per paper), kept once a
# subscriber's pool asked for them: read per pool with one index instead of a postings walk
# per subscriber (~200 us). 64 MiB holds 1,600 phrases at 10,000 papers, 500 at 33,000; past
# it the least recently used go, and computing a row again costs less than one walk did.
PHRASE_ROW_MEMO_BYTES = 64 * 2**20
# Phrases x papers in one product of warm_phrases: bounds its temporary results to 16 MB
# each at any corpus size (424 phrases a batch at 9,877 papers).
PHRASE_BATCH_ENTRIES = 2**22
# How far a float32 topic cosine of two unit vectors (240 products summed) can be from the
# exact one: at worst 240 * 2**-24 = 1.4e-5 (rounding of each partial sum); 1e-4 leaves room.
SCREEN_ERROR = 1e-4
# A day's dispatch refits each subscriber's model once anyway (their unrated papers changed);
# the cache serves the same subscriber again within the day (levels, preview, explain, a
# reply). Recent subscribers are enough, and memory no longer grows with the subscriber count.
MODEL_CACHE_ENTRIES = 4096
# A profile without likes, skips or papers shown (a first digest: the config's interests and
# seed papers only) is often shared: new subscribers with the same interests, ranking the same
# day's candidates, get the same items (70% of the bench's subscribers are new; 3,000 of them
# have ~1,200 distinct interest sets). Such results are kept per fitted index, keyed by the
# whole profile, the candidates, the limit and the settings, so a hit is exactly what ranking
# again would give. An entry holds a digest's items and the key (~3 KB): 4096 cost ~12 MB,
# bounded whatever the subscriber count. A profile with feedback is one person's: never kept.
SHARED_RESULT_ENTRIES = 4096
# How narrow a pool of papers is (its mean pairwise topic cosine) is one float per set of rows,
# and today's candidates are everyone's: kept for the most recent 256 sets (the key is the
# rows, 8 bytes each: at most a few MB), computed once instead of once per subscriber.
NARROWNESS_ENTRIES = 256
# An interest phrase's points (the phrase and its best matches) against a set of candidates:
# the same block of similarities for every subscriber with that interest ranking today's
# candidates. Kept up to 16 MiB (a block of 77 candidates and 6 points is ~4.5 KB with its
# key: ~3,700 blocks, more than the distinct phrases of 10,000 bench subscribers).
PHRASE_BLOCK_BYTES = 16 * 2**20

@dataclass(frozen=True)
class FitBounds:
    """What bounds the corpus fit as listings accumulate (``digest bench corpus`` measures them).

    ``window``: the vocabulary, idf and topic space are fitted on the most
    recent N papers (the last N of the sequence, i.e. the store's arrival
    order); every paper is then transformed with them. ``None`` fits on all.
    ``max_terms``: the vocabulary keeps the N most frequent terms (after the
    min_df/max_df cut); ``None`` keeps them all. ``svd_iterations``: power
    iterations of the randomized SVD (scikit-learn's default is 5). The
    SVD already runs in float32 (scikit-learn keeps the input's float32).
    ``spread``: the ``window`` papers are spread evenly over the whole corpus
    (a sample) instead of being the most recent ones.
    """

    window: int | None = None
    max_terms: int | None = None
    svd_iterations: int = 5
    spread: bool = False


FIT_CHUNK = 2000  # texts counted at a time when weighting old papers: bounds the term lists
UNBOUNDED_FIT = FitBounds()  # the fit before issue 13: every paper, every term; a baseline
# The shipped bounds, from `digest bench corpus` and `digest bench quality` on the 32,837-paper
# arxiv-authors-public corpus (machine at load ~20, so CPU s are ~2x a quiet machine's):
# unbounded 70 CPU s, 1,290 MB over the process, nDCG@10 0.411; a 50,000-term cap alone still
# 38 s, 650 MB; the last 8,000 papers + 50,000 terms 24 s, 435 MB, 0.396; a spread sample of
# 8,000 0.395; 12,000 papers 0.396; 100,000 terms 0.397; the last 4,000 papers + 50,000 terms
# 14 s, 282 MB, 0.394 (gate 0.385). Quality hardly moves with the window or the cap, the cost
# does: 4,000 papers is about four months of daily listings, 50,000 terms keep every term seen
# in 4 or more of them. citeulike-public (1,906 papers, 23,308 terms) is under both bounds.
CORPUS_FIT = FitBounds(window=4_000, max_terms=50_000)

# --- Model settings (per subscriber), each with its reason ---------------------
TOPIC_MAX_SHARE = 0.3  # share of the nearest positive in topic similarity: several interests count
CENTRALITY_PENALTY = 1.0  # papers close to the corpus average are close to everyone: discount them
NEGATIVE_WEIGHT = 0.5  # a skip pushes down what resembles it, less than a like pulls up
TOPIC_WEIGHT_BROAD = 4.0  # candidates as diverse as the corpus: topics separate well
TOPIC_WEIGHT_NARROW = 0.75  # candidates all on related topics: specific terms decide
FEEDBACK_WEIGHT_BROAD = 2.0  # broad pool: papers close to today's best picks are likely wanted too
FEEDBACK_TOP = 10  # today's best picks that vote in that second pass: a digest's worth
COHESION_BROAD = 0.02  # mean pairwise topic cosine of a random pool of papers is ~0
COHESION_NARROW = 0.10  # one day's listing of one archive measures 0.11 to 0.20
MIN_EXPLORE_LIMIT = 5  # from this digest size on, a positive explore fraction gives >= 1 slot
# float32 products round at ~1e-7 of their size; a spread under 100x that is rounding, not signal
SPREAD_NOISE = 1e-5

# --- Reasons and relevance levels -----------------------------------------------
# Nearest-positive similarity (both views averaged) from which a reason names the liked paper
# or interest. Checked on citeulike-public (400 cases, 5% of candidates relevant): at >= 0.20 a
# candidate is relevant 27% of the time (5x the base rate), 70% of relevant candidates reach it
# and 90% of the others stay below; at 0.12 (an old "matches your interest") only 16%.
REASON_MIN_SIMILARITY = 0.20
# Uncalibrated "strong": relevant 46% of the time (9x the base rate); 97% of the others below.
STRONG_SIMILARITY = 0.30
CALIBRATION_MIN = 2  # a level calibrated on one paper would judge it by nothing (leave-one-out)
CALIBRATION_PAPERS = 20  # the most recent positives are enough to place today's scale


class UnknownPaper(DigestError, KeyError):
    """A paper id asked of the index is not in the stored corpus."""

    def __init__(self, paper_id: str):
        self.paper_id = paper_id
        super().__init__(f"paper {paper_id!r} is not in the corpus index")

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return self.args[0]


# --- Corpus features -----------------------------------------------------------


def _paper_text(paper: Paper) -> str:
    return " ".join([paper.title] * TITLE_REPEATS + [paper.abstract])


def _make_vectorizer(corpus_size: int, max_terms: int | None = None) -> TfidfVectorizer:
    """Raw tf * idf (no norm): the two views re-weight and normalise it themselves.

    ``corpus_size`` is the number of papers the vocabulary is fitted on;
    ``max_terms`` caps the vocabulary at the most frequent terms (None: no cap).
    """
    return TfidfVectorizer(
        stop_words="english",
        ngram_range=NGRAMS,
        # A term seen once never links two corpus papers; in a small corpus it may match an interest.
        min_df=1 if corpus_size < SMALL_CORPUS else 2,
        max_df=MAX_DF if corpus_size >= 4 else 1.0,
        max_features=max_terms,
        sublinear_tf=True,
        norm=None,
        dtype=np.float32,
    )


@dataclass(frozen=True)
class _TermTable:
    """A fitted vocabulary of words and word pairs as numbers, for :func:`_weigh`.

    Every word of a vocabulary term has an id; a word's own column (or -1)
    is ``word_column[id]``, and a pair "a b" is found by its code
    ``id(a) * words + id(b)`` among the sorted ``pair_codes``.
    """

    vocabulary: dict[str, int]  # the vectorizer's vocabulary_ the table was built from
    word_id: dict[str, int]
    word_column: np.ndarray  # int64, one more entry (-1) for the id -1 of an unknown word
    pair_codes: np.ndarray  # int64, sorted
    pair_columns: np.ndarray  # int64, the column of each code

    @classmethod
    def of(cls, vocabulary: dict[str, int]) -> _TermTable:
        word_id: dict[str, int] = {}
        singles: list[tuple[int, int]] = []
        pairs: list[tuple[int, int, int]] = []
        for term, column in vocabulary.items():
            words = term.split(" ")
            ids = [word_id.setdefault(w, len(word_id)) for w in words]
            if len(ids) == 1:
                singles.append((ids[0], column))
            elif len(ids) == 2:
                pairs.append((ids[0], ids[1], column))
        word_column = np.full(len(word_id) + 1, -1, dtype=np.int64)
        for wid, column in singles:
            word_column[wid] = column
        first, second, columns = (np.array(x, dtype=np.int64).reshape(-1)
                                  for x in zip(*pairs, strict=True)) if pairs else \
            (np.zeros(0, dtype=np.int64),) * 3
        codes = first * len(word_id) + second
        order = np.argsort(codes, kind="stable")
        return cls(vocabulary, word_id, word_column, codes[order], columns[order])

    @classmethod
    def of_terms(cls, vocabulary: dict[str, int], names: Sequence[str], first: np.ndarray,
                 second: np.ndarray) -> _TermTable:
        """The table of a vocabulary given as word numbers: term ``c`` (its column) is the
        word ``names[first[c]]``, or the pair of it and ``names[second[c]]`` when
        ``second[c] >= 0`` (what :func:`_fit_vocabulary` counted); the same table as
        :meth:`of` up to the numbering of the words."""
        single = second < 0
        used, number = np.unique(np.concatenate([first, second[~single]]), return_inverse=True)
        first_id, second_id = number[: len(first)], number[len(first) :]
        word_column = np.full(len(used) + 1, -1, dtype=np.int64)
        columns = np.arange(len(first), dtype=np.int64)
        word_column[first_id[single]] = columns[single]
        codes = first_id[~single] * len(used) + second_id
        order = np.argsort(codes, kind="stable")
        word_id = dict(zip([names[w] for w in used.tolist()], range(len(used)), strict=True))
        return cls(vocabulary, word_id, word_column, codes[order], columns[~single][order])


_TERM_TABLES: weakref.WeakKeyDictionary[TfidfVectorizer, _TermTable] = \
    weakref.WeakKeyDictionary()


def _term_table(vectorizer: TfidfVectorizer) -> _TermTable:
    """The vectorizer's :class:`_TermTable`, built once per fitted vocabulary."""
    table = _TERM_TABLES.get(vectorizer)
    if table is None or table.vocabulary is not vectorizer.vocabulary_:
        table = _TermTable.of(vectorizer.vocabulary_)
        _TERM_TABLES[vectorizer] = table
    return table


def _fit_vocabulary(vectorizer: TfidfVectorizer, texts: Sequence[str]) -> sparse.csr_matrix:
    """``vectorizer.fit_transform(texts)`` (float32 rows of tf * idf), computed faster.

    scikit-learn builds every word and word pair of a text as a string, counts
    them through a dictionary, then sorts every term seen by name and remaps the
    counts twice (sorting, then the min_df/max_df/max_features cut). Here each
    word is looked up once (its id, :func:`_weigh`'s tokens), words and pairs
    are counted as integer codes (numpy), and the names are sorted once per
    word: the separator " " sorts before every character of a word, so a term
    "a b" sorts as the pair (a, b) and the word "a" as (a, nothing first). The
    cut is scikit-learn's (the same document-frequency bounds and the same
    argsort of the same float32 totals for the cap), and scikit-learn's own
    TfidfTransformer weights the same counts, so the vocabulary, idf and rows
    are equal (tests check it). Fits ``vectorizer`` in place (``vocabulary_``,
    ``idf_``) and keeps its :class:`_TermTable`. Raises ValueError as
    scikit-learn does when no term is left.
    """
    if (tuple(vectorizer.ngram_range) != (1, 2) or vectorizer.analyzer != "word"
            or vectorizer.vocabulary is not None or vectorizer.binary
            or not vectorizer.use_idf):
        return sparse.csr_matrix(vectorizer.fit_transform(texts), dtype=np.float32)
    preprocess = vectorizer.build_preprocessor()
    tokenize = vectorizer.build_tokenizer()
    stop = vectorizer.get_stop_words() or frozenset()
    word_ids: defaultdict[str, int] = defaultdict()
    word_ids.default_factory = word_ids.__len__  # a new word gets the next id
    ids: list[int] = []
    lengths: list[int] = []
    for text in texts:
        before = len(ids)
        ids.extend(map(word_ids.__getitem__,
                       filterfalse(stop.__contains__, tokenize(preprocess(text)))))
        lengths.append(len(ids) - before)
    names = list(word_ids)  # by id
    if not names:
        raise ValueError("empty vocabulary; perhaps the documents only contain stop words")
    if min("".join(names)) <= " ":  # another token pattern: the name order below would not hold
        return sparse.csr_matrix(vectorizer.fit_transform(texts), dtype=np.float32)
    width = len(names) + 1  # a term's code: first word * width + (second word + 1, or 0)
    words = np.fromiter(ids, dtype=np.int64, count=len(ids))
    text_of = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    pair = text_of[:-1] == text_of[1:]
    codes = np.concatenate([words * width, words[:-1][pair] * width + words[1:][pair] + 1])
    docs = np.concatenate([text_of, text_of[:-1][pair]])
    # scikit-learn's order of terms: a text's words, then its pairs, text after text
    in_order = np.argsort(docs, kind="stable")
    codes, docs = codes[in_order], docs[in_order]
    term_codes, first_seen, term_of = np.unique(codes, return_index=True, return_inverse=True)
    terms = len(term_codes)
    seen = np.empty(terms, dtype=np.int64)  # its number in the order first seen
    seen[np.argsort(first_seen)] = np.arange(terms)
    doc_terms, counts = np.unique(docs * terms + seen[term_of], return_counts=True)
    count_doc, count_seen = np.divmod(doc_terms, terms)
    count_term = np.argsort(seen)[count_seen]
    first, second = np.divmod(term_codes, width)
    second -= 1  # -1: a single word
    # Terms in name order (scikit-learn's columns).
    word_rank = np.empty(len(names), dtype=np.int64)
    word_rank[sorted(range(len(names)), key=names.__getitem__)] = np.arange(len(names))
    named = np.argsort(word_rank[first] * width
                       + np.where(second >= 0, word_rank[np.maximum(second, 0)] + 1, 0))
    df = np.bincount(count_term, minlength=terms)[named]
    max_df, min_df = vectorizer.max_df, vectorizer.min_df
    # a count of papers, or a share of them (scikit-learn's rule)
    high = float(max_df) if isinstance(max_df, numbers.Integral) else max_df * len(texts)
    low = float(min_df) if isinstance(min_df, numbers.Integral) else min_df * len(texts)
    if high < low:
        raise ValueError("max_df corresponds to < documents than min_df")
    keep = (df <= high) & (df >= low)
    limit = vectorizer.max_features
    if limit is not None and keep.sum() > limit:
        # scikit-learn's cut: its totals are float32 sums of the counts (exact integers here)
        totals = np.bincount(count_term, weights=counts, minlength=terms)[named]
        capped = np.zeros(len(keep), dtype=bool)
        capped[np.flatnonzero(keep)[(-totals.astype(np.float32)[keep]).argsort()[:limit]]] = True
        keep = capped
    kept = named[keep]  # term numbers, by column
    if not len(kept):
        raise ValueError("After pruning, no terms remain. Try a lower min_df or a higher max_df.")
    column = np.full(terms, -1, dtype=np.int64)
    column[kept] = np.arange(len(kept))
    cols = column[count_term]
    found = cols >= 0
    # Each text's terms stay in the order first seen (not by column), as scikit-learn leaves
    # them: the sums over a row (its length, the SVD's products) then add in the same order.
    rows, cols, counts = count_doc[found], cols[found], counts[found]
    matrix = sparse.csr_matrix(
        (counts.astype(np.float32), cols.astype(np.int32),
         np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(texts)))])
         .astype(np.int32)),
        shape=(len(texts), len(kept)),
    )
    transformer = TfidfTransformer(norm=vectorizer.norm, use_idf=True,
                                   smooth_idf=vectorizer.smooth_idf,
                                   sublinear_tf=vectorizer.sublinear_tf)
    weighted = sparse.csr_matrix(transformer.fit(matrix).transform(matrix, copy=False),
                                 dtype=np.float32)
    first, second = first[kept], second[kept]
    vocabulary = dict(zip(
        [names[a] if b < 0 else f"{names[a]} {names[b]}"
         for a, b in zip(first.tolist(), second.tolist(), strict=True)],
        range(len(kept)),
        strict=True,
    ))
    vectorizer.vocabulary_ = vocabulary
    vectorizer.idf_ = transformer.idf_
    _TERM_TABLES[vectorizer] = _TermTable.of_terms(vocabulary, names, first, second)
    return weighted


def _weigh(vectorizer: TfidfVectorizer, texts: Sequence[str]) -> sparse.csr_matrix:
    """``vectorizer.transform(texts)`` (float32 rows of tf * idf), computed faster.

    scikit-learn builds every word pair of a text as a string and looks it up
    (a try/except per term), and most word pairs of an old paper are not in a
    capped vocabulary. Here the same preprocessor, tokenizer and stop words
    give the same words; each word is looked up once (its id), and the words
    and the pairs of adjacent words are found in the vocabulary by number
    (:class:`_TermTable`), a chunk of FIT_CHUNK texts at a time; the same
    float32 operations weight them (tests check the equality).
    """
    if tuple(vectorizer.ngram_range) != (1, 2) or vectorizer.analyzer != "word":
        return sparse.csr_matrix(vectorizer.transform(texts), dtype=np.float32)
    preprocess = vectorizer.build_preprocessor()
    tokenize = vectorizer.build_tokenizer()
    stop = vectorizer.get_stop_words() or frozenset()
    table = _term_table(vectorizer)
    word_id = table.word_id.get
    width = len(table.word_id)
    chunks = []
    for start in range(0, len(texts), FIT_CHUNK):
        ids: list[int] = []
        lengths: list[int] = []
        for text in texts[start : start + FIT_CHUNK]:
            before = len(ids)
            ids.extend(map(word_id, filterfalse(stop.__contains__, tokenize(preprocess(text))),
                           repeat(-1)))
            lengths.append(len(ids) - before)
        words = np.fromiter(ids, dtype=np.int64, count=len(ids))
        text_of = np.repeat(np.arange(len(lengths)), lengths)
        columns = table.word_column[words]  # an unknown word (-1) reads the last entry, -1
        pair = (text_of[:-1] == text_of[1:]) & (words[:-1] >= 0) & (words[1:] >= 0)
        codes = words[:-1][pair] * width + words[1:][pair]
        at = np.minimum(np.searchsorted(table.pair_codes, codes),
                        max(len(table.pair_codes) - 1, 0))
        found = (table.pair_codes[at] == codes) if len(table.pair_codes) else \
            np.zeros(len(codes), dtype=bool)
        rows = np.concatenate([text_of[columns >= 0], text_of[:-1][pair][found]])
        cols = np.concatenate([columns[columns >= 0], table.pair_columns[at[found]]])
        counts = sparse.csr_matrix(
            (np.ones(len(cols), dtype=np.float32), (rows, cols.astype(np.int32))),
            shape=(len(lengths), len(vectorizer.vocabulary_)),
        )
        counts.sum_duplicates()  # also sorts each row's columns, as scikit-learn does
        chunks.append(counts)
    if not chunks:
        return sparse.csr_matrix((0, len(vectorizer.vocabulary_)), dtype=np.float32)
    weighted = sparse.vstack(chunks, format="csr", dtype=np.float32)
    if vectorizer.sublinear_tf:
        np.log(weighted.data, weighted.data)
        weighted.data += 1.0
    weighted.data *= vectorizer.idf_[weighted.indices]
    return weighted


def _unit_rows(matrix: sparse.spmatrix) -> sparse.csr_matrix:
    """Rows scaled to unit length (empty rows stay empty); works on zero rows too."""
    matrix = sparse.csr_matrix(matrix, dtype=np.float32)
    norms = np.sqrt(np.asarray(matrix.multiply(matrix).sum(axis=1)).ravel())
    scale = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    return sparse.csr_matrix(sparse.diags(scale.astype(np.float32)) @ matrix)


def _multi_scale(latent: np.ndarray, scales: Sequence[int]) -> np.ndarray:
    """Concatenate unit vectors of several prefixes: a dot product averages cosines over scales."""
    parts = [normalize(latent[:, :k]) for k in scales]
    return (np.hstack(parts) / math.sqrt(len(parts))).astype(np.float32)


def _multi_scale_rows(latent: np.ndarray, scales: Sequence[int]) -> np.ndarray:
    """:func:`_multi_scale` for a few rows, without sklearn's per-call checks (2 ms a phrase).

    The same arithmetic as ``sklearn.preprocessing.normalize``: l2 norms by
    einsum, a norm under 10 eps counts as 1.
    """
    parts = []
    for k in scales:
        part = np.array(latent[:, :k])
        norms = np.sqrt(np.einsum("ij,ij->i", part, part))
        norms[norms < 10 * np.finfo(norms.dtype).eps] = 1.0
        part /= norms[:, None]
        parts.append(part)
    return (np.hstack(parts) / math.sqrt(len(parts))).astype(np.float32)


class CorpusIndex:
    """Features fitted (unsupervised) on the stored corpus of papers.

    ``specific`` holds the tf*idf^2 rows (unit length), ``topic`` the
    multi-scale LSA rows (unit length, or ``None`` for a corpus too small for
    a topic space), ``centrality`` each paper's closeness to the corpus mean.
    """

    def __init__(
        self,
        papers: list[Paper],
        vectorizer: TfidfVectorizer,
        specific: sparse.csr_matrix,
        topic: np.ndarray | None,
        svd: _TopicSpace | None,
        topic_mean: np.ndarray | None,
        scales: tuple[int, ...],
    ):
        self._papers = papers
        self._row = {p.id: i for i, p in enumerate(papers)}
        self._by_title = {normalise_title(p.title): p.id for p in papers}
        self.vectorizer = vectorizer
        self.specific = specific
        self.topic = topic
        self._svd = svd
        self._topic_mean = topic_mean
        self._scales = scales
        self._idf = vectorizer.idf_.astype(np.float32)
        mean = np.asarray(specific.sum(axis=0)).ravel() / max(specific.shape[0], 1)
        self.centrality = np.asarray(specific @ mean).ravel().astype(np.float32)
        self._terms = vectorizer.get_feature_names_out()
        self.vocabulary_key = _vocabulary_key(self._terms, self._idf, scales)
        # Names this fitted index: a model holds index rows, valid for this index only.
        self.fit_id = uuid.uuid4().hex
        self._memo = _IndexMemo(self.specific, self.topic)
        self._popularity: np.ndarray | None = None
        self._idf_scale: np.ndarray | None = None

    def __getstate__(self) -> dict[str, object]:
        """Pickled without the memos (a lock, and caches the other process refills)."""
        state = dict(self.__dict__)
        del state["_memo"]
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._memo = _IndexMemo(self.specific, self.topic)

    @classmethod
    def fit(cls, papers: Sequence[Paper], bounds: FitBounds | None = None) -> CorpusIndex:
        """Fit both views on the corpus (duplicates by id are kept once).

        ``bounds`` (default CORPUS_FIT) limits what the vocabulary, idf and
        topic space are fitted on, so the fit's time and memory stay bounded
        as listings accumulate; every paper is still in the index. The papers
        outside the window are weighted and projected FIT_CHUNK at a time
        (:func:`_weigh_corpus`): beyond the window the fit costs the index's
        own rows (about 2 KB a paper) and the time to read each paper once.
        """
        bounds = bounds or CORPUS_FIT
        unique = list({p.id: p for p in papers}.values())
        chosen = _fit_rows(len(unique), bounds)
        window = [_paper_text(unique[i]) for i in chosen]
        vectorizer = _make_vectorizer(len(window), bounds.max_terms)
        try:
            fitted = _fit_vocabulary(vectorizer, window or [""])
        except ValueError:  # no usable term at all (empty corpus, stop words only)
            vectorizer = TfidfVectorizer(token_pattern=r"(?u)\b\w+\b", norm=None, dtype=np.float32)
            fitted = vectorizer.fit_transform(window + ["empty"])
        vectorizer.stop_words_ = None  # the terms cut by min_df/max_df: large, never needed again
        fitted = sparse.csr_matrix(fitted[: len(window)], dtype=np.float32)
        del window
        idf = vectorizer.idf_.astype(np.float32)
        svd, scales = _fit_svd(_unit_rows(fitted), bounds) if unique else (None, ())
        # Every paper, a chunk at a time: its text is made, weighted (the window's rows are
        # reused) and dropped, so the fit holds no text or weighted matrix of the whole corpus.
        specific, latent, unit_sum = _weigh_corpus(unique, chosen, fitted, vectorizer, svd,
                                                   scales)
        del fitted
        topic, topic_mean = None, None
        if svd is not None:
            topic, topic_mean = _centred_topics(latent, unit_sum / max(len(unique), 1), svd,
                                                scales)
        log.info(
            "corpus index: %d papers, %d terms (fitted on %d of the papers), topic space %s",
            len(unique),
            len(idf),
            len(chosen),
            scales or "none",
        )
        return cls(unique, vectorizer, specific, topic, svd if topic is not None else None,
                   topic_mean, scales)

    @property
    def matrix(self) -> sparse.csr_matrix:
        """The specific view (unit rows, so a dot product is a cosine); the first version's name."""
        return self.specific

    def __contains__(self, paper_id: object) -> bool:
        return paper_id in self._row

    def known(self, paper_ids: Iterable[str]) -> list[str]:
        """The ids that are in the corpus, in their order (``[i for i in ids if i in index]``
        without a Python call per id: a dispatch asks it of ~100 candidates per subscriber)."""
        return list(filter(self._row.__contains__, paper_ids))

    def __len__(self) -> int:
        return len(self._papers)

    def paper(self, paper_id: str) -> Paper:
        try:
            return self._papers[self._row[paper_id]]
        except KeyError:
            raise UnknownPaper(paper_id) from None

    def rows(self, paper_ids: Sequence[str]) -> np.ndarray:
        try:
            return np.fromiter(
                map(self._row.__getitem__, paper_ids), dtype=np.int64, count=len(paper_ids)
            )
        except KeyError as exc:
            raise UnknownPaper(str(exc.args[0])) from None

    def resolve(self, reference: str) -> str | None:
        """A seed paper named by id, arXiv id or exact (normalised) title, if stored."""
        ref = reference.strip()
        if ref in self._row:
            return ref
        bare = ref.removeprefix("arXiv:").removeprefix("arxiv:")
        if bare in self._row:
            return bare
        return self._by_title.get(normalise_title(ref))

    def term(self, column: int) -> str:
        return str(self._terms[column])

    def text_vectors(self, text: str) -> tuple[sparse.csr_matrix, np.ndarray | None]:
        """A text outside the corpus (a library entry) in both views, as a paper would be."""
        weighted = self.vectorizer.transform([text]).astype(np.float32)
        specific = self._specific_row(weighted)
        if weighted.nnz == 0:
            return specific, None
        return specific, self._topic_of(weighted)

    def _specific_row(self, weighted: sparse.csr_matrix) -> sparse.csr_matrix:
        """tf*idf rows in the specific view: ``weighted @ diags(idf ** (power - 1))``, unit rows.

        Each term scaled by its own weight (the same single products), without
        raising every idf of the vocabulary to the power and building a
        terms x terms diagonal on each call (a few ms a phrase). Row by row:
        a row's result does not depend on the other rows.
        """
        if self._idf_scale is None:
            self._idf_scale = self._idf ** (SPECIFIC_IDF_POWER - 1)
        scaled = sparse.csr_matrix(weighted, dtype=np.float32, copy=True)
        scaled.data *= self._idf_scale[scaled.indices]
        unit = _unit_rows(scaled)
        unit.sort_indices()  # terms in column order: sums over them run in one order everywhere
        return unit

    def _topic_of(self, weighted: sparse.csr_matrix) -> np.ndarray | None:
        """tf*idf rows in the topic space (rows x sum(scales)); None without a topic space.

        The same as ``svd.transform`` but gathering only each row's own terms'
        components: ``transform`` multiplies by ``components_.T``, which scipy
        first copies whole (128 x terms) on every call, about 20 ms on the
        580-day corpus for a two-word phrase. Row by row, so a row's result
        does not depend on the other rows (a batch of phrases gives what one
        phrase at a time gives).
        """
        if self._svd is None or self._topic_mean is None:
            return None
        unit = _unit_rows(weighted)
        components = self._svd.components_
        latent = np.zeros((unit.shape[0], components.shape[0]), dtype=components.dtype)
        for i in range(unit.shape[0]):
            terms = slice(unit.indptr[i], unit.indptr[i + 1])
            latent[i] = components[:, unit.indices[terms]] @ unit.data[terms].astype(
                components.dtype)
        return _multi_scale_rows(latent - self._topic_mean, self._scales)

    def phrase_matches(
        self, phrase: str
    ) -> tuple[np.ndarray, sparse.csr_matrix, np.ndarray | None]:
        """Rows of the corpus papers an interest phrase matches best, and the phrase's vectors.

        A two-word phrase matched against abstracts gives cosines several times
        larger than paper-to-paper ones, so a phrase alone would drown the likes.
        It shares its weight with its best matches among the stored papers
        (those sharing at least one term), which compare as papers do.
        Matched once per distinct phrase and fitted index (memoised, bounded by
        PHRASE_MEMO_BYTES); thread-safe. Returns (rows: int64, at most
        PHRASE_MATCHES, best first; specific: 1 x terms, unit length or empty
        when no term is known; topic: 1 x sum(scales) float32, or None without
        a topic space).
        """
        match = self._phrase(phrase)
        return match.rows, match.specific, match.topic

    def warm_phrases(self, phrases: Iterable[str]) -> int:
        """Match every distinct phrase not matched yet, in batches; how many were matched.

        For a dispatch: its subscribers' interest phrases all at once (one
        transform, one sparse and one dense product per batch of phrases)
        before they are ranked one by one. Each phrase's match is exactly what
        :meth:`phrase_matches` gives for it alone (see :meth:`_match_phrases`).
        Phrases are stripped as profiles strip them; empty ones are skipped.
        Bounded by PHRASE_MEMO_BYTES like any match: past it, the least
        recently used matches are dropped (and matched again when asked).
        """
        wanted = [p for p in dict.fromkeys(s.strip() for s in phrases)
                  if p and self._memo.phrase(p) is None]
        batch = max(1, PHRASE_BATCH_ENTRIES // max(len(self), 1))
        for start in range(0, len(wanted), batch):
            chunk = wanted[start : start + batch]
            for phrase, match in zip(chunk, self._match_phrases(chunk), strict=True):
                self._memo.keep_phrase(phrase, match)
        return len(wanted)

    def _phrase(self, phrase: str) -> _PhraseMatch:
        """The memoised match of a phrase: its best rows and its own vectors."""
        found = self._memo.phrase(phrase)
        if found is not None:
            return found
        match = self._match_phrases([phrase])[0]
        self._memo.keep_phrase(phrase, match)
        return match

    def _match_phrases(self, phrases: Sequence[str]) -> list[_PhraseMatch]:
        """Match phrases against the corpus, all at once; each one as if matched alone.

        All phrases are weighted in one pass and put in both views row by row
        (a row's vectors do not depend on the other rows). Only papers sharing
        a term with a phrase can be its match: one sparse product through the
        postings of the phrases' terms (the corpus transposed) gives their
        specific cosines, and one float32 product gives every topic cosine
        roughly (BLAS blocks it by the batch, so the last bits depend on the
        batch). The roughly best papers, all within twice SCREEN_ERROR of the
        PHRASE_MATCHES-th, are then scored exactly (:func:`_topic_products`,
        entry by entry), and the best PHRASE_MATCHES kept, equal scores in
        corpus order: the same rows whatever the batch, and the rows a full
        exact ranking of the corpus would give.
        """
        weighted = _weigh(self.vectorizer, phrases)
        specific = self._specific_row(weighted)
        topic = self._topic_of(weighted)
        if topic is not None:
            # No known term: no topic either (centring would point it at the anti-mean).
            topic *= (np.diff(weighted.indptr) > 0)[:, None]
        shared = sparse.csr_matrix(specific @ self._memo.transposed())
        shared.sort_indices()
        rough = None
        if self.topic is not None and topic is not None:
            with _one_blas_thread():
                rough = topic @ self.topic.T
        matches = []
        for i in range(len(phrases)):
            cols = shared.indices[shared.indptr[i] : shared.indptr[i + 1]]
            values = shared.data[shared.indptr[i] : shared.indptr[i + 1]]
            eligible = values > 0
            cols, values = cols[eligible], values[eligible]
            own_topic = topic[i : i + 1] if topic is not None else None
            if rough is not None and len(cols) > PHRASE_MATCHES:
                near = _near_top((values + rough[i, cols]) / 2, PHRASE_MATCHES)
                cols, values = cols[near], values[near]
            sims = values
            if self.topic is not None and own_topic is not None and len(cols):
                sims = (values + _topic_products(self.topic[cols], own_topic)[:, 0]) / 2
            rows = cols[_top_rows(sims, PHRASE_MATCHES)].astype(np.int64)
            matches.append(_PhraseMatch(rows, specific[i], own_topic))
        return matches

    def popularity(self, rows: np.ndarray) -> np.ndarray:
        """Per row: upvotes plus 0.5 / listing rank (see :func:`_popularity`), float64."""
        if self._popularity is None:
            self._popularity = np.array([_popularity_of(p) for p in self._papers],
                                        dtype=np.float64)
        return self._popularity[rows]

    def similarities(
        self, rows: np.ndarray, cols: np.ndarray, *, shared: bool = False, asker: int = -2
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Cosines of papers ``rows`` to papers ``cols`` in both views: (len(rows) x len(cols))
        float32 arrays, the topic one None without a topic space.

        ``shared=True`` for rows many subscribers ask about (today's candidates):
        each such row's similarity to the whole corpus is computed once, in
        batches, and kept (up to SIMILARITY_MEMO_BYTES, least recently used
        rows dropped beyond it) once a second scoring (``asker``) asks for
        it; before that, and past the bound, it is computed directly. Both
        ways give the same specific cosines (the same products summed in the
        same order) and the same topic cosines (see :func:`_topic_products`).
        """
        rows = np.asarray(rows, dtype=np.int64)
        cols = np.asarray(cols, dtype=np.int64)
        if shared:
            found = self._memo.gather(rows, cols, asker)
            if found is not None:
                return found
        return self.direct_similarities(rows, cols)

    def postings_products(self, rows: np.ndarray, vector: sparse.csr_matrix) -> np.ndarray:
        """The specific cosines of papers ``rows`` to a 1 x terms ``vector`` (float32, len(rows)).

        Through the postings of the vector's few terms (the corpus transposed),
        summed term by term in column order: the same sums, in the same order,
        as ``vector @ corpus.T`` (a phrase matched against every paper) gives.
        """
        postings = self._memo.transposed()
        result = np.zeros(len(rows), dtype=np.float32)
        for term, weight in zip(vector.indices, vector.data, strict=True):
            start, end = postings.indptr[term], postings.indptr[term + 1]
            papers = postings.indices[start:end]
            at = np.minimum(np.searchsorted(papers, rows), max(len(papers) - 1, 0))
            found = (papers[at] == rows) if len(papers) else np.zeros(len(rows), dtype=bool)
            result += weight * np.where(found, postings.data[start + at], np.float32(0))
        return result

    def phrase_products(self, phrase: str, vector: sparse.csr_matrix,
                        rows: np.ndarray) -> np.ndarray:
        """:meth:`postings_products` of an interest ``phrase``'s ``vector`` (float32, len(rows)).

        Through the phrase's cosines to every corpus paper, summed term by term in the
        same order and kept per phrase (PHRASE_ROW_MEMO_BYTES): the same floats.
        ``vector`` must be the phrase's own (``_phrase(phrase).specific`` on this index).
        """
        whole = self._memo.phrase_row(phrase)
        if whole is None:
            whole = self._phrase_row(vector)
            self._memo.keep_phrase_row(phrase, whole)
        return whole[rows]

    def _phrase_row(self, vector: sparse.csr_matrix) -> np.ndarray:
        """A 1 x terms ``vector``'s specific cosines to every corpus paper (float32).

        Each paper's sum runs over the vector's terms in column order, adding
        ``weight * value`` as :meth:`postings_products` does (a term the paper
        lacks adds nothing there either: x + 0.0 is x).
        """
        postings = self._memo.transposed()
        result = np.zeros(self.specific.shape[0], dtype=np.float32)
        for term, weight in zip(vector.indices, vector.data, strict=True):
            start, end = postings.indptr[term], postings.indptr[term + 1]
            result[postings.indices[start:end]] += weight * postings.data[start:end]
        return result

    def limit_memo(self, *, similarity_bytes: int, phrase_bytes: int,
                   phrase_row_bytes: int = PHRASE_ROW_MEMO_BYTES,
                   result_entries: int = SHARED_RESULT_ENTRIES) -> None:
        """Start the memos afresh with these bounds in bytes (entries for the shared
        rankings; 0 keeps nothing)."""
        self._memo = _IndexMemo(self.specific, self.topic, similarity_bytes=similarity_bytes,
                                phrase_bytes=phrase_bytes, phrase_row_bytes=phrase_row_bytes,
                                result_entries=result_entries)

    def memo_counts(self) -> tuple[int, int]:
        """(distinct phrases matched, candidate rows computed against the corpus) so far."""
        return self._memo.phrases_matched, self._memo.rows_computed

    def shared_results_reused(self) -> int:
        """Rankings of shared profiles answered from the memo so far (SHARED_RESULT_ENTRIES)."""
        return self._memo.results_reused

    def direct_similarities(
        self, rows: np.ndarray, cols: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`similarities` computed now, nothing kept (few rows, or rows asked once)."""
        spec = _sparse_products(self.specific[rows], self.specific[cols])
        topic = _topic_products(self.topic[rows], self.topic[cols]) if self.topic is not None \
            else None
        return spec, topic


@dataclass(frozen=True)
class _PhraseMatch:
    """An interest phrase matched against one fitted index, kept for every subscriber.

    Small (a few hundred bytes): its similarities to the papers being scored
    are computed with theirs, as a library entry's are.
    """

    rows: np.ndarray  # its best-matching corpus rows (PHRASE_MATCHES at most)
    specific: sparse.csr_matrix  # 1 x terms, unit length (empty when no term is known)
    topic: np.ndarray | None  # 1 x sum(scales)

    @property
    def nbytes(self) -> int:
        arrays = [self.rows, self.specific.data, self.specific.indices, self.specific.indptr]
        arrays += [self.topic] if self.topic is not None else []
        return sum(a.nbytes for a in arrays) + PHRASE_OVERHEAD


def _near_top(rough: np.ndarray, k: int) -> np.ndarray:
    """Positions whose rough value is within 2 * SCREEN_ERROR of the k-th largest (sorted).

    If every rough value is within SCREEN_ERROR of its exact value, these
    hold every position among the exact k largest, ties included: a position
    in the exact top k is at least the exact k-th largest, minus the error;
    the rough k-th largest is at most that plus the error. NaN (never
    expected) keeps every position.
    """
    if len(rough) <= k or np.isnan(rough).any():
        return np.arange(len(rough))
    kth = np.partition(rough, len(rough) - k)[len(rough) - k]
    return np.flatnonzero(rough >= kth - 2 * SCREEN_ERROR)


def _top_rows(values: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` largest values, largest first, equal values in position order.

    What ``np.argsort(-values, kind="stable")[:k]`` gives, without sorting
    them all: a partition finds the k-th largest value, and only the values
    at least that large (ties included) are sorted. NaN (never expected)
    sorts last, as argsort puts it.
    """
    if len(values) <= k or np.isnan(values).any():
        return np.argsort(-values, kind="stable")[:k]
    kth = np.partition(values, len(values) - k)[len(values) - k]
    contenders = np.flatnonzero(values >= kth)
    return contenders[np.argsort(-values[contenders], kind="stable")[:k]]


def _sparse_products(a: sparse.csr_matrix, b: sparse.csr_matrix) -> np.ndarray:
    """a @ b.T as a dense float32 array (each entry sums a's row terms in a's order)."""
    return _dense(a @ b.T)


def _topic_products(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b.T summed in float64 and rounded to float32 (len(a) x len(b)).

    In float64 an entry hardly depends on how the product is blocked (a
    batch of rows or one, all the corpus or a few columns), and rounding to
    float32 removes what is left, so a memoised similarity and one computed
    again after eviction are the same float32: the same state gives the same
    digest. Small products go through einsum: OpenBLAS runs even a 20 x 150
    float64 product on threads, 60 ms on a busy machine instead of 0.4 ms.
    """
    wide_a, wide_b = a.astype(np.float64), b.astype(np.float64)
    if a.shape[0] * b.shape[0] <= SMALL_PRODUCT:
        return np.einsum("ik,jk->ij", wide_a, wide_b).astype(np.float32)
    return np.asarray(wide_a @ wide_b.T).astype(np.float32)


def _block_bytes(key: tuple[str, bytes],
                 block: tuple[np.ndarray, np.ndarray | None]) -> int:
    """What a phrase block holds, as counted against PHRASE_BLOCK_BYTES (its key's rows too)."""
    spec, topic = block
    return spec.nbytes + (topic.nbytes if topic is not None else 0) + len(key[1]) + PHRASE_OVERHEAD


class _IndexMemo:
    """What a fitted index keeps between subscribers: phrase matches and candidate similarities.

    Candidate similarities live in two preallocated float32 slabs (slots x
    corpus papers; pages are only touched when written), one slot per
    candidate row, the least recently used slot reused when full. Both parts
    are bounded in bytes and thread-safe.
    """

    def __init__(
        self,
        specific: sparse.csr_matrix,
        topic: np.ndarray | None,
        *,
        similarity_bytes: int = SIMILARITY_MEMO_BYTES,
        phrase_bytes: int = PHRASE_MEMO_BYTES,
        phrase_row_bytes: int = PHRASE_ROW_MEMO_BYTES,
        result_entries: int = SHARED_RESULT_ENTRIES,
    ):
        self._specific = specific
        self._topic = topic
        n = specific.shape[0]
        row_bytes = 4 * n * (1 if topic is None else 2)
        self.capacity = min(n, similarity_bytes // row_bytes) if row_bytes else 0
        self._lock = threading.Lock()
        self._slot_of_row = np.full(n, -1, dtype=np.int64)
        # Who asked for a row last: a row is kept only once a second scoring asks for it, so
        # candidates nobody shares (the quality benchmark's cases) never cost a corpus pass.
        self._asked_by = np.full(n, -1, dtype=np.int64)
        self._row_of_slot = np.full(self.capacity, -1, dtype=np.int64)
        self._used = np.zeros(self.capacity, dtype=np.int64)
        self._tick = 0
        self._spec: np.ndarray | None = None
        self._topic_rows: np.ndarray | None = None
        self._specific_t: sparse.csr_matrix | None = None
        self.rows_computed = 0  # candidate rows computed against the corpus (tests, logs)
        self._phrase_lock = threading.Lock()
        self._phrases: OrderedDict[str, _PhraseMatch] = OrderedDict()
        self._phrase_bytes = 0
        self._phrase_limit = phrase_bytes
        self.phrases_matched = 0  # distinct phrases matched against the corpus (tests, logs)
        self._phrase_rows: OrderedDict[str, np.ndarray] = OrderedDict()
        self._phrase_row_bytes = 0
        self._phrase_row_limit = phrase_row_bytes
        self._narrow: OrderedDict[bytes, float] = OrderedDict()
        self._blocks: OrderedDict[tuple[str, bytes], tuple[np.ndarray, np.ndarray | None]] = \
            OrderedDict()
        self._block_bytes = 0
        self._results: OrderedDict[tuple[object, ...], tuple[Ranked, ...]] = OrderedDict()
        self._result_limit = result_entries
        self.results_reused = 0  # rankings answered from _results (tests, logs)

    def phrase_block(
        self, phrase: str, rows: np.ndarray,
        compute: Callable[[], tuple[np.ndarray, np.ndarray | None]],
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """``compute()``: the phrase's points' similarities to papers ``rows`` (both views),
        kept up to PHRASE_BLOCK_BYTES, least recently used dropped first. Read only."""
        key = (phrase, rows.tobytes())
        with self._phrase_lock:
            found = self._blocks.get(key)
            if found is not None:
                self._blocks.move_to_end(key)
                return found
        block = compute()
        size = _block_bytes(key, block)
        with self._phrase_lock:
            if key not in self._blocks and size <= PHRASE_BLOCK_BYTES:
                self._blocks[key] = block
                self._block_bytes += size
                while self._block_bytes > PHRASE_BLOCK_BYTES:
                    self._block_bytes -= _block_bytes(*self._blocks.popitem(last=False))
        return block

    def narrowness(self, rows: np.ndarray, compute: Callable[[], float]) -> float:
        """``compute()`` for this set of rows (in this order), kept (NARROWNESS_ENTRIES)."""
        key = rows.tobytes()
        with self._phrase_lock:
            found = self._narrow.get(key)
            if found is not None:
                self._narrow.move_to_end(key)
                return found
        value = compute()
        with self._phrase_lock:
            self._narrow[key] = value
            while len(self._narrow) > NARROWNESS_ENTRIES:
                self._narrow.popitem(last=False)
        return value

    def result(self, key: tuple[object, ...]) -> tuple[Ranked, ...] | None:
        """A kept ranking of a shared profile (see SHARED_RESULT_ENTRIES), or None."""
        with self._phrase_lock:
            found = self._results.get(key)
            if found is not None:
                self._results.move_to_end(key)
                self.results_reused += 1
            return found

    def keep_result(self, key: tuple[object, ...], items: tuple[Ranked, ...]) -> None:
        with self._phrase_lock:
            if self._result_limit <= 0:
                return
            self._results[key] = items
            self._results.move_to_end(key)
            while len(self._results) > self._result_limit:
                self._results.popitem(last=False)

    def phrase(self, phrase: str) -> _PhraseMatch | None:
        with self._phrase_lock:
            found = self._phrases.get(phrase)
            if found is not None:
                self._phrases.move_to_end(phrase)
            return found

    def keep_phrase(self, phrase: str, match: _PhraseMatch) -> None:
        with self._phrase_lock:
            self.phrases_matched += 1
            if phrase in self._phrases:  # another thread matched it meanwhile (the same match)
                return
            self._phrases[phrase] = match
            self._phrase_bytes += match.nbytes
            while self._phrase_bytes > self._phrase_limit and self._phrases:
                _, dropped = self._phrases.popitem(last=False)
                self._phrase_bytes -= dropped.nbytes

    def phrase_row(self, phrase: str) -> np.ndarray | None:
        with self._phrase_lock:
            found = self._phrase_rows.get(phrase)
            if found is not None:
                self._phrase_rows.move_to_end(phrase)
            return found

    def keep_phrase_row(self, phrase: str, row: np.ndarray) -> None:
        with self._phrase_lock:
            if phrase in self._phrase_rows or row.nbytes > self._phrase_row_limit:
                return
            self._phrase_rows[phrase] = row
            self._phrase_row_bytes += row.nbytes
            while self._phrase_row_bytes > self._phrase_row_limit:
                _, dropped = self._phrase_rows.popitem(last=False)
                self._phrase_row_bytes -= dropped.nbytes

    def transposed(self) -> sparse.csr_matrix:
        """terms x papers: the specific view transposed (a term's row lists its papers)."""
        with self._lock:
            if self._specific_t is None:
                self._specific_t = _postings(self._specific)
            return self._specific_t

    def gather(
        self, rows: np.ndarray, cols: np.ndarray, asker: int
    ) -> tuple[np.ndarray, np.ndarray | None] | None:
        """Similarities of ``rows`` to ``cols`` from the slabs (filling them); None past
        capacity, when a missing row was not yet asked for by another scoring than
        ``asker``, or once the memo thrashes (``SIMILARITY_TURNOVERS``): computed
        directly then."""
        if self.capacity == 0 or self.rows_computed > SIMILARITY_TURNOVERS * self.capacity:
            return None
        with self._lock:
            slots = self._slot_of_row[rows]
            if not (slots >= 0).all():  # all held (the usual case): nothing to look up
                wanted = np.unique(rows)
                if len(wanted) > self.capacity:
                    return None
                slots = self._slot_of_row[wanted]
                missing = wanted[slots < 0]
                first = self._asked_by[missing]
                if len(missing) and np.any((first < 0) | (first == asker)):
                    self._asked_by[missing] = asker
                    return None
                if len(missing):
                    self._fill(missing, keep=slots[slots >= 0])
                slots = self._slot_of_row[rows]
            self._tick += 1
            self._used[slots] = self._tick
            if self._spec is None:  # pragma: no cover - _fill allocated it
                return None
            # Positions in the flattened slabs: one index for both, and a take costs ~35%
            # less than the same gather by a broadcast (rows, cols) fancy index.
            at = (slots * self._spec.shape[1])[:, None] + cols[None, :]
            spec = self._spec.reshape(-1).take(at)
            topic = (self._topic_rows.reshape(-1).take(at) if self._topic_rows is not None
                     else None)
        return spec, topic

    def _fill(self, missing: np.ndarray, keep: np.ndarray) -> None:
        """Compute ``missing`` rows into free slots, or the least recently used not in ``keep``."""
        n = self._specific.shape[0]
        if self._specific_t is None:
            self._specific_t = _postings(self._specific)
        if self._spec is None:
            self._spec = np.empty((self.capacity, n), dtype=np.float32)
            if self._topic is not None:
                self._topic_rows = np.empty((self.capacity, n), dtype=np.float32)
        free = np.flatnonzero(self._row_of_slot < 0)
        need = len(missing) - len(free)
        if need > 0:
            held = np.flatnonzero(self._row_of_slot >= 0)
            held = held[~np.isin(held, keep)]
            oldest = held[np.argsort(self._used[held], kind="stable")[:need]]
            self._slot_of_row[self._row_of_slot[oldest]] = -1
            self._row_of_slot[oldest] = -1
            free = np.concatenate([free, oldest])
        slots = free[: len(missing)]
        for start in range(0, len(missing), SIMILARITY_BATCH):
            part = missing[start : start + SIMILARITY_BATCH]
            where = slots[start : start + SIMILARITY_BATCH]
            self._spec[where] = _dense(self._specific[part] @ self._specific_t)
            if self._topic_rows is not None and self._topic is not None:
                self._topic_rows[where] = _topic_products(self._topic[part], self._topic)
        self.rows_computed += len(missing)
        self._row_of_slot[slots] = missing
        self._slot_of_row[missing] = slots


@functools.cache
def _blas_controller() -> ThreadpoolController:
    """The process's BLAS libraries, found once (finding them costs ~4 ms a call)."""
    return ThreadpoolController()


def _one_blas_thread() -> contextlib.AbstractContextManager[object]:
    """BLAS on one thread for the block: on a busy 2-core machine more threads cost 5x the
    CPU for the same product (measured 3.2 s vs 16 s for the corpus SVD), and a product's
    result is then the same on machines with any core count."""
    return _blas_controller().limit(limits=1, user_api="blas")


def _postings(specific: sparse.csr_matrix) -> sparse.csr_matrix:
    """terms x papers, each term's papers in row order (the specific view transposed)."""
    postings = specific.T.tocsr()
    postings.sort_indices()
    return postings


def _fit_rows(count: int, bounds: FitBounds) -> np.ndarray:
    """Which of ``count`` papers (in corpus order) the vocabulary, idf and SVD are fitted on."""
    if bounds.window is None or bounds.window >= count:
        return np.arange(count)
    if bounds.spread:  # evenly spaced over the whole corpus, first and last included
        return np.unique(np.linspace(0, count - 1, bounds.window).round().astype(np.int64))
    return np.arange(count - bounds.window, count)


@dataclass(frozen=True, eq=False)
class _TopicSpace:
    """The LSA space: ``components_`` (k x terms, float32) are the top k right singular
    vectors of the window's unit tf*idf rows, largest singular value first, each signed so
    that its largest-magnitude entry is positive (scikit-learn's rule for TruncatedSVD)."""

    components_: np.ndarray

    def transform(self, rows: sparse.spmatrix) -> np.ndarray:
        """Rows (n x terms) in the space, n x k: ``rows @ components_.T``, as
        ``TruncatedSVD.transform`` computes it."""
        return np.asarray(sparse.csr_matrix(rows) @ self.components_.T)


def _fit_svd(
    unit_window: sparse.csr_matrix, bounds: FitBounds
) -> tuple[_TopicSpace | None, tuple[int, ...]]:
    """The LSA space of the window's unit tf*idf rows and its scales; none for a tiny corpus.

    Up to EXACT_TOPIC_PAPERS rows it is the exact truncated SVD
    (:func:`_exact_components`), above that scikit-learn's randomized SVD
    (``bounds.svd_iterations`` power iterations, seed SVD_SEED). Both on one
    BLAS thread, so the space is the same on any machine's core count.
    """
    rank = min(max(TOPIC_SCALES), unit_window.shape[0] - 1, unit_window.shape[1] - 1)
    scales = tuple(k for k in TOPIC_SCALES if k <= rank) or ((rank,) if rank >= 2 else ())
    if not scales:
        return None, ()
    with _one_blas_thread():
        if unit_window.shape[0] <= EXACT_TOPIC_PAPERS:
            return _TopicSpace(_exact_components(unit_window, max(scales))), scales
        svd = TruncatedSVD(
            n_components=max(scales),
            random_state=SVD_SEED,
            algorithm="randomized",
            n_iter=bounds.svd_iterations,
        )
        svd.fit(unit_window)
    return _TopicSpace(svd.components_), scales


def _exact_components(rows: sparse.csr_matrix, k: int) -> np.ndarray:
    """The top ``k`` right singular vectors of ``rows`` (papers x terms, fewer papers than
    terms, k < papers), exactly: k x terms, float32, signed as :class:`_TopicSpace` says.

    From the papers x papers Gram matrix ``G = rows @ rows.T`` (float64): its top
    eigenpairs (LAPACK, no random start) are the left singular vectors ``u`` and the
    squared singular values ``s**2``, and ``v = rows.T @ u / s``. A direction with a
    singular value under SINGULAR_FLOOR of the largest carries no paper (duplicate
    texts): it stays all zero rather than magnify rounding. The Gram matrix squares the
    condition, so float64: the eigenvalues are exact to about 1e-16 of the largest, far
    below the 128th singular value's square (~0.1 of the largest on the bench corpora).
    """
    rows64 = sparse.csr_matrix(rows, dtype=np.float64)
    gram = (rows64 @ rows64.T).toarray()
    n = gram.shape[0]
    values, vectors = linalg.eigh(gram, subset_by_index=[n - k, n - 1], check_finite=False)
    values, vectors = values[::-1], np.ascontiguousarray(vectors[:, ::-1])  # largest first
    singular = np.sqrt(np.maximum(values, 0.0))
    scale = np.divide(1.0, singular, out=np.zeros_like(singular),
                      where=singular > SINGULAR_FLOOR * singular[0])
    components = np.ascontiguousarray(np.asarray(rows64.T @ vectors).T)
    components *= scale[:, None]
    components = components.astype(np.float32)
    biggest = np.argmax(np.abs(components), axis=1)
    components *= np.sign(components[np.arange(k), biggest])[:, None]
    return components


def _weigh_corpus(
    papers: Sequence[Paper],
    fit_rows: np.ndarray,
    fitted: sparse.csr_matrix,
    vectorizer: TfidfVectorizer,
    svd: _TopicSpace | None,
    scales: tuple[int, ...],
) -> tuple[sparse.csr_matrix, np.ndarray | None, np.ndarray]:
    """Every paper in the specific view, its topic-space projection, and the sum of its unit
    tf*idf rows (float64, 1 x terms), FIT_CHUNK papers at a time.

    ``fitted`` holds the tf*idf rows of the papers ``fit_rows`` (sorted): those
    are reused, the others weighted with the same vocabulary (:func:`_weigh`).
    Each step works row by row, so the chunking changes no result. The
    projection is ``svd.transform`` (uncentred), in the first max(scales)
    columns of a float32 papers x sum(scales) array that
    :func:`_centred_topics` turns into the topic rows; None without a
    topic space.
    """
    count = len(papers)
    fit_at = np.full(count, -1, dtype=np.int64)
    fit_at[fit_rows] = np.arange(len(fit_rows))
    idf_scale = sparse.diags(vectorizer.idf_.astype(np.float32) ** (SPECIFIC_IDF_POWER - 1))
    components = None
    topic = None
    if svd is not None and scales:
        components = np.ascontiguousarray(svd.components_.T)
        topic = np.empty((count, sum(scales)), dtype=np.float32)  # the latent rows, at first
    unit_sum = np.zeros(len(vectorizer.idf_), dtype=np.float64)
    parts: list[sparse.csr_matrix] = []
    with _one_blas_thread():
        for start in range(0, count, FIT_CHUNK):
            rows = np.arange(start, min(start + FIT_CHUNK, count))
            reused = fit_at[rows] >= 0
            old = rows[~reused]
            pieces = [_weigh(vectorizer, [_paper_text(papers[i]) for i in old])] if len(old) \
                else []
            pieces += [fitted[fit_at[rows[reused]]]] if reused.any() else []
            weighted = sparse.vstack(pieces, format="csr", dtype=np.float32)
            if len(old) and reused.any():  # back in corpus order
                weighted = weighted[np.argsort(np.concatenate([old, rows[reused]]),
                                               kind="stable")]
            parts.append(_unit_rows(weighted @ idf_scale))
            unit = _unit_rows(weighted)
            unit_sum += np.asarray(unit.sum(axis=0, dtype=np.float64)).ravel()
            if topic is not None and components is not None:
                topic[rows, : components.shape[1]] = unit @ components  # = svd.transform
    if not parts:
        return sparse.csr_matrix((0, len(vectorizer.idf_)), dtype=np.float32), topic, unit_sum
    return sparse.vstack(parts, format="csr", dtype=np.float32), topic, unit_sum


def _centred_topics(
    topic: np.ndarray | None, unit_mean: np.ndarray, svd: _TopicSpace, scales: tuple[int, ...]
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The multi-scale topic rows, centred on the corpus mean, and that mean (latent space).

    ``topic`` holds each paper's projection (``svd.transform``) in its first
    max(scales) columns; it is turned into the topic rows in place, FIT_CHUNK
    rows at a time. The projection is linear: the mean of the projected rows
    is the projected mean row (``unit_mean``, 1 x terms).
    """
    if topic is None:
        return None, None
    mean = (sparse.csr_matrix(unit_mean[None, :], dtype=np.float32)
            @ np.ascontiguousarray(svd.components_.T))[0]
    width = svd.components_.shape[0]
    for start in range(0, topic.shape[0], FIT_CHUNK):
        part = slice(start, start + FIT_CHUNK)
        topic[part] = _multi_scale(topic[part, :width] - mean, scales)
    return topic, mean


def _vocabulary_key(terms: np.ndarray, idf: np.ndarray, scales: tuple[int, ...]) -> str:
    """Changes whenever the fitted terms or their weights change (a model is tied to both)."""
    digest = hashlib.sha256()
    digest.update(
        json.dumps([TITLE_REPEATS, list(NGRAMS), MAX_DF, SPECIFIC_IDF_POWER, list(scales)]).encode()
    )
    digest.update("\n".join(terms.tolist()).encode("utf-8"))
    digest.update(np.round(idf, 4).tobytes())
    return digest.hexdigest()[:16]


# --- Profiles and results --------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """What one subscriber has told us, as paper ids and phrases.

    ``ages`` gives, per paper id, whole days since the signal (since the
    digest that showed it, for an unrated paper); a paper without an age
    counts fully. ``seed_texts`` are (title, abstract) pairs of library
    entries, used as positives even when the paper is not in the corpus.
    """

    liked: tuple[str, ...] = ()  # oldest first
    skipped: tuple[str, ...] = ()
    unrated: tuple[str, ...] = ()  # shown in a digest and left unrated: weak negatives
    interests: tuple[str, ...] = ()
    seed_papers: tuple[str, ...] = ()  # arXiv ids or exact titles (config or library)
    ages: tuple[tuple[str, int], ...] = ()
    seed_texts: tuple[tuple[str, str], ...] = ()

    def fingerprint(self) -> str:
        """16 hex digits that change whenever any field does (the model cache's state).

        Serialised by ``marshal`` (format 2: no back-references, so equal
        fields give equal bytes however their objects are shared), about 4x
        faster than JSON on a profile with a few hundred papers (~0.2 ms a
        subscriber); the bytes are hashed in this process only, never stored.
        """
        data = (self.liked, self.skipped, self.unrated, self.interests, self.seed_papers,
                self.ages, self.seed_texts)
        return hashlib.sha256(marshal.dumps(data, 2)).hexdigest()[:16]


LEVELS = ("strong", "good", "weak")  # relevance levels, best first


@dataclass(frozen=True)
class Ranked:
    paper_id: str
    score: float
    reason: str  # one short human line
    explore: bool  # True for an exploration slot
    level: str | None = None  # "strong" / "good" / "weak"; None when not personalised


@dataclass(frozen=True)
class Neighbour:
    paper_id: str
    title: str
    similarity: float


@dataclass(frozen=True)
class Explanation:
    """Why one paper scores what it does for one subscriber."""

    paper_id: str
    title: str
    score: float
    position: int | None  # 1-based place among the candidates it was ranked with
    reason: str
    explore: bool
    shared_terms: tuple[tuple[str, float], ...]  # strongest terms shared with the likes
    nearest_liked: tuple[Neighbour, ...]  # most similar positives (liked or seed papers)
    nearest_skipped: tuple[Neighbour, ...]  # papers the subscriber skipped
    interests: tuple[tuple[str, float], ...]  # interest phrases and their similarity
    level: str | None = None
    level_method: str = ""  # how today's level thresholds were set
    nearest_unrated: tuple[Neighbour, ...] = ()  # papers shown and left unrated (not skipped)

    def __str__(self) -> str:
        """One line for a reply or a log: reason, score, strongest terms, nearest liked paper."""
        parts = [f"{self.reason} (score {self.score:.2f}"]
        parts[0] += f", #{self.position})" if self.position is not None else ")"
        if self.shared_terms:
            parts.append("shared terms: " + ", ".join(term for term, _ in self.shared_terms[:5]))
        if self.interests and self.reason.startswith("matches your interest"):
            phrase, similarity = self.interests[0]
            parts.append(f'interest "{phrase}" ({similarity:.2f})')
        elif self.nearest_liked and self.nearest_liked[0].similarity > 0:
            best = self.nearest_liked[0]
            parts.append(f'nearest liked: "{_short(best.title, 60)}" ({best.similarity:.2f})')
        return "; ".join(parts)


def build_profile(store: Store, sub: Subscriber, *, now: datetime | None = None,
                  shown: Sequence[tuple[str, str]] | None = None) -> Profile:
    """A subscriber's profile from the store: the latest signal per paper, papers shown and
    left unrated, the config's interests and seed papers, and their library entries.

    Ages are whole days from the signal (or the digest that showed the paper) to ``now``.
    ``shown``: ``store.shown_papers_at(sub.email)`` when the caller knows it already (``()``
    for a subscriber who was never sent a digest); None reads it.
    """
    now = now or utc_now()
    signals = store.latest_signals(sub.email)  # (paper id, signal, ISO time), oldest first
    rated = {paper_id for paper_id, _, _ in signals}
    if shown is None:
        shown = store.shown_papers_at(sub.email)
    unrated = tuple(dict.fromkeys([p for p, _ in shown if p not in rated]))
    ages = _signal_ages(itertools.chain(shown, [(p, at) for p, _, at in signals]), now)
    library = store.library_entries(sub.email)
    refs = [e.arxiv_id or e.title for e in library if e.arxiv_id or e.title]
    return Profile(
        liked=tuple([paper_id for paper_id, signal, _ in signals if signal == "like"]),
        skipped=tuple([paper_id for paper_id, signal, _ in signals if signal == "skip"]),
        unrated=unrated,
        interests=sub.interests,
        seed_papers=tuple(dict.fromkeys([*sub.seed_papers, *refs])),
        # Sorted by paper id (ids are unique keys): the fingerprint must not depend on order.
        ages=tuple(sorted([item for item in ages.items() if item[1] > 0])),
        seed_texts=tuple((e.title, e.abstract) for e in library if e.abstract.strip()),
    )


def _signal_ages(signals: Iterable[tuple[str, str]], now: datetime) -> dict[str, int]:
    """Per paper id, whole days from its last (paper id, ISO time) signal to ``now``.

    A digest's papers share its send time and a reply's events theirs: each
    distinct time is parsed once (~100 signals per subscriber, a few dozen times).
    """
    pairs = signals if isinstance(signals, list) else list(signals)
    days = {at: _days_since(at, now) for at in {at for _, at in pairs}}
    return {paper_id: days[at] for paper_id, at in pairs}


def _days_since(iso: str, now: datetime) -> int:
    try:
        moment = datetime.fromisoformat(iso)
    except ValueError:
        return 0
    return max(int((now - moment).total_seconds() // 86400), 0)


def is_personalised(profile: Profile) -> bool:
    """True when the subscriber gave anything to learn from."""
    return bool(profile.liked or profile.skipped or profile.interests or profile.seed_papers
                or profile.seed_texts)


# --- The per-subscriber model ----------------------------------------------------


@dataclass
class SubscriberModel:
    """A subscriber's positives and negatives as points of the index; fitted once per state.

    Light on purpose (issue 13): papers of the corpus are kept as index rows
    (their vectors and similarities come from the index), only points without
    a corpus row keep vectors of their own: a library entry's text and an
    interest phrase (whose similarities to every paper the index memoises).
    Valid only with the index it was fitted on (``ModelCache`` keys on it).
    """

    positive_ids: tuple[str, ...]  # liked then seed papers (deduplicated): the first points below
    positive_labels: tuple[str, ...]  # "you liked", "your seed paper", "in your library"
    positive_titles: tuple[str, ...]  # one per named point (library texts have no corpus row)
    interest_phrases: tuple[str, ...]
    pos_rows: np.ndarray  # index row of each positive point, -1 for a point with its own vector
    pos_phrase: np.ndarray  # which interest phrase a point stands for, -1 for named papers
    pos_weights: np.ndarray  # 1 per named paper; an interest's points share 1
    own_specific: tuple[sparse.csr_matrix, ...]  # 1 x terms per point with pos_rows == -1
    own_topic: np.ndarray | None  # the same points in the topic view
    own_phrase: tuple[str | None, ...]  # per own point: its interest phrase, None for a text
    negative_ids: tuple[str, ...]
    neg_rows: np.ndarray  # index row of each negative
    neg_weights: np.ndarray  # recency of each negative (1 = now, 0.5 = one half-life ago)
    neg_skipped: np.ndarray  # True for an explicit skip, False for a paper left unrated
    unrated_weight: float = 1.0  # how much the unrated negatives count against the skips
    unknown_seeds: tuple[str, ...] = ()

    def positive_matrix(self, index: CorpusIndex) -> sparse.csr_matrix:
        """points x terms: every positive point's unit row in the specific view, in point order."""
        own = self.pos_rows < 0
        rows = np.where(own, 0, self.pos_rows)
        matrix = index.specific[rows].tolil()
        for point, vector in zip(np.flatnonzero(own), self.own_specific, strict=True):
            matrix[point] = vector
        return sparse.csr_matrix(matrix)

    def centroid(self, index: CorpusIndex) -> sparse.csr_matrix:
        """1 x terms: the weighted centroid of the positives in the specific view."""
        return sparse.csr_matrix(
            self.pos_weights @ self.positive_matrix(index)
            / max(float(self.pos_weights.sum()), 1e-9)
        )

    @property
    def has_positives(self) -> bool:
        return len(self.pos_rows) > 0

    @property
    def has_negatives(self) -> bool:
        return len(self.neg_rows) > 0


def _known(index: CorpusIndex, ids: Sequence[str], what: str) -> list[str]:
    kept = index.known(dict.fromkeys(ids))
    if len(kept) < len(set(ids)):
        log.debug(
            "profile: %d %s papers are not in the corpus, ignored", len(set(ids)) - len(kept), what
        )
    return kept


@dataclass(frozen=True)
class _Points:
    """Positive points of a model: rows, phrase tags, weights and the own vectors."""

    rows: np.ndarray
    phrase: np.ndarray
    weights: np.ndarray
    own_specific: tuple[sparse.csr_matrix, ...]
    own_topic: np.ndarray | None
    own_phrase: tuple[str | None, ...]


def _positive_points(
    index: CorpusIndex,
    papers: list[str],
    recency: np.ndarray,
    texts: Sequence[tuple[str, str]],
    phrases: tuple[str, ...],
) -> _Points:
    """Rows, phrase tags, weights and own vectors of every positive point.

    Named papers count their recency each (1 when fresh); a library entry's
    own text counts 1 (it has no corpus row, so its row is -1); an interest
    phrase counts 1 in all, shared by the phrase itself (row -1) and its best
    matches in the corpus.
    """
    # Python lists, made into arrays once: a phrase adds a handful of points, and a numpy
    # call per phrase and list costs more than the values (the same values either way).
    rows: list[int] = index.rows(papers).tolist()
    tags: list[int] = [-1] * len(papers)
    weights: list[float] = recency.astype(np.float64).tolist()
    own_spec: list[sparse.csr_matrix] = []
    own_topic: list[np.ndarray] = []
    own_phrase: list[str | None] = []
    width = index.topic.shape[1] if index.topic is not None else 0
    for title, abstract in texts:
        specific, topic = index.text_vectors(" ".join([title] * TITLE_REPEATS + [abstract]))
        rows.append(-1)
        tags.append(-1)
        weights.append(1.0)
        own_spec.append(specific)
        own_topic.append(topic if topic is not None else np.zeros((1, width), dtype=np.float32))
        own_phrase.append(None)
    for j, phrase in enumerate(phrases):
        match = index._phrase(phrase)
        if match.specific.nnz == 0:
            log.info("profile: interest %r has no word the corpus knows yet, ignored", phrase)
            continue
        if len(match.rows) == 0:
            log.info("profile: interest %r matches no stored paper yet", phrase)
        points = 1 + len(match.rows)  # the phrase itself, then its matches
        rows.append(-1)
        rows.extend(match.rows.tolist())
        own_spec.append(match.specific)
        own_topic.append(match.topic if match.topic is not None
                         else np.zeros((1, width), dtype=np.float32))
        own_phrase.append(phrase)
        tags.extend([j] * points)
        weights.extend([1.0 / points] * points)
    return _Points(
        rows=np.array(rows, dtype=np.int64),
        phrase=np.array(tags, dtype=np.int64),
        weights=np.array(weights, dtype=np.float64).astype(np.float32),
        own_specific=tuple(own_spec),
        own_topic=(np.vstack(own_topic).astype(np.float32) if own_topic
                   else np.zeros((0, width), dtype=np.float32)) if index.topic is not None
        else None,
        own_phrase=tuple(own_phrase),
    )


def recency(age_days: float | None, half_life_days: float) -> float:
    """How much a signal ``age_days`` old counts: 0.5 ** (age / half-life); 1 without an age."""
    if age_days is None or age_days <= 0 or half_life_days <= 0:
        return 1.0
    return float(0.5 ** (age_days / half_life_days))


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
    texts: list[tuple[str, str]] = []
    if profile.seed_texts:  # titles normalised only when there is a library text to compare
        known_titles = {normalise_title(index.paper(i).title) for i in positives}
        texts = [(t, a) for t, a in dict.fromkeys(profile.seed_texts)
                 if a.strip() and normalise_title(t) not in known_titles
                 and index.resolve(t) is None]
    labels = tuple(["you liked"] * len(liked) + ["your seed paper"] * len(seeds)
                   + ["in your library"] * len(texts))
    titles = tuple([index.paper(i).title for i in positives] + [t for t, _ in texts])
    phrases = tuple(p for p in dict.fromkeys(s.strip() for s in profile.interests) if p)
    half_life = settings.half_life_days
    # Ages are whole days: few distinct values. Each one's recency once, then looked up in C
    # (a subscriber has dozens of positives and hundreds of negatives).
    by_age: dict[int | None, float] = {}
    pos_ages = list(map(ages.get, positives))
    for age in set(pos_ages).difference(by_age):
        by_age[age] = recency(age, half_life)
    pos_recency = np.array(list(map(by_age.__getitem__, pos_ages)), dtype=np.float64)

    points = _positive_points(index, positives, pos_recency, texts, phrases)

    positive_set = set(positives)
    skipped = [i for i in _known(index, profile.skipped, "skipped") if i not in positive_set]
    skipped_set = set(skipped)
    # One set lookup per paper in C: a subscriber leaves hundreds of papers unrated.
    unrated = list(filterfalse((positive_set | skipped_set).__contains__,
                               _known(index, profile.unrated, "unrated")))
    negatives = skipped + unrated
    # A subscriber has hundreds of negatives and a few dozen distinct ages: each age's
    # recency once, then looked up in C.
    neg_ages = list(map(ages.get, negatives))
    for age in set(neg_ages).difference(by_age):
        by_age[age] = recency(age, half_life)
    neg_weights = np.fromiter(map(by_age.__getitem__, neg_ages), dtype=np.float32,
                              count=len(neg_ages))
    neg_skipped = np.zeros(len(negatives), dtype=bool)
    neg_skipped[: len(skipped)] = True  # the skips come first
    return SubscriberModel(
        positive_ids=tuple(positives) + tuple(f"library:{n}" for n in range(len(texts))),
        positive_labels=labels,
        positive_titles=titles,
        interest_phrases=phrases,
        pos_rows=points.rows,
        pos_phrase=points.phrase,
        pos_weights=points.weights,
        own_specific=points.own_specific,
        own_topic=points.own_topic,
        own_phrase=points.own_phrase,
        negative_ids=tuple(negatives),
        neg_rows=index.rows(negatives),
        neg_weights=neg_weights,
        neg_skipped=neg_skipped,
        unrated_weight=settings.unrated_weight,
        unknown_seeds=tuple(unknown),
    )


class ModelCache:
    """Fitted models per subscriber, refitted only when their state changed.

    The state is the profile's fingerprint, the unrated weight, the half-life
    and the fitted index (a model holds its rows). At most ``max_entries``
    subscribers are kept (MODEL_CACHE_ENTRIES by default), the least recently
    used dropped first, so memory does not grow with the subscriber count.
    Thread-safe.
    """

    def __init__(self, max_entries: int = MODEL_CACHE_ENTRIES) -> None:
        self._entries: OrderedDict[str, tuple[str, SubscriberModel]] = OrderedDict()
        self._lock = threading.Lock()
        self.max_entries = max(max_entries, 1)
        self.fits = 0  # how many models were fitted (for tests and logs)

    def __len__(self) -> int:
        return len(self._entries)

    def model(
        self, key: str, index: CorpusIndex, profile: Profile, settings: RankingConfig
    ) -> SubscriberModel:
        state = (f"{profile.fingerprint()}:{settings.unrated_weight!r}:"
                 f"{settings.half_life_days!r}:{index.vocabulary_key}:{index.fit_id}")
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0] == state:
                self._entries.move_to_end(key)
                return entry[1]
        fitted = fit_model(index, profile, settings=settings)
        with self._lock:
            self._entries[key] = (state, fitted)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
            self.fits += 1
        log.debug("subscriber %s: model refitted", key)
        return fitted

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def _get_model(
    index: CorpusIndex,
    profile: Profile,
    settings: RankingConfig,
    cache: ModelCache | None,
    key: str | None,
) -> SubscriberModel:
    if cache is not None and key is not None:
        return cache.model(key, index, profile, settings)
    return fit_model(index, profile, settings=settings)


# --- Similarities of the papers being scored ----------------------------------------


_ASKERS = itertools.count()  # numbers each scoring, for the memo's second-ask rule


class _Pool:
    """Papers scored together (index rows) and their similarities to a model's points.

    Each similarity is computed once per scoring and shared by the score, the
    levels, the reasons and the exploration picks. They come from the index's
    memo: today's candidates are asked about by every subscriber, and the
    liked papers placed among them to calibrate levels are recent papers that
    many subscribers liked (a paper asked about once is the least recently
    used and goes first).
    """

    def __init__(
        self,
        index: CorpusIndex,
        model: SubscriberModel,
        rows: np.ndarray,
        base: _Pool | None = None,
        whole: _Pool | None = None,
    ):
        self.index = index
        self.model = model
        self.rows = rows
        shares = base or whole
        self.asker: int = shares.asker if shares is not None else next(_ASKERS)
        self._base = base  # a pool of the first rows, whose similarities are reused
        # A pool whose first rows are these: their similarities and row features are its own
        # first rows (see prefix), computed with the rest in one go.
        self._whole = whole
        self._features: _RowFeatures | None = None
        self._positives: tuple[np.ndarray, np.ndarray | None] | None = None
        self._negatives: tuple[np.ndarray, np.ndarray | None] | None = None
        self._mixed_positives: np.ndarray | None = None
        self._evidence: np.ndarray | None = None
        self._nearest: tuple[np.ndarray, np.ndarray] | None = None

    @functools.cached_property
    def topic(self) -> np.ndarray | None:
        """rows x topic dimensions (float32), None without a topic space: only the scores
        read it (its cohesion), so the pools made to fill in a base's similarities never
        copy it."""
        return self.index.topic[self.rows] if self.index.topic is not None else None

    def __len__(self) -> int:
        return len(self.rows)

    def extended(self, extra: np.ndarray) -> _Pool:
        """This pool plus ``extra`` rows, reusing the similarities computed already (the
        whole pool this one is the prefix of, when its other rows are ``extra``)."""
        whole = self._whole
        if whole is not None and len(whole.rows) == len(self.rows) + len(extra) \
                and np.array_equal(whole.rows[len(self.rows):], extra):
            return whole
        return _Pool(self.index, self.model, np.concatenate([self.rows, extra]), base=self)

    def prefix(self, count: int) -> _Pool:
        """The pool of this pool's first ``count`` rows, reading this pool's similarities and
        row features (:class:`_RowFeatures`): a row's are computed from that row alone, so
        they are the floats a pool of the first rows alone would compute. A digest's
        candidates and its calibration papers are computed together this way, once."""
        return _Pool(self.index, self.model, self.rows[:count], whole=self)

    def features(self) -> _RowFeatures:
        """Each row's evidence before it is standardised over the pool (computed once)."""
        if self._features is None:
            if self._whole is not None:
                self._features = self._whole.features().head(len(self.rows))
            else:
                self._features = _row_features(self.index, self.model, self)
        return self._features

    def pairs(self, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Similarities of every row to the papers ``cols`` (rows x cols, float32, both views)."""
        return self.index.similarities(self.rows, cols, shared=True, asker=self.asker)

    def positives(self) -> tuple[np.ndarray, np.ndarray | None]:
        """rows x positive points, in point order: (specific, topic or None)."""
        if self._positives is None:
            if self._whole is not None:
                self._positives = _head(self._whole.positives(), len(self.rows))
            else:
                self._positives = self._points(self._base.positives() if self._base else None,
                                               self._positive_block)
        return self._positives

    def mixed_positives(self) -> np.ndarray:
        """rows x positive points: both views averaged (:func:`_mixed`), float32; computed once
        for the reasons, the levels and the exploration picks of a digest."""
        if self._mixed_positives is None:
            self._mixed_positives = _mixed(*self.positives())
        return self._mixed_positives

    def evidence(self) -> np.ndarray:
        """rows x positive points: :meth:`mixed_positives`, -1 where a point is the paper itself
        (an interest's match is no evidence for itself); float32."""
        if self._evidence is None:
            same = self.rows[:, None] == self.model.pos_rows[None, :]
            self._evidence = np.where(same, -1.0, self.mixed_positives())
        return self._evidence

    def nearest_positives(self) -> tuple[np.ndarray, np.ndarray]:
        """Per row, the positive point of :meth:`evidence` it is closest to (the first of
        equals) and that similarity: every reason of a digest reads them (needs a point)."""
        if self._nearest is None:
            evidence = self.evidence()
            points = evidence.argmax(axis=1)
            self._nearest = points, evidence[np.arange(len(points)), points]
        return self._nearest

    def negatives(self) -> tuple[np.ndarray, np.ndarray | None]:
        """rows x negatives: (specific, topic or None)."""
        if self._negatives is None:
            if self._whole is not None:
                self._negatives = _head(self._whole.negatives(), len(self.rows))
            else:
                self._negatives = self._points(self._base.negatives() if self._base else None,
                                               lambda pool: pool.pairs(self.model.neg_rows))
        return self._negatives

    def _points(
        self,
        known: tuple[np.ndarray, np.ndarray | None] | None,
        compute: Callable[[_Pool], tuple[np.ndarray, np.ndarray | None]],
    ) -> tuple[np.ndarray, np.ndarray | None]:
        if known is None:
            return compute(self)
        done = known[0].shape[0]
        rest = compute(_Pool(self.index, self.model, self.rows[done:], base=self))
        spec = np.vstack([known[0], rest[0]])
        topic = (np.vstack([known[1], rest[1]])
                 if known[1] is not None and rest[1] is not None else None)
        return spec, topic

    @staticmethod
    def _positive_block(pool: _Pool) -> tuple[np.ndarray, np.ndarray | None]:
        index, model, rows = pool.index, pool.model, pool.rows
        if pool._base is None and len(model.pos_rows) and bool((model.pos_phrase >= 0).all()) \
                and None not in model.own_phrase:
            return _Pool._phrase_blocks(pool)
        named = model.pos_rows >= 0
        spec = np.empty((len(rows), len(model.pos_rows)), dtype=np.float32)
        topic = (np.empty_like(spec) if index.topic is not None and model.own_topic is not None
                 else None)
        if named.any():
            got_spec, got_topic = pool.pairs(model.pos_rows[named])
            spec[:, named] = got_spec
            if topic is not None and got_topic is not None:
                topic[:, named] = got_topic
        own = np.flatnonzero(~named)
        texts = [k for k, phrase in enumerate(model.own_phrase) if phrase is None]
        for k, phrase in enumerate(model.own_phrase):
            if phrase is not None:  # a phrase has a few terms: through their postings, once
                spec[:, own[k]] = index.phrase_products(phrase, model.own_specific[k], rows)
        if texts:  # a library entry has many: one sparse product
            vectors = sparse.vstack([model.own_specific[k] for k in texts]).tocsr()
            spec[:, own[texts]] = _sparse_products(index.specific[rows], vectors)
        if len(own) and topic is not None and model.own_topic is not None \
                and index.topic is not None:
            topic[:, own] = _topic_products(index.topic[rows], model.own_topic)
        return spec, topic

    @staticmethod
    def _phrase_blocks(pool: _Pool) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`_positive_block` of a model whose points are all interest phrases' (a first
        digest): each phrase's block of columns (the phrase, then its matches) computed as
        there, column by column the same floats, and kept for the next subscriber with that
        interest and these papers (:meth:`_IndexMemo.phrase_block`)."""
        index, model, rows = pool.index, pool.model, pool.rows
        starts = np.flatnonzero(model.pos_rows < 0).tolist()  # each phrase's own point
        ends = starts[1:] + [len(model.pos_rows)]
        with_topic = index.topic is not None and model.own_topic is not None

        def block(k: int, phrase: str, start: int, end: int
                  ) -> tuple[np.ndarray, np.ndarray | None]:
            spec = np.empty((len(rows), end - start), dtype=np.float32)
            topic = np.empty_like(spec) if with_topic else None
            if end - start > 1:
                got_spec, got_topic = pool.pairs(model.pos_rows[start + 1 : end])
                spec[:, 1:] = got_spec
                if topic is not None and got_topic is not None:
                    topic[:, 1:] = got_topic
            spec[:, 0] = index.phrase_products(phrase, model.own_specific[k], rows)
            if topic is not None and model.own_topic is not None and index.topic is not None:
                topic[:, 0] = _topic_products(index.topic[rows], model.own_topic[k : k + 1])[:, 0]
            return spec, topic

        phrases = [p for p in model.own_phrase if p is not None]  # all of them (the caller)
        blocks = [index._memo.phrase_block(phrase, rows,
                                           functools.partial(block, k, phrase, start, end))
                  for k, (phrase, start, end) in enumerate(zip(phrases, starts, ends,
                                                                strict=True))]
        spec = np.concatenate([b[0] for b in blocks], axis=1)
        topic_blocks = [b[1] for b in blocks if b[1] is not None]
        topic = np.concatenate(topic_blocks, axis=1) if with_topic and \
            len(topic_blocks) == len(blocks) else None
        return spec, topic


def _head(
    sims: tuple[np.ndarray, np.ndarray | None], count: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """The first ``count`` rows of both views' similarities (views, no copy)."""
    return sims[0][:count], sims[1][:count] if sims[1] is not None else None


@dataclass(frozen=True)
class _RowFeatures:
    """Per row of a pool, the evidence its scores standardise over the pool.

    Each row's value depends on that row alone (its similarities, its
    centrality), so the first rows of a larger pool have exactly the values a
    pool of those rows alone has: a digest's candidates and the calibration
    papers placed among them (:func:`_levels`) share one computation.
    ``specific``/``topic``: closeness to the positives (None without
    positives; topic None without a topic space); ``negatives``: per kind of
    negative that counts (skips, then papers left unrated), its strength and
    the aged similarity of the nearest one in each view (float32).
    """

    specific: np.ndarray | None
    topic: np.ndarray | None
    negatives: tuple[tuple[float, np.ndarray, np.ndarray | None], ...]

    def head(self, count: int) -> _RowFeatures:
        def cut(values: np.ndarray | None) -> np.ndarray | None:
            return values[:count] if values is not None else None

        return _RowFeatures(cut(self.specific), cut(self.topic),
                            tuple((strength, spec[:count], cut(topic))
                                  for strength, spec, topic in self.negatives))


def _row_features(index: CorpusIndex, model: SubscriberModel, pool: _Pool) -> _RowFeatures:
    """:class:`_RowFeatures` of every row of ``pool``, as the scores computed them in place."""
    specific = topic = None
    if model.has_positives:
        weights = _evidence_weights(pool.rows, model)
        spec_sims, topic_sims = pool.positives()
        specific = (_weighted_mean(spec_sims, weights)
                    - CENTRALITY_PENALTY * index.centrality[pool.rows])
        if index.topic is not None and topic_sims is not None:
            topic = _topic_affinity(topic_sims, weights)
    negatives = []
    if model.has_negatives:
        spec_neg, topic_neg = pool.negatives()
        if index.topic is None:
            topic_neg = None
        # Each similarity aged by its own negative's decay: the whole matrix at once, then
        # each kind's columns (fit_model puts the skips first; the mask otherwise).
        aged_spec = _aged(spec_neg, model.neg_weights)
        aged_topic = _aged(topic_neg, model.neg_weights) if topic_neg is not None else None
        skips = int(np.count_nonzero(model.neg_skipped))
        contiguous = bool(model.neg_skipped[:skips].all())
        for kind, strength in ((True, 1.0), (False, model.unrated_weight)):
            count = skips if kind else len(model.neg_skipped) - skips
            if strength <= 0 or count == 0:
                continue
            chosen: slice | np.ndarray = model.neg_skipped == kind
            if contiguous:
                chosen = slice(0, skips) if kind else slice(skips, None)
            negatives.append((strength, aged_spec[:, chosen].max(axis=1),
                              aged_topic[:, chosen].max(axis=1) if aged_topic is not None
                              else None))
    return _RowFeatures(specific, topic, tuple(negatives))


# --- Scoring ----------------------------------------------------------------------


def _standardise(values: np.ndarray) -> np.ndarray:
    """Zero mean, unit spread over today's candidates (all zero when they are all equal).

    Equal means within SPREAD_NOISE of the largest value: similarities are
    float32, so two papers equally close (a candidate that is itself a
    skipped paper, say) differ by rounding alone, which standardising would
    blow up to a whole unit.
    """
    # The same ufunc calls, in the same order and dtypes, as ``values.std()`` and
    # ``values.mean()`` make (numpy's _methods._var and _mean), so the same floats, without
    # their Python-level argument handling: this runs ~8 times per subscriber on ~100 values.
    count = np.intp(values.size)
    if count == 0:
        return np.zeros_like(values, dtype=np.float64)
    mean = np.add.reduce(values, axis=None, keepdims=True)
    np.true_divide(mean, count, out=mean, casting="unsafe")
    centred = np.subtract(values, mean)
    total = np.add.reduce(np.square(centred), axis=None)
    spread = float(np.sqrt(total.dtype.type(total / count)))
    scale = float(np.maximum.reduce(np.abs(values), axis=None))
    if not math.isfinite(spread) or spread < max(1e-9, SPREAD_NOISE * scale):
        return np.zeros_like(values, dtype=np.float64)
    return centred / spread


def _standardise_all(vectors: Sequence[np.ndarray]) -> list[np.ndarray]:
    """:func:`_standardise` of each vector, the same floats, in one set of ufunc calls.

    Vectors of one length and dtype are stacked (k x n, C-contiguous) and
    reduced along their rows: numpy sums each row of a contiguous block as
    it sums that row alone (pairwise, in the same blocks), and every other
    step is elementwise, so each result is the bits ``_standardise`` gives
    (tests/test_rank_cpu.py checks it). A digest standardises 3 to 8 vectors
    of ~12 to ~100 values per scoring: the calls, not the values, cost.
    A vector found flat gets float64 zeros, as ``_standardise`` gives it.
    """
    if len(vectors) < 2 or len({(v.dtype, v.shape) for v in vectors}) > 1 \
            or vectors[0].ndim != 1 or vectors[0].size == 0:
        return [_standardise(v) for v in vectors]
    values = np.concatenate(vectors).reshape(len(vectors), -1)
    count = np.intp(values.shape[1])
    mean = np.add.reduce(values, axis=1, keepdims=True)
    np.true_divide(mean, count, out=mean, casting="unsafe")
    centred = np.subtract(values, mean)
    spread = np.add.reduce(np.square(centred), axis=1)
    # As _standardise: the quotient rounded to the values' dtype, then its square root.
    np.true_divide(spread, count, out=spread, casting="unsafe")
    np.sqrt(spread, out=spread)
    scales = np.maximum.reduce(np.abs(values), axis=1).tolist()
    flat = False
    for s, scale in zip(spread.tolist(), scales, strict=True):  # to float exactly, as float()
        flat = flat or not math.isfinite(s) or s < max(1e-9, SPREAD_NOISE * scale)
    if not flat:
        return list(np.true_divide(centred, spread[:, None], out=centred))
    return [_standardise(v) for v in vectors]  # one is flat: rare, each on its own


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
    return np.where(cand_rows[:, None] == model.pos_rows[None, :], 0.0, model.pos_weights)


def _weighted_mean(sims: np.ndarray, weights: np.ndarray) -> np.ndarray:
    total = weights.sum(axis=1)
    return np.divide((sims * weights).sum(axis=1), total, out=np.zeros(len(sims)), where=total > 0)


def _topic_affinity(sims: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted mean similarity with a share of the maximum, so each separate interest counts."""
    best = np.where(weights > 0, sims, -np.inf).max(axis=1, initial=-np.inf)
    best = np.where(np.isfinite(best), best, 0.0)
    return (1 - TOPIC_MAX_SHARE) * _weighted_mean(sims, weights) + TOPIC_MAX_SHARE * best


def _dense(product: sparse.spmatrix | np.ndarray) -> np.ndarray:
    if isinstance(product, np.ndarray):
        return product
    return np.asarray(product.toarray())


def _positive_score(index: CorpusIndex, model: SubscriberModel, pool: _Pool) -> tuple[np.ndarray, float]:
    """Standardised closeness to the positives, and the topic weight used for it."""
    features = pool.features()
    specific, topic = features.specific, features.topic
    if specific is None:  # pragma: no cover - called only for a model with positives
        raise ValueError("no positives to score by")
    if topic is None:
        return _standardise(specific), 0.0
    narrow = index._memo.narrowness(pool.rows, lambda: _narrowness(pool.topic))
    weight = TOPIC_WEIGHT_BROAD + (TOPIC_WEIGHT_NARROW - TOPIC_WEIGHT_BROAD) * narrow
    by_terms, by_topic = _standardise_all((specific, topic))
    score = by_terms + weight * by_topic
    feedback = FEEDBACK_WEIGHT_BROAD * (1.0 - narrow)
    if feedback > 0 and len(score) > FEEDBACK_TOP + 1:
        score = score + feedback * _agreement(pool, score, weight)
    return score, weight


def _agreement(pool: _Pool, score: np.ndarray, weight: float) -> np.ndarray:
    """How close each candidate is to today's best picks (pseudo relevance feedback).

    Papers a subscriber wants on one day tend to resemble each other; the top
    picks vote for their neighbours. Each pick's own vote for itself is left out.
    """
    top = np.argsort(-score, kind="stable")[:FEEDBACK_TOP]
    own = (top, np.arange(len(top)))  # each pick's vote for itself
    counts = np.full(len(score), len(top))
    counts[top] -= 1
    # Fresh arrays (a gather or a product): each own vote is zeroed in place.
    spec_sims, topic_sims = pool.pairs(pool.rows[top])
    spec_sims[own] = 0.0
    spec = spec_sims.sum(axis=1) / counts
    if topic_sims is None:  # no topic space: the caller never asks then
        return _standardise(spec)
    topic_sims[own] = 0.0
    topi = topic_sims.sum(axis=1) / counts
    by_terms, by_topic = _standardise_all((spec, topi))
    return (by_terms + weight * by_topic) / (1.0 + weight)


def _negative_score(model: SubscriberModel, pool: _Pool, weight: float) -> np.ndarray:
    """Closeness to the nearest negative, per kind, each kind at its own strength.

    The nearest one, not the centroid: one skipped paper says little about a
    whole field, but much about papers that are almost the same. Skips and
    papers left unrated are standardised apart and then weighted (1 and
    ``unrated_weight``), so the weight survives standardisation: a profile
    whose negatives are all unrated is pushed down less than the same papers
    skipped. Within a kind, an older negative's similarity counts less.
    """
    kinds = pool.features().negatives
    standardised = iter(_standardise_all(
        [values for _, spec, topic in kinds for values in (spec, topic) if values is not None]))
    result = np.zeros(len(pool))
    for strength, _, topic in kinds:
        nearest = next(standardised)
        if topic is not None:
            nearest = (nearest + weight * next(standardised)) / (1.0 + weight)
        result += strength * nearest
    return result


def _aged(sims: np.ndarray, decay: np.ndarray) -> np.ndarray:
    """Positive similarities shrink with the negative's age; negative ones are left alone."""
    return np.where(sims > 0, sims * decay, sims)


def _popularity_of(paper: Paper) -> float:
    rank_part = 0.5 / paper.listing_rank if paper.listing_rank and paper.listing_rank > 0 else 0.0
    return float(paper.upvotes or 0) + rank_part


def _popularity(index: CorpusIndex, candidates: Sequence[str]) -> np.ndarray:
    """Upvotes first, then the listing's own order; equal values keep candidate order."""
    return index.popularity(index.rows(candidates))


def _model_scores(index: CorpusIndex, model: SubscriberModel, pool: _Pool) -> np.ndarray:
    """Positives pull up, negatives push down; popularity stands in when there are no positives."""
    if not model.has_positives:  # skips only: today's order, minus what resembles a skip
        order = np.argsort(-index.popularity(pool.rows), kind="stable")
        place = np.empty(len(order))
        place[order] = np.arange(len(order))
        return _standardise(-place) - _negative_score(model, pool, TOPIC_WEIGHT_NARROW)
    score, weight = _positive_score(index, model, pool)
    if model.has_negatives:
        score = score - NEGATIVE_WEIGHT * _negative_score(model, pool, weight)
    if float(np.ptp(score)) == 0.0:  # the profile says nothing about today's papers
        return index.popularity(pool.rows)
    return score


def score_candidates(
    index: CorpusIndex,
    profile: Profile,
    candidates: Sequence[str],
    *,
    settings: RankingConfig = DEFAULT_SETTINGS,
    cache: ModelCache | None = None,
    key: str | None = None,
) -> np.ndarray:
    """The model's scores, no exploration: what rank() sorts by and the benchmark measures.

    Candidates must be in the index. Scores are finite and relative to this
    set of candidates (higher = better); equal scores keep candidate order.
    """
    if len(candidates) == 0:
        return np.zeros(0)
    return _scores(index, _model_for(index, profile, settings, cache, key), candidates)


def _model_for(
    index: CorpusIndex,
    profile: Profile,
    settings: RankingConfig,
    cache: ModelCache | None,
    key: str | None,
) -> SubscriberModel | None:
    """The subscriber's model, or None when there is nothing to learn from."""
    if not is_personalised(profile) and not profile.unrated:
        return None
    model = _get_model(index, profile, settings, cache, key)
    return model if model.has_positives or model.has_negatives else None


def _pool_scores(index: CorpusIndex, model: SubscriberModel, pool: _Pool) -> np.ndarray:
    scores = _model_scores(index, model, pool)
    if np.isfinite(scores).all():  # the usual case: nan_to_num would copy them unchanged
        return scores
    return np.nan_to_num(scores, nan=0.0, posinf=0.0, neginf=0.0)


def _scores(
    index: CorpusIndex, model: SubscriberModel | None, candidates: Sequence[str]
) -> np.ndarray:
    rows = index.rows(candidates)
    if model is None:
        return index.popularity(rows)
    return _pool_scores(index, model, _Pool(index, model, rows))


# --- Digest: ranking with exploration and reasons ---------------------------------


def explore_slots(limit: int, fraction: float) -> int:
    """Slots reserved for exploration: round(limit * fraction), at least one from
    MIN_EXPLORE_LIMIT papers on when fraction > 0, and never the whole digest."""
    if fraction <= 0 or limit < 2:
        return 0
    slots = math.floor(limit * fraction + 0.5)
    if limit >= MIN_EXPLORE_LIMIT:
        slots = max(slots, 1)
    return min(slots, limit - 1)


def _short(title: str, width: int = 70) -> str:
    title = " ".join(title.split())
    return title if len(title) <= width else title[: width - 1].rstrip() + "…"


def _mixed(spec: np.ndarray, topic: np.ndarray | None) -> np.ndarray:
    """Both views averaged (the specific view alone without a topic space), float32."""
    return spec if topic is None else (spec + topic) / 2


def _positive_similarities(pool: _Pool, at: int) -> np.ndarray:
    """Similarity of the pool's paper ``at`` to each positive point, both views averaged.

    A point that is the paper itself (an interest's match) says -1: no evidence.
    """
    return pool.evidence()[at]


def _best_positive(pool: _Pool) -> np.ndarray:
    """Per paper, :func:`_positive_similarities`' maximum (-1 without a positive), vectorised."""
    if len(pool.model.pos_rows) == 0:
        return np.full(len(pool), -1.0)
    return np.asarray(pool.evidence().max(axis=1))


def _negative_similarities(pool: _Pool, at: int) -> np.ndarray:
    spec, topic = pool.negatives()
    return _mixed(spec[at], topic[at] if topic is not None else None)


def _model_reason(pool: _Pool, at: int, considered: int, limit: int) -> str:
    """The positive (liked paper, seed, library entry or interest) this paper is closest to.

    Named only when the similarity reaches REASON_MIN_SIMILARITY; below it the
    item says what it is: filling a short day, popular today, or a weak match.
    """
    model = pool.model
    paper = pool.index._papers[int(pool.rows[at])]
    if len(model.pos_rows) == 0:  # skips only: the listing's order, skip-like papers pushed down
        return _popularity_reason(paper)
    points, similarities = pool.nearest_positives()
    best = int(points[at])
    if similarities[at] < REASON_MIN_SIMILARITY:
        if considered <= limit:
            return f"filling: only {considered} new papers today"
        if paper.upvotes:
            return f"weak match; popular today ({paper.upvotes} upvotes)"
        return f"weak match (closest to your likes at {max(float(similarities[at]), 0.0):.2f})"
    if model.pos_phrase[best] >= 0:
        return f'matches your interest "{model.interest_phrases[model.pos_phrase[best]]}"'
    title = _short(model.positive_titles[best])
    return f'close to "{title}" {model.positive_labels[best]}'


def _item_reason(
    index: CorpusIndex, pool: _Pool | None, paper_id: str, at: int, considered: int, limit: int
) -> str:
    if pool is None:
        return _popularity_reason(index.paper(paper_id))
    return _model_reason(pool, at, considered, limit)


def _popularity_reason(paper: Paper) -> str:
    if paper.upvotes:
        return f"popular today ({paper.upvotes} upvotes)"
    if paper.listing_rank:
        return f"#{paper.listing_rank} in today's listing"
    return "in today's listing"


def _familiarity(pool: _Pool, chosen: np.ndarray) -> np.ndarray:
    """Per paper, its similarity to the closest thing the subscriber rated (both views averaged)."""
    model = pool.model
    best = np.full(len(chosen), -np.inf)
    if len(model.pos_rows):
        best = np.maximum(best, pool.mixed_positives()[chosen].max(axis=1))
    if len(model.neg_rows):
        spec_sims, topic_sims = pool.negatives()
        sims = _mixed(spec_sims[chosen], topic_sims[chosen] if topic_sims is not None else None)
        best = np.maximum(best, sims.max(axis=1))
    return np.where(np.isfinite(best), best, 0.0)


def _pick_explore(
    index: CorpusIndex,
    pool: _Pool | None,
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
    if pool is not None:
        familiarity = _familiarity(pool, np.array(remaining, dtype=np.int64))
    # The least familiar half (at least `count`), then most popular, then least familiar.
    order = np.lexsort((np.arange(len(remaining)), familiarity))
    # As Python floats and ints (the same values, compared alike): the sort's key reads
    # them once per candidate, and a numpy scalar costs a Python object per read.
    pop_of, familiar_of = pops.tolist(), familiarity.tolist()
    pool_order = sorted(order[: max(count, (len(remaining) + 1) // 2)].tolist(),
                        key=lambda j: (-pop_of[j], familiar_of[j], j))
    picks = []
    for j in pool_order[:count]:
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
    cache: ModelCache | None = None,
    key: str | None = None,
) -> list[Ranked]:
    """The top `limit` candidates, best first, exploration slots included.

    Exploration (settings.explore_fraction; 0 = off) applies to personalised
    profiles only: an unpersonalised digest (or one whose feedback matches
    nothing stored) is the listing's order already.
    Explore items come last, marked ``explore=True``. Candidates not in the
    index are dropped (logged); repeated ids count once. A profile without
    likes, skips or papers shown is ranked once per fitted index, candidates,
    limit and settings, and its items reused (SHARED_RESULT_ENTRIES).
    """
    unique = list(dict.fromkeys(candidates))
    known = index.known(unique)
    if len(known) < len(unique):
        log.warning(
            "rank: %d candidates are not in the corpus index, dropped", len(unique) - len(known)
        )
    if limit <= 0 or not known:
        return []
    shared = None
    if not (profile.liked or profile.skipped or profile.unrated):
        shared = (tuple(known), profile, limit, settings)
        found = index._memo.result(shared)
        if found is not None:
            return list(found)
    items = _rank_known(index, profile, known, limit, settings, cache, key)
    if shared is not None:
        index._memo.keep_result(shared, tuple(items))
    return items


def _rank_known(
    index: CorpusIndex,
    profile: Profile,
    known: list[str],
    limit: int,
    settings: RankingConfig,
    cache: ModelCache | None,
    key: str | None,
) -> list[Ranked]:
    """:func:`rank` of candidates that are all in the index, distinct, at least one."""
    model = _model_for(index, profile, settings, cache, key)
    rows = index.rows(known)
    personal = model is not None and is_personalised(profile)
    pool = None
    calib: list[str] = []
    if model is not None:
        # The papers the levels are calibrated on go with the candidates: their similarities
        # and row features are computed in one go (see _Pool.prefix), not in a second pass.
        calib = _calibration_papers(index, model, known) if personal else []
        if len(calib) >= CALIBRATION_MIN:
            pool = _Pool(index, model, np.concatenate([rows, index.rows(calib)])).prefix(
                len(rows))
        else:
            pool = _Pool(index, model, rows)
    scores = _pool_scores(index, model, pool) if model and pool else index.popularity(rows)
    order: list[int] = np.argsort(-scores, kind="stable").tolist()
    explore = explore_slots(limit, settings.explore_fraction) if personal else 0
    explore = min(explore, max(len(order) - (limit - explore), 0))
    top = order[: min(limit, len(order)) - explore]
    levels = (_levels(index, pool, known, scores, calib=calib) if personal and pool is not None
              else None)
    items = []
    for i in top:
        why = _item_reason(index, pool, known[i], i, len(known), limit)
        items.append(Ranked(known[i], float(scores[i]), why, False,
                            levels.level(float(scores[i])) if levels else None))
    for i, why in _pick_explore(index, pool, known, order[len(top) :], explore):
        items.append(Ranked(known[i], float(scores[i]), why, True,
                            levels.level(float(scores[i])) if levels else None))
    return items


@dataclass(frozen=True)
class Levels:
    """Score thresholds of today's relevance levels for one subscriber, and how they were set.

    ``strong`` and ``good`` are scores on today's scale (a candidate at or above
    ``strong`` is strong); ``method`` says in words how the counts were found.
    """

    strong: float
    good: float
    method: str

    def level(self, score: float) -> str:
        """Monotone in the score: higher never gets a lower level."""
        if score >= self.strong:
            return "strong"
        return "good" if score >= self.good else "weak"


def _calibration_papers(
    index: CorpusIndex, model: SubscriberModel, candidates: Sequence[str]
) -> list[str]:
    """The positives :func:`_levels` places among ``candidates``: the most recent
    CALIBRATION_PAPERS named ones (likes, seed papers) in the corpus and not candidates."""
    today = set(candidates)
    named = [p for p, phrase in zip(model.positive_ids, model.pos_phrase.tolist(), strict=False)
             if phrase < 0 and p in index and p not in today]
    return list(dict.fromkeys(reversed(named)))[:CALIBRATION_PAPERS]


def _levels(index: CorpusIndex, pool: _Pool, candidates: list[str], scores: np.ndarray, *,
            calib: list[str] | None = None) -> Levels:
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
    ``pool`` holds ``candidates`` (their similarities are reused); ``calib``:
    ``_calibration_papers(index, pool.model, candidates)`` when the caller has it already.
    """
    model = pool.model
    order = np.sort(scores)[::-1]
    if calib is None:
        calib = _calibration_papers(index, model, candidates)
    if len(calib) >= CALIBRATION_MIN:
        pooled = _pool_scores(index, model, pool.extended(index.rows(calib)))
        own, theirs = pooled[: len(candidates)], pooled[len(candidates):]
        strong_n = int((own >= np.median(theirs)).sum())
        good_n = int((own >= theirs.min()).sum())
        method = (f"against {len(calib)} of your own papers scored among today's: strong = at "
                  f"least their median, good = at least the lowest of them")
    else:
        best = _best_positive(pool)
        strong_n = int((best >= STRONG_SIMILARITY).sum())
        good_n = int((best >= REASON_MIN_SIMILARITY).sum())
        method = (f"too few rated papers to calibrate: strong = nearest positive at least "
                  f"{STRONG_SIMILARITY}, good = at least {REASON_MIN_SIMILARITY}")
    strong = float(order[strong_n - 1]) if strong_n > 0 else math.inf
    good = float(order[max(good_n, strong_n) - 1]) if max(good_n, strong_n) > 0 else math.inf
    return Levels(strong, good, method)


def levels_for(
    index: CorpusIndex,
    profile: Profile,
    candidates: Sequence[str],
    *,
    settings: RankingConfig = DEFAULT_SETTINGS,
    cache: ModelCache | None = None,
    key: str | None = None,
) -> Levels | None:
    """Today's level thresholds for this subscriber (None when not personalised)."""
    known = [c for c in dict.fromkeys(candidates) if c in index]
    model = _model_for(index, profile, settings, cache, key)
    if model is None or not is_personalised(profile) or not known:
        return None
    rows = index.rows(known)
    pool = _Pool(index, model, rows)
    return _levels(index, pool, known, _pool_scores(index, model, pool))


# --- Explanations -------------------------------------------------------------------


def _shared_terms(
    index: CorpusIndex, model: SubscriberModel, row: int, top: int
) -> tuple[tuple[str, float], ...]:
    """Terms whose weight in both the paper and the profile contributes most to their match."""
    product = index.specific[row].multiply(model.centroid(index)).tocsr()
    if product.nnz == 0:
        return ()
    order = np.argsort(-product.data, kind="stable")[:top]
    return tuple((index.term(int(product.indices[k])), float(product.data[k])) for k in order)


def _neighbours(
    ids: Sequence[str], titles: Sequence[str], sims: np.ndarray, top: int, exclude: str
) -> tuple[Neighbour, ...]:
    """The ``top`` most similar of ``ids``, never the explained paper itself."""
    order = np.argsort(-sims[: len(ids)], kind="stable")
    kept = [k for k in order if ids[k] != exclude][:top]
    return tuple(Neighbour(ids[k], titles[k], float(sims[k])) for k in kept)


def _context_candidates(index: CorpusIndex, paper_id: str) -> list[str]:
    """Without a candidate list, a paper is ranked among the papers listed the same day."""
    day = index.paper(paper_id).listed_on
    if day is None:
        return [p.id for p in index._papers]
    return [p.id for p in index._papers if p.listed_on == day]


def explain(
    index: CorpusIndex,
    profile: Profile,
    paper_id: str,
    *,
    candidates: Sequence[str] | None = None,
    limit: int = 10,
    settings: RankingConfig = DEFAULT_SETTINGS,
    cache: ModelCache | None = None,
    key: str | None = None,
    top_terms: int = 8,
    top_neighbours: int = 3,
) -> Explanation:
    """Why `paper_id` scores what it does, among `candidates` (default: its listing day).

    ``position`` is its place in the digest of ``limit`` papers when it is in
    that digest (explore slots included), else its place in the model's order.
    """
    if paper_id not in index:
        raise UnknownPaper(paper_id)
    pool = (
        list(dict.fromkeys(candidates))
        if candidates is not None
        else _context_candidates(index, paper_id)
    )
    pool = [c for c in pool if c in index]
    if paper_id not in pool:
        pool.append(paper_id)
    digest = rank(index, profile, pool, limit=limit, settings=settings, cache=cache, key=key)
    for position, item in enumerate(digest, start=1):
        if item.paper_id == paper_id:
            break
    else:
        model = _model_for(index, profile, settings, cache, key)
        rows = index.rows(pool)
        scored = _Pool(index, model, rows) if model is not None else None
        scores = _pool_scores(index, model, scored) if model and scored else index.popularity(rows)
        order = np.argsort(-scores, kind="stable")
        at = pool.index(paper_id)
        position = int(np.flatnonzero(order == at)[0]) + 1
        reason = _item_reason(index, scored, paper_id, at, len(pool), limit)
        levels = (_levels(index, scored, pool, scores)
                  if scored is not None and is_personalised(profile) else None)
        item = Ranked(paper_id, float(scores[at]), reason, False,
                      levels.level(float(scores[at])) if levels else None)
    levels = levels_for(index, profile, pool, settings=settings, cache=cache, key=key)
    return _explanation(
        index, profile, paper_id, item, position, settings, cache, key, top_terms, top_neighbours,
        levels,
    )


def _explanation(
    index: CorpusIndex,
    profile: Profile,
    paper_id: str,
    item: Ranked,
    position: int | None,
    settings: RankingConfig,
    cache: ModelCache | None,
    key: str | None,
    top_terms: int,
    top_neighbours: int,
    levels: Levels | None = None,
) -> Explanation:
    paper = index.paper(paper_id)
    terms: tuple[tuple[str, float], ...] = ()
    liked: tuple[Neighbour, ...] = ()
    skipped: tuple[Neighbour, ...] = ()
    unrated: tuple[Neighbour, ...] = ()
    interests: tuple[tuple[str, float], ...] = ()
    if is_personalised(profile) or profile.unrated:
        model = _get_model(index, profile, settings, cache, key)
        row = int(index.rows([paper_id])[0])
        one = _Pool(index, model, np.array([row], dtype=np.int64))
        pos = _positive_similarities(one, 0)
        terms = _shared_terms(index, model, row, top_terms) if model.has_positives else ()
        liked = _neighbours(model.positive_ids, model.positive_titles, pos, top_neighbours,
                            paper_id)
        neg = _negative_similarities(one, 0)
        kinds: dict[bool, tuple[Neighbour, ...]] = {}
        for kind in (True, False):
            chosen = np.flatnonzero(model.neg_skipped == kind)
            ids = [model.negative_ids[k] for k in chosen]
            kinds[kind] = _neighbours(ids, [index.paper(i).title for i in ids], neg[chosen],
                                      top_neighbours, paper_id)
        skipped, unrated = kinds[True], kinds[False]
        phrase_sims = [
            float(pos[model.pos_phrase == j].max(initial=-1.0))
            for j in range(len(model.interest_phrases))
        ]
        interests = tuple(
            sorted(zip(model.interest_phrases, map(float, phrase_sims)), key=lambda t: -t[1])
        )
    return Explanation(
        paper_id=paper_id,
        title=paper.title,
        score=item.score,
        position=position,
        reason=item.reason,
        explore=item.explore,
        shared_terms=terms,
        nearest_liked=liked,
        nearest_skipped=skipped,
        interests=interests,
        level=item.level,
        level_method=_level_text(levels),
        nearest_unrated=unrated,
    )


def _level_text(levels: Levels | None) -> str:
    if levels is None:
        return "no level: nothing to learn from yet (the listing's own order)"
    def since(score: float) -> str:
        return f"from score {score:.2f}" if math.isfinite(score) else "none today"

    return f"{levels.method}; today strong {since(levels.strong)}, good {since(levels.good)}"


def explain_top(
    index: CorpusIndex,
    profile: Profile,
    candidates: Sequence[str],
    limit: int,
    *,
    settings: RankingConfig = DEFAULT_SETTINGS,
    cache: ModelCache | None = None,
    key: str | None = None,
    top_terms: int = 8,
    top_neighbours: int = 3,
) -> list[Explanation]:
    """Explanations of the digest `rank` would give, in digest order."""
    items = rank(index, profile, candidates, limit=limit, settings=settings, cache=cache, key=key)
    levels = levels_for(index, profile, candidates, settings=settings, cache=cache, key=key)
    return [
        _explanation(
            index, profile, it.paper_id, it, pos, settings, cache, key, top_terms, top_neighbours,
            levels,
        )
        for pos, it in enumerate(items, start=1)
    ]


__all__ = [
    "LEVELS",
    "CorpusIndex",
    "Explanation",
    "Levels",
    "ModelCache",
    "Neighbour",
    "Profile",
    "Ranked",
    "SubscriberModel",
    "UnknownPaper",
    "build_profile",
    "explain",
    "explain_top",
    "explore_slots",
    "fit_model",
    "is_personalised",
    "levels_for",
    "rank",
    "recency",
    "score_candidates",
]
