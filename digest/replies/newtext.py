"""What the subscriber wrote: the new text of a reply, wherever it is.

A reply holds the subscriber's text and, somewhere, the digest it answers:
below (top-posting), above (bottom-posting, Thunderbird's and mutt's default),
or cut into pieces with answers in between. :func:`read_new_text` keeps the
lines the subscriber wrote and drops the rest, line by line, using:

1. what the product sent (:class:`SentText`, built from the digest's frozen
   message in the store, its text part and its HTML part read as text): a line
   whose words are a line of the digest, or a run of at least
   :data:`MIN_RUN_WORDS` words of it (so a digest re-wrapped at any width still
   matches), is quoted text whatever precedes it, under a quote header no one
   knows or none at all;
2. quote marks: lines starting with ``>`` (with any spaces, NBSPs or nesting);
3. quote headers of real clients, also wrapped over two or three lines (see
   :func:`quote_header_lines`): they are dropped, never reported;
4. separators after which clients put the original without marks
   ("-----Original Message-----", Outlook's From/Sent/To/Subject block, the
   QQ "原始邮件" line, forwarded-message lines, Outlook web's underscores):
   the rest is the original, up to the sent digest's last line when the digest
   is known (text after it is bottom-posted and read again);
5. signatures: everything from a ``-- `` line to the next quote, and the
   "Sent from my phone" lines of mobile clients.

A line that is a clean command is never taken for quoted digest text by rule 1:
the digest never has a bare command on a line (render's guard), so such a line
can only have been written by the subscriber.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import compat32

from mailparser_reply.constants import MAIL_LANGUAGES

MIN_RUN_WORDS = 4  # a run of digest words this long, inside a line, is quoted text
MAX_LINES = 20_000  # lines of a reply read; a longer reply is read up to here
MAX_HEADER_LINES = 3  # a quote header wrapped by a client spans at most this many lines
MAX_HEADER_CHARS = 400  # a quote header is a short line, whatever the language

# Characters that a client or a font shows as nothing or as a space.
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"), None)
_WORD = re.compile(r"\w+")
_QUOTE_MARK = re.compile(r"^[ \t\xa0]*(?:>[ \t\xa0]?)+")

# "On DATE, NAME <ADDR> wrote:" and its localised kin, read on the header joined into one
# line. Each pattern is our own, written from the clients' documented formats; the
# languages: en, de, fr, es, it, nl, pt, pl, ru, cs, sv/da/no, tr, zh, ja, ko.
_WROTE_HEADERS = tuple(re.compile(p, re.IGNORECASE) for p in (
    r"^on\b.{3,300}\bwrote\s*:?$",                        # en: Gmail, Apple, Thunderbird
    r"^.{1,200}\bwrote\s*:$",                              # en: "NAME <ADDR> wrote:", no date
    r"^am\b.{3,300}\bschrieb\b.{0,200}:$",                 # de
    r"^.{1,200}\bschrieb\s*:$",                            # de: "NAME schrieb:"
    r"^(?:-\s*)?le\b.{3,300}\ba\s+[ée]crit\s*:$",          # fr, also "- Le ... a écrit :"
    r"^.{1,200}\ba\s+[ée]crit\s*:$",                       # fr: "NAME a écrit :"
    r"^el\b.{3,300}\bescribi[óo]\s*:$",                    # es
    r"^.{1,200}\bescribi[óo]\s*:$",                        # es, no date
    r"^il\b.{3,300}\bha\s+scritto\s*:$",                   # it
    r"^.{1,200}\bha\s+scritto\s*:$",                       # it, no date
    r"^op\b.{3,300}\b(?:schreef|het\s+volgende\s+geschreven)\b.{0,200}:$",  # nl
    r"^em\b.{3,300}\bescreveu\s*:$",                       # pt
    r"^(?:w\s+dniu|dnia)\b.{3,300}\b(?:napisa[łl]\w*(?:\(a\))?|pisze)\s*:$",  # pl
    r"^.{1,300}\b(?:пишет|написал\w*(?:\(а\))?)\s*:$",     # ru
    r"^dne\b.{3,300}\bnapsal\w*(?:\(a\))?\s*:$",           # cs
    r"^(?:den|on|man|tir|ons|tor|fre|l[øö]r|s[øö]n)\b.{3,300}\bskrev\b.{0,200}:$",  # sv/da/no
    r"^.{3,300}\b(?:tarihinde|yazd[ıi])\b.{0,200}:$",       # tr
    r"^在.{3,300}写道\s*[：:]?$",                           # zh (Simplified)
    r"^.{3,300}於.{0,300}寫道\s*[：:]?$",                   # zh (Traditional)
    r"^.{3,300}(?:のメッセージ|は書きました|が書きました|さんは書きました)\s*[：:]$",  # ja
    r"^.{3,300}님이\s*(?:작성|씀)\w*\s*[：:]?$",            # ko
    # Gmail's numeric and localised forms: "2026-03-12 8:00 GMT+01:00 NAME <ADDR>:",
    # "2026年3月12日(木) 8:00 NAME <ADDR>:", "чт, 12 мар. 2026 г. в 08:00, NAME <ADDR>:".
    r"^.{0,200}[<‹](?:mailto:)?[^<>‹›\s@]+@[^<>‹›\s]+[>›]\s*[^<>]{0,40}[：:]$",
    r"^.{1,300}\bkirjoitti\b.{0,200}:$",                   # fi: "NAME kirjoitti DATE:"
))
# Separators after which a client puts the original without quote marks.
_SEPARATORS = tuple(re.compile(p, re.IGNORECASE) for p in (
    (r"^[*_\s]*-{2,}\s*(?:original\s+message|ursprüngliche\s+nachricht|originalnachricht"
    r"|message\s+d['’]origine|mensaje\s+original|messaggio\s+originale|oorspronkelijk\s+bericht"
    r"|wiadomo[śs][ćc]\s+oryginalna|исходное\s+сообщение|mensagem\s+original|原始邮件|原始郵件"
    r"|元のメッセージ|원본\s*메시지|forwarded\s+message|weitergeleitete\s+nachricht"
    r"|message\s+transf[ée]r[ée]|mensaje\s+reenviado|messaggio\s+inoltrato)\s*-{2,}[*_\s]*$"),
    (r"^\s*(?:begin\s+forwarded\s+message|anfang\s+der\s+weitergeleiteten\s+nachricht"
    r"|d[ée]but\s+du\s+message\s+r[ée]exp[ée]di[ée])\s*:\s*$"),
    r"^\s*_{20,}\s*$",                                     # Outlook on the web, Outlook mobile
))
# Keys of a quoted message's header block (Outlook and forwards): en, de, fr, es, it, nl, pt,
# pl, ro, ru, zh, ja, ko. Two such lines in a row start an original without quote marks.
_HEADER_KEYS = (
    "from|sent|to|cc|bcc|subject|date|reply-to|"
    "von|gesendet|an|betreff|datum|"
    "de|envoy[ée]|[àa]|objet|date\\s+d['’]envoi|"
    "de\\s+la|trimis|c[ăa]tre|subiect|"
    "enviado(?:\\s+el)?|para|asunto|fecha|"
    "da|inviato|a|oggetto|data|"
    "van|verzonden|aan|onderwerp|"
    "od|wys[łl]ano|do|temat|dw|"
    "от|отправлено|кому|тема|дата|копия|"
    "发件人|发送时间|收件人|主题|抄送|日期|時間|寄件者|收件者|主旨|"
    "差出人|送信日時|宛先|件名|"
    "보낸\\s*사람|보낸\\s*날짜|받는\\s*사람|제목"
)
_HEADER_FIELD = re.compile(r"^[*\s]*(?:" + _HEADER_KEYS + r")[*\s]*[:：][*\s]*(?:\S.*)?$",
                           re.IGNORECASE)
_FROM_FIELD = re.compile(r"^[*\s]*(?:from|von|de\s+la|de|da|van|od|от|发件人|寄件者|差出人|보낸\s*사람)"
                         r"[*\s]*[:：]", re.IGNORECASE)
# What mobile and webmail clients append: "Sent from my iPhone" and its kin.
_SENT_FROM = re.compile(
    r"^(?:sent\s+(?:from|with|via)\b|get\s+outlook\s+for\b|von\s+meinem\b.*\bgesendet$"
    r"|gesendet\s+von\b|envoy[ée]\s+(?:de|depuis)\b|enviado\s+(?:desde|de|do)\b|inviato\s+da\b"
    r"|verzonden\s+(?:vanaf|met)\b|verstuurd\s+vanaf\b|wys[łl]ane\s+z\b|wys[łl]ano\s+z\b"
    r"|отправлено\s+(?:с|из)\b|发自我的|從我的|从我的|.{0,30}から送信$|.{0,30}에서\s*보냄$"
    r"|skickat\s+fr[åa]n\b|sendt\s+fra\b|odesl[áa]no\s+z\b)",
    re.IGNORECASE)
# The library's own "wrote" headers, as a second opinion (its fixture language left out).
_LIBRARY_HEADERS = tuple(re.compile(lang["wrote_header"]) for name, lang in MAIL_LANGUAGES.items()
                         if name != "david" and lang.get("wrote_header"))


def clean_line(line: str) -> str:
    """A line as a person reads it: NFKC (full-width letters, digits and commas become
    ASCII; NBSP and other Unicode spaces become spaces), invisible characters removed,
    runs of spaces made one."""
    line = unicodedata.normalize("NFKC", line).translate(_INVISIBLE)
    return " ".join(line.split())


# A link as Outlook and other clients write an HTML link when they turn the digest into
# text: "Like<mailto:digest+tok@host?subject=like%201>", "arXiv<https://arxiv.org/abs/...>".
_CONVERTED_LINK = re.compile(r"<(?:mailto:|https?://)[^<>\s]*>", re.IGNORECASE)


def says_nothing(text: str) -> bool:
    """True for a text part that is empty or holds only a mobile client's "Sent from my
    iPhone" lines (some clients write that and put the reply in the HTML part only)."""
    return all(not line or _SENT_FROM.match(line) or line in ("--", "—")
               for line in (clean_line(x) for x in text.splitlines()))


