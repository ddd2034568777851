"""Replies end to end through a Maildir and a real SMTP server: never silent, commands
confirmed in the order written, a bottom-posted unsubscribe applied, forged senders and
auto-replies answered with nothing, a confirmation's failure kept to itself."""

from __future__ import annotations

import asyncio
import mailbox
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path

import pytest

from digest.cli import main
from digest.config import Config, load_config
from digest.replies import ReplyReport, process_replies
from digest.store import Store

from .smtp_helpers import (  # noqa: F401  (smtp_server_fixture provides the smtp_server fixture)
    SmtpServer,
    StartServer,
    smtp_server_fixture,
)
from .test_pipeline import digests_by_recipient, make_inbox, pipeline_config
from .test_replies import digest_text, quoted


@dataclass
class Folder:
    tmp: Path
    config_path: Path
    smtp: SmtpServer
    digest: EmailMessage

    def config(self) -> Config:
        return load_config(self.config_path)

    def add(self, body: str, *, sender: str = "Alice <alice@example.org>",
            subject: str | None = None, headers: dict[str, str] | None = None,
            html: bool = False) -> str:
        message = EmailMessage()
        message["From"] = sender
        message["To"] = str(self.digest["Reply-To"])
        message["Subject"] = subject if subject is not None else f"Re: {self.digest['Subject']}"
        message_id = make_msgid("reply", domain="example.org")
        message["Message-ID"] = message_id
        message["In-Reply-To"] = str(self.digest["Message-ID"])
        for name, value in (headers or {}).items():
            message[name] = value
        message.set_content(body, subtype="html" if html else "plain")
        mailbox.Maildir(self.tmp / "var" / "replies", create=True).add(message.as_bytes())
        return message_id

    def process(self) -> ReplyReport:
        with Store(self.tmp / "var" / "state.sqlite3") as store:
            return asyncio.run(process_replies(self.config(), store))

    def confirmations(self) -> list[str]:
        return [digest_text(m.message) for m in self.smtp.messages
                if str(m.message.get("Auto-Submitted", "")) == "auto-replied"]

    def store(self) -> Store:
        return Store(self.tmp / "var" / "state.sqlite3")


@pytest.fixture
def folder(tmp_path: Path, smtp_server: StartServer) -> Folder:
    server = smtp_server()
    make_inbox(tmp_path)
    config = pipeline_config(tmp_path, server)
    config.write_text(config.read_text() + '\n[maildir]\npath = "var/replies"\n'
                      "confirmations_per_hour = 50\n")
    assert main(["--config", str(config), "ingest"]) == 0
    assert main(["--config", str(config), "send", "--force"]) == 0
    return Folder(tmp_path, config, server, digests_by_recipient(server)["alice@example.org"])


def test_a_bottom_posted_unsubscribe_is_applied(folder: Folder) -> None:
    original = digest_text(folder.digest)
    folder.add(f"On 12/03/2026 08:00, Paper Digest wrote:\n{quoted(original)}\n\nunsubscribe\n")
    report = folder.process()
    assert (report.applied, report.commands) == (1, 1)
    with folder.store() as store:
        assert store.subscriber_state("alice@example.org").unsubscribed
    [text] = folder.confirmations()
    assert "Unsubscribed" in text and "Not understood" not in text


def test_the_digest_quoted_under_an_unknown_header_is_not_listed(folder: Folder) -> None:
    """The 97-line case of the issue: a whole digest without marks under a header no one
    knows; its lines are recognised as the digest's own and never reported."""
    original = digest_text(folder.digest)
    folder.add(f"like 2\n\nThe robot sent this at 08:00 and I answer above:\n{original}\n")
    folder.process()
    [text] = folder.confirmations()
    assert "Liked paper 2" in text
    assert "Not understood" not in text and "not a command" not in text


def test_a_reply_without_a_command_is_answered_and_quotes_three_lines(folder: Folder) -> None:
    original = digest_text(folder.digest)
    folder.add("Great digest!\nlke 3\nlike paper three\nskipp 4\npuase 2 days\nlik 9\n"
               "fifth line\n\n"
               f"On Thu, Mar 12, 2026 at 8:00 AM Paper Digest wrote:\n{quoted(original)}\n")
    report = folder.process()
    assert (report.applied, report.ignored) == (0, 1)
    [text] = folder.confirmations()
    assert "had no command in it" in text and "nothing changed" in text
    assert "Thank you for your note" in text
    quoted_back = [line for line in text.splitlines() if line.startswith("  > “")]
    assert len(quoted_back) == 3
    assert "lke 3" in quoted_back[0] and "did you mean “like 3”?" in quoted_back[0]
    assert "Great digest!" not in text and "fifth line" not in text  # prose: thanked only
    assert "... and 2 more lines left out here." in text
    assert "help" in text


