"""Fault area ``smtp``: mail servers that refuse, fail AUTH or TLS, hang or drop.

Each case runs the daemon's own ``dispatch`` (in this process, a real SQLite
file, the real ``Mailer``) against a real server on loopback that answers
4xx or 5xx at MAIL, RCPT or DATA, refuses the login, greets with 554, says
nothing, drops the connection, or presents a self-signed certificate. What
each answer must do is the contract of ``digest.mailer`` and
``digest.daemon.jobs``:

- 5xx at RCPT: that digest failed, the address bouncing, the others sent;
- 5xx after DATA (552, 554): that digest failed as a message problem, the
  address not bouncing;
- 4xx: the digest stays claimed and goes out on a later dispatch;
- AUTH refused, 554 greeting, sender refused, bad certificate: a
  configuration error naming the fix, nobody sent, and the next dispatch
  held back without touching the server;
- silence or drops: one timeout per dispatch, the rest deferred, all sent
  once the server is back.

Counts: an exception out of ``dispatch`` or an outcome of the wrong kind is a
crash; a digest neither sent, claimed for later nor failed on record is data
lost; a subscriber with two copies is a duplicate; an error message without
the server and the fix it needs is unclear.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from ..config import SmtpConfig, load_config
from ..daemon.jobs import Outcome, Runtime, dispatch
from ..errors import SendError
from ..ingest import scan_inbox
from ..mailer import session_problem
from ..store import Store
from .faults import AreaResult
from .replies import DovecotUnavailable, self_signed_cert
from .smtp_servers import Behaviour, RawServer, RecordingServer, campaign_state, reader

log = logging.getLogger(__name__)


class _Case:
    """One case's state: a store with N due subscribers, pointed at a server."""

    def __init__(self, folder: Path, port: int, subscribers: int, smtp_extra: str = "") -> None:
        folder.mkdir(parents=True)
        config = load_config(campaign_state(folder, port=port, subscribers=subscribers,
                                            smtp_extra=smtp_extra))
        self.store = Store(config.state)
        scan_inbox(self.store, config.inbox, stable_seconds=0)
        self.runtime = Runtime(config, self.store)
        self.subscribers = subscribers

    def dispatch(self) -> Sequence[Outcome]:
        return asyncio.run(dispatch(self.runtime, force=True))

    def point_at(self, port: int, **changes: object) -> None:
        smtp = dataclasses.replace(self.runtime.config.smtp, port=port, **changes)  # type: ignore[arg-type]
        self.runtime.config = dataclasses.replace(self.runtime.config, smtp=smtp)

    def statuses(self) -> dict[str, str]:
        """Each reader's digest status ("" when there is none)."""
        found = {}
        for n in range(self.subscribers):
            rows = self.store.digests_of(reader(n), limit=1)
            found[reader(n)] = rows[0].status if rows else ""
        return found

    def close(self) -> None:
        self.store.close()


class _Tally:
    def __init__(self, result: AreaResult) -> None:
        self.result = result

    def crash(self, case: str, what: str) -> None:
        self.result.crashes += 1
        self.result.notes.append(f"{case}: {what}")

    def lost(self, case: str, count: int) -> None:
        if count:
            self.result.data_lost += count
            self.result.notes.append(f"{case}: {count} digests neither sent nor pending")

    def unclear(self, case: str, text: str, *needles: str) -> None:
        missing = [n for n in needles if n.lower() not in text.lower()]
        if missing or "Traceback" in text:
            self.result.unclear_errors += 1
            self.result.notes.append(f"{case}: error lacks {missing}: {text[:160]!r}")

    def duplicates(self, server: RecordingServer) -> None:
        per_reader: dict[str, int] = {}
        for received in server.received:
            per_reader[received.recipient] = per_reader.get(received.recipient, 0) + 1
        self.result.duplicates += sum(n - 1 for n in per_reader.values() if n > 1)


def run(workdir: Path, quick: bool) -> AreaResult:
    result = AreaResult("smtp")
    tally = _Tally(result)
    cases: list[Callable[[Path, _Tally], None]] = [
        _rcpt_5xx, _data_5xx, _temporary_4xx, _auth_refused, _sender_refused, _greeting_554,
        _hanging, _dropping, _port_mismatch, _self_signed]
    for case in cases:
        name = case.__name__.strip("_").replace("_", "-")
        result.cases += 1
        try:
            case(workdir / name, tally)
        except Exception as exc:  # the campaign counts it rather than stopping
            log.exception("smtp faults: case %s raised", name)
            tally.crash(name, f"{type(exc).__name__}: {exc}")
    return result


