"""The one home for atomic file writes and cross-process file locks.

``atomic_write`` writes to a unique temp file in the target's folder, then ``os.replace``s it
into place: a reader sees the old file or the whole new one, never half (a crash leaves at most
a stray ``.tmp`` file, removed on the next failure path). ``file_lock`` is an exclusive lock
between processes on one machine (``flock`` through the ``filelock`` package, which also works
on Windows); the lock file stays in place so every waiter locks the same inode.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path


def temp_path(path: Path, *, keep_suffix: bool = False) -> Path:
    """A unique hidden sibling of ``path`` ending in ``.tmp``, or in ``.tmp<suffix>``."""
    path = Path(path)
    unique = f"{os.getpid()}.{secrets.token_hex(4)}"
    if keep_suffix:
        return path.with_name(f".{path.stem}.{unique}.tmp{path.suffix}")
    return path.with_name(f".{path.name}.{unique}.tmp")


def atomic_write(path: Path, content: bytes | str | Callable[[Path], None], *,
                 encoding: str = "utf-8", keep_suffix: bool = False) -> None:
    """Write ``content`` to ``path`` atomically (creating the folder).

    ``content`` is the file's bytes, its text (written with ``encoding``), or a writer called
    with the temp path that must create the file there (``torch.save``, ``traced.save``, ...).
    ``keep_suffix`` gives the temp file ``path``'s suffix, for writers that look at it (ONNX).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path, keep_suffix=keep_suffix)
    try:
        if callable(content):
            content(tmp)
        else:
            data = content.encode(encoding) if isinstance(content, str) else bytes(content)
            # mode 0o666 less the umask, like any new file (mkstemp's 0o600 would hide a shared file)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def file_lock(path: Path, *, best_effort: bool = False) -> Iterator[None]:
    """Hold an exclusive lock between processes on ``path`` (created if missing) while inside.

    With ``best_effort`` a lock file that cannot be created (a read-only folder) means going on
    unlocked instead of failing: for caches, where the atomic replace alone keeps files whole.
    """
    from filelock import FileLock  # lazily: ~30 ms, and --help must stay instant

    path = Path(path)
    if best_effort:
        try:
            with open(path, "a+b"):
                pass
        except OSError:
            yield
            return
    with FileLock(str(path)):
        yield
