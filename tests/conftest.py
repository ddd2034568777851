"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import sample_dumps


@pytest.fixture
def samples() -> list[Path]:
    return sample_dumps()