def _rcpt_5xx(folder: Path, tally: _Tally) -> None:
    server = RecordingServer(Behaviour(rcpt_reply={reader(1): "550 5.1.1 No such user"}))
    case = _Case(folder, server.port, 3)
    try:
        outcomes = {o.subscriber: o for o in case.dispatch()}
        bad = outcomes.get(reader(1))
        if bad is None or bad.status != "failed":
            tally.crash("rcpt-5xx", f"the refused address got {bad}")
        else:
            tally.unclear("rcpt-5xx", bad.detail, reader(1), "550")
        if not case.store.subscriber_state(reader(1)).bouncing:
            tally.crash("rcpt-5xx", "the refused address is not marked bouncing")
        statuses = case.statuses()
        tally.lost("rcpt-5xx", sum(1 for n in (0, 2) if statuses[reader(n)] != "sent"))
        tally.duplicates(server)
    finally:
        case.close()
        server.stop()


def _data_5xx(folder: Path, tally: _Tally) -> None:
    for code in ("552 5.3.4 Message too big", "554 5.6.0 Message rejected as spam"):
        server = RecordingServer(Behaviour(data_reply=code))
        case = _Case(folder / code[:3], server.port, 2)
        try:
            outcomes = case.dispatch()
            if [o.status for o in outcomes] != ["failed", "failed"]:
                tally.crash("data-5xx", f"{code[:3]}: outcomes {[o.status for o in outcomes]}")
            for outcome in outcomes:
                tally.unclear("data-5xx", outcome.detail, "rejected the message", code[:3])
            if any(case.store.subscriber_state(reader(n)).bouncing for n in range(2)):
                tally.crash("data-5xx", f"{code[:3]} after DATA marked an address bouncing")
            tally.lost("data-5xx", sum(1 for s in case.statuses().values() if s != "failed"))
        finally:
            case.close()
            server.stop()


def _temporary_4xx(folder: Path, tally: _Tally) -> None:
    server = RecordingServer(Behaviour(data_reply="451 4.3.0 Try again later"))
    case = _Case(folder, server.port, 2)
    try:
        outcomes = case.dispatch()
        if [o.status for o in outcomes] != ["retry", "retry"]:
            tally.crash("temporary-4xx", f"outcomes {[o.status for o in outcomes]}")
        server.behaviour.data_reply = None
        case.dispatch()
        tally.lost("temporary-4xx", sum(1 for s in case.statuses().values() if s != "sent"))
        tally.duplicates(server)
    finally:
        case.close()
        server.stop()


def _auth_refused(folder: Path, tally: _Tally) -> None:
    import os

    server = RecordingServer(login=("digest", "right"))
    os.environ["DIGEST_FAULTS_PASSWORD"] = "wrong"
    case = _Case(folder, server.port, 3,
                 'username = "digest"\npassword_env = "DIGEST_FAULTS_PASSWORD"')
    try:
        first = case.dispatch()
        texts = [o.detail for o in first if o.status in ("retry", "deferred")]
        if len(texts) != 3:
            tally.crash("auth-refused", f"outcomes {[o.status for o in first]}")
        for text in texts[:1]:
            tally.unclear("auth-refused", text, "535", "app password", "127.0.0.1")
        held = case.dispatch()
        if [o.status for o in held] != ["held"]:
            tally.crash("auth-refused", f"the next dispatch was not held: {held}")
        os.environ["DIGEST_FAULTS_PASSWORD"] = "right"
        case.runtime.smtp_hold = None  # what a reload does
        case.dispatch()
        tally.lost("auth-refused", sum(1 for s in case.statuses().values() if s != "sent"))
        tally.duplicates(server)
    finally:
        os.environ.pop("DIGEST_FAULTS_PASSWORD", None)
        case.close()
        server.stop()


