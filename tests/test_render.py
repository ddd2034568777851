"""The digest email: parts, headers, escaping, and no line a reply could obey."""

from __future__ import annotations

import email
import email.policy
import re
from dataclasses import replace
from datetime import date, datetime, timedelta, timezone
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from html.parser import HTMLParser
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from digest.config import SmtpConfig, Subscriber
from digest.paper import Paper
from digest.render import (
    ABSTRACT_CHARS,
    DigestContent,
    DigestItem,
    cut_abstract,
    defuse_command_lines,
    is_bare_command,
    message_id_for,
    new_token,
    render_digest,
    render_html,
    render_text,
    shorten,
    subject_for,
    template_root,
)
from digest.replies.parse import parse_text

NOW = datetime(2026, 3, 12, 8, 0, tzinfo=timezone(timedelta(hours=1)))
SMTP = SmtpConfig(
    host="smtp.example.org",
    sender="Paper Digest <digest@papers.example.org>",
    reply_to="digest+{token}@papers.example.org",
)
TOKEN = "abcdefghij234567"
LONG_ABSTRACT = (
    "Domain adaptation attempts to transfer the knowledge from a labeled source domain to an "
    "unlabeled target domain that follows a different distribution from the source. To achieve "
    "this, methods include a source classification objective to extract the source knowledge "
    "and a domain alignment objective to diminish the domain shift, ensuring knowledge transfer "
    "across the two domains even when labels are scarce."
)

# What a reply parser may read as a command when a quoted original is not marked with ">".
COMMAND_LINE = re.compile(
    r"^(like|skip|more|less|unsubscribe|subscribe|pause|resume|unpause|stop|start|help|undo)"
    r"(\s+(all|[\d,\s]+))?$",
    re.IGNORECASE,
)


def paper(n: int, **fields: object) -> Paper:
    values: dict[str, object] = {
        "id": f"2603.{n:05d}",
        "title": f"Paper number {n} on domain adaptation",
        "abstract": LONG_ABSTRACT,
        "arxiv_id": f"2603.{n:05d}",
    }
    values.update(fields)
    return Paper(**values)  # type: ignore[arg-type]


def content(*items: DigestItem, personalised: bool = True, considered: int = 412,
            name: str = "Alice Example") -> DigestContent:
    return DigestContent(
        subscriber=Subscriber(email="alice@example.org", name=name),
        token=TOKEN,
        local_date=date(2026, 3, 12),
        considered=considered,
        items=items,
        personalised=personalised,
    )


def items(count: int) -> tuple[DigestItem, ...]:
    return tuple(
        DigestItem(position=n, paper=paper(n), score=1.0 - n / 100,
                   reason=f"close to papers you liked (reason {n})")
        for n in range(1, count + 1)
    )


def parts(message: EmailMessage) -> tuple[str, str]:
    text = message.get_body(preferencelist=("plain",))
    html = message.get_body(preferencelist=("html",))
    assert text is not None and html is not None
    return text.get_content(), html.get_content()


