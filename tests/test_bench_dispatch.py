"""``digest bench dispatch``: a tiny run delivers exactly one message per subscriber.

No timing is asserted: the benchmark's figures are for people, the test checks
that it runs the real dispatch, checks delivery and reports every field.
"""

from __future__ import annotations

import json

import pytest

from digest.bench.dispatch import _check_once, interest_phrases
from digest.cli import main
from digest.errors import DigestError

from .helpers import require_shared

JSON_KEYS = {
    "bench", "subscribers", "days", "history", "papers", "runs", "load_avg_1m", "build_s",
    "config_load_s", "wall_s", "messages_per_s", "cpu_s", "cpu_ms_per_subscriber",
    "peak_rss_mb", "sink_cpu_s", "message_kb", "raw_1_messages_per_s", "raw_8_messages_per_s",
    "ratio_to_raw_1", "ratio_to_raw_8", "ranking_subscribers_per_s", "candidates_mean_history",
    "candidates_mean_new", "stages_s", "delivered_exactly_once", "wall_s_runs",
    "stages_cpu_s", "ranking_subscribers_per_cpu_s",
    "prepare_workers", "dispatch_cpu_s", "worker_cpu_s", "worker_peak_rss_mb",
}
STAGE_KEYS = {"corpus_fit", "prepare", "ranking", "rendering", "claiming", "sending",
              "prepare_other"}


def test_tiny_dispatch_delivers_once_per_subscriber_in_every_run(
        capsys: pytest.CaptureFixture[str]) -> None:
    data = require_shared("data", "hf-daily-papers.jsonl")
    code = main(["bench", "dispatch", "--subscribers", "20", "--days", "2", "--runs", "2",
                 "--data", str(data), "--json"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, "--json prints one line only"
    result = json.loads(lines[0])
    assert set(result) == JSON_KEYS
    assert set(result["stages_s"]) == STAGE_KEYS
    assert set(result["stages_cpu_s"]) == STAGE_KEYS
    assert result["bench"] == "dispatch"
    assert result["subscribers"] == 20 and result["days"] == 2 and result["runs"] == 2
    # The second run sends the same day again: it worked on a fresh copy of the state.
    assert len(result["wall_s_runs"]) == 2
    assert result["delivered_exactly_once"] is True
    assert result["papers"] > 10
    # 6 of 20 have history: yesterday's digest, so only today's papers are new to them.
    assert 0 < result["candidates_mean_history"] < result["candidates_mean_new"]
    assert result["message_kb"] > 1
    for key in ("wall_s", "messages_per_s", "cpu_s", "peak_rss_mb", "raw_1_messages_per_s",
                "raw_8_messages_per_s", "ratio_to_raw_1", "ratio_to_raw_8"):
        assert result[key] > 0, key
    for stage in ("ranking", "rendering", "claiming", "sending"):
        assert result["stages_s"][stage] > 0, stage
        assert result["stages_cpu_s"][stage] > 0, stage
    assert result["ranking_subscribers_per_cpu_s"] > 0
    # 20 subscribers are prepared in the dispatching process: no worker is forked for so few.
    assert result["prepare_workers"] == 1 and result["worker_cpu_s"] == 0
    assert result["cpu_s"] == result["dispatch_cpu_s"]


def test_the_table_names_the_dispatch_raw_rates_and_stages(
        capsys: pytest.CaptureFixture[str]) -> None:
    data = require_shared("data", "hf-daily-papers.jsonl")
    assert main(["bench", "dispatch", "--subscribers", "3", "--days", "1", "--runs", "1",
                 "--history", "0", "--data", str(data)]) == 0
    out = capsys.readouterr().out
    for words in ("dispatch (as the daemon)", "raw aiosmtplib, 1 connection",
                  "raw aiosmtplib, 8 connections", "ranking", "claiming", "sending + SMTP",
                  "every subscriber received exactly one message"):
        assert words in out
    assert json.loads(out.strip().splitlines()[-1])["candidates_mean_history"] is None


def test_delivery_check_fails_loudly_on_a_missing_or_second_copy() -> None:
    expected = ["a@example.org", "b@example.org", "c@example.org"]
    _check_once({"counts": {"a@example.org": 1, "b@example.org": 1, "c@example.org": 1}},
                expected, "ok")
    with pytest.raises(DigestError, match="1 recipient.s. got nothing"):
        _check_once({"counts": {"a@example.org": 1, "b@example.org": 1}}, expected, "missing")
    with pytest.raises(DigestError, match="1 got more than one"):
        _check_once({"counts": {"a@example.org": 1, "b@example.org": 2, "c@example.org": 1}},
                    expected, "twice")
    with pytest.raises(DigestError, match="1 unexpected"):
        _check_once({"counts": {"a@example.org": 1, "b@example.org": 1, "c@example.org": 1,
                                "x@example.org": 1}}, expected, "stranger")


def test_interest_phrases_come_from_titles_without_system_names() -> None:
    titles = ["ConvLLaVA: Hierarchical Backbones for Visual Encoders",
              "Visual Encoders Revisited", "Scaling Visual Encoders Further",
              "Diffusion Transformers at Scale"]
    phrases = dict(interest_phrases(titles, minimum=3))
    assert phrases["visual encoders"] == 3
    assert not any("convllava" in phrase for phrase in phrases)
