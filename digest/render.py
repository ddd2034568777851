"""Render stage: turns one ranked digest into an email message.

Runs after ranking, once per subscriber and digest, and hands an
``email.message.EmailMessage`` (multipart/alternative: plain text, then HTML
with inlined CSS) to the mailer. It knows nothing of SMTP or of the database:
everything it shows arrives in a ``DigestContent``.

Replies are read as commands, and a reply often quotes the original without
``>`` marks, so no line of the email (text part, or the HTML read as text) is
ever a bare command such as ``like 3`` or ``unsubscribe``: commands are only
ever named inside a sentence, and free text from papers is checked.
"""

from __future__ import annotations

import base64
import email.policy
import importlib.resources
import re
import secrets
import textwrap
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from functools import cache
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import css_inline
import jinja2

from .config import SmtpConfig, Subscriber
from .paper import Paper

ABSTRACT_CHARS = 300  # a few lines: enough to judge a paper, short enough to skim ten
SUBJECT_TITLE_CHARS = 90  # most mail clients show about this much of a subject
TEXT_WIDTH = 76  # plain-text lines stay readable in an 80-column terminal and when quoted
TOKEN_BYTES = 10  # 80 random bits: 16 base32 characters, unguessable for a digest's life

TEXT_TEMPLATE = "digest.txt.j2"
HTML_TEMPLATE = "digest.html.j2"
STYLESHEET = "digest.css"

_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

# Words a reply may use as commands (replies reads them). Broader than the
# commands that exist today, so a new command cannot make an old email unsafe.
COMMAND_WORDS = (
    "like", "skip", "more", "less", "unsubscribe", "subscribe", "pause", "resume",
    "unpause", "stop", "start", "help", "undo", "why", "size",
)
_BARE_COMMAND = re.compile(
    r"^(?:" + "|".join(COMMAND_WORDS) + r")(?:\s+(?:all|\d+(?:\s*[,;]?\s*\d+)*))?$",
    re.IGNORECASE,
)
_BARE_HOST_URL = re.compile(r"^[\w.-]+\.[a-z]{2,}(/\S*)?$", re.IGNORECASE)
# What a reader (or a lenient parser) may ignore around a command: markup and punctuation.
_DECORATION = " \t*_~>\"'`.,;:!?()[]{}-–—•·"


@dataclass(frozen=True)
class DigestItem:
    """One paper of a digest, frozen with the number replies refer to."""

    position: int  # 1-based, what "like 2" refers to
    paper: Paper
    score: float
    reason: str
    explore: bool = False  # an exploration slot, marked as such in the email
    relevance: str | None = None  # "strong" / "good" / "weak" (rank.Ranked.level)


@dataclass(frozen=True)
class DigestContent:
    """Everything one digest email shows; built by the caller from ranking and the store."""

    subscriber: Subscriber
    token: str  # the digest's random token
    local_date: date  # the subscriber's local date of the digest
    considered: int  # how many new papers were considered
    items: tuple[DigestItem, ...]
    personalised: bool  # False: say that replying like/skip will personalise it


def new_token() -> str:
    """A fresh digest token: random, lowercase letters and digits, safe in URLs and addresses.

    Base32 keeps it case-insensitive, because some mail systems lowercase the
    local part of an address that replies come back on.
    """
    return base64.b32encode(secrets.token_bytes(TOKEN_BYTES)).decode("ascii").rstrip("=").lower()


def message_id_for(token: str, sender: str) -> str:
    """The digest's Message-ID, ``<digest.TOKEN@domain-of-sender>``.

    Replies quote it in In-Reply-To/References, so the token comes back even
    when a client replies to the From address instead of Reply-To.
    """
    address = parseaddr(sender)[1]
    domain = address.rpartition("@")[2] or "localhost"
    return f"<digest.{token}@{domain}>"


def reply_address(smtp: SmtpConfig, token: str) -> str:
    """The plain address a reply to this digest goes to (``reply_to`` with its token)."""
    filled = smtp.reply_to.replace("{token}", token)
    return parseaddr(filled)[1] or filled


def mailto(address: str, command: str, *, body: bool = True) -> str:
    """A mailto link that opens a reply with ``command`` as subject (and body), per RFC 6068."""
    encoded = quote(command, safe="")
    link = f"mailto:{quote(address, safe='@+')}?subject={encoded}"
    return link + (f"&body={encoded}" if body else "")


