"""[[sources]] in the config, the README's and the example config's sources, the schedule's
arithmetic and the Retry-After parser (property-based: it reads what servers send)."""

from __future__ import annotations

import re
import textwrap
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from digest.config import DEFAULT_FETCH_AT, SourceConfig, load_config
from digest.errors import ConfigError
from digest.sources import (
    MAX_RETRY_AFTER,
    fetch_times,
    inbox_name,
    is_due,
    latest_fetch_time,
    listing_url,
    next_fetch,
    next_fetch_time,
    parse_retry_after,
    readable_duration,
    redact_url,
    user_agent,
)
from digest.store import SourceRun

from .helpers import ROOT, write_config

BASE = """
    [digest]
    inbox = "in"
    state = "state.sqlite3"

    [smtp]
    sink = "out"
    from = "Lab Digest <papers@lab.example.org>"
"""


def load(tmp_path: Path, sources: str) -> list[SourceConfig]:
    """Load BASE with ``sources`` after it (or before it: a top-level ``sources = ...`` key)."""
    text = textwrap.dedent(sources).strip() + "\n"
    body = BASE + text if text.startswith("[[") else text + textwrap.dedent(BASE)
    return list(load_config(write_config(tmp_path, body)).sources)


def error_of(tmp_path: Path, sources: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, sources)
    return str(info.value)


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# --- the config -------------------------------------------------------------------------


def test_a_source_with_only_a_url_gets_the_defaults(tmp_path: Path) -> None:
    [source] = load(tmp_path, """
        [[sources]]
        url = "https://huggingface.co/api/daily_papers?date={date}"
    """)
    assert source.name == "huggingface.co" and source.dated
    assert source.at == tuple(time.fromisoformat(t) for t in DEFAULT_FETCH_AT)
    assert source.timezone.key == "UTC" and source.headers == () and source.contact is None
    assert (source.timeout, source.attempts, source.lookback_days) == (30.0, 3, 1)
    config = load_config(tmp_path / "digest.toml")
    assert "mailto:papers@lab.example.org" in user_agent(source, config)


def test_every_key(tmp_path: Path) -> None:
    [source] = load(tmp_path, """
        [[sources]]
        name = "arxiv-cs.LG"
        url = "https://rss.arxiv.org/rss/cs.LG"
        at = ["21:30", "06:15", "06:15"]
        timezone = "America/New_York"
        headers = { Accept-Language = "en", X-Token = "abc" }
        contact = "admin@lab.example.org"
        timeout = 10
        attempts = 5
        retry_seconds = 0.5
        max_bytes = 1000
        lookback_days = 0
    """)
    assert source.at == (time(6, 15), time(21, 30)) and not source.dated
    assert source.headers == (("Accept-Language", "en"), ("X-Token", "abc"))
    assert (source.timeout, source.attempts, source.retry_seconds, source.max_bytes) == (
        10.0, 5, 0.5, 1000)
    config = load_config(tmp_path / "digest.toml")
    assert "mailto:admin@lab.example.org" in user_agent(source, config)


