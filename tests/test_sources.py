"""Fetching [[sources]] from a real HTTP server on loopback into the inbox, and the scan after.

The server is the standard library's ``http.server`` in a thread, serving this
file's own small listings with the answers each test scripts: 200, 304, 404,
429 with Retry-After, 500 then 200, a slow answer, an oversize body, TLS with
an untrusted certificate. The daemon's fetch tick is exercised in time
(time-machine): it fetches at the configured local times, into the inbox,
and its scan ingests what it wrote.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import time_machine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from digest.cli import main
from digest.config import Config, load_config
from digest.daemon import Daemon
from digest.daemon import loop as loop_module
from digest.ingest import scan_inbox
from digest.sources import (
    MAX_RETRY_AFTER,
    RETRY_FAILED_AFTER,
    PlannedUrl,
    SourcePlan,
    SourceResult,
    download,
    fetch_sources,
    is_due,
    parse_retry_after,
    plan_fetches,
    record_results,
)
from digest.store import Store

from .daemon_helpers import toml_value, utc
from .smtp_helpers import make_self_signed_cert

# --- listings of our own --------------------------------------------------------------


def api_listing(day: str, *titles: str) -> bytes:
    """A daily-papers API answer: one entry per title, arXiv ids made up from the date."""
    entries = []
    for i, title in enumerate(titles, start=1):
        arxiv = f"{day[2:4]}{day[5:7]}.{i:05d}"
        entries.append({"paper": {"id": arxiv, "title": title, "upvotes": 10 - i,
                                  "summary": f"We study {title.lower()} on three benchmarks.",
                                  "publishedAt": f"{day}T12:00:00.000Z"},
                        "title": title, "publishedAt": f"{day}T12:00:00.000Z"})
    return json.dumps(entries).encode()


RSS = b"""<?xml version="1.0" encoding="UTF-8"?>
<rss version="2.0"><channel><title>cs.LG updates on arXiv.org</title>
<link>http://rss.arxiv.org/rss/cs.LG</link><description>cs.LG updates</description>
<item><title>Sparse Mixtures for Streaming Tabular Data</title>
<link>https://arxiv.org/abs/2603.04321</link>
<description>arXiv:2603.04321v1 Announce Type: new Abstract: We fit sparse mixtures online.</description>
<guid isPermaLink="false">oai:arXiv.org:2603.04321v1</guid>
<pubDate>Thu, 12 Mar 2026 00:00:00 -0400</pubDate></item>
</channel></rss>
"""


# --- a scripted HTTP server on loopback -----------------------------------------------


@dataclass
class Answer:
    """One scripted answer; ``etag``/``last_modified`` make it answer 304 to a match."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds before the status line: a slow server
    chunked: bool = False  # no Content-Length: the size is known only by reading
    trickle: float = 0.0  # seconds between chunks of 16 bytes: a server that never finishes
    etag: str | None = None
    last_modified: str | None = None


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    at: datetime  # the server's clock (time-machine's, in a travelling test)


class ListingServer:
    """``http.server`` in a thread; each path answers its script in turn, the last repeats."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.routes: dict[str, list[Answer]] = {}
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                owner._answer(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the test reads ``requests``, not stderr

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.scheme = "https" if tls else "http"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def script(self, path: str, *answers: Answer) -> None:
        with self._lock:
            self.routes[path] = list(answers)

    def paths(self) -> list[str]:
        return [r.path for r in self.requests]

    def _answer(self, handler: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.requests.append(Request(handler.path, dict(handler.headers.items()),
                                         datetime.now(UTC)))
            script = self.routes.get(handler.path) or self.routes.get(handler.path.split("?")[0])
            answer = (script.pop(0) if len(script) > 1 else script[0]) if script else Answer(404)
        try:
            if answer.delay:
                time.sleep(answer.delay)
            if (answer.etag and handler.headers.get("If-None-Match") == answer.etag) or (
                    answer.last_modified
                    and handler.headers.get("If-Modified-Since") == answer.last_modified):
                handler.send_response(304)
                handler.send_header("Content-Length", "0")
                handler.end_headers()
                return
            handler.send_response(answer.status)
            for name, value in answer.headers.items():
                handler.send_header(name, value)
            if answer.etag:
                handler.send_header("ETag", answer.etag)
            if answer.last_modified:
                handler.send_header("Last-Modified", answer.last_modified)
            if answer.chunked:
                handler.send_header("Transfer-Encoding", "chunked")
                handler.end_headers()
                size = 16 if answer.trickle else 4096
                for start in range(0, len(answer.body), size):
                    piece = answer.body[start:start + size]
                    handler.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                    handler.wfile.flush()
                    time.sleep(answer.trickle)
                handler.wfile.write(b"0\r\n\r\n")
            else:
                handler.send_header("Content-Length", str(len(answer.body)))
                handler.end_headers()
                handler.wfile.write(answer.body)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass  # the client gave up first (a timeout, a size limit): what the test wants

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """``main`` points the root logger at the captured stderr; later tests must not write there."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def server() -> Iterator[ListingServer]:
    listing_server = ListingServer()
    yield listing_server
    listing_server.close()


