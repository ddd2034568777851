"""Config: read once at start-up (and on SIGHUP) into frozen dataclasses.

Every wrong key or value is reported on one line with the file and the key
path, e.g. ``digest.toml: subscribers[2].timezone: unknown time zone
"Europe/Berln"``, and says what is expected. Subscribers are numbered from 0,
in file order. Relative paths are taken relative to the folder holding the
config file, so the daemon finds the same files whatever its working directory.

What a key accepts is declared once, in the ``*_KEYS`` tables below: each key
has a check (type, range, shape), a default and the reason for that default.
Adding a key is a line in its table plus a field of the same name in the
dataclass it fills. A value the checks accept works later: numbers are finite
and within a range the code can use, strings that end up in mail headers hold
no control characters, addresses are checked with email-validator.

Secrets (``password_env``, ``password_file``) are not read here but by
``Config.check_secrets`` (``check-config``, ``send`` and ``run``) and when a
server is contacted, so ``preview``, ``explain`` and ``send --dry-run`` work
without them.
"""

from __future__ import annotations

import functools
import gc
import math
import os
import re
import reprlib
import ssl
import stat
import tomllib
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from datetime import time as time_of_day
from email import policy
from pathlib import Path
from typing import Any, NoReturn
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import rtoml
from email_validator import EmailNotValidError, validate_email

from .errors import ConfigError

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WEEKDAY_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")

# Defaults, each with its reason.
DEFAULT_MAX_PAPERS = 10  # a digest a person reads over coffee
DEFAULT_SEND_AT = "08:00"  # before the working day starts
DEFAULT_TIMEZONE = "UTC"  # the only zone that is right for nobody and wrong for nobody
DEFAULT_SCAN_SECONDS = 60  # dumps arrive daily; a minute's delay is invisible
DEFAULT_DISPATCH_SECONDS = 60  # send times are given to the minute
DEFAULT_MAX_LATE_HOURS = 12.0  # a digest half a day late is still today's news
DEFAULT_STABLE_SECONDS = 5.0  # a file still being written changes within seconds
# Worker processes that rank and render digests while the daemon's loop claims and sends:
# one uses the second core of a small server (measured in README "Scaling"); 0 keeps it all
# in the daemon's own process.
DEFAULT_PREPARE_WORKERS = 1
MAX_PREPARE_WORKERS = 16
DEFAULT_SMTP_TIMEOUT = 30.0  # seconds; long enough for a slow relay, short enough to notice
# Seconds to wait for the reply to a message's end ("." after DATA): RFC 5321 4.5.3.2.6 gives
# the server 10 minutes there (it may be scanning the message). Given up sooner, a digest the
# server did take stays claimed and is sent again: a duplicate.
DEFAULT_SMTP_DATA_TIMEOUT = 600.0
DEFAULT_SMTP_ATTEMPTS = 4  # a 4xx or a dropped connection: try again, a few times
DEFAULT_SMTP_RETRY_SECONDS = 2.0  # first backoff; doubles per attempt (2, 4, 8 s)
# SMTP sessions at once: 4 overlap the network with the CPU work (raw aiosmtplib to a loopback
# sink: 233 msg/s on 1 connection, 450 on 8); 32 at most, since relays cap the connections
# of one client and answer the excess with 421.
DEFAULT_SMTP_CONNECTIONS = 4
MAX_SMTP_CONNECTIONS = 32
DEFAULT_UNRATED_WEIGHT = 0.2  # shown and left unrated: a weak negative, not a skip
# Feedback ages: a signal this many days old counts half (a year old, a quarter). Interests drift
# over months (a project, a thesis chapter); a week's or a month's feedback should still count fully.
DEFAULT_HALF_LIFE_DAYS = 180.0
DEFAULT_EXPLORE_FRACTION = 0.1  # one slot in ten keeps a profile from narrowing forever
DEFAULT_REPLY_POLL_SECONDS = 60  # replies are read within a minute
DEFAULT_IMAP_TIMEOUT = 30.0  # seconds; as for SMTP
DEFAULT_CONFIRMATIONS_PER_HOUR = 5  # enough for a burst of replies, too few to feed a mail loop

# Bounds, each with its reason.
# 100,000 subscribers with a few interests each take about 20 MB (``digest bench config``).
MAX_CONFIG_BYTES = 64 * 1024 * 1024
MAX_SECRET_BYTES = 64 * 1024  # a password file is a line; more is the wrong file
MIN_TICK_SECONDS = 0.01  # a shorter timer is a busy loop (the tests tick every 0.05 s)
MAX_TICK_SECONDS = 86400.0  # dumps and send times are daily: a longer tick misses days
MAX_LATE_HOURS = 168.0  # the scheduler looks back one week for a missed send time
MAX_NETWORK_TIMEOUT = 3600.0  # a server silent for an hour is down, not slow
MAX_RETRY_SECONDS = 600.0  # doubling from ten minutes already spans hours
MAX_SMTP_ATTEMPTS = 10  # with doubling backoff, ten tries outlast any transient failure
MAX_CONFIRMATIONS_PER_HOUR = 1000  # a cap, not a target: above this it is a mail loop
MAX_PAPERS = 100  # more is a listing, not a digest
MAX_NAME_CHARS = 100  # a greeting and a To header's display name
MAX_TEXT_CHARS = 300  # a phrase, a title, a host, a mailbox name, a user name
MAX_LIST_ITEMS = 200  # interests and seed papers: a profile, not a library
MAX_PATH_CHARS = 4096  # PATH_MAX on Linux


