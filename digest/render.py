"""Render stage: turns one ranked digest into an email message.

Runs after ranking, once per subscriber and digest, and hands an
``email.message.EmailMessage`` (multipart/alternative: plain text, then HTML
with inlined CSS) to the mailer. It knows nothing of SMTP or of the database:
everything it shows arrives in a ``DigestContent``.

What a paper shows is prepared once for both parts (``_ItemView``): its title,
abstract, authors and the reason it was picked with their LaTeX as text
(pylatexenc), its arXiv id, listing date and relevance level, and its links.

Replies are read as commands, and a reply often quotes the original without
``>`` marks, so no line of the email (text part, or the HTML read as text the
way the reply reader reads it) is ever read as a command: templates name
commands only inside sentences, and every line of both parts is checked with
the reply parser's own test (:func:`digest.replies.parse.reads_as_command`).
A title, author list or abstract that would read as one gets a label
("Title:", "Authors:", "Abstract:"); a wrapped line that would is joined onto
the line before it.
"""

from __future__ import annotations

import base64
import email.policy
import importlib.resources
import logging
import re
import secrets
import textwrap
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
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
from pylatexenc import latexwalker, macrospec
from pylatexenc.latex2text import LatexNodes2Text, MacroTextSpec, get_default_latex_context_db

from .config import SmtpConfig, Subscriber
from .errors import DigestError
from .paper import Paper

logger = logging.getLogger(__name__)

ABSTRACT_CHARS = 300  # a few lines: enough to judge a paper, short enough to skim ten
# A cut at a sentence end is preferred while it keeps at least this share of ABSTRACT_CHARS;
# a shorter first sentence would leave too little to judge the paper by.
SENTENCE_CUT_SHARE = 0.5
SUBJECT_TITLE_CHARS = 90  # most mail clients show about this much of a subject
# Plain-text lines: 72 columns (RFC 2646's guidance) stay readable in an 80-column terminal
# even after a reply quotes them with "> " a few times.
TEXT_WIDTH = 72
TOKEN_BYTES = 10  # 80 random bits: 16 base32 characters, unguessable for a digest's life
SHOWN_AUTHORS = 3  # names shown before "et al.", as arXiv listings and most citation styles do
# Listings are daily (none at weekends), so a paper listed more than three days before the
# digest is not today's news: the header says so.
STALE_AFTER_DAYS = 3
# Relevance levels the ranking gives (strong > good > weak), as filled dots of a 3-dot bar.
RELEVANCE_DOTS = {"strong": 3, "good": 2, "weak": 1}
RELEVANCE_BAR_LENGTH = 3

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
    score: float  # the ranking's own scale: never shown to the reader
    reason: str
    explore: bool = False  # an exploration slot, marked as such in the email
    relevance: str | None = None  # "strong" / "good" / "weak" from ranking; None: not shown


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
    recipient = one_line(content.subscriber.email)
    # An internationalised address (RFC 6531) goes out as UTF-8 headers: encoded words are
    # not allowed in an address, and the mailer then asks the server for SMTPUTF8.
    message = EmailMessage(policy=EMAIL_POLICY if recipient.isascii()
                           else EMAIL_POLICY.clone(utf8=True))
    message["Subject"] = subject_for(content)
    message["From"] = one_line(smtp.sender)
    # username/domain, not addr_spec: the addr_spec parser rejects a non-ASCII local part.
    local, _, domain = recipient.rpartition("@")
    message["To"] = Address(display_name=one_line(content.subscriber.name), username=local,
                            domain=domain)
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


class UnsafeDigest(DigestError):
    """A digest would hold a line a reply reader takes for a command, even with every
    field labelled (only a reply-parser change that made a label word a command can
    cause this); the digest is not sent."""


def reads_as_command(line: str) -> bool:
    """The reply reader's own test: True when a reply holding ``line`` alone would apply a
    command from it (:func:`digest.replies.parse.reads_as_command`)."""
    # Imported on use: the replies stage imports this module (its confirmations use our
    # email policy), so a module-level import would be circular.
    from .replies.parse import reads_as_command as reader_test

    return reader_test(line)


def reader_text(html: str) -> str:
    """The HTML part as the reply reader turns HTML into text (a reply quoting it does)."""
    from .replies.parse import html_to_text  # imported on use: see reads_as_command

    return html_to_text(html)


