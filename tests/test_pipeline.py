"""End to end: dump files in the inbox -> SQLite -> ranked digests in a real SMTP server."""

from __future__ import annotations

import os
import re
import time
from email.message import EmailMessage
from pathlib import Path

import pytest

from digest.cli import main
from digest.dumps import parse_file
from digest.store import Store

from .helpers import sample_dumps, write_config
from .smtp_helpers import (  # noqa: F401  (smtp_server_fixture provides the smtp_server fixture)
    SmtpServer,
    StartServer,
    smtp_server_fixture,
)

NASTY_TITLE = 'Breaking <script>alert("x")</script> Models & Their "Defences"'


def make_inbox(folder: Path, *, nasty: bool = True) -> Path:
    inbox = folder / "inbox"
    inbox.mkdir()
    for sample in sample_dumps():
        (inbox / sample.name).write_bytes(sample.read_bytes())
    if nasty:
        (inbox / "2026-03-13_extra.txt").write_text(
            "new\n\nMar 13\n\n" + NASTY_TITLE + "\n\nAdversarial attacks on domain adaptation "
            "models & defences, with code at https://github.com/example/nasty.", encoding="utf-8")
    for path in inbox.iterdir():
        os.utime(path, (time.time() - 60,) * 2)
    return inbox


def pipeline_config(folder: Path, server: SmtpServer, *, extra_subscriber: str = "",
                    max_papers: int = 10) -> Path:
    auth = ""
    if server.auth:
        auth = f'username = "{server.auth[0]}"\npassword_env = "DIGEST_TEST_SMTP_PASSWORD"'
    return write_config(folder, f"""
[digest]
inbox = "inbox"
state = "var/state.sqlite3"

[smtp]
host = "127.0.0.1"
port = {server.port}
security = "{server.tls}"
verify_tls = false
retry_seconds = 0.01
{auth}
from = "Paper Digest <digest@papers.example.org>"
reply_to = "digest+{{token}}@papers.example.org"

[defaults]
send_at = "08:00"
timezone = "Europe/Berlin"
max_papers = {max_papers}

[[subscribers]]
email = "alice@example.org"
name = "Alice & Co <Lab>"
interests = ["domain adaptation", "domain generalization"]

[[subscribers]]
email = "bob@example.org"
name = "Bob"
interests = ["large language model alignment", "preference optimization"]
{extra_subscriber}
""")


def digests_by_recipient(server: SmtpServer) -> dict[str, EmailMessage]:
    return {str(m.message["To"]).split("<")[-1].rstrip(">"): m.message for m in server.messages}


def parts(message: EmailMessage) -> tuple[str, str]:
    text = message.get_body(("plain",))
    html = message.get_body(("html",))
    assert text is not None and html is not None
    return text.get_content(), html.get_content()