def test_prose_and_a_signature_name_are_thanked_not_quoted_back(folder: Folder) -> None:
    folder.add("Thanks!\nGreat selection today.\n\nAlice\n")
    folder.process()
    [text] = folder.confirmations()
    assert "Thank you for your note" in text
    assert not [line for line in text.splitlines() if line.startswith("  > “")]
    assert "Alice”" not in text and "Thanks!”" not in text


def test_a_reply_that_is_all_quote_is_still_answered(folder: Folder) -> None:
    folder.add("\n".join("> " + line for line in digest_text(folder.digest).splitlines()))
    folder.process()
    [text] = folder.confirmations()
    assert "had no command in it" in text and "line of its own" not in text
    assert "the word help for the list of commands" in text


def test_control_characters_are_escaped_in_the_confirmation(folder: Folder) -> None:
    folder.add("lke 3 \u202eekil\x1b[31m\n")  # a near-command: quoted back, escaped
    folder.process()
    [text] = folder.confirmations()
    assert "\u202e" not in text and "\x1b" not in text
    assert "“lke 3 ekil" in text  # the near-command quoted back, its controls dropped


def test_commands_are_confirmed_in_the_order_written_with_each_effect(folder: Folder) -> None:
    folder.add("skip 3\n- like 2\n/why 1\nlike 42\nsize 5\nThanks!\n")
    folder.process()
    [text] = folder.confirmations()
    steps = [line.strip() for line in text.splitlines() if line[:5].strip().rstrip(".").isdigit()
             and "You wrote" in line]
    assert steps == ["1. You wrote “skip 3”:", "2. You wrote “like 2”:", "3. You wrote “why 1”:",
                     "4. You wrote “like 42”:", "5. You wrote “size 5”:"]
    order = [text.index(marker) for marker in ("Skipped paper 3", "Liked paper 2",
                                              "About paper 1", "this digest has no paper 42",
                                              "hold up to 5 papers")]
    assert order == sorted(order)
    assert "Thank you for your note as well" in text


def test_forged_senders_and_auto_replies_change_nothing_and_get_no_answer(
        folder: Folder) -> None:
    folder.add("unsubscribe", sender="alice@example.org <evil@example.net>")
    folder.add("unsubscribe", sender='"alice@example.org" <evil@example.net>')
    folder.add("I am away.\nunsubscribe", subject="Automatic reply: Paper digest")
    folder.add("unsubscribe", subject="Abwesenheitsnotiz: Paper digest")
    folder.add("unsubscribe", subject="Réponse automatique : Paper digest")
    folder.add("unsubscribe", headers={"X-Autoreply": "yes"})
    folder.add("unsubscribe", headers={"X-Auto-Response-Suppress": "All"})
    report = folder.process()
    assert (report.processed, report.applied, report.errors) == (7, 0, 0)
    assert (report.rejected, report.ignored) == (2, 5)
    with folder.store() as store:
        assert not store.subscriber_state("alice@example.org").unsubscribed
    assert folder.confirmations() == []
    details = [o.detail for o in report.outcomes]
    assert any("display name is the address alice@example.org" in d for d in details)
    assert any("auto-reply subject" in d for d in details)


def test_auto_replies_and_forgeries_the_review_found_change_nothing(folder: Folder) -> None:
    """Issue 8 review: these were answered or applied."""
    for subject in ("Out-of-Office: Re: digest", "Alice Smith is out of the office.",
                    "[Auto-Reply] Re: digest", "Re\u0301ponse automatique"):
        folder.add("I am away.\nunsubscribe", subject=subject)
    folder.add("unsubscribe", sender="root@localhost <alice@example.org>")
    folder.add("unsubscribe", sender="alice\uff20example.org <evil@example.net>")
    report = folder.process()
    assert (report.processed, report.applied, report.errors) == (6, 0, 0)
    assert (report.rejected, report.ignored) == (2, 4)
    with folder.store() as store:
        assert not store.subscriber_state("alice@example.org").unsubscribed
    assert folder.confirmations() == []


def test_a_confirmation_that_cannot_be_written_fails_alone(
        folder: Folder, monkeypatch: pytest.MonkeyPatch) -> None:
    from digest.replies import process

    real = process.build_confirmation

    def broken(config: Config, reply: EmailMessage, *args: object, **kwargs: object) -> object:
        if "skip 4" in digest_text(reply):
            raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "a template bug")
        return real(config, reply, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(process, "build_confirmation", broken)
    folder.add("skip 4\n")
    folder.add("like 5\n")
    report = folder.process()
    assert (report.applied, report.errors) == (2, 0)
    assert [o.confirmation for o in report.outcomes] == ["failed", "queued"]
    assert len(folder.confirmations()) == 1
    with folder.store() as store:
        assert len(store.feedback_log("alice@example.org")) == 2
