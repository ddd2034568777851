"""``digest bench replies``: how fast waiting replies are processed.

Starts a private Dovecot on a loopback port (or, where Dovecot is not
installed, uses a Maildir folder), sends digests to N subscribers into a fresh
store, puts ``--count`` replies into the mailbox (each a real reply: a token
address, a Gmail-style quote, a few commands), and times ``process_replies``
over them, confirmations included (to an embedded SMTP sink). Prints a table
and one JSON line. The target is 1,000 replies in under 30 s.

:class:`Dovecot` is also what the tests start (``tests/dovecot_helpers.py``),
so the benchmark and the tests talk to the same kind of server.
"""

from __future__ import annotations

import asyncio
import getpass
import grp
import os
import pwd
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import date, timedelta
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any, Self

from ..config import Config, ImapConfig, MaildirConfig, SmtpConfig, Subscriber
from ..errors import DigestError
from ..mailer import LocalSink, free_port
from ..paper import Paper
from ..render import message_id_for, new_token
from ..store import ItemRow, Store, utc_now

DOVECOT_USER = "digest"
DOVECOT_PASSWORD = "bench-secret"
START_TIMEOUT = 15.0  # seconds for Dovecot to listen


class DovecotUnavailable(DigestError):
    """Dovecot is not installed here (or will not start)."""


def dovecot_binary() -> str | None:
    """The dovecot executable, or None where it is not installed."""
    return shutil.which("dovecot") or next(
        (p for p in ("/usr/sbin/dovecot", "/usr/local/sbin/dovecot") if os.access(p, os.X_OK)),
        None)


@dataclass
class Dovecot:
    """A private Dovecot: config, maildirs, sockets and logs all under ``folder``.

    Runs as the current user on 127.0.0.1; one test user ``digest`` with a
    static password. ``tls=True`` adds an implicit-TLS port with a self-signed
    certificate (and offers STARTTLS on the plain port).
    """

    folder: Path
    tls: bool = False
    port: int = 0
    tls_port: int = 0
    user: str = DOVECOT_USER
    password: str = DOVECOT_PASSWORD
    _process: subprocess.Popen[bytes] | None = None
    _run_dir: Path | None = None

    @property
    def log_file(self) -> Path:
        return self.folder / "dovecot.log"

    @property
    def maildir(self) -> Path:
        """The test user's INBOX, a Maildir (exists while the server runs)."""
        if self._run_dir is None:
            raise RuntimeError("dovecot is not running")
        return self._run_dir / "home" / self.user / "Maildir"

    def imap_config(self, **overrides: Any) -> ImapConfig:
        settings: dict[str, Any] = {
            "host": "127.0.0.1", "port": self.port, "security": "none", "username": self.user,
            "password_env": None, "mailbox": "INBOX", "poll_seconds": 5.0, "timeout": 10.0,
            "verify_tls": False,
        }
        settings.update(overrides)
        return ImapConfig(**settings)

    def start(self) -> None:
        binary = dovecot_binary()
        if binary is None:
            raise DovecotUnavailable("dovecot is not installed (apt-get install dovecot-imapd)")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        if self.tls:
            self.tls_port = free_port()
        conf = self._write_config()
        self._process = subprocess.Popen([binary, "-F", "-c", str(conf)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                _, err = self._process.communicate()
                raise DovecotUnavailable(f"dovecot exited at start: "
                                         f"{err.decode(errors='replace').strip()[-500:]} "
                                         f"{self._log_tail()}")
            if _greets(self.port) and (not self.tls or _listening(self.tls_port)):
                return
            time.sleep(0.05)
        self.stop()
        raise DovecotUnavailable(f"dovecot did not listen within {START_TIMEOUT:.0f} s "
                                 f"{self._log_tail()}")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        if process.stderr is not None:
            process.stderr.close()
        if self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)
            self._run_dir = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _log_tail(self) -> str:
        try:
            return "(log: " + self.log_file.read_text(errors="replace")[-800:] + ")"
        except OSError:
            return ""

    def _write_config(self) -> Path:
        folder = self.folder
        (folder / "state").mkdir(exist_ok=True)
        # Sockets live in a short, world-traversable folder of their own: a unix
        # socket path has at most 108 bytes, and under root the login and auth
        # processes run as Dovecot's unprivileged users, who must reach them.
        self._run_dir = Path(tempfile.mkdtemp(prefix="digest-dovecot-"))
        self._run_dir.chmod(0o755)
        run = self._run_dir
        user, login_user = getpass.getuser(), getpass.getuser()
        group = grp.getgrgid(os.getgid()).gr_name
        uid, gid = os.getuid(), os.getgid()
        home = run / "home"
        home.mkdir()
        if os.getuid() == 0:  # Dovecot runs no login, auth or mail process as root
            user = _first_user("dovecot", "nobody")
            login_user = _first_user("dovenull", "nobody")
            uid, gid = pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid
            group = grp.getgrgid(gid).gr_name
            os.chown(home, uid, gid)
        passwd = run / "passwd"
        passwd.write_text(f"{self.user}:{{PLAIN}}{self.password}:::::\n", encoding="utf-8")
        passwd.chmod(0o644)
        ssl_lines = "ssl = no"
        tls_listener = "  inet_listener imaps {\n    port = 0\n  }"
        if self.tls:
            cert, key = self_signed_cert(folder)
            ssl_lines = f"ssl = yes\nssl_cert = <{cert}\nssl_key = <{key}"
            tls_listener = (f"  inet_listener imaps {{\n    address = 127.0.0.1\n"
                            f"    port = {self.tls_port}\n    ssl = yes\n  }}")
        conf = folder / "dovecot.conf"
        conf.write_text(f"""\
# A private Dovecot for paper-digest's tests and benchmark.
protocols = imap
listen = 127.0.0.1
base_dir = {run}
state_dir = {folder}/state
instance_name = digest-{self.port}
log_path = {folder}/dovecot.log
info_log_path = {folder}/dovecot.log
default_internal_user = {user}
default_internal_group = {group}
default_login_user = {login_user}
first_valid_uid = {uid}
first_valid_gid = {gid}
{ssl_lines}
disable_plaintext_auth = no
auth_mechanisms = plain login
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {passwd}
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={home}/%u
}}
mail_location = maildir:~/Maildir
mail_fsync = never
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.port}
  }}
{tls_listener}
  chroot =
}}
service anvil {{
  chroot =
}}
service stats {{
  unix_listener stats-reader {{
    user = {user}
  }}
  unix_listener stats-writer {{
    user = {user}
  }}
}}
protocol imap {{
  mail_max_userip_connections = 100
}}
""", encoding="utf-8")
        return conf


def self_signed_cert(folder: Path) -> tuple[Path, Path]:
    """A certificate and key for 127.0.0.1/localhost, made with the openssl command line."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    if cert.exists() and key.exists():
        return cert, key
    openssl = shutil.which("openssl")
    if openssl is None:
        raise DovecotUnavailable("the openssl command line is not installed (for the TLS cert)")
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


def _first_user(*names: str) -> str:
    for name in names:
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise DovecotUnavailable(f"none of the users {', '.join(names)} exists to run Dovecot as")


def _greets(port: int) -> bool:
    """True when an IMAP server on the port sends its greeting (not just accepts)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            return conn.recv(64).startswith(b"* OK")
    except OSError:
        return False


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.2)
        return probe.connect_ex(("127.0.0.1", port)) == 0


