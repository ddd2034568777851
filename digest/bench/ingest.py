"""``digest bench ingest``: ingestion speed on the real daily listings.

Renders every day of the daily-papers JSON lines file as a page dump (the
layout of the sample dumps: header lines, a ``Mon D`` date line, then title /
abstract pairs separated by blank lines), then times a scan of that folder
into a fresh SQLite store, several runs, and reports the median. The parse
alone is timed too, so the cost of storage is visible beside it.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections import defaultdict
from datetime import date
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..dumps import parse_file
from ..errors import DigestError
from ..ingest import inbox_files, scan_inbox
from ..store import Store

PAGE_HEADER = ("new", "Get trending papers in your email inbox!", "Subscribe",
               "byAK and the research community")


def render_page_dump(day: date, rows: list[dict[str, Any]]) -> str:
    """One day's listing in the page-dump layout, no trailing newline."""
    lines = [*PAGE_HEADER, f"{day:%b} {day.day}"]
    for row in rows:
        lines.append(" ".join(str(row["title"]).split()))
        lines.append(" ".join(str(row["abstract"]).split()))
    return "\n\n".join(lines)


def load_listings(data: Path, days: int | None = None) -> dict[date, list[dict[str, Any]]]:
    if not data.is_file():
        raise DigestError(f"{data}: no such data file (the benchmark reads ../shared/data)")
    by_day: dict[date, list[dict[str, Any]]] = defaultdict(list)
    with data.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                row = json.loads(line)
                by_day[date.fromisoformat(row["date"])].append(row)
            except (ValueError, KeyError) as exc:
                raise DigestError(f"{data}:{number}: not a daily-papers row: {exc}") from exc
    for rows in by_day.values():
        rows.sort(key=lambda row: row.get("rank_in_file", 0))
    ordered = dict(sorted(by_day.items()))
    if days is not None:
        ordered = dict(list(ordered.items())[:days])
    return ordered


def write_dumps(listings: dict[date, list[dict[str, Any]]], folder: Path) -> int:
    for day, rows in listings.items():
        (folder / f"{day.isoformat()}_trending.txt").write_text(
            render_page_dump(day, rows), encoding="utf-8")
    return len(listings)


def run_ingest_bench(data: Path, *, runs: int = 3, days: int | None = None,
                     progress: bool = True) -> dict[str, Any]:
    listings = load_listings(data, days)
    rows = sum(len(r) for r in listings.values())
    parse_times, ingest_times = [], []
    stored = 0
    with tempfile.TemporaryDirectory(prefix="digest-bench-") as tmp:
        inbox = Path(tmp) / "inbox"
        inbox.mkdir()
        write_dumps(listings, inbox)
        files = inbox_files(inbox)
        for run in tqdm(range(runs), desc="ingest runs", disable=not progress):
            started = time.perf_counter()
            parsed = sum(len(parse_file(path).papers) for path in files)
            parse_times.append(time.perf_counter() - started)
            state = Path(tmp) / f"run{run}.sqlite3"
            started = time.perf_counter()
            with Store(state) as store:
                results = scan_inbox(store, inbox, stable_seconds=0)
                stored = store.paper_count()
            ingest_times.append(time.perf_counter() - started)
            failed = [r for r in results if r.status != "ingested"]
            if failed:
                raise DigestError(f"bench: {len(failed)} dumps not ingested, first: "
                                  f"{failed[0].path}: {failed[0].reason}")
    parse_s = statistics.median(parse_times)
    ingest_s = statistics.median(ingest_times)
    result: dict[str, Any] = {
        "bench": "ingest",
        "files": len(files),
        "rows": rows,
        "papers_parsed": parsed,
        "papers_stored": stored,
        "runs": runs,
        "parse_s": round(parse_s, 3),
        "ingest_s": round(ingest_s, 3),
        "papers_per_s": round(parsed / ingest_s, 1),
        "parse_papers_per_s": round(parsed / parse_s, 1),
    }
    result["table"] = _table(result, ingest_times)
    return result


def _table(result: dict[str, Any], ingest_times: list[float]) -> str:
    runs = ", ".join(f"{t:.2f}" for t in ingest_times)
    return "\n".join([
        (f"ingest benchmark: {result['files']} page dumps, {result['rows']} listing rows, "
        f"{result['papers_stored']} distinct papers stored"),
        f"{'stage':<28}{'median s':>10}{'papers/s':>12}",
        f"{'parse only (baseline)':<28}{result['parse_s']:>10.2f}{result['parse_papers_per_s']:>12.0f}",
        f"{'scan: hash+parse+store':<28}{result['ingest_s']:>10.2f}{result['papers_per_s']:>12.0f}",
        f"runs (s): {runs}",
    ])
