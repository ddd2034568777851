"""Sources: listings the daemon fetches itself over HTTP and drops into the inbox.

Runs on the daemon's fetch tick (each ``[[sources]]`` at its local ``at``
times) and from ``digest fetch``. Fetching only produces dump files: a listing
is written into the inbox atomically (a hidden temporary name the scan skips,
then a rename) as ``NAME-YYYY-MM-DD.EXT``, and the scan ingests it like any
other file.

Politeness and robustness: a User-Agent naming the project and a contact
address, conditional GET (the ETag and Last-Modified of each URL are kept in
the store, so an unchanged listing is not downloaded again; a body equal to
the one last written is not written again), timeouts, retries with doubling
backoff on 5xx, 408, 429 and network errors, ``Retry-After`` honoured, a size
limit, TLS verified, redirects followed (at most ``MAX_REDIRECTS``).

Three steps, so the daemon holds its store lock only around the store work:
``plan_fetches`` (store -> what to fetch), ``download`` (network and inbox, no
store), ``record_results`` (-> store). ``fetch_sources`` runs all three.
Each source is one unit: its failure is logged and recorded (``digest
status`` shows it) and the other sources go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import hashlib
import logging
import os
import re
import tempfile
import time as time_module
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from email.utils import parseaddr, parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus, urlsplit, urlunsplit

import httpx

from . import __version__
from .config import Config, SourceConfig
from .dumps import listing_format
from .errors import DigestError, DumpError, FetchError
from .store import FetchedUrl, SourceRun, Store, utc_now

log = logging.getLogger(__name__)

# How often the daemon looks whether a source is due; fetch times are given to the minute.
FETCH_TICK_SECONDS = 60.0
# A Retry-After up to this many seconds is waited out within the fetch; a longer one
# ends the fetch, and the source is not asked again before the time the server gave.
MAX_RETRY_AFTER_WAIT = 120.0
# ... but never later than this: a silly Retry-After cannot silence a source for days.
MAX_RETRY_AFTER = timedelta(hours=6)
# A transient failure (5xx, timeout, network) is tried again after this, before the
# next scheduled time: a short outage does not cost a day's listing.
RETRY_FAILED_AFTER = timedelta(minutes=30)
# A trickling server may answer every read within the timeout and still never finish:
# one attempt (connect, headers and body) may last this many timeouts at most.
ATTEMPT_DEADLINE_TIMEOUTS = 4
MAX_REDIRECTS = 5
# The scheduled fetch times looked back over to find the latest one: a day covers any list.
FETCH_LOOKBACK = timedelta(days=1)
# A temporary file older than this was left by a crash mid-write; it is removed.
STALE_PART_SECONDS = 3600.0
ACCEPT = ("application/json, application/rss+xml, application/atom+xml, application/xml;q=0.9,"
          " text/xml;q=0.9, text/plain;q=0.8, */*;q=0.5")
# Statuses worth asking again (RFC 9110: 408 timeout, 429 too many requests, 5xx).
_TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}
_EXTENSIONS = (("json", ".json"), ("xml", ".xml"), ("rss", ".xml"), ("atom", ".xml"),
               ("html", ".html"), ("text/plain", ".txt"))


@dataclass(frozen=True)
class PlannedUrl:
    """One URL of a source's fetch, with what it answered last time (for conditional GET)."""

    url: str
    listing_date: date
    previous: FetchedUrl | None


@dataclass(frozen=True)
class SourcePlan:
    """A source to fetch now: its URLs (one per listing date) and where the files go."""

    source: SourceConfig
    inbox: Path
    user_agent: str
    started_at: datetime
    urls: tuple[PlannedUrl, ...]
    waiting_until: datetime | None = None  # the server's Retry-After is still in force


@dataclass(frozen=True)
class UrlResult:
    """What one URL gave: status is written | unchanged | not-modified | failed."""

    url: str
    listing_date: date
    status: str
    detail: str = ""
    file: Path | None = None
    bytes: int = 0
    http_status: int | None = None
    fetched: FetchedUrl | None = None  # to remember (a 200 or a 304); None when it failed
    error: FetchError | None = None

    @property
    def ok(self) -> bool:
        return self.status != "failed"


