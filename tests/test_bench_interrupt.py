"""A benchmark stopped by SIGTERM or Ctrl-C: its temporary state removed, its helper processes
(the SMTP sink, the dispatch process) ended, exit 143 or 130 with one line and no traceback.

Runs ``digest bench dispatch`` as a user does, in its own session (so a Ctrl-C can be sent
to its whole process group, as a terminal does), with TMPDIR pointed at a folder of the
test's own, where the benchmark builds its state.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .helpers import require_shared


def _descendants(pid: int) -> set[int]:
    """The live processes below ``pid`` (from /proc/*/stat's parent field)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return found


def _wait_for(condition: object, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.mark.parametrize(("how", "code"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_stopped_bench_removes_its_state_and_ends_its_processes(
        tmp_path: Path, how: str, code: int) -> None:
    data = require_shared("data", "hf-daily-papers.jsonl")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "digest", "bench", "dispatch", "--subscribers", "300",
         "--days", "4", "--runs", "5", "--sink", "lean", "--data", str(data)],
        env={**os.environ, "TMPDIR": str(tmp)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True)
    try:
        # The state is built and the runs have started: the sink and a dispatch process live.
        _wait_for(lambda: any(tmp.glob("*/state.sqlite3")) and len(_descendants(proc.pid)) >= 2,
                  "the benchmark's dispatch runs")
        helpers = _descendants(proc.pid)
        _interrupt(proc, how)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == code, err
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith(f"Interrupted ({how})"), err
    assert _beside_progress(err) == [err.strip().splitlines()[-1]], err
    assert list(tmp.iterdir()) == []  # the state folder is gone
    time.sleep(0.2)
    assert not any(_live(pid) for pid in helpers)  # the sink and the dispatch are ended


def _beside_progress(err: str) -> list[str]:
    """The lines of ``err`` that are not the benchmark's progress bars."""
    bars = ("dispatch runs", "state: days", "raw aiosmtplib phase")
    return [line for line in err.splitlines()
            if _ANSI.sub("", line).strip() and not any(bar in line for bar in bars)]


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # a bar's cursor moves, left when it is cleared


@pytest.mark.parametrize(("how", "code"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_bench_stopped_in_its_raw_smtp_phase_ends_as_cleanly(
        tmp_path: Path, how: str, code: int) -> None:
    """The raw aiosmtplib phase runs an event loop in the benchmark's own process: a signal
    there ends the sink, cancels the sends and exits with one line, as in the other phases."""
    data = require_shared("data", "hf-daily-papers.jsonl")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    err_path = tmp_path / "stderr.txt"
    with err_path.open("w") as err_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "digest", "bench", "dispatch", "--subscribers", "300",
             "--days", "4", "--runs", "1", "--sink", "aiosmtpd", "--data", str(data)],
            env={**os.environ, "TMPDIR": str(tmp)}, stdout=subprocess.PIPE,
            stderr=err_file, text=True, start_new_session=True)
        try:
            # The phase's progress bar appears as it starts (before its first message).
            _wait_for(lambda: "raw aiosmtplib phase" in err_path.read_text(),
                      "the raw aiosmtplib phase")
            helpers = _descendants(proc.pid)
            _interrupt(proc, how)
            out, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    err = err_path.read_text()
    assert proc.returncode == code, err
    assert "Traceback" not in err and "Exception" not in err, err
    assert "raw aiosmtplib phase: 100%" not in err  # it was stopped in that phase
    assert err.strip().splitlines()[-1].startswith(f"Interrupted ({how})"), err
    assert _beside_progress(err) == [err.strip().splitlines()[-1]], err
    assert out == ""  # no table, no JSON line: the benchmark did not finish
    assert list(tmp.iterdir()) == []  # the state folder is gone
    time.sleep(0.2)
    assert helpers and not any(_live(pid) for pid in helpers)  # the sink is ended


def _live(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def _interrupt(proc: subprocess.Popen[str], how: str) -> None:
    """Stop the benchmark as a user would: ``kill PID`` (SIGTERM, its own process only) or
    Ctrl-C in a terminal (SIGINT to the whole foreground process group)."""
    if how == "SIGTERM":
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGINT)
