"""Shared fixtures."""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import sample_dumps

# A test runner started as a script's background job has SIGINT ignored, and every child
# process would inherit that (the daemon and the benches keep an inherited "ignore"): the
# tests start from what a terminal gives, Python's own handler (SIG_DFL after an exec).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def samples() -> list[Path]:
    return sample_dumps()


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Each test starts with the logging it would have alone.

    ``digest.cli.main`` sets up logging for a process (root handler and level) and
    the bench commands quieten the ``digest`` logger; in one pytest process that
    would leak into later tests that read their log lines.
    """
    root = logging.getLogger()
    saved_root = (root.level, root.handlers[:])
    named = ("digest", "apscheduler", "mail.log", "aiosmtplib", "httpx", "httpcore")
    saved = {name: logging.getLogger(name).level for name in named}
    yield
    root.setLevel(saved_root[0])
    root.handlers[:] = saved_root[1]
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)
