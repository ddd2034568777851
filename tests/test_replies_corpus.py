"""The reply-layout corpus (tests/replies_corpus): every case gives exactly its commands and
exactly its "not understood" lines; and properties of the reader over any text."""

from __future__ import annotations

import json
import string
from email.message import EmailMessage

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from digest.bench.replies import (
    CorpusCase,
    command_key,
    corpus_digest,
    corpus_folder,
    load_corpus,
    run_corpus_case,
)
from digest.cli import main
from digest.render import is_bare_command
from digest.replies import new_text, parse_text
from digest.replies.newtext import SentText, read_new_text
from digest.replies.parse import is_command_line, sent_text

CASES = load_corpus(corpus_folder())
DIGEST = corpus_digest()
SENT = sent_text(DIGEST.as_bytes())
EXAMPLES = 2000  # per property, in CI too


def _plain() -> str:
    part = DIGEST.get_body(("plain",))
    assert part is not None
    return str(part.get_content())


def test_the_corpus_is_as_large_and_varied_as_promised() -> None:
    assert len(CASES) >= 60
    assert len({c.language for c in CASES}) >= 12
    layouts = " ".join(c.layout.lower() for c in CASES)
    for kind in ("top-posted", "bottom-posted", "interleaved", "html only", "forward", "iphone",
                 "outlook", "gmail", "thunderbird", "wrapped"):
        assert kind in layouts, kind
    assert {c.content_type for c in CASES} == {"plain", "html"}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_each_layout_gives_exactly_its_commands(case: CorpusCase) -> None:
    result = run_corpus_case(case, DIGEST, SENT)
    assert result.commands == case.commands, case.layout
    assert result.not_understood == case.not_understood, case.layout


def test_the_digest_itself_has_no_command_line_in_either_part() -> None:
    """What the reader relies on: a clean command line is never a line of the digest."""
    for subtype in ("plain", "html"):
        part = DIGEST.get_body((subtype,))
        assert part is not None
        text = str(part.get_content())
        if subtype == "html":
            from digest.replies.parse import html_to_text

            text = html_to_text(text)
        lines = [line for line in text.splitlines() if line.strip()]
        assert lines
        assert not [line for line in lines if is_command_line(line) or is_bare_command(line)]


def test_the_digest_quoted_without_marks_or_headers_commands_nothing() -> None:
    for body in (_plain(), "\n".join("> " + line for line in _plain().splitlines())):
        message = EmailMessage()
        message.set_content(body)
        parsed = parse_text(new_text(message, SENT))
        assert parsed.commands == [] and parsed.problems == [] and parsed.prose == []


def test_bench_replies_corpus_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "replies", "--corpus"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert result["cases"] == len(CASES) == result["ok"]
    assert result["exact_commands"] == result["no_spurious_lines"] == len(CASES)
    assert result["failures"] == []
    assert "exact commands" in out[0]


def test_bench_replies_corpus_counts_a_wrong_expectation(tmp_path: pytest.TempPathFactory,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    folder = tmp_path / "corpus"  # type: ignore[operator]
    folder.mkdir()
    (folder / "x.txt").write_text(
        "=== good\nlayout: top\nlanguage: en\ncommands: like 2\n---\nlike 2\n\n"
        "=== wrong\nlayout: top\nlanguage: en\ncommands: like 3\n---\nlike 2\n",
        encoding="utf-8")
    assert main(["bench", "replies", "--corpus", str(folder)]) == 1
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["cases"], result["ok"]) == (2, 1)
    assert result["failures"][0]["case"] == "wrong"


# --- properties over any text ---------------------------------------------------

_LINE = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=80)
_COMMANDISH = st.sampled_from(["like 2", "skip 3", "- like 4", "/unsubscribe", "ｌｉｋｅ　２",
                               "pause 7 days", "-5", "help", "why 1", "Thanks!", ">", "-- ",
                               "On Thu, Mar 12, 2026 Paper Digest wrote:", "From: x@y.org",
                               "-----Original Message-----", "", "• skip 1", "like 2."])


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(_LINE, _COMMANDISH), max_size=30))
def test_reading_any_text_never_raises_and_keeps_only_its_own_lines(lines: list[str]) -> None:
    text = "\n".join(lines)
    kept = read_new_text(text, SENT, is_command_line)
    source = text.splitlines()
    assert all(line in source for line in kept.lines)
    parsed = parse_text(kept.text)
    for command in parsed.commands:
        assert command_key(command)
    # A line is one of: a command source, a problem, prose, or left out; never two of them.
    assert len(parsed.problems) + len(parsed.prose) <= len(kept.lines)


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.lists(st.sampled_from(_plain().splitlines()), max_size=40),
       st.sampled_from(["> ", ">\xa0", "", "> > "]))
