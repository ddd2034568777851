"""Reading one reply: who sent it, which digest it answers, and the commands in its new text.

Nothing here touches the store or the network: a raw message goes in, a
:class:`ParsedReply` (or the facts needed to refuse it) comes out.

Only the new text counts. The text/plain part (or the HTML part read as text,
quoted blocks dropped) goes through mail-parser-reply with every language it
knows, which cuts the quoted original at the "On ... wrote:", "Am ... schrieb",
"Le ... a écrit", "-----Original Message-----" lines and drops signatures;
then any line still starting with ``>`` goes too. Commands are read only at
the start of a line, so a sentence that mentions "like 3" commands nothing.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage, Message
from email.parser import BytesParser
from email.utils import getaddresses
from html.parser import HTMLParser

from mailparser_reply.constants import MAIL_LANGUAGES
from mailparser_reply.parser import EmailMessage as ReplyText

MAX_PAUSE_DAYS = 366  # a longer pause is an unsubscribe in disguise
MAX_SIZE = 100  # as the config's max_papers
MAX_REPORTED_LINES = 8  # lines "not understood" listed in a confirmation; the rest are counted
MAX_LINE_CHARS = 80  # a reported line is cut to this length

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
_DECORATION = " \t*_•·\"'`“”„«»‘’"
_TRAILING = " \t.!?)"
_NUMBER = re.compile(r"^#?(\d{1,3})$")
_RANGE = re.compile(r"^#?(\d{1,3})-#?(\d{1,3})$")
_SHORTHAND = re.compile(r"^([+-])(\d{1,3})(?:-(\d{1,3}))?$")
_DASHES = re.compile(r"\s*[-–—]\s*")
_HHMM = re.compile(r"^([01]?\d|2[0-3])(?:[:.h]([0-5]\d))?$")
_DURATION = re.compile(r"^(?:for\s+)?(\d{1,3})\s*(d|days?|w|wks?|weeks?)?$")
_TOKEN_IN_ADDRESS = re.compile(r"\+([a-z0-9]{6,64})@", re.IGNORECASE)
_TOKEN_IN_MESSAGE_ID = re.compile(r"<digest\.([a-z0-9]{6,64})@[^>\s]+>", re.IGNORECASE)
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
    commands: list[Command] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    from_subject: bool = False  # the commands came from the subject line (a mailto link)


# --- the message --------------------------------------------------------------


def parse_message(raw: bytes) -> EmailMessage:
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
    """The From address, lower-cased ('' when there is none)."""
    values = headers(message, "From")
    if not values:
        return ""
    addresses = [address for _, address in getaddresses(values) if "@" in address]
    return addresses[0].strip().lower() if addresses else ""


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


def automatic_reason(message: Message) -> str | None:
    """Why the message is an auto-reply, a bounce or list mail (never answered), else None."""
    auto = header(message, "Auto-Submitted").lower()
    if auto and not auto.startswith("no"):
        return f"Auto-Submitted: {auto}"
    precedence = header(message, "Precedence").lower()
    if precedence in ("bulk", "junk", "list", "auto_reply"):
        return f"Precedence: {precedence}"
    for name in ("X-Autoreply", "X-Autorespond", "X-Auto-Reply"):
        if header(message, name):
            return f"{name} header"
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


def subject_of(message: Message) -> str:
    return header(message, "Subject")


def is_reply_subject(subject: str) -> bool:
    return bool(_REPLY_PREFIX.match(subject))


# --- the new text -------------------------------------------------------------


def new_text(message: EmailMessage) -> str:
    """The text the subscriber wrote in this reply: no quoted original, no signature."""
    return strip_quoted(body_text(message))


def body_text(message: EmailMessage) -> str:
    """The text/plain part, else the HTML part as text (quoted blocks left out)."""
    part = message.get_body(preferencelist=("plain", "html"))
    if part is None:
        return ""
    try:
        content = part.get_content()
    except (LookupError, UnicodeError, ValueError, AssertionError):
        payload = part.get_payload(decode=True)
        content = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""
    if not isinstance(content, str):
        return ""
    if part.get_content_type() == "text/html":
        return html_to_text(content)
    return content


def strip_quoted(text: str) -> str:
    """Cut quoted text and signatures (mail-parser-reply, every language), then ``>`` lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    # keep_hyphen_lists: a line starting with "-" ("-5": skip 5) is not a signature.
    parsed = ReplyText(text=text, languages=list(_LANGUAGES), keep_hyphen_lists=True).read()
    if not parsed.replies:
        return ""
    first = parsed.replies[0]
    # A reply that starts with the quote header ("On ... wrote:") has no new text above it.
    latest = "" if first.headers else first.body
    return "\n".join(line for line in latest.split("\n") if not line.lstrip().startswith(">"))


# Every language mail-parser-reply knows ("david" is a test fixture of the library, not one).
_LANGUAGES = tuple(lang for lang in MAIL_LANGUAGES if lang != "david")


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
    """Commands at the start of lines; several per line separated by commas or semicolons."""
    parsed = ParsedReply()
    for raw_line in text.splitlines():
        line = raw_line.strip().strip(_DECORATION).rstrip(_TRAILING).strip(_DECORATION)
        if not line:
            continue
        commands, problems = _parse_line(line)
        parsed.commands += commands
        parsed.problems += problems
    return parsed


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


def _not_a_command(line: str, segments: list[str]) -> Problem:
    shown = line if len(line) <= MAX_LINE_CHARS else line[: MAX_LINE_CHARS - 1] + "…"
    word, _, rest = line.partition(" ")
    close = difflib.get_close_matches(word.lower(), COMMANDS, n=1, cutoff=0.75)
    if close:
        suggestion = f"{close[0]} {rest}".strip()
        return Problem(shown, f"did you mean “{suggestion}”?")
    if any(isinstance(_parse_segment(s), list) for s in segments[1:]):
        return Problem(shown, "not read: put each command at the start of a line")
    return Problem(shown, "not a command (reply with “help” for the list)")


def reply_text_lines(text: str) -> list[str]:
    """The non-empty lines of a text, as the parser sees them (for tests and tools)."""
    return [line.strip() for line in text.splitlines() if line.strip()]
