"""The mailer's pool of SMTP sessions and ``send_bytes``, against real aiosmtpd servers.

Many asyncio tasks send through one ``Mailer`` at once, as a dispatch does:
each message must arrive exactly once, over at most ``connections`` sessions,
and a failure of one session stays that session's (or, for the server's own
failure, is raised once for the whole run).
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import threading
from collections import Counter
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from hypothesis import given
from hypothesis import strategies as st

from digest.config import SmtpConfig, load_config
from digest.errors import ConfigError, SendError
from digest.mailer import Mailer, free_port

from .helpers import write_config
from .smtp_helpers import (  # noqa: F401  (smtp_server_fixture provides the smtp_server fixture)
    StartServer,
    smtp_server_fixture,
)

T = TypeVar("T")
QUICK: dict[str, Any] = {"base_delay": 0.01}  # retries in tests wait milliseconds
SENDER = "Paper Digest <digest@papers.example.org>"


def run(coroutine: Awaitable[T]) -> T:
    return asyncio.run(coroutine)  # type: ignore[arg-type]


def letter(n: int, *, to: str | None = None, body: str = "") -> bytes:
    """A message as a claim stores it: LF lines, serialised once by the email package."""
    message = EmailMessage()
    message["From"] = SENDER
    message["To"] = to or reader(n)
    message["Subject"] = f"digest {n}"
    message["Message-ID"] = f"<digest-{n}@papers.example.org>"
    message.set_content(body or f"Paper {n}\n" * 40)
    return message.as_bytes()


def reader(n: int) -> str:
    return f"reader{n:03d}@example.org"


# A server of our own that numbers its connections and can answer 421 on one of them.


@dataclass(frozen=True)
class Arrival:
    connection: int
    mail_from: str
    rcpt_tos: tuple[str, ...]
    mail_options: tuple[str, ...]
    raw: bytes


class _Handler:
    def __init__(self, *, delay: float, closing_421_on: int | None, cap: int | None,
                 tarpit: bool = False, poison: str | None = None, drop_at: str = "RCPT",
                 drop_every_data: bool = False) -> None:
        self.delay = delay
        self.cap = cap  # more sessions than this at once get a 421 greeting
        self.tarpit = tarpit  # ... or, with this, no greeting at all (left waiting)
        self.turned_away = 0
        self.poison = poison  # the session is dropped at this recipient's RCPT or DATA
        self.drop_at = drop_at
        self.drop_every_data = drop_every_data  # every DATA drops its session
        self.drops = 0
        self.drop_sessions = False  # set: every new connection is closed before the greeting
        self.closing_421_on = closing_421_on  # this connection answers 421 to its first DATA
        self.arrivals: list[Arrival] = []
        self.refused_421 = 0
        self.quits = 0
        self.open = 0
        self.most_open = 0  # the most sessions open at one time
        self.lock = threading.Lock()

    def _drop(self, server: SMTP) -> str:
        """Close the session without an answer, as a crashing content filter does."""
        with self.lock:
            self.drops += 1
        assert server.transport is not None
        server.transport.close()
        return "421 4.3.0 (never seen: the connection is closed)"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        if address == self.poison and self.drop_at == "RCPT":
            return self._drop(server)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        number: int = getattr(server, "connection_number", 0)
        if self.drop_every_data or (self.poison in envelope.rcpt_tos and self.drop_at == "DATA"):
            return self._drop(server)
        if number == self.closing_421_on and not self.refused_421:
            self.refused_421 += 1
            return "421 4.3.2 Service shutting down, closing transmission channel"
        if self.delay:
            await asyncio.sleep(self.delay)  # a slow relay: the sends overlap
        raw = envelope.original_content or b""
        with self.lock:
            self.arrivals.append(Arrival(number, envelope.mail_from or "",
                                         tuple(envelope.rcpt_tos),
                                         tuple(envelope.mail_options), raw))
        return "250 2.0.0 OK"

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        with self.lock:
            self.quits += 1
        return "221 Bye"


class _NumberingController(Controller):
    def __init__(self, handler: _Handler, **options: Any) -> None:
        super().__init__(handler, hostname="127.0.0.1", port=free_port(), **options)
        self.numbered = 0
        self.tracker = handler

    def factory(self) -> SMTP:
        self.numbered += 1
        server = _TrackedSMTP(self.tracker, self.handler, **self.SMTP_kwargs)
        server.connection_number = self.numbered  # type: ignore[attr-defined]
        return server


class _TrackedSMTP(SMTP):
    """aiosmtpd's SMTP, counting the sessions open at one time."""

    def __init__(self, tracker: _Handler, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tracker = tracker

    turned_away = False

    def connection_made(self, transport: Any) -> None:
        tracker = self.tracker
        if tracker.drop_sessions:  # a server that drops every session: gone before it greets
            self.turned_away = True
            transport.close()
            return
        with tracker.lock:
            if tracker.cap is not None and tracker.open >= tracker.cap:
                tracker.turned_away += 1
                self.turned_away = True
            else:
                tracker.open += 1
                tracker.most_open = max(tracker.most_open, tracker.open)
        if self.turned_away and tracker.tarpit:  # no greeting: the client waits until it gives up
            return
        if self.turned_away:  # as a relay capping the connections of one client does
            transport.write(b"421 4.7.0 Too many connections from your host\r\n")
            transport.close()
            return
        super().connection_made(transport)

    def eof_received(self) -> bool | None:
        if self.turned_away:  # a session it never greeted: nothing of aiosmtpd's to close
            return False
        return super().eof_received()

    def connection_lost(self, error: Exception | None) -> None:
        if self.turned_away:
            return
        with self.tracker.lock:
            self.tracker.open -= 1
        super().connection_lost(error)


class Server:
    def __init__(self, *, delay: float = 0.0, closing_421_on: int | None = None,
                 cap: int | None = None, smtputf8: bool = True, eight_bit: bool = True,
                 **misbehaviour: Any) -> None:
        self.handler = _Handler(delay=delay, closing_421_on=closing_421_on, cap=cap,
                                **misbehaviour)
        # decode_data=True is how aiosmtpd stops offering 8BITMIME (a 7-bit server).
        self.controller = _NumberingController(self.handler, enable_SMTPUTF8=smtputf8,
                                               decode_data=not eight_bit)
        self.controller.start()
        self.controller.numbered = 0  # start() opened one connection of its own to check
        self.stopped = False

    @property
    def arrivals(self) -> list[Arrival]:
        with self.handler.lock:
            return list(self.handler.arrivals)

    @property
    def connections(self) -> int:
        return self.controller.numbered

    def config(self, **overrides: Any) -> SmtpConfig:
        settings: dict[str, Any] = {"host": "127.0.0.1", "port": self.controller.port,
                                    "security": "none", "sender": SENDER, "timeout": 10.0}
        settings.update(overrides)
        return SmtpConfig(**settings)

    def stop(self) -> None:
        """Stop listening; calling it again does nothing."""
        if not self.stopped:
            self.stopped = True
            self.controller.stop()

    def copies(self) -> Counter[str]:
        return Counter(r for a in self.arrivals for r in a.rcpt_tos)


@pytest.fixture
def server_factory() -> Iterator[Any]:
    servers: list[Server] = []

    def start(**options: Any) -> Server:
        server = Server(**options)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


async def send_many(mailer: Mailer, count: int, *, offset: int = 0) -> list[Any]:
    """``count`` tasks at once, each sending one message; their results or errors."""
    return await asyncio.gather(
        *(mailer.send_bytes(letter(n), recipients=[reader(n)])
          for n in range(offset, offset + count)),
        return_exceptions=True)


# The pool


def test_concurrent_sends_over_k_connections_arrive_exactly_once(server_factory: Any) -> None:
    server = server_factory(delay=0.02)

    async def dispatch() -> tuple[list[Any], Mailer]:
        async with Mailer(server.config(), connections=4, **QUICK) as mailer:
            results = await send_many(mailer, 40)
        return results, mailer

    results, mailer = run(dispatch())

    assert results == [{}] * 40
    assert server.copies() == Counter({reader(n): 1 for n in range(40)})
    assert server.connections == 4 and mailer.connections == 4  # opened lazily, then reused
    assert server.handler.most_open == 4
    assert {a.connection for a in server.arrivals} == {1, 2, 3, 4}
    assert server.handler.quits == 4  # close() said QUIT on every session


def test_the_pool_size_comes_from_the_smtp_connections_setting(server_factory: Any) -> None:
    server = server_factory(delay=0.02)

    async def dispatch() -> None:
        async with Mailer(server.config(connections=2), **QUICK) as mailer:
            assert mailer.pool_size == 2
            await send_many(mailer, 10)

    run(dispatch())

    assert server.connections == 2 and server.handler.most_open == 2
    assert sum(server.copies().values()) == 10


def test_one_task_at_a_time_uses_one_session(server_factory: Any) -> None:
    server = server_factory()

    async def one_by_one() -> None:
        async with Mailer(server.config(), connections=8, **QUICK) as mailer:
            for n in range(5):
                await mailer.send_bytes(letter(n), recipients=[reader(n)])

    run(one_by_one())

    assert server.connections == 1
    assert [a.rcpt_tos for a in server.arrivals] == [(reader(n),) for n in range(5)]


def test_a_connection_dropped_mid_data_is_retried_once_on_a_new_one(
        smtp_server: StartServer) -> None:
    server = smtp_server(drop_first=1, delay=0.02)  # the first DATA: no answer, connection gone

    async def dispatch() -> tuple[list[Any], Mailer]:
        async with Mailer(server.smtp_config(sender=SENDER), connections=4, **QUICK) as mailer:
            results = await send_many(mailer, 12)
        return results, mailer

    results, mailer = run(dispatch())

    assert results == [{}] * 12
    assert mailer.unavailable is None  # one lost session is not the server's failure
    delivered = Counter(r for m in server.messages for r in m.rcpt_tos)
    assert delivered == Counter({reader(n): 1 for n in range(12)})
    assert server.data_commands == 13  # the lost one once more, nothing else twice
    assert server.connections == mailer.connections >= 5  # the lost one was replaced


def test_a_421_closes_that_session_only_and_the_message_goes_on_another(
        server_factory: Any) -> None:
    server = server_factory(delay=0.02, closing_421_on=2)

    async def dispatch() -> tuple[list[Any], Mailer]:
        async with Mailer(server.config(), connections=3, **QUICK) as mailer:
            results = await send_many(mailer, 15)
        return results, mailer

    results, mailer = run(dispatch())

    assert results == [{}] * 15
    assert mailer.unavailable is None
    assert server.handler.refused_421 == 1
    assert server.copies() == Counter({reader(n): 1 for n in range(15)})
    assert all(a.connection != 2 for a in server.arrivals)  # never used again after its 421
    assert server.connections == 4  # the closed one was replaced


def test_a_server_capping_connections_per_client_shrinks_the_pool(
        server_factory: Any, caplog: pytest.LogCaptureFixture) -> None:
    server = server_factory(delay=0.02, cap=2)

    async def dispatch() -> tuple[list[Any], Mailer]:
        async with Mailer(server.config(), connections=4, **QUICK) as mailer:
            results = await send_many(mailer, 16)
        return results, mailer

    with caplog.at_level(logging.WARNING, logger="digest.mailer"):
        results, mailer = run(dispatch())

    assert results == [{}] * 16
    assert mailer.unavailable is None  # a full server is not a server that is down
    assert server.copies() == Counter({reader(n): 1 for n in range(16)})
    assert mailer.pool_size == 2 and server.handler.turned_away == 2
    assert server.handler.most_open == 2
    [warning] = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert "beyond the 2 of ours it took" in warning  # the numbers are the ones used
    assert "sending over 2 from now on" in warning


def test_a_server_that_never_greets_sessions_beyond_its_cap_shrinks_the_pool(
        server_factory: Any, caplog: pytest.LogCaptureFixture) -> None:
    server = server_factory(delay=0.02, cap=2, tarpit=True)
    config = server.config(timeout=2.0)  # the wait for a greeting that never comes

    async def dispatch() -> tuple[list[Any], Mailer]:
        async with Mailer(config, connections=4, **QUICK) as mailer:
            results = await send_many(mailer, 40)
        return results, mailer

    with caplog.at_level(logging.WARNING, logger="digest.mailer"):
        results, mailer = run(dispatch())

    assert results == [{}] * 40
    assert mailer.unavailable is None  # a tarpit for extra sessions is not a server down
    assert server.copies() == Counter({reader(n): 1 for n in range(40)})
    assert mailer.pool_size == 2 and server.handler.turned_away == 2
    assert server.handler.most_open == 2
    [warning] = [r.getMessage() for r in caplog.records if r.name == "digest.mailer"]
    assert "refused 2 more session(s) beyond the 2 of ours it took" in warning
    assert "sending over 2 from now on" in warning


def test_a_refused_login_with_k_tasks_waiting_is_one_login_and_one_error(
        smtp_server: StartServer, caplog: pytest.LogCaptureFixture) -> None:
    server = smtp_server(tls="starttls", auth=("ann", "s3cret"))
    config = server.smtp_config(username="ann", sender=SENDER)

    async def dispatch() -> tuple[list[Any], Mailer]:
        async with Mailer(config, password="wrong", connections=4, **QUICK) as mailer:
            results = await send_many(mailer, 8)
        return results, mailer

    with caplog.at_level(logging.ERROR, logger="digest.mailer"):
        results, mailer = run(dispatch())

    assert all(result is mailer.unavailable for result in results)  # the same error, 8 times
    error = mailer.unavailable
    assert isinstance(error, SendError) and error.kind == "config" and "535" in str(error)
    assert server.connections == 1  # one bad login, not four: providers lock accounts
    assert server.messages == []
    assert len([r for r in caplog.records if r.name == "digest.mailer"]) == 1


def test_a_silent_server_with_k_tasks_costs_one_timeout(caplog: pytest.LogCaptureFixture) -> None:
    from digest.bench.smtp_servers import RawServer

    server = RawServer("hang")
    config = SmtpConfig(host="127.0.0.1", port=server.port, security="none", timeout=0.5)

    async def dispatch() -> tuple[list[Any], Mailer]:
        async with Mailer(config, connections=4, **QUICK) as mailer:
            results = await send_many(mailer, 6)
        return results, mailer

    try:
        with caplog.at_level(logging.ERROR, logger="digest.mailer"):
            results, mailer = run(dispatch())
    finally:
        server.stop()
    assert mailer.unavailable is not None and mailer.unavailable.kind == "server"
    assert all(result is mailer.unavailable for result in results)
    assert server.connections == 1
    assert len([r for r in caplog.records if r.name == "digest.mailer"]) == 1


def test_a_server_gone_mid_dispatch_is_unavailable_once_for_every_task(
        server_factory: Any, caplog: pytest.LogCaptureFixture) -> None:
    server = server_factory(delay=0.01)

    async def dispatch() -> tuple[list[Any], Mailer]:
        async with Mailer(server.config(), connections=4, **QUICK) as mailer:
            first = await send_many(mailer, 8)
            assert first == [{}] * 8
            server.stop()  # the relay goes away with four idle sessions open
            later = await send_many(mailer, 8, offset=8)
            return later, mailer

    with caplog.at_level(logging.ERROR, logger="digest.mailer"):
        results, mailer = run(dispatch())

    assert mailer.unavailable is not None and mailer.unavailable.kind == "server"
    assert all(result is mailer.unavailable for result in results)
    assert len([r for r in caplog.records if r.name == "digest.mailer"]) == 1
    assert server.copies() == Counter({reader(n): 1 for n in range(8)})


@pytest.mark.parametrize("stage", ["RCPT", "DATA"])
def test_a_message_that_drops_the_session_fails_alone_and_the_others_go_on(
        server_factory: Any, stage: str) -> None:
    poison = reader(17)
    server = server_factory(delay=0.01, poison=poison, drop_at=stage)

    async def dispatch() -> tuple[list[Any], Mailer]:
        async with Mailer(server.config(), connections=4, **QUICK) as mailer:
            results = await send_many(mailer, 40)
        return results, mailer

    results, mailer = run(dispatch())

    failed = results.pop(17)
    assert isinstance(failed, SendError) and failed.kind == "deferred"
    assert f"dropped the connection at {stage} for this message twice" in str(failed)
    assert results == [{}] * 39
    assert mailer.unavailable is None  # the server works: one message is not its failure
    assert server.copies() == Counter({reader(n): 1 for n in range(40) if n != 17})
    assert server.handler.drops == 2  # tried once more on a new session, then left


def test_a_message_that_dropped_sessions_is_deferred_at_the_start_of_a_run_too(
        server_factory: Any) -> None:
    server = server_factory(poison=reader(0), drop_at="DATA")

    async def resend_first() -> tuple[Any, dict[str, SendError], Mailer]:
        async with Mailer(server.config(), connections=4, **QUICK) as mailer:
            try:
                await mailer.send_bytes(letter(0), recipients=[reader(0)])
            except SendError as exc:
                first: Any = exc
            later = await mailer.send_bytes(letter(1), recipients=[reader(1)])
        return first, later, mailer

    first, later, mailer = run(resend_first())

    assert isinstance(first, SendError) and first.kind == "deferred"  # nothing sent before it
    assert later == {} and mailer.unavailable is None
    assert server.copies() == Counter({reader(1): 1})


def test_a_server_that_drops_every_message_is_unavailable(server_factory: Any) -> None:
    from digest.mailer import DROP_LIMIT

    server = server_factory(drop_every_data=True)

    async def dispatch() -> tuple[list[Any], Mailer]:
        async with Mailer(server.config(), connections=4, **QUICK) as mailer:
            results = await send_many(mailer, 40)
        return results, mailer

    results, mailer = run(dispatch())

    error = mailer.unavailable
    assert error is not None and error.kind == "server"
    assert f"for {DROP_LIMIT} different messages in a row" in str(error)
    assert all(isinstance(r, SendError) for r in results)
    deferred = [r for r in results if r is not error]
    assert all(r.kind == "deferred" for r in deferred) and len(deferred) < DROP_LIMIT
    assert server.arrivals == []


def test_a_server_that_drops_every_session_before_greeting_is_unavailable(
        server_factory: Any) -> None:
    server = server_factory()
    server.handler.drop_sessions = True

    async def dispatch() -> tuple[list[Any], Mailer]:
        async with Mailer(server.config(), connections=4, **QUICK) as mailer:
            results = await send_many(mailer, 40)
        return results, mailer

    results, mailer = run(dispatch())

    assert mailer.unavailable is not None and mailer.unavailable.kind == "server"
    assert all(result is mailer.unavailable for result in results)
    assert server.connections == 1 and server.arrivals == []


CONFIG = """
    [digest]
    inbox = "in"
    state = "state.sqlite3"

    [smtp]
    host = "smtp.example.org"
    {line}

    [[subscribers]]
    email = "alice@example.org"
"""


def test_smtp_connections_is_read_from_the_config(tmp_path: Path) -> None:
    assert load_config(write_config(tmp_path, CONFIG.format(line=""))).smtp.connections == 4
    config = load_config(write_config(tmp_path, CONFIG.format(line="connections = 8")))
    assert config.smtp.connections == 8
    assert Mailer(config.smtp).pool_size == 8


@pytest.mark.parametrize("value", ["0", "33", "2.5", '"4"'])
def test_a_wrong_smtp_connections_names_the_key_and_the_range(tmp_path: Path,
                                                              value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write_config(tmp_path, CONFIG.format(line=f"connections = {value}")))
    assert "smtp.connections" in str(caught.value)
    assert "a whole number from 1 to 32" in str(caught.value)


def test_connections_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="connections must be at least 1"):
        Mailer(SmtpConfig(), connections=0)