def read_regular_file(path: Path, limit: int) -> bytes:
    """At most ``limit + 1`` bytes of ``path``, which must be a regular file.

    The extra byte lets the caller tell a file over its limit. A FIFO, a device
    (``/dev/zero``), a socket or a folder raises OSError ("not a regular file")
    without blocking: the file is opened non-blocking and checked before any read.
    Raises OSError when it cannot be opened, ValueError for a NUL in the path.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                    else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket")
            raise OSError(f"not a regular file ({kind})")
        return handle.read(limit + 1)


def read_secret(table: str, password_file: Path | None, password_env: str | None,
                *, config_file: str = "") -> str | None:
    """A password from a file (e.g. a systemd credential) or an environment variable.

    Returns None when neither is configured. Raises ConfigError naming
    ``config_file``, the key and the variable or file when the variable is
    unset or empty, or the file is missing, unreadable, not UTF-8, empty or
    larger than MAX_SECRET_BYTES. Surrounding whitespace (a file's final
    newline) is not part of the password.
    """
    if password_file is not None:
        key = f"{table}.password_file"
        try:
            raw = read_regular_file(password_file, MAX_SECRET_BYTES)
        except OSError as exc:
            raise ConfigError(config_file, key,
                              f"cannot read {password_file}: {exc.strerror or exc}") from exc
        except ValueError as exc:  # a NUL byte in a path built outside load_config
            raise ConfigError(config_file, key, f"cannot read {password_file}: {exc}") from exc
        if len(raw) > MAX_SECRET_BYTES:
            raise ConfigError(config_file, key, f"{password_file} is larger than "
                              f"{MAX_SECRET_BYTES} bytes; it cannot be a password file")
        try:
            value = raw.decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            raise ConfigError(config_file, key, f"{password_file} is not UTF-8 text") from exc
        where = str(password_file)
    elif password_env:
        key = f"{table}.password_env"
        env_value = os.environ.get(password_env)
        if env_value is None:
            raise ConfigError(config_file, key, f"environment variable {password_env} is not set")
        value, where = env_value, f"environment variable {password_env}"
    else:
        return None
    if not value.strip():
        raise ConfigError(config_file, key, f"{where} is empty")
    if _has_control(value):
        raise ConfigError(config_file, key, f"{where} holds a control character (a line break "
                          "inside the password?)")
    return value


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
    data_timeout: float = DEFAULT_SMTP_DATA_TIMEOUT  # for the reply to DATA and the message's end
    verify_tls: bool = True
    ca_file: Path | None = None  # PEM CA file to trust (self-signed or private CA)
    sink: Path | None = None  # folder the embedded aiosmtpd sink writes .eml/.html to
    attempts: int = DEFAULT_SMTP_ATTEMPTS
    retry_seconds: float = DEFAULT_SMTP_RETRY_SECONDS
    connections: int = DEFAULT_SMTP_CONNECTIONS  # SMTP sessions a dispatch may hold open at once
    config_file: str = field(default="", compare=False, repr=False)  # named in secret errors

    def password(self) -> str | None:
        """The secret, read when needed so it never sits in a config dump."""
        return read_secret("smtp", self.password_file, self.password_env,
                           config_file=self.config_file)


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
    ca_file: Path | None = None  # PEM CA file to trust (self-signed or private CA)
    confirmations_per_hour: int = DEFAULT_CONFIRMATIONS_PER_HOUR
    config_file: str = field(default="", compare=False, repr=False)  # named in secret errors

    def password(self) -> str | None:
        """The secret, read when needed so it never sits in a config dump."""
        return read_secret("imap", self.password_file, self.password_env,
                           config_file=self.config_file)


@dataclass(frozen=True)
class MaildirConfig:
    """A Maildir folder a local MTA delivers replies to (``[maildir]``)."""

    path: Path
    poll_seconds: float = DEFAULT_REPLY_POLL_SECONDS
    confirmations_per_hour: int = DEFAULT_CONFIRMATIONS_PER_HOUR


# [[sources]] defaults, each with its reason.
DEFAULT_FETCH_AT = ("06:00", "12:00", "18:00")  # a listing grows over its day; 06:00 sees it whole
DEFAULT_FETCH_TIMEOUT = 30.0  # seconds to connect or to wait for the next bytes
DEFAULT_FETCH_ATTEMPTS = 3  # a 5xx or a dropped connection: two more tries, then the next fetch time
DEFAULT_FETCH_RETRY_SECONDS = 5.0  # first backoff; doubles per attempt (5, 10 s)
DEFAULT_FETCH_MAX_BYTES = 20_000_000  # a day's listing is well under 5 MB; stops a runaway answer
DEFAULT_FETCH_LOOKBACK_DAYS = 1  # with {date}: yesterday's listing again, for late additions
MAX_FETCH_BYTES = 1 << 30  # the inbox scan refuses dump files far smaller than this anyway
_SOURCE_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an HTTP token (RFC 9110)
# Set by the fetcher itself: a config value would break conditional GET or the framing.
_RESERVED_HEADERS = {"host", "content-length", "transfer-encoding", "connection",
                     "if-none-match", "if-modified-since"}


@dataclass(frozen=True)
class SourceConfig:
    """A listing the daemon fetches itself (``[[sources]]``) into the inbox.

    ``url`` may hold ``{date}``, replaced by the listing date (YYYY-MM-DD) in
    ``timezone``; ``at`` are the local times of day to fetch.
    """

    name: str
    url: str
    at: tuple[time_of_day, ...] = tuple(time_of_day.fromisoformat(t) for t in DEFAULT_FETCH_AT)
    timezone: ZoneInfo = field(default_factory=lambda: ZoneInfo(DEFAULT_TIMEZONE))
    headers: tuple[tuple[str, str], ...] = ()
    contact: str | None = None  # for the User-Agent; None: the address of [smtp] from
    timeout: float = DEFAULT_FETCH_TIMEOUT
    attempts: int = DEFAULT_FETCH_ATTEMPTS
    retry_seconds: float = DEFAULT_FETCH_RETRY_SECONDS
    max_bytes: int = DEFAULT_FETCH_MAX_BYTES
    lookback_days: int = DEFAULT_FETCH_LOOKBACK_DAYS

    @property
    def dated(self) -> bool:
        """True when the URL names a listing date (``{date}``)."""
        return "{date}" in self.url


@dataclass(frozen=True)
class RankingConfig:
    unrated_weight: float = DEFAULT_UNRATED_WEIGHT
    explore_fraction: float = DEFAULT_EXPLORE_FRACTION
    half_life_days: float = DEFAULT_HALF_LIFE_DAYS


@dataclass(frozen=True, slots=True)  # 100,000 of them in a config: no __dict__ each
class Subscriber:
    email: str
    name: str
    interests: tuple[str, ...] = ()
    seed_papers: tuple[str, ...] = ()
    send_at: time_of_day = time_of_day(8, 0)
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
    prepare_workers: int = DEFAULT_PREPARE_WORKERS
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    ranking: RankingConfig = field(default_factory=RankingConfig)
    subscribers: tuple[Subscriber, ...] = ()
    imap: ImapConfig | None = None  # where replies are read from (or maildir, or neither)
    maildir: MaildirConfig | None = None
    sources: tuple[SourceConfig, ...] = ()  # listings fetched into the inbox
    # Lower-cased address -> subscriber: a reply or ``--user`` finds its subscriber among
    # 100,000 without a scan. Built from ``subscribers``; never compared or shown.
    _by_email: dict[str, Subscriber] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_email: dict[str, Subscriber] = {}
        for sub in self.subscribers:
            key = sub.email.lower()
            if key == sub.email:  # the address's own string, not a second copy of it
                key = sub.email
            by_email.setdefault(key, sub)  # the first one, as a scan would find
        object.__setattr__(self, "_by_email", by_email)

    def subscriber(self, email: str) -> Subscriber | None:
        return self._by_email.get(email.strip().lower())

    def check_secrets(self) -> None:
        """Read every password the configured servers will need; raise ConfigError if one fails.

        The SMTP password is needed unless ``[smtp] sink`` replaces the server
        (and only when a ``username`` is set: a server without AUTH needs
        none); the IMAP password whenever ``[imap]`` is configured. Called by
        ``check-config``, ``send`` (not ``--dry-run``, which contacts no
        server) and ``run``, so a missing secret stops them at once with the
        key and the variable or file, not at the first digest.
        """
        if self.smtp.sink is None and self.smtp.username:
            self.smtp.password()
        if self.imap is not None:
            self.imap.password()

    def check_paths(self) -> None:
        """Check, creating nothing, that each configured path can be what it must be.

        A folder (inbox, sink, maildir) must be a folder if it exists; the
        state must be a file if it exists; whatever does not exist yet must
        sit under a folder (not under a file), so it can be created. Raises
        ConfigError naming the key. ``check-config`` calls it.
        """
        file = _escape(str(self.path))
        wanted: list[tuple[str, Path | None, bool]] = [
            ("digest.inbox", self.inbox, True), ("digest.state", self.state, False),
            ("smtp.sink", self.smtp.sink, True),
            ("maildir.path", self.maildir.path if self.maildir else None, True)]
        for key, path, is_folder in wanted:
            if path is None:
                continue
            problem = _path_problem(path, is_folder)
            if problem:
                raise ConfigError(file, key, problem)
        for key, ca_file in (("smtp.ca_file", self.smtp.ca_file),
                             ("imap.ca_file", self.imap.ca_file if self.imap else None)):
            problem = _ca_file_problem(ca_file) if ca_file is not None else None
            if problem:
                raise ConfigError(file, key, problem)


def _ca_file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be the PEM CA file TLS will trust, or None (it loads)."""
    try:
        if not path.exists():
            return f"{path} does not exist (give the PEM file of the CA that signed the server)"
        if not path.is_file():
            return f"{path} is not a file"
        with path.open("rb"):
            pass
        ssl.create_default_context(cafile=str(path))
    except ssl.SSLError as exc:
        return (f"{path} holds no PEM certificate TLS can use ({exc.reason or exc}); give the "
                "CA certificate in PEM form (-----BEGIN CERTIFICATE-----)")
    except OSError as exc:
        return f"{path} cannot be read: {exc.strerror or exc}"
    return None


def _path_problem(path: Path, is_folder: bool) -> str | None:
    """Why ``path`` cannot be the folder (or file) it must be, or None."""
    try:
        if path.exists():
            if is_folder and not path.is_dir():
                return f"{path} exists and is not a folder"
            if not is_folder and path.is_dir():
                return f"{path} is a folder; give the database file's path"
            return None
        ancestor = path.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            return f"{path} cannot be created: {ancestor} is not a folder"
        if not os.access(ancestor, os.W_OK | os.X_OK):
            return f"{path} cannot be created: {ancestor} is not writable"
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    return None


# --- showing values in messages ---------------------------------------------------------


