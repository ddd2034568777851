"""Send stage: delivers rendered messages over SMTP.

Runs after render, once per dispatch run: the caller opens one ``Mailer``,
hands it each rendered ``EmailMessage`` (``send``) or each claimed message's
bytes as they are (``send_bytes``), from one task or from many at once (a
small pool of SMTP sessions, ``[smtp] connections``), and learns, per
message, which recipients did not get it. It knows nothing of ranking or the
database.

What each answer means (``SendError.kind``):

* a 4xx reply is retried with exponential backoff (on whichever session is
  idle then; a 421 closes its session), then reported ``deferred``; a 421 to
  the first MAIL FROM of a session opened while others of ours were open is a
  cap on concurrent sessions instead: the pool shrinks (as for a 421 to EHLO)
  and the message goes on another session at once;
* a 5xx reply at RCPT is final for that recipient (``recipient``: the address
  bounces), except a refusal about relaying or login (530, 5.7.x "relay
  access denied") and the same 5xx (compared without the recipient's address
  or name in it), before any address was accepted, for first tries at
  ``SAME_REFUSAL_LIMIT`` different domains (or ``ONE_DOMAIN_REFUSAL_LIMIT``
  different recipients; always the latter for words about the address, such
  as "Unrouteable address" or 5.1.1 "User unknown"): those are ``config`` (the
  server's setup; nobody is marked). Before any address was accepted, the
  other 5xx replies are ``deferred`` with ``held_back`` set: the caller tries
  them once more after an address was accepted, and they are final then.
  A 5xx reply after DATA (552, 554) is final for that message only
  (``message``: the address is fine);
* a server that cannot be reached, stays silent until the timeout or drops the
  connection twice in a row for one message before its recipients (once is
  retried at once, on a new session) is ``server``: the mailer stops trying,
  and every later ``send`` of the run raises the same error at once, so a
  hanging server costs one timeout per run, not one per message;
* a message whose RCPT or DATA makes the server drop a newly opened session
  (it greeted and took MAIL FROM: the server works) after a first drop is
  ``deferred`` alone (a content filter failing on it): the others go on, and
  the caller tries it again at later dispatches; only ``DROP_LIMIT`` such
  messages in a row, none accepted in between, are the server's failure;
* login refused (535, 534), a TLS or greeting failure, or the sender address
  refused are ``config``: the settings must change, and the error says what to
  change (``port 465 usually means security = "tls"``, ``ca_file`` for a
  self-signed certificate, an app password for 535). Later sends raise it at
  once too: a provider locks an account after repeated bad logins.

``LocalSink`` is the demo's embedded mail server: it stores what it receives as
files, and the demo sends to it through the same ``Mailer`` as real mail.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import dataclasses
import email
import email.policy
import functools
import io
import logging
import re
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.generator import BytesGenerator
from email.message import EmailMessage, Message
from email.utils import getaddresses
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiosmtplib
import aiosmtplib.email
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import Envelope, Session
from aiosmtplib import SMTPStatus
from aiosmtplib.protocol import (
    COMMAND_INJECTION_REGEX,
    MAX_RESPONSE_LENGTH,
    SMTPProtocol,
    normalize_message_line_endings,
)

from .config import SmtpConfig
from .errors import ConfigError, SendError
from .render import EMAIL_POLICY

log = logging.getLogger(__name__)

DEFAULT_ATTEMPTS = 4  # one try and three retries: about 14 s of patience at the default delay
DEFAULT_BASE_DELAY = 2.0  # seconds before the first retry; doubles each time (2, 4, 8)
# The same 5xx at RCPT, before any address was accepted, for recipients at this many
# different domains is the server's setup (it takes no mail from us at all), not that many
# bad addresses: bad addresses that come first are mostly at one domain (a retired lab's,
# issue 13), while a relay that refuses everyone refuses every domain alike.
SAME_REFUSAL_LIMIT = 3
# ... or for this many different recipients whatever their domains: a group whose
# addresses all share one domain (a relay refusing it costs this many claimed digests,
# resent later, before the hold).
ONE_DOMAIN_REFUSAL_LIMIT = 10
RELAY_HINT = ("the server refuses to relay: set username and password_env (or password_file) "
              "under [smtp], or use a server that accepts mail from this host")
# A refusal about the sender's right to send (relaying, login), not about the address.
# This many different messages in a row, each dropping a fresh session at RCPT or DATA and
# none accepted in between, is a server that drops every message, not that many messages
# its filter fails on: above the deliveries a dispatch has in flight at once (two per
# session), so the claimed digests resent first cannot all be blamed on the server.
DROP_LIMIT = 10
_POLICY_REFUSAL = re.compile(
    r"relay|authenticat|auth(entication)? required|must (log ?in|authenticate)|sender "
    r"(address )?not (permitted|allowed)", re.IGNORECASE)


STOPPING = "the sender is stopping"  # an attempt not begun: ``Mailer.stop_starting``


@dataclass
class _Attempt:
    """The outcome of one try at delivering a message."""

    retry: list[str] = field(default_factory=list)  # recipients worth another try
    refused: dict[str, SendError] = field(default_factory=dict)  # recipients refused for good
    problem: str = ""  # why ``retry`` is not empty, for the log and the final error
    at_once: bool = False  # retry without waiting, on a new connection (this one was lost)
    broken: bool = False  # the session cannot carry another transaction: close it


class _Outgoing:
    """One message on its way: the envelope and its bytes for the server at hand.

    ``send`` builds the bytes from an ``EmailMessage`` (once per kind of server,
    7-bit or 8-bit); ``send_bytes`` hands over bytes already serialised, sent
    as they are unless the server takes no 8-bit data and they hold some.
    """

    def __init__(self, sender: str, recipients: list[str], utf8: bool, label: str,
                 build: Callable[[bool], bytes], *, evidence: bool = True) -> None:
        self.sender = sender
        # Its refusals may count toward the relay-refusal hold: a first try, not the resend
        # of a message refused before (issue 13: resends re-armed the hold every tick).
        self.evidence = evidence
        self.recipients = recipients
        self.utf8 = utf8  # MAIL FROM needs SMTPUTF8
        self.label = label  # the Message-ID, for the log
        self._build = build
        self._built: dict[bool, tuple[int, bytes]] = {}

    def wire(self, eight_bit: bool) -> tuple[int, bytes]:
        """For a server that does (or does not) offer 8BITMIME: the message's SIZE (RFC
        1870: its CRLF lines, before dot-stuffing) and the bytes written after DATA's 354
        (``data_transparent``), built once per kind of server, whatever the retries."""
        if eight_bit not in self._built:
            lines = crlf_lines(self._build(eight_bit))
            self._built[eight_bit] = (len(lines), _dot_stuffed(lines))
        return self._built[eight_bit]


# The aiosmtplib releases whose ``SMTPProtocol`` internals ``_PipelinedReplies`` builds on
# (``_buffer``, ``_read_response_from_buffer``, ``_response_waiter`` and what its
# ``data_received`` does with them); pyproject.toml allows the same range, and
# tests/test_mailer_pipelining.py fails loudly when the installed release leaves it.
AIOSMTPLIB_TESTED = ((5, 1), (5, 2))  # from 5.1 (inclusive) to 5.2 (exclusive)


# aiosmtplib's code for a reply it could not parse (malformed, overlong): no server said it.
NOT_SMTP = SMTPStatus.invalid_response.value


class _PipelinedReplies(SMTPProtocol):
    """aiosmtplib's protocol, able to read the replies to commands written together.

    aiosmtplib's ``data_received`` keeps one parsed reply at a time: bytes that
    arrive while a parsed reply waits to be picked up are dropped, and a second
    reply already in its buffer is only parsed when more bytes arrive. After
    ``expect(n)``, until n replies are parsed, every byte is kept and every
    complete reply parsed (with aiosmtplib's own parser), in order, into a
    queue that ``next_reply`` reads; then the protocol is aiosmtplib's again
    (the message's reply, RSET, QUIT are read by its ``read_response``).

    Installed on a connected session's protocol by changing its class
    (``install``): aiosmtplib builds the protocol itself, in
    ``SMTP._create_connection``, with no hook for a subclass.
    """

    _owed = 0  # replies expected and not parsed yet
    _replies: collections.deque[aiosmtplib.SMTPResponse]
    _waiter: asyncio.Future[None] | None = None  # ``next_reply`` waiting for a reply
    _ended: BaseException | None = None  # why no more replies will come (lost, malformed)

    @classmethod
    def install(cls, protocol: SMTPProtocol) -> _PipelinedReplies:
        """``protocol`` itself, from now on able to read pipelined replies."""
        if not isinstance(protocol, cls):
            protocol.__class__ = cls
            assert isinstance(protocol, cls)
            protocol._replies = collections.deque()
        return protocol

    def expect(self, count: int) -> None:
        """``count`` commands are about to be written together: keep their replies."""
        self._replies.clear()
        self._owed = count

    async def next_reply(self, timeout: float | None) -> aiosmtplib.SMTPResponse:
        """The next reply of the group, waiting up to ``timeout`` seconds for it.

        Raises ``SMTPReadTimeoutError``, ``SMTPServerDisconnected`` (the
        connection ended first) or the parser's ``SMTPResponseException`` (a
        malformed or overlong reply).
        """
        while not self._replies:
            if self._ended is not None:
                raise self._ended
            if self._owed <= 0:
                raise aiosmtplib.SMTPServerDisconnected("No reply expected")
            # A timer handle, not ``asyncio.wait_for`` (aiosmtplib's): a future and a
            # callback less per reply, on the dispatch's hot path.
            waiter = self._waiter = self._loop.create_future()
            timer = None if timeout is None else \
                self._loop.call_later(timeout, self._time_out, waiter)
            try:
                await waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
        return self._replies.popleft()

    @staticmethod
    def _time_out(waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            waiter.set_exception(aiosmtplib.SMTPReadTimeoutError(
                "Timed out waiting for server response"))

    def data_received(self, data: bytes) -> None:
        if self._owed <= 0:
            super().data_received(data)
            return
        self._buffer.extend(data)
        while self._owed > 0:
            try:
                reply = self._read_response_from_buffer()
            except aiosmtplib.SMTPResponseException as exc:  # malformed, or a line too long
                self._end(exc)
                return
            if reply is None:
                break
            self._owed -= 1
            self._replies.append(reply)
        if self._owed > 0 and len(self._buffer) > MAX_RESPONSE_LENGTH:
            self._end(aiosmtplib.SMTPResponseException(NOT_SMTP, "Response too long"))
            return
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._owed > 0:
            lost = aiosmtplib.SMTPServerDisconnected("Connection lost")
            lost.__cause__ = exc
            self._end(lost)
        super().connection_lost(exc)

    def eof_received(self) -> bool:
        if self._owed > 0:
            self._end(aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"))
        return super().eof_received()

    def _end(self, exc: BaseException) -> None:
        if self._ended is None:
            self._ended = exc
        self._owed = 0
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class _Session(aiosmtplib.SMTP):
    """aiosmtplib's client, remembering which command of the transaction is in flight.

    A drop at RCPT or DATA on a session that greeted and took MAIL FROM is about
    the message (a filter failing on it); a drop before that is about the server.
    """

    stage = ""  # "EHLO", "MAIL", "RCPT" or "DATA": the last command of the transaction
    # Opened while other sessions of ours were open, and no MAIL FROM taken on it yet: a 421
    # to its first MAIL is a relay's cap on concurrent sessions told late (``_attempt``).
    on_probation = False
    # The message is fully written (its closing "." sent) and its reply not read yet: a
    # stop waits for that reply rather than cancel it (the relay may be taking the message).
    written = False

    # MAIL and RCPT as aiosmtplib's own ``mail`` and ``rcpt`` send them (its ``quote_address``
    # checks and quotes the address; its ``execute_command`` sends and reads), less a parse
    # of the same address per message: ``quote_address`` runs the email package's address
    # parser, and the sender is the same for every message (``_quoted`` keeps its answers).
    # Called once EHLO was said (``Mailer._transaction`` says it first).

    async def mail(self, sender: str, /, *, options: Sequence[str] = (),  # type: ignore[override]
                   encoding: str = "ascii") -> aiosmtplib.SMTPResponse:
        self.stage = "MAIL"
        response = await self.execute_command(
            b"MAIL", b"FROM:" + _quoted(sender).encode(encoding),
            *(option.encode("ascii") for option in options))
        if response.code != 250:
            raise aiosmtplib.SMTPSenderRefused(response.code, response.message, sender)
        self.on_probation = False
        return response

    async def rcpt(self, recipient: str, /, *,  # type: ignore[override]
                   encoding: str = "ascii") -> aiosmtplib.SMTPResponse:
        self.stage = "RCPT"
        response = await self.execute_command(
            b"RCPT", b"TO:" + _quoted(recipient).encode(encoding))
        if response.code not in (250, 251):
            raise aiosmtplib.SMTPRecipientRefused(response.code, response.message, recipient)
        return response

    # Seconds to wait for the reply to the message's end: ``[smtp] data_timeout`` (never
    # shorter than ``timeout``), set by ``Mailer._open``; RFC 5321 4.5.3.2.6 gives it 10
    # minutes. The 354 to DATA itself waits ``timeout``, as every other command.
    data_timeout: float | None = None

    async def data_as_is(self, wire: bytes) -> aiosmtplib.SMTPResponse:
        """DATA, then ``wire`` written as it is: a message already in ``data_transparent``
        form (CRLF lines, leading dots doubled, the closing "." line).

        aiosmtplib's ``data`` would convert the line ends and stuff the dots of the
        same bytes again on every send and retry; this says DATA through its
        ``execute_command`` and writes the prepared bytes through its protocol's
        ``write`` and ``read_response``, as its ``data`` does. Raises what ``data``
        raises (``SMTPDataError`` for a reply other than 354 then 250; a timeout or
        a lost connection closes the session, as there).
        """
        self.stage = "DATA"
        start = await self.execute_command(b"DATA")
        if start.code != 354:
            raise aiosmtplib.SMTPDataError(start.code, start.message)
        return await self._message(wire)

    def out_of_step(self) -> bool:
        """Bytes of a reply no command asked for wait in the reader: the server answered
        more than it was asked (an extra or premature reply). Whatever the next command
        reads would be paired with the wrong reply, so the session must not carry on."""
        protocol = self.protocol
        return protocol is not None and bool(protocol._buffer)

    async def _message(self, wire: bytes) -> aiosmtplib.SMTPResponse:
        """After DATA's 354: ``wire`` written, and the reply to its end read (``written``
        meanwhile). Raises ``SMTPDataError`` for a reply other than 250; a timeout or a lost
        connection closes the session and raises, and so does a reply that came before
        the message was written (``out_of_step``: it would be read as the message's)."""
        protocol = self.protocol
        if protocol is None:  # closed by a 421 answer to DATA
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        if self.out_of_step():
            self.close()
            raise aiosmtplib.SMTPServerDisconnected(
                "the server sent a reply no command asked for, before the message; the "
                "session was closed with the message unsent")
        # The reply to the message's end gets ``data_timeout`` (RFC 5321 4.5.3.2.6).
        timeout = self.data_timeout if self.data_timeout is not None else self.timeout
        try:
            if isinstance(protocol, _PipelinedReplies):  # its reader is the cheaper one
                protocol.expect(1)
                protocol.write(wire)
                self.written = True
                response = await protocol.next_reply(timeout)
            else:
                protocol.write(wire)
                self.written = True
                response = await protocol.read_response(timeout=timeout)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
            self.close()  # a reply given up on would be paired with the next command
            raise
        except aiosmtplib.SMTPResponseException:
            if isinstance(protocol, _PipelinedReplies):
                self.close()  # a malformed reply: its reader reads no more (``next_reply``)
            raise
        finally:
            self.written = False
        if response.code != 250:
            raise aiosmtplib.SMTPDataError(response.code, response.message)
        return response


    async def pipelined(self, sender: str, recipients: list[str], *, options: Sequence[str],
                        encoding: str, wire: bytes) -> dict[str, aiosmtplib.SMTPResponse]:
        """MAIL FROM, a RCPT TO per recipient and DATA written in one go (RFC 2920
        PIPELINING, for a server whose EHLO offers it), their replies read in order, then
        ``wire`` after the 354 (as ``data_as_is`` writes it): two round trips per message
        instead of three plus one per recipient.

        Returns the refused recipients' replies. Raises what ``mail``, ``rcpt`` and
        ``data_as_is`` raise one command at a time, for the same replies:
        ``SMTPSenderRefused`` (MAIL), ``SMTPRecipientsRefused`` (every RCPT refused:
        DATA's reply, a 503 or 554, is not taken for a message sent), ``SMTPDataError``
        (DATA's reply or the message's), ``ValueError`` for an address that cannot be sent
        (before anything is written). A 421 ends the session where it comes; a timeout
        (``timeout`` per reply, ``data_timeout`` for the message's) or a lost connection
        closes it and raises. Every reply of the group is read before this returns or
        raises (else it would be paired with the next command, RSET); a 354 given to a
        DATA with nothing to deliver (MAIL or every RCPT refused) gets an empty message
        ended at once, so that the server reads the next command as a command.
        """
        protocol = self.protocol
        if protocol is None:
            raise aiosmtplib.SMTPServerDisconnected("Server not connected")
        lines = [b" ".join((b"MAIL", b"FROM:" + _quoted(sender).encode(encoding),
                            *(option.encode("ascii") for option in options)))]
        lines.extend(b"RCPT TO:" + _quoted(recipient).encode(encoding)
                     for recipient in recipients)
        lines.append(b"DATA")
        for line in lines:  # aiosmtplib's own check on each command it sends
            if COMMAND_INJECTION_REGEX.search(line):
                raise ValueError("Command arg contains a prohibited control character")
        reader = _PipelinedReplies.install(protocol)
        replies, cut = await self._group_replies(reader, lines)

        def missing() -> BaseException:
            # The replies are judged as the commands one at a time would have been: the
            # first one missing raises what ended the reading (a lost connection, a
            # timeout), or, after a 421, what a command on the closed session raises.
            return cut or aiosmtplib.SMTPServerDisconnected("Server not connected")

        self.stage = "MAIL"
        if not replies:
            raise missing()
        mail = replies[0]
        if mail.code != 250:
            raise aiosmtplib.SMTPSenderRefused(mail.code, mail.message, sender)
        self.on_probation = False
        self.stage = "RCPT"
        errors: dict[str, aiosmtplib.SMTPResponse] = {}
        refusals: list[aiosmtplib.SMTPRecipientRefused] = []
        for index, recipient in enumerate(recipients, start=1):
            if index >= len(replies):
                raise missing()
            reply = replies[index]
            if reply.code not in (250, 251):
                refusals.append(aiosmtplib.SMTPRecipientRefused(reply.code, reply.message,
                                                                recipient))
                errors[recipient] = reply
        if len(refusals) == len(recipients):
            raise aiosmtplib.SMTPRecipientsRefused(refusals)
        self.stage = "DATA"
        if len(replies) < len(lines):
            raise missing()
        start = replies[-1]
        if start.code != 354:
            raise aiosmtplib.SMTPDataError(start.code, start.message)
        await self._message(wire)
        return errors

    async def _group_replies(self, reader: _PipelinedReplies, lines: list[bytes]
                             ) -> tuple[list[aiosmtplib.SMTPResponse], BaseException | None]:
        """Write ``lines`` (MAIL, RCPTs, DATA) at once and read their replies, in order.

        Returns the replies and, when they are not all there, why: None after a
        421 (the server closes the session), else the lost connection, timeout or
        malformed reply that ended the reading. The session is closed in both
        cases: a reply given up on would be paired with the next command. The
        replies read before still count (a refused MAIL, then the connection
        closed, is a refused MAIL). ``stage`` follows the reply awaited.
        """
        replies: list[aiosmtplib.SMTPResponse] = []
        self.stage = "MAIL"
        try:
            reader.expect(len(lines))
            reader.write(b"\r\n".join(lines) + b"\r\n")
            for index in range(len(lines)):
                self.stage = "MAIL" if index == 0 else "DATA" if index == len(lines) - 1 \
                    else "RCPT"
                reply = await reader.next_reply(self.timeout)
                replies.append(reply)
                if reply.code == 421:  # the server is closing: nothing more comes
                    self.close()
                    return replies, None
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError,
                aiosmtplib.SMTPResponseException) as exc:
            self.close()
            return replies, exc
        if replies[-1].code == 354 and (replies[0].code != 250 or all(
                r.code not in (250, 251) for r in replies[1:-1])):
            # DATA taken with nothing to deliver: an empty message ends it, its reply
            # ignored, so that the next command (RSET) is read as a command.
            try:
                reader.write(b".\r\n")
                await reader.read_response(timeout=self.timeout)
            except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError,
                    aiosmtplib.SMTPResponseException):
                self.close()
        return replies, None


