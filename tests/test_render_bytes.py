"""A digest built once as bytes: the message as sent, the same as render_digest's, correct
MIME for any text, and the HTML part checked in pieces that cover it whole."""

from __future__ import annotations

import email
import email.policy
import unicodedata
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta, timezone
from email.generator import BytesGenerator
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime
from io import BytesIO

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from digest import render
from digest.config import SmtpConfig, Subscriber
from digest.paper import Paper
from digest.render import (
    EMAIL_POLICY,
    LINE_BREAKING,
    DigestContent,
    DigestItem,
    RenderedDigest,
    html_pieces,
    inline_styles,
    mailto,
    message_id_for,
    one_line,
    reader_text,
    render_digest,
    render_digest_bytes,
    render_html,
    render_text,
    reply_address,
    subject_for,
)

NOW = datetime(2026, 3, 12, 8, 0, tzinfo=timezone(timedelta(hours=1)))
SMTP = SmtpConfig(sender="Paper Digest <digest@papers.example.org>",
                  reply_to="digest+{token}@papers.example.org")
TOKEN = "k3n8q2w7x4c6v9b5"
ABSTRACT = ("We route each token to a few experts chosen by a learned gate, and show that the "
            "gate's choices explain which passages a model relies on. Experiments on six "
            "benchmarks show gains of 5% at a third of the cost.")


def paper(n: int, **fields: object) -> Paper:
    values: dict[str, object] = {
        "id": f"2604.{n:05d}", "arxiv_id": f"2604.{n:05d}", "abstract": ABSTRACT,
        "title": f"Gated experts for long inputs, study {n}", "listed_on": date(2026, 3, 11),
        "authors": ("Mira Okafor", "Tomás Lindqvist"), "source": "daily-papers",
    }
    values.update(fields)
    return Paper(**values)  # type: ignore[arg-type]


def digest(*papers: Paper, name: str = "Mira Okafor", address: str = "mira@lab.example.net",
           reason: str = "matches your interest in mixture of experts",
           token: str = TOKEN, personalised: bool = True) -> DigestContent:
    return DigestContent(
        subscriber=Subscriber(email=address, name=name), token=token,
        local_date=date(2026, 3, 12), considered=240,
        items=tuple(DigestItem(n, p, 0.5, reason, relevance=("strong", "good", "weak")[n % 3])
                    for n, p in enumerate(papers, start=1)),
        personalised=personalised)


