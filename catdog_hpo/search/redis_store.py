"""Redis study stores: ``--storage redis://HOST:PORT/DB`` (``rediss://`` for TLS).

Optuna's ``JournalStorage`` on a ``JournalRedisBackend``: the study is a log of operations in
Redis, each appended atomically by a Lua script (``incr`` of the log number + ``set``), so any
number of workers append without a lock of ours. The keys are Optuna's own (no prefix), so
``optuna-dashboard redis://...`` reads the same study; ``?prefix=NAME`` keeps several stores in
one Redis database apart (Optuna's ``prefix``; ours are prefixed the same way).

What `run` adds, as for the journal file (search.journal):

- the study lock (``study_lock``): a Redis lock (``SET NX PX`` with a token, released by a Lua
  compare-and-delete: redis-py's ``Lock``) per study, ``catdog:lock:<study>``. It is a lease of
  ``LOCK_LEASE_S``: a worker killed while it holds it (a claim takes milliseconds) blocks the
  others for that long at most, never forever.
- heartbeats: ``record_heartbeat`` writes the Redis server's ``TIME`` into the hash
  ``catdog:heartbeats`` (field: the trial id), and a RUNNING trial whose beat is older than the
  grace period is stale. Both times come from the one server clock, so machines with skewed clocks
  agree on which trial is dead; a trial with no beat is never stale (as in ``RDBStorage``).
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Callable, ContextManager, Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from optuna.exceptions import ExperimentalWarning
from optuna.storages import BaseStorage
from optuna.storages.journal import JournalRedisBackend, JournalStorage
from optuna.trial import FrozenTrial, TrialState

from catdog_hpo.errors import UserError
from catdog_hpo.search import optuna_compat
from catdog_hpo.search.optuna_compat import Heartbeats

if TYPE_CHECKING:
    import optuna
    import redis

EXTRA = "pip install 'catdog-hpo[redis]'"
LOCK_LEASE_S = 300  # seconds a study lock outlives a killed holder; far above a claim or a grid's enqueue
_BEATS = "catdog:heartbeats"
_LOCK = "catdog:lock:"


def split_url(url: str, shown: str) -> tuple[str, str]:
    """(the URL for redis-py, the key prefix of ?prefix=); a one-line UserError naming ``shown``
    for a URL redis-py would misread or refuse."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError as exc:
        raise UserError(f"--storage {shown}: cannot parse it ({exc})") from None
    if not parts.hostname:
        raise UserError(f"--storage {shown}: name the Redis server, e.g. redis://127.0.0.1:6379/0")
    db = parts.path.strip("/")
    if db and not db.isdigit():  # redis-py would ignore it and use database 0
        raise UserError(f"--storage {shown}: the database after the port must be a number, e.g. redis://host:6379/0")
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefix = "".join(v for k, v in query if k == "prefix")
    rest = urlencode([(k, v) for k, v in query if k != "prefix"])  # the others are redis-py's
    return urlunsplit(parts._replace(query=rest)), prefix


class RedisStore(JournalStorage, Heartbeats):
    """A Redis journal store with a study lock and heartbeats (see the module doc)."""

    def __init__(self, url: str, heartbeat_interval: int | None = None, grace_period: int | None = None,
                 heartbeat_stale_trial_callback: Callable[[optuna.Study, FrozenTrial], None] | None = None) -> None:
        url, prefix = split_url(url, url)
        with warnings.catch_warnings():  # "experimental" since Optuna 3.1: nothing a user can act on
            warnings.simplefilter("ignore", ExperimentalWarning)
            super().__init__(JournalRedisBackend(url, prefix=prefix))
        self.url = url
        self._beats_key, self._lock_key = f"{prefix}{_BEATS}", f"{prefix}{_LOCK}"
        self._client: tuple[int, redis.Redis] | None = None  # (pid, client): a forked worker opens its own
        self._heartbeats(heartbeat_interval, grace_period, heartbeat_stale_trial_callback)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_client"] = None  # a connection does not travel to another process
        return state

    @property
    def _redis(self) -> redis.Redis:
        """This process's client for the lock and heartbeats (a connection must not cross a fork)."""
        import redis

        if self._client is None or self._client[0] != os.getpid():
            self._client = (os.getpid(), redis.Redis.from_url(self.url))
        return self._client[1]

    def study_lock(self, study_name: str) -> ContextManager[None]:
        """The study-wide lock (search.locks.study_lock): a Redis lease lock per study."""
        return self._redis.lock(f"{self._lock_key}{study_name}", timeout=LOCK_LEASE_S, sleep=0.005)

    def record_heartbeat(self, trial_id: int) -> None:
        seconds, _micro = self._redis.time()
        self._redis.hset(self._beats_key, str(trial_id), seconds)

    def set_trial_state_values(self, trial_id: int, state: TrialState,
                               values: Sequence[float] | None = None) -> bool:
        changed = super().set_trial_state_values(trial_id, state, values)
        if state.is_finished():  # a finished trial needs no heartbeat any more
            self._redis.hdel(self._beats_key, str(trial_id))
        return changed

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        grace = self._grace()
        running = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        if not running:
            return []
        ids = [optuna_compat.trial_id(t) for t in running]
        now, _micro = self._redis.time()
        beats = self._redis.hmget(self._beats_key, [str(i) for i in ids])
        return [i for i, beat in zip(ids, beats) if beat is not None and now - int(beat) > grace]


def open_redis(url: str, shown: str, *, create: bool, heartbeat_interval: int | None = None,
               grace_period: int | None = None,
               heartbeat_stale_trial_callback: Callable[[optuna.Study, FrozenTrial], None] | None = None,
               ) -> BaseStorage:
    """The Redis store at ``url`` (search.storage.STORES). ``create`` changes nothing: an empty
    Redis database is an empty store."""
    split_url(url, shown)
    try:
        import redis
    except ImportError:
        raise UserError(f"--storage {shown}: a Redis store needs the redis package: {EXTRA}") from None
    try:
        # JournalStorage reads the whole log when it opens: an unreachable server fails here.
        return RedisStore(url, heartbeat_interval, grace_period, heartbeat_stale_trial_callback)
    except (redis.exceptions.RedisError, ValueError) as exc:
        from catdog_hpo.search.storage import mask_password

        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot open study store {shown}: {mask_password(detail)}") from None
