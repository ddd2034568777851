"""Where replies wait: an IMAP mailbox or a Maildir folder.

Both hand out the waiting messages as raw bytes with an id, and are told
afterwards which ids are done. IMAP fetches with ``BODY.PEEK[]`` (reading does
not set ``\\Seen``) and sets ``\\Seen`` (or moves the message to the processed
folder) only when told, which the caller does after the commands are committed.
A Maildir message moves from ``new/`` to ``cur/`` with the ``S`` flag, the same
step a mail client takes when it shows a message.

imapclient is synchronous: every call here blocks, and the async caller runs
it in a thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import logging
import mailbox
import os
import socket
import ssl
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError, LoginError

from ..config import ImapConfig, MaildirConfig
from ..errors import DigestError
from ..mailer import certificate_names, hostname_mismatch, mismatch_problem

log = logging.getLogger(__name__)

FETCH_BATCH = 100  # messages per FETCH: one round trip each, memory bounded
IDLE_STEP_SECONDS = 1.0  # how often an IDLE wait looks at the stop flag


class MailboxError(DigestError, ConnectionError):
    """The reply mailbox cannot be reached, logged into or read."""


class MailboxLoginError(MailboxError):
    """The IMAP server refused the login: the settings must change (the daemon holds logins)."""


@dataclass(frozen=True)
class Waiting:
    """One message waiting in the mailbox: an id the mailbox knows it by, and its bytes."""

    id: str
    raw: bytes


class ImapMailbox:
    """One IMAP connection to the configured mailbox (blocking calls)."""

    def __init__(self, config: ImapConfig):
        self.config = config
        self._client: IMAPClient | None = None

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def where(self) -> str:
        cfg = self.config
        return f"imap {cfg.username}@{cfg.host}:{cfg.port}/{cfg.mailbox}"

    def open(self) -> None:
        cfg = self.config
        password = cfg.password()
        # ca_file: a self-signed or private-CA server certificate, trusted without turning
        # verification off.
        context = ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None)
        if not cfg.verify_tls:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        try:
            client = IMAPClient(cfg.host, port=cfg.port, ssl=cfg.security == "tls",
                                ssl_context=context, timeout=cfg.timeout)
        except (OSError, IMAPClientError) as exc:
            self._mismatch(exc)
            raise MailboxError(f"{self.where}: cannot connect: {exc}") from exc
        try:
            if cfg.security == "starttls":
                try:
                    client.starttls(context)
                except (OSError, IMAPClientError) as exc:
                    self._mismatch(exc)
                    raise
            client.login(cfg.username, password or "")
        except LoginError as exc:
            _quietly(client.shutdown)
            raise MailboxLoginError(
                f"{self.where}: login refused ({_describe(exc)}): wrong password? many "
                "providers need an app password (check [imap] username and password_env or "
                "password_file)") from exc
        except (OSError, IMAPClientError) as exc:
            _quietly(client.shutdown)
            raise MailboxError(f"{self.where}: {_describe(exc)}") from exc
        try:
            client.select_folder(cfg.mailbox)
        except (OSError, IMAPClientError) as exc:
            _quietly(client.shutdown)
            raise MailboxError(f"{self.where}: {_describe(exc)}") from exc
        self._client = client

    def _mismatch(self, exc: BaseException) -> None:
        """A certificate for another name: raise saying which name to set as host."""
        if not hostname_mismatch(exc):
            return
        cfg = self.config
        names = certificate_names(cfg.host, cfg.port, protocol="imap", security=cfg.security,
                                  ca_file=cfg.ca_file, timeout=cfg.timeout)
        raise MailboxError(f"{self.where}: {mismatch_problem(cfg.host, names)} under "
                           "[imap]") from exc

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            _quietly(client.logout)

    def _require(self) -> IMAPClient:
        if self._client is None:
            raise RuntimeError("the IMAP mailbox is not open")
        return self._client

    def waiting_ids(self) -> list[str]:
        """UIDs of the messages not yet seen (and not deleted), oldest first."""
        try:
            uids = self._require().search(["UNSEEN", "UNDELETED"])
        except (OSError, IMAPClientError) as exc:
            raise MailboxError(f"{self.where}: SEARCH failed: {_describe(exc)}") from exc
        return [str(uid) for uid in sorted(uids)]

    def fetch(self, ids: Sequence[str]) -> list[Waiting]:
        """The messages' bytes, fetched with BODY.PEEK[] so that reading sets no flag."""
        if not ids:
            return []
        try:
            data = self._require().fetch([int(i) for i in ids], ["BODY.PEEK[]"])
        except (OSError, IMAPClientError) as exc:
            raise MailboxError(f"{self.where}: FETCH failed: {_describe(exc)}") from exc
        found = []
        for uid in ids:
            item = data.get(int(uid), {})
            raw = item.get(b"BODY[]")
            if isinstance(raw, bytes):
                found.append(Waiting(uid, raw))
            else:  # expunged by someone else meanwhile
                log.warning("%s: message %s vanished before it was read", self.where, uid)
        return found

    def done(self, ids: Sequence[str]) -> None:
        """Mark processed: ``\\Seen``, and moved to the processed folder when one is configured."""
        if not ids:
            return
        client = self._require()
        uids = [int(i) for i in ids]
        try:
            client.add_flags(uids, [b"\\Seen"], silent=True)
            target = self.config.processed_mailbox
            if target:
                if not client.folder_exists(target):
                    client.create_folder(target)
                if client.has_capability("MOVE"):
                    client.move(uids, target)
                else:
                    client.copy(uids, target)
                    client.delete_messages(uids, silent=True)
                    if client.has_capability("UIDPLUS"):
                        client.uid_expunge(uids)
                    else:
                        client.expunge()
        except (OSError, IMAPClientError) as exc:
            raise MailboxError(f"{self.where}: cannot mark messages processed: "
                               f"{_describe(exc)}") from exc

    def wait_for_news(self, seconds: float, stopped: Callable[[], bool]) -> bool:
        """IMAP IDLE for up to ``seconds``; True when the server announced new mail.

        Returns False at once (without waiting) when the server has no IDLE.
        """
        client = self._require()
        if not client.has_capability("IDLE"):
            return False
        deadline = time.monotonic() + seconds
        try:
            client.idle()
            try:
                while not stopped():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    responses = client.idle_check(timeout=min(IDLE_STEP_SECONDS, remaining))
                    if any(len(r) > 1 and r[1] in (b"EXISTS", b"RECENT") for r in responses):
                        return True
                return False
            finally:
                client.idle_done()
        except (OSError, IMAPClientError) as exc:
            raise MailboxError(f"{self.where}: IDLE failed: {_describe(exc)}") from exc

    def append(self, raw: bytes, flags: Sequence[bytes] = ()) -> None:
        """Put a message into the mailbox (benchmarks and tests deliver replies this way)."""
        try:
            self._require().append(self.config.mailbox, raw, flags=list(flags))
        except (OSError, IMAPClientError) as exc:
            raise MailboxError(f"{self.where}: APPEND failed: {_describe(exc)}") from exc