# A plain addr-spec (RFC 5322 dot-atoms, no quotes, comments, spaces or angle brackets): the
# email package's parser returns it unchanged and aiosmtplib's check passes it, so its quoted
# form is ``<address>`` (tests/test_mailer_pool.py checks this against aiosmtplib).
_PLAIN_ADDRESS = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*")


def _quoted(address: str) -> str:
    """aiosmtplib's ``<address>`` for a command line (raises its ValueError for an address
    that cannot be sent safely): a plain address as it is, any other parsed by aiosmtplib's
    ``quote_address`` (the email package's parser is slow: ``_parsed_quoted`` keeps a few)."""
    if _PLAIN_ADDRESS.fullmatch(address):
        return f"<{address}>"
    return _parsed_quoted(address)


# Only the addresses that are not plain are kept: the sender, which every message names, and
# the rare recipient with a quoted or non-ASCII local part. Keeping every recipient's answer
# (one entry per subscriber, ~250 bytes each, up to 65,536 of them) made a dispatch's memory
# grow with the subscriber list, for a regular-expression match that costs about a
# microsecond per message; a subscriber's address is used once per dispatch anyway.
@functools.lru_cache(maxsize=256)
def _parsed_quoted(address: str) -> str:
    return aiosmtplib.email.quote_address(address)


