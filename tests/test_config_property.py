"""Property-based: for any TOML document of the config's shape, load_config returns a Config
or raises ConfigError, nothing else; and so for any bytes at all.

Each property runs EXAMPLES (2,000) generated documents; the values are a mix
of plausible ones (so the checks past the first key are reached) and hostile
ones: infinities, NaN, 1e300, huge integers, booleans where numbers belong,
strings with NUL, CR/LF and other control characters, TOML dates and times,
nested lists and tables, unknown keys.
"""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from digest.config import (
    DIGEST_KEYS,
    IMAP_KEYS,
    MAILDIR_KEYS,
    RANKING_KEYS,
    SMTP_KEYS,
    SUBSCRIBER_KEYS,
    Config,
    load_config,
)
from digest.errors import ConfigError

EXAMPLES = 2000
SETTINGS = settings(max_examples=EXAMPLES, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

NASTY_TEXT = ["", " ", "\x00", "a\r\nb", "\u2028", "\ud7ff", "inf", "nan", "08:00", "25:61",
              "Europe/Berlin", "Europe/Berln", "../../etc/passwd", "zone.tab", "mon", "funday",
              "alice@example.org", "a@b.org, c@d.org", "d+{token}@example.org",
              "Paper Digest <digest@example.org>", "x" * 400, "\u00e9", "{token}", "~root/x"]

scalars = st.one_of(
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**200), max_value=2**200),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1, 0.5, 1e300, -1e300, 2**63, 65536]),
    st.text(max_size=20),
    st.sampled_from(NASTY_TEXT),
    st.dates(), st.times(), st.datetimes(),
)
hostile = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)

# Plausible values per key, so documents get past the first check often enough.
GOOD: dict[str, Any] = {
    "inbox": st.just("inbox"), "state": st.just("state/digest.sqlite3"),
    "scan_seconds": st.floats(0.01, 3600), "dispatch_seconds": st.integers(1, 3600),
    "max_late_hours": st.floats(0.01, 168), "stable_seconds": st.floats(0, 60),
    "host": st.just("smtp.example.org"), "port": st.integers(1, 65535),
    "security": st.sampled_from(["starttls", "tls", "none"]), "username": st.just("digest"),
    "password_env": st.just("DIGEST_PROPERTY_UNSET"), "password_file": st.just("pw"),
    "from": st.just("Paper Digest <digest@example.org>"),
    "reply_to": st.just("digest+{token}@example.org"), "timeout": st.floats(0.01, 3600),
    "verify_tls": st.booleans(), "sink": st.just("outbox"), "attempts": st.integers(1, 10),
    "retry_seconds": st.floats(0, 600), "unrated_weight": st.floats(0, 1),
    "explore_fraction": st.floats(0, 1), "mailbox": st.just("INBOX"),
    "processed_mailbox": st.just("Done"), "poll_seconds": st.floats(0.01, 600),
    "idle": st.booleans(), "confirmations_per_hour": st.integers(0, 1000), "path": st.just("md"),
    "email": st.sampled_from(["alice@example.org", "bob@example.org", "jos\u00e9@example.org"]),
    "name": st.text(max_size=10), "interests": st.lists(st.text(min_size=1, max_size=10)),
    "seed_papers": st.lists(st.just("2403.01234"), max_size=2),
    "send_at": st.sampled_from(["08:00", "23:59", "0:00"]),
    "timezone": st.sampled_from(["UTC", "Europe/Berlin", "Asia/Kolkata"]),
    "max_papers": st.integers(1, 100), "days": st.lists(st.sampled_from(["mon", "sun"])),
    "send_empty": st.booleans(),
}


