"""A lean SMTP sink for the dispatch benchmark: an asyncio Protocol that accepts and counts.

The benchmark's sink shares two cores with the dispatch it measures, so its
own cost is part of the result: aiosmtpd (a general server, a coroutine per
line) spends about as much CPU per message as the dispatch itself, where a
relay written in C (Postfix) spends a fraction of that. This server does the
least a correct SMTP receiver does (RFC 5321, with PIPELINING, 8BITMIME,
SMTPUTF8 and SIZE announced): greeting, EHLO/HELO, MAIL, RCPT, DATA (the end
of data found with ``bytes.find``, dot-unstuffed), RSET, NOOP, QUIT, and 500
for anything else. It keeps no message: per message, the envelope recipients
and the Message-ID header go to a ``Recorder``, which is what the benchmark's
"exactly one message per subscriber" check reads. It answers in the order
commands arrive, so a pipelining client works, and writes the replies to the
commands of one read together (one segment for a pipelined MAIL, RCPT, DATA);
it never relays, authenticates or speaks TLS.
"""

from __future__ import annotations

import asyncio
import resource
import threading
from collections import Counter
from typing import Any

# The longest command line accepted, CRLF included (RFC 5321 4.5.3.1.4 says 512;
# SMTPUTF8 addresses may be longer in bytes, so a little room).
MAX_LINE = 2048
# The largest message accepted, announced in EHLO's SIZE (a digest is 30-50 KB).
MAX_MESSAGE = 10 * 1024 * 1024
_END_OF_DATA = b"\r\n.\r\n"
_MAIL_PARAMETERS = frozenset(("BODY=7BIT", "BODY=8BITMIME", "SMTPUTF8"))


class Recorder:
    """What a sink received since its last ``reset``: per recipient, per message, CPU.

    Shared by the sink's server thread and the thread answering the
    benchmark, hence the lock. Recipients are counted lower-cased.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.message_ids: list[str] = []  # "" for a message without one, in arrival order
        self.messages = 0
        self.bytes = 0
        self._cpu_at_reset = _process_cpu()

    def record(self, recipients: list[str], message: bytes) -> None:
        """Count one accepted message (its bytes as received, after unstuffing)."""
        message_id = header_value(message, b"message-id") or ""
        with self.lock:
            self.messages += 1
            self.bytes += len(message)
            self.message_ids.append(message_id)
            for recipient in recipients:
                self.counts[recipient.lower()] += 1

    def snapshot(self) -> dict[str, Any]:
        """Counts, Message-IDs, messages, bytes and this process's CPU s since the reset."""
        with self.lock:
            return {"counts": dict(self.counts), "message_ids": list(self.message_ids),
                    "messages": self.messages, "bytes": self.bytes,
                    "cpu_s": _process_cpu() - self._cpu_at_reset}

    def reset(self) -> None:
        with self.lock:
            self.counts.clear()
            self.message_ids.clear()
            self.messages = self.bytes = 0
            self._cpu_at_reset = _process_cpu()


def _process_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def header_value(message: bytes, name: bytes) -> str | None:
    """The first ``name`` header of a message (case-insensitive, unfolded, stripped), or None.

    Reads only the header block (up to the first empty line). Bytes that are
    not UTF-8 are kept as surrogate escapes.
    """
    end = message.find(b"\r\n\r\n")
    lines = (message if end < 0 else message[:end]).split(b"\r\n")
    prefix = name.lower() + b":"
    for number, line in enumerate(lines):
        if line[:len(prefix)].lower() == prefix:
            value = [line[len(prefix):]]
            for continued in lines[number + 1:]:
                if not continued[:1] in (b" ", b"\t"):
                    break
                value.append(continued)
            unfolded = b" ".join(part.strip() for part in value if part.strip())
            return unfolded.decode("utf-8", "surrogateescape")
    return None