class _Shown(reprlib.Repr):
    """``repr`` bounded in depth and length, and safe for integers of any size."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother = 2, 60, 60
        self.maxlist = self.maxdict = self.maxtuple = 4

    def repr_int(self, x: int, level: int) -> str:
        if abs(x) >= 10**30:
            return f"a {x.bit_length() * 3 // 10}-digit number" if x > 0 else "a huge negative number"
        return repr(x)

    def repr_bool(self, x: bool, level: int) -> str:
        return "true" if x else "false"


_SHOWN = _Shown()


def _show(value: object) -> str:
    """A value as a message quotes it: on one line, at most about 60 characters."""
    if isinstance(value, str):
        text = value if len(value) <= 60 else value[:57] + "..."
        return '"' + _escape(text).replace('"', '\\"') + '"'
    return _escape(_SHOWN.repr(value))


def _escape(text: str) -> str:
    """``text`` with every control character as ``\\uXXXX``, so a message stays on one line."""
    return "".join(f"\\u{ord(ch):04x}" if _is_control(ch) else ch for ch in text)


# Bidirectional embeddings, overrides and isolates (Unicode UAX #9): invisible, and they show
# text reversed, so a name with U+202E reads as someone else's in a To header or a log line.
# The marks U+200E/U+200F are left alone: right-to-left names legitimately carry them.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _is_control(ch: str) -> bool:
    # Cc: C0/C1 controls (NUL, CR, LF, ESC...); Zl/Zp: line and paragraph separators,
    # which str.splitlines() and some terminals treat as line breaks; Cs: lone surrogates.
    return unicodedata.category(ch) in ("Cc", "Zl", "Zp", "Cs") or ch in _BIDI_CONTROLS


def _has_control(text: str) -> bool:
    # A printable string holds none of these categories (str.isprintable is false for every
    # "Other" and "Separator" category but the space), so only the rest is looked at closely.
    return not text.isprintable() and any(_is_control(ch) for ch in text)


def _key_text(name: str) -> str:
    """A key as a message names it: bare when TOML would write it bare, else quoted."""
    return name if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name) else _show(name)


def _typed(value: object) -> str:
    """``a string "x"``, ``a number 0.5``: what was found, for 'expected ..., got ...'."""
    if isinstance(value, bool):
        return _show(value)
    if isinstance(value, (datetime, date, time_of_day)):
        return f"a TOML date/time {_show(value)}"
    names = {str: "a string", int: "a whole number", float: "a number",
             list: "a list", dict: "a table"}
    return f"{names.get(type(value), type(value).__name__)} {_show(value)}"


# --- checks: one kind of value each ---------------------------------------------------


class _Bad(Exception):
    """A value's problem; the reader adds the file and the key (and ``[index]`` of a list item)."""

    def __init__(self, message: str, index: int | None = None, subkey: str | None = None):
        super().__init__(message)
        self.index = index
        self.subkey = subkey  # a key inside a table value: sources[0].headers.X-Name


@dataclass(frozen=True, kw_only=True)
class Spec:
    """One key: its default (as written in TOML, or None), why that default, the field it fills."""

    default: Any = None
    why: str = ""
    required: bool = False
    attr: str | None = None  # the dataclass field, when it is not named like the key

    def expects(self) -> str:
        raise NotImplementedError

    def check(self, value: Any, base: Path) -> Any:
        """The checked (and converted) value; raises _Bad saying what is expected."""
        raise NotImplementedError

    def wrong(self, value: object) -> _Bad:
        return _Bad(f"expected {self.expects()}, got {_typed(value)}")


@dataclass(frozen=True, kw_only=True)
class Number(Spec):
    """A finite number (or whole number) within [low, high]; TOML true/false is not a number."""

    low: float
    high: float
    whole: bool = False
    unit: str = ""

    def expects(self) -> str:
        what = "a whole number" if self.whole else "a number"
        unit = f" of {self.unit}" if self.unit else ""
        return f"{what}{unit} from {_number_text(self.low)} to {_number_text(self.high)}"

    def check(self, value: Any, base: Path) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.wrong(value)
        if isinstance(value, float) and not math.isfinite(value):
            raise _Bad(f"expected {self.expects()}, got {_show(value)}")
        if self.whole and isinstance(value, float):
            raise _Bad(f"expected {self.expects()}, got {_show(value)} (not a whole number)")
        if not self.low <= value <= self.high:
            raise _Bad(f"expected {self.expects()}, got {_show(value)}")
        return int(value) if self.whole else float(value)