# send_bytes


def test_send_bytes_sends_the_claimed_bytes_as_they_are(server_factory: Any) -> None:
    server = server_factory()
    data = letter(1, body="Line one.\n.a line that starts with a dot\n\nLast line.\n")

    async def send() -> dict[str, SendError]:
        async with Mailer(server.config(), **QUICK) as mailer:
            return await mailer.send_bytes(data, recipients=[reader(1)])

    assert run(send()) == {}

    [arrival] = server.arrivals
    assert arrival.raw == data.replace(b"\n", b"\r\n")  # CRLF on the wire, nothing else changed
    assert arrival.mail_from == "digest@papers.example.org"  # the address of [smtp] from
    assert arrival.rcpt_tos == (reader(1),)
    assert "BODY=8BITMIME" in arrival.mail_options


def crlf_reference(data: bytes) -> bytes:
    """The lines of ``data`` as DATA must carry them, by a walk over its bytes: CRLF, a
    lone CR and a lone LF each end a line, ended by CRLF; the last line gets a CRLF too."""
    out = bytearray()
    i = 0
    while i < len(data):
        byte = data[i:i + 1]
        if byte == b"\r":
            out += b"\r\n"
            i += 2 if data[i + 1:i + 2] == b"\n" else 1
        elif byte == b"\n":
            out += b"\r\n"
            i += 1
        else:
            out += byte
            i += 1
    if not out.endswith(b"\r\n"):
        out += b"\r\n"
    return bytes(out)


