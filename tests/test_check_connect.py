"""``check-config --connect``: a real SMTP login (aiosmtpd) and a real IMAP login (Dovecot)."""

from __future__ import annotations

from pathlib import Path

import pytest

from digest.bench.replies import Dovecot
from digest.cli import main

from .dovecot_helpers import PASSWORD_ENV, dovecot_tls_fixture  # noqa: F401  (fixtures)
from .smtp_helpers import (  # noqa: F401  (smtp_server_fixture provides the smtp_server fixture)
    SmtpServer,
    StartServer,
    smtp_server_fixture,
)

SMTP_PASSWORD_ENV = "DIGEST_TEST_SMTP_PASSWORD"


def write(folder: Path, server: SmtpServer, imap: str = "") -> Path:
    config = folder / "digest.toml"
    config.write_text(f"""
[digest]
inbox = "inbox"
state = "var/state.sqlite3"

[smtp]
host = "127.0.0.1"
port = {server.port}
security = "starttls"
username = "ann"
password_env = "{SMTP_PASSWORD_ENV}"
ca_file = "{server.cert}"
from = "Paper Digest <digest@papers.example.org>"
reply_to = "digest+{{token}}@papers.example.org"
{imap}
[[subscribers]]
email = "ann@example.org"
""", encoding="utf-8")
    return config


def imap_table(dovecot: Dovecot, *, ca_file: bool) -> str:
    cert = dovecot.folder / "cert.pem"
    return f"""
[imap]
host = "127.0.0.1"
port = {dovecot.tls_port}
security = "tls"
username = "{dovecot.user}"
password_env = "{PASSWORD_ENV}"
""" + (f'ca_file = "{cert}"\n' if ca_file else "")


def test_connect_logs_in_to_smtp_and_imap_trusting_their_ca_files(
        tmp_path: Path, smtp_server: StartServer, dovecot_tls: Dovecot,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    server = smtp_server(tls="starttls", auth=("ann", "s3cret"))
    monkeypatch.setenv(SMTP_PASSWORD_ENV, "s3cret")
    config = write(tmp_path, server, imap_table(dovecot_tls, ca_file=True))

    assert main(["--config", str(config), "check-config", "--connect"]) == 0

    out = capsys.readouterr().out
    assert f"  smtp   127.0.0.1:{server.port}: connected, logged in as ann; TLS; offers " in out
    assert f"  imap   imap digest@127.0.0.1:{dovecot_tls.tls_port}/INBOX: logged in, " \
        "0 replies waiting" in out
    assert server.messages == []  # a login, nothing sent


def test_connect_names_the_fix_for_a_wrong_password_and_an_untrusted_certificate(
        tmp_path: Path, smtp_server: StartServer, dovecot_tls: Dovecot,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    server = smtp_server(tls="starttls", auth=("ann", "s3cret"))
    monkeypatch.setenv(SMTP_PASSWORD_ENV, "wrong")
    config = write(tmp_path, server, imap_table(dovecot_tls, ca_file=False))

    assert main(["--config", str(config), "check-config", "--connect"]) == 1

    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    smtp = next(line for line in lines if line.startswith("  smtp   FAILED"))
    assert smtp.startswith(f"  smtp   FAILED: 127.0.0.1:{server.port}: login as ann refused (535")
    assert "wrong password; many providers need an app password" in smtp
    imap = next(line for line in lines if line.startswith("  imap   FAILED"))
    assert "CERTIFICATE_VERIFY_FAILED" in imap
    assert imap.endswith('set ca_file = "/path/to/ca.pem" under [imap] (or verify_tls = false, '
                         "which trusts anyone)")
    errors = [line for line in captured.err.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: {config}: a connection check failed (see above)"]
    assert "Traceback" not in captured.err


@pytest.mark.parametrize("tls", ["starttls", "tls"])
def test_a_certificate_for_another_name_says_which_host_to_set(
        smtp_server: StartServer, tls: str) -> None:
    """127.1 reaches the server, but its certificate is for localhost and 127.0.0.1."""
    import asyncio

    from digest.errors import SendError
    from digest.mailer import Mailer

    server = smtp_server(tls=tls)
    smtp = server.smtp_config(host="127.1", verify_tls=True, ca_file=server.cert)
    with pytest.raises(SendError) as caught:
        asyncio.run(Mailer(smtp).check_login())
    assert caught.value.kind == "config"
    assert "the certificate is for localhost, 127.0.0.1, not 127.1; set host to it" in str(
        caught.value)


def test_an_imap_certificate_for_another_name_says_which_host_to_set(
        dovecot_tls: Dovecot) -> None:
    from digest.replies import MailboxError
    from digest.replies.mailboxes import ImapMailbox

    config = dovecot_tls.imap_config(host="127.1", port=dovecot_tls.tls_port, security="tls",
                                     verify_tls=True,
                                     ca_file=dovecot_tls.folder / "cert.pem",
                                     password_env=PASSWORD_ENV)
    with pytest.raises(MailboxError) as caught:
        ImapMailbox(config).open()
    assert "the certificate is for localhost, 127.0.0.1, not 127.1; set host to it" in str(
        caught.value)


def test_connect_reads_the_ehlo_extensions_without_a_login(smtp_server: StartServer) -> None:
    import asyncio

    from digest.mailer import Mailer

    server = smtp_server()  # plain SMTP, no AUTH: nothing else would say EHLO
    said = asyncio.run(Mailer(server.smtp_config()).check_login())
    assert said.startswith("no TLS; offers ") and "8bitmime" in said.lower(), said
