"""A real IMAP server for tests: a private Dovecot on a free loopback port.

The server itself is ``digest.bench.replies.Dovecot`` (the benchmark starts the
same one): config, sockets, maildirs and log under the test's tmp_path, run
as the current user (or, under root, as Dovecot's own unprivileged users).

    def test_x(dovecot: Dovecot) -> None:
        config = dovecot.imap_config(password_env=...)

Where Dovecot is not installed the fixture skips the test and says why
(``apt-get install dovecot-imapd``, which ``tests/setup-services.sh`` does);
under CI (``CI=true``) a missing Dovecot fails the test instead, so the IMAP
tests can never silently stop running there.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from digest.bench.replies import Dovecot, DovecotUnavailable, dovecot_binary

PASSWORD_ENV = "DIGEST_TEST_IMAP_PASSWORD"


def _unavailable(reason: str) -> None:
    message = f"IMAP tests need Dovecot: {reason}"
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(message + " (CI must run them: tests/setup-services.sh installs it)")
    print(message)  # shown with -rs and -s: the reason is never silent
    pytest.skip(message)


def start_dovecot(folder: Path, *, tls: bool = False) -> Dovecot:
    """Start a Dovecot in ``folder``, or skip (fail under CI) saying why it cannot run."""
    if dovecot_binary() is None:
        _unavailable("dovecot is not installed (apt-get install dovecot-imapd)")
    server = Dovecot(folder, tls=tls)
    try:
        server.start()
    except DovecotUnavailable as exc:
        _unavailable(str(exc))
    return server


@pytest.fixture(name="dovecot")
def dovecot_fixture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Dovecot]:
    """A running Dovecot with one user; its password is in $DIGEST_TEST_IMAP_PASSWORD."""
    server = start_dovecot(tmp_path / "dovecot")
    monkeypatch.setenv(PASSWORD_ENV, server.password)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(name="dovecot_tls")
def dovecot_tls_fixture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Dovecot]:
    """As ``dovecot``, with implicit TLS on ``tls_port`` and STARTTLS on ``port``."""
    server = start_dovecot(tmp_path / "dovecot-tls", tls=True)
    monkeypatch.setenv(PASSWORD_ENV, server.password)
    try:
        yield server
    finally:
        server.stop()
