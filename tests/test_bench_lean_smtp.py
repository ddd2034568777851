"""The lean SMTP sink of ``digest bench dispatch --sink lean``: a correct SMTP receiver.

Real clients (aiosmtplib, smtplib) on loopback; the parser is also fed bytes
split at arbitrary places (hypothesis) over a real socket pair, through the
same ``data_received`` the transport calls.
"""

from __future__ import annotations

import asyncio
import itertools
import smtplib
import socket
from collections.abc import Iterator, Sequence
from email.message import EmailMessage

import aiosmtplib
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from digest.bench.lean_smtp import LeanSmtp, LeanSmtpThread, Recorder, header_value


class KeepingRecorder(Recorder):
    """A Recorder that also keeps each message, for the tests to compare bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.kept: list[tuple[list[str], bytes]] = []

    def record(self, recipients: list[str], message: bytes) -> None:
        self.kept.append((list(recipients), message))
        super().record(recipients, message)


@pytest.fixture
def sink() -> Iterator[LeanSmtpThread]:
    server = LeanSmtpThread(KeepingRecorder(), "127.0.0.1", 0)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _kept(server: LeanSmtpThread) -> list[tuple[list[str], bytes]]:
    recorder = server.recorder
    if not isinstance(recorder, KeepingRecorder):  # pragma: no cover - the fixture's
        raise TypeError("the fixture keeps messages")
    return recorder.kept


def _message(message_id: str, body: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = "digest@bench.example.org"
    message["To"] = "reader@bench.example.org"
    message["Subject"] = "Your papers"
    message["Message-ID"] = message_id
    message.set_content(body)
    return message


def test_aiosmtplib_delivers_dot_stuffed_lines_intact_and_counted(sink: LeanSmtpThread) -> None:
    body = "First line\n.\n.. two dots\n.leading dot\nlast"
    messages = [_message(f"<m{n}@bench.example.org>", body) for n in range(3)]

    async def send() -> None:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=sink.port, start_tls=False,
                                 use_tls=False, timeout=10)
        await client.connect()
        for n, message in enumerate(messages):
            await client.sendmail("digest@bench.example.org",
                                  [f"Reader{n}@bench.example.org", "copy@bench.example.org"],
                                  message.as_bytes())
        await client.quit()

    asyncio.run(send())
    kept = _kept(sink)
    assert [recipients for recipients, _ in kept] == [
        [f"Reader{n}@bench.example.org", "copy@bench.example.org"] for n in range(3)]
    for (_, received), sent in zip(kept, messages, strict=True):
        assert received == sent.as_bytes().replace(b"\n", b"\r\n")
        assert b"\r\n.. two dots\r\n.leading dot\r\n" in received
        assert b"\r\n.\r\n" in received  # the lone dot line is content, not the end
    snapshot = sink.recorder.snapshot()
    assert snapshot["counts"] == {"reader0@bench.example.org": 1, "reader1@bench.example.org": 1,
                                  "reader2@bench.example.org": 1, "copy@bench.example.org": 3}
    assert snapshot["message_ids"] == [f"<m{n}@bench.example.org>" for n in range(3)]
    assert snapshot["messages"] == 3 and snapshot["bytes"] == sum(len(m) for _, m in kept)
    sink.recorder.reset()
    assert sink.recorder.snapshot()["counts"] == {}


def test_smtplib_sees_the_extensions_and_the_sessions_rules(sink: LeanSmtpThread) -> None:
    with smtplib.SMTP("127.0.0.1", sink.port, timeout=10) as client:
        assert client.docmd("MAIL", "FROM:<a@example.org>")[0] == 503  # no EHLO yet
        code, _ = client.ehlo("client.example.org")
        assert code == 250
        for extension in ("pipelining", "8bitmime", "smtputf8"):
            assert client.has_extn(extension), extension
        assert int(client.esmtp_features["size"]) >= 1024 * 1024
        assert client.docmd("DATA")[0] == 503  # no MAIL
        assert client.docmd("RCPT", "TO:<b@example.org>")[0] == 503  # no MAIL
        assert client.noop()[0] == 250
        assert client.docmd("VRFY", "b@example.org")[0] == 500
        assert client.docmd("XYZZY")[0] == 500
        assert client.docmd("MAIL", "FROM:a@example.org")[0] == 501  # no angle brackets
        assert client.docmd("MAIL", "FROM:<a@example.org> SIZE=999999999999")[0] == 552
        assert client.docmd("MAIL", "FROM:<a@example.org> FROBNICATE")[0] == 555
        assert client.docmd("MAIL", "FROM:<a@example.org>")[0] == 250
        assert client.docmd("MAIL", "FROM:<a@example.org>")[0] == 503  # nested
        assert client.docmd("DATA")[0] == 503  # no RCPT
        assert client.docmd("RCPT", "TO:<>")[0] == 501
        assert client.docmd("RCPT", "TO:<dropped@example.org>")[0] == 250
        assert client.rset()[0] == 250  # forgets the sender and the recipient
        assert client.docmd("RCPT", "TO:<b@example.org>")[0] == 503
        # SMTPUTF8 and 8-bit bodies are accepted as they are.
        text = "Subject: Größe\r\nMessage-ID: <ü@example.org>\r\n\r\n.Ünïcode body\r\n"
        client.sendmail("a@example.org", ["ü@example.org"], text.encode("utf-8"),
                        mail_options=["SMTPUTF8", "BODY=8BITMIME"])
        client.sendmail("a@example.org", ["b@example.org"], b"Subject: empty body\r\n\r\n")
    kept = _kept(sink)
    assert kept == [(["ü@example.org"], text.encode("utf-8")),
                    (["b@example.org"], b"Subject: empty body\r\n\r\n")]
    assert sink.recorder.snapshot()["message_ids"] == ["<ü@example.org>", ""]


# --- the parser, fed bytes split anywhere ------------------------------------------------


def _stuffed(lines: Sequence[str]) -> bytes:
    """A body as a client puts it in DATA: each line dot-stuffed, CRLF, then "." CRLF."""
    return b"".join((b"." if line.startswith(".") else b"") + line.encode() + b"\r\n"
                    for line in lines) + b".\r\n"


def _session(messages: Sequence[Sequence[str]]) -> bytes:
    parts = [b"EHLO client.example.org\r\n"]
    for n, lines in enumerate(messages):
        parts.append(f"MAIL FROM:<digest@example.org>\r\nRCPT TO:<r{n}@example.org>\r\n"
                     "DATA\r\n".encode())
        parts.append(_stuffed(lines))
    parts.append(b"QUIT\r\n")
    return b"".join(parts)


def _feed(data: bytes, cuts: Sequence[int]) -> tuple[bytes, KeepingRecorder]:
    """Feed ``data`` split at ``cuts`` to a LeanSmtp on a real socket; its replies, its recorder."""
    recorder = KeepingRecorder()

    async def run() -> bytes:
        ours, theirs = socket.socketpair()
        with theirs:
            loop = asyncio.get_running_loop()
            transport, protocol = await loop.connect_accepted_socket(
                lambda: LeanSmtp(recorder, "sink.example.org"), ours)
            bounds = [0, *sorted({c for c in cuts if 0 < c < len(data)}), len(data)]
            for start, end in itertools.pairwise(bounds):
                protocol.data_received(data[start:end])
            if not transport.is_closing():
                transport.close()

            def read_all() -> bytes:
                theirs.settimeout(10)
                received = b""
                while chunk := theirs.recv(65536):
                    received += chunk
                return received

            return await loop.run_in_executor(None, read_all)

    return asyncio.run(run()), recorder


def _codes(replies: bytes) -> list[str]:
    """The code of each reply (the last line of a multi-line one)."""
    return [line[:3].decode() for line in replies.split(b"\r\n") if line[3:4] == b" "]


def _expected_codes(messages: int) -> list[str]:
    return ["220", "250", *(["250", "250", "354", "250"] * messages), "221"]


LINE = st.one_of(st.sampled_from(["", ".", "..", ".x", "x.", " . ", "Message-ID: <a@b>"]),
                 st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=st.lists(st.lists(LINE, max_size=8), min_size=1, max_size=3),
       cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=12))
def test_any_split_of_a_pipelined_session_gives_the_same_messages(
        messages: list[list[str]], cuts: list[int]) -> None:
    replies, recorder = _feed(_session(messages), cuts)
    assert _codes(replies) == _expected_codes(len(messages))
    assert recorder.kept == [([f"r{n}@example.org"],
                              b"".join(line.encode() + b"\r\n" for line in lines))
                             for n, lines in enumerate(messages)]


def test_the_end_of_data_split_at_every_byte() -> None:
    session = _session([["Message-ID: <x@example.org>", "", "body", ".", "..end"]])
    marker = session.index(b"\r\n.\r\nQUIT")
    for cut in range(marker - 1, marker + 6):
        replies, recorder = _feed(session, [cut])
        assert _codes(replies) == _expected_codes(1), cut
        assert recorder.kept == [(["r0@example.org"],
                                  b"Message-ID: <x@example.org>\r\n\r\nbody\r\n.\r\n..end\r\n")]
        assert recorder.message_ids == ["<x@example.org>"]


def test_a_message_over_the_size_limit_is_refused_and_the_session_goes_on() -> None:
    recorder = KeepingRecorder()
    big = [b"x" * 998] * 30
    session = (b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n" + b"\r\n".join(big)
               + b"\r\n.\r\nNOOP\r\nQUIT\r\n")

    async def run() -> bytes:
        ours, theirs = socket.socketpair()
        with theirs:
            loop = asyncio.get_running_loop()
            _, protocol = await loop.connect_accepted_socket(
                lambda: LeanSmtp(recorder, "sink", max_message=10_000), ours)
            for start in range(0, len(session), 1000):
                protocol.data_received(session[start:start + 1000])
            theirs.settimeout(10)
            received = b""
            while chunk := await loop.run_in_executor(None, theirs.recv, 65536):
                received += chunk
            return received

    replies = asyncio.run(run())
    assert _codes(replies) == ["220", "250", "250", "250", "354", "552", "250", "221"]
    assert recorder.kept == []


def test_an_overlong_command_line_is_answered_500_once() -> None:
    replies, _ = _feed(b"EHLO c\r\n" + b"NOOP " + b"a" * 5000 + b"\r\nNOOP\r\nQUIT\r\n",
                       [100, 3000])
    assert _codes(replies) == ["220", "250", "500", "250", "221"]


def test_header_value_unfolds_and_stops_at_the_body() -> None:
    message = (b"Subject: hi\r\nmessage-id:\r\n <folded@example.org>\r\nTo: x\r\n\r\n"
               b"Message-ID: <in-body@example.org>\r\n")
    assert header_value(message, b"Message-ID") == "<folded@example.org>"
    assert header_value(b"Subject: x\r\n\r\nMessage-ID: <b@c>\r\n", b"message-id") is None
