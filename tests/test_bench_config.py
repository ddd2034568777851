"""``digest bench config``: a config of N subscribers is written, loaded and measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from digest.bench.config import write_bench_config
from digest.cli import main
from digest.config import load_config


def test_the_bench_config_is_a_valid_config_of_n_subscribers(tmp_path: Path) -> None:
    config = load_config(write_bench_config(tmp_path, 300))
    assert len(config.subscribers) == 300
    assert len({s.email for s in config.subscribers}) == 300
    assert len({s.timezone for s in config.subscribers}) > 5  # a spread of zones, not one
    assert any(s.interests for s in config.subscribers)


def test_bench_config_prints_a_table_and_a_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "config", "--subscribers", "200", "--baseline", "50",
                 "--runs", "2"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("config benchmark")
    result = json.loads(out[-1])
    assert result["subscribers"] == 200 and result["baseline"]["subscribers"] == 50
    assert result["load_s"] > 0 and result["load_cpu_s"] > 0 and result["peak_rss_mb"] > 0
    assert result["per_subscriber_us"] == pytest.approx(result["load_s"] / 200 * 1e6, rel=0.01)