class _Crowded(Exception):
    """The server refused one more session while others of ours are open (a cap per client)."""


class Mailer:
    """Delivers messages over a small pool of reused SMTP sessions.

    ``async with Mailer(smtp) as mailer: await mailer.send(message)``. Up to
    ``connections`` asyncio tasks may send at once: each send takes an idle
    session, or opens one while fewer than ``connections`` are open (opened
    lazily, on the first send that finds none idle), and hands it back when its
    transaction is over. A session that failed (dropped, 421, timed out) is
    closed, never reused. Until one login has succeeded, sessions are opened
    one at a time, so a wrong password costs one refused login, not
    ``connections``. A server that refuses one more session (a 4xx greeting,
    a 421 to EHLO after its greeting, a close or silence until the timeout
    before the greeting, or a 421 to the first MAIL FROM of a session opened
    while others were) while others of ours are open caps its clients: the
    pool shrinks to the sessions it took (``pool_size``), logged once when the
    opens in flight have settled, and nothing fails. ``close`` (or leaving the ``async with``) says QUIT on
    every idle session. After a ``server`` or ``config`` failure,
    ``unavailable`` holds the error (set and logged once) and every later
    ``send``, and every send waiting for a session, raises it without
    touching the network.
    """

    def __init__(
        self,
        smtp: SmtpConfig,
        *,
        password: str | None = None,
        attempts: int = DEFAULT_ATTEMPTS,
        base_delay: float = DEFAULT_BASE_DELAY,
        connections: int | None = None,
    ) -> None:
        """``connections``: sessions open at once, at most (default ``smtp.connections``).

        Raises ``ValueError`` for ``attempts`` or ``connections`` below 1 or an
        unknown ``smtp.security``.
        """
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {attempts}")
        if smtp.security not in ("starttls", "tls", "none"):
            raise ValueError(f'security must be "starttls", "tls" or "none", got {smtp.security!r}')
        size = smtp.connections if connections is None else connections
        if size < 1:
            raise ValueError(f"connections must be at least 1, got {size}")
        self.smtp = smtp
        self.attempts = attempts
        self.base_delay = base_delay
        self.pool_size = size
        self.connections = 0  # how many connections this mailer has opened
        self.unavailable: SendError | None = None  # the session failure that ended this run
        self._password = password
        self._idle: list[_Session] = []  # open sessions no send is using
        self._slots = asyncio.Semaphore(size)  # one per session in use: at most ``size`` open
        self._withheld = 0  # slots kept, not released, when the pool shrank by more than one
        self._connecting = 0  # sessions being opened now
        self._turned_away: list[str] = []  # refusals of one more session, not yet logged
        self._dropped_streak = 0  # messages in a row that dropped a fresh session (DROP_LIMIT)
        self._opening = asyncio.Lock()  # opens one at a time until a login has succeeded
        self._proven = False  # a session was opened (and logged in) successfully
        self._open_count = 0  # sessions open now, idle or in use
        self._accepted = False  # some address was accepted on this mailer: 5xx at RCPT is final
        self._first_refusals: dict[str, str] = {}  # recipient -> 5xx reply, before any accept
        self._stopping = False  # ``stop_starting`` was called: no attempt begins any more
        # The sends with a session in hand (a transaction under way), by their task.
        self._in_attempt: dict[asyncio.Task[Any], _Session] = {}

    @functools.cached_property
    def where(self) -> str:
        return f"{self.smtp.host}:{self.smtp.port}"

    @functools.cached_property
    def default_sender(self) -> str:
        """The envelope sender ``send_bytes`` uses: the address of ``[smtp] from``.

        Parsed once per mailer (the settings do not change during its run), not
        once per message.
        """
        return getaddresses([self.smtp.sender])[0][1]

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def send(self, message: EmailMessage | Message) -> dict[str, SendError]:
        """Deliver ``message`` to every address in its To, Cc and Bcc headers.

        Returns the recipients that did not get it while others did (empty when
        all did), so a caller never resends to those who have it. Raises
        ``SendError`` when no recipient got it; its ``kind`` says why (see the
        module docstring). The envelope sender is the Sender header, else From;
        Bcc headers are not sent.
        """
        recipients = envelope_recipients(message)
        if not recipients:
            raise SendError("(no recipient)", "the message has no To, Cc or Bcc address",
                            kind="message")
        if self.unavailable is not None:
            raise self.unavailable
        try:
            sender = envelope_sender(message)
        except ValueError as exc:
            raise _combined(_refuse_all(recipients, str(exc), kind="message", cause=exc)) from exc
        utf8 = not all(address.isascii() for address in [sender, *recipients])

        def build(eight_bit: bool) -> bytes:
            return wire_format(message, utf8=utf8, eight_bit=eight_bit)

        label = str(message.get("Message-ID", "(no Message-ID)"))
        return await self._deliver(_Outgoing(sender, recipients, utf8, label, build))

    async def send_bytes(self, data: bytes, *, recipients: Sequence[str],
                         sender: str | None = None, smtputf8: bool = False,
                         label: str | None = None,
                         tried_before: bool = False) -> dict[str, SendError]:
        """Deliver a message already serialised (a claimed digest) as it is.

        ``data``: the whole message, headers and body, CRLF or LF lines (sent as
        CRLF), without Bcc headers: nothing is parsed or serialised again,
        unless the server offers no 8BITMIME and ``data`` holds 8-bit bytes
        (then it is parsed and sent as 7-bit MIME, as ``send`` would).
        ``recipients``: the envelope recipients; ``sender``: the envelope
        sender (default: the address of ``[smtp] from``). ``smtputf8``: the
        message needs SMTPUTF8 (UTF-8 headers or a non-ASCII address); the
        server must offer it, else the message fails alone (kind ``message``),
        as does a non-ASCII address without ``smtputf8``. ``label``: the
        message's Message-ID for the log (default: read from ``data``'s header).
        ``tried_before``: a resend of a message refused or deferred before; a
        refusal of it is no new evidence that the server refuses everyone.

        Returns and raises as ``send`` does (``SendError`` by kind).
        """
        targets = _unique(recipients)
        if not targets:
            raise SendError("(no recipient)", "no envelope recipient given", kind="message")
        if self.unavailable is not None:
            raise self.unavailable
        envelope_from = self.default_sender if sender is None else sender
        if not smtputf8 and not all(a.isascii() for a in [envelope_from, *targets]):
            problem = ValueError("a non-ASCII address needs SMTPUTF8: send it with smtputf8=True")
            raise _combined(_refuse_all(targets, str(problem), kind="message", cause=problem))

        def build(eight_bit: bool) -> bytes:
            if eight_bit or data.isascii():
                return data
            # A 7-bit server: the 8-bit parts must be re-encoded (base64 or quoted-printable).
            parsed = email.message_from_bytes(data, policy=email.policy.default)
            return wire_format(parsed, utf8=smtputf8, eight_bit=False)

        outgoing = _Outgoing(envelope_from, targets, smtputf8,
                             _message_id(data) if label is None else label, build,
                             evidence=not tried_before)
        return await self._deliver(outgoing)

    async def check_login(self) -> str:
        """Connect, say EHLO, STARTTLS and log in as configured, then QUIT.

        Returns what the server offered (for ``check-config --connect``);
        raises ``SendError`` (kind ``server`` or ``config``, naming the fix).
        """
        await self._slots.acquire()
        try:
            client = await self._session(fresh=True)
            try:
                if client.last_ehlo_response is None:  # no login, no STARTTLS: no EHLO yet
                    await client.ehlo()
            except (aiosmtplib.SMTPException, OSError) as exc:
                self._discard(client)
                raise self._session_failure(exc) from exc
            offered = " ".join(sorted(client.esmtp_extensions)) or "no extensions"
            tls = "TLS" if client.get_transport_info("sslcontext") is not None else "no TLS"
            self._idle.append(client)
        finally:
            self._release_slot()
        await self.close()
        return f"{tls}; offers {offered}"

    async def close(self) -> None:
        """Say QUIT on every idle session and close it (call it when no send is in flight)."""
        idle, self._idle = self._idle, []
        self._open_count -= len(idle)
        await asyncio.gather(*(self._quit(client) for client in idle))

    def stop_starting(self) -> None:
        """A stop (SIGTERM): from now on no transaction begins.

        A send waiting for a session, or between two attempts, gives up its
        recipients as ``deferred`` ("not tried: stopping") instead of starting
        one; the transactions under way go on (``awaiting_reply`` tells which
        have written their message whole).
        """
        self._stopping = True

    def in_attempt(self, task: asyncio.Task[Any]) -> bool:
        """Whether ``task`` (a send's task) has a session and a transaction under way."""
        return task in self._in_attempt

    def awaiting_reply(self, task: asyncio.Task[Any]) -> bool:
        """Whether ``task``'s message is written whole (the closing "." sent) and the server's
        reply to it not read yet: cancelling it then may leave a message the relay took
        unrecorded (a second copy on the resend)."""
        client = self._in_attempt.get(task)
        return client is not None and client.written

    async def _quit(self, client: _Session) -> None:
        if client.is_connected:
            try:
                await client.quit()
            except (aiosmtplib.SMTPException, OSError) as exc:
                log.debug("smtp %s: QUIT failed: %s", self.where, exc)
        client.close()

    async def _deliver(self, outgoing: _Outgoing) -> dict[str, SendError]:
        """Try, and retry with backoff, until every recipient is delivered or refused.

        No session is held while waiting to retry: the others keep sending.
        """
        refused: dict[str, SendError] = {}
        pending = outgoing.recipients
        attempt = 0
        fresh = False
        last = ""  # why the last attempt left recipients to retry
        while pending:
            if self._stopping:  # a stop: no new attempt (the digest stays claimed)
                problem = "not sent: the sender is stopping"
                if last:
                    problem = f"{last}; not tried again: the sender is stopping"
                for recipient in pending:
                    refused[recipient] = SendError(recipient, problem, kind="deferred")
                break
            attempt += 1
            outcome = await self._try_once(outgoing, pending, fresh=fresh)
            refused.update(outcome.refused)
            pending = outcome.retry
            last = "" if outcome.problem == STOPPING else outcome.problem
            if not pending:
                break
            if self._stopping:
                continue  # given up above, without the wait for a retry
            if attempt >= self.attempts:
                for recipient in pending:
                    refused[recipient] = SendError(
                        recipient, f"gave up after {attempt} attempts: {outcome.problem}",
                        kind="deferred")
                break
            fresh = outcome.at_once
            if fresh:
                continue
            delay = self.base_delay * 2 ** (attempt - 1)
            log.warning("smtp %s: %s (attempt %d of %d); retrying in %.3g s", self.where,
                        outcome.problem, attempt, self.attempts, delay)
            await asyncio.sleep(delay)
        for recipient, error in refused.items():
            log.warning("smtp %s: not delivered to %s: %s", self.where, recipient,
                        _reason(error))
        if len(refused) == len(outgoing.recipients):
            raise _combined(refused)
        if log.isEnabledFor(logging.INFO):
            delivered = [r for r in outgoing.recipients if r not in refused]
            log.info("smtp %s: delivered %s to %s", self.where, outgoing.label,
                     ", ".join(delivered))
        return refused

    async def _try_once(self, outgoing: _Outgoing, recipients: list[str], *,
                        fresh: bool) -> _Attempt:
        """One try on a session of the pool: take one, run one transaction, hand it back.

        ``fresh``: on a newly opened session (the last one was lost mid-way; an
        idle one may have been lost the same way). Raises the session's
        ``SendError`` (and keeps it in ``unavailable``) when the server cannot
        be used at all.
        """
        while True:
            await self._slots.acquire()
            if self._stopping:  # stopped while waiting for a session: nothing begins
                self._release_slot()
                return _Attempt(retry=list(recipients), problem=STOPPING)
            try:
                client = await self._session(fresh=fresh)
            except _Crowded as exc:
                if not self._shrink(exc):  # the pool is the sessions open already
                    self._release_slot()
                # else this slot stays taken: one session fewer from now on
                fresh = False  # the sessions still open are what there is
                continue
            except BaseException:
                self._release_slot()
                raise
            task = asyncio.current_task()
            if task is not None:
                self._in_attempt[task] = client
            try:
                outcome = await self._attempt(client, outgoing, recipients, fresh=fresh)
            except _Crowded as exc:  # a cap told at MAIL: as at the greeting or EHLO
                self._discard(client)
                if not self._shrink(exc):
                    self._release_slot()
                fresh = False
                continue
            except BaseException:
                self._discard(client)  # failed or cancelled mid-way: never reused
                self._release_slot()
                raise
            finally:
                if task is not None:
                    self._in_attempt.pop(task, None)
            self._release_slot()
            if outcome.broken or not client.is_connected or client.out_of_step():
                self._discard(client)  # out of step: the next command would read a stale reply
            else:
                self._idle.append(client)
            return outcome

    def _shrink(self, crowded: _Crowded) -> bool:
        """The server caps how many sessions one client may open: use as many as it took.

        The pool becomes the sessions open now plus those still being opened
        (each of which shrinks it again if refused), never fewer than the
        sessions open: those the server took are the pool, however many
        refusals arrive (issue 13: with the slots of an earlier shrink not yet
        handed back, later refusals used to shrink it below them, and a 421
        greeting on a pool of one was read as an outage). True when it shrank:
        the caller keeps its slot (one place fewer) and the slots beyond that
        are kept as they are handed back; False when the pool already is the
        sessions open (the caller hands its slot back and waits for one of
        them). Logged once the opens in flight settle.
        """
        size = max(1, self._open_count,
                   min(self.pool_size - 1, self._open_count + self._connecting))
        self._turned_away.append(str(crowded))
        if size >= self.pool_size:
            self._report_shrink()
            return False
        self._withheld += self.pool_size - 1 - size
        self.pool_size = size
        self._report_shrink()
        return True

    def _report_shrink(self) -> None:
        """One warning for the refusals of a burst of opens, with the pool size they left."""
        if not self._turned_away or self._connecting:
            return
        refused, self._turned_away = self._turned_away, []
        log.warning("smtp %s: the server refused %d more session(s) beyond the %d of ours it "
                    "took (%s); sending over %d from now on (lower [smtp] connections)",
                    self.where, len(refused), self.pool_size, refused[-1], self.pool_size)

    def _release_slot(self) -> None:
        """Hand a slot back, unless the pool shrank and this slot is one it gave up."""
        if self._withheld:
            self._withheld -= 1
        else:
            self._slots.release()

    def _discard(self, client: _Session) -> None:
        """Close a session of the pool without a QUIT (it failed), freeing its place."""
        client.close()
        self._open_count -= 1

    async def _attempt(self, client: _Session, outgoing: _Outgoing,
                       recipients: list[str], *, fresh: bool) -> _Attempt:
        """One mail transaction on ``client``, its replies sorted out (see the module docstring)."""
        try:
            errors = await self._transaction(client, outgoing, recipients)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            errors = {e.recipient: aiosmtplib.SMTPResponse(e.code, e.message)
                      for e in exc.recipients}
        except aiosmtplib.SMTPSenderRefused as exc:
            if exc.code == 421 and client.on_probation:
                # A relay capping concurrent sessions may greet and answer EHLO, and tell
                # its cap only at the first MAIL FROM of a session beyond it (421, closing
                # it): one session too many, not a deferred message (issue 13 review).
                raise _Crowded(_describe(exc)) from exc
            if 400 <= exc.code < 500:
                return _Attempt(retry=list(recipients), problem=_describe(exc),
                                broken=exc.code == 421)
            if _policy_refusal(exc.code, exc.message):
                raise self._hold(SendError(
                    self.where, f"{RELAY_HINT} ({_describe(exc)})", kind="config")) from exc
            raise self._hold(SendError(
                self.where, f"the server refuses the sender {exc.sender} ({_describe(exc)}): "
                "[smtp] from must be an address this account may send as", kind="config")
            ) from exc
        except aiosmtplib.SMTPResponseException as exc:
            if exc.code == NOT_SMTP:
                # A malformed or overlong reply (aiosmtplib's code, no server's): the server
                # is broken or out of step, not this message. As a lost connection: closed,
                # and the message tried again on another session.
                client.close()
                return self._lost(client, recipients, exc, fresh=fresh)
            if 400 <= exc.code < 500:
                # 421: the server is closing this session; the retry takes another.
                return _Attempt(retry=list(recipients), problem=_describe(exc),
                                broken=exc.code == 421)
            # 5xx after DATA (552 too big, 554 rejected) or to RSET: this message, not the
            # address, and not the others.
            return _Attempt(refused=_refuse_all(
                recipients, f"the server rejected the message ({_describe(exc)})",
                kind="message", cause=exc))
        except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as exc:
            return self._lost(client, recipients, exc, fresh=fresh)
        except (aiosmtplib.SMTPTimeoutError, TimeoutError) as exc:
            raise self._session_failure(exc) from exc
        except (aiosmtplib.SMTPException, ValueError) as exc:  # no SMTPUTF8, a bad address
            return _Attempt(refused=_refuse_all(recipients, _describe(exc), kind="message",
                                                cause=exc))
        else:
            self._dropped_streak = 0  # the server took a message: it is not dropping them all
        return self._judge_refusals(recipients, errors, evidence=outgoing.evidence)

    def _lost(self, client: _Session, recipients: list[str], exc: Exception, *,
              fresh: bool) -> _Attempt:
        """The session ended under a transaction (lost, or closed as out of step)."""
        if not fresh:  # an idle connection closed, a restart: once, at once, on a new one
            return _Attempt(retry=list(recipients), problem=_describe(exc), at_once=True,
                            broken=True)
        if client.stage in ("RCPT", "DATA"):  # a new session got this far: the message
            return self._dropped_twice(recipients, client.stage, exc)
        raise self._session_failure(exc) from exc  # a new session lost too: the server

    def _dropped_twice(self, recipients: list[str], stage: str,
                       exc: BaseException) -> _Attempt:
        """A message that made two sessions drop, the second a new one, at its RCPT or DATA.

        The new session greeted and took MAIL FROM, so the server works: the
        message fails alone, ``deferred`` (tried again at the next dispatch),
        unless ``DROP_LIMIT`` messages in a row did so with none accepted in
        between (then raises the ``server`` failure, held for the run).
        """
        self._dropped_streak += 1
        if self._dropped_streak >= DROP_LIMIT:
            raise self._hold(SendError(
                self.where, f"the server dropped the connection at {stage} for "
                f"{self._dropped_streak} different messages in a row and took none in between "
                f"({_describe(exc)}); the rest waits for the next dispatch", kind="server")
            ) from exc
        problem = (f"the server dropped the connection at {stage} for this message twice, "
                   f"the second time on a new session ({_describe(exc)}), while it takes "
                   "sessions (a filter failing on this message?); tried again at the next "
                   "dispatch")
        return _Attempt(refused=_refuse_all(recipients, problem, kind="deferred", cause=exc),
                        broken=True)

    def _judge_refusals(self, recipients: list[str],
                        errors: dict[str, aiosmtplib.SMTPResponse], *,
                        evidence: bool) -> _Attempt:
        """Sort RCPT refusals, telling the server's setup from bad addresses.

        A 5.7.x/530 refusal about relaying or login is a configuration error
        (raised, held: nobody is marked bouncing). Before any address was
        accepted, a 5xx not about the address (5.1.x, "unrouteable", "no such
        user") is held back as ``deferred`` with ``held_back`` set (the caller
        tries it once more after an address was accepted; it is final then),
        until the same reply came for first tries (``evidence``) at
        ``SAME_REFUSAL_LIMIT`` different domains or for
        ``ONE_DOMAIN_REFUSAL_LIMIT`` different recipients: then the server
        refuses everyone (a configuration error). Resends (``evidence``
        False) never count: the same refused digests cannot arm it again.
        """
        for recipient, response in errors.items():
            if response.code >= 500 and _policy_refusal(response.code, response.message):
                raise self._hold(SendError(
                    self.where, f"{RELAY_HINT} ({response.code} {response.message})",
                    kind="config"))
        if any(r not in errors for r in recipients):
            self._accepted = True
        outcome = _sort_refusals(errors)
        if self._accepted:
            return outcome
        for recipient in list(outcome.refused):
            response = errors[recipient]
            reply = f"{response.code} {response.message}"
            # Words about the address ("Unrouteable address", 5.1.1 "User unknown") need
            # more recipients than other refusals before they count as the server's setup:
            # a few bad addresses at the top of the list are common, a relay answering that
            # for ten different recipients and no accepted one is not (Exim says it when it
            # cannot route at all).
            mailbox = _mailbox_refusal(response.message)
            if evidence:
                shape = _refusal_shape(reply, recipient)
                self._first_refusals.setdefault(recipient.lower(), shape)
                same = [r for r, text in self._first_refusals.items() if text == shape]
                domains = {r.rpartition("@")[2] for r in same}
                if (len(domains) >= SAME_REFUSAL_LIMIT and not mailbox) or \
                        len(same) >= ONE_DOMAIN_REFUSAL_LIMIT:
                    raise self._hold(SendError(
                        self.where, f"the server refused the first {len(same)} different "
                        f"recipients ({len(domains)} domain(s)) with the same answer ({reply}) "
                        f"and accepted none: that is its setup, not the addresses; "
                        f"{RELAY_HINT}", kind="config"))
            # Not retried at once (it would be refused again): once an address was accepted.
            outcome.refused[recipient] = SendError(
                recipient, f"refused ({reply}); not blamed on the address yet (the server "
                "accepted no address so far; tried again once it has)", kind="deferred",
                held_back=True)
        return outcome

    async def _transaction(
        self, client: _Session, outgoing: _Outgoing, recipients: list[str]
    ) -> dict[str, aiosmtplib.SMTPResponse]:
        """MAIL, RCPT and DATA for one message; returns the refused recipients' replies."""
        client.stage = "EHLO"
        if client.is_ehlo_or_helo_needed:
            # Without TLS or a login, connect() sent no EHLO: the extensions are not known yet.
            try:
                await client.ehlo()
            except aiosmtplib.SMTPHeloError:
                await client.helo()  # an old server: no extensions at all
        options: list[str] = []
        if outgoing.utf8:
            if not client.supports_extension("smtputf8"):
                raise aiosmtplib.SMTPNotSupported(
                    "a non-ASCII address needs SMTPUTF8, which the server does not offer")
            options.append("SMTPUTF8")
        eight_bit = client.supports_extension("8bitmime")
        if eight_bit:
            options.append("BODY=8BITMIME")
        size, wire = outgoing.wire(eight_bit)
        if client.supports_extension("size"):
            # RFC 1870: the octets as DATA carries them (CRLF lines), before dot-stuffing.
            options.insert(0, f"SIZE={size}")
        encoding = "utf-8" if outgoing.utf8 else "ascii"
        # MAIL, RCPT and DATA as aiosmtplib's ``sendmail`` runs them, less its passes over
        # the whole message (to count its SIZE, to convert line ends and stuff dots): the
        # DATA bytes are prepared once (``_Outgoing.wire``). A refusal or a bad address after
        # MAIL resets the envelope, as ``sendmail`` does, so the session can carry the next.
        try:
            if client.supports_extension("pipelining"):
                return await client.pipelined(outgoing.sender, recipients, options=options,
                                              encoding=encoding, wire=wire)
            await client.mail(outgoing.sender, options=options, encoding=encoding)
            errors: dict[str, aiosmtplib.SMTPResponse] = {}
            refusals: list[aiosmtplib.SMTPRecipientRefused] = []
            for recipient in recipients:
                try:
                    await client.rcpt(recipient, encoding=encoding)
                except aiosmtplib.SMTPRecipientRefused as exc:
                    refusals.append(exc)
                    errors[exc.recipient] = aiosmtplib.SMTPResponse(exc.code, exc.message)
            if len(refusals) == len(recipients):
                raise aiosmtplib.SMTPRecipientsRefused(refusals)
            await client.data_as_is(wire)
        except (aiosmtplib.SMTPResponseException, aiosmtplib.SMTPRecipientsRefused,
                ValueError):
            await _reset(client)
            raise
        return errors

    async def _session(self, *, fresh: bool) -> _Session:
        """An idle session of the pool (unless ``fresh``), else a newly opened one.

        The caller holds a slot, so at most ``pool_size`` sessions are open.
        Raises ``unavailable`` once it is set, and the session's ``SendError``
        when one cannot be opened.
        """
        if self.unavailable is not None:
            raise self.unavailable
        if not fresh and (client := self._take_idle()) is not None:
            return client
        if not self._proven:
            # Until one login has succeeded, one at a time: k tasks must not make k bad logins.
            async with self._opening:
                if self.unavailable is not None:
                    raise self.unavailable
                if not fresh and (client := self._take_idle()) is not None:
                    return client
                if not self._proven:
                    return await self._open()
        return await self._open()

    def _take_idle(self) -> _Session | None:
        """The most recently used idle session still connected (the server may close others)."""
        while self._idle:
            client = self._idle.pop()
            if client.is_connected:
                return client
            self._discard(client)
        return None

    async def _open(self) -> _Session:
        """A new session: connect, and STARTTLS and log in as configured."""
        smtp = self.smtp
        username = smtp.username
        password = self._login_password() if username else None
        client = _Session(
            hostname=smtp.host,
            port=smtp.port,
            use_tls=smtp.security == "tls",
            start_tls=smtp.security == "starttls",
            validate_certs=smtp.verify_tls,
            cert_bundle=str(smtp.ca_file) if smtp.ca_file is not None else None,
            timeout=smtp.timeout,
            username=username,
            password=password,
        )
        client.data_timeout = max(smtp.timeout, smtp.data_timeout)
        self._connecting += 1
        try:
            await client.connect()
            await _greet(client)
        except (aiosmtplib.SMTPException, OSError) as exc:
            client.close()
            if self.unavailable is not None:  # another session failed first: said already
                raise self.unavailable from exc
            # Refused while sessions of ours are open (at the greeting or at EHLO): the server
            # caps its clients (crowding), whatever the pool's size; with none open it is the
            # server's own answer.
            if self._open_count > 0 and _crowded(exc):
                raise _Crowded(_describe(exc)) from exc
            if hostname_mismatch(exc):  # say which name the certificate is for
                exc.certificate_names = await asyncio.to_thread(  # type: ignore[union-attr]
                    certificate_names, smtp.host, smtp.port, protocol="smtp",
                    security=smtp.security, ca_file=smtp.ca_file, timeout=smtp.timeout)
            raise self._session_failure(exc) from exc
        finally:
            self._connecting -= 1
        self._proven = True
        self.connections += 1
        client.on_probation = self._open_count > 0  # others of ours open: a cap may answer MAIL
        self._open_count += 1
        self._report_shrink()  # a burst of opens in which some were refused is over
        log.info("smtp %s: connected (%s%s)", self.where, smtp.security,
                 f", as {username}" if username else "")
        return client

    def _login_password(self) -> str:
        """The password passed in, else the configured one, read only when logging in."""
        password = self._password if self._password is not None else self.smtp.password()
        if password is None:
            # Without this, the server would answer 530 to MAIL and every
            # subscriber would look like a bouncing address.
            raise ConfigError("smtp", "username",
                              "a username is set but no password (give password_env or "
                              "password_file)")
        return password

    def _session_failure(self, exc: BaseException) -> SendError:
        """The session cannot be used: say why and how to fix it, and stop this run's sends."""
        if self.unavailable is not None:
            return self.unavailable
        kind, problem = session_problem(self.smtp, exc)
        return self._hold(SendError(self.where, problem, kind=kind))

    def _hold(self, error: SendError) -> SendError:
        """Keep the first session failure of the run (logged once); every later send raises it."""
        if self.unavailable is None:
            self.unavailable = error
            log.error("smtp %s: %s", self.where, _reason(error))
        return self.unavailable


