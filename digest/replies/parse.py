"""Reading one reply: who sent it, which digest it answers, and the commands in its new text.

Nothing here touches the store or the network: a raw message goes in, a
:class:`ParsedReply` (or the facts needed to refuse it) comes out.

Only the new text counts: :mod:`.newtext` keeps the lines the subscriber wrote
(above, below or between quoted parts; lines of the sent digest, quote headers,
separators and signatures left out). Commands are read only at the start of a
line, so a sentence that mentions "like 3" commands nothing. A line that is
not a command is either a near-command (reported with a hint) or prose
(acknowledged once, never listed as an error).
"""

from __future__ import annotations

import difflib
import hashlib
import re
import unicodedata
from dataclasses import dataclass, field
from email import policy
from email.errors import HeaderParseError
from email.header import decode_header, make_header
from email.message import EmailMessage, Message, MIMEPart
from email.parser import BytesParser
from email.utils import getaddresses
from functools import lru_cache
from html.parser import HTMLParser

from ..errors import DigestError
from .newtext import SentText, clean_line, read_new_text, says_nothing

MAX_PAUSE_DAYS = 366  # a longer pause is an unsubscribe in disguise
MAX_SIZE = 100  # as the config's max_papers
MAX_REPORTED_LINES = 8  # lines "not understood" listed in a confirmation; the rest are counted
MAX_LINE_CHARS = 80  # a reported line is cut to this length
MAX_MIME_PARTS = 100  # multipart boundaries in a reply read at most (clients write 2 to 5)
MAX_READ_LINES = 1_000  # lines of new text read for commands; no one writes more in a reply
MAX_BODY_CHARS = 2_000_000  # a reply's text read at most; commands are never that far down

# Every word that starts a command, mapped to the command it means.
COMMANDS: dict[str, str] = {
    "like": "like", "more": "like",
    "skip": "skip", "less": "skip",
    "why": "why",
    "pause": "pause",
    "resume": "resume", "unpause": "resume", "start": "resume", "subscribe": "resume",
    "unsubscribe": "unsubscribe", "stop": "unsubscribe",
    "time": "time",
    "size": "size",
    "interest": "interest", "interests": "interest",
    "help": "help",
}
_REPLY_PREFIX = re.compile(r"^\s*(re|aw|sv|antw|antwort|réf|ref|rif|fw|fwd|wg|tr)\s*(\[\d+\])?\s*:",
                           re.IGNORECASE)
# Decoration a client or a person puts around a line: bullets, emphasis, quotes.
_DECORATION = " \t*_•·◦▪‣\"'`“”„«»‘’"
# A list bullet before a command: "- like 2", "* like 2", "• like 2" ("-3" is no bullet).
_BULLET = re.compile(r"^(?:[-–—•·◦▪‣*+]|\d{1,2}[.)])\s+")
# A chat-style command ("/like 2") or a command word with a colon ("like: 2").
_SLASH = re.compile(r"^/(?=[a-z])", re.IGNORECASE)
_WORD_COLON = re.compile(r"^([a-z]+)\s*:\s*", re.IGNORECASE)
# A command word followed, within three words, by a number: "I like paper 2 a lot".
_COMMAND_NEAR_NUMBER = re.compile(
    r"\b(?:like|more|skip|less|why|size|pause)\b(?:\W+\w+){0,3}?\W+#?\d", re.IGNORECASE)
_TRAILING = " \t.!?)"
_NUMBER = re.compile(r"^#?(\d{1,3})$")
_RANGE = re.compile(r"^#?(\d{1,3})-#?(\d{1,3})$")
_SHORTHAND = re.compile(r"^([+-])(\d{1,3})(?:-(\d{1,3}))?$")
_DASHES = re.compile(r"\s*[-–—]\s*")
_HHMM = re.compile(r"^([01]?\d|2[0-3])(?:[:.h]([0-5]\d))?$")
_DURATION = re.compile(r"^(?:for\s+)?(\d{1,3})\s*(d|days?|w|wks?|weeks?)?$")
_TOKEN_IN_ADDRESS = re.compile(r"\+([a-z0-9]{6,64})@", re.IGNORECASE)
_TOKEN_IN_MESSAGE_ID = re.compile(r"<digest\.([a-z0-9]{6,64})@[^>\s]+>", re.IGNORECASE)
_HAS_WORD = re.compile(r"\w")
_POLITE = {"", "me", "please", "me please", "please me", "now", "thanks", "thank you"}


