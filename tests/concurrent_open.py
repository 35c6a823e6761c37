"""Open one study store from several processes at the same instant (test helper).

Each process imports catdog_hpo.search.storage, says it is ready, waits for a shared "go" file and
then calls open_storage: that is the moment several machines started together meet an empty
store. Used by tests/test_faults.py (SQLite) and tests/test_postgres.py (PostgreSQL, MariaDB).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

_OPENER = """
import sys, time
from pathlib import Path
from catdog_hpo.errors import UserError
from catdog_hpo.search.storage import open_storage

url, ready, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
ready.touch()
while not go.exists():
    time.sleep(0.005)
try:
    open_storage(url).engine.dispose()
    print("ok")
except UserError as exc:
    print(exc)
"""


def open_at_once(url: str, k: int, folder: Path, timeout: float = 120) -> list[str]:
    """``k`` processes call open_storage(url) at once; each one's outcome ("ok" or the error)."""
    folder.mkdir(parents=True, exist_ok=True)
    go = folder / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _OPENER, url, str(folder / f"ready{i}"), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(k)]
    deadline = time.time() + timeout
    while not all((folder / f"ready{i}").exists() for i in range(k)):
        if time.time() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            raise RuntimeError("the opener processes did not start: "
                               + " | ".join(p.communicate()[0] for p in procs))
        time.sleep(0.02)
    go.touch()
    outputs = [p.communicate(timeout=timeout)[0].strip() for p in procs]
    return [(out.splitlines() or ["<no output>"])[-1] for out in outputs]
