"""One sender per state, kill -9 during a dispatch, a full disk: real processes, real servers.

The subscribers' send time is 00:00 UTC with ``max_late_hours = 24``, so they
are due whenever the test runs; ticks are fractions of a second.
"""

from __future__ import annotations

import resource
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from digest.bench import faults_senders, faults_smtp
from digest.daemon.lock import StateLock
from digest.errors import StateLocked
from digest.store import Store

from .daemon_helpers import daemon_process, fill_inbox, recipient, wait_until, write_daemon_config
from .helpers import ROOT
from .smtp_helpers import (  # noqa: F401  (smtp_server_fixture provides the smtp_server fixture)
    StartServer,
    smtp_server_fixture,
)

pytestmark = pytest.mark.slow  # child processes and real servers, still run by default

FAST = {"scan_seconds": 0.2, "dispatch_seconds": 0.2, "max_late_hours": 24}


def subscribers(count: int) -> list[dict[str, Any]]:
    return [{"email": f"reader{n:02d}@example.org", "send_at": "00:00", "timezone": "UTC",
             "max_papers": 3} for n in range(count)]


def digest_cli(config: Path, *args: str, **options: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "digest", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=120, check=False, cwd=ROOT,
                          **options)


def test_a_hard_linked_state_is_refused_with_one_error_line(
        tmp_path: Path, smtp_server: StartServer) -> None:
    """Two names of one database would each get their own lock and write-ahead log: two
    senders through them sent every digest twice. Refused; nothing is sent."""
    server = smtp_server()
    fill_inbox(tmp_path)
    config = write_daemon_config(tmp_path, port=server.port, subscribers=subscribers(3),
                                 digest=FAST)
    assert digest_cli(config, "ingest").returncode == 0
    state = tmp_path / "var" / "state.sqlite3"
    (tmp_path / "var" / "second-name.sqlite3").hardlink_to(state)
    send = digest_cli(config, "send", "--force")
    assert (send.returncode, send.stderr) == (
        1, (f"Error: {state}: the state database has 2 names (hard links); use one path for "
            "it (a symlink is fine), or copy it\n"))
    assert server.messages == []


def test_the_lock_is_one_per_state_and_names_its_holder(tmp_path: Path) -> None:
    state = tmp_path / "state.sqlite3"
    first = StateLock(state)
    first.acquire("daemon")
    try:
        with pytest.raises(StateLocked) as caught:
            StateLock(state).acquire("daemon")  # flock: refused even within one process
        assert str(caught.value) == f"another digest daemon (pid {caught.value.pid}) holds {state}"
        with pytest.raises(StateLocked, match="sends the due digests itself"):
            StateLock(state).acquire("send")
        with pytest.raises(StateLocked, match="reads the replies itself; nothing was read"):
            StateLock(state).acquire("replies")
    finally:
        first.release()
    second = StateLock(state)
    second.acquire("send")  # released: free again
    second.release()


