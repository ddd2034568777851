"""systemd's notify protocol: readiness, liveness and a status line.

Under ``Type=notify`` systemd passes a unix datagram socket in
``$NOTIFY_SOCKET`` and reads ``KEY=value`` lines from it (sd_notify(3)):
``READY=1`` once started, ``WATCHDOG=1`` at least every ``WatchdogSec=``
(systemd says how often in ``$WATCHDOG_USEC``), ``STATUS=...`` shown by
``systemctl status``, ``STOPPING=1`` on the way out. A few lines of stdlib
socket code; outside systemd (no ``$NOTIFY_SOCKET``) every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify datagrams to ``$NOTIFY_SOCKET``, when there is one."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        # An abstract socket is written "@name" and means a leading NUL byte.
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_seconds = _watchdog_seconds(env)
        self._socket: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def ready(self, status: str) -> None:
        self.send(f"READY=1\nSTATUS={_one_line(status)}\nMAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={_one_line(status)}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def stopping(self, status: str) -> None:
        self.send(f"STOPPING=1\nSTATUS={_one_line(status)}")

    def send(self, text: str) -> None:
        """One datagram; a failure is logged once and never stops the daemon."""
        if not self.enabled:
            return
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto(text.encode("utf-8", "replace"), self.address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("daemon: cannot notify systemd at %s: %s", self.address, exc)

    def close(self) -> None:
        sock, self._socket = self._socket, None
        if sock is not None:
            sock.close()


def _watchdog_seconds(env: dict[str, str] | os._Environ[str]) -> float | None:
    """``WatchdogSec=`` in seconds, when systemd set one for this very process."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (a parent shell)
    return int(usec) / 1_000_000


def _one_line(text: str) -> str:
    return " ".join(text.split())[:400]
