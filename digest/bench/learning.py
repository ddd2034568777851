"""``digest bench learning``: does the model learn from replies? A closed loop, measured.

Simulated readers are users of a ranking dataset (``shared/bench/FORMAT.md``):
a reader's hidden library is every paper they liked or wanted in any of their
cases; the oldest liked paper is their one seed paper (``seed_papers`` in the
config), the rest is what they hope to find. Each reader is subscribed twice:
once replying, once silent (the control group); both get the same listings.

Day 0 ingests a background listing (the seed papers and the corpus papers no
listing uses) and sends everyone a welcome digest, neither counted nor
answered. Days 1..N each ingest one listing (LISTING_SIZE papers: an equal
share of the readers' hidden libraries, the rest other corpus papers, in a
seeded order), written as a page-dump file into the inbox and scanned like any
dump. Then the daemon's own ``dispatch`` sends every digest through the
embedded SMTP sink (rank, render, claim, send: exactly ``digest send``), and
each replying reader answers through a Maildir with real reply emails (token
address, In-Reply-To), which ``process_replies`` applies with the same parser
and store as real replies:

* ``like-skip``: ``like`` the items in their library, ``skip`` the others;
* ``like-only``: ``like`` the items in their library, leave the others unrated;
* ``top5``: read only items 1-5: like those in their library, skip the rest.

Per day: mean hits@10 (digest items in the reader's hidden library) of the
replying and the silent readers, of a random pick of 10 from the same listing
(expected value) and of an oracle (all of the reader's papers in the listing,
up to 10). ``learning_gain`` = replying hits / silent hits over days 2..N
(day 1's digest comes before any reply). Deterministic: the same dataset and
arguments give the same table. No argparse and no printing here.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, time, timedelta
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path
from typing import Any

from ..config import Config, MaildirConfig, SmtpConfig, Subscriber
from ..daemon import Runtime, dispatch, scan
from ..errors import DigestError
from ..mailer import LocalSink
from ..paper import normalise_title
from ..replies import process_replies
from ..replies.mailboxes import MaildirMailbox
from ..store import utc_now
from .ingest import render_page_dump
from .options import DEFAULT_DAYS, DEFAULT_READERS, VARIANTS
from .quality import Dataset, load_dataset

log = logging.getLogger(__name__)

LISTING_SIZE = 100  # a busy day of trending papers; a digest shows a tenth of it
DIGEST_SIZE = 10
MIN_LIBRARY = 10  # a reader needs a seed and enough papers to find over the days
TOP5 = 5  # what a hurried reader looks at
SEED = 20251130  # the listings' order and the readers' choice are fixed by this
DOMAIN = "bench.example.org"


@dataclass(frozen=True)
class Reader:
    user: str
    seed: str  # dataset paper id of the seed paper
    library: frozenset[str]  # dataset paper ids the reader wants (the seed excluded)


@dataclass(frozen=True)
class DayResult:
    day: int
    replying: float  # mean hits@10 of the replying readers
    silent: float
    random: float
    oracle: float
    likes: int  # like signals given that day (all replying readers)
    skips: int


def choose_readers(dataset: Dataset, count: int) -> list[Reader]:
    """Dataset users with a library of at least MIN_LIBRARY papers, in a seeded order."""
    libraries: dict[str, list[str]] = {}
    for case in dataset.cases:
        papers = libraries.setdefault(case.user, [])
        for pid in [*case.liked, *sorted(case.relevant)]:
            if pid not in papers:
                papers.append(pid)
    eligible = sorted((u for u, papers in libraries.items() if len(papers) >= MIN_LIBRARY),
                      key=lambda u: hashlib.sha256(f"{SEED}:{u}".encode()).hexdigest())
    if len(eligible) < count:
        raise DigestError(f"bench learning: {dataset.name} has {len(eligible)} users with "
                          f"{MIN_LIBRARY}+ papers, {count} readers asked for")
    return [Reader(u, libraries[u][0], frozenset(libraries[u][1:])) for u in eligible[:count]]


def plan_listings(dataset: Dataset, readers: Sequence[Reader], days: int
                  ) -> tuple[list[str], list[list[str]]]:
    """(background, listings of days 1..N) as dataset paper ids; deterministic."""
    rng = random.Random(SEED)
    papers = {p.id: p for p in dataset.papers}
    usable = [p.id for p in dataset.papers if p.title.strip() and p.abstract.strip()]
    seen_titles: set[str] = set()
    unique = []
    for pid in usable:  # one paper per title: a page dump identifies papers by title
        key = normalise_title(papers[pid].title)
        if key and key not in seen_titles:
            seen_titles.add(key)
            unique.append(pid)
    allowed = set(unique)
    seeds = {r.seed for r in readers}
    wanted = sorted({p for r in readers for p in r.library if p in allowed} - seeds)
    others = sorted(allowed - set(wanted) - seeds)
    rng.shuffle(wanted)
    rng.shuffle(others)
    listings: list[list[str]] = []
    per_day = -(-len(wanted) // days)
    fill = max(LISTING_SIZE - per_day, 0)
    for d in range(days):
        day = wanted[d * per_day:(d + 1) * per_day] + others[d * fill:(d + 1) * fill]
        rng.shuffle(day)
        listings.append(day)
    background = sorted(seeds & allowed) + others[days * fill:]
    return background, listings


def reply_body(variant: str, wanted: Sequence[bool]) -> str | None:
    """The commands a reader writes for a digest whose items are (not) in their library."""
    shown = list(enumerate(wanted, start=1))
    if variant == "top5":
        shown = shown[:TOP5]
    likes = [str(n) for n, w in shown if w]
    skips = [str(n) for n, w in shown if not w] if variant != "like-only" else []
    lines = ([f"like {' '.join(likes)}"] if likes else []) + \
            ([f"skip {' '.join(skips)}"] if skips else [])
    return "\n".join(lines) + "\n\nThanks!\n" if lines else None


def reply_message(email: str, token: str, message_id: str, body: str, n: int,
                  now: datetime, sender: SmtpConfig) -> bytes:
    message = EmailMessage()
    message["From"] = f"Reader <{email}>"
    message["To"] = sender.reply_to.format(token=token)
    message["Subject"] = "Re: Paper digest"
    message["Date"] = format_datetime(now)
    message["Message-ID"] = f"<learning.{n}@{DOMAIN}>"
    message["In-Reply-To"] = message_id
    message["References"] = message_id
    message.set_content(body)
    return message.as_bytes()


def run_learning(dataset_dir: str | Path, *, days: int = DEFAULT_DAYS,
                 readers: int = DEFAULT_READERS, variant: str = "like-skip",
                 progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the closed loop; returns the per-day results and the summary (see module doc)."""
    if variant not in VARIANTS:
        raise DigestError(f"bench learning: unknown variant {variant!r} "
                          f"(expected one of {', '.join(VARIANTS)})")
    if days < 2 or readers < 1:
        raise DigestError("bench learning: needs at least 2 days and 1 reader")
    dataset = load_dataset(dataset_dir)
    chosen = choose_readers(dataset, readers)
    background, listings = plan_listings(dataset, chosen, days)
    with tempfile.TemporaryDirectory(prefix="digest-bench-learning-") as tmp:
        folder = Path(tmp)
        sink = LocalSink(folder / "outbox")
        sink.start()
        try:
            return asyncio.run(_loop(folder, sink, dataset, chosen, background, listings,
                                     variant, progress))
        finally:
            sink.stop()