@pytest.mark.parametrize(("sources", "message"), [
    ("[[sources]]\nname = 'x'", "sources[0].url: missing (required)"),
    ("[[sources]]\nurl = 'ftp://example.org/x'",
     'sources[0].url: expected an http:// or https:// URL, got "ftp://example.org/x"'),
    ("[[sources]]\nurl = 'https:///nohost'", "sources[0].url: expected an http:// or https://"),
    ("[[sources]]\nurl = 'https://example.org:99999/'", "sources[0].url: not a URL"),
    ("[[sources]]\nurl = 'https://example.org/a b'", "sources[0].url: a URL has no spaces"),
    ("[[sources]]\nurl = 'https://example.org/?d={day}'",
     'sources[0].url: unknown placeholder "{day}" (the only one is {date}'),
    ("[[sources]]\nurl = 'https://example.org/'\nname = 'a/b'",
     'sources[0].name: expected letters, digits, ".", "_" or "-"'),
    ("[[sources]]\nurl = 'https://a.example.org/'\n[[sources]]\nurl = 'https://a.example.org/b'",
     'sources[1].name: duplicate source name "a.example.org" (also sources[0])'),
    ("[[sources]]\nurl = 'https://example.org/'\nat = ['6:00', '25:00']",
     'sources[0].at[1]: expected a time "HH:MM" (24-hour), got "25:00"'),
    ("[[sources]]\nurl = 'https://example.org/'\nat = []", "sources[0].at: must give at least"),
    ("[[sources]]\nurl = 'https://example.org/'\nat = '06:00'", "sources[0].at: expected a list"),
    ("[[sources]]\nurl = 'https://example.org/'\ntimezone = 'Mars/Olympus'",
     'sources[0].timezone: unknown time zone "Mars/Olympus"'),
    ("[[sources]]\nurl = 'https://example.org/'\nheaders = { 'Bad Name' = 'x' }",
     'sources[0].headers."Bad Name": not an HTTP header name'),
    ("[[sources]]\nurl = 'https://example.org/'\nheaders = { If-None-Match = 'x' }",
     "sources[0].headers.If-None-Match: set by paper-digest itself; remove it"),
    ("[[sources]]\nurl = 'https://example.org/'\nheaders = { X-A = 1 }",
     "sources[0].headers.X-A: expected a string, got a whole number 1"),
    ("[[sources]]\nurl = 'https://example.org/'\nheaders = { X-A = \"a\\nb\" }",
     "sources[0].headers.X-A: must be one line"),
    ("[[sources]]\nurl = 'https://example.org/'\nheaders = { X-A = 'café' }",
     "sources[0].headers.X-A: must be ASCII text"),
    ("[[sources]]\nurl = 'https://example.org/'\ncontact = 'nobody'",
     'sources[0].contact: not an email address: "nobody"'),
    ("[[sources]]\nurl = 'https://example.org/'\ntimeout = 0",
     "sources[0].timeout: expected a number of seconds from 0.01 to 3600, got 0"),
    ("[[sources]]\nurl = 'https://example.org/'\nattempts = 0",
     "sources[0].attempts: expected a whole number from 1 to 10, got 0"),
    ("[[sources]]\nurl = 'https://example.org/'\nretry_seconds = -1",
     "sources[0].retry_seconds: expected a number of seconds from 0 to 600, got -1"),
    ("[[sources]]\nurl = 'https://example.org/'\nmax_bytes = 0",
     "sources[0].max_bytes: expected a whole number from 1 to 1073741824, got 0"),
    ("[[sources]]\nurl = 'https://example.org/'\nlookback_days = 30",
     "sources[0].lookback_days: expected a whole number from 0 to 7, got 30"),
    ("[[sources]]\nurl = 'https://example.org/'\nevery = '1h'",
     "sources[0].every: unknown key (expected one of: url, name, at, timezone"),
    ("sources = 'https://example.org/'", "sources: expected a list"),
    ("sources = ['https://example.org/']", "sources[0]: expected a table ([[sources]])"),
])
def test_every_wrong_key_is_named_with_the_file(tmp_path: Path, sources: str,
                                                 message: str) -> None:
    error = error_of(tmp_path, sources)
    assert error.startswith(str(tmp_path / "digest.toml") + ": "), error
    assert message in error, error


def _sources_blocks(text: str) -> list[str]:
    """The ```toml blocks of a Markdown text that hold [[sources]]."""
    return [block for block in re.findall(r"```toml\n(.*?)```", text, flags=re.DOTALL)
            if "[[sources]]" in block]


def test_the_readme_sources_examples_load(tmp_path: Path) -> None:
    blocks = _sources_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    assert blocks, "the README shows [[sources]] examples"
    sources = load(tmp_path, "\n".join(blocks))
    urls = {s.url for s in sources}
    assert "https://huggingface.co/api/daily_papers?date={date}" in urls
    assert "https://rss.arxiv.org/rss/cs.LG" in urls


def test_the_example_configs_commented_sources_load_when_uncommented(tmp_path: Path) -> None:
    text = (ROOT / "config" / "digest.example.toml").read_text(encoding="utf-8")
    assert load_config(ROOT / "config" / "digest.example.toml").sources == ()  # off by default
    lines = [line[2:] for line in text.splitlines() if line.startswith("# ")]
    start = next(i for i, line in enumerate(lines) if line.startswith("[[sources]]"))
    block = []
    for line in lines[start:]:
        if not (line.startswith(("[[sources]]", " ")) or re.match(r"^[a-z_]+ *=", line)):
            break
        block.append(line)
    sources = load(tmp_path, "\n".join(block))
    assert [s.name for s in sources] == ["hf-daily", "arxiv-cs.LG"]


# --- the schedule -------------------------------------------------------------------------


def berlin(*at: str) -> SourceConfig:
    from zoneinfo import ZoneInfo

    return SourceConfig(name="s", url="https://example.org/?d={date}",
                        at=tuple(time.fromisoformat(t) for t in at),
                        timezone=ZoneInfo("Europe/Berlin"))


def run(started: str, *, ok: bool = True, retry_at: str | None = None,
        not_before: str | None = None) -> SourceRun:
    return SourceRun("s", utc(started).isoformat(), "ok" if ok else "failed", "",
                     0 if ok else 1, None, utc(retry_at).isoformat() if retry_at else None,
                     utc(not_before).isoformat() if not_before else None)


