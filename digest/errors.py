"""The project's exceptions: one base class, a few named kinds.

Library code raises these; only the CLI turns them into a one-line
``Error: ...`` message and an exit code.
"""

from __future__ import annotations


class DigestError(Exception):
    """Base class of every error paper-digest reports to a user."""


class ConfigError(DigestError):
    """The config file is unreadable, malformed or has a wrong key or value."""

    def __init__(self, file: str, key: str | None, message: str, line: int | None = None):
        self.file = file
        self.key = key
        self.message = message
        self.line = line
        place = file if line is None else f"{file}:{line}"
        where = ": ".join(part for part in (place, key) if part)  # file is "" for a secret
        super().__init__(f"{where}: {message}")


class InputFileError(DigestError):
    """An input file (a dump, a benchmark dataset) is malformed at a file and line."""

    def __init__(self, file: str, message: str, line: int | None = None):
        self.file = file
        self.message = message
        self.line = line
        where = file if line is None else f"{file}:{line}"
        super().__init__(f"{where}: {message}")


class DumpError(InputFileError):
    """A dump file cannot be parsed; the reason says where and why."""


class StoreError(DigestError):
    """The SQLite state cannot be opened, migrated or written."""


class StoreWriteError(StoreError):
    """A write to the state database failed for want of room or permission (disk full,
    read-only file or folder); the transaction was rolled back, so nothing is half-written.
    The daemon logs it and tries again on its next tick."""


class SendError(DigestError, ConnectionError):
    """A message could not be delivered over SMTP.

    ``kind`` says whose problem it is, from the server's answer:

    - ``recipient``: 5xx at RCPT, the address is refused for good (it bounces);
    - ``message``: 5xx after DATA (552, 554), this message only, not the address;
    - ``deferred``: 4xx answers until the attempts ran out; tried again later;
    - ``server``: the server cannot be reached, is silent or drops the connection;
      the rest of the dispatch waits for the next tick;
    - ``config``: login refused (535, 534), TLS or greeting failure, sender refused:
      the settings must change; the message names the fix.

    ``permanent`` (the digest is given up at once) is true for ``recipient`` and
    ``message``; ``recipient`` is then the address, else the server (``host:port``).
    """

    KINDS = ("recipient", "message", "deferred", "server", "config")

    def __init__(self, recipient: str, message: str, permanent: bool | None = None,
                 *, kind: str | None = None, held_back: bool = False):
        if kind is None:
            kind = "recipient" if permanent else "deferred"
        if kind not in self.KINDS:
            raise ValueError(f"unknown send error kind {kind!r}")
        self.recipient = recipient
        self.kind = kind
        self.permanent = kind in ("recipient", "message")
        # A 5xx at RCPT before the server accepted any address: not blamed on the address
        # yet (kind ``deferred``); worth one more try once the server has accepted one.
        self.held_back = held_back
        super().__init__(f"{recipient}: {message}")

    @property
    def session(self) -> bool:
        """True when the failure is the server's or the settings', not this message's."""
        return self.kind in ("server", "config")


class StateLocked(DigestError):
    """Another process sends from the same state (it holds the lock beside the database)."""

    def __init__(self, message: str, pid: int | None):
        self.pid = pid
        super().__init__(message)


class UnknownSubscriber(DigestError):
    """A command named a subscriber that is not in the config."""


class FetchError(DigestError):
    """A listing could not be fetched from a ``[[sources]]`` URL; the reason says why.

    ``transient`` failures (a 5xx, a 429, a timeout, a dropped connection) are
    tried again sooner than the next scheduled fetch; ``retry_after`` (seconds)
    is the server's Retry-After, when it gave one.
    """

    def __init__(self, url: str, message: str, *, transient: bool,
                 status: int | None = None, retry_after: float | None = None):
        self.url = url
        self.reason = message
        self.transient = transient
        self.status = status
        self.retry_after = retry_after
        super().__init__(f"{url}: {message}")