def transparent_reference(data: bytes) -> bytes:
    """RFC 5321 4.5.2 line by line: one more "." before each line starting with "."; then
    the "." line that ends the data."""
    lines = crlf_reference(data)[:-2].split(b"\r\n")
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n"
                    for line in lines) + b".\r\n"


@given(data=st.lists(st.sampled_from([b"a", b".", b"..", b"\r", b"\n", b"\r\n", b" ",
                                      b"\xc3\xa9", b"x.y"]), max_size=30).map(b"".join))
def test_the_data_bytes_are_the_rfc_5321_transparent_form(data: bytes) -> None:
    """CRLF lines (bare CR and LF converted), leading dots doubled, the closing dot line;
    the SIZE is the CRLF form's length, before the dots."""
    from digest.mailer import crlf_lines, data_transparent, wire_size

    assert crlf_lines(data) == crlf_reference(data)
    assert wire_size(data) == len(crlf_reference(data))
    assert data_transparent(data) == transparent_reference(data)


def test_send_bytes_with_dot_lines_and_bare_line_ends_arrives_byte_identical(
        server_factory: Any) -> None:
    """The prepared DATA bytes (``data_transparent``) through a real aiosmtpd: what it
    stores is the message with CRLF lines, every dot line as it was (none lost, none
    doubled), bare CR and LF converted; the retry after a 421 to the first DATA sends the
    same bytes on a new session."""
    server = server_factory(closing_421_on=1)
    head = letter(2, body="x")
    headers = head[:head.index(b"\n\n") + 1]
    body = (b".starts with a dot\r\n..two dots\n.\n..\r\nbare CR\rthen LF\n"
            b"mid.dle and end.\r\n. space after a dot\r\n\r\n.\r\nno final line end.")
    data = headers + b"\n" + body

    async def send() -> dict[str, SendError]:
        async with Mailer(server.config(), **QUICK) as mailer:
            return await mailer.send_bytes(data, recipients=[reader(2)])

    assert run(send()) == {}

    [arrival] = server.arrivals
    assert arrival.connection == 2  # the first session answered 421 to its DATA
    assert arrival.raw == crlf_reference(data)
    assert arrival.raw.endswith(b"\r\n.\r\nno final line end.\r\n")
    assert b"\r\n..two dots\r\n.\r\n..\r\nbare CR\r\nthen LF\r\n" in arrival.raw


