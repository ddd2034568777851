"""What a dispatch did for each subscriber: an ``Outcome`` each, kept in ~25 bytes each.

A dispatch to 100,000 subscribers ends with 100,000 outcomes, almost all of them
plain (``sent`` with its digest id and counts, ``already-sent`` with its day):
as objects (an ``Outcome``, its (place, outcome) pair, the list slots that
order them) they cost ~200 bytes each, 20 MB at 100,000, all alive at the
dispatch's peak. ``Outcomes`` keeps a plain one as a few numbers in arrays
indexed by the subscriber's place (its subscriber is the config's string, not a
copy), and only what is unusual as objects: a detail text, an outcome naming
someone else than its place's subscriber, a resend (place 0), a second outcome
for one place. Read, it is a ``Sequence[Outcome]`` in the subscribers' order
(resends first) that builds each ``Outcome`` as it is read: equal, field by
field, to the one that was added.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date
from typing import overload

from ..config import Subscriber


@dataclass(frozen=True, slots=True)  # one per subscriber per dispatch: no __dict__ each
class Outcome:
    subscriber: str
    status: str  # sent | failed | retry | dry-run | empty | not-due | already-sent | late ...
    detail: str = ""
    digest_id: int | None = None
    shown: int = 0
    considered: int = 0
    # The day an ``already-sent`` is about: a digest of it resent by this dispatch is counted
    # by the resend's outcome instead (see ``jobs._count_once``).
    local_date: date | None = None
    # Refused before the server accepted any address: tried once more after it has.
    held_back: bool = False


# The largest count or id an array slot holds ('i': 4 bytes signed, 'q': 8); a larger one
# (never seen: a digest shows tens of papers) is kept as an object instead.
_INT_MAX = 2**31 - 1
_ID_MAX = 2**63 - 1
_NO_ID = -1  # digest_id None
_NO_DAY = 0  # local_date None (date.toordinal is at least 1)
# Bits of a place's flags.
_HELD_BACK = 1
_LOWERED = 2  # the subscriber is the config's address lower-cased (as the store keeps it)
# Status codes are bytes; 0 is "no outcome at this place". There are a dozen statuses.
_CODES_MAX = 255


class Outcomes(Sequence[Outcome]):
    """The outcomes of one dispatch to ``subscribers``, in their order; see the module doc.

    ``add(place, outcome)``: place 1..N is ``subscribers[place - 1]``, place 0
    a resend (ordered before everyone, in the order added); ``append`` adds
    an outcome after all places (confirmations). Several outcomes for one
    place are read in the order added. Memory: 26 bytes per subscriber
    (allocated at once), plus the unusual outcomes as objects.
    """

    def __init__(self, subscribers: Sequence[Subscriber]) -> None:
        size = len(subscribers) + 1
        self._subscribers = subscribers
        self._status = bytearray(size)  # status code per place, 0: none
        self._digest = array("q", [_NO_ID]) * size
        self._shown = array("i", [0]) * size
        self._considered = array("i", [0]) * size
        self._day = array("i", [_NO_DAY]) * size  # date ordinal
        self._statuses: list[str] = [""]  # code -> status
        self._codes: dict[str, int] = {}  # status -> code
        self._details: dict[int, str] = {}  # place -> detail, when not ""
        self._flags = bytearray(size)  # _HELD_BACK | _LOWERED per place
        self._whole: dict[int, Outcome] = {}  # place -> an outcome kept as it is
        self._resends: list[Outcome] = []  # place 0
        self._more: dict[int, list[Outcome]] = {}  # place -> the outcomes after its first
        self._after: list[Outcome] = []  # after every place
        self._count = 0

    # --- adding ---

    def add(self, place: int, outcome: Outcome) -> None:
        """Record ``outcome`` at ``place`` (0: a resend); raises IndexError past the end."""
        if not 0 <= place < len(self._status):
            raise IndexError(f"place {place} is not one of the {len(self._status) - 1} "
                             "subscribers")
        self._count += 1
        if place == 0:
            self._resends.append(outcome)
        elif self._status[place] or place in self._whole:
            self._more.setdefault(place, []).append(outcome)
        elif not self._store(place, outcome):
            self._whole[place] = outcome

    def add_pairs(self, placed: list[tuple[int, Outcome]]) -> None:
        """``add`` each (place, outcome) of ``placed``, then empty it (it is reused)."""
        for place, outcome in placed:
            self.add(place, outcome)
        placed.clear()

    def append(self, outcome: Outcome) -> None:
        """Add an outcome after every place (a confirmation's)."""
        self._count += 1
        self._after.append(outcome)

    def extend(self, outcomes: Iterable[Outcome]) -> None:
        for outcome in outcomes:
            self.append(outcome)

    def _store(self, place: int, outcome: Outcome) -> bool:
        """Keep a plain outcome as numbers; False when it is not plain (kept whole)."""
        email = self._subscribers[place - 1].email
        flags = _HELD_BACK if outcome.held_back else 0
        if outcome.subscriber != email:
            if outcome.subscriber != email.lower():
                return False  # a reloaded subscriber's other spelling, say
            flags |= _LOWERED  # the store's spelling (a delivery's outcome): no copy kept
        digest_id = _NO_ID if outcome.digest_id is None else outcome.digest_id
        if not (outcome.digest_id is None or 0 <= digest_id <= _ID_MAX) or not (
                0 <= outcome.shown <= _INT_MAX and 0 <= outcome.considered <= _INT_MAX):
            return False
        code = self._codes.get(outcome.status)
        if code is None:
            if len(self._statuses) > _CODES_MAX:
                return False
            code = self._codes[outcome.status] = len(self._statuses)
            self._statuses.append(outcome.status)
        self._status[place] = code
        self._digest[place] = digest_id
        self._shown[place] = outcome.shown
        self._considered[place] = outcome.considered
        self._day[place] = _NO_DAY if outcome.local_date is None else \
            outcome.local_date.toordinal()
        if outcome.detail:
            self._details[place] = outcome.detail
        self._flags[place] = flags
        return True

    # --- reading ---

    def get(self, place: int) -> Outcome | None:
        """The first outcome added at ``place`` (1..N), or None."""
        whole = self._whole.get(place)
        if whole is not None:
            return whole
        code = self._status[place]
        if not code:
            return None
        digest_id = self._digest[place]
        day = self._day[place]
        flags = self._flags[place]
        email = self._subscribers[place - 1].email
        return Outcome(email.lower() if flags & _LOWERED else email, self._statuses[code],
                       self._details.get(place, ""), None if digest_id == _NO_ID else digest_id,
                       self._shown[place], self._considered[place],
                       None if day == _NO_DAY else date.fromordinal(day),
                       bool(flags & _HELD_BACK))

    def has(self, place: int) -> bool:
        """Whether an outcome was added at ``place`` (1..N)."""
        return bool(self._status[place]) or place in self._whole

    def placed(self) -> Iterator[tuple[int, Outcome]]:
        """(place, outcome) for every outcome added with a place, in order."""
        for outcome in self._resends:
            yield 0, outcome
        status = self._status
        for place in range(1, len(status)):
            if status[place] or place in self._whole:
                first = self.get(place)
                if first is not None:
                    yield place, first
            for outcome in self._more.get(place, ()):
                yield place, outcome

    def discard(self, place: int, outcome: Outcome) -> None:
        """Forget one outcome equal to ``outcome`` at ``place`` (nothing when there is none)."""
        if place == 0:
            if outcome in self._resends:
                self._resends.remove(outcome)
                self._count -= 1
            return
        more = self._more.get(place, [])
        if self.get(place) == outcome:
            self._whole.pop(place, None)
            self._status[place] = 0
            self._details.pop(place, None)
            if more:  # the next one added at this place becomes the first
                following = more.pop(0)
                if not self._store(place, following):
                    self._whole[place] = following
        elif outcome in more:
            more.remove(outcome)
        else:
            return
        if not more:
            self._more.pop(place, None)
        self._count -= 1

    def counts(self) -> dict[str, int]:
        """How many outcomes have each status (without building them)."""
        counts: dict[str, int] = {}
        for code in range(1, len(self._statuses)):
            if number := self._status.count(code):
                counts[self._statuses[code]] = number
        extra = [*self._resends, *self._whole.values(), *self._after]
        extra.extend(outcome for more in self._more.values() for outcome in more)
        for outcome in extra:
            counts[outcome.status] = counts.get(outcome.status, 0) + 1
        return counts

    def __iter__(self) -> Iterator[Outcome]:
        for _, outcome in self.placed():
            yield outcome
        yield from self._after

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> Outcome: ...

    @overload
    def __getitem__(self, index: slice) -> list[Outcome]: ...

    def __getitem__(self, index: int | slice) -> Outcome | list[Outcome]:
        """By position, as in a list (each read walks the outcomes: for tests and a few)."""
        return list(self)[index]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Outcomes | list | tuple):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable, as a list

    def __repr__(self) -> str:
        return f"Outcomes({list(self)!r})"
