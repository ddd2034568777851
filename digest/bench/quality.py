"""The ranking-quality benchmark: run on demand by ``digest bench quality``.

Reads a dataset in the format of ``shared/bench/FORMAT.md`` (papers.jsonl,
cases.jsonl, meta.json), fits ONE :class:`~digest.rank.CorpusIndex` on the
papers, scores every case with :func:`digest.rank.score_candidates` (the very
code that ranks a real digest; exploration off) and hands back the mean
metrics as a dict, which :func:`format_table` turns into text. No argparse
and no printing here: the CLI owns both.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

from ..config import RankingConfig
from ..errors import DigestError, InputFileError
from ..paper import Paper, is_arxiv_id
from ..rank import CorpusIndex, Profile, score_candidates

log = logging.getLogger(__name__)

RANKERS = ("model", "random")
RANDOM_SEED = 20251121  # fixed, so the random ranker's numbers are reproducible
# The random ranker's metrics are averaged over this many seeded shuffles per case:
# one shuffle per case leaves +-0.005 of noise on nDCG@10, too much to check the metrics.
RANDOM_SHUFFLES = 20
CUTOFF = 10  # a digest holds about ten papers
METRIC_KEYS = ("ndcg@10", "recall@10", "mrr", "auc")


class DatasetError(InputFileError):
    """A benchmark dataset is missing a file or has a malformed line."""


@dataclass(frozen=True)
class Case:
    """One ranking case: a user's feedback and one day's candidates."""

    case: str
    user: str
    liked: tuple[str, ...]
    skipped: tuple[str, ...]
    candidates: tuple[str, ...]
    relevant: frozenset[str]


@dataclass(frozen=True)
class Dataset:
    name: str
    papers: list[Paper]
    cases: list[Case]
    meta: dict[str, Any]


# --- loading -----------------------------------------------------------------


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; a broken line names itself."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise DatasetError(str(path), "file not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(str(path), f"cannot read: {exc}") from exc
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(str(path), f"not valid JSON: {exc.msg}", number) from exc
        if not isinstance(obj, dict):
            raise DatasetError(str(path), "expected a JSON object", number)
        rows.append((number, obj))
    return rows


def _paper_from_row(path: Path, number: int, row: dict[str, Any]) -> Paper:
    """A dataset row as the Paper a dump would have produced."""
    for key in ("id", "title", "abstract"):
        if not isinstance(row.get(key), str):
            raise DatasetError(str(path), f"{key!r} must be a string", number)
    raw_date = row.get("date")
    listed_on = None
    if raw_date is not None:
        try:
            listed_on = date.fromisoformat(raw_date)
        except (TypeError, ValueError) as exc:
            raise DatasetError(
                str(path), f"'date' must be YYYY-MM-DD or null, got {raw_date!r}", number
            ) from exc
    pid = row["id"]
    return Paper(
        id=pid,
        title=row["title"],
        abstract=row["abstract"],
        arxiv_id=pid if is_arxiv_id(pid) else None,
        listed_on=listed_on,
    )


def _id_list(
    path: Path, number: int, row: dict[str, Any], key: str, known: set[str]
) -> tuple[str, ...]:
    value = row.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DatasetError(str(path), f"{key!r} must be a list of paper ids", number)
    unknown = [v for v in value if v not in known]
    if unknown:
        raise DatasetError(
            str(path), f"{key!r} names {unknown[0]!r}, which is not in papers.jsonl", number
        )
    return tuple(value)


def _case_from_row(path: Path, number: int, row: dict[str, Any], known: set[str]) -> Case:
    """A checked case: the FORMAT.md rules on sizes and disjointness hold."""
    for key in ("case", "user"):
        if not isinstance(row.get(key), str):
            raise DatasetError(str(path), f"{key!r} must be a string", number)
    liked = _id_list(path, number, row, "liked", known)
    skipped = _id_list(path, number, row, "skipped", known)
    candidates = _id_list(path, number, row, "candidates", known)
    relevant = _id_list(path, number, row, "relevant", known)
    if not liked:
        raise DatasetError(str(path), "'liked' must hold at least one paper", number)
    if len(set(candidates)) != len(candidates):
        raise DatasetError(str(path), "'candidates' repeats a paper", number)
    if not set(relevant) <= set(candidates):
        raise DatasetError(str(path), "'relevant' must be a subset of 'candidates'", number)
    if not 1 <= len(set(relevant)) < len(candidates):
        raise DatasetError(str(path), "need 1 <= |relevant| < |candidates|", number)
    if set(liked) & set(candidates) or set(skipped) & set(candidates) or set(liked) & set(skipped):
        raise DatasetError(
            str(path), "'liked', 'skipped' and 'candidates' must be disjoint", number
        )
    return Case(row["case"], row["user"], liked, skipped, candidates, frozenset(relevant))


def load_dataset(directory: str | Path) -> Dataset:
    """Read and validate a benchmark dataset folder (papers.jsonl, cases.jsonl, meta.json)."""
    root = Path(directory)
    if not root.is_dir():
        raise DatasetError(str(root), "not a dataset folder")
    meta_path = root / "meta.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DatasetError(str(meta_path), "file not found") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(str(meta_path), f"cannot read: {exc}") from exc
    if not isinstance(meta, dict):
        raise DatasetError(str(meta_path), "expected a JSON object")

    papers_path = root / "papers.jsonl"
    papers: list[Paper] = []
    seen: set[str] = set()
    for number, row in _read_jsonl(papers_path):
        paper = _paper_from_row(papers_path, number, row)
        if paper.id in seen:
            raise DatasetError(str(papers_path), f"id {paper.id!r} appears twice", number)
        seen.add(paper.id)
        papers.append(paper)

    cases_path = root / "cases.jsonl"
    cases: list[Case] = []
    names: set[str] = set()
    for number, row in _read_jsonl(cases_path):
        case = _case_from_row(cases_path, number, row, seen)
        if case.case in names:
            raise DatasetError(str(cases_path), f"case {case.case!r} appears twice", number)
        names.add(case.case)
        cases.append(case)
    if not cases:
        raise DatasetError(str(cases_path), "no cases")
    return Dataset(str(meta.get("name") or root.name), papers, cases, meta)


# --- metrics (FORMAT.md) -------------------------------------------------------


def ranked_relevance(
    scores: Sequence[float] | np.ndarray, relevant_mask: Sequence[bool] | np.ndarray
) -> np.ndarray:
    """Relevance (0/1) in final order: descending score, ties by candidate order."""
    order = np.argsort(-np.asarray(scores, dtype=float), kind="stable")
    return np.asarray(relevant_mask, dtype=bool)[order]


def ndcg_at(rel: np.ndarray, k: int = CUTOFF) -> float:
    """DCG@k / IDCG@k with binary relevance; rel is in ranked order."""
    gains = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = float(np.sum(gains[: min(k, len(rel))] * rel[:k]))
    ideal = float(np.sum(gains[: min(k, int(rel.sum()))]))
    return dcg / ideal if ideal > 0 else 0.0


def recall_at(rel: np.ndarray, k: int = CUTOFF) -> float:
    total = int(rel.sum())
    return float(rel[:k].sum()) / total if total else 0.0


def reciprocal_rank(rel: np.ndarray) -> float:
    hits = np.flatnonzero(rel)
    return 1.0 / (hits[0] + 1) if len(hits) else 0.0


def roc_auc(rel: np.ndarray) -> float:
    """Fraction of (relevant, non-relevant) pairs with the relevant one ranked higher."""
    positives = int(rel.sum())
    negatives = len(rel) - positives
    if positives == 0 or negatives == 0:
        return 0.0
    nonrelevant_below = negatives - np.cumsum(~rel)  # non-relevant items after each position
    return float(nonrelevant_below[rel].sum()) / (positives * negatives)


def case_metrics(
    scores: Sequence[float] | np.ndarray, relevant_mask: Sequence[bool] | np.ndarray
) -> dict[str, float]:
    rel = ranked_relevance(scores, relevant_mask)
    return {
        "ndcg@10": ndcg_at(rel),
        "recall@10": recall_at(rel),
        "mrr": reciprocal_rank(rel),
        "auc": roc_auc(rel),
    }


def expected_random_ndcg(dataset: Dataset, k: int = CUTOFF) -> float:
    """The mean nDCG@k a uniformly random order scores in expectation (checks the metric code).

    Each candidate lands in each position with probability 1/n, so the expected
    DCG is |relevant|/n times the sum of the first k gains.
    """
    gains = 1.0 / np.log2(np.arange(2, k + 2))
    total = 0.0
    for case in dataset.cases:
        n, r = len(case.candidates), len(case.relevant)
        total += (r / n) * gains[: min(k, n)].sum() / gains[: min(k, r)].sum()
    return total / len(dataset.cases)


# --- running -------------------------------------------------------------------


def case_profile(case: Case, max_liked: int | None) -> Profile:
    """The subscriber state a case stands for; max_liked keeps the most recent likes."""
    liked = case.liked if max_liked is None else case.liked[len(case.liked) - max_liked :]
    return Profile(liked=tuple(liked), skipped=case.skipped)


def _progress(items: list[Case], enabled: bool, label: str) -> Any:
    if not enabled:
        return items
    from tqdm import tqdm  # imported late: only the benchmark's progress bar needs it

    return tqdm(items, desc=label, unit="case", leave=False)


def run_quality(
    dataset_dir: str | Path,
    *,
    max_liked: int | None = None,
    progress: bool = False,
    ranker: str = "model",
    settings: RankingConfig | None = None,
) -> dict[str, Any]:
    """Score every case of a dataset and return the mean metrics and the speed.

    ``cases_per_s`` counts ranking only; ``seconds`` is the whole run
    (loading, the corpus fit and ranking). Exploration is always off: the
    benchmark measures the model's own order. ``ranker="random"`` scores each
    case with seeded random orders instead (metrics averaged over
    RANDOM_SHUFFLES of them), to check the metric code against
    ``random_ndcg@10``, the expectation computed in closed form.
    """
    if ranker not in RANKERS:
        raise DigestError(f"unknown ranker {ranker!r} (expected one of: {', '.join(RANKERS)})")
    if max_liked is not None and max_liked < 1:
        raise DigestError(f"--max-liked must be at least 1, got {max_liked}")
    started = time.perf_counter()
    dataset = load_dataset(dataset_dir)
    loaded = time.perf_counter()
    index = CorpusIndex.fit(dataset.papers) if ranker == "model" else None
    fitted = time.perf_counter()
    log.info(
        "dataset %s: %d papers, %d cases, fit in %.1f s",
        dataset.name,
        len(dataset.papers),
        len(dataset.cases),
        fitted - loaded,
    )

    base = settings or RankingConfig()
    no_explore = RankingConfig(unrated_weight=base.unrated_weight, explore_fraction=0.0)
    rng = np.random.default_rng(RANDOM_SEED)
    totals = dict.fromkeys(METRIC_KEYS, 0.0)
    for case in _progress(dataset.cases, progress, dataset.name):
        mask = np.fromiter(
            (c in case.relevant for c in case.candidates), dtype=bool, count=len(case.candidates)
        )
        if index is None:
            runs = [rng.random(len(case.candidates)) for _ in range(RANDOM_SHUFFLES)]
        else:
            profile = case_profile(case, max_liked)
            runs = [score_candidates(index, profile, case.candidates, settings=no_explore)]
        for scores in runs:
            for key, value in case_metrics(scores, mask).items():
                totals[key] += value / len(runs)
    finished = time.perf_counter()

    count = len(dataset.cases)
    result: dict[str, Any] = {key: totals[key] / count for key in METRIC_KEYS}
    result.update(
        {
            "cases": count,
            "cases_per_s": count / max(finished - fitted, 1e-9),
            "dataset": dataset.name,
            "ranker": ranker,
            "max_liked": max_liked,
            "explore": "off",
            "random_ndcg@10": expected_random_ndcg(dataset),
            "fit_seconds": fitted - loaded,
            "seconds": finished - started,
        }
    )
    return result


def format_table(result: dict[str, Any]) -> str:
    """A small text table of one run, saying that exploration was off."""
    title = f"dataset {result['dataset']}, ranker {result['ranker']}"
    if result.get("max_liked") is not None:
        title += f", max liked {result['max_liked']}"
    note = "(exploration slots off: this measures the model's own ranking)"
    if result["ranker"] == "random":
        note = f"(seeded random orders, {RANDOM_SHUFFLES} per case: checks the metric code)"
    lines = [title, note, ""]
    rows = [(key, f"{result[key]:.4f}") for key in METRIC_KEYS]
    if "random_ndcg@10" in result:
        rows.append(("(random nDCG@10, expected)", f"{result['random_ndcg@10']:.4f}"))
    rows += [
        ("cases", str(result["cases"])),
        ("cases/s", f"{result['cases_per_s']:.0f}"),
        ("fit s", f"{result['fit_seconds']:.1f}"),
        ("total s", f"{result['seconds']:.1f}"),
    ]
    width = max(len(name) for name, _ in rows)
    lines += [f"{name:<{width}}  {value:>10}" for name, value in rows]
    return "\n".join(lines)


def result_json(result: dict[str, Any]) -> str:
    """The one JSON line of ``--json``: the issue's keys first, rounded."""
    keys = (*METRIC_KEYS, "cases", "cases_per_s")
    line = {k: round(result[k], 4) if isinstance(result[k], float) else result[k] for k in keys}
    line.update({k: result[k] for k in ("dataset", "ranker", "max_liked", "explore")})
    line["seconds"] = round(result["seconds"], 2)
    return json.dumps(line)


__all__ = [
    "Case",
    "Dataset",
    "DatasetError",
    "case_metrics",
    "expected_random_ndcg",
    "format_table",
    "load_dataset",
    "ndcg_at",
    "recall_at",
    "reciprocal_rank",
    "result_json",
    "roc_auc",
    "run_quality",
]
