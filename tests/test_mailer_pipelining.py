"""SMTP PIPELINING (RFC 2920) in the mailer: MAIL, RCPT and DATA written together.

Against real servers on loopback: aiosmtpd made to offer PIPELINING (its
``handle_EHLO`` hook; it reads pipelined lines in order), and a small asyncio
server written here that answers in scripted ways (slowly, split across
packets, 421 at a given command, silent, dropping). The reply reader is also
fed arbitrary splits of a stream of replies (hypothesis) over a real socket
pair, through the same ``data_received`` the transport calls. A server without
PIPELINING gets one command at a time, as before (the other mailer tests).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import re
import socket
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib
import aiosmtplib.smtp
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from digest.config import SmtpConfig
from digest.errors import SendError
from digest.mailer import AIOSMTPLIB_TESTED, Mailer, _PipelinedReplies, free_port

SENDER = "Paper Digest <digest@example.org>"
QUICK: dict[str, Any] = {"attempts": 2, "base_delay": 0.01}


def _message(to: str, n: int = 0) -> bytes:
    return (f"From: {SENDER}\r\nTo: {to}\r\nSubject: Your papers\r\n"
            f"Message-ID: <m{n}@example.org>\r\n\r\nline one\r\n.dot line\r\nend\r\n").encode()


# --- the aiosmtplib internals the reader builds on ------------------------------------


def test_installed_aiosmtplib_is_the_range_the_reader_was_written_for() -> None:
    """Fails loudly when aiosmtplib leaves the tested range: read its protocol.py again and
    check ``_PipelinedReplies`` against it before widening the range (here and in
    pyproject.toml)."""
    version = tuple(int(part) for part in re.findall(r"\d+", aiosmtplib.__version__)[:2])
    low, high = AIOSMTPLIB_TESTED
    assert low <= version < high, (
        f"aiosmtplib {aiosmtplib.__version__} is outside {low}..{high}: "
        "digest.mailer._PipelinedReplies relies on its SMTPProtocol internals")
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    wanted = f"aiosmtplib>={low[0]}.{low[1]},<{high[0]}.{high[1]}"
    assert wanted in project["project"]["dependencies"]


def test_aiosmtplib_protocol_still_has_what_the_reader_uses() -> None:
    protocol_class = aiosmtplib.smtp.SMTPProtocol  # what SMTP._create_connection builds
    assert issubclass(_PipelinedReplies, protocol_class)
    for name in ("_read_response_from_buffer", "read_response", "write", "data_received",
                 "connection_lost", "eof_received"):
        assert callable(getattr(protocol_class, name)), name

    async def check() -> None:
        protocol = protocol_class(loop=asyncio.get_running_loop())
        assert isinstance(protocol._buffer, bytearray)
        protocol._buffer.extend(b"250 one\r\n250-two\r\n250 three\r\n")
        first = protocol._read_response_from_buffer()
        second = protocol._read_response_from_buffer()
        assert first == aiosmtplib.SMTPResponse(250, "one")
        assert second == aiosmtplib.SMTPResponse(250, "two\nthree")
        assert protocol._read_response_from_buffer() is None and not protocol._buffer

    asyncio.run(check())


# --- the reply reader over arbitrary splits ---------------------------------------------


@dataclass
class _Pair:
    """A protocol on one end of a real socket pair (the other end is not used)."""

    protocol: _PipelinedReplies
    transport: asyncio.BaseTransport
    other: socket.socket


async def _connected_reader() -> _Pair:
    ours, other = socket.socketpair()
    loop = asyncio.get_running_loop()
    protocol = aiosmtplib.smtp.SMTPProtocol(loop=loop)
    transport, _ = await loop.create_connection(lambda: protocol, sock=ours)
    return _Pair(_PipelinedReplies.install(protocol), transport, other)


_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=40)
_reply = st.tuples(st.integers(200, 599), st.lists(_text.map(str.strip).filter(bool), min_size=1,
                                                    max_size=3))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(replies=st.lists(_reply, min_size=1, max_size=6), cuts=st.lists(st.integers(0, 400)),
       extra=st.binary(max_size=20).filter(lambda b: b"\n" not in b))
def test_reader_keeps_every_reply_in_order_whatever_the_split(
        replies: list[tuple[int, list[str]]], cuts: list[int], extra: bytes) -> None:
    stream = b"".join(
        b"".join(f"{code}{'-' if i < len(lines) - 1 else ' '}{line}\r\n".encode()
                 for i, line in enumerate(lines))
        for code, lines in replies) + extra
    points = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    chunks = [stream[a:b] for a, b in itertools.pairwise(points)]

    async def run() -> list[aiosmtplib.SMTPResponse]:
        pair = await _connected_reader()
        try:
            reader = pair.protocol
            reader.expect(len(replies))
            got = []
            for chunk in chunks:  # every chunk in first: the replies wait in the queue
                reader.data_received(chunk)
            for _ in replies:
                got.append(await reader.next_reply(5))
            return got
        finally:
            pair.transport.close()
            pair.other.close()

    got = asyncio.run(run())
    assert got == [aiosmtplib.SMTPResponse(code, "\n".join(lines)) for code, lines in replies]


def test_reader_waits_for_replies_arriving_one_piece_at_a_time() -> None:
    async def run() -> list[aiosmtplib.SMTPResponse]:
        pair = await _connected_reader()
        try:
            reader = pair.protocol
            reader.expect(3)
            stream = b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n354 go ahead\r\n"

            async def feed() -> None:
                for byte in stream:
                    await asyncio.sleep(0)
                    reader.data_received(bytes([byte]))

            feeding = asyncio.create_task(feed())
            got = [await reader.next_reply(5) for _ in range(3)]
            await feeding
            return got
        finally:
            pair.transport.close()
            pair.other.close()

    assert [r.code for r in asyncio.run(run())] == [250, 250, 354]


def test_reader_reports_a_lost_connection_and_a_malformed_reply() -> None:
    async def run() -> tuple[BaseException, BaseException]:
        pair = await _connected_reader()
        reader = pair.protocol
        reader.expect(3)
        reader.data_received(b"250 OK\r\nnot a reply\r\n")
        assert (await reader.next_reply(5)).code == 250
        with pytest.raises(aiosmtplib.SMTPResponseException) as malformed:
            await reader.next_reply(5)
        pair.transport.close()
        pair.other.close()
        pair2 = await _connected_reader()
        pair2.protocol.expect(2)
        pair2.other.close()  # the server side goes away
        with pytest.raises(aiosmtplib.SMTPServerDisconnected) as lost:
            await pair2.protocol.next_reply(5)
        pair2.transport.close()
        return malformed.value, lost.value

    malformed, lost = asyncio.run(run())
    assert "Malformed" in str(malformed)
    assert "EOF" in str(lost) or "lost" in str(lost).lower()


# --- aiosmtpd offering PIPELINING -------------------------------------------------------


class _PipeliningHandler:
    """aiosmtpd handler: offers PIPELINING, refuses some recipients, keeps each message."""

    def __init__(self, refuse: dict[str, str]) -> None:
        self.refuse = refuse
        self.received: list[tuple[str, list[str], bytes]] = []

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        if address.lower() in self.refuse:
            return self.refuse[address.lower()]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.received.append((envelope.mail_from or "", list(envelope.rcpt_tos),
                              envelope.original_content or b""))
        return "250 2.0.0 OK: queued"


@pytest.fixture
def aiosmtpd_pipelining() -> Iterator[tuple[SmtpConfig, _PipeliningHandler]]:
    handler = _PipeliningHandler({"gone@example.org": "550 5.1.1 No such user here",
                                  "later@example.org": "451 4.3.0 Try again later"})
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield SmtpConfig(host="127.0.0.1", port=controller.port, security="none",
                         sender=SENDER, timeout=10.0), handler
    finally:
        controller.stop()


def test_aiosmtpd_gets_every_message_over_pipelined_sessions(
        aiosmtpd_pipelining: tuple[SmtpConfig, _PipeliningHandler]) -> None:
    config, handler = aiosmtpd_pipelining

    async def run() -> list[dict[str, SendError]]:
        async with Mailer(config, connections=2, **QUICK) as mailer:
            answers = await asyncio.gather(*(
                mailer.send_bytes(_message(f"r{n}@example.org", n),
                                  recipients=[f"r{n}@example.org"]) for n in range(6)))
            assert all(isinstance(c.protocol, _PipelinedReplies) for c in mailer._idle)
            return list(answers)

    assert asyncio.run(run()) == [{}] * 6
    assert sorted(rcpts[0] for _, rcpts, _ in handler.received) == [
        f"r{n}@example.org" for n in range(6)]
    assert all(b"\r\n.dot line\r\n" in raw for _, _, raw in handler.received)


def test_aiosmtpd_refused_recipients_with_pipelining(
        aiosmtpd_pipelining: tuple[SmtpConfig, _PipeliningHandler]) -> None:
    """One refused of two: the other gets it. All refused: DATA's 503 is not a message sent,
    and the session (RSET after the group's replies) carries the next message."""
    config, handler = aiosmtpd_pipelining

    async def run() -> tuple[dict[str, SendError], SendError, dict[str, SendError], int]:
        async with Mailer(config, connections=1, **QUICK) as mailer:
            partial = await mailer.send_bytes(
                _message("ok@example.org"), recipients=["ok@example.org", "gone@example.org"])
            with pytest.raises(SendError) as refused:
                await mailer.send_bytes(_message("gone@example.org", 1),
                                        recipients=["gone@example.org"])
            after = await mailer.send_bytes(_message("next@example.org", 2),
                                            recipients=["next@example.org"])
            return partial, refused.value, after, mailer.connections

    partial, refused, after, connections = asyncio.run(run())
    assert list(partial) == ["gone@example.org"] and partial["gone@example.org"].kind
    assert refused.recipient == "gone@example.org" and "550" in str(refused)
    assert after == {}
    assert connections == 1  # the refusals did not cost the session
    assert [rcpts for _, rcpts, _ in handler.received] == [["ok@example.org"],
                                                          ["next@example.org"]]


# --- a scripted server ----------------------------------------------------------------


@dataclass
class _Script:
    """How the scripted server answers; what it saw."""

    reply: Callable[[str], str | None] = lambda line: None  # a command's reply (None: usual)
    split: bool = False  # write the replies of one read a byte at a time, with pauses
    pause: float = 0.0  # seconds before the replies of a read are written
    silent_at: str | None = None  # a command (verb) whose reply never comes
    drop_at: str | None = None  # a command (verb) at which the connection is closed
    message_pause: float = 0.0  # seconds before the reply to a message's end
    close_after: str | None = None  # a command (verb) after whose reply the server closes
    message_reply: str = "250 2.0.0 queued"  # the reply (lines) to a message's end
    pipelining: bool = True  # EHLO offers PIPELINING
    reads: list[bytes] = field(default_factory=list)  # each read of commands, as it came
    messages: list[bytes] = field(default_factory=list)
    connections: int = 0


class _Scripted(asyncio.Protocol):
    def __init__(self, script: _Script) -> None:
        self.script = script
        self.buffer = b""
        self.data: bytes | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.script.connections += 1
        transport.write(b"220 scripted ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        replies: list[str] = []
        if self.data is None:
            self.script.reads.append(data)
        self.buffer += data
        while True:
            if self.data is not None:
                end = self.buffer.find(b"\r\n.\r\n")
                if end < 0:
                    break
                self.script.messages.append(self.buffer[2:end + 2])
                self.buffer = self.buffer[end + 5:]
                self.data = None
                if self.script.message_pause:
                    assert self.transport is not None
                    asyncio.get_running_loop().call_later(
                        self.script.message_pause, self.transport.write,
                        b"250 2.0.0 queued\r\n")
                else:
                    replies.append(self.script.message_reply)
                continue
            if b"\r\n" not in self.buffer:
                break
            raw, self.buffer = self.buffer.split(b"\r\n", 1)
            line = raw.decode()
            verb = line.split(" ", 1)[0].upper()
            if verb == self.script.drop_at:
                self._send(replies)
                assert self.transport is not None
                self.transport.close()
                return
            if verb == self.script.silent_at:
                break
            answer = self.script.reply(line)
            if answer is None:
                ehlo = "250-scripted\r\n250-PIPELINING\r\n250 8BITMIME" \
                    if self.script.pipelining else "250-scripted\r\n250 8BITMIME"
                answer = {"EHLO": ehlo,
                          "DATA": "354 go ahead", "QUIT": "221 bye"}.get(verb, "250 OK")
            if verb == "DATA" and answer.startswith("354"):
                self.data = b""
                self.buffer = b"\r\n" + self.buffer
            replies.append(answer)
            if answer.startswith("421") or verb == self.script.close_after:
                self._send(replies)
                assert self.transport is not None
                self.transport.close()
                return
        self._send(replies)

    def _send(self, replies: list[str]) -> None:
        if not replies or self.transport is None:
            return
        out = "".join(f"{r}\r\n" for r in replies).encode()
        if not self.script.split and not self.script.pause:
            self.transport.write(out)
            return
        asyncio.get_running_loop().create_task(self._slowly(out))

    async def _slowly(self, out: bytes) -> None:
        await asyncio.sleep(self.script.pause)
        assert self.transport is not None
        if not self.script.split:
            self.transport.write(out)
            return
        for byte in out:
            if self.transport.is_closing():
                return
            self.transport.write(bytes([byte]))
            await asyncio.sleep(0.001)


async def _scripted(script: _Script, sending: Callable[[SmtpConfig], Any],
                    **config: Any) -> Any:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Scripted(script), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        settings_: dict[str, Any] = {"host": "127.0.0.1", "port": port, "security": "none",
                                     "sender": SENDER, "timeout": 5.0}
        settings_.update(config)
        return await sending(SmtpConfig(**settings_))
    finally:
        server.close()


def _send_n(n: int, recipients: Callable[[int], list[str]] | None = None
            ) -> Callable[[SmtpConfig], Any]:
    async def sending(config: SmtpConfig) -> list[dict[str, SendError] | SendError]:
        answers: list[dict[str, SendError] | SendError] = []
        async with Mailer(config, connections=1, **QUICK) as mailer:
            for i in range(n):
                targets = recipients(i) if recipients else [f"r{i}@example.org"]
                try:
                    answers.append(await mailer.send_bytes(_message(targets[0], i),
                                                           recipients=targets))
                except SendError as exc:
                    answers.append(exc)
        return answers
    return sending


def test_mail_rcpt_and_data_go_in_one_write_and_slow_split_replies_are_read() -> None:
    script = _Script(split=True, pause=0.05)
    answers = asyncio.run(_scripted(script, _send_n(2, lambda i: [f"a{i}@example.org",
                                                                 f"b{i}@example.org"])))
    assert answers == [{}, {}]
    groups = [read for read in script.reads if read.startswith(b"MAIL")]
    assert len(groups) == 2
    for read in groups:  # MAIL, both RCPTs and DATA in one segment; the message after 354
        assert re.fullmatch(rb"MAIL FROM:<digest@example.org>( [A-Z0-9=]+)*\r\n"
                            rb"RCPT TO:<a\d@example.org>\r\nRCPT TO:<b\d@example.org>\r\n"
                            rb"DATA\r\n", read), read
    assert len(script.messages) == 2 and b"\r\n..dot line" in script.messages[0]


def test_a_refused_recipient_among_pipelined_ones_and_all_refused() -> None:
    def reply(line: str) -> str | None:
        if line.startswith("RCPT") and "bad" in line:
            return "550 5.1.1 no such user"
        if line == "DATA" and script.refuse_data:
            return "554 5.5.1 no valid recipients"
        return None

    script = _Script(reply=reply)
    script.refuse_data = False  # type: ignore[attr-defined]

    async def sending(config: SmtpConfig) -> tuple[Any, ...]:
        async with Mailer(config, connections=1, **QUICK) as mailer:
            partial = await mailer.send_bytes(_message("x@example.org"),
                                              recipients=["ok@example.org", "bad@example.org"])
            script.refuse_data = True  # type: ignore[attr-defined]
            with pytest.raises(SendError) as refused:
                await mailer.send_bytes(_message("bad@example.org", 1),
                                        recipients=["bad@example.org"])
            script.refuse_data = False  # type: ignore[attr-defined]
            after = await mailer.send_bytes(_message("y@example.org", 2),
                                            recipients=["y@example.org"])
            return partial, refused.value, after, mailer.connections

    partial, refused, after, connections = asyncio.run(_scripted(script, sending))
    assert list(partial) == ["bad@example.org"]
    assert refused.kind in ("recipient", "deferred") and "550" in str(refused)
    assert after == {} and connections == 1
    assert len(script.messages) == 2  # the 554 to DATA was not taken for a message sent
    rset_reads = [read for read in script.reads if read.startswith(b"RSET")]
    assert len(rset_reads) == 1  # RSET after the refused group, once all its replies were read


def test_a_354_after_every_recipient_refused_gets_an_empty_message_then_rset() -> None:
    script = _Script(reply=lambda line: "550 5.1.1 no such user" if line.startswith("RCPT")
                     else None)
    answers = asyncio.run(_scripted(script, _send_n(2)))
    assert all(isinstance(a, SendError) for a in answers)
    assert script.messages == [b"", b""]  # the empty messages that ended the 354s
    assert script.connections == 1


@pytest.mark.parametrize("verb", ["MAIL", "RCPT", "DATA"])
def test_a_421_at_any_pipelined_command_ends_the_session_and_the_retry_delivers(
        verb: str) -> None:
    said: list[str] = []

    def reply(line: str) -> str | None:
        if line.startswith(verb) and verb not in said:
            said.append(verb)
            return "421 4.3.2 closing"
        return None

    script = _Script(reply=reply)
    answers = asyncio.run(_scripted(script, _send_n(1)))
    assert answers == [{}]
    assert script.connections == 2 and len(script.messages) == 1


def test_a_silent_server_times_out_as_a_session_failure() -> None:
    script = _Script(silent_at="RCPT")
    answers = asyncio.run(_scripted(script, _send_n(2), timeout=0.5))
    assert all(isinstance(a, SendError) and a.kind == "server" for a in answers)
    assert script.connections == 1  # the second send raised the held failure at once


def test_a_drop_in_the_group_on_a_fresh_session_is_the_message_after_a_first_drop() -> None:
    script = _Script(drop_at="DATA")
    answers = asyncio.run(_scripted(script, _send_n(1)))
    assert isinstance(answers[0], SendError) and answers[0].kind == "deferred"
    assert "DATA" in str(answers[0]) and script.messages == []


def test_the_message_reply_waits_data_timeout_and_written_is_set_meanwhile() -> None:
    states: list[bool] = []

    async def sending(config: SmtpConfig) -> Any:
        async with Mailer(config, connections=1, **QUICK) as mailer:
            task = asyncio.ensure_future(mailer.send_bytes(_message("w@example.org"),
                                                           recipients=["w@example.org"]))
            while not task.done():
                await asyncio.sleep(0.02)
                states.append(mailer.awaiting_reply(task))
            return await task

    # The message's reply comes after ``timeout`` but within ``data_timeout``.
    script = _Script(message_pause=0.8)
    answer = asyncio.run(_scripted(script, sending, timeout=0.4, data_timeout=5.0))
    assert answer == {}
    assert True in states and states[-1] is False
    assert len(script.messages) == 1


def test_a_refused_sender_then_a_closed_connection_is_the_refused_sender() -> None:
    """The MAIL reply read before the connection ended decides, as one command at a time:
    the sender refused (the settings), not a dropped session."""
    script = _Script(reply=lambda line: "553 5.7.1 sender address rejected"
                     if line.startswith("MAIL") else None, close_after="MAIL")
    answers = asyncio.run(_scripted(script, _send_n(2)))
    assert all(isinstance(a, SendError) and a.kind == "config" for a in answers)
    assert "refuses the sender" in str(answers[0])
    assert script.connections == 1  # held: the second send did not try again


def test_a_421_to_the_first_pipelined_mail_of_a_second_session_shrinks_the_pool() -> None:
    """A relay capping sessions per client may tell it at the first MAIL of the session
    beyond its cap (421): one session too many, not a deferred message, pipelined or not."""
    script = _Script()
    opened: list[_Scripted] = []

    def factory() -> _Scripted:
        protocol = _Scripted(script)
        number = len(opened) + 1
        opened.append(protocol)

        def reply(line: str) -> str | None:
            if line.startswith("MAIL") and number == 2:
                return "421 4.7.0 too many sessions from your host"
            return None

        protocol.script = dataclasses.replace(script, reply=reply)
        protocol.script.reads = script.reads
        protocol.script.messages = script.messages
        return protocol

    async def run() -> tuple[list[dict[str, SendError]], int]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            config = SmtpConfig(host="127.0.0.1", port=port, security="none", sender=SENDER,
                                timeout=5.0)
            async with Mailer(config, connections=2, **QUICK) as mailer:
                first = await mailer.send_bytes(_message("a@example.org"),
                                                recipients=["a@example.org"])
                rest = await asyncio.gather(*(
                    mailer.send_bytes(_message(f"r{n}@example.org", n),
                                      recipients=[f"r{n}@example.org"]) for n in range(1, 5)))
                return [first, *rest], mailer.pool_size
        finally:
            server.close()

    answers, pool = asyncio.run(run())
    assert answers == [{}] * 5
    assert pool == 1 and len(opened) == 2
    assert len(script.messages) == 5


# --- a server out of step: replies no command asked for, replies that are not SMTP ---------


@pytest.mark.parametrize("pipelining", [True, False])
def test_a_premature_reply_before_the_message_is_never_taken_for_its_reply(
        pipelining: bool) -> None:
    """A reply sent with DATA's 354 (before the message) would be read as the message's
    reply, and a 554 for the message as the next MAIL's: the session is closed instead,
    with the message unsent, and no message counts as sent that the server refused."""
    script = _Script(pipelining=pipelining, message_reply="554 5.6.0 rejected by filter",
                     reply=lambda line: "354 go ahead\r\n250 premature" if line == "DATA"
                     else None)
    answers = asyncio.run(_scripted(script, _send_n(2)))
    assert all(isinstance(a, SendError) for a in answers), answers
    for answer in answers:
        assert isinstance(answer, SendError)
        assert "sender" not in str(answer) and "\n" not in str(answer)
        assert answer.kind != "config"  # not blamed on [smtp] from
    assert script.messages == []  # never written: the session was out of step first


def test_an_extra_reply_after_a_message_closes_that_session_and_nothing_fails() -> None:
    """The second reply to a message's end would answer the next MAIL, and every later
    reply of the session would be one command late: the session is not reused."""
    script = _Script(message_reply="250 2.0.0 queued\r\n250 2.1.5 unsolicited extra")
    answers = asyncio.run(_scripted(script, _send_n(4)))
    assert answers == [{}, {}, {}, {}]
    assert len(script.messages) == 4 and script.connections == 4


@pytest.mark.parametrize("reply", ["2x0 what", "250" + "x" * 9000])
def test_a_reply_that_is_not_smtp_is_the_server_broken_not_the_message(reply: str) -> None:
    """A malformed or overlong reply is no refusal of the message: it is deferred, as a
    lost connection is, with a one-line reason that does not pass it off as the server's
    own code."""
    script = _Script(reply=lambda line: reply if line.startswith("RCPT") else None)
    answers = asyncio.run(_scripted(script, _send_n(1)))
    [answer] = answers
    assert isinstance(answer, SendError)
    assert answer.kind == "deferred", answer
    assert "rejected the message" not in str(answer) and "\n" not in str(answer)
    assert "not SMTP" in str(answer) and "-1" not in str(answer) and "500" not in str(answer)