# --- the benchmark --------------------------------------------------------------

DOMAIN = "papers.example.org"
ITEMS_PER_DIGEST = 10


def seed_digests(store: Store, subscribers: int, *, day: date | None = None) -> list[tuple[str, str]]:
    """Papers and one sent digest (10 frozen items) per subscriber; returns (email, token)."""
    day = day or utc_now().date()
    papers = [Paper(id=f"2601.{i:05d}", title=f"Bench paper {i} on topic {i % 37}",
                    abstract=f"A study of topic {i % 37} with method {i % 11} and data {i % 5}.",
                    arxiv_id=f"2601.{i:05d}", listed_on=day, code_links=(), upvotes=i % 50,
                    listing_rank=i)
              for i in range(ITEMS_PER_DIGEST * 3)]
    store.add_dump(f"bench-{day}", "bench", "bench", papers)
    sent = []
    for n in range(subscribers):
        email = f"reader{n}@example.org"
        token = new_token()
        row = store.claim_digest(
            subscriber=email, local_date=day, token=token,
            message_id=message_id_for(token, f"digest@{DOMAIN}"), considered=len(papers),
            corpus_seq=store.corpus_seq(), message=b"(bench)",
            items=[ItemRow(i + 1, papers[(n + i) % len(papers)].id, 1.0 - i / 10, "bench", False)
                   for i in range(ITEMS_PER_DIGEST)])
        assert row is not None  # a fresh store has no digest for the day
        store.mark_sent(row.id)
        sent.append((email, token))
    return sent