def session_problem(smtp: SmtpConfig, exc: BaseException) -> tuple[str, str]:
    """(kind, message) for a failure to open or keep an SMTP session, naming the fix.

    ``kind`` is ``config`` when the settings must change (login, TLS, greeting,
    a port that does not match ``security``), else ``server`` (unreachable,
    silent, dropping: worth another try at the next dispatch).
    """
    hint = port_hint(smtp.port, smtp.security)
    if isinstance(exc, aiosmtplib.SMTPResponseException) and exc.code in (534, 535) or \
            isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        code = getattr(exc, "code", 535)
        fix = ("wrong password; many providers need an app password" if code != 534 else
               "the provider wants an app password, or the sign-in confirmed in its web page")
        return "config", (f"login as {smtp.username} refused ({_describe(exc)}): {fix} "
                          "(check [smtp] username and password_env or password_file)")
    if hostname_mismatch(exc):
        names: list[str] = getattr(exc, "certificate_names", [])
        return "config", mismatch_problem(smtp.host, names) + " under [smtp]"
    if _caused_by(exc, ssl.SSLCertVerificationError):
        cert = _find(exc, ssl.SSLCertVerificationError)
        reason = getattr(cert, "verify_message", "") or str(cert)
        return "config", (f"the server's certificate does not verify ({reason}): for a "
                          'self-signed or private-CA certificate set ca_file = "/path/to/ca.pem" '
                          "under [smtp] (or verify_tls = false, which trusts anyone)")
    if _caused_by(exc, ssl.SSLError):
        return "config", (f"TLS failed ({_describe(exc)}): "
                          + (hint or f'check that security = "{smtp.security}" is what port '
                                     f"{smtp.port} speaks"))
    if isinstance(exc, aiosmtplib.SMTPConnectResponseError) or (
            isinstance(exc, aiosmtplib.SMTPResponseException) and 500 <= exc.code < 600):
        if 400 <= getattr(exc, "code", 0) < 500:
            return "server", f"the server is not taking mail now ({_describe(exc)})"
        return "config", (f"the server refused the session ({_describe(exc)}): check [smtp] "
                          "host and port" + (f"; {hint}" if hint else ""))
    if isinstance(exc, aiosmtplib.SMTPException) and "STARTTLS" in str(exc).upper():
        return "config", (f"{_describe(exc)}: " + (hint or 'the server offers no STARTTLS; '
                          'use security = "tls" on its TLS port (usually 465)'))
    if hint:  # a silent or garbled greeting on a port that speaks the other kind of TLS
        return "config", f"cannot start the session ({_describe(exc)}): {hint}"
    return "server", (f"cannot reach the server or it stopped answering ({_describe(exc)}); "
                      "the rest waits for the next dispatch")


