"""A relay that greets every session with 220 and tells its cap on the sessions of one client
only in its answer to EHLO (421): while sessions of ours are open and working, that is one
session too many (crowding), not the server going away. The pool shrinks to the sessions the
server took, every message goes out in the same dispatch, and one warning says to lower
``[smtp] connections``.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from digest.errors import SendError
from digest.mailer import Mailer, free_port

from .daemon_helpers import Sim, fill_inbox, recipient, utc, write_daemon_config
from .test_mailer import QUICK, run
from .test_mailer_pool import letter, reader, send_many


class _Cap:
    """The relay's count of our sessions: the first ``cap`` open at once are served."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.admitted = 0  # sessions open now that were within the cap
        self.refused = 0  # EHLOs answered 421
        self.most_admitted = 0
        self.received: list[tuple[str, ...]] = []
        self.messages: list[bytes] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        with self.lock:
            self.received.append(tuple(envelope.rcpt_tos))
            self.messages.append(envelope.original_content or b"")
        return "250 2.0.0 OK"


class _Capped(SMTP):
    """aiosmtpd's SMTP greeting every session and admitting ``cap.cap`` at a time; a
    subclass says at which command a session beyond the cap is refused."""

    def __init__(self, cap: _Cap, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cap = cap
        self.admitted = False

    def connection_made(self, transport: Any) -> None:
        with self.cap.lock:
            if self.cap.admitted < self.cap.cap:
                self.admitted = True
                self.cap.admitted += 1
                self.cap.most_admitted = max(self.cap.most_admitted, self.cap.admitted)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self.admitted:
            with self.cap.lock:
                self.cap.admitted -= 1
            self.admitted = False
        super().connection_lost(error)

    async def refused(self, reply: str) -> bool:
        """Whether this session is beyond the cap: then ``reply`` is said and it is closed."""
        if self.admitted:
            return False
        with self.cap.lock:
            self.cap.refused += 1
        await self.push(reply)
        assert self.transport is not None
        self.transport.close()
        return True


class _CappedAtEhlo(_Capped):
    """A session beyond the cap gets 421 at EHLO, after its 220 greeting."""

    async def smtp_EHLO(self, arg: str) -> None:
        if not await self.refused("421 4.7.0 Too many concurrent SMTP connections from this IP"):
            await super().smtp_EHLO(arg)


class _Controller(Controller):
    def __init__(self, cap: _Cap) -> None:
        super().__init__(cap, hostname="127.0.0.1", port=free_port())
        self.cap = cap

    def factory(self) -> SMTP:
        return _CappedAtEhlo(self.cap, self.handler, **self.SMTP_kwargs)


@pytest.fixture
def capped() -> Iterator[tuple[_Cap, int]]:
    cap = _Cap(2)
    controller = _Controller(cap)
    controller.start()  # its own check connection says no EHLO
    try:
        yield cap, controller.port
    finally:
        controller.stop()


def test_a_cap_told_at_ehlo_shrinks_the_pool_and_every_message_goes_out(
        capped: tuple[_Cap, int], caplog: pytest.LogCaptureFixture) -> None:
    cap, port = capped
    from digest.config import SmtpConfig

    config = SmtpConfig(host="127.0.0.1", port=port, security="none", timeout=10.0,
                        sender="Paper Digest <digest@papers.example.org>")

    async def dispatch() -> tuple[list[Any], Mailer]:
        async with Mailer(config, connections=4, **QUICK) as mailer:
            results = await send_many(mailer, 16)
        return results, mailer

    with caplog.at_level(logging.WARNING, logger="digest.mailer"):
        results, mailer = run(dispatch())

    assert results == [{}] * 16
    assert mailer.unavailable is None  # a full relay is not a relay that is down
    assert Counter(r for rcpts in cap.received for r in rcpts) == {reader(n): 1 for n in range(16)}
    assert cap.refused >= 1 and mailer.pool_size == 2 and cap.most_admitted == 2
    [warning] = [r.getMessage() for r in caplog.records if r.name == "digest.mailer"]
    assert "421 4.7.0 Too many concurrent SMTP connections" in warning
    assert "sending over 2 from now on (lower [smtp] connections)" in warning


def test_a_421_at_ehlo_with_no_session_open_is_still_the_server_not_taking_mail(
        capped: tuple[_Cap, int]) -> None:
    cap, port = capped
    cap.cap = 0  # every session refused: nothing of ours works, so it is no crowding
    from digest.config import SmtpConfig

    config = SmtpConfig(host="127.0.0.1", port=port, security="none", timeout=10.0,
                        sender="Paper Digest <digest@papers.example.org>")

    async def one() -> None:
        async with Mailer(config, connections=4, **QUICK) as mailer:
            await mailer.send_bytes(letter(0), recipients=[reader(0)])

    with pytest.raises(SendError) as caught:
        run(one())
    assert caught.value.kind == "server" and "421" in str(caught.value)
    assert cap.received == []


def test_a_dispatch_to_a_relay_capping_at_ehlo_sends_everyone_in_the_same_tick(
        tmp_path: Path, capped: tuple[_Cap, int], caplog: pytest.LogCaptureFixture) -> None:
    cap, port = capped
    emails = [f"reader{n}@example.org" for n in range(12)]
    fill_inbox(tmp_path)
    sim = Sim(write_daemon_config(
        tmp_path, port=port, smtp={"connections": 4},
        subscribers=[{"email": e, "send_at": "08:00", "send_empty": True} for e in emails]))
    try:
        sim.ingest(utc("2026-03-01 06:00"))
        with caplog.at_level(logging.WARNING, logger="digest.mailer"):
            outcomes = sim.tick(utc("2026-03-02 08:00"))
        assert {o.subscriber: o.status for o in outcomes} == {e: "sent" for e in emails}
        assert sim.runtime.smtp_hold is None
    finally:
        sim.close()
    import email
    import email.policy

    got = Counter(recipient(email.message_from_bytes(raw, policy=email.policy.default))
                  for raw in cap.messages)
    assert got == {e: 1 for e in emails}
    assert cap.most_admitted <= 2
    warnings = [r.getMessage() for r in caplog.records if r.name == "digest.mailer"]
    assert any("lower [smtp] connections" in w for w in warnings), warnings


class _CappedAtMail(_Capped):
    """Greets and answers EHLO on every session; a session beyond the cap gets 421 at its
    first MAIL FROM (and is closed), as relays that count sessions at MAIL do."""

    async def smtp_MAIL(self, arg: str) -> None:
        if not await self.refused("421 4.7.0 Too many concurrent sessions, closing"):
            await super().smtp_MAIL(arg)


class _MailCapController(Controller):
    def __init__(self, cap: _Cap) -> None:
        super().__init__(cap, hostname="127.0.0.1", port=free_port())
        self.cap = cap

    def factory(self) -> SMTP:
        return _CappedAtMail(self.cap, self.handler, **self.SMTP_kwargs)


def test_a_cap_told_at_mail_shrinks_the_pool_and_nothing_is_deferred(
        caplog: pytest.LogCaptureFixture) -> None:
    """Was: the 421 at MAIL retried with backoff, then the message deferred."""
    cap = _Cap(2)
    controller = _MailCapController(cap)
    controller.start()
    try:
        from digest.config import SmtpConfig

        config = SmtpConfig(host="127.0.0.1", port=controller.port, security="none",
                            timeout=10.0, sender="Paper Digest <digest@papers.example.org>")

        async def dispatch() -> tuple[list[Any], Mailer]:
            # One attempt each: a 421 at MAIL taken for a failed try would defer the message.
            async with Mailer(config, connections=4, attempts=1, base_delay=0.01) as mailer:
                results = await send_many(mailer, 16)
            return results, mailer

        with caplog.at_level(logging.WARNING, logger="digest.mailer"):
            results, mailer = run(dispatch())
    finally:
        controller.stop()
    assert results == [{}] * 16
    assert mailer.unavailable is None
    assert Counter(r for rcpts in cap.received for r in rcpts) == {reader(n): 1 for n in range(16)}
    assert cap.refused >= 1 and mailer.pool_size == 2 and cap.most_admitted == 2
    warnings = [r.getMessage() for r in caplog.records if r.name == "digest.mailer"]
    assert [w for w in warnings if "lower [smtp] connections" in w], warnings
    assert not [w for w in warnings if "retrying in" in w or "not delivered" in w], warnings
