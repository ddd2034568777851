"""``digest run``: the loop that runs the jobs on a timer, and its signals.

APScheduler is only the timer; who is due and what was sent live in the store.
SIGHUP reloads the config (a dispatch under way stops sending to whom it removes),
SIGTERM starts no delivery, finishes those in flight and exits 0 (a message written
whole is waited for until its reply, up to ``[smtp] data_timeout``),
a second SIGTERM exits at once. The daemon holds the state's sender lock for
its whole life (a second ``digest run`` on the same state exits at once), and
under systemd it says READY=1, feeds the watchdog from the event loop and
keeps a STATUS= line with the last dispatch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import datetime
from typing import Any

from ..config import DEFAULT_REPLY_POLL_SECONDS, Config, load_config
from ..errors import DigestError, StoreWriteError
from ..mailer import LocalSink
from ..sources import FETCH_TICK_SECONDS, download, plan_fetches, record_results
from ..store import Store, utc_now
from .jobs import FATAL_ERRORS, STOP_GRACE_SECONDS, Runtime, dispatch, scan, stop_reply_wait
from .lock import StateLock
from .notify import Notifier
from .prepare_worker import SIGINT_IGNORED_AT_START
from .status import subscriber_status

log = logging.getLogger(__name__)

# After the IMAP server refuses the login, logins wait this long, doubling up to the maximum,
# or until a config reload: as for SMTP (jobs.SMTP_HOLD_*), a provider that locks an account
# after repeated bad logins is not provoked by a poll every minute.
IMAP_HOLD_FIRST_SECONDS = 5 * 60.0
IMAP_HOLD_MAX_SECONDS = 6 * 3600.0

__all__ = ["STOP_GRACE_SECONDS", "Daemon", "run_daemon"]  # the grace: jobs.STOP_GRACE_SECONDS


class Daemon:
    """``digest run``: timer ticks for scan, dispatch and replies; signals for reload and stop.

    Every job runs on the event loop thread, and no store transaction spans
    an ``await``, so the single SQLite connection has one writer at a time.
    Scan and reply runs take ``_busy`` in turn; a dispatch takes
    ``_dispatching`` instead, so scans and replies go on while it waits on a
    mail server; a reload takes both, so it never lands mid-run.
    APScheduler's jobs only start those tasks: they are ours, so stopping the
    scheduler never cancels a message in flight.
    """

    def __init__(self, config_path: str | os.PathLike[str], config: Config | None = None):
        self.config_path = config_path
        self.config = config if config is not None else load_config(config_path)
        self.sink: LocalSink | None = None
        self.stop = asyncio.Event()
        self.exit_code = 0
        self._runtime: Runtime | None = None
        self._busy = asyncio.Lock()
        self._dispatching = asyncio.Lock()
        self.lock: StateLock | None = None
        self.notifier = Notifier()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._scheduler: Any = None
        self._reply_task: asyncio.Task[None] | None = None
        self._said_schedule = False
        self._running: dict[str, float] = {}  # job -> monotonic time of its last progress
        self.hard_exit = False  # run_daemon: os._exit when a thread is stuck at the stop
        self._stuck_at_stop = False
        self._imap_hold: tuple[float, float] | None = None  # (monotonic until, delay) after 535

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            raise RuntimeError("the daemon is not running")
        return self._runtime

    async def run(self) -> int:
        from apscheduler.schedulers.asyncio import AsyncIOScheduler

        self.config.check_secrets()  # a missing secret stops the start, not every send
        self.lock = StateLock(self.config.state)
        self.lock.acquire("daemon")  # StateLocked: another daemon or sender has this state
        try:
            config = self._start_sink(self.config)
            store = Store(config.state)
        except BaseException:
            self._stop_sink()
            self.lock.release()
            raise
        self._runtime = Runtime(config, store, lock=self.lock)
        loop = asyncio.get_running_loop()
        # A SIGINT ignored when the daemon started (``nohup``, ``trap '' INT``, a
        # background job of a script) stays ignored, as it does in other programs.
        stops = (signal.SIGTERM,) if SIGINT_IGNORED_AT_START else (signal.SIGINT, signal.SIGTERM)
        for signum in stops:
            loop.add_signal_handler(signum, self._request_stop, signum)
        loop.add_signal_handler(signal.SIGHUP, self._request_reload)
        self._scheduler = scheduler = AsyncIOScheduler(event_loop=loop)
        for name, seconds in self._intervals(config).items():
            scheduler.add_job(self._kick, "interval", args=[name], seconds=seconds, id=name,
                              max_instances=1, coalesce=True, misfire_grace_time=None)
        log.info("daemon: started (pid %d): inbox %s, state %s, subscribers: %d, scan every "
                 "%gs, dispatch every %gs%s", os.getpid(), config.inbox, config.state,
                 len(config.subscribers), config.scan_seconds, config.dispatch_seconds,
                 ", replies on" if _replies_configured(config) else "")
        watchdog: asyncio.Task[None] | None = None
        try:
            self._report_claimed()
            await self._kick("scan")
            await self._kick("dispatch")
            await self._kick("fetch")
            scheduler.start()
            self._start_replies()
            self.notifier.ready(f"started; {len(config.subscribers)} subscribers")
            if self.notifier.watchdog_seconds is not None:
                watchdog = asyncio.create_task(self._feed_watchdog(), name="digest-watchdog")
            await self.stop.wait()
        finally:
            self.notifier.stopping("stopping")
            scheduler.shutdown(wait=False)
            await self._drain()
            if watchdog is not None:
                watchdog.cancel()
            for signum in (*stops, signal.SIGHUP):
                loop.remove_signal_handler(signum)
            self.runtime.store.close()
            self._stop_sink()
            if self.lock is not None:
                self.lock.release()
            self.notifier.close()
            log.info("daemon: stopped (exit %d)", self.exit_code)
            if self.hard_exit and self._stuck_at_stop:
                # asyncio.run would join the default executor, waiting on a thread stuck
                # in a network call; the store is closed and the lock released already.
                log.warning("daemon: a worker thread is still in a network call; exiting "
                            "without waiting for it")
                logging.shutdown()
                sys.stderr.flush()
                os._exit(self.exit_code)
        return self.exit_code

    async def _feed_watchdog(self) -> None:
        """WATCHDOG=1 at half of WatchdogSec=, from the event loop itself.

        A loop stuck in a call that never returns stops feeding it, and so does
        a job (scan, dispatch, a reply run) that made no progress for
        WatchdogSec= (a network call in a worker thread that never returns):
        systemd restarts the daemon (a digest it left claimed is resent on the
        next start).
        """
        limit = self.notifier.watchdog_seconds or 0
        interval = limit / 2
        said = ""
        while not self.stop.is_set():
            stuck = self._stuck_job(limit)
            if stuck is None:
                self.notifier.watchdog()
                said = ""
            elif stuck != said:  # not fed: systemd restarts a daemon whose job hangs
                said = stuck
                log.error("daemon: the %s job made no progress for %gs (a dead network "
                          "call?); the watchdog is not fed, systemd will restart the daemon",
                          stuck, limit)
            await self._sleep(interval)

    # --- jobs ---

    @staticmethod
    def _intervals(config: Config) -> dict[str, float]:
        return {"scan": config.scan_seconds, "dispatch": config.dispatch_seconds,
                "fetch": FETCH_TICK_SECONDS}

    async def _kick(self, name: str) -> None:
        """Start job ``name`` unless it is already waiting or running (ticks coalesce)."""
        task = self._tasks.get(name)
        if self.stop.is_set() or (task is not None and not task.done()):
            return
        self._tasks[name] = asyncio.create_task(self._job(name), name=f"digest-{name}")

    def _job_started(self, name: str) -> None:
        """Job ``name`` started (or made progress) now: the watchdog's measure of life."""
        self._running[name] = time.monotonic()

    def _job_ended(self, name: str) -> None:
        self._running.pop(name, None)

    def _stuck_job(self, limit: float) -> str | None:
        """A job that made no progress for ``limit`` seconds (dispatch: per subscriber, and
        at least the longest wait its SMTP replies are allowed)."""
        now = time.monotonic()
        for name, since in self._running.items():
            allowed = limit
            if name == "dispatch" and self._runtime is not None:
                since = max(since, self._runtime.progress_at)
                # A delivery may wait for the reply to its message's end for up to
                # ``[smtp] data_timeout`` (RFC 5321 4.5.3.2.6: 10 minutes): a relay that
                # slow is not a hang, and a restart then would send that digest twice.
                smtp = self._runtime.config.smtp
                allowed = max(limit, smtp.timeout + max(smtp.timeout, smtp.data_timeout))
            if now - since > allowed:
                return name
        return None

    async def _job(self, name: str) -> None:
        if name == "fetch":
            await self._fetch()
            return
        async with self._dispatching if name == "dispatch" else self._busy:
            if self.stop.is_set():
                return
            self._job_started(name)
            try:
                if name == "scan":
                    scan(self.runtime)
                else:
                    await dispatch(self.runtime, stop=self.stop)
                    self.notifier.status(self.runtime.last_dispatch)
                    if not self._said_schedule:
                        self._said_schedule = True
                        self._log_schedule()
            except StoreWriteError as exc:  # disk full or read-only: nothing half-written
                log.error("daemon: %s: %s; trying again on the next tick", name, exc)
                self.notifier.status(f"{name} failed: {exc}")
            except FATAL_ERRORS as exc:
                self._fail(f"{name}: the state database failed: {exc}")
            except DigestError as exc:  # e.g. a password file gone since the start
                log.error("daemon: %s: %s; trying again on the next tick", name, exc)
                self.notifier.status(f"{name} failed: {exc}")
            except Exception as exc:  # a bug outside any unit: said loudly, tried again
                log.exception("daemon: %s failed unexpectedly; trying again on the next tick",
                              name)
                self.notifier.status(f"{name} failed: {type(exc).__name__}: {exc}")
            finally:
                self._job_ended(name)

    async def _fetch(self) -> None:
        """Fetch the due [[sources]] into the inbox; the store lock is not held over HTTP."""
        self._job_started("fetch")
        try:
            async with self._busy:
                plans = plan_fetches(self.runtime.config, self.runtime.store, utc_now())
            if plans and not self.stop.is_set():
                results = await download(plans, stop=self.stop)
                async with self._busy:
                    record_results(self.runtime.store, results)
        except FATAL_ERRORS as exc:
            self._fail(f"fetch: the state database failed: {exc}")
        except Exception:  # each source is its own unit inside; this is a bug, not a source
            log.exception("fetch: this run failed unexpectedly; trying again at the next tick")
        finally:
            self._job_ended("fetch")

    def _log_schedule(self) -> None:
        """After the first dispatch, one line per subscriber: when their next digest goes."""
        now = utc_now()
        for sub in self.runtime.config.subscribers:
            info = subscriber_status(self.runtime, sub, now)
            when = info["next_send_local"]
            if when is None:
                log.info("subscriber %s: %s; no digest scheduled", sub.email, info["state"])
                continue
            local = datetime.fromisoformat(when)
            log.info("subscriber %s: next digest %s %s", sub.email,
                     local.strftime("%a %Y-%m-%d %H:%M"), info["timezone"])

    def _fail(self, reason: str) -> None:
        """The daemon itself is broken: stop with a non-zero exit so systemd restarts it."""
        log.critical("daemon: %s; stopping (exit 1)", reason)
        self.exit_code = 1
        self.stop.set()

    def _report_claimed(self) -> None:
        """Say what a crash left claimed and not sent; the first dispatch resends it."""
        config = self.runtime.config
        for row in self.runtime.store.unsent_digests():
            if config.subscriber(row.subscriber) is None:
                log.warning("subscriber %s: not in the config any more; the digest of %s "
                            "claimed at %s stays unsent until they are back", row.subscriber,
                            row.local_date, row.claimed_at)
            else:
                log.warning("subscriber %s: the digest of %s was claimed at %s and is not "
                            "marked sent (a stop mid-send, or a deferred delivery); resending "
                            "it with the same Message-ID %s",
                            row.subscriber, row.local_date, row.claimed_at, row.message_id)

    # --- replies ---

    def _start_replies(self) -> None:
        if self._reply_task is None and _replies_configured(self.runtime.config):
            self._reply_task = asyncio.create_task(self._reply_loop(), name="digest-replies")

    async def _reply_loop(self) -> None:
        """Read replies, then wait for more (IDLE or poll), until stopped or unconfigured."""
        from .. import replies  # looked up per run: tests stand in for process_replies

        try:
            while not self.stop.is_set() and _replies_configured(self.runtime.config):
                if await self._imap_held():
                    continue
                failed = False
                runtime = self.runtime
                config, store = runtime.config, runtime.store

                @contextlib.asynccontextmanager
                async def guard(runtime: Runtime = runtime) -> AsyncIterator[None]:
                    # Store work only; the IMAP calls of the run happen outside _busy.
                    async with self._busy:
                        if self._runtime is not runtime:  # a reload switched the state
                            raise DigestError("the config was reloaded during the run; the "
                                              "rest of the replies are read on the next one")
                        yield

                self._job_started("replies")
                try:
                    report = await replies.process_replies(
                        config, store, stop=self.stop, corpus=runtime.fitted_corpus_index,
                        confirm=False, guard=guard,
                        prepare_corpus=runtime.refresh_corpus_index,
                        progress=lambda: self._job_started("replies"))
                    self._imap_hold = None  # logged in: a later refusal starts at 5 min again
                    if report.confirmations_pending:
                        await self._kick("dispatch")  # it sends the confirmations
                except StoreWriteError as exc:
                    log.error("replies: %s; trying again in %gs", exc,
                              _reply_poll_seconds(config))
                    failed = True
                except FATAL_ERRORS as exc:
                    self._fail(f"replies: the state database failed: {exc}")
                    break
                except replies.MailboxLoginError as exc:
                    self._hold_imap(exc)
                    continue
                except DigestError as exc:  # the mailbox is unreachable, a secret missing
                    log.error("replies: %s; trying again in %gs", exc,
                              _reply_poll_seconds(config))
                    failed = True
                except Exception:
                    log.exception("replies: this run failed; trying again later")
                    failed = True
                finally:
                    self._job_ended("replies")
                if failed:
                    await self._sleep(_reply_poll_seconds(config))
                    continue
                try:
                    await replies.wait_for_replies(config, self.stop)
                except Exception:
                    log.exception("replies: waiting for mail failed; polling again later")
                    await self._sleep(_reply_poll_seconds(config))
        finally:
            self._reply_task = None

    def _hold_imap(self, error: DigestError) -> None:
        """Hold IMAP logins after a refused one: 5 min, doubling up to 6 h, or until a reload."""
        delay = IMAP_HOLD_FIRST_SECONDS
        if self._imap_hold is not None:
            delay = min(self._imap_hold[1] * 2, IMAP_HOLD_MAX_SECONDS)
        self._imap_hold = (time.monotonic() + delay, delay)
        log.error("replies: %s; IMAP logins held for %s (the wait doubles up to %s; a config "
                  "reload tries again at once)", error, _span(delay),
                  _span(IMAP_HOLD_MAX_SECONDS))

    async def _imap_held(self) -> bool:
        """While logins are held, wait (a second at a time: a reload ends the hold); True if
        the reply loop should look again."""
        hold = self._imap_hold
        if hold is None or time.monotonic() >= hold[0]:
            return False
        await self._sleep(min(1.0, hold[0] - time.monotonic()))
        return True

    async def _sleep(self, seconds: float) -> None:
        """Wait ``seconds`` or until stopped."""
        try:
            await asyncio.wait_for(self.stop.wait(), timeout=seconds)
        except TimeoutError:
            pass

    # --- signals ---

    def _request_stop(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.stop.is_set():
            log.warning("daemon: second %s, exiting at once", name)
            logging.shutdown()
            os._exit(128 + signum)
        log.info("daemon: %s received, finishing the work in flight", name)
        self.stop.set()

    def _request_reload(self) -> None:
        log.info("daemon: SIGHUP received, reloading %s", self.config_path)
        task = asyncio.create_task(self._reload(), name="digest-reload")
        self._tasks[f"reload-{id(task)}"] = task
        task.add_done_callback(lambda t: self._tasks.pop(f"reload-{id(t)}", None))

    async def _reload(self) -> None:
        try:
            new = load_config(self.config_path)
            new.check_secrets()
        except DigestError as exc:
            log.error("daemon: config reload rejected, keeping the running config: %s", exc)
            return
        runtime = self.runtime
        if self._dispatching.locked() and new.state == runtime.config.state:
            # A dispatch is under way (at 100,000 subscribers, for many minutes): whom the
            # new config removes, or no longer finds due, is not claimed from now on. The
            # rest (SMTP, the schedule of the jobs) waits for the dispatch to end.
            runtime.reloaded = new
            log.info("daemon: the reloaded config applies to the rest of the dispatch in "
                     "progress (removed subscribers get no digest); the rest of it when the "
                     "dispatch ends")
        try:
            async with self._dispatching, self._busy:
                if self.stop.is_set():
                    return
                try:
                    self._apply(new)
                except DigestError as exc:
                    log.error("daemon: config reload rejected, keeping the running config: %s",
                              exc)
        finally:
            if runtime.reloaded is new:  # applied, rejected or stopping: the dispatch is over
                runtime.reloaded = None

    def _apply(self, new: Config) -> None:
        """Switch to a new, valid config: the next tick uses it."""
        self._said_schedule = False  # the next dispatch says the new schedule
        old_raw, runtime = self.config, self.runtime
        store = runtime.store
        lock = self.lock
        if new.state != runtime.config.state:
            lock = StateLock(new.state)
            lock.acquire("daemon")  # StateLocked rejects the reload
            try:
                store = Store(new.state)  # a StoreError rejects the reload
            except BaseException:
                lock.release()
                raise
        if new.smtp != old_raw.smtp:
            self._stop_sink()
            effective = self._start_sink(new)
        else:
            effective = replace(new, smtp=runtime.config.smtp)
        if store is not runtime.store:
            runtime.store.close()
            if self.lock is not None:
                self.lock.release()
            self.lock = lock
            self._runtime = Runtime(effective, store, lock=lock)
        else:
            runtime.config = effective
            runtime.smtp_hold = None  # a reload (the password fixed?) tries again at once
        self._imap_hold = None  # the same for the mailbox: the next login is tried at once
        self.config = new
        if self._scheduler is not None:
            old_intervals = self._intervals(old_raw)
            for name, seconds in self._intervals(new).items():
                if seconds != old_intervals[name]:
                    self._scheduler.reschedule_job(name, trigger="interval", seconds=seconds)
        self._start_replies()
        before = {s.email.lower(): s for s in old_raw.subscribers}
        after = {s.email.lower(): s for s in new.subscribers}
        added = sorted(after.keys() - before.keys())
        removed = sorted(before.keys() - after.keys())
        changed = sorted(e for e in after.keys() & before.keys() if after[e] != before[e])
        log.info("daemon: config reloaded: %d subscribers (added: %s; removed: %s; changed: %s)",
                 len(new.subscribers), ", ".join(added) or "none", ", ".join(removed) or "none",
                 ", ".join(changed) or "none")

    # --- stopping ---

    async def _drain(self) -> None:
        """Let the job in flight finish (up to STOP_GRACE_SECONDS), then cancel what is left.

        A dispatch whose deliveries wait on the reply to a message written whole
        is given up to ``stop_reply_wait`` more: cancelled, such a delivery
        leaves its digest claimed, and the resend on the next start is a second
        copy if the relay took the first (the dispatch bounds that wait itself).
        A cancelled job may leave a worker thread stuck in a network call;
        ``run`` then ends the process once the store is closed (``hard_exit``)
        rather than wait for that thread.
        """
        pending = [t for t in (*self._tasks.values(), self._reply_task)
                   if t is not None and not t.done()]
        if not pending:
            return
        _done, late = await asyncio.wait(pending, timeout=STOP_GRACE_SECONDS)
        dispatching = self._tasks.get("dispatch")
        deliveries = self._runtime.deliveries if self._runtime is not None else None
        if dispatching in late and deliveries is not None and deliveries.awaiting_replies():
            # + 1 s: the dispatch's own wait ends first, and it marks what it learnt
            await asyncio.wait({dispatching}, timeout=stop_reply_wait(
                self.runtime.config.smtp) + 1.0)
            late = {task for task in late if not task.done()}
        for task in late:
            task.cancel()
        self._stuck_at_stop = bool(late)
        if late:
            log.warning("daemon: the work in flight did not finish within %gs and was "
                        "cancelled; a digest it left claimed is resent on the next start",
                        STOP_GRACE_SECONDS)
            await asyncio.wait(late, timeout=1)

    def _start_sink(self, config: Config) -> Config:
        if config.smtp.sink is None:
            return config
        self.sink = LocalSink.from_config(config.smtp)
        self.sink.start()
        log.info("daemon: local mail sink on 127.0.0.1:%d writes messages to %s",
                 self.sink.port, self.sink.folder)
        return replace(config, smtp=self.sink.smtp_config())

    def _stop_sink(self) -> None:
        if self.sink is not None:
            self.sink.stop()
            self.sink = None


def _span(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds < 3600 else f"{seconds / 3600:g} h"


def _replies_configured(config: Config) -> bool:
    return config.imap is not None or config.maildir is not None


def _reply_poll_seconds(config: Config) -> float:
    source = config.imap or config.maildir
    return source.poll_seconds if source is not None else float(DEFAULT_REPLY_POLL_SECONDS)


def run_daemon(config_path: str) -> int:
    """``digest run``: a bad config or an unusable database raises (the CLI exits 1)."""
    config = load_config(config_path)
    daemon = Daemon(config_path, config)
    daemon.hard_exit = True
    code = asyncio.run(daemon.run())
    sys.stderr.flush()
    return code
