from __future__ import annotations

from datetime import time
from pathlib import Path

import pytest

from digest.config import load_config
from digest.errors import ConfigError

from .helpers import ROOT, write_config

MINIMAL = """
    [digest]
    inbox = "in"
    state = "state.sqlite3"

    [smtp]
    host = "smtp.example.org"

    [[subscribers]]
    email = "alice@example.org"
"""


def error_of(tmp_path: Path, body: str) -> str:
    path = write_config(tmp_path, body)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


def test_example_config_loads() -> None:
    config = load_config(ROOT / "config" / "digest.example.toml")
    assert [s.email for s in config.subscribers] == ["alice@example.org", "bob@example.org"]
    alice = config.subscribers[0]
    assert alice.interests == ("domain adaptation", "preference optimisation")
    assert alice.days == frozenset(range(5))
    assert config.subscribers[1].timezone.key == "America/New_York"
    assert config.subscribers[1].max_papers == 10  # from [defaults]


def test_demo_config_loads() -> None:
    config = load_config(ROOT / "config" / "demo.toml")
    assert config.smtp.sink is not None
    assert config.inbox == ROOT / "examples" / "inbox"


def test_defaults_and_relative_paths(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, MINIMAL))
    sub = config.subscribers[0]
    assert config.inbox == tmp_path / "in"
    assert config.state == tmp_path / "state.sqlite3"
    assert (sub.name, sub.max_papers, sub.send_at, sub.send_empty) == ("alice", 10, time(8), False)
    assert sub.days == frozenset(range(7))
    assert config.smtp.port == 587 and config.smtp.security == "starttls"


def test_defaults_table_applies_and_subscriber_wins(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, MINIMAL.replace("[[subscribers]]", """
    [defaults]
    timezone = "Asia/Tokyo"
    max_papers = 5

    [[subscribers]]
    email = "bob@example.org"
    max_papers = 7

    [[subscribers]]""")))
    bob, alice = config.subscribers
    assert bob.timezone.key == alice.timezone.key == "Asia/Tokyo"
    assert (bob.max_papers, alice.max_papers) == (7, 5)


def test_unknown_time_zone_names_file_and_key(tmp_path: Path) -> None:
    message = error_of(tmp_path, MINIMAL + """
    [[subscribers]]
    email = "bob@example.org"

    [[subscribers]]
    email = "carol@example.org"
    timezone = "Europe/Berln"
    """)
    assert message.endswith('digest.toml: subscribers[2].timezone: unknown time zone "Europe/Berln"')


def test_unknown_key_is_an_error(tmp_path: Path) -> None:
    message = error_of(tmp_path, MINIMAL + '    sned_at = "08:00"\n')
    assert "subscribers[0].sned_at: unknown key" in message
    message = error_of(tmp_path, MINIMAL.replace('[smtp]', '[smtp]\n    hots = "x"'))
    assert "smtp.hots: unknown key" in message
    message = error_of(tmp_path, MINIMAL + "\n    [extra]\n    a = 1\n")
    assert "extra: unknown key" in message


def test_toml_syntax_error_gives_the_line(tmp_path: Path) -> None:
    body = MINIMAL + '    name = "Alice\n'
    bad_line = body.count("\n")  # the unterminated string is on the last line
    message = error_of(tmp_path, body)
    assert f"digest.toml:{bad_line}:" in message and "TOML syntax error" in message


def test_duplicate_emails_are_an_error(tmp_path: Path) -> None:
    message = error_of(tmp_path, MINIMAL + """
    [[subscribers]]
    email = "Alice@Example.org"
    """)
    assert "subscribers[1].email: duplicate subscriber" in message


@pytest.mark.parametrize(("line", "expected"), [
    ('send_at = "25:00"', 'subscribers[0].send_at: expected a time "HH:MM"'),
    ("max_papers = 0", "subscribers[0].max_papers: expected a whole number from 1 to 100"),
    ('max_papers = "ten"', "subscribers[0].max_papers: expected a whole number"),
    ('days = ["mon", "funday"]', "subscribers[0].days[1]: expected one of mon"),
    ("send_empty = 1", "subscribers[0].send_empty: expected true or false"),
    ('interests = ["ok", ""]', "subscribers[0].interests[1]: expected a non-empty string"),
])
def test_bad_subscriber_values(tmp_path: Path, line: str, expected: str) -> None:
    assert expected in error_of(tmp_path, MINIMAL + f"    {line}\n")


def test_bad_value_in_defaults_is_reported_there(tmp_path: Path) -> None:
    message = error_of(tmp_path, MINIMAL.replace("[[subscribers]]", """
    [defaults]
    timezone = "Mars/Olympus"

    [[subscribers]]"""))
    assert 'defaults.timezone: unknown time zone "Mars/Olympus"' in message


def test_smtp_checks(tmp_path: Path) -> None:
    assert 'smtp.security: expected "starttls", "tls" or "none"' in error_of(
        tmp_path, MINIMAL.replace('[smtp]', '[smtp]\n    security = "ssl"'))
    assert 'smtp.reply_to: must contain "{token}"' in error_of(
        tmp_path, MINIMAL.replace('[smtp]', '[smtp]\n    reply_to = "digest@example.org"'))
    assert "smtp.host: missing" in error_of(
        tmp_path, MINIMAL.replace('host = "smtp.example.org"', 'port = 25'))


def test_missing_password_env_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DIGEST_TEST_NO_SUCH_VAR", raising=False)
    config = load_config(write_config(tmp_path, MINIMAL.replace(
        '[smtp]', '[smtp]\n    username = "u"\n    password_env = "DIGEST_TEST_NO_SUCH_VAR"')))
    with pytest.raises(ConfigError, match="DIGEST_TEST_NO_SUCH_VAR is not set"):
        config.smtp.password()
    monkeypatch.setenv("DIGEST_TEST_NO_SUCH_VAR", "s3cret")
    assert config.smtp.password() == "s3cret"


def test_password_file(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cret\n")
    config = load_config(write_config(tmp_path, MINIMAL.replace(
        '[smtp]', '[smtp]\n    password_file = "pw"')))
    assert config.smtp.password() == "s3cret"


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.toml")