def test_a_second_daemon_exits_at_once_and_send_refuses_while_one_dispatches(
        tmp_path: Path, smtp_server: StartServer) -> None:
    """30 subscribers through a slow server; ``send --force`` meanwhile: one digest each."""
    server = smtp_server(delay=1.0)  # 30 s of dispatch on one connection: time for two
    fill_inbox(tmp_path)              # child processes, even on a loaded machine
    config = write_daemon_config(tmp_path, port=server.port, subscribers=subscribers(30),
                                 digest=FAST, smtp={"connections": 1})
    state = tmp_path / "var" / "state.sqlite3"
    with daemon_process(config, tmp_path / "daemon.log") as daemon:
        wait_until(lambda: len(server.messages) >= 1, timeout=60, what="the dispatch to start")
        children = [subprocess.Popen(
            [sys.executable, "-m", "digest", "--config", str(config), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
            for args in (["run"], ["send", "--force"])]
        second, send = (subprocess.CompletedProcess(c.args, c.wait(timeout=120), "",
                                                    c.communicate()[1]) for c in children)
        assert len(server.messages) < 30  # both came while the daemon was still sending
        wait_until(lambda: len(server.messages) >= 30, timeout=60, what="all 30 digests")
        time.sleep(1)  # a few more ticks: nothing more may come
        assert daemon.stop() == 0
    pid = daemon.proc.pid
    assert (second.returncode, second.stderr) == (
        1, f"Error: another digest daemon (pid {pid}) holds {state}\n")
    assert (send.returncode, send.stderr) == (
        1, (f"Error: a digest daemon (pid {pid}) holds {state} and sends the due digests "
            "itself; nothing was sent (stop the daemon first to send by hand)\n"))
    counts = Counter(recipient(m.message) for m in server.messages)
    assert counts == {f"reader{n:02d}@example.org": 1 for n in range(30)}


def test_kill_9_at_random_points_of_a_dispatch_then_restart(tmp_path: Path) -> None:
    """10 kills of a 30-subscriber dispatch, two at each kind of point (before the first
    claim, claimed at MAIL, the message whole at DATA, the server's 250 on its way, and a
    random moment), then a restart: nobody without a digest, duplicates only from the
    window between the server's 250 and the commit (counted and printed). The daemons are
    forks of one process that imported their modules once (``warm``): the kills and the
    restarts are real, the 20 x 3-6 s of imports that made this test take minutes are not."""
    report = faults_senders.kill_campaign(tmp_path / "kills", subscribers=30, kills=10,
                                          points=faults_senders.KILL_POINTS, warm=True)
    print(f"kill -9 x{report.kills}: {report.in_window} kills between a 250 and its commit, "
          f"{report.window_duplicates} duplicates from that window, {report.duplicates} "
          f"other duplicates, {report.lost} subscribers without a digest")
    assert (report.lost, report.duplicates, report.crashes) == (0, 0, 0), report.notes
    assert report.window_duplicates <= report.in_window


def test_fault_area_senders_quick_is_clean(tmp_path: Path) -> None:
    result = faults_senders.run(tmp_path, quick=True)
    print(result)
    assert result.cases >= 5 and result.clean, result.notes


def test_fault_area_smtp_quick_is_clean(tmp_path: Path) -> None:
    result = faults_smtp.run(tmp_path, quick=True)
    print(result)
    assert result.cases == 10 and result.clean, result.notes


def on_a_full_disk(config: Path, *args: str, limit: int = 40_960) -> list[str]:
    """``digest`` whose files may not grow past ``limit`` bytes, as on a full disk.

    RLIMIT_FSIZE makes a write past it fail with EFBIG (Python ignores SIGXFSZ, so
    the process is not killed). 40 KiB lets SQLite open (its -shm index is 32 KiB)
    and fails the WAL a few pages on. The soft limit only: ``prlimit`` lifts it later.
    """
    code = ("import resource, runpy, sys; "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.RLIM_INFINITY)); "
            "sys.argv = ['digest', *sys.argv[1:]]; runpy.run_module('digest', run_name='__main__')")
    return [sys.executable, "-c", code, "--config", str(config), *args]


def _consistent(state: Path) -> list[tuple[str, str, int]]:
    """(subscriber, status, item count) of every digest; each must have its items."""
    with Store(state) as store:
        rows = [(row.subscriber, row.status, len(store.digest_items(row.id)))
                for n in range(5) for row in store.digests_of(f"reader{n:02d}@example.org")]
    assert all(items > 0 for _, _, items in rows), rows
    return rows


