"""The reply to a message's end may come later than ``[smtp] timeout`` (RFC 5321 4.5.3.2.6
gives the server 10 minutes there): ``[smtp] data_timeout`` waits for it, so a slow 250 is
no duplicate, and a SIGTERM during that wait still ends the daemon in bounded time, the
digest left claimed and resent with the same Message-ID.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from digest.config import load_config
from digest.errors import ConfigError, SendError
from digest.mailer import Mailer
from digest.store import Store

from .daemon_helpers import (
    NotifySocket,
    daemon_process,
    fill_inbox,
    recipient,
    wait_until,
    write_daemon_config,
)
from .smtp_helpers import (  # noqa: F401  (smtp_server_fixture provides the smtp_server fixture)
    StartServer,
    smtp_server_fixture,
)
from .test_mailer import QUICK, note, run

FAST = {"scan_seconds": 0.2, "dispatch_seconds": 0.2, "max_late_hours": 24}


def readers(count: int) -> list[dict[str, object]]:
    return [{"email": f"reader{n:02d}@example.org", "send_at": "00:00", "timezone": "UTC",
             "max_papers": 3} for n in range(count)]


def short_timeout(config: Path, seconds: float) -> None:
    """Set ``[smtp] timeout`` (write_daemon_config writes 10 s)."""
    text = config.read_text(encoding="utf-8")
    assert "timeout = 10\n" in text
    config.write_text(text.replace("timeout = 10\n", f"timeout = {seconds}\n"), encoding="utf-8")


def test_a_250_slower_than_the_timeout_but_within_data_timeout_is_one_delivery(
        smtp_server: StartServer) -> None:
    server = smtp_server(delay=1.5)  # the 250 after the message's end: 3x the timeout
    config = server.smtp_config(timeout=0.5, data_timeout=10.0)

    async def send() -> dict[str, object]:
        async with Mailer(config, **QUICK) as mailer:
            return dict(await mailer.send(note()))

    assert run(send()) == {}
    assert len(server.messages) == 1 and server.data_commands == 1


def test_the_short_timeout_still_applies_to_the_other_commands() -> None:
    from digest.bench.smtp_servers import RawServer

    server = RawServer("hang")  # accepts and never greets
    config = load_config_text(f"""
[smtp]
host = "127.0.0.1"
port = {server.port}
security = "none"
timeout = 0.5
data_timeout = 600
""")
    started = time.monotonic()
    try:
        with pytest.raises(SendError) as caught:
            run(Mailer(config.smtp, **QUICK).send(note()))  # type: ignore[attr-defined]
    finally:
        server.stop()
    assert caught.value.kind == "server"
    assert time.monotonic() - started < 60  # the greeting waited 0.5 s, not 600 (a hang)


def load_config_text(text: str) -> object:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "digest.toml"
        path.write_text(text + '\n[[subscribers]]\nemail = "a@example.org"\n', encoding="utf-8")
        return load_config(path)


@pytest.mark.parametrize("value", ["0", "-1", "3601", '"ten"', "nan"])
def test_data_timeout_is_validated_like_the_other_timeouts(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config_text(f'[smtp]\nhost = "127.0.0.1"\ndata_timeout = {value}\n')
    assert "smtp.data_timeout" in str(caught.value)


def test_data_timeout_defaults_to_ten_minutes() -> None:
    config = load_config_text('[smtp]\nhost = "127.0.0.1"\n')
    assert config.smtp.data_timeout == 600.0  # type: ignore[attr-defined]


@pytest.mark.slow
def test_a_dispatch_to_a_relay_slow_after_data_sends_each_digest_once(
        tmp_path: Path, smtp_server: StartServer) -> None:
    server = smtp_server(delay=1.0)
    fill_inbox(tmp_path)
    config = write_daemon_config(tmp_path, port=server.port, subscribers=readers(3),
                                 digest=FAST, smtp={"connections": 1, "data_timeout": 30})
    short_timeout(config, 0.3)
    with daemon_process(config, tmp_path / "daemon.log") as daemon:
        wait_until(lambda: len(server.messages) >= 3, what="the three digests")
        time.sleep(1.5)  # more ticks: nothing is resent
        assert daemon.stop() == 0
    assert Counter(recipient(m.message) for m in server.messages) == {
        r["email"]: 1 for r in readers(3)}
    with Store(tmp_path / "var" / "state.sqlite3") as store:
        assert store.unsent_digests() == []
    assert "timed out" not in daemon.log()


@pytest.mark.slow
def test_sigterm_while_waiting_for_the_250_waits_up_to_data_timeout_and_keeps_the_digest(
        tmp_path: Path, smtp_server: StartServer) -> None:
    """The stop waits for the reply to a message written whole (cancelled, it could be a
    second copy), but no longer than ``data_timeout``: a relay that never answers leaves
    the digest claimed, resent on the next start (was: cancelled after the 5 s grace)."""
    server = smtp_server(delay=600)  # the message's end is answered after set_delay(0)
    fill_inbox(tmp_path)
    config = write_daemon_config(tmp_path, port=server.port, subscribers=readers(1),
                                 digest=FAST, smtp={"connections": 1, "data_timeout": 12})
    short_timeout(config, 0.5)
    with daemon_process(config, tmp_path / "first.log") as daemon:
        wait_until(lambda: server.data_commands >= 1, what="the digest's DATA")
        time.sleep(1.0)  # past the 0.5 s timeout: still waiting (data_timeout is 12 s)
        assert daemon.proc.poll() is None and server.messages == []
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit(timeout=60) == 0  # data_timeout, not the server's 600 s
    assert "waiting up to 12s for the server's reply to 1 message(s) sent whole" in daemon.log()
    with Store(tmp_path / "var" / "state.sqlite3") as store:
        [claimed] = store.unsent_digests()  # not lost: claimed, resent on the next start
    server.set_delay(0)
    time.sleep(0.3)  # the server saw the connection go: nothing recorded
    assert server.messages == []
    with daemon_process(config, tmp_path / "second.log") as daemon:
        wait_until(lambda: len(server.messages) >= 1, what="the resent digest")
        time.sleep(0.5)
    [resent] = server.messages
    assert str(resent.message["Message-ID"]) == claimed.message_id
    with Store(tmp_path / "var" / "state.sqlite3") as store:
        assert store.unsent_digests() == []


def test_the_watchdog_is_fed_while_a_relay_takes_its_time_after_data(
        tmp_path: Path, smtp_server: StartServer) -> None:
    """WatchdogSec= shorter than the wait for a slow 250: still fed, no restart, one copy."""
    server = smtp_server(delay=3.0)
    fill_inbox(tmp_path)
    config = write_daemon_config(tmp_path, port=server.port, subscribers=readers(1),
                                 digest=FAST, smtp={"connections": 1, "data_timeout": 30})
    short_timeout(config, 0.5)
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        with daemon_process(config, tmp_path / "daemon.log",
                            env={"NOTIFY_SOCKET": notify.address,
                                 "WATCHDOG_USEC": "1000000"}) as daemon:
            wait_until(lambda: server.data_commands >= 1, what="the digest's DATA")
            notes = notify.received(2.5)  # within the 3 s the server takes to answer
            wait_until(lambda: len(server.messages) >= 1, what="the digest")
            assert daemon.stop() == 0
    finally:
        notify.close()
    assert any("WATCHDOG=1" in note for note in notes)  # fed while the 250 was awaited
    assert "made no progress" not in daemon.log()
    assert [recipient(m.message) for m in server.messages] == ["reader00@example.org"]