HOSTNAME_MISMATCH = 62  # X509_V_ERR_HOSTNAME_MISMATCH: the certificate is for another name


def hostname_mismatch(exc: BaseException) -> bool:
    """Whether ``exc`` (or its cause) is a certificate valid, but for another host name."""
    cert = _find(exc, ssl.SSLCertVerificationError)
    return cert is not None and getattr(cert, "verify_code", None) == HOSTNAME_MISMATCH


def certificate_names(host: str, port: int, *, protocol: str, security: str,
                      ca_file: Path | None, timeout: float) -> list[str]:
    """The names a server's certificate is for (DNS and IP subjectAltName, else its CN).

    Blocking; run it in a thread. Connects again with the chain still verified
    (against ``ca_file`` or the system store) but the host name not checked,
    says STARTTLS for ``protocol`` "smtp" or "imap" when ``security`` asks,
    and reads the certificate. [] when that fails too (said as "unknown").
    """
    import imaplib
    import smtplib

    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    context.check_hostname = False
    try:
        if security == "starttls" and protocol == "smtp":
            with smtplib.SMTP(host, port, timeout=timeout) as client:
                client.starttls(context=context)
                sock = client.sock
                peer = sock.getpeercert() if isinstance(sock, ssl.SSLSocket) else None
        elif security == "starttls":
            with imaplib.IMAP4(host, port, timeout=timeout) as imap:
                imap.starttls(context)
                peer = imap.sock.getpeercert()  # type: ignore[attr-defined]
        else:
            with socket.create_connection((host, port), timeout=timeout) as raw, \
                    context.wrap_socket(raw, server_hostname=host) as tls:
                peer = tls.getpeercert()
    except (OSError, smtplib.SMTPException, imaplib.IMAP4.error):
        return []
    if not peer:
        return []
    fields: Any = peer  # getpeercert()'s dict of tuples, typed loosely by typeshed
    names = [str(pair[1]) for pair in fields.get("subjectAltName", ())
             if pair[0] in ("DNS", "IP Address")]
    if not names:
        names = [str(pair[1]) for rdn in fields.get("subject", ()) for pair in rdn
                 if pair[0] == "commonName"]
    return names


