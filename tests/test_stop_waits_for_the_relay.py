"""SIGTERM while a relay takes its time over the reply to a message's end (the message
written whole, "." sent, no 250 yet): the daemon waits for that reply (up to ``[smtp]
data_timeout``) instead of cancelling the delivery after its 5 s grace, so the digest is
marked sent and the next start sends no second copy. Deliveries not started yet are not
started after the SIGTERM. Real daemon processes, a real aiosmtpd server, real signals.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from digest.daemon import STOP_GRACE_SECONDS
from digest.mailer import free_port
from digest.store import Store

from .daemon_helpers import daemon_process, fill_inbox, recipient, wait_until, write_daemon_config
from .test_senders import FAST, subscribers

pytestmark = pytest.mark.slow  # child processes and real servers

# The relay's pause before its 250: beyond the daemon's grace, well inside data_timeout.
RELAY_PAUSE = STOP_GRACE_SECONDS + 3


class _Relay:
    """A relay that takes a message as soon as it is whole (it is queued: it will be
    delivered whatever the client does next), then takes ``pause`` seconds over the 250
    of its ``pause_from``-th message and those after it."""

    def __init__(self) -> None:
        self.pause = 0.0
        self.pause_from = 1
        self.messages: list[EmailMessage] = []
        self.data_commands = 0
        self.lock = threading.Lock()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        message = email.message_from_bytes(envelope.original_content or b"",
                                           policy=email.policy.default)
        with self.lock:
            self.data_commands += 1
            self.messages.append(message)  # type: ignore[arg-type]
        started = time.monotonic()
        while self.data_commands >= self.pause_from and time.monotonic() - started < self.pause:
            await asyncio.sleep(0.05)
        return "250 2.0.0 OK: queued"


@pytest.fixture
def relay() -> Iterator[tuple[_Relay, int]]:
    handler = _Relay()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield handler, controller.port
    finally:
        controller.stop()


def test_sigterm_waits_for_the_reply_to_a_message_written_whole(
        tmp_path: Path, relay: tuple[_Relay, int]) -> None:
    server, port = relay
    fill_inbox(tmp_path)
    config = write_daemon_config(tmp_path, port=port, subscribers=subscribers(6),
                                 digest=FAST, smtp={"connections": 1})
    state = tmp_path / "var" / "state.sqlite3"
    server.pause, server.pause_from = RELAY_PAUSE, 2  # the second digest waits at its 250
    in_flight = 2
    with daemon_process(config, tmp_path / "daemon.log") as daemon:
        wait_until(lambda: len(server.messages) == in_flight, what="one in flight")
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit(timeout=60) == 0, daemon.log()
    log = daemon.log()
    assert "Traceback" not in log, log
    assert len(server.messages) == in_flight  # nothing started after the SIGTERM
    delivered = Counter(recipient(m) for m in server.messages)
    with Store(state) as store:
        sent = {row.subscriber for sub in subscribers(6)
                for row in store.digests_of(str(sub["email"])) if row.status == "sent"}
        claimed = store.unsent_digests()
    # The relay took it during the stop, and the daemon heard its 250 and marked it sent.
    assert sent == set(delivered) and len(sent) == len(server.messages)
    assert all(row.message_id not in {str(m["Message-ID"]) for m in server.messages}
               for row in claimed)
    assert "waiting up to 600s for the server's reply to 1 message(s) sent whole" in log, log

    # The next start sends the rest and nothing twice.
    server.pause = 0
    with daemon_process(config, tmp_path / "daemon-2.log") as again:
        wait_until(lambda: len({recipient(m) for m in server.messages}) >= 6,
                   what="every digest")
        assert again.stop() == 0
    assert Counter(recipient(m) for m in server.messages) == {
        str(sub["email"]): 1 for sub in subscribers(6)}
