"""Ingest: from files in the inbox folder to papers in the store.

Runs on every scan tick of the daemon and from ``digest ingest``. A file is
recorded by the SHA-256 of its content, so dropping the same dump again
changes nothing. A file modified within the last few seconds may still be
being written and is left for the next scan. Ingested files stay where they
are: nothing is ever deleted.

Containment (DESIGN.md "Failure containment is structural"): one dump file is
one unit. ``ingest_file`` is its boundary: whatever goes wrong with that file
(a parse error, RecursionError, OverflowError, UnicodeError, a SQLite error
about its rows, an unreadable file) comes out as that file's ``DumpError``
with a readable reason. A scan moves such a file to ``failed/`` beside a
``NAME.reason`` text file and goes on, so a restart never meets it again. Only
``StoreError`` (the database itself unusable) passes through: the daemon's
own failure, and the file stays in the inbox for when the database is back.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .dumps import MAX_DUMP_BYTES, clean_text, content_hash, parse_file, printable_name
from .errors import DumpError, StoreError
from .store import Store

log = logging.getLogger(__name__)

FAILED_DIR = "failed"
REASON_SUFFIX = ".reason"
# A reason longer than this is cut: it is read by a person, in a log line and a file.
REASON_MAX_CHARS = 2_000
# A name in failed/ is cut to this many bytes: file systems allow 255, and the
# ".reason" file beside it and a ".NNN" counter need room.
FAILED_NAME_MAX_BYTES = 230


@dataclass(frozen=True)
class IngestResult:
    path: Path
    status: str  # ingested | duplicate | failed | unstable
    papers: int = 0
    new_papers: int = 0
    reason: str = ""
    revised: int = 0  # stored papers updated by the listing's revisions (arXiv "replace")

    @property
    def name(self) -> str:
        """The file's path for a message: one line, valid UTF-8, odd bytes escaped."""
        return printable_name(str(self.path))


def inbox_files(inbox: Path) -> list[Path]:
    """Candidate dump files: regular, visible files directly in the inbox, by name.

    Raises OSError when the inbox exists but cannot be listed.
    """
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
    """Parse and store one file: the boundary of one dump file's unit of work.

    Returns the result (ingested, or duplicate when the same content was
    ingested before). Raises DumpError for anything that goes wrong with this
    file, whatever was raised inside, and StoreError when the database fails.
    """
    name = printable_name(str(path))
    try:
        return _ingest(store, path, name)
    except (DumpError, StoreError):
        raise
    except OSError as exc:
        raise DumpError(name, f"cannot read: {exc.strerror or _one_line(str(exc))}") from exc
    except Exception as exc:  # the boundary: any failure of this file is this file's
        log.debug("dump %s: unexpected %s", name, type(exc).__name__, exc_info=True)
        raise DumpError(name, _unexpected(exc)) from exc


def _ingest(store: Store, path: Path, name: str) -> IngestResult:
    with path.open("rb") as handle:
        data = handle.read(MAX_DUMP_BYTES + 1)  # past the limit parse_file refuses it
    sha = content_hash(data)
    if store.dump_record(sha) is not None:
        return IngestResult(path, "duplicate")
    parsed = parse_file(path, data)
    for warning in parsed.warnings:
        log.warning("dump %s: %s", name, warning)
    stored = store.add_listing(sha, name, parsed.format, parsed.papers, parsed.updates)
    revisions = (f", {stored.updated} stored papers revised of {len(parsed.updates)} "
                 "revisions listed" if parsed.updates else "")
    log.info("dump %s: %d papers (%d new)%s, listed %s", name, len(parsed.papers), stored.new,
             revisions, parsed.listed_on or "on unknown dates")
    return IngestResult(path, "ingested", papers=len(parsed.papers), new_papers=stored.new,
                        revised=stored.updated)


def _unexpected(exc: Exception) -> str:
    """The reason for a failure no parser foresaw, readable and honest about it."""
    if isinstance(exc, RecursionError):
        what = "nested too deeply to be read"
    elif isinstance(exc, MemoryError):
        what = "too large to be read in memory"
    else:
        what = f"{type(exc).__name__}: {_one_line(str(exc)) or 'no detail'}"
    return f"{what} (an error paper-digest did not foresee: the file is kept; please report it)"


def _one_line(text: str) -> str:
    return clean_text(text)[:REASON_MAX_CHARS]


def move_to_failed(path: Path, reason: str) -> Path:
    """Move a file aside to ``failed/`` with a ``.reason`` file; never overwrite one.

    The reason is written first, so a file in ``failed/`` always has one; when
    the move itself fails, the reason written for it is taken back and OSError
    is raised (the file stays where it was).
    """
    failed = path.parent / FAILED_DIR
    if failed.is_symlink() or (failed.exists() and not failed.is_dir()):
        # mkdir would say only "File exists"; the admin needs to know which file is in the way.
        raise OSError(errno.ENOTDIR, f"{FAILED_DIR} in the inbox is a file, not a folder: "
                      "rename or move that file")
    failed.mkdir(exist_ok=True)
    name = _short_name(path.name)
    target = failed / name
    counter = 1
    while target.exists() or _reason_path(target).exists():
        target = failed / f"{Path(name).stem}.{counter}{Path(name).suffix}"
        counter += 1
    reason_file = _reason_path(target)
    reason_file.write_text(_one_line(reason) + "\n", encoding="utf-8")
    try:
        path.rename(target)
    except OSError:
        reason_file.unlink(missing_ok=True)
        raise
    return target


def _short_name(name: str) -> str:
    """``name``, cut so that ``NAME.N.reason`` still fits the file system's 255 bytes."""
    raw = os.fsencode(name)
    if len(raw) <= FAILED_NAME_MAX_BYTES:
        return name
    suffix = os.fsencode(Path(name).suffix)[:16]
    return os.fsdecode(raw[: FAILED_NAME_MAX_BYTES - len(suffix)] + suffix)


def _reason_path(target: Path) -> Path:
    return target.with_name(target.name + REASON_SUFFIX)


def scan_inbox(store: Store, inbox: Path, *, stable_seconds: float) -> list[IngestResult]:
    """Ingest every stable new file in the inbox; move the ones that fail aside.

    Each file is one unit: its failure is recorded (``failed/NAME.reason``,
    one log line) and the scan goes on with the next. Raises StoreError, and
    only that, when the database fails: the scan stops, the file stays.
    """
    try:
        files = inbox_files(inbox)
    except OSError as exc:
        log.error("inbox %s: cannot be listed: %s; scanning again at the next tick",
                  printable_name(str(inbox)), exc.strerror or exc)
        return []
    results = []
    for path in files:
        if not is_stable(path, stable_seconds):
            log.info("dump %s: modified just now, left for the next scan",
                     printable_name(path.name))
            results.append(IngestResult(path, "unstable"))
            continue
        results.append(_ingest_or_move_aside(store, path))
    return results


def _ingest_or_move_aside(store: Store, path: Path) -> IngestResult:
    try:
        return ingest_file(store, path)
    except DumpError as exc:
        reason = _one_line(str(exc))
    name = printable_name(path.name)
    try:
        target = move_to_failed(path, reason)
    except OSError as exc:
        log.error("dump %s: %s; and it cannot be moved to %s/ (%s): it stays in the inbox "
                  "and is tried again at the next scan", name, reason, FAILED_DIR,
                  exc.strerror or exc)
        return IngestResult(path, "failed", reason=reason)
    log.error("dump %s: %s; moved to %s", name, reason, printable_name(str(target)))
    return IngestResult(path, "failed", reason=reason)