@dataclass(frozen=True)
class Command:
    """One command of a reply, as written and as understood."""

    name: str  # like | skip | why | pause | resume | unsubscribe | time | size | interest-add | ...
    text: str  # as the subscriber wrote it (for the confirmation)
    items: tuple[int, ...] = ()  # like / skip / why: item numbers of the digest
    every: bool = False  # like all / skip all
    rest: bool = False  # skip rest: every item not liked
    days: int | None = None  # pause N days (None: until resume)
    value: str = ""  # time "HH:MM", an interest phrase
    number: int | None = None  # size N


@dataclass(frozen=True)
class Problem:
    """A line (or part of one) that commands nothing, and what to tell the subscriber."""

    text: str
    message: str


@dataclass
class ParsedReply:
    """The commands of a reply in the order written, the near-commands it could not read
    (each with a hint), and its prose (lines that are no attempt at a command)."""

    commands: list[Command] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    prose: list[str] = field(default_factory=list)
    unread: list[Problem] = field(default_factory=list)  # problems and prose, as written
    from_subject: bool = False  # the commands came from the subject line (a mailto link)


# --- the message --------------------------------------------------------------


class UnreadableReply(DigestError):
    """A reply too deeply nested to read (the reason says how deep)."""


def parse_message(raw: bytes) -> EmailMessage:
    """The message of a raw reply. Raises :class:`UnreadableReply` for MIME nested deeper
    than :data:`MAX_MIME_PARTS` boundaries (no client writes that; parsing it costs seconds)."""
    boundaries = raw.count(b"boundary=")
    if boundaries > MAX_MIME_PARTS:
        raise UnreadableReply(f"a message with {boundaries} MIME boundaries (at most "
                              f"{MAX_MIME_PARTS} are read)")
    message = BytesParser(policy=policy.default).parsebytes(raw)
    assert isinstance(message, EmailMessage)  # policy.default parses to EmailMessage
    return message


def header(message: Message, name: str) -> str:
    """A header's value as text, '' when absent or unreadable (a malformed header is not fatal)."""
    try:
        value = message.get(name)
        return " ".join(str(value).split()) if value is not None else ""
    except (ValueError, TypeError, IndexError, AttributeError):
        raw = message.get_all(name, failobj=[])
        return " ".join(str(raw[0]).split()) if raw else ""


def headers(message: Message, name: str) -> list[str]:
    try:
        return [str(v) for v in message.get_all(name, failobj=[])]
    except (ValueError, TypeError, IndexError, AttributeError):
        return []


def reply_key(message: Message, raw: bytes) -> str:
    """What makes a reply "the same reply": its Message-ID, else a hash of its bytes."""
    message_id = header(message, "Message-ID").strip()
    if message_id and len(message_id) <= 500:
        return message_id
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def sender_address(message: Message) -> str:
    """The From address, lower-cased ('' when there is none).

    Read from the raw header: ``alice@example.org <evil@example.net>`` is the
    address evil@example.net (the part in angle brackets), whatever the display
    name says. :func:`forgery_reason` tells whether such a name is a warning.
    """
    found = _from_mailboxes(message)
    return found[0][1] if found else ""


