"""The fault campaign behind ``digest bench faults``: one area at a time, then one table.

Each area is a module ``digest.bench.faults_<area>`` with a function
``run(workdir: Path, quick: bool) -> AreaResult`` that tries its cases against
the real code (real files, a real SQLite file, real SMTP/IMAP servers on
loopback, real subprocesses) and counts what went wrong. ``quick`` is the
size used by the test suite and CI; without it each area tries its full
campaign. The counts mean:

- ``crashes``: a unit's failure escaped its boundary (a traceback, an exit the
  case did not expect, a daemon that stopped);
- ``data_lost``: a dump neither ingested nor in ``failed/`` with a reason, a
  digest never delivered, a reply neither applied nor recorded;
- ``duplicates``: a message delivered twice; ``window_duplicates`` counts the
  ones inside the unavoidable window between the server's 250 and our commit;
- ``unclear_errors``: an error message without the file, key or subscriber it
  concerns, or with a traceback.

Everything but ``window_duplicates`` must be zero.
"""

from __future__ import annotations

import importlib
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Area name -> one line of what it tries. The order is the table's.
AREAS: dict[str, str] = {
    "dumps": "hostile dump files through parse and scan",
    "config": "hostile configs through check-config and send --dry-run",
    "smtp": "SMTP servers that refuse, fail AUTH/TLS, hang or drop",
    "senders": "two senders on one state; kill -9 during a dispatch, then restart",
    "replies": "forged senders, auto-replies, replies that must change nothing",
}


@dataclass
class AreaResult:
    """What one area of the campaign found; every count but window_duplicates must be 0."""

    area: str
    cases: int = 0
    crashes: int = 0
    data_lost: int = 0
    duplicates: int = 0
    window_duplicates: int = 0
    unclear_errors: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  # one line per failed case, for the reader

    @property
    def clean(self) -> bool:
        return not (self.crashes or self.data_lost or self.duplicates or self.unclear_errors)


def run_area(area: str, workdir: Path, *, quick: bool) -> AreaResult:
    """Run one area's campaign (module ``digest.bench.faults_<area>``) in ``workdir``."""
    module = importlib.import_module(f"digest.bench.faults_{area}")
    started = time.perf_counter()
    result: AreaResult = module.run(workdir, quick)
    result.seconds = time.perf_counter() - started
    return result


def run_faults(areas: list[str] | None = None, *, quick: bool = False) -> list[AreaResult]:
    """Run the named areas (all by default), each in a fresh temporary folder."""
    results = []
    for area in areas or list(AREAS):
        with tempfile.TemporaryDirectory(prefix=f"digest-faults-{area}-") as tmp:
            results.append(run_area(area, Path(tmp), quick=quick))
    return results


def format_table(results: list[AreaResult]) -> str:
    header = (f"{'area':<9} {'cases':>6} {'crashes':>8} {'lost':>5} {'dups':>5} "
              f"{'in 250 window':>13} {'unclear':>8} {'s':>6}  what")
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(f"{r.area:<9} {r.cases:>6} {r.crashes:>8} {r.data_lost:>5} {r.duplicates:>5} "
                     f"{r.window_duplicates:>13} {r.unclear_errors:>8} {r.seconds:>6.1f}  "
                     f"{AREAS.get(r.area, '')}")
        lines.extend(f"    {r.area}: {note}" for note in r.notes)
    return "\n".join(lines)


def result_json(results: list[AreaResult]) -> str:
    return json.dumps({"areas": [asdict(r) for r in results],
                       "clean": all(r.clean for r in results)}, sort_keys=True)