def command_lines(text: str) -> list[str]:
    """The lines of ``text`` that the reply reader would take a command from."""
    return [line for line in text.splitlines() if reads_as_command(line)]


def render_text(content: DigestContent, smtp: SmtpConfig | None = None) -> str:
    """The plain-text part, wrapped for reading and for being quoted in a reply.

    Raises :class:`UnsafeDigest` if a line would still read as a command."""
    for force in (False, True):
        context = _context(content, smtp, label_all=force)
        text = defuse_command_lines(_environment().get_template(TEXT_TEMPLATE).render(context))
        if not command_lines(text):
            return text
    raise UnsafeDigest(f"the text part has lines a reply would read as commands: "
                       f"{command_lines(text)[:3]!r}")


# The class attributes the inliner has served: nothing reads them after inlining. The pattern
# cannot match text, since autoescaping turns every '"' in text into an entity.
_CLASS_ATTRIBUTE = re.compile(r' class="[^"<>]*"')


def render_html(content: DigestContent, smtp: SmtpConfig | None = None) -> str:
    """The HTML part: a table layout with every style inlined (some webmail drops <style>),
    and class attributes dropped once inlined, which keeps a 10-paper digest under 25 KB."""
    inliner = css_inline.CSSInliner(
        extra_css=_read_template(STYLESHEET),
        keep_style_tags=False,
        load_remote_stylesheets=False,
    )
    for force in (False, True):
        html = _environment().get_template(HTML_TEMPLATE).render(
            _context(content, smtp, label_all=force))
        html = _CLASS_ATTRIBUTE.sub("", inliner.inline(html))
        unsafe = command_lines(reader_text(html))
        if not unsafe:
            return html
    raise UnsafeDigest(f"the HTML part has lines a reply would read as commands: {unsafe[:3]!r}")


def subject_for(content: DigestContent) -> str:
    """``Paper digest, Thu 12 Mar 2026: <top title> (+4 more)``, on one line, LaTeX as text."""
    head = f"Paper digest, {format_day(content.local_date)}"
    if not content.items:
        return f"{head}: nothing new for you today"
    top = min(content.items, key=lambda item: item.position)
    title = shorten(one_line(plain_text(top.paper.title)), SUBJECT_TITLE_CHARS) or "(untitled)"
    more = len(content.items) - 1
    return f"{head}: {title}" + (f" (+{more} more)" if more else "")


def format_day(day: date) -> str:
    """``Thu 12 Mar 2026`` in English whatever the process locale (strftime is not)."""
    return f"{_WEEKDAYS[day.weekday()]} {day.day} {_MONTHS[day.month - 1]} {day.year}"


def format_short_day(day: date) -> str:
    """``12 Mar 2026``: a listing date, English whatever the locale."""
    return f"{day.day} {_MONTHS[day.month - 1]} {day.year}"


def listing_span(days: list[date]) -> str:
    """The listing dates a digest covers, as short as reads well.

    ``12 Mar 2026``, ``11-12 Mar 2026``, ``28 Feb-2 Mar 2026``,
    ``30 Dec 2025-2 Jan 2026``; '' for no dates. Gaps are not shown: it is a span.
    """
    if not days:
        return ""
    first, last = min(days), max(days)
    if first == last:
        return format_short_day(first)
    if (first.year, first.month) == (last.year, last.month):
        return f"{first.day}-{format_short_day(last)}"
    if first.year == last.year:
        return f"{first.day} {_MONTHS[first.month - 1]}-{format_short_day(last)}"
    return f"{format_short_day(first)}-{format_short_day(last)}"


def format_authors(authors: tuple[str, ...]) -> str:
    """Up to SHOWN_AUTHORS names, then ``et al. (N authors)``; '' when none are known.

    ``Ada Lovelace, Alan Turing and Grace Hopper`` for three;
    ``Ada Lovelace, Alan Turing, Grace Hopper et al. (12 authors)`` for twelve.
    """
    names = [name for name in (one_line(plain_text(a)) for a in authors) if name]
    # A listing that writes "et al." (or "others") as an author means more unnamed authors.
    unnamed = [n for n in names if n.lower().rstrip(".") in ("et al", "al", "others", "and others")]
    names = [n for n in names if n not in unnamed]
    if unnamed and names:
        return (", ".join(names[:SHOWN_AUTHORS]) + " et al.") if len(names) <= SHOWN_AUTHORS \
            else ", ".join(names[:SHOWN_AUTHORS]) + f" et al. ({len(names)}+ authors)"
    if len(names) <= 1:
        return "".join(names)
    if len(names) <= SHOWN_AUTHORS:
        return ", ".join(names[:-1]) + " and " + names[-1]
    return ", ".join(names[:SHOWN_AUTHORS]) + f" et al. ({len(names)} authors)"