def test_send_bytes_takes_the_envelope_given(server_factory: Any) -> None:
    server = server_factory()

    async def send() -> None:
        async with Mailer(server.config(), **QUICK) as mailer:
            await mailer.send_bytes(letter(1), recipients=["a@example.org", "B@example.org",
                                                           "b@example.org"],
                                    sender="bounces@papers.example.org")

    run(send())

    [arrival] = server.arrivals
    assert arrival.mail_from == "bounces@papers.example.org"
    assert arrival.rcpt_tos == ("a@example.org", "B@example.org")  # each address once


def test_send_bytes_and_send_put_the_same_bytes_on_the_wire(server_factory: Any) -> None:
    server = server_factory()
    data = letter(3, body="Caf\u00e9 na\u00efve \u2014 r\u00e9sum\u00e9\n" * 10)
    message = email.message_from_bytes(data, policy=email.policy.default)

    async def both() -> None:
        async with Mailer(server.config(), **QUICK) as mailer:
            await mailer.send(message)
            await mailer.send_bytes(data, recipients=[reader(3)])

    run(both())

    by_send, by_bytes = server.arrivals
    assert (by_send.mail_from, by_send.rcpt_tos) == (by_bytes.mail_from, by_bytes.rcpt_tos)
    assert by_send.raw == by_bytes.raw


