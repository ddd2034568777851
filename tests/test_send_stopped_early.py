"""``digest send --force`` stopped by SIGTERM or Ctrl-C while it starts (its imports, the
config, the database), before the dispatch handles signals: nothing is claimed yet, and it
says so in the one summary line a later stop prints, with exit 143 (130), never silently
and never with a traceback.

The child is held at a known moment of its start (the import of ``digest.daemon``, which
``send`` makes after reading the config) by a ``sitecustomize`` that blocks on a FIFO
until the test has signalled it: a real process and a real signal, no mock.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from digest.store import Store

from .daemon_helpers import fill_inbox, write_daemon_config
from .helpers import ROOT
from .smtp_helpers import (  # noqa: F401  (smtp_server_fixture provides the smtp_server fixture)
    StartServer,
    smtp_server_fixture,
)
from .test_senders import FAST, digest_cli, subscribers

pytestmark = pytest.mark.slow  # child processes

HOLD = '''
import os, sys


class _HoldAtDaemonImport:
    def find_spec(self, name, path=None, target=None):
        if name == "digest.daemon":
            sys.meta_path.remove(self)
            with open(os.environ["DIGEST_TEST_HOLD"], "rb") as fifo:
                fifo.read()
        return None


sys.meta_path.insert(0, _HoldAtDaemonImport())
'''


def _held(fifo: Path, proc: subprocess.Popen[str]) -> int:
    """Wait until the child reads the FIFO (it is held); the writing end, to close later."""
    deadline = time.monotonic() + 120
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: no reader yet
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the child never reached the hold (exit {proc.poll()})")
            time.sleep(0.01)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_while_send_starts_prints_the_summary_line(
        tmp_path: Path, smtp_server: StartServer, signum: int, code: int) -> None:
    server = smtp_server()
    fill_inbox(tmp_path)
    config = write_daemon_config(tmp_path, port=server.port, subscribers=subscribers(4),
                                 digest=FAST)
    assert digest_cli(config, "ingest").returncode == 0
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOLD, encoding="utf-8")
    fifo = tmp_path / "hold.fifo"
    os.mkfifo(fifo)
    env = {**os.environ, "PYTHONPATH": f"{hook}{os.pathsep}{ROOT}",
           "DIGEST_TEST_HOLD": str(fifo)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "digest", "--config", str(config), "send", "--force"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    writer = _held(fifo, proc)
    try:
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    finally:
        os.close(writer)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, (proc.returncode, out, err)
    assert "Traceback" not in err, err
    name = signal.Signals(signum).name
    assert (out, err) == ("", (f"Interrupted ({name}): 0 sent, 0 claimed for the next run, "
                               "4 not reached; run send again to finish.\n"))
    assert server.messages == []
    with Store(tmp_path / "var" / "state.sqlite3") as store:
        assert store.unsent_digests() == []
    again = digest_cli(config, "send", "--force")  # and the next run sends everyone
    assert again.returncode == 0, again.stdout + again.stderr
    assert len(server.messages) == 4