def forgery_reason(message: Message) -> str | None:
    """Why the From header looks forged, else None.

    Signals: more than one From header or address (a reply comes from one
    person), and a display name that is itself an address other than the one
    the mail is from (``alice@example.org <evil@example.net>``: a reader's
    client shows "alice@example.org").
    """
    raw = _raw_headers(message, "From")
    if len(raw) > 1:
        return f"{len(raw)} From headers"
    found = _from_mailboxes(message)
    if len(found) > 1:
        return f"{len(found)} addresses in From"
    if not found:
        return None
    name, address = found[0]
    # Raw 8-bit UTF-8 in the header arrives surrogate-escaped: read it as the client shows it.
    name = name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    # NFKC: a full-width "＠" (U+FF20) or letters a client shows like ASCII ones count too.
    for shown in _ADDRESS_IN_NAME.findall(unicodedata.normalize("NFKC", name)):
        if shown.lower().strip("<>") != address:
            return f"the display name is the address {shown.lower()} but the mail is from {address}"
    return None


_ANGLE_ADDRESS = re.compile(r"^(?P<name>.*)<(?P<address>[^<>\s]+@[^<>\s]+)>\s*$", re.DOTALL)
# Any local@domain, dotted or not: "root@localhost" is shown as an address as well.
_ADDRESS_IN_NAME = re.compile(r"[^\s<>\"'(),;:@]+@[^\s<>\"'(),;:@]+")


def _raw_headers(message: Message, name: str) -> list[str]:
    """A header's values as written (unfolded, RFC 2047 words decoded), not as re-parsed."""
    values = []
    for key, value in message.raw_items():
        if key.lower() != name.lower():
            continue
        text = " ".join(str(value).split())
        try:
            text = str(make_header(decode_header(text)))
        except (ValueError, LookupError, UnicodeError, HeaderParseError):
            pass  # not valid encoded words: keep the text as written
        values.append(text)
    return values


def _from_mailboxes(message: Message) -> list[tuple[str, str]]:
    """(display name, lower-cased address) of each From mailbox, read from the raw header."""
    found: list[tuple[str, str]] = []
    for value in _raw_headers(message, "From"):
        match = _ANGLE_ADDRESS.match(value)
        if match and "<" not in match.group("name") and not _LIST_SEPARATOR.search(
                _unquoted(match.group("name"))):
            found.append((match.group("name").strip().strip('"').strip(),
                          match.group("address").strip().lower()))
            continue
        found += [(name, address.strip().lower())
                  for name, address in getaddresses([value]) if "@" in address]
    return found


_LIST_SEPARATOR = re.compile(r"[,;]")


def _unquoted(text: str) -> str:
    """``text`` with its double-quoted parts removed (commas inside quotes separate nothing)."""
    return re.sub(r'"[^"]*"', "", text)


def digest_tokens(message: Message) -> list[str]:
    """Tokens of digests the reply names: plus-addresses first, then In-Reply-To, References."""
    found: list[str] = []
    for name in ("To", "Cc", "Delivered-To", "X-Original-To", "Envelope-To"):
        for _, address in getaddresses(headers(message, name)):
            found += [m.lower() for m in _TOKEN_IN_ADDRESS.findall(address)]
    for name in ("In-Reply-To", "References"):
        for value in headers(message, name):
            found += [m.lower() for m in _TOKEN_IN_MESSAGE_ID.findall(value)]
    return list(dict.fromkeys(found))