def parsed(rendered: RenderedDigest) -> EmailMessage:
    message = email.message_from_bytes(rendered.data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def body(message: EmailMessage, kind: str) -> str:
    part = message.get_body(preferencelist=(kind,))
    assert part is not None
    return str(part.get_content()).replace("\r\n", "\n")  # a 7bit body keeps the wire's CRLF


def header_block(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[0] + b"\r\n"


# The bytes and render_digest


def test_the_bytes_parse_to_render_digests_headers_and_parts() -> None:
    content = digest(*(paper(n) for n in range(1, 11)), personalised=False)
    rendered = render_digest_bytes(content, SMTP, now=NOW)
    sent, message = parsed(rendered), render_digest(content, SMTP, now=NOW)

    assert [name for name, _ in sent.items()] == [name for name, _ in message.items()]
    for name, value in message.items():
        assert str(sent[name]) == str(value), name
    for kind in ("plain", "html"):
        assert body(sent, kind) == body(message, kind)
    assert body(sent, "plain") == render_text(content, SMTP)
    assert body(sent, "html") == render_html(content, SMTP)
    assert rendered.message_id == message_id_for(TOKEN, SMTP.sender) == sent["Message-ID"]
    assert rendered.subject == subject_for(content) == sent["Subject"]
    assert rendered.smtputf8 is False


def test_the_bytes_are_a_wire_message_crlf_ascii_and_within_998_octets() -> None:
    long_reply = replace(SMTP, reply_to="digest+{token}@" + "mail." * 30 + "example.org")
    content = digest(paper(1, title="Ümlaut-aware tokenisers: " + "très " * 40,
                           abstract="Résumé " * 200), name="Zoë Ångström-Ørsted")
    data = render_digest_bytes(content, long_reply, now=NOW).data

    assert data.endswith(b"\r\n") and b"\n" not in data.replace(b"\r\n", b"")
    assert data.isascii()  # an ASCII recipient: encoded words and encoded bodies
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    sent = parsed(RenderedDigest(data, "", "", False))
    assert sent["To"].addresses[0].display_name == "Zoë Ångström-Ørsted"
    assert "=?utf-8?" in header_block(data).decode()
    assert sent["Subject"] == subject_for(content)
    assert sent["List-Unsubscribe"] == f"<{mailto(reply_address(long_reply, TOKEN), 'unsubscribe', body=False)}>"


def test_the_same_digest_gives_the_same_bytes() -> None:
    content = digest(*(paper(n) for n in range(1, 6)))
    first = render_digest_bytes(content, SMTP, now=NOW)
    assert render_digest_bytes(content, SMTP, now=NOW) == first
    other = render_digest_bytes(replace(content, token="z9y8x7w6v5u4t3s2"), SMTP, now=NOW)
    assert other.data != first.data and b"z9y8x7w6v5u4t3s2" in other.data


def test_an_internationalised_recipient_gets_utf8_headers_and_smtputf8() -> None:
    content = digest(paper(1), name="José Núñez", address="josé@universidad.example")
    rendered = render_digest_bytes(content, SMTP, now=NOW)

    assert rendered.smtputf8 is True
    head = header_block(rendered.data).decode("utf-8")
    assert "To: José Núñez <josé@universidad.example>\r\n" in head
    assert "=?utf-8?" not in head
    # UTF-8 headers (RFC 6532): the email package reads them from text, not bytes.
    sent = email.message_from_string(rendered.data.decode("utf-8"), policy=email.policy.SMTPUTF8)
    assert sent["To"].addresses[0].username == "josé"
    assert body(sent, "plain") == render_text(content, SMTP)  # type: ignore[arg-type]


def test_mostly_non_latin_text_goes_base64_and_latin_text_quoted_printable() -> None:
    cjk = digest(paper(1, title="長い文書のための" * 8, abstract="専門家の混合。" * 60,
                       authors=("山田太郎", "鈴木花子")), name="山田太郎")
    latin = digest(paper(1))
    for content, expected in ((cjk, "base64"), (latin, "quoted-printable")):
        sent = parsed(render_digest_bytes(content, SMTP, now=NOW))
        html = sent.get_body(preferencelist=("html",))
        assert html is not None and html["Content-Transfer-Encoding"] == expected
        assert body(sent, "html") == render_html(content, SMTP)
        assert body(sent, "plain") == render_text(content, SMTP)


def test_an_ascii_text_part_with_short_lines_stays_7bit() -> None:
    content = digest(paper(1, title="Experts", authors=("Mira Okafor",), arxiv_id=None,
                           listed_on=None),
                     reason="popular today")
    content = replace(content, items=tuple(replace(i, relevance=None) for i in content.items))
    sent = parsed(render_digest_bytes(content, SMTP, now=NOW))
    text = sent.get_body(preferencelist=("plain",))
    assert text is not None and text["Content-Transfer-Encoding"] == "7bit"
    assert body(sent, "plain") == render_text(content, SMTP)


_NAMES = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=60)
_ASCII_NAMES = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=90)


@settings(max_examples=80, deadline=None)
@given(name=st.one_of(_NAMES, _ASCII_NAMES), title=st.one_of(_NAMES, _ASCII_NAMES))
def test_headers_are_what_the_email_package_writes(name: str, title: str) -> None:
    """The header block equals the email package's, for any display name and title."""
    content = digest(paper(1, title=title), name=name)
    data = render_digest_bytes(content, SMTP, now=NOW).data

    expected = EmailMessage(policy=EMAIL_POLICY)
    expected["Subject"] = subject_for(content)
    expected["From"] = SMTP.sender
    expected["To"] = Address(display_name=one_line(name), username="mira",
                             domain="lab.example.net")
    expected["Date"] = format_datetime(NOW)
    expected["Message-ID"] = message_id_for(TOKEN, SMTP.sender)
    expected["Reply-To"] = f"digest+{TOKEN}@papers.example.org"
    reply = reply_address(SMTP, TOKEN)
    expected["List-Unsubscribe"] = f"<{mailto(reply, 'unsubscribe', body=False)}>"
    out = BytesIO()
    BytesGenerator(out, policy=EMAIL_POLICY.clone(linesep="\r\n")).flatten(expected)
    assert header_block(data).startswith(header_block(out.getvalue()))