def safe_link(url: str) -> str | None:
    """An http(s) URL fit for an href, or None: dumps are untrusted, so no javascript: links."""
    url = one_line(url)
    scheme, _, rest = url.partition("://")
    if not rest:
        # "github.com/x/y" as written in an abstract: a bare host and path.
        return f"https://{url}" if _BARE_HOST_URL.match(url) else None
    if scheme.lower() in ("http", "https") and " " not in url:
        return url
    return None


class _UrlHeaderPolicy(email.policy.EmailPolicy):
    """The default email policy, except that URL-valued headers stay on one line.

    Python turns a header it cannot fold within 78 columns into RFC 2047 encoded
    words, and a List-Unsubscribe URL encoded that way is one no client can
    follow; a single long line (RFC 5322 allows 998) is what clients expect.
    """

    unfolded_headers = frozenset({"list-unsubscribe"})

    def fold(self, name: str, value: str) -> str:
        plain = self._plain_url(name, value)
        if plain is not None:
            return f"{name}: {plain}{self.linesep}"
        return str(super().fold(name, value))

    def fold_binary(self, name: str, value: str) -> bytes:
        plain = self._plain_url(name, value)
        if plain is not None:
            return f"{name}: {plain}{self.linesep}".encode("ascii")
        return super().fold_binary(name, value)

    def _plain_url(self, name: str, value: str) -> str | None:
        """The header's decoded one-line ASCII value, if it is a URL header, else None.

        A header parsed from stored bytes arrives raw, possibly already encoded
        (a message once written with another policy): decoding it undoes that.
        """
        if name.lower() not in self.unfolded_headers:
            return None
        decoded = one_line(str(self.header_factory(name, one_line(str(value)))))
        return decoded if decoded.isascii() else None


# The policy of the messages this project writes (the mailer sends with it too).
# 7bit: non-ASCII bodies go quoted-printable or base64, fit for any server, 8BITMIME or not.
EMAIL_POLICY = _UrlHeaderPolicy(cte_type="7bit")


def render_digest(content: DigestContent, smtp: SmtpConfig, *, now: datetime) -> EmailMessage:
    """The complete email for one digest: headers, a text part and an HTML part.

    ``now`` must be timezone-aware; it becomes the Date header.
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("render_digest: now must be a timezone-aware datetime")
    reply = reply_address(smtp, content.token)
    message = EmailMessage(policy=EMAIL_POLICY)
    message["Subject"] = subject_for(content)
    message["From"] = one_line(smtp.sender)
    message["To"] = Address(
        display_name=one_line(content.subscriber.name), addr_spec=one_line(content.subscriber.email)
    )
    message["Date"] = format_datetime(now)
    message["Message-ID"] = message_id_for(content.token, smtp.sender)
    message["Reply-To"] = one_line(smtp.reply_to.replace("{token}", content.token))
    message["List-Unsubscribe"] = f"<{mailto(reply, 'unsubscribe', body=False)}>"
    message["Auto-Submitted"] = "auto-generated"
    # Exchange and Outlook honour this instead of Auto-Submitted: no out-of-office replies.
    message["X-Auto-Response-Suppress"] = "OOF, AutoReply"
    message.set_content(render_text(content, smtp))
    message.add_alternative(render_html(content, smtp), subtype="html")
    return message


def render_text(content: DigestContent, smtp: SmtpConfig | None = None) -> str:
    """The plain-text part, wrapped for reading and for being quoted in a reply."""
    text = _environment().get_template(TEXT_TEMPLATE).render(_context(content, smtp))
    return defuse_command_lines(text)


def render_html(content: DigestContent, smtp: SmtpConfig | None = None) -> str:
    """The HTML part: a table layout with every style inlined (Gmail drops <style>)."""
    html = _environment().get_template(HTML_TEMPLATE).render(_context(content, smtp))
    inliner = css_inline.CSSInliner(
        extra_css=_read_template(STYLESHEET),
        keep_style_tags=False,
        load_remote_stylesheets=False,
    )
    return inliner.inline(html)


def subject_for(content: DigestContent) -> str:
    """``Paper digest, Thu 12 Mar 2026: <top title> (+4 more)``, on one line."""
    head = f"Paper digest, {format_day(content.local_date)}"
    if not content.items:
        return f"{head}: nothing new for you today"
    top = min(content.items, key=lambda item: item.position)
    title = shorten(one_line(top.paper.title), SUBJECT_TITLE_CHARS) or "(untitled)"
    more = len(content.items) - 1
    return f"{head}: {title}" + (f" (+{more} more)" if more else "")


def format_day(day: date) -> str:
    """``Thu 12 Mar 2026`` in English whatever the process locale (strftime is not)."""
    return f"{_WEEKDAYS[day.weekday()]} {day.day} {_MONTHS[day.month - 1]} {day.year}"


def one_line(text: str) -> str:
    """Text fit for a header or a single line: line breaks and control characters gone."""
    kept = "".join(" " if unicodedata.category(ch) in ("Cc", "Zl", "Zp") else ch for ch in text)
    return " ".join(kept.split())


def shorten(text: str, limit: int) -> str:
    """``text`` cut after a whole word, within ``limit`` characters, then an ellipsis."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    head = text[: limit + 1]  # one more: a space right after the limit ends a whole word
    cut = head.rsplit(" ", 1)[0] if " " in head else text[:limit]
    return (cut.rstrip(" ,;:.-–—") or text[:limit]) + "…"