# Subjects of out-of-office and other auto-replies sent without Auto-Submitted or Precedence.
# Languages: English, German, French, Spanish, Italian, Dutch, Portuguese, Polish, Swedish,
# Danish/Norwegian, Finnish, Czech, Turkish, Russian, Chinese, Japanese, Korean.
# Matched anywhere in the normalised subject (auto_reply_subject), after a non-letter.
AUTO_REPLY_SUBJECT = re.compile(
    r"(?<!\w)(?:auto(?:matic|matische?|matisch)?[\s-]*(?:reply|response|antwort|answer|antwoord)\b"
    r"|autoreply\b|auto-reply\b|out\s+of\s+(?:the\s+)?office\b|vacation\s+(?:reply|notice)\b"
    r"|away\s+from\s+(?:the\s+)?office\b"
    r"|abwesenheitsnotiz\b|abwesenheit\b|abwesend\b|automatische\s+antwort\b|nicht\s+im\s+b[üu]ro\b"
    r"|r[ée]ponse\s+automatique\b|absence\s+du\s+bureau\b|message\s+d['’]absence\b|absent\b"
    r"|respuesta\s+autom[áa]tica\b|fuera\s+de\s+la\s+oficina\b"
    r"|risposta\s+automatica\b|fuori\s+(?:sede|ufficio)\b"
    r"|automatisch\s+antwoord\b|afwezig\b|niet\s+aanwezig\b"
    r"|resposta\s+autom[áa]tica\b|aus[êe]ncia\b|fora\s+do\s+escrit[óo]rio\b"
    r"|automatyczna\s+odpowied[źz]\b|poza\s+biurem\b|nieobecno[śs][ćc]\b"
    r"|automatiskt\s+svar\b|fr[åa]nvaro\w*\b|automatisk\s+svar\b|frav[æa]r\w*\b|autosvar\b"
    r"|automaattinen\s+vastaus\b|poissa\b"
    r"|automatick[áa]\s+odpov[ěe][ďd]\b|mimo\s+kancel[áa][řr]\b"
    r"|otomatik\s+(?:yan[ıi]t|cevap)\b|ofis\s+d[ıi][şs][ıi]nda\b"
    r"|автоответ|автоматический\s+ответ|нет\s+на\s+месте|вне\s+офиса"
    r"|自动回复|自動回覆|自動回复|自动答复|自動応答|自動返信|不在通知|不在のお知らせ|外出"
    r"|자동\s*(?:회신|응답)|부재\s*중)",
    re.IGNORECASE)


def automatic_reason(message: Message) -> str | None:
    """Why the message is an auto-reply, a bounce or list mail (never answered), else None."""
    auto = header(message, "Auto-Submitted").lower()
    if auto and not auto.startswith("no"):
        return f"Auto-Submitted: {auto}"
    precedence = header(message, "Precedence").lower()
    if precedence in ("bulk", "junk", "list", "auto_reply"):
        return f"Precedence: {precedence}"
    for name in ("X-Autoreply", "X-Autorespond", "X-Auto-Reply", "X-Auto-Response-Suppress",
                 "X-Autogenerated", "X-AutoReply-From", "X-Mail-Autoreply"):
        if header(message, name):
            return f"{name} header"
    subject = auto_reply_subject(subject_of(message))
    if subject is not None:
        return f"an auto-reply subject (“{subject}”)"
    if header(message, "List-Id") or header(message, "List-Post"):
        return "mailing-list mail"
    return_path = headers(message, "Return-Path")
    if return_path and return_path[0].strip() in ("<>", ""):
        return "empty return path (a bounce)"
    if message.get_content_type() == "multipart/report":
        return "a delivery or read report"
    local = sender_address(message).partition("@")[0]
    if local in ("mailer-daemon", "postmaster"):
        return f"sent by {local}"
    return None


# Hyphens, dashes, underscores and runs of spaces all read as one space: "Out-of-Office".
_SUBJECT_SEPARATORS = re.compile(r"[\s\-\u2010-\u2015_\u00a0]+")
# Our own digest subject (render.subject_for) and what follows it: it quotes a paper title,
# which may hold words such as "automatic response"; the auto-reply marks come before it.
_DIGEST_SUBJECT = re.compile(r"paper digest, \w{3} \d{1,2} \w{3} \d{4}:.*$", re.DOTALL)


# One ordinary word ("absent-minded"): an auto-reply mark only at the start of the subject.
_START_ONLY = re.compile(r"absent|abwesend|abwesenheit|afwezig|poissa|fr[åa]nvaro|frav[æa]r|外出")


