"""Misbehaving mail servers and a small campaign state, for the ``smtp`` and ``senders`` areas.

``RecordingServer`` is a real aiosmtpd server on loopback that records every
message it accepts (Message-ID, recipient) at the moment it answers 250, and
can answer a chosen code at MAIL, RCPT or DATA, refuse a login, or take its
time. ``RawServer`` is a bare TCP server for what aiosmtpd will not do on
purpose: a 554 greeting, silence (a server that hangs), a connection dropped
after EHLO, or a port that speaks TLS to a plain client. ``campaign_state``
writes a config and a JSON dump for N subscribers who are all due now.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import socketserver
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from email import message_from_bytes
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from ..mailer import free_port


@dataclass
class Received:
    message_id: str
    recipient: str
    at: float  # time.monotonic() when the 250 was given


@dataclass
class Behaviour:
    mail_reply: str | None = None  # e.g. "550 5.7.1 sender not allowed"
    rcpt_reply: dict[str, str] = field(default_factory=dict)  # address -> reply
    data_reply: str | None = None  # e.g. "554 5.6.0 message rejected"
    delay: float = 0.0  # seconds DATA waits before its 250
    # Called (in the server's thread) at "mail", at "data" (the message whole, before the
    # server takes it) and at "taken" (recorded, just before the 250); a "data" hook that
    # returns True makes the server refuse the message (451) instead of taking it.
    hook: Callable[[str], bool] | None = None


class _Handler:
    def __init__(self, behaviour: Behaviour, received: list[Received]) -> None:
        self.behaviour = behaviour
        self.received = received
        self.lock = threading.Lock()

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        if self.behaviour.hook is not None:
            self.behaviour.hook("mail")
        if self.behaviour.mail_reply:
            return self.behaviour.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        reply = self.behaviour.rcpt_reply.get(address.lower())
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.behaviour.delay:
            await asyncio.sleep(self.behaviour.delay)
        if self.behaviour.data_reply:
            return self.behaviour.data_reply
        if self.behaviour.hook is not None and self.behaviour.hook("data"):
            return "451 4.3.0 Not taken: the client went away"
        raw = envelope.original_content or envelope.content or b""
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogateescape")
        message_id = str(message_from_bytes(raw).get("Message-ID", ""))
        with self.lock:
            for rcpt in envelope.rcpt_tos:
                self.received.append(Received(message_id, rcpt.lower(), time.monotonic()))
        if self.behaviour.hook is not None:
            self.behaviour.hook("taken")
        return "250 2.0.0 Accepted"


class _Auth:
    def __init__(self, user: str, password: str) -> None:
        self.user, self.password = user.encode(), password.encode()

    def __call__(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                 auth_data: Any) -> AuthResult:
        ok = (isinstance(auth_data, LoginPassword) and auth_data.login == self.user
              and auth_data.password == self.password)
        return AuthResult(success=ok, handled=False)


class RecordingServer:
    """aiosmtpd on a free loopback port; ``received`` lists what it accepted."""

    def __init__(self, behaviour: Behaviour | None = None,
                 login: tuple[str, str] | None = None,
                 starttls: tuple[Path, Path] | None = None) -> None:
        """``login``: (user, password) AUTH requires; ``starttls``: (cert, key) it offers."""
        self.behaviour = behaviour or Behaviour()
        self.received: list[Received] = []
        self.port = free_port()
        handler = _Handler(self.behaviour, self.received)
        options: dict[str, Any] = {}
        if login is not None:
            options = {"authenticator": _Auth(*login), "auth_require_tls": False}
        if starttls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(starttls[0]), str(starttls[1]))
            options.update(tls_context=context, require_starttls=True)
        self._controller = Controller(handler, hostname="127.0.0.1", port=self.port,
                                      **options)
        self._controller.start()

    def copies(self) -> Counter[tuple[str, str]]:
        """(Message-ID, recipient) -> how many times it was accepted."""
        return Counter((r.message_id, r.recipient) for r in list(self.received))

    def stop(self) -> None:
        self._controller.stop()


class RawServer:
    """A bare TCP server that misbehaves in one way (``mode``) on every connection.

    ``hang``: accepts and says nothing; ``greet-554``: a 554 greeting;
    ``drop-after-ehlo``: greets, answers EHLO, then closes; ``tls-only``: waits
    for a TLS ClientHello and answers garbage to plain text (a port 465 server
    seen by a STARTTLS client: it says nothing, as a real one does).
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.connections = 0
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                outer.connections += 1
                sock: socket.socket = self.request
                sock.settimeout(30)
                try:
                    outer._serve(sock)
                except OSError:
                    pass

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self._stop = threading.Event()

    def _serve(self, sock: socket.socket) -> None:
        if self.mode == "hang" or self.mode == "tls-only":
            self._stop.wait(30)
            return
        if self.mode == "greet-554":
            sock.sendall(b"554 5.3.2 No service for you\r\n")
            sock.recv(1024)
            return
        if self.mode == "drop-after-ehlo":
            sock.sendall(b"220 raw.example ESMTP\r\n")
            sock.recv(1024)
            sock.sendall(b"250 raw.example\r\n")
            return
        raise ValueError(f"unknown mode {self.mode!r}")

    def stop(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()


def campaign_state(folder: Path, *, port: int, subscribers: int, papers: int = 30,
                   smtp_extra: str = "", digest_extra: str = "") -> Path:
    """A config for ``subscribers`` readers, all due now, and a JSON dump in its inbox.

    Send time 00:00 UTC with ``max_late_hours = 24``: due whenever it runs.
    ``smtp_extra`` holds ``key = value`` lines for ``[smtp]`` that replace the defaults.
    Returns the config path; the state is ``folder/var/state.sqlite3``.
    """
    inbox = folder / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    listing = [{"title": f"Fault campaign paper {n}: robust delivery of message {n}",
                "paper": {"id": f"2403.{10000 + n}", "summary": f"Abstract {n} about retries, "
                          "exactly-once delivery and crash recovery in mail systems.",
                          "upvotes": papers - n},
                "publishedAt": "2026-03-12T00:00:00.000Z"} for n in range(papers)]
    dump = inbox / "campaign.json"
    dump.write_text(json.dumps(listing), encoding="utf-8")
    stamp = time.time() - 60  # stable already
    os.utime(dump, (stamp, stamp))
    lines = ["[digest]", 'inbox = "inbox"', 'state = "var/state.sqlite3"', "stable_seconds = 0",
             "scan_seconds = 0.2", "dispatch_seconds = 0.2", "max_late_hours = 24",
             digest_extra, "", "[smtp]"]
    smtp = {"host": '"127.0.0.1"', "port": str(port), "security": '"none"',
            "retry_seconds": "0.01", "attempts": "2", "timeout": "5",
            "from": '"Paper Digest <digest@papers.example.org>"',
            "reply_to": '"digest+{token}@papers.example.org"'}
    for line in smtp_extra.splitlines():  # "key = value" lines replace the defaults
        key, _, value = line.partition("=")
        smtp[key.strip()] = value.strip()
    lines += [f"{key} = {value}" for key, value in smtp.items()] + [""]
    for n in range(subscribers):
        lines += ["[[subscribers]]", f'email = "{reader(n)}"', 'send_at = "00:00"',
                  'timezone = "UTC"', "max_papers = 3", ""]
    config = folder / "digest.toml"
    config.write_text("\n".join(lines), encoding="utf-8")
    return config


def reader(n: int) -> str:
    return f"reader{n:02d}@example.org"