def test_dump_to_inbox_end_to_end(tmp_path: Path, smtp_server: StartServer,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    server = smtp_server()
    make_inbox(tmp_path)
    config = pipeline_config(tmp_path, server)
    assert main(["--config", str(config), "ingest"]) == 0
    assert "61 papers, 61 new" in capsys.readouterr().out
    assert main(["--config", str(config), "send", "--force"]) == 0
    received = digests_by_recipient(server)
    assert set(received) == {"alice@example.org", "bob@example.org"}

    alice = received["alice@example.org"]
    assert alice.get_content_type() == "multipart/alternative"
    text, html = parts(alice)
    # Headers: threading token, unsubscribe, loop protection.
    token = re.fullmatch(r"digest\+([a-z0-9]+)@papers\.example\.org", str(alice["Reply-To"]))
    assert token is not None
    assert token.group(1) in str(alice["Message-ID"])
    assert str(alice["List-Unsubscribe"]) == (
        f"<mailto:digest+{token.group(1)}@papers.example.org?subject=unsubscribe>")
    assert str(alice["Auto-Submitted"]) == "auto-generated"
    assert alice["Date"] is not None and "papers.example.org" in str(alice["From"])
    subject = str(alice["Subject"])
    assert "\n" not in subject and "\r" not in subject
    # Personalised: Alice's top papers are about domain adaptation.
    numbered = re.findall(r"^\s*(\d+)\. (.+)$", text, flags=re.MULTILINE)
    assert [int(n) for n, _ in numbered] == list(range(1, 11))
    assert "domain" in numbered[0][1].lower()
    assert "Alice" in text and "of 117" in text.replace("considered", "of")  # 116 + the extra one
    # Escaping of a nasty title and name in the HTML part.
    assert "<script>" not in html
    if "Breaking" in html:
        assert "&lt;script&gt;" in html
    assert "Alice &amp; Co &lt;Lab&gt;" in html
    # The digest is recorded as sent, with its items frozen in order.
    with Store(tmp_path / "var" / "state.sqlite3") as store:
        rows = store.digests_of("alice@example.org")
        assert [r.status for r in rows] == ["sent"]
        items = store.digest_items(rows[0].id)
        assert [i.position for i in items] == list(range(1, 11))


def test_nasty_title_is_escaped_when_shown(tmp_path: Path, smtp_server: StartServer) -> None:
    server = smtp_server()
    make_inbox(tmp_path)
    config = pipeline_config(tmp_path, server, max_papers=100)
    assert main(["--config", str(config), "ingest"]) == 0
    assert main(["--config", str(config), "send", "--force", "--user", "alice@example.org"]) == 0
    text, html = parts(digests_by_recipient(server)["alice@example.org"])
    assert NASTY_TITLE in text  # plain text keeps the title as it is
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "Models &amp; Their" in html
    # The 16 papers listed in both samples are one paper each: shown once.
    first, second = (parse_file(path).papers for path in sample_dumps())
    shared = {p.title for p in first} & {p.title for p in second}
    assert len(shared) == 16
    flat = " ".join(text.split())  # titles may wrap in the text part
    shown = [title for title in shared if title in flat]
    assert len(shown) >= 10  # 100 of 117 shown: most of the 16 are in
    for title in shown:
        assert flat.count(title) == 1, title
    numbers = re.findall(r"^(\d+)\. ", text, flags=re.MULTILINE)
    assert numbers == [str(n) for n in range(1, 101)]


def test_send_twice_sends_nothing_the_second_time(tmp_path: Path,
                                                  smtp_server: StartServer) -> None:
    server = smtp_server()
    make_inbox(tmp_path)
    config = pipeline_config(tmp_path, server)
    main(["--config", str(config), "ingest"])
    assert main(["--config", str(config), "send", "--force"]) == 0
    assert len(server.messages) == 2
    assert main(["--config", str(config), "send", "--force"]) == 0
    assert main(["--config", str(config), "send"]) == 0
    assert len(server.messages) == 2


def test_dry_run_sends_and_claims_nothing(tmp_path: Path, smtp_server: StartServer,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    server = smtp_server()
    make_inbox(tmp_path)
    config = pipeline_config(tmp_path, server)
    main(["--config", str(config), "ingest"])
    capsys.readouterr()
    assert main(["--config", str(config), "send", "--force", "--dry-run"]) == 0
    assert "alice@example.org: would send 10 of 117 papers" in capsys.readouterr().out
    assert server.messages == [] and server.connections == 0
    assert main(["--config", str(config), "send", "--force"]) == 0
    assert len(server.messages) == 2


def test_new_papers_only_and_never_twice(tmp_path: Path, smtp_server: StartServer) -> None:
    """The next digest covers only papers ingested since, never a paper already sent."""
    import time_machine

    server = smtp_server()
    inbox = make_inbox(tmp_path, nasty=False)
    _first, second = sample_dumps()
    (inbox / second.name).unlink()
    config = pipeline_config(tmp_path, server)
    with time_machine.travel("2026-03-12 09:00 +01:00", tick=False):
        main(["--config", str(config), "ingest"])
        assert main(["--config", str(config), "send"]) == 0
    (inbox / second.name).write_bytes(second.read_bytes())
    os.utime(inbox / second.name, (time.time() - 60,) * 2)
    with time_machine.travel("2026-03-13 09:00 +01:00", tick=False):
        main(["--config", str(config), "ingest"])
        assert main(["--config", str(config), "send"]) == 0
    assert len(server.messages) == 4  # two subscribers, two days
    by_day: dict[str, list[str]] = {}
    for received in server.messages:
        text, _ = parts(received.message)
        to = str(received.message["To"])
        by_day.setdefault(to, []).append(text)
    for texts in by_day.values():
        assert len(texts) == 2
        day1 = set(re.findall(r"^\s*\d+\. (.+)$", texts[0], flags=re.MULTILINE))
        day2 = set(re.findall(r"^\s*\d+\. (.+)$", texts[1], flags=re.MULTILINE))
        assert len(day1) == len(day2) == 10
        assert not day1 & day2
        assert "Out of 55 new papers" in " ".join(texts[1].split())  # 71 listed, 16 seen before


def test_starttls_and_auth(tmp_path: Path, smtp_server: StartServer,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    server = smtp_server(tls="starttls", auth=("digest", "s3cret"))
    monkeypatch.setenv("DIGEST_TEST_SMTP_PASSWORD", "s3cret")
    make_inbox(tmp_path)
    config = pipeline_config(tmp_path, server)
    main(["--config", str(config), "ingest"])
    assert main(["--config", str(config), "send", "--force"]) == 0
    assert len(server.messages) == 2
    assert server.connections == 1  # one connection reused for the run


def test_permanent_failure_for_one_subscriber_does_not_stop_the_others(
        tmp_path: Path, smtp_server: StartServer, capsys: pytest.CaptureFixture[str]) -> None:
    server = smtp_server(reject=["bob@example.org"])
    make_inbox(tmp_path)
    config = pipeline_config(tmp_path, server, extra_subscriber="""
[[subscribers]]
email = "carol@example.org"
""")
    main(["--config", str(config), "ingest"])
    capsys.readouterr()
    assert main(["--config", str(config), "send", "--force"]) == 1
    out = capsys.readouterr().out
    assert "bob@example.org: FAILED" in out and "550" in out
    assert set(digests_by_recipient(server)) == {"alice@example.org", "carol@example.org"}
    with Store(tmp_path / "var" / "state.sqlite3") as store:
        bob = store.digests_of("bob@example.org")
        assert [r.status for r in bob] == ["failed"] and "550" in (bob[0].error or "")
        assert store.subscriber_state("bob@example.org").bouncing


def test_transient_failure_is_retried(tmp_path: Path, smtp_server: StartServer) -> None:
    server = smtp_server(fail_first=2)
    make_inbox(tmp_path)
    config = pipeline_config(tmp_path, server)
    main(["--config", str(config), "ingest"])
    assert main(["--config", str(config), "send", "--force"]) == 0
    assert len(server.messages) == 2
    assert server.data_commands == 4


def test_preview_writes_html(tmp_path: Path, smtp_server: StartServer,
                             capsys: pytest.CaptureFixture[str]) -> None:
    server = smtp_server()
    make_inbox(tmp_path)
    config = pipeline_config(tmp_path, server)
    main(["--config", str(config), "ingest"])
    capsys.readouterr()
    out_html = tmp_path / "preview.html"
    assert main(["--config", str(config), "preview", "--user", "bob@example.org",
                 "--html", str(out_html)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Subject: ") and "\n1. " in out
    assert "<html" in out_html.read_text().lower()
    assert server.messages == []
    assert main(["--config", str(config), "preview", "--user", "nobody@example.org"]) == 1


def is_domain_paper(title: str) -> bool:
    return "domain" in title.lower()


def is_llm_paper(title: str) -> bool:
    lowered = title.lower()
    return "large language model" in lowered or "llm" in lowered


def test_likes_and_skips_steer_the_next_digest(tmp_path: Path, smtp_server: StartServer,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Likes on domain adaptation and skips on LLM papers: the next digest ranks them so."""
    import time_machine

    server = smtp_server()
    inbox = make_inbox(tmp_path, nasty=False)
    _, second = sample_dumps()
    (inbox / second.name).unlink()
    config = pipeline_config(tmp_path, server, max_papers=30, extra_subscriber="""
[[subscribers]]
email = "dana@example.org"
name = "Dana"
""")
    with time_machine.travel("2026-03-12 09:00 +01:00", tick=False):
        main(["--config", str(config), "ingest"])
        assert main(["--config", str(config), "send", "--user", "dana@example.org"]) == 0
    day1_text, _ = parts(server.messages[0].message)
    assert "personalise" in day1_text.lower()  # no feedback, no interests: says how to steer
    with Store(tmp_path / "var" / "state.sqlite3") as store:
        digest = store.digests_of("dana@example.org")[0]
        shown = store.papers_by_id(i.paper_id for i in store.digest_items(digest.id))
        for item in store.digest_items(digest.id):
            title = shown[item.paper_id].title
            signal = "like" if is_domain_paper(title) else "skip" if is_llm_paper(title) else None
            if signal:
                store.add_feedback("dana@example.org", item.paper_id, signal, source="test",
                                   digest_id=digest.id)
        assert {r.signal for r in store.latest_feedback("dana@example.org")} == {"like", "skip"}
    (inbox / second.name).write_bytes(second.read_bytes())
    os.utime(inbox / second.name, (time.time() - 60,) * 2)
    with time_machine.travel("2026-03-13 09:00 +01:00", tick=False):
        main(["--config", str(config), "ingest"])
        assert main(["--config", str(config), "send", "--user", "dana@example.org"]) == 0
    with Store(tmp_path / "var" / "state.sqlite3") as store:
        digest = store.digests_of("dana@example.org")[0]
        items = [i for i in store.digest_items(digest.id) if not i.explore]
        titles = [store.papers_by_id([i.paper_id])[i.paper_id].title for i in items]
    domain_at = [n for n, title in enumerate(titles) if is_domain_paper(title)]
    llm_at = [n for n, title in enumerate(titles) if is_llm_paper(title)]
    assert domain_at and llm_at
    assert sum(domain_at) / len(domain_at) < sum(llm_at) / len(llm_at)
    assert not any(is_llm_paper(title) for title in titles[:5])
    # explain says why, naming a liked paper.
    capsys.readouterr()
    with time_machine.travel("2026-03-13 10:00 +01:00", tick=False):
        assert main(["--config", str(config), "explain", "--user", "dana@example.org"]) == 0
    out = capsys.readouterr().out
    assert "\n  #1  " in out and "near liked:" in out and "why: close to" in out
