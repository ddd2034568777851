"""Fault-campaign area ``replies`` (digest/bench/faults_replies.py), quick size, as in CI."""

from __future__ import annotations

from pathlib import Path

import pytest

from digest.bench.faults import run_area
from digest.bench.faults_replies import AUTO_SUBJECTS, run
from digest.replies.parse import automatic_reason, forgery_reason, parse_message, sender_address


def test_the_replies_area_is_clean(tmp_path: Path) -> None:
    result = run(tmp_path, quick=True)
    assert result.cases >= 40
    assert result.clean, result.notes
    assert (result.crashes, result.data_lost, result.duplicates, result.unclear_errors) == \
        (0, 0, 0, 0)


def test_the_area_is_found_by_the_campaign(tmp_path: Path) -> None:
    result = run_area("replies", tmp_path, quick=True)
    assert result.notes != ["not built yet"] and result.clean, result.notes


def test_the_campaign_counts_a_reply_that_changes_what_it_must_not(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness is not a test that cannot fail: without the forgery and auto-reply checks,
    the forged and auto-reply cases change state, and it says so."""
    from digest.replies import process

    monkeypatch.setattr(process, "forgery_reason", lambda message: None)
    monkeypatch.setattr(process, "automatic_reason", lambda message: None)
    result = run(tmp_path, quick=True)
    assert not result.clean
    assert result.crashes >= len(AUTO_SUBJECTS)
    assert any("changed what it must not" in note for note in result.notes)


@pytest.mark.parametrize(("from_header", "address", "forged"), [
    ("alice@example.org <evil@example.net>", "evil@example.net", True),
    ('"alice@example.org" <evil@example.net>', "evil@example.net", True),
    ("=?utf-8?q?alice=40example.org?= <evil@example.net>", "evil@example.net", True),
    ("Alice <alice@example.org>", "alice@example.org", False),
    ("alice@example.org <alice@example.org>", "alice@example.org", False),
    ('"Example, Alice" <alice@example.org>', "alice@example.org", False),
    ("alice@example.org", "alice@example.org", False),
    ("alice@example.org, evil@example.net", "alice@example.org", True),
    # Issue 8 review: no dot in the shown domain, a full-width at sign.
    ("root@localhost <alice@example.org>", "alice@example.org", True),
    ("alice\uff20example.org <evil@example.net>", "evil@example.net", True),
    ('"alice\uff20example.org" <alice@example.org>', "alice@example.org", False),
])
def test_an_address_as_display_name(from_header: str, address: str, forged: bool) -> None:
    message = parse_message(f"From: {from_header}\r\nSubject: Re: x\r\n\r\nlike 1\r\n".encode())
    assert sender_address(message) == address
    assert (forgery_reason(message) is not None) == forged


@pytest.mark.parametrize("subject", [*AUTO_SUBJECTS, "Out of the office until Monday",
                                     "Abwesend: Paper digest", "Absence du bureau",
                                     # Issue 8 review: hyphens, anywhere, brackets, NFD.
                                     "Out-of-Office: Re: digest",
                                     "Alice Smith is out of the office.",
                                     "[Auto-Reply] Re: digest", "Re\u0301ponse automatique",
                                     "Re: Abwesenheitsnotiz", "[Absent] Re: digest"])
def test_auto_reply_subjects(subject: str) -> None:
    message = parse_message(f"From: a@example.org\r\nSubject: {subject}\r\n\r\nx\r\n".encode())
    assert automatic_reason(message) is not None


@pytest.mark.parametrize("subject", ["Re: Paper digest, Thu 12 Mar 2026", "like 3",
                                     "Re: about the office hours", "AW: Paper digest",
                                     "Re: my absent-minded likes",
                                     ("Re: Paper digest, Mon 30 Nov 2026: Automatic Response "
                                      "Generation (+9 more)")])
def test_ordinary_subjects_are_not_auto_replies(subject: str) -> None:
    message = parse_message(f"From: a@example.org\r\nSubject: {subject}\r\n\r\nx\r\n".encode())
    assert automatic_reason(message) is None