def _subscribers(dataset: Dataset, readers: Sequence[Reader]) -> tuple[Subscriber, ...]:
    papers = {p.id: p for p in dataset.papers}
    subs = []
    for group in ("reader", "silent"):
        for n, reader in enumerate(readers):
            seed_title = papers[reader.seed].title
            subs.append(Subscriber(f"{group}{n}@{DOMAIN}", f"{group} {n}",
                                   seed_papers=(seed_title,), send_at=time(8, 0),
                                   max_papers=DIGEST_SIZE))
    return tuple(subs)


async def _loop(folder: Path, sink: LocalSink, dataset: Dataset, readers: Sequence[Reader],
                background: list[str], listings: list[list[str]], variant: str,
                progress: Callable[[str], None] | None) -> dict[str, Any]:
    from ..store import Store

    base = sink.smtp_config()
    smtp = replace(base, sender=f"Paper Digest <digest@{DOMAIN}>",
                   reply_to=f"digest+{{token}}@{DOMAIN}", attempts=2, retry_seconds=0.1)
    config = Config(path=folder / "learning.toml", inbox=folder / "inbox",
                    state=folder / "state.sqlite3", stable_seconds=0.0, smtp=smtp,
                    subscribers=_subscribers(dataset, readers),
                    maildir=MaildirConfig(folder / "replies", confirmations_per_hour=10_000))
    config.inbox.mkdir(parents=True)
    start = datetime.combine(utc_now().date(), time(9, 0), tzinfo=UTC)
    results: list[DayResult] = []
    papers = {p.id: p for p in dataset.papers}
    with Store(config.state) as store:
        runtime = Runtime(config, store)
        store_ids: dict[str, str] = {}
        replies_sent = 0
        for day, listing in enumerate([background, *listings]):
            now = start + timedelta(days=day)
            _write_listing(config.inbox, dataset, now.date(), day, listing)
            scan(runtime)
            by_title = {normalise_title(p.title): p.id for p in store.all_papers()}
            for pid in listing:
                store_ids[pid] = by_title[normalise_title(papers[pid].title)]
            outcomes = await dispatch(runtime, now=now, force=True)
            failed = [o for o in outcomes if o.status not in ("sent",)]
            if failed:
                raise DigestError(f"bench learning: day {day}: {len(failed)} digests not sent "
                                  f"({failed[0].subscriber}: {failed[0].status} "
                                  f"{failed[0].detail})")
            if day == 0:
                continue  # the welcome digest: neither counted nor answered
            listed = {store_ids[p] for p in listing}
            replying, silent, rnd, oracle = [], [], [], []
            likes = skips = 0
            mailbox = MaildirMailbox(config.maildir)  # type: ignore[arg-type]
            with mailbox:
                for n, reader in enumerate(readers):
                    wanted_ids = {store_ids[p] for p in reader.library if p in store_ids}
                    own = len(wanted_ids & listed)
                    rnd.append(DIGEST_SIZE * own / max(len(listed), 1))
                    oracle.append(min(DIGEST_SIZE, own))
                    silent.append(_hits(store, f"silent{n}@{DOMAIN}", now.date(), wanted_ids)[0])
                    hits, wanted, token, message_id = _hits(store, f"reader{n}@{DOMAIN}",
                                                            now.date(), wanted_ids)
                    replying.append(hits)
                    body = reply_body(variant, wanted)
                    if body is None:
                        continue
                    shown = wanted[:TOP5] if variant == "top5" else wanted
                    likes += sum(shown)
                    skips += 0 if variant == "like-only" else len(shown) - sum(shown)
                    replies_sent += 1
                    mailbox.append(reply_message(f"reader{n}@{DOMAIN}", token, message_id, body,
                                                 replies_sent, now, smtp))
            report = await process_replies(config, store, now=now + timedelta(hours=2))
            if report.errors or report.rejected:
                raise DigestError(f"bench learning: day {day}: {report.errors} replies failed, "
                                  f"{report.rejected} rejected")
            results.append(DayResult(day, _mean(replying), _mean(silent), _mean(rnd),
                                     _mean(oracle), likes, skips))
            if progress is not None:
                progress(f"day {day}: replying {results[-1].replying:.2f}, "
                         f"silent {results[-1].silent:.2f}")
    return _summary(dataset.name, variant, len(readers), results)