# The HTML part in pieces


_PIECES = ("unsubscribe", "stop", "like", "skip", "pause", "help", "2", "7", " ", "\n", "1.",
           "<p>", "</td>", "<tr>", "<br>", "&amp;", "&", "<", ">", '"', "'", "·", "=?", "--")
_FIELD = st.one_of(st.lists(st.sampled_from(_PIECES), max_size=12).map("".join),
                   st.text(max_size=40))


@settings(max_examples=60, deadline=None)
@given(title=_FIELD, author=_FIELD, abstract=_FIELD, reason=_FIELD, name=_FIELD,
       count=st.integers(0, 3), explore=st.booleans(), personalised=st.booleans())
def test_the_pieces_lines_cover_the_whole_html_parts_lines(
        title: str, author: str, abstract: str, reason: str, name: str, count: int,
        explore: bool, personalised: bool) -> None:
    """Checking the pieces is checking the part: every line of the whole HTML part, as the
    reply reader reads it, is a line of one of the pieces as it reads them."""
    papers = [paper(n, title=title, abstract=abstract, authors=(author,), listed_on=None)
              for n in range(1, count + 1)]
    content = digest(*papers, name=name, reason=reason, personalised=personalised)
    content = replace(content, items=tuple(replace(item, explore=explore)
                                           for item in content.items))
    try:
        html = render_html(content, SMTP)
    except render.UnsafeDigest:
        return  # refused whole: nothing is sent
    pieces = html_pieces(content)
    reply = reply_address(SMTP, TOKEN)
    from urllib.parse import quote

    assert "".join(pieces).replace(render._REPLY_SLOT, quote(reply, safe="@+")) == html
    piece_lines = {line for piece in pieces for line in reader_text(piece).splitlines()}
    assert set(reader_text(html).splitlines()) <= piece_lines


@settings(max_examples=40, deadline=None)
@given(local=st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")),
                     min_size=1, max_size=30))
def test_the_reply_address_never_changes_what_the_reader_reads(local: str) -> None:
    """The address goes into mailto links URL-quoted: it is never text of the part."""
    content = digest(paper(1), paper(2))
    smtp = replace(SMTP, reply_to=f"{local}+{{token}}@papers.example.org")
    assert reader_text(render_html(content, smtp)) == reader_text(render_html(content, SMTP))


def test_a_paper_is_rendered_once_for_every_subscriber_who_gets_it() -> None:
    shared = paper(77, title="A paper rendered once")
    render._item_view.cache_clear()
    render._html_piece.cache_clear()
    render._text_piece.cache_clear()
    for n, who in enumerate(("a@example.org", "b@example.org", "c@example.org")):
        render_digest_bytes(digest(shared, address=who, token=f"tok{n}abcdefghijkl"), SMTP,
                            now=NOW)
    # Each piece once (HTML: opening, title, meta, snippet, why, links, rate; text: title,
    # meta, wildcard, snippet, why, links); the next subscribers get the same view of the
    # paper, which holds its pieces.
    for memo, pieces in ((render._html_piece, 7), (render._text_piece, 6)):
        assert memo.cache_info().misses == pieces
    assert render._item_view.cache_info().misses == 1


# Weight