def auto_reply_subject(subject: str) -> str | None:
    """The auto-reply mark found in ``subject`` (normalised text), else None.

    NFC first (``Réponse`` with a combining accent), then casefolded, hyphen
    and space variants made equal (``Out-of-Office``), and searched anywhere:
    ``[Auto-Reply] Re: ...``, ``Alice Smith is out of the office.``. The title
    our digest subject quotes is not searched.
    """
    text = unicodedata.normalize("NFC", subject).casefold()
    text = _SUBJECT_SEPARATORS.sub(" ", text)
    text = _DIGEST_SUBJECT.sub("", text)
    for found in AUTO_REPLY_SUBJECT.finditer(text):
        mark = found.group(0).strip()
        if " " in mark or not _START_ONLY.fullmatch(mark) or not text[:found.start()].strip(" [(:"):
            return mark
    return None


def subject_of(message: Message) -> str:
    return header(message, "Subject")


def is_reply_subject(subject: str) -> bool:
    return bool(_REPLY_PREFIX.match(subject))


# --- the new text -------------------------------------------------------------


def new_text(message: EmailMessage, sent: SentText | None = None) -> str:
    """The text the subscriber wrote in this reply: no quoted original, no signature.

    ``sent`` is the text of the digest answered (:meth:`SentText.from_message`);
    without it only quote marks, quote headers and separators tell quoted text.
    """
    return read_new_text(body_text(message), sent, is_command_line).text


def sent_text(digest_message: bytes) -> SentText:
    """What a digest said, from its frozen message as stored (text and HTML parts)."""
    return SentText.from_message(digest_message, html_to_text)


def body_text(message: EmailMessage) -> str:
    """The text/plain part, else the HTML part as text (quoted blocks left out); also the
    HTML part when the text part says nothing (empty, or only "Sent from my iPhone")."""
    plain = _part_text(message.get_body(preferencelist=("plain",)))
    if plain is not None and not says_nothing(plain):
        return plain
    html = _part_text(message.get_body(preferencelist=("html",)))
    if html is not None and (plain is None or html.strip()):
        return html
    return plain or ""


def _part_text(part: MIMEPart | None) -> str | None:
    """One text part's content as text (HTML converted), None when there is no such part."""
    if part is None:
        return None
    try:
        content = part.get_content()
    except (LookupError, UnicodeError, ValueError, AssertionError):
        payload = part.get_payload(decode=True)
        content = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""
    if not isinstance(content, str):
        return ""
    content = content[:MAX_BODY_CHARS]
    if part.get_content_type() == "text/html":
        return html_to_text(content)
    return content


class _HtmlText(HTMLParser):
    """HTML to plain lines; quoted blocks (``blockquote``, Gmail's quote div) left out."""

    SKIP = frozenset({"blockquote", "style", "script", "head", "title"})
    BREAKS = frozenset({"br", "p", "div", "tr", "li", "h1", "h2", "h3", "h4", "h5", "h6", "hr",
                        "table"})
    QUOTE_CLASSES = ("gmail_quote", "yahoo_quoted", "moz-cite-prefix", "protonmail_quote")
    QUOTE_IDS = ("divrplyfwdmsg", "appendonsend", "mail-editor-reference-message-container")

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._stack: list[bool] = []  # per open element: does it hide its content?
        self._hidden = 0
        self._done = False  # after Outlook's reply separator everything is the original

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: (value or "").lower() for name, value in attrs}
        hides = tag in self.SKIP or any(c in values.get("class", "") for c in self.QUOTE_CLASSES)
        if values.get("id", "") in self.QUOTE_IDS:
            self._done = True
        if tag in self.BREAKS:
            self.parts.append("\n")
        if tag in ("br", "hr", "img", "meta", "link", "input", "wbr"):
            return  # void elements have no end tag
        self._stack.append(hides)
        self._hidden += hides

    def handle_endtag(self, tag: str) -> None:
        if tag in self.BREAKS:
            self.parts.append("\n")
        if self._stack:
            self._hidden -= self._stack.pop()

    def handle_data(self, data: str) -> None:
        if not self._hidden and not self._done:
            self.parts.append(data.replace("\xa0", " "))


