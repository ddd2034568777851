"""Fault campaign, area ``config``: hostile configs through ``check-config`` and ``send --dry-run``.

Each case is a config file (or a folder, or bytes that are not TOML) in its
own folder, beside a state holding papers (``seed_state``), so that
``send --dry-run --force`` really ranks and renders a digest. Both commands run
as real subprocesses (``python -m digest``), as a user would run them. A case
goes wrong when:

- a command prints a traceback or exits with anything but 0 or 1 (a crash);
- ``check-config`` accepts a value the case calls hostile, or rejects a
  valid one (a crash: an exit the case did not expect);
- ``check-config`` accepts the config and ``send --dry-run`` then fails (a
  crash: what check-config accepts must work);
- a failure is not exactly one line ``Error: FILE...`` naming the config file
  and the key (or line) the case is about (an unclear error).

A missing password fails ``check-config`` but not ``send --dry-run``, which
contacts no server (see ``Config.check_secrets``).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from ..config import MAX_CONFIG_BYTES
from ..paper import Paper
from ..store import Store
from .faults import AreaResult

# A valid config; each case adds or changes one thing. Relative paths resolve in the case's folder.
BASE: dict[str, list[str]] = {
    "digest": ['inbox = "inbox"', 'state = "state/digest.sqlite3"'],
    "smtp": ['host = "smtp.example.org"', 'from = "Paper Digest <digest@example.org>"',
             'reply_to = "digest+{token}@example.org"'],
    "subscribers": ['email = "alice@example.org"', 'name = "Alice"'],
}
UNSET_VARIABLE = "DIGEST_FAULTS_UNSET_PASSWORD"  # removed from the commands' environment
COMMAND_TIMEOUT = 300.0  # seconds; a command that takes longer is counted as a crash (a hang)


@dataclass(frozen=True)
class Case:
    """One hostile (or valid) config.

    ``names``: the text the error line must hold after the file name (the key
    path, or ``:LINE:`` for a file-level error); None means the config is
    valid and both commands must succeed. ``secret``: the error is a missing
    password, so only check-config fails. ``setup`` prepares the case's folder
    (a password file, a folder in place of the config) and returns the path
    given to ``--config``.
    """

    name: str
    body: str | bytes
    names: str | None
    secret: bool = False
    setup: Callable[[Path], Path] | None = None


def config_text(extra: dict[str, list[str]] | None = None, *,
                drop: tuple[str, ...] = (), tables: tuple[str, ...] = ()) -> str:
    """The valid BASE with ``extra`` lines added to its tables (and ``drop``ped BASE keys removed)."""
    extra = extra or {}
    lines: list[str] = []
    for table in dict.fromkeys([*BASE, *extra]):
        header = "[[subscribers]]" if table == "subscribers" else f"[{table}]"
        lines.append(header)
        lines.extend(line for line in BASE.get(table, []) if line.split("=")[0].strip() not in drop)
        lines.extend(extra.get(table, []))
        lines.append("")
    return "\n".join([*tables, *lines])


def _line(table: str, line: str, names: str | None) -> Case:
    """A case adding ``line`` to ``table``; the error must name ``names`` (None: valid)."""
    key = line.split("=")[0].strip()
    return Case(f"{table}: {line}", config_text({table: [line]}, drop=(key,)), names)


def _folder_as_config(folder: Path) -> Path:
    path = folder / "digest.toml"
    path.unlink()
    path.mkdir()
    return path


def _with_file(name: str, content: bytes | None) -> Callable[[Path], Path]:
    """Setup: a file (or, with content None, a folder) named ``name`` beside the config."""
    def setup(folder: Path) -> Path:
        if content is None:
            (folder / name).mkdir(parents=True)
        else:
            (folder / name).write_bytes(content)
        return folder / "digest.toml"
    return setup


def cases() -> list[Case]:
    """The campaign: every numeric key's type, finiteness and range; strings, paths, addresses."""
    d, s, sub = "digest", "smtp", "subscribers"
    deep = 5000
    return [
        # Valid configs, some of them unusual: both commands must succeed.
        Case("the base config", config_text(), None),
        Case("a BOM before the TOML", b"\xef\xbb\xbf" + config_text().encode(), None),
        _line(sub, 'email = "jos\u00e9@example.org"', None),
        _line(sub, 'email = "alice@b\u00fccher.example"', None),
        _line(sub, 'email = "\u7528\u6237@\u4f8b\u5b50.\u5e7f\u544a"', None),
        _line(sub, "send_at = 07:30:00", None),
        _line(sub, 'days = ["Monday", "fri"]', None),
        Case("sink, no host, no password", config_text(
            {s: ['sink = "outbox"', 'username = "u"', f'password_env = "{UNSET_VARIABLE}"']},
            drop=("host",)), None),
        # [digest]: numbers.
        _line(d, "scan_seconds = inf", "digest.scan_seconds"),
        _line(d, "scan_seconds = nan", "digest.scan_seconds"),
        _line(d, "scan_seconds = -5", "digest.scan_seconds"),
        _line(d, "scan_seconds = true", "digest.scan_seconds"),
        _line(d, "scan_seconds = 1e-300", "digest.scan_seconds"),
        _line(d, "dispatch_seconds = 1e300", "digest.dispatch_seconds"),
        _line(d, "dispatch_seconds = 0", "digest.dispatch_seconds"),
        _line(d, 'dispatch_seconds = "60"', "digest.dispatch_seconds"),
        _line(d, "max_late_hours = 1e300", "digest.max_late_hours"),
        _line(d, "max_late_hours = -inf", "digest.max_late_hours"),
        _line(d, "max_late_hours = 99999999999999999999", "digest.max_late_hours"),
        _line(d, "stable_seconds = -1", "digest.stable_seconds"),
        _line(d, "stable_seconds = nan", "digest.stable_seconds"),
        # [digest]: paths.
        _line(d, 'inbox = "in\\u0000box"', "digest.inbox"),
        _line(d, 'state = "st\\u0000ate.sqlite3"', "digest.state"),
        _line(d, 'state = "state\\n.sqlite3"', "digest.state"),
        _line(d, 'state = ""', "digest.state"),
        _line(d, "state = 5", "digest.state"),
        _line(d, 'inbox = ["a"]', "digest.inbox"),
        Case("state inside the inbox", config_text(
            {d: ['state = "inbox/digest.sqlite3"']}, drop=("state",)), "digest.state"),
        Case("state is a folder", config_text(), "digest.state",
             setup=_with_file("state/digest.sqlite3", None)),
        Case("state under a file", config_text(), "digest.state",
             setup=_with_file("state", b"not a folder")),
        # [smtp]: numbers.
        _line(s, "port = 0.5", "smtp.port"),
        _line(s, "port = 70000", "smtp.port"),
        _line(s, "port = -25", "smtp.port"),
        _line(s, "port = true", "smtp.port"),
        _line(s, "attempts = 0.5", "smtp.attempts"),
        _line(s, "attempts = 0", "smtp.attempts"),
        _line(s, "attempts = 1000000", "smtp.attempts"),
        _line(s, "timeout = nan", "smtp.timeout"),
        _line(s, "timeout = 0", "smtp.timeout"),
        _line(s, "retry_seconds = -1", "smtp.retry_seconds"),
        _line(s, "retry_seconds = inf", "smtp.retry_seconds"),
        _line(s, 'verify_tls = "yes"', "smtp.verify_tls"),
        _line(s, 'security = "ssl"', "smtp.security"),
        # [smtp]: header strings and addresses.
        Case("from: two addresses", config_text(
            {s: ['from = "a@example.org, b@example.org"']}, drop=("from",)), "smtp.from"),
        Case("from: a header injected", config_text(
            {s: ['from = "D <d@example.org>\\r\\nBcc: x@evil.example"']}, drop=("from",)),
            "smtp.from"),
        Case("from: non-ASCII address", config_text(
            {s: ['from = "D <d@ex\u00e4mple.org>"']}, drop=("from",)), "smtp.from"),
        Case("from: no address", config_text({s: ['from = "Paper Digest"']}, drop=("from",)),
             "smtp.from"),
        Case("reply_to: no token", config_text(
            {s: ['reply_to = "digest@example.org"']}, drop=("reply_to",)), "smtp.reply_to"),
        Case("reply_to: a line break", config_text(
            {s: ['reply_to = "d+{token}@example.org\\nBcc: x@y.org"']}, drop=("reply_to",)),
            "smtp.reply_to"),
        Case("reply_to: two addresses", config_text(
            {s: ['reply_to = "d+{token}@a.org, e@b.org"']}, drop=("reply_to",)),
            "smtp.reply_to"),
        Case("host: a line break", config_text(
            {s: ['host = "smtp.example.org\\r\\nX: y"']}, drop=("host",)), "smtp.host"),
        _line(s, 'sink = "out\\u0000box"', "smtp.sink"),
        _line(s, 'username = "digest"', "smtp.username"),
        _line(s, 'password_env = "BAD NAME="', "smtp.password_env"),
        # [smtp]: secrets (check-config fails; send --dry-run needs none).
        Case("password_env unset", config_text(
            {s: ['username = "digest"', f'password_env = "{UNSET_VARIABLE}"']}),
            f"smtp.password_env: environment variable {UNSET_VARIABLE}", secret=True),
        Case("password_file missing", config_text(
            {s: ['username = "digest"', 'password_file = "no-such-file"']}),
            "smtp.password_file: cannot read", secret=True),
        Case("password_file empty", config_text(
            {s: ['username = "digest"', 'password_file = "pw"']}),
            "smtp.password_file", secret=True, setup=_with_file("pw", b"\n")),
        Case("password_file a folder", config_text(
            {s: ['username = "digest"', 'password_file = "pw"']}),
            "smtp.password_file", secret=True, setup=_with_file("pw", None)),
        Case("password_file not UTF-8", config_text(
            {s: ['username = "digest"', 'password_file = "pw"']}),
            "smtp.password_file", secret=True, setup=_with_file("pw", b"\xff\xfe\x00")),
        # [ranking]
        _line("ranking", "unrated_weight = 1.5", "ranking.unrated_weight"),
        _line("ranking", "explore_fraction = nan", "ranking.explore_fraction"),
        _line("ranking", "explore_fraction = -0.1", "ranking.explore_fraction"),
        # [[subscribers]]: addresses and header strings.
        Case("email: two addresses", config_text(
            {sub: ['email = "alice@example.org, bob@example.org"']}, drop=("email",)),
            "subscribers[0].email"),
        Case("email: a header injected", config_text(
            {sub: ['email = "alice@example.org\\r\\nBcc: eve@example.net"']}, drop=("email",)),
            "subscribers[0].email"),
        Case("email: a space", config_text(
            {sub: ['email = "alice@exa mple.org"']}, drop=("email",)), "subscribers[0].email"),
        Case("email: a number", config_text({sub: ["email = 42"]}, drop=("email",)),
             "subscribers[0].email"),
        Case("email: missing", config_text(drop=("email",)), "subscribers[0].email"),
        Case("name: a header injected", config_text(
            {sub: ['name = "Alice\\r\\nBcc: eve@example.net"']}, drop=("name",)),
            "subscribers[0].name"),
        Case("name: a NUL", config_text({sub: ['name = "Al\\u0000ice"']}, drop=("name",)),
             "subscribers[0].name"),
        Case("name: a number", config_text({sub: ["name = 7"]}, drop=("name",)),
             "subscribers[0].name"),
        Case("name: a right-to-left override", config_text(
            {sub: ['name = "Alice \u202eecilA"']}, drop=("name",)), "subscribers[0].name"),
        Case("name: right-to-left letters", config_text(
            {sub: ['name = "\u05e8\u05d7\u05dc \u200f(Rachel)"']}, drop=("name",)), None),
        # [[subscribers]]: time zones, times, days, lists, numbers.
        _line(sub, 'timezone = "Europe/Berln"', 'subscribers[0].timezone: unknown time zone'),
        _line(sub, 'timezone = "../../../etc/passwd"', "subscribers[0].timezone"),
        _line(sub, 'timezone = ""', "subscribers[0].timezone"),
        _line(sub, 'timezone = "zone.tab"', "subscribers[0].timezone"),
        _line(sub, "timezone = 1", "subscribers[0].timezone"),
        # Files of Debian's tzdata that are not a place: this host's zone, leap-second clocks.
        _line(sub, 'timezone = "localtime"', "subscribers[0].timezone"),
        _line(sub, 'timezone = "right/Europe/Berlin"', "subscribers[0].timezone"),
        _line(sub, 'timezone = "posix/Europe/Berlin"', "subscribers[0].timezone"),
        _line(sub, 'timezone = "Factory"', "subscribers[0].timezone"),
        _line(sub, 'send_at = "8:60"', "subscribers[0].send_at"),
        _line(sub, "send_at = 800", "subscribers[0].send_at"),
        _line(sub, 'send_at = "\u0660\u0668:\u0660\u0660"', "subscribers[0].send_at"),
        _line(sub, "send_at = 07:30:15", "subscribers[0].send_at"),
        _line(sub, 'days = "mon"', "subscribers[0].days"),
        _line(sub, "days = []", "subscribers[0].days"),
        _line(sub, 'days = ["funday"]', "subscribers[0].days[0]"),
        _line(sub, "days = [1]", "subscribers[0].days[0]"),
        _line(sub, 'interests = "nlp"', "subscribers[0].interests"),
        _line(sub, "interests = [1, 2]", "subscribers[0].interests[0]"),
        _line(sub, 'interests = [["nested"]]', "subscribers[0].interests[0]"),
        _line(sub, 'interests = ["a\\nb"]', "subscribers[0].interests[0]"),
        _line(sub, "seed_papers = {a = 1}", "subscribers[0].seed_papers"),
        _line(sub, "max_papers = 0.5", "subscribers[0].max_papers"),
        _line(sub, "max_papers = 1e300", "subscribers[0].max_papers"),
        _line(sub, "max_papers = 99999999999999999999999", "subscribers[0].max_papers"),
        _line(sub, "max_papers = true", "subscribers[0].max_papers"),
        _line(sub, "max_papers = -3", "subscribers[0].max_papers"),
        _line(sub, 'send_empty = "no"', "subscribers[0].send_empty"),
        _line(sub, '"bad\\nkey" = 1', "subscribers[0].\"bad\\u000akey\": unknown key"),
        # [defaults], wrong table shapes.
        _line("defaults", 'timezone = "Mars/Base"', "defaults.timezone"),
        _line("defaults", 'email = "x@example.org"', "defaults.email: unknown key"),
        _line("defaults", "max_papers = inf", "defaults.max_papers"),
        Case("subscribers is a string", 'subscribers = "alice"\n' + config_text(
            drop=("email", "name")).replace("[[subscribers]]", ""), "subscribers"),
        Case("smtp is a list", 'smtp = [1]\n[digest]\ninbox = "inbox"\n', "smtp"),
        Case("digest is a string", 'digest = "x"\n', "digest"),
        # [imap] and [maildir].
        _line("imap", "port = 1e9", "imap.host"),
        Case("imap: poll_seconds inf", config_text({"imap": [
            'host = "imap.example.org"', 'username = "u"', f'password_env = "{UNSET_VARIABLE}"',
            "poll_seconds = inf"]}), "imap.poll_seconds"),
        Case("imap: password unset", config_text({"imap": [
            'host = "imap.example.org"', 'username = "u"', f'password_env = "{UNSET_VARIABLE}"']}),
            f"imap.password_env: environment variable {UNSET_VARIABLE}", secret=True),
        Case("imap: mailbox with a line break", config_text({"imap": [
            'host = "imap.example.org"', 'username = "u"', f'password_env = "{UNSET_VARIABLE}"',
            'mailbox = "INBOX\\r\\nA1 LOGOUT"']}), "imap.mailbox"),
        _line("maildir", 'path = "a\\u0000b"', "maildir.path"),
        Case("imap and maildir", config_text({"maildir": ['path = "m"'], "imap": [
            'host = "h"', 'username = "u"', 'password_env = "P"']}), "maildir"),
        # The file itself.
        Case("arrays nested 5000 deep", config_text() + "\n[extra]\nx = " + "[" * deep
             + "]" * deep + "\n", ": TOML nested too deeply"),
        Case("inline tables nested 5000 deep", "x = " + "{a = " * deep + "1" + "}" * deep + "\n",
             ": TOML nested too deeply"),
        Case("an integer of 5000 digits", config_text({d: ["scan_seconds = " + "9" * deep]}),
             ": TOML value out of range"),
        Case("a lone surrogate escape", config_text(
            {sub: ['name = "\\ud800"']}, drop=("name",)), ": TOML syntax error"),
        Case("not UTF-8", config_text({sub: ['name = "Jos\xe9"']}, drop=("name",)).encode(
            "latin-1"), ":12: not UTF-8"),
        Case("binary garbage", bytes(range(256)) * 4, ": not UTF-8"),
        Case("a TOML syntax error", config_text() + "\nname = \"unterminated\n", ": TOML syntax"),
        Case("an empty file", b"", "smtp.host: missing"),
        Case("larger than the size limit", b"# " + b"x" * MAX_CONFIG_BYTES + b"\n",
             ": larger than"),
        Case("a folder", b"", ": is a folder", setup=_folder_as_config),
        Case("no such file", b"", ": cannot read config",
             setup=lambda folder: folder / "missing.toml"),
    ]


