"""The config read in parts (``[[subscribers]]`` tables a part at a time) is the config read whole.

A large config is parsed a part of subscriber tables at a time, so the parsed
tables of 100,000 subscribers never all exist at once (issue 13: peak RSS).
Whatever the document, the result (the config, or the first error and its
words) must be what the whole-document parse gives.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from digest import config as config_module
from digest.config import load_config
from digest.errors import ConfigError

from .helpers import write_config

HEAD = """\
[digest]
inbox = "in"
state = "state.sqlite3"

[smtp]
host = "smtp.example.org"
"""


def table(n: int, extra: str = "") -> str:
    return (f'[[subscribers]]\nemail = "reader{n}@example.org"\nname = "Reader {n}"\n'
            f'interests = ["topic {n % 3}", "shared topic"]\ntimezone = "Europe/Berlin"\n'
            f'send_at = "0{n % 10}:30"\n{extra}')


def load(path: Path, *, per_part: int, monkeypatch: pytest.MonkeyPatch) -> object:
    """The config, or the ConfigError's words, with parts of ``per_part`` tables."""
    with monkeypatch.context() as patch:
        patch.setattr(config_module, "SUBSCRIBER_TABLES_PER_PART", per_part)
        try:
            return load_config(path)
        except ConfigError as exc:
            return f"ConfigError: {exc}"


def both(tmp_path: Path, body: str, monkeypatch: pytest.MonkeyPatch) -> tuple[object, object]:
    """(read in parts of 2 tables, read whole)."""
    path = write_config(tmp_path, body)
    return (load(path, per_part=2, monkeypatch=monkeypatch),
            load(path, per_part=10**9, monkeypatch=monkeypatch))


def test_the_parts_make_the_same_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    body = HEAD + "".join(table(n) for n in range(9))
    parts, whole = both(tmp_path, body, monkeypatch)
    assert parts == whole
    assert not isinstance(parts, str)
    assert [s.email for s in parts.subscribers] == [f"reader{n}@example.org" for n in range(9)]


def test_a_large_config_is_read_in_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """9 tables in parts of 2: the head and 5 parts, each parsed alone."""
    text = HEAD + "".join(table(n) for n in range(9))
    monkeypatch.setattr(config_module, "SUBSCRIBER_TABLES_PER_PART", 2)
    parts = config_module._split_subscriber_tables(text)
    assert parts is not None
    assert len(parts.starts) == 5
    assert all(text.startswith("[[subscribers]]", start) for start in parts.starts)
    assert "subscribers" not in parts.head
    assert [item["email"] for item in parts.items()] == [f"reader{n}@example.org"
                                                         for n in range(9)]
    # One part or less: read whole, as before.
    monkeypatch.setattr(config_module, "SUBSCRIBER_TABLES_PER_PART", 9)
    assert config_module._split_subscriber_tables(text) is None


def test_a_table_after_the_subscribers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """[ranking] at the end belongs to the document, not to the last part."""
    body = (HEAD + "".join(table(n) for n in range(5)) + "[ranking]\nexplore_fraction = 0.25\n")
    parts, whole = both(tmp_path, body, monkeypatch)
    assert parts == whole
    assert not isinstance(parts, str) and parts.ranking.explore_fraction == 0.25


def test_a_header_line_inside_a_multiline_string(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A cut inside a string leaves a part unterminated: the document is read whole."""
    body = (HEAD + table(0) + table(1) + 'name = """Reader\n[[subscribers]]\none"""\n'
            .replace("name", "# x\nnotes") + table(2) + table(3) + table(4))
    parts, whole = both(tmp_path, body, monkeypatch)
    assert parts == whole
    assert isinstance(whole, str) and "subscribers[1]" in whole  # notes: an unknown key


def test_a_bad_key_and_a_late_syntax_error(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole parse reports the syntax error (with its line) before any key: so do parts."""
    body = (HEAD + table(0) + table(1, 'max_papers = "many"\n') + table(2) + table(3)
            + table(4) + table(5, "send_empty = = true\n"))
    parts, whole = both(tmp_path, body, monkeypatch)
    assert parts == whole
    assert isinstance(parts, str) and "TOML syntax error" in parts and "digest.toml:44:" in parts


def test_an_error_names_the_table_by_its_place_in_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    body = HEAD + "".join(table(n, 'max_papers = "many"\n' if n == 6 else "")
                          for n in range(9))
    parts, whole = both(tmp_path, body, monkeypatch)
    assert parts == whole
    assert isinstance(parts, str) and "subscribers[6].max_papers" in parts


def test_a_duplicate_in_another_part(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    body = HEAD + "".join(table(n) for n in range(6)) + table(1)
    parts, whole = both(tmp_path, body, monkeypatch)
    assert parts == whole
    assert isinstance(parts, str) and "also subscribers[1]" in parts


# Fragments of a document: valid tables, tables of other names before or after, comments,
# multi-line strings and arrays holding a header line, spacing the splitter does not cut at,
# and mistakes of several kinds.
FRAGMENTS = [
    table(1), table(2), table(3), table(4, "send_empty = true\n"), table(1),
    "[[subscribers]]\n", "[[subscribers]] # the next reader\nemail = \"x@example.org\"\n",
    "  [[subscribers]]\nemail = \"indented@example.org\"\n",
    "[[ subscribers ]]\nemail = \"spaced@example.org\"\n",
    "[ranking]\nexplore_fraction = 0.2\n", "[defaults]\nmax_papers = 7\n",
    "# [[subscribers]] in a comment\n", "\n",
    'interests = [\n"a",\n[[subscribers]]\n]\n',
    "interests = '''\n[[subscribers]]\n'''\n",
    'name = """one\n[[subscribers]]\ntwo"""\n',
    "max_papers = 0\n", "email = 5\n", "= broken\n", "[subscribers]\n",
    "subscribers = []\n", "[subscribers.extra]\nkey = 1\n",
]


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=14), st.integers(1, 3))
def test_any_document_reads_the_same_in_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             fragments: list[str], per_part: int) -> None:
    path = write_config(tmp_path, HEAD + "".join(fragments))
    assert (load(path, per_part=per_part, monkeypatch=monkeypatch)
            == load(path, per_part=10**9, monkeypatch=monkeypatch))
