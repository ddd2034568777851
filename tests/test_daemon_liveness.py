"""A mailbox stuck in a network call: scans go on, the watchdog stops, SIGTERM still ends it.

The IMAP "server" is a real loopback socket that accepts and never says a word,
as a dead middlebox or a hung server does; the daemon is a real child process
with a real NOTIFY_SOCKET.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from digest.bench.replies import Dovecot

from .daemon_helpers import (
    NotifySocket,
    daemon_process,
    fill_inbox,
    wait_until,
    write_daemon_config,
)
from .dovecot_helpers import dovecot_fixture  # noqa: F401  (the dovecot fixture)
from .smtp_helpers import (  # noqa: F401  (smtp_server_fixture provides the smtp_server fixture)
    StartServer,
    smtp_server_fixture,
)

pytestmark = pytest.mark.slow


@pytest.fixture(name="silent_server")
def silent_server_fixture() -> Iterator[tuple[int, list[socket.socket]]]:
    """A TCP server on loopback that accepts connections and never answers."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    accepted: list[socket.socket] = []
    import threading

    done = threading.Event()

    def accept() -> None:
        while not done.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], accepted
    finally:
        done.set()
        thread.join()
        for conn in accepted:
            conn.close()
        listener.close()


def test_a_stuck_imap_call_blocks_no_scan_starves_the_watchdog_and_sigterm_still_exits(
        tmp_path: Path, smtp_server: StartServer,
        silent_server: tuple[int, list[socket.socket]]) -> None:
    port, accepted = silent_server
    server = smtp_server()
    fill_inbox(tmp_path)
    config = write_daemon_config(
        tmp_path, port=server.port, digest={"scan_seconds": 0.2, "dispatch_seconds": 0.2},
        subscribers=[{"email": "reader@example.org", "send_at": "00:00", "timezone": "UTC"}],
        extra=(f'[imap]\nhost = "127.0.0.1"\nport = {port}\nsecurity = "none"\n'
               'username = "reader"\npassword_env = "DIGEST_TEST_IMAP_PASSWORD"\n'
               "timeout = 300\npoll_seconds = 1\n"))
    notify = NotifySocket(tmp_path / "notify.sock")
    received = notify.received

    try:
        with daemon_process(config, tmp_path / "daemon.log",
                            env={"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "1000000",
                                 "DIGEST_TEST_IMAP_PASSWORD": "secret"}) as daemon:
            wait_until(lambda: len(accepted) >= 1, timeout=60, what="the IMAP login to start")
            # The reply run now waits on the silent server: a scan must still happen.
            junk = tmp_path / "inbox" / "junk.json"
            junk.write_text("{", encoding="utf-8")
            os.utime(junk, (time.time() - 60,) * 2)
            wait_until(lambda: (tmp_path / "inbox" / "failed" / "junk.json.reason").exists(),
                       timeout=30, what="the scan while IMAP hangs")
            received(2.5)  # past the watchdog interval: the stuck run starves it from here
            assert "WATCHDOG=1" not in received(2.0)
            assert daemon.stop() == 0  # SIGTERM: no waiting on the stuck thread past the grace
    finally:
        notify.close()
    log = daemon.log()
    assert "job made no progress for 1s" in log  # replies (a loaded machine may name another first)
    assert "exiting without waiting for it" in log