def test_send_on_a_full_disk_says_one_error_line_and_half_writes_nothing(
        tmp_path: Path, smtp_server: StartServer) -> None:
    server = smtp_server()
    fill_inbox(tmp_path)
    config = write_daemon_config(tmp_path, port=server.port, subscribers=subscribers(5),
                                 digest=FAST)
    assert digest_cli(config, "ingest").returncode == 0
    state = tmp_path / "var" / "state.sqlite3"
    digest_cli(config, "status")  # checkpoints nothing new; the WAL is what grows next

    full = subprocess.run(on_a_full_disk(config, "send", "--force"), capture_output=True,
                          text=True, timeout=120, check=False, cwd=ROOT)

    assert full.returncode == 1
    errors = [line for line in full.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in full.stderr, full.stderr
    assert errors[0].startswith(f"Error: {state}: cannot write the state database (")
    assert "free some disk space or make the file and its folder writable" in errors[0]
    sent_before = len(server.messages)
    rows = _consistent(state)
    assert sum(status == "sent" for _, status, _ in rows) == sent_before  # no 250 unrecorded
    again = digest_cli(config, "send", "--force")
    assert again.returncode == 0, again.stderr
    assert Counter(recipient(m.message) for m in server.messages) == {
        f"reader{n:02d}@example.org": 1 for n in range(5)}
    assert [status for _, status, _ in _consistent(state)] == ["sent"] * 5


def test_the_daemon_on_a_full_disk_logs_and_tries_again(
        tmp_path: Path, smtp_server: StartServer) -> None:
    server = smtp_server()
    fill_inbox(tmp_path)
    config = write_daemon_config(tmp_path, port=server.port, subscribers=subscribers(5),
                                 digest=FAST)
    assert digest_cli(config, "ingest").returncode == 0
    log = tmp_path / "daemon.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(on_a_full_disk(config, "run"), stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_until(lambda: "cannot write the state database" in log.read_text(), timeout=60,
                   what="the write failure in the log")
        time.sleep(0.5)
        assert proc.poll() is None  # still running: a full disk is not the daemon's end
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE,
                         (resource.RLIM_INFINITY, resource.RLIM_INFINITY))  # space freed
        wait_until(lambda: len(server.messages) >= 5, timeout=60, what="all five digests")
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    text = log.read_text()
    assert "trying again on the next tick" in text and "Traceback" not in text
    assert Counter(recipient(m.message) for m in server.messages) == {
        f"reader{n:02d}@example.org": 1 for n in range(5)}
    assert [status for _, status, _ in _consistent(tmp_path / "var" / "state.sqlite3")] == \
        ["sent"] * 5


def test_send_through_a_symlinked_state_does_not_take_over_the_daemons_claims(
        tmp_path: Path, smtp_server: StartServer) -> None:
    """The daemon dispatches slowly; ``send --force`` with a config whose state is a symlink to
    the same database: one lock (named from the resolved path), one digest each. One SMTP
    connection, so the daemon's dispatch takes 12 x 0.6 s and the CLI arrives during it."""
    server = smtp_server(delay=0.6)
    fill_inbox(tmp_path)
    config = write_daemon_config(tmp_path, port=server.port, subscribers=subscribers(12),
                                 digest=FAST, smtp={"connections": 1})
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "link.sqlite3").symlink_to("state.sqlite3")
    linked = write_daemon_config(tmp_path, port=server.port, subscribers=subscribers(12),
                                 digest={**FAST, "state": "var/link.sqlite3"}, name="linked.toml",
                                 smtp={"connections": 1})
    with daemon_process(config, tmp_path / "daemon.log") as daemon:
        wait_until(lambda: len(server.messages) >= 1, timeout=60, what="the dispatch to start")
        server.set_delay(600)  # the daemon's dispatch waits until the CLI has had its say
        send = digest_cli(linked, "send", "--force")
        assert len(server.messages) < 12  # it came while the daemon was still sending
        server.set_delay(0.6)
        wait_until(lambda: len(server.messages) >= 12, timeout=60, what="all 12 digests")
        time.sleep(1)
        assert daemon.stop() == 0
    assert send.returncode == 1, send.stdout + send.stderr
    assert "holds" in send.stderr and "nothing was sent" in send.stderr
    counts = Counter(recipient(m.message) for m in server.messages)
    assert counts == {f"reader{n:02d}@example.org": 1 for n in range(12)}
    with Store(tmp_path / "var" / "state.sqlite3") as store:
        owners = {row.owner for row in store.digests_of("reader00@example.org")}
    assert owners == {f"{socket.gethostname()}:{daemon.proc.pid}"}


def test_send_names_a_subscriber_once_when_it_resends_their_digest(
        tmp_path: Path, smtp_server: StartServer) -> None:
    """A digest left claimed by a deferred delivery is resent by the next ``send --force``;
    the same run's "already sent" for that subscriber is not printed too."""
    server = smtp_server(fail_first=2)  # attempts = 2: the first send gives up for now
    fill_inbox(tmp_path)
    config = write_daemon_config(tmp_path, port=server.port, subscribers=subscribers(1),
                                 digest=FAST)
    assert digest_cli(config, "ingest").returncode == 0
    first = digest_cli(config, "send", "--force")
    assert "delivery failed for now; will retry" in first.stdout, first.stdout + first.stderr
    second = digest_cli(config, "send", "--force")
    assert second.returncode == 0, second.stdout + second.stderr
    assert [line.split(":")[0] for line in second.stdout.splitlines()] == [
        "reader00@example.org"]
    assert second.stdout.startswith("reader00@example.org: sent ")