def test_send_bytes_to_a_7bit_server_sends_7bit_mime(server_factory: Any) -> None:
    server = server_factory(eight_bit=False)
    text = "Caf\u00e9 na\u00efve \u2014 r\u00e9sum\u00e9\n"
    data = letter(4, body=text)
    assert not data.isascii()  # the email package chose 8bit for this body

    async def send() -> None:
        async with Mailer(server.config(), **QUICK) as mailer:
            await mailer.send_bytes(data, recipients=[reader(4)])

    run(send())

    [arrival] = server.arrivals
    assert arrival.raw.isascii()
    assert "BODY=8BITMIME" not in arrival.mail_options
    received = email.message_from_bytes(arrival.raw, policy=email.policy.default)
    assert isinstance(received, EmailMessage)
    assert received.get_content() == text
    assert received["Message-ID"] == "<digest-4@papers.example.org>"


def test_send_bytes_uses_smtputf8_when_asked(server_factory: Any) -> None:
    server = server_factory()
    message = EmailMessage(policy=email.policy.default.clone(utf8=True))  # LF, as claimed
    message["From"] = SENDER
    message["To"] = "Jos\u00e9 <jos\u00e9@example.org>"
    message["Subject"] = "digest"
    message.set_content("hello\n")
    data = message.as_bytes()

    async def send() -> None:
        async with Mailer(server.config(), **QUICK) as mailer:
            await mailer.send_bytes(data, recipients=["jos\u00e9@example.org"], smtputf8=True)

    run(send())

    [arrival] = server.arrivals
    assert arrival.rcpt_tos == ("jos\u00e9@example.org",)
    assert "SMTPUTF8" in arrival.mail_options
    assert arrival.raw == data.replace(b"\n", b"\r\n")


