"""Reading replies without a server: commands, new text only, tokens, config of the mailbox."""

from __future__ import annotations

import textwrap
from datetime import date
from email.message import EmailMessage
from pathlib import Path

import pytest

from digest.config import Subscriber, load_config
from digest.errors import ConfigError
from digest.paper import Paper
from digest.render import DigestContent, DigestItem, render_digest, render_text
from digest.replies import help_text, new_text, parse_reply, parse_text
from digest.replies.parse import automatic_reason, digest_tokens, html_to_text, sender_address

from .helpers import ROOT, write_config


def commands(text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(c.name, c.items) for c in parse_text(text).commands]


@pytest.mark.parametrize(("text", "expected"), [
    ("like 2 5", [("like", (2, 5))]),
    ("LIKE 2, 5", [("like", (2, 5))]),
    ("like 2-4", [("like", (2, 3, 4))]),
    ("Skip 3; like 1", [("skip", (3,)), ("like", (1,))]),
    ("like 2, skip 3, why 4", [("like", (2,)), ("skip", (3,)), ("why", (4,))]),
    ("more 4", [("like", (4,))]),
    ("less 2–3", [("skip", (2, 3))]),
    ("+2 -5", [("like", (2,)), ("skip", (5,))]),
    ("+1-3 -7", [("like", (1, 2, 3)), ("skip", (7,))]),
    ("* like 3 *", [("like", (3,))]),
    ("like 2 and 5.", [("like", (2, 5))]),
    ("help", [("help", ())]),
    ("Unsubscribe", [("unsubscribe", ())]),
    ("stop", [("unsubscribe", ())]),
    ("resume", [("resume", ())]),
])
def test_commands_are_read(text: str, expected: list[tuple[str, tuple[int, ...]]]) -> None:
    assert commands(text) == expected


def test_all_rest_pause_time_size_interest() -> None:
    parsed = parse_text("like all\nskip rest\npause 2 weeks\ntime 7:30\nsize 5\n"
                        "interest add graph neural networks, diffusion\n"
                        "interest remove Robotics")
    got = [(c.name, c.every, c.rest, c.days, c.value, c.number) for c in parsed.commands]
    assert got == [
        ("like", True, False, None, "", None),
        ("skip", False, True, None, "", None),
        ("pause", False, False, 14, "", None),
        ("time", False, False, None, "07:30", None),
        ("size", False, False, None, "", 5),
        ("interest-add", False, False, None, "graph neural networks", None),
        ("interest-add", False, False, None, "diffusion", None),
        ("interest-remove", False, False, None, "Robotics", None),
    ]
    assert parse_text("pause").commands[0].days is None
    assert parse_text("pause 3 days").commands[0].days == 3
    assert parse_text("").commands == []


def test_a_line_that_is_not_a_command_gets_a_suggestion() -> None:
    parsed = parse_text("lke 3\nThanks, like 4\nsize 500\nI like paper 2 a lot")
    assert parsed.commands == []
    messages = {p.text: p.message for p in parsed.problems}
    assert messages["lke 3"] == "did you mean “like 3”?"
    assert "start of a line" in messages["Thanks, like 4"]
    assert "1 to 100" in messages["size 500"]
    assert "not a command" in messages["I like paper 2 a lot"]


def test_free_text_starting_with_a_command_word_commands_nothing() -> None:
    parsed = parse_text("Like the new format!\nStop sending me the robotics ones please")
    assert parsed.commands == []
    assert len(parsed.problems) == 2


def test_mailto_subject_and_body_apply_once() -> None:
    assert [c.items for c in parse_reply("like 3", "like 3").commands] == [(3,)]
    only_subject = parse_reply("", "skip 4")
    assert [(c.name, c.items) for c in only_subject.commands] == [("skip", (4,))]
    assert only_subject.from_subject
    assert parse_reply("", "Re: like 3").commands == []
    assert parse_reply("", "AW: skip 2").commands == []
    assert parse_reply("", "Paper digest, Thu 12 Mar 2026: like no other").commands == []


def make_content(n: int = 10) -> DigestContent:
    papers = [Paper(id=f"2603.{i:05d}", title=f"Paper {i}: stop the like of skip",
                    abstract="We pause. We stop. Like 3 other methods, skip 2 steps; help all.")
              for i in range(1, n + 1)]
    return DigestContent(
        subscriber=Subscriber("alice@example.org", "Alice"), token="abcdefghijklmnop",
        local_date=date(2026, 3, 12), considered=40,
        items=tuple(DigestItem(i, p, 1.0 / i, "matches your interest in pausing")
                    for i, p in enumerate(papers, start=1)),
        personalised=False)


