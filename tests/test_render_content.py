"""What a digest tells a researcher about each paper: authors, identity and links, listing
dates, readable text from LaTeX, relevance; and what it weighs."""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from digest.config import SmtpConfig, Subscriber
from digest.paper import Paper
from digest.render import (
    TEXT_WIDTH,
    DigestContent,
    DigestItem,
    cut_abstract,
    defuse_command_lines,
    format_authors,
    listing_span,
    one_line,
    plain_text,
    render_digest,
    render_html,
    render_text,
    starts_with_command,
    subject_for,
)

from .test_render import html_as_text, links, parts

NOW = datetime(2026, 3, 12, 8, 0, tzinfo=UTC)
SMTP = SmtpConfig(sender="Paper Digest <digest@papers.example.org>",
                  reply_to="digest+{token}@papers.example.org")
TODAY = date(2026, 3, 12)
ABSTRACT = (
    "Sparse attention lets transformers read long documents at a fraction of the cost of "
    "dense attention. We show that a learned router which keeps two hundred tokens per query "
    "matches dense quality on six long-context benchmarks, and we release the kernels. Beyond "
    "speed, the router's choices explain which passages a model relies on, which we use to "
    "find shortcut features in three popular reading-comprehension datasets."
)


def paper(n: int, **fields: object) -> Paper:
    values: dict[str, object] = {
        "id": f"2603.{n:05d}", "arxiv_id": f"2603.{n:05d}", "abstract": ABSTRACT,
        "title": f"Sparse routing for long documents, part {n}", "listed_on": TODAY,
    }
    values.update(fields)
    return Paper(**values)  # type: ignore[arg-type]


def digest(*papers: Paper, local_date: date = TODAY, relevance: str | None = None,
           personalised: bool = True) -> DigestContent:
    return DigestContent(
        subscriber=Subscriber(email="ada@example.org", name="Ada"), token="tok234567abcdefgh",
        local_date=local_date, considered=300,
        items=tuple(DigestItem(n, p, 0.8731, "close to papers you liked", relevance=relevance)
                    for n, p in enumerate(papers, start=1)),
        personalised=personalised)


def both(content: DigestContent) -> tuple[str, str]:
    """The text part and the HTML part read as text, each with whitespace runs as one space."""
    text, html = parts(render_digest(content, SMTP, now=NOW))
    return " ".join(text.split()), " ".join(html_as_text(html).split())


# Authors


@pytest.mark.parametrize(("names", "shown"), [
    ((), ""),
    (("Ada Lovelace",), "Ada Lovelace"),
    (("Ada Lovelace", "Alan Turing"), "Ada Lovelace and Alan Turing"),
    (("Ada Lovelace", "Alan Turing", "Grace Hopper"), "Ada Lovelace, Alan Turing and Grace Hopper"),
    (("Ada Lovelace", "Alan Turing", "Grace Hopper", "Edsger Dijkstra"),
     "Ada Lovelace, Alan Turing, Grace Hopper et al. (4 authors)"),
    (tuple(f"Author {n}" for n in range(1, 13)), "Author 1, Author 2, Author 3 et al. (12 authors)"),
    (("  ", "Ada\nLovelace", ""), "Ada Lovelace"),  # blanks dropped, one line
    ((r"Kurt G{\"o}del",), "Kurt Gödel"),
])
def test_authors_are_three_names_then_et_al_with_the_count(names: tuple[str, ...],
                                                           shown: str) -> None:
    assert format_authors(names) == shown


def test_authors_appear_in_both_parts_and_none_are_invented() -> None:
    many = paper(1, authors=tuple(f"Author{n} Surname{n}" for n in range(1, 8)))
    anonymous = paper(2, authors=())
    for body in both(digest(many, anonymous)):
        first, second = body.split(" 2. ", 1)
        assert "Author1 Surname1, Author2 Surname2, Author3 Surname3 et al. (7 authors)" in first
        assert "Surname4" not in first
        assert "Surname" not in second and "et al" not in second


# Identity and links


def test_arxiv_id_abs_and_pdf_links_and_the_daily_papers_page_only_from_that_listing() -> None:
    from_daily = paper(1, source="daily-papers")
    from_page = paper(2, source="page")
    text, html = parts(render_digest(digest(from_daily, from_page), SMTP, now=NOW))

    hrefs = links(html)
    for n in (1, 2):
        assert f"https://arxiv.org/abs/2603.0000{n}" in hrefs
        assert f"https://arxiv.org/pdf/2603.0000{n}" in hrefs
        assert f"    PDF:     https://arxiv.org/pdf/2603.0000{n}" in text.splitlines()
        for body in (text, html_as_text(html)):
            assert f"arXiv 2603.0000{n}" in body
    assert "https://huggingface.co/papers/2603.00001" in hrefs
    assert "    HF page: https://huggingface.co/papers/2603.00001" in text.splitlines()
    assert "huggingface.co/papers/2603.00002" not in text + html
    assert "arxiv.org/search" not in text + html  # ids known: no title search


