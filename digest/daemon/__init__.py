"""The daemon: the jobs that wire the stages together, and the loop that runs them.

``scan`` (inbox -> store) and ``dispatch`` (store -> rank -> render -> send)
are plain functions that both the scheduler of ``digest run`` and the one-shot
CLI commands call, so ``digest send --dry-run`` runs exactly what the daemon's
dispatch runs, minus the SMTP conversation. ``status_report`` is what
``digest status`` shows.

APScheduler is only the timer. Who is due and what was sent live in the
store. A subscriber is due when the latest scheduled send time (their local
``send_at`` on one of their ``days``) has passed, no more than ``max_late``
ago, and no digest exists for that local date (or a later one). A daemon that
was down over a send time therefore sends once when it comes back, whatever
the number of ticks it missed; later than ``max_late`` the day is skipped.

Exactly once: a digest is claimed in the store (with its rendered message)
before the SMTP conversation and marked sent after it. A digest left claimed
(a crash between the two, or a 4xx answer) is resent, byte for byte with the
same Message-ID, on the next dispatch; the daemon reports such digests when it
starts. Only a crash in the instant between the server's "250 OK" and the
commit can make a subscriber receive a message twice, and then both copies
carry the same Message-ID, which mail clients use to de-duplicate.
"""

from .jobs import (
    FATAL_ERRORS,
    FIRST_DIGEST_WINDOW,
    Outcome,
    Prepared,
    Runtime,
    candidate_seq,
    claim,
    deliver,
    dispatch,
    prepare,
    scan,
    select_subscribers,
)
from .loop import STOP_GRACE_SECONDS, Daemon, run_daemon
from .schedule import (
    SCHEDULE_LOOKBACK_DAYS,
    Due,
    due,
    effective_subscriber,
    is_paused,
    latest_send_time,
    local_now,
    next_send_time,
    send_time,
)
from .status import format_status, replies_waiting, status_report, subscriber_status

__all__ = [
    "FATAL_ERRORS", "FIRST_DIGEST_WINDOW", "SCHEDULE_LOOKBACK_DAYS", "STOP_GRACE_SECONDS",
    "Daemon", "Due", "Outcome", "Prepared", "Runtime", "candidate_seq",
    "claim", "deliver", "dispatch", "due", "effective_subscriber",
    "format_status", "is_paused", "latest_send_time", "local_now", "next_send_time",
    "prepare", "replies_waiting", "run_daemon", "scan", "select_subscribers", "send_time",
    "status_report", "subscriber_status",
]