# Bidirectional controls (LRE..RLO, LRI..PDI, LRM/RLM, ALM): in a title or a Subject they
# can show text reversed ("U+202E gnp.exe"); papers' text never needs them.
_BIDI_CONTROLS = dict.fromkeys(
    [*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C], None)


def one_line(text: str) -> str:
    """Text fit for a header or a single line: line breaks and control characters gone,
    bidirectional controls dropped."""
    kept = "".join(" " if unicodedata.category(ch) in ("Cc", "Zl", "Zp") else ch
                   for ch in text.translate(_BIDI_CONTROLS))
    return " ".join(kept.split())


# Signs that a title or abstract holds LaTeX markup; text without them is left as it is,
# so "50% & more" or "<b>" in plain text mean what they say.
_LATEX_MARKUP = re.compile(r"[\\${}]|``")
# Characters LaTeX treats as syntax but listings use as text: "50%", "R&D", "#1".
_LATEX_TEXT_SPECIALS = re.compile(r"(?<!\\)([%&#])")
_LATEX_TILDE_NUMBER = re.compile(r"(?<!\\)~(?=\d)")  # "~50 tokens": about, not a tie
_LATEX_DOLLAR = re.compile(r"(?<!\\)\$")
_LATEX_ERRORS = (latexwalker.LatexWalkerError, IndexError, KeyError, ValueError, TypeError,
                 RecursionError)


def _macro_argument(index: int) -> Callable[..., str]:
    """A replacement that shows a macro's ``index``-th argument as text ('' when missing:
    listings hold broken markup such as an unclosed ``\\href{``)."""

    def replace(node: Any, l2tobj: LatexNodes2Text, **_: Any) -> str:
        arguments = node.nodeargd.argnlist if node.nodeargd is not None else []
        if index < len(arguments) and arguments[index] is not None:
            return str(l2tobj.nodelist_to_text([arguments[index]]))
        return ""

    return replace


def _unknown_macro(node: Any, **_: Any) -> str:
    # A paper's own macro (\\Approach, \\ours): its name is the best text there is.
    return str(node.macroname) + _space_after(node)


def _words(text: str) -> Callable[..., str]:
    """A replacement by fixed words, keeping the space the source had after the macro."""

    def replace(node: Any, **_: Any) -> str:
        return text + _space_after(node)

    return replace


def _space_after(node: Any) -> str:
    # The parser swallows the space after a macro name ("\\eg flames"); words need it back.
    return " " if getattr(node, "macro_post_space", "") else ""


_FONT_SWITCHES = (
    "it", "bf", "rm", "sc", "sf", "tt", "sl", "em", "bfseries", "itshape", "scshape", "mdseries",
    "upshape", "slshape", "ttfamily", "rmfamily", "sffamily", "normalfont", "boldmath",
    "tiny", "scriptsize", "footnotesize", "small", "normalsize", "large", "Large", "LARGE",
    "huge", "Huge", "noindent", "centering", "xspace", "/",
)


