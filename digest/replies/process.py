"""Processing replies: check who asks, apply the commands, confirm by email.

For each waiting message, in this order:

1. already recorded (same Message-ID, or same bytes without one)? Nothing
   changes; the message is only marked processed.
2. an auto-reply, a bounce or list mail? Recorded as ignored, never answered.
3. a forged sender (a display name that is another address, two From
   addresses)? Recorded as rejected and logged with the reason, never answered.
4. the sender must own a digest token the reply names (plus-addressed To, or
   In-Reply-To / References), and that digest must have been sent to them;
   else recorded as rejected and logged, nothing changes.
5. the commands of the new text (read against the digest's own text) are
   applied to the digest's frozen items, the reply is recorded and its
   confirmation queued, all in one transaction. Every reply from its owner is
   answered, a reply without a command too.
6. only then is the message marked processed in the mailbox (``\\Seen`` or
   ``cur/``); a crash before that leaves it waiting and step 1 makes the next
   run harmless. Confirmations queued in the store are sent after, and a
   confirmation that could not be sent is tried again on the next run.

Each reply is one unit: whatever it raises (broken MIME, bad charset, nesting,
...) is logged on one line, recorded with the outcome ``error`` and a readable
reason, and the run goes on. A confirmation that cannot be written or sent is
that confirmation's failure; the reply's commands stay applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
import unicodedata
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email import message_from_bytes
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid, parseaddr
from functools import cache
from typing import Any
from zoneinfo import ZoneInfo

import jinja2

from .. import rank
from ..config import MAX_LIST_ITEMS, MAX_TEXT_CHARS, Config, Subscriber
from ..errors import DigestError, SendError, StoreError
from ..library import import_attachments
from ..mailer import Mailer
from ..render import (
    EMAIL_POLICY,
    defuse_command_lines,
    one_line,
    plain_text,
    reply_address,
    template_root,
)
from ..store import DigestRow, ItemRow, Store, SubscriberState, utc_now
from .mailboxes import FETCH_BATCH, ImapMailbox, MailboxError, MaildirMailbox, open_mailbox
from .newtext import SentText
from .parse import (
    Command,
    ParsedReply,
    Problem,
    automatic_reason,
    digest_tokens,
    forgery_reason,
    header,
    headers,
    new_text,
    parse_message,
    parse_reply,
    reply_key,
    sender_address,
    sent_text,
    subject_of,
)

log = logging.getLogger("digest.replies")

CONFIRMATION_TEMPLATE = "confirmation.txt.j2"
HELP_TEMPLATE = "help.txt.j2"
NEAREST_LIKED = 3  # liked papers shown under "why N"
MAX_REFERENCES = 10  # message ids kept in a confirmation's References header
CONFIRMATION_ATTEMPTS = 5  # runs a confirmation is tried on before it is given up
MAX_UNREAD_SHOWN = 3  # lines quoted back in a confirmation of a reply with no command
MAX_DETAIL_CHARS = 500  # a recorded reason is cut to this length


@dataclass(frozen=True)
class ReplyOutcome:
    """What happened to one reply."""

    key: str  # its Message-ID (or sha256: of its bytes)
    sender: str
    outcome: str  # applied | ignored | rejected | duplicate | error
    detail: str = ""
    commands: tuple[str, ...] = ()
    confirmation: str = ""  # queued | rate-limited | none | ""


@dataclass
class ReplyReport:
    """One run of :func:`process_replies`.

    ``processed`` counts every message read; each is exactly one of applied,
    ignored (auto-replies, bounces, list mail, replies without a command),
    rejected (no token, an unknown token or another person's token),
    duplicates (already processed: nothing changed) and errors.
    """

    source: str = "none"  # imap | maildir | none
    processed: int = 0
    applied: int = 0
    ignored: int = 0
    errors: int = 0
    rejected: int = 0
    duplicates: int = 0
    commands: int = 0  # commands applied, over all replies
    confirmations_sent: int = 0
    confirmations_pending: int = 0  # queued but not delivered yet (tried again next run)
    rate_limited: int = 0  # confirmations not sent because of the hourly limit
    seconds: float = 0.0
    outcomes: list[ReplyOutcome] = field(default_factory=list)

    def add(self, outcome: ReplyOutcome) -> None:
        self.outcomes.append(outcome)
        self.processed += 1
        kind = outcome.outcome
        if kind == "applied":
            self.applied += 1
            self.commands += len(outcome.commands)
        elif kind == "ignored":
            self.ignored += 1
        elif kind == "rejected":
            self.rejected += 1
        elif kind == "duplicate":
            self.duplicates += 1
        else:
            self.errors += 1
        self.rate_limited += outcome.confirmation == "rate-limited"

    def summary(self) -> str:
        return (f"{self.processed} repl{'y' if self.processed == 1 else 'ies'} read from "
                f"{self.source}: {self.applied} applied ({self.commands} "
                f"command{'' if self.commands == 1 else 's'}), "
                f"{self.ignored} ignored, {self.rejected} rejected, {self.duplicates} already "
                f"processed, {self.errors} errors; {self.confirmations_sent} confirmations sent"
                + (f", {self.confirmations_pending} left for the next run"
                   if self.confirmations_pending else "")
                + (f", {self.rate_limited} held back by the hourly limit"
                   if self.rate_limited else ""))


# --- the entry points -----------------------------------------------------------


async def process_replies(config: Config, store: Store, *, now: datetime | None = None,
                          stop: asyncio.Event | None = None,
                          corpus: Callable[[], rank.CorpusIndex] | None = None,
                          confirm: bool = True,
                          guard: Callable[[], AbstractAsyncContextManager[object]] | None = None,
                          prepare_corpus: Callable[[], Awaitable[object]] | None = None,
                          progress: Callable[[], None] | None = None) -> ReplyReport:
    """Process every waiting reply once (IMAP or Maildir per config; neither: an empty report).

    Sends confirmations with ``Mailer(config.smtp)`` (which may point at the
    local sink). Raises :class:`MailboxError` when the mailbox cannot be read;
    a single bad reply never raises. ``stop`` set ends the run after the reply
    in flight (the replies done so far are marked processed; the rest wait).
    ``corpus`` gives a fitted corpus index for ``why`` (the daemon passes its
    cached one); without it one is fitted when a reply first asks why.
    ``confirm=False`` leaves the confirmations queued for the caller to send
    (the daemon sends them with its dispatch, under its one-sender lock).

    For the daemon: ``guard()`` is entered around each batch's store work and
    never around a network call (login, fetch, marking Seen happen outside
    it), so a stuck mailbox never holds up the scans and dispatches that take
    the same guard. ``prepare_corpus`` is awaited (outside the guard) before a
    batch is applied, so ``corpus`` then returns an index fitted off the event
    loop. ``progress`` is called after every step (a watchdog's sign of life).
    """
    started = time.perf_counter()
    now = now or utc_now()
    mailbox = open_mailbox(config.imap, config.maildir)
    report = ReplyReport(source="none" if mailbox is None else
                         "imap" if isinstance(mailbox, ImapMailbox) else "maildir")
    def stepped() -> None:
        if progress is not None:
            progress()

    if mailbox is not None:
        processor = _Processor(config, store, now, corpus)
        await asyncio.to_thread(mailbox.open)
        stepped()
        try:
            ids = await asyncio.to_thread(mailbox.waiting_ids)
            stepped()
            for start in range(0, len(ids), FETCH_BATCH):
                batch = await asyncio.to_thread(mailbox.fetch, ids[start:start + FETCH_BATCH])
                stepped()
                if batch and prepare_corpus is not None:
                    await prepare_corpus()  # a "why" then finds the index fitted off-loop
                done: list[str] = []
                async with guard() if guard is not None else contextlib.nullcontext():
                    for waiting in batch:
                        if stop is not None and stop.is_set():
                            break
                        report.add(processor.handle(waiting.raw))
                        done.append(waiting.id)
                        stepped()
                await asyncio.sleep(0)  # let signals and other tasks in between batches
                # Committed: only now is the batch marked processed in the mailbox.
                await asyncio.to_thread(mailbox.done, done)
                stepped()
                if stop is not None and stop.is_set():
                    log.info("replies: stopping; %d replies left for the next run",
                             len(ids) - report.processed)
                    break
        finally:
            await asyncio.to_thread(mailbox.close)
    if confirm:
        sent, pending = await send_confirmations(config, store)
    else:
        async with guard() if guard is not None else contextlib.nullcontext():
            sent, pending = 0, len(store.pending_confirmations())
    report.confirmations_sent, report.confirmations_pending = sent, pending
    report.seconds = time.perf_counter() - started
    if report.processed or sent:
        log.info("replies: %s", report.summary())
    return report


async def wait_for_replies(config: Config, stop: asyncio.Event) -> None:
    """Return when new mail may be waiting, after at most the poll interval, or when stopped.

    IMAP: IDLE where the server has it (with a timeout of ``poll_seconds``),
    else a plain wait. Maildir: a look at ``new/`` every second. A mailbox that
    cannot be reached is logged and waited out, never raised.
    """
    source = config.imap or config.maildir
    seconds = source.poll_seconds if source is not None else 60.0
    deadline = time.monotonic() + seconds
    mailbox = open_mailbox(config.imap, config.maildir)
    if isinstance(mailbox, ImapMailbox) and mailbox.config.idle:
        try:
            await asyncio.to_thread(_idle, mailbox, seconds, stop.is_set)
        except MailboxError as exc:
            log.warning("replies: %s; trying again in %.0f s", exc, seconds)
        else:
            return
    while not stop.is_set():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        if isinstance(mailbox, MaildirMailbox) and mailbox.has_new():
            return
        try:
            await asyncio.wait_for(stop.wait(), timeout=min(1.0, remaining))
        except TimeoutError:
            pass


def _idle(mailbox: ImapMailbox, seconds: float, stopped: Callable[[], bool]) -> None:
    mailbox.open()
    try:
        started = time.monotonic()
        if mailbox.waiting_ids():  # arrived since the last run, before this IDLE began
            return
        if not mailbox.wait_for_news(seconds, stopped):
            # No IDLE on this server (or nothing came): wait out the rest of the interval.
            while not stopped() and time.monotonic() - started < seconds:
                time.sleep(min(1.0, seconds - (time.monotonic() - started)))
    finally:
        mailbox.close()


async def send_confirmations(config: Config, store: Store) -> tuple[int, int]:
    """Send the confirmations queued in the store; return (sent, still pending)."""
    pending = store.pending_confirmations()
    if not pending:
        return 0, 0
    sent = 0
    smtp = config.smtp
    async with Mailer(smtp, attempts=min(smtp.attempts, 2),
                      base_delay=smtp.retry_seconds) as mailer:
        for row in pending:
            try:
                message = message_from_bytes(row.message, policy=EMAIL_POLICY)
                await mailer.send(message)
            except SendError as exc:
                give_up = exc.permanent or row.attempts + 1 >= CONFIRMATION_ATTEMPTS
                store.mark_confirmation(row.id, sent=False, error=str(exc), give_up=give_up)
                log.warning("subscriber %s: confirmation %s: %s", row.subscriber,
                            "given up" if give_up else "not sent yet", exc)
                if not exc.permanent:
                    break  # the server is unwell: the rest waits for the next run
                continue
            except Exception as exc:  # one confirmation's failure is its own
                reason = readable(f"cannot be sent: {type(exc).__name__}: {exc}")
                store.mark_confirmation(row.id, sent=False, error=reason, give_up=True)
                log.error("subscriber %s: confirmation given up: %s", row.subscriber, reason)
                log.debug("confirmation %s: the failure in full", row.id, exc_info=True)
                continue
            store.mark_confirmation(row.id, sent=True)
            sent += 1
    return sent, len(store.pending_confirmations())


# --- one reply -----------------------------------------------------------------


@dataclass
class _Step:
    """One command of a reply as written, and what it did (for the confirmation)."""

    written: str
    done: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # understood but not applied: why
    whys: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Applied:
    """What applying a reply's commands did, for the record and the confirmation."""

    steps: list[_Step] = field(default_factory=list)  # in the order written
    done: list[str] = field(default_factory=list)  # lines for "Done:"
    refused: list[Problem] = field(default_factory=list)  # commands understood but not applied
    whys: list[dict[str, Any]] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)  # the commands applied, normalised
    help: bool = False
    unsubscribed: bool = False  # this reply unsubscribed them (first time)
    quiet: bool = False  # nothing worth a confirmation (a repeated unsubscribe)


class _Processor:
    """Processes replies one by one against the store, for one run."""

    def __init__(self, config: Config, store: Store, now: datetime,
                 corpus: Callable[[], rank.CorpusIndex] | None = None):
        self.config = config
        self.store = store
        self.now = now
        self.corpus = corpus
        self._explainer: _Explainer | None = None
        self._sent: dict[int, SentText] = {}

    def handle(self, raw: bytes) -> ReplyOutcome:
        """One reply, one unit: whatever it raises is recorded as its failure, never raised
        (except a :class:`StoreError`: the database itself is broken, which stops the run)."""
        key = sender = ""
        try:
            message = parse_message(raw)
            key = readable(reply_key(message, raw))
            sender = readable(sender_address(message))
            return self._handle(message, raw, key, sender)
        except StoreError:
            raise
        except Exception as exc:  # a reply's failure stays in that reply
            detail = readable(f"cannot be processed: {type(exc).__name__}: {exc}")
            key = readable(key) if key else "sha256:" + hashlib.sha256(raw).hexdigest()
            sender = readable(sender)
            log.error("reply %s from %s: %s", key, sender or "(unknown sender)", detail)
            log.debug("reply %s: the failure in full", key, exc_info=True)
            if self.store.reply_record(key) is None:
                self.store.record_reply(key, sender=sender, outcome="error", detail=detail,
                                        at=self.now)
            return ReplyOutcome(key, sender, "error", detail)

    def _handle(self, message: EmailMessage, raw: bytes, key: str, sender: str) -> ReplyOutcome:
        if self.store.reply_record(key) is not None:
            log.info("reply %s from %s: already processed; nothing changes", key, sender)
            return ReplyOutcome(key, sender, "duplicate", "already processed")
        automatic = automatic_reason(message)
        if automatic is not None:
            return self._record(key, sender, "ignored", f"not answered: {automatic}")
        forged = forgery_reason(message)
        if forged is not None:
            log.warning("reply %s from %s: rejected, a forged sender: %s", key,
                        sender or "(no sender)", forged)
            return self._record(key, sender, "rejected", f"forged sender: {forged}")
        digest, why_not = self._digest_for(message, sender)
        if digest is None:
            log.warning("reply %s from %s: rejected: %s", key, sender or "(no sender)", why_not)
            return self._record(key, sender, "rejected", why_not)
        parsed = parse_reply(new_text(message, self._sent_text(digest)), subject_of(message))
        items = self.store.digest_items(digest.id)
        with self.store.transaction() as db:
            if self.store.reply_record(key) is not None:  # another process was quicker
                return ReplyOutcome(key, sender, "duplicate", "already processed")
            applied = self._apply(db, digest, items, parsed)
            lines, taken = import_attachments(self.store, digest.subscriber, message, db=db)
            if lines:  # an attached library file is confirmed like a command of its own
                step = _Step("(the attached library file)")
                step.done = lines
                applied.steps.append(step)
            applied.done, applied.commands = applied.done + lines, applied.commands + taken
            outcome = "applied" if applied.commands else "ignored"
            detail = "" if applied.commands else "no command"
            self.store.record_reply(key, sender=sender, outcome=outcome, detail=detail,
                                    digest_id=digest.id, commands=applied.commands,
                                    at=self.now, db=db)
            confirmation = self._queue_confirmation(db, message, key, sender, digest, parsed,
                                                    applied)
        log.info("subscriber %s: reply %s to the digest of %s: %s", sender, key,
                 digest.local_date, ", ".join(applied.commands) or "no command")
        return ReplyOutcome(key, sender, outcome, detail, tuple(applied.commands), confirmation)

    def _sent_text(self, digest: DigestRow) -> SentText:
        """What the answered digest said (read once per digest and run)."""
        if digest.id not in self._sent:
            self._sent[digest.id] = sent_text(digest.message)
        return self._sent[digest.id]

    def _record(self, key: str, sender: str, outcome: str, detail: str) -> ReplyOutcome:
        if not self.store.record_reply(key, sender=sender, outcome=outcome, detail=detail,
                                       at=self.now):
            return ReplyOutcome(key, sender, "duplicate", "already processed")
        log.info("reply %s from %s: %s (%s)", key, sender or "(no sender)", outcome, detail)
        return ReplyOutcome(key, sender, outcome, detail)

    def _digest_for(self, message: EmailMessage, sender: str) -> tuple[DigestRow | None, str]:
        """The digest this reply answers and the sender owns, or None and why not."""
        tokens = digest_tokens(message)
        if not sender:
            return None, "no From address"
        if not tokens:
            return None, "no digest token (not a reply to a digest)"
        foreign = None
        for token in tokens:
            digest = self.store.digest_by_token(token)
            if digest is None:
                continue
            if digest.subscriber != sender:
                foreign = digest
                continue
            if digest.status != "sent":
                continue
            return digest, ""
        if foreign is not None:
            return None, (f"the token belongs to a digest sent to {foreign.subscriber}, "
                          f"not to {sender}")
        return None, "unknown digest token"

    # --- applying --------------------------------------------------------------

    def _apply(self, db: Any, digest: DigestRow, items: list[ItemRow],
               parsed: ParsedReply) -> _Applied:
        store = self.store
        sub = digest.subscriber
        applied = _Applied()
        state = store.subscriber_state(sub)
        by_position = {item.position: item for item in items}
        signals = store.signals_for(sub, [item.paper_id for item in items])
        titles = {p.id: p.title for p in store.papers_by_id(i.paper_id for i in items).values()}
        only_repeat_unsubscribe = True
        for command in parsed.commands:
            if not (command.name == "unsubscribe" and state.unsubscribed):
                only_repeat_unsubscribe = False
            done_mark, refused_mark = len(applied.done), len(applied.refused)
            step = _Step(command.text)
            applied.steps.append(step)
            state = self._apply_one(db, digest, command, state, by_position, signals, titles,
                                    applied)
            step.done = applied.done[done_mark:]
            step.refused = [p.message for p in applied.refused[refused_mark:]]
        # "why" answers after the likes of the same reply (read inside this transaction).
        for step, command in zip(applied.steps, parsed.commands, strict=True):
            if command.name == "why":
                answer = self._why(digest, items, command)
                step.whys = answer["answers"]
                applied.whys.append(answer)
        if state.bouncing:  # a reply from the address proves it receives mail
            store.update_subscriber_state(sub, bouncing_since=None, bounce_reason=None, db=db)
        applied.quiet = bool(parsed.commands) and only_repeat_unsubscribe
        return applied

    def _apply_one(self, db: Any, digest: DigestRow, command: Command, state: SubscriberState,
                   by_position: dict[int, ItemRow], signals: dict[str, str],
                   titles: dict[str, str], applied: _Applied) -> SubscriberState:
        """Apply one command; its effects go to ``applied``; returns the state after it."""
        store, sub = self.store, digest.subscriber
        if command.name in ("like", "skip"):
            positions, refused = _positions(command, by_position, signals)
            applied.refused += refused
            for position in positions:
                item = by_position[position]
                store.add_feedback(sub, item.paper_id, command.name, source="reply",
                                   digest_id=digest.id, db=db)
                signals[item.paper_id] = command.name
            if positions:
                verb = "Liked" if command.name == "like" else "Skipped"
                applied.done += [f"{verb} paper {p}: {_short(titles.get(by_position[p].paper_id, ''))}"
                                 for p in positions]
                applied.commands.append(f"{command.name} {_numbers(positions)}")
        elif command.name == "why":
            applied.commands.append(f"why {_numbers(command.items)}")
        elif command.name == "help":
            applied.help = True
            applied.done.append("The list of commands is at the end of this email.")
            applied.commands.append("help")
        else:
            state = self._apply_state(db, state, command, applied)
        return state

    def _apply_state(self, db: Any, state: SubscriberState, command: Command,
                     applied: _Applied) -> SubscriberState:
        store, sub = self.store, state.subscriber
        name = command.name
        if name == "pause":
            if command.days is None:
                state = store.update_subscriber_state(sub, paused=True, paused_until=None, db=db)
                applied.done.append("Paused your digests until you write “resume”.")
                applied.commands.append("pause")
            else:
                until = self._local_today(sub) + timedelta(days=command.days)
                state = store.update_subscriber_state(sub, paused=True, paused_until=until, db=db)
                applied.done.append(f"Paused your digests for {command.days} days: "
                                    f"they start again on {until:%a %d %b %Y}.")
                applied.commands.append(f"pause {command.days} days")
        elif name == "resume":
            was = ("unsubscribed" if state.unsubscribed else "paused" if state.paused else "")
            state = store.update_subscriber_state(sub, paused=False, paused_until=None,
                                                  unsubscribed_at=None, db=db)
            applied.done.append("Resumed your digests." if was else
                                "Your digests were not paused; nothing to resume.")
            applied.commands.append("resume")
        elif name == "unsubscribe":
            if state.unsubscribed:
                applied.done.append("You were already unsubscribed.")
            else:
                state = store.update_subscriber_state(
                    sub, unsubscribed_at=self.now.isoformat(timespec="seconds"), db=db)
                applied.unsubscribed = True
                applied.done.append("Unsubscribed: you will get no more digests.")
            applied.commands.append("unsubscribe")
        elif name == "time":
            state = store.update_subscriber_state(sub, send_at=command.value, db=db)
            zone = self._subscriber(sub).timezone.key
            applied.done.append(f"Your digest now comes at {command.value} ({zone}).")
            applied.commands.append(f"time {command.value}")
        elif name == "size":
            state = store.update_subscriber_state(sub, max_papers=command.number, db=db)
            applied.done.append(f"Your digests now hold up to {command.number} papers.")
            applied.commands.append(f"size {command.number}")
        elif name in ("interest-add", "interest-remove"):
            phrase = one_line(command.value)
            key = phrase.casefold()
            added = [p for p in state.interests_added if p.casefold() != key]
            removed = [p for p in state.interests_removed if p.casefold() != key]
            if name == "interest-add":
                # The config's own bounds: a reply cannot grow a profile past what the file may.
                if len(phrase) > MAX_TEXT_CHARS:
                    applied.refused.append(Problem(
                        command.text, f"an interest is a phrase of at most {MAX_TEXT_CHARS} "
                                      f"characters (this one has {len(phrase)})"))
                    return state
                current = {p.casefold() for p in self._interests(state)}
                if key not in current and len(current) >= MAX_LIST_ITEMS:
                    applied.refused.append(Problem(
                        command.text, f"you have {len(current)} interests, the most there can "
                                      "be; remove one first (“interest remove PHRASE”)"))
                    return state
                added.append(phrase)
                applied.done.append(f"Added the interest “{phrase}”.")
                applied.commands.append(f"interest add {phrase}")
            else:
                current = {p.casefold() for p in self._interests(state)}
                if key not in current:
                    applied.refused.append(Problem(command.text,
                                                   f"“{phrase}” is not one of your interests"))
                    return state
                removed.append(phrase)
                applied.done.append(f"Removed the interest “{phrase}”.")
                applied.commands.append(f"interest remove {phrase}")
            state = store.update_subscriber_state(sub, interests_added=added,
                                                  interests_removed=removed, db=db)
        return state

    def _subscriber(self, email: str) -> Subscriber:
        sub = self.config.subscriber(email)
        return sub if sub is not None else Subscriber(email=email, name=email.split("@")[0],
                                                      timezone=ZoneInfo("UTC"))

    def _interests(self, state: SubscriberState) -> list[str]:
        removed = {p.casefold() for p in state.interests_removed}
        return [p for p in (*self._subscriber(state.subscriber).interests, *state.interests_added)
                if p.casefold() not in removed]

    def _local_today(self, email: str) -> Any:
        return self.now.astimezone(self._subscriber(email).timezone).date()

    # --- why -----------------------------------------------------------------

    def _why(self, digest: DigestRow, items: list[ItemRow], command: Command) -> dict[str, Any]:
        if self._explainer is None:
            self._explainer = _Explainer(self.config, self.store, self.corpus)
        return self._explainer.explain(digest, items, command.items)

    # --- confirmation --------------------------------------------------------

    def _queue_confirmation(self, db: Any, message: EmailMessage, key: str, sender: str,
                            digest: DigestRow, parsed: ParsedReply, applied: _Applied) -> str:
        if applied.quiet:
            return "none"  # a repeated unsubscribe: they were told once
        limit = self._confirmations_per_hour()
        hour_ago = self.now - timedelta(hours=1)
        if not applied.unsubscribed and self.store.confirmations_since(sender, hour_ago) >= limit:
            log.info("subscriber %s: confirmation of %s held back (%d per hour at most)",
                     sender, key, limit)
            return "rate-limited"
        try:
            confirmation = build_confirmation(self.config, message, sender, digest, parsed,
                                              applied, now=self.now).as_bytes()
        except Exception as exc:  # the confirmation's failure is its own
            log.error("subscriber %s: confirmation of reply %s cannot be written: %s", sender,
                      key, readable(f"{type(exc).__name__}: {exc}"))
            log.debug("confirmation of %s: the failure in full", key, exc_info=True)
            return "failed"
        self.store.queue_confirmation(sender, key, confirmation, at=self.now, db=db)
        return "queued"

    def _confirmations_per_hour(self) -> int:
        source = self.config.imap or self.config.maildir
        return source.confirmations_per_hour if source is not None else 5


def _positions(command: Command, by_position: dict[int, ItemRow],
               signals: dict[str, str]) -> tuple[list[int], list[Problem]]:
    """The digest positions a like/skip names, and what could not be applied."""
    refused: list[Problem] = []
    wanted: list[int] = []
    if command.every:
        wanted += sorted(by_position)
    if command.rest:
        wanted += [p for p in sorted(by_position)
                   if signals.get(by_position[p].paper_id) != "like"]
    for number in command.items:
        if number in by_position:
            wanted.append(number)
        else:
            refused.append(Problem(command.text, f"this digest has no paper {number} (it has "
                                   f"{len(by_position)})" if by_position else
                                   "this digest had no papers"))
    return list(dict.fromkeys(wanted)), refused


def _numbers(positions: Sequence[int]) -> str:
    return " ".join(str(p) for p in positions)


def _short(title: str, limit: int = 70) -> str:
    title = one_line(title)
    return title if len(title) <= limit else title[: limit - 1].rstrip() + "…"


# --- why N ---------------------------------------------------------------------


class _Explainer:
    """Answers ``why N``: the item's stored reason and score, and what the model says now.

    ``rank.explain`` gives the strongest shared terms and the nearest liked
    papers. The corpus index comes from ``corpus`` (the daemon's cached one) or
    is fitted once per run, only when a reply asks why.
    """

    def __init__(self, config: Config, store: Store,
                 corpus: Callable[[], rank.CorpusIndex] | None = None):
        self.config = config
        self.store = store
        self.index = corpus() if corpus is not None else rank.CorpusIndex.fit(store.all_papers())

    def explain(self, digest: DigestRow, items: list[ItemRow],
                numbers: Sequence[int]) -> dict[str, Any]:
        sub = self.config.subscriber(digest.subscriber) or Subscriber(digest.subscriber,
                                                                      digest.subscriber)
        profile = rank.build_profile(self.store, sub)
        by_position = {item.position: item for item in items}
        answers: list[dict[str, Any]] = []
        for number in numbers:
            item = by_position.get(number)
            if item is None:
                answers.append({"number": number, "missing": True})
                continue
            paper = self.store.papers_by_id([item.paper_id]).get(item.paper_id)
            explanation = self._explain(profile, item.paper_id)
            nearest = [] if explanation is None else [
                {"title": _short(plain_text(n.title)), "similarity": n.similarity}
                for n in explanation.nearest_liked[:NEAREST_LIKED]
                if n.paper_id != item.paper_id and n.similarity > 0]
            answers.append({
                "number": number,
                "missing": False,
                # LaTeX as text, as in the digest; the ranking's raw score is never shown (its
                # scale means nothing to a reader): the relevance level when the model has one.
                "title": _short(plain_text(paper.title) if paper else item.paper_id, 90),
                "reason": plain_text(item.reason),
                "level": (explanation.level or "") if explanation is not None else "",
                "explore": item.explore,
                "extra": ", ".join(plain_text(term) for term, _ in
                                   explanation.shared_terms[:5]) if explanation is not None
                         else "",
                "nearest": nearest,
            })
        return {"answers": answers}

    def _explain(self, profile: rank.Profile, paper_id: str) -> rank.Explanation | None:
        if paper_id not in self.index:
            return None
        try:
            return rank.explain(self.index, profile, paper_id, settings=self.config.ranking)
        except DigestError as exc:
            log.warning("why: cannot explain %s: %s", paper_id, exc)
            return None


# --- the confirmation email ----------------------------------------------------


def build_confirmation(config: Config, reply: EmailMessage, sender: str, digest: DigestRow,
                       parsed: ParsedReply, applied: _Applied, *, now: datetime) -> EmailMessage:
    """A threaded answer to the reply: each command in the order written with what it did,
    then what was not understood; a reply with no command is told so, with at most
    :data:`MAX_UNREAD_SHOWN` of its near-commands quoted back (escaped; how many more were
    left out), prose only thanked for, and a pointer to help."""
    smtp = config.smtp
    sub = config.subscriber(sender)
    shown_problems = parsed.problems[:8]
    nothing = not parsed.commands
    # Prose ("Thanks!", a signature's name) is acknowledged, never quoted back as unreadable.
    attempts = [p for p in parsed.unread if p.message] if nothing else []
    # Hints repeat the subscriber's words ("did you mean ..."), so they are escaped too.
    unread = [{"text": escaped(p.text), "hint": escaped(p.message, 240)}
              for p in attempts[:MAX_UNREAD_SHOWN]]
    text = _environment().get_template(CONFIRMATION_TEMPLATE).render(
        name=escaped(sub.name) if sub else sender.split("@")[0],
        day=f"{digest.local_date:%a %d %b %Y}",
        steps=[{"written": escaped(step.written), "done": step.done, "refused": step.refused,
                "whys": step.whys} for step in applied.steps],
        problems=[Problem(escaped(p.text), escaped(p.message, 240)) for p in shown_problems],
        more_problems=len(parsed.problems) - len(shown_problems),
        prose=bool(parsed.prose),
        unread=unread,
        unread_left_out=len(attempts) - len(unread),
        help=applied.help,
        help_text=help_text() if applied.help else "",
        unsubscribed=applied.unsubscribed,
        from_subject=parsed.from_subject,
        nothing=nothing,
    )
    message = EmailMessage(policy=EMAIL_POLICY)
    subject = subject_of(reply) or "your paper digest"
    message["Subject"] = one_line(subject if subject.lower().startswith("re:") else
                                  f"Re: {subject}")
    message["From"] = one_line(smtp.sender)
    message["To"] = sender
    message["Date"] = format_datetime(now)
    domain = parseaddr(smtp.sender)[1].rpartition("@")[2] or "localhost"
    message["Message-ID"] = make_msgid(f"confirm.{secrets.token_hex(4)}", domain=domain)
    message["Reply-To"] = reply_address(smtp, digest.token)
    reply_id = header(reply, "Message-ID")
    references = " ".join(headers(reply, "References")).split() or [digest.message_id]
    if reply_id:
        message["In-Reply-To"] = reply_id
        references.append(reply_id)
    if digest.message_id not in references:
        references.insert(0, digest.message_id)
    kept = references[:1] + references[1:][-(MAX_REFERENCES - 1):]
    message["References"] = " ".join(dict.fromkeys(kept))
    message["Auto-Submitted"] = "auto-replied"
    message["X-Auto-Response-Suppress"] = "All"
    message.set_content(defuse_command_lines(text))
    return message


def escaped(text: str, limit: int = 80) -> str:
    """A subscriber's text made safe to show in a line of ours: one line, no control or
    bidirectional-override characters (shown as ``\\uXXXX``), at most ``limit`` characters."""
    shown = "".join(ch if ch.isprintable() and unicodedata.category(ch) != "Cf" else
                    f"\\u{ord(ch):04x}" for ch in one_line(text))
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


def readable(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    """Text fit for a log line and the database: one line, no lone surrogates, bounded."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    text = " ".join(text.replace("\x00", "\\x00").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def help_text() -> str:
    return defuse_command_lines(_environment().get_template(HELP_TEMPLATE).render())


@cache
def _environment() -> jinja2.Environment:
    def load(name: str) -> tuple[str, str, Callable[[], bool]]:
        try:
            source = (template_root() / name).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise jinja2.TemplateNotFound(name) from None
        return source, name, lambda: True

    return jinja2.Environment(loader=jinja2.FunctionLoader(load), autoescape=False,
                              undefined=jinja2.StrictUndefined, trim_blocks=True,
                              lstrip_blocks=True, keep_trailing_newline=True)
