"""Delivery over SMTP to a real aiosmtpd server, and the demo's local sink."""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
import time
from collections.abc import Awaitable
from datetime import UTC, date, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import TypeVar

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import Envelope

from digest.config import SmtpConfig, Subscriber
from digest.errors import ConfigError, SendError
from digest.mailer import LocalSink, Mailer, envelope_recipients, free_port
from digest.paper import Paper
from digest.render import DigestContent, DigestItem, new_token, render_digest

from .smtp_helpers import (  # noqa: F401  (smtp_server_fixture provides the smtp_server fixture)
    SmtpServer,
    StartServer,
    smtp_server_fixture,
    start_smtp_server,
)

T = TypeVar("T")
NOW = datetime(2026, 3, 12, 7, 0, tzinfo=UTC)
QUICK = {"base_delay": 0.01}  # retries in tests wait milliseconds, not seconds


def run(coroutine: Awaitable[T]) -> T:
    return asyncio.run(coroutine)  # type: ignore[arg-type]


def note(to: str = "bob@example.org", subject: str = "hello", **headers: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = "Paper Digest <digest@papers.example.org>"
    message["To"] = to
    message["Subject"] = subject
    for name, value in headers.items():
        message[name] = value
    message.set_content(f"{subject}\n")
    return message


def digest_for(email: str = "alice@example.org", name: str = "Alice") -> EmailMessage:
    paper = Paper(id="2603.00001", title="Pareto <Domain> Adaptation & friends",
                  abstract="Domain adaptation transfers knowledge. " * 12, arxiv_id="2603.00001")
    content = DigestContent(
        subscriber=Subscriber(email=email, name=name), token=new_token(),
        local_date=date(2026, 3, 12), considered=40,
        items=(DigestItem(1, paper, 0.9, "close to what you liked"),), personalised=True,
    )
    smtp = SmtpConfig(sender="Paper Digest <digest@papers.example.org>",
                      reply_to="digest+{token}@papers.example.org")
    return render_digest(content, smtp, now=NOW)


async def send_all(config: SmtpConfig, *messages: EmailMessage, **options: object) -> Mailer:
    async with Mailer(config, **options) as mailer:  # type: ignore[arg-type]
        for message in messages:
            await mailer.send(message)
    return mailer


# Delivery


def test_delivers_a_rendered_digest_intact(smtp_server: StartServer) -> None:
    server = smtp_server()
    digest = digest_for()

    run(send_all(server.smtp_config(), digest))

    [received] = server.messages
    assert received.mail_from == "digest@papers.example.org"
    assert received.rcpt_tos == ("alice@example.org",)
    for header in ("Subject", "From", "To", "Date", "Message-ID", "Reply-To",
                   "List-Unsubscribe", "Auto-Submitted"):
        assert received.message[header] == digest[header], header
    assert received.message.get_content_type() == "multipart/alternative"
    html = received.message.get_body(preferencelist=("html",))
    assert html is not None and "Pareto &lt;Domain&gt; Adaptation &amp; friends" in html.get_content()
    # The URL header arrives as one plain line, not as encoded words.
    assert re.search(rb"\r\nList-Unsubscribe: <mailto:digest\+[a-z0-9]+@papers\.example\.org"
                     rb"\?subject=unsubscribe>\r\n", received.raw)


def test_a_stored_and_reparsed_digest_keeps_its_url_header_plain(smtp_server: StartServer) -> None:
    # The daemon stores the rendered bytes and parses them again before sending.
    server = smtp_server()
    digest = digest_for()
    long_url = str(digest["List-Unsubscribe"]).replace(
        "papers.example.org", "mail.digest.department.university.example.org")
    digest.replace_header("List-Unsubscribe", long_url)
    stored = digest.as_bytes(policy=email.policy.SMTP)  # folds it as encoded words
    reparsed = email.message_from_bytes(stored, policy=email.policy.default)
    assert isinstance(reparsed, EmailMessage)

    run(send_all(server.smtp_config(), reparsed))

    [received] = server.messages
    assert b"\r\nList-Unsubscribe: " + long_url.encode() + b"\r\n" in received.raw


def test_one_connection_carries_all_messages_of_a_run(smtp_server: StartServer) -> None:
    server = smtp_server()

    mailer = run(send_all(server.smtp_config(), *(note(f"user{n}@example.org") for n in range(5))))

    assert [m.rcpt_tos for m in server.messages] == [(f"user{n}@example.org",) for n in range(5)]
    assert server.connections == 1
    assert mailer.connections == 1
    assert {m.connection for m in server.messages} == {1}


def test_connects_only_when_there_is_something_to_send(smtp_server: StartServer) -> None:
    server = smtp_server()

    run(send_all(server.smtp_config()))

    assert server.connections == 0


def test_reconnects_when_the_server_dropped_an_idle_connection(smtp_server: StartServer) -> None:
    server = smtp_server(idle_timeout=0.2)

    async def two_sends_apart() -> Mailer:
        async with Mailer(server.smtp_config(), **QUICK) as mailer:  # type: ignore[arg-type]
            await mailer.send(note(subject="first"))
            await asyncio.sleep(1.0)  # the server closes the idle connection meanwhile
            await mailer.send(note(subject="second"))
        return mailer

    mailer = run(two_sends_apart())

    assert [m.message["Subject"] for m in server.messages] == ["first", "second"]
    assert server.connections == 2 and mailer.connections == 2


def test_bcc_recipients_get_the_message_without_the_header(smtp_server: StartServer) -> None:
    server = smtp_server()
    message = note("bob@example.org", Cc="Carol <carol@example.org>", Bcc="dave@example.org")

    run(send_all(server.smtp_config(), message))

    [received] = server.messages
    assert received.rcpt_tos == ("bob@example.org", "carol@example.org", "dave@example.org")
    assert "Bcc" not in received.message
    assert b"dave@" not in received.raw


# TLS and AUTH


def test_starttls_with_a_self_signed_certificate_and_login(smtp_server: StartServer) -> None:
    server = smtp_server(tls="starttls", auth=("ann", "s3cret"))

    run(send_all(server.smtp_config(), note(), note(subject="again"), password="s3cret"))

    assert [(m.tls, m.login) for m in server.messages] == [(True, "ann"), (True, "ann")]
    assert server.connections == 1


def test_password_is_read_from_the_configured_file(smtp_server: StartServer,
                                                   tmp_path: Path) -> None:
    server = smtp_server(tls="starttls", auth=("ann", "s3cret"))
    secret = tmp_path / "smtp-password"
    secret.write_text("s3cret\n", encoding="utf-8")

    run(send_all(server.smtp_config(password_file=secret), note()))

    assert [m.login for m in server.messages] == ["ann"]


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_implicit_tls_with_login(smtp_server: StartServer) -> None:
    server = smtp_server(tls="tls", auth=("ann", "s3cret"))

    run(send_all(server.smtp_config(), note(), password="s3cret"))

    assert [(m.tls, m.login) for m in server.messages] == [(True, "ann")]


def test_a_refused_login_fails_at_once_without_blaming_the_recipient(
    smtp_server: StartServer,
) -> None:
    server = smtp_server(tls="starttls", auth=("ann", "s3cret"))

    with pytest.raises(SendError) as caught:
        run(send_all(server.smtp_config(), note(), password="wrong", base_delay=5.0))

    assert caught.value.permanent is False  # the address is fine: the setup is not
    assert "535" in str(caught.value)
    assert server.connections == 1  # not retried: a wrong password stays wrong
    assert server.messages == []


@pytest.mark.parametrize("tls", ["starttls", "tls"])
def test_an_unverifiable_certificate_is_refused_when_verifying(smtp_server: StartServer,
                                                               tls: str) -> None:
    server = smtp_server(tls=tls)

    with pytest.raises(SendError) as caught:
        run(send_all(server.smtp_config(verify_tls=True), note(), base_delay=5.0))

    assert caught.value.permanent is False
    assert "certificate" in str(caught.value).lower()
    assert server.connections == 1
    assert server.messages == []


def test_a_username_without_any_password_is_a_config_error(smtp_server: StartServer) -> None:
    server = smtp_server(tls="starttls", auth=("ann", "s3cret"))

    with pytest.raises(ConfigError, match="no password"):
        run(send_all(server.smtp_config(), note()))


# Retries


def test_a_4xx_twice_then_success_delivers_once(smtp_server: StartServer) -> None:
    server = smtp_server(fail_first=2)

    mailer = run(send_all(server.smtp_config(), note(), **QUICK))

    assert len(server.messages) == 1
    assert server.data_commands == 3
    assert mailer.connections == 1  # a 451 leaves the connection usable


def test_a_dropped_connection_is_retried_on_a_new_one(smtp_server: StartServer) -> None:
    server = smtp_server(drop_first=1)

    mailer = run(send_all(server.smtp_config(), note(), note(subject="next"), **QUICK))

    assert [m.message["Subject"] for m in server.messages] == ["hello", "next"]
    assert server.connections == 2 and mailer.connections == 2


def test_retries_wait_longer_each_time(smtp_server: StartServer) -> None:
    server = smtp_server(fail_first=2)

    started = time.monotonic()
    run(send_all(server.smtp_config(), note(), base_delay=0.1))

    assert time.monotonic() - started >= 0.1 + 0.2  # 0.1 s, then twice that
    assert len(server.messages) == 1


def test_gives_up_after_the_last_attempt_with_a_temporary_error(smtp_server: StartServer) -> None:
    server = smtp_server(fail_first=10)

    with pytest.raises(SendError) as caught:
        run(send_all(server.smtp_config(), note(), attempts=3, **QUICK))

    assert caught.value.permanent is False
    assert caught.value.recipient == "bob@example.org"
    assert "451" in str(caught.value) and "3 attempts" in str(caught.value)
    assert server.data_commands == 3
    assert server.messages == []


def test_an_unreachable_server_is_a_temporary_error(tmp_path: Path) -> None:
    config = SmtpConfig(host="127.0.0.1", port=free_port(), security="none", timeout=2.0)
    with pytest.raises(SendError) as caught:
        run(send_all(config, note(), attempts=2, **QUICK))

    assert caught.value.permanent is False


# Permanent refusals


def test_a_5xx_recipient_is_permanent_and_the_next_message_still_goes(
    smtp_server: StartServer,
) -> None:
    server = smtp_server(reject=["gone@example.org"])

    async def two_messages() -> tuple[SendError, Mailer]:
        async with Mailer(server.smtp_config(), **QUICK) as mailer:  # type: ignore[arg-type]
            # Once the server has accepted an address (before that, a refusal is held back:
            # tests/test_dispatch_refusals.py).
            await mailer.send(note("bob@example.org", subject="first"))
            with pytest.raises(SendError) as caught:
                await mailer.send(note("gone@example.org"))
            await mailer.send(note("bob@example.org", subject="next"))
        return caught.value, mailer

    error, mailer = run(two_messages())

    assert error.permanent is True
    assert error.recipient == "gone@example.org"
    assert "550" in str(error)
    assert [m.rcpt_tos for m in server.messages] == [("bob@example.org",)] * 2
    assert mailer.connections == 1  # refused once, never retried, connection kept


def test_one_refused_recipient_of_several_is_reported_and_others_get_it(
    smtp_server: StartServer,
) -> None:
    server = smtp_server(reject={"gone@example.org": "550 5.1.1 Mailbox unavailable",
                                 "later@example.org": "452 4.2.2 Mailbox full"})
    message = note("bob@example.org, gone@example.org, later@example.org")

    async def send() -> dict[str, SendError]:
        async with Mailer(server.smtp_config(), attempts=2, **QUICK) as mailer:  # type: ignore[arg-type]
            return await mailer.send(message)

    refused = run(send())

    assert sorted(refused) == ["gone@example.org", "later@example.org"]
    assert refused["gone@example.org"].permanent is True
    assert refused["later@example.org"].permanent is False  # 452 was retried, then given up
    assert [m.rcpt_tos for m in server.messages] == [("bob@example.org",)]  # sent once


def test_recipients_come_from_to_cc_and_bcc_once_each() -> None:
    message = note("Bob <bob@example.org>, carol@example.org",
                   Cc="BOB@example.org", Bcc="dave@example.org")
    assert envelope_recipients(message) == ["bob@example.org", "carol@example.org",
                                            "dave@example.org"]


# The local sink


def test_local_sink_stores_eml_and_html_via_the_same_mailer(tmp_path: Path) -> None:
    configured = SmtpConfig(host="smtp.example.org", port=587, security="starttls",
                            username="ann", password_env="NOT_SET_ANYWHERE",
                            sender="Paper Digest <digest@papers.example.org>",
                            sink=tmp_path / "outbox")
    digest = digest_for("alice+papers@example.org")

    with LocalSink.from_config(configured) as sink:
        config = sink.smtp_config()
        run(send_all(config, digest, digest_for("alice+papers@example.org")))

    assert (config.host, config.port, config.security, config.username) == (
        "127.0.0.1", sink.port, "none", None)
    assert config.sender == configured.sender
    assert sink.folder == tmp_path / "outbox"
    emls = sorted(sink.folder.glob("*.eml"))
    # Named by the second each arrived in, then a counter within that second.
    assert [re.sub(r"^\d{8}T\d{6}Z-(.*)-\d+\.eml$", r"\1", p.name) for p in emls] == [
        "alice+papers", "alice+papers"]
    stored = emls[0].read_bytes()
    assert stored.startswith(b"Return-Path: <digest@papers.example.org>\r\n"
                             b"Delivered-To: alice+papers@example.org\r\n")
    assert digest["Message-ID"].encode() in stored
    html = emls[0].with_suffix(".html").read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>")
    assert "Pareto &lt;Domain&gt; Adaptation &amp; friends" in html


def test_an_internationalised_address_goes_out_as_smtputf8(tmp_path: Path) -> None:
    """Issue 8: render_digest raised NonASCIILocalPartDefect for josé@; now UTF-8 headers."""
    digest = digest_for("jos\u00e9@example.org", name="Jos\u00e9")
    assert "jos\u00e9@example.org".encode() in digest.as_bytes()  # no encoded word in the address
    assert envelope_recipients(digest) == ["jos\u00e9@example.org"]

    with LocalSink(tmp_path / "outbox") as sink:
        run(send_all(sink.smtp_config(), digest))

    [eml] = sorted(sink.folder.glob("*.eml"))
    stored = email.message_from_string(eml.read_text(encoding="utf-8"), policy=email.policy.default)
    assert stored["Delivered-To"] == "jos\u00e9@example.org"
    assert stored["To"].addresses[0].addr_spec == "jos\u00e9@example.org"
    assert stored["Message-ID"] == digest["Message-ID"]


class _Recorder:
    """aiosmtpd handler keeping each accepted envelope's recipients."""

    def __init__(self) -> None:
        self.rcpt_tos: list[list[str]] = []

    async def handle_DATA(self, server: object, session: object, envelope: Envelope) -> str:
        self.rcpt_tos.append(list(envelope.rcpt_tos))
        return "250 2.0.0 OK"


def test_a_server_without_smtputf8_fails_that_digest_alone() -> None:
    recorder = _Recorder()
    server = Controller(recorder, hostname="127.0.0.1", port=free_port(), enable_SMTPUTF8=False)
    server.start()
    config = SmtpConfig(host="127.0.0.1", port=server.port, security="none",
                        sender="Paper Digest <digest@papers.example.org>")

    async def both() -> SendError:
        async with Mailer(config, attempts=1, **QUICK) as mailer:  # type: ignore[arg-type]
            with pytest.raises(SendError) as failed:
                await mailer.send(digest_for("jos\u00e9@example.org"))
            await mailer.send(digest_for("bob@example.org"))
        return failed.value

    try:
        error = run(both())
    finally:
        server.stop()
    assert error.kind == "message"
    assert "needs SMTPUTF8, which the server does not offer" in str(error)
    assert recorder.rcpt_tos == [["bob@example.org"]]


def test_local_sink_stops_listening(tmp_path: Path) -> None:
    sink = LocalSink(tmp_path / "outbox")
    sink.start()
    config = sink.smtp_config()
    sink.stop()

    with pytest.raises(SendError):
        run(send_all(config, note(), attempts=1))
    assert list((tmp_path / "outbox").iterdir()) == []


def test_helper_server_counts_each_starttls_connection_once(tmp_path: Path) -> None:
    with start_smtp_server(tmp_path, tls="starttls") as server:
        assert isinstance(server, SmtpServer)
        run(send_all(server.smtp_config(), note()))
        run(send_all(server.smtp_config(), note()))
        assert server.connections == 2
        assert [m.connection for m in server.messages] == [1, 2]


# What each answer means (issue 8: SMTP answers mean what they say)


def test_a_5xx_after_data_fails_that_message_only_as_a_message_problem(tmp_path: Path) -> None:
    from digest.bench.smtp_servers import Behaviour, RecordingServer

    server = RecordingServer(Behaviour(data_reply="554 5.6.0 Message rejected as spam"))
    try:
        config = SmtpConfig(host="127.0.0.1", port=server.port, security="none")

        async def two() -> tuple[SendError, SendError, Mailer]:
            async with Mailer(config, **QUICK) as mailer:  # type: ignore[arg-type]
                errors = []
                for to in ("ann@example.org", "bob@example.org"):
                    with pytest.raises(SendError) as caught:
                        await mailer.send(note(to=to))
                    errors.append(caught.value)
                return errors[0], errors[1], mailer

        first, second, mailer = run(two())
    finally:
        server.stop()
    for error, to in ((first, "ann@example.org"), (second, "bob@example.org")):
        assert error.kind == "message" and error.permanent and not error.session
        assert str(error) == f"{to}: the server rejected the message (554 5.6.0 Message " \
            "rejected as spam)"
    assert mailer.unavailable is None and mailer.connections == 1  # the next one still went


def test_a_refused_login_names_the_fix_and_is_not_tried_again_in_the_run(
        smtp_server: StartServer) -> None:
    server = smtp_server(tls="starttls", auth=("ann", "s3cret"))
    config = server.smtp_config(username="ann")

    async def twice() -> tuple[SendError, SendError]:
        async with Mailer(config, password="wrong", **QUICK) as mailer:  # type: ignore[arg-type]
            with pytest.raises(SendError) as first:
                await mailer.send(note())
            with pytest.raises(SendError) as second:
                await mailer.send(note(to="carl@example.org"))
            return first.value, second.value

    first, second = run(twice())
    assert first.kind == "config" and first.session and not first.permanent
    assert str(first).startswith(f"127.0.0.1:{server.port}: login as ann refused (535 ")
    assert "wrong password; many providers need an app password" in str(first)
    assert second is first  # no second login: a provider locks an account after many
    assert server.connections == 1


def test_a_silent_server_costs_one_timeout_for_the_whole_run() -> None:
    from digest.bench.smtp_servers import RawServer

    server = RawServer("hang")
    config = SmtpConfig(host="127.0.0.1", port=server.port, security="none", timeout=0.5)

    async def three() -> list[SendError]:
        errors = []
        async with Mailer(config, **QUICK) as mailer:  # type: ignore[arg-type]
            for to in ("a@example.org", "b@example.org", "c@example.org"):
                with pytest.raises(SendError) as caught:
                    await mailer.send(note(to=to))
                errors.append(caught.value)
        return errors

    try:
        errors = run(three())
    finally:
        server.stop()
    assert server.connections == 1
    assert {e.kind for e in errors} == {"server"}
    assert "the rest waits for the next dispatch" in str(errors[0])


def test_a_dropping_server_is_tried_once_more_then_given_up_for_the_run() -> None:
    from digest.bench.smtp_servers import RawServer

    server = RawServer("drop-after-ehlo")
    config = SmtpConfig(host="127.0.0.1", port=server.port, security="none", timeout=5)
    try:
        with pytest.raises(SendError) as caught:
            run(send_all(config, note(), note(to="b@example.org"), **QUICK))
    finally:
        server.stop()
    assert caught.value.kind == "server"
    assert server.connections == 2


def test_a_greeting_5xx_is_a_configuration_error() -> None:
    from digest.bench.smtp_servers import RawServer

    server = RawServer("greet-554")
    config = SmtpConfig(host="127.0.0.1", port=server.port, security="none", timeout=5)
    try:
        with pytest.raises(SendError) as caught:
            run(send_all(config, note(), **QUICK))
    finally:
        server.stop()
    assert caught.value.kind == "config"
    assert "the server refused the session (554 5.3.2 No service for you): check [smtp] host " \
        "and port" in str(caught.value)


@pytest.mark.parametrize(("port", "security", "hint"), [
    (465, "starttls", 'port 465 usually means security = "tls"'),
    (465, "none", 'port 465 usually means security = "tls"'),
    (587, "tls", 'port 587 usually means security = "starttls"'),
])
def test_a_port_that_does_not_match_security_is_named(port: int, security: str,
                                                      hint: str) -> None:
    from digest.mailer import session_problem

    smtp = SmtpConfig(host="mail.example.org", port=port, security=security)
    for problem in (TimeoutError("timed out"), ConnectionResetError("reset by peer")):
        kind, text = session_problem(smtp, problem)
        assert kind == "config" and text.endswith(hint)


def test_a_self_signed_certificate_is_trusted_through_ca_file(smtp_server: StartServer) -> None:
    server = smtp_server(tls="starttls")
    assert server.cert is not None

    with pytest.raises(SendError) as caught:
        run(send_all(server.smtp_config(verify_tls=True), note(), **QUICK))
    assert caught.value.kind == "config"
    assert 'set ca_file = "/path/to/ca.pem" under [smtp]' in str(caught.value)

    run(send_all(server.smtp_config(verify_tls=True, ca_file=server.cert), note(), **QUICK))
    assert [m.tls for m in server.messages] == [True]


def test_check_login_reports_what_the_server_offers(smtp_server: StartServer) -> None:
    server = smtp_server(tls="starttls", auth=("ann", "s3cret"))

    offered = run(Mailer(server.smtp_config(username="ann"), password="s3cret").check_login())
    assert offered.startswith("TLS; offers ") and "auth" in offered.lower()
    with pytest.raises(SendError, match="app password"):
        run(Mailer(server.smtp_config(username="ann"), password="nope").check_login())
