"""``digest bench config``: how long loading the config takes for N subscribers.

Writes a config of N subscribers shaped like the dispatch benchmark's
(``bench.dispatch.write_config``: an address, a name, zero to four interest
phrases, one of a dozen time zones, a send time), plus a baseline config of
``BASELINE_SUBSCRIBERS``, and times ``load_config`` on each, several runs
each, in a fresh process per run so that its peak RSS is the load's own and
no cache of an earlier run helps. Reports the median load time (wall and CPU:
on a busy machine the wall clock counts other processes' turns too), the time
per subscriber and the peak RSS of each size (a table and a JSON line).

The phrases are drawn from a fixed vocabulary by a seeded generator: the
config is the same on every machine and needs no shared data.
"""

from __future__ import annotations

import json
import multiprocessing
import random
import resource
import statistics
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from ..errors import DigestError
from .interrupt import ignore_sigint, start_helper

BASELINE_SUBSCRIBERS = 1000  # the baseline size, measured in the same run
DOMAIN = "bench.example.org"
# The zones of the dispatch benchmark: a spread of offsets and DST rules.
TIMEZONES = ("UTC", "Europe/Berlin", "Europe/London", "Europe/Paris", "America/New_York",
             "America/Los_Angeles", "America/Sao_Paulo", "Asia/Shanghai", "Asia/Tokyo",
             "Asia/Kolkata", "Australia/Sydney", "Africa/Nairobi")
# Words of interest phrases (two words each): topics a research group follows.
_WORDS = ("graph", "neural", "diffusion", "language", "vision", "reinforcement", "robot",
          "protein", "sparse", "attention", "retrieval", "speech", "causal", "federated",
          "quantum", "contrastive", "generative", "multimodal", "symbolic", "bayesian",
          "networks", "transformers", "policies", "inference", "alignment", "reasoning",
          "segmentation", "planning", "compression", "agents", "kernels", "priors")


def write_bench_config(folder: Path, subscribers: int, *, seed: int = 13) -> Path:
    """A config file of ``subscribers`` subscribers in ``folder``; returns its path."""
    rng = random.Random(seed)
    lines = [
        "# Written by digest bench config.",
        "[digest]",
        'inbox = "inbox"',
        'state = "state/digest.sqlite3"',
        "[smtp]",
        'host = "127.0.0.1"',
        "port = 2525",
        'security = "none"',
        f'from = "Paper Digest <digest@{DOMAIN}>"',
        f'reply_to = "digest+{{token}}@{DOMAIN}"',
    ]
    for n in range(subscribers):
        interests = sorted({f"{rng.choice(_WORDS)} {rng.choice(_WORDS)}"
                            for _ in range(rng.choice((0, 1, 2, 2, 3, 4)))})
        lines += [
            "[[subscribers]]",
            f'email = "reader{n:06d}@{DOMAIN}"',
            f'name = "Reader {n}"',
            f"interests = {json.dumps(interests)}",
            f'timezone = "{rng.choice(TIMEZONES)}"',
            f'send_at = "{rng.randrange(24):02d}:{rng.randrange(60):02d}"',
        ]
    path = folder / f"bench-{subscribers}.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _load_once(conn: Connection, path: str) -> None:
    """Child process: load the config once; send (seconds, CPU seconds, subscribers, peak RSS
    KiB) or an error."""
    ignore_sigint()  # a Ctrl-C is the benchmark's to handle: it ends this process
    from ..config import load_config
    from ..errors import ConfigError

    try:
        started, cpu = time.perf_counter(), time.process_time()
        config = load_config(path)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    except ConfigError as exc:
        conn.send(("error", str(exc)))
        return
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    conn.send(("ok", elapsed, cpu, len(config.subscribers), rss_kib))


def _measure(path: Path) -> tuple[float, float, int, float]:
    """One load in a fresh process: (seconds, CPU seconds, subscribers loaded, peak RSS MB)."""
    context = multiprocessing.get_context("spawn")  # a clean interpreter: no warm caches
    parent, child = context.Pipe(duplex=False)
    process = context.Process(target=_load_once, args=(child, str(path)), daemon=True)
    start_helper(process)
    child.close()
    try:
        answer: Any = parent.recv()
    except EOFError as exc:
        raise DigestError(f"bench config: the load of {path.name} died "
                          f"(exit code {process.exitcode})") from exc
    finally:
        process.join()
    if answer[0] != "ok":
        raise DigestError(f"bench config: {path.name} did not load: {answer[1]}")
    _, seconds, cpu, loaded, rss_kib = answer
    return float(seconds), float(cpu), int(loaded), rss_kib / 1024


def run_config_bench(subscribers: int, *, runs: int = 3,
                     baseline: int = BASELINE_SUBSCRIBERS) -> dict[str, Any]:
    """Time ``load_config`` for ``baseline`` and ``subscribers`` subscribers, ``runs`` each.

    Returns the JSON fields (``load_s`` is the median for N, ``per_subscriber_us`` the
    median divided by N, ``peak_rss_mb`` the largest of the runs) and ``table``.
    Raises DigestError when a config does not load (the benchmark's own bug).
    """
    if subscribers < 1 or runs < 1:
        raise DigestError("bench config: --subscribers and --runs must be at least 1")
    sizes = [baseline, subscribers] if baseline != subscribers else [subscribers]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="digest-bench-config-") as tmp:
        for size in sizes:
            path = write_bench_config(Path(tmp), size)
            times, cpus, peaks = [], [], []
            for _ in range(runs):
                seconds, cpu, loaded, peak = _measure(path)
                if loaded != size:
                    raise DigestError(f"bench config: loaded {loaded} of {size} subscribers")
                times.append(seconds)
                cpus.append(cpu)
                peaks.append(peak)
            median = statistics.median(times)
            rows.append({"subscribers": size, "bytes": path.stat().st_size,
                         "load_s": round(median, 4),
                         "load_cpu_s": round(statistics.median(cpus), 4),
                         "per_subscriber_us": round(median / size * 1e6, 2),
                         "peak_rss_mb": round(max(peaks), 1),
                         "runs_s": [round(t, 4) for t in times]})
    main, base = rows[-1], rows[0]
    result: dict[str, Any] = {
        "bench": "config",
        "subscribers": subscribers,
        "runs": runs,
        "load_s": main["load_s"],
        "load_cpu_s": main["load_cpu_s"],
        "per_subscriber_us": main["per_subscriber_us"],
        "peak_rss_mb": main["peak_rss_mb"],
        "config_bytes": main["bytes"],
        "baseline": {k: base[k] for k in ("subscribers", "load_s", "load_cpu_s",
                                          "per_subscriber_us", "peak_rss_mb")},
    }
    result["table"] = _table(rows, runs)
    return result


def _table(rows: list[dict[str, Any]], runs: int) -> str:
    lines = [f"config benchmark: load_config, median of {runs} runs, each in a fresh process",
             (f"{'subscribers':>12}{'file MB':>10}{'load s':>10}{'CPU s':>10}"
              f"{'us/subscriber':>16}{'peak RSS MB':>14}  runs (s)")]
    for row in rows:
        lines.append(f"{row['subscribers']:>12}{row['bytes'] / 1e6:>10.1f}{row['load_s']:>10.3f}"
                     f"{row['load_cpu_s']:>10.3f}{row['per_subscriber_us']:>16.1f}"
                     f"{row['peak_rss_mb']:>14.1f}  " + ", ".join(f"{t:.3f}" for t in row["runs_s"]))
    return "\n".join(lines)
