from __future__ import annotations

from datetime import time
from pathlib import Path

import pytest

from digest.config import MAX_CONFIG_BYTES, load_config
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


# --- hostile values, secrets, paths (issue 8) ----------------------------------------


@pytest.mark.parametrize(("line", "expected"), [
    ("scan_seconds = inf", ("digest.scan_seconds: expected a number of seconds from 0.01 to "
                           "86400, got inf")),
    ("scan_seconds = nan", "digest.scan_seconds: expected a number of seconds"),
    ("max_late_hours = 1e300", ("digest.max_late_hours: expected a number of hours from 0.01 to "
                               "168, got 1e+300")),
    ("stable_seconds = true", ("digest.stable_seconds: expected a number of seconds from 0 to "
                              "86400, got true")),
    ('state = "a\\u0000b"', "digest.state: expected a path, got \"a\\u0000b\""),
])
def test_bad_digest_values(tmp_path: Path, line: str, expected: str) -> None:
    body = MINIMAL.replace('state = "state.sqlite3"', line if "state" in line
                           else f'state = "state.sqlite3"\n    {line}')
    assert "digest.toml: " + expected in error_of(tmp_path, body)


def test_a_whole_number_is_not_a_fraction(tmp_path: Path) -> None:
    message = error_of(tmp_path, MINIMAL.replace("[smtp]", "[smtp]\n    port = 25.5"))
    assert message.endswith("smtp.port: expected a whole number from 1 to 65535, got 25.5 "
                            "(not a whole number)")


def test_internationalised_addresses_are_accepted_for_subscribers_only(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, MINIMAL.replace(
        "alice@example.org", "Jos\u00e9@B\u00fccher.Example")))
    assert config.subscribers[0].email == "Jos\u00e9@b\u00fccher.example"  # domain lower-cased
    message = error_of(tmp_path, MINIMAL.replace(
        "[smtp]", '[smtp]\n    from = "D <digest@b\u00fccher.example>"'))
    assert "smtp.from: not an ASCII email address" in message


def test_private_domains_are_accepted(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, MINIMAL.replace(
        "alice@example.org", "alice@lab.local")))
    assert config.subscribers[0].email == "alice@lab.local"
    assert "subscribers[0].email: not an email address" in error_of(
        tmp_path, MINIMAL.replace("alice@example.org", "alice@x.invalid"))


def test_header_strings_hold_no_line_break(tmp_path: Path) -> None:
    message = error_of(tmp_path, MINIMAL + '    name = "Alice\\r\\nBcc: eve@example.net"\n')
    assert "subscribers[0].name: expected a name on one line" in message
    assert "\n" not in message


def test_a_missing_email_is_reported_at_the_subscriber(tmp_path: Path) -> None:
    message = error_of(tmp_path, MINIMAL.replace('email = "alice@example.org"', 'name = "A"'))
    assert message.endswith("subscribers[0].email: missing (required)")


def test_nested_too_deep_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "digest.toml"
    path.write_text("x = " + "[" * 5000 + "]" * 5000 + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="TOML nested too deeply") as caught:
        load_config(path)
    assert caught.value.file == str(path)


def test_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "digest.toml"
    path.write_bytes(b'[smtp]\nhost = "x"\nfrom = "Jos\xe9 <j@example.org>"\n')
    with pytest.raises(ConfigError, match=r"digest.toml:3: not UTF-8") as caught:
        load_config(path)
    assert caught.value.line == 3


def test_a_folder_or_a_huge_file_is_not_a_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)
    huge = tmp_path / "huge.toml"
    huge.write_bytes(b"#" * (MAX_CONFIG_BYTES + 1))
    with pytest.raises(ConfigError, match=f"larger than {MAX_CONFIG_BYTES // (1024 * 1024)} MiB"):
        load_config(huge)


def test_send_at_may_be_a_toml_time_and_days_full_names(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, MINIMAL + '    send_at = 07:30:00\n'
                                      '    days = ["Monday", "fri"]\n'))
    assert config.subscribers[0].send_at == time(7, 30)
    assert config.subscribers[0].days == frozenset({0, 4})


