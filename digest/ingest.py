"""Ingest: from files in the inbox folder to papers in the store.

Runs on every scan tick of the daemon and from ``digest ingest``. A file is
recorded by the SHA-256 of its content, so dropping the same dump again
changes nothing. A file modified within the last few seconds may still be
being written and is left for the next scan. A file that cannot be parsed is
moved to ``failed/`` beside a ``.reason`` text file; the scan goes on.
Ingested files stay where they are: nothing is ever deleted.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from .dumps import content_hash, parse_file
from .errors import DumpError
from .store import Store

log = logging.getLogger(__name__)

FAILED_DIR = "failed"


@dataclass(frozen=True)
class IngestResult:
    path: Path
    status: str  # ingested | duplicate | failed | unstable
    papers: int = 0
    new_papers: int = 0
    reason: str = ""


def inbox_files(inbox: Path) -> list[Path]:
    """Candidate dump files: regular, visible files directly in the inbox, by name."""
    if not inbox.is_dir():
        return []
    return sorted(
        path for path in inbox.iterdir()
        if path.is_file() and not path.name.startswith((".", "~")) and not path.name.endswith("~")
    )


def is_stable(path: Path, stable_seconds: float, now: float | None = None) -> bool:
    """False while the file was modified within ``stable_seconds``: it may be half-written.

    A modification time further in the future than that is clock skew (a file
    from another machine, a clock set back), not a writer at work: stable.
    """
    try:
        modified = path.stat().st_mtime
    except OSError:
        return False
    age = (now if now is not None else time.time()) - modified
    return abs(age) >= stable_seconds


def ingest_file(store: Store, path: Path) -> IngestResult:
    """Parse and store one file; raises DumpError for a file that is not a dump."""
    data = path.read_bytes()
    sha = content_hash(data)
    if store.dump_record(sha) is not None:
        return IngestResult(path, "duplicate")
    parsed = parse_file(path, data)
    new = store.add_dump(sha, str(path), parsed.format, parsed.papers)
    log.info("dump %s: %d papers (%d new), listed %s", path.name, len(parsed.papers), new,
             parsed.listed_on or "on unknown dates")
    return IngestResult(path, "ingested", papers=len(parsed.papers), new_papers=new)


def move_to_failed(path: Path, reason: str) -> Path:
    """Move a file aside to ``failed/`` with a ``.reason`` file; never overwrite one."""
    failed = path.parent / FAILED_DIR
    failed.mkdir(exist_ok=True)
    target = failed / path.name
    counter = 1
    while target.exists() or target.with_name(target.name + ".reason").exists():
        target = failed / f"{path.stem}.{counter}{path.suffix}"
        counter += 1
    path.rename(target)
    target.with_name(target.name + ".reason").write_text(reason + "\n", encoding="utf-8")
    return target


def scan_inbox(store: Store, inbox: Path, *, stable_seconds: float) -> list[IngestResult]:
    """Ingest every stable new file in the inbox; move unparseable ones aside."""
    results = []
    for path in inbox_files(inbox):
        if not is_stable(path, stable_seconds):
            log.info("dump %s: modified just now, left for the next scan", path.name)
            results.append(IngestResult(path, "unstable"))
            continue
        results.append(_ingest_or_move_aside(store, path))
    return results


def _ingest_or_move_aside(store: Store, path: Path) -> IngestResult:
    try:
        return ingest_file(store, path)
    except DumpError as exc:
        reason = str(exc)
    except OSError as exc:
        reason = f"{path}: cannot read: {exc.strerror or exc}"
    try:
        target = move_to_failed(path, reason)
    except OSError as exc:
        log.error("dump %s: %s; and it cannot be moved aside: %s", path.name, reason, exc)
        return IngestResult(path, "failed", reason=reason)
    log.error("dump %s: %s; moved to %s", path.name, reason, target)
    return IngestResult(path, "failed", reason=reason)
