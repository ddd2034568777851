"""The front door: every command has help and is in the README; errors are one line."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from digest.cli import build_parser, main

from .helpers import ROOT, write_config


def command_paths() -> list[list[str]]:
    """Every (sub)command of the parser, e.g. ["send"], ["bench", "ingest"]."""
    paths: list[list[str]] = []

    def walk(parser: argparse.ArgumentParser, prefix: list[str]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    paths.append([*prefix, name])
                    walk(sub, [*prefix, name])

    walk(build_parser(), [])
    return paths


def test_every_command_has_help_text(capsys: pytest.CaptureFixture[str]) -> None:
    paths = command_paths()
    assert ["run"] in paths and ["bench", "ingest"] in paths
    for path in paths:
        with pytest.raises(SystemExit) as info:
            main([*path, "--help"])
        assert info.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: digest"), path
        description = out.split("\n\n")[1].strip()
        assert len(description) > 15, f"{path} has no real help text"


def test_every_command_is_named_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for path in command_paths():
        if len(path) == 1 and path[0] == "bench":
            continue  # a group; its subcommands are checked
        assert re.search(r"`digest (--config PATH )?" + re.escape(" ".join(path)) + r"[ `]",
                         readme), f"README does not name `digest {' '.join(path)}`"


def test_config_error_is_one_line_and_exit_1(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, """
        [smtp]
        host = "x"
        [[subscribers]]
        email = "a@example.org"
        timezone = "Europe/Berln"
    """)
    assert main(["--config", str(config), "check-config"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err == f'Error: {config}: subscribers[0].timezone: unknown time zone "Europe/Berln"'


def test_usage_error_exits_2() -> None:
    with pytest.raises(SystemExit) as info:
        main(["no-such-command"])
    assert info.value.code == 2


def test_check_config_on_the_example(capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIGEST_SMTP_PASSWORD", "x")
    assert main(["--config", str(ROOT / "config" / "digest.example.toml"), "check-config"]) == 0
    out = capsys.readouterr().out
    assert "2 subscriber(s)" in out and "alice@example.org" in out


def test_installed_entry_point_runs() -> None:
    result = subprocess.run([sys.executable, "-m", "digest", "--help"], capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0 and "check-config" in result.stdout


@pytest.mark.slow
def test_wheel_ships_the_templates(tmp_path: Path) -> None:
    """``pip install .`` (not only editable) must find the templates inside the package."""
    import zipfile

    pytest.importorskip("setuptools", reason="building the wheel needs setuptools")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    wheel = next(tmp_path.glob("paper_digest-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for template in ("digest.txt.j2", "digest.html.j2", "digest.css"):
        assert f"digest/templates/{template}" in names
    for module in sorted((ROOT / "digest").rglob("*.py")):  # every module, sub-packages too
        assert module.relative_to(ROOT).as_posix() in names
    assert any(name.endswith("entry_points.txt") for name in names)


def test_a_reader_that_stops_early_gets_no_traceback(tmp_path: Path) -> None:
    """``digest preview --html F | head -c 1``: the file is written, no BrokenPipeError."""
    import subprocess
    import sys

    from .daemon_helpers import fill_inbox, write_daemon_config
    from .helpers import ROOT

    fill_inbox(tmp_path)
    config = write_daemon_config(tmp_path, port=1, subscribers=[{"email": "ann@example.org"}])
    html = tmp_path / "preview.html"
    digest = f"{sys.executable} -m digest --config {config}"
    command = (f"{digest} ingest >/dev/null && "
               f"{digest} preview --user ann@example.org --html {html} | head -c 1")
    done = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, check=False)
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    assert done.returncode == 0, done.stderr
    assert done.stdout == "S"  # "Subject: ..."
    assert html.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_the_parser_and_check_config_import_no_ranking_stack(tmp_path: Path) -> None:
    """Every command builds the whole parser: it must not pay for numpy/scipy/scikit-learn
    (about a second per command); only the commands that rank import them."""
    config = write_config(tmp_path, """
        [digest]
        inbox = "inbox"
        state = "state.sqlite3"
        [smtp]
        sink = "outbox"
        [[subscribers]]
        email = "a@example.org"
        interests = ["graph neural networks"]
    """)
    (tmp_path / "inbox").mkdir()
    probe = (
        "import sys\n"
        "from digest.cli import build_parser, main\n"
        "build_parser().format_help()\n"
        f"code = main(['--config', {str(config)!r}, 'check-config'])\n"
        "heavy = sorted(m for m in ('sklearn', 'scipy', 'numpy', 'digest.rank') if m in sys.modules)\n"
        "print(code, heavy)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.stdout.strip().splitlines()[-1] == "0 []", done.stdout + done.stderr


def test_the_corpus_bench_choices_name_its_methods() -> None:
    from digest.bench import corpus, options

    assert options.CORPUS_METHODS == tuple(corpus.METHODS)
    assert set(options.DEFAULT_CORPUS_METHODS) <= set(corpus.METHODS)