def test_a_generated_summary_is_called_a_summary() -> None:
    summarised = paper(1, abstract_is_summary=True, abstract="A router keeps 200 tokens.")
    authors_own = paper(2, abstract="We route tokens.")
    for body in both(digest(summarised, authors_own)):
        first, second = body.split(" 2. ", 1)
        assert "Summary: A router keeps 200 tokens." in first
        assert "Summary" not in second and "We route tokens." in second


# Dates


@pytest.mark.parametrize(("days", "span"), [
    ([], ""),
    ([date(2026, 3, 12)], "12 Mar 2026"),
    ([date(2026, 3, 12), date(2026, 3, 11), date(2026, 3, 12)], "11-12 Mar 2026"),
    ([date(2026, 2, 28), date(2026, 3, 2)], "28 Feb-2 Mar 2026"),
    ([date(2025, 12, 30), date(2026, 1, 2)], "30 Dec 2025-2 Jan 2026"),
])
def test_listing_span_reads_short(days: list[date], span: str) -> None:
    assert listing_span(days) == span


def test_items_show_their_listing_date_and_the_header_the_span() -> None:
    content = digest(paper(1, listed_on=date(2026, 3, 11)), paper(2, listed_on=date(2026, 3, 12)),
                     paper(3, listed_on=None))
    text, html = parts(render_digest(content, SMTP, now=NOW))
    for body in (" ".join(text.split()), " ".join(html_as_text(html).split())):
        assert "papers listed 11-12 Mar 2026" in body
        items = re.split(r" [23]\. Sparse", body)
        assert "listed 11 Mar 2026" in items[1 - 1].split("1. Sparse", 1)[1]
        assert "listed 12 Mar 2026" in items[1]
        assert "listed" not in items[2]  # unknown: nothing invented
        assert "not fresh" not in body and "older" not in body
    masthead = re.search(r"<h1[^>]*>Paper digest</h1>\s*<p[^>]*>([^<]+)</p>", html)
    assert masthead is not None
    assert masthead.group(1) == "Thu 12 Mar 2026 · papers listed 11-12 Mar 2026"


def test_a_digest_of_old_papers_says_so() -> None:
    stale = digest(paper(1, listed_on=date(2026, 3, 2)), paper(2, listed_on=date(2026, 3, 4)))
    for body in both(stale):
        assert ("These papers are not fresh: the newest was listed on 4 Mar 2026, "
                "8 days before this digest.") in body
    mixed = digest(paper(1, listed_on=date(2026, 3, 1)), paper(2, listed_on=TODAY))
    for body in both(mixed):
        assert "Some are older: the oldest was listed on 1 Mar 2026, 11 days before" in body
    # Three days back is still this week's listing (a weekend has none): nothing said.
    weekend = digest(paper(1, listed_on=TODAY - timedelta(days=3)))
    for body in both(weekend):
        assert "fresh" not in body and "older" not in body


# LaTeX as text


@pytest.mark.parametrize(("latex", "text"), [
    (r"AutoCoder with \textsc{AIEV-Instruct}", "AutoCoder with AIEV-Instruct"),
    (r"$\alpha$-tuning \& friends", "α-tuning & friends"),
    (r"$\nabla^2$DFT and LLM$\times$MapReduce", "∇^2DFT and LLM×MapReduce"),
    (r"\emph{Fast} {\it and} \textbf{sure}", "Fast and sure"),
    ("We introduce \\Approach, a router (\\eg for retrieval).",
     "We introduce Approach, a router (e.g. for retrieval)."),
    (r"Code at \href{https://github.com/example/r}{our repo} and \url{https://example.org/x}",
     "Code at our repo and https://example.org/x"),
    (r"A broken \href{https://example.org/r{ link", "A broken https://example.org/r link"),
    ("a gap termed ``adaptivity gap''", "a gap termed “adaptivity gap”"),
    # Plain text stays as written, even the characters LaTeX would read as syntax.
    ("Gains of 50% on R&D tasks, ~3x faster, issue #12", ("Gains of 50% on R&D tasks, ~3x faster, "
     "issue #12")),
    (r"With \LaTeX{}, 50% of ~200 tokens", "With LaTeX, 50% of ~200 tokens"),
    ("SWE-Lancer: Can Frontier LLMs Earn $1 Million?", ("SWE-Lancer: Can Frontier LLMs Earn $1 "
     "Million?")),
    (r"Earn $1 and \textbf{more}", "Earn $1 and more"),  # one dollar: a price, not maths
    ("Pareto <script>alert('x')</script> & Friends", ("Pareto <script>alert('x')</script> & "
     "Friends")),
])
def test_latex_becomes_readable_text(latex: str, text: str) -> None:
    assert plain_text(latex) == text


