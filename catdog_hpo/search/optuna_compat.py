"""The one module that touches Optuna's private API; everything else uses the public one.

Why private at all: ``run`` is its own ask/tell loop rather than ``Study.optimize``, because a
worker must claim a trial under the study-wide lock only while finished + running < N (the
shared budget). So it has to do what ``optimize`` does internally: start Optuna's heartbeat
thread for each trial and beat once at the claim (``optuna.storages._heartbeat``). Per-study
counters (the sampler streams) live in the study's system attributes, which the storage reads
and writes by the study's storage id (``Study._study_id``; ``Study.set_system_attr`` is gone in
Optuna 5), and export files record the trial's storage id (``_trial_id``). Optuna has no public
accessor for any of these, so pyproject pins Optuna to the minor versions tested here; when
bumping it, check these few lines against the new source.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from optuna.storages import _heartbeat

if TYPE_CHECKING:
    import optuna
    from optuna.storages import BaseStorage
    from optuna.trial import FrozenTrial

# For storages that implement heartbeats themselves (a subclass must inherit it: Optuna checks
# ``isinstance(storage, BaseHeartbeat)``).
BaseHeartbeat = _heartbeat.BaseHeartbeat


class Heartbeats(BaseHeartbeat):
    """The heartbeat settings our non-RDB stores keep as RDBStorage does: the interval, the grace
    period and the stale-trial callback; each store supplies its own ``_get_stale_trial_ids``."""

    def _heartbeats(self, interval: int | None, grace_period: int | None,
                    stale_callback: Callable[[optuna.Study, FrozenTrial], None] | None) -> None:
        self.heartbeat_interval = interval  # seconds
        self.grace_period = grace_period  # seconds; None = 2 x the interval, as RDBStorage
        self.heartbeat_stale_trial_callback = stale_callback

    def _grace(self) -> int:
        """Seconds a running trial may stay silent before it is stale."""
        assert self.heartbeat_interval is not None
        return self.grace_period if self.grace_period is not None else 2 * self.heartbeat_interval

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self.heartbeat_stale_trial_callback


def study_id(study: optuna.Study) -> int:
    """The storage's key of a study (what ``BaseStorage`` methods take)."""
    return study._study_id


def storage_of(study: optuna.Study) -> BaseStorage:
    """The store a study reads and writes (Study exposes no public one; a FrozenTrial has none)."""
    return study._storage


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    """The storage's key of a trial (unique in the store, unlike ``trial.number``)."""
    return trial._trial_id


def heartbeat_enabled(storage: BaseStorage) -> bool:
    """Whether ``storage`` records heartbeats (an RDB store opened with a heartbeat interval)."""
    return _heartbeat.is_heartbeat_enabled(storage)


def heartbeat_thread(trial: optuna.Trial, storage: BaseStorage) -> Any:
    """A context manager beating for ``trial`` while inside (a no-op without heartbeats).

    Looked up on the module at call time, so a test can replace ``get_heartbeat_thread``."""
    return _heartbeat.get_heartbeat_thread(trial_id(trial), storage)


def record_heartbeat(storage: BaseStorage, trial: optuna.Trial) -> None:
    """One heartbeat for ``trial`` now (``storage`` must have heartbeats enabled)."""
    assert isinstance(storage, BaseHeartbeat)
    storage.record_heartbeat(trial_id(trial))


StaleCallback = Callable[["optuna.Study", "FrozenTrial"], None]


@dataclass(frozen=True)
class _AlsoOnStale:
    """The storage's own stale-trial callback (the retry), then ``then``, even when it raises."""

    own: StaleCallback | None
    then: StaleCallback

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        try:
            if self.own is not None:
                self.own(study, trial)
        finally:
            self.then(study, trial)


def also_on_stale(storage: BaseStorage, then: StaleCallback) -> None:
    """Call ``then(study, trial)`` for each trial this process fails as stale (``fail_stale_trials``,
    which the claim runs), after the storage's own callback (search.study: the retry). Optuna reads
    the callback from the storage's ``heartbeat_stale_trial_callback`` attribute at each check
    (RDBStorage and our stores keep it there), and the storage is opened before the worker knows
    what to add. A later call replaces the earlier ``then``: one worker, one listener."""
    if not heartbeat_enabled(storage):
        return  # nothing is ever failed as stale
    own = storage.get_heartbeat_stale_trial_callback()
    own = own.own if isinstance(own, _AlsoOnStale) else own
    storage.heartbeat_stale_trial_callback = _AlsoOnStale(own, then)


def bump_study_counter(storage: BaseStorage, study: optuna.Study, key: str) -> int:
    """Read the study system attribute ``key`` (0 if unset), store it + 1, return the old value.

    Not atomic by itself: hold the study lock (``search.locks.study_lock``) around it."""
    sid = study_id(study)
    value = int(storage.get_study_system_attrs(sid).get(key, 0))
    storage.set_study_system_attr(sid, key, value + 1)
    return value


# --------------------------------------------------------------------------- the gRPC storage proxy
# ``catdog-hpo storage-proxy`` (search.grpc_store) serves Optuna's storage service next to its own
# (the study lock and heartbeats, which Optuna's protocol lacks) on one grpc.Server it builds
# itself, with keepalive options: Optuna's ``run_grpc_proxy_server`` builds and starts its own
# server, with no place for either. So it adds the servicer the way that function does.


def add_storage_service(server: Any, storage: BaseStorage) -> None:
    """Optuna's storage service (what ``GrpcStorageProxy`` talks to) for ``storage`` on ``server``."""
    from optuna.storages._grpc import servicer
    from optuna.storages._grpc.auto_generated import api_pb2_grpc

    api_pb2_grpc.add_StorageServiceServicer_to_server(servicer.OptunaStorageProxyService(storage), server)


def stale_trial_ids(storage: Any, study_id: int, grace_s: int) -> list[int]:
    """The RUNNING trials of ``study_id`` in an ``RDBStorage`` whose last heartbeat is older than
    ``grace_s`` seconds (on the database's clock). The proxy's clients each bring their own grace
    period (their ``--heartbeat``), so the storage's own setting cannot be the one used:
    ``RDBStorage._get_stale_trial_ids`` reads only these three attributes."""
    import types

    from optuna.storages import RDBStorage

    view = types.SimpleNamespace(heartbeat_interval=grace_s, grace_period=grace_s,
                                 scoped_session=storage.scoped_session)
    return RDBStorage._get_stale_trial_ids(view, study_id)
