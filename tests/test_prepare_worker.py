"""Digests prepared in a worker process: the same digests, failures kept per subscriber,
a killed worker noticed, and no worker left behind by a stopped daemon.

The in-process tests lower ``jobs.PREPARE_WORKER_MIN`` so a dozen subscribers use a
worker (a real forked process with its own read-only connection); the daemon test
runs ``digest run`` over enough subscribers to pass the real threshold.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import signal
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import time_machine

from digest.daemon import Outcome
from digest.daemon import jobs as jobs_module
from digest.daemon.prepare_worker import PrepareWorkers
from digest.store import Store

from .daemon_helpers import (
    Sim,
    daemon_process,
    fill_inbox,
    recipient,
    utc,
    wait_until,
    write_daemon_config,
)
from .smtp_helpers import (  # noqa: F401  (smtp_server_fixture provides the smtp_server fixture)
    SmtpServer,
    StartServer,
    smtp_server_fixture,
)

INTERESTS = [["domain adaptation"], ["language model alignment", "preference optimization"],
             ["diffusion models"], ["reinforcement learning"], [], ["speech recognition"],
             ["graph neural networks"], ["image segmentation", "object detection"]]
INGESTED = utc("2026-03-01 12:00")
SEND = utc("2026-03-02 08:00")


def subscribers(count: int) -> list[dict[str, Any]]:
    return [{"email": f"reader{n:03d}@example.org", "send_at": "08:00",
             "interests": INTERESTS[n % len(INTERESTS)]} for n in range(count)]


def make_state(folder: Path, server: SmtpServer, count: int, workers: int,
               **smtp: Any) -> Sim:
    """``count`` subscribers over the sample dumps; a third of them with likes and skips."""
    folder.mkdir(parents=True, exist_ok=True)
    fill_inbox(folder)
    config = write_daemon_config(folder, port=server.port, subscribers=subscribers(count),
                                 digest={"prepare_workers": workers}, smtp=smtp)
    sim = Sim(config)
    sim.ingest(INGESTED)
    papers = sorted(p.id for p in sim.store.all_papers())
    with time_machine.travel(INGESTED, tick=False):
        for n in range(0, count, 3):
            email = f"reader{n:03d}@example.org"
            for k, paper in enumerate(papers[n % 7::11][:4]):
                sim.store.add_feedback(email, paper, "like" if k % 2 == 0 else "skip",
                                       source="reply")
    return sim


@pytest.fixture(name="few_make_a_worker")
def few_make_a_worker_fixture(monkeypatch: pytest.MonkeyPatch) -> None:
    """A dozen subscribers are enough for a worker here (the real threshold is larger)."""
    monkeypatch.setattr(jobs_module, "PREPARE_WORKER_MIN", 2)


def normalised(raw: bytes, token: str) -> bytes:
    """The message bytes with what is new per digest (token, Message-ID, Date) blanked."""
    boundary = hashlib.sha256(token.encode()).hexdigest()[:32].encode()
    text = raw.replace(token.encode(), b"TOKEN").replace(boundary, b"BOUNDARY")
    text = re.sub(rb"(?m)^Date: .*\r?\n", b"Date: DATE\n", text)
    return text


def digests(sim: Sim, server: SmtpServer) -> dict[str, tuple[Any, ...]]:
    """Per recipient: the digest's items as the store holds them and its normalised bytes."""
    received = {recipient(m.message): m.raw for m in server.messages}
    result: dict[str, tuple[Any, ...]] = {}
    for email, raw in received.items():
        [row] = sim.store.digests_of(email)
        items = [(i.position, i.paper_id, round(i.score, 9), i.reason, i.explore)
                 for i in sim.store.digest_items(row.id)]
        result[email] = (row.local_date, row.considered, items, normalised(raw, row.token))
    return result