def test_fetch_times_follow_the_zone_across_daylight_saving_time() -> None:
    source = berlin("02:30", "07:00")
    # 2026-03-29: 02:00 -> 03:00 in Berlin; 02:30 does not exist and lands after the jump.
    assert fetch_times(source, date(2026, 3, 29)) == [utc("2026-03-29 01:30"),
                                                      utc("2026-03-29 05:00")]
    assert fetch_times(source, date(2026, 3, 28)) == [utc("2026-03-28 01:30"),
                                                      utc("2026-03-28 06:00")]
    assert latest_fetch_time(source, utc("2026-03-29 04:59")) == utc("2026-03-29 01:30")
    assert latest_fetch_time(source, utc("2026-03-29 01:00")) == utc("2026-03-28 06:00")
    assert next_fetch_time(source, utc("2026-03-29 05:00")) == utc("2026-03-30 00:30")


def test_due_never_fetched_missed_retry_and_retry_after() -> None:
    source = berlin("07:00", "19:00")
    now = utc("2026-03-12 10:00")  # 11:00 in Berlin
    assert is_due(source, None, now)
    assert not is_due(source, run("2026-03-12 06:00"), now)  # fetched at 07:00 Berlin
    assert is_due(source, run("2026-03-12 05:59"), now)  # before 07:00: missed it
    assert is_due(source, run("2026-03-10 12:00"), now)  # down for days: once
    failed = run("2026-03-12 09:00", ok=False, retry_at="2026-03-12 09:30")
    assert is_due(source, failed, now)
    waiting = run("2026-03-12 05:00", ok=False, retry_at="2026-03-12 12:00",
                  not_before="2026-03-12 12:00")
    assert not is_due(source, waiting, now)  # 07:00 passed, but the server asked to wait
    assert next_fetch(source, waiting, now) == utc("2026-03-12 12:00")
    assert next_fetch(source, run("2026-03-12 06:00"), now) == utc("2026-03-12 18:00")
    assert next_fetch(source, None, now) == now


def test_names_and_urls() -> None:
    source = berlin("07:00")
    assert listing_url(source, date(2026, 3, 1)) == "https://example.org/?d=2026-03-01"
    assert inbox_name(source, date(2026, 3, 1)) == "s-2026-03-01.txt"


# --- Retry-After ----------------------------------------------------------------------------

NOW = utc("2026-03-12 09:00")


def test_retry_after_seconds_and_dates() -> None:
    assert parse_retry_after("120", NOW) == 120.0
    assert parse_retry_after(" 0 ", NOW) == 0.0
    assert parse_retry_after("Thu, 12 Mar 2026 09:02:00 GMT", NOW) == 120.0
    assert parse_retry_after("Thu, 12 Mar 2026 08:00:00 GMT", NOW) == 0.0  # in the past
    for junk in (None, "", "soon", "-5", "1.5", "١٢", "Thu, 99 Foo 2026"):
        assert parse_retry_after(junk, NOW) is None, junk


@given(st.text(max_size=60))
def test_retry_after_never_raises_and_is_never_negative(value: str) -> None:
    seconds = parse_retry_after(value, NOW)
    assert seconds is None or seconds >= 0


@given(st.integers(min_value=0, max_value=10**40))
def test_retry_after_delta_seconds_are_read_exactly_up_to_the_cap(value: int) -> None:
    cap = MAX_RETRY_AFTER.total_seconds()
    assert parse_retry_after(str(value), NOW) == min(float(value), cap)


@given(st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2100, 1, 1)))
def test_retry_after_http_dates_are_seconds_from_now(moment: datetime) -> None:
    from email.utils import format_datetime

    when = moment.replace(tzinfo=UTC, microsecond=0)
    header = format_datetime(when, usegmt=True)
    cap = MAX_RETRY_AFTER.total_seconds()
    assert parse_retry_after(header, NOW) == min(cap, max(0.0, (when - NOW).total_seconds()))
    assert parse_retry_after(header, when - timedelta(seconds=5)) == 5.0


@pytest.mark.parametrize(("url", "shown"), [
    ("https://ada:hunter2@example.org/feed", "https://ada:***@example.org/feed"),
    ("https://tok3n@example.org/feed", "https://***@example.org/feed"),
    ("https://example.org/api?date={date}&token=abc123&limit=5",
     "https://example.org/api?date={date}&token=***&limit=5"),
    ("https://example.org/a?apikey=k1&api_key=k2&Password=p&client_secret=s&key=k",
     "https://example.org/a?apikey=***&api_key=***&Password=***&client_secret=***&key=***"),
    ("https://example.org/rss/cs.LG?monkey=ok", "https://example.org/rss/cs.LG?monkey=ok"),
])
def test_secrets_in_a_source_url_are_masked(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_waits_read_as_durations() -> None:
    assert [readable_duration(s) for s in (0, 45, 90, 3600, 9000, 21600)] == [
        "0s", "45s", "2 min", "1 h", "2 h 30 min", "6 h"]
