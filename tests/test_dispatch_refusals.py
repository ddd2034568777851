"""A relay refusal for everyone is the server's setup, not every subscriber bouncing.

Real aiosmtpd servers refuse at RCPT (or at MAIL) the way misconfigured relays do;
the daemon's dispatch runs in-process at chosen instants.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from digest.errors import SendError

from .daemon_helpers import Sim, fill_inbox, utc, write_daemon_config
from .smtp_helpers import (  # noqa: F401  (smtp_server_fixture provides the smtp_server fixture)
    StartServer,
    smtp_server_fixture,
)
from .test_mailer import note, run, send_all

ADDRESSES = [f"reader{n}@example.org" for n in range(5)]


def readers() -> list[dict[str, Any]]:
    return [{"email": email, "send_at": "08:00", "send_empty": True} for email in ADDRESSES]


def sim_for(tmp_path: Path, port: int) -> Sim:
    fill_inbox(tmp_path)
    sim = Sim(write_daemon_config(tmp_path, port=port, subscribers=readers()))
    sim.ingest(utc("2026-03-01 06:00"))
    return sim


@pytest.mark.parametrize("reply", [
    "554 5.7.1 <reader0@example.org>: Relay access denied",
    "530 5.7.0 Authentication required",
    "550 5.7.1 Unable to relay: this host is not permitted to relay",
])
def test_a_relay_refusal_holds_the_dispatch_and_marks_nobody_bouncing(
        tmp_path: Path, smtp_server: StartServer, reply: str) -> None:
    server = smtp_server(reject={email: reply for email in ADDRESSES})
    sim = sim_for(tmp_path, server.port)
    try:
        outcomes = sim.tick(utc("2026-03-02 08:00"))
        assert not any(sim.store.subscriber_state(e).bouncing for e in ADDRESSES)
        statuses = {o.subscriber: o.status for o in outcomes}
        assert statuses[ADDRESSES[0]] == "retry"
        assert all(statuses[e] == "deferred" for e in ADDRESSES[1:]), statuses
        hold = sim.runtime.smtp_hold
        assert hold is not None and "the server refuses to relay: set username and " \
            "password_env" in hold.reason
    finally:
        sim.close()


def test_the_same_refusal_for_the_first_three_recipients_is_a_configuration_error(
        tmp_path: Path, smtp_server: StartServer) -> None:
    # Issue 13: at three different domains (a relay refuses every domain alike).
    spread = [f"reader{n}@domain{n}.example.org" for n in range(5)]
    server = smtp_server(reject={email: "550 Go away" for email in spread})
    sim = sim_with(tmp_path, server.port, spread)
    try:
        outcomes = sim.tick(utc("2026-03-02 08:00"))
        assert not any(sim.store.subscriber_state(e).bouncing for e in spread)
        assert [o.status for o in outcomes] == ["retry"] * 3 + ["deferred"] * 2
        hold = sim.runtime.smtp_hold
        assert hold is not None and "the first 3 different recipients" in hold.reason
        assert "550 Go away" in hold.reason
    finally:
        sim.close()


def test_a_mailbox_refusal_among_accepted_addresses_still_bounces(
        tmp_path: Path, smtp_server: StartServer) -> None:
    server = smtp_server(reject={ADDRESSES[0]: "550 Go away", ADDRESSES[3]: "550 Go away"})
    sim = sim_for(tmp_path, server.port)
    try:
        first = {o.subscriber: o.status for o in sim.tick(utc("2026-03-02 08:00"))}
        # reader0 came before any address was accepted: held back, then tried again in the
        # same dispatch once reader1 was accepted, and refused for good (issue 13).
        assert first[ADDRESSES[0]] == "failed" and first[ADDRESSES[3]] == "failed"
        assert sim.store.subscriber_state(ADDRESSES[3]).bouncing
        assert sim.store.subscriber_state(ADDRESSES[0]).bouncing
        later = sim.tick(utc("2026-03-02 08:10"))  # nothing left to resend
        assert {o.status for o in later} == {"already-sent"}
        assert sim.runtime.smtp_hold is None
        assert len(server.messages) == 3
    finally:
        sim.close()


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_530_at_mail_gets_the_login_hint_not_the_from_hint(smtp_server: StartServer) -> None:
    server = smtp_server(auth=("ann", "s3cret"))  # requires AUTH: MAIL without it gets 530
    with pytest.raises(SendError) as caught:
        run(send_all(server.smtp_config(username=None), note()))
    assert caught.value.kind == "config"
    assert "set username and password_env" in str(caught.value)
    assert "[smtp] from" not in str(caught.value)


def test_the_status_line_keeps_the_last_dispatch_that_did_something(
        tmp_path: Path, smtp_server: StartServer) -> None:
    server = smtp_server()
    sim = sim_for(tmp_path, server.port)
    try:
        sim.tick(utc("2026-03-02 07:50"))  # nothing due yet: said as such
        assert sim.runtime.last_dispatch.startswith("last dispatch 2026-03-02 07:50 UTC: ")
        sim.tick(utc("2026-03-02 08:00"))
        sent = sim.runtime.last_dispatch
        assert sent == "last dispatch 2026-03-02 08:00 UTC: 5 sent"
        sim.tick(utc("2026-03-02 08:10"))  # idle ticks do not overwrite it
        sim.tick(utc("2026-03-02 09:00"))
        assert sim.runtime.last_dispatch == sent
    finally:
        sim.close()


def test_a_digest_left_claimed_is_counted_once_in_the_dispatch_summary(
        tmp_path: Path, smtp_server: StartServer) -> None:
    """Issue 13: the resent digest was counted as retried (or sent) and as already sent."""
    server = smtp_server(fail_first=2)  # reader0's two attempts get 451: left claimed
    sim = sim_for(tmp_path, server.port)
    try:
        first = sim.tick(utc("2026-03-02 08:00"))
        assert [o.status for o in first] == ["retry"] + ["sent"] * 4
        assert sim.runtime.last_dispatch.endswith(": 1 retry, 4 sent")
        server.stop()  # the relay goes away: the resend fails again
        again = sim.tick(utc("2026-03-02 08:10"))
        assert sorted(o.subscriber.lower() for o in again) == sorted(ADDRESSES)  # once each
        assert {o.subscriber.lower(): o.status for o in again}[ADDRESSES[0]] == "retry"
        assert sim.runtime.last_dispatch.endswith(": 4 already-sent, 1 retry")
    finally:
        sim.close()


def test_a_digest_resent_and_delivered_is_counted_once_as_sent(
        tmp_path: Path, smtp_server: StartServer) -> None:
    server = smtp_server(fail_first=2)
    sim = sim_for(tmp_path, server.port)
    try:
        sim.tick(utc("2026-03-02 08:00"))
        again = sim.tick(utc("2026-03-02 08:10"))  # the resend goes through now
        assert sorted(o.subscriber.lower() for o in again) == sorted(ADDRESSES)
        assert sim.runtime.last_dispatch.endswith(": 4 already-sent, 1 sent")
        assert len(server.messages) == 5
    finally:
        sim.close()


# Issue 13: a few bad addresses first are not a relay that refuses everyone.

RETIRED = [f"old{n}@retired-lab.example.edu" for n in range(3)]  # a lab's domain, gone
GOOD = [f"member{n}@{domain}" for n, domain in
        enumerate(["uni.example.edu", "example.org", "lab.example.com", "uni.example.edu",
                   "mail.example.net"])]


def sim_with(tmp_path: Path, port: int, addresses: list[str]) -> Sim:
    fill_inbox(tmp_path)
    subscribers = [{"email": email, "send_at": "08:00", "send_empty": True}
                   for email in addresses]
    sim = Sim(write_daemon_config(tmp_path, port=port, subscribers=subscribers))
    sim.ingest(utc("2026-03-02 06:00"))
    return sim


@pytest.mark.parametrize("reply", ["550 Unrouteable address", "550 Rejected"])
def test_three_refused_addresses_first_fail_alone_and_everyone_else_gets_mail(
        tmp_path: Path, smtp_server: StartServer, reply: str) -> None:
    server = smtp_server(reject={email: reply for email in RETIRED})
    sim = sim_with(tmp_path, server.port, RETIRED + GOOD)
    try:
        outcomes = {o.subscriber: o for o in sim.tick(utc("2026-03-02 08:00"))}
        assert sim.runtime.smtp_hold is None  # not the relay's setup
        assert {e: outcomes[e].status for e in GOOD} == {e: "sent" for e in GOOD}
        assert sorted(r for m in server.messages for r in m.rcpt_tos) == sorted(GOOD)
        for email in RETIRED:  # theirs alone, for good, with the server's words
            assert outcomes[email].status == "failed", outcomes[email]
            assert f"address refused ({reply})" in outcomes[email].detail
            assert sim.store.subscriber_state(email).bouncing
            assert sim.digests(email) == [("2026-03-02", "failed")]
        later = sim.tick(utc("2026-03-02 08:10"))  # nothing left to resend, no hold
        assert sim.runtime.smtp_hold is None
        assert {o.status for o in later} == {"already-sent"}
    finally:
        sim.close()


def test_resends_of_refused_digests_never_arm_the_hold_again(
        tmp_path: Path, smtp_server: StartServer) -> None:
    """Three bare refusals at three domains first look like a relay refusing all: held.

    Once the hold is over, those digests are resent first and refused again:
    no new evidence, so no new hold; the others get mail and the three fail.
    """
    bad = ["a@typo-one.example", "b@typo-two.example", "c@typo-three.example"]
    server = smtp_server(reject={email: "550 Rejected" for email in bad})
    sim = sim_with(tmp_path, server.port, bad + GOOD)
    try:
        first = sim.tick(utc("2026-03-02 08:00"))
        assert [o.status for o in first] == ["retry"] * 3 + ["deferred"] * 5
        assert sim.runtime.smtp_hold is not None
        second = {o.subscriber: o.status for o in sim.tick(utc("2026-03-02 08:06"))}
        assert sim.runtime.smtp_hold is None
        assert {e: second[e] for e in GOOD} == {e: "sent" for e in GOOD}
        assert {e: second[e] for e in bad} == {e: "failed" for e in bad}
        assert sorted(r for m in server.messages for r in m.rcpt_tos) == sorted(GOOD)
    finally:
        sim.close()


def test_a_relay_refusing_everyone_at_one_domain_is_still_held(
        tmp_path: Path, smtp_server: StartServer) -> None:
    """A group whose addresses all share one domain: more refusals are needed, then held."""
    group = [f"member{n:02d}@uni.example.edu" for n in range(12)]
    server = smtp_server(reject={email: "550 Rejected" for email in group})
    sim = sim_with(tmp_path, server.port, group)
    try:
        outcomes = sim.tick(utc("2026-03-02 08:00"))
        assert [o.status for o in outcomes] == ["retry"] * 10 + ["deferred"] * 2
        hold = sim.runtime.smtp_hold
        assert hold is not None and "the first 10 different recipients" in hold.reason
        assert not any(sim.store.subscriber_state(e).bouncing for e in group)
    finally:
        sim.close()


def test_a_relay_naming_each_refused_recipient_is_still_held(
        tmp_path: Path, smtp_server: StartServer) -> None:
    """The same refusal with the address in it (Exim's "<a@b> rejected: Administrative
    prohibition") is one answer, not a different one per recipient."""
    everyone = [f"user{n}@domain{n % 4}.example" for n in range(8)]
    server = smtp_server(reject={email: f"550 <{email}> rejected: Administrative prohibition"
                                 for email in everyone})
    sim = sim_with(tmp_path, server.port, everyone)
    try:
        outcomes = sim.tick(utc("2026-03-02 08:00"))
        hold = sim.runtime.smtp_hold
        assert hold is not None and "the first 3 different recipients" in hold.reason
        assert [o.status for o in outcomes] == ["retry"] * 3 + ["deferred"] * 5
        assert not any(sim.store.subscriber_state(e).bouncing for e in everyone)
    finally:
        sim.close()


@pytest.mark.parametrize("reply", ["550 Unrouteable address",
                                   "550 5.1.1 User unknown in local recipient table"])
def test_a_relay_refusing_everyone_with_words_about_addresses_is_held_not_bounced(
        tmp_path: Path, smtp_server: StartServer, reply: str) -> None:
    """Words about the address need ten different recipients, but then they are the
    server's setup: nobody's digest fails and nobody is marked bouncing."""
    everyone = [f"user{n:02d}@domain{n % 6}.example" for n in range(12)]
    server = smtp_server(reject={email: reply for email in everyone})
    sim = sim_with(tmp_path, server.port, everyone)
    try:
        outcomes = sim.tick(utc("2026-03-02 08:00"))
        assert [o.status for o in outcomes] == ["retry"] * 10 + ["deferred"] * 2
        hold = sim.runtime.smtp_hold
        assert hold is not None and "the first 10 different recipients" in hold.reason
        assert not any(sim.store.subscriber_state(e).bouncing for e in everyone)
    finally:
        sim.close()