def test_secrets_name_the_file_key_and_variable(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DIGEST_TEST_NO_SUCH_VAR", raising=False)
    path = write_config(tmp_path, MINIMAL.replace(
        "[smtp]", '[smtp]\n    username = "u"\n    password_env = "DIGEST_TEST_NO_SUCH_VAR"'))
    config = load_config(path)
    with pytest.raises(ConfigError) as caught:
        config.check_secrets()
    assert str(caught.value) == (f"{path}: smtp.password_env: environment variable "
                                 "DIGEST_TEST_NO_SUCH_VAR is not set")
    monkeypatch.setenv("DIGEST_TEST_NO_SUCH_VAR", "  ")
    with pytest.raises(ConfigError, match="DIGEST_TEST_NO_SUCH_VAR is empty"):
        config.check_secrets()


@pytest.mark.parametrize(("content", "expected"), [
    (b"", "is empty"), (b"\xff\xfe", "is not UTF-8"), (None, "cannot read"),
])
def test_password_file_problems(tmp_path: Path, content: bytes | None, expected: str) -> None:
    if content is not None:
        (tmp_path / "pw").write_bytes(content)
    config = load_config(write_config(tmp_path, MINIMAL.replace(
        "[smtp]", '[smtp]\n    username = "u"\n    password_file = "pw"')))
    with pytest.raises(ConfigError, match=f"smtp.password_file: .*{expected}"):
        config.check_secrets()


def test_a_sink_needs_no_password(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DIGEST_TEST_NO_SUCH_VAR", raising=False)
    config = load_config(write_config(tmp_path, MINIMAL.replace(
        'host = "smtp.example.org"',
        'sink = "out"\n    username = "u"\n    password_env = "DIGEST_TEST_NO_SUCH_VAR"')))
    config.check_secrets()  # nothing to read: the sink replaces the server


def test_a_username_without_a_password_is_a_config_error(tmp_path: Path) -> None:
    assert "smtp.username: a username needs a password" in error_of(
        tmp_path, MINIMAL.replace("[smtp]", '[smtp]\n    username = "u"'))


def test_state_inside_the_inbox_is_refused(tmp_path: Path) -> None:
    assert "digest.state: " in error_of(tmp_path, MINIMAL.replace(
        'state = "state.sqlite3"', 'state = "in/state.sqlite3"'))


COMMANDS = [["check-config"], ["ingest"], ["send"], ["send", "--dry-run"],
            ["preview", "--user", "alice@example.org"], ["run"], ["status"],
            ["explain", "--user", "alice@example.org"], ["replies"],
            ["feedback", "--user", "alice@example.org"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_fails_in_one_line_on_a_bad_config_or_state_path(
        tmp_path: Path, command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from digest.cli import main

    assert main(["--config", str(tmp_path), *command]) == 1  # a folder, not a config
    assert capsys.readouterr().err == f"Error: {tmp_path}: is a folder, not a config file\n"
    (tmp_path / "state").write_text("a file where a folder must be")
    path = write_config(tmp_path, MINIMAL.replace('state = "state.sqlite3"',
                                                  'state = "state/digest.sqlite3"')
                        + '[maildir]\npath = "md"\n')
    assert main(["--config", str(path), *command]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    if command == ["run"]:  # the daemon names the database it cannot open
        assert err.startswith(f"Error: {tmp_path / 'state' / 'digest.sqlite3'}: cannot open")
    else:  # the others check the paths first and name the key
        assert err.startswith(f"Error: {path}: digest.state: "), err


@pytest.mark.parametrize("command", [["run"], ["send", "--force"], ["replies"], ["check-config"]],
                         ids=" ".join)
def test_a_missing_password_stops_the_commands_that_need_it(
        tmp_path: Path, command: list[str], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from digest.cli import main

    monkeypatch.delenv("DIGEST_TEST_NO_SUCH_VAR", raising=False)
    path = write_config(tmp_path, MINIMAL + """
    [imap]
    host = "imap.example.org"
    username = "digest"
    password_env = "DIGEST_TEST_NO_SUCH_VAR"
    """)
    assert main(["--config", str(path), *command]) == 1
    assert capsys.readouterr().err == (f"Error: {path}: imap.password_env: environment variable "
                                       "DIGEST_TEST_NO_SUCH_VAR is not set\n")


@pytest.mark.parametrize("table", ["smtp", "imap"])
@pytest.mark.parametrize("kind", ["missing", "folder", "not-pem"])
def test_check_config_refuses_a_ca_file_tls_could_not_use(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        table: str, kind: str) -> None:
    from digest.cli import main

    ca = tmp_path / "ca.pem"
    if kind == "folder":
        ca.mkdir()
    elif kind == "not-pem":
        ca.write_text("this is not a certificate\n", encoding="utf-8")
    imap = ('\n    [imap]\n    host = "imap.example.org"\n    username = "u"\n'
            '    password_env = "DIGEST_TEST_CA_PASSWORD"\n')
    body = MINIMAL + imap
    body = body.replace(f"[{table}]\n", f'[{table}]\n    ca_file = "{ca}"\n')
    config = write_config(tmp_path, body)
    monkeypatch.setenv("DIGEST_TEST_CA_PASSWORD", "x")
    assert main(["--config", str(config), "check-config"]) == 1
    err = capsys.readouterr().err
    assert f"{table}.ca_file" in err and "Traceback" not in err
    assert {"missing": "does not exist", "folder": "is not a file",
            "not-pem": "holds no PEM certificate"}[kind] in err
