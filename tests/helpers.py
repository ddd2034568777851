"""Test helpers: the sample dumps, the ../shared folder, a config on disk."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from digest.dumps import parse_file
from digest.paper import Paper

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
EXAMPLES = ROOT / "examples" / "inbox"


def sample_dumps() -> list[Path]:
    """The two real sample dumps bundled with the project (copied from shared/samples)."""
    return sorted(EXAMPLES.glob("*.txt"))


def sample_papers() -> list[Paper]:
    """The papers of both sample dumps, each id once (the later dump's copy kept)."""
    dumps = [parse_file(path).papers for path in sample_dumps()]
    return list({p.id: p for dump in dumps for p in dump}.values())


def require_shared(*parts: str) -> Path:
    """A path under ../shared, or skip the test saying why (a clone without it still passes)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the shared data folder beside the checkout), absent here")
    return path


def write_config(folder: Path, body: str, name: str = "digest.toml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return path
