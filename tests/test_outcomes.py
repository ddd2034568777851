"""A dispatch's outcomes kept compactly (``Outcomes``) read back as the outcomes added.

The dispatch returned a list of (place, outcome) pairs sorted by place; it now
keeps ~25 bytes per subscriber (issue 13: peak RSS). Whatever is added, reading
gives the same outcomes, equal field by field, in the order a stable sort by
place gave, then the outcomes appended after every place.
"""

from __future__ import annotations

from collections import Counter
from datetime import date

from hypothesis import given, settings
from hypothesis import strategies as st

from digest.config import Subscriber
from digest.daemon.outcomes import Outcome, Outcomes

SUBSCRIBERS = tuple(Subscriber(email=f"Reader{n}@example.org", name=f"Reader {n}")
                    for n in range(1, 7))


def test_plain_and_unusual_outcomes_read_back_in_place_order() -> None:
    outcomes = Outcomes(SUBSCRIBERS)
    added = [
        (3, Outcome("Reader3@example.org", "sent", "", 41, 5, 80)),
        (1, Outcome("Reader1@example.org", "already-sent", local_date=date(2026, 11, 29))),
        (0, Outcome("reader6@example.org", "sent", "", 7, 3, 9)),  # a resend
        (2, Outcome("reader2@example.org", "failed", "address refused (550 no)")),  # other case
        (5, Outcome("Reader5@example.org", "deferred", "server unavailable", held_back=True)),
        (3, Outcome("Reader3@example.org", "retry", "again", 41)),  # a second at one place
        (6, Outcome("Reader6@example.org", "sent", "", 2**40, 2**31, 0)),  # counts past 'i'
        (0, Outcome("reader4@example.org", "retry", "the dispatch is stopping", 8)),
    ]
    for place, outcome in added:
        outcomes.add(place, outcome)
    confirmation = Outcome("Reader1@example.org", "confirmation-sent")
    outcomes.append(confirmation)
    expected = [o for _, o in sorted(added, key=lambda pair: pair[0])] + [confirmation]
    assert list(outcomes) == expected
    assert outcomes == expected and len(outcomes) == len(expected)
    assert outcomes[0] == added[2][1] and outcomes[-1] == confirmation
    assert outcomes.counts() == Counter(o.status for o in expected)
    assert outcomes.get(4) is None and not outcomes.has(4) and outcomes.has(2)
    assert outcomes.get(1) == added[1][1]


def test_a_plain_outcome_shares_the_subscribers_address() -> None:
    outcomes = Outcomes(SUBSCRIBERS)
    outcomes.add(2, Outcome("Reader2@example.org", "sent", "", 1, 2, 3))
    outcomes.add(3, Outcome("reader3@example.org", "sent", "", 2, 2, 3))  # as the store has it
    outcome = outcomes.get(2)
    assert outcome is not None and outcome.subscriber is SUBSCRIBERS[1].email
    assert outcomes.get(3) == Outcome("reader3@example.org", "sent", "", 2, 2, 3)
    assert not outcomes._whole  # both kept as numbers


def test_discard_forgets_one_outcome() -> None:
    outcomes = Outcomes(SUBSCRIBERS)
    first = Outcome("Reader2@example.org", "already-sent", local_date=date(2026, 11, 30))
    second = Outcome("Reader2@example.org", "sent", "", 5, 1, 1)
    resend = Outcome("reader2@example.org", "sent", "", 4, 1, 1)
    for place, outcome in [(2, first), (2, second), (0, resend), (4, first)]:
        outcomes.add(place, outcome)
    outcomes.discard(2, first)
    assert list(outcomes) == [resend, second, first]
    outcomes.discard(2, first)  # not there any more: nothing happens
    outcomes.discard(0, resend)
    outcomes.discard(4, first)
    assert list(outcomes) == [second] and len(outcomes) == 1
    assert outcomes.counts() == {"sent": 1}


def test_pairs_are_moved_and_their_list_emptied() -> None:
    outcomes = Outcomes(SUBSCRIBERS)
    placed = [(1, Outcome("Reader1@example.org", "sent", "", 1, 1, 1))]
    outcomes.add_pairs(placed)
    assert placed == [] and len(outcomes) == 1


STATUSES = ["sent", "failed", "retry", "already-sent", "not-due", "empty", "deferred"]
outcome_at = st.builds(
    lambda place, status, detail, digest_id, shown, considered, day, held, other: (
        place, Outcome(SUBSCRIBERS[place - 1].email.lower() if other and place else
                       (SUBSCRIBERS[place - 1].email if place else "resend@example.org"),
                       status, detail, digest_id, shown, considered, day, held)),
    st.integers(0, len(SUBSCRIBERS)), st.sampled_from(STATUSES), st.sampled_from(["", "why"]),
    st.none() | st.integers(-2, 2**63 - 1), st.integers(-1, 2**32), st.integers(0, 2**32),
    st.none() | st.dates(), st.booleans(), st.booleans())


@settings(max_examples=300, deadline=None)
@given(st.lists(outcome_at, max_size=20), st.lists(st.integers(0, 19), max_size=4))
def test_any_outcomes_read_back_as_added(added: list[tuple[int, Outcome]],
                                         discards: list[int]) -> None:
    outcomes = Outcomes(SUBSCRIBERS)
    for place, outcome in added:
        outcomes.add(place, outcome)
    expected = sorted(added, key=lambda pair: pair[0])
    for index in discards:
        if index < len(added):
            place, outcome = added[index]
            outcomes.discard(place, outcome)
            if (place, outcome) in expected:
                expected.remove((place, outcome))
    assert list(outcomes.placed()) == expected
    assert list(outcomes) == [o for _, o in expected] and len(outcomes) == len(expected)
    assert outcomes.counts() == Counter(o.status for _, o in expected)
