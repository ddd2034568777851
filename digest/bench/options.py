"""Option choices of ``digest bench learning``, apart from the benchmark itself.

The CLI builds its parser from these on every command, so they live in a
module that imports nothing: ``digest.bench.learning`` pulls in the daemon
and the ranking stack (about a second of imports that ``check-config`` and
``--help`` would otherwise pay).
"""

VARIANTS = ("like-skip", "like-only", "top5")
DEFAULT_DAYS = 15  # digests per simulated reader
DEFAULT_READERS = 40  # simulated readers per group

# ``digest bench corpus``: the names of ``digest.bench.corpus.METHODS`` (a test keeps the two
# the same; that module imports the ranking stack).
CORPUS_METHODS = ("all", "cap-50k", "window-8k", "window-8k-cap-50k", "sample-8k-cap-50k",
                  "window-4k-cap-50k", "shipped")
DEFAULT_CORPUS_METHODS = ("all", "shipped")
