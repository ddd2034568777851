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


class SendError(DigestError, ConnectionError):
    """A message could not be delivered over SMTP."""

    def __init__(self, recipient: str, message: str, permanent: bool):
        self.recipient = recipient
        self.permanent = permanent
        super().__init__(f"{recipient}: {message}")


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