class LeanSmtp(asyncio.Protocol):
    """One SMTP session: reads commands and data, answers in order, records each message."""

    def __init__(self, recorder: Recorder, hostname: str = "localhost",
                 max_message: int = MAX_MESSAGE) -> None:
        self.recorder = recorder
        self.hostname = hostname
        self.max_message = max_message
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._greeted = False
        self._sender: str | None = None
        self._recipients: list[str] = []
        # In DATA: the bytes so far, after a CRLF put in front so that a "." on the
        # first line ends or is unstuffed like any other; None outside DATA.
        self._data: bytearray | None = None
        self._scanned = 0  # _data before this offset holds no end of data
        self._too_big = False
        self._overlong = False  # part of a command line over MAX_LINE was dropped
        # Replies to the commands of one read, written together once it is handled: the
        # replies to a pipelined group (MAIL, RCPT, DATA) go back in one segment, as RFC
        # 2920 allows, not one write (and system call) each.
        self._out: list[bytes] = []

    # --- asyncio ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not isinstance(transport, asyncio.Transport):  # pragma: no cover - TCP only
            raise TypeError("LeanSmtp needs a stream transport")
        self.transport = transport
        self._reply(f"220 {self.hostname} ESMTP lean bench sink")
        self._flush()

    def data_received(self, data: bytes) -> None:
        if self._data is not None:
            self._data += data
        else:
            self._buffer += data
        self._process()
        self._flush()

    # --- the session ---------------------------------------------------------------

    def _process(self) -> None:
        """Handle every complete command line and end of data in hand, in order."""
        while self.transport is not None and not self.transport.is_closing():
            if self._data is not None:
                if not self._take_data():
                    return
                continue
            newline = self._buffer.find(b"\n")
            if newline < 0:
                if len(self._buffer) > MAX_LINE:  # drop it now, answer at its end
                    self._buffer.clear()
                    self._overlong = True
                return
            line = bytes(self._buffer[:newline + 1])
            del self._buffer[:newline + 1]
            if self._overlong or len(line) > MAX_LINE:
                self._overlong = False
                self._reply("500 5.5.2 Line too long")
                continue
            self._command(line.rstrip(b"\r\n").decode("utf-8", "surrogateescape"))

    def _take_data(self) -> bool:
        """Finish the message if its end is in hand (True); else wait for more (False)."""
        data = self._data
        if data is None:  # pragma: no cover - only called in DATA
            return False
        end = data.find(_END_OF_DATA, self._scanned)
        if end < 0:
            self._scanned = max(0, len(data) - len(_END_OF_DATA) + 1)
            if len(data) > self.max_message + len(_END_OF_DATA):
                # Too big: keep counting nothing, only a tail that may begin the end of data.
                self._too_big = True
                del data[:-(len(_END_OF_DATA) - 1)]
                self._scanned = 0
            return False
        self._buffer = data[end + len(_END_OF_DATA):]  # pipelined commands after the data
        self._data = None
        if self._too_big:
            self._reset()
            self._reply("552 5.3.4 Message too big for this sink")
            return True
        # The message ends with the CRLF before the final "."; drop the CRLF put in front.
        message = bytes(data[:end + 2]).replace(b"\r\n..", b"\r\n.")[2:]
        self.recorder.record(self._recipients, message)
        self._reset()
        self._reply("250 2.0.0 OK: queued")
        return True

    def _command(self, line: str) -> None:
        verb, _, argument = line.partition(" ")
        verb = verb.upper()
        if verb == "EHLO" or verb == "HELO":
            if not argument.strip():
                self._reply(f"501 5.5.4 Syntax: {verb} hostname")
                return
            self._greeted = True
            self._reset()
            if verb == "HELO":
                self._reply(f"250 {self.hostname}")
            else:
                self._reply(f"250-{self.hostname}\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                            f"250-SMTPUTF8\r\n250 SIZE {self.max_message}")
        elif verb == "MAIL":
            self._mail(argument)
        elif verb == "RCPT":
            self._rcpt(argument)
        elif verb == "DATA":
            if argument:
                self._reply("501 5.5.4 Syntax: DATA")
            elif not self._recipients:
                self._reply("503 5.5.1 Need RCPT first" if self._sender is not None
                            else "503 5.5.1 Need MAIL first")
            else:
                self._data = bytearray(b"\r\n") + self._buffer
                self._buffer = bytearray()
                self._scanned = 0
                self._too_big = False
                self._reply("354 End data with <CR><LF>.<CR><LF>")
        elif verb == "RSET":
            self._reset()
            self._reply("250 2.0.0 OK")
        elif verb == "NOOP":
            self._reply("250 2.0.0 OK")
        elif verb == "QUIT":
            self._reply("221 2.0.0 Bye")
            self._flush()
            if self.transport is not None:
                self.transport.close()
        else:
            self._reply("500 5.5.2 Command not recognized")

    def _mail(self, argument: str) -> None:
        if not self._greeted:
            self._reply("503 5.5.1 Send EHLO first")
            return
        if self._sender is not None:
            self._reply("503 5.5.1 Sender already given")
            return
        address, parameters = _path(argument, "FROM:")
        if address is None:
            self._reply("501 5.5.4 Syntax: MAIL FROM:<address>")
            return
        for parameter in parameters:
            keyword, _, value = parameter.partition("=")
            if keyword.upper() == "SIZE" and value.isdigit():
                if int(value) > self.max_message:
                    self._reply("552 5.3.4 Message too big for this sink")
                    return
            elif parameter.upper() not in _MAIL_PARAMETERS:
                self._reply(f"555 5.5.4 Parameter not supported: {parameter}")
                return
        self._sender = address
        self._reply("250 2.1.0 OK")

    def _rcpt(self, argument: str) -> None:
        if self._sender is None:
            self._reply("503 5.5.1 Need MAIL first")
            return
        address, parameters = _path(argument, "TO:")
        if not address:
            self._reply("501 5.5.4 Syntax: RCPT TO:<address>")
            return
        if parameters:
            self._reply(f"555 5.5.4 Parameter not supported: {parameters[0]}")
            return
        self._recipients.append(address)
        self._reply("250 2.1.5 OK")

    def _reset(self) -> None:
        self._sender = None
        self._recipients = []

    def _reply(self, text: str) -> None:
        self._out.append(text.encode("utf-8") + b"\r\n")

    def _flush(self) -> None:
        """Write the replies gathered so far, in order, in one write."""
        out, self._out = self._out, []
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(out))