@cache
def _latex_converter() -> tuple[LatexNodes2Text, Any]:
    """pylatexenc set up for listing text: its defaults, plus the macros abstracts use that
    it drops or mangles (\\href, \\url, \\texttt, \\cite, \\eg, \\LaTeX)."""
    walker_context = latexwalker.get_default_latex_context_db()
    walker_context.add_context_category("digest", prepend=True, macros=[
        macrospec.MacroSpec("href", "{{"), macrospec.MacroSpec("url", "{"),
        macrospec.MacroSpec("texttt", "{"), macrospec.MacroSpec("cite", "[{"),
    ])
    text_context = get_default_latex_context_db()
    text_context.add_context_category("digest", prepend=True, macros=[
        MacroTextSpec("href", simplify_repl=_macro_argument(1)),
        MacroTextSpec("url", simplify_repl=_macro_argument(0)),
        MacroTextSpec("texttt", simplify_repl=_macro_argument(0)),
        MacroTextSpec("cite", discard=True),
        MacroTextSpec("LaTeX", simplify_repl=_words("LaTeX")),
        MacroTextSpec("TeX", simplify_repl=_words("TeX")),
        MacroTextSpec("eg", simplify_repl=_words("e.g.")),
        MacroTextSpec("ie", simplify_repl=_words("i.e.")),
        MacroTextSpec("etal", simplify_repl=_words("et al.")),
        MacroTextSpec("etc", simplify_repl=_words("etc.")),
    ])
    # Old-style font and size switches ({\\it x}) carry no words: drop them, not name them.
    text_context.add_context_category("digest-switches", prepend=True, macros=[
        MacroTextSpec(name, discard=True) for name in _FONT_SWITCHES])
    text_context.set_unknown_macro_spec(MacroTextSpec("", simplify_repl=_unknown_macro))
    converter = LatexNodes2Text(latex_context=text_context, math_mode="text",
                                strict_latex_spaces=False)
    return converter, walker_context


def plain_text(text: str) -> str:
    """Listing text with its LaTeX markup as readable Unicode, on one line.

    ``\\textsc{AIEV-Instruct}`` -> ``AIEV-Instruct``, ``$\\alpha$-tuning \\& more`` ->
    ``α-tuning & more``; pylatexenc does the converting. Text without markup (no backslash,
    dollar, brace or ``) comes back as it is; markup the converter cannot read comes back with
    its braces and dollars dropped and a debug log line.
    """
    if not _LATEX_MARKUP.search(text):
        return one_line(text)
    source = _LATEX_TEXT_SPECIALS.sub(r"\\\1", text)
    source = _LATEX_TILDE_NUMBER.sub(r"\\textasciitilde{}", source)
    if len(_LATEX_DOLLAR.findall(source)) % 2:
        # An odd number of dollars pairs nothing: "$5 and $10" are prices, not maths.
        source = _LATEX_DOLLAR.sub(r"\\$", source)
    converter, walker_context = _latex_converter()
    try:
        converted = converter.latex_to_text(source, latex_context=walker_context,
                                            tolerant_parsing=True)
    except _LATEX_ERRORS as exc:
        logger.debug("LaTeX in %.60r not converted (%s): shown without braces", text, exc)
        converted = re.sub(r"[{}$]", "", text)
    return one_line(converted.replace("\xa0", " "))


def shorten(text: str, limit: int) -> str:
    """``text`` cut after a whole word, within ``limit`` characters, then an ellipsis."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    head = text[: limit + 1]  # one more: a space right after the limit ends a whole word
    cut = head.rsplit(" ", 1)[0] if " " in head else text[:limit]
    return (cut.rstrip(" ,;:.-–—") or text[:limit]) + "…"


# A full stop, ? or ! and a space, where the next word starts a sentence: a capital or digit.
_SENTENCE_END = re.compile(r"[.?!](?=\s+[\"'(“]?[A-Z0-9])")
# Abbreviations whose full stop ends no sentence ("et al. Smith", "e.g. Transformers").
_ABBREVIATIONS = ("e.g", "i.e", "et al", "etc", "vs", "cf", "Fig", "Eq", "Sec", "Tab", "resp",
                  "approx", "No", "Dr", "Prof", "St", "Inc", "Ltd")


def cut_abstract(text: str, limit: int = ABSTRACT_CHARS) -> str:
    """An abstract's opening within ``limit`` characters, cut where a sentence ends if that
    keeps at least ``SENTENCE_CUT_SHARE`` of it, else after a whole word with an ellipsis."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = 0
    for match in _SENTENCE_END.finditer(text, 0, limit + 4):  # a little past: the lookahead
        if match.end() > limit:
            break
        before = text[: match.start()]
        if not before.endswith(_ABBREVIATIONS) and not re.search(r"\b[A-Z]$", before):
            cut = match.end()
    if cut >= limit * SENTENCE_CUT_SHARE:
        return text[:cut]
    return shorten(text, limit)


def is_bare_command(line: str) -> bool:
    """True when a line, read as a reply parser might read it, is nothing but a command."""
    return bool(_BARE_COMMAND.match(line.strip(_DECORATION)))