def test_an_unstripped_digest_quoted_in_full_commands_nothing() -> None:
    """The safety net: even if quote stripping fails, the digest's text holds no command."""
    text = render_text(make_content())
    parsed = parse_text(text)
    assert parsed.commands == []
    assert parse_text(help_text()).commands == []


def reply_message(body: str, *, subject: str = "Re: Paper digest", html: str | None = None,
                  **extra: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = "Alice <Alice@Example.org>"
    message["To"] = "digest+abcdefghijklmnop@papers.example.org"
    message["Subject"] = subject
    message["Message-ID"] = "<r1@example.org>"
    for name, value in extra.items():
        message[name.replace("_", "-")] = value
    if html is None:
        message.set_content(body)
    else:
        message.set_content(html, subtype="html")
    return message


QUOTED_DIGEST = "\n".join("> " + line for line in render_text(make_content()).splitlines())
ORIGINAL = render_text(make_content())


@pytest.mark.parametrize(("style", "body"), [
    ("gmail", "like 2\nskip 3\n\nOn Thu, Mar 12, 2026 at 8:00 AM Paper Digest "
              "<digest+abcdefghijklmnop@papers.example.org> wrote:\n" + QUOTED_DIGEST + "\n> like 9\n"),
    ("outlook", "like 2\r\nskip 3\r\n\r\nBest regards,\r\nAlice\r\n\r\n"
                "-----Original Message-----\r\nFrom: Paper Digest <digest@papers.example.org>\r\n"
                "Sent: Thursday, March 12, 2026 8:00 AM\r\nTo: Alice <alice@example.org>\r\n"
                "Subject: Paper digest\r\n\r\n" + ORIGINAL.replace("\n", "\r\n") + "\r\nlike 9\r\n"),
    ("outlook-web", "like 2\nskip 3\n\n________________________________\n"
                    "From: Paper Digest <digest@papers.example.org>\nSent: Thursday\n\n"
                    + ORIGINAL + "\nlike 9\n"),
    ("apple", "like 2\nskip 3\n\n> On 12 Mar 2026, at 08:00, Paper Digest "
              "<digest@papers.example.org> wrote:\n> \n" + QUOTED_DIGEST + "\n> like 9\n"),
    ("german", "like 2\nskip 3\n\nViele Grüße\nAlice\n\nAm Do., 12. März 2026 um 08:00 Uhr schrieb "
               "Paper Digest <digest@papers.example.org>:\n" + QUOTED_DIGEST + "\n> like 9\n"),
    ("french", "like 2\nskip 3\n\nCordialement,\nAlice\n\nLe jeu. 12 mars 2026 à 08:00, Paper "
               "Digest <digest@papers.example.org> a écrit :\n" + QUOTED_DIGEST + "\n> like 9\n"),
    ("signature", "like 2\nskip 3\n-- \nDr. Alice Example\nStop by room 3\nMore 2 come\n"),
    ("mobile", "like 2\nskip 3\n\nSent from my iPhone\n\n" + QUOTED_DIGEST),
])
def test_only_the_new_text_is_read(style: str, body: str) -> None:
    text = new_text(reply_message(body))
    parsed = parse_text(text)
    assert [(c.name, c.items) for c in parsed.commands] == [("like", (2,)), ("skip", (3,))], text
    assert parsed.problems == [], (style, parsed.problems)


def test_html_only_reply_is_read_without_its_quote() -> None:
    html = ("<html><body><div dir='ltr'>like 4<br>skip&nbsp;1</div><br>"
            "<div class='gmail_quote'><div>On Thu wrote:</div><blockquote>like 9<br>"
            "skip 8</blockquote></div></body></html>")
    text = new_text(reply_message("", html=html))
    assert [(c.name, c.items) for c in parse_text(text).commands] == [("like", (4,)), ("skip", (1,))]
    outlook = ("<div>like 5</div><div id='appendonsend'></div><hr><div id='divRplyFwdMsg'>"
               "<b>From:</b> Paper Digest</div><div>like 9</div>")
    assert html_to_text(outlook).strip() == "like 5"


def test_a_reply_that_is_all_quote_has_no_new_text() -> None:
    body = "On Thu, Mar 12, 2026 at 8:00 AM Paper Digest <d@x.org> wrote:\n> like 9\n>\n> skip 2\n"
    assert parse_text(new_text(reply_message(body))).commands == []
    # The same with a line written below the quote: a bottom-post, read.
    below = parse_text(new_text(reply_message(body + "\nunsubscribe\n"))).commands
    assert [c.name for c in below] == ["unsubscribe"]


def test_tokens_sender_and_automatic_mail() -> None:
    message = reply_message("like 1", In_Reply_To="<digest.qrstuvwxyz234567@papers.example.org>",
                            References="<x@y> <digest.abcdefghijklmnop@papers.example.org>")
    assert digest_tokens(message) == ["abcdefghijklmnop", "qrstuvwxyz234567"]
    assert sender_address(message) == "alice@example.org"
    assert automatic_reason(message) is None
    assert automatic_reason(reply_message("x", Auto_Submitted="auto-replied"))
    assert automatic_reason(reply_message("x", Precedence="bulk"))
    assert automatic_reason(reply_message("x", List_Id="<papers.lists.example.org>"))
    assert automatic_reason(reply_message("x", Return_Path="<>"))
    assert automatic_reason(reply_message("x", Auto_Submitted="no")) is None


def test_digest_headers_carry_the_token_the_parser_reads() -> None:
    from digest.config import SmtpConfig

    smtp = SmtpConfig(sender="Paper Digest <digest@papers.example.org>",
                      reply_to="digest+{token}@papers.example.org")
    digest = render_digest(make_content(), smtp, now=__import__("datetime").datetime.now(
        __import__("datetime").UTC))
    reply = EmailMessage()
    reply["From"] = "alice@example.org"
    reply["To"] = str(digest["Reply-To"])
    reply["In-Reply-To"] = str(digest["Message-ID"])
    assert digest_tokens(reply) == ["abcdefghijklmnop"]


# --- config -------------------------------------------------------------------

BASE = """
[smtp]
host = "smtp.example.org"
[[subscribers]]
email = "alice@example.org"
"""


def test_imap_and_maildir_tables(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, BASE + textwrap.dedent("""
        [imap]
        host = "imap.example.org"
        username = "digest@example.org"
        password_env = "DIGEST_IMAP_PASSWORD"
        poll_seconds = 30
        """)))
    assert config.imap is not None and config.maildir is None
    assert (config.imap.port, config.imap.security, config.imap.mailbox) == (993, "tls", "INBOX")
    assert config.imap.poll_seconds == 30
    config = load_config(write_config(tmp_path, BASE + '[maildir]\npath = "var/replies"\n'))
    assert config.maildir is not None and config.maildir.path == tmp_path / "var" / "replies"
    assert config.imap is None


