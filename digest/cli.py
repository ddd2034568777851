"""The ``digest`` command: subcommands over the stage functions.

The only place (with ``daemon``) that wires stages together, the only place
that sets up logging, and the only place that turns a ``DigestError`` into a
one-line ``Error: ...`` and an exit code.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

# SIGTERM or SIGINT while the command starts (this module's imports, then main's), before
# anything decides what a stop means: remembered here, acted on by ``main`` (``_signals``).
# Only in the ``digest`` program itself: a process that imports this module keeps its own.
_EARLY_SIGNALS: list[int] = []


def _remember_signal(signum: int, frame: FrameType | None) -> None:
    _EARLY_SIGNALS.append(signum)


def _as_program() -> bool:
    """Whether this process is the ``digest`` command (its script, or ``python -m digest``)."""
    main_module = sys.modules.get("__main__")
    spec = getattr(main_module, "__spec__", None)
    return (spec is not None and spec.name == "digest.__main__") or \
        sys.argv[0].rpartition("/")[2] == "digest"


if _as_program():
    for _signum in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(_signum) in (signal.SIG_DFL, signal.default_int_handler):
            signal.signal(_signum, _remember_signal)  # an ignored one stays ignored

import argparse  # after the handlers: these imports are the first window
import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from . import __version__
from .errors import DigestError

if TYPE_CHECKING:  # the commands import their stages late, to keep --help fast
    from .config import Config, ImapConfig, SmtpConfig, Subscriber
    from .daemon.jobs import Outcome
    from .rank import Explanation
    from .sources import UrlResult
    from .store import DigestRow, Store

log = logging.getLogger("digest")

EXIT_OK = 0
EXIT_ERROR = 1  # a DigestError: bad config, bad input, a failed delivery
EXIT_USAGE = 2  # argparse's own exit code for a wrong command line
DEFAULT_CONFIG = "digest.toml"


def setup_logging(verbosity: int) -> None:
    """Readable lines on stderr; under journald no timestamp (journald adds its own)."""
    level = logging.DEBUG if verbosity > 0 else logging.WARNING if verbosity < 0 else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s",
                                               datefmt="%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Third-party chatter stays out of a human's log unless asked for.
    for noisy in ("apscheduler", "mail.log", "aiosmtplib", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbosity > 0 else logging.WARNING)


class _JournalFormatter(logging.Formatter):
    """``<priority>LEVEL message``: journald reads the prefix as the entry's priority."""

    PRIORITY: ClassVar[dict[int, int]] = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        priority = self.PRIORITY.get(record.levelno, 6)
        return f"<{priority}>{record.levelname} {super().format(record)}"


# --- commands -----------------------------------------------------------------


def cmd_check_config(args: argparse.Namespace) -> int:
    from .sources import redact_url

    config = _config(args)
    config.check_secrets()  # a missing password is an error worth knowing now, not at 08:00
    print(f"{config.path}: OK, {len(config.subscribers)} subscriber(s)")
    print(f"  inbox  {config.inbox}")
    print(f"  state  {config.state}")
    if config.smtp.sink is not None:
        print(f"  smtp   embedded local sink, messages in {config.smtp.sink}")
    else:
        smtp = config.smtp
        login = f", login {smtp.username} ({_secret_source(smtp)})" if smtp.username else ""
        print(f"  smtp   {smtp.host}:{smtp.port} ({smtp.security}){login}")
    if config.imap is not None:
        imap = config.imap
        print(f"  replies imap {imap.username}@{imap.host}:{imap.port} ({imap.security}), "
              f"mailbox {imap.mailbox} ({_secret_source(imap)})")
    elif config.maildir is not None:
        print(f"  replies maildir {config.maildir.path}")
    for sub in config.subscribers:
        days = ",".join(d for i, d in enumerate(("mon", "tue", "wed", "thu", "fri", "sat", "sun"))
                        if i in sub.days)
        print(f"  - {sub.email}: {sub.send_at:%H:%M} {sub.timezone.key} on {days}, "
              f"up to {sub.max_papers} papers")
    for source in config.sources:
        times = ", ".join(f"{at:%H:%M}" for at in source.at)
        print(f"  source {source.name}: {redact_url(source.url)} at {times} "
              f"{source.timezone.key}")
    for warning in _seed_warnings(config):
        print(f"  warning: {warning}")
    if args.connect:
        return _check_connections(config)
    return EXIT_OK


def _secret_source(server: SmtpConfig | ImapConfig) -> str:
    """Where the password was read from, never the password."""
    if server.password_file is not None:
        return f"password from {server.password_file}"
    return f"password from ${server.password_env}" if server.password_env else "no password"


def _check_connections(config: Config) -> int:
    """``check-config --connect``: log in to the SMTP server (and IMAP), say how it went."""
    from .errors import SendError
    from .mailer import Mailer, port_hint
    from .replies.mailboxes import ImapMailbox

    failed = False
    smtp = config.smtp
    if smtp.sink is not None:
        print("  smtp   the embedded local sink: nothing to connect to")
    else:
        try:
            offered = asyncio.run(Mailer(smtp, attempts=1).check_login())
        except SendError as exc:
            failed = True
            print(f"  smtp   FAILED: {exc}")
        else:
            login = f"logged in as {smtp.username}" if smtp.username else "no login configured"
            hint = port_hint(smtp.port, smtp.security)
            print(f"  smtp   {smtp.host}:{smtp.port}: connected, {login}; {offered}"
                  + (f" (note: {hint})" if hint else ""))
    if config.imap is not None:
        mailbox = ImapMailbox(config.imap)
        try:
            mailbox.open()
            waiting = len(mailbox.waiting_ids())
        except DigestError as exc:
            failed = True
            print(f"  imap   FAILED: {exc}{_imap_hint(config, str(exc))}")
        else:
            print(f"  imap   {mailbox.where}: logged in, {waiting} replies waiting")
        finally:
            mailbox.close()
    elif config.maildir is not None:
        print(f"  maildir {config.maildir.path}: a folder, nothing to connect to")
    if failed:
        raise DigestError(f"{config.path}: a connection check failed (see above)")
    return EXIT_OK