def mismatch_problem(host: str, names: list[str]) -> str:
    """The fix for a certificate valid for other names than ``host``."""
    if not names:
        return (f"the server's certificate is not for {host}: set host to a name its "
                "certificate is for")
    return (f"the certificate is for {', '.join(names)}, not {host}; set host to it "
            f"(host = \"{names[0]}\")")


def port_hint(port: int, security: str) -> str:
    """The usual fix when the port and ``security`` do not match (465 is TLS from the start)."""
    if port == 465 and security != "tls":
        return 'port 465 usually means security = "tls"'
    if port in (587, 25) and security == "tls":
        return f'port {port} usually means security = "starttls"'
    return ""


def envelope_recipients(message: EmailMessage | Message) -> list[str]:
    """The addresses in To, Cc and Bcc, each once, in order."""
    fields = [str(value) for name in ("To", "Cc", "Bcc") for value in message.get_all(name, [])]
    seen: set[str] = set()
    addresses: list[str] = []
    for _, address in getaddresses(fields):
        if address and address.lower() not in seen:
            seen.add(address.lower())
            addresses.append(address)
    return addresses


def envelope_sender(message: EmailMessage | Message) -> str:
    """The return path: the Sender header when there is one, else From (bounces go there)."""
    for name in ("Sender", "From"):
        values = message.get_all(name, [])
        if values:
            address = getaddresses([str(values[0])])[0][1]
            if address:
                return address
    raise ValueError("the message has no From address")