def starts_with_command(line: str) -> bool:
    """True when a line opens with a command before its first comma or semicolon
    (``skip 2, and then ...``): the reply parser reads such a line as that command."""
    return is_bare_command(re.split(r"[,;]", line, maxsplit=1)[0])


def defuse_command_lines(text: str) -> str:
    """Join any line a reply reader would take a command from (:func:`reads_as_command`,
    or a command word opening it) onto the text line before it.

    The templates never write one, but wrapped free text (an abstract ending
    in "... we stop.", or "... we skip 2, 3 ...") could; joining keeps the
    words and removes the risk. A line with nothing before it, or whose joining
    would itself read as a command, gets the label "Text:" after its indent.
    """
    lines: list[str] = []
    for line in text.split("\n"):
        if not (starts_with_command(line) or reads_as_command(line)):
            lines.append(line)
            continue
        if any(kept.strip() for kept in lines):
            while not lines[-1].strip():
                lines.pop()
            joined = f"{lines[-1].rstrip()} {line.strip()}"
            if not reads_as_command(joined):
                lines[-1] = joined
                continue
        indent = line[: len(line) - len(line.lstrip())]
        lines.append(f"{indent}Text: {line.strip()}")
    return "\n".join(lines)


@dataclass(frozen=True)
class _Link:
    """One link under a paper: a short label for HTML, a longer one for the text part."""

    label: str
    text_label: str
    url: str


@dataclass(frozen=True)
class _ItemView:
    """What the templates show for one paper, prepared once for both parts."""

    position: int
    title: str
    title_label: str  # "Title: " where the title alone would read as a command, else ''
    title_link: str
    authors: str  # '' when the listing had none
    arxiv_id: str  # '' when unknown
    listed: str  # "11 Mar 2026", '' when unknown
    relevance: str  # "strong" / "good" / "weak" / '' when not given
    relevance_dots: int  # filled dots of the RELEVANCE_BAR_LENGTH-dot bar
    snippet: str
    snippet_label: str  # "Summary" for a generated summary, "Abstract" where needed, else ''
    links: tuple[_Link, ...]
    reason: str
    reason_label: str  # "Why" ("why 2" is a command: "Reason" where "Why: ..." would read as one)
    explore: bool
    like_link: str
    skip_link: str

    @property
    def relevance_bar(self) -> str:
        """``●●○``: the relevance as a bar of dots, for the text part."""
        return "●" * self.relevance_dots + "○" * self.relevance_rest

    @property
    def relevance_rest(self) -> int:
        """The bar's empty dots."""
        return RELEVANCE_BAR_LENGTH - self.relevance_dots

    @property
    def text_meta(self) -> str:
        """``arXiv 2603.00001 · listed 11 Mar 2026 · relevance: strong ●●●``, what is known."""
        parts = []
        if self.arxiv_id:
            parts.append(f"arXiv {self.arxiv_id}")
        if self.listed:
            parts.append(f"listed {self.listed}")
        if self.relevance:
            parts.append(f"relevance: {self.relevance} {self.relevance_bar}")
        return " · ".join(parts)


def _context(content: DigestContent, smtp: SmtpConfig | None, *,
             label_all: bool = False) -> dict[str, Any]:
    reply = reply_address(smtp or SmtpConfig(), content.token)
    items = sorted(content.items, key=lambda item: item.position)
    listed = [item.paper.listed_on for item in items if item.paper.listed_on]
    return {
        "name": one_line(content.subscriber.name),
        "day": format_day(content.local_date),
        "listed_span": listing_span(listed),
        "staleness": _staleness(content.local_date, listed),
        "considered": content.considered,
        "shown": len(items),
        "personalised": content.personalised,
        "items": [_item_view(item, reply, content.local_date, label_all=label_all)
                  for item in items],
        "reply_address": reply,
        "command_links": {word: mailto(reply, word) for word in ("pause", "unsubscribe", "help")},
        "preheader": _preheader(content, items),
    }


