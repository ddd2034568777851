"""Fault-campaign area ``replies``: replies that must change nothing, and replies that break.

Every case is a raw message put into a real Maildir and read by the real
:func:`~digest.replies.process_replies` (one run for all cases, so a case that
escaped its unit would stop the others), against a real SQLite store holding
one sent digest per subscriber, with confirmations delivered to a real SMTP
sink on loopback. Each case comes from a subscriber of its own, so what
changed is known per case. The kinds:

- ``forged``: a display name that is another address, two From addresses or
  headers, a token of another subscriber; must change nothing, never answered;
- ``auto``: out-of-office replies without Auto-Submitted or Precedence (the
  ``X-Autoreply`` family, subjects in eleven languages) whose body says
  ``unsubscribe``; must change nothing, never answered;
- ``token``: unknown tokens, no token; must change nothing;
- ``malformed``: broken MIME, unknown charsets, bad base64, NUL and
  non-UTF-8 bytes in headers, no headers at all; may apply what is readable;
- ``huge``: a body of megabytes, 100,000 lines, one line of a megabyte, MIME
  nested thousands deep, many quoted levels; may apply what is readable;
- ``valid``: ordinary replies between the others, and one delivered twice;
  must apply exactly once.

How the counts of :class:`~digest.bench.faults.AreaResult` are read here:

- ``crashes``: the run raised, or a reply that must change nothing changed
  feedback or subscription state or was answered (a broken guarantee counts
  as a failure that escaped its boundary);
- ``data_lost``: a reply neither applied nor recorded in the store, or left
  unprocessed in the mailbox, or a valid reply whose commands were not applied;
- ``duplicates``: a valid reply applied twice, or two confirmations for it;
- ``unclear_errors``: a reply recorded as an error or a rejection without a
  readable reason (empty, a traceback, or a line break in it).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import format_datetime
from pathlib import Path

from ..config import Config, MaildirConfig, SmtpConfig, Subscriber
from ..mailer import LocalSink
from ..render import message_id_for
from ..store import Store, utc_now
from .faults import AreaResult
from .replies import DOMAIN, seed_digests

log = logging.getLogger(__name__)

# Subjects of auto-replies sent without Auto-Submitted or Precedence, one per language.
AUTO_SUBJECTS = ("Automatic reply: Paper digest", "Out of Office: Paper digest",
                 "Abwesenheitsnotiz: Paper digest", "Réponse automatique : Paper digest",
                 "Respuesta automática: Paper digest", "Risposta automatica: Paper digest",
                 "Automatisch antwoord: Paper digest", "Automatyczna odpowiedź: Paper digest",
                 "Автоматический ответ: Paper digest", "自动回复: Paper digest",
                 "自動応答: Paper digest", "자동 회신: Paper digest")
AUTO_HEADERS = (("X-Autoreply", "yes"), ("X-Autorespond", "Out of office"),
                ("X-Auto-Response-Suppress", "All"))


@dataclass
class Case:
    """One hostile reply: who it comes from, its bytes, what it may do."""

    name: str
    kind: str  # forged | auto | token | malformed | huge | valid
    subscriber: str  # whose state it could touch
    raw: bytes
    changes_nothing: bool  # True: no feedback, no state change, no confirmation
    expect_feedback: int = 0  # valid replies: feedback events it must add, exactly


def run(workdir: Path, quick: bool) -> AreaResult:
    """Run every case through one ``process_replies`` run, then a second (nothing new)."""
    result = AreaResult("replies")
    sink = LocalSink(workdir / "outbox")
    sink.start()
    try:
        _run(workdir, quick, result, sink)
    finally:
        sink.stop()
    return result


def _run(workdir: Path, quick: bool, result: AreaResult, sink: LocalSink) -> None:
    from ..replies import process_replies
    from ..replies.mailboxes import MaildirMailbox
    from ..replies.parse import reply_key
    from ..replies.process import readable

    subscribers = 80
    config = Config(
        path=workdir / "faults.toml", inbox=workdir / "inbox", state=workdir / "state.sqlite3",
        smtp=replace(SmtpConfig(), sender=f"Paper Digest <digest@{DOMAIN}>",
                     reply_to=f"digest+{{token}}@{DOMAIN}"),
        subscribers=tuple(Subscriber(f"reader{n}@example.org", f"Reader {n}")
                          for n in range(subscribers)),
        maildir=MaildirConfig(workdir / "replies", confirmations_per_hour=1000))
    config = replace(config, smtp=replace(sink.smtp_config(), attempts=1, retry_seconds=0.1))
    with Store(config.state) as store:
        tokens = dict(seed_digests(store, subscribers, day=utc_now().date() - timedelta(1)))
        cases = list(_cases(tokens, quick))
        result.cases = len(cases)
        before = {c.subscriber: _snapshot(store, c.subscriber) for c in cases}
        with MaildirMailbox(config.maildir) as mailbox:  # type: ignore[arg-type]
            for case in cases:
                mailbox.append(case.raw)
        try:
            asyncio.run(process_replies(config, store))
            again = asyncio.run(process_replies(config, store))
        except Exception as exc:  # the campaign counts what escaped, by design
            log.debug("replies area: the run raised", exc_info=True)
            result.crashes += 1
            result.notes.append(f"process_replies raised {type(exc).__name__}: {exc}"[:300])
            return
        if again.processed:
            result.data_lost += again.processed
            result.notes.append(f"{again.processed} replies were still waiting after the run")
        waiting = list((workdir / "replies" / "new").iterdir())
        if waiting:
            result.data_lost += len(waiting)
            result.notes.append(f"{len(waiting)} replies left in new/")
        for case in cases:
            try:  # the headers are enough for the key (and cheap for a nested message)
                headers = BytesParser(policy=policy.default).parsebytes(case.raw, headersonly=True)
                key = readable(reply_key(headers, case.raw))
            except (ValueError, TypeError, LookupError, UnicodeError, AttributeError):
                # what process does for a message it cannot read
                key = "sha256:" + hashlib.sha256(case.raw).hexdigest()
            record = store.reply_record(key) or store.reply_record(
                "sha256:" + hashlib.sha256(case.raw).hexdigest())
            after = _snapshot(store, case.subscriber)
            if record is None:
                result.data_lost += 1
                result.notes.append(f"{case.name}: neither applied nor recorded")
                continue
            if record.outcome in ("error", "rejected") and not _readable_reason(record.detail):
                result.unclear_errors += 1
                result.notes.append(f"{case.name}: {record.outcome} without a readable reason: "
                                    f"{record.detail[:120]!r}")
            if case.changes_nothing and after != before[case.subscriber]:
                result.crashes += 1
                was = before[case.subscriber]
                result.notes.append(
                    f"{case.name}: changed what it must not (feedback {was[0]} -> {after[0]}, "
                    f"state {'changed' if was[1] != after[1] else 'same'}, confirmations "
                    f"{was[2]} -> {after[2]})")
            if case.kind == "valid":
                added = after[0] - before[case.subscriber][0]
                if added < case.expect_feedback:
                    result.data_lost += 1
                    result.notes.append(f"{case.name}: {added} of {case.expect_feedback} "
                                        "feedback events applied")
                elif added > case.expect_feedback:
                    result.duplicates += 1
                    result.notes.append(f"{case.name}: applied twice ({added} events)")
                if after[2] - before[case.subscriber][2] > 1:
                    result.duplicates += 1
                    result.notes.append(f"{case.name}: answered more than once")


def _snapshot(store: Store, subscriber: str) -> tuple[int, str, int]:
    """(feedback events, subscription state, confirmations queued) of one subscriber."""
    state = store.subscriber_state(subscriber)
    since = utc_now() - timedelta(days=3650)
    return len(store.feedback_log(subscriber)), repr(state), store.confirmations_since(
        subscriber, since)


def _readable_reason(detail: str) -> bool:
    return bool(detail.strip()) and "Traceback" not in detail and "\n" not in detail


def _cases(tokens: dict[str, str], quick: bool) -> Iterator[Case]:
    emails = iter(tokens)

    def nxt() -> tuple[str, str]:
        email = next(emails)
        return email, tokens[email]

    # --- forged senders -------------------------------------------------------------
    for name, from_header in (
            ("display name is another address", "{email} <evil@example.net>"),
            ("quoted display name is another address", '"{email}" <evil@example.net>'),
            ("encoded display name is another address",
             "=?utf-8?q?{encoded}?= <evil@example.net>"),
            ("two addresses in From", "{email}, evil@example.net"),
            ("display name hides a second address", "{email} via <evil@example.net>")):
        email, token = nxt()
        value = from_header.format(email=email, encoded=email.replace("@", "=40"))
        yield Case(f"forged: {name}", "forged", email,
                   _reply(value, token, "unsubscribe\nlike 1 2 3"), True)
    email, token = nxt()
    yield Case("forged: two From headers", "forged", email,
               _reply(email, token, "unsubscribe", extra=(("From", "evil@example.net"),)), True)
    email, token = nxt()
    other, _ = nxt()
    yield Case("forged: another subscriber's token", "forged", email,
               _reply(other, token, "unsubscribe"), True)
    # --- auto-replies without Auto-Submitted or Precedence --------------------------
    for subject in AUTO_SUBJECTS:
        email, token = nxt()
        yield Case(f"auto: subject {subject.split(':')[0]}", "auto", email,
                   _reply(email, token, "I am away until Monday.\nunsubscribe",
                          subject=subject), True)
    for header_name, value in AUTO_HEADERS:
        email, token = nxt()
        yield Case(f"auto: {header_name}", "auto", email,
                   _reply(email, token, "unsubscribe", extra=((header_name, value),)), True)
    # --- tokens -----------------------------------------------------------------------
    email, _ = nxt()
    yield Case("token: unknown", "token", email, _reply(email, "zzzzzzzzzzzzzzzz", "unsubscribe"),
               True)
    email, _ = nxt()
    yield Case("token: none", "token", email, _reply(email, None, "unsubscribe"), True)
    email, token = nxt()
    yield Case("token: in References only, unknown", "token", email,
               _reply(email, None, "pause", extra=(
                   ("References", message_id_for("qqqqqqqqqqqqqqqq", f"d@{DOMAIN}")),)), True)
    # --- malformed MIME ---------------------------------------------------------------
    for name, body in _malformed():
        email, token = nxt()
        head = (f"From: {email}\r\nTo: digest+{token}@{DOMAIN}\r\n"
                f"Message-ID: <{hashlib.sha1(name.encode()).hexdigest()}@example.org>\r\n")
        yield Case(f"malformed: {name}", "malformed", email, head.encode() + body, False)
    yield Case("malformed: no headers at all", "malformed", "nobody@example.org",
               b"\x00\xff\xfe garbage\r\n\r\nunsubscribe", True)
    # --- huge and nested --------------------------------------------------------------
    scale = 1 if quick else 5
    email, token = nxt()
    yield Case("huge: megabytes of quote under the command", "huge", email,
               _reply(email, token, "like 2\n\nOn Thu, someone wrote:\n"
                      + "> a quoted line of text\n" * (40_000 * scale)), False)
    email, token = nxt()
    yield Case("huge: 100,000 short lines", "huge", email,
               _reply(email, token, "x\n" * (20_000 * scale) + "like 3\n"), False)
    email, token = nxt()
    yield Case("huge: one line of a megabyte", "huge", email,
               _reply(email, token, "like 4 " + "9" * (200_000 * scale)), False)
    email, token = nxt()
    yield Case("huge: 100 levels of quote marks", "huge", email,
               _reply(email, token, "skip 1\n" + "".join(">" * n + " line\n" for n in range(100))),
               False)
    email, token = nxt()
    yield Case("huge: MIME nested thousands deep", "huge", email,
               _nested(email, token, 2_000 if quick else 10_000), False)
    # --- valid replies between the others, one delivered twice ------------------------
    for n in range(3):
        email, token = nxt()
        raw = _reply(email, token, f"like {n + 1}\n\nThanks!", message_id=f"<valid{n}@example.org>")
        yield Case(f"valid: like {n + 1}", "valid", email, raw, False, expect_feedback=1)
        if n == 0:
            yield Case("valid: the same reply delivered twice", "valid", email, raw, False,
                       expect_feedback=1)


def _reply(sender: str, token: str | None, body: str, *, subject: str = "Re: Paper digest",
           extra: tuple[tuple[str, str], ...] = (), message_id: str | None = None) -> bytes:
    head = [f"From: {sender}",
            f"To: digest+{token}@{DOMAIN}" if token else f"To: digest@{DOMAIN}",
            f"Subject: {_encoded(subject)}", f"Date: {format_datetime(utc_now())}",
            f"Message-ID: {message_id or '<' + hashlib.sha1((sender + body[:200] + subject).encode()).hexdigest() + '@example.org>'}",
            "MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8",
            "Content-Transfer-Encoding: 8bit"]
    if token:
        head.append(f"In-Reply-To: {message_id_for(token, f'digest@{DOMAIN}')}")
    head += [f"{name}: {value}" for name, value in extra]
    return ("\r\n".join(head) + "\r\n\r\n" + body.replace("\n", "\r\n")).encode("utf-8")


def _encoded(subject: str) -> str:
    if subject.isascii():
        return subject
    message = EmailMessage()
    message["Subject"] = subject
    return message.as_string().split("Subject: ", 1)[1].split("\n\n", 1)[0].strip()


def _malformed() -> Iterator[tuple[str, bytes]]:
    yield "unknown charset", (b"Content-Type: text/plain; charset=x-klingon\r\n\r\nlike 1\r\n")
    yield "bad base64", (b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n"
                         b"!!!not base64 at all===\r\n")
    yield "boundary never closed", (b"Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\n"
                                    b"Content-Type: text/plain\r\n\r\nlike 2\r\n")
    yield "boundary missing", b"Content-Type: multipart/alternative\r\n\r\nlike 3\r\n"
    yield "NUL and non-UTF-8 in headers", (b"Subject: Re: \x00\xff\xfe digest\r\n"
                                           b"X-Note: \xed\xa0\x80 surrogate bytes\r\n\r\nlike 4\r\n")
    yield "invalid UTF-8 body", b"Content-Type: text/plain; charset=utf-8\r\n\r\nlike 5 \xff\xfe\r\n"
    yield "quoted-printable broken", (b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
                                      b"like 6=\r\n=ZZ=\r\n")
    yield "html only, broken markup", (b"Content-Type: text/html\r\n\r\n<div>like 7<blockquote>"
                                       b"<div><<<>>>&#xD800;&#99999999;</div>")
    yield "header folded forever", (b"Subject: Re:" + b"\r\n x" * 5_000 + b"\r\n\r\nlike 8\r\n")
    yield "bidi and control characters", ("\r\n\u202eekil 9\u202c\r\n\x1b[31mlike 9\r\n"
                                          .encode("utf-8"))
    yield "empty body", b"\r\n"


def _nested(sender: str, token: str, depth: int) -> bytes:
    """A multipart message nested ``depth`` levels deep, the command in the innermost part."""
    head = (f"From: {sender}\r\nTo: digest+{token}@{DOMAIN}\r\n"
            f"Message-ID: <nested{depth}.{token}@example.org>\r\nMIME-Version: 1.0\r\n")
    opening = "".join(f"Content-Type: multipart/mixed; boundary=\"b{n}\"\r\n\r\n--b{n}\r\n"
                      for n in range(depth))
    closing = "".join(f"\r\n--b{n}--\r\n" for n in reversed(range(depth)))
    return (head + opening + "Content-Type: text/plain\r\n\r\nlike 5\r\n" + closing).encode()