def wire_format(message: EmailMessage | Message, *, utf8: bool, eight_bit: bool) -> bytes:
    """The message as sent: CRLF lines, Bcc removed, headers folded by ``EMAIL_POLICY``.

    aiosmtplib would fold with ``email.policy.SMTP``, which turns a long
    List-Unsubscribe URL into encoded words no client can follow. Folding here,
    whatever policy the message was parsed with, keeps it one plain line.
    """
    outgoing = copy.copy(message)
    del outgoing["Bcc"]
    del outgoing["Resent-Bcc"]
    cte_type = "8bit" if eight_bit else "7bit"
    if isinstance(message.policy, email.policy.EmailPolicy):
        policy: Any = EMAIL_POLICY.clone(linesep="\r\n", utf8=utf8, cte_type=cte_type)
    else:
        policy = email.policy.compat32.clone(linesep="\r\n", cte_type=cte_type)
    buffer = io.BytesIO()
    BytesGenerator(buffer, policy=policy).flatten(outgoing)
    return buffer.getvalue()

def crlf_lines(data: bytes) -> bytes:
    """``data`` with every line ending in CRLF, the last one too (what DATA carries).

    ``data`` itself, no copy, when every line already ends in CRLF (claimed
    digests do: the renderer writes CRLF) and only its end lacks one: three
    counts at C speed instead of a regex pass. Bare CR or LF are converted as
    aiosmtplib converts them (its ``normalize_message_line_endings``).
    """
    crlf = data.count(b"\r\n")
    if crlf == data.count(b"\n") == data.count(b"\r"):
        return data if data.endswith(b"\r\n") else data + b"\r\n"
    return normalize_message_line_endings(data)


def wire_size(data: bytes) -> int:
    """The octets ``data`` takes in DATA once its lines end in CRLF (RFC 1870's SIZE)."""
    return len(crlf_lines(data))


def data_transparent(data: bytes) -> bytes:
    """What follows the server's 354: ``data``'s CRLF lines (``crlf_lines``), a line that
    starts with "." getting one more, then the closing "." line (RFC 5321 4.5.2).

    The same bytes aiosmtplib's ``data`` writes for ``data``, built with two
    ``bytes.replace``-speed passes instead of its two regex substitutions:
    for a 30 KB digest those cost ~0.25 ms a message, a sixth of the
    dispatching process's CPU per digest (issue 13's profile).
    """
    return _dot_stuffed(crlf_lines(data))


def _dot_stuffed(lines: bytes) -> bytes:
    """``data_transparent`` of bytes whose lines all end in CRLF already."""
    if lines.startswith(b"."):
        lines = b"." + lines
    # Every line end is CRLF, so "\n." is exactly a line starting with ".".
    return lines.replace(b"\n.", b"\n..") + b".\r\n"


async def _reset(client: _Session) -> None:
    """RSET after a failed transaction; a session that cannot even do that is closed later."""
    if not client.is_connected:
        return
    try:
        await client.rset()
    except (aiosmtplib.SMTPException, ConnectionError) as exc:
        log.debug("smtp: RSET failed: %s", exc)


async def _greet(client: _Session) -> None:
    """EHLO (HELO for a server that does not know it) on a session just connected, unless
    ``connect`` said it already (for STARTTLS or a login).

    Said while the session is being opened, not with its first message: a relay that
    caps the sessions of one client may greet with 220 and tell the cap only at EHLO
    (421), and that is a refusal of one more session (``_crowded``), not a failed message.
    aiosmtplib closes the session on a 421 (``SMTPHeloError``, then disconnected).
    """
    if not client.is_ehlo_or_helo_needed:
        return
    try:
        await client.ehlo()
    except aiosmtplib.SMTPHeloError:
        if not client.is_connected:
            raise
        await client.helo()  # an old server: no extensions at all


def _crowded(exc: BaseException) -> bool:
    """A refusal of one more session, not of the server or the settings: a 4xx greeting
    (421 "too many connections"), a 421 to EHLO after a 220 greeting, a connection closed
    before the greeting or at EHLO, or no greeting until the timeout (a tarpit for the
    sessions beyond a cap) on a connection it accepted."""
    if isinstance(exc, aiosmtplib.SMTPConnectResponseError):
        # Only asked while sessions of ours are open and working: then even a 5xx greeting
        # (554 "too many connections from your host") refuses one more session, not us.
        return 400 <= exc.code < 600
    if isinstance(exc, aiosmtplib.SMTPHeloError):
        # A 421 (or 4xx) to EHLO or HELO on a session the server just greeted: the cap told
        # one command later. A 5xx there is about our EHLO name: the settings, not crowding.
        return 400 <= exc.code < 500
    if isinstance(exc, aiosmtplib.SMTPConnectTimeoutError):
        # aiosmtplib says "no greeting" with a read timeout as the cause; a timeout of the
        # TCP connect itself (an unreachable host) has a plain TimeoutError there.
        return isinstance(exc.__cause__, aiosmtplib.SMTPReadTimeoutError)
    return _caused_by(exc, aiosmtplib.SMTPServerDisconnected) or \
        _caused_by(exc, ConnectionResetError)


