"""Study-store URLs: open one safely, and never print a password.

``open_storage`` is the one place a storage URL becomes an Optuna storage, for ``run`` as for the
read-only commands (``studies``, ``show``, ``report``, ``dashboard``). For SQLite it sets a busy
timeout and WAL journal mode, so the dashboard can read while ``run`` writes the same file
without "database is locked" errors on either side.

Stores that are not SQLAlchemy databases (a journal file, Redis, a gRPC storage proxy) are opened
by the module ``STORES`` names for their URL scheme: the one place the code tells them apart.
Each such store locks its own studies (a ``study_lock(study_name)`` method: search.locks).
"""

from __future__ import annotations

import importlib
import re
import sqlite3
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from catdog_hpo.errors import UserError
from catdog_hpo.search.locks import schema_lock

if TYPE_CHECKING:
    from typing import Callable

    import optuna
    from optuna.trial import FrozenTrial
    from optuna.storages import BaseStorage

# Seconds a SQLite connection waits for another writer's lock before failing.
SQLITE_BUSY_TIMEOUT_S = 60

# scheme://user:password@host... -> group 1 is "scheme://user", group 2 the password. The password
# runs to the LAST "@" of the authority part, so a password containing "@" is masked whole.
_USERINFO = re.compile(r"^(?P<head>[A-Za-z][\w+.-]*://[^:/@?#]*):(?P<password>.*)@(?P<tail>[^@]*)$", re.S)
# ?password=... or &password=... in a query string (some drivers take it there).
_QUERY_PASSWORD = re.compile(r"(?i)([?&](?:password|passwd|pwd)=)[^&#]*")


def mask_password(url: str) -> str:
    """``url`` with any password replaced by ``***``: safe to print or log.

    >>> mask_password("postgresql://user:secret@host/db")
    'postgresql://user:***@host/db'
    """
    masked = url
    if "://" in url:
        try:  # SQLAlchemy's own rendering where the URL parses (it knows its quoting rules)
            from sqlalchemy.engine import make_url

            parsed = make_url(url)
            if parsed.password is not None:
                masked = parsed.render_as_string(hide_password=True)
        except Exception:  # not a URL SQLAlchemy parses (error text, a journal path): the regex
            pass
    # Still applied: SQLAlchemy splits "user:p@ss@host" at the first "@" and would show "ss".
    m = _USERINFO.match(masked)
    if m is not None and m.group("password"):
        masked = f"{m.group('head')}:***@{m.group('tail')}"
    return _QUERY_PASSWORD.sub(r"\1***", masked)


def open_storage(
    url: str,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    *,
    create: bool = True,
    heartbeat_stale_trial_callback: Callable[[optuna.Study, FrozenTrial], None] | None = None,
) -> BaseStorage:
    """An Optuna RDB storage for ``url`` (or a journal file store, catdog_hpo.search.journal);
    a bad URL is a one-line UserError (password masked).

    ``heartbeat_interval``/``grace_period`` (seconds) pass through to ``RDBStorage``: with them a
    trial whose worker died is marked FAILED after the grace period. ``create=False`` (read-only
    commands) refuses a SQLite file that does not exist instead of creating an empty store.
    """
    import sqlalchemy
    import sqlalchemy.exc
    from optuna.exceptions import ExperimentalWarning
    from optuna.storages import RDBStorage

    shown = mask_password(url)
    opener = STORES.get(store_scheme(url))
    if opener is not None:
        module, function = opener.split(":")
        return getattr(importlib.import_module(module), function)(
            url, shown, create=create, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
            heartbeat_stale_trial_callback=heartbeat_stale_trial_callback)
    parsed = _parse_url(url, shown)
    url = _with_installed_driver(parsed, url)
    engine_kwargs: dict = {}
    if parsed.get_backend_name() == "sqlite":
        _prepare_sqlite(parsed.database, shown, create)
        engine_kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S}
    try:
        with warnings.catch_warnings(), schema_lock(url):
            # heartbeat_interval is "experimental" in Optuna 5; the warning means nothing to a user.
            warnings.simplefilter("ignore", ExperimentalWarning)
            storage = RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=heartbeat_stale_trial_callback,
            )
    except ImportError as exc:
        why = _first_line(exc.__cause__ or exc)
        raise UserError(f"study store {shown}: its database driver is not installed ({why}){_extra_hint(parsed)}") from None
    except sqlalchemy.exc.SQLAlchemyError as exc:
        detail = _first_line(getattr(exc, "orig", None) or exc)
        raise UserError(f"cannot open study store {shown}: {mask_password(detail)}") from None
    except (RuntimeError, ValueError) as exc:
        # Optuna's schema-version mismatch (RuntimeError) or a bad heartbeat value (ValueError).
        raise UserError(f"study store {shown}: {_first_line(exc)}") from None
    if storage.engine.name == "sqlite":
        _sync_normal(storage.engine)
    return storage


# URL scheme -> "module:function" opening a store that is not a SQLAlchemy database, each with the
# signature of open_journal (catdog_hpo.search.journal) and imported only when used (redis and grpc
# need their extras). Any other scheme is a database URL for RDBStorage.
STORES = {
    "journal": "catdog_hpo.search.journal:open_journal",
    "redis": "catdog_hpo.search.redis_store:open_redis",
    "rediss": "catdog_hpo.search.redis_store:open_redis",  # Redis over TLS
    "grpc": "catdog_hpo.search.grpc_store:open_grpc",
}