def test_ten_papers_with_long_titles_weigh_under_25_kb() -> None:
    papers = [paper(n, title=("Scaling laws for sparse mixture-of-experts language models "
                              "under heavy-tailed token distributions: a systematic study "
                              f"across twelve languages and four modalities, part {n}"),
                    abstract=ABSTRACT * 4, code_links=(f"https://github.com/lab/experts-{n}",),
                    authors=tuple(f"Firstname{k} Longer-Surname{k}" for k in range(12)))
              for n in range(1, 11)]
    content = digest(*papers, personalised=False,
                     reason="close to 'Gated experts for long inputs' that you liked")
    content = replace(content, items=tuple(replace(i, explore=i.position == 9)
                                           for i in content.items))
    size = len(render_html(content, SMTP).encode("utf-8"))
    assert size < 25 * 1024, size


# Building blocks


def test_one_line_breaks_at_exactly_the_control_and_separator_characters() -> None:
    expected = {cp for cp in range(0x110000)
                if unicodedata.category(chr(cp)) in ("Cc", "Zl", "Zp")}
    assert set(LINE_BREAKING) == expected
    assert one_line("a\u2028b\x85c\u202ed\te") == "a b cd e"  # bidi controls just go


def test_styles_are_inlined_from_the_stylesheet_and_classes_are_gone() -> None:
    html = render_html(digest(paper(1)), SMTP)
    assert "class=" not in html and "<style" not in html
    assert inline_styles('<p class="rate" title="x">') == (
        '<p title="x" style="margin:0 0 8px;font-size:15px;line-height:20px">')


def test_a_stylesheet_selector_that_is_not_a_class_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(render, "_read_template", lambda name: ".a p { color: red; }")
    with pytest.raises(ValueError, match="selector '.a p' is not a class"):
        inline_styles('<p class="a">')


@settings(max_examples=80, deadline=None)
@given(st.lists(st.text(max_size=200), max_size=8))
def test_lines_quoted_printable_one_by_one_are_the_body_quoted_printable(lines: list[str]) -> None:
    import binascii

    raw = "\n".join(lines).encode("utf-8").splitlines() or [b""]  # as render splits a part
    whole = binascii.b2a_qp(b"\n".join(raw) + b"\n", istext=True)
    assert b"".join(map(render._quoted_printable, raw)) == whole


# Pieces and pages rendered once: the same as rendering each message whole


@settings(max_examples=80, deadline=None)
@given(title=_FIELD, author=_FIELD, abstract=_FIELD, reason=_FIELD, name=_FIELD,
       count=st.integers(0, 3), personalised=st.booleans(), considered=st.integers(0, 3000))
def test_the_text_part_from_memoised_pieces_is_the_page_rendered_whole(
        title: str, author: str, abstract: str, reason: str, name: str, count: int,
        personalised: bool, considered: int) -> None:
    """The text part from pieces checked once each (the name's line per subscriber) is the
    page rendered whole for this subscriber, its lines defused, or refused alike."""
    papers = [paper(n, title=title, abstract=abstract, authors=(author,))
              for n in range(1, count + 1)]
    content = replace(digest(*papers, name=name, reason=reason, personalised=personalised),
                      considered=considered)

    def outcome(render_part: object) -> str:
        try:
            return render_part(content, render._Views(content))  # type: ignore[operator]
        except render.UnsafeDigest as exc:
            return f"refused: {exc}"

    assert outcome(render._render_text) == outcome(render._render_text_whole)


@settings(max_examples=80, deadline=None)
@given(name=_FIELD, count=st.integers(0, 3), personalised=st.booleans(),
       considered=st.integers(0, 3000), stale=st.booleans())
