"""catdog_hpo.files: atomic writes leave the old file or the whole new one; the file lock excludes."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from catdog_hpo.files import atomic_write, file_lock


def test_atomic_write_text_bytes_and_writer(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "f.txt"
    atomic_write(target, "héllo\n")
    assert target.read_text(encoding="utf-8") == "héllo\n"
    atomic_write(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    atomic_write(target, lambda tmp: tmp.write_text("by writer"))
    assert target.read_text() == "by writer"
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.txt"]  # no temp file left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "model.onnx"
    target.write_text("old")
    seen: list[Path] = []

    def broken(tmp: Path) -> None:
        seen.append(tmp)
        tmp.write_text("half")
        raise RuntimeError("exporter failed")

    with pytest.raises(RuntimeError, match="exporter failed"):
        atomic_write(target, broken, keep_suffix=True)
    assert target.read_text() == "old"
    assert seen[0].suffix == ".onnx" and seen[0].parent == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


_HOLD = """
import sys, time
from catdog_hpo.files import file_lock
with file_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_file_lock_excludes_another_process(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(lock), "1.0"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with file_lock(lock):
            waited = time.monotonic() - started
        assert waited > 0.3  # it waited for the holder (which keeps the lock ~1 s after printing)
    finally:
        holder.wait(timeout=30)
    assert lock.exists()  # the lock file stays, so later waiters lock the same inode


def test_best_effort_lock_goes_on_where_the_lock_file_cannot_be_made(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder" / "x.lock"
    with file_lock(missing, best_effort=True):
        pass
    assert not missing.exists()