def test_latex_is_converted_in_title_abstract_reason_subject_and_both_parts() -> None:
    fancy = paper(1, title=r"AutoCoder: Enhancing Code LLMs with \textsc{AIEV-Instruct}",
                  abstract=r"We tune $\alpha$ and $\beta$ \& report \emph{gains}.")
    content = digest(fancy)
    content = replace(content, items=(replace(content.items[0],
                                              reason=r"close to “$\mu$LO” that you liked"),))
    assert subject_for(content) == (
        "Paper digest, Thu 12 Mar 2026: AutoCoder: Enhancing Code LLMs with AIEV-Instruct")
    text, html = parts(render_digest(content, SMTP, now=NOW))
    for body in (" ".join(text.split()), " ".join(html_as_text(html).split())):
        assert "AutoCoder: Enhancing Code LLMs with AIEV-Instruct" in body
        assert "We tune α and β & report gains." in body
        assert "close to “μLO” that you liked" in body
        assert "\\textsc" not in body and "$" not in body


LATEX_PIECES = list("ab \\${}^_%&#~`'-.\n\t\u2028") + [
    "\\textsc{", "\\href{", "\\frac", "$\\alpha$", "}{", "\\it ", "\\url{", "\\", "``"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(LATEX_PIECES), max_size=30).map("".join))
def test_latex_conversion_never_fails_and_gives_one_line(text: str) -> None:
    converted = plain_text(text)
    assert converted == one_line(converted)  # no line breaks, no control characters
    if not re.search(r"[\\${}]|``", text):
        assert converted == one_line(text)  # plain text is left as it was


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_latex_conversion_takes_any_text(text: str) -> None:
    assert plain_text(text) == one_line(plain_text(text))


# Relevance


@pytest.mark.parametrize(("level", "bar"), [("strong", "●●●"), ("good", "●●○"), ("weak", "●○○")])
def test_relevance_shows_as_words_and_a_bar_never_a_score(level: str, bar: str) -> None:
    content = digest(paper(1), relevance=level)
    text, html = parts(render_digest(content, SMTP, now=NOW))
    assert f"relevance: {level} {bar}" in text
    assert f"{level} match" in html_as_text(html)
    filled = bar.count("●")
    assert re.search(r'<span style="color:#2f855a">' + "●" * filled + "</span>", html)
    for body in (text, html):
        assert "0.87" not in body and "87%" not in body


@pytest.mark.parametrize("level", [None, "", "excellent", "0.9"])
def test_no_or_unknown_relevance_shows_nothing(level: str | None) -> None:
    text, html = both(digest(paper(1), relevance=level))
    for body in (text, html):
        assert not re.search(r"relevance|(strong|good|weak) match|●", body)


# Tapping


def test_like_and_skip_are_buttons_with_room_between_them() -> None:
    html = render_html(digest(paper(1), paper(2)), SMTP)
    buttons = re.findall(r'<a\s+href="mailto:[^"]*subject=(like|skip)%20(\d)[^"]*"\s+'
                         r'style="([^"]*)"\s*>(Like|Skip)</a>', html)
    assert [(word, n) for word, n, _, _ in buttons] == [
        ("like", "1"), ("skip", "1"), ("like", "2"), ("skip", "2")]
    for _, _, style, _ in buttons:
        # Padding, border and the row's 20 px line: 12 + 1 + 20 + 1 + 12 (Skip, outlined) or
        # 13 + 20 + 13 (Like, filled, no border): 46 px high either way.
        assert "display:inline-block" in style
        padding = int(re.search(r"padding:(\d+)px", style).group(1))
        border = re.search(r"border:(\d+)px", style)
        assert 2 * padding + 2 * (int(border.group(1)) if border else 0) + 20 == 46, style
    rows = re.findall(r"Rate paper \d: &nbsp;<a\s.*?</a>(.*?)<a\s", html, re.DOTALL)
    assert rows and all(gap == "&nbsp;&nbsp;&nbsp;" for gap in rows)
    assert "line-height:20px" in re.search(r"<p style=\"([^\"]*)\">Rate paper 1", html).group(1)


# Text part