def test_the_html_page_with_the_name_put_in_is_the_page_rendered_with_it(
        name: str, count: int, personalised: bool, considered: int, stale: bool) -> None:
    """The page around the papers, rendered once with a stand-in for the name, is the page
    rendered with the subscriber's name, and the lines the reply reader reads in it are the
    stand-in's lines with the name put in: checking those checks the page."""
    from jinja2.filters import Markup

    listed = date(2026, 3, 1) if stale else date(2026, 3, 11)
    content = digest(*[paper(n, listed_on=listed) for n in range(1, count + 1)], name=name,
                     personalised=personalised)
    content = replace(content, considered=considered)
    items = sorted(content.items, key=lambda item: item.position)
    whole = render._environment().get_template(render.HTML_TEMPLATE).render(
        render._page_context(content, items), papers=Markup(render._PAPERS_SLOT),
        cut=Markup(render._CUT_SLOT))
    before, _, footer = whole.partition(render._PAPERS_SLOT)
    head, _, intro = before.partition(render._CUT_SLOT)
    pieces = html_pieces(content)
    assert (pieces[0], pieces[1], pieces[-1]) == (head, intro, footer)
    page = render._html_page(render._page_key(content, items))
    own = one_line(name)
    assert [line.replace(render._NAME_SLOT, own) for line in
            reader_text(page.intro).splitlines()] == reader_text(intro).splitlines()
    refused = bool(page.unsafe) or any(map(render._reader_test, page.own_lines(own)))
    assert refused == any(render._html_command_lines(piece) for piece in (head, intro, footer))


_TEXT_PIECES = st.lists(st.sampled_from(["a", "é", " ", "=", "\t", "like 2", "●", "x" * 90,
                                         "--=_abc", "\r", "\x0c", "\n"]),
                        max_size=30).map("".join)
# Mostly whole lines, as the pieces of a digest are (the others are encoded whole).
_LINES_PIECE = st.tuples(_TEXT_PIECES, st.integers(0, 3)).map(
    lambda piece: piece[0] + "\n" if piece[1] else piece[0])


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(st.lists(st.sampled_from([render._NAME_SLOT, render._REPLY_SLOT]) | _LINES_PIECE,
                                max_size=4).map("".join), max_size=6),
       own=st.lists(st.booleans(), max_size=6), name=_FIELD, reply=_FIELD)
def test_a_part_encoded_in_pieces_is_the_part_encoded_whole(
        pieces: list[str], own: list[bool], name: str, reply: str) -> None:
    """Pieces quoted-printable encoded once each (per message only their lines with a
    stand-in, filled) and joined are the body filled and encoded whole, with the same
    choice of 7bit, quoted-printable or base64, for any pieces."""
    pieces = [render._OwnPiece(piece) if n < len(own) and own[n] else piece
              for n, piece in enumerate(pieces)]
    fills = ((render._NAME_SLOT, one_line(name)), (render._REPLY_SLOT, one_line(reply)))
    delimiter = b"--=_abc"
    assert render._part("plain", pieces, delimiter, fills) == render._part_of_text(
        "plain", render._filled("".join(pieces), fills), delimiter)


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(st.lists(st.sampled_from([render._NAME_SLOT, render._REPLY_SLOT]) | _LINES_PIECE,
                                max_size=4).map("".join), max_size=6),
       name=_FIELD, reply=_FIELD)
def test_a_part_from_merged_chunks_is_the_part_of_its_pieces(
        pieces: list[str], name: str, reply: str) -> None:
    """Pieces encoded once and merged into chunks (as a paper's view and a page hold them)
    give the part :func:`_part` gives the pieces, for any pieces of whole lines; pieces that
    are not whole lines give no chunks (the part is then encoded whole)."""
    fills = ((render._NAME_SLOT, one_line(name)), (render._REPLY_SLOT, one_line(reply)))
    delimiter = b"--=_abc"
    chunks = render._merged_chunks(pieces)
    if chunks is None:
        assert not all(map(render._whole_lines, pieces))
    else:
        assert render._part_of_chunks("html", chunks, delimiter, fills) == render._part(
            "html", pieces, delimiter, fills)


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(st.lists(st.sampled_from([render._NAME_SLOT, render._REPLY_SLOT])
                                | _LINES_PIECE, max_size=4).map("".join), max_size=6),
       name=_FIELD, reply=st.text(min_size=1, max_size=60))