def html_to_text(html: str) -> str:
    parser = _HtmlText()
    parser.feed(html)
    parser.close()
    lines = [" ".join(line.split()) for line in "".join(parser.parts).split("\n")]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# --- commands -----------------------------------------------------------------


def parse_reply(body: str, subject: str = "") -> ParsedReply:
    """The commands of a reply: from its new text, else from a subject that is a command.

    A mailto link of the digest puts the command in both the subject and the
    body; reading the subject only when the body has no command applies it once.
    A "Re: ..." subject is never read.
    """
    parsed = parse_text(body)
    if not parsed.commands and subject.strip() and not is_reply_subject(subject):
        from_subject = parse_text(subject)
        if from_subject.commands:
            parsed.commands = from_subject.commands
            parsed.from_subject = True
    return parsed


def parse_text(text: str) -> ParsedReply:
    """Commands at the start of lines; several per line separated by commas or semicolons.

    Lines are read as a person reads them (:func:`command_line`): Unicode and
    full-width forms, list bullets, a leading ``/``, a trailing period. A line
    that commands nothing is a :class:`Problem` when it looks like an attempt
    at a command (a command word, a near miss of one, a command later in the
    line, a command word with a number), else prose.
    """
    parsed = ParsedReply()
    read = 0
    lines = text.splitlines()
    for number, raw_line in enumerate(lines):
        line = command_line(raw_line)
        if not line or not _HAS_WORD.search(line):
            continue  # a rule, a lone mark: nothing written
        read += 1
        if read > MAX_READ_LINES:
            rest = sum(1 for x in lines[number:] if x.strip())
            parsed.problems.append(Problem(f"({rest} more lines)", f"not read: a reply is read "
                                           f"up to {MAX_READ_LINES:,} lines of new text"))
            parsed.unread.append(parsed.problems[-1])
            break
        commands, problems = _parse_line(line)
        parsed.commands += commands
        if problems and not commands and _is_prose(line, problems):
            parsed.prose.append(_shown(clean_line(raw_line)))
            parsed.unread.append(Problem(parsed.prose[-1], ""))
        else:
            parsed.problems += problems
            parsed.unread += problems
    return parsed


def command_line(raw_line: str) -> str:
    """A line made ready for reading commands: cleaned (NFKC, spaces), bullets, a leading
    ``/``, decoration and trailing punctuation removed. '' for a line with nothing left."""
    line = clean_line(raw_line).strip(_DECORATION)
    while (bullet := _BULLET.match(line)) is not None:
        line = line[bullet.end():].strip(_DECORATION)
    line = _SLASH.sub("", line)
    if (colon := _WORD_COLON.match(line)) is not None and colon.group(1).lower() in COMMANDS:
        line = f"{colon.group(1)} {line[colon.end():]}"
    return line.rstrip(_TRAILING).strip(_DECORATION)


def reads_as_command(raw_line: str) -> bool:
    """True when :func:`parse_text` takes at least one command from this line, read alone
    (cleaned by :func:`command_line`: Unicode normalised, bullets, numbers, a leading ``/``
    and decoration removed), even when the line also holds text it cannot read.

    Render checks every line of a digest with this, so that a digest pasted into a reply
    without ``>`` marks commands nothing.
    """
    line = command_line(raw_line)
    if not line or not _HAS_WORD.search(line):
        return False
    return bool(_parse_line(line)[0])


def is_command_line(raw_line: str) -> bool:
    """True when the line holds commands and nothing it could not read."""
    line = command_line(raw_line)
    first = line.split(" ", 1)[0].lower()
    if not line or (first not in COMMANDS and not _SHORTHAND.match(first)):
        return False  # the common case, decided without parsing
    commands, problems = _parse_line(line)
    return bool(commands) and not problems


