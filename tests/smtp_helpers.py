"""A real SMTP server for tests: aiosmtpd on a free loopback port.

Plain functions and classes, usable from any test file without conftest::

    server = start_smtp_server(tmp_path, tls="starttls", auth=("ann", "secret"))
    try:
        ...  # send to server.port, e.g. with server.smtp_config()
        assert server.messages[0].message["Subject"] == "..."
    finally:
        server.stop()

or through the ``smtp_server`` fixture below (a factory that stops every
server it started), once conftest.py imports ``smtp_server_fixture``.

The server can misbehave on purpose: answer 4xx to the first N DATA commands
(``fail_first``), drop the connection at the first N DATA commands
(``drop_first``), refuse given recipients (``reject``), or drop idle
connections quickly (``idle_timeout``).
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import ssl
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol, Self

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from digest.bench.replies import DovecotUnavailable, self_signed_cert
from digest.config import SmtpConfig
from digest.mailer import free_port

TlsMode = Literal["none", "starttls", "tls"]
DEFAULT_REJECT_REPLY = "550 5.1.1 No such user here"
DEFAULT_DEFER_REPLY = "451 4.3.0 Try again later"


@dataclass(frozen=True)
class ReceivedMessage:
    """One message as the server got it: the envelope and the parsed message."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    raw: bytes
    message: EmailMessage
    connection: int  # 1 for the first connection the server accepted, 2 for the next...
    tls: bool  # whether the connection was encrypted when DATA came
    login: str | None  # the user that authenticated on that connection, if any


@dataclass
class _Behaviour:
    """How the server misbehaves, and how much of it is used up."""

    fail_first: int = 0
    drop_first: int = 0
    reject: dict[str, str] = field(default_factory=dict)
    defer_reply: str = DEFAULT_DEFER_REPLY
    data_commands: int = 0
    delay: float = 0.0  # seconds each DATA waits before it is accepted


class SmtpServer:
    """A running aiosmtpd server and what it has received. Stop it with ``stop()``."""

    def __init__(self, controller: _CountingController, handler: _RecordingHandler,
                 tls: TlsMode, auth: tuple[str, str] | None, cert: Path | None) -> None:
        self._controller = controller
        self._handler = handler
        self.host: str = controller.hostname
        self.port: int = controller.port
        self.tls = tls
        self.auth = auth
        self.cert = cert  # the self-signed certificate (PEM) when tls is not "none"
        self._stopped = False

    @property
    def messages(self) -> list[ReceivedMessage]:
        """Messages accepted so far, in order (a copy, safe to keep)."""
        with self._handler.lock:
            return list(self._handler.received)

    @property
    def connections(self) -> int:
        """How many TCP connections clients have opened (STARTTLS does not count twice)."""
        return self._controller.connections

    @property
    def data_commands(self) -> int:
        """How many DATA commands arrived, including the ones answered with a failure."""
        return self._handler.behaviour.data_commands

    def set_delay(self, seconds: float) -> None:
        """Make each DATA wait ``seconds`` from now on, the ones waiting already included."""
        self._handler.behaviour.delay = seconds

    def smtp_config(self, **overrides: Any) -> SmtpConfig:
        """An ``SmtpConfig`` that reaches this server (self-signed cert accepted)."""
        settings: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "security": self.tls,
            "username": self.auth[0] if self.auth else None,
            "verify_tls": False,
            "timeout": 10.0,
        }
        settings.update(overrides)
        return SmtpConfig(**settings)

    def stop(self) -> None:
        """Stop listening; calling it again does nothing."""
        if not self._stopped:
            self._stopped = True
            self._controller.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def start_smtp_server(
    tmp_path: Path,
    *,
    tls: TlsMode = "none",
    auth: tuple[str, str] | None = None,
    fail_first: int = 0,
    drop_first: int = 0,
    reject: Mapping[str, str] | Iterable[str] = (),
    idle_timeout: float = 300.0,
    delay: float = 0.0,
) -> SmtpServer:
    """Start a real SMTP server on 127.0.0.1 and a free port.

    tls: "starttls" offers and requires STARTTLS, "tls" is implicit TLS (both
      with a self-signed certificate made by the openssl command line).
    auth: (user, password) makes AUTH required (after STARTTLS when tls is "starttls").
    fail_first: answer 451 to the first N DATA commands.
    drop_first: close the connection at the first N DATA commands, without a
      reply (with fail_first too, the drops come first, then the 451s).
    reject: addresses to refuse at RCPT: a mapping to the reply to give, or a
      collection of addresses that get "550 5.1.1 No such user here".
    idle_timeout: seconds after which the server drops an idle connection.
    delay: seconds each DATA command waits before the message is accepted (a slow
      relay; a client that disconnects meanwhile leaves nothing recorded).
    """
    cert = key = None
    context: ssl.SSLContext | None = None
    if tls != "none":
        cert, key = make_self_signed_cert(tmp_path)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
    if isinstance(reject, Mapping):
        refusals = {address.lower(): reply for address, reply in reject.items()}
    else:
        refusals = {address.lower(): DEFAULT_REJECT_REPLY for address in reject}
    handler = _RecordingHandler(_Behaviour(fail_first=fail_first, drop_first=drop_first,
                                           reject=refusals, delay=delay))
    options: dict[str, Any] = {"timeout": idle_timeout}
    if tls == "starttls":
        options.update(tls_context=context, require_starttls=True)
    if tls == "tls":
        options.update(ssl_context=context)
    if auth is not None:
        # aiosmtpd only knows STARTTLS as TLS: over implicit TLS it would hide AUTH.
        options.update(authenticator=_Authenticator(*auth), auth_required=True,
                       auth_require_tls=tls == "starttls")
    controller = _CountingController(handler, hostname="127.0.0.1", port=free_port(),
                                     **options)
    controller.start()
    controller.connections = 0  # start() opened one connection of its own to check
    return SmtpServer(controller, handler, tls, auth, cert)