def _path(argument: str, keyword: str) -> tuple[str | None, list[str]]:
    """``FROM:<a@b> SIZE=10`` -> ("a@b", ["SIZE=10"]); (None, []) when it is not that shape."""
    if argument[:len(keyword)].upper() != keyword:
        return None, []
    rest = argument[len(keyword):].lstrip()
    close = rest.find(">")
    if not rest.startswith("<") or close < 0:
        return None, []
    return rest[1:close], rest[close + 1:].split()


async def serve(recorder: Recorder, host: str, port: int, *,
                hostname: str = "localhost") -> asyncio.Server:
    """Listen on ``host:port`` (0: any free port) with a ``LeanSmtp`` per connection."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: LeanSmtp(recorder, hostname), host, port)


class LeanSmtpThread:
    """The lean sink on its own event loop in a thread, as aiosmtpd's Controller runs."""

    def __init__(self, recorder: Recorder, host: str = "127.0.0.1", port: int = 0) -> None:
        self.recorder = recorder
        self.host = host
        self.port = port
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="lean-smtp",
                                        daemon=True)

    def start(self) -> None:
        """Listen, then serve in the thread; ``port`` is the port bound. Raises OSError."""
        self._server = self._loop.run_until_complete(serve(self.recorder, self.host,
                                                           self.port))
        self.port = self._server.sockets[0].getsockname()[1]
        self._thread.start()

    def stop(self) -> None:
        """Stop listening and end the thread; sessions still open are dropped."""
        if self._server is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._server.close)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._server = None
        if not self._loop.is_running():
            self._loop.close()