def words(line: str) -> str:
    """The words of a line, case-folded, joined by single spaces: what matching compares.
    Links a client wrote out after their text (``Like<mailto:...>``) are left out, so a
    digest line converted that way matches the line sent."""
    return " ".join(_WORD.findall(_CONVERTED_LINK.sub(" ", clean_line(line)).casefold()))


@dataclass(frozen=True)
class SentText:
    """The text of the digest a reply answers, ready for matching reply lines against.

    ``lines``: the words of each non-empty line of the text and HTML parts;
    ``streams``: each part's words as one line (so a re-wrapped line is a run in it);
    ``endings``: the words of each part's last line (where the quoted original ends).
    """

    lines: frozenset[str] = frozenset()
    streams: tuple[str, ...] = ()
    endings: frozenset[str] = frozenset()

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> SentText:
        lines: set[str] = set()
        streams: list[str] = []
        endings: set[str] = set()
        for text in texts:
            part = [w for w in (words(line) for line in text.splitlines()) if w]
            if not part:
                continue
            lines.update(part)
            streams.append(" " + " ".join(part) + " ")
            endings.add(part[-1])
        return cls(frozenset(lines), tuple(streams), frozenset(endings))

    @classmethod
    def from_message(cls, raw: bytes, html_to_text: Callable[[str], str]) -> SentText:
        """From the digest's frozen message (bytes as stored); an unreadable one is empty."""
        if not raw.strip():
            return cls()
        # compat32: our own message, read for its text only; several times faster than
        # policy.default, which parses every header into objects.
        message = BytesParser(policy=compat32).parsebytes(raw)
        texts: list[str] = []
        for part in message.walk():
            if part.get_content_maintype() != "text":
                continue
            payload = part.get_payload(decode=True)
            if not isinstance(payload, bytes):
                continue
            try:
                content = payload.decode(part.get_content_charset() or "utf-8", "replace")
            except LookupError:
                content = payload.decode("utf-8", "replace")
            texts.append(html_to_text(content) if part.get_content_subtype() == "html"
                         else content)
        return cls.from_texts(texts)

    def __bool__(self) -> bool:
        return bool(self.lines)

    def holds(self, line: str) -> bool:
        """True when ``line`` is a line of the digest, or a run of at least
        :data:`MIN_RUN_WORDS` of its words (a line re-wrapped at another width)."""
        found = words(line)
        if not found:
            return False
        if found in self.lines:
            return True
        if found.count(" ") + 1 < MIN_RUN_WORDS:
            return False
        needle = " " + found + " "
        return any(needle in stream for stream in self.streams)

    def continues(self, previous: str, line: str) -> bool:
        """True when ``line`` goes on where ``previous`` (a line of the digest) stopped: a
        short piece of a paragraph re-wrapped at a narrow width."""
        found, before = words(line), words(previous)
        if not found or not before:
            return False
        needle = " " + before + " " + found + " "
        return any(needle in stream for stream in self.streams)

    def ends_with(self, line: str) -> bool:
        """True when ``line`` ends the digest (its last line, or the end of a re-wrapping)."""
        found = words(line)
        if not found:
            return False
        return found in self.endings or any(
            stream.endswith(" " + found + " ") and found.count(" ") + 1 >= MIN_RUN_WORDS
            for stream in self.streams)


