"""The systemd unit: what it must say, and ``systemd-analyze verify`` accepts it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import ROOT

UNIT = ROOT / "systemd" / "paper-digest.service"


def directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        match = re.match(r"^([A-Za-z]+)=(.*)$", line.strip())
        if match:
            found.setdefault(match.group(1), []).append(match.group(2).strip())
    return found


def test_the_unit_runs_digest_unprivileged_and_hardened() -> None:
    unit = directives(UNIT.read_text(encoding="utf-8"))
    assert unit["ExecStart"][0].endswith("--config /etc/paper-digest/digest.toml run")
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["User"] == ["paper-digest"] and "DynamicUser" not in unit
    assert unit["Restart"] == ["on-failure"]
    assert unit["StateDirectory"] == ["paper-digest"]
    assert "LoadCredential" in unit and "EnvironmentFile" in unit
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict",
                       "ProtectHome": "yes", "PrivateTmp": "yes",
                       "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
                       "CapabilityBoundingSet": ""}.items():
        assert unit[key] == [value], key
    assert "@system-service" in unit["SystemCallFilter"]


def _verifiable_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this machine's digest (verify checks it exists)."""
    digest = shutil.which("digest") or sys.executable
    text = UNIT.read_text(encoding="utf-8").replace("/opt/paper-digest/bin/digest", digest)
    copy = tmp_path / UNIT.name
    copy.write_text(text, encoding="utf-8")
    return copy


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (tests/setup-services.sh installs it)")
    result = subprocess.run([analyze, "verify", str(_verifiable_copy(tmp_path))],
                            capture_output=True, text=True, timeout=60, check=False)
    # verify exits 0 even for an unknown key; it warns on stderr: demand silence.
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr
    security = subprocess.run(
        [analyze, "security", "--offline=yes", str(_verifiable_copy(tmp_path))],
        capture_output=True, text=True, timeout=60, check=False)
    exposure = re.search(r"Overall exposure level for \S+: ([\d.]+)", security.stdout)
    if exposure is not None:  # systemd >= 250 can rate a unit file offline
        assert float(exposure.group(1)) <= 2.0, security.stdout[-300:]


def test_the_readme_shows_the_install_steps() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    notes = (ROOT / "systemd" / "README.md").read_text(encoding="utf-8")
    for text in (readme, notes):
        assert "useradd --system" in text
        assert "systemctl enable --now paper-digest" in text
        assert "systemctl reload paper-digest" in text


def test_the_unit_is_notify_with_a_watchdog() -> None:
    unit = directives(UNIT.read_text(encoding="utf-8"))
    assert unit["Type"] == ["notify"] and unit["NotifyAccess"] == ["main"]
    assert unit["WatchdogSec"] == ["2min"]


def test_a_real_daemon_says_ready_feeds_the_watchdog_and_reports_its_last_dispatch(
        tmp_path: Path) -> None:
    """NOTIFY_SOCKET is a real unix datagram socket, as systemd makes it."""

    from digest.bench.smtp_servers import RecordingServer, campaign_state

    from .daemon_helpers import NotifySocket, daemon_process

    server = RecordingServer()
    config = campaign_state(tmp_path, port=server.port, subscribers=2)
    notify = NotifySocket(tmp_path / "notify.sock")

    def enough(got: list[str]) -> bool:
        return (sum(m == "WATCHDOG=1" for m in got) >= 3
                and any("last dispatch" in m for m in got))

    try:
        with daemon_process(config, tmp_path / "daemon.log",
                            env={"NOTIFY_SOCKET": notify.address,
                                 "WATCHDOG_USEC": "200000"}) as daemon:
            got = notify.received(60, until=enough)
            assert daemon.stop() == 0
        got += notify.received(1.0)  # what it says on the way out
    finally:
        notify.close()
        server.stop()
    ready = [m for m in got if m.startswith("READY=1")]
    assert ready and f"MAINPID={daemon.proc.pid}" in ready[0]
    assert "STATUS=started; 2 subscribers" in ready[0]
    assert got.index(ready[0]) < got.index("WATCHDOG=1")  # ready first, then alive
    assert sum(m == "WATCHDOG=1" for m in got) >= 3
    assert any(m.startswith("STATUS=last dispatch ") and "2 sent" in m for m in got), got
    assert any(m.startswith("STOPPING=1") for m in got)


def _seconds(span: str) -> float:
    """A systemd time span such as ``30s``, ``11min`` or ``1min 30s`` in seconds."""
    units = {"s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}
    return sum(float(number) * units[unit]
               for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]+)", span))


def test_the_stop_timeout_allows_the_wait_for_a_relays_reply() -> None:
    """systemd's SIGKILL must not come before the daemon's longest stop: its grace plus the
    wait for the reply to a message written whole (a kill then may send it twice)."""
    from digest.daemon.jobs import STOP_GRACE_SECONDS, STOP_REPLY_WAIT_MAX_SECONDS

    unit = directives(UNIT.read_text(encoding="utf-8"))
    [timeout] = unit["TimeoutStopSec"]
    assert _seconds(timeout) >= STOP_GRACE_SECONDS + STOP_REPLY_WAIT_MAX_SECONDS + 30