def write_config(folder: Path, sources: list[dict[str, Any]], **digest: Any) -> Path:
    """A config with an inbox and state in ``folder`` and these [[sources]] tables."""
    settings = {"inbox": "inbox", "state": "var/state.sqlite3", "stable_seconds": 0, **digest}
    lines = ["[digest]", *(f"{k} = {toml_value(v)}" for k, v in settings.items()), "",
             "[smtp]", 'sink = "outbox"', 'from = "Paper Digest <digest@lab.example.org>"', ""]
    for source in sources:
        lines.append("[[sources]]")
        for key, value in source.items():
            if isinstance(value, dict):
                pairs = ", ".join(f"{toml_value(k)} = {toml_value(v)}" for k, v in value.items())
                lines.append(f"{key} = {{ {pairs} }}")
            else:
                lines.append(f"{key} = {toml_value(value)}")
        lines.append("")
    path = folder / "digest.toml"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def source(server: ListingServer, path: str = "/api/daily_papers?date={date}",
           **keys: Any) -> dict[str, Any]:
    return {"name": "hf", "url": server.url(path), "retry_seconds": 0.01, "timeout": 5,
            "lookback_days": 0, **keys}


def fetch(config: Config, store: Store, at: datetime | None = None, **options: Any
          ) -> list[SourceResult]:
    """``digest fetch`` as a function, at ``at`` (time-machine) when given."""
    options.setdefault("scheduled", False)
    if at is None:
        return asyncio.run(fetch_sources(config, store, **options))
    with time_machine.travel(at, tick=False):
        return asyncio.run(fetch_sources(config, store, now=at, **options))


def inbox_names(config: Config) -> list[str]:
    """Every name in the inbox, hidden ones too: no temporary file may be left behind."""
    return sorted(p.name for p in config.inbox.iterdir()) if config.inbox.exists() else []


@pytest.fixture
def setup(tmp_path: Path, server: ListingServer) -> Any:
    def make(*sources: dict[str, Any], **digest: Any) -> tuple[Config, Store]:
        config = load_config(write_config(tmp_path, list(sources), **digest))
        store = Store(config.state)
        opened.append(store)
        return config, store

    opened: list[Store] = []
    yield make
    for store in opened:
        store.close()


DAY = utc("2026-03-12 09:00")


# --- 200: a listing into the inbox, then the scan ---------------------------------------


def test_a_listing_is_written_into_the_inbox_under_its_source_and_date_and_ingested(
        server: ListingServer, setup: Any) -> None:
    server.script("/api/daily_papers", Answer(200, api_listing("2026-03-12", "Graph Rewiring",
                                                               "Token Merging"),
                                              {"Content-Type": "application/json"}))
    config, store = setup(source(server, lookback_days=1))
    [result] = fetch(config, store, DAY)
    assert result.status == "ok" and [u.status for u in result.urls] == ["written", "written"]
    assert server.paths() == ["/api/daily_papers?date=2026-03-11",
                              "/api/daily_papers?date=2026-03-12"]
    assert inbox_names(config) == ["hf-2026-03-11.json", "hf-2026-03-12.json"]
    agent = server.requests[0].headers["User-Agent"]
    assert agent.startswith("paper-digest/") and "mailto:digest@lab.example.org" in agent
    ingested = scan_inbox(store, config.inbox, stable_seconds=0)
    assert [(r.path.name, r.status) for r in ingested] == [
        ("hf-2026-03-11.json", "ingested"), ("hf-2026-03-12.json", "duplicate")]
    assert {p.title for p in store.all_papers()} == {"Graph Rewiring", "Token Merging"}
    run = store.source_run("hf")
    assert run is not None and run.outcome == "ok" and run.failures == 0


def test_an_undated_url_is_named_by_the_fetch_date_and_a_feed_gets_xml(
        server: ListingServer, setup: Any) -> None:
    server.script("/rss/cs.LG", Answer(200, RSS, {"Content-Type": "application/rss+xml"}))
    config, store = setup(source(server, "/rss/cs.LG", name="arxiv-cs.LG",
                                 timezone="America/New_York", lookback_days=3))
    fetch(config, store, utc("2026-03-12 03:00"))  # still the 11th in New York
    assert inbox_names(config) == ["arxiv-cs.LG-2026-03-11.xml"]
    assert server.paths() == ["/rss/cs.LG"]  # no {date}: one URL, lookback unused
    scan_inbox(store, config.inbox, stable_seconds=0)
    assert [p.arxiv_id for p in store.all_papers()] == ["2603.04321"]