def test_a_why_reply_in_the_daemon_fits_the_corpus_off_the_event_loop(
        tmp_path: Path, smtp_server: StartServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Papers arrive after the digest; a ``why`` reply then needs a refit: not on the loop."""
    import asyncio
    import threading
    from email.message import EmailMessage

    from digest.daemon.loop import Daemon
    from digest.rank import CorpusIndex

    from .helpers import sample_dumps

    first, second = sample_dumps()[:2]
    server = smtp_server()
    fill_inbox(tmp_path, [first])
    config = write_daemon_config(
        tmp_path, port=server.port,
        subscribers=[{"email": "reader@example.org", "send_at": "00:00", "timezone": "UTC"}],
        digest={"scan_seconds": 0.2, "dispatch_seconds": 0.2, "max_late_hours": 24},
        extra='[maildir]\npath = "Maildir"\npoll_seconds = 0.2\n')
    on_loop: list[bool] = []
    fit = CorpusIndex.fit.__func__  # type: ignore[attr-defined]

    def watched_fit(cls: type[CorpusIndex], papers: object) -> CorpusIndex:
        on_loop.append(threading.current_thread() is threading.main_thread())
        return fit(cls, papers)  # type: ignore[no-any-return]

    monkeypatch.setattr(CorpusIndex, "fit", classmethod(watched_fit))

    async def until(predicate: object, what: str) -> None:
        for _ in range(600):
            if predicate():  # type: ignore[operator]
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")

    async def scenario() -> None:
        daemon = Daemon(config)
        running = asyncio.create_task(daemon.run())
        await until(lambda: len(server.messages) == 1, "the digest")
        seq = daemon.runtime.store.corpus_seq()
        fill_inbox(tmp_path, [second])
        await until(lambda: daemon.runtime.store.corpus_seq() > seq, "the new papers")
        digest = server.messages[0].message
        reply = EmailMessage()
        reply["From"] = "Reader <reader@example.org>"
        reply["To"] = str(digest["Reply-To"])
        reply["Subject"] = f"Re: {digest['Subject']}"
        reply["Message-ID"] = "<why-1@example.org>"
        reply["In-Reply-To"] = str(digest["Message-ID"])
        reply.set_content("why 1\n")
        maildir = tmp_path / "Maildir"
        (maildir / "tmp").mkdir(parents=True, exist_ok=True)
        (maildir / "new").mkdir(exist_ok=True)
        (maildir / "tmp" / "why.eml").write_bytes(reply.as_bytes())
        (maildir / "tmp" / "why.eml").rename(maildir / "new" / "why.eml")
        await until(lambda: len(server.messages) == 2, "the confirmation")
        daemon.stop.set()
        assert await running == 0

    asyncio.run(scenario())
    assert "About paper 1" in str(server.messages[1].message.get_body(("plain",)).get_content())  # type: ignore[union-attr]
    assert on_loop and not any(on_loop), on_loop  # two fits at least, none on the loop
    assert len(on_loop) >= 2


def test_a_refused_imap_login_is_held_not_retried_every_poll(
        tmp_path: Path, smtp_server: StartServer, dovecot: Dovecot) -> None:
    """A wrong IMAP password: one login, then a 5 min hold (not one per poll); a reload
    (SIGHUP) tries again at once."""
    import signal

    server = smtp_server()
    fill_inbox(tmp_path)
    config = write_daemon_config(
        tmp_path, port=server.port, digest={"scan_seconds": 0.2, "dispatch_seconds": 0.2},
        subscribers=[{"email": "reader@example.org", "send_at": "00:00", "timezone": "UTC"}],
        extra=(f'[imap]\nhost = "127.0.0.1"\nport = {dovecot.port}\nsecurity = "none"\n'
               f'username = "{dovecot.user}"\npassword_env = "DIGEST_TEST_IMAP_PASSWORD"\n'
               "poll_seconds = 0.2\nidle = false\n"))
    with daemon_process(config, tmp_path / "daemon.log",
                        env={"DIGEST_TEST_IMAP_PASSWORD": "not-the-password"}) as daemon:
        wait_until(lambda: "login refused" in daemon.log(), timeout=60, what="the first login")
        time.sleep(6)  # 30 polls' worth of time, and more than Dovecot's delay after a failure
        assert daemon.log().count("login refused") == 1
        daemon.signal(signal.SIGHUP)
        wait_until(lambda: daemon.log().count("login refused") == 2, timeout=30,
                   what="the login tried again after the reload")
        assert daemon.stop() == 0
    log = daemon.log()
    assert "many providers need an app password" in log
    assert log.count("IMAP logins held for 5 min") == 2  # the reload started it afresh