@dataclass(frozen=True)
class SourceResult:
    """A source's fetch: status is ok | failed | waiting (Retry-After still in force)."""

    source: str
    started_at: datetime
    status: str
    urls: tuple[UrlResult, ...] = ()
    detail: str = ""
    retry_at: datetime | None = None
    not_before: datetime | None = None


# --- schedule -----------------------------------------------------------------------


def fetch_times(source: SourceConfig, day: date) -> list[datetime]:
    """The source's fetch instants on its local ``day``, aware, in order.

    A time inside a daylight-saving gap is read with the offset before the jump,
    so it lands just after the gap; one inside a repeated hour is its first
    occurrence (``fold=0``).
    """
    return sorted(datetime.combine(day, at, tzinfo=source.timezone).astimezone(UTC)
                  for at in source.at)


def latest_fetch_time(source: SourceConfig, now: datetime) -> datetime | None:
    """The most recent scheduled fetch at or before ``now`` (within ``FETCH_LOOKBACK``)."""
    today = now.astimezone(source.timezone).date()
    for day in (today, today - timedelta(days=1)):
        past = [moment for moment in fetch_times(source, day)
                if now - FETCH_LOOKBACK <= moment <= now]
        if past:
            return past[-1]
    return None


def next_fetch_time(source: SourceConfig, now: datetime) -> datetime:
    """The first scheduled fetch strictly after ``now``."""
    today = now.astimezone(source.timezone).date()
    for ahead in range(3):
        future = [m for m in fetch_times(source, today + timedelta(days=ahead)) if m > now]
        if future:
            return future[0]
    raise ValueError(f"source {source.name}: no fetch time")  # pragma: no cover - at is never empty


