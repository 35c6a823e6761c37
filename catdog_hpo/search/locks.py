"""The cross-process locks of a study store, with one rule for where a SQLite store's lock lives.

- ``schema_lock``: held while Optuna creates its tables in a new store. Processes opening the same
  empty store at once (machines started together) would otherwise race to create them, and all
  but one fail ("table studies already exists", "duplicate key value").
- ``study_lock``: held by a worker while it claims a trial, so every worker of a study on every
  machine sees the same count of finished + running trials.

Both are a file lock on ``<database>.lock`` beside a SQLite file (``sqlite_lock_path``, the one
rule), an advisory lock on PostgreSQL and ``GET_LOCK`` on MySQL/MariaDB. Never nest them: two
holds of the same lock file in one process wait on each other. A store that is not a database
(search.storage.STORES: journal file, Redis, gRPC proxy) brings its own study lock, a
``study_lock(study_name)`` method, and needs no schema lock (no tables to create, or the proxy
made them).
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from catdog_hpo.files import file_lock

if TYPE_CHECKING:
    from optuna.storages import BaseStorage

# A constant key for the schema lock (one per database server, whatever the study).
_SCHEMA_KEY = 7283612
_LOCAL_LOCK = threading.Lock()  # in-memory stores live in one process: a thread lock suffices


def sqlite_lock_path(url: str) -> Path | None:
    """``<database>.lock`` for a SQLite file URL; None for other backends and in-memory SQLite."""
    import sqlalchemy.engine

    try:
        parsed = sqlalchemy.engine.make_url(url)
    except Exception:  # not a URL sqlalchemy understands: open_storage reports it
        return None
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(f"{database}.lock")


@contextlib.contextmanager
def schema_lock(url: str) -> Iterator[None]:
    """Held while ``RDBStorage`` may create Optuna's tables in the store at ``url``."""
    import sqlalchemy

    path = sqlite_lock_path(url)
    if path is not None:
        with file_lock(path):
            yield
        return
    backend = sqlalchemy.engine.make_url(url).get_backend_name()
    if backend not in ("postgresql", "mysql", "mariadb"):
        yield
        return
    if backend == "postgresql":
        lock, unlock = f"SELECT pg_advisory_lock({_SCHEMA_KEY})", f"SELECT pg_advisory_unlock({_SCHEMA_KEY})"
    else:
        lock, unlock = "SELECT GET_LOCK('catdog-hpo-schema', 600)", "SELECT RELEASE_LOCK('catdog-hpo-schema')"
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text(lock))
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text(unlock))
    finally:
        engine.dispose()


@contextlib.contextmanager
def study_lock(storage: BaseStorage, url: str, study_name: str) -> Iterator[None]:
    """A lock shared by every worker of the study: the store's own where it has one (journal
    file, Redis, gRPC proxy: their ``study_lock`` method), a file lock beside a SQLite file, an
    advisory lock on PostgreSQL, GET_LOCK on MySQL/MariaDB (on ``storage``'s own engine)."""
    own = getattr(storage, "study_lock", None)
    if own is not None:
        with own(study_name):
            yield
        return
    path = sqlite_lock_path(url)
    if path is not None:
        with file_lock(path):
            yield
        return
    engine = getattr(storage, "engine", None)
    if engine is None or engine.dialect.name not in ("postgresql", "mysql", "mariadb"):
        with _LOCAL_LOCK:
            yield
        return
    import sqlalchemy

    key = int(hashlib.sha256(study_name.encode()).hexdigest()[:15], 16)  # fits a signed bigint
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            unlock = ("SELECT pg_advisory_unlock(:k)", {"k": key})
        else:
            conn.execute(sqlalchemy.text("SELECT GET_LOCK(:k, 600)"), {"k": f"catdog-{key}"})
            unlock = ("SELECT RELEASE_LOCK(:k)", {"k": f"catdog-{key}"})
        try:
            yield
        finally:
            conn.execute(sqlalchemy.text(unlock[0]), unlock[1])