def test_config_headers_are_sent(server: ListingServer, setup: Any) -> None:
    server.script("/x", Answer(200, RSS))
    config, store = setup(source(server, "/x", headers={"Authorization": "Bearer abc",
                                                        "User-Agent": "lab-fetcher/2"}))
    fetch(config, store, DAY)
    headers = server.requests[0].headers
    assert headers["Authorization"] == "Bearer abc" and headers["User-Agent"] == "lab-fetcher/2"


# --- 304 and unchanged listings ---------------------------------------------------------


def test_an_unchanged_listing_is_not_downloaded_again_etag_and_last_modified(
        server: ListingServer, setup: Any) -> None:
    body = api_listing("2026-03-12", "Graph Rewiring")
    server.script("/etag", Answer(200, body, etag='"v1"'))
    server.script("/modified", Answer(200, body, last_modified="Thu, 12 Mar 2026 06:00:00 GMT"))
    config, store = setup(source(server, "/etag", name="e"), source(server, "/modified", name="m"))
    fetch(config, store, DAY)
    written = {p.name: p.stat().st_mtime_ns for p in config.inbox.iterdir()}
    assert sorted(written) == ["e-2026-03-12.txt", "m-2026-03-12.txt"]
    results = fetch(config, store, DAY + timedelta(hours=3))
    assert [(r.source, [u.status for u in r.urls]) for r in results] == [
        ("e", ["not-modified"]), ("m", ["not-modified"])]
    assert server.requests[2].headers["If-None-Match"] == '"v1"'
    assert server.requests[3].headers["If-Modified-Since"] == "Thu, 12 Mar 2026 06:00:00 GMT"
    assert {p.name: p.stat().st_mtime_ns for p in config.inbox.iterdir()} == written
    run = store.source_run("e")
    assert run is not None and run.outcome == "ok" and run.detail == "1 not-modified"
    # A 304 keeps the validators: the third fetch asks conditionally again.
    fetch(config, store, DAY + timedelta(hours=6))
    assert server.requests[4].headers["If-None-Match"] == '"v1"'


def test_a_validator_that_cannot_be_sent_back_is_dropped(server: ListingServer,
                                                         setup: Any) -> None:
    server.script("/api", Answer(200, RSS, etag='"caf\u00e9"'))  # a Latin-1 byte on the wire
    config, store = setup(source(server, "/api"))
    fetch(config, store, DAY)
    [again] = fetch(config, store, DAY + timedelta(hours=6))
    assert again.status == "ok" and again.urls[0].status == "unchanged"
    assert "If-None-Match" not in server.requests[1].headers


def test_a_server_without_validators_the_same_body_is_not_written_again_a_new_one_is(
        server: ListingServer, setup: Any) -> None:
    first = api_listing("2026-03-12", "Graph Rewiring")
    grown = api_listing("2026-03-12", "Graph Rewiring", "Token Merging")
    server.script("/api", Answer(200, first), Answer(200, first), Answer(200, grown))
    config, store = setup(source(server, "/api"))
    target = config.inbox / "hf-2026-03-12.txt"
    fetch(config, store, DAY)
    assert scan_inbox(store, config.inbox, stable_seconds=0)[0].status == "ingested"
    mtime = target.stat().st_mtime_ns
    [again] = fetch(config, store, DAY + timedelta(hours=3))
    assert again.urls[0].status == "unchanged" and target.stat().st_mtime_ns == mtime
    [grew] = fetch(config, store, DAY + timedelta(hours=6))
    assert grew.urls[0].status == "written" and target.read_bytes() == grown
    [result] = scan_inbox(store, config.inbox, stable_seconds=0)
    assert (result.status, result.papers, result.new_papers) == ("ingested", 2, 1)
    assert inbox_names(config) == ["hf-2026-03-12.txt"]


# --- failures ---------------------------------------------------------------------------


def test_404_fails_at_once_without_retry_and_status_shows_it(
        server: ListingServer, setup: Any, capsys: pytest.CaptureFixture[str]) -> None:
    config, store = setup(source(server, "/missing"))
    [result] = fetch(config, store, DAY)
    assert result.status == "failed" and result.retry_at is None
    assert result.detail == f"{server.url('/missing')}: HTTP 404 Not Found"
    assert server.paths() == ["/missing"] and inbox_names(config) == []
    run = store.source_run("hf")
    assert run is not None and (run.outcome, run.failures, run.last_ok_at) == ("failed", 1, None)
    store.close()
    assert main(["--config", str(config.path), "status"]) == 0
    out = capsys.readouterr().out
    assert "- hf: FAILED 1 time(s) in a row" in out and "HTTP 404 Not Found" in out
    assert main(["--config", str(config.path), "status", "--json"]) == 0
    [shown] = json.loads(capsys.readouterr().out)["sources"]
    assert shown["last_fetch"]["outcome"] == "failed"
    assert shown["last_fetch"]["detail"].endswith("HTTP 404 Not Found")