def _moment(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def is_due(source: SourceConfig, run: SourceRun | None, now: datetime) -> bool:
    """Whether the daemon fetches ``source`` now.

    Due when it was never fetched, when a scheduled time passed since its last
    fetch (a daemon that was down over several fetches once), or when its last
    fetch failed transiently and its ``retry_at`` came; never before the
    server's ``Retry-After`` (``not_before``).
    """
    if run is None:
        return True
    not_before = _moment(run.not_before)
    if not_before is not None and now < not_before:
        return False
    latest = latest_fetch_time(source, now)
    started = datetime.fromisoformat(run.started_at)
    if latest is not None and started < latest:
        return True
    retry_at = _moment(run.retry_at)
    return retry_at is not None and now >= retry_at


def next_fetch(source: SourceConfig, run: SourceRun | None, now: datetime) -> datetime:
    """When the daemon fetches ``source`` next (``now`` when it is due)."""
    if is_due(source, run, now):
        return now
    candidates = [next_fetch_time(source, now)]
    retry_at = _moment(run.retry_at) if run else None
    if retry_at is not None and retry_at > now:
        candidates.append(retry_at)
    when = min(candidates)
    not_before = _moment(run.not_before) if run else None
    return max(when, not_before) if not_before is not None else when


# --- what to fetch --------------------------------------------------------------------


def listing_dates(source: SourceConfig, now: datetime) -> list[date]:
    """The listing dates a fetch asks for, oldest first: today in the source's zone and,
    for a ``{date}`` URL, ``lookback_days`` before (late additions, a missed day)."""
    today = now.astimezone(source.timezone).date()
    if not source.dated:
        return [today]
    return [today - timedelta(days=back) for back in range(source.lookback_days, -1, -1)]


def listing_url(source: SourceConfig, day: date) -> str:
    return source.url.replace("{date}", day.isoformat())


def user_agent(source: SourceConfig, config: Config) -> str:
    """``paper-digest/VERSION (+mailto:CONTACT)``: who asks, and whom to tell if it misbehaves.

    The contact is the source's ``contact``, else the address of ``[smtp] from``.
    """
    contact = source.contact or parseaddr(config.smtp.sender)[1] or "unknown"
    return f"paper-digest/{__version__} (+mailto:{contact}; daily paper digests)"


def plan_fetches(
    config: Config,
    store: Store,
    now: datetime,
    *,
    only: str | None = None,
    dates: Sequence[date] | None = None,
    scheduled: bool = True,
) -> list[SourcePlan]:
    """The sources to fetch now, each with its URLs and their last answers.

    ``scheduled``: only the sources that are due (the daemon's tick); else every
    source (``digest fetch``). ``only`` names one source; ``dates`` replaces the
    listing dates (a ``{date}`` URL only). A source whose server asked to wait
    (Retry-After) is planned with ``waiting_until`` set and is not asked.
    """
    plans = []
    for source in config.sources:
        if only is not None and source.name.lower() != only.lower():
            continue
        run = store.source_run(source.name)
        if scheduled and not is_due(source, run, now):
            continue
        not_before = _moment(run.not_before) if run else None
        days = list(dates) if dates and source.dated else listing_dates(source, now)
        urls = tuple(PlannedUrl(url, day, store.fetched_url(source.name, url))
                     for day in days for url in [listing_url(source, day)])
        plans.append(SourcePlan(
            source=source, inbox=config.inbox, user_agent=user_agent(source, config),
            started_at=now, urls=urls,
            waiting_until=not_before if not_before is not None and now < not_before else None,
        ))
    return plans


# --- fetching -------------------------------------------------------------------------


async def download(
    plans: Sequence[SourcePlan],
    *,
    stop: asyncio.Event | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> list[SourceResult]:
    """Fetch the planned sources into their inbox, one after the other; touches no store.

    Each source is one unit: whatever its fetch raises (other than cancellation)
    becomes that source's failed result, logged with its reason.
    """
    results: list[SourceResult] = []
    if not plans:
        return results  # a client costs a TLS context; most ticks have nothing to fetch
    async with httpx.AsyncClient(follow_redirects=True, max_redirects=MAX_REDIRECTS,
                                 verify=True, transport=transport) as client:
        for plan in plans:
            if stop is not None and stop.is_set():
                break
            try:
                results.append(await _fetch_source(client, plan, stop))
            except Exception as exc:  # the unit boundary: one source's surprise is its own
                log.exception("source %s: the fetch failed unexpectedly", plan.source.name)
                results.append(SourceResult(plan.source.name, plan.started_at, "failed",
                                            detail=f"{type(exc).__name__}: {exc}",
                                            retry_at=plan.started_at + RETRY_FAILED_AFTER))
    return results


async def _fetch_source(client: httpx.AsyncClient, plan: SourcePlan,
                        stop: asyncio.Event | None) -> SourceResult:
    name = plan.source.name
    if plan.waiting_until is not None:
        detail = (f"the server asked to wait (Retry-After) until "
                  f"{plan.waiting_until.isoformat(timespec='seconds')}; not asked")
        log.info("source %s: %s", name, detail)
        return SourceResult(name, plan.started_at, "waiting", detail=detail,
                            not_before=plan.waiting_until)
    urls: list[UrlResult] = []
    for planned in plan.urls:
        try:
            result = await _fetch_url(client, plan, planned, stop)
        except FetchError as exc:
            log.error("source %s: %s", name, exc)
            result = UrlResult(planned.url, planned.listing_date, "failed", exc.reason,
                               http_status=exc.status, error=exc)
        except OSError as exc:  # the inbox cannot be written
            reason = f"cannot write the listing into {plan.inbox}: {exc.strerror or exc}"
            log.error("source %s: %s: %s", name, redact_url(planned.url), reason)
            result = UrlResult(planned.url, planned.listing_date, "failed", reason)
        except Exception as exc:  # the unit boundary: one source's surprise is its own
            log.error("source %s: %s: fetch failed unexpectedly: %s", name,
                      redact_url(planned.url), _scrub(_kind(exc, planned.url), planned.url),
                      exc_info=exc)
            result = UrlResult(planned.url, planned.listing_date, "failed",
                               _scrub(f"{type(exc).__name__}: {exc}", planned.url))
        urls.append(result)
        if result.error is not None and result.error.transient:
            break  # the server is in trouble: the other dates wait for the retry
    return _summarise(plan, urls)


def _summarise(plan: SourcePlan, urls: list[UrlResult]) -> SourceResult:
    name = plan.source.name
    failed = [u for u in urls if not u.ok]
    if not failed and len(urls) == len(plan.urls):
        return SourceResult(name, plan.started_at, "ok", tuple(urls),
                            detail=_ok_detail(urls))
    if not failed:  # stopped midway (the daemon is stopping)
        return SourceResult(name, plan.started_at, "failed", tuple(urls),
                            detail="interrupted: the daemon stopped", retry_at=plan.started_at)
    first = failed[0]
    detail = f"{redact_url(first.url)}: {first.detail}"
    retry_at: datetime | None = None
    not_before: datetime | None = None
    error = first.error
    if error is not None and error.transient:
        wait = timedelta(seconds=error.retry_after or 0)
        if wait > timedelta(seconds=MAX_RETRY_AFTER_WAIT):
            not_before = plan.started_at + min(wait, MAX_RETRY_AFTER)
        retry_at = max(plan.started_at + RETRY_FAILED_AFTER, not_before or plan.started_at)
    return SourceResult(name, plan.started_at, "failed", tuple(urls), detail=detail,
                        retry_at=retry_at, not_before=not_before)


def _ok_detail(urls: Sequence[UrlResult]) -> str:
    counts: dict[str, int] = {}
    for u in urls:
        counts[u.status] = counts.get(u.status, 0) + 1
    return ", ".join(f"{n} {status}" for status, n in counts.items())


async def _fetch_url(client: httpx.AsyncClient, plan: SourcePlan, planned: PlannedUrl,
                     stop: asyncio.Event | None) -> UrlResult:
    """One URL, with retries: backoff doubling from ``retry_seconds``, or the Retry-After."""
    source = plan.source
    attempt = 1
    while True:
        try:
            return await _get(client, plan, planned)
        except FetchError as exc:
            if not exc.transient or attempt >= source.attempts:
                raise
            wait = (exc.retry_after if exc.retry_after is not None
                    else source.retry_seconds * 2 ** (attempt - 1))
            if wait > MAX_RETRY_AFTER_WAIT:
                raise
            attempt += 1
            log.warning("source %s: %s; trying again in %s (attempt %d of %d)",
                        source.name, exc, readable_duration(wait), attempt, source.attempts)
            if await _stopped_during(wait, stop):
                raise FetchError(redact_url(planned.url), f"{exc.reason}; not tried again: "
                                 "the daemon is stopping", transient=True,
                                 status=exc.status) from exc


async def _stopped_during(seconds: float, stop: asyncio.Event | None) -> bool:
    """Wait ``seconds``; True when ``stop`` was set meanwhile."""
    if stop is None:
        await asyncio.sleep(seconds)
        return False
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        return False
    return True


async def _get(client: httpx.AsyncClient, plan: SourcePlan, planned: PlannedUrl) -> UrlResult:
    """One GET: a 304 or a body streamed into the inbox; FetchError for anything else."""
    source, url, previous = plan.source, planned.url, planned.previous
    shown = redact_url(url)
    headers = {"User-Agent": plan.user_agent, "Accept": ACCEPT}
    headers.update(dict(source.headers))
    if previous is not None and previous.etag:
        headers["If-None-Match"] = previous.etag
    if previous is not None and previous.last_modified:
        headers["If-Modified-Since"] = previous.last_modified
    deadline = source.timeout * ATTEMPT_DEADLINE_TIMEOUTS
    try:
        async with asyncio.timeout(deadline):
            async with client.stream("GET", url, headers=headers,
                                     timeout=httpx.Timeout(source.timeout)) as response:
                return await _answer(plan, planned, response)
    except TimeoutError:
        raise FetchError(shown, f"the answer took longer than {deadline:g}s",
                         transient=True) from None
    except httpx.TimeoutException as exc:
        raise FetchError(shown, f"no answer within {source.timeout:g}s ({_kind(exc, url)})",
                         transient=True) from exc
    except httpx.TooManyRedirects as exc:
        raise FetchError(shown, f"more than {MAX_REDIRECTS} redirects", transient=False) from exc
    except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
        raise FetchError(shown, f"cannot be fetched: {_scrub(str(exc), url)}",
                         transient=False) from exc
    except httpx.TransportError as exc:
        certificate = _certificate_problem(exc)
        if certificate is not None:
            raise FetchError(shown, f"TLS certificate not trusted: {certificate}",
                             transient=False) from exc
        raise FetchError(shown, f"network error: {_kind(exc, url)}",
                         transient=True) from exc


def _kind(exc: Exception, url: str) -> str:
    text = _scrub(str(exc).strip(), url)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# Query keys whose values are secrets: an API key or token some listing sites put in the URL.
_SECRET_KEY = re.compile(r"(?:^|[_.-])(?:token|key|apikey|api[_-]?key|password|passwd|pass|pwd"
                         r"|secret|sig|signature|auth|credentials?)$", re.IGNORECASE)


def redact_url(url: str) -> str:
    """``url`` as logs, ``digest fetch`` and ``status`` show it: a password in the userinfo
    and the values of secret-looking query keys (token, key, apikey, password, secret,
    ...) replaced by ``***``; the URL itself is fetched unchanged."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if ":" in userinfo else f"***@{host}"
    pieces = []
    for piece in parts.query.split("&") if parts.query else []:
        key, sep, _ = piece.partition("=")
        pieces.append(f"{key}=***" if sep and _SECRET_KEY.search(unquote_plus(key)) else piece)
    query = "&".join(pieces)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _secrets(url: str) -> list[str]:
    """The secret parts of ``url`` (the userinfo, secret query values), longest first."""
    found: list[str] = []
    with contextlib.suppress(ValueError):
        parts = urlsplit(url)
        if "@" in parts.netloc:
            found.append(parts.netloc.rsplit("@", 1)[0])
        for piece in parts.query.split("&"):
            key, sep, value = piece.partition("=")
            if sep and value and _SECRET_KEY.search(unquote_plus(key)):
                found.extend({value, unquote_plus(value)})
    return sorted(found, key=len, reverse=True)


def _scrub(text: str, url: str) -> str:
    """``text`` (an exception's message) with the secrets of ``url`` replaced by ``***``."""
    for secret in _secrets(url):
        text = text.replace(secret, "***")
    return text


def _certificate_problem(exc: BaseException) -> str | None:
    """The certificate error behind a connection failure, when that is what it was."""
    import ssl

    seen: BaseException | None = exc
    for _ in range(6):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen.verify_message or str(seen)
        seen = seen.__cause__ or seen.__context__
    return None


async def _answer(plan: SourcePlan, planned: PlannedUrl, response: httpx.Response) -> UrlResult:
    url, previous = planned.url, planned.previous
    shown = redact_url(url)
    status = response.status_code
    if status == 304 and previous is not None:
        log.info("source %s: %s not modified since %s", plan.source.name, redact_url(url),
                 previous.fetched_at)
        fetched = _fetched(plan, url, response, previous.sha256, previous.file, previous.bytes,
                           previous)
        return UrlResult(url, planned.listing_date, "not-modified", "not modified (304)",
                         file=Path(previous.file) if previous.file else None,
                         http_status=status, fetched=fetched)
    if status != 200:
        reason = f"HTTP {status} {response.reason_phrase}".rstrip()
        retry_after = parse_retry_after(response.headers.get("Retry-After"), utc_now())
        if status in _TRANSIENT_STATUS:
            if retry_after is not None:
                reason += f" (Retry-After {readable_duration(retry_after)})"
            raise FetchError(shown, reason, transient=True, status=status, retry_after=retry_after)
        raise FetchError(shown, reason, transient=False, status=status)
    limit = plan.source.max_bytes
    declared = _content_length(response)
    if declared is not None and declared > limit:
        raise FetchError(shown, f"the answer is {declared} bytes, over the limit of {limit} "
                         "(max_bytes)", transient=False, status=status)
    target = plan.inbox / inbox_name(plan.source, planned.listing_date, response)
    sha, size, part = await _stream_to_part(response, target, limit, shown)
    committed = False
    try:
        if size == 0:
            raise FetchError(shown, "the answer is empty (an empty listing is still a file: "
                             "[] or a feed without items)", transient=True, status=status)
        if previous is not None and previous.sha256 == sha:  # a server without validators
            log.info("source %s: %s unchanged (same %d bytes as %s)", plan.source.name,
                     redact_url(url),
                     size, previous.file)
            return UrlResult(url, planned.listing_date, "unchanged", "same content as last time",
                             file=Path(previous.file) if previous.file else None, bytes=size,
                             http_status=status,
                             fetched=_fetched(plan, url, response, sha, previous.file, size,
                                              previous))
        _check_listing(part, planned, shown, status)
        _commit(part, target)
        committed = True
    finally:
        if not committed:
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
    log.info("source %s: wrote %s (%d bytes, listing of %s)", plan.source.name, target.name,
             size, planned.listing_date)
    return UrlResult(url, planned.listing_date, "written", f"{size} bytes", file=target,
                     bytes=size, http_status=status,
                     fetched=_fetched(plan, url, response, sha, str(target), size, previous))


def _check_listing(part: Path, planned: PlannedUrl, url: str, status: int) -> None:
    """FetchError unless the body is a listing the scan ingests (the scan's own detection):
    an error page answered with 200 is the fetch's failure, not a file for ``failed/``."""
    try:
        listing_format(part.read_bytes(), name=url, fallback_date=planned.listing_date)
    except DumpError as exc:
        where = f" (line {exc.line})" if exc.line is not None else ""
        reason = (f"the answer is {exc.message}" if exc.message.startswith("an HTML page")
                  else f"the answer is not a listing the scan can read: {exc.message}{where}")
        raise FetchError(url, reason, transient=False, status=status) from exc


def _fetched(plan: SourcePlan, url: str, response: httpx.Response, sha: str | None,
             file: str | None, size: int | None, previous: FetchedUrl | None) -> FetchedUrl:
    """What to remember of this answer: a 200's own validators; a 304 may omit them, and
    then the ones it confirmed stay."""
    kept = previous if previous is not None and response.status_code == 304 else None
    etag = _validator(response, "ETag") or (kept.etag if kept else None)
    modified = _validator(response, "Last-Modified") or (kept.last_modified if kept else None)
    return FetchedUrl(source=plan.source.name, url=url, etag=etag, last_modified=modified,
                      sha256=sha, file=file, bytes=size,
                      fetched_at=utc_now().isoformat(timespec="seconds"))


def _validator(response: httpx.Response, name: str) -> str | None:
    """A validator header worth sending back: printable ASCII (a request header must be),
    short; anything else is dropped and the body's hash tells an unchanged listing."""
    value = response.headers.get(name, "").strip()
    if value and value.isascii() and value.isprintable() and len(value) <= 512:
        return value
    return None


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("Content-Length", "").strip()
    return int(value) if value.isdigit() else None


async def _stream_to_part(response: httpx.Response, target: Path, limit: int,
                          url: str) -> tuple[str, int, Path]:
    """Stream the (decoded) body into a hidden temporary file beside ``target``.

    Returns (SHA-256, bytes, temporary path). Stops with a FetchError, the
    temporary file removed, as soon as the body passes ``limit`` bytes.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_parts(target)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    part = Path(name)
    digest = hashlib.sha256()
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > limit:
                    raise FetchError(url, f"the answer is over the limit of {limit} bytes "
                                     "(max_bytes); stopped reading", transient=False,
                                     status=response.status_code)
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
        raise
    return digest.hexdigest(), size, part


def _commit(part: Path, target: Path) -> None:
    """Rename the complete temporary file to its inbox name (atomic), and make it durable."""
    os.replace(part, target)
    with contextlib.suppress(OSError):  # not every file system lets a folder be fsynced
        folder = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def _remove_stale_parts(target: Path) -> None:
    """Remove temporary files of ``target`` left by a crash mid-write (an hour old)."""
    cutoff = time_module.time() - STALE_PART_SECONDS
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*.part"):
        with contextlib.suppress(OSError):
            if stale.stat().st_mtime < cutoff:
                stale.unlink()


def inbox_name(source: SourceConfig, day: date, response: httpx.Response | None = None) -> str:
    """``NAME-YYYY-MM-DD.EXT``: the source and the listing date; the extension from the
    answer's Content-Type (the scan detects the format from the content anyway)."""
    content_type = response.headers.get("Content-Type", "").lower() if response else ""
    extension = next((ext for key, ext in _EXTENSIONS if key in content_type), ".txt")
    return f"{source.name}-{day.isoformat()}{extension}"


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """A ``Retry-After`` header in seconds from ``now`` (RFC 9110 10.2.3): delta-seconds
    or an HTTP-date; a date in the past is 0; a value that is neither gives None.

    The result is at most ``MAX_RETRY_AFTER`` (in seconds), so any header, however
    many digits or however far its date, gives a wait that fits a timedelta.
    """
    if value is None:
        return None
    text = value.strip()
    cap = MAX_RETRY_AFTER.total_seconds()
    if text.isascii() and text.isdigit():
        # Compared as text first: int() of thousands of digits is refused (and slow).
        digits = text.lstrip("0") or "0"
        return float(digits) if len(digits) <= 15 and float(digits) <= cap else cap
    try:
        when = parsedate_to_datetime(text)
        if when.tzinfo is None:  # "-0000" or no zone: HTTP dates are in UTC
            when = when.replace(tzinfo=UTC)
        seconds = (when - now).total_seconds()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return min(max(0.0, seconds), cap)


def readable_duration(seconds: float) -> str:
    """``"45s"``, ``"12 min"``, ``"6 h"``, ``"2 h 30 min"``: a wait as a person reads it."""
    if seconds < 60:
        return f"{seconds:g}s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, rest = divmod(minutes, 60)
    return f"{hours} h {rest} min" if rest else f"{hours} h"


# --- recording ------------------------------------------------------------------------


def record_results(store: Store, results: Sequence[SourceResult]) -> None:
    """Remember each URL's validators and each source's fetch (a wait changes nothing)."""
    for result in results:
        if result.status == "waiting":
            continue
        try:
            for url in result.urls:
                if url.fetched is not None:
                    store.record_fetched_url(url.fetched)
            store.record_source_run(result.source, started_at=result.started_at,
                                    ok=result.status == "ok", detail=result.detail,
                                    retry_at=result.retry_at, not_before=result.not_before)
        except Exception as exc:  # the unit boundary: recorded as this source's failure
            log.exception("source %s: its fetch could not be recorded", result.source)
            # When even this write fails, the database itself is broken: that propagates.
            store.record_source_run(
                result.source, started_at=result.started_at, ok=False,
                detail=f"the fetch could not be recorded: {type(exc).__name__}: {exc}",
                retry_at=result.started_at + RETRY_FAILED_AFTER)


async def fetch_sources(
    config: Config,
    store: Store,
    *,
    now: datetime | None = None,
    only: str | None = None,
    dates: Sequence[date] | None = None,
    scheduled: bool = True,
    stop: asyncio.Event | None = None,
) -> list[SourceResult]:
    """Plan, download and record in one go (``digest fetch``; the daemon runs the steps).

    Raises DigestError when ``only`` names no configured source.
    """
    if only is not None and not any(s.name.lower() == only.lower() for s in config.sources):
        names = ", ".join(s.name for s in config.sources) or "none configured"
        raise DigestError(f"{config.path}: no source named {only!r} (sources: {names})")
    plans = plan_fetches(config, store, now or utc_now(), only=only, dates=dates,
                         scheduled=scheduled)
    results = await download(plans, stop=stop)
    record_results(store, results)
    return results


# --- status ---------------------------------------------------------------------------


def source_status(source: SourceConfig, store: Store, now: datetime) -> dict[str, Any]:
    """One source for ``digest status``: its schedule, last fetch and next fetch."""
    run = store.source_run(source.name)
    upcoming = next_fetch(source, run, now)
    return {
        "name": source.name,
        "url": redact_url(source.url),
        "at": [t.strftime("%H:%M") for t in source.at],
        "timezone": source.timezone.key,
        "last_fetch": None if run is None else {
            "started_at": run.started_at,
            "outcome": run.outcome,
            "detail": run.detail,
            "failures_in_a_row": run.failures,
            "last_ok_at": run.last_ok_at,
        },
        "next_fetch_local": upcoming.astimezone(source.timezone).isoformat(timespec="minutes"),
        "next_fetch_utc": upcoming.astimezone(UTC).isoformat(timespec="minutes"),
        "due": upcoming <= now,
        "not_before": run.not_before if run else None,
    }