def test_a_worker_prepares_the_same_digests_as_the_loop(
        tmp_path: Path, smtp_server: StartServer, few_make_a_worker: None,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="digest.daemon.jobs")
    in_loop, in_worker = smtp_server(), smtp_server()
    loop_sim = make_state(tmp_path / "loop", in_loop, 12, workers=0)
    worker_sim = make_state(tmp_path / "worker", in_worker, 12, workers=1)
    assert [o.status for o in loop_sim.tick(SEND)] == ["sent"] * 12
    assert "dispatch: 1 prepare worker(s) for 12 subscribers" not in caplog.text
    assert [o.status for o in worker_sim.tick(SEND)] == ["sent"] * 12
    assert "dispatch: 1 prepare worker(s) for 12 subscribers" in caplog.text
    expected, got = digests(loop_sim, in_loop), digests(worker_sim, in_worker)
    assert len(expected) == 12
    # Papers, order, scores, reasons, exploration, and the bytes (levels included).
    assert got == expected
    assert any(b"relevan" in d[3].lower() for d in got.values())  # some levels were given
    loop_sim.close()
    worker_sim.close()


def _failing_rank(real: Any, interest: str) -> Any:
    def rank(index: Any, profile: Any, *args: Any, **kwargs: Any) -> Any:
        if interest in profile.interests:
            raise ValueError(f"a bug in ranking for {interest!r}")
        return real(index, profile, *args, **kwargs)
    return rank


