"""Fault area ``senders``: two senders on one state, and ``kill -9`` during a dispatch.

Real ``digest run`` and ``digest send`` child processes against a real
aiosmtpd server that records every message at its 250:

- a second ``digest run`` on the same state must exit 1 at once with the one
  line ``Error: another digest daemon (pid N) holds STATE``;
- ``digest send --force`` while the daemon dispatches through a slow server
  must refuse with one clear ``Error:`` line, and every subscriber must get
  exactly one digest;
- ``kill -9`` at random points of a dispatch (20 times of a 50-subscriber
  dispatch in full; in quick, 3 of 20, at MAIL, at DATA and at a 250), then a
  restart: nobody may be left without a digest, and a second copy is allowed only where the kill fell
  between the server's 250 and our commit. That window is measured: after
  each kill, the digests still claimed whose Message-ID the server already
  accepted are counted (``window_duplicates``); any copy beyond them is a
  duplicate. ``points`` chooses where the kills fall: at a random moment
  after the daemon's first message (the default), or, in turn, at each kind
  of point the mail server can mark (``KILL_POINTS``): before any claim (the
  daemon has just started), at MAIL FROM (claimed, not sent), with the
  message whole at DATA (written, no 250; the server does not take it) and
  as the server takes a message (its 250 on its way, our commit not made).
  ``warm`` starts each daemon as a fork of one process that imported the
  daemon's modules once (the same ``digest run``, without the seconds of
  imports per start that made the test of 20 kills take minutes).

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
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from ..store import Store
from .faults import AreaResult
from .smtp_servers import Behaviour, RecordingServer, campaign_state, reader

START_TIMEOUT = 60.0  # seconds a daemon may take to start and send (a loaded CI machine)

# Where a kill may fall (``kill_campaign``'s ``points``): "random" (a random moment of up to
# 0.25 s after the daemon's first message), "started" (the daemon says it started: before
# its first claim), "mail" (the server got MAIL FROM: claimed, not sent), "data" (the
# message is whole at the server, no 250 yet; the server then does not take it) and
# "taken" (the server took it and is sending its 250: the window before our commit).
KILL_POINTS = ("started", "mail", "data", "taken", "random")


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
    # Quick: one kill at each point the server marks in the conversation (MAIL, the message
    # whole at DATA, its 250), which comes whatever the machine's speed; random moments
    # after the first message can all fall after a fast dispatch has served everyone.
    report = kill_campaign(workdir / "kills", subscribers=20 if quick else 50,
                           kills=3 if quick else 20,
                           points=("mail", "data", "taken") if quick else ("random",))
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

    pid: int

    def __init__(self, config: Path, log: Path) -> None:
        self.log_path = log
        self._log = log.open("ab")
        env = {k: v for k, v in os.environ.items()
               if k not in ("JOURNAL_STREAM", "NOTIFY_SOCKET", "WATCHDOG_USEC")}
        self.proc = subprocess.Popen([sys.executable, "-m", "digest", "--config", str(config),
                                      "run"], stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env)
        self.pid = self.proc.pid

    def exited(self) -> int | None:
        """Its exit code once it has ended by itself, else None."""
        return self.proc.poll()

    def log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:  # a forked daemon has not opened it yet
            return ""

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


# The warm starter: imports what ``digest run`` imports, then forks one daemon per request
# ("start LOG ARGS...", answered with the pid) and reaps them ("wait PID", answered with the
# exit code), so that a killed daemon is gone (its pid dead) before the next one starts.
_WARM = r"""
import os, sys, traceback
import digest.cli, digest.daemon, digest.daemon.loop, digest.daemon.jobs, digest.rank
import digest.render, digest.mailer, digest.ingest, digest.store, apscheduler.schedulers.asyncio
print("ready", flush=True)
for line in sys.stdin:
    command, *rest = line.rstrip("\n").split("\t")
    if command == "start":
        log, *argv = rest
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
                code = digest.cli.main(argv)
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(pid, flush=True)
    elif command == "wait":
        _, status = os.waitpid(int(rest[0]), 0)
        print(os.waitstatus_to_exitcode(status), flush=True)