@dataclass
class NewText:
    """The lines a subscriber wrote, and how many lines were left out as quoted or signature."""

    lines: list[str] = field(default_factory=list)
    quoted: int = 0

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def read_new_text(text: str, sent: SentText | None = None,
                  is_command: Callable[[str], bool] = lambda line: False) -> NewText:
    """Keep the lines the subscriber wrote (see the module docstring for the rules).

    ``is_command`` tells a clean command line (one a digest never holds); such a
    line is kept even when its words also occur inside a sentence of the digest.
    """
    sent = sent or SentText()
    lines = text.splitlines()[:MAX_LINES]  # every line break Python knows, as parse_text
    result = NewText()
    unmarked_original = False  # inside an original that a client put without quote marks
    digest_original = False  # ... and that original is the known digest (matched line by line)
    previous_quoted = ""  # the line before, when it was a line of the digest
    ends_below: list[bool] | None = None  # per line: the digest's last line is at or below it
    signature = False
    i = 0
    while i < len(lines):
        raw = lines[i]
        line = clean_line(raw)
        if _QUOTE_MARK.match(raw.translate(_INVISIBLE)) or line.startswith(">"):
            signature = False
            result.quoted += 1
            i += 1
            continue
        if not line:
            i += 1
            continue
        if unmarked_original and digest_original and not (
                is_header_field(line) or (not is_command(line) and (
                    sent.holds(line) or (previous_quoted and sent.continues(previous_quoted,
                                                                             line))))):
            # The known digest is quoted line by line: a line that is none of its lines (nor
            # a header line) was written by the subscriber, below a trimmed or re-converted
            # original. Read it as new text.
            unmarked_original = False
        if unmarked_original:
            result.quoted += 1
            previous_quoted = line
            if sent and sent.ends_with(line):
                unmarked_original = False  # what follows the digest's end was written below it
            i += 1
            continue
        span = quote_header_lines(lines, i) or _separator_lines(lines, i)
        if span:
            signature = False
            result.quoted += span
            following = _next_text_line(lines, i + span)
            if following is not None and not _QUOTE_MARK.match(following):
                # The original follows without marks: all of it is quoted, up to the digest's
                # end when the digest is known; or, when it is the known digest and ends
                # below, line by line (an answer typed between its lines is then read).
                if sent and ends_below is None:
                    ends_below = _digest_ends_below(lines, sent)
                # The digest when its opening lines are: a greeting alone ("Hello Alice,")
                # opens a confirmation too.
                opening = [x for x in lines[i + span:i + span + 50] if x.strip()][:2]
                digest_original = bool(sent) and all(sent.holds(x) for x in opening)
                unmarked_original = not (digest_original and ends_below is not None
                                         and ends_below[i + span])
            i += span
            continue
        if is_header_field(line) and _near_header_field(lines, i):
            result.quoted += 1  # a line of a header block no rule above recognised
            i += 1
            continue
        if line in ("--", "-- ", "—") or raw.rstrip("\r") == "-- ":
            signature = True
            i += 1
            continue
        if signature or _SENT_FROM.match(line):
            result.quoted += 1
            i += 1
            continue
        if sent and not is_command(line) and (
                sent.holds(line) or (previous_quoted and sent.continues(previous_quoted, line))):
            result.quoted += 1
            previous_quoted = line
            i += 1
            continue
        previous_quoted = ""
        result.lines.append(raw)
        i += 1
    return result