def bench_reply(email: str, token: str, n: int) -> bytes:
    """A Gmail-style reply with a few commands above the quoted digest."""
    message = EmailMessage()
    message["From"] = f"Reader <{email}>"
    message["To"] = f"digest+{token}@{DOMAIN}"
    message["Subject"] = "Re: Paper digest"
    message["Date"] = format_datetime(utc_now())
    message["Message-ID"] = make_msgid(f"bench{n}", domain="example.org")
    message["In-Reply-To"] = message_id_for(token, f"digest@{DOMAIN}")
    a, b = n % ITEMS_PER_DIGEST + 1, (n + 3) % ITEMS_PER_DIGEST + 1
    message.set_content(
        f"like {a}, {b}\nskip {(n + 5) % ITEMS_PER_DIGEST + 1}\n\nThanks!\n\n"
        f"On Mon, 12 Jan 2026 at 08:00, Paper Digest <digest+{token}@{DOMAIN}> wrote:\n"
        + "".join(f"> {i}. Bench paper {i} on a topic\n>    Why: bench\n" for i in range(1, 11)))
    return message.as_bytes()


def run_replies_bench(*, count: int = 1000, runs: int = 1, backend: str = "auto",
                      subscribers: int = 200) -> dict[str, Any]:
    """Time ``process_replies`` over ``count`` waiting replies; medians of ``runs``."""
    from ..replies import process_replies
    from ..replies.mailboxes import ImapMailbox, MaildirMailbox

    if backend == "auto":
        backend = "imap" if dovecot_binary() else "maildir"
    timings: list[dict[str, float]] = []
    last: Any = None
    for _ in range(max(1, runs)):
        with tempfile.TemporaryDirectory(prefix="digest-bench-replies-") as tmp:
            folder = Path(tmp)
            server = Dovecot(folder / "dovecot") if backend == "imap" else None
            sink = LocalSink(folder / "outbox")
            if server is not None:
                server.start()
            sink.start()
            try:
                config = Config(path=folder / "bench.toml", inbox=folder / "inbox",
                                state=folder / "state.sqlite3",
                                smtp=replace(SmtpConfig(), sender=f"Paper Digest <digest@{DOMAIN}>",
                                             reply_to=f"digest+{{token}}@{DOMAIN}"),
                                subscribers=tuple(Subscriber(f"reader{n}@example.org", f"Reader {n}")
                                                  for n in range(subscribers)))
                if server is not None:
                    os.environ["DIGEST_BENCH_IMAP_PASSWORD"] = server.password
                    config = replace(config, imap=server.imap_config(
                        password_env="DIGEST_BENCH_IMAP_PASSWORD", confirmations_per_hour=1000))
                else:
                    config = replace(config, maildir=MaildirConfig(
                        folder / "replies", confirmations_per_hour=1000))
                config = replace(config, smtp=replace(sink.smtp_config(), attempts=2,
                                                      retry_seconds=0.1))
                with Store(config.state) as store:
                    sent = seed_digests(store, subscribers, day=utc_now().date() - timedelta(1))
                    started = time.perf_counter()
                    mailbox = (ImapMailbox(config.imap) if config.imap is not None
                               else MaildirMailbox(config.maildir))  # type: ignore[arg-type]
                    with mailbox:
                        for n in range(count):
                            email, token = sent[n % len(sent)]
                            mailbox.append(bench_reply(email, token, n))
                    delivered = time.perf_counter() - started
                    report = asyncio.run(process_replies(config, store))
                    outcomes = store.reply_outcomes()
            finally:
                sink.stop()
                if server is not None:
                    server.stop()
        if report.processed != count or report.errors:
            raise DigestError(f"bench replies: processed {report.processed} of {count} "
                              f"({report.errors} errors): {outcomes}")
        timings.append({"deliver_s": delivered, "process_s": report.seconds})
        last = report
    process_s = statistics.median(t["process_s"] for t in timings)
    deliver_s = statistics.median(t["deliver_s"] for t in timings)
    result: dict[str, Any] = {
        "bench": "replies",
        "backend": backend,
        "replies": count,
        "subscribers": subscribers,
        "runs": len(timings),
        "process_s": round(process_s, 3),
        "replies_per_s": round(count / process_s, 1) if process_s else None,
        "deliver_s": round(deliver_s, 3),
        "applied": last.applied,
        "commands": last.commands,
        "confirmations_sent": last.confirmations_sent,
        "target_s": 30,
        "ok": process_s < 30,
    }
    result["table"] = "\n".join([
        (f"{'replies':<10}{'backend':<10}{'process s':>11}{'replies/s':>11}{'deliver s':>11}"
         f"{'applied':>9}{'confirmed':>11}"),
        (f"{count:<10}{backend:<10}{process_s:>11.2f}{result['replies_per_s']:>11.1f}"
         f"{deliver_s:>11.2f}{last.applied:>9}{last.confirmations_sent:>11}"),
        (f"target: {count} replies in under 30 s: {'OK' if result['ok'] else 'TOO SLOW'}"
         f" (median of {len(timings)} run{'s' if len(timings) != 1 else ''})"),
    ])
    return result