def test_send_bytes_without_smtputf8_on_the_server_fails_that_message_alone(
        server_factory: Any) -> None:
    server = server_factory(smtputf8=False)

    async def both() -> tuple[list[Any], Mailer]:
        async with Mailer(server.config(), connections=2, attempts=1, **QUICK) as mailer:
            results = await asyncio.gather(
                mailer.send_bytes(letter(1, to="jos\u00e9@example.org"),
                                  recipients=["jos\u00e9@example.org"], smtputf8=True),
                mailer.send_bytes(letter(2), recipients=[reader(2)]),
                return_exceptions=True)
        return results, mailer

    (failed, sent), mailer = run(both())

    assert isinstance(failed, SendError) and failed.kind == "message"
    assert "needs SMTPUTF8, which the server does not offer" in str(failed)
    assert sent == {}
    assert mailer.unavailable is None
    assert [a.rcpt_tos for a in server.arrivals] == [(reader(2),)]


def test_send_bytes_refuses_a_non_ascii_address_without_smtputf8(server_factory: Any) -> None:
    server = server_factory()

    async def send() -> None:
        async with Mailer(server.config(), **QUICK) as mailer:
            await mailer.send_bytes(letter(1), recipients=["jos\u00e9@example.org"])

    with pytest.raises(SendError) as caught:
        run(send())

    assert caught.value.kind == "message" and "smtputf8=True" in str(caught.value)
    assert server.connections == 0 and server.arrivals == []


