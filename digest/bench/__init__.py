"""Benchmarks and campaigns behind ``digest bench ...``: each prints a table and one JSON line.

Modules: ``ingest`` (ingestion speed), ``dispatch`` (one day's dispatch to N
subscribers beside raw SMTP), ``quality`` (ranking quality on the
public datasets), ``replies`` (reply processing speed against a private
Dovecot), ``faults`` (the fault campaign: hostile inputs, crashes, servers
that misbehave). Nothing here is imported by the daemon.
"""