def test_any_piece_of_the_digest_commands_nothing(lines: list[str], prefix: str) -> None:
    text = "\n".join(prefix + line for line in lines)
    parsed = parse_text(read_new_text(text, SENT, is_command_line).text)
    assert parsed.commands == []


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.sampled_from(["like 2", "skip 3 4", "unsubscribe", "pause 7 days", "why 1", "size 5",
                        "time 07:30", "resume", "help"]),
       st.sampled_from(["", "- ", "* ", "• ", "/"]),
       st.sampled_from(["", ".", "!"]),
       st.integers(min_value=0, max_value=84))
def test_a_command_is_read_wherever_it_is_put_in_the_quoted_digest(
        command: str, bullet: str, end: str, at: int) -> None:
    quoted = ["> " + line for line in _plain().splitlines()]
    text = "\n".join([*quoted[:at], "", bullet + command + end, "", *quoted[at:]])
    parsed = parse_text(read_new_text(text, SENT, is_command_line).text)
    assert [command_key(c) for c in parsed.commands] == \
        [command_key(c) for c in parse_text(command).commands]
    assert parsed.problems == []


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.text(alphabet=string.ascii_letters + string.digits + " ,;.-+#/:", max_size=40))
def test_did_you_mean_never_suggests_what_was_typed(line: str) -> None:
    for problem in parse_text(line).problems:
        if problem.message.startswith("did you mean “"):
            suggestion = problem.message.removeprefix("did you mean “").removesuffix("”?")
            assert suggestion.casefold() != problem.text.casefold()


def test_an_empty_sent_text_matches_nothing() -> None:
    assert not SentText()
    assert not SentText().holds("Hello Alice,")
    assert SENT.holds("Hello Alice,") and SENT.holds("> Hello   Alice")


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.binary(max_size=600), st.text(max_size=120))
def test_any_message_bytes_are_read_or_refused_with_our_error(raw: bytes, from_value: str) -> None:
    """The parsers of outside input: for any bytes (and any From text), reading the reply's
    sender, tokens, automatic marks and new text returns or raises DigestError only."""
    from digest.errors import DigestError
    from digest.replies.parse import (
        automatic_reason,
        digest_tokens,
        forgery_reason,
        parse_message,
        sender_address,
    )

    header = ("From: " + " ".join(from_value.split())).encode("utf-8", "surrogateescape")
    for data in (raw, header + b"\r\n\r\n" + raw):
        try:
            message = parse_message(data)
        except DigestError:
            continue
        sender_address(message)
        forgery_reason(message)
        automatic_reason(message)
        digest_tokens(message)
        parse_text(new_text(message, SENT))


def test_many_quote_headers_cost_one_pass() -> None:
    text = "\n".join(["On Thu, Paper Digest wrote:", "unmarked line"] * 5_000)
    kept = read_new_text(text, SENT, is_command_line)
    assert kept.lines == []  # each header starts an unmarked original that runs to the end


REVIEWED = [c for c in CASES if c.source == "review.txt"]


@pytest.mark.parametrize("case", REVIEWED, ids=[c.name for c in REVIEWED])
def test_reviewed_layouts_leave_no_prose_either(case: CorpusCase) -> None:
    """Quote headers and converted digest lines are not prose (no "thank you for your note")."""
    from digest.bench.replies import corpus_reply
    from digest.replies.parse import parse_reply, subject_of

    message = corpus_reply(case, DIGEST)
    parsed = parse_reply(new_text(message, SENT), subject_of(message))
    assert parsed.prose == [] and parsed.problems == []
    assert tuple(command_key(c) for c in parsed.commands) == case.commands


@pytest.mark.parametrize("files", [{}, {"empty.txt": ""}, {"notes.txt": "just notes\n"}])
def test_bench_replies_on_an_empty_corpus_is_an_error(
        tmp_path: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str],
        files: dict[str, str]) -> None:
    folder = tmp_path / "corpus"  # type: ignore[operator]
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    assert main(["bench", "replies", "--corpus", str(folder)]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("Error: ") and str(folder) in captured.err
    assert "{" not in captured.out