def _number_text(value: float) -> str:
    """1000000000 as 1000000000 (not 1e+09); 0.01 as 0.01."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


@dataclass(frozen=True, kw_only=True)
class Flag(Spec):
    def expects(self) -> str:
        return "true or false"

    def check(self, value: Any, base: Path) -> Any:
        if not isinstance(value, bool):
            raise self.wrong(value)
        return value


@dataclass(frozen=True, kw_only=True)
class Text(Spec):
    """A string on one line: no control characters, bounded length, optionally a pattern."""

    max_chars: int = MAX_TEXT_CHARS
    pattern: str | None = None  # a regular expression the whole (stripped) value must match
    shape: str = "a string on one line"
    empty_is_default: bool = False  # "" means "not given" (a name left blank)

    def expects(self) -> str:
        return self.shape

    def check(self, value: Any, base: Path) -> Any:
        if not isinstance(value, str):
            raise self.wrong(value)
        text = value.strip()
        if not text and self.empty_is_default:
            return None
        if not text:
            raise _Bad(f"expected {self.expects()}, got an empty string")
        if _has_control(text):
            raise _Bad(f"expected {self.expects()}, got {_show(value)} (holds a control "
                       "character or line break)")
        if len(text) > self.max_chars:
            raise _Bad(f"expected {self.expects()} of at most {self.max_chars} characters, "
                       f"got {len(text)}")
        if self.pattern is not None and not re.fullmatch(self.pattern, text):
            raise _Bad(f"expected {self.expects()}, got {_show(value)}")
        return text


# An RFC 2047 encoded word (``=?charset?q?text?=``): mail clients decode it wherever it is in
# a header, inside quotes too, so a name holding one would show as other text than typed.
_ENCODED_WORD = re.compile(r"=\?[^?\s]*\?[^?\s]*\?.*?\?=")


@dataclass(frozen=True, kw_only=True)
class DisplayName(Text):
    """A subscriber's name for the To header and the greeting: shown exactly as typed.

    An RFC 2047 encoded word in it is refused: mail clients would show it decoded in the
    To header (another name than the configured one, or a spoof). The message gives the
    decoded text to write instead, when it decodes.
    """

    def check(self, value: Any, base: Path) -> Any:
        text = super().check(value, base)
        if text is not None and _ENCODED_WORD.search(text):
            raise _Bad(f"expected {self.expects()} as it should show, got {_show(value)}, "
                       "which holds an RFC 2047 encoded word (=?...?=) that mail clients "
                       "would show decoded" + _decoded_hint(text))
        return text


def _refuse_encoded_word(text: str, expects: str) -> None:
    """Raise when an address (or ``Name <address>``) holds an RFC 2047 encoded word.

    The email package decodes one even in an address's local part when it writes the To
    or From header (``=?utf-8?q?a=40b.example?=@c.example`` would show another
    address than the envelope's), so the header would not say what was configured.
    """
    if _ENCODED_WORD.search(text):
        raise _Bad(f"expected {expects}, got {_show(text)}, which holds an RFC 2047 encoded "
                   "word (=?...?=) that mail clients would show decoded, not as typed; write "
                   "the address (and name) as plain text")


def _decoded_hint(text: str) -> str:
    """``; write "Zoë" instead`` for a name that decodes, else a general fix."""
    import email.errors
    import email.header

    try:
        decoded = str(email.header.make_header(email.header.decode_header(text)))
    except (UnicodeError, LookupError, ValueError, email.errors.MessageError):
        decoded = ""
    if decoded and decoded != text and not _ENCODED_WORD.search(decoded):
        return f"; write {_show(decoded)} instead"
    return "; write the name as plain text"


@dataclass(frozen=True, kw_only=True)
class Choice(Spec):
    options: tuple[str, ...]

    def expects(self) -> str:
        quoted = [f'"{o}"' for o in self.options]
        return ", ".join(quoted[:-1]) + " or " + quoted[-1]

    def check(self, value: Any, base: Path) -> Any:
        if not isinstance(value, str) or value not in self.options:
            raise self.wrong(value)
        return value


@dataclass(frozen=True, kw_only=True)
class PathValue(Spec):
    """A file or folder path; relative to the config file's folder; no NUL or control characters."""

    def expects(self) -> str:
        return "a path"

    def check(self, value: Any, base: Path) -> Any:
        if not isinstance(value, str):
            raise self.wrong(value)
        if not value.strip():
            raise _Bad("expected a path, got an empty string")
        if _has_control(value):
            raise _Bad(f"expected a path, got {_show(value)} (holds a NUL byte, a line break or "
                       "another control character)")
        if len(value) > MAX_PATH_CHARS:
            raise _Bad(f"expected a path of at most {MAX_PATH_CHARS} characters, got {len(value)}")
        return resolve_path(base, value)


@dataclass(frozen=True, kw_only=True)
class Email(Spec):
    """One address (no display name), checked by email-validator.

    Internationalised addresses (non-ASCII local part or domain, RFC 6531)
    are accepted for subscribers when ``ascii_only`` is false: the mailer
    sends them with SMTPUTF8, and a server without it fails that subscriber's
    digest alone, saying so. Sender addresses are ASCII only (``ascii_only``):
    they are in every message's envelope and Message-ID.
    """

    ascii_only: bool = False

    def expects(self) -> str:
        return "an email address" + (" in ASCII (xn-- form for a non-ASCII domain)"
                                     if self.ascii_only else "")

    def check(self, value: Any, base: Path) -> Any:
        if not isinstance(value, str):
            raise self.wrong(value)
        _refuse_encoded_word(value, self.expects())
        return check_address(value.strip(), ascii_only=self.ascii_only)


@dataclass(frozen=True, kw_only=True)
class FromHeader(Spec):
    """``Name <address>`` or a bare address: exactly one, ASCII address, no line breaks."""

    def expects(self) -> str:
        return 'one address, like "Paper Digest <digest@example.org>"'

    def check(self, value: Any, base: Path) -> Any:
        if not isinstance(value, str):
            raise self.wrong(value)
        text = value.strip()
        if _has_control(text):
            raise _Bad(f"expected {self.expects()}, got {_show(value)} (holds a control "
                       "character or line break)")
        if len(text) > MAX_TEXT_CHARS:
            raise _Bad(f"expected {self.expects()}, got {len(text)} characters")
        _refuse_encoded_word(text, self.expects())
        try:
            header = policy.default.header_factory("From", text)
            addresses = header.addresses  # type: ignore[attr-defined]
            defects = header.defects  # type: ignore[attr-defined]
        except Exception as exc:  # the stdlib header parser fails in assorted ways on bad input
            raise _Bad(f"expected {self.expects()}, got {_show(value)}") from exc
        if len(addresses) != 1 or defects:
            raise _Bad(f"expected {self.expects()}, got {_show(value)}")
        check_address(addresses[0].addr_spec, ascii_only=True)
        return text


@dataclass(frozen=True, kw_only=True)
class ReplyTo(Spec):
    """The plus-address replies go to; ``{token}`` is replaced by each digest's token."""

    def expects(self) -> str:
        return 'an address holding "{token}", like "digest+{token}@example.org"'

    def check(self, value: Any, base: Path) -> Any:
        if not isinstance(value, str):
            raise self.wrong(value)
        if "{token}" not in value:
            raise _Bad('must contain "{token}" so replies can be matched to their digest')
        # A token is lower-case base32 (render.new_token); check the address it makes.
        FromHeader().check(value.replace("{token}", "abcdefgh234567"), base)
        return value.strip()


@dataclass(frozen=True, kw_only=True)
class TimeOfDay(Spec):
    def expects(self) -> str:
        return 'a time "HH:MM" (24-hour)'

    def check(self, value: Any, base: Path) -> Any:
        if isinstance(value, time_of_day) and value.tzinfo is None and not (
                value.second or value.microsecond):
            return value  # a TOML local time, 08:00:00
        if not isinstance(value, str):
            raise self.wrong(value)
        parsed = _hh_mm(value.strip())
        if parsed is None:
            raise _Bad(f"expected {self.expects()}, got {_show(value)}")
        return parsed


@functools.lru_cache(maxsize=2048)  # 1440 minutes in a day: every send time read once
def _hh_mm(text: str) -> time_of_day | None:
    """``"HH:MM"`` (24-hour, the hour with one or two digits) as a time, else None."""
    hhmm = re.fullmatch(r"([01]?[0-9]|2[0-3]):([0-5][0-9])", text, re.ASCII)
    return time_of_day(int(hhmm.group(1)), int(hhmm.group(2))) if hhmm else None


@dataclass(frozen=True, kw_only=True)
class Zone(Spec):
    def expects(self) -> str:
        return 'an IANA time zone name like "Europe/Berlin"'

    def check(self, value: Any, base: Path) -> Any:
        if not isinstance(value, str):
            raise self.wrong(value)
        return load_zone(value)


@dataclass(frozen=True, kw_only=True)
class Weekdays(Spec):
    def expects(self) -> str:
        return 'a list of days like ["mon", "fri"]'

    def check(self, value: Any, base: Path) -> Any:
        if not isinstance(value, list):
            raise self.wrong(value)
        days: set[int] = set()
        for j, day in enumerate(value):
            name = day.strip().lower() if isinstance(day, str) else None
            if name in WEEKDAYS:
                days.add(WEEKDAYS.index(name))
            elif name in _WEEKDAY_NAMES:
                days.add(_WEEKDAY_NAMES.index(name))
            else:
                raise _Bad(f"expected one of {', '.join(WEEKDAYS)}, got {_show(day)}", index=j)
        if not days:
            raise _Bad("must name at least one day")
        return frozenset(days)


@dataclass(frozen=True, kw_only=True)
class Phrases(Spec):
    """A list of non-empty one-line strings (interests, seed papers)."""

    def expects(self) -> str:
        return "a list of strings"

    def check(self, value: Any, base: Path) -> Any:
        if not isinstance(value, list):
            raise self.wrong(value)
        if len(value) > MAX_LIST_ITEMS:
            raise _Bad(f"expected at most {MAX_LIST_ITEMS} items, got {len(value)}")
        phrases = []
        for i, entry in enumerate(value):
            try:
                phrases.append(_PHRASE.check(entry, base))
            except _Bad as exc:
                raise _Bad(str(exc), index=i) from None
        return tuple(phrases)


def check_address(address: str, *, ascii_only: bool = False) -> str:
    """``address`` normalised by email-validator (domain lower-cased), or raise _Bad.

    No DNS lookup: the daemon must start offline. Names a private mail setup
    uses (``localhost``, ``*.local``, ``*.test``, ``*.localhost``) are
    accepted although email-validator calls them special-use; ``.invalid``,
    ``.onion`` and ``.arpa`` are not. Quoted local parts and IP literals are
    refused (no real subscriber needs them, and they hide commas and spaces).
    """
    if _has_control(address):
        raise _Bad(f"not an email address: {_show(address)} (holds a control character)")
    if ascii_only and not address.isascii():
        raise _Bad(f"not an ASCII email address: {_show(address)} (write a non-ASCII domain in "
                   "its xn-- form)")
    local, _, domain = address.rpartition("@")
    if len(local) <= _SIMPLE_LOCAL_MAX and domain.isascii() and _SIMPLE_LOCAL.fullmatch(local):
        # What repeats is the domain (a lab's addresses share one): it is checked once, by
        # email-validator with a stand-in local part; a plain local part needs no more.
        checked = _checked_domain(domain, ascii_only)
        if (checked is not None and checked.isascii()
                and len(local) + 1 + max(len(domain), len(checked)) <= _ADDRESS_MAX):
            return f"{local}@{checked}"
    return _check_whole_address(address, ascii_only)


# A local part email-validator takes as it is (an ASCII dot-atom of common characters, at
# most 64 octets, RFC 5321 4.5.3.1.1); anything else goes through the whole check. The two
# paths agree (tests/test_config_property.py checks it).
_SIMPLE_LOCAL = re.compile(r"[A-Za-z0-9_+-]+(?:\.[A-Za-z0-9_+-]+)*", re.ASCII)
_SIMPLE_LOCAL_MAX = 64
_ADDRESS_MAX = 254  # RFC 3696 errata 1690: the longest address a path can carry


@functools.lru_cache(maxsize=4096)
def _checked_domain(domain: str, ascii_only: bool) -> str | None:
    """The domain as email-validator normalises it, or None when it (or anything) fails."""
    try:
        return _check_whole_address(f"a@{domain}", ascii_only).partition("@")[2]
    except _Bad:
        return None


def _check_whole_address(address: str, ascii_only: bool) -> str:
    """``check_address`` without its shortcut: every part through email-validator."""
    local, at, domain = address.rpartition("@")
    private = domain.lower().rstrip(".")
    is_private = private == "localhost" or private.endswith((".local", ".test", ".localhost"))
    if is_private and not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
                                       r"(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*", private):
        raise _Bad(f"not an email address: {_show(address)} (bad domain)")
    stand_in = f"{local}{at}example.org" if is_private else address
    try:
        checked = validate_email(stand_in, check_deliverability=False,
                                 allow_smtputf8=not ascii_only, allow_quoted_local=False,
                                 allow_domain_literal=False, allow_display_name=False)
    except EmailNotValidError as exc:
        raise _Bad(f"not an email address: {_show(address)} ({exc})") from None
    if is_private:
        return f"{checked.local_part}@{private}"
    return str(checked.normalized)