def _imap_hint(config: Config, error: str) -> str:
    """The usual fix for an IMAP failure a new user meets."""
    imap = config.imap
    if imap is None:
        return ""
    if "CERTIFICATE_VERIFY_FAILED" in error:
        return ('; for a self-signed or private-CA certificate set ca_file = "/path/to/ca.pem" '
                "under [imap] (or verify_tls = false, which trusts anyone)")
    if imap.port == 993 and imap.security != "tls":
        return '; port 993 usually means security = "tls"'
    if imap.port == 143 and imap.security == "tls":
        return '; port 143 usually means security = "starttls"'
    if "AUTHENTICATIONFAILED" in error.upper() or "LOGIN" in error.upper():
        return "; wrong password? many providers need an app password"
    return ""


def _seed_warnings(config: Config) -> list[str]:
    """Seed papers that match no stored paper and library files that cannot be read."""
    from .config import read_regular_file
    from .library import MAX_LIBRARY_BYTES, LibraryError, parse_library, unresolved_seeds
    from .store import Store

    warnings = []
    store = Store(config.state) if config.state.exists() else None
    try:
        for sub in config.subscribers:
            refs = unresolved_seeds(store, sub) if store is not None else list(sub.seed_papers)
            for ref in refs:
                warnings.append(f"{sub.email}: seed paper {ref!r} matches no stored paper "
                                "(kept pending: it counts once that paper is ingested)")
            if sub.library is not None:
                try:
                    parse_library(read_regular_file(sub.library, MAX_LIBRARY_BYTES),
                                  str(sub.library))
                except OSError as exc:
                    warnings.append(f"{sub.email}: library {sub.library}: cannot read: "
                                    f"{exc.strerror or exc}")
                except LibraryError as exc:
                    warnings.append(f"{sub.email}: library {exc}")
    finally:
        if store is not None:
            store.close()
    return warnings


def cmd_ingest(args: argparse.Namespace) -> int:
    from .ingest import ingest_file, scan_inbox
    from .store import Store

    config = _config(args)
    failed = 0
    with Store(config.state) as store:
        if args.files:
            for name in args.files:
                path = Path(name)
                try:
                    result = ingest_file(store, path)
                except (DigestError, OSError) as exc:
                    print(f"Error: {exc}", file=sys.stderr)
                    failed += 1
                    continue
                print(_ingest_line(result))
        else:
            for result in scan_inbox(store, config.inbox, stable_seconds=config.stable_seconds):
                print(_ingest_line(result))
                failed += result.status == "failed"
        print(f"{store.paper_count()} papers stored in {config.state}")
    return EXIT_ERROR if failed else EXIT_OK


def _ingest_line(result: object) -> str:
    from .ingest import IngestResult

    assert isinstance(result, IngestResult)
    revised = f", {result.revised} revised" if result.revised else ""
    if result.status == "ingested":
        return f"{result.name}: {result.papers} papers, {result.new_papers} new{revised}"
    if result.status == "duplicate":
        return f"{result.name}: already ingested (same content), skipped"
    if result.status == "unstable":
        return f"{result.name}: modified just now, left for the next scan"
    return f"{result.name}: FAILED: {result.reason} (moved to failed/)"


class SendStopped(BaseException):
    """SIGTERM or SIGINT while ``digest send`` starts (imports, the config, the database),
    before its dispatch handles them: nothing is claimed yet. A ``BaseException``, as
    ``KeyboardInterrupt`` is, so no ``except Exception`` on the way out swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal_name(signum))
        self.signum = signum


def _stop_send(signum: int, frame: FrameType | None) -> None:
    raise SendStopped(signum)


def _ignore_late(signum: int, frame: FrameType | None) -> None:
    """A signal once the dispatch has ended: its summary is printed in a moment anyway."""


def cmd_send(args: argparse.Namespace) -> int:
    count: list[int] = []  # how many subscribers the run is for, once the config is read
    try:
        return _send(args, count)
    except SendStopped as stop:  # before the dispatch began: nothing claimed, nothing sent
        counts = (f"0 sent, 0 claimed for the next run, {count[0]} not reached"
                  if count else "nothing sent or claimed")
        print(f"Interrupted ({stop}): {counts}; run send again to finish.", file=sys.stderr)
        return 128 + stop.signum


def _send(args: argparse.Namespace, count: list[int]) -> int:
    config = _config(args)  # before the heavy imports: a bad config fails at once
    count.append(1 if args.user is not None else len(config.subscribers))
    if not args.dry_run:
        config.check_secrets()  # --dry-run contacts no server, so it needs no password

    from .daemon import Runtime, dispatch, select_subscribers
    from .mailer import LocalSink
    from .store import Store

    selected = len(select_subscribers(config, args.user))
    sink = None
    if config.smtp.sink is not None and not args.dry_run:
        sink = LocalSink.from_config(config.smtp)
        sink.start()
        from dataclasses import replace

        config = replace(config, smtp=sink.smtp_config())
    try:
        with Store(config.state) as store:
            runtime = Runtime(config, store)
            stop = _SendStop()
            outcomes = asyncio.run(stop.run(dispatch(runtime, only=args.user, force=args.force,
                                                     dry_run=args.dry_run, stop=stop.event)))
            left = [] if stop.signum is None or args.dry_run else [
                row for row in store.unsent_digests()
                if args.user is None or row.subscriber.lower() == args.user.lower()]
    finally:
        if sink is not None:
            sink.stop()
    failed = 0
    for outcome in _one_line_each(outcomes or []):
        if outcome.status in ("sent", "dry-run"):
            verb = "would send" if outcome.status == "dry-run" else "sent"
            print(f"{outcome.subscriber}: {verb} {outcome.shown} of {outcome.considered} papers"
                  + (f": {outcome.detail}" if outcome.detail else ""))
        else:
            failed += outcome.status in _FAILED
            print(f"{outcome.subscriber}: {_STATUS_TEXT.get(outcome.status, outcome.status)}"
                  + (f": {outcome.detail}" if outcome.detail else ""))
    if sink is not None:
        print(f"messages are in {sink.folder}")
    if stop.signum is not None:
        return _interrupted_summary(stop, outcomes, left, selected)
    return EXIT_ERROR if failed else EXIT_OK


def _interrupted_summary(stop: _SendStop, outcomes: Sequence[Outcome] | None,
                         left: Sequence[DigestRow], selected: int) -> int:
    """After a ``send`` stopped by a signal: what stays claimed for the next run, one line
    of counts; returns 128 + the signal's number (130 for SIGINT, 143 for SIGTERM)."""
    for row in left:
        print(f"{row.subscriber}: the digest of {row.local_date} stays claimed; the next run "
              "(or the daemon) resends it with the same Message-ID")
    name = signal.Signals(stop.signum or signal.SIGTERM).name
    if outcomes is None:
        counts = (f"{len(left)} claimed for the next run; the dispatch was cancelled before "
                  "it could count the rest")
    else:
        sent = sum(1 for o in outcomes if o.status == "sent")
        reached = len({o.subscriber.lower() for o in outcomes}
                      | {row.subscriber.lower() for row in left})
        counts = (f"{sent} sent, {len(left)} claimed for the next run, "
                  f"{max(selected - reached, 0)} not reached")
    print(f"Interrupted ({name}): {counts}; run send again to finish.", file=sys.stderr)
    return 128 + (stop.signum or signal.SIGTERM)