def test_text_part_wraps_at_72_and_keeps_links_on_lines_of_their_own() -> None:
    long_title = "A " + "considerably " * 12 + "long title"
    papers = [paper(n, title=long_title, source="daily-papers",
                    authors=tuple(f"Author{k} Surname{k}" for k in range(5)),
                    code_links=("https://github.com/example/a-repository",)) for n in (1, 2, 3)]
    text = render_text(digest(*papers, personalised=False), SMTP)
    for line in text.splitlines():
        url = re.search(r"https?://\S+", line)
        if url:
            # A link stands alone after its label: "    PDF:     https://..."
            assert re.fullmatch(r"    [A-Za-z ]+:\s+https?://\S+", line), line
        else:
            assert len(line) <= TEXT_WIDTH, line
    assert TEXT_WIDTH == 72


def test_no_line_opens_with_a_command_either() -> None:
    assert starts_with_command("skip 2, and then the rest")
    assert not starts_with_command("skipping 2 steps")
    assert defuse_command_lines("We found that we\nskip 2, 3 layers.\n") == (
        "We found that we skip 2, 3 layers.\n")
    wrapped = paper(1, abstract="Models that " + "read " * 14 + "skip 2, then stop. " * 12)
    text = render_text(digest(wrapped), SMTP)
    assert not any(starts_with_command(line) for line in text.splitlines())


# Weight


def test_a_ten_paper_html_part_weighs_at_most_25_kb(capsys: pytest.CaptureFixture[str]) -> None:
    papers = [paper(n, title=f"Sparse routing for long documents with $\\alpha$-entmax, part {n}",
                    source="daily-papers", abstract=ABSTRACT * 2,
                    authors=tuple(f"Firstname{k} Lastname{k}" for k in range(8)),
                    code_links=(f"https://github.com/example-lab/sparse-routing-{n}",))
              for n in range(1, 11)]
    content = digest(*papers, relevance="good", personalised=False)
    content = replace(content, items=tuple(replace(item, explore=item.position == 9)
                                           for item in content.items))
    html = render_html(content, SMTP)
    size = len(html.encode("utf-8"))
    with capsys.disabled():
        print(f"\nHTML part of a 10-paper digest: {size} bytes ({size / 1024:.1f} KiB)")
    assert size <= 25 * 1024


def test_numbers_stay_apart_from_titles_past_ninety_nine() -> None:
    text = render_text(digest(*(paper(n) for n in range(1, 101))), SMTP)
    assert re.search(r"^1\.  Sparse routing for long documents, part 1$", text, re.MULTILINE)
    assert re.search(r"^10\. Sparse routing for long documents, part 10$", text, re.MULTILINE)
    assert re.search(r"^100\. Sparse routing for long documents, part 100$", text, re.MULTILINE)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(list("ab. ?!AZ9\n") + ["e.g. ", "et al. ", "J. ", "word "]),
                max_size=200).map("".join),
       st.integers(min_value=20, max_value=300))
def test_a_cut_abstract_is_an_opening_of_the_abstract(abstract: str, limit: int) -> None:
    cut = cut_abstract(abstract, limit)
    flat = " ".join(abstract.split())
    assert len(cut) <= limit + 1
    assert flat.startswith(cut.removesuffix("…"))
    if len(flat) <= limit:
        assert cut == flat


# Review fixes: bidi controls, "et al." as an author, stale reasons


def test_bidi_controls_are_dropped_from_titles_authors_and_the_subject() -> None:
    sneaky = paper(1, title="Safe title \u202egnp.exe\u202c done",
                   authors=("Ada \u2067Lovelace\u2069", "Alan\u200f Turing"))
    message = render_digest(digest(sneaky), SMTP, now=NOW)
    text, html = parts(message)
    for shown in (text, html, str(message["Subject"])):
        assert not any(ch in shown for ch in "\u202a\u202b\u202c\u202d\u202e\u2066\u2067"
                                               "\u2068\u2069\u200e\u200f\u061c")
    assert "Safe title gnp.exe done" in str(message["Subject"])
    assert "Ada Lovelace and Alan Turing" in text


def test_an_author_named_et_al_is_not_rendered_as_and_et_al() -> None:
    assert format_authors(("Ada Lovelace", "et al.")) == "Ada Lovelace et al."
    assert format_authors(("Ada Lovelace", "Alan Turing", "et al")) == (
        "Ada Lovelace, Alan Turing et al.")
    text, html = both(digest(paper(1, authors=("Ada Lovelace", "Alan Turing", "et al."))))
    assert "and et al." not in text and "and et al." not in html


def test_a_stale_digest_does_not_call_old_papers_popular_today() -> None:
    old = paper(1, listed_on=TODAY - timedelta(days=6))
    content = digest(old)
    content = replace(content, items=(replace(content.items[0], reason="popular today (40 "
                                              "upvotes); #2 in today's listing"),))
    text, html = both(content)
    for shown in (text, html):
        assert "today" not in shown.replace("nothing to read today", "")
        assert "popular when listed (40 upvotes)" in shown and "#2 in its listing" in shown
