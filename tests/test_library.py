"""A subscriber's own library as seed papers: the three export formats, limits, pending
entries that count once their paper arrives, the config key, `digest import`, check-config and
status warnings, the "not personalised yet" note, and a reply with a library attached."""

from __future__ import annotations

import asyncio
import json
import mailbox
import os
import subprocess
import sys
import threading
from email.message import EmailMessage
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from digest.cli import main
from digest.config import Subscriber, load_config, read_regular_file
from digest.library import (
    MAX_LIBRARY_BYTES,
    MAX_LIBRARY_ENTRIES,
    LibraryError,
    parse_library,
    sync_config_library,
)
from digest.replies import process_replies
from digest.store import Store

from .helpers import write_config
from .smtp_helpers import (  # noqa: F401  (smtp_server_fixture provides the smtp_server fixture)
    StartServer,
    smtp_server_fixture,
)
from .test_pipeline import digests_by_recipient, make_inbox, pipeline_config
from .test_replies import reply

# A title that is in the bundled sample dumps (Mar 12), and two that are not.
STORED_TITLE = "Pareto Domain Adaptation"

BIBTEX = r"""
@article{stored2021,
  title = {Pareto {Domain} Adaptation},
  author = {Somebody, A.},
  year = {2021}
}
@misc{lens2025,
  title = {Lensing the {\'E}cole: Optical Flow for Tiny Robots},
  eprint = {2501.04321},
  archivePrefix = {arXiv},
  abstract = {We estimate optical flow on a microcontroller.}
}
@article{noid,
  author = {Nobody},
  year = {1999}
}
@inproceedings{doi2024,
  title = {Graph Sketches at Scale},
  doi = {10.48550/arXiv.2403.01234},
}
"""

CSL_JSON = json.dumps([
    {"id": "http://zotero.org/users/1/items/ABCD", "type": "article",
     "title": "Sparse Mixtures of Tiny Experts", "abstract": "Experts, but tiny and sparse.",
     "URL": "http://arxiv.org/abs/2402.00077v3", "number": "arXiv:2402.00077"},
    {"id": "x2", "type": "article-journal", "title": STORED_TITLE},
    {"id": "x3", "type": "book", "title": ""},
])

RIS = """TY  - JOUR
TI  - Counting Birds with Drones
AB  - Drones count birds over wetlands.
UR  - https://arxiv.org/abs/2404.11111
ER  - 

TY  - CONF
T1  - Pareto Domain Adaptation
ER  - 
"""


def test_bibtex_entries_with_latex_titles_arxiv_ids_and_a_bad_entry() -> None:
    parsed = parse_library(BIBTEX.encode(), "alice.bib")
    assert parsed.format == "bibtex"
    by_title = {e.title: e for e in parsed.entries}
    assert "Pareto Domain Adaptation" in by_title
    lens = by_title["Lensing the École: Optical Flow for Tiny Robots"]
    assert lens.arxiv_id == "2501.04321"
    assert lens.abstract == "We estimate optical flow on a microcontroller."
    assert by_title["Graph Sketches at Scale"].arxiv_id == "2403.01234"
    assert by_title["Pareto Domain Adaptation"].arxiv_id is None
    assert parsed.skipped == 1  # the entry with neither title nor arXiv id


def test_csl_json_as_zotero_exports_it() -> None:
    parsed = parse_library(CSL_JSON.encode(), "My Library.json")
    assert parsed.format == "csl-json"
    assert [(e.title, e.arxiv_id) for e in parsed.entries] == [
        ("Sparse Mixtures of Tiny Experts", "2402.00077"), (STORED_TITLE, None)]
    assert parsed.skipped == 1


def test_ris_entries() -> None:
    parsed = parse_library(RIS.encode(), "export.ris")
    assert parsed.format == "ris"
    assert [(e.title, e.arxiv_id, bool(e.abstract)) for e in parsed.entries] == [
        ("Counting Birds with Drones", "2404.11111", True), (STORED_TITLE, None, False)]


def test_limits_and_unknown_formats_are_readable_errors() -> None:
    with pytest.raises(LibraryError, match="at most"):
        parse_library(b"x" * (MAX_LIBRARY_BYTES + 1), "huge.bib")
    with pytest.raises(LibraryError, match="not a library export"):
        parse_library(b"Dear admin, please add my papers.", "letter.txt")
    with pytest.raises(LibraryError, match="not valid JSON"):
        parse_library(b'[{"title": "x"', "broken.json")
    many = "".join(f"@misc{{e{i}, title = {{Paper number {i}}}}}\n"
                   for i in range(MAX_LIBRARY_ENTRIES + 5))
    parsed = parse_library(many.encode(), "many.bib")
    assert len(parsed.entries) == MAX_LIBRARY_ENTRIES and parsed.over_limit == 5