def _staleness(today: date, listed: list[date]) -> str:
    """A sentence when papers were listed over STALE_AFTER_DAYS before the digest, else ''."""
    if not listed:
        return ""
    limit = today - timedelta(days=STALE_AFTER_DAYS)
    newest, oldest = max(listed), min(listed)
    if newest < limit:
        age = (today - newest).days
        return (f"These papers are not fresh: the newest was listed on "
                f"{format_short_day(newest)}, {age} days before this digest.")
    if oldest < limit:
        age = (today - oldest).days
        return (f"Some are older: the oldest was listed on {format_short_day(oldest)}, "
                f"{age} days before this digest.")
    return ""


def _paper_links(paper: Paper) -> tuple[_Link, ...]:
    """Where to read a paper: arXiv abstract and PDF when its id is known, its Hugging Face
    daily-papers page when it came from that listing, its code; a title search otherwise."""
    links: list[_Link] = []
    if paper.arxiv_id:
        links.append(_Link("arXiv", "Paper:", paper.link))
        links.append(_Link("PDF", "PDF:", f"https://arxiv.org/pdf/{paper.arxiv_id}"))
        if paper.source == "daily-papers":
            links.append(_Link("HF page", "HF page:",
                               f"https://huggingface.co/papers/{paper.arxiv_id}"))
    else:
        links.append(_Link("Search arXiv", "Search:", paper.link))
    code = [link for link in map(safe_link, paper.code_links) if link]
    for n, url in enumerate(code, start=1):
        label = "Code" if len(code) == 1 else f"Code {n}"
        links.append(_Link(label, f"{label}:", url))
    return tuple(links)


def _opens_as_command(text: str, first: str = "") -> bool:
    """True when ``text`` shown on a line of its own (HTML) or wrapped after ``first``
    (text part) would give a first line a reply reader takes a command from."""
    if not text:
        return False
    opening = _wrap(text, "    ", first or "    ").split("\n", 1)[0]
    return (reads_as_command(f"{first}{text}") or reads_as_command(opening)
            or is_bare_command(text))


def _item_view(item: DigestItem, reply: str, local_date: date, *,
               label_all: bool = False) -> _ItemView:
    paper = item.paper
    snippet = cut_abstract(plain_text(_opening(paper.abstract)))
    label = "Summary" if paper.abstract_is_summary and snippet else ""
    if not label and snippet and (label_all or _opens_as_command(snippet)):
        label = "Abstract"
    title = plain_text(paper.title) or "(untitled)"
    number = f"{item.position}.".ljust(3) + " "
    title_label = "Title: " if label_all or _opens_as_command(title, number) else ""
    authors = format_authors(paper.authors)
    reason = plain_text(item.reason)  # reasons quote titles, LaTeX and all
    if paper.listed_on is not None and paper.listed_on < local_date:
        # Ranking words its reasons for the day's listing; a paper listed days ago is not.
        reason = reason.replace("popular today", "popular when listed").replace(
            "in today's listing", "in its listing")
    reason_label = "Why"
    if reason and (label_all or _opens_as_command(reason, "    Why:   ")):
        reason_label = "Reason"
    if authors and (label_all or _opens_as_command(authors)):
        authors = f"Authors: {authors}"
    relevance = one_line(item.relevance or "").lower()
    if relevance not in RELEVANCE_DOTS:
        relevance = ""  # only the ranking's known levels mean something to a reader
    return _ItemView(
        position=item.position,
        title=title,
        title_label=title_label,
        title_link=paper.link,
        authors=authors,
        arxiv_id=paper.arxiv_id or "",
        listed=format_short_day(paper.listed_on) if paper.listed_on else "",
        relevance=relevance,
        relevance_dots=RELEVANCE_DOTS.get(relevance, 0),
        snippet=snippet,
        snippet_label=label,
        links=_paper_links(paper),
        reason=reason,
        reason_label=reason_label,
        explore=item.explore,
        like_link=mailto(reply, f"like {item.position}"),
        skip_link=mailto(reply, f"skip {item.position}"),
    )


def _opening(abstract: str) -> str:
    """The part of a raw abstract that can end up shown, ending at a space: converting
    LaTeX costs time in proportion to length (tens of ms for a long abstract), and markup
    only shrinks when converted, so three times ABSTRACT_CHARS always holds the cut."""
    limit = ABSTRACT_CHARS * 3
    if len(abstract) <= limit:
        return abstract
    head = abstract[:limit]
    return head.rsplit(None, 1)[0] if " " in head else head


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