class _SendStop:
    """SIGTERM or SIGINT during ``digest send``: the dispatch stops claiming, the deliveries
    in flight get ``STOP_GRACE_SECONDS`` (the daemon's) to end, then are cancelled (their
    digests stay claimed), so the summary is printed in bounded time (two grace periods at
    most; a second signal cancels the dispatch at once)."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.signum: int | None = None  # the signal that stopped the run

    async def run(self, job: Awaitable[Sequence[Outcome]]) -> Sequence[Outcome] | None:
        """The job's outcomes; None when it had to be cancelled whole (stuck past two
        grace periods, or a second signal)."""
        from .daemon import STOP_GRACE_SECONDS
        from .daemon.jobs import DELIVERY_TASK_PREFIX
        from .daemon.prepare_worker import SIGINT_IGNORED_AT_START

        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(job)
        stops = (signal.SIGTERM,) if SIGINT_IGNORED_AT_START else (signal.SIGINT, signal.SIGTERM)
        for signum in stops:
            loop.add_signal_handler(signum, self._stop, signum, task)
        try:
            waiter = asyncio.ensure_future(self.event.wait())
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if not task.done():
                await asyncio.wait({task}, timeout=STOP_GRACE_SECONDS)
            deadline = loop.time() + STOP_GRACE_SECONDS
            while not task.done() and loop.time() < deadline:
                # Deliveries still waiting on the server give up (their digests stay claimed),
                # and so does each one the dispatch starts for a digest it claimed already.
                for other in asyncio.all_tasks():
                    if other.get_name().startswith(DELIVERY_TASK_PREFIX):
                        other.cancel()
                await asyncio.wait({task}, timeout=0.05)
            if not task.done():
                task.cancel()
            try:
                return await task
            except asyncio.CancelledError:
                if self.signum is None:
                    raise
                return None
        finally:
            for signum in stops:
                loop.remove_signal_handler(signum)  # (back to the default: not wanted now)
                signal.signal(signum, _ignore_late)

    def _stop(self, signum: int, task: asyncio.Future[Sequence[Outcome]]) -> None:
        if self.signum is None:
            self.signum = signum
            print(f"{signal_name(signum)} received: finishing the messages in flight, "
                  "then stopping...", file=sys.stderr)
            self.event.set()
        else:  # a second signal: no more waiting
            task.cancel()


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def _one_line_each(outcomes: Sequence[Outcome]) -> list[Outcome]:
    """A subscriber once: a resent digest makes the same run's "already sent" (or another
    idle outcome) for them redundant; confirmations keep their own lines."""
    from .daemon.jobs import IDLE_OUTCOMES

    busy = {o.subscriber for o in outcomes
            if o.status not in IDLE_OUTCOMES and not o.status.startswith("confirmation")}
    seen: set[tuple[str, str, str]] = set()
    kept = []
    for outcome in outcomes:
        key = (outcome.subscriber, outcome.status, outcome.detail)
        if key in seen or (outcome.status in IDLE_OUTCOMES and outcome.subscriber in busy):
            continue
        seen.add(key)
        kept.append(outcome)
    return kept


# Outcomes that make ``digest send`` exit 1: something that should have gone did not.
_FAILED = ("failed", "retry", "deferred", "held", "confirmation-failed")

_STATUS_TEXT = {
    "unsubscribed": "unsubscribed by reply; nothing sent",
    "paused": "paused by reply; nothing sent",
    "not-due": "not due yet (use --force to ignore the time of day)",
    "already-sent": "today's digest was already sent",
    "late": "send time passed too long ago; today is skipped",
    "empty": "no new papers; nothing sent",
    "failed": "FAILED",
    "retry": "delivery failed for now; will retry",
    "deferred": "not tried: the mail server cannot be used now; waits for the next run",
    "held": "nothing sent: sending is held after a configuration error",
    "confirmation-sent": "reply confirmation sent",
    "confirmation-failed": "reply confirmation FAILED",
}


def cmd_preview(args: argparse.Namespace) -> int:
    from .daemon import Runtime, effective_subscriber, prepare, select_subscribers
    from .render import render_html, render_text
    from .store import Store

    config = _config(args)
    with Store(config.state) as store:
        sub = effective_subscriber(select_subscribers(config, args.user)[0],
                                   store.subscriber_state(args.user))
        prepared = prepare(Runtime(config, store), sub, _now())
    if prepared is None:
        print(f"{sub.email}: no new papers; the next digest would be empty (not sent)")
        return EXIT_OK
    if args.html:  # first: a reader that stops early (``| head``) still gets the file
        Path(args.html).write_text(render_html(prepared.content, config.smtp), encoding="utf-8")
        print(f"HTML written to {args.html}", file=sys.stderr)
    print(f"Subject: {prepared.message.subject}\n")
    print(render_text(prepared.content, config.smtp))
    return EXIT_OK


def cmd_fetch(args: argparse.Namespace) -> int:
    from .sources import fetch_sources, redact_url
    from .store import Store

    config = _config(args)
    if not config.sources:
        if args.source:
            raise DigestError(f"{config.path}: no source named {args.source!r} "
                              "(no [[sources]] configured)")
        print(f"{config.path}: no [[sources]] table, so there is nothing to fetch")
        return EXIT_OK
    if args.date:
        chosen = [s for s in config.sources
                  if args.source is None or s.name.lower() == args.source.lower()]
        undated = [s.name for s in chosen if not s.dated]
        if undated:
            raise DigestError(
                f"{config.path}: --date needs a url with {{date}} in it, and source(s) "
                f"{', '.join(undated)} have none (they always give today's listing); "
                "pick a dated source with --source NAME")
    with Store(config.state) as store:
        results = asyncio.run(fetch_sources(config, store, now=_now(), only=args.source,
                                            dates=[args.date] if args.date else None,
                                            scheduled=False))
    failed = 0
    for result in results:
        if result.status == "waiting":
            failed += 1
            print(f"{result.source}: {result.detail}")
            continue
        for url in result.urls:
            failed += not url.ok
            print(f"{result.source}: {url.listing_date} {redact_url(url.url)}: "
                  + _fetch_line(url))
        if result.status == "failed" and not any(not url.ok for url in result.urls):
            failed += 1
            print(f"{result.source}: FAILED: {result.detail}")
    written = sum(url.status == "written" for r in results for url in r.urls)
    print(f"{written} listing file(s) written to {config.inbox}"
          + ("; the daemon's next scan (or `digest ingest`) ingests them" if written else ""))
    return EXIT_ERROR if failed else EXIT_OK


def _fetch_line(url: UrlResult) -> str:
    if url.status == "written":
        return f"written to {url.file} ({url.bytes} bytes)"
    if url.status == "not-modified":
        return "not modified since the last fetch (304), nothing downloaded"
    if url.status == "unchanged":
        return "same content as the last fetch, not written again"
    return f"FAILED: {url.detail}"


def _listing_date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date YYYY-MM-DD, got {text!r}") from None


def cmd_run(args: argparse.Namespace) -> int:
    from .daemon import run_daemon

    return run_daemon(args.config)


def cmd_status(args: argparse.Namespace) -> int:
    from .daemon import format_status, status_report
    from .store import Store

    config = _config(args)
    if not config.state.exists():
        from .errors import StoreError

        raise StoreError(f"{config.state}: no state database yet (has the daemon run?)")
    with Store(config.state) as store:
        report = status_report(config, store, _now())
    print(json.dumps(report, indent=2) if args.json else format_status(report))
    return EXIT_OK


def _add_daemon_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """The daemon's operational commands (``status``)."""
    text = ("Show each subscriber's state, next send time, last digest and feedback, "
            "plus recent ingests, failed dumps and replies waiting.")
    p = commands.add_parser("status", help=text, description=text)
    p.set_defaults(func=cmd_status)
    p.add_argument("--json", action="store_true", help="print the status as JSON, for scripts")