def test_a_part_from_compiled_runs_is_the_part_of_its_pieces(
        pieces: list[str], name: str, reply: str) -> None:
    """Merged chunks compiled for the reply address's length (runs of encoded lines and
    address lines as two joins per message) give the part :func:`_part` gives the pieces,
    for any pieces of whole lines and any address quoted-printable writes as it is."""
    from urllib.parse import quote

    address = quote(reply, safe="@+")
    fills = ((render._NAME_SLOT, one_line(name)), (render._REPLY_SLOT, address))
    delimiter = b"--=_abc"
    chunks = render._merged_chunks(pieces)
    if chunks is None:
        return
    compiled = render._compiled_chunks(chunks, len(address))
    assert render._part_of_chunks("html", compiled, delimiter, fills) == render._part(
        "html", pieces, delimiter, fills)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=120), st.sampled_from(["\n", "", "\r\n", "\n\n"]))
def test_a_line_encoded_directly_is_the_line_encoded_as_a_piece(text: str, end: str) -> None:
    assert render._encode_line(text + end) == render._encode_piece(text + end)


@settings(max_examples=60, deadline=None)
@given(title=_FIELD, author=_FIELD, abstract=_FIELD, reason=_FIELD, name=_FIELD,
       count=st.integers(0, 3), personalised=st.booleans())
def test_the_html_part_from_chunks_is_the_part_of_the_html_pieces(
        title: str, author: str, abstract: str, reason: str, name: str, count: int,
        personalised: bool) -> None:
    papers = [paper(n, title=title, abstract=abstract, authors=(author,))
              for n in range(1, count + 1)]
    content = digest(*papers, name=name, reason=reason, personalised=personalised)
    fills = render._html_fills(one_line(name), "digest+abc@example.org")
    delimiter = b"--=_abc"

    def outcome(make: Callable[[], bytes]) -> bytes | str:
        try:
            return make()
        except render.UnsafeDigest as exc:
            return f"refused: {exc}"

    views = render._Views(content)
    assert outcome(lambda: render._html_part(content, views, delimiter, fills)) == outcome(
        lambda: render._part("html", render._html_pieces(content, views), delimiter, fills))


_REPLY_LINE = st.lists(st.sampled_from([render._REPLY_SLOT, "a", "é", " ", "=", "\t", ".",
                                        "?subject=like%203&body=like%203", "x" * 30, "~",
                                        "^", "|", "`", "!", "#", "*", "\n", "\r"]),
                       max_size=12).map("".join)


@settings(max_examples=400, deadline=None)
@given(line=_REPLY_LINE, reply=st.text(min_size=1, max_size=60))
def test_a_reply_line_encoded_around_the_address_is_the_filled_line_encoded(
        line: str, reply: str) -> None:
    """A line encoded once with markers for the reply address's characters, the markers
    then replaced by them, is the line with the address put in encoded, for any line and
    any address that quoted-printable writes as it is (as a URL-quoted one always is)."""
    from urllib.parse import quote

    address = quote(reply, safe="@+")
    line += "\n"
    fills = ((render._REPLY_SLOT, address),)
    plan = render._reply_line(line, len(address))
    if plan is None:
        return
    filled = render._encode_piece(render._filled(line, fills))
    assert render._QP_LITERAL.fullmatch(address)
    assert render._part_of_chunks("html", [line], b"--=_abc", fills) == render._part_of_chunks(
        "html", [filled], b"--=_abc", fills)


def test_the_date_of_one_instant_follows_its_zone() -> None:
    """The Date value is memoised per dispatch ``now``; one instant written in two zones
    is two Date values (equal datetimes of different offsets must not share an entry)."""
    utc = datetime(2026, 3, 12, 7, 0, tzinfo=UTC)
    plus_one = datetime(2026, 3, 12, 8, 0, tzinfo=timezone(timedelta(hours=1)))
    assert utc == plus_one
    first = render_digest_bytes(digest(paper(1)), SMTP, now=utc).data
    second = render_digest_bytes(digest(paper(1)), SMTP, now=plus_one).data
    assert b"\r\nDate: Thu, 12 Mar 2026 07:00:00 +0000\r\n" in first
    assert b"\r\nDate: Thu, 12 Mar 2026 08:00:00 +0100\r\n" in second