@pytest.mark.parametrize(("table", "key"), [
    ('[imap]\nhots = "x"\nhost = "h"\nusername = "u"\npassword_env = "P"', "imap.hots"),
    ('[imap]\nhost = "h"\nusername = "u"', "imap.password_env"),
    ('[imap]\nhost = "h"\nusername = "u"\npassword_env = "P"\nsecurity = "ssl"', "imap.security"),
    ('[imap]\nhost = "h"\nusername = "u"\npassword_env = "P"\nport = 0', "imap.port"),
    ('[imap]\nhost = "h"\nusername = "u"\npassword_env = "P"\npoll_seconds = -1',
     "imap.poll_seconds"),
    ('[maildir]\npaht = "x"', "maildir.paht"),
    ('[maildir]\npath = "x"\n[imap]\nhost = "h"\nusername = "u"\npassword_env = "P"', "maildir"),
])
def test_a_wrong_mailbox_key_is_named(tmp_path: Path, table: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write_config(tmp_path, BASE + table + "\n"))
    assert caught.value.key == key


def test_the_example_config_shows_the_reply_tables() -> None:
    text = (ROOT / "config" / "digest.example.toml").read_text(encoding="utf-8")
    assert "# [imap]" in text and "# [maildir]" in text
    load_config(ROOT / "config" / "digest.example.toml")


@pytest.mark.parametrize("plain", ["", "\n\n", "Sent from my iPhone\n", "-- \nSent from my iPhone\n",
                                   "Von meinem iPhone gesendet"])
def test_a_text_part_that_says_nothing_falls_back_to_the_html_part(plain: str) -> None:
    message = EmailMessage()
    message["Subject"] = "Re: Paper digest"
    message.set_content(plain)
    message.add_alternative("<div>like 2</div><div>Sent from my iPhone</div>", subtype="html")
    assert [(c.name, c.items) for c in parse_text(new_text(message)).commands] == [("like", (2,))]


def test_a_text_part_with_words_is_read_before_the_html_part() -> None:
    message = EmailMessage()
    message.set_content("skip 3\n")
    message.add_alternative("<div>like 2</div>", subtype="html")
    assert [c.name for c in parse_text(new_text(message)).commands] == ["skip"]
