"""Config: read once at start-up (and on SIGHUP) into frozen dataclasses.

Every wrong key or value is reported with the file and the key path, e.g.
``digest.toml: subscribers[2].timezone: unknown time zone "Europe/Berln"``.
Subscribers are numbered from 0, in file order. Relative paths are taken
relative to the folder holding the config file, so the daemon finds the same
files whatever its working directory.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from datetime import time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .errors import ConfigError

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")

# Defaults, each with its reason.
DEFAULT_MAX_PAPERS = 10  # a digest a person reads over coffee
DEFAULT_SEND_AT = "08:00"  # before the working day starts
DEFAULT_TIMEZONE = "UTC"  # the only zone that is right for nobody and wrong for nobody
DEFAULT_SCAN_SECONDS = 60  # dumps arrive daily; a minute's delay is invisible
DEFAULT_DISPATCH_SECONDS = 60  # send times are given to the minute
DEFAULT_MAX_LATE_HOURS = 12.0  # a digest half a day late is still today's news
DEFAULT_STABLE_SECONDS = 5.0  # a file still being written changes within seconds
DEFAULT_SMTP_TIMEOUT = 30.0  # seconds; long enough for a slow relay, short enough to notice
DEFAULT_SMTP_ATTEMPTS = 4  # a 4xx or a dropped connection: try again, a few times
DEFAULT_SMTP_RETRY_SECONDS = 2.0  # first backoff; doubles per attempt (2, 4, 8 s)
DEFAULT_UNRATED_WEIGHT = 0.2  # shown and left unrated: a weak negative, not a skip
# Feedback ages: a signal this many days old counts half (a year old, a quarter). Interests drift
# over months (a project, a thesis chapter); a week's or a month's feedback should still count fully.
DEFAULT_HALF_LIFE_DAYS = 180.0
DEFAULT_EXPLORE_FRACTION = 0.1  # one slot in ten keeps a profile from narrowing forever
DEFAULT_REPLY_POLL_SECONDS = 60  # replies are read within a minute
DEFAULT_IMAP_TIMEOUT = 30.0  # seconds; as for SMTP
DEFAULT_CONFIRMATIONS_PER_HOUR = 5  # enough for a burst of replies, too few to feed a mail loop


def read_secret(table: str, password_file: Path | None, password_env: str | None) -> str | None:
    """A password from a file (e.g. a systemd credential) or an environment variable."""
    if password_file is not None:
        try:
            return password_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError("", f"{table}.password_file",
                              f"cannot read {password_file}: {exc.strerror}") from exc
    if password_env:
        value = os.environ.get(password_env)
        if value is None:
            raise ConfigError("", f"{table}.password_env",
                              f"environment variable {password_env} is not set")
        return value
    return None


@dataclass(frozen=True)
class SmtpConfig:
    """Where digests are sent from. ``sink`` set means the embedded local sink."""

    host: str = "localhost"
    port: int = 587
    security: str = "starttls"  # starttls | tls | none
    username: str | None = None
    password_env: str | None = None
    password_file: Path | None = None
    sender: str = "Paper Digest <digest@localhost>"
    reply_to: str = "digest+{token}@localhost"
    timeout: float = DEFAULT_SMTP_TIMEOUT
    verify_tls: bool = True
    sink: Path | None = None  # folder the embedded aiosmtpd sink writes .eml/.html to
    attempts: int = DEFAULT_SMTP_ATTEMPTS
    retry_seconds: float = DEFAULT_SMTP_RETRY_SECONDS

    def password(self) -> str | None:
        """The secret, read when needed so it never sits in a config dump."""
        return read_secret("smtp", self.password_file, self.password_env)


@dataclass(frozen=True)
class ImapConfig:
    """The IMAP mailbox replies arrive in (``[imap]``)."""

    host: str
    port: int = 993
    security: str = "tls"  # tls | starttls | none
    username: str = ""
    password_env: str | None = None
    password_file: Path | None = None
    mailbox: str = "INBOX"
    processed_mailbox: str | None = None  # move processed replies here (else only \Seen)
    poll_seconds: float = DEFAULT_REPLY_POLL_SECONDS
    idle: bool = True  # use IMAP IDLE where the server offers it
    timeout: float = DEFAULT_IMAP_TIMEOUT
    verify_tls: bool = True
    confirmations_per_hour: int = DEFAULT_CONFIRMATIONS_PER_HOUR

    def password(self) -> str | None:
        """The secret, read when needed so it never sits in a config dump."""
        return read_secret("imap", self.password_file, self.password_env)


@dataclass(frozen=True)
class MaildirConfig:
    """A Maildir folder a local MTA delivers replies to (``[maildir]``)."""

    path: Path
    poll_seconds: float = DEFAULT_REPLY_POLL_SECONDS
    confirmations_per_hour: int = DEFAULT_CONFIRMATIONS_PER_HOUR


@dataclass(frozen=True)
class RankingConfig:
    unrated_weight: float = DEFAULT_UNRATED_WEIGHT
    explore_fraction: float = DEFAULT_EXPLORE_FRACTION
    half_life_days: float = DEFAULT_HALF_LIFE_DAYS


@dataclass(frozen=True)
class Subscriber:
    email: str
    name: str
    interests: tuple[str, ...] = ()
    seed_papers: tuple[str, ...] = ()
    send_at: time = time(8, 0)
    timezone: ZoneInfo = field(default_factory=lambda: ZoneInfo(DEFAULT_TIMEZONE))
    max_papers: int = DEFAULT_MAX_PAPERS
    days: frozenset[int] = frozenset(range(7))  # 0 = Monday, as date.weekday()
    send_empty: bool = False
    library: Path | None = None  # a BibTeX / CSL-JSON / RIS export whose entries seed the profile


@dataclass(frozen=True)
class Config:
    path: Path
    inbox: Path
    state: Path
    scan_seconds: float = DEFAULT_SCAN_SECONDS
    dispatch_seconds: float = DEFAULT_DISPATCH_SECONDS
    max_late: timedelta = timedelta(hours=DEFAULT_MAX_LATE_HOURS)
    stable_seconds: float = DEFAULT_STABLE_SECONDS
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    ranking: RankingConfig = field(default_factory=RankingConfig)
    subscribers: tuple[Subscriber, ...] = ()
    imap: ImapConfig | None = None  # where replies are read from (or maildir, or neither)
    maildir: MaildirConfig | None = None

    def subscriber(self, email: str) -> Subscriber | None:
        wanted = email.strip().lower()
        for sub in self.subscribers:
            if sub.email.lower() == wanted:
                return sub
        return None


_EMAIL = re.compile(r"^[^@\s<>\"]+@[^@\s<>\"]+\.[^@\s<>\"]+$|^[^@\s<>\"]+@localhost$")
_HHMM = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)$")


class _Reader:
    """Checks one table's keys and values, naming the file and the key path."""

    def __init__(self, file: str, table: dict[str, Any], path: str, allowed: set[str]):
        self.file = file
        self.table = table
        self.path = path
        unknown = sorted(set(table) - allowed)
        if unknown:
            raise self.error(unknown[0], f"unknown key (expected one of: {', '.join(sorted(allowed))})")

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def error(self, name: str, message: str) -> ConfigError:
        return ConfigError(self.file, self.key(name), message)

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        if name not in self.table:
            return default
        value = self.table[name]
        if isinstance(value, bool) and kind in (int, float, (int, float)):
            raise self.error(name, f"expected a number, got {value!r}")
        if not isinstance(value, kind):
            raise self.error(name, f"expected {_kind_name(kind)}, got {_kind_name(type(value))} {value!r}")
        return value

    def required(self, name: str, kind: type | tuple[type, ...]) -> Any:
        if name not in self.table:
            raise self.error(name, "missing (required)")
        return self.get(name, kind)

    def positive(self, name: str, default: float) -> float:
        value = self.get(name, (int, float), default)
        if value <= 0:
            raise self.error(name, f"must be greater than 0, got {value}")
        return float(value)

    def fraction(self, name: str, default: float) -> float:
        value = self.get(name, (int, float), default)
        if not 0 <= value <= 1:
            raise self.error(name, f"must be between 0 and 1, got {value}")
        return float(value)

    def strings(self, name: str) -> tuple[str, ...]:
        value = self.get(name, list, [])
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item.strip():
                raise ConfigError(self.file, f"{self.key(name)}[{i}]", "expected a non-empty string")
        return tuple(item.strip() for item in value)

    def path_value(self, name: str, base: Path, default: str | None = None) -> Path | None:
        value = self.get(name, str, default)
        if value is None:
            return None
        if not value.strip():
            raise self.error(name, "expected a path, got an empty string")
        return resolve_path(base, value)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "a whole number", float: "a number", bool: "true or false",
             list: "a list", dict: "a table"}
    if isinstance(kind, tuple):
        return " or ".join(names.get(k, k.__name__) for k in kind)
    return names.get(kind, kind.__name__)


