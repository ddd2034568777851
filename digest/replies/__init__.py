"""Replies stage: subscribers steer their digests by replying to them.

Runs on the daemon's reply tick (and ``digest replies``), after digests were
sent: reads the waiting replies from an IMAP mailbox or a Maildir folder,
parses commands from each reply's new text, checks them against the digest
they answer, appends feedback and reply-set subscription state to the store,
and confirms by email. What it hands on is in the store: the ranking of the
next digest reads the feedback, the dispatch reads the subscription state.

- :mod:`.parse`: one raw reply to sender, digest tokens and commands;
- :mod:`.newtext`: which lines of a reply the subscriber wrote;
- :mod:`.mailboxes`: IMAP (imapclient, IDLE) and Maildir;
- :mod:`.process`: the run: check, apply, record, confirm.
"""

from __future__ import annotations

from .mailboxes import MailboxError, MailboxLoginError
from .parse import Command, ParsedReply, Problem, new_text, parse_reply, parse_text
from .process import ReplyOutcome, ReplyReport, help_text, process_replies, wait_for_replies

__all__ = [
    "Command",
    "MailboxError",
    "MailboxLoginError",
    "ParsedReply",
    "Problem",
    "ReplyOutcome",
    "ReplyReport",
    "help_text",
    "new_text",
    "parse_reply",
    "parse_text",
    "process_replies",
    "wait_for_replies",
]