def test_send_bytes_without_a_recipient_is_a_message_error() -> None:
    async def send() -> None:
        await Mailer(SmtpConfig()).send_bytes(letter(1), recipients=[])

    with pytest.raises(SendError, match="no envelope recipient") as caught:
        run(send())
    assert caught.value.kind == "message"


@pytest.mark.parametrize(("options", "kind", "words"), [
    # The first message of the run: a 5.1.1 before any accepted address is held back.
    ({"reject": ["reader001@example.org"]}, "deferred", "550 5.1.1"),
    ({"fail_first": 5}, "deferred", "gave up after 2 attempts"),
])
def test_send_bytes_classifies_refusals_as_send_does(
        smtp_server: StartServer, options: dict[str, Any], kind: str, words: str) -> None:
    server = smtp_server(**options)

    async def compare() -> tuple[SendError, SendError]:
        errors = []
        async with Mailer(server.smtp_config(sender=SENDER), attempts=2, **QUICK) as mailer:
            data = letter(1)
            parsed = email.message_from_bytes(data, policy=email.policy.default)
            for attempt in (mailer.send(parsed), mailer.send_bytes(data, recipients=[reader(1)])):
                with pytest.raises(SendError) as caught:
                    await attempt
                errors.append(caught.value)
        return errors[0], errors[1]

    by_send, by_bytes = run(compare())

    assert by_send.kind == by_bytes.kind == kind
    assert str(by_send) == str(by_bytes)
    assert words in str(by_bytes)


def test_send_bytes_rejected_after_data_is_a_message_error(tmp_path: Path) -> None:
    from digest.bench.smtp_servers import Behaviour, RecordingServer

    server = RecordingServer(Behaviour(data_reply="554 5.6.0 Message rejected as spam"))
    config = SmtpConfig(host="127.0.0.1", port=server.port, security="none", sender=SENDER)

    async def send() -> Mailer:
        async with Mailer(config, **QUICK) as mailer:
            with pytest.raises(SendError) as caught:
                await mailer.send_bytes(letter(1), recipients=[reader(1)])
            assert caught.value.kind == "message" and "554 5.6.0" in str(caught.value)
        return mailer

    try:
        mailer = run(send())
    finally:
        server.stop()
    assert mailer.unavailable is None



