"""Replies end to end on real servers: digests sent through aiosmtpd, replies APPENDed to a
private Dovecot, processed, feedback checked in SQLite and confirmations caught by aiosmtpd."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from dataclasses import dataclass, replace
from email import message_from_bytes, policy
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path

import pytest
from imapclient import IMAPClient

from digest.cli import main
from digest.config import Config, MaildirConfig, load_config
from digest.daemon import effective_subscriber
from digest.replies import ReplyReport, parse_text, process_replies, wait_for_replies
from digest.replies.mailboxes import ImapMailbox
from digest.store import Store

from .dovecot_helpers import (  # noqa: F401  (fixtures)
    PASSWORD_ENV,
    Dovecot,
    dovecot_fixture,
    dovecot_tls_fixture,
)
from .smtp_helpers import (  # noqa: F401  (smtp_server_fixture provides the smtp_server fixture)
    SmtpServer,
    StartServer,
    smtp_server_fixture,
)
from .test_pipeline import digests_by_recipient, make_inbox, pipeline_config

IMAP_TABLE = """
[imap]
host = "127.0.0.1"
port = {port}
security = "none"
username = "digest"
password_env = "DIGEST_TEST_IMAP_PASSWORD"
poll_seconds = 3
confirmations_per_hour = {limit}
"""


@dataclass
class World:
    """Two subscribers who got a digest each; a mailbox their replies go to."""

    tmp: Path
    config_path: Path
    smtp: SmtpServer
    dovecot: Dovecot
    digests: dict[str, EmailMessage]

    def config(self) -> Config:
        return load_config(self.config_path)

    def store(self) -> Store:
        return Store(self.tmp / "var" / "state.sqlite3")

    def client(self) -> IMAPClient:
        client = IMAPClient("127.0.0.1", port=self.dovecot.port, ssl=False, timeout=10)
        client.login(self.dovecot.user, self.dovecot.password)
        client.select_folder("INBOX")
        return client

    def append(self, *raws: bytes) -> None:
        client = self.client()
        for raw in raws:
            client.append("INBOX", raw)
        client.logout()

    def unseen(self) -> list[int]:
        client = self.client()
        try:
            return list(client.search(["UNSEEN"]))
        finally:
            client.logout()

    def process(self, config: Config | None = None) -> ReplyReport:
        with self.store() as store:
            return asyncio.run(process_replies(config or self.config(), store))

    def confirmations(self) -> list[EmailMessage]:
        return [m.message for m in self.smtp.messages
                if str(m.message.get("Auto-Submitted", "")) == "auto-replied"]

    def feedback(self, email: str = "alice@example.org") -> list[tuple[int, str]]:
        """(position in the digest answered, signal) of every feedback event, in order."""
        with self.store() as store:
            digest = store.digests_of(email)[0]
            positions = {i.paper_id: i.position for i in store.digest_items(digest.id)}
            return [(positions[e.paper_id], e.signal) for e in store.feedback_log(email)]


def make_world(tmp_path: Path, smtp_server: StartServer, dovecot: Dovecot,
               limit: int = 20) -> World:
    server = smtp_server()
    make_inbox(tmp_path)
    config = pipeline_config(tmp_path, server)
    config.write_text(config.read_text() + IMAP_TABLE.format(port=dovecot.port, limit=limit))
    assert main(["--config", str(config), "ingest"]) == 0
    assert main(["--config", str(config), "send", "--force"]) == 0
    digests = digests_by_recipient(server)
    assert set(digests) == {"alice@example.org", "bob@example.org"}
    return World(tmp_path, config, server, dovecot, digests)


def digest_text(digest: EmailMessage) -> str:
    part = digest.get_body(("plain",))
    assert part is not None
    return str(part.get_content())


def quoted(text: str) -> str:
    return "\n".join(("> " + line).rstrip() for line in text.splitlines())


def reply(digest: EmailMessage, body: str, *, style: str = "plain",
          sender: str = "Alice <alice@example.org>", subject: str | None = None,
          message_id: str | None = None, to: str | None = None, thread: bool = True,
          headers: dict[str, str] | None = None) -> bytes:
    """A reply to ``digest`` as a given mail client would write it."""
    original = digest_text(digest)
    who = str(digest["From"])
    quotes = {
        "plain": "",
        "gmail": f"\n\nOn Thu, Mar 12, 2026 at 8:00 AM {who} wrote:\n{quoted(original)}\n",
        "outlook": ("\n\nBest regards,\nAlice\n\n-----Original Message-----\n"
                    f"From: {who}\nSent: Thursday, March 12, 2026 8:00 AM\n"
                    f"To: Alice <alice@example.org>\nSubject: {digest['Subject']}\n\n{original}"),
        "apple": f"\n\n> On 12 Mar 2026, at 08:00, {who} wrote:\n> \n{quoted(original)}\n",
        "german": ("\n\nViele Grüße\nAlice\n\nAm Do., 12. März 2026 um 08:00 Uhr schrieb "
                   f"{who}:\n{quoted(original)}\n"),
        "french": ("\n\nCordialement,\nAlice\n\nLe jeu. 12 mars 2026 à 08:00, "
                   f"{who} a écrit :\n{quoted(original)}\n"),
        "signature": "\n-- \nDr. Alice Example\nStop by room 3 any time\nMore 2 come\n",
    }
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to if to is not None else str(digest["Reply-To"])
    message["Subject"] = subject if subject is not None else f"Re: {digest['Subject']}"
    message["Message-ID"] = message_id or make_msgid("reply", domain="example.org")
    if thread:
        message["In-Reply-To"] = str(digest["Message-ID"])
        message["References"] = str(digest["Message-ID"])
    for name, value in (headers or {}).items():
        message[name] = value
    if style == "html":
        message.set_content(
            f"<html><body><div dir='ltr'>{body.replace(chr(10), '<br>')}</div><br>"
            f"<div class='gmail_quote'><div>On Thu, {who} wrote:<br></div>"
            f"<blockquote>{digest.get_body(('html',)).get_content()}</blockquote></div>"  # type: ignore[union-attr]
            "</body></html>", subtype="html")
    else:
        message.set_content(body + quotes[style])
    return message.as_bytes()


# --- reading the new text of real clients' replies ------------------------------------

STYLES = {  # style -> (command written in that style, the feedback it must give)
    "gmail": ("like 1", (1, "like")),
    "outlook": ("skip 2", (2, "skip")),
    "apple": ("more 3", (3, "like")),
    "german": ("less 4", (4, "skip")),
    "french": ("+5", (5, "like")),
    "signature": ("-6", (6, "skip")),
    "html": ("like 7", (7, "like")),
}


def test_replies_in_the_styles_of_real_clients(tmp_path: Path, smtp_server: StartServer,
                                               dovecot: Dovecot) -> None:
    world = make_world(tmp_path, smtp_server, dovecot)
    digest = world.digests["alice@example.org"]
    sent = {style: reply(digest, command, style=style) for style, (command, _) in STYLES.items()}
    world.append(*sent.values())
    assert len(world.unseen()) == len(STYLES)

    report = world.process()
    assert (report.processed, report.applied, report.errors) == (len(STYLES), len(STYLES), 0)
    # Only the new text counted: the quoted digests and signatures gave nothing.
    assert world.feedback() == [expected for _, expected in STYLES.values()]
    assert world.unseen() == []  # marked \Seen after the commit
    confirmations = world.confirmations()
    assert len(confirmations) == len(STYLES)
    replies = {str(message_from_bytes(raw, policy=policy.default)["Message-ID"]): style
               for style, raw in sent.items()}
    for confirmation in confirmations:
        style = replies[str(confirmation["In-Reply-To"])]
        number, signal = STYLES[style][1]
        assert str(confirmation["To"]) == "alice@example.org"
        assert str(confirmation["Subject"]).startswith("Re: Paper digest")
        assert str(digest["Message-ID"]) in str(confirmation["References"])
        assert str(confirmation["In-Reply-To"]) in str(confirmation["References"])
        assert str(confirmation["Reply-To"]) == str(digest["Reply-To"])
        assert str(confirmation["Auto-Submitted"]) == "auto-replied"
        text = digest_text(confirmation)
        assert f"{'Liked' if signal == 'like' else 'Skipped'} paper {number}:" in text, style
        assert "Not understood" not in text, (style, text)
        assert parse_text(text).commands == []


def test_mailto_link_reply_is_applied_once(tmp_path: Path, smtp_server: StartServer,
                                           dovecot: Dovecot) -> None:
    world = make_world(tmp_path, smtp_server, dovecot)
    digest = world.digests["alice@example.org"]
    # What the digest's mailto link opens: subject and body both the command, no thread headers.
    world.append(reply(digest, "like 3", subject="like 3", thread=False),
                 reply(digest, "", subject="skip 4", thread=False))
    report = world.process()
    assert report.applied == 2
    assert world.feedback() == [(3, "like"), (4, "skip")]
    assert "read from the subject" in digest_text(world.confirmations()[1])


def test_a_line_not_understood_is_reported_with_a_suggestion(
        tmp_path: Path, smtp_server: StartServer, dovecot: Dovecot) -> None:
    world = make_world(tmp_path, smtp_server, dovecot)
    digest = world.digests["alice@example.org"]
    world.append(reply(digest, "Hi there,\nlke 3\nlike 2, 12", style="gmail"))
    report = world.process()
    assert report.applied == 1
    assert world.feedback() == [(2, "like")]
    text = digest_text(world.confirmations()[0])
    assert "“lke 3”: did you mean “like 3”?" in text
    assert "this digest has no paper 12 (it has 10)" in text
    assert "Liked paper 2" in text
    assert parse_text(text).commands == []  # "like 2, 12" is reported, never repeatable


# --- who may command ----------------------------------------------------------------


def test_spoofed_and_foreign_replies_change_nothing(tmp_path: Path, smtp_server: StartServer,
                                                    dovecot: Dovecot) -> None:
    world = make_world(tmp_path, smtp_server, dovecot)
    alice, bob = world.digests["alice@example.org"], world.digests["bob@example.org"]
    world.append(
        # Bob answers with Alice's token (a forwarded digest).
        reply(alice, "unsubscribe", sender="Bob <bob@example.org>"),
        # Someone forges Alice's address without any token.
        reply(alice, "unsubscribe", to="digest@papers.example.org", thread=False),
        # A made-up token.
        reply(alice, "skip all", to="digest+aaaaaaaaaaaaaaaa@papers.example.org", thread=False),
        # Alice's address forged on a reply that carries Bob's token.
        reply(bob, "like all"),
    )
    report = world.process()
    assert (report.processed, report.rejected, report.applied) == (4, 4, 0)
    with world.store() as store:
        for email in ("alice@example.org", "bob@example.org"):
            assert store.feedback_log(email) == []
            assert not store.subscriber_state(email).unsubscribed
        assert store.reply_outcomes() == {"rejected": 4}
    assert world.confirmations() == []
    assert world.unseen() == []  # handled: not read again


def test_auto_replies_bounces_and_list_mail_are_never_answered(
        tmp_path: Path, smtp_server: StartServer, dovecot: Dovecot) -> None:
    world = make_world(tmp_path, smtp_server, dovecot)
    digest = world.digests["alice@example.org"]
    world.append(
        reply(digest, "I am out of office.\nunsubscribe", headers={"Auto-Submitted": "auto-replied"}),
        reply(digest, "like 1", headers={"Precedence": "bulk"}),
        reply(digest, "like 1", headers={"List-Id": "<lab.lists.example.org>"}),
        reply(digest, "like 1", headers={"Return-Path": "<>"}),
    )
    report = world.process()
    assert (report.ignored, report.applied) == (4, 0)
    assert world.feedback() == []
    assert world.confirmations() == []


def test_a_reply_to_a_digest_of_three_weeks_ago(tmp_path: Path, smtp_server: StartServer,
                                                dovecot: Dovecot) -> None:
    import time_machine

    from .helpers import sample_dumps

    server = smtp_server()
    inbox = make_inbox(tmp_path, nasty=False)
    _first, second = sample_dumps()
    (inbox / second.name).unlink()
    config = pipeline_config(tmp_path, server)
    config.write_text(config.read_text() + IMAP_TABLE.format(port=dovecot.port, limit=20))
    with time_machine.travel("2026-02-19 09:00 +01:00", tick=False):
        for path in inbox.iterdir():
            os.utime(path, (time.time() - 60,) * 2)  # written before this (travelled) day
        main(["--config", str(config), "ingest"])
        assert main(["--config", str(config), "send", "--user", "alice@example.org"]) == 0
    old = server.messages[-1].message
    (inbox / second.name).write_bytes(second.read_bytes())
    with time_machine.travel("2026-03-12 09:00 +01:00", tick=False):
        os.utime(inbox / second.name, (time.time() - 60,) * 2)
        main(["--config", str(config), "ingest"])
        assert main(["--config", str(config), "send", "--user", "alice@example.org"]) == 0
    new = server.messages[-1].message
    assert old["Message-ID"] != new["Message-ID"]
    world = World(tmp_path, config, server, dovecot, {"alice@example.org": new})
    world.append(reply(old, "like 2", style="gmail"))
    assert world.process().applied == 1
    with world.store() as store:
        digests = {d.local_date.isoformat(): d for d in store.digests_of("alice@example.org")}
        old_row = digests["2026-02-19"]
        [event] = store.feedback_log("alice@example.org")
        # "2" means item 2 of the digest answered, as frozen three weeks ago.
        assert event.paper_id == store.digest_items(old_row.id)[1].paper_id
        assert (event.digest_id, event.digest_date) == (old_row.id, "2026-02-19")


# --- exactly once -------------------------------------------------------------------


def test_the_same_reply_twice_changes_nothing_the_second_time(
        tmp_path: Path, smtp_server: StartServer, dovecot: Dovecot) -> None:
    world = make_world(tmp_path, smtp_server, dovecot)
    digest = world.digests["alice@example.org"]
    raw = reply(digest, "like 1\nskip rest", message_id="<same@example.org>")
    world.append(raw, raw)  # delivered twice
    report = world.process()
    assert (report.applied, report.duplicates) == (1, 1)
    world.append(raw)  # and once more, later
    assert world.process().duplicates == 1
    assert world.feedback() == [(1, "like")] + [(n, "skip") for n in range(2, 11)]
    assert len(world.confirmations()) == 1


def test_a_crash_after_the_commit_loses_and_repeats_nothing(
        tmp_path: Path, smtp_server: StartServer, dovecot: Dovecot,
        monkeypatch: pytest.MonkeyPatch) -> None:
    world = make_world(tmp_path, smtp_server, dovecot)
    digest = world.digests["alice@example.org"]
    world.append(reply(digest, "like 4", style="gmail"), reply(digest, "skip 5", style="apple"))

    def crash(self: ImapMailbox, ids: list[str]) -> None:
        raise KeyboardInterrupt("killed between the commit and \\Seen")

    with monkeypatch.context() as patch:
        patch.setattr(ImapMailbox, "done", crash)
        with pytest.raises(KeyboardInterrupt):
            world.process()
    # Applied and recorded, but still unseen in the mailbox; no confirmation went out yet.
    assert world.feedback() == [(4, "like"), (5, "skip")]
    assert len(world.unseen()) == 2
    assert world.confirmations() == []

    report = world.process()  # the next run
    assert (report.duplicates, report.applied) == (2, 0)
    assert world.feedback() == [(4, "like"), (5, "skip")]
    assert world.unseen() == []
    assert len(world.confirmations()) == 2  # queued in the first run, sent once


def test_a_crash_before_the_commit_loses_no_reply(
        tmp_path: Path, smtp_server: StartServer, dovecot: Dovecot,
        monkeypatch: pytest.MonkeyPatch) -> None:
    world = make_world(tmp_path, smtp_server, dovecot)
    world.append(reply(world.digests["alice@example.org"], "like 6"))

    def crash(*args: object, **kwargs: object) -> bool:
        raise KeyboardInterrupt("killed while applying")

    with monkeypatch.context() as patch:
        patch.setattr(Store, "record_reply", crash)
        with pytest.raises(KeyboardInterrupt):
            world.process()
    assert world.feedback() == []  # rolled back
    assert len(world.unseen()) == 1
    assert world.process().applied == 1
    assert world.feedback() == [(6, "like")]


def test_a_stop_ends_the_run_between_replies(tmp_path: Path, smtp_server: StartServer,
                                            dovecot: Dovecot) -> None:
    world = make_world(tmp_path, smtp_server, dovecot)
    world.append(reply(world.digests["alice@example.org"], "like 1"))
    stop = asyncio.Event()
    stop.set()
    with world.store() as store:
        report = asyncio.run(process_replies(world.config(), store, stop=stop))
    assert report.processed == 0 and len(world.unseen()) == 1  # left for the next run
    assert world.process().applied == 1


def test_a_malformed_reply_is_recorded_and_the_run_goes_on(
        tmp_path: Path, smtp_server: StartServer, dovecot: Dovecot,
        monkeypatch: pytest.MonkeyPatch) -> None:
    world = make_world(tmp_path, smtp_server, dovecot)
    digest = world.digests["alice@example.org"]
    broken_mime = (b"From: alice@example.org\r\nTo: " + str(digest["Reply-To"]).encode()
                   + b"\r\nMessage-ID: <broken@example.org>\r\nContent-Type: multipart/mixed; "
                   b"boundary=\"nope\"\r\n\r\n--nope\r\nContent-Type: text/plain; charset=x-klingon"
                   b"\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!not base64\r\n")
    world.append(b"\x00\xff garbage without headers", broken_mime,
                 reply(digest, "explode", message_id="<explode@example.org>"),
                 reply(digest, "like 8"))
    from digest.replies import process

    real = process.new_text

    def fragile(message: EmailMessage, sent: object = None) -> str:
        if str(message["Message-ID"]) == "<explode@example.org>":
            raise ValueError("a parser bug")
        return real(message, sent)  # type: ignore[arg-type]

    monkeypatch.setattr(process, "new_text", fragile)
    report = world.process()
    assert report.processed == 4
    assert (report.errors, report.applied, report.rejected, report.ignored) == (1, 1, 1, 1)
    assert world.feedback() == [(8, "like")]
    assert world.unseen() == []
    with world.store() as store:
        record = store.reply_record("<explode@example.org>")
        assert record is not None and record.outcome == "error"
        assert "a parser bug" in record.detail


# --- subscription state and the admin's view -----------------------------------------


def test_state_commands_win_over_the_config_and_the_admin_sees_them(
        tmp_path: Path, smtp_server: StartServer, dovecot: Dovecot,
        capsys: pytest.CaptureFixture[str]) -> None:
    world = make_world(tmp_path, smtp_server, dovecot)
    digest = world.digests["alice@example.org"]
    world.append(reply(digest, "like 1, 2; skip 3\npause 2 weeks\ntime 07:30\nsize 5\n"
                               "interest add graph neural networks\n"
                               "interest remove domain generalization"))
    assert world.process().applied == 1
    config = world.config()
    with world.store() as store:
        state = store.subscriber_state("alice@example.org")
        assert state.paused and state.paused_until is not None
        assert (state.send_at, state.max_papers) == ("07:30", 5)
        alice = effective_subscriber(config.subscriber("alice@example.org"), state)  # type: ignore[arg-type]
    assert (alice.send_at.hour, alice.send_at.minute, alice.max_papers) == (7, 30, 5)
    assert alice.interests == ("domain adaptation", "graph neural networks")
    text = digest_text(world.confirmations()[0])
    assert "Paused your digests for 14 days" in text and "07:30 (Europe/Berlin)" in text

    capsys.readouterr()
    assert main(["--config", str(world.config_path), "feedback", "--user",
                 "alice@example.org", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert set(shown) == {"subscriber", "state", "feedback"}
    assert shown["state"]["send_at"] == "07:30" and shown["state"]["paused"] is True
    assert [(f["signal"], bool(f["title"]), f["digest"]) for f in shown["feedback"]] == [
        ("like", True, digest_date(world)), ("like", True, digest_date(world)),
        ("skip", True, digest_date(world))]
    assert set(shown["feedback"][0]) >= {"paper_id", "title", "signal", "at", "digest"}
    assert main(["--config", str(world.config_path), "feedback", "--user",
                 "alice@example.org"]) == 0
    out = capsys.readouterr().out
    assert "send_at=07:30" in out and "like" in out


def test_a_reply_cannot_grow_the_interests_past_the_configs_bounds(
        tmp_path: Path, smtp_server: StartServer, dovecot: Dovecot) -> None:
    """A 10,000-character phrase and a 250th interest are refused, as the config refuses them."""
    world = make_world(tmp_path, smtp_server, dovecot)
    digest = world.digests["alice@example.org"]
    lines = ["interest add " + "x" * 10_000] + [f"interest add topic {n}" for n in range(250)]
    world.append(reply(digest, "\n".join(lines)))
    world.process()
    with world.store() as store:
        state = store.subscriber_state("alice@example.org")
    alice = effective_subscriber(world.config().subscriber("alice@example.org"), state)  # type: ignore[arg-type]
    assert len(alice.interests) == 200 and all(len(p) <= 300 for p in alice.interests)
    text = digest_text(world.confirmations()[0])
    assert "at most 300" in text and "the most there can be" in text


def digest_date(world: World) -> str:
    with world.store() as store:
        return store.digests_of("alice@example.org")[0].local_date.isoformat()


def test_unsubscribe_is_confirmed_once_and_says_how_to_come_back(
        tmp_path: Path, smtp_server: StartServer, dovecot: Dovecot,
        capsys: pytest.CaptureFixture[str]) -> None:
    world = make_world(tmp_path, smtp_server, dovecot)
    digest = world.digests["alice@example.org"]
    world.append(reply(digest, "unsubscribe"))
    world.process()
    world.append(reply(digest, "stop", style="gmail"))
    world.process()
    [confirmation] = world.confirmations()
    text = digest_text(confirmation)
    assert "Unsubscribed" in text and "resume" in text
    capsys.readouterr()
    main(["--config", str(world.config_path), "send", "--force", "--user", "alice@example.org"])
    assert "unsubscribed by reply" in capsys.readouterr().out
    # Coming back: "resume" in a reply to the confirmation (its References name the digest).
    back = EmailMessage()
    back["From"] = "alice@example.org"
    back["To"] = str(confirmation["Reply-To"])
    back["Subject"] = f"Re: {confirmation['Subject']}"
    back["Message-ID"] = make_msgid("back", domain="example.org")
    back["In-Reply-To"] = str(confirmation["Message-ID"])
    back["References"] = f"{confirmation['References']} {confirmation['Message-ID']}"
    back.set_content("resume\n\n" + quoted(text))
    world.append(back.as_bytes())
    assert world.process().applied == 1
    with world.store() as store:
        assert not store.subscriber_state("alice@example.org").unsubscribed


def test_why_answers_with_the_reason_and_the_nearest_liked_papers(
        tmp_path: Path, smtp_server: StartServer, dovecot: Dovecot) -> None:
    world = make_world(tmp_path, smtp_server, dovecot)
    digest = world.digests["alice@example.org"]
    world.append(reply(digest, "like 1, 2, 3\nwhy 4"))
    world.process()
    text = digest_text(world.confirmations()[0])
    assert "About paper 4" in text and "Picked because:" in text
    assert "score" not in text  # the ranking's raw scale means nothing to a reader
    assert "Closest papers you liked:" in text and "similarity" in text
    # A confirmation quoted without marks in the next reply commands nothing either.
    assert parse_text(text).commands == []


def test_confirmations_are_rate_limited(tmp_path: Path, smtp_server: StartServer,
                                        dovecot: Dovecot) -> None:
    world = make_world(tmp_path, smtp_server, dovecot, limit=3)
    digest = world.digests["alice@example.org"]
    world.append(*(reply(digest, f"like {n}") for n in range(1, 7)))
    report = world.process()
    assert (report.applied, report.rate_limited, report.confirmations_sent) == (6, 3, 3)
    assert len(world.feedback()) == 6
    assert len(world.confirmations()) == 3


def test_the_replies_command(tmp_path: Path, smtp_server: StartServer, dovecot: Dovecot,
                             capsys: pytest.CaptureFixture[str]) -> None:
    world = make_world(tmp_path, smtp_server, dovecot)
    world.append(reply(world.digests["bob@example.org"], "like 1", sender="bob@example.org"))
    capsys.readouterr()
    assert main(["--config", str(world.config_path), "replies"]) == 0
    out = capsys.readouterr().out
    assert "bob@example.org: applied: like 1" in out
    assert "1 reply read from imap: 1 applied" in out


def test_a_processed_folder_instead_of_only_seen(tmp_path: Path, smtp_server: StartServer,
                                                 dovecot: Dovecot) -> None:
    world = make_world(tmp_path, smtp_server, dovecot)
    world.append(reply(world.digests["alice@example.org"], "like 2"))
    config = world.config()
    assert config.imap is not None
    world.process(replace(config, imap=replace(config.imap, processed_mailbox="Processed")))
    client = world.client()
    try:
        assert client.search(["ALL"]) == []
        client.select_folder("Processed")
        assert len(client.search(["SEEN"])) == 1
    finally:
        client.logout()


# --- TLS, IDLE and Maildir ------------------------------------------------------------


def test_imap_over_tls_and_starttls(dovecot_tls: Dovecot) -> None:
    for security, port in (("tls", dovecot_tls.tls_port), ("starttls", dovecot_tls.port)):
        imap = dovecot_tls.imap_config(security=security, port=port, password_env=PASSWORD_ENV)
        with ImapMailbox(imap) as mailbox:
            mailbox.append(b"From: a@example.org\r\nSubject: hi\r\n\r\nhello\r\n")
            assert len(mailbox.waiting_ids()) >= 1
    strict = dovecot_tls.imap_config(security="tls", port=dovecot_tls.tls_port,
                                     password_env=PASSWORD_ENV, verify_tls=True)
    from digest.replies import MailboxError

    with pytest.raises(MailboxError):  # a self-signed certificate is refused when verifying
        ImapMailbox(strict).open()


def test_wait_for_replies_wakes_on_new_mail_and_on_stop(dovecot: Dovecot,
                                                        tmp_path: Path) -> None:
    imap = dovecot.imap_config(password_env=PASSWORD_ENV, poll_seconds=20)
    config = Config(path=tmp_path / "x.toml", inbox=tmp_path, state=tmp_path / "s", imap=imap)

    def deliver_soon() -> None:
        time.sleep(1.0)
        with ImapMailbox(imap) as mailbox:
            mailbox.append(b"From: a@example.org\r\nSubject: hi\r\n\r\nhello\r\n")

    async def woken() -> float:
        started = time.monotonic()
        threading.Thread(target=deliver_soon).start()
        await wait_for_replies(config, asyncio.Event())
        return time.monotonic() - started

    assert 0.5 < asyncio.run(woken()) < 10  # IDLE: woken by the new mail, not the 20 s poll
    with ImapMailbox(imap) as mailbox:
        mailbox.done(mailbox.waiting_ids())  # nothing waiting: the next wait really waits

    async def stopped() -> float:
        stop = asyncio.Event()
        started = time.monotonic()
        asyncio.get_running_loop().call_later(0.5, stop.set)
        await wait_for_replies(config, stop)
        return time.monotonic() - started

    assert asyncio.run(stopped()) < 5


def test_maildir_replies(tmp_path: Path, smtp_server: StartServer) -> None:
    import mailbox

    server = smtp_server()
    make_inbox(tmp_path)
    config_path = pipeline_config(tmp_path, server)
    config_path.write_text(config_path.read_text() + '\n[maildir]\npath = "var/replies"\n')
    main(["--config", str(config_path), "ingest"])
    main(["--config", str(config_path), "send", "--force"])
    digest = digests_by_recipient(server)["alice@example.org"]
    folder = mailbox.Maildir(tmp_path / "var" / "replies", create=True)
    folder.add(reply(digest, "like 2", style="gmail"))
    folder.add(reply(digest, "skip 3", style="outlook"))
    config = load_config(config_path)
    assert config.maildir == MaildirConfig(tmp_path / "var" / "replies")
    with Store(tmp_path / "var" / "state.sqlite3") as store:
        report = asyncio.run(process_replies(config, store))
        assert (report.source, report.applied) == ("maildir", 2)
        again = asyncio.run(process_replies(config, store))
        assert again.processed == 0  # moved to cur/ with the S flag
    names = [p.name for p in (tmp_path / "var" / "replies" / "cur").iterdir()]
    assert len(names) == 2 and all(name.endswith(":2,S") for name in names)
    assert not list((tmp_path / "var" / "replies" / "new").iterdir())
    assert len([m for m in server.messages
                if str(m.message.get("Auto-Submitted")) == "auto-replied"]) == 2


def test_no_mailbox_configured_is_an_empty_report(tmp_path: Path) -> None:
    config = Config(path=tmp_path / "x.toml", inbox=tmp_path, state=tmp_path / "s.sqlite3")
    with Store(config.state) as store:
        report = asyncio.run(process_replies(config, store))
    assert (report.source, report.processed) == ("none", 0)


@pytest.mark.slow
def test_bench_replies_command_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "replies", "--count", "40", "--subscribers", "10", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["replies"] == 40 and result["applied"] == 40 and result["ok"]
