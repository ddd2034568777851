"""Fault area ``senders``: two senders on one state, and ``kill -9`` during a dispatch.

Real ``digest run`` and ``digest send`` child processes against a real
aiosmtpd server that records every message at its 250:

- a second ``digest run`` on the same state must exit 1 at once with the one
  line ``Error: another digest daemon (pid N) holds STATE``;
- ``digest send --force`` while the daemon dispatches through a slow server
  must refuse with one clear ``Error:`` line, and every subscriber must get
  exactly one digest;
- ``kill -9`` at random points of a dispatch (20 times of a 50-subscriber
  dispatch in full, 3 of 20 in quick), then a restart: nobody may be left
  without a digest, and a second copy is allowed only where the kill fell
  between the server's 250 and our commit. That window is measured: after
  each kill, the digests still claimed whose Message-ID the server already
  accepted are counted (``window_duplicates``); any copy beyond them is a
  duplicate.

Counts (see ``faults.AreaResult``): a daemon that stopped by itself or logged
a traceback is a crash; a subscriber without a digest is data lost; an error
that is not the expected one line is unclear.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..store import Store
from .faults import AreaResult
from .smtp_servers import Behaviour, RecordingServer, campaign_state, reader

START_TIMEOUT = 60.0  # seconds a daemon may take to start and send (a loaded CI machine)


@dataclass
class KillReport:
    """What a kill -9 campaign found."""

    subscribers: int
    kills: int
    in_window: int = 0  # digests found claimed after a kill although the server had said 250
    duplicates: int = 0  # copies beyond the first outside that window
    window_duplicates: int = 0
    lost: int = 0  # subscribers who never got their digest
    crashes: int = 0
    notes: list[str] = field(default_factory=list)


def run(workdir: Path, quick: bool) -> AreaResult:
    result = AreaResult("senders")
    _two_senders(workdir / "two-senders", result, subscribers=10 if quick else 30)
    report = kill_campaign(workdir / "kills", subscribers=20 if quick else 50,
                           kills=3 if quick else 20)
    result.cases += report.kills
    result.crashes += report.crashes
    result.data_lost += report.lost
    result.duplicates += report.duplicates
    result.window_duplicates += report.window_duplicates
    result.notes.extend(report.notes)
    result.notes.append(f"kill -9 x{report.kills} of a {report.subscribers}-subscriber dispatch: "
                        f"{report.in_window} kills fell between a 250 and its commit, "
                        f"{report.window_duplicates} copies resent from there, "
                        f"{report.duplicates} other duplicates, {report.lost} lost")
    return result


class _Daemon:
    """``digest run`` as a child process, its output in a file."""

    def __init__(self, config: Path, log: Path) -> None:
        self.log_path = log
        self._log = log.open("ab")
        env = {k: v for k, v in os.environ.items()
               if k not in ("JOURNAL_STREAM", "NOTIFY_SOCKET", "WATCHDOG_USEC")}
        self.proc = subprocess.Popen([sys.executable, "-m", "digest", "--config", str(config),
                                      "run"], stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._log.close()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def _wait(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "digest", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=120, check=False)


def _two_senders(folder: Path, result: AreaResult, *, subscribers: int) -> None:
    """A second daemon and a ``send --force`` while the daemon sends through a slow server."""
    folder.mkdir(parents=True)
    server = RecordingServer(Behaviour(delay=0.1))
    config = campaign_state(folder, port=server.port, subscribers=subscribers)
    state = folder / "var" / "state.sqlite3"
    daemon = _Daemon(config, folder / "daemon.log")
    try:
        if not _wait(lambda: len(server.received) >= 1, START_TIMEOUT):
            result.crashes += 1
            result.notes.append("two senders: the daemon sent nothing")
            return
        result.cases += 1
        second = _cli(config, "run")
        expected = f"Error: another digest daemon (pid {daemon.proc.pid}) holds {state}"
        if second.returncode != 1 or second.stderr.strip() != expected:
            result.unclear_errors += 1
            result.notes.append(f"second digest run: exit {second.returncode}, "
                                f"{second.stderr.strip()[:200]!r}")
        result.cases += 1
        send = _cli(config, "send", "--force")
        lines = send.stderr.strip().splitlines()
        if send.returncode != 1 or len(lines) != 1 or not lines[0].startswith(
                f"Error: a digest daemon (pid {daemon.proc.pid}) holds {state}"):
            result.unclear_errors += 1
            result.notes.append(f"send --force during a dispatch: exit {send.returncode}, "
                                f"{send.stderr.strip()[:200]!r}")
        if not _wait(lambda: len({r.recipient for r in server.received}) >= subscribers,
                     START_TIMEOUT):
            result.data_lost += subscribers - len({r.recipient for r in server.received})
        time.sleep(0.5)  # a few more ticks: nothing more may come
    finally:
        code = daemon.stop()
        server.stop()
    if code != 0 or "Traceback" in daemon.log():
        result.crashes += 1
        result.notes.append(f"two senders: the daemon exited {code} or logged a traceback")
    per_reader = {reader(n): 0 for n in range(subscribers)}
    for received in server.received:
        per_reader[received.recipient] = per_reader.get(received.recipient, 0) + 1
    result.duplicates += sum(max(0, n - 1) for n in per_reader.values())
    result.data_lost += sum(1 for n in per_reader.values() if n == 0)


def kill_campaign(folder: Path, *, subscribers: int, kills: int,
                  seed: int = 8) -> KillReport:
    """``kill -9`` a dispatching daemon ``kills`` times at random points, then restart it."""
    folder.mkdir(parents=True)
    rng = random.Random(seed)
    report = KillReport(subscribers, kills)
    server = RecordingServer(Behaviour(delay=0.03))
    config = campaign_state(folder, port=server.port, subscribers=subscribers)
    state = folder / "var" / "state.sqlite3"
    try:
        for n in range(kills):
            before = len(server.received)
            daemon = _Daemon(config, folder / f"daemon-{n}.log")
            # Until this daemon is sending (or has nothing left), then a random moment.
            def sending(before: int = before, daemon: _Daemon = daemon) -> bool:
                return len(server.received) > before or daemon.proc.poll() is not None

            started = _wait(sending, START_TIMEOUT)
            if daemon.proc.poll() is not None:
                report.crashes += 1
                report.notes.append(f"kill {n}: the daemon exited {daemon.proc.returncode} "
                                    "by itself")
                continue
            if started:
                time.sleep(rng.uniform(0, 0.25))
            daemon.kill()
            report.in_window += _accepted_but_claimed(state, server)
        daemon = _Daemon(config, folder / "daemon-final.log")
        # Started first: the killed daemons may have served everyone already (several SMTP
        # sessions send fast), and a SIGTERM before the daemon's handlers exist is no stop.
        _wait(lambda: "daemon: started" in daemon.log() or daemon.proc.poll() is not None,
              START_TIMEOUT)
        everyone = _wait(lambda: len({r.recipient for r in server.received}) >= subscribers
                         and not _claimed(state), START_TIMEOUT)
        time.sleep(0.5)
        code = daemon.stop()
        if code != 0 or not everyone:
            report.crashes += code != 0
            report.notes.append(f"final run: exit {code}; everyone served: {everyone}")
        logs = [p.read_text(encoding="utf-8", errors="replace")
                for p in sorted(folder.glob("daemon-*.log"))]
        if any("Traceback" in text for text in logs):
            report.crashes += 1
            report.notes.append("a daemon logged a traceback")
    finally:
        server.stop()
    copies = server.copies()
    extra = sum(n - 1 for n in copies.values())
    ids_per_reader: dict[str, set[str]] = {}
    for message_id, recipient in copies:
        ids_per_reader.setdefault(recipient, set()).add(message_id)
    extra += sum(len(ids) - 1 for ids in ids_per_reader.values())  # two different digests
    report.window_duplicates = min(extra, report.in_window)
    report.duplicates = extra - report.window_duplicates
    report.lost = sum(1 for n in range(subscribers) if reader(n) not in ids_per_reader)
    return report


def _accepted_but_claimed(state: Path, server: RecordingServer) -> int:
    """Digests still claimed whose Message-ID the server has accepted: the kill was in the
    window between the 250 and the commit."""
    accepted = {r.message_id for r in list(server.received)}
    if not state.exists():
        return 0
    with Store(state) as store:
        return sum(1 for row in store.unsent_digests() if row.message_id in accepted)


def _claimed(state: Path) -> bool:
    if not state.exists():
        return True
    with Store(state) as store:
        return bool(store.unsent_digests())
