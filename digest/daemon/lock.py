"""One sender per state: an OS lock on a file beside the SQLite database.

``digest run`` holds it for its whole life, ``digest send`` while it sends.
The lock is ``flock`` on ``STATE.lock``: the kernel releases it when the
process ends, however it ends (``kill -9`` included), so a stale lock never
blocks a restart. The file holds the holder's pid and role, only to name it
in the error a second sender gets. ``flock`` locks belong to one open file,
so a second lock in the same process is refused too (as it should be).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
from pathlib import Path
from types import TracebackType
from typing import Self

from ..errors import StateLocked, StoreError

log = logging.getLogger(__name__)


def process_owner() -> str:
    """This process as a claim owner: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def lock_path(state: Path) -> Path:
    """``digest.sqlite3`` -> ``digest.sqlite3.lock`` beside the real database.

    Named from the resolved path, so a symlinked state file or folder (two
    configs naming one database two ways) shares one lock.
    """
    real = Path(state).resolve()
    return real.with_name(real.name + ".lock")


def owner_alive(owner: str | None) -> bool:
    """Whether a claim's owner (``host:pid``) is a live process on this host.

    False for None (a claim from before owners were recorded), for another
    host (its liveness cannot be seen from here; the state lock decides) and
    for a pid that no longer exists. A pid reused by an unrelated process
    counts as alive: the claim waits rather than risk a second copy.
    """
    if not owner:
        return False
    host, _, pid_text = owner.rpartition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, another user's
    except OSError:
        return False
    return True


class StateLock:
    """The exclusive sender lock of one state database.

    ``acquire(role)`` takes it at once or raises ``StateLocked`` naming the
    holder (``role`` is "daemon", "send" or "replies"); ``release`` gives it back.
    """

    def __init__(self, state: Path) -> None:
        self.state = Path(state)
        self.path = lock_path(self.state)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, role: str) -> None:
        if self._fd is not None:
            return
        self._refuse_hard_links()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(f"{self.state}: cannot open the state database (its lock file "
                             f"{self.path.name}: {exc})") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StoreError(f"{self.path}: cannot lock the state: {exc}") from exc
            raise self._locked(role) from None
        # Ours: say who holds it, for the message the next one gets.
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {role}\n".encode(), 0)
        except OSError as exc:  # a full or read-only disk: the daemon cannot run here
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise StoreError(f"{self.path}: cannot write the lock file: "
                             f"{exc.strerror or exc}") from exc
        self._fd = fd
        log.debug("state %s: locked by pid %d (%s)", self.state, os.getpid(), role)

    def _refuse_hard_links(self) -> None:
        """A state file with a second name (a hard link) would be locked under each name
        apart, and SQLite keeps its write-ahead log per name: two senders could then send
        every digest twice. A symlink is fine (the lock is named from the resolved path)."""
        try:
            links = os.stat(self.state).st_nlink
        except OSError:
            return  # not created yet: nothing can link to it
        if links > 1:
            raise StoreError(f"{self.state}: the state database has {links} names (hard "
                             "links); use one path for it (a symlink is fine), or copy it")

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def forget_in_child(self) -> None:
        """In a forked child: close the inherited descriptor, leaving the parent's lock held.

        ``flock`` belongs to the open file, which the child shares: unlocking here
        would unlock the parent, while keeping the descriptor would keep the lock
        alive after the parent dies, until the child ends too.
        """
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def holder(self) -> tuple[int | None, str]:
        """(pid, role) written by the process holding the lock; (None, "") when unknown."""
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace").split()
        except OSError:
            return None, ""
        if len(text) >= 2 and text[0].isdigit():
            return int(text[0]), text[1]
        return None, ""

    def _locked(self, role: str) -> StateLocked:
        pid, holder_role = self.holder()
        who = f"pid {pid}" if pid is not None else "pid unknown"
        if holder_role == "daemon":
            if role == "daemon":
                return StateLocked(f"another digest daemon ({who}) holds {self.state}", pid)
            if role == "replies":
                return StateLocked(
                    f"a digest daemon ({who}) holds {self.state} and reads the replies itself; "
                    "nothing was read (stop the daemon first to read them by hand)", pid)
            return StateLocked(
                f"a digest daemon ({who}) holds {self.state} and sends the due digests itself; "
                "nothing was sent (stop the daemon first to send by hand)", pid)
        return StateLocked(f"another digest sender (digest send, {who}) holds {self.state}; "
                           "wait for it to finish", pid)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