def test_status_before_the_first_fetch_and_after_a_good_one(
        server: ListingServer, setup: Any, capsys: pytest.CaptureFixture[str]) -> None:
    server.script("/api", Answer(200, RSS))
    config, store = setup(source(server, "/api", at=["07:00"], timezone="Europe/Berlin"))
    args = ["--config", str(config.path), "status"]
    with time_machine.travel(DAY, tick=False):
        assert main(args) == 0
    out = capsys.readouterr().out
    assert f"- hf: never fetched ({server.url('/api')})\n    next fetch due now" in out
    fetch(config, store, DAY)
    with time_machine.travel(DAY, tick=False):
        assert main(args) == 0
    out = capsys.readouterr().out
    assert "- hf: ok, fetched Thu 2026-03-12 10:00 Europe/Berlin (1 written)" in out
    assert "next fetch Fri 2026-03-13 07:00 Europe/Berlin" in out


def test_500_then_200_is_retried_with_backoff(server: ListingServer, setup: Any,
                                              caplog: pytest.LogCaptureFixture) -> None:
    server.script("/api", Answer(500), Answer(503), Answer(200, RSS))
    config, store = setup(source(server, "/api", attempts=3))
    with caplog.at_level(logging.WARNING, logger="digest.sources"):
        [result] = fetch(config, store, DAY)
    assert result.status == "ok" and len(server.requests) == 3
    assert inbox_names(config) == ["hf-2026-03-12.txt"]
    assert "HTTP 500 Internal Server Error; trying again in 0.01s (attempt 2 of 3)" in caplog.text
    assert "trying again in 0.02s (attempt 3 of 3)" in caplog.text  # the backoff doubles


def test_5xx_every_time_gives_up_after_the_attempts_and_is_retried_half_an_hour_later(
        server: ListingServer, setup: Any) -> None:
    server.script("/api", Answer(502))
    config, store = setup(source(server, "/api", attempts=2, at=["06:00"]))
    [result] = fetch(config, store, DAY)
    assert result.status == "failed" and len(server.requests) == 2
    assert result.retry_at == DAY + RETRY_FAILED_AFTER
    run = store.source_run("hf")
    assert run is not None
    hf = config.sources[0]
    assert not is_due(hf, run, DAY + RETRY_FAILED_AFTER - timedelta(minutes=1))
    assert is_due(hf, run, DAY + RETRY_FAILED_AFTER)