@settings(max_examples=150, deadline=None)
@given(st.one_of(
    st.binary(max_size=400),
    st.text(max_size=400).map(str.encode),
    st.lists(st.sampled_from(["@article{", "title = {", "}", "TY  - JOUR\n", "TI  - ",
                              "ER  - \n", "[", "{", '"title": ', "\\'e", "arXiv:2401.00001",
                              ",", "\n", "abstract"]), max_size=40)
    .map(lambda parts: "".join(parts).encode())))
def test_any_input_parses_or_gives_a_library_error(data: bytes) -> None:
    try:
        parsed = parse_library(data, "fuzz")
    except LibraryError as exc:
        assert str(exc).startswith("fuzz")
        return
    assert parsed.format in ("bibtex", "csl-json", "ris")
    assert all(e.title or e.arxiv_id for e in parsed.entries)


# --- the commands ---------------------------------------------------------------


def _config(tmp_path: Path, subscriber_extra: str = "") -> Path:
    make_inbox(tmp_path, nasty=False)
    return write_config(tmp_path, f"""
        [digest]
        inbox = "inbox"
        state = "var/state.sqlite3"

        [smtp]
        sink = "var/outbox"

        [[subscribers]]
        email = "ann@example.org"
        name = "Ann"
        {subscriber_extra}
        """)


def test_import_command_stores_entries_and_pending_ones_count_when_they_arrive(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path)
    assert main(["--config", str(config), "ingest"]) == 0
    library = tmp_path / "ann.bib"
    library.write_text(BIBTEX, encoding="utf-8")
    capsys.readouterr()
    assert main(["--config", str(config), "import", "--user", "ann@example.org",
                 str(library)]) == 0
    out = capsys.readouterr().out
    assert "3 library entries taken (bibtex), 3 new" in out
    assert "1 match a stored paper, 2 pending" in out
    # The same file again adds nothing.
    assert main(["--config", str(config), "import", "--user", "ann@example.org",
                 str(library)]) == 0
    assert "0 new, 3 already known" in capsys.readouterr().out
    # A pending entry counts once a listing brings its paper.
    (tmp_path / "inbox" / "2026-03-20_late.txt").write_text(
        "new\n\nMar 20\n\nGraph Sketches at Scale\n\nSketching huge graphs in small memory.",
        encoding="utf-8")
    assert main(["--config", str(config), "ingest", str(tmp_path / "inbox" /
                                                          "2026-03-20_late.txt")]) == 0
    with Store(tmp_path / "var" / "state.sqlite3") as store:
        counts = store.library_counts("ann@example.org")
    assert (counts.entries, counts.matched, counts.pending) == (3, 2, 1)