def test_a_failure_in_the_worker_fails_that_subscriber_with_the_loops_reason(
        tmp_path: Path, smtp_server: StartServer, few_make_a_worker: None,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # Patched before the fork: the worker inherits it, as it inherits all the code.
    monkeypatch.setattr(jobs_module, "rank", _failing_rank(jobs_module.rank, "diffusion models"))
    results: dict[int, list[Outcome]] = {}
    for workers in (0, 1):
        server = smtp_server()
        sim = make_state(tmp_path / f"w{workers}", server, 12, workers=workers)
        results[workers] = sim.tick(SEND)
        failed = {o.subscriber for o in results[workers] if o.status == "failed"}
        assert failed == {"reader002@example.org", "reader010@example.org"}
        assert sorted(recipient(m.message) for m in server.messages) == sorted(
            o.subscriber for o in results[workers] if o.status == "sent")
        sim.close()
    assert results[1] == results[0]  # statuses and the readable reasons, in order
    assert ("ValueError: a bug in ranking for 'diffusion models'"
            in [o.detail for o in results[1]])
    assert caplog.text.count("subscriber reader002@example.org: the digest failed: "
                             "ValueError: a bug in ranking") == 2


def test_a_worker_killed_mid_dispatch_is_noticed_and_everyone_gets_one_message(
        tmp_path: Path, smtp_server: StartServer, few_make_a_worker: None,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    dispatcher = os.getpid()
    real = jobs_module.rank

    def rank(index: Any, profile: Any, *args: Any, **kwargs: Any) -> Any:
        if os.getpid() != dispatcher and "speech recognition" in profile.interests:
            os.kill(os.getpid(), signal.SIGKILL)  # the worker dies as the OOM killer kills
        return real(index, profile, *args, **kwargs)

    monkeypatch.setattr(jobs_module, "rank", rank)
    server = smtp_server()
    sim = make_state(tmp_path, server, 40, workers=1)
    outcomes = sim.tick(SEND)
    assert Counter(o.status for o in outcomes) == {"sent": 40}
    assert Counter(recipient(m.message) for m in server.messages) == {
        f"reader{n:03d}@example.org": 1 for n in range(40)}
    assert "ended unexpectedly (killed by SIGKILL)" in caplog.text
    assert [r.status for r in sim.store.unsent_digests()] == []
    sim.close()


def test_a_worker_that_cannot_open_the_database_leaves_the_preparing_to_the_loop(
        tmp_path: Path, smtp_server: StartServer, few_make_a_worker: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    def no_reader(path: Any) -> Store:
        raise jobs_module.StoreError(f"{path}: cannot open the state database to read: no")

    monkeypatch.setattr(jobs_module.Store, "reader", staticmethod(no_reader))
    server = smtp_server()
    sim = make_state(tmp_path, server, 12, workers=1)
    assert Counter(o.status for o in sim.tick(SEND)) == {"sent": 12}
    assert len(server.messages) == 12
    sim.close()


def test_the_pipeline_is_bounded_and_answers_every_job_once() -> None:
    async def run() -> tuple[list[int], int]:
        workers: PrepareWorkers[int, int] = PrepareWorkers(
            lambda job: job * job, lambda: None, count=2, ahead=5, chunk=2)
        workers.start()
        answered: list[int] = []
        most = 0
        try:
            for job in range(50):
                while workers.full:
                    _, asked, answer = await workers.next()
                    assert answer == asked * asked
                    answered.append(asked)
                workers.submit(job, job)
                most = max(most, workers.outstanding)
            while workers.outstanding:
                answered.append((await workers.next())[1])
        finally:
            await workers.close()
        assert all(not os.path.exists(f"/proc/{pid}") or _zombie_or_gone(pid)
                   for pid in workers.pids)
        return answered, most

    answered, most = asyncio.run(run())
    assert sorted(answered) == list(range(50))
    assert most <= 5


def test_a_stalled_worker_is_killed_and_its_jobs_come_back(
        caplog: pytest.LogCaptureFixture) -> None:
    """A worker that answers nothing (stopped with SIGSTOP) is killed after stall_seconds;
    every job it held comes back unanswered (None), to be prepared by the caller."""
    async def run() -> tuple[list[tuple[int, int | None]], list[int]]:
        workers: PrepareWorkers[int, int] = PrepareWorkers(
            lambda job: job * job, lambda: None, count=1, ahead=8, chunk=4, stall_seconds=1.0)
        workers.start()
        pids = workers.pids
        os.kill(pids[0], signal.SIGSTOP)
        got: list[tuple[int, int | None]] = []
        try:
            for job in range(6):
                workers.submit(job, job)
            workers.flush()
            while workers.outstanding:
                _, asked, answer = await workers.next()
                got.append((asked, answer))
        finally:
            await workers.close()
        return got, pids

    got, pids = asyncio.run(run())
    assert sorted(asked for asked, _ in got) == list(range(6))
    assert all(answer is None for _, answer in got)
    assert _zombie_or_gone(pids[0])
    assert f"prepare worker {pids[0]} answered nothing for 1s" in caplog.text


def test_jobs_of_one_affinity_go_to_one_worker_while_the_load_is_even() -> None:
    """Equal affinities (memo keys shared) meet in one worker's memos; two affinities in
    turn keep the loads even, so no job is sent elsewhere."""
    async def run() -> dict[int, set[int]]:
        workers: PrepareWorkers[int, int] = PrepareWorkers(
            lambda job: os.getpid(), lambda: None, count=2, ahead=40, chunk=4, in_pipe=40,
            affinity=lambda job: job % 2)
        workers.start()
        pids: dict[int, set[int]] = {0: set(), 1: set()}
        try:
            for job in range(40):
                workers.submit(job, job)
            while workers.outstanding:
                _, job, pid = await workers.next()
                assert pid is not None
                pids[job % 2].add(pid)
        finally:
            await workers.close()
        return pids

    pids = asyncio.run(run())
    assert len(pids[0]) == len(pids[1]) == 1
    assert pids[0] != pids[1]


def test_one_affinity_alone_still_keeps_every_worker_busy() -> None:
    """Every job naming the same worker: past ``slack`` jobs more than the other (or the
    other running low) they go to the other."""
    async def run() -> Counter[int]:
        workers: PrepareWorkers[int, int] = PrepareWorkers(
            lambda job: os.getpid(), lambda: None, count=2, ahead=40, chunk=4, in_pipe=40,
            affinity=lambda job: 0, slack=8)
        workers.start()
        got: Counter[int] = Counter()
        try:
            for job in range(40):
                workers.submit(job, job)
            while workers.outstanding:
                _, _, pid = await workers.next()
                assert pid is not None
                got[pid] += 1
        finally:
            await workers.close()
        return got

    got = asyncio.run(run())
    assert len(got) == 2
    assert abs(got.most_common()[0][1] - got.most_common()[1][1]) <= 8


def test_a_worker_out_of_jobs_takes_the_last_queued_ones_of_the_other(
        caplog: pytest.LogCaptureFixture) -> None:
    """A dispatch's last jobs are spread: the worker with nothing queued takes the queued
    jobs of the busy one (here stopped: its two in the pipe come back after the stall)."""
    async def run() -> tuple[list[tuple[int, int | None]], int]:
        workers: PrepareWorkers[int, int] = PrepareWorkers(
            lambda job: job * job, lambda: None, count=2, ahead=10, chunk=20, in_pipe=2,
            affinity=lambda job: 0, slack=100, stall_seconds=1.0)
        workers.start()
        stopped = workers.pids[0]
        os.kill(stopped, signal.SIGSTOP)
        got: list[tuple[int, int | None]] = []
        try:
            for job in range(10):
                workers.submit(job, job)
            while workers.outstanding:
                _, asked, answer = await workers.next()
                got.append((asked, answer))
        finally:
            await workers.close()
        return got, stopped

    got, stopped = asyncio.run(run())
    assert sorted(asked for asked, answer in got if answer is None) == [0, 1]
    assert sorted(asked for asked, answer in got if answer is not None) == list(range(2, 10))
    assert all(answer == asked * asked for asked, answer in got if answer is not None)
    assert f"prepare worker {stopped} answered nothing for 1s" in caplog.text


def _zombie_or_gone(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return "\nState:\tZ" in status


def _children(pid: int) -> set[int]:
    """The live child processes of ``pid`` (from /proc/*/stat's parent field)."""
    found: set[int] = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not _zombie_or_gone(pid)


@pytest.mark.parametrize("who", ["daemon", "group"])
def test_sigterm_mid_dispatch_ends_the_worker_and_leaves_none_behind(
        tmp_path: Path, smtp_server: StartServer, who: str) -> None:
    # A slow relay keeps the dispatch long; enough subscribers for the real threshold.
    server = smtp_server(delay=0.05)
    count = jobs_module.PREPARE_WORKER_MIN + 20
    fill_inbox(tmp_path)
    due = (datetime.now(UTC) - timedelta(minutes=2)).strftime("%H:%M")  # due at the start
    config = write_daemon_config(tmp_path, port=server.port, subscribers=[
        {**sub, "send_at": due} for sub in subscribers(count)],
        digest={"prepare_workers": 1}, smtp={"connections": 1})
    with daemon_process(config, tmp_path / "daemon.log") as daemon:
        wait_until(lambda: len(server.messages) >= 3, timeout=120, what="the dispatch to start")
        workers = _children(daemon.proc.pid)
        assert len(workers) == 1, daemon.log()
        [worker] = workers
        daemon.signal(signal.SIGTERM)
        if who == "group":  # as systemd stops a service: every process of it at once
            os.kill(worker, signal.SIGTERM)
        assert daemon.wait_exit(timeout=60) == 0, daemon.log()
        log = daemon.log()
    time.sleep(0.2)
    assert not _alive(worker), log
    assert "Traceback" not in log
    assert "ended unexpectedly" not in log  # a stop is not a crash
    copies = Counter(recipient(m.message) for m in server.messages)
    assert set(copies.values()) == {1}
    assert len(copies) < count  # stopped midway: the rest waits for the next start


def test_the_bench_counts_the_workers_cpu_and_memory(capsys: pytest.CaptureFixture[str]) -> None:
    from digest.cli import main

    from .helpers import require_shared

    data = require_shared("data", "hf-daily-papers.jsonl")
    count = jobs_module.PREPARE_WORKER_MIN + 10
    assert main(["bench", "dispatch", "--subscribers", str(count), "--days", "2", "--runs", "1",
                 "--prepare-workers", "1", "--data", str(data)]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["delivered_exactly_once"] is True and result["prepare_workers"] == 1
    assert result["worker_cpu_s"] > 0 and result["worker_peak_rss_mb"] > 0
    # Its own pages (sampled while it lives: a short one may end unseen) are part of its RSS.
    assert 0 <= result["worker_private_peak_mb"] <= result["worker_peak_rss_mb"]
    assert result["cpu_s"] >= result["dispatch_cpu_s"] + result["worker_cpu_s"] - 0.02
    assert "its prepare worker(s): 1" in out
    assert main(["bench", "dispatch", "--subscribers", "3", "--prepare-workers", "17",
                 "--data", str(data)]) == 1


def test_a_signal_sent_to_the_worker_alone_is_not_the_daemons(
        tmp_path: Path, smtp_server: StartServer) -> None:
    # The worker inherits the daemon's event loop; a signal to it must not reach that loop.
    server = smtp_server(delay=0.02)
    count = jobs_module.PREPARE_WORKER_MIN + 20
    fill_inbox(tmp_path)
    due = (datetime.now(UTC) - timedelta(minutes=2)).strftime("%H:%M")
    config = write_daemon_config(tmp_path, port=server.port, subscribers=[
        {**sub, "send_at": due} for sub in subscribers(count)],
        digest={"prepare_workers": 1}, smtp={"connections": 1})
    with daemon_process(config, tmp_path / "daemon.log") as daemon:
        wait_until(lambda: len(server.messages) >= 3, timeout=120, what="the dispatch to start")
        [worker] = _children(daemon.proc.pid)
        os.kill(worker, signal.SIGHUP)  # ignored by the worker: no reload of the daemon
        time.sleep(0.2)
        os.kill(worker, signal.SIGTERM)  # the worker ends; the dispatch goes on without it
        wait_until(lambda: len(server.messages) >= count, timeout=180,
                   what="every digest, prepared in the daemon after the worker ended")
        time.sleep(0.5)
        log = daemon.log()
        assert daemon.proc.poll() is None, log
    assert "SIGHUP received" not in log and "SIGTERM received" not in log
    assert "ended by a signal (killed by SIGTERM)" in log
    assert Counter(recipient(m.message) for m in server.messages) == {
        sub["email"]: 1 for sub in subscribers(count)}
    assert not _alive(worker)


def test_no_worker_is_forked_for_a_day_known_to_have_no_new_papers(
        tmp_path: Path, smtp_server: StartServer, few_make_a_worker: None,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="digest.daemon.jobs")
    server = smtp_server()
    sim = make_state(tmp_path, server, 12, workers=1)
    assert Counter(o.status for o in sim.tick(SEND)) == {"sent": 12}
    next_day = SEND + timedelta(days=1)
    # The next day has no new papers: a worker finds them all empty, once.
    assert Counter(o.status for o in sim.tick(next_day)) == {"empty": 12}
    assert caplog.text.count("prepare worker(s) for 12 subscribers") == 2
    # Every later tick that day knows it: nothing to prepare, no fork.
    assert Counter(o.status for o in sim.tick(next_day + timedelta(minutes=10))) == {"empty": 12}
    assert caplog.text.count("prepare worker(s) for") == 2
    assert len(server.messages) == 12
    sim.close()


# Starts one worker and waits for a first answer (its signal handlers are in place), sends it
# SIGINT, then asks again: prints "answered" when the worker lived through the SIGINT,
# "died" when the job came back unanswered.
_SIGINT_SCRIPT = """
import asyncio, os, signal, time
from digest.daemon.prepare_worker import PrepareWorkers

async def main():
    workers = PrepareWorkers(lambda job: job + 1, lambda: None, count=1)
    workers.start()
    try:
        workers.submit(0, 1)
        assert (await workers.next())[2] == 2
        os.kill(workers.pids[0], signal.SIGINT)
        time.sleep(0.5)
        workers.submit(1, 41)
        _, _, answer = await workers.next()
        print("answered" if answer == 42 else "died", flush=True)
    finally:
        await workers.close()

asyncio.run(main())
"""


@pytest.mark.parametrize("ignored", [True, False])
def test_a_sigint_the_parent_ignores_stays_ignored_in_the_worker(ignored: bool) -> None:
    """Started with SIGINT ignored (nohup-style wrappers, ``trap '' INT``), the worker lives
    through a SIGINT and answers; otherwise a SIGINT ends it (its job comes back unanswered)."""
    import subprocess
    import sys

    def ignore_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    done = subprocess.run([sys.executable, "-c", _SIGINT_SCRIPT], capture_output=True,
                          text=True, timeout=60, check=False,
                          preexec_fn=ignore_sigint if ignored else None)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ("answered" if ignored else "died"), done.stderr


def test_the_free_heap_is_given_back_before_a_fork() -> None:
    """Freed C-heap pages a worker would inherit (and count in its RSS) go back to the system."""
    import gc
    from pathlib import Path

    from digest.daemon import prepare_worker

    if prepare_worker._malloc_trim() is None:
        pytest.skip("this C library has no malloc_trim: nothing is given back (by design)")

    def rss_mb() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        pytest.skip("no /proc/self/status here")

    gc.collect()
    prepare_worker.release_free_heap()
    # 1,000-byte blocks come from malloc (not Python's small-object allocator); keeping
    # one in 64 pins the heap's top, so free() alone returns nothing to the system.
    blocks = [bytes(1000) for _ in range(150_000)]
    kept = blocks[::64]
    del blocks
    held = rss_mb()
    prepare_worker.release_free_heap()
    assert rss_mb() < held - 60  # of the ~140 MB freed, most whole pages went back
    assert len(kept) > 0


def test_a_worker_answers_the_claim_and_the_bytes_not_the_ranked_papers(
        tmp_path: Path, smtp_server: StartServer) -> None:
    """Issue 13: what crosses the pipe per digest is the message and the rows to claim (ids,
    scores, reasons), not the papers (abstracts, authors) the dispatching process would
    unpickle and free without using."""
    import pickle

    sim = make_state(tmp_path, smtp_server(), 3, workers=1)
    side = jobs_module._WorkerSide(sim.runtime, SEND)
    side.runtime = sim.runtime  # what ``setup`` gives a forked worker, without the fork
    with time_machine.travel(SEND, tick=False):
        answer = side.build(jobs_module.PrepareJob(sim.config.subscribers[0], SEND.date()))
    assert isinstance(answer, jobs_module.Ready) and answer.shown > 0
    sent = pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL)
    assert b"digest.paper" not in sent
    assert len(sent) < len(answer.data) + 2048, (len(sent), len(answer.data))
    sim.close()


# Starts a worker and signals it at once, before it can have put its own handlers in place,
# 20 times, under an event loop that handles SIGTERM as the daemon does; prints how many of
# those signals the parent's loop took for its own.
_FORK_WINDOW_SCRIPT = """
import asyncio, os, signal
from digest.daemon.prepare_worker import PrepareWorkers

async def main():
    seen = []
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, seen.append, 1)
    for _ in range(20):
        workers = PrepareWorkers(lambda job: job + 1, lambda: None, count=1)
        workers.start()
        os.kill(workers.pids[0], signal.SIGTERM)
        await asyncio.sleep(0.05)
        await workers.close()
    await asyncio.sleep(0.2)
    print(len(seen), flush=True)

asyncio.run(main())
"""


def test_a_signal_sent_to_a_worker_as_it_is_forked_is_not_the_daemons() -> None:
    """A stop's SIGTERM to a worker just forked (before its own handlers are in place) ran the
    inherited handler and reached the daemon's loop as a second SIGTERM: exit 143 at once."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _FORK_WINDOW_SCRIPT], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0", done.stderr


def test_a_stop_during_the_corpus_fit_forks_no_worker(
        tmp_path: Path, smtp_server: StartServer, few_make_a_worker: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The fit before the fork takes seconds: a SIGTERM meanwhile forks nothing (the README:
    no worker is forked for a dispatch that is stopping)."""
    server = smtp_server()
    sim = make_state(tmp_path, server, 12, workers=1)
    fitted: list[bool] = []
    refresh = sim.runtime.refresh_corpus_index

    async def fit_then_stop() -> None:
        await refresh()
        fitted.append(True)  # the stop comes while the index is fitted

    monkeypatch.setattr(sim.runtime, "refresh_corpus_index", fit_then_stop)
    workers = asyncio.run(jobs_module._start_workers(sim.runtime, SEND, 12, False,
                                                     lambda: bool(fitted)))
    assert fitted and workers is None
    sim.close()
