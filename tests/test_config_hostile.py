"""Hostile configs: what check-config accepts works later; every failure is one clear line.

The collection lives in ``digest.bench.faults_config`` (the fault campaign runs
it too). Here each case goes through ``check-config`` and ``send --dry-run`` as
real subprocesses, and, quickly, through ``load_config`` in this process.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from digest.bench.faults_config import UNSET_VARIABLE, Case, cases, run, try_cases
from digest.config import load_config
from digest.errors import ConfigError

CASES = cases()
HOSTILE = [case for case in CASES if case.names is not None]


def test_the_collection_holds_more_than_40_hostile_configs() -> None:
    assert len(HOSTILE) >= 40
    assert len({case.name for case in CASES}) == len(CASES)  # each case is its own
    assert any(case.secret for case in CASES) and any(case.names is None for case in CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_each_case_in_process(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """load_config (+ the path and secret checks of check-config): a Config or one ConfigError."""
    monkeypatch.delenv(UNSET_VARIABLE, raising=False)
    config_path = tmp_path / "digest.toml"
    config_path.write_bytes(case.body if isinstance(case.body, bytes) else case.body.encode())
    if case.setup is not None:
        config_path = case.setup(tmp_path)
    try:
        config = load_config(config_path)
        config.check_paths()
        config.check_secrets()
    except ConfigError as exc:
        message = str(exc)
        assert case.names is not None, f"a valid config was rejected: {message}"
        assert "\n" not in message and "\r" not in message
        assert message.startswith(str(config_path)), message
        assert case.names in message[len(str(config_path)):], message
        return
    assert case.names is None, f"accepted, but {case.names!r} should have been named"


@pytest.mark.slow
def test_check_config_then_send_dry_run_never_crash(tmp_path: Path) -> None:
    """Both commands as subprocesses on every case: exit 0 or 1, one clear Error: line."""
    problems: list[str] = []
    for result in try_cases(CASES, tmp_path):
        case, config = result.case, result.config
        for label, done in (("check-config", result.check), ("send --dry-run", result.dry_run)):
            if "Traceback" in done.stderr or done.exit_code not in (0, 1):
                problems.append(f"{case.name}: {label}: crashed (exit {done.exit_code}): "
                                f"{done.stderr[-300:]!r}")
                continue
            if done.exit_code == 1:
                lines = done.stderr.strip().splitlines()
                if len(lines) != 1 or not lines[0].startswith(f"Error: {config}") or \
                        (case.names or "\0") not in lines[0]:
                    problems.append(f"{case.name}: {label}: unclear: {done.stderr[-300:]!r}")
        expected_check = 0 if case.names is None else 1
        if result.check.exit_code != expected_check:
            problems.append(f"{case.name}: check-config exited {result.check.exit_code}, "
                            f"expected {expected_check}")
        if result.check.exit_code == 0 and result.dry_run.exit_code != 0:
            problems.append(f"{case.name}: check-config accepted it, send --dry-run failed: "
                            f"{result.dry_run.stderr[-300:]!r}")
        if case.secret and result.dry_run.exit_code != 0:
            problems.append(f"{case.name}: send --dry-run needs no password, yet failed")
    assert problems == []


def test_a_missing_password_stops_send_but_not_send_dry_run(tmp_path: Path) -> None:
    """send (not --dry-run) reads the password first: one line naming the key and the variable."""
    from digest.bench.faults_config import config_text, run_command

    config = tmp_path / "digest.toml"
    config.write_text(config_text({"smtp": ['username = "digest"',
                                            f'password_env = "{UNSET_VARIABLE}"']}))
    assert UNSET_VARIABLE not in os.environ
    sent = run_command(config, "send", "--force")
    assert sent.exit_code == 1
    assert sent.stderr.strip() == (f"Error: {config}: smtp.password_env: environment variable "
                                   f"{UNSET_VARIABLE} is not set")
    assert run_command(config, "send", "--dry-run", "--force").exit_code == 0


def test_the_fault_campaign_area_config_is_clean(tmp_path: Path) -> None:
    result = run(tmp_path, quick=True)
    assert result.cases > 0
    assert result.clean, result.notes


def test_send_dry_run_renders_an_internationalised_address(tmp_path: Path) -> None:
    """Issue 8: the campaign's state holds papers, so the dry run renders the To header."""
    wanted = [case for case in CASES if case.names is None and "@" in case.name
              and not case.name.split("=", 1)[1].isascii()]
    assert len(wanted) >= 3  # josé@, @bücher, and a fully non-ASCII address
    for result in try_cases(wanted, tmp_path):
        assert result.crashes == [], result.crashes
        assert result.dry_run.exit_code == 0, result.dry_run.stderr[-300:]
        assert "would send 10 of 12 papers" in result.dry_run.stdout, result.dry_run.stdout
