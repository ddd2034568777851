"""What a paper is, shared by every stage: its identity and its fields.

A paper is identified by its arXiv id when one is known, else by a hash of its
normalised title, so the same paper listed in two dumps is one paper. arXiv ids
are normalised here (DESIGN.md "Dump formats"): every written form of an id
(``2409.11074v2``, ``arXiv:2409.11074``, an abs or PDF link, old-style
``hep-th/9901001``) is one paper; the version is metadata.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass, field
from datetime import date
from urllib.parse import quote_plus

# The archives of old-style ids (before April 2007), so that "hello/0611846" is no id.
OLD_ARCHIVES = (
    "acc-phys", "adap-org", "alg-geom", "ao-sci", "astro-ph", "atom-ph", "bayes-an",
    "chao-dyn", "chem-ph", "cmp-lg", "comp-gas", "cond-mat", "cs", "dg-ga", "funct-an",
    "gr-qc", "hep-ex", "hep-lat", "hep-ph", "hep-th", "math-ph", "math", "mtrl-th", "nlin",
    "nucl-ex", "nucl-th", "patt-sol", "physics", "plasm-ph", "q-alg", "q-bio", "quant-ph",
    "solv-int", "supr-con",
)
# The id itself, new style (YYMM.NNNN until 2014, YYMM.NNNNN since 2015) or old
# style (archive[.SUBJECT-CLASS]/YYMMNNN, until March 2007), then an optional
# version. arXiv's own identifier scheme: https://info.arxiv.org/help/arxiv_identifier.html
_ID_BODY = (r"(?:(?P<new>\d{2}(?:0[1-9]|1[0-2])\.\d{4,5})"
            r"|(?P<archive>" + "|".join(OLD_ARCHIVES) + r")(?:\.[a-z][a-z-]*)?"
            r"/(?P<old>\d{2}(?:0[1-9]|1[0-2])\d{3}))"
            r"(?:v(?P<version>\d{1,4}))?")
# The forms an id is written in: bare, "arXiv:" prefixed, an OAI identifier, or
# a link to its abs, PDF or HTML page (".pdf" and a trailing slash allowed).
_ID_FORMS = re.compile(
    r"(?:arxiv:|oai:arxiv\.org:|(?:https?://)?(?:www\.|export\.)?arxiv\.org/(?:abs|pdf|html)/)?"
    + _ID_BODY + r"(?:\.pdf)?/?",
    re.IGNORECASE,
)
# An id inside a longer text: after "arXiv:", an OAI prefix or an arxiv.org link only,
# so a number in prose (a date, "2409.11074 samples") is never taken for one.
_ID_IN_TEXT = re.compile(
    r"(?:\barxiv:|\boai:arxiv\.org:|arxiv\.org/(?:abs|pdf|html)/)" + _ID_BODY + r"(?![\w.])",
    re.IGNORECASE,
)
_SPACE = re.compile(r"\s+")
_NOT_WORD = re.compile(r"[^\w\s]")


def normalise_title(title: str) -> str:
    """Case-, accent- and punctuation-insensitive form of a title, for identity.

    A title with no letters or digits at all (only emoji or punctuation) keeps
    its symbols, so two such titles stay two papers instead of both becoming "".
    """
    text = title
    if not text.isascii():  # ASCII has no accents to strip: skip the per-character pass
        text = unicodedata.normalize("NFKD", text)
        text = "".join(ch for ch in text if not unicodedata.combining(ch))
    words = _SPACE.sub(" ", _NOT_WORD.sub(" ", text.casefold())).strip()
    if words:
        return words
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", title).casefold()).strip()


@dataclass(frozen=True)
class ArxivId:
    """A normalised arXiv id (no version, no prefix) and the version it was written with."""

    id: str
    version: int | None = None


def _from_match(match: re.Match[str]) -> ArxivId:
    if match.group("new"):
        bare = match.group("new")
    else:  # old style: the archive lower-cased, the subject class dropped (math.GT/0309136)
        bare = f"{match.group('archive').lower()}/{match.group('old')}"
    version = match.group("version")
    return ArxivId(bare, int(version) if version and int(version) > 0 else None)


def parse_arxiv_id(text: str) -> ArxivId | None:
    """The arXiv id ``text`` is, in any written form; None when it is not one.

    ``2409.11074``, ``2409.11074v2``, ``arXiv:2409.11074``,
    ``https://arxiv.org/abs/2409.11074v3``, ``https://arxiv.org/pdf/2409.11074v3.pdf``,
    ``oai:arXiv.org:2409.11074v1``, ``math/0611846v1``, ``hep-th/9901001``,
    ``math.GT/0309136`` -> ``ArxivId("2409.11074", 3)``, ``ArxivId("math/0611846", 1)``...
    """
    match = _ID_FORMS.fullmatch(text.strip())
    return _from_match(match) if match else None


def find_arxiv_id(text: str) -> ArxivId | None:
    """The first arXiv id written in ``text`` as ``arXiv:ID``, an OAI id or an arxiv.org link."""
    match = _ID_IN_TEXT.search(text)
    return _from_match(match) if match else None


def normalise_arxiv_id(text: str) -> str | None:
    """``parse_arxiv_id`` without the version: the id a paper is stored under."""
    parsed = parse_arxiv_id(text)
    return parsed.id if parsed else None


def is_arxiv_id(value: str) -> bool:
    """True for an arXiv id in its normalised form (no prefix, no version)."""
    parsed = parse_arxiv_id(value)
    return parsed is not None and parsed.id == value and parsed.version is None


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