def table_of(keys: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """A table with some of ``keys`` (plausible or hostile values) and now and then an unknown key."""
    optional = {key: st.one_of(GOOD.get(key, hostile), GOOD.get(key, hostile), hostile)
                for key in keys}
    table = st.fixed_dictionaries({}, optional=optional)
    return st.one_of(table, table, table, st.tuples(table, st.text(max_size=6), hostile).map(
        lambda t: {**t[0], t[1]: t[2]}))


documents = st.fixed_dictionaries({}, optional={
    "digest": st.one_of(table_of(DIGEST_KEYS), hostile),
    "smtp": st.one_of(table_of(SMTP_KEYS), table_of(SMTP_KEYS), hostile),
    "ranking": table_of(RANKING_KEYS),
    "defaults": table_of({k: v for k, v in SUBSCRIBER_KEYS.items() if k not in ("email", "name")}),
    "subscribers": st.one_of(st.lists(table_of(SUBSCRIBER_KEYS), max_size=3), hostile),
    "imap": table_of(IMAP_KEYS),
    "maildir": table_of(MAILDIR_KEYS),
})


def check_outcome(path: Path) -> None:
    """load_config returns a usable Config, or raises one-line ConfigError naming the file."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith(str(path)) and "\n" not in message and "\r" not in message
        return
    assert isinstance(config, Config)
    numbers = [config.scan_seconds, config.dispatch_seconds, config.stable_seconds,
               config.smtp.timeout, config.smtp.retry_seconds,
               config.ranking.unrated_weight, config.ranking.explore_fraction]
    assert all(math.isfinite(n) and n >= 0 for n in numbers)
    assert timedelta(0) < config.max_late <= timedelta(days=7)
    for sub in config.subscribers:
        assert 1 <= sub.max_papers <= 100 and sub.days and sub.timezone.key
        assert sub.name.isprintable() and "@" in sub.email


@pytest.fixture(scope="module")
def config_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One file the examples overwrite in turn (a folder per example is slow to make)."""
    return tmp_path_factory.mktemp("property") / "digest.toml"


@SETTINGS
@given(doc=documents)
def test_any_config_shaped_document_loads_or_is_a_config_error(config_path: Path,
                                                               doc: dict[str, Any]) -> None:
    config_path.write_text(tomli_w.dumps(doc), encoding="utf-8")
    check_outcome(config_path)


@SETTINGS
@given(raw=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode)))
def test_any_bytes_load_or_are_a_config_error(config_path: Path, raw: bytes) -> None:
    config_path.write_bytes(raw)
    check_outcome(config_path)


# Domains the address shortcut meets: plain, upper-case, private names, IDNA, special-use,
# malformed, and long enough that the 254-octet limit of the whole address bites.
DOMAINS = ["example.org", "Lab.EXAMPLE.org", "localhost", "mail.test", "box.local",
           "under_score.org", "-dash.org", "example.org.", "foo.invalid", "onion", "1.2.3.4",
           "xn--bcher-kva.example", "bücher.example", "例え.jp",
           ".".join(["a" * 60] * 3) + ".org", ".".join(["b" * 63] * 3) + ".org"]
LOCAL_PARTS = st.one_of(
    st.from_regex(r"[A-Za-z0-9_+-]{1,30}(\.[A-Za-z0-9_+-]{1,30}){0,3}", fullmatch=True),
    st.text(alphabet="ab.+-_\"!#é ", max_size=70))


@settings(SETTINGS, max_examples=400)  # email-validator is slow; these cover the paths
@given(local=LOCAL_PARTS, domain=st.sampled_from(DOMAINS), ascii_only=st.booleans())
def test_the_address_shortcut_answers_as_email_validator(local: str, domain: str,
                                                         ascii_only: bool) -> None:
    """check_address skips email-validator for a plain local part at a domain it has checked:
    the address it returns, or the error it raises, is the whole check's."""
    from digest.config import _Bad, _check_whole_address, check_address

    address = f"{local}@{domain}"

    def outcome(check: Any) -> tuple[str, str]:
        try:
            return ("ok", check())
        except _Bad as exc:
            return ("bad", str(exc))

    fast = outcome(lambda: check_address(address, ascii_only=ascii_only))
    if ascii_only and not address.isascii():
        assert fast[0] == "bad"  # refused before either path
        return
    assert fast == outcome(lambda: _check_whole_address(address, ascii_only))