def _unique(addresses: Sequence[str]) -> list[str]:
    """Each address once (compared without case), in order."""
    seen: set[str] = set()
    unique: list[str] = []
    for address in addresses:
        if address and address.lower() not in seen:
            seen.add(address.lower())
            unique.append(address)
    return unique


_MESSAGE_ID = re.compile(rb"^Message-ID:[ \t]*(.*?)\r?$", re.IGNORECASE | re.MULTILINE)


def _message_id(data: bytes) -> str:
    """The Message-ID of serialised bytes, for the log (looked up in the header only)."""
    end = data.find(b"\n\n")
    if end < 0:
        end = data.find(b"\r\n\r\n")
    head = data if end < 0 else data[:end]
    found = _MESSAGE_ID.search(head)
    return found.group(1).decode("ascii", "replace").strip() if found else "(no Message-ID)"


def _sort_refusals(errors: dict[str, aiosmtplib.SMTPResponse]) -> _Attempt:
    """Split per-recipient refusals into final ones (5xx) and ones worth a retry."""
    outcome = _Attempt()
    for recipient, response in errors.items():
        problem = f"{response.code} {response.message}"
        if 400 <= response.code < 500:
            outcome.retry.append(recipient)
            outcome.problem = f"{recipient} deferred: {problem}"
        else:
            outcome.refused[recipient] = SendError(recipient, f"address refused ({problem})",
                                                   kind="recipient")
    return outcome


def _refusal_shape(reply: str, recipient: str) -> str:
    """A refusal's text without what names the recipient (``<u7@example.org> rejected``,
    ``u7: no such user``), so that one answer given to many recipients compares equal."""
    text = re.sub(r"<[^<>]*>", "<>", reply)
    local = recipient.rpartition("@")[0]
    # The local part alone only as a whole word, and only when it is not a short word that
    # the answer may use itself ("a", "no").
    for name in (recipient, local if len(local) >= 3 else ""):
        if name:
            text = re.sub(rf"(?<![\w.+-]){re.escape(name)}(?![\w.+-])", "*", text,
                          flags=re.IGNORECASE)
    return " ".join(text.lower().split())


def _policy_refusal(code: int, text: str) -> bool:
    """A 5xx about relaying or logging in (530, 5.7.x relay/auth), not about the address."""
    if code == 530:
        return True
    if not 500 <= code < 600:
        return False
    return bool(_POLICY_REFUSAL.search(text)) and (
        re.match(r"\s*5\.7\.\d", text) is not None or "relay" in text.lower())


# Words that only a refusal of the address itself uses (Exim's "Unrouteable address", the
# usual "no such user" / "user unknown"), with or without an enhanced status code.
_ADDRESS_REFUSAL = re.compile(
    r"unrout(e)?able|no such (user|mailbox|recipient|address)|user unknown|unknown "
    r"(user|recipient|mailbox)|(mailbox|user|recipient|address) does not exist",
    re.IGNORECASE)


def _mailbox_refusal(text: str) -> bool:
    """An enhanced status 5.1.x (bad mailbox or address), or words only such a refusal uses:
    the address, whatever else."""
    return re.match(r"\s*5\.1\.\d", text) is not None or bool(_ADDRESS_REFUSAL.search(text))


def _refuse_all(recipients: list[str], problem: str, *, kind: str,
                cause: BaseException) -> dict[str, SendError]:
    refused = {}
    for recipient in recipients:
        error = SendError(recipient, problem, kind=kind)
        error.__cause__ = cause  # as ``raise ... from cause`` would, for the traceback
        refused[recipient] = error
    return refused


def _find(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    return _find(exc, kind) is not None


def _describe(exc: BaseException) -> str:
    """One line: a multi-line reply's lines joined, so a stored error or a log line is one."""
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        if exc.code == NOT_SMTP:
            return f"the server's reply is not SMTP ({' '.join(exc.message.split())[:200]})"
        return " ".join(f"{exc.code} {exc.message}".split())
    text = " ".join((str(exc) or type(exc).__name__).split())
    if isinstance(exc, (TimeoutError, aiosmtplib.SMTPTimeoutError)) and "time" not in text.lower():
        text = f"timed out ({text})"
    return text


def _combined(refused: dict[str, SendError]) -> SendError:
    """One error for a message no recipient got: the kind of the most telling refusal."""
    if len(refused) == 1:
        return next(iter(refused.values()))
    reasons = sorted({_reason(error) for error in refused.values()})
    kinds = {error.kind for error in refused.values()}
    # Mixed answers: worth another try if any was 4xx; never mark an address for another's 5xx.
    kind = kinds.pop() if len(kinds) == 1 else "deferred" if "deferred" in kinds else "message"
    return SendError(", ".join(refused), "; ".join(reasons), kind=kind)


def _reason(error: SendError) -> str:
    """The error's message without the recipient it starts with."""
    return str(error).removeprefix(f"{error.recipient}: ")


# The embedded local sink


class LocalSink:
    """An SMTP server on 127.0.0.1 that files each message it receives in a folder.

    For the demo and for trying the daemon without a mail account: each message
    becomes ``<UTC time>-<recipient local part>-<n>.eml`` plus, when it has an
    HTML part, a ``.html`` file beside it to open in a browser. The daemon
    sends to it with the ordinary ``Mailer`` (see ``smtp_config``).
    """

    def __init__(self, folder: Path, smtp: SmtpConfig | None = None,
                 *, host: str = "127.0.0.1") -> None:
        self.folder = Path(folder)
        self.host = host
        self._smtp = smtp or SmtpConfig()
        self._controller: Controller | None = None
        self._port: int | None = None

    @classmethod
    def from_config(cls, smtp: SmtpConfig) -> LocalSink:
        """The sink a config asks for with ``[smtp] sink = "folder"``."""
        if smtp.sink is None:
            raise ValueError("smtp.sink is not set")
        return cls(smtp.sink, smtp)

    @property
    def port(self) -> int:
        """The port it listens on (or last listened on, once stopped)."""
        if self._port is None:
            raise RuntimeError("the local sink has not been started")
        return self._port

    def start(self) -> None:
        """Listen on a free loopback port (in a thread of its own)."""
        if self._controller is not None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        port = free_port(self.host)
        # SMTPUTF8: a subscriber's internationalised address (RFC 6531) reaches the folder too.
        controller = Controller(_SinkHandler(self.folder, self.host), hostname=self.host,
                                port=port, enable_SMTPUTF8=True)
        controller.start()
        self._controller, self._port = controller, port
        log.info("sink %s:%d: storing mail in %s", self.host, self.port, self.folder)

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def smtp_config(self) -> SmtpConfig:
        """The configured SMTP settings, pointed at this sink: plain SMTP, no login."""
        return dataclasses.replace(
            self._smtp, host=self.host, port=self.port, security="none", username=None,
            password_env=None, password_file=None,
        )

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (aiosmtpd's Controller cannot use port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._+-]+")


class _SinkHandler:
    """aiosmtpd handler: one ``.eml`` (and ``.html``) per recipient of each message."""

    def __init__(self, folder: Path, host: str) -> None:
        self.folder = folder
        self.host = host

    async def handle_DATA(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or envelope.content or b""
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogateescape")
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        for recipient in envelope.rcpt_tos:
            self._store(raw, stamp, recipient, envelope.mail_from or "")
        return "250 2.0.0 Stored"

    def _store(self, raw: bytes, stamp: str, recipient: str, sender: str) -> None:
        local = _UNSAFE_NAME.sub("_", recipient.rpartition("@")[0] or recipient).strip("._")
        # What a delivering MTA adds, so the stored file says who it was for.
        delivered = f"Return-Path: <{sender}>\r\nDelivered-To: {recipient}\r\n".encode()
        path = _exclusive_file(self.folder, f"{stamp}-{local or 'unknown'}", ".eml")
        path.write_bytes(delivered + raw)
        html = _html_part(raw)
        if html is not None:
            path.with_suffix(".html").write_text(html, encoding="utf-8")
        log.info("sink %s: stored a message for %s in %s", self.host, recipient, path)


def _exclusive_file(folder: Path, stem: str, suffix: str) -> Path:
    """Create ``stem-<n>suffix`` with the first n not taken, so no message overwrites another."""
    n = 1
    while True:
        path = folder / f"{stem}-{n}{suffix}"
        try:
            path.open("xb").close()
            return path
        except FileExistsError:
            n += 1


def _html_part(raw: bytes) -> str | None:
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    if not isinstance(parsed, EmailMessage):
        return None
    body = parsed.get_body(preferencelist=("html",))
    if body is None:
        return None
    content = body.get_content()
    return content if isinstance(content, str) else None