async def send_staggered(mailer: Mailer, count: int, *, every: float) -> list[Any]:
    """``count`` sends started one by one, ``every`` seconds apart, as claims arrive."""
    async def one(n: int) -> Any:
        await asyncio.sleep(n * every)
        return await mailer.send_bytes(letter(n), recipients=[reader(n)])

    return await asyncio.gather(*(one(n) for n in range(count)), return_exceptions=True)


@pytest.mark.parametrize("connections", [8, 16])
def test_a_pool_far_above_a_servers_cap_never_shrinks_below_the_sessions_open(
        server_factory: Any, caplog: pytest.LogCaptureFixture, connections: int) -> None:
    """Issue 13: [smtp] connections 8 or 16 against a relay that takes 2 sessions.

    The sends start one at a time while both sessions are busy (a slow relay),
    as a dispatch's deliveries do: each extra session is refused on its own.
    Every refusal arrives while sessions of ours are open: crowding, so the
    pool becomes the sessions the server took (never fewer), and every
    message arrives.
    """
    server = server_factory(delay=0.2, cap=2)
    count = 3 * connections

    async def dispatch() -> tuple[list[Any], Mailer]:
        async with Mailer(server.config(), connections=connections, **QUICK) as mailer:
            results = await send_staggered(mailer, count, every=0.02)
        return results, mailer

    with caplog.at_level(logging.WARNING, logger="digest.mailer"):
        results, mailer = run(dispatch())

    assert results == [{}] * count
    assert mailer.unavailable is None  # crowded, not down
    assert server.copies() == Counter({reader(n): 1 for n in range(count)})
    assert mailer.pool_size == 2  # the sessions it took, never fewer
    assert server.handler.most_open == 2
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


_ATOM = st.text(alphabet="abcxyzABC0129!#$%&'*+/=?^_`{|}~-.@ \"<>()[]\\,;:é", min_size=1,
                max_size=24)


@given(address=st.one_of(
    _ATOM, st.from_regex(r"[a-zA-Z0-9!#$%&'*+/=?^_`{|}~-]+(\.[a-z0-9+_-]+)*@[a-z0-9-]+(\.[a-z]+)*",
                         fullmatch=True)))
def test_mail_and_rcpt_quote_an_address_exactly_as_aiosmtplib_does(address: str) -> None:
    """The plain-address shortcut (issue 13: no parse per message) never changes the command
    line nor lets through an address aiosmtplib refuses."""
    import aiosmtplib.email

    from digest.mailer import _quoted

    try:
        expected: str | type[ValueError] = aiosmtplib.email.quote_address(address)
    except ValueError:
        expected = ValueError
    try:
        got: str | type[ValueError] = _quoted(address)
    except ValueError:
        got = ValueError
    assert got == expected


def test_quoting_plain_recipients_keeps_nothing_per_address() -> None:
    """A dispatch's memory does not grow with its subscriber list through the address
    quoting (it kept an entry per recipient, ~250 bytes each, up to 65,536 of them)."""
    import gc
    import tracemalloc

    from digest.mailer import _quoted

    addresses = [f"reader{n:06d}@quoting.example.org" for n in range(5000)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        quoted = [len(_quoted(address)) for address in addresses]
        del quoted
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 20 * 1024, f"{kept} bytes kept for {len(addresses)} addresses"


# A stop


def test_after_stop_starting_no_transaction_begins_and_the_one_under_way_ends(
        server_factory: Any) -> None:
    """SIGTERM's first step: the send under way finishes; those waiting for the one session
    give up at once (``deferred``, "the sender is stopping"), never reaching the server."""
    server = server_factory(delay=0.3)

    async def dispatch() -> list[Any]:
        async with Mailer(server.config(), connections=1, **QUICK) as mailer:
            sends = asyncio.gather(
                *(mailer.send_bytes(letter(n), recipients=[reader(n)]) for n in range(4)),
                return_exceptions=True)
            while not mailer._in_attempt:  # the first send has its session
                await asyncio.sleep(0.01)
            mailer.stop_starting()
            return await sends

    results = run(dispatch())
    assert results[0] == {}
    for error in results[1:]:
        assert isinstance(error, SendError) and error.kind == "deferred", error
        assert "the sender is stopping" in str(error)
    assert server.copies() == Counter({reader(0): 1})
