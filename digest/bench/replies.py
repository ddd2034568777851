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
import re
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
    # A real rendered digest as the frozen message, so replies are read against its text.
    frozen = corpus_digest().as_bytes()
    sent = []
    for n in range(subscribers):
        email = f"reader{n}@example.org"
        token = new_token()
        row = store.claim_digest(
            subscriber=email, local_date=day, token=token,
            message_id=message_id_for(token, f"digest@{DOMAIN}"), considered=len(papers),
            corpus_seq=store.corpus_seq(), message=frozen,
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


# --- the reply-layout corpus ------------------------------------------------------
#
# ``digest bench replies --corpus`` reads every case of ``tests/replies_corpus``: a
# reply written as a given mail client writes it, in a given language, with the exact
# commands and the exact "not understood" lines expected. Each case goes through the
# same reading as a real reply (``parse_reply(new_text(message, sent_text(digest)))``)
# against a digest rendered by the real templates.

CORPUS_TOKEN = "k7m2q9x4w8r3t6y5"
CORPUS_SENDER = f"Paper Digest <digest@{DOMAIN}>"
CORPUS_REPLY_TO = f"digest+{CORPUS_TOKEN}@{DOMAIN}"
_PLACEHOLDER = re.compile(r"\{\{(\w+)(?::([\w-]+))?\}\}")


@dataclass(frozen=True)
class CorpusCase:
    """One reply layout of the corpus, as read from its file."""

    name: str
    layout: str
    language: str
    body: str  # with placeholders for the digest ({{quote}}, {{digest}}, ...)
    content_type: str  # plain | html | both
    commands: tuple[str, ...]  # exactly these, in this order (see :func:`command_key`)
    not_understood: tuple[str, ...]  # exactly these "not understood" lines
    source: str  # file name


@dataclass(frozen=True)
class CaseResult:
    case: CorpusCase
    commands: tuple[str, ...]
    not_understood: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return (self.commands == self.case.commands
                and self.not_understood == self.case.not_understood)


def corpus_folder() -> Path:
    """``tests/replies_corpus`` of the checkout this package runs from."""
    return Path(__file__).resolve().parents[2] / "tests" / "replies_corpus"


def load_corpus(folder: Path) -> list[CorpusCase]:
    """Every case of every ``*.txt`` file of ``folder``.

    A file holds cases, each starting with ``=== NAME``, then ``key: value``
    lines (layout, language, type, commands, not understood; list values
    separated by `` | ``), a ``---`` line and the body. Raises
    :class:`DigestError` naming the file and case for a malformed one.
    """
    cases: list[CorpusCase] = []
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise DigestError(f"{folder}: no corpus files (*.txt) here")
    for path in files:
        text = path.read_text(encoding="utf-8")
        for chunk in text.split("\n=== ")[1:] if not text.startswith("=== ") else \
                ("\n" + text).split("\n=== ")[1:]:
            name, _, rest = chunk.partition("\n")
            head, sep, body = rest.partition("\n---\n")
            if not sep:
                raise DigestError(f"{path.name}: case {name!r} has no '---' line before its body")
            fields: dict[str, str] = {}
            for line in head.splitlines():
                key, colon, value = line.partition(":")
                if not colon:
                    raise DigestError(f"{path.name}: case {name!r}: {line!r} is not 'key: value'")
                fields[key.strip().lower()] = value.strip()
            unknown = set(fields) - {"layout", "language", "type", "commands", "not understood"}
            if unknown or "layout" not in fields or "language" not in fields:
                raise DigestError(f"{path.name}: case {name!r}: needs layout and language "
                                  f"(unknown keys: {', '.join(sorted(unknown)) or 'none'})")

            def listed(key: str, fields: dict[str, str] = fields) -> tuple[str, ...]:
                return tuple(v.strip() for v in fields.get(key, "").split(" | ") if v.strip())

            cases.append(CorpusCase(
                name=name.strip(), layout=fields["layout"], language=fields["language"],
                body=body.rstrip("\n") + "\n", content_type=fields.get("type", "plain"),
                commands=listed("commands"), not_understood=listed("not understood"),
                source=path.name))
    if not cases:
        raise DigestError(f"{folder}: the corpus files hold no case (each starts with "
                          f"'=== NAME')")
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        raise DigestError("corpus: case names repeat: "
                          + ", ".join(sorted({n for n in names if names.count(n) > 1})))
    return cases


def corpus_digest() -> EmailMessage:
    """The digest every corpus case answers: ten papers, rendered by the real templates."""
    from ..render import DigestContent, DigestItem, render_digest

    topics = ["sparse attention for long documents", "diffusion models that plan robot grasps",
              "a benchmark of multilingual reasoning", "graph neural networks for molecules",
              "retrieval-augmented code generation", "speech tokenisers at low bit rates",
              "vision transformers without positional encodings",
              "reinforcement learning from human preferences at scale",
              "protein structure from single sequences", "tabular foundation models"]
    areas = ["long context", "robotics", "evaluation", "chemistry", "code", "audio", "vision",
             "alignment", "biology", "tables"]
    items = tuple(DigestItem(
        n, Paper(id=f"2603.{n:05d}", title=f"Towards {topic}: a study", arxiv_id=f"2603.{n:05d}",
                 abstract=(f"We study {topic}. Our method improves on strong baselines while "
                           f"using less compute, and we release code and data."),
                 listed_on=date(2026, 3, 12), code_links=(f"https://github.com/lab{n}/repo",)),
        1.0 - n / 20, f"close to papers you liked on {area}", n == 7)
        for n, (topic, area) in enumerate(zip(topics, areas, strict=True), start=1))
    content = DigestContent(subscriber=Subscriber("alice@example.org", "Alice"),
                            token=CORPUS_TOKEN, local_date=date(2026, 3, 12), considered=412,
                            items=items, personalised=True)
    smtp = replace(SmtpConfig(), sender=CORPUS_SENDER, reply_to=f"digest+{{token}}@{DOMAIN}")
    from datetime import UTC, datetime

    return render_digest(content, smtp, now=datetime(2026, 3, 12, 7, 0, tzinfo=UTC))


def corpus_reply(case: CorpusCase, digest: EmailMessage) -> EmailMessage:
    """The reply of ``case`` as a client sends it: placeholders filled from ``digest``."""
    plain = _part_text(digest, "plain")
    html = _part_text(digest, "html")
    body_html = html[html.find(">", html.find("<body")) + 1: html.rfind("</body>")] \
        if "<body" in html else html

    def fill(match: re.Match[str]) -> str:
        kind, arg = match.group(1), match.group(2)
        lines = plain.rstrip("\n").split("\n")
        if arg and "-" in arg and kind in ("quote_lines", "digest_lines"):
            first, _, last = arg.partition("-")
            high = len(lines) if last == "end" else int(last)
            mark = "> " if kind == "quote_lines" else ""
            return "\n".join((mark + line).rstrip() for line in lines[int(first) - 1:high])
        width = int(arg) if arg and arg.isdigit() else 0
        if width:
            lines = _rewrap(lines, width)
        if kind in ("quote", "quote_wrapped"):
            return "\n".join(("> " + line).rstrip() for line in lines)
        if kind == "quote_nbsp":
            return "\n".join(">\xa0" + line for line in lines)
        if kind == "quote_nested":
            return "\n".join(("> > " + line).rstrip() for line in lines)
        if kind in ("digest", "digest_wrapped"):
            return "\n".join(lines)
        if kind == "html_digest":
            return body_html
        if kind == "address":
            return CORPUS_REPLY_TO
        if kind == "token":
            return CORPUS_TOKEN
        raise DigestError(f"corpus case {case.name!r}: unknown placeholder {match.group(0)}")

    body = _PLACEHOLDER.sub(fill, case.body)
    message = EmailMessage()
    message["From"] = "Alice Example <alice@example.org>"
    message["To"] = CORPUS_REPLY_TO
    message["Subject"] = f"Re: {digest['Subject']}"
    message["Message-ID"] = f"<corpus.{case.name}@example.org>"
    message["In-Reply-To"] = str(digest["Message-ID"])
    if case.content_type == "html":
        message.set_content(body, subtype="html")
    else:
        message.set_content(body)
    return message


def _part_text(message: EmailMessage, subtype: str) -> str:
    part = message.get_body(preferencelist=(subtype,))
    return str(part.get_content()) if part is not None else ""


def _rewrap(lines: list[str], width: int) -> list[str]:
    """The digest as a client re-wraps it: paragraphs refilled at ``width`` columns."""
    import textwrap

    out: list[str] = []
    paragraph: list[str] = []
    for line in [*lines, ""]:
        if line.strip():
            paragraph.append(line.strip())
            continue
        if paragraph:
            out += textwrap.wrap(" ".join(paragraph), width) or [""]
            paragraph = []
        out.append("")
    return out[:-1]


def command_key(command: Any) -> str:
    """A command as the corpus writes it: ``like 2 5``, ``skip rest``, ``pause 7``, ..."""
    name: str = command.name
    if name in ("like", "skip", "why"):
        parts = [name, *(str(n) for n in command.items)]
        parts += ["all"] if command.every else []
        parts += ["rest"] if command.rest else []
        return " ".join(parts)
    if name == "pause":
        return f"pause {command.days}" if command.days else "pause"
    if name == "time":
        return f"time {command.value}"
    if name == "size":
        return f"size {command.number}"
    if name.startswith("interest-"):
        return f"{name} {command.value}"
    return name


def run_corpus_case(case: CorpusCase, digest: EmailMessage, sent: Any) -> CaseResult:
    """Read one case's reply exactly as a real reply is read."""
    from ..replies.parse import new_text, parse_reply, subject_of

    message = corpus_reply(case, digest)
    parsed = parse_reply(new_text(message, sent), subject_of(message))
    return CaseResult(case, tuple(command_key(c) for c in parsed.commands),
                      tuple(p.text for p in parsed.problems))


def run_corpus(folder: Path | None = None) -> dict[str, Any]:
    """Every corpus case; how many give exactly the expected commands and no spurious lines."""
    from ..replies.parse import sent_text

    cases = load_corpus(folder or corpus_folder())
    digest = corpus_digest()
    sent = sent_text(digest.as_bytes())
    results = [run_corpus_case(case, digest, sent) for case in cases]
    # Baseline, same run: the same reader without the sent digest (marks and headers only).
    blind = sum(run_corpus_case(case, digest, None).ok for case in cases)
    exact = sum(r.commands == r.case.commands for r in results)
    clean = sum(r.not_understood == r.case.not_understood for r in results)
    ok = sum(r.ok for r in results)
    languages = sorted({r.case.language for r in results})
    failures = [{"case": r.case.name, "file": r.case.source,
                 "expected": list(r.case.commands), "got": list(r.commands),
                 "expected_not_understood": list(r.case.not_understood),
                 "got_not_understood": list(r.not_understood)} for r in results if not r.ok]
    lines = [(f"{'cases':>6}{'exact commands':>16}{'no spurious lines':>19}{'both':>7}"
              f"{'languages':>11}{'both, digest unknown':>22}"),
             f"{len(results):>6}{exact:>16}{clean:>19}{ok:>7}{len(languages):>11}{blind:>22}",
             "languages: " + " ".join(languages),
             "(both, digest unknown: the same reader without the sent digest's lines)"]
    lines += [f"  FAILED {f['case']} ({f['file']}): commands {f['got']} (expected "
              f"{f['expected']}), not understood {f['got_not_understood']} (expected "
              f"{f['expected_not_understood']})" for f in failures]
    return {"bench": "replies-corpus", "cases": len(results), "exact_commands": exact,
            "no_spurious_lines": clean, "ok": ok, "ok_digest_unknown": blind,
            "languages": languages,
            "failures": failures, "table": "\n".join(lines)}