def is_bare_command(line: str) -> bool:
    """True when a line, read as a reply parser might read it, is nothing but a command."""
    return bool(_BARE_COMMAND.match(line.strip(_DECORATION)))


def defuse_command_lines(text: str) -> str:
    """Join any line that is a bare command onto the text line before it.

    The templates never write one, but wrapped free text (an abstract ending
    in "... we stop.") could; joining keeps the words and removes the risk.
    """
    lines: list[str] = []
    for line in text.split("\n"):
        if is_bare_command(line) and any(kept.strip() for kept in lines):
            while not lines[-1].strip():
                lines.pop()
            lines[-1] = f"{lines[-1].rstrip()} {line.strip()}"
        else:
            lines.append(line)
    return "\n".join(lines)


@dataclass(frozen=True)
class _ItemView:
    """What the templates show for one paper, prepared once for both parts."""

    position: int
    title: str
    snippet: str
    link: str
    link_label: str
    code_links: tuple[str, ...]
    reason: str
    explore: bool
    like_link: str
    skip_link: str


def _context(content: DigestContent, smtp: SmtpConfig | None) -> dict[str, Any]:
    reply = reply_address(smtp or SmtpConfig(), content.token)
    items = sorted(content.items, key=lambda item: item.position)
    return {
        "name": one_line(content.subscriber.name),
        "day": format_day(content.local_date),
        "considered": content.considered,
        "shown": len(items),
        "personalised": content.personalised,
        "items": [_item_view(item, reply) for item in items],
        "reply_address": reply,
        "command_links": {word: mailto(reply, word) for word in ("pause", "unsubscribe", "help")},
        "preheader": _preheader(content, items),
    }


def _item_view(item: DigestItem, reply: str) -> _ItemView:
    paper = item.paper
    snippet = shorten(paper.abstract, ABSTRACT_CHARS)
    if is_bare_command(snippet):
        snippet = f"Abstract: {snippet}"
    return _ItemView(
        position=item.position,
        title=one_line(paper.title) or "(untitled)",
        snippet=snippet,
        link=paper.link,
        link_label="arXiv" if paper.arxiv_id else "Search arXiv",
        code_links=tuple(link for link in map(safe_link, paper.code_links) if link),
        reason=one_line(item.reason),
        explore=item.explore,
        like_link=mailto(reply, f"like {item.position}"),
        skip_link=mailto(reply, f"skip {item.position}"),
    )


def _preheader(content: DigestContent, items: list[DigestItem]) -> str:
    """The line inbox lists show under the subject."""
    if not items:
        return f"None of the {content.considered} new papers made it into your digest today."
    return f"{len(items)} papers picked from {content.considered} new ones."


def _wrap(text: str, indent: str = "", first: str | None = None) -> str:
    """A Jinja filter: wrap a paragraph, leaving long URLs whole."""
    return textwrap.fill(
        " ".join(text.split()),
        width=TEXT_WIDTH,
        initial_indent=indent if first is None else first,
        subsequent_indent=indent,
        break_long_words=False,
        break_on_hyphens=False,
    )


@cache
def _environment() -> jinja2.Environment:
    """One Jinja environment for both parts; autoescape only for the HTML templates."""
    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(_load_template),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html", "html.j2"),
                                            default_for_string=False, default=False),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["wrap"] = _wrap
    return env


def _load_template(name: str) -> tuple[str, str, Callable[[], bool]]:
    return _read_template(name), name, lambda: True


def _read_template(name: str) -> str:
    try:
        return (template_root() / name).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise jinja2.TemplateNotFound(name) from None


@cache
def template_root() -> Traversable:
    """Where the templates are: the ``digest.templates`` package once installed,
    else the ``templates/`` folder beside ``digest/`` in a source checkout
    (an editable install maps no package there, so it takes this path too)."""
    try:
        return importlib.resources.files("digest.templates")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "templates"