def resolve_path(base: Path, value: str) -> Path:
    path = Path(os.path.expanduser(value))
    return Path(os.path.normpath(path if path.is_absolute() else base / path))


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and check the config file; raise ConfigError naming file and key."""
    cfg_path = Path(path)
    file = str(path)
    try:
        raw = cfg_path.read_bytes()
    except OSError as exc:
        raise ConfigError(file, None, f"cannot read config: {exc.strerror or exc}") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(file, None, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except tomllib.TOMLDecodeError as exc:
        line_match = re.search(r"line (\d+)", str(exc))
        line = int(line_match.group(1)) if line_match else None
        message = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
        raise ConfigError(file, None, f"TOML syntax error: {message}", line=line) from exc
    return parse_config(data, cfg_path.resolve().parent, file=file, path=cfg_path)


SUBSCRIBER_KEYS = {
    "email", "name", "interests", "seed_papers", "send_at", "timezone",
    "max_papers", "days", "send_empty", "library",
}
DEFAULTABLE_KEYS = SUBSCRIBER_KEYS - {"email", "name"}


def parse_config(data: dict[str, Any], base: Path, *, file: str, path: Path) -> Config:
    top = _Reader(file, data, "", {"digest", "smtp", "ranking", "defaults", "subscribers",
                                   "imap", "maildir"})
    digest = _Reader(file, top.get("digest", dict, {}), "digest",
                     {"inbox", "state", "scan_seconds", "dispatch_seconds", "max_late_hours",
                      "stable_seconds"})
    inbox = digest.path_value("inbox", base, "var/inbox")
    state = digest.path_value("state", base, "var/digest.sqlite3")
    assert inbox is not None and state is not None  # both have defaults
    smtp = _parse_smtp(file, top.get("smtp", dict, {}), base)
    ranking_table = _Reader(file, top.get("ranking", dict, {}), "ranking",
                            {"unrated_weight", "explore_fraction", "half_life_days"})
    ranking = RankingConfig(
        unrated_weight=ranking_table.fraction("unrated_weight", DEFAULT_UNRATED_WEIGHT),
        explore_fraction=ranking_table.fraction("explore_fraction", DEFAULT_EXPLORE_FRACTION),
        half_life_days=ranking_table.positive("half_life_days", DEFAULT_HALF_LIFE_DAYS),
    )
    if "imap" in data and "maildir" in data:
        raise top.error("maildir", "give [imap] or [maildir], not both")
    defaults_table = top.get("defaults", dict, {})
    _Reader(file, defaults_table, "defaults", DEFAULTABLE_KEYS)
    subscribers = _parse_subscribers(file, top.get("subscribers", list, []), defaults_table, base)
    return Config(
        path=path,
        inbox=inbox,
        state=state,
        scan_seconds=digest.positive("scan_seconds", DEFAULT_SCAN_SECONDS),
        dispatch_seconds=digest.positive("dispatch_seconds", DEFAULT_DISPATCH_SECONDS),
        max_late=timedelta(hours=digest.positive("max_late_hours", DEFAULT_MAX_LATE_HOURS)),
        stable_seconds=float(digest.get("stable_seconds", (int, float), DEFAULT_STABLE_SECONDS)),
        smtp=smtp,
        ranking=ranking,
        subscribers=subscribers,
        imap=_parse_imap(file, top.get("imap", dict), base) if "imap" in data else None,
        maildir=_parse_maildir(file, top.get("maildir", dict), base) if "maildir" in data else None,
    )


def _parse_imap(file: str, table: dict[str, Any], base: Path) -> ImapConfig:
    r = _Reader(file, table, "imap",
                {"host", "port", "security", "username", "password_env", "password_file",
                 "mailbox", "processed_mailbox", "poll_seconds", "idle", "timeout",
                 "verify_tls", "confirmations_per_hour"})
    host = r.required("host", str).strip()
    if not host:
        raise r.error("host", "expected a host name, got an empty string")
    security = r.get("security", str, "tls")
    if security not in ("starttls", "tls", "none"):
        raise r.error("security", f'expected "tls", "starttls" or "none", got "{security}"')
    port = r.get("port", int, 993 if security == "tls" else 143)
    if not 0 < port < 65536:
        raise r.error("port", f"expected a port number from 1 to 65535, got {port}")
    username = r.required("username", str)
    if "password_env" in table and "password_file" in table:
        raise r.error("password_file", "give password_env or password_file, not both")
    if "password_env" not in table and "password_file" not in table:
        raise r.error("password_env", "missing (give password_env or password_file)")
    mailbox = r.get("mailbox", str, "INBOX")
    processed = r.get("processed_mailbox", str)
    for key, value in (("mailbox", mailbox), ("processed_mailbox", processed or "x")):
        if not value.strip() or "\r" in value or "\n" in value:
            raise r.error(key, "expected a mailbox name on one line")
    if processed is not None and processed == mailbox:
        raise r.error("processed_mailbox", "must differ from mailbox")
    return ImapConfig(
        host=host,
        port=port,
        security=security,
        username=username,
        password_env=r.get("password_env", str),
        password_file=r.path_value("password_file", base),
        mailbox=mailbox,
        processed_mailbox=processed,
        poll_seconds=r.positive("poll_seconds", DEFAULT_REPLY_POLL_SECONDS),
        idle=r.get("idle", bool, True),
        timeout=r.positive("timeout", DEFAULT_IMAP_TIMEOUT),
        verify_tls=r.get("verify_tls", bool, True),
        confirmations_per_hour=_confirmations(r),
    )


def _parse_maildir(file: str, table: dict[str, Any], base: Path) -> MaildirConfig:
    r = _Reader(file, table, "maildir", {"path", "poll_seconds", "confirmations_per_hour"})
    if "path" not in table:
        raise r.error("path", "missing (required)")
    path = r.path_value("path", base)
    assert path is not None  # required above
    return MaildirConfig(
        path=path,
        poll_seconds=r.positive("poll_seconds", DEFAULT_REPLY_POLL_SECONDS),
        confirmations_per_hour=_confirmations(r),
    )


def _confirmations(r: _Reader) -> int:
    value = r.get("confirmations_per_hour", int, DEFAULT_CONFIRMATIONS_PER_HOUR)
    if value < 0:
        raise r.error("confirmations_per_hour", f"expected 0 or more, got {value}")
    return int(value)


def _parse_smtp(file: str, table: dict[str, Any], base: Path) -> SmtpConfig:
    r = _Reader(file, table, "smtp",
                {"host", "port", "security", "username", "password_env", "password_file",
                 "from", "reply_to", "timeout", "verify_tls", "sink", "attempts",
                 "retry_seconds"})
    sink = r.path_value("sink", base)
    security = r.get("security", str, "none" if sink else "starttls")
    if security not in ("starttls", "tls", "none"):
        raise r.error("security", f'expected "starttls", "tls" or "none", got "{security}"')
    default_port = {"starttls": 587, "tls": 465, "none": 25}[security]
    port = r.get("port", int, default_port)
    if not 0 < port < 65536:
        raise r.error("port", f"expected a port number from 1 to 65535, got {port}")
    reply_to = r.get("reply_to", str, "digest+{token}@localhost")
    if "{token}" not in reply_to:
        raise r.error("reply_to", 'must contain "{token}" so replies can be matched to their digest')
    sender = r.get("from", str, "Paper Digest <digest@localhost>")
    for key, value in (("from", sender), ("reply_to", reply_to)):
        if "\r" in value or "\n" in value:
            raise r.error(key, "must not contain a line break")
    if "password_env" in table and "password_file" in table:
        raise r.error("password_file", "give password_env or password_file, not both")
    if not sink and "host" not in table:
        raise r.error("host", 'missing (required unless "sink" is set)')
    return SmtpConfig(
        host=r.get("host", str, "127.0.0.1"),
        port=port,
        security=security,
        username=r.get("username", str),
        password_env=r.get("password_env", str),
        password_file=r.path_value("password_file", base),
        sender=sender,
        reply_to=reply_to,
        timeout=r.positive("timeout", DEFAULT_SMTP_TIMEOUT),
        verify_tls=r.get("verify_tls", bool, True),
        sink=sink,
        attempts=int(r.positive("attempts", DEFAULT_SMTP_ATTEMPTS)),
        retry_seconds=float(r.get("retry_seconds", (int, float), DEFAULT_SMTP_RETRY_SECONDS)),
    )


def _parse_subscribers(
    file: str, items: list[Any], defaults: dict[str, Any], base: Path
) -> tuple[Subscriber, ...]:
    subscribers: list[Subscriber] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        path = f"subscribers[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(file, path, "expected a table ([[subscribers]])")
        merged = {**defaults, **item}
        sub = _parse_subscriber(file, path, merged, explicit=item, base=base)
        key = sub.email.lower()
        if key in seen:
            raise ConfigError(file, f"{path}.email",
                              f'duplicate subscriber "{sub.email}" (also subscribers[{seen[key]}])')
        seen[key] = i
        subscribers.append(sub)
    return tuple(subscribers)


def _parse_subscriber(
    file: str, path: str, table: dict[str, Any], explicit: dict[str, Any], base: Path
) -> Subscriber:
    # A bad value inherited from [defaults] is reported where it was written.
    def where(key: str) -> str:
        return path if key in explicit else "defaults"

    r = _Reader(file, table, path, SUBSCRIBER_KEYS)

    def err(key: str, message: str) -> ConfigError:
        return ConfigError(file, f"{where(key)}.{key}", message)

    email = r.required("email", str).strip()
    if not _EMAIL.match(email):
        raise err("email", f'not an email address: "{email}"')
    name = r.get("name", str, email.split("@")[0]).strip() or email.split("@")[0]
    send_at_text = r.get("send_at", str, DEFAULT_SEND_AT)
    hhmm = _HHMM.match(send_at_text.strip())
    if not hhmm:
        raise err("send_at", f'expected a time "HH:MM" (24-hour), got "{send_at_text}"')
    tz_name = r.get("timezone", str, DEFAULT_TIMEZONE)
    try:
        tz = ZoneInfo(tz_name)
    except (ZoneInfoNotFoundError, ValueError):
        raise err("timezone", f'unknown time zone "{tz_name}"') from None
    max_papers = r.get("max_papers", int, DEFAULT_MAX_PAPERS)
    if not 1 <= max_papers <= 100:
        raise err("max_papers", f"expected a number from 1 to 100, got {max_papers}")
    days_value = r.get("days", list, list(WEEKDAYS))
    days: set[int] = set()
    for j, day in enumerate(days_value):
        if not isinstance(day, str) or day.strip().lower()[:3] not in WEEKDAYS:
            raise ConfigError(file, f"{where('days')}.days[{j}]",
                              f"expected one of {', '.join(WEEKDAYS)}, got {day!r}")
        days.add(WEEKDAYS.index(day.strip().lower()[:3]))
    if not days:
        raise err("days", "must name at least one day")
    return Subscriber(
        email=email,
        name=name,
        interests=r.strings("interests"),
        seed_papers=r.strings("seed_papers"),
        send_at=time(int(hhmm.group(1)), int(hhmm.group(2))),
        timezone=tz,
        max_papers=max_papers,
        days=frozenset(days),
        send_empty=r.get("send_empty", bool, False),
        library=r.path_value("library", base),
    )
