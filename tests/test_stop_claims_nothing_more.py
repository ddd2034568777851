"""SIGTERM while the dispatch waits for room in the delivery window (every delivery slot
taken by a relay slow to answer): the daemon claims nothing more. The digests claimed
and unsent after the stop are at most those in flight at the signal, and the next start
sends each remaining digest once. Real daemon processes, a real aiosmtpd server, real
signals.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import signal
import sqlite3
import threading
from collections import Counter
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from digest.mailer import free_port
from digest.store import Store

from .daemon_helpers import daemon_process, fill_inbox, recipient, wait_until, write_daemon_config
from .test_senders import FAST, subscribers

pytestmark = pytest.mark.slow  # child processes and real servers

SUBSCRIBERS = 6
# The relay's cap on how long it holds a MAIL: far beyond the daemon's 5 s stop grace
# (the test releases it sooner, once the daemon has exited).
HOLD_MAX_SECONDS = 120.0


class _Relay:
    """A relay that holds the ``hold_from``-th MAIL command and those after it (no reply)
    until ``release`` is set, so a delivery stays under way and the window stays full."""

    def __init__(self) -> None:
        self.hold_from = 2
        self.release = threading.Event()
        self.mails = 0
        self.messages: list[EmailMessage] = []
        self.lock = threading.Lock()

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        with self.lock:
            self.mails += 1
            held = self.mails >= self.hold_from
        waited = 0.0
        while held and not self.release.is_set() and waited < HOLD_MAX_SECONDS:
            await asyncio.sleep(0.05)
            waited += 0.05
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        message = email.message_from_bytes(envelope.original_content or b"",
                                           policy=email.policy.default)
        with self.lock:
            self.messages.append(message)  # type: ignore[arg-type]
        return "250 2.0.0 OK: queued"


@pytest.fixture
def relay() -> Iterator[tuple[_Relay, int]]:
    handler = _Relay()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield handler, controller.port
    finally:
        handler.release.set()
        controller.stop()


def _digests(state: Path) -> dict[int, str]:
    """Digest id -> status, read (read-only) while the daemon may be writing."""
    if not state.exists():
        return {}
    with sqlite3.connect(f"file:{state}?mode=ro", uri=True, timeout=10) as db:
        try:
            return dict(db.execute("SELECT id, status FROM digests"))
        except sqlite3.OperationalError:  # the schema is not created yet
            return {}


def test_sigterm_while_waiting_for_room_claims_nothing_more(
        tmp_path: Path, relay: tuple[_Relay, int]) -> None:
    server, port = relay
    fill_inbox(tmp_path)
    # One connection: a window of two deliveries, claimed one at a time.
    config = write_daemon_config(tmp_path, port=port, subscribers=subscribers(SUBSCRIBERS),
                                 digest=FAST, smtp={"connections": 1})
    state = tmp_path / "var" / "state.sqlite3"
    window = 2
    with daemon_process(config, tmp_path / "daemon.log") as daemon:
        # The first digest is delivered (the slow start ends: the window opens to two),
        # the second waits at its MAIL, the third waits for the connection: the window is
        # full, and the fourth digest, prepared, waits for room.
        wait_until(lambda: server.mails == 2 and len(_digests(state)) == 1 + window,
                   what="a full delivery window")
        at_signal = _digests(state)
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit(timeout=60) == 0, daemon.log()
    server.release.set()
    log = daemon.log()
    assert "Traceback" not in log, log
    assert Counter(at_signal.values()) == {"sent": 1, "claimed": window}
    after = _digests(state)
    in_flight = {digest for digest, status in at_signal.items() if status == "claimed"}
    unsent = {digest for digest, status in after.items() if status == "claimed"}
    assert after.keys() == at_signal.keys(), "a digest was claimed after the SIGTERM"
    assert unsent <= in_flight

    # The next start sends every remaining digest, each once.
    with daemon_process(config, tmp_path / "daemon-2.log") as again:
        wait_until(lambda: len(server.messages) >= SUBSCRIBERS, what="every digest")
        assert again.stop() == 0, again.log()
    assert Counter(recipient(m) for m in server.messages) == {
        str(sub["email"]): 1 for sub in subscribers(SUBSCRIBERS)}
    with Store(state) as store:
        assert store.unsent_digests() == []
