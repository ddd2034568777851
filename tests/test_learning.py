"""`digest bench learning` on a small dataset written here: three topics, readers who each want
one of them. Real dispatch through the SMTP sink, real replies through a Maildir."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from digest.bench.learning import choose_readers, plan_listings, reply_body, run_learning
from digest.bench.quality import load_dataset
from digest.cli import main

TOPICS = {
    "birds": "wetland heron migration plumage nesting songbird flock warbler estuary",
    "chips": "transistor lithography wafer silicon etching photoresist doping foundry",
    "bread": "sourdough leaven gluten crumb proofing rye starter baking oven",
}
COMMON = "study results method analysis data approach evaluation model paper new"


def write_dataset(folder: Path, *, users_per_topic: int = 2, per_topic: int = 60) -> Path:
    rng = random.Random(7)
    folder.mkdir()
    papers, by_topic = [], {}
    for topic, words in TOPICS.items():
        vocab = words.split()
        by_topic[topic] = []
        for n in range(per_topic):
            pid = f"{topic}-{n}"
            title = " ".join(rng.sample(vocab, 3)).title() + f" number {n} {topic}"
            abstract = " ".join(rng.choices(vocab, k=25) + rng.choices(COMMON.split(), k=15))
            papers.append({"id": pid, "title": title, "abstract": abstract, "date": None})
            by_topic[topic].append(pid)
    cases = []
    for topic, ids in by_topic.items():
        for u in range(users_per_topic):
            own = ids[u * 14:(u + 1) * 14]
            others = [p["id"] for p in papers if not p["id"].startswith(topic)]
            candidates = own[7:] + rng.sample(others, 20)
            rng.shuffle(candidates)
            cases.append({"case": f"{topic}{u}", "user": f"{topic}{u}", "liked": own[:7],
                          "skipped": [], "candidates": candidates, "relevant": own[7:]})
    (folder / "papers.jsonl").write_text("\n".join(json.dumps(p) for p in papers))
    (folder / "cases.jsonl").write_text("\n".join(json.dumps(c) for c in cases))
    (folder / "meta.json").write_text(json.dumps({"name": "three-topics", "source": "test",
                                                  "protocol": "test", "counts": {}, "seed": 7}))
    return folder


def test_readers_and_listings_are_planned_deterministically(tmp_path: Path) -> None:
    dataset = load_dataset(write_dataset(tmp_path / "ds"))
    readers = choose_readers(dataset, 4)
    assert readers == choose_readers(dataset, 4)
    assert all(len(r.library) == 13 and r.seed not in r.library for r in readers)
    background, listings = plan_listings(dataset, readers, 3)
    assert (background, listings) == plan_listings(dataset, readers, 3)
    listed = [p for day in listings for p in day]
    assert len(listed) == len(set(listed)) and not set(listed) & set(background)
    assert {r.seed for r in readers} <= set(background)
    wanted = {p for r in readers for p in r.library}
    assert wanted <= set(listed)  # every hidden paper is listed on some day


def test_reply_bodies_per_variant() -> None:
    wanted = [True, False, False, True, False, False, True]
    assert reply_body("like-skip", wanted) == "like 1 4 7\nskip 2 3 5 6\n\nThanks!\n"
    assert reply_body("like-only", wanted) == "like 1 4 7\n\nThanks!\n"
    assert reply_body("top5", wanted) == "like 1 4\nskip 2 3 5\n\nThanks!\n"
    assert reply_body("like-only", [False] * 10) is None


@pytest.mark.slow
def test_the_closed_loop_learns_and_is_deterministic(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_dataset(tmp_path / "ds")
    first = run_learning(folder, days=3, readers=4, variant="like-skip")
    second = run_learning(folder, days=3, readers=4, variant="like-skip")
    assert first == second
    assert [d["day"] for d in first["per_day"]] == [1, 2, 3]
    # Every item of every replying reader's digest was rated, through real replies.
    assert first["likes"] + first["skips"] == 4 * 10 * 3
    assert first["likes"] > 0
    assert first["hits_oracle"] >= first["hits_replying"] >= first["hits_random"]
    assert first["learning_gain"] == pytest.approx(first["hits_replying"] / first["hits_silent"],
                                                   abs=1e-3)
    assert main(["bench", "learning", "--dataset", str(folder), "--days", "2", "--readers", "2",
                 "--variant", "like-only"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["day", "replying", "silent", "random", "oracle"]
    summary = json.loads(out[-1])
    assert (summary["variant"], summary["days"], summary["readers"], summary["skips"]) == \
        ("like-only", 2, 2, 0)
    assert "learning_gain" in summary
