"""paper-digest: personalised daily digests of trending research papers."""

__version__ = "0.1.0"
