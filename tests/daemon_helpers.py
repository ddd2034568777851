"""Helpers for the daemon tests: configs, a time-travelling dispatcher, a daemon subprocess."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from digest.config import Config, load_config
from digest.daemon import Outcome, Runtime, dispatch
from digest.ingest import scan_inbox
from digest.store import Store

from .helpers import ROOT, sample_dumps


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(value)


def write_daemon_config(
    folder: Path,
    *,
    port: int,
    subscribers: Iterable[dict[str, Any]],
    digest: dict[str, Any] | None = None,
    extra: str = "",
    name: str = "digest.toml",
    smtp: dict[str, Any] | None = None,
) -> Path:
    """A config for an SMTP server on 127.0.0.1:``port``; state and inbox inside ``folder``.

    ``smtp``: more [smtp] keys (``connections``, say)."""
    settings: dict[str, Any] = {"inbox": "inbox", "state": "var/state.sqlite3",
                                "stable_seconds": 0}
    settings.update(digest or {})
    lines = ["[digest]", *(f"{k} = {toml_value(v)}" for k, v in settings.items()), "",
             "[smtp]", 'host = "127.0.0.1"', f"port = {port}", 'security = "none"',
             "retry_seconds = 0.01", "attempts = 2", "timeout = 10",
             'from = "Paper Digest <digest@papers.example.org>"',
             'reply_to = "digest+{token}@papers.example.org"',
             *(f"{k} = {toml_value(v)}" for k, v in (smtp or {}).items()), ""]
    for sub in subscribers:
        lines.append("[[subscribers]]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in sub.items())
        lines.append("")
    lines.append(extra)
    path = folder / name
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def fill_inbox(folder: Path, dumps: Sequence[Path] | None = None) -> Path:
    """Copy sample dumps into ``folder/inbox`` (made a minute old, so they count as stable)."""
    inbox = folder / "inbox"
    inbox.mkdir(exist_ok=True)
    for dump in dumps if dumps is not None else sample_dumps():
        target = inbox / dump.name
        target.write_bytes(dump.read_bytes())
        os.utime(target, (time.time() - 60,) * 2)
    return inbox


def recipient(message: Any) -> str:
    return str(message["To"]).split("<")[-1].rstrip(">").lower()


@dataclass
class Sim:
    """Runs the daemon's dispatch in-process at chosen instants (time-machine)."""

    config_path: Path
    store: Store = field(init=False)
    runtime: Runtime = field(init=False)

    def __post_init__(self) -> None:
        config = load_config(self.config_path)
        self.store = Store(config.state)
        self.runtime = Runtime(config, self.store)

    @property
    def config(self) -> Config:
        return self.runtime.config

    def ingest(self, at: datetime) -> None:
        import time_machine

        with time_machine.travel(at, tick=False):
            for path in self.config.inbox.iterdir():  # written "a minute ago", in travel time
                if path.is_file():
                    os.utime(path, (time.time() - 60,) * 2)
            scan_inbox(self.store, self.config.inbox, stable_seconds=0)

    def tick(self, at: datetime) -> Sequence[Outcome]:
        import time_machine

        with time_machine.travel(at, tick=False):
            return asyncio.run(dispatch(self.runtime))

    def run(self, start: datetime, end: datetime, step: timedelta) -> list[tuple[datetime, Outcome]]:
        """Dispatch every ``step`` from ``start`` to ``end`` (inclusive); what was not idle."""
        happened = []
        moment = start
        while moment <= end:
            for outcome in self.tick(moment):
                if outcome.status not in ("not-due", "already-sent"):
                    happened.append((moment, outcome))
            moment += step
        return happened

    def digests(self, email: str) -> list[tuple[str, str]]:
        """(local date, status) of the subscriber's digests, oldest first."""
        return [(r.local_date.isoformat(), r.status)
                for r in reversed(self.store.digests_of(email, limit=1000))]

    def close(self) -> None:
        self.store.close()


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


class DaemonProcess:
    """``python -m digest --config PATH run`` as a child process, its log in a file."""

    def __init__(self, config_path: Path, log_path: Path, env: dict[str, str] | None = None,
                 *, sigint: Any = signal.SIG_DFL):
        self.log_path = log_path
        self._log = log_path.open("ab")
        environment = {**os.environ, "PYTHONPATH": str(ROOT)}
        environment.pop("JOURNAL_STREAM", None)  # the test runner's own journal, if any
        environment.update(env or {})
        # The child inherits an ignored SIGINT (a caught one is default after exec).
        runner = signal.signal(signal.SIGINT, sigint)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "digest", "--config", str(config_path), "run"],
                stdout=self._log, stderr=subprocess.STDOUT, env=environment, cwd=ROOT,
            )
        finally:
            signal.signal(signal.SIGINT, runner)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait_exit(self, timeout: float = 15) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._log.close()

    def stop(self) -> int:
        """SIGTERM and wait; a test that failed midway still leaves no process behind."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def wait_until(predicate: Callable[[], bool], timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(0.01)


@contextmanager
def daemon_process(config_path: Path, log_path: Path,
                   env: dict[str, str] | None = None, *,
                   sigint: Any = signal.SIG_DFL) -> Iterator[DaemonProcess]:
    process = DaemonProcess(config_path, log_path, env, sigint=sigint)
    try:
        yield process
    finally:
        process.stop()


class NotifySocket:
    """A unix datagram socket where the daemon sends its sd_notify messages, as systemd
    makes ``NOTIFY_SOCKET``; ``received`` collects what arrives."""

    def __init__(self, path: Path) -> None:
        import socket

        self.address = str(path)
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(self.address)
        self._socket.settimeout(0.1)

    def received(self, seconds: float,
                 until: Callable[[list[str]], bool] | None = None) -> list[str]:
        """The messages that arrive within ``seconds`` (sooner once ``until`` holds)."""
        got: list[str] = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not (until is not None and until(got)):
            try:
                got.append(self._socket.recv(4096).decode())
            except TimeoutError:
                continue
        return got

    def close(self) -> None:
        self._socket.close()