def test_429_with_a_short_retry_after_is_waited_out(server: ListingServer, setup: Any,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    server.script("/api", Answer(429, headers={"Retry-After": "0"}), Answer(200, RSS))
    config, store = setup(source(server, "/api", retry_seconds=50))
    with caplog.at_level(logging.WARNING, logger="digest.sources"):
        [result] = fetch(config, store)
    assert result.status == "ok" and len(server.requests) == 2
    # The server's 0 s, not the configured 50 s backoff, was waited.
    assert "HTTP 429 Too Many Requests (Retry-After 0s); trying again in 0s" in caplog.text


def test_429_with_a_long_retry_after_stops_and_the_source_waits_until_then(
        server: ListingServer, setup: Any, capsys: pytest.CaptureFixture[str]) -> None:
    later = "Thu, 12 Mar 2026 11:00:00 GMT"  # two hours after DAY
    server.script("/api", Answer(429, headers={"Retry-After": later}), Answer(200, RSS))
    server.script("/huge", Answer(503, headers={"Retry-After": "9999999"}))
    config, store = setup(source(server, "/api"), source(server, "/huge", name="huge"))
    results = fetch(config, store, DAY)
    assert [r.status for r in results] == ["failed", "failed"]
    assert server.paths() == ["/api", "/huge"]  # not retried within the fetch
    assert results[0].not_before == utc("2026-03-12 11:00")
    assert results[1].not_before == DAY + MAX_RETRY_AFTER  # capped
    hf = config.sources[0]
    run = store.source_run("hf")
    assert run is not None and not is_due(hf, run, utc("2026-03-12 10:59"))
    assert is_due(hf, run, utc("2026-03-12 11:00"))
    # By hand too, the server's wish is kept: nothing is asked, exit 1 says why.
    store.close()
    with time_machine.travel(utc("2026-03-12 10:00"), tick=False):
        assert main(["--config", str(config.path), "fetch", "--source", "hf"]) == 1
    assert "the server asked to wait (Retry-After) until 2026-03-12T11:00:00+00:00" in (
        capsys.readouterr().out)
    assert len(server.requests) == 2


def test_a_slow_answer_times_out_and_a_network_error_is_a_failure_too(
        server: ListingServer, setup: Any) -> None:
    server.script("/slow", Answer(200, RSS, delay=3))
    server.script("/trickle", Answer(200, RSS, chunked=True, trickle=0.1))  # 16 bytes / 0.1 s
    closed = ListingServer()
    dead_url = closed.url("/api")
    closed.close()  # nothing listens on that port any more
    config, store = setup(source(server, "/slow", timeout=0.2, attempts=1),
                          source(server, "/trickle", name="trickle", timeout=0.2, attempts=1),
                          {"name": "dead", "url": dead_url, "attempts": 2, "retry_seconds": 0})
    slow, trickle, dead = fetch(config, store, DAY)
    assert slow.status == "failed" and "no answer within 0.2s (ReadTimeout" in slow.detail
    # Each piece comes within the timeout, but the whole may take 4 timeouts at most.
    assert trickle.status == "failed" and trickle.detail.endswith(
        "the answer took longer than 0.8s")
    assert dead.status == "failed" and "network error: ConnectError" in dead.detail
    assert slow.retry_at == dead.retry_at == DAY + RETRY_FAILED_AFTER
    assert inbox_names(config) == []


def test_an_oversize_body_is_refused_declared_or_streamed_and_nothing_is_left(
        server: ListingServer, setup: Any) -> None:
    big = b"[" + b" " * 5000 + b"]"
    server.script("/declared", Answer(200, big))
    server.script("/streamed", Answer(200, big, chunked=True))
    server.script("/fits", Answer(200, big, chunked=True))
    config, store = setup(source(server, "/declared", name="declared", max_bytes=1000),
                          source(server, "/streamed", name="streamed", max_bytes=1000),
                          source(server, "/fits", name="fits", max_bytes=len(big)))
    declared, streamed, fits = fetch(config, store, DAY)
    assert declared.detail.endswith("the answer is 5002 bytes, over the limit of 1000 (max_bytes)")
    assert streamed.detail.endswith("over the limit of 1000 bytes (max_bytes); stopped reading")
    assert fits.status == "ok"
    assert inbox_names(config) == ["fits-2026-03-12.txt"]  # no .part left by the refused two
    assert len(server.requests) == 3  # a size limit is not retried


def test_an_empty_answer_is_not_written(server: ListingServer, setup: Any) -> None:
    server.script("/empty", Answer(200, b""))
    config, store = setup(source(server, "/empty", attempts=1))
    [result] = fetch(config, store, DAY)
    assert result.status == "failed" and "the answer is empty" in result.detail
    assert inbox_names(config) == []


def test_redirects_are_followed(server: ListingServer, setup: Any) -> None:
    server.script("/old", Answer(301, headers={"Location": "/new"}))
    server.script("/new", Answer(200, RSS))
    config, store = setup(source(server, "/old"))
    [result] = fetch(config, store, DAY)
    assert result.status == "ok" and server.paths() == ["/old", "/new"]


def test_tls_is_verified_an_untrusted_certificate_fails_without_retry(
        tmp_path: Path, setup: Any) -> None:
    cert, key = make_self_signed_cert(tmp_path / "tls")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    secure = ListingServer(tls=context)
    try:
        secure.script("/api", Answer(200, RSS))
        config, store = setup(source(secure, "/api", attempts=3))
        [result] = fetch(config, store, DAY)
    finally:
        secure.close()
    assert result.status == "failed" and "TLS certificate not trusted" in result.detail
    assert result.retry_at is None  # not transient: asking again changes nothing
    assert secure.requests == [] and inbox_names(config) == []


def test_one_failing_source_does_not_stop_the_others(server: ListingServer, setup: Any,
                                                    tmp_path: Path) -> None:
    server.script("/good", Answer(200, RSS))
    config, store = setup(source(server, "/missing", name="bad"), source(server, "/good",
                                                                         name="good"))
    bad, good = fetch(config, store, DAY)
    assert (bad.status, good.status) == ("failed", "ok")
    # An inbox that cannot be written is that source's failure, with the reason.
    other = tmp_path / "other"
    other.mkdir()
    (other / "not-a-folder").write_text("a file where the inbox should be")
    blocked = load_config(write_config(other, [source(server, "/good", name="good")],
                                       inbox="not-a-folder"))
    [result] = fetch(blocked, store, DAY)
    assert result.status == "failed" and "cannot write the listing into" in result.detail


# --- the command ------------------------------------------------------------------------


def test_the_fetch_command(server: ListingServer, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    server.script("/api/daily_papers", Answer(200, api_listing("2026-03-01", "Graph Rewiring")))
    server.script("/rss", Answer(200, RSS))
    path = write_config(tmp_path, [source(server), source(server, "/rss", name="rss")])
    args = ["--config", str(path), "fetch"]
    assert main([*args, "--source", "hf", "--date", "2026-03-01"]) == 0
    out = capsys.readouterr().out
    assert f"hf: 2026-03-01 {server.url('/api/daily_papers?date=2026-03-01')}: written to " in out
    assert "1 listing file(s) written to" in out
    assert server.paths() == ["/api/daily_papers?date=2026-03-01"]
    assert main([*args, "--source", "nope"]) == 1
    assert "no source named 'nope' (sources: hf, rss)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main([*args, "--date", "March"])
    assert usage.value.code == 2 and "expected a date YYYY-MM-DD" in capsys.readouterr().err
    assert main(["--config", str(path), "ingest"]) == 0
    assert "hf-2026-03-01.txt: 1 papers, 1 new" in capsys.readouterr().out
    assert main(["--config", str(path), "check-config"]) == 0
    assert "source rss: " in capsys.readouterr().out
    server.script("/rss", Answer(500))
    assert main([*args, "--source", "rss"]) == 1
    assert "FAILED: HTTP 500 Internal Server Error" in capsys.readouterr().out


def test_the_fetch_command_without_sources(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, [])
    assert main(["--config", str(path), "fetch"]) == 0
    assert "no [[sources]] table, so there is nothing to fetch" in capsys.readouterr().out


# --- on schedule ------------------------------------------------------------------------


def tick(config: Config, store: Store, at: datetime) -> list[SourceResult]:
    """What the daemon's fetch tick does, at ``at``: plan the due sources, fetch, record."""
    with time_machine.travel(at, tick=False):
        plans = plan_fetches(config, store, at)
        results = asyncio.run(download(plans))
        record_results(store, results)
    return results


def test_the_schedule_fetches_at_the_local_times_once_each_and_catches_up_once(
        server: ListingServer, setup: Any) -> None:
    server.script("/api/daily_papers", Answer(200, RSS, etag='"same"'))
    config, store = setup(source(server, at=["07:00", "19:00"], timezone="Europe/Berlin",
                                 lookback_days=1))
    fetched: list[str] = []
    moment = utc("2026-03-12 05:30")  # 06:30 in Berlin
    while moment <= utc("2026-03-13 07:00"):
        for result in tick(config, store, moment):
            fetched.append(f"{moment:%d %H:%M} {result.status}")
        moment += timedelta(minutes=10)
    # Never fetched: at once; then 07:00 and 19:00 Berlin (06:00 and 18:00 UTC), and
    # the 13th's 07:00.
    assert fetched == ["12 05:30 ok", "12 06:00 ok", "12 18:00 ok", "13 06:00 ok"]
    # Down from 13th 07:00 to the 14th 20:00 (three fetch times missed): one fetch on return.
    assert [r.status for r in tick(config, store, utc("2026-03-14 20:00"))] == ["ok"]
    assert tick(config, store, utc("2026-03-14 20:10")) == []
    # A 304 after the first answer each time: the listing was downloaded once per date.
    assert all(r.headers.get("If-None-Match") == '"same"' for r in server.requests[2:]
               if r.path.endswith("2026-03-12"))


def test_the_daemon_fetches_on_schedule_into_the_inbox_and_its_scan_ingests_it(
        server: ListingServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    server.script("/api/daily_papers", Answer(200, api_listing("2026-03-12", "Graph Rewiring"),
                                              {"Content-Type": "application/json"}))
    path = write_config(tmp_path, [source(server, at=["06:00"])], scan_seconds=0.05,
                        dispatch_seconds=0.05)
    with Store(tmp_path / "var" / "state.sqlite3") as store:  # fetched yesterday evening
        store.record_source_run("hf", started_at=utc("2026-03-11 18:00"), ok=True)
    monkeypatch.setattr(loop_module, "FETCH_TICK_SECONDS", 0.05)
    daemon = Daemon(path)

    async def scenario() -> None:
        running = asyncio.create_task(daemon.run())
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not daemon.stop.is_set():
            await asyncio.sleep(0.05)
            if daemon._runtime is not None and daemon.runtime.store.paper_count():
                break
        await asyncio.sleep(0.3)  # a few more ticks: nothing is fetched twice
        daemon.stop.set()
        assert await running == 0

    with caplog.at_level(logging.INFO, logger="digest.sources"), \
            caplog.at_level(logging.INFO, logger="digest.ingest"), \
            time_machine.travel(utc("2026-03-12 05:59:59"), tick=True):
        asyncio.run(asyncio.wait_for(scenario(), timeout=30))
    assert server.paths() == ["/api/daily_papers?date=2026-03-12"]
    assert server.requests[0].at >= utc("2026-03-12 06:00")  # not before its time
    assert (tmp_path / "inbox" / "hf-2026-03-12.json").exists()
    with Store(tmp_path / "var" / "state.sqlite3") as store:
        assert [p.title for p in store.all_papers()] == ["Graph Rewiring"]
        [dump] = store.recent_dumps()
        assert Path(dump.path).name == "hf-2026-03-12.json"
    assert "source hf: wrote hf-2026-03-12.json" in caplog.text
    assert "hf-2026-03-12.json: 1 papers (1 new)" in caplog.text


def test_a_failing_source_never_stops_the_daemon(tmp_path: Path, server: ListingServer,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    path = write_config(tmp_path, [source(server, "/missing", attempts=1)], scan_seconds=0.05,
                        dispatch_seconds=0.05)
    monkeypatch.setattr(loop_module, "FETCH_TICK_SECONDS", 0.05)
    daemon = Daemon(path)

    async def scenario() -> None:
        running = asyncio.create_task(daemon.run())
        await asyncio.sleep(0.5)
        assert not daemon.stop.is_set()
        daemon.stop.set()
        assert await running == 0

    with caplog.at_level(logging.INFO, logger="digest.sources"), \
            caplog.at_level(logging.INFO, logger="digest.daemon"):
        asyncio.run(asyncio.wait_for(scenario(), timeout=30))
    assert "source hf: " in caplog.text and "HTTP 404 Not Found" in caplog.text
    assert server.paths() == ["/missing"]  # a 404 waits for the next scheduled time
    assert "daemon: stopped (exit 0)" in caplog.text


def test_a_crash_mid_write_leaves_no_file_the_scan_would_read(server: ListingServer,
                                                              setup: Any) -> None:
    server.script("/api", Answer(200, RSS))
    config, store = setup(source(server, "/api"))
    config.inbox.mkdir()
    stale = config.inbox / ".hf-2026-03-12.txt.abc123.part"
    stale.write_bytes(RSS[:40])  # what a crash mid-write leaves
    assert scan_inbox(store, config.inbox, stable_seconds=0) == []  # the scan skips it
    old = DAY.timestamp() - 7200  # two hours before the fetch, in the fetch's (travelled) time
    os.utime(stale, (old, old))
    fetch(config, store, DAY)
    assert inbox_names(config) == ["hf-2026-03-12.txt"]  # the stale one was cleaned up


def test_listing_dates_in_the_sources_zone(setup: Any, server: ListingServer) -> None:
    config, _store = setup(source(server, timezone="Pacific/Auckland", lookback_days=2))
    from digest.sources import listing_dates

    assert listing_dates(config.sources[0], utc("2026-03-12 13:00")) == [
        date(2026, 3, 11), date(2026, 3, 12), date(2026, 3, 13)]


# --- hostile answers (the review of issues 12 and 8) -----------------------------------


def test_a_30_digit_retry_after_fails_that_source_only_and_the_others_are_fetched(
        server: ListingServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    server.script("/busy", Answer(429, headers={"Retry-After": "9" * 30}))
    server.script("/down", Answer(503, headers={"Retry-After": "Fri, 31 Dec 9999 23:59:59 GMT"}))
    server.script("/good", Answer(200, RSS))
    path = write_config(tmp_path, [source(server, "/busy", name="busy"),
                                   source(server, "/down", name="down"),
                                   source(server, "/good", name="good")])
    with time_machine.travel(DAY, tick=False):
        assert main(["--config", str(path), "fetch"]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    assert "(Retry-After 6 h)" in captured.out  # capped, and said as a person reads it
    assert "good: 2026-03-12" in captured.out and "written to" in captured.out
    config = load_config(path)
    with Store(config.state) as store:
        busy, down, good = (store.source_run(n) for n in ("busy", "down", "good"))
        assert busy is not None and busy.outcome == "failed"
        assert busy.not_before == (DAY + MAX_RETRY_AFTER).isoformat(timespec="seconds")
        assert down is not None and down.outcome == "failed"
        assert good is not None and good.outcome == "ok"
    assert main(["--config", str(path), "status"]) == 0
    assert "busy" in capsys.readouterr().out


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126),
                      max_size=60)
       | st.text(alphabet="0123456789", min_size=1, max_size=400))
def test_any_retry_after_through_the_real_fetch_is_that_sources_failure(
        header: str, server: ListingServer, tmp_path: Path) -> None:
    """60 examples: any printable Retry-After a server may send, through a real 429."""
    server.script("/busy", Answer(429, headers={"Retry-After": header}))
    config = load_config(write_config(tmp_path, [source(server, "/busy", name="busy",
                                                        attempts=1)]))
    plan = SourcePlan(source=config.sources[0], inbox=config.inbox, user_agent="test",
                      started_at=DAY, urls=(PlannedUrl(server.url("/busy"), DAY.date(), None),))
    [result] = asyncio.run(download([plan]))
    assert result.status == "failed" and "HTTP 429" in result.detail
    assert result.retry_at is not None and result.retry_at >= DAY
    assert result.not_before is None or result.not_before <= DAY + MAX_RETRY_AFTER


@given(st.text(max_size=80) | st.text(alphabet="0123456789", max_size=5000))
@settings(max_examples=2000, deadline=None)
def test_parse_retry_after_always_gives_a_wait_a_timedelta_holds(header: str) -> None:
    """2,000 examples: None or seconds within [0, MAX_RETRY_AFTER]."""
    seconds = parse_retry_after(header, DAY)
    assert seconds is None or 0 <= seconds <= MAX_RETRY_AFTER.total_seconds()
    if seconds is not None:
        assert DAY + timedelta(seconds=seconds) <= DAY + MAX_RETRY_AFTER


def test_a_200_that_is_no_listing_fails_the_fetch_and_writes_nothing(
        server: ListingServer, setup: Any) -> None:
    error_page = b"<!DOCTYPE html><html><body><h1>Service Unavailable</h1></body></html>"
    server.script("/api", Answer(200, error_page, headers={"Content-Type": "text/html"}))
    server.script("/xml", Answer(200, b"<?xml version='1.0'?><error>quota</error>"))
    config, store = setup(source(server, "/api"), source(server, "/xml", name="xml"))
    for _ in range(2):  # a second fetch leaves nothing either
        html, xml = fetch(config, store, DAY)
        assert html.status == "failed"
        assert "the answer is an HTML page, not a listing" in html.detail
        assert xml.status == "failed" and "not an Atom or RSS listing" in xml.detail
    assert inbox_names(config) == []
    run = store.source_run("hf")
    assert run is not None and run.outcome == "failed" and "HTML page" in run.detail


def test_a_secret_in_the_url_never_shows_in_logs_output_or_status(
        server: ListingServer, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    server.script("/api", Answer(500))
    path = write_config(tmp_path, [source(server, "/api?token=s3cr3t-t0ken&date={date}",
                                          attempts=2)])
    with caplog.at_level(logging.INFO), time_machine.travel(DAY, tick=False):
        assert main(["--config", str(path), "fetch"]) == 1
        assert main(["--config", str(path), "status"]) == 0
        assert main(["--config", str(path), "check-config"]) == 0
    captured = capsys.readouterr()
    shown = captured.out + captured.err + caplog.text
    assert "s3cr3t-t0ken" not in shown
    assert "token=***" in captured.out and "HTTP 500" in captured.out
    assert server.requests[0].path == "/api?token=s3cr3t-t0ken&date=2026-03-12"  # sent as is


def test_fetch_date_needs_a_dated_url(server: ListingServer, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, [source(server, "/rss", name="rss")])
    assert main(["--config", str(path), "fetch", "--date", "2026-03-01"]) == 1
    err = capsys.readouterr().err
    assert "--date needs a url with {date} in it" in err and "rss" in err
    assert server.requests == []


def test_status_gives_each_source_its_own_local_time(server: ListingServer, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    server.script("/rss", Answer(200, RSS))
    path = write_config(tmp_path, [source(server, "/rss", name="rss", timezone="Asia/Tokyo")])
    with time_machine.travel(DAY, tick=False):
        assert main(["--config", str(path), "fetch"]) == 0
        assert main(["--config", str(path), "status"]) == 0
    assert "- rss: ok, fetched Thu 2026-03-12 18:00 Asia/Tokyo" in capsys.readouterr().out


def test_a_source_whose_fetch_cannot_be_recorded_fails_alone(setup: Any,
                                                             server: ListingServer) -> None:
    _config, store = setup(source(server, "/a", name="bad"), source(server, "/b", name="good"))
    # A lone surrogate cannot be stored as UTF-8: this source's record raises.
    bad = SourceResult("bad", DAY, "failed", detail="HTTP 500 \ud800")
    good = SourceResult("good", DAY, "ok", detail="1 written")
    record_results(store, [bad, good])
    bad_run, good_run = store.source_run("bad"), store.source_run("good")
    assert bad_run is not None and bad_run.outcome == "failed"
    assert "could not be recorded" in bad_run.detail
    assert good_run is not None and good_run.outcome == "ok"