@pytest.fixture(name="smtp_server")
def smtp_server_fixture(tmp_path: Path) -> Iterator[StartServer]:
    """Fixture ``smtp_server``, a factory: ``server = smtp_server(tls="tls")``.

    Every server it started is stopped after the test. Import ``smtp_server_fixture``
    (into conftest.py or a test module) to make the fixture available.
    """
    servers: list[SmtpServer] = []

    def start(**options: Any) -> SmtpServer:
        server = start_smtp_server(tmp_path, **options)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


class StartServer(Protocol):
    def __call__(self, **options: Any) -> SmtpServer: ...


def make_self_signed_cert(folder: Path) -> tuple[Path, Path]:
    """A certificate and key for 127.0.0.1/localhost (the benchmark's maker, with openssl).

    Skips the calling test when the openssl command line is not installed.
    """
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return self_signed_cert(folder)
    except DovecotUnavailable as exc:
        pytest.skip(str(exc))



class _CountingController(Controller):
    """A Controller that counts connections: aiosmtpd builds one SMTP object per connection."""

    connections = 0

    def factory(self) -> SMTP:
        self.connections += 1
        server = super().factory()
        server.connection_number = self.connections  # type: ignore[attr-defined]
        return server


class _Authenticator:
    """aiosmtpd authenticator accepting one user and password, by LOGIN or PLAIN."""

    def __init__(self, user: str, password: str) -> None:
        self.user = user
        self.password = password

    def __call__(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                 auth_data: Any) -> AuthResult:
        if isinstance(auth_data, LoginPassword) and (
            auth_data.login.decode() == self.user and auth_data.password.decode() == self.password
        ):
            return AuthResult(success=True, auth_data=self.user)
        return AuthResult(success=False, handled=False)


class _RecordingHandler:
    """aiosmtpd handler: records accepted messages and misbehaves as asked."""

    def __init__(self, behaviour: _Behaviour) -> None:
        self.behaviour = behaviour
        self.received: list[ReceivedMessage] = []
        self.lock = threading.Lock()

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        refusal = self.behaviour.reject.get(address.lower())
        if refusal is not None:
            return refusal
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        behaviour = self.behaviour
        behaviour.data_commands += 1
        if behaviour.data_commands <= behaviour.drop_first:
            if isinstance(server.transport, asyncio.WriteTransport):
                server.transport.abort()  # gone without a word, as a crashed relay would be
            return "421 4.3.0 Connection dropped by the test server"
        if behaviour.data_commands <= behaviour.drop_first + behaviour.fail_first:
            return behaviour.defer_reply
        if behaviour.delay:
            # In steps, so a test can change the delay (``set_delay``) while a message waits.
            started = time.monotonic()
            while time.monotonic() - started < behaviour.delay:
                await asyncio.sleep(0.05)
        raw = envelope.original_content or b""
        message = email.message_from_bytes(raw, policy=email.policy.default)
        with self.lock:
            self.received.append(ReceivedMessage(
                mail_from=envelope.mail_from or "",
                rcpt_tos=tuple(envelope.rcpt_tos),
                raw=raw,
                message=message,  # type: ignore[arg-type]  # policy.default makes EmailMessage
                connection=getattr(server, "connection_number", 0),
                tls=_encrypted(server),
                login=session.auth_data if session.authenticated else None,
            ))
        return "250 2.0.0 OK: queued"


def _encrypted(server: SMTP) -> bool:
    transport = server.transport
    return transport is not None and transport.get_extra_info("ssl_object") is not None
