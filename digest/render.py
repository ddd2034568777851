"""Render stage: turns one ranked digest into an email message.

Runs after ranking, once per subscriber and digest, and hands the mailer the
message built once as the bytes that go on the wire (:func:`render_digest_bytes`:
multipart/alternative, plain text then HTML with inline styles), or the same
message as an ``email.message.EmailMessage`` (:func:`render_digest`, parsed from
those bytes so the two never disagree). It knows nothing of SMTP or of the
database: everything it shows arrives in a ``DigestContent``.

What a paper shows is prepared once for both parts (``_ItemView``): its title,
abstract, authors and the reason it was picked with their LaTeX as text
(pylatexenc), its arXiv id, listing date and relevance level, and its links.
All of it is a pure function of the paper (and of the reason, position and
level), so it is memoised per process in bounded caches (``PAPER_MEMO`` and the
other ``*_MEMO`` sizes): a dispatch converts a paper's LaTeX and renders its
pieces once, not once per subscriber. Templates are compiled, and the
stylesheet inlined into them, once per process too. The page around the papers
is rendered once per set of counts and dates with a stand-in for the
subscriber's name, and each piece's quoted-printable encoding is memoised, so
per message only the lines holding the name or the reply address are new.

Replies are read as commands, and a reply often quotes the original without
``>`` marks, so no line of the email (text part, or the HTML read as text the
way the reply reader reads it) is ever read as a command: templates name
commands only inside sentences, and every line of both parts is checked with
the reply parser's own test (:func:`digest.replies.parse.reads_as_command`);
the HTML part is checked in pieces whose lines cover the whole part's
(:func:`html_pieces`), each once per process, and so is the text part when no line
of its pieces needs defusing (else it is rendered and defused whole). A title, author list or abstract
that would read as one gets a label ("Title:", "Authors:", "Abstract:"); a
wrapped line that would is joined onto the line before it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import email.policy
import hashlib
import importlib.resources
import logging
import re
import secrets
import textwrap
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from email import message_from_bytes, message_from_string
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from functools import cache, cached_property, lru_cache
from html.parser import HTMLParser
from importlib.resources.abc import Traversable
from operator import attrgetter
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote

import css_inline
import jinja2
import markupsafe
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
PAPER_TEMPLATE = "digest-paper.html.j2"  # one paper's row of the HTML part, in pieces
PAPER_TEXT_TEMPLATE = "digest-paper.txt.j2"  # one paper of the text part, in pieces
STYLESHEET = "digest.css"

# Memo sizes: what is a pure function of a paper, a field or a line is worked out once per
# process, not once per subscriber. A day's dispatch shows a few hundred candidate papers to
# every subscriber (a paper at each of its positions, with each relevance level); these bounds
# hold about a week of them, and cap the memory they take at a few tens of MB whatever the
# number of subscribers (least recently used entries go first).
PAPER_MEMO = 4096  # per-paper views: title, snippet, authors, links (~1.5 KB each)
# Views of papers as shown at a position for a reason (~5 KB each with their encoded row):
# reasons vary by subscriber, so a dispatch of 3,000 shows ~5,600 views.
VIEW_MEMO = 8192
ROW_MEMO = 16384  # rendered pieces of papers, HTML and text (~1 KB each)
TEXT_MEMO = 32768  # LaTeX-to-text conversions and wrapped paragraphs of titles, reasons...
LINE_MEMO = 65536  # lines checked with the reply reader's test (a line is ~80 bytes)
# Bodies are 7bit when ASCII with lines of at most this many characters, as the email
# package decides (its policy's max_line_length); else quoted-printable or base64.
SEVEN_BIT_LINE = 78
MAX_LINE_OCTETS = 998  # RFC 5322's limit on a line of a message, CRLF excluded

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
    domain = _plain_address(sender).rpartition("@")[2] or "localhost"
    return f"<digest.{token}@{domain}>"


@lru_cache(maxsize=64)
def _plain_address(text: str) -> str:
    """The address of a configured sender or reply-to (parsed once: parseaddr is slow)."""
    return parseaddr(text)[1]


def reply_address(smtp: SmtpConfig, token: str) -> str:
    """The plain address a reply to this digest goes to (``reply_to`` with its token)."""
    if token.isalnum() and token.isascii():
        # Letters and digits parse the same anywhere in an address: parse the setting once.
        plain = _plain_address(smtp.reply_to)
        return (plain or smtp.reply_to).replace("{token}", token)
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


@dataclass(frozen=True)
class RenderedDigest:
    """One digest as it goes on the wire, built once: claimed as these bytes, sent as they are.

    ``data`` is the complete RFC 5322 message (CRLF line ends, headers folded by
    ``EMAIL_POLICY``, bodies quoted-printable, base64 or 7bit, so every line stays ASCII
    and within 998 octets); ``smtputf8`` is True when an address (the recipient's or the
    sender's) is not ASCII: the headers are then UTF-8 (RFC 6532) and the message needs a
    server that offers SMTPUTF8.
    """

    data: bytes
    message_id: str
    subject: str
    smtputf8: bool


def render_digest_bytes(content: DigestContent, smtp: SmtpConfig, *,
                        now: datetime) -> RenderedDigest:
    """The complete email for one digest, serialised: headers, a text part and an HTML part
    (multipart/alternative). ``now`` must be timezone-aware; it becomes the Date header.

    Raises ``ValueError`` for a naive ``now`` and :class:`UnsafeDigest` when a line would
    read as a reply command even with every field labelled.
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("render_digest: now must be a timezone-aware datetime")
    reply = reply_address(smtp, content.token)
    recipient = one_line(content.subscriber.email)
    sender = one_line(smtp.sender)
    # An internationalised address (RFC 6531) goes out as UTF-8 headers: encoded words are
    # not allowed in an address, and the mailer then asks the server for SMTPUTF8.
    smtputf8 = not (recipient.isascii() and _plain_address(sender).isascii())
    policy = _wire_policy(smtputf8)
    subject = subject_for(content)
    message_id = message_id_for(content.token, smtp.sender)
    # username/domain, not addr_spec: the addr_spec parser rejects a non-ASCII local part.
    local, _, domain = recipient.rpartition("@")
    to = Address(display_name=one_line(content.subscriber.name), username=local, domain=domain)
    boundary = "=_" + hashlib.sha256(content.token.encode("utf-8")).hexdigest()[:32]
    head = [
        _header("Subject", subject, policy),
        _header("From", sender, policy),
        _header("To", to, policy),
        _header("Date", _date_value(now), policy),
        _header("Message-ID", message_id, policy),
        _header("Reply-To", one_line(smtp.reply_to.replace("{token}", content.token)), policy),
        _header("List-Unsubscribe", f"<{mailto(reply, 'unsubscribe', body=False)}>", policy),
        b"Auto-Submitted: auto-generated\r\n",
        # Exchange and Outlook honour this instead of Auto-Submitted: no out-of-office replies.
        b"X-Auto-Response-Suppress: OOF, AutoReply\r\n",
        b"MIME-Version: 1.0\r\n",
        # The boundary starts "=_", which quoted-printable and base64 never write.
        f'Content-Type: multipart/alternative;\r\n boundary="{boundary}"\r\n'.encode("ascii"),
        b"\r\n",
    ]
    delimiter = f"--{boundary}".encode("ascii")
    views = _Views(content)
    name = one_line(content.subscriber.name)
    body = [_part("plain", _text_pieces(content, views), delimiter, ((_NAME_SLOT, name),)),
            _html_part(content, views, delimiter, _html_fills(name, reply))]
    data = b"".join([*head, *body, delimiter, b"--\r\n"])
    return RenderedDigest(data=data, message_id=message_id, subject=subject, smtputf8=smtputf8)


def render_digest(content: DigestContent, smtp: SmtpConfig, *, now: datetime) -> EmailMessage:
    """The complete email for one digest as an ``EmailMessage``: :func:`render_digest_bytes`
    parsed back, so the two never disagree. ``now`` must be timezone-aware."""
    rendered = render_digest_bytes(content, smtp, now=now)
    policy = EMAIL_POLICY.clone(utf8=True) if rendered.smtputf8 else EMAIL_POLICY
    # Parsed with this policy's own line ends: the parser keeps a 7bit body's CRLFs as text.
    data = rendered.data.replace(b"\r\n", b"\n")
    # UTF-8 headers (RFC 6532) are read from text: from bytes the parser would escape them.
    # The bodies are ASCII (quoted-printable, base64 or 7bit) either way.
    message = (message_from_string(data.decode("utf-8"), policy=policy) if rendered.smtputf8
               else message_from_bytes(data, policy=policy))
    if not isinstance(message, EmailMessage):  # pragma: no cover - an EmailPolicy makes one
        raise TypeError("the email policy did not parse to an EmailMessage")
    return message


def _date_value(now: datetime) -> str:
    """The Date header's value: a dispatch gives every message the same ``now``."""
    # Keyed by the ISO form too: datetimes of one instant in two zones are equal (and hash
    # alike), but their Date values differ (``08:00 +0100`` is not ``07:00 +0000``).
    return _date_value_of(now.isoformat(), now)


@lru_cache(maxsize=16)
def _date_value_of(iso: str, now: datetime) -> str:
    return format_datetime(now)


@cache
def _wire_policy(utf8: bool) -> email.policy.EmailPolicy:
    """``EMAIL_POLICY`` with CRLF line ends, as the bytes go to the server."""
    return EMAIL_POLICY.clone(linesep="\r\n", utf8=utf8)


# A header value the email package would write as it is: printable ASCII, no encoded-word
# look-alike ("=?"), short enough that nothing folds.
_PLAIN_HEADER_VALUE = re.compile(r"[\x20-\x7e]*")


def _header(name: str, value: str | Address, policy: email.policy.EmailPolicy) -> bytes:
    """One header line as the email package writes it with ``policy``: folded to 78
    columns, RFC 2047 encoded words for non-ASCII text unless the policy is UTF-8.

    The common case (a short printable ASCII value) is written directly; anything else
    goes through the email package's own folding (a test checks the two agree)."""
    text = str(value)
    plain = ("=?" not in text and text == text.strip()
             and _PLAIN_HEADER_VALUE.fullmatch(text) is not None)
    if plain and len(name) + 2 + len(text) <= (policy.max_line_length or MAX_LINE_OCTETS):
        return f"{name}: {text}\r\n".encode("ascii")
    if plain and name.lower() in EMAIL_POLICY.unfolded_headers \
            and len(name) + 2 + len(text) <= MAX_LINE_OCTETS:
        return f"{name}: {text}\r\n".encode("ascii")  # a URL header stays one line
    if isinstance(value, str):
        return _folded(name, value, policy)  # subjects repeat: many share a top paper
    return policy.fold_binary(name, policy.header_store_parse(name, value)[1])


@lru_cache(maxsize=PAPER_MEMO)
def _folded(name: str, value: str, policy: email.policy.EmailPolicy) -> bytes:
    return policy.fold_binary(name, policy.header_store_parse(name, value)[1])


def _part(subtype: str, pieces: Sequence[str], delimiter: bytes,
          fills: Sequence[tuple[str, str]] = ()) -> bytes:
    """One text part (UTF-8) after its delimiter line: its headers and its encoded body,
    the body being ``pieces`` joined, each stand-in of ``fills`` (stand-in, text) replaced
    by its text (which holds no line break).

    As the email package does with a 7bit policy: ASCII with short lines stays 7bit, other
    text goes quoted-printable, or base64 when that is shorter (mostly non-Latin text).
    Pieces that are whole lines (end with LF, no CR) are encoded once per process each
    (:func:`_encoded_piece`), and per message only their lines that hold a stand-in:
    quoted-printable encodes each line on its own, so the encodings joined are the whole
    body's (a test checks against :func:`_part_of_text`).
    """
    encoded = [_encode_piece(piece) if isinstance(piece, _OwnPiece) else _encoded_piece(piece)
               for piece in pieces]
    if not all(map(attrgetter("whole"), encoded)):
        return _part_of_text(subtype, _filled("".join(pieces), fills), delimiter)
    return _part_of_chunks(subtype, [chunk for piece in encoded
                                     for chunk in (piece.chunks or (piece,))], delimiter, fills)


def _part_of_chunks(subtype: str, chunks: Sequence[_EncodedPiece | str | _Compiled],
                    delimiter: bytes, fills: Sequence[tuple[str, str]]) -> bytes:
    """:func:`_part` for a body of whole lines already encoded in chunks: each chunk is
    encoded lines, one line (a ``str``) with a stand-in, filled and encoded here, or a run
    of both compiled for reply addresses of one length (:func:`_compiled_chunks`; only
    when the reply address of ``fills`` is literal and that long)."""
    raws: list[bytes] = []
    quoted: list[bytes] = []
    seven_bit = True
    reply = dict(fills).get(_REPLY_SLOT, "")
    literal = bool(reply) and _QP_LITERAL.fullmatch(reply) is not None
    reply_bytes = reply.encode("ascii") if literal else b""
    for chunk in chunks:
        if isinstance(chunk, _Compiled):  # a run encoded for addresses of this length
            if not literal or chunk.length != len(reply_bytes):  # pragma: no cover - callers
                raise ValueError("a compiled run for another reply address length")
            raws.append(reply_bytes.join(chunk.raw_parts))
            quoted.append(reply_bytes.join(chunk.quoted_parts) if chunk.quoted_parts is not None
                          else b"".join([part if isinstance(part, bytes)
                                         else reply_bytes[part[0]:part[1]]
                                         for part in chunk.quoted_pieces]))
            seven_bit = seven_bit and chunk.seven_bit
            continue
        if isinstance(chunk, str):  # a line with a stand-in: filled for this message
            plan = _reply_line(chunk, len(reply_bytes)) if literal else None
            if plan is not None:
                raws.append(reply_bytes.join(plan.raw_parts))
                quoted.append(b"".join([part if isinstance(part, bytes)
                                        else reply_bytes[part[0]:part[1]]
                                        for part in plan.quoted_parts]))
                seven_bit = seven_bit and plan.seven_bit
                continue
            chunk = _encode_line(_filled(chunk, fills))
        raws.append(chunk.raw)
        quoted.append(chunk.quoted)
        seven_bit = seven_bit and chunk.seven_bit
    if not any(raws):  # no text at all is one empty line, as the email package writes it
        return _part_of_text(subtype, "", delimiter)
    raw = b"".join(raws)
    if seven_bit and delimiter not in raw:
        return _part_bytes(subtype, "7bit", raw, delimiter)
    body = b"".join(quoted)
    if len(body) > len(raw) * 4 // 3:  # worth comparing with base64's size
        encoded64 = base64.encodebytes(raw)
        if len(encoded64) < len(body):
            return _part_bytes(subtype, "base64", encoded64, delimiter)
    return _part_bytes(subtype, "quoted-printable", body, delimiter)


def _filled(text: str, fills: Sequence[tuple[str, str]]) -> str:
    for slot, value in fills:
        text = text.replace(slot, value)
    return text


def _html_fills(name: str, reply: str) -> tuple[tuple[str, str], ...]:
    """What the HTML part's stand-ins become: the name escaped as Jinja escapes it, the
    reply address URL-quoted (it goes into mailto links only: it can never be text)."""
    return ((_NAME_SLOT, str(markupsafe.escape(name))), (_REPLY_SLOT, quote(reply, safe="@+")))


def _part_of_text(subtype: str, content: str, delimiter: bytes) -> bytes:
    """:func:`_part` for any text, encoded whole: the rule the piecewise encoding follows."""
    lines = content.encode("utf-8").splitlines() or [b""]  # CR, LF or CRLF, as email does
    raw = b"\n".join(lines) + b"\n"
    if raw.isascii() and max(map(len, lines), default=0) <= SEVEN_BIT_LINE \
            and delimiter not in raw:
        cte, body = "7bit", raw
    else:
        cte, body = "quoted-printable", b"".join(map(_quoted_printable, lines))
        if len(body) > len(raw) * 4 // 3:  # worth comparing with base64's size
            encoded = base64.encodebytes(raw)
            if len(encoded) < len(body):
                cte, body = "base64", encoded
    return _part_bytes(subtype, cte, body, delimiter)


def _part_bytes(subtype: str, cte: str, body: bytes, delimiter: bytes) -> bytes:
    body = body.replace(b"\n", b"\r\n")
    head = (f'\r\nContent-Type: text/{subtype}; charset="utf-8"\r\n'
            f"Content-Transfer-Encoding: {cte}\r\n\r\n")
    # The CRLF before the next delimiter belongs to it (RFC 2046), not to this body.
    return delimiter + head.encode("ascii") + body + b"\r\n"


def _whole_lines(piece: str) -> bool:
    """True when ``piece`` is whole lines: it ends with LF (or is empty) and holds no CR
    (the email package also ends a line at a CR), so a body's lines are its pieces'."""
    return (piece.endswith("\n") or not piece) and "\r" not in piece


class _EncodedPiece(NamedTuple):
    """A piece as a part's body holds it: UTF-8 (LF line ends) and quoted-printable;
    ``seven_bit`` when ASCII with lines of at most SEVEN_BIT_LINE; ``whole`` when it is
    whole lines (:func:`_whole_lines`), so that it can be encoded apart. A piece of whole
    lines with stand-ins has ``chunks``: its runs of lines without one, encoded, and each
    line with one, as text to fill and encode per message."""

    raw: bytes
    quoted: bytes
    seven_bit: bool
    whole: bool
    chunks: tuple[_EncodedPiece | str, ...] | None = None


def _encode_piece(piece: str) -> _EncodedPiece:
    raw = piece.encode("utf-8")
    seven_bit = raw.isascii() and max(map(len, raw.split(b"\n"))) <= SEVEN_BIT_LINE
    whole = _whole_lines(piece)
    if whole and (_NAME_SLOT in piece or _REPLY_SLOT in piece):
        chunks: list[_EncodedPiece | str] = []
        run: list[str] = []
        for line in piece[:-1].split("\n"):
            if _NAME_SLOT in line or _REPLY_SLOT in line:
                if run:
                    chunks.append(_encode_piece("".join(run)))
                    run = []
                chunks.append(line + "\n")
            else:
                run.append(line + "\n")
        if run:
            chunks.append(_encode_piece("".join(run)))
        return _EncodedPiece(raw, b"", seven_bit, whole, tuple(chunks))
    return _EncodedPiece(raw, binascii.b2a_qp(raw, istext=True), seven_bit, whole)


def _encode_line(line: str) -> _EncodedPiece:
    """:func:`_encode_piece` for one filled line: its only LF at its end, no CR (a test
    checks the two agree); anything else goes to :func:`_encode_piece`."""
    if "\r" in line or line.find("\n") != len(line) - 1:
        return _encode_piece(line)
    raw = line.encode("utf-8")
    return _EncodedPiece(raw, binascii.b2a_qp(raw, istext=True),
                         raw.isascii() and len(raw) <= SEVEN_BIT_LINE + 1, True)


# What a URL-quoted reply address is made of: characters quoted-printable writes as they
# are (printable ASCII but "="; a "." only when it stands alone before a line end, which
# _reply_line rules out).
_QP_LITERAL = re.compile(r"[A-Za-z0-9_.~@+%-]+")
# Stand-ins for the reply address's characters in a line encoded once: printable ASCII that
# quoted-printable writes as they are, and that no "=XX" escape holds.
_MARKERS = "~^|`!#*"


class _ReplyLine(NamedTuple):
    """A line whose only stand-ins are the reply address's, encoded once for addresses of
    one length: its bytes around the address (``raw_parts``), and its quoted-printable as
    bytes and (start, end) slices of the address, in order (``quoted_parts``)."""

    raw_parts: tuple[bytes, ...]
    quoted_parts: tuple[bytes | tuple[int, int], ...]
    seven_bit: bool


@lru_cache(maxsize=ROW_MEMO)
def _reply_line(line: str, length: int) -> _ReplyLine | None:
    """The line (one LF, at its end) encoded around a reply address of ``length``
    characters that quoted-printable writes as they are (``_QP_LITERAL``); None when it
    cannot be (a name in it, no free marker, or the address right before the line end,
    where a lone "." would be escaped).

    Quoted-printable decides each character's encoding and its soft line breaks from the
    character, the line length so far and whether the next one ends the line; a literal
    character in place of each of the address's gives the same decisions, so the encoding
    with markers, the markers replaced by the address's characters, is the filled line's
    (a test checks)."""
    marker = next((c for c in _MARKERS if c not in line), None)
    if (marker is None or length < 1 or _NAME_SLOT in line or "\r" in line
            or line.find("\n") != len(line) - 1 or _REPLY_SLOT + "\n" in line
            or "\0" in line):
        return None
    raw_parts = tuple(part.encode("utf-8") for part in line.split(_REPLY_SLOT))
    template = line.replace(_REPLY_SLOT, marker * length).encode("utf-8")
    code = ord(marker)
    parts: list[bytes | tuple[int, int]] = []
    text = bytearray()
    at, start = 0, -1  # the address's character the next marker stands for; a run's first
    for byte in binascii.b2a_qp(template, istext=True):
        if byte != code:
            if start >= 0:  # a soft line break inside the address
                parts.append((start, at))
                start = -1
            text.append(byte)
            continue
        if start < 0:
            parts.append(bytes(text))
            text.clear()
            start = at
        at += 1
        if at == length:
            parts.append((start, at))
            at, start = 0, -1
    parts.append(bytes(text))
    seven_bit = template.isascii() and len(template) <= SEVEN_BIT_LINE + 1
    return _ReplyLine(raw_parts, tuple(part for part in parts if part != b""), seven_bit)


class _Compiled(NamedTuple):
    """A run of chunks (encoded lines and lines holding only reply-address stand-ins) made
    ready for reply addresses of ``length`` characters that quoted-printable writes as they
    are: its bytes are ``address.join(raw_parts)``, its quoted-printable
    ``address.join(quoted_parts)`` or, when a soft line break cuts an address (then
    ``quoted_parts`` is None), ``quoted_pieces`` joined with each (start, end) slice of the
    address put in."""

    length: int
    raw_parts: tuple[bytes, ...]
    quoted_parts: tuple[bytes, ...] | None
    quoted_pieces: tuple[bytes | tuple[int, int], ...]
    seven_bit: bool


def _compiled_chunks(chunks: Sequence[_EncodedPiece | str],
                     length: int) -> tuple[_Compiled | str, ...]:
    """``chunks`` with each run of encoded lines and reply-address lines compiled into one
    :class:`_Compiled` for addresses of ``length`` characters; a line that cannot be
    (one holding the name, or no plan: :func:`_reply_line`) stays a ``str``, filled and
    encoded per message. Per message a paper's row is then two joins, not a join and a
    look-up per line (a test checks the part is the same)."""
    out: list[_Compiled | str] = []
    raws: list[bytes] = []  # the raw parts so far, the last one still growing
    tail: list[bytes] = []
    pieces: list[bytes | tuple[int, int]] = []
    seven_bit = True
    started = False

    def close() -> None:
        nonlocal raws, tail, pieces, seven_bit, started
        if not started:
            return
        raw_parts = (*raws, b"".join(tail))
        merged: list[bytes | tuple[int, int]] = []
        for piece in pieces:
            if isinstance(piece, bytes) and merged and isinstance(merged[-1], bytes):
                merged[-1] += piece
            else:
                merged.append(piece)
        whole = all(isinstance(p, bytes) or p == (0, length) for p in merged)
        quoted_parts: tuple[bytes, ...] | None = None
        if whole:
            between: list[bytes] = [b""]
            for piece in merged:
                if isinstance(piece, bytes):
                    between[-1] += piece
                else:
                    between.append(b"")
            quoted_parts = tuple(between)
        # The pieces only when an address is cut (the joined parts hold the same bytes).
        out.append(_Compiled(length, raw_parts, quoted_parts,
                             () if quoted_parts is not None else tuple(merged), seven_bit))
        raws, tail, pieces, seven_bit, started = [], [], [], True, False

    for chunk in chunks:
        if isinstance(chunk, str):
            plan = _reply_line(chunk, length)
            if plan is None:
                close()
                out.append(chunk)
                continue
            first, *rest = plan.raw_parts
            tail.append(first)
            for part in rest:
                raws.append(b"".join(tail))
                tail = [part]
            pieces.extend(plan.quoted_parts)
            seven_bit = seven_bit and plan.seven_bit
        else:
            tail.append(chunk.raw)
            pieces.append(chunk.quoted)
            seven_bit = seven_bit and chunk.seven_bit
        started = True
    close()
    return tuple(out)


def _merged_chunks(pieces: Sequence[str]) -> tuple[_EncodedPiece | str, ...] | None:
    """Pieces of whole lines as the chunks :func:`_part_of_chunks` takes, runs of encoded
    lines merged into one chunk (quoted-printable encodes each line on its own, so the
    encodings joined are the lines' joined); None when a piece is not whole lines."""
    encoded = [_encoded_piece(piece) for piece in pieces]
    if not all(map(attrgetter("whole"), encoded)):
        return None
    merged: list[_EncodedPiece | str] = []
    run: list[_EncodedPiece] = []
    for chunk in (chunk for piece in encoded for chunk in (piece.chunks or (piece,))):
        if isinstance(chunk, str):
            merged.extend(_joined_run(run))
            run = []
            merged.append(chunk)
        else:
            run.append(chunk)
    merged.extend(_joined_run(run))
    return tuple(merged)


def _joined_run(run: Sequence[_EncodedPiece]) -> list[_EncodedPiece]:
    """Encoded pieces of whole lines as one ([] for none)."""
    if len(run) < 2:
        return list(run)
    return [_EncodedPiece(b"".join([piece.raw for piece in run]),
                          b"".join([piece.quoted for piece in run]),
                          all(piece.seven_bit for piece in run), True)]


class _OwnPiece(str):
    """A piece of a part that one subscriber's message alone holds (a text part rendered
    whole, see :func:`_text_pieces`): encoded each time, not memoised."""


# Pieces shared by many messages (a paper's, a page's), encoded once per process.
_encoded_piece = lru_cache(maxsize=ROW_MEMO)(_encode_piece)


@lru_cache(maxsize=LINE_MEMO)
def _quoted_printable(line: bytes) -> bytes:
    """One line (no line end) quoted-printable, with its line end; memoised, as lines repeat
    from one digest to the next. Quoted-printable encodes each line on its own, so the lines'
    encodings joined are the body's (a test checks). binascii's encoder keeps lines within
    76 characters, as RFC 2045 asks."""
    return binascii.b2a_qp(line + b"\n", istext=True)


class UnsafeDigest(DigestError):
    """A digest would hold a line a reply reader takes for a command, even with every
    field labelled (only a reply-parser change that made a label word a command can
    cause this); the digest is not sent."""


@lru_cache(maxsize=LINE_MEMO)
def reads_as_command(line: str) -> bool:
    """The reply reader's own test: True when a reply holding ``line`` alone would apply a
    command from it (:func:`digest.replies.parse.reads_as_command`); memoised per line."""
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
    return _render_text(content, _Views(content))


class _Views:
    """The views of a digest's items in order, unlabelled and labelled, each worked out
    once for both parts."""

    def __init__(self, content: DigestContent) -> None:
        self.content = content
        self.items = sorted(content.items, key=lambda item: item.position)
        self._views: dict[bool, list[_ItemView]] = {}

    @cached_property
    def page_key(self) -> tuple[Any, ...]:
        """What the page around the papers shows but the name (:func:`_page_key`)."""
        return _page_key(self.content, self.items)

    def __call__(self, *, label_all: bool) -> list[_ItemView]:
        if label_all not in self._views:
            self._views[label_all] = [_view_of(item, self.content.local_date,
                                               label_all=label_all) for item in self.items]
        return self._views[label_all]


def _render_text(content: DigestContent, views_of: _Views) -> str:
    name = one_line(content.subscriber.name)
    return "".join(_text_pieces(content, views_of)).replace(_NAME_SLOT, name)


def _text_pieces(content: DigestContent, views_of: _Views) -> list[str]:
    """The text part in pieces of whole lines: the page before the papers (with
    ``_NAME_SLOT`` where the greeting's name goes), each paper, the page after them.

    The pieces are the page rendered whole (:func:`_render_text_whole`) when no line of
    them needs defusing, which is checked once per piece and process, and per subscriber
    only for the lines that hold their name; otherwise the page is rendered whole."""
    page = _text_page(views_of.page_key)
    views = views_of(label_all=False)
    name = one_line(content.subscriber.name)
    if page.clean and all(view.text_clean for view in views) \
            and not any(map(_needs_defusing_now, page.own_lines(name))):
        return [page.before, *[view.text_paper for view in views], page.after]
    return [_OwnPiece(_render_text_whole(content, views_of))]


def _render_text_whole(content: DigestContent, views_of: _Views) -> str:
    """The text part rendered whole, its lines defused, then labelled if still unsafe."""
    items = views_of.items
    for force in (False, True):
        views = views_of(label_all=force)
        papers = "".join(view.text_paper for view in views)
        page = _environment().get_template(TEXT_TEMPLATE).render(
            _page_context(content, items), papers=papers)
        text = defuse_command_lines(page)
        if not command_lines(text):
            return text
    raise UnsafeDigest(f"the text part has lines a reply would read as commands: "
                       f"{command_lines(text)[:3]!r}")


@dataclass(frozen=True)
class _PageText:
    """The text part's page around the papers, for everyone it shows the same thing to:
    ``before`` holds ``_NAME_SLOT`` where the subscriber's name goes."""

    before: str
    after: str
    clean: bool  # whole lines, and no line but the name's needs defusing
    name_lines: tuple[str, ...]  # the lines of ``before`` that hold the name

    def own_lines(self, name: str) -> list[str]:
        """The lines that hold the name, with ``name`` in them."""
        return [line.replace(_NAME_SLOT, name) for line in self.name_lines]


@lru_cache(maxsize=256)
def _text_page(key: tuple[Any, ...]) -> _PageText:
    context = {**dict(zip(_PAGE_KEY_FIELDS, key)), "name": _NAME_SLOT,
               "command_links": _command_links()}
    page = _environment().get_template(TEXT_TEMPLATE).render(context, papers=_PAPERS_SLOT)
    before, _, after = page.partition(_PAPERS_SLOT)
    lines = before.split("\n")
    name_lines = tuple(line for line in lines if _NAME_SLOT in line)
    constant = "\n".join(line for line in lines if _NAME_SLOT not in line)
    clean = (_whole_lines(before) and _text_is_clean(constant) and _text_is_clean(after)
             and _NAME_SLOT not in after and _PAPERS_SLOT not in after)
    return _PageText(before=before, after=after, clean=clean, name_lines=name_lines)


def _text_is_clean(text: str) -> bool:
    """True when ``text`` is whole lines none of which :func:`defuse_command_lines` would
    change or :func:`command_lines` would report."""
    if not _whole_lines(text) or any(map(_needs_defusing, text.split("\n"))):
        return False
    # _needs_defusing asked the reader's test of every line already, unless splitlines
    # (command_lines) cuts the text at other characters too.
    return _OTHER_LINE_BREAK.search(text) is None or not command_lines(text)


# What str.splitlines ends a line at besides LF (CR makes a piece not whole lines anyway).
_OTHER_LINE_BREAK = re.compile("[\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


def _needs_defusing_now(line: str) -> bool:
    """:func:`_needs_defusing` for a line with a subscriber's own text (see
    :func:`_reader_test` for why not memoised with shared lines); a line that ``splitlines`` would cut
    (no name has one: :func:`one_line`) counts too, as the whole page's check reads it apart."""
    return len(line.splitlines()) > 1 or starts_with_command(line) or _reader_test(line)


@lru_cache(maxsize=16)
def _reader_test(line: str) -> bool:
    """:func:`reads_as_command` for lines with a subscriber's own text, in a memo of the
    last few: it holds a digest's lines while both parts ask (the greeting line is the same
    in both), and would only push shared lines out of the large one."""
    from .replies.parse import reads_as_command as reader_test  # see reads_as_command

    return reader_test(line)


def render_html(content: DigestContent, smtp: SmtpConfig | None = None) -> str:
    """The HTML part: a table layout with every style inlined (some webmail drops <style>).

    Built from pieces (:func:`html_pieces`) whose reader text is checked once each;
    raises :class:`UnsafeDigest` if a line would still read as a command."""
    return _render_html(content, smtp or SmtpConfig(), _Views(content))


def _render_html(content: DigestContent, smtp: SmtpConfig, views_of: _Views) -> str:
    reply = reply_address(smtp, content.token)
    pieces = _html_pieces(content, views_of)
    return _filled("".join(pieces), _html_fills(one_line(content.subscriber.name), reply))


def html_pieces(content: DigestContent) -> list[str]:
    """The HTML part in pieces, with a stand-in for the reply address (render_html puts the
    address in): the page's head, a row per paper and the footer.

    Every piece starts and ends where the reply reader starts a new line (a ``<tr>`` or
    ``<p>`` boundary, outside any element the reader hides), so the lines of the whole
    part as the reader sees it are the lines of the pieces (a property test checks this),
    and each piece is checked once: a paper row once per process, not per subscriber.
    A row that holds a command is rendered again with every field labelled.
    """
    name = str(markupsafe.escape(one_line(content.subscriber.name)))
    return [piece.replace(_NAME_SLOT, name) for piece in _html_pieces(content, _Views(content))]


def _html_pieces(content: DigestContent, views_of: _Views) -> list[str]:
    views = _html_views(views_of)
    page = _checked_html_page(content, views_of)
    return [page.head, page.intro, *[piece for view in views for piece in view.html_row or ()],
            page.footer]


def _html_part(content: DigestContent, views_of: _Views, delimiter: bytes,
               fills: Sequence[tuple[str, str]]) -> bytes:
    """The HTML part (:func:`_part` of :func:`_html_pieces`) from the chunks each paper's
    view and each page holds encoded already: per message, only the lines with a stand-in
    are filled and encoded."""
    views = _html_views(views_of)
    page = _checked_html_page(content, views_of)
    reply = dict(fills).get(_REPLY_SLOT, "")
    if reply and _QP_LITERAL.fullmatch(reply) is not None:  # each run compiled once
        length = len(reply)
        compiled = [view.html_compiled(length) for view in views]
        before, after = page.compiled(length)
        if before is not None and after is not None and None not in compiled:
            return _part_of_chunks("html", [*before, *[chunk for row in compiled
                                                       for chunk in row or ()], *after],
                                   delimiter, fills)
    rows = [view.html_chunks for view in views]
    if page.before_chunks is None or page.after_chunks is None or None in rows:
        return _part("html", _html_pieces(content, views_of), delimiter, fills)
    chunks = [*page.before_chunks, *[chunk for row in rows for chunk in row or ()],
              *page.after_chunks]
    return _part_of_chunks("html", chunks, delimiter, fills)


def _html_views(views_of: _Views) -> list[_ItemView]:
    """Each item's view whose HTML row the part shows: unlabelled, else every field labelled.

    Raises :class:`UnsafeDigest` when even the labelled row holds a command."""
    views: list[_ItemView] = []
    for n, item in enumerate(views_of.items):
        view = views_of(label_all=False)[n]
        if view.html_row is None:
            view = views_of(label_all=True)[n]
        if view.html_row is None:
            raise UnsafeDigest(f"the HTML part of paper {item.position} has lines a reply "
                               "would read as commands, even with every field labelled")
        views.append(view)
    return views


def _checked_html_page(content: DigestContent, views_of: _Views) -> _PageHtml:
    """The HTML page around the papers; raises :class:`UnsafeDigest` when a line of it, the
    subscriber's name in, reads as a command."""
    page = _html_page(views_of.page_key)
    name = one_line(content.subscriber.name)
    unsafe = page.unsafe or [line for line in page.own_lines(name) if _reader_test(line)]
    if unsafe:
        raise UnsafeDigest(f"the HTML part has lines a reply would read as commands: "
                           f"{list(unsafe[:3])!r}")
    return page


@dataclass(frozen=True)
class _PageHtml:
    """The HTML part's page around the papers, for everyone it shows the same thing to, in
    pieces (:func:`html_pieces`): ``intro`` holds ``_NAME_SLOT`` where the subscriber's
    name goes."""

    head: str
    intro: str
    footer: str
    unsafe: tuple[str, ...]  # lines, as the reply reader reads the pieces, it takes commands from
    name_lines: tuple[str, ...]  # the intro's lines as the reader reads it that hold the name

    def own_lines(self, name: str) -> list[str]:
        """The lines, as the reply reader reads the intro, that hold ``name``.

        The name is one line (:func:`one_line`) and goes into the HTML escaped, which the
        reader undoes, inside a paragraph: so its line as the reader reads it is the line
        with the stand-in, the stand-in replaced (a property test checks)."""
        return [line.replace(_NAME_SLOT, name) for line in self.name_lines]

    @cached_property
    def before_chunks(self) -> tuple[_EncodedPiece | str, ...] | None:
        """The head and intro encoded (:func:`_merged_chunks`)."""
        return _merged_chunks((self.head, self.intro))

    @cached_property
    def after_chunks(self) -> tuple[_EncodedPiece | str, ...] | None:
        """The footer encoded (:func:`_merged_chunks`)."""
        return _merged_chunks((self.footer,))

    def compiled(self, length: int) -> tuple[tuple[_Compiled | str, ...] | None,
                                             tuple[_Compiled | str, ...] | None]:
        """:attr:`before_chunks` and :attr:`after_chunks` compiled for reply addresses of
        ``length`` characters (:func:`_compiled_chunks`), kept for the last length asked."""
        kept = self.__dict__.get("_compiled")
        if kept is None or kept[0] != length:
            before, after = self.before_chunks, self.after_chunks
            kept = (length,
                    _compiled_chunks(before, length) if before is not None else None,
                    _compiled_chunks(after, length) if after is not None else None)
            self.__dict__["_compiled"] = kept
        return kept[1], kept[2]


@lru_cache(maxsize=256)
def _html_page(key: tuple[Any, ...]) -> _PageHtml:
    context = {**dict(zip(_PAGE_KEY_FIELDS, key)), "name": _NAME_SLOT,
               "command_links": _command_links()}
    markup = jinja2.filters.Markup
    page = _environment().get_template(HTML_TEMPLATE).render(
        context, papers=markup(_PAPERS_SLOT), cut=markup(_CUT_SLOT))
    before, _, footer = page.partition(_PAPERS_SLOT)
    head, _, intro = before.partition(_CUT_SLOT)
    intro_lines = reader_text(intro).splitlines()
    name_lines = tuple(line for line in intro_lines if _NAME_SLOT in line)
    unsafe = (*_page_command_lines(head),
              *[line for line in intro_lines if _NAME_SLOT not in line
                and reads_as_command(line)],
              *_page_command_lines(footer))
    if _NAME_SLOT in head + footer or (_NAME_SLOT in intro and not name_lines):
        raise ValueError(f"{HTML_TEMPLATE}: the subscriber's name may only be shown in the "
                         "part between the cut and the papers, as text")
    return _PageHtml(head=head, intro=intro, footer=footer, unsafe=unsafe,
                     name_lines=name_lines)


# What the page around the papers shows but the subscriber's name (:func:`_page_context`):
# pages are rendered once per process for each of these, the name put in after.
_PAGE_KEY_FIELDS = ("day", "listed_span", "staleness", "considered", "shown", "personalised",
                    "preheader")


def _page_key(content: DigestContent, items: Sequence[DigestItem]) -> tuple[Any, ...]:
    context = _page_context(content, items)
    return tuple(context[field] for field in _PAGE_KEY_FIELDS)


# Stand-ins, random per process so that no listing can hold them: the reply address (in
# mailto links of cached pieces), where the paper rows go in the page, where it is cut.
_REPLY_SLOT = "reply-" + secrets.token_hex(16)
_PAPERS_SLOT = "<!--papers-" + secrets.token_hex(16) + "-->"
_CUT_SLOT = "<!--cut-" + secrets.token_hex(16) + "-->"
# ...and the subscriber's name, in pages rendered once for everyone with the same counts.
_NAME_SLOT = "name" + secrets.token_hex(16)


def _html_row(view: _ItemView) -> list[str] | None:
    """One paper's row of the HTML part, in pieces; None when a line reads as a command.

    Each piece shows a few fields and is memoised on them: a paper's title at a position,
    its authors and level, its snippet, a reason, its links are each rendered and checked
    once per process, however many subscribers get them."""
    pieces = [
        _html_piece("opening", view.explore),
        _html_piece("title", view.position, view.title_label, view.title, view.title_link),
        _html_piece("meta", view.authors, view.arxiv_id, view.listed, view.relevance,
                    view.relevance_dots, view.relevance_rest),
        _html_piece("snippet", view.snippet_label, view.snippet),
        _html_piece("why", view.reason_label, view.reason),
        _html_piece("links", view.links),
        _html_piece("rate", view.position, view.like_link, view.skip_link),
    ]
    return None if None in pieces else [piece for piece in pieces if piece is not None]


def _text_paper(view: _ItemView) -> str:
    """One paper of the text part, from memoised pieces (as :func:`_html_row`)."""
    return "".join((
        _text_piece("title", view.position, view.title_label, view.title),
        _text_piece("meta", view.authors, view.text_meta),
        _text_piece("wildcard", view.explore),
        _text_piece("snippet", view.snippet_label, view.snippet),
        _text_piece("why", view.reason_label, view.reason),
        _text_piece("links", view.links),
    ))


@lru_cache(maxsize=ROW_MEMO)
def _html_piece(kind: str, *fields: Any) -> str | None:
    """A piece of a paper's HTML row (the macro ``kind`` of PAPER_TEMPLATE); None when a
    line of it, as the reply reader reads HTML, reads as a command."""
    piece = str(getattr(_macros(PAPER_TEMPLATE), kind)(*fields))
    return None if _html_command_lines(piece) else piece


@lru_cache(maxsize=ROW_MEMO)
def _text_piece(kind: str, *fields: Any) -> str:
    """A piece of a paper in the text part (the macro ``kind`` of PAPER_TEXT_TEMPLATE)."""
    return str(getattr(_macros(PAPER_TEXT_TEMPLATE), kind)(*fields))


@cache
def _macros(name: str) -> Any:
    """A template's macros, callable from here."""
    return _environment().get_template(name).module


def _html_command_lines(piece: str) -> tuple[str, ...]:
    """The lines of an HTML piece, read as the reply reader reads HTML, that it would take
    a command from."""
    return tuple(command_lines(reader_text(piece)))


# The head and footer are the same for every subscriber with the same counts and dates.
_page_command_lines = lru_cache(maxsize=256)(_html_command_lines)


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


@lru_cache(maxsize=TEXT_MEMO)
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


# The characters of Unicode's categories Cc (controls), Zl and Zp (line and paragraph
# separators): a fixed set, so one translate replaces them all (a test checks it against
# unicodedata for every code point).
LINE_BREAKING = frozenset([*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029])
_ONE_LINE = str.maketrans({**dict.fromkeys(LINE_BREAKING, " "), **_BIDI_CONTROLS})


def one_line(text: str) -> str:
    """Text fit for a header or a single line: line breaks and control characters gone,
    bidirectional controls dropped."""
    return " ".join(text.translate(_ONE_LINE).split())


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


@lru_cache(maxsize=TEXT_MEMO)
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


@lru_cache(maxsize=LINE_MEMO)
def _needs_defusing(line: str) -> bool:
    return starts_with_command(line) or reads_as_command(line)


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
        if not _needs_defusing(line):
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


class _Link(NamedTuple):
    """One link under a paper: a short label for HTML, a longer one for the text part.

    A tuple, not a dataclass: the links are part of memo keys (their pieces), and a
    tuple's hash is worked out in C."""

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

    # A view is memoised (:func:`_item_view`) and shown to every subscriber who gets the
    # paper at this position for this reason: its pieces are looked up once per view.
    @cached_property
    def html_row(self) -> tuple[str, ...] | None:
        """The paper's row of the HTML part in pieces (:func:`_html_row`); None when a line
        of it reads as a command."""
        row = _html_row(self)
        return None if row is None else tuple(row)

    @cached_property
    def html_chunks(self) -> tuple[_EncodedPiece | str, ...] | None:
        """:attr:`html_row` encoded (:func:`_merged_chunks`): a paper's row is a few chunks,
        its encoded lines and its like and skip lines; None without a row, or when a piece
        is not whole lines."""
        row = self.html_row
        return None if row is None else _merged_chunks(row)

    def html_compiled(self, length: int) -> tuple[_Compiled | str, ...] | None:
        """:attr:`html_chunks` compiled for reply addresses of ``length`` characters
        (:func:`_compiled_chunks`; a row is mostly one run), kept for the last length asked
        in place of the chunks (a view holds its row's bytes once)."""
        kept = self.__dict__.get("_html_compiled")
        if kept is None or kept[0] != length:
            chunks = self.__dict__.get("html_chunks")
            if chunks is None:
                row = self.html_row
                chunks = None if row is None else _merged_chunks(row)
            kept = (length, None if chunks is None else _compiled_chunks(chunks, length))
            self.__dict__["_html_compiled"] = kept
        return kept[1]

    @cached_property
    def text_paper(self) -> str:
        """The paper in the text part (:func:`_text_paper`)."""
        return _text_paper(self)

    @cached_property
    def text_clean(self) -> bool:
        """True when no line of :attr:`text_paper` needs defusing (:func:`_text_is_clean`)."""
        return _text_is_clean(self.text_paper)

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


def _page_context(content: DigestContent, items: Sequence[DigestItem]) -> dict[str, Any]:
    """What the page around the papers shows; mailto links hold the reply-address stand-in."""
    listed = [item.paper.listed_on for item in items if item.paper.listed_on]
    return {
        "name": one_line(content.subscriber.name),
        "day": format_day(content.local_date),
        "listed_span": listing_span(listed),
        "staleness": _staleness(content.local_date, listed),
        "considered": content.considered,
        "shown": len(items),
        "personalised": content.personalised,
        "command_links": _command_links(),
        "preheader": _preheader(content, list(items)),
    }


@cache
def _command_links() -> dict[str, str]:
    return {word: mailto(_REPLY_SLOT, word) for word in ("pause", "unsubscribe", "help")}


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


@lru_cache(maxsize=TEXT_MEMO)
def _opens_as_command(text: str, first: str = "") -> bool:
    """True when ``text`` shown on a line of its own (HTML) or wrapped after ``first``
    (text part) would give a first line a reply reader takes a command from."""
    if not text:
        return False
    opening = _wrap(text, "    ", first or "    ").split("\n", 1)[0]
    return (reads_as_command(f"{first}{text}") or reads_as_command(opening)
            or is_bare_command(text))


@dataclass(frozen=True)
class _PaperParts:
    """What a paper shows whoever gets it: worked out once per process and paper."""

    title: str
    snippet: str
    snippet_label: str
    authors: str
    arxiv_id: str
    listed: str
    links: tuple[_Link, ...]
    link: str  # Paper.link (quoted once here, not per view)


@lru_cache(maxsize=PAPER_MEMO)
def _paper_parts(paper: Paper, label_all: bool) -> _PaperParts:
    snippet = _snippet(paper.abstract)
    label = "Summary" if paper.abstract_is_summary and snippet else ""
    if not label and snippet and (label_all or _opens_as_command(snippet)):
        label = "Abstract"
    authors = format_authors(paper.authors)
    if authors and (label_all or _opens_as_command(authors)):
        authors = f"Authors: {authors}"
    return _PaperParts(
        title=plain_text(paper.title) or "(untitled)",
        snippet=snippet,
        snippet_label=label,
        authors=authors,
        arxiv_id=paper.arxiv_id or "",
        listed=format_short_day(paper.listed_on) if paper.listed_on else "",
        links=_paper_links(paper),
        link=paper.link,
    )


@lru_cache(maxsize=TEXT_MEMO)
def _snippet(abstract: str) -> str:
    """The opening of an abstract a digest shows, LaTeX as text."""
    return cut_abstract(plain_text(_opening(abstract)))


def _view_of(item: DigestItem, local_date: date, *, label_all: bool) -> _ItemView:
    """The view of one item of a digest for ``local_date`` (memoised by what it shows:
    the score, never shown, is left out of the key).

    Looked up first by the paper object's identity (a dispatch shows the same ``Paper``
    objects to every subscriber): hashing a paper hashes all its fields, in Python, on
    every look-up of :func:`_item_view`. An entry holds its paper, so no other object can
    take that identity while the entry is kept; an equal paper of another object is
    found through :func:`_item_view` as before."""
    paper = item.paper
    # Ranking words its reasons for the day's listing; a paper listed days ago is not.
    stale = paper.listed_on is not None and paper.listed_on < local_date
    key = (id(paper), item.position, item.reason, item.explore, item.relevance, stale,
           label_all)
    found = _VIEWS_BY_OBJECT.get(key)
    if found is not None and found[0] is paper:
        kept = found[1]()
        if kept is not None:
            return kept
    view = _item_view(paper, item.position, item.reason, item.explore, item.relevance,
                      stale, label_all)
    if len(_VIEWS_BY_OBJECT) >= VIEW_MEMO:  # the oldest entry goes (insertion order)
        with contextlib.suppress(StopIteration, KeyError, RuntimeError):
            del _VIEWS_BY_OBJECT[next(iter(_VIEWS_BY_OBJECT))]
    _VIEWS_BY_OBJECT[key] = (paper, weakref.ref(view))
    return view


# (id(paper), position, reason, explore, relevance, stale, label_all) -> (paper, view). The
# view by a weak reference: _item_view's memo alone decides how many views are kept.
_VIEWS_BY_OBJECT: dict[tuple[Any, ...], tuple[Paper, weakref.ref[_ItemView]]] = {}


@lru_cache(maxsize=VIEW_MEMO)
def _item_view(paper: Paper, position: int, raw_reason: str, explore: bool,
               raw_relevance: str | None, stale: bool, label_all: bool) -> _ItemView:
    parts = _paper_parts(paper, label_all)
    number = f"{position}.".ljust(3) + " "
    title_label = "Title: " if label_all or _opens_as_command(parts.title, number) else ""
    reason = plain_text(raw_reason)  # reasons quote titles, LaTeX and all
    if stale:
        reason = reason.replace("popular today", "popular when listed").replace(
            "in today's listing", "in its listing")
    reason_label = "Why"
    if reason and (label_all or _opens_as_command(reason, "    Why:   ")):
        reason_label = "Reason"
    relevance = one_line(raw_relevance or "").lower()
    if relevance not in RELEVANCE_DOTS:
        relevance = ""  # only the ranking's known levels mean something to a reader
    return _ItemView(
        position=position,
        title=parts.title,
        title_label=title_label,
        title_link=parts.link,
        authors=parts.authors,
        arxiv_id=parts.arxiv_id,
        listed=parts.listed,
        relevance=relevance,
        relevance_dots=RELEVANCE_DOTS.get(relevance, 0),
        snippet=parts.snippet,
        snippet_label=parts.snippet_label,
        links=parts.links,
        reason=reason,
        reason_label=reason_label,
        explore=explore,
        # The stand-in for the reply address: render_html puts the subscriber's in.
        like_link=_rate_link("like", position),
        skip_link=_rate_link("skip", position),
    )


@lru_cache(maxsize=256)
def _rate_link(command: str, position: int) -> str:
    """The like or skip link of a position, to the reply-address stand-in."""
    return mailto(_REPLY_SLOT, f"{command} {position}")


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


@lru_cache(maxsize=TEXT_MEMO)
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
    source = _read_template(name)
    if name.endswith(".html.j2"):
        source = inline_styles(source)
    return source, name, lambda: True


# A start tag with a literal class attribute, in a template's source.
_CLASSED_TAG = re.compile(r'<([a-z][a-z0-9]*)\b([^<>]*?) class="([^"{}<>]*)"([^<>]*)>')
# The stylesheet's selectors: classes only, alone or in comma lists.
_CLASS_SELECTOR = re.compile(r"\.[a-z][a-z0-9-]*")


def inline_styles(source: str) -> str:
    """An HTML template's source with every ``class="..."`` replaced by the style attribute
    css-inline gives that class list from STYLESHEET: inlined once per process and template,
    not once per message. Some webmail drops ``<style>``, so styles must be inline.

    The stylesheet may only select by class (``.a``, ``.a, .b``): a class list's style then
    never depends on the element or its ancestors. Raises ``ValueError`` naming the
    selector otherwise."""
    matches = list(_CLASSED_TAG.finditer(source))
    styles = _class_styles(tuple(sorted({match.group(3) for match in matches})))
    out: list[str] = []
    end = 0
    for match in matches:
        tag, before, classes, after = match.groups()
        style = styles[classes]
        attribute = f' style="{style}"' if style else ""
        out.append(source[end:match.start()])
        out.append(f"<{tag}{before}{after}{attribute}>")
        end = match.end()
    out.append(source[end:])
    return "".join(out)


class _ProbeStyles(HTMLParser):
    """The style attribute of every ``data-probe`` element of css-inline's output."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.styles: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        probe = values.get("data-probe")
        if probe is not None:
            self.styles[probe] = values.get("style") or ""


def _class_styles(class_lists: tuple[str, ...]) -> dict[str, str]:
    """Each class list's inline style, as css-inline gives it from STYLESHEET."""
    css = _read_template(STYLESHEET)
    for block in re.findall(r"([^{}]*)\{", re.sub(r"/\*.*?\*/", "", css, flags=re.DOTALL)):
        for selector in block.split(","):
            if not _CLASS_SELECTOR.fullmatch(selector.strip()):
                raise ValueError(f"{STYLESHEET}: selector {selector.strip()!r} is not a "
                                 "class (.name): styles are inlined per class list")
    probes = "".join(f'<div class="{classes}" data-probe="{n}"></div>'
                     for n, classes in enumerate(class_lists))
    inliner = css_inline.CSSInliner(extra_css=css, keep_style_tags=False,
                                    load_remote_stylesheets=False)
    parser = _ProbeStyles()
    parser.feed(inliner.inline(f"<!DOCTYPE html><html><head></head><body>{probes}</body></html>"))
    parser.close()
    styles = {}
    for n, classes in enumerate(class_lists):
        style = _compact_style(parser.styles.get(str(n), ""))
        # As an attribute value: '&', '<' and '"' escaped; Jinja syntax cannot occur in CSS.
        styles[classes] = style.replace("&", "&amp;").replace("<", "&lt;").replace('"', "&quot;")
    return styles


def _compact_style(style: str) -> str:
    """css-inline's ``margin: 0 0 10px;color: #616e7c;`` as ``margin:0 0 10px;color:#616e7c``:
    the same declarations without the optional spaces and final semicolon (CSS Syntax
    Level 3 ignores them), as every message repeats each style many times.

    ``, `` in a value (a font list) becomes ``,``; the stylesheet holds no strings with
    ``;``, ``:`` or ``,`` in them (font names are words), so splitting there is safe."""
    declarations = [part.partition(":") for part in style.split(";") if part.strip()]
    return ";".join(f"{name.strip()}:{_LIST_COMMA.sub(',', value.strip())}"
                    for name, _, value in declarations)


_LIST_COMMA = re.compile(r"\s*,\s*")


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