@lru_cache(maxsize=4096)
def _close_command(word: str) -> str | None:
    """The command word ``word`` is a near miss of (difflib ratio 0.75 or more), else None."""
    close = difflib.get_close_matches(word, COMMANDS, n=1, cutoff=0.75)
    return close[0] if close else None


def _is_prose(line: str, problems: list[Problem]) -> bool:
    """A line that commands nothing and does not look like an attempt at a command."""
    word = line.partition(" ")[0].lower()
    if word in COMMANDS or _COMMAND_NEAR_NUMBER.search(line):
        return False
    if _close_command(word) is not None:
        return False
    return all(p.message.startswith("not a command") for p in problems)


def _parse_line(line: str) -> tuple[list[Command], list[Problem]]:
    segments = [s.strip().strip(_DECORATION).rstrip(_TRAILING) for s in re.split(r"[,;]", line)]
    segments = [s for s in segments if s]
    if not segments:
        return [], []
    first = _parse_segment(segments[0])
    if first is None:  # not a command line at all
        return [], [_not_a_command(line, segments)]
    commands: list[Command] = []
    problems: list[Problem] = []
    for index, segment in enumerate(segments):
        result = first if index == 0 else _parse_segment(segment)
        current = commands[-1] if commands else None
        if result is None:
            # "like 2, 5" and "interest add graphs, transformers": a list goes on.
            extended = _extend(current, segment) if current is not None else None
            if extended is not None and current is not None:
                commands[-1:] = extended
            else:
                problems.append(_not_a_command(segment, [segment]))
        elif isinstance(result, Problem):
            problems.append(result)
        else:
            commands += result
    return commands, problems


def _parse_segment(segment: str) -> list[Command] | Problem | None:
    """Commands, a Problem (a command word with arguments that make no sense), or None."""
    shorthand = _parse_shorthand(segment)
    if shorthand is not None:
        return shorthand
    single = _parse_command(segment)
    return [single] if isinstance(single, Command) else single


def _parse_command(segment: str) -> Command | Problem | None:
    word, _, rest = segment.partition(" ")
    name = COMMANDS.get(word.lower())
    if name is None:
        return None
    rest = " ".join(rest.split())
    if name in ("like", "skip", "why"):
        return _parse_items(name, segment, rest)
    if name == "pause":
        if not rest:
            return Command("pause", segment)
        match = _DURATION.match(rest.lower())
        if not match:
            return Problem(segment, "say how long, for example “pause 7 days” or “pause 2 weeks”")
        days = int(match.group(1)) * (7 if (match.group(2) or "d").startswith("w") else 1)
        if not 1 <= days <= MAX_PAUSE_DAYS:
            return Problem(segment, f"a pause is 1 to {MAX_PAUSE_DAYS} days")
        return Command("pause", segment, days=days)
    if name in ("resume", "unsubscribe", "help"):
        if rest.lower() not in _POLITE:
            return Problem(segment, f"did you mean “{word.lower()}” alone on the line?")
        return Command(name, segment)
    if name == "time":
        match = _HHMM.match(rest.lower().removeprefix("at ").strip())
        if not match:
            return Problem(segment, "give a 24-hour time, for example “time 07:30”")
        return Command("time", segment, value=f"{int(match.group(1)):02d}:{match.group(2) or '00'}")
    if name == "size":
        if not rest.isdigit() or not 1 <= int(rest) <= MAX_SIZE:
            return Problem(segment, f"give a number of papers from 1 to {MAX_SIZE}, "
                                    "for example “size 5”")
        return Command("size", segment, number=int(rest))
    # interest add PHRASE / interest remove PHRASE
    action, _, phrase = rest.partition(" ")
    action = {"add": "add", "+": "add", "remove": "remove", "rm": "remove", "delete": "remove",
              "del": "remove", "-": "remove"}.get(action.lower(), "")
    phrase = phrase.strip().strip(_DECORATION)
    if not action or not phrase:
        return Problem(segment, "write “interest add PHRASE” or “interest remove PHRASE”")
    return Command(f"interest-{action}", segment, value=phrase)


