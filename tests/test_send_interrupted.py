"""``digest send --force`` stopped by SIGTERM (or Ctrl-C): it finishes or gives up the
messages in flight within the grace period, prints the summary the normal end prints plus
what stays claimed for the next run, and exits 143 (130 for SIGINT), as the README says.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from digest.store import Store

from .daemon_helpers import fill_inbox, recipient, wait_until, write_daemon_config
from .helpers import ROOT
from .smtp_helpers import (  # noqa: F401  (smtp_server_fixture provides the smtp_server fixture)
    StartServer,
    smtp_server_fixture,
)
from .test_senders import FAST, digest_cli, subscribers

pytestmark = pytest.mark.slow  # child processes and real servers


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_send_stopped_by_a_signal_prints_its_summary_and_keeps_the_claimed_digest(
        tmp_path: Path, smtp_server: StartServer, signum: int, code: int) -> None:
    server = smtp_server(delay=0.2)
    fill_inbox(tmp_path)
    config = write_daemon_config(tmp_path, port=server.port, subscribers=subscribers(12),
                                 digest=FAST, smtp={"connections": 1})
    assert digest_cli(config, "ingest").returncode == 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "digest", "--config", str(config), "send", "--force"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        start_new_session=True)
    try:
        wait_until(lambda: len(server.messages) >= 3, what="three digests sent")
        server.set_delay(600)  # the next message waits at its 250 far beyond the grace period
        wait_until(lambda: server.data_commands > len(server.messages), what="one in flight")
        if signum == signal.SIGINT:  # Ctrl-C in a terminal: the whole process group
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)  # the grace period, not the 600 s
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == code, out + err
    assert "Traceback" not in err, err
    sent = len(server.messages)
    with Store(tmp_path / "var" / "state.sqlite3") as store:
        # The one in flight and those claimed in its batch: not lost, not marked sent.
        claimed = store.unsent_digests()
        statuses = Counter(row.status for sub in subscribers(12)
                           for row in store.digests_of(str(sub["email"])))
    assert 1 <= len(claimed) and sent + len(claimed) < 12 and statuses == {"sent": sent, "claimed": len(claimed)}
    # The normal summary: one line per subscriber sent; then what stays claimed.
    lines = out.splitlines()
    assert sum(1 for line in lines if ": sent 3 of " in line) == sent
    assert [line for line in lines if "stays claimed" in line] == [
        f"{row.subscriber}: the digest of {row.local_date} stays claimed; the next run (or "
        "the daemon) resends it with the same Message-ID" for row in claimed]
    name = signal.Signals(signum).name
    assert err.strip().splitlines()[-1] == (
        f"Interrupted ({name}): {sent} sent, {len(claimed)} claimed for the next run, "
        f"{12 - sent - len(claimed)} not reached; run send again to finish.")
    # The next run resends the claimed digest (same Message-ID) and sends the rest: one each.
    server.set_delay(0)
    again = digest_cli(config, "send", "--force")
    assert again.returncode == 0, again.stdout + again.stderr
    copies = Counter(recipient(m.message) for m in server.messages)
    assert copies == {str(sub["email"]): 1 for sub in subscribers(12)}
    for row in claimed:  # resent byte for byte: the same Message-ID
        [resent] = [m for m in server.messages if recipient(m.message) == row.subscriber]
        assert str(resent.message["Message-ID"]) == row.message_id


def test_a_claimed_digest_whose_resend_is_cut_is_not_also_reported_as_sent(
        tmp_path: Path, smtp_server: StartServer) -> None:
    """A digest left claimed by an earlier run makes its day look sent; when its resend is
    cut by a stop, the run said both "today's digest was already sent" and "stays claimed"
    (review of issue 13). The cut resend is its outcome: the day is counted once."""
    server = smtp_server(delay=0.2)
    fill_inbox(tmp_path)
    config = write_daemon_config(tmp_path, port=server.port, subscribers=subscribers(12),
                                 digest=FAST, smtp={"connections": 1})
    assert digest_cli(config, "ingest").returncode == 0

    def send_then_stop(wait_for: int) -> tuple[str, str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "digest", "--config", str(config), "send", "--force"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            wait_until(lambda: server.data_commands >= wait_for, what="a message in flight")
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 143, out + err
        assert "Traceback" not in err, err
        return out, err

    server.set_delay(600)  # every 250 after DATA waits far beyond the grace period
    send_then_stop(1)
    with Store(tmp_path / "var" / "state.sqlite3") as store:
        claimed = store.unsent_digests()
    assert claimed
    out, _ = send_then_stop(server.data_commands + 1)  # the resend written, its 250 waits
    for row in claimed:
        said = [line for line in out.splitlines() if line.startswith(f"{row.subscriber}:")]
        assert not [line for line in said if "already sent" in line], said
        assert any("stays claimed" in line for line in said), said