class MaildirMailbox:
    """A Maildir folder: new/ and unseen cur/ messages are waiting."""

    def __init__(self, config: MaildirConfig):
        self.config = config
        self.path = Path(config.path)

    @property
    def where(self) -> str:
        return f"maildir {self.path}"

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        try:
            mailbox.Maildir(self.path, create=True)  # creates new/, cur/, tmp/ when missing
        except OSError as exc:
            raise MailboxError(f"{self.where}: cannot open: {exc.strerror or exc}") from exc

    def close(self) -> None:
        pass

    def _entries(self) -> Iterator[tuple[str, str, str]]:
        """(subfolder, file name, flags) of every message not yet seen, oldest first."""
        found = []
        for sub in ("new", "cur"):
            folder = self.path / sub
            try:
                names = os.listdir(folder)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise MailboxError(f"{self.where}: cannot list {sub}/: {exc.strerror}") from exc
            for name in names:
                if name.startswith("."):
                    continue
                flags = name.partition(":2,")[2] if sub == "cur" else ""
                if "S" in flags or "T" in flags:
                    continue
                try:
                    stamp = (folder / name).stat().st_mtime
                except FileNotFoundError:
                    continue
                found.append((stamp, sub, name, flags))
        for _, sub, name, flags in sorted(found):
            yield sub, name, flags

    def waiting_ids(self) -> list[str]:
        return [f"{sub}/{name}" for sub, name, _ in self._entries()]

    def fetch(self, ids: Sequence[str]) -> list[Waiting]:
        found = []
        for message_id in ids:
            try:
                found.append(Waiting(message_id, (self.path / message_id).read_bytes()))
            except FileNotFoundError:
                log.warning("%s: message %s vanished before it was read", self.where, message_id)
            except OSError as exc:
                raise MailboxError(f"{self.where}: cannot read {message_id}: "
                                   f"{exc.strerror}") from exc
        return found

    def done(self, ids: Sequence[str]) -> None:
        """Move each message to cur/ with the S (seen) flag, as a mail client would."""
        for message_id in ids:
            name = message_id.partition("/")[2]
            key, _, flags = name.partition(":2,")
            target = self.path / "cur" / f"{key}:2,{''.join(sorted(set(flags + 'S')))}"
            try:
                os.replace(self.path / message_id, target)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise MailboxError(f"{self.where}: cannot mark {message_id} seen: "
                                   f"{exc.strerror}") from exc

    def has_new(self) -> bool:
        try:
            with os.scandir(self.path / "new") as entries:
                return any(not entry.name.startswith(".") for entry in entries)
        except OSError:
            return False

    def append(self, raw: bytes) -> None:
        mailbox.Maildir(self.path, create=True).add(raw)


Mailbox = ImapMailbox | MaildirMailbox


def open_mailbox(imap: ImapConfig | None, maildir: MaildirConfig | None) -> Mailbox | None:
    """The configured mailbox (not yet opened), or None when neither is configured."""
    if imap is not None:
        return ImapMailbox(imap)
    if maildir is not None:
        return MaildirMailbox(maildir)
    return None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout | TimeoutError):
        return "timed out"
    text = str(exc)
    if isinstance(exc, bytes):  # pragma: no cover - imapclient may carry bytes messages
        text = exc.decode("utf-8", "replace")
    return text or type(exc).__name__


def _quietly(action: Callable[[], object]) -> None:
    """Close a connection that may already be broken: nothing to report if that fails."""
    try:
        action()
    except (OSError, IMAPClientError) as exc:
        log.debug("imap: closing the connection failed: %s", exc)