def _parse_items(name: str, segment: str, rest: str) -> Command | Problem:
    numbers: list[int] = []
    every = rest_flag = False
    words = _DASHES.sub("-", rest).replace("&", " ").split()
    for token in words:
        lowered = token.lower()
        if lowered in ("and", "paper", "papers", "item", "items", "no", "no.", "number"):
            continue
        if lowered == "all" and name != "why":
            every = True
        elif lowered == "rest" and name == "skip":
            rest_flag = True
        elif match := _NUMBER.match(lowered):
            numbers.append(int(match.group(1)))
        elif match := _RANGE.match(lowered):
            low, high = int(match.group(1)), int(match.group(2))
            if low > high or high - low > 100:
                return Problem(segment, f"“{token}” is not a range of paper numbers")
            numbers.extend(range(low, high + 1))
        else:
            example = "skip rest" if name == "skip" else f"{name} 3"
            return Problem(segment, f"give the numbers of papers in the digest, for example "
                                    f"“{name} 2 5”, “{name} 2-4”"
                                    + (f" or “{example}”" if name == "skip" else ""))
    if not numbers and not every and not rest_flag:
        return Problem(segment, f"which papers? For example “{name} 2 5”")
    return Command(name, segment, items=tuple(dict.fromkeys(numbers)), every=every,
                   rest=rest_flag)


def _parse_shorthand(segment: str) -> list[Command] | None:
    """``+2 -5 +7-9``: like 2 and 7 to 9, skip 5."""
    tokens = segment.split()
    matches = [_SHORTHAND.match(token) for token in tokens]
    if not tokens or not all(matches):
        return None
    likes: list[int] = []
    skips: list[int] = []
    for match in matches:
        assert match is not None
        low = int(match.group(2))
        high = int(match.group(3) or low)
        if low > high or high - low > 100:
            return None
        (likes if match.group(1) == "+" else skips).extend(range(low, high + 1))
    commands = []
    if likes:
        commands.append(Command("like", segment, items=tuple(dict.fromkeys(likes))))
    if skips:
        commands.append(Command("skip", segment, items=tuple(dict.fromkeys(skips))))
    return commands


def _extend(current: Command, segment: str) -> list[Command] | None:
    """What replaces ``current`` when ``segment`` continues its list, or None."""
    if current.name in ("like", "skip", "why") and _SHORTHAND.match(current.text) is None:
        more = _parse_items(current.name, segment, segment)
        if isinstance(more, Problem):
            return None
        return [Command(current.name, f"{current.text}, {segment}",
                        items=tuple(dict.fromkeys(current.items + more.items)),
                        every=current.every or more.every, rest=current.rest or more.rest)]
    if current.name.startswith("interest-"):
        phrase = segment.strip(_DECORATION)
        return [current, Command(current.name, segment, value=phrase)] if phrase else None
    return None


def _shown(line: str) -> str:
    return line if len(line) <= MAX_LINE_CHARS else line[: MAX_LINE_CHARS - 1] + "…"


def _not_a_command(line: str, segments: list[str]) -> Problem:
    shown = _shown(line)
    word, _, rest = line.partition(" ")
    close = _close_command(word.lower())
    if close is not None:
        suggestion = f"{close} {rest}".strip()
        # Never suggest what was typed (a hint that repeats the line helps no one).
        if suggestion.casefold() != line.casefold():
            return Problem(shown, f"did you mean “{suggestion}”?")
    if any(isinstance(_parse_segment(s), list) for s in segments[1:]):
        return Problem(shown, "not read: put each command at the start of a line")
    return Problem(shown, "not a command (reply with “help” for the list)")


def reply_text_lines(text: str) -> list[str]:
    """The non-empty lines of a text, as the parser sees them (for tests and tools)."""
    return [line.strip() for line in text.splitlines() if line.strip()]