def test_import_names_the_file_on_a_bad_library(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path)
    bad = tmp_path / "notes.bib"
    bad.write_text("just some notes", encoding="utf-8")
    assert main(["--config", str(config), "import", "--user", "ann@example.org",
                 str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and "notes.bib" in err and "Traceback" not in err


def test_unresolved_seeds_are_warned_by_check_config_and_status(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, 'seed_papers = ["Pareto Domain Adaptation", '
                               '"A Paper Nobody Wrote"]')
    assert main(["--config", str(config), "ingest"]) == 0
    capsys.readouterr()
    assert main(["--config", str(config), "check-config"]) == 0
    out = capsys.readouterr().out
    assert ("warning: ann@example.org: seed paper 'A Paper Nobody Wrote' matches no "
            "stored paper") in out
    assert "Pareto Domain Adaptation' matches" not in out
    assert main(["--config", str(config), "status"]) == 0
    out = capsys.readouterr().out
    assert "2 seed papers, 1 not found" in out
    assert "seed paper 'A Paper Nobody Wrote' matches no stored paper yet" in out


def test_a_config_library_is_imported_and_a_digest_with_nothing_resolved_says_so(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "ann.ris").write_text(RIS, encoding="utf-8")
    config = _config(tmp_path, 'library = "ann.ris"\n'
                               '        [[subscribers]]\n'
                               '        email = "bob@example.org"\n'
                               '        seed_papers = ["A Paper Nobody Wrote"]')
    assert load_config(config).subscribers[0].library == tmp_path / "ann.ris"
    assert main(["--config", str(config), "ingest"]) == 0
    capsys.readouterr()
    assert main(["--config", str(config), "preview", "--user", "ann@example.org"]) == 0
    ann = capsys.readouterr().out
    assert "not personalised yet" not in ann
    assert "Domain" in ann.split("\n\n", 3)[-1][:2000]
    with Store(tmp_path / "var" / "state.sqlite3") as store:
        assert store.library_counts("ann@example.org").entries == 2
    assert main(["--config", str(config), "preview", "--user", "bob@example.org"]) == 0
    assert "not personalised yet" in capsys.readouterr().out


def test_a_reply_with_a_library_attached(tmp_path: Path, smtp_server: StartServer) -> None:
    server = smtp_server()
    make_inbox(tmp_path)
    config_path = pipeline_config(tmp_path, server)
    config_path.write_text(config_path.read_text() + '\n[maildir]\npath = "var/replies"\n')
    assert main(["--config", str(config_path), "ingest"]) == 0
    assert main(["--config", str(config_path), "send", "--force"]) == 0
    digest = digests_by_recipient(server)["alice@example.org"]
    raw = reply(digest, "like 1\nHere is my library.")
    message = EmailMessage()
    for name in ("From", "To", "Subject", "Message-ID", "In-Reply-To", "References"):
        message[name] = reply_header(raw, name)
    message.set_content("like 1\nHere is my library.")
    message.add_attachment(BIBTEX.encode(), maintype="application", subtype="x-bibtex",
                           filename="my library.bib")
    message.add_attachment(b"not a library at all", maintype="application",
                           subtype="octet-stream", filename="broken.ris")
    folder = mailbox.Maildir(tmp_path / "var" / "replies", create=True)
    folder.add(message.as_bytes())
    with Store(tmp_path / "var" / "state.sqlite3") as store:
        report = asyncio.run(process_replies(load_config(config_path), store))
        assert report.applied == 1
        assert store.library_counts("alice@example.org").entries == 3
        assert [e.signal for e in store.feedback_log("alice@example.org")] == ["like"]
    [confirmation] = [m.message for m in server.messages
                      if str(m.message.get("Auto-Submitted")) == "auto-replied"]
    text = confirmation.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "Library file my library.bib: 3 library entries taken (bibtex), 3 new" in text
    assert "Library file broken.ris: not imported" in text


def reply_header(raw: bytes, name: str) -> str:
    from email import message_from_bytes, policy

    return str(message_from_bytes(raw, policy=policy.default)[name])


# Hostile library and password files (issue 8): not regular files, never read without a bound.

CHECK_TIMEOUT = 120.0  # seconds; before the fix /dev/zero read forever and a FIFO hung


def _special(tmp_path: Path, kind: str) -> Path:
    """A path that is not a regular file: a FIFO nobody writes to, or /dev/zero."""
    if kind == "/dev/zero":
        return Path("/dev/zero")
    fifo = tmp_path / "library.fifo"
    os.mkfifo(fifo)
    return fifo


def _check_config(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "digest", "--config", str(config),
                           "check-config"], capture_output=True, text=True, check=False,
                          timeout=CHECK_TIMEOUT, cwd=config.parent)


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero"])
def test_check_config_refuses_a_library_that_is_not_a_regular_file(tmp_path: Path,
                                                                   kind: str) -> None:
    special = _special(tmp_path, kind)
    done = _check_config(_config(tmp_path, f'library = "{special}"'))
    assert "Traceback" not in done.stderr
    assert (f"warning: ann@example.org: library {special}: cannot read: not a regular file"
            in done.stdout), done.stdout


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero"])
def test_check_config_refuses_a_password_file_that_is_not_a_regular_file(
        tmp_path: Path, kind: str) -> None:
    special = _special(tmp_path, kind)
    config = _config(tmp_path)
    config.write_text(config.read_text().replace(
        'sink = "var/outbox"', f'host = "smtp.example.org"\nusername = "u"\n'
        f'password_file = "{special}"'))
    done = _check_config(config)
    assert done.returncode == 1
    assert done.stderr.strip() == (f"Error: {config}: smtp.password_file: cannot read "
                                   f"{special}: not a regular file "
                                   f"({'a FIFO' if kind == 'fifo' else 'a device'})")


def test_the_daemon_refuses_a_fifo_library_without_waiting(tmp_path: Path) -> None:
    fifo = _special(tmp_path, "fifo")
    sub = Subscriber(email="ann@example.org", name="Ann", library=fifo)
    outcome: list[BaseException | None] = []

    def sync() -> None:
        with Store(tmp_path / "state.sqlite3") as store:
            try:
                sync_config_library(store, sub)
            except LibraryError as exc:
                outcome.append(exc)
            else:
                outcome.append(None)

    worker = threading.Thread(target=sync, daemon=True)  # a hang stays in this thread
    worker.start()
    worker.join(CHECK_TIMEOUT)
    assert outcome and isinstance(outcome[0], LibraryError), "the FIFO was waited on"
    assert str(outcome[0]) == f"{fifo}: cannot read: not a regular file (a FIFO)"


def test_a_library_over_the_limit_is_read_only_to_the_limit(tmp_path: Path) -> None:
    big = tmp_path / "big.bib"
    big.write_bytes(b"%" * (MAX_LIBRARY_BYTES + 100))
    assert len(read_regular_file(big, MAX_LIBRARY_BYTES)) == MAX_LIBRARY_BYTES + 1
    with pytest.raises(LibraryError, match="5000001 bytes; a library may hold at most"):
        sync_config_library(Store(tmp_path / "s.sqlite3"),
                            Subscriber(email="ann@example.org", name="Ann", library=big))