"""


class _WarmStarter:
    """One process with the daemon's modules imported; each daemon is a fork of it."""

    def __init__(self) -> None:
        env = {k: v for k, v in os.environ.items()
               if k not in ("JOURNAL_STREAM", "NOTIFY_SOCKET", "WATCHDOG_USEC")}
        self.proc = subprocess.Popen([sys.executable, "-c", _WARM], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        self._lock = threading.Lock()
        if self._read() != "ready":
            raise RuntimeError("the warm starter did not start")

    def _read(self) -> str:
        out: IO[str] | None = self.proc.stdout
        assert out is not None
        return out.readline().strip()

    def ask(self, *words: str) -> str:
        with self._lock:
            stdin = self.proc.stdin
            assert stdin is not None
            stdin.write("\t".join(words) + "\n")
            stdin.flush()
            return self._read()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class _WarmDaemon(_Daemon):
    """``digest run`` forked by a ``_WarmStarter``, its output in a file."""

    def __init__(self, starter: _WarmStarter, config: Path, log: Path) -> None:
        self.log_path = log
        self.starter = starter
        self.code: int | None = None
        self.pid = int(starter.ask("start", str(log), "--config", str(config), "run"))

    def exited(self) -> int | None:
        if self.code is None and _ended(self.pid):
            self.code = int(self.starter.ask("wait", str(self.pid)))
        return self.code

    def kill(self) -> None:
        if self.exited() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.code = int(self.starter.ask("wait", str(self.pid)))

    def stop(self) -> int:
        if self.exited() is None:
            os.kill(self.pid, signal.SIGTERM)
            if not _wait(lambda: _ended(self.pid), 30):
                os.kill(self.pid, signal.SIGKILL)
            self.code = int(self.starter.ask("wait", str(self.pid)))
        assert self.code is not None
        return self.code


def _ended(pid: int) -> bool:
    """Whether ``pid`` has ended (a zombie not reaped yet counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


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


class _Trigger:
    """Kills the daemon armed for it when the server reaches the armed point (once)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.point = ""
        self.pid = 0
        self.fired = threading.Event()

    def arm(self, point: str, pid: int) -> None:
        with self.lock:
            self.point, self.pid = point, pid
            self.fired.clear()

    def __call__(self, stage: str) -> bool:
        with self.lock:
            if not self.point or stage != self.point:
                return False
            os.kill(self.pid, signal.SIGKILL)
            self.point = ""
            self.fired.set()
            return True


def kill_campaign(folder: Path, *, subscribers: int, kills: int, seed: int = 8,
                  points: Sequence[str] = ("random",), warm: bool = False) -> KillReport:
    """``kill -9`` a dispatching daemon ``kills`` times, then restart it; the n-th kill falls
    at ``points[n % len(points)]`` (see ``KILL_POINTS``). ``warm``: each daemon is a fork of
    one process that imported the daemon's modules (``_WarmStarter``)."""
    unknown = set(points) - set(KILL_POINTS)
    if unknown or not points:
        raise ValueError(f"unknown kill points {sorted(unknown)}; known: {KILL_POINTS}")
    folder.mkdir(parents=True)
    rng = random.Random(seed)
    report = KillReport(subscribers, kills)
    trigger = _Trigger()
    server = RecordingServer(Behaviour(delay=0.03, hook=trigger))
    config = campaign_state(folder, port=server.port, subscribers=subscribers)
    state = folder / "var" / "state.sqlite3"
    starter = _WarmStarter() if warm else None

    def start(log: Path) -> _Daemon:
        if starter is not None:
            return _WarmDaemon(starter, config, log)
        return _Daemon(config, log)

    try:
        def served() -> bool:
            """Everyone has a digest and none is left claimed: no kill point is left."""
            return len({r.recipient for r in list(server.received)}) >= subscribers \
                and not _claimed(state)

        for n in range(kills):
            if served():
                report.kills = n  # the dispatch ended before the planned kills
                report.notes.append(f"only {n} kills: every digest was sent before the rest")
                break
            point = points[n % len(points)]
            before = len(server.received)
            daemon = start(folder / f"daemon-{n}.log")
            def killed(daemon: _Daemon = daemon) -> bool:
                return trigger.fired.is_set() or daemon.exited() is not None or served()

            def said_started(daemon: _Daemon = daemon) -> bool:
                return "daemon: started" in daemon.log() or daemon.exited() is not None

            if point in ("mail", "data", "taken"):
                trigger.arm(point, daemon.pid)
                _wait(killed, START_TIMEOUT)  # by the server at that point, or nothing left
                trigger.arm("", 0)
            elif point == "started":
                _wait(said_started, START_TIMEOUT)
            else:  # random: until this daemon is sending (or has nothing left), then a moment
                def sending(before: int = before, daemon: _Daemon = daemon) -> bool:
                    return len(server.received) > before or daemon.exited() is not None

                if _wait(sending, START_TIMEOUT) and daemon.exited() is None:
                    time.sleep(rng.uniform(0, 0.25))
            code = daemon.exited()
            if code is not None and code != -signal.SIGKILL:
                report.crashes += 1
                report.notes.append(f"kill {n} ({point}): the daemon exited {code} by itself")
                continue
            daemon.kill()
            report.in_window += _accepted_but_claimed(state, server)
        daemon = start(folder / "daemon-final.log")
        # Started first: the killed daemons may have served everyone already (several SMTP
        # sessions send fast), and a SIGTERM before the daemon's handlers exist is no stop.
        _wait(lambda: "daemon: started" in daemon.log() or daemon.exited() is not None,
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
        if starter is not None:
            starter.close()
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