def quick_cases() -> list[Case]:
    """The subset the test suite and CI run: valid ones, each kind of hostile value, secrets."""
    wanted = {"the base config", 'subscribers: email = "jos\u00e9@example.org"',
              "digest: scan_seconds = inf", "smtp: port = 0.5", "password_env unset",
              "email: a header injected", "subscribers: timezone = 1",
              "arrays nested 5000 deep", "not UTF-8", "a folder", "state under a file"}
    return [case for case in cases() if case.name in wanted]


@dataclass
class Run:
    """One command's result."""

    exit_code: int
    stdout: str
    stderr: str


@dataclass
class CaseResult:
    """Both commands' results for one case, and what went wrong (empty lists: nothing)."""

    case: Case
    config: Path
    check: Run
    dry_run: Run
    crashes: list[str]
    unclear: list[str]


def run_command(config: Path, *args: str) -> Run:
    """``python -m digest --config CONFIG ARGS`` in the config's folder, without the secret."""
    env = {k: v for k, v in os.environ.items() if k != UNSET_VARIABLE}
    env.pop("DIGEST_CONFIG", None)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    try:
        done = subprocess.run([sys.executable, "-m", "digest", "--config", str(config), *args],
                              capture_output=True, text=True, errors="replace", env=env,
                              cwd=config.parent, timeout=COMMAND_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        return Run(-1, "", f"timed out after {COMMAND_TIMEOUT:g} s")
    return Run(done.returncode, done.stdout, done.stderr)


SEED_PAPERS = 12  # enough for a digest of the default size (10)


def seed_state(path: Path) -> None:
    """A state at ``path`` (BASE's ``state``) holding ``SEED_PAPERS`` papers listed today.

    Without papers ``send --dry-run`` stops at "no new papers" and never
    renders, so a value that breaks rendering (an address the header code
    rejects) would pass the campaign.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    today = date.today()
    papers = [Paper(id=f"seed-{n}", title=f"Seed paper {n} on domain adaptation",
                    abstract=f"We study transfer between domains, case {n}. " * 8,
                    listed_on=today, listing_rank=n) for n in range(1, SEED_PAPERS + 1)]
    with Store(path) as store:
        store.add_dump(hashlib.sha256(b"faults_config seed").hexdigest(), "seed", "json", papers)


def try_case(case: Case, folder: Path) -> CaseResult:
    """Write the case in ``folder``, run check-config and send --dry-run, judge both."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "digest.toml"
    config.write_bytes(case.body if isinstance(case.body, bytes) else case.body.encode("utf-8"))
    if case.setup is not None:
        config = case.setup(folder)
    if not (folder / "state").exists():  # the cases about the state path made it themselves
        seed_state(folder / "state" / "digest.sqlite3")
    check = run_command(config, "check-config")
    # --force, on a state holding papers: the digest is really rendered (headers included).
    dry_run = run_command(config, "send", "--dry-run", "--force")
    crashes: list[str] = []
    unclear: list[str] = []
    for label, run, should_fail in (("check-config", check, case.names is not None),
                                    ("send --dry-run", dry_run,
                                     case.names is not None and not case.secret)):
        if "Traceback" in run.stderr or run.exit_code not in (0, 1):
            crashes.append(f"{label}: exit {run.exit_code}: {_last_line(run.stderr)}")
            continue
        if should_fail and run.exit_code == 0:
            crashes.append(f"{label}: accepted it (exit 0)")
        elif not should_fail and run.exit_code != 0:
            what = "failed after check-config accepted it" if label != "check-config" else \
                "rejected a valid config"
            crashes.append(f"{label}: {what}: {_last_line(run.stderr)}")
        elif should_fail and not _names_it(run.stderr, config, case.names or ""):
            unclear.append(f"{label}: {run.stderr.strip()[:200]!r}")
    return CaseResult(case, config, check, dry_run, crashes, unclear)


def _names_it(stderr: str, config: Path, names: str) -> bool:
    """One line, ``Error: CONFIG`` then the key (or line) the case is about."""
    lines = stderr.strip().splitlines()
    if len(lines) != 1 or not lines[0].startswith(f"Error: {config}"):
        return False
    return names in lines[0][len(f"Error: {config}"):]


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1][:200] if lines else "(no output)"


def try_cases(selected: list[Case], workdir: Path, *, workers: int = 4) -> Iterator[CaseResult]:
    """Every case in its own folder under ``workdir``, a few at a time (subprocesses wait on I/O)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(lambda item: try_case(item[1], workdir / f"case{item[0]:03d}"),
                            enumerate(selected))


def run(workdir: Path, quick: bool) -> AreaResult:
    """The area's campaign: see the module docstring for what is counted."""
    result = AreaResult("config")
    for outcome in try_cases(quick_cases() if quick else cases(), workdir):
        result.cases += 1
        result.crashes += bool(outcome.crashes)
        result.unclear_errors += bool(outcome.unclear) and not outcome.crashes
        result.notes.extend(f"{outcome.case.name}: {note}"
                            for note in [*outcome.crashes, *outcome.unclear])
    return result
