"""The corpus-fit benchmark: run on demand by ``digest bench corpus``.

Fits :class:`~digest.rank.CorpusIndex` on a benchmark dataset's papers (the
format of ``shared/bench/FORMAT.md``) once per method and run, each fit in a
fresh process so that one fit's memory cannot hide in another's, and hands
back per method the papers, the terms kept, the fit's wall and CPU seconds and
the fit's peak RSS over the process's RSS just before it (medians of the
runs), plus a text table. ``repeat`` makes the corpus N times larger by
repeating its papers under new ids, to show how the fit grows past the data
at hand. No argparse and no printing here: the CLI owns both.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import resource
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import DigestError
from ..paper import Paper
from ..rank import CORPUS_FIT, UNBOUNDED_FIT, CorpusIndex, FitBounds
from .interrupt import ignore_sigint, start_helper
from .options import DEFAULT_CORPUS_METHODS
from .quality import load_dataset

# The methods measured, by name: the fit before issue 13 (the baseline), the
# candidates tried, and the shipped bounds (rank.CORPUS_FIT).
METHODS: dict[str, FitBounds] = {
    "all": UNBOUNDED_FIT,
    "cap-50k": FitBounds(max_terms=50_000),
    "window-8k": FitBounds(window=8_000),
    "window-8k-cap-50k": FitBounds(window=8_000, max_terms=50_000),
    "sample-8k-cap-50k": FitBounds(window=8_000, max_terms=50_000, spread=True),
    "window-4k-cap-50k": FitBounds(window=4_000, max_terms=50_000),
    "shipped": CORPUS_FIT,
}
DEFAULT_METHODS = DEFAULT_CORPUS_METHODS
STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")  # writing "5" resets the peak RSS (Linux >= 4.0)


def repeated(papers: Sequence[Paper], times: int) -> list[Paper]:
    """The papers ``times`` over, copies under new ids (``ID#2``, ...), in blocks."""
    if times < 1:
        raise DigestError(f"--repeat must be at least 1, got {times}")
    copies = [
        dataclasses.replace(p, id=f"{p.id}#{k}", arxiv_id=None) for k in range(2, times + 1)
        for p in papers
    ]
    return [*papers, *copies]


def _status_mb(key: str) -> float | None:
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status in MB, None where there is none."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak RSS of this process; False where it cannot be reset."""
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def _peak_mb(reset: bool) -> float:
    """The peak RSS in MB since the reset (else since the process started)."""
    peak = _status_mb("VmHWM") if reset else None
    # ru_maxrss is in KB on Linux: the fallback where /proc is absent or read-only
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_fit(papers: Sequence[Paper], bounds: FitBounds) -> dict[str, float]:
    """Fit once in this process: papers, terms, wall s, CPU s and MB over the RSS before."""
    reset = _reset_peak()
    before = _status_mb("VmRSS") or 0.0
    wall, cpu = time.perf_counter(), time.process_time()
    index = CorpusIndex.fit(papers, bounds)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "papers": len(index),
        "terms": len(index.vectorizer.vocabulary_),
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_mb": max(_peak_mb(reset) - before, 0.0),
    }


def _child(dataset_dir: str, bounds: FitBounds, repeat: int, out: Any) -> None:
    """One run in a fresh process: load, then measure only the fit."""
    ignore_sigint()  # a Ctrl-C is the benchmark's to handle: it ends this process
    try:
        papers = repeated(load_dataset(dataset_dir).papers, repeat)
        out.send(("ok", measure_fit(papers, bounds)))
    except DigestError as exc:
        out.send(("error", str(exc)))


def _run_fresh(dataset_dir: str, bounds: FitBounds, repeat: int) -> dict[str, float]:
    context = multiprocessing.get_context("spawn")  # nothing inherited: the fit's memory alone
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(dataset_dir, bounds, repeat, send))
    start_helper(process)
    send.close()
    try:
        status, value = receive.recv()
    except EOFError:
        process.join()
        raise DigestError(
            f"the fit process ended without a result (exit code {process.exitcode}; "
            "out of memory?)"
        ) from None
    process.join()
    if status != "ok":
        raise DigestError(str(value))
    return dict(value)


def run_corpus_bench(
    dataset_dir: str | Path,
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    runs: int = 3,
    repeat: int = 1,
) -> dict[str, Any]:
    """Measure each method's fit ``runs`` times, each in a fresh process.

    Returns ``{"dataset", "runs", "repeat", "methods": {name: {"bounds",
    "papers", "terms", "wall_s", "cpu_s", "peak_mb"}}, "table"}``: seconds
    and MB are medians over the runs. Raises DigestError for an unknown
    method, runs < 1, or a dataset that cannot be read.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise DigestError(f"unknown method {unknown[0]!r} (known: {', '.join(METHODS)})")
    if runs < 1:
        raise DigestError(f"--runs must be at least 1, got {runs}")
    if repeat < 1:
        raise DigestError(f"--repeat must be at least 1, got {repeat}")
    dataset_dir = str(dataset_dir)
    load_dataset(dataset_dir)  # a bad dataset fails here, once, with its own message
    measured: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(methods):
        bounds = METHODS[name]
        samples = [_run_fresh(dataset_dir, bounds, repeat) for _ in range(runs)]
        row: dict[str, Any] = {"bounds": _describe(bounds)}
        row["papers"] = int(samples[0]["papers"])
        row["terms"] = int(samples[0]["terms"])
        for key in ("wall_s", "cpu_s", "peak_mb"):
            row[key] = round(statistics.median(s[key] for s in samples), 2)
        measured[name] = row
    result: dict[str, Any] = {
        "dataset": Path(dataset_dir).name,
        "runs": runs,
        "repeat": repeat,
        "methods": measured,
    }
    result["table"] = format_table(result)
    return result


def _describe(bounds: FitBounds) -> str:
    window = "all papers" if bounds.window is None else f"last {bounds.window} papers"
    terms = "all terms" if bounds.max_terms is None else f"{bounds.max_terms} terms"
    return f"{window}, {terms}, {bounds.svd_iterations} SVD iterations"


def format_table(result: dict[str, Any]) -> str:
    """The methods side by side: fit time, CPU and peak memory (medians)."""
    title = f"corpus fit on {result['dataset']}"
    if result["repeat"] > 1:
        title += f" x{result['repeat']} (papers repeated under new ids)"
    lines = [
        f"{title}, median of {result['runs']} run(s), each in a fresh process",
        "",
        f"{'method':<18} {'papers':>7} {'terms':>8} {'wall s':>7} {'CPU s':>7} {'peak MB':>8}  fitted on",
    ]
    for name, row in result["methods"].items():
        lines.append(
            f"{name:<18} {row['papers']:>7} {row['terms']:>8} {row['wall_s']:>7.1f} "
            f"{row['cpu_s']:>7.1f} {row['peak_mb']:>8.0f}  {row['bounds']}"
        )
    return "\n".join(lines)


def result_json(result: dict[str, Any]) -> str:
    """The one JSON line: everything but the table."""
    return json.dumps({k: v for k, v in result.items() if k != "table"}, sort_keys=True)


__all__ = ["METHODS", "measure_fit", "repeated", "result_json", "run_corpus_bench"]
