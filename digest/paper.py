"""What a paper is, shared by every stage: its identity and its fields.

A paper is identified by its arXiv id when one is known, else by a hash of its
normalised title, so the same paper listed in two dumps is one paper.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass, field
from datetime import date
from urllib.parse import quote_plus

_ARXIV_ID = re.compile(r"^\d{4}\.\d{4,5}$")
_SPACE = re.compile(r"\s+")
_NOT_WORD = re.compile(r"[^\w\s]")


def normalise_title(title: str) -> str:
    """Case-, accent- and punctuation-insensitive form of a title, for identity."""
    text = unicodedata.normalize("NFKD", title)
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    text = _NOT_WORD.sub(" ", text.casefold())
    return _SPACE.sub(" ", text).strip()


def is_arxiv_id(value: str) -> bool:
    return bool(_ARXIV_ID.match(value))


def paper_id_for(title: str, arxiv_id: str | None) -> str:
    """The stable id: ``arXiv id`` or ``t:`` + 16 hex digits of the title hash."""
    if arxiv_id:
        return arxiv_id
    digest = hashlib.sha256(normalise_title(title).encode("utf-8")).hexdigest()
    return "t:" + digest[:16]


@dataclass(frozen=True)
class Paper:
    """One paper as ingested from a dump."""

    id: str
    title: str
    abstract: str
    arxiv_id: str | None = None
    listed_on: date | None = None
    code_links: tuple[str, ...] = field(default_factory=tuple)
    upvotes: int | None = None
    listing_rank: int | None = None  # position in its listing, 1 = first
    authors: tuple[str, ...] = field(default_factory=tuple)  # as listed; empty when unknown
    version: int | None = None  # arXiv version number (the "v2" of 2409.11074v2), metadata only
    source: str | None = None  # listing kind it came from: "page", "daily-papers", "arxiv-rss", ...
    abstract_is_summary: bool = False  # the abstract is a generated summary, not the authors'

    @property
    def link(self) -> str:
        """The paper's page where the arXiv id is known, else a search for its title."""
        if self.arxiv_id:
            return f"https://arxiv.org/abs/{self.arxiv_id}"
        return "https://arxiv.org/search/?searchtype=title&query=" + quote_plus(self.title)