def quote_header_lines(lines: list[str], start: int) -> int:
    """How many lines (1 to 3) starting at ``start`` form a quote header, else 0."""
    joined = ""
    for count in range(1, MAX_HEADER_LINES + 1):
        if start + count > len(lines):
            break
        piece = clean_line(lines[start + count - 1])
        if not piece:
            break
        # Gmail wraps a long address after its "<": the halves join without a space.
        glue = "" if joined.endswith(("<", "‹", "(")) else " "
        joined = f"{joined}{glue}{piece}".strip() if joined else piece
        if len(joined) > MAX_HEADER_CHARS:
            break
        # Every header form ends with a colon ("wrote" alone in old Apple Mail): a cheap test
        # first, so a reply of many lines costs little.
        if joined.endswith((":", "：", "wrote")) and is_quote_header(joined):
            return count
    return 0


def is_quote_header(line: str) -> bool:
    """True for an "On DATE, NAME <ADDR> wrote:" line in any of the known forms."""
    line = clean_line(line).strip("*_ ")
    if not line or len(line) > MAX_HEADER_CHARS:
        return False
    return (any(p.match(line) for p in _WROTE_HEADERS)
            or any(p.match(line) for p in _LIBRARY_HEADERS))


def is_header_field(line: str) -> bool:
    """True for a "From: ...", "Betreff: ...", "发件人：..." line of a quoted header block."""
    return bool(_HEADER_FIELD.match(clean_line(line)))