def on_the_wire(message: EmailMessage) -> EmailMessage:
    """The message as a mail client gets it: serialised with CRLF, parsed again."""
    wire = message.as_bytes(policy=message.policy.clone(linesep="\r\n"))
    parsed = email.message_from_bytes(wire, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


class _TextOfHtml(HTMLParser):
    """HTML read as text the way clients quote it: blocks on lines of their own."""

    BLOCKS = frozenset({"p", "div", "br", "tr", "td", "th", "h1", "h2", "h3", "li", "table",
                        "title", "body", "blockquote"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.chunks: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.BLOCKS:
            self.chunks.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.BLOCKS:
            self.chunks.append("\n")

    def handle_data(self, data: str) -> None:
        self.chunks.append(re.sub(r"[ \t\r\n]+", " ", data))  # source line breaks are spaces


def html_as_text(html: str) -> str:
    parser = _TextOfHtml()
    parser.feed(html)
    text = "".join(parser.chunks).replace("\xa0", " ")
    return "\n".join(" ".join(line.split()) for line in text.splitlines())


def command_lines(text: str) -> list[str]:
    """Lines that are nothing but a command, once whitespace, markup and punctuation go."""
    return [line for line in text.splitlines()
            if COMMAND_LINE.match(line.strip(" \t*_~>\"'`.,;:!?()[]{}-–—•·"))]


def links(html: str) -> list[str]:
    return re.findall(r'href="([^"]*)"', html)


def mailto_parts(link: str) -> tuple[str, dict[str, list[str]]]:
    parsed = urlsplit(link.replace("&amp;", "&"))
    assert parsed.scheme == "mailto"
    return unquote(parsed.path), parse_qs(parsed.query)


# Structure and headers


def test_digest_is_multipart_alternative_with_text_then_html() -> None:
    message = render_digest(content(*items(3)), SMTP, now=NOW)

    assert message.get_content_type() == "multipart/alternative"
    kinds = [part.get_content_type() for part in message.iter_parts()]
    assert kinds == ["text/plain", "text/html"]  # the last is the one clients prefer
    assert all(part.get_content_charset() == "utf-8" for part in message.iter_parts())


def test_headers_name_sender_recipient_date_and_token() -> None:
    message = on_the_wire(render_digest(content(*items(3)), SMTP, now=NOW))

    assert message["From"] == "Paper Digest <digest@papers.example.org>"
    assert message["To"] == "Alice Example <alice@example.org>"
    assert message["Date"] == format_datetime(NOW)
    assert message["Message-ID"] == f"<digest.{TOKEN}@papers.example.org>"
    assert message["Reply-To"] == f"digest+{TOKEN}@papers.example.org"
    assert message["List-Unsubscribe"] == (
        f"<mailto:digest+{TOKEN}@papers.example.org?subject=unsubscribe>"
    )
    assert message["Auto-Submitted"] == "auto-generated"


def test_list_unsubscribe_stays_a_plain_url_even_when_long() -> None:
    smtp = replace(SMTP, reply_to="digest+{token}@mail.digest.department.university.example.org")
    message = render_digest(content(*items(1)), smtp, now=NOW)

    wire = message.as_bytes(policy=message.policy.clone(linesep="\r\n"))
    line = next(raw for raw in wire.split(b"\r\n") if raw.startswith(b"List-Unsubscribe:"))
    assert line == (b"List-Unsubscribe: <mailto:digest+" + TOKEN.encode()
                    + b"@mail.digest.department.university.example.org?subject=unsubscribe>")


def test_header_values_never_hold_line_breaks() -> None:
    nasty = paper(1, title="Line one\r\nBcc: victim@example.org\nline\u2028three\ttabbed")
    digest = content(DigestItem(1, nasty, 0.9, "reason"), name="Alice\r\nBcc: x@example.org")
    message = render_digest(digest, SMTP, now=NOW)

    for name, value in message.items():
        assert "\r" not in value and "\n" not in value, name
    assert message["Subject"] == (
        "Paper digest, Thu 12 Mar 2026: Line one Bcc: victim@example.org line three tabbed"
    )
    assert "Bcc" not in on_the_wire(message)


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        render_digest(content(*items(1)), SMTP, now=datetime(2026, 3, 12, 8, 0))


# Subject


def test_subject_names_the_date_and_the_top_paper() -> None:
    assert subject_for(content(*items(1))) == (
        "Paper digest, Thu 12 Mar 2026: Paper number 1 on domain adaptation"
    )
    assert subject_for(content(*items(5))) == (
        "Paper digest, Thu 12 Mar 2026: Paper number 1 on domain adaptation (+4 more)"
    )


def test_subject_cuts_a_long_title_at_a_word() -> None:
    title = "A Very Long Title " * 20
    subject = subject_for(content(DigestItem(1, paper(1, title=title), 1.0, "r")))

    assert subject.startswith("Paper digest, Thu 12 Mar 2026: A Very Long Title")
    assert subject.endswith("Title…")
    assert len(subject) < 140


def test_empty_digest_has_a_sensible_subject_and_body() -> None:
    digest = content(considered=37)
    message = render_digest(digest, SMTP, now=NOW)
    text, html = parts(message)

    assert message["Subject"] == "Paper digest, Thu 12 Mar 2026: nothing new for you today"
    assert "None of the 37 new papers" in text
    assert "nothing to read today" in html_as_text(html)
    assert not re.search(r"^\d+\. ", text, re.MULTILINE)

    nothing = render_text(content(considered=0))
    assert "No new papers arrived since your last digest" in nothing


# Body


def test_greets_by_name_and_counts_papers() -> None:
    text, html = parts(render_digest(content(*items(3)), SMTP, now=NOW))

    for body in (text, html_as_text(html)):
        assert "Hello Alice Example," in body
        assert "Out of 412 new papers, here are the 3 picked for you." in " ".join(body.split())


def test_papers_are_numbered_one_to_n_in_order() -> None:
    shuffled = tuple(reversed(items(4)))
    text, html = parts(render_digest(content(*shuffled), SMTP, now=NOW))

    numbered = re.findall(r"^(\d+)\.\s+(.+)$", text, re.MULTILINE)
    assert numbered == [(str(n), f"Paper number {n} on domain adaptation") for n in range(1, 5)]
    headings = re.findall(r"^(\d+)\. (Paper number \d+)", html_as_text(html), re.MULTILINE)
    assert [number for number, _ in headings] == ["1", "2", "3", "4"]


def test_each_paper_shows_links_code_reason_and_a_short_abstract() -> None:
    with_code = paper(1, code_links=("https://github.com/example/pareto",))
    no_id = paper(2, arxiv_id=None, id="t:0123456789abcdef", title="No id & friends")
    digest = content(DigestItem(1, with_code, 0.9, "like your liked paper on DA"),
                     DigestItem(2, no_id, 0.8, "popular today"))
    text, html = parts(render_digest(digest, SMTP, now=NOW))
    first, second = text.split("\n2.", 1)

    assert "    Paper:   https://arxiv.org/abs/2603.00001" in first.splitlines()
    assert "    PDF:     https://arxiv.org/pdf/2603.00001" in first.splitlines()
    assert "    Code:    https://github.com/example/pareto" in first.splitlines()
    assert "Why:   like your liked paper on DA" in first
    assert "arxiv.org/search" not in first  # the id is known: no title search
    assert ("    Search:  https://arxiv.org/search/?searchtype=title&query=No+id+%26+friends"
            in second.splitlines())
    assert "pdf" not in second.lower() and "arXiv 2" not in second  # no id: no PDF, no id shown
    hrefs = links(html)
    assert "https://arxiv.org/abs/2603.00001" in hrefs
    assert "https://arxiv.org/pdf/2603.00001" in hrefs
    assert "https://github.com/example/pareto" in hrefs
    assert "https://arxiv.org/search/?searchtype=title&amp;query=No+id+%26+friends" in html
    assert "like your liked paper on DA" in html
    assert "huggingface.co" not in text + html  # neither came from the daily-papers listing


def test_abstracts_are_cut_at_a_word_when_no_sentence_ends_in_reach() -> None:
    long_sentence = ("We study " + "very " * 80 + "long sentences.").strip()
    digest = content(DigestItem(1, paper(1, abstract=long_sentence), 1.0, "r"))
    text = render_text(digest, SMTP)

    snippet = re.search(r"^    (We study.*?…)$", text, re.MULTILINE | re.DOTALL)
    assert snippet is not None
    flat = " ".join(snippet.group(1).split())
    assert len(flat) <= ABSTRACT_CHARS + 1
    assert long_sentence.startswith(flat[:-1])  # cut where a word ends, then the ellipsis
    assert long_sentence[len(flat) - 1] == " "


def test_abstracts_are_cut_where_a_sentence_ends() -> None:
    digest = content(DigestItem(1, paper(1), 1.0, "r"))
    text, html = parts(render_digest(digest, SMTP, now=NOW))

    kept = ("Domain adaptation attempts to transfer the knowledge from a labeled source domain to "
            "an unlabeled target domain that follows a different distribution from the source.")
    assert kept in " ".join(text.split()) and kept in html
    assert "To achieve this" not in text and "To achieve this" not in html
    assert "…" not in text.split("\n1.", 1)[1]


FOLLOW = "We follow J. Doe and compare both methods on many benchmarks of note."


@pytest.mark.parametrize(("abstract", "expected"), [
    # Abbreviations and initials end no sentence: the cut goes to the last real one in reach.
    ("Prior work, e.g. Smith et al. Transformers, fails at scale because of memory. " * 2
     + "Xy " * 100, ("Prior work, e.g. Smith et al. Transformers, fails at scale because of "
     "memory. Prior work, e.g. Smith et al. Transformers, fails at scale because of memory.")),
    (f"{FOLLOW} {FOLLOW} {FOLLOW} {FOLLOW} {FOLLOW}", f"{FOLLOW} {FOLLOW} {FOLLOW} {FOLLOW}"),
    ("Short. " + "word " * 100, None),  # a first sentence too short to stand alone: word cut
])
def test_cut_abstract_respects_abbreviations(abstract: str, expected: str | None) -> None:
    cut = cut_abstract(abstract)
    if expected is None:
        assert cut.endswith("…") and len(cut) <= ABSTRACT_CHARS + 1
    else:
        assert cut == expected


def test_shorten_cuts_after_a_whole_word() -> None:
    assert shorten("aaa bbb ccc", 7) == "aaa bbb…"
    assert shorten("aaa bbb ccc", 6) == "aaa…"
    assert shorten("aaa, bbb", 5) == "aaa…"
    assert shorten("short  text", 20) == "short text"
    assert shorten("x" * 20, 5) == "xxxxx…"


def test_unsafe_code_links_are_left_out() -> None:
    evil = paper(1, code_links=("javascript:alert(1)", "github.com/example/bare"))
    text, html = parts(render_digest(content(DigestItem(1, evil, 1.0, "r")), SMTP, now=NOW))

    assert "javascript:" not in html and "javascript:" not in text
    assert "https://github.com/example/bare" in links(html)


def test_explore_items_are_marked_in_both_parts() -> None:
    digest = content(DigestItem(1, paper(1), 0.9, "r1"),
                     DigestItem(2, paper(2), 0.2, "r2", explore=True))
    text, html = parts(render_digest(digest, SMTP, now=NOW))

    item_two = text.split("\n2. ", 1)[1]
    assert "Wildcard pick" in item_two.split("Why:")[0]
    assert "Wildcard pick" not in text.split("\n2. ", 1)[0]
    assert html.count(">Wildcard<") == 1


def test_titles_with_markup_are_escaped_in_html_and_kept_in_text() -> None:
    title = "Pareto <script>alert('x')</script> & Friends"
    digest = content(DigestItem(1, paper(1, title=title,
                                         abstract="Uses <b>bold</b> claims & more"), 1.0, "r"))
    text, html = parts(render_digest(digest, SMTP, now=NOW))

    assert "&lt;script&gt;" in html
    assert "<script" not in html.lower()
    assert "&amp; Friends" in html
    assert "&lt;b&gt;bold&lt;/b&gt;" in html
    assert re.search(r"^1\.\s+" + re.escape(title) + "$", text, re.MULTILINE)  # no entities


def test_unpersonalised_digest_says_replies_will_personalise_it() -> None:
    text, html = parts(render_digest(content(*items(2), personalised=False), SMTP, now=NOW))
    for body in (" ".join(text.split()), " ".join(html_as_text(html).split())):
        assert "not personalised yet" in body
        assert "like 2 5" in body and "skip 3" in body

    text, html = parts(render_digest(content(*items(2), personalised=True), SMTP, now=NOW))
    assert "not personalised" not in text and "not personalised" not in html


def test_reply_commands_are_explained_inline_in_the_text_part() -> None:
    text = " ".join(render_text(content(*items(2)), SMTP).split())
    for phrase in ("*like 2 5, skip 3*", "*pause*", "*unsubscribe*", "*help*"):
        assert phrase in text
    assert "several commands per line work" in text


def test_footer_example_is_what_the_reply_parser_reads() -> None:
    text, html = parts(render_digest(content(*items(5)), SMTP, now=NOW))
    example = re.search(r"\*(like 2 5, skip 3)\*", text)  # whole, on one line, to copy
    assert example is not None
    assert "like 2 5, skip 3" in html
    assert "on a line of its own" not in text + html
    parsed = parse_text(example.group(1))
    assert [(c.name, c.items) for c in parsed.commands] == [("like", (2, 5)), ("skip", (3,))]
    assert parsed.problems == []


# Commands: never a bare command on a line


ADVERSARIAL = (
    paper(1, title="Help", abstract="Stop."),
    paper(2, title="like 3", abstract="skip 2"),
    paper(3, title="Unsubscribe", abstract="Pause"),
    paper(4, abstract=("We study when models help " * 11).strip() + " stop"),
    paper(5, abstract="x " * 140 + "like 3"),
)


@pytest.mark.parametrize("personalised", [True, False])
@pytest.mark.parametrize("count", [0, 1, 5])
def test_no_line_of_either_part_is_a_bare_command(personalised: bool, count: int) -> None:
    chosen = tuple(DigestItem(n, p, 0.5, "help" if n == 1 else "Because: stop", explore=n == 2)
                   for n, p in enumerate(ADVERSARIAL[:count], start=1))
    message = render_digest(content(*chosen, personalised=personalised, name="Help"),
                            SMTP, now=NOW)
    text, html = parts(message)

    assert command_lines(text) == []
    assert command_lines(html_as_text(html)) == []


def test_the_check_itself_catches_bare_commands() -> None:
    assert command_lines("hello\n  like 3\n*Unsubscribe*\npause.\nskip 2, 4\n") == [
        "  like 3", "*Unsubscribe*", "pause.", "skip 2, 4"]
    assert command_lines("reply with *like 2 5* or *skip 3*\n1. Help\n") == []
    assert is_bare_command("> Help!") and not is_bare_command("Help me")


def test_a_wrapped_bare_command_is_joined_onto_the_text_before_it() -> None:
    assert defuse_command_lines("Hello\n    we help\n    stop.\n") == "Hello\n    we help stop.\n"
    assert defuse_command_lines("Hello\n\n  like 3\nfoo") == "Hello like 3\nfoo"
    # The reader strips "1." as a list number: "1. Help" alone is the help command.
    assert defuse_command_lines("1. Help\nlike this one\n") == "Text: 1. Help\nlike this one\n"


def test_an_abstract_that_is_only_a_command_gets_a_label() -> None:
    digest = content(DigestItem(1, paper(1, abstract="Unsubscribe!"), 1.0, "r"))
    text, html = parts(render_digest(digest, SMTP, now=NOW))

    assert "    Abstract: Unsubscribe!" in text.splitlines()
    assert "Abstract: Unsubscribe!" in html_as_text(html).splitlines()


def test_like_and_skip_links_reply_to_the_token_address_with_the_command() -> None:
    html = render_html(content(*items(3)), SMTP)
    mailtos = [mailto_parts(link) for link in links(html) if link.startswith("mailto:")]
    commands = [fields["subject"][0] for _, fields in mailtos]

    for n in (1, 2, 3):
        assert f"like {n}" in commands and f"skip {n}" in commands
    assert {"pause", "unsubscribe", "help"} <= set(commands)
    for address, fields in mailtos:
        assert address == f"digest+{TOKEN}@papers.example.org"
        assert fields["body"] == fields["subject"]


def test_footer_commands_in_text_part_live_inside_sentences() -> None:
    text = render_text(content(*items(1)), SMTP)
    for word in ("pause", "unsubscribe", "help"):
        line = next(line for line in text.splitlines() if f"*{word}*" in line)
        assert line.strip() != f"*{word}*"


# CSS


def test_css_is_inlined_without_style_elements() -> None:
    html = render_html(content(*items(2), personalised=False), SMTP)

    assert "<style" not in html.lower()
    assert "var(" not in html
    title = re.search(r'<h2 style="([^"]+)"', html)
    assert title is not None and "font-size" in title.group(1)
    assert re.search(r'<td style="[^"]*background-color', html)
    assert "class=" not in html  # served their purpose once inlined: bytes saved
    assert re.search(r'<table [^>]*role="presentation"', html)  # layout by tables


# Tokens and ids


def test_new_tokens_are_random_lowercase_and_address_safe() -> None:
    tokens = {new_token() for _ in range(50)}

    assert len(tokens) == 50
    for token in tokens:
        assert len(token) >= 16
        assert re.fullmatch(r"[a-z0-9]+", token)


def test_message_id_uses_the_token_and_the_sender_domain() -> None:
    assert message_id_for("tok123", "Paper Digest <digest@papers.example.org>") == (
        "<digest.tok123@papers.example.org>"
    )
    assert message_id_for("tok123", "digest@localhost") == "<digest.tok123@localhost>"
    assert parseaddr(message_id_for(TOKEN, SMTP.sender))[1]


def test_templates_are_found_in_the_source_checkout() -> None:
    root = template_root()
    names = {entry.name for entry in root.iterdir()}
    assert {"digest.txt.j2", "digest.html.j2", "digest.css"} <= names


# Commands: no line is read as one by the reply reader itself (its own test, its own HTML
# conversion), whatever a title, author or abstract says.

READER_COMMANDS = ("Unsubscribe please", "unsubscribe", "Pause 7 days", "Time 23:59",
                   "Skip rest", "Interest add crypto giveaways", "Stop, we said we would",
                   "/like 2", "ｌｉｋｅ　２", "- help", "• resume now", "size 5.")


def reader_command_lines(message: EmailMessage) -> list[str]:
    from digest.replies.parse import html_to_text, reads_as_command

    text, html = parts(message)
    return [line for line in text.splitlines() + html_to_text(html).splitlines()
            if reads_as_command(line)]


@pytest.mark.parametrize("words", READER_COMMANDS)
def test_no_line_of_either_part_is_read_as_a_command_by_the_reply_reader(words: str) -> None:
    chosen = (DigestItem(1, paper(1, title=words, abstract=words, authors=(words,)), 0.5, words),
              DigestItem(2, paper(2, authors=("Ada Lovelace", words)), 0.5, "r"))
    message = render_digest(content(*chosen, name=words), SMTP, now=NOW)
    text, html = parts(message)

    assert reader_command_lines(message) == []
    # A reply that pastes either part without ">" marks commands nothing.
    from digest.replies.parse import html_to_text

    assert parse_text(text).commands == []
    assert parse_text(html_to_text(html)).commands == []
    assert f"1.  Title: {words.strip()}"[:20] in text or "Title:" in text


_PIECES = ("unsubscribe", "stop", "like", "skip", "pause", "time", "interest", "add", "rest",
           "help", "please", "2", "7", "days", "23:59", ",", ";", " ", " ", "\n", "1.", "- ",
           "/", "ｌｉｋｅ", "\u00a0", ".", "*", "“", "size", "why", "resume", "+3", "all")
_FIELD = st.one_of(st.lists(st.sampled_from(_PIECES), max_size=12).map("".join),
                   st.text(max_size=40))


@settings(max_examples=60, deadline=None)
@given(title=_FIELD, author=_FIELD, abstract=_FIELD, reason=_FIELD)
def test_any_field_text_gives_no_line_the_reader_takes_for_a_command(
        title: str, author: str, abstract: str, reason: str) -> None:
    item = DigestItem(1, paper(1, title=title, abstract=abstract, authors=(author, "et al.")),
                      0.5, reason)
    message = render_digest(content(item), SMTP, now=NOW)

    assert reader_command_lines(message) == []