def load_zone(name: str) -> ZoneInfo:
    """The ZoneInfo for an IANA name, or raise _Bad ``unknown time zone "NAME"``.

    ZoneInfo raises ValueError for a name that is a path out of the zone
    folder or a file that is not a zone (``zone.tab``), OSError for a name
    the file system refuses; all mean the same to the user.
    """
    if len(name) > 64:
        raise _Bad(f"unknown time zone {_show(name)}")
    refused = _refused_zone(name)
    if refused is not None:
        raise _Bad(refused)
    try:
        return _zone(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise _Bad(f"unknown time zone {_show(name)}") from None


def _refused_zone(name: str) -> str | None:
    """Why a name the zone folder holds is still not a subscriber's zone, else None.

    Debian's tzdata ships ``localtime`` (this machine's own zone: the config would
    mean another time on another host), ``posix/`` (copies of the plain names),
    ``right/`` (clocks that count leap seconds: every send time would be 27 s off,
    tzfile(5)), ``posixrules`` (the rules for POSIX TZ strings) and ``Factory``
    (tzdata's placeholder for "zone not set").
    """
    folded = name.strip().lower()
    if folded == "localtime":
        return (f"time zone {_show(name)} means whatever zone this machine is set to; "
                'write an IANA name like "Europe/Berlin"')
    if folded in ("factory", "posixrules"):
        return (f"time zone {_show(name)} is a file of tzdata's, not a place; write an IANA "
                'name like "Europe/Berlin"')
    prefix, _, rest = name.partition("/")
    if prefix.lower() == "right" and rest:
        return (f"time zone {_show(name)} counts leap seconds, so send times would be 27 s "
                f"off; write {_show(rest)}")
    if prefix.lower() == "posix" and rest:
        return f"time zone {_show(name)} is a copy of tzdata's {_show(rest)}; write {_show(rest)}"
    return None


# A config names a few dozen zones, each for many subscribers. Only zones found are kept
# (lru_cache keeps no exception): a zone installed later is found on the next reload.
_zone = functools.lru_cache(maxsize=1024)(ZoneInfo)


# --- the keys of each table --------------------------------------------------------------



@dataclass(frozen=True, kw_only=True)
class Url(Spec):
    """An http(s) URL on one line; ``{date}`` is the only placeholder."""

    def expects(self) -> str:
        return "an http:// or https:// URL"

    def check(self, value: Any, base: Path) -> Any:
        from urllib.parse import urlsplit

        if not isinstance(value, str):
            raise self.wrong(value)
        url = value.strip()
        if _has_control(url) or len(url) > MAX_PATH_CHARS:
            raise _Bad(f"expected {self.expects()} on one line, got {_show(value)}")
        placeholders = set(re.findall(r"\{([^{}]*)\}", url)) - {"date"}
        if placeholders:
            raise _Bad(f'unknown placeholder "{{{min(placeholders)}}}" (the only one is {{date}}, '
                       "the listing date YYYY-MM-DD)")
        try:
            parts = urlsplit(url.replace("{date}", "2026-01-01"))
            parts.port  # noqa: B018 - raises ValueError for a port out of range
        except ValueError as exc:
            raise _Bad(f"not a URL: {_show(url)} ({exc})") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise _Bad(f"expected {self.expects()}, got {_show(url)}")
        if any(ch.isspace() for ch in url):
            raise _Bad(f"a URL has no spaces (write %20): {_show(url)}")
        return url


@dataclass(frozen=True, kw_only=True)
class FetchTimes(Spec):
    """A non-empty list of local times of day."""

    def expects(self) -> str:
        return 'a list of times like ["06:00", "18:00"]'

    def check(self, value: Any, base: Path) -> Any:
        if not isinstance(value, list):
            raise self.wrong(value)
        times: set[time_of_day] = set()
        for j, text in enumerate(value):
            try:
                times.add(TimeOfDay().check(text, base))
            except _Bad as exc:
                raise _Bad(str(exc), index=j) from None
        if not times:
            raise _Bad('must give at least one time of day, e.g. ["06:00"]')
        return tuple(sorted(times))


@dataclass(frozen=True, kw_only=True)
class Headers(Spec):
    """Extra HTTP request headers: ASCII, one line each, none the fetcher sets itself."""

    def expects(self) -> str:
        return 'a table of header names and values, like { Accept = "application/json" }'

    def check(self, value: Any, base: Path) -> Any:
        if not isinstance(value, dict):
            raise self.wrong(value)
        headers = []
        for name, text in value.items():
            if not _HEADER_NAME.match(name):
                raise _Bad("not an HTTP header name", subkey=name)
            if name.lower() in _RESERVED_HEADERS:
                raise _Bad("set by paper-digest itself; remove it", subkey=name)
            if not isinstance(text, str):
                raise _Bad(f"expected a string, got {_typed(text)}", subkey=name)
            if _has_control(text):
                raise _Bad("must be one line", subkey=name)
            if not text.isascii():  # HTTP header values are sent as ASCII
                raise _Bad("must be ASCII text (percent- or base64-encode it)", subkey=name)
            headers.append((name, text.strip()))
        return tuple(headers)


def _seconds(default: float, why: str) -> Number:
    """A timer's period in seconds: above a busy loop, below a day."""
    return Number(default=default, low=MIN_TICK_SECONDS, high=MAX_TICK_SECONDS, unit="seconds",
                  why=why)


def _timeout(default: float, why: str) -> Number:
    return Number(default=default, low=MIN_TICK_SECONDS, high=MAX_NETWORK_TIMEOUT,
                  unit="seconds", why=why)


def _port(why: str) -> Number:
    """No default here: it follows ``security``."""
    return Number(low=1, high=65535, whole=True, why=why)

_CONFIRMATIONS = Number(default=DEFAULT_CONFIRMATIONS_PER_HOUR, low=0,
                        high=MAX_CONFIRMATIONS_PER_HOUR, whole=True,
                        why="enough for a burst of replies, too few to feed a mail loop")
_PHRASE = Text(shape="a non-empty string on one line")  # one interest or seed paper
_ENV_NAME = Text(pattern=r"[A-Za-z_][A-Za-z0-9_]*", max_chars=128,
                 shape="an environment variable name (letters, digits, _)")
_HOST = Text(pattern=r"[A-Za-z0-9._:\[\]-]+", max_chars=253,
             shape="a host name or IP address (xn-- form for a non-ASCII name)")

DIGEST_KEYS: dict[str, Spec] = {
    "inbox": PathValue(default="var/inbox", why="beside the config, like everything it owns"),
    "state": PathValue(default="var/digest.sqlite3", why="beside the config"),
    "scan_seconds": _seconds(DEFAULT_SCAN_SECONDS,
                             "dumps arrive daily; a minute's delay is invisible"),
    "dispatch_seconds": _seconds(DEFAULT_DISPATCH_SECONDS, "send times are given to the minute"),
    "max_late_hours": Number(default=DEFAULT_MAX_LATE_HOURS, low=0.01, high=MAX_LATE_HOURS,
                             unit="hours", why="a digest half a day late is still today's news"),
    "stable_seconds": Number(default=DEFAULT_STABLE_SECONDS, low=0, high=MAX_TICK_SECONDS,
                             unit="seconds",
                             why="a file still being written changes within seconds"),
    "prepare_workers": Number(default=DEFAULT_PREPARE_WORKERS, low=0, high=MAX_PREPARE_WORKERS,
                              whole=True, why="one more core ranks while the loop sends; 0 "
                              "prepares in the daemon's own process"),
}

SMTP_KEYS: dict[str, Spec] = {
    "host": _HOST,  # required unless sink; checked in _parse_smtp
    "port": _port("587 for starttls, 465 for tls, 25 for none"),
    "security": Choice(options=("starttls", "tls", "none"),
                       why="starttls: what submission servers offer; none for the sink"),
    "username": Text(max_chars=MAX_TEXT_CHARS, shape="a user name on one line",
                     empty_is_default=True, why="none: a relay that needs no login"),
    "password_env": _ENV_NAME,
    "password_file": PathValue(),
    "from": FromHeader(default="Paper Digest <digest@localhost>", attr="sender",
                       why="works with the local sink; a real server needs your address"),
    "reply_to": ReplyTo(default="digest+{token}@localhost", why="as from"),
    "timeout": _timeout(DEFAULT_SMTP_TIMEOUT, "long enough for a slow relay, short enough to "
                        "notice"),
    "data_timeout": _timeout(DEFAULT_SMTP_DATA_TIMEOUT, "RFC 5321 4.5.3.2.6 gives the server "
                             "10 minutes to answer a message's end; sooner is a duplicate"),
    "verify_tls": Flag(default=True, why="a certificate is checked unless you say otherwise"),
    "ca_file": PathValue(why="none: the system's CA store"),
    "sink": PathValue(why="none: a real server"),
    "attempts": Number(default=DEFAULT_SMTP_ATTEMPTS, low=1, high=MAX_SMTP_ATTEMPTS, whole=True,
                       why="a 4xx or a dropped connection: try again, a few times"),
    "retry_seconds": Number(default=DEFAULT_SMTP_RETRY_SECONDS, low=0, high=MAX_RETRY_SECONDS,
                            unit="seconds", why="first backoff; doubles per attempt"),
    "connections": Number(default=DEFAULT_SMTP_CONNECTIONS, low=1, high=MAX_SMTP_CONNECTIONS,
                          whole=True, why="a few sessions overlap the network with the work; "
                          "relays refuse many from one client"),
}

RANKING_KEYS: dict[str, Spec] = {
    "unrated_weight": Number(default=DEFAULT_UNRATED_WEIGHT, low=0, high=1,
                             why="shown and left unrated: a weak negative, not a skip"),
    "explore_fraction": Number(default=DEFAULT_EXPLORE_FRACTION, low=0, high=1,
                               why="one slot in ten keeps a profile from narrowing forever"),
    "half_life_days": Number(default=DEFAULT_HALF_LIFE_DAYS, low=1, high=36500, unit="days",
                             why="interests drift: a year-old like counts a quarter"),
}

IMAP_KEYS: dict[str, Spec] = {
    "host": replace(_HOST, required=True),
    "port": _port("993 for tls, else 143"),
    "security": Choice(default="tls", options=("tls", "starttls", "none"),
                       why="IMAP servers offer implicit TLS on 993"),
    "username": Text(required=True, shape="a user name on one line"),
    "password_env": _ENV_NAME,
    "password_file": PathValue(),
    "mailbox": Text(default="INBOX", shape="a mailbox name on one line",
                    why="where mail arrives by default"),
    "processed_mailbox": Text(shape="a mailbox name on one line",
                              why="none: processed replies are only marked \\Seen"),
    "poll_seconds": _seconds(DEFAULT_REPLY_POLL_SECONDS, "replies are read within a minute"),
    "idle": Flag(default=True, why="IDLE reads a reply within seconds where offered"),
    "timeout": _timeout(DEFAULT_IMAP_TIMEOUT, "as for SMTP"),
    "verify_tls": Flag(default=True, why="as for SMTP"),
    "ca_file": PathValue(why="as for SMTP"),
    "confirmations_per_hour": _CONFIRMATIONS,
}

MAILDIR_KEYS: dict[str, Spec] = {
    "path": PathValue(required=True),
    "poll_seconds": IMAP_KEYS["poll_seconds"],
    "confirmations_per_hour": _CONFIRMATIONS,
}

SUBSCRIBER_KEYS: dict[str, Spec] = {
    "email": Email(required=True),
    "name": DisplayName(max_chars=MAX_NAME_CHARS, shape="a name on one line",
                        empty_is_default=True, why="the address's local part"),
    "interests": Phrases(default=[], why="none: the listing's order until feedback arrives"),
    "seed_papers": Phrases(default=[], why="none"),
    "send_at": TimeOfDay(default=DEFAULT_SEND_AT, why="before the working day starts"),
    "timezone": Zone(default=DEFAULT_TIMEZONE,
                     why="the only zone that is right for nobody and wrong for nobody"),
    "max_papers": Number(default=DEFAULT_MAX_PAPERS, low=1, high=MAX_PAPERS, whole=True,
                         why="a digest a person reads over coffee"),
    "days": Weekdays(default=list(WEEKDAYS), why="papers appear every day"),
    "send_empty": Flag(default=False, why="an empty email teaches people to ignore the next"),
    "library": PathValue(why="none: interests, seed papers and feedback only"),
}
SOURCE_KEYS: dict[str, Spec] = {
    "url": Url(required=True),
    "name": Text(pattern=_SOURCE_NAME, max_chars=64,
                 shape='letters, digits, ".", "_" or "-" (it names the inbox files)',
                 why="the URL's host name"),
    "at": FetchTimes(default=list(DEFAULT_FETCH_AT),
                     why="a listing grows over its day; 06:00 sees it whole"),
    "timezone": Zone(default=DEFAULT_TIMEZONE, why="as for subscribers"),
    "headers": Headers(default={}, why="none: most listings need no extra header"),
    "contact": Email(ascii_only=True, why="the address of [smtp] from"),
    "timeout": _timeout(DEFAULT_FETCH_TIMEOUT, "seconds to connect or to wait for the next bytes"),
    "attempts": Number(default=DEFAULT_FETCH_ATTEMPTS, low=1, high=10, whole=True,
                       why="a 5xx or a dropped connection: two more tries"),
    "retry_seconds": Number(default=DEFAULT_FETCH_RETRY_SECONDS, low=0, high=MAX_RETRY_SECONDS,
                            unit="seconds", why="first backoff; doubles per attempt"),
    "max_bytes": Number(default=DEFAULT_FETCH_MAX_BYTES, low=1, high=MAX_FETCH_BYTES, whole=True,
                        why="a day's listing is well under 5 MB; stops a runaway answer"),
    "lookback_days": Number(default=DEFAULT_FETCH_LOOKBACK_DAYS, low=0, high=7, whole=True,
                            why="with {date}: yesterday's listing again, for late additions"),
}

DEFAULTABLE_KEYS = {k: v for k, v in SUBSCRIBER_KEYS.items() if k not in ("email", "name")}

TOP_KEYS = ("digest", "smtp", "ranking", "defaults", "subscribers", "imap", "maildir", "sources")


class _Reader:
    """Checks one table's keys and values, naming the file and the key path."""

    def __init__(self, file: str, table: Mapping[str, Any], path: str, keys: Mapping[str, Spec],
                 base: Path):
        self.file = file
        self.table = table
        self.path = path
        self.keys = keys
        self.base = base
        if not table.keys() <= keys.keys():
            unknown = sorted(table.keys() - keys.keys())
            raise self.error(unknown[0], f"unknown key (expected one of: {', '.join(keys)})")

    def key(self, name: str) -> str:
        return f"{self.path}.{_key_text(name)}" if self.path else _key_text(name)

    def error(self, name: str, message: str) -> ConfigError:
        return ConfigError(self.file, self.key(name), message)

    def value(self, name: str) -> Any:
        """The checked value of ``name``, else its checked default (None when it has none)."""
        spec = self.keys[name]
        if name not in self.table:
            if spec.required:
                raise self.error(name, "missing (required)")
            return None if spec.default is None else spec.check(spec.default, self.base)
        try:
            return spec.check(self.table[name], self.base)
        except _Bad as exc:
            index = "" if exc.index is None else f"[{exc.index}]"  # subscribers[0].days[1]
            sub = "" if exc.subkey is None else "." + _key_text(exc.subkey)
            raise ConfigError(self.file, self.key(name) + index + sub, str(exc)) from None

    def values(self) -> dict[str, Any]:
        """Every key's checked value, by the field it fills."""
        return {spec.attr or name: self.value(name) for name, spec in self.keys.items()}


def resolve_path(base: Path, value: str) -> Path:
    path = Path(os.path.expanduser(value))
    return Path(os.path.normpath(path if path.is_absolute() else base / path))


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and check the config file; raise ConfigError naming file and key.

    The file must be a UTF-8 TOML document (a leading byte-order mark is
    allowed) of at most MAX_CONFIG_BYTES; anything else, including a folder,
    an unreadable file or tables nested too deeply for the parser, is a
    ConfigError naming the file (and the line, where there is one).
    """
    cfg_path = Path(path)
    file = _escape(str(path))  # the name as given, on one line
    raw = _read_config_bytes(cfg_path, file)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        bad_line = raw[:exc.start].count(b"\n") + 1
        raise ConfigError(file, None, f"not UTF-8 text (byte {exc.start}: {exc.reason}); "
                          "save the file as UTF-8", line=bad_line) from exc
    del raw  # the text is all that is read from now on
    base = cfg_path.resolve().parent
    # 100,000 subscribers are millions of new objects and no reference cycles: the cyclic
    # collector's passes over them cost more than the parse itself (measured by
    # ``digest bench config``), so it waits until the config is built.
    collecting = gc.isenabled()
    gc.disable()
    try:
        parts = _split_subscriber_tables(text)
        if parts is not None:
            try:
                return parse_config(parts.head, base, file=file, path=cfg_path,
                                    subscriber_items=parts.items())
            except (ConfigError, _NotInParts):
                # A table the parts cannot hold, or a mistake: the whole document parsed
                # at once words it (a syntax error anywhere is reported before any key).
                pass
        try:
            data = rtoml.loads(text)
        except rtoml.TomlParsingError:
            data = _parse_toml_strictly(text, file)  # words the error, or reads what rtoml refused
        return parse_config(data, base, file=file, path=cfg_path)
    finally:
        if collecting:
            gc.enable()


# Subscriber tables parsed by one call of the TOML parser when the config is read in parts.
SUBSCRIBER_TABLES_PER_PART = 1000
_SUBSCRIBER_HEADER = "[[subscribers]]"


class _NotInParts(Exception):
    """The document cannot be read in parts (see ``_SubscriberParts``): read it whole."""


@dataclass(frozen=True)
class _SubscriberParts:
    """A config document read as its head (parsed) and its ``[[subscribers]]`` tables, parsed
    ``SUBSCRIBER_TABLES_PER_PART`` at a time as they are checked.

    Why: parsed whole, a 100,000-subscriber file is a dict per table plus the
    parser's own tree, about 3 KB per subscriber at once (390 MB of peak RSS at
    100,000, kept as the process's high-water mark), for a config that needs
    ~300 bytes each. In parts, only one part's tables exist at a time.

    The parts are cut before each line that starts with ``[[subscribers]]``,
    and each part must parse alone into nothing but ``subscribers`` tables (the
    head into no ``subscribers`` at all). Then the document is exactly the head
    plus the parts' tables in order, as a whole parse gives. Anything else
    raises ``_NotInParts`` while the items are read: a cut inside a multi-line
    string or array leaves that part unterminated (a syntax error), and a table
    after the subscribers (``[smtp]`` at the end) is a key other than
    ``subscribers``. The caller then parses the whole document, as for any
    ``ConfigError``, so messages and their order are those of a whole parse.
    """

    head: dict[str, Any]
    text: str
    starts: tuple[int, ...]  # where each part starts in ``text``; the last one runs to its end

    def items(self) -> Iterator[Any]:
        """The ``[[subscribers]]`` tables in document order; raises ``_NotInParts``."""
        ends = self.starts[1:] + (len(self.text),)
        for start, end in zip(self.starts, ends, strict=True):
            try:
                part = rtoml.loads(self.text[start:end])
            except (rtoml.TomlParsingError, ValueError, RecursionError) as exc:
                raise _NotInParts(str(exc)) from None
            tables = part.get("subscribers")
            if part.keys() != {"subscribers"} or not isinstance(tables, list):
                raise _NotInParts("a table other than [[subscribers]] in a part")
            del part
            yield from tables


def _split_subscriber_tables(text: str) -> _SubscriberParts | None:
    """The document cut into a head and parts of subscriber tables, or None when it has
    too few of them to be worth it (or a head that cannot be parsed alone)."""
    starts: list[int] = []
    header = "\n" + _SUBSCRIBER_HEADER
    at = 0 if text.startswith(_SUBSCRIBER_HEADER) else text.find(header)
    count = 0
    while at != -1:
        start = at if text.startswith(_SUBSCRIBER_HEADER, at) else at + 1
        if count % SUBSCRIBER_TABLES_PER_PART == 0:
            starts.append(start)
        count += 1
        at = text.find(header, start + len(_SUBSCRIBER_HEADER))
    if count <= SUBSCRIBER_TABLES_PER_PART:
        return None  # one part: the whole parse costs no more
    try:
        head = rtoml.loads(text[:starts[0]])
    except (rtoml.TomlParsingError, ValueError, RecursionError):
        return None
    if "subscribers" in head:
        return None
    return _SubscriberParts(head, text, tuple(starts))


def _parse_toml_strictly(text: str, file: str) -> dict[str, Any]:
    """``text`` parsed by tomllib; ConfigError naming the line of a syntax error.

    The fast parser (rtoml) reads valid files; a file it refuses goes through
    tomllib, whose messages (and line numbers) are the ones users see.
    """
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line_match = re.search(r"line (\d+)", str(exc))
        line = int(line_match.group(1)) if line_match else None
        message = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
        raise ConfigError(file, None, f"TOML syntax error: {message}", line=line) from exc
    except RecursionError:
        raise ConfigError(file, None, "TOML nested too deeply (arrays or tables inside each "
                          "other hundreds of levels deep)") from None
    except ValueError as exc:  # e.g. an integer beyond Python's 4300-digit conversion limit
        raise ConfigError(file, None, f"TOML value out of range: {_escape(str(exc))}") from exc


def _read_config_bytes(cfg_path: Path, file: str) -> bytes:
    try:
        if stat.S_ISDIR(cfg_path.stat().st_mode):
            raise ConfigError(file, None, "is a folder, not a config file")
        with cfg_path.open("rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(file, None, f"cannot read config: {exc.strerror or exc}") from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(file, None, f"larger than {MAX_CONFIG_BYTES // (1024 * 1024)} MiB; "
                          "is it the right file?")
    return raw


def parse_config(data: dict[str, Any], base: Path, *, file: str, path: Path,
                 subscriber_items: Iterable[Any] | None = None) -> Config:
    """Check a parsed TOML document; raise ConfigError naming ``file`` and the key.

    ``subscriber_items``: the ``[[subscribers]]`` tables, when they are read apart
    from ``data`` (then without a ``subscribers`` key).
    """
    top = _Reader(file, data, "", dict.fromkeys(TOP_KEYS, Spec()), base)
    table = _table_getter(file, data)
    digest = _Reader(file, table("digest"), "digest", DIGEST_KEYS, base)
    settings = digest.values()
    settings["max_late"] = timedelta(hours=settings.pop("max_late_hours"))
    smtp = _parse_smtp(file, table("smtp"), base)
    _check_layout(file, settings["inbox"], settings["state"], smtp.sink)
    ranking = RankingConfig(**_Reader(file, table("ranking"), "ranking", RANKING_KEYS,
                                      base).values())
    if "imap" in data and "maildir" in data:
        raise top.error("maildir", "give [imap] or [maildir], not both")
    defaults_table = table("defaults")
    inherited = _Reader(file, defaults_table, "defaults", DEFAULTABLE_KEYS, base).values()
    items = data.get("subscribers", []) if subscriber_items is None else subscriber_items
    if subscriber_items is None and not isinstance(items, list):
        raise top.error("subscribers", f"expected [[subscribers]] tables, got {_typed(items)}")
    return Config(
        path=path,
        smtp=smtp,
        ranking=ranking,
        subscribers=_parse_subscribers(file, items, inherited, base),
        imap=_parse_imap(file, table("imap"), base) if "imap" in data else None,
        maildir=(MaildirConfig(**_Reader(file, table("maildir"), "maildir", MAILDIR_KEYS,
                                         base).values()) if "maildir" in data else None),
        sources=_sources(file, data.get("sources", []), base),
        **settings,
    )


def _table_getter(file: str, data: dict[str, Any]) -> Callable[[str], dict[str, Any]]:
    def table(name: str) -> dict[str, Any]:
        value = data.get(name, {})
        if not isinstance(value, dict):
            raise ConfigError(file, name, f"expected a table [{name}], got {_typed(value)}")
        return value
    return table


def _check_layout(file: str, inbox: Path, state: Path, sink: Path | None) -> None:
    """The scan takes every file directly in the inbox for a dump: nothing of ours may live there."""
    if state == inbox or state.parent == inbox:
        raise ConfigError(file, "digest.state", f"{state} is in the inbox folder {inbox}; the "
                          "scan would take the database for a dump (use another folder)")
    if sink is not None and sink == inbox:
        raise ConfigError(file, "smtp.sink", f"{sink} is the inbox folder; the scan would take "
                          "the stored messages for dumps (use another folder)")


def _password_source(r: _Reader) -> None:
    if "password_env" in r.table and "password_file" in r.table:
        raise r.error("password_file", "give password_env or password_file, not both")


def _parse_imap(file: str, table: dict[str, Any], base: Path) -> ImapConfig:
    r = _Reader(file, table, "imap", IMAP_KEYS, base)
    values = r.values()
    _password_source(r)
    if "password_env" not in table and "password_file" not in table:
        raise r.error("password_env", "missing (give password_env or password_file)")
    values["port"] = values["port"] or (993 if values["security"] == "tls" else 143)
    if values["processed_mailbox"] is not None and values["processed_mailbox"] == values["mailbox"]:
        raise r.error("processed_mailbox", "must differ from mailbox")
    return ImapConfig(**values, config_file=file)


def _parse_smtp(file: str, table: dict[str, Any], base: Path) -> SmtpConfig:
    r = _Reader(file, table, "smtp", SMTP_KEYS, base)
    values = r.values()
    sink = values["sink"]
    values["security"] = values["security"] or ("none" if sink else "starttls")
    values["port"] = values["port"] or {"starttls": 587, "tls": 465, "none": 25}[values["security"]]
    _password_source(r)
    if sink is None:
        if values["host"] is None:
            raise r.error("host", 'missing (required unless "sink" is set)')
        has_password = "password_env" in table or "password_file" in table
        if values["username"] and not has_password:
            raise r.error("username", "a username needs a password: give password_env or "
                          "password_file")
    values["host"] = values["host"] or "127.0.0.1"
    return SmtpConfig(**values, config_file=file)


def _parse_subscribers(
    file: str, items: Iterable[Any], inherited: dict[str, Any], base: Path
) -> tuple[Subscriber, ...]:
    """The ``[[subscribers]]`` tables, checked, over ``inherited`` (``[defaults]``, checked).

    What every subscriber shares is checked once: a key a subscriber does not
    write takes the checked ``[defaults]`` value (or the key's own default), so
    only the keys written in each table are checked, and a value of a key in
    ``_REPEATING`` once per load. A bad table is reported at its first bad key
    in SUBSCRIBER_KEYS order (``_subscriber_error``).
    """
    subscribers: list[Subscriber] = []
    seen: dict[str, int] = {}
    shared = {"email": None, "name": None, **inherited}
    known = SUBSCRIBER_KEYS.keys()
    checked: dict[tuple[str, type, Any], Any] = {}  # (key, type, value) -> its checked value
    phrases: dict[str, str] = {}  # each checked phrase once: interests repeat across a group
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "email" not in item or not item.keys() <= known:
            _subscriber_error(file, i, item, base)
        values = dict(shared)
        try:
            for name, raw in item.items():
                if name in _REPEATING and isinstance(raw, _HASHABLE):
                    memo = (name, type(raw), raw)  # the type: true is no 1, 1.0 no 1
                    if memo not in checked:
                        checked[memo] = SUBSCRIBER_KEYS[name].check(raw, base)
                    values[name] = checked[memo]
                elif name in _PHRASE_LISTS and _all_strings(raw):
                    # The same list of interests is checked once and shared (a group's
                    # subscribers often have one), each phrase stored once per load.
                    listed = (name, tuple, tuple(raw))
                    if listed not in checked:
                        checked[listed] = tuple(phrases.setdefault(phrase, phrase) for phrase
                                                in SUBSCRIBER_KEYS[name].check(raw, base))
                    values[name] = checked[listed]
                else:
                    values[name] = SUBSCRIBER_KEYS[name].check(raw, base)
        except _Bad:
            _subscriber_error(file, i, item, base)
        email = values["email"]
        values["name"] = values["name"] or email.split("@")[0]
        key = email.lower()
        if key in seen:
            raise ConfigError(file, f"subscribers[{i}].email",
                              f'duplicate subscriber "{email}" (also subscribers[{seen[key]}])')
        seen[key] = i
        subscribers.append(Subscriber(**values))
    return tuple(subscribers)


# Subscriber keys whose values repeat across thousands of subscribers (a lab shares a few
# zones and send times): each distinct value is checked once per load.
_REPEATING = frozenset(("timezone", "send_at", "max_papers", "send_empty"))
_HASHABLE = (str, int, float, time_of_day)  # what TOML gives those keys (a list is not)
_PHRASE_LISTS = frozenset(("interests", "seed_papers"))  # lists of strings, memoised as tuples


def _all_strings(raw: Any) -> bool:
    return isinstance(raw, list) and all(type(entry) is str for entry in raw)


def _subscriber_error(file: str, i: int, item: Any, base: Path) -> NoReturn:
    """Raise the ConfigError for ``subscribers[i]``: the first bad key in SUBSCRIBER_KEYS order."""
    path = f"subscribers[{i}]"
    if not isinstance(item, dict):
        raise ConfigError(file, path, f"expected a table ([[subscribers]]), got {_typed(item)}")
    r = _Reader(file, item, path, SUBSCRIBER_KEYS, base)
    if "email" not in item:
        raise r.error("email", "missing (required)")
    for name in SUBSCRIBER_KEYS:
        if name in item:
            r.value(name)
    raise ConfigError(file, path, "refused, but no key says why")  # pragma: no cover


def _sources(file: str, items: Any, base: Path) -> tuple[SourceConfig, ...]:
    """The ``[[sources]]`` tables, checked; names are unique (they name the inbox files)."""
    from urllib.parse import urlsplit

    if not isinstance(items, list):
        raise ConfigError(file, "sources", f"expected a list of [[sources]] tables, got "
                          f"{_typed(items)}")
    sources: list[SourceConfig] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        path = f"sources[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(file, path, f"expected a table ([[sources]]), got {_typed(item)}")
        values = _Reader(file, item, path, SOURCE_KEYS, base).values()
        host = urlsplit(values["url"].replace("{date}", "2026-01-01")).hostname or "source"
        values["name"] = values["name"] or host
        key = values["name"].lower()
        if key in seen:
            raise ConfigError(file, f"{path}.name",
                              f'duplicate source name "{values["name"]}" (also '
                              f"sources[{seen[key]}]); give each source its own name")
        seen[key] = i
        sources.append(SourceConfig(**values))
    return tuple(sources)