def _separator_lines(lines: list[str], i: int) -> int:
    """How many lines a separator (with the header block under it) spans at ``i``, else 0."""
    line = clean_line(lines[i])
    end = i
    if any(p.match(line) for p in _SEPARATORS):
        end = i + 1
    elif _FROM_FIELD.match(line) and is_header_field(line):
        # Outlook's block: a From line and, within the next three lines, another field.
        following = [clean_line(x) for x in lines[i + 1:i + 4]]
        if not any(is_header_field(x) and not _FROM_FIELD.match(x) for x in following if x):
            return 0
        end = i + 1
    else:
        return 0
    # The header fields under it (a wrapped To: list goes on with indented lines).
    while end < len(lines):
        current = lines[end]
        if is_header_field(current) or (current[:1] in (" ", "\t") and current.strip()
                                         and end > i + 1) or not current.strip() and end + 1 < len(lines) and is_header_field(lines[end + 1]):
            end += 1
        else:
            break
    return end - i


def _near_header_field(lines: list[str], i: int) -> bool:
    if "@" in lines[i]:
        return True
    neighbours = [x for x in (lines[i - 1] if i else "", lines[i + 1] if i + 1 < len(lines)
                              else "") if x.strip()]
    return any(is_header_field(x) for x in neighbours)


def _next_text_line(lines: list[str], start: int) -> str | None:
    for line in lines[start:start + 50]:
        if line.strip():
            return line
    return None


def _digest_ends_below(lines: list[str], sent: SentText) -> list[bool]:
    """Per line index (and one past the end): does a line ending the digest come at or after
    it? Computed once per reply, so a reply of many headers costs one pass."""
    below = [False] * (len(lines) + 1)
    for index in range(len(lines) - 1, -1, -1):
        below[index] = below[index + 1] or sent.ends_with(lines[index])
    return below