def store_scheme(url: str) -> str:
    """The scheme of a --storage value: "journal" for a bare PATH.log too, "" for no scheme."""
    from catdog_hpo.search.journal import SUFFIX

    if "://" in url:
        return url.split("://", 1)[0].lower()
    return "journal" if url.endswith(SUFFIX) else ""


def study_names(storage: BaseStorage) -> list[str]:
    """The names of the studies in ``storage``, oldest first."""
    import optuna

    return optuna.get_all_study_names(storage)  # in the storage's order: by id, so oldest first


def load_study(storage: BaseStorage, name: str, shown_url: str = "the study store") -> optuna.Study:
    """Study ``name``; an unknown name is a one-line UserError listing the studies there."""
    import optuna

    names = study_names(storage)
    if name not in names:
        known = ", ".join(names) if names else "none: the store is empty"
        raise UserError(f"no study named {name!r} in {mask_password(shown_url)} (studies: {known})")
    return optuna.load_study(study_name=name, storage=storage)


def _parse_url(url: str, shown: str):  # -> sqlalchemy.engine.URL
    """The parsed URL, with a known dialect; else a UserError naming the masked URL."""
    import sqlalchemy.engine
    import sqlalchemy.exc

    if not isinstance(url, str) or "://" not in url:
        raise UserError(
            f"--storage {shown!r}: not a storage URL (e.g. sqlite:///studies/catdog.db, "
            "postgresql://user@host/db, mysql+pymysql://user@host/db, a journal file studies/catdog.log, "
            "redis://host:6379/0, grpc://host:13000)"
        )
    try:
        parsed = sqlalchemy.engine.make_url(url)
        parsed.get_dialect()
    except sqlalchemy.exc.NoSuchModuleError:
        scheme = url.split("://", 1)[0]
        raise UserError(f"--storage {shown}: unknown scheme {scheme!r} (use sqlite, postgresql, mysql, "
                        f"{', '.join(STORES)})") from None
    except sqlalchemy.exc.ArgumentError as exc:
        raise UserError(f"--storage {shown}: cannot parse it ({mask_password(_first_line(exc))})") from None
    except ImportError as exc:
        raise UserError(f"--storage {shown}: its database driver is not installed ({_first_line(exc)})"
                        f"{_extra_hint(sqlalchemy.engine.make_url(url))}") from None
    return parsed


# Backend -> the pyproject extra that installs its driver (the driver _DRIVER_FALLBACKS picks).
_EXTRAS = {"postgresql": "postgres", "mysql": "mysql", "mariadb": "mysql"}


def _extra_hint(parsed) -> str:  # parsed: sqlalchemy.engine.URL
    """": pip install 'catdog-hpo[postgres]'" for a backend with an extra, else ""."""
    extra = _EXTRAS.get(parsed.get_backend_name())
    return f": pip install 'catdog-hpo[{extra}]'" if extra else ""


# URL scheme without a driver -> the drivers to try, in order, as (driver name, module to import).
# SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3 and mysql:// to mysqlclient; the project's
# extras install psycopg2-binary and PyMySQL, so pick whichever is importable.
_DRIVER_FALLBACKS = {
    "postgresql": (("psycopg", "psycopg"), ("psycopg2", "psycopg2")),
    "mysql": (("mysqldb", "MySQLdb"), ("pymysql", "pymysql")),
}


def _with_installed_driver(parsed, url: str) -> str:
    """``url`` with an installed driver named when its scheme names none (else ``url`` unchanged)."""
    import importlib.util

    options = _DRIVER_FALLBACKS.get(parsed.drivername)
    if options is None:
        return url
    for driver, module in options:
        if importlib.util.find_spec(module) is not None:
            chosen = parsed.set(drivername=f"{parsed.drivername}+{driver}")
            return chosen.render_as_string(hide_password=False)
    return url  # none installed: RDBStorage's ImportError becomes the one-line message


def _prepare_sqlite(database: str | None, shown: str, create: bool) -> None:
    """Create the file's folder and switch the file to WAL journal mode.

    WAL lets readers (dashboard, report) work while one writer commits; the mode is stored in the
    database file itself, so setting it once here holds for every later connection, Optuna's too.
    """
    if not database or database == ":memory:" or database.startswith("file:"):
        return  # in-memory, or a URI filename the user manages: nothing on disk to prepare
    path = Path(database)
    if path.is_dir():
        raise UserError(f"--storage {shown}: {path} is a folder, not a SQLite file")
    if not create and not path.exists():
        raise UserError(f"--storage {shown}: no study store at {path} (start a study with `catdog-hpo run`)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--storage {shown}: cannot create folder {path.parent} ({exc.strerror})") from None
    try:
        con = sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT_S)
        try:
            con.execute("PRAGMA journal_mode=WAL")
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise UserError(f"--storage {shown}: cannot use {path} as a SQLite store ({exc})") from None


def _sync_normal(engine) -> None:  # engine: sqlalchemy.engine.Engine
    """Every connection of ``engine`` runs with ``synchronous=NORMAL``.

    In WAL mode that is still corruption-safe, but a commit no longer waits for an fsync (about
    3x faster for Optuna's many small commits per trial); a power cut may lose the last commits.
    The pragma is per connection, so the connections opened so far are dropped.
    """
    from sqlalchemy import event

    def on_connect(dbapi_connection, connection_record) -> None:  # noqa: ANN001 (SQLAlchemy's hook)
        dbapi_connection.execute("PRAGMA synchronous=NORMAL")

    event.listen(engine, "connect", on_connect)
    engine.dispose()


def _first_line(exc: object) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