def _sender_refused(folder: Path, tally: _Tally) -> None:
    server = RecordingServer(Behaviour(mail_reply="550 5.7.1 Sender not allowed"))
    case = _Case(folder, server.port, 2)
    try:
        outcomes = case.dispatch()
        if not outcomes or outcomes[0].status != "retry":
            tally.crash("sender-refused", f"outcomes {[o.status for o in outcomes]}")
        else:
            tally.unclear("sender-refused", outcomes[0].detail, "from", "550")
        if case.runtime.smtp_hold is None:
            tally.crash("sender-refused", "sending was not held")
        if any(case.store.subscriber_state(reader(n)).bouncing for n in range(2)):
            tally.crash("sender-refused", "a refused sender marked a reader bouncing")
        server.behaviour.mail_reply = None
        case.runtime.smtp_hold = None
        case.dispatch()
        tally.lost("sender-refused", sum(1 for s in case.statuses().values() if s != "sent"))
    finally:
        case.close()
        server.stop()


def _raw_case(folder: Path, tally: _Tally, mode: str, name: str, *needles: str,
              kind: str) -> None:
    """A server that misbehaves at the session level; then a good one: all sent, once."""
    raw = RawServer(mode)
    case = _Case(folder, raw.port, 4, "timeout = 1")
    good = RecordingServer()
    try:
        outcomes = case.dispatch()
        statuses = [o.status for o in outcomes]
        if statuses != ["retry", "deferred", "deferred", "deferred"]:
            tally.crash(name, f"outcomes {statuses}")
        elif outcomes:
            tally.unclear(name, outcomes[0].detail, "127.0.0.1", *needles)
        if raw.connections > 2:
            tally.crash(name, f"{raw.connections} connections in one dispatch (one timeout each)")
        if (case.runtime.smtp_hold is not None) != (kind == "config"):
            tally.crash(name, f"hold {case.runtime.smtp_hold} for a {kind} problem")
        case.runtime.smtp_hold = None
        case.point_at(good.port)
        case.dispatch()
        tally.lost(name, sum(1 for s in case.statuses().values() if s != "sent"))
        tally.duplicates(good)
    finally:
        case.close()
        raw.stop()
        good.stop()


def _greeting_554(folder: Path, tally: _Tally) -> None:
    _raw_case(folder, tally, "greet-554", "greeting-554", "554", "host and port", kind="config")


def _hanging(folder: Path, tally: _Tally) -> None:
    _raw_case(folder, tally, "hang", "hanging", "next dispatch", kind="server")


def _dropping(folder: Path, tally: _Tally) -> None:
    _raw_case(folder, tally, "drop-after-ehlo", "dropping", "next dispatch", kind="server")


def _port_mismatch(folder: Path, tally: _Tally) -> None:
    """465 with starttls, 587 with tls: the error says which ``security`` the port means."""
    for port, security, needle in ((465, "starttls", 'port 465 usually means security = "tls"'),
                                   (587, "tls", 'port 587 usually means security = "starttls"')):
        smtp = SmtpConfig(host="mail.example.org", port=port, security=security)
        kind, text = session_problem(smtp, TimeoutError("timed out"))
        if kind != "config":
            tally.crash("port-mismatch", f"{port}/{security} is a {kind} problem")
        tally.unclear("port-mismatch", text, needle)


def _self_signed(folder: Path, tally: _Tally) -> None:
    folder.mkdir(parents=True)
    try:
        cert, key = self_signed_cert(folder)
    except DovecotUnavailable as exc:  # no openssl command: say so, count nothing
        tally.result.notes.append(f"self-signed: skipped ({exc})")
        return
    server = RecordingServer(starttls=(cert, key))
    case = _Case(folder / "state", server.port, 2, 'security = "starttls"')
    try:
        outcomes = case.dispatch()
        if not outcomes or outcomes[0].status != "retry":
            tally.crash("self-signed", f"outcomes {[o.status for o in outcomes]}")
        else:
            tally.unclear("self-signed", outcomes[0].detail, "ca_file", "verify_tls")
        case.runtime.smtp_hold = None
        case.point_at(server.port, ca_file=cert)
        case.dispatch()
        tally.lost("self-signed", sum(1 for s in case.statuses().values() if s != "sent"))
        tally.duplicates(server)
    except SendError as exc:
        tally.crash("self-signed", f"SendError escaped: {exc}")
    finally:
        case.close()
        server.stop()