def _write_listing(inbox: Path, dataset: Dataset, day: date, number: int,
                   listing: list[str]) -> None:
    papers = {p.id: p for p in dataset.papers}
    rows = [{"title": papers[p].title, "abstract": papers[p].abstract} for p in listing]
    (inbox / f"{day.isoformat()}_listing{number:02d}.txt").write_text(
        render_page_dump(day, rows), encoding="utf-8")


def _hits(store: Any, email: str, day: date, wanted: set[str]
          ) -> tuple[int, list[bool], str, str]:
    """Hits of the subscriber's digest of ``day``, which items were wanted, token, Message-ID."""
    digest = store.digest_on(email, day)
    if digest is None:
        raise DigestError(f"bench learning: no digest for {email} on {day}")
    flags = [item.paper_id in wanted for item in store.digest_items(digest.id)]
    return sum(flags), flags, digest.token, digest.message_id


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _summary(name: str, variant: str, readers: int, days: list[DayResult]) -> dict[str, Any]:
    counted = [d for d in days if d.day >= 2]
    replying = sum(d.replying for d in counted)
    silent = sum(d.silent for d in counted)
    return {
        "bench": "learning",
        "dataset": name,
        "variant": variant,
        "days": len(days),
        "readers": readers,
        "learning_gain": round(replying / silent, 4) if silent else None,
        "hits_replying": round(replying, 3),
        "hits_silent": round(silent, 3),
        "hits_random": round(sum(d.random for d in counted), 3),
        "hits_oracle": round(sum(d.oracle for d in counted), 3),
        "likes": sum(d.likes for d in days),
        "skips": sum(d.skips for d in days),
        "per_day": [
            {"day": d.day, "replying": round(d.replying, 3), "silent": round(d.silent, 3),
             "random": round(d.random, 3), "oracle": round(d.oracle, 3)} for d in days],
    }


def format_table(result: dict[str, Any]) -> str:
    """The per-day table: mean hits@10 per reader for each group."""
    lines = [f"{'day':>4}{'replying':>10}{'silent':>9}{'random':>9}{'oracle':>9}"]
    for d in result["per_day"]:
        lines.append(f"{d['day']:>4}{d['replying']:>10.2f}{d['silent']:>9.2f}"
                     f"{d['random']:>9.2f}{d['oracle']:>9.2f}")
    lines.append(f"days 2-{result['days']} (sum of mean hits@10): replying "
                 f"{result['hits_replying']:.2f}, silent {result['hits_silent']:.2f}, random "
                 f"{result['hits_random']:.2f}, oracle {result['hits_oracle']:.2f}; "
                 f"learning_gain {result['learning_gain']} ({result['variant']}, "
                 f"{result['readers']} readers, {result['likes']} likes, "
                 f"{result['skips']} skips)")
    return "\n".join(lines)


__all__ = ["VARIANTS", "choose_readers", "format_table", "plan_listings", "reply_body",
           "run_learning"]
