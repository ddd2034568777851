"""Issue 8 review: a lock file that cannot be written (a full disk) is one ``Error:`` line.

The full disk is real, not mocked: the command runs in a child process whose
file-size limit (RLIMIT_FSIZE) is 0, so writing the lock file's first byte
fails with EFBIG as a write to a full disk fails with ENOSPC (Python ignores
SIGXFSZ, so the write returns the error instead of killing the process).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from digest.bench.faults_config import config_text, seed_state

CHILD = """
import resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
from digest.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_run_on_a_disk_that_cannot_take_the_lock_file_says_so_in_one_line(
        tmp_path: Path) -> None:
    config = tmp_path / "digest.toml"
    config.write_text(config_text({"smtp": ['sink = "outbox"']}, drop=("host",)))
    seed_state(tmp_path / "state" / "digest.sqlite3")  # written before the limit applies
    done = subprocess.run([sys.executable, "-c", CHILD, "--config", str(config), "run"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          check=False)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [(f"Error: {tmp_path}/state/digest.sqlite3.lock: cannot write the lock "
                      "file: File too large")], done.stderr