def cmd_bench_ingest(args: argparse.Namespace) -> int:
    from .bench.ingest import run_ingest_bench

    logging.getLogger("digest.ingest").setLevel(logging.WARNING)  # one line per dump drowns the table
    result = run_ingest_bench(Path(args.data), runs=args.runs, days=args.days,
                              progress=not args.json)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(result["table"])
        print(json.dumps({k: v for k, v in result.items() if k != "table"}, sort_keys=True))
    return EXIT_OK


def cmd_bench_quality(args: argparse.Namespace) -> int:
    from .bench.quality import format_table, result_json, run_quality

    result = run_quality(args.dataset, max_liked=args.max_liked, ranker=args.ranker,
                         progress=not args.json and sys.stderr.isatty())
    if not args.json:
        print(format_table(result))
    print(result_json(result))
    if args.min_ndcg is not None and result["ndcg@10"] < args.min_ndcg:
        print(f"Error: nDCG@10 {result['ndcg@10']:.4f} is below the gate {args.min_ndcg}",
              file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def cmd_bench_learning(args: argparse.Namespace) -> int:
    from .bench.learning import format_table, run_learning

    for name in ("digest", "mail.log"):  # a day's hundreds of sends drown the table
        logging.getLogger(name).setLevel(logging.WARNING)

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    result = run_learning(args.dataset, days=args.days, readers=args.readers,
                          variant=args.variant,
                          progress=progress if not args.json and sys.stderr.isatty() else None)
    if not args.json:
        print(format_table(result))
    print(json.dumps({k: v for k, v in result.items() if k != "per_day"}, sort_keys=True))
    return EXIT_OK


def cmd_bench_faults(args: argparse.Namespace) -> int:
    from .bench.faults import format_table, result_json, run_faults

    # The cases fail on purpose: neither our log nor the test servers' (mail.log) is news.
    for name in ("digest", "mail.log"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    results = run_faults(args.area or None, quick=args.quick)
    if not args.json:
        print(format_table(results))
    print(result_json(results))
    return EXIT_OK if all(r.clean for r in results) else EXIT_ERROR


def cmd_replies(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .mailer import LocalSink
    from .replies import process_replies
    from .store import Store

    config = _config(args)
    if config.imap is None and config.maildir is None:
        print(f"{config.path}: no [imap] or [maildir] table, so there are no replies to read")
        return EXIT_OK
    config.check_secrets()  # confirmations are sent, so the SMTP password is needed too
    sink = None
    if config.smtp.sink is not None:
        sink = LocalSink.from_config(config.smtp)
        sink.start()
        config = replace(config, smtp=sink.smtp_config())
    from .daemon.lock import StateLock

    try:
        # Confirmations are mail too: one sender per state, so none goes out twice.
        with StateLock(config.state) as lock, Store(config.state) as store:
            lock.acquire("replies")
            report = asyncio.run(process_replies(config, store))
    finally:
        if sink is not None:
            sink.stop()
    for outcome in report.outcomes:
        what = ", ".join(outcome.commands) if outcome.commands else outcome.detail
        print(f"{outcome.sender or '(no sender)'}: {outcome.outcome}" + (f": {what}" if what else ""))
    print(report.summary())
    return EXIT_OK


def cmd_feedback(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from .store import Store

    config = _config(args)
    email = args.user.strip().lower()
    with Store(config.state) as store:
        state = store.subscriber_state(email)
        entries = store.feedback_log(email)
    state_fields = {k: (v.isoformat() if hasattr(v, "isoformat") else
                        list(v) if isinstance(v, tuple) else v)
                    for k, v in asdict(state).items() if k != "subscriber"}
    if args.json:
        print(json.dumps({
            "subscriber": email,
            "state": state_fields,
            "feedback": [{"paper_id": e.paper_id, "title": e.title, "signal": e.signal,
                          "at": e.at, "digest": e.digest_date, "digest_id": e.digest_id,
                          "source": e.source} for e in entries],
        }, ensure_ascii=False))
        return EXIT_OK
    known = config.subscriber(email) is not None
    print(f"{email}" + ("" if known else " (not in the config)"))
    set_by_reply = {k: v for k, v in state_fields.items()
                    if v not in (None, False, []) and k != "updated_at"}
    if set_by_reply:
        print("  set by reply (wins over the config): " + ", ".join(
            f"{k}={v}" for k, v in set_by_reply.items()) + f" (last change {state.updated_at})")
    else:
        print("  set by reply: nothing (the config decides)")
    if not entries:
        print("  no feedback yet")
    for e in entries:
        digest = f"digest of {e.digest_date}" if e.digest_date else "no digest"
        print(f"  {e.at}  {e.signal:<4}  {e.paper_id:<14} {e.title[:60]}  ({digest}, {e.source})")
    return EXIT_OK


def cmd_bench_replies(args: argparse.Namespace) -> int:
    from .bench.replies import run_replies_bench

    logging.getLogger("digest").setLevel(logging.WARNING)  # a line per reply drowns the table
    if args.corpus is not None:
        from .bench.replies import corpus_folder, run_corpus

        result = run_corpus(Path(args.corpus) if args.corpus else corpus_folder())
        if not args.json:
            print(result["table"])
        print(json.dumps({k: v for k, v in result.items() if k != "table"}, sort_keys=True))
        return EXIT_OK if result["ok"] == result["cases"] else EXIT_ERROR
    result = run_replies_bench(count=args.count, runs=args.runs, backend=args.backend,
                               subscribers=args.subscribers)
    if not args.json:
        print(result["table"])
    print(json.dumps({k: v for k, v in result.items() if k != "table"}, sort_keys=True))
    return EXIT_OK


def cmd_bench_dispatch(args: argparse.Namespace) -> int:
    from .bench.dispatch import run_dispatch_bench

    logging.getLogger("digest").setLevel(logging.WARNING)  # a line per message drowns the table
    result = run_dispatch_bench(Path(args.data), subscribers=args.subscribers, days=args.days,
                                history=args.history, runs=args.runs, sink=args.sink,
                                progress=not args.json, prepare_workers=args.prepare_workers)
    if not args.json:
        print(result["table"])
    print(json.dumps({k: v for k, v in result.items() if k != "table"}, sort_keys=True))
    return EXIT_OK


def cmd_bench_config(args: argparse.Namespace) -> int:
    from .bench.config import run_config_bench

    result = run_config_bench(args.subscribers, runs=args.runs, baseline=args.baseline)
    if not args.json:
        print(result["table"])
    print(json.dumps({k: v for k, v in result.items() if k != "table"}, sort_keys=True))
    return EXIT_OK


def cmd_bench_corpus(args: argparse.Namespace) -> int:
    from .bench.corpus import DEFAULT_METHODS, result_json, run_corpus_bench

    result = run_corpus_bench(args.dataset, methods=args.method or DEFAULT_METHODS,
                              runs=args.runs, repeat=args.repeat)
    if not args.json:
        print(result["table"])
    print(result_json(result))
    return EXIT_OK


def cmd_explain(args: argparse.Namespace) -> int:
    from .daemon import (
        Runtime,
        candidate_seq,
        effective_subscriber,
        select_subscribers,
    )
    from .rank import build_profile, explain, explain_top
    from .store import Store

    config = _config(args)
    with Store(config.state) as store:
        sub = effective_subscriber(select_subscribers(config, args.user)[0],
                                   store.subscriber_state(args.user))
        runtime = Runtime(config, store)
        candidates, source = _explain_pool(store, sub, candidate_seq(store, sub, _now()))
        index = runtime.corpus_index()
        profile = build_profile(store, sub)
        options = {"settings": config.ranking, "cache": runtime.models, "key": sub.email.lower()}
        if args.paper:
            paper_id = index.resolve(args.paper)
            if paper_id is None:
                raise DigestError(f"no stored paper with id or title {args.paper!r}")
            explanations = [explain(index, profile, paper_id, candidates=candidates or None,
                                    limit=sub.max_papers, **options)]
        elif not candidates:
            print(f"{sub.email}: no candidates: no new papers and no digest sent yet")
            return EXIT_OK
        else:
            explanations = explain_top(index, profile, candidates, sub.max_papers, **options)
    print(f"{sub.email}: {len(profile.liked)} liked, {len(profile.skipped)} skipped, "
          f"{len(profile.unrated)} shown and left unrated, {len(profile.interests)} interests; "
          f"ranking {source}")
    if explanations:
        print(f"relevance levels: {explanations[0].level_method}")
    for item in explanations:
        print(_explanation_text(item))
    return EXIT_OK


def cmd_import(args: argparse.Namespace) -> int:
    from .daemon import select_subscribers
    from .library import import_library
    from .store import Store

    config = _config(args)
    sub = select_subscribers(config, args.user)[0]
    path = Path(args.file)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DigestError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    with Store(config.state) as store:
        result = import_library(store, sub.email, data, str(path), source="import")
        counts = store.library_counts(sub.email)
    print(f"{sub.email}: {result.summary()}")
    print(f"  library now {counts.entries} entries: {counts.matched} match a stored paper, "
          f"{counts.pending} pending until their paper arrives ({counts.with_text} with an "
          f"abstract count already)")
    return EXIT_OK


def _explain_pool(store: Store, sub: Subscriber, since_seq: int) -> tuple[list[str], str]:
    """The papers to explain among: the next digest's candidates, else the last digest's items."""
    candidates = [p.id for p in store.candidate_papers(sub.email, since_seq)]
    if candidates:
        return candidates, f"the next digest's {len(candidates)} candidates"
    for digest in store.digests_of(sub.email, limit=1):
        items = [item.paper_id for item in store.digest_items(digest.id)]
        return items, f"the {len(items)} papers of the digest of {digest.local_date}"
    return [], "no papers"


def _explanation_text(item: Explanation) -> str:
    where = f"#{item.position}" if item.position is not None else "-"
    lines = [f"\n{where:>4}  {item.title}", f"      id {item.paper_id}   score {item.score:.3f}"
             + ("   (explore slot)" if item.explore else ""),
             f"      why: {item.reason}",
             f"      relevance: {item.level or 'none (not personalised)'}"]
    if item.shared_terms:
        lines.append("      strongest shared terms: "
                     + ", ".join(term for term, _ in item.shared_terms))
    for neighbour in item.nearest_liked:
        lines.append(f'      near liked: "{neighbour.title}" ({neighbour.similarity:.2f})')
    for neighbour in item.nearest_skipped[:1]:
        lines.append(f'      near skipped: "{neighbour.title}" ({neighbour.similarity:.2f})')
    for neighbour in item.nearest_unrated[:1]:
        lines.append(f'      near a paper you left unrated: "{neighbour.title}" '
                     f"({neighbour.similarity:.2f})")
    for phrase, similarity in item.interests[:2]:
        lines.append(f'      interest "{phrase}": {similarity:.2f}')
    return "\n".join(lines)


def _now():  # type: ignore[no-untyped-def]
    from .store import utc_now

    return utc_now()


def _config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from .config import load_config

    config = load_config(args.config)
    config.check_paths()  # a state path under a file: say which key, before any work
    return config


# --- the parser ---------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="digest",
        description="Personalised daily digests of trending research papers, by email.",
    )
    parser.add_argument("--config", "-c", default=os.environ.get("DIGEST_CONFIG", DEFAULT_CONFIG),
                        help="the TOML config file (default: $DIGEST_CONFIG or ./digest.toml)")
    parser.add_argument("--verbose", "-v", action="count", default=0, help="more log detail")
    parser.add_argument("--quiet", "-q", action="store_true", help="warnings and errors only")
    parser.add_argument("--version", action="version", version=f"paper-digest {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int], text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=text)
        sub.set_defaults(func=func)
        return sub

    p = add("check-config", cmd_check_config, "Check the config file and print what it sets up.")
    p.add_argument("--connect", action="store_true",
                   help="also log in to the SMTP server (and the IMAP server, when configured) "
                   "and report the result")

    p = add("ingest", cmd_ingest, "Ingest dump files (default: scan the configured inbox folder).")
    p.add_argument("files", nargs="*", metavar="FILE", help="dump files to ingest")

    p = add("send", cmd_send, "Send the digests that are due now.")
    p.add_argument("--user", metavar="EMAIL", help="only this subscriber")
    p.add_argument("--dry-run", action="store_true",
                   help="rank and render, but claim and send nothing")
    p.add_argument("--force", action="store_true",
                   help="ignore the time of day and the weekday (never sends a day twice)")

    p = add("preview", cmd_preview, "Print the digest a subscriber would get now (sends nothing).")
    p.add_argument("--user", metavar="EMAIL", required=True, help="the subscriber")
    p.add_argument("--html", metavar="FILE", help="also write the HTML part to FILE")

    p = add("fetch", cmd_fetch, "Fetch the [[sources]] listings into the inbox once, now "
            "(an unchanged listing is not downloaded again).")
    p.add_argument("--source", metavar="NAME", help="only this source")
    p.add_argument("--date", type=_listing_date, metavar="YYYY-MM-DD",
                   help="the listing date for a URL with {date} (default: today and the "
                   "source's lookback_days before)")

    add("run", cmd_run, "Run the daemon: watch the inbox and send digests on time.")
    _add_daemon_commands(commands)

    p = add("explain", cmd_explain,
            "Show why papers rank where they do for a subscriber: reason, score, strongest "
            "shared terms, nearest liked papers (the next digest's candidates, else the last "
            "digest's).")
    p.add_argument("--user", metavar="EMAIL", required=True, help="the subscriber")
    p.add_argument("--paper", metavar="ID",
                   help="explain this paper (id, arXiv id or exact title) instead of the top ones")

    p = add("import", cmd_import,
            "Import a subscriber's library (BibTeX, CSL-JSON as Zotero exports it, or RIS) "
            "as seed papers; entries not stored yet stay pending until their paper arrives.")
    p.add_argument("--user", metavar="EMAIL", required=True, help="the subscriber")
    p.add_argument("file", metavar="FILE", help="the library export (.bib, .json, .ris)")

    bench = add("bench", _bench_help, "Benchmarks: ingest speed and ranking quality.")
    bench_commands = bench.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    p = bench_commands.add_parser("ingest", help="Ingest speed on the real daily listings.",
                                  description="Render real daily listings as page dumps and "
                                  "time their ingestion into a fresh SQLite store.")
    p.set_defaults(func=cmd_bench_ingest)
    p.add_argument("--data", default=str(_shared() / "data" / "hf-daily-papers.jsonl"),
                   help="the daily-papers JSON lines file (default: ../shared/data/...)")
    p.add_argument("--runs", type=int, default=3, help="how many runs (the median is reported)")
    p.add_argument("--days", type=int, default=None, help="only the first N days")
    p.add_argument("--json", action="store_true", help="print one JSON line only")
    p = bench_commands.add_parser(
        "quality", help="Ranking quality on a benchmark dataset (nDCG@10, Recall@10, MRR, AUC).",
        description="Rank every case of a dataset (../shared/bench/FORMAT.md) with the same "
        "code that ranks a real digest, exploration off, and print the metrics.")
    p.set_defaults(func=cmd_bench_quality)
    p.add_argument("--dataset", required=True, metavar="DIR", help="the dataset folder")
    p.add_argument("--max-liked", type=int, metavar="N",
                   help="keep only each case's N most recent liked papers (cold start)")
    p.add_argument("--ranker", choices=("model", "random"), default="model",
                   help="the shipped model, or a seeded random ranker to check the metrics")
    p.add_argument("--min-ndcg", type=float, metavar="X",
                   help="exit 1 when nDCG@10 is below X (a CI quality gate)")
    p.add_argument("--json", action="store_true", help="print one JSON line only")
    from .bench.options import DEFAULT_DAYS, DEFAULT_READERS, VARIANTS

    p = bench_commands.add_parser(
        "learning", help="Closed-loop learning: simulated readers reply to daily digests.",
        description="Simulated readers (dataset users; hidden library = their liked and "
        "relevant papers, one liked paper as the seed) get a digest a day through the same "
        "dispatch as `digest send` and reply like/skip through a Maildir processed as real "
        "replies; a silent copy of each reader is the control. Prints hits@10 per day "
        "(replying, silent, random, oracle) and one JSON line with learning_gain.")
    p.set_defaults(func=cmd_bench_learning)
    p.add_argument("--dataset", required=True, metavar="DIR", help="the dataset folder")
    p.add_argument("--days", type=int, default=DEFAULT_DAYS,
                   help=f"digests per reader (default {DEFAULT_DAYS})")
    p.add_argument("--readers", type=int, default=DEFAULT_READERS,
                   help=f"simulated readers per group (default {DEFAULT_READERS})")
    p.add_argument("--variant", choices=VARIANTS, default="like-skip",
                   help="like-skip: like wanted items, skip the rest; like-only: leave the "
                   "rest unrated; top5: rate items 1-5 only")
    p.add_argument("--json", action="store_true", help="print one JSON line only")
    from .bench.faults import AREAS

    p = bench_commands.add_parser(
        "faults", help="The fault campaign: hostile inputs, crashes, misbehaving servers.",
        description="Try hostile dumps, configs and replies, misbehaving SMTP servers and "
        "kill -9 during dispatch against the real code; print per area the cases tried, "
        "crashes, data lost, duplicates and unclear errors. Exit 1 unless all are zero "
        "(duplicates inside the 250-to-commit window are counted apart).")
    p.set_defaults(func=cmd_bench_faults)
    p.add_argument("--area", action="append", choices=list(AREAS),
                   help="only this area (repeatable; default: all)")
    p.add_argument("--quick", action="store_true",
                   help="the smaller campaign the test suite runs")
    p.add_argument("--json", action="store_true", help="print one JSON line only")
    _add_reply_commands(commands, bench_commands)
    _add_bench_dispatch(bench_commands)
    _add_bench_config(bench_commands)
    _add_bench_corpus(bench_commands)
    return parser


def _add_reply_commands(commands: argparse._SubParsersAction,  # type: ignore[type-arg]
                        bench_commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """The commands of the replies stage: replies, feedback, bench replies."""
    text = "Process the replies waiting in the [imap] or [maildir] mailbox once."
    p = commands.add_parser("replies", help=text, description=text + " Commands are applied, "
                            "confirmations sent, and each reply is marked processed after.")
    p.set_defaults(func=cmd_replies)
    text = "List a subscriber's feedback and the subscription state they set by reply."
    p = commands.add_parser("feedback", help=text, description=text)
    p.set_defaults(func=cmd_feedback)
    p.add_argument("--user", metavar="EMAIL", required=True, help="the subscriber")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (subscriber, state, feedback)")
    text = "Reply processing speed: N replies waiting in a real mailbox."
    p = bench_commands.add_parser("replies", help=text, description=text + " Starts a private "
                                  "Dovecot (or uses a Maildir where Dovecot is absent).")
    p.set_defaults(func=cmd_bench_replies)
    p.add_argument("--count", type=int, default=1000, help="replies waiting (default 1000)")
    p.add_argument("--subscribers", type=int, default=200,
                   help="subscribers the replies come from (default 200)")
    p.add_argument("--runs", type=int, default=1, help="how many runs (the median is reported)")
    p.add_argument("--backend", choices=("auto", "imap", "maildir"), default="auto",
                   help="auto: Dovecot IMAP when installed, else Maildir")
    p.add_argument("--json", action="store_true", help="print one JSON line only")
    p.add_argument("--corpus", nargs="?", const="", metavar="FOLDER", default=None,
                   help="instead of timing, read the reply-layout corpus (default "
                        "tests/replies_corpus of the checkout) and count the cases that give "
                        "exactly the expected commands and no spurious lines")


def _add_bench_dispatch(bench_commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``digest bench dispatch``: one day's dispatch to N subscribers against raw SMTP."""
    text = "Dispatch speed: one day's digests to N subscribers, beside raw SMTP."
    p = bench_commands.add_parser(
        "dispatch", help=text, description=text + " Builds a state from the real daily "
        "listings (subscribers with interests, a share with past digests, likes and skips), "
        "runs the daemon's dispatch to an SMTP sink in another process, checks every "
        "subscriber got exactly one message, and measures raw aiosmtplib over 1 and 8 "
        "connections in the same run.")
    p.set_defaults(func=cmd_bench_dispatch)
    p.add_argument("--subscribers", type=int, required=True, metavar="N",
                   help="how many subscribers")
    p.add_argument("--days", type=int, default=60, metavar="D",
                   help="listing days ingested, the last one being today's (default 60)")
    p.add_argument("--history", type=float, default=0.3, metavar="SHARE",
                   help="share of subscribers with a month of past digests, likes and skips "
                   "(default 0.3)")
    p.add_argument("--runs", type=int, default=3, help="how many runs (medians are reported)")
    p.add_argument("--sink", choices=("aiosmtpd", "lean"), default="aiosmtpd",
                   help="the SMTP server that receives: aiosmtpd (default), or lean, a "
                   "minimal server of the bench's own that costs about what a relay in C does")
    p.add_argument("--data", default=str(_shared() / "data" / "hf-daily-papers.jsonl"),
                   help="the daily-papers JSON lines file (default: ../shared/data/...)")
    p.add_argument("--prepare-workers", type=int, default=None, metavar="N",
                   help="prepare digests in N worker processes (0: in the dispatching "
                   "process; default: the config's default, as a daemon would)")
    p.add_argument("--json", action="store_true", help="print one JSON line only")


def _add_bench_config(bench_commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``digest bench config``: loading the config of N subscribers, beside a baseline."""
    from .bench.config import BASELINE_SUBSCRIBERS

    text = "Config loading speed: a config of N subscribers, beside a baseline size."
    p = bench_commands.add_parser(
        "config", help=text, description=text + " Writes a config shaped like the dispatch "
        "benchmark's (addresses, names, interests, time zones, send times) and times "
        "load_config on it, each run in a fresh process: median seconds, microseconds per "
        "subscriber, peak RSS.")
    p.set_defaults(func=cmd_bench_config)
    p.add_argument("--subscribers", type=int, required=True, metavar="N",
                   help="how many subscribers")
    p.add_argument("--runs", type=int, default=3, help="how many runs (medians are reported)")
    p.add_argument("--baseline", type=int, default=BASELINE_SUBSCRIBERS, metavar="N",
                   help=f"the size measured beside it (default {BASELINE_SUBSCRIBERS})")
    p.add_argument("--json", action="store_true", help="print one JSON line only")


def _add_bench_corpus(bench_commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``digest bench corpus``: the corpus fit's time and memory, bounded against unbounded."""
    from .bench.options import CORPUS_METHODS, DEFAULT_CORPUS_METHODS

    text = "Corpus fit: wall and CPU seconds and peak memory, per fitting method."
    p = bench_commands.add_parser(
        "corpus", help=text, description=text + " Fits the corpus index on a dataset's "
        "papers once per method and run, each in a fresh process, and prints medians: papers, "
        "terms kept, wall s, CPU s, peak RSS over the process before the fit.")
    p.set_defaults(func=cmd_bench_corpus)
    p.add_argument("--dataset", metavar="DIR",
                   default=str(_shared() / "bench" / "datasets" / "arxiv-authors-public"),
                   help="the dataset folder (default: ../shared/bench/datasets/"
                   "arxiv-authors-public, 33k papers)")
    p.add_argument("--method", action="append", choices=CORPUS_METHODS,
                   help="a fitting method (repeatable; default: "
                   f"{' and '.join(DEFAULT_CORPUS_METHODS)}; 'all' is the unbounded fit)")
    p.add_argument("--runs", type=int, default=3, help="runs per method (medians are reported)")
    p.add_argument("--repeat", type=int, default=1, metavar="K",
                   help="repeat the papers K times under new ids (a larger corpus; default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON line only")


def _bench_help(args: argparse.Namespace) -> int:  # pragma: no cover - argparse requires a BENCH
    return EXIT_USAGE


def _shared() -> Path:
    """The ``shared`` folder beside the checkout, where the benchmark data lives."""
    return Path(__file__).resolve().parents[2] / "shared"


@contextmanager
def _signals(send: bool) -> Iterator[None]:
    """SIGTERM and SIGINT while a command runs: for ``send``, ``SendStopped`` until its
    dispatch takes them over (one summary line, exit 143 or 130, at any moment); for the
    others, what they were (SIGTERM ends the process, SIGINT raises KeyboardInterrupt). A
    signal that came while the program started is acted on now. An ignored one stays so;
    the handlers before are put back on the way out (for a caller of ``main``)."""
    defaults: dict[int, Any] = {signal.SIGTERM: signal.SIG_DFL,
                                signal.SIGINT: signal.default_int_handler}
    before = {signum: signal.getsignal(signum) for signum in defaults}
    for signum, handler in before.items():
        if handler is _remember_signal or (send and handler is defaults[signum]):
            signal.signal(signum, _stop_send if send else defaults[signum])
    try:
        if _EARLY_SIGNALS:
            signum = _EARLY_SIGNALS[0]
            _EARLY_SIGNALS.clear()
            if send:
                raise SendStopped(signum)
            os.kill(os.getpid(), signum)  # handled as it would have been, now
        yield
    finally:
        for signum, handler in before.items():
            if handler is not _remember_signal and signal.getsignal(signum) is not handler:
                signal.signal(signum, handler)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(-1 if args.quiet else args.verbose)
    try:
        with _signals(args.command == "send"):
            return _main(args)
    except DigestError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
    except SendStopped as stop:  # before ``cmd_send`` began
        print(f"Interrupted ({stop}): nothing sent or claimed; run send again to finish.",
              file=sys.stderr)
        return 128 + stop.signum


def _main(args: argparse.Namespace) -> int:
    try:
        if args.command == "bench":
            return _run_bench(args)
        return int(args.func(args))
    except BrokenPipeError:
        # The reader of our output stopped early (``digest preview | head``): what it read is
        # what it wanted. Point stdout at /dev/null so the flush at exit cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _run_bench(args: argparse.Namespace) -> int:
    """A ``bench`` command: SIGINT or SIGTERM ends its helper processes, removes its
    temporary folder and exits 130 or 143 with one line (no traceback)."""
    from .bench.interrupt import BenchInterrupted, stoppable

    try:
        with stoppable():
            return int(args.func(args))
    except BenchInterrupted as stop:
        print(f"Interrupted ({stop}): the benchmark's helper processes were ended and its "
              "temporary files removed.", file=sys.stderr)
        return stop.exit_code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
