"""Optuna's journal file storage, for clusters that share a filesystem but no database.

``--storage studies/catdog.log`` (any path ending in ``.log``) or ``--storage journal:///PATH``
(three slashes and a relative path, four for an absolute one, as SQLite URLs) open
``optuna.storages.JournalStorage`` on a ``JournalFileBackend`` whose writes are serialised by
Optuna's ``JournalFileOpenLock`` (an O_EXCL lock file, ``PATH.lock``; safe on NFSv3+).

Optuna's journal storage has no heartbeat, so ``HeartbeatJournalStorage`` adds one the same way
``RDBStorage`` has it: each running trial touches ``PATH.heartbeats/<trial id>`` every interval,
and a RUNNING trial whose file is older than the grace period is stale (the file goes when the
trial finishes). Ages are measured against
the modification time of a probe file touched just now in the same folder, so both times come
from the file server's clock and machines with skewed clocks agree on what is stale. A trial with
no heartbeat file is never stale (as in ``RDBStorage``).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ContextManager, Sequence

from optuna.storages import BaseStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage
from optuna.trial import FrozenTrial, TrialState

from catdog_hpo.errors import UserError
from catdog_hpo.files import file_lock
from catdog_hpo.search import optuna_compat
from catdog_hpo.search.optuna_compat import Heartbeats

if TYPE_CHECKING:
    import optuna

SCHEME = "journal:///"
SUFFIX = ".log"
# The study-wide lock (study_lock) lives beside the journal under its own name: Optuna's write
# lock is PATH.lock, created and deleted on every write, and must never be held by us.
STUDY_LOCK_SUFFIX = ".study-lock"


def journal_path(url: str) -> Path | None:
    """The journal file a ``--storage`` value names, or None when it is not a journal store."""
    if url.startswith(SCHEME):
        rest = url[len(SCHEME):]
        if not rest:
            raise UserError(f"--storage {url}: name the journal file, e.g. journal:///studies/catdog.log")
        return Path(rest)
    if "://" not in url and url.endswith(SUFFIX):
        return Path(url)
    return None


def study_lock_path(path: Path) -> Path:
    return Path(f"{path}{STUDY_LOCK_SUFFIX}")


class HeartbeatJournalStorage(JournalStorage, Heartbeats):
    """A journal storage with heartbeats in files beside the journal (see the module doc)."""

    def __init__(self, path: Path, heartbeat_interval: int | None = None, grace_period: int | None = None,
                 heartbeat_stale_trial_callback: Callable[[optuna.Study, FrozenTrial], None] | None = None) -> None:
        super().__init__(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
        self.path = path
        self._heartbeats(heartbeat_interval, grace_period, heartbeat_stale_trial_callback)
        self._beats = Path(f"{path}.heartbeats")

    def study_lock(self, study_name: str) -> ContextManager[None]:
        """The study-wide lock (search.locks.study_lock): a file lock beside the journal, one for
        all its studies (claims take milliseconds)."""
        return file_lock(study_lock_path(self.path))

    def record_heartbeat(self, trial_id: int) -> None:
        self._beats.mkdir(exist_ok=True)
        beat = self._beats / str(trial_id)
        beat.touch()
        os.utime(beat)  # touch() leaves an existing file's mtime alone on some filesystems

    def set_trial_state_values(self, trial_id: int, state: TrialState,
                               values: Sequence[float] | None = None) -> bool:
        changed = super().set_trial_state_values(trial_id, state, values)
        if state.is_finished():  # a finished trial needs no heartbeat file any more
            (self._beats / str(trial_id)).unlink(missing_ok=True)
        return changed

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        grace = self._grace()
        running = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        if not running:
            return []
        self._beats.mkdir(exist_ok=True)
        probe = self._beats / f"now-{uuid.uuid4().hex}"
        probe.touch()
        try:
            now = probe.stat().st_mtime
        finally:
            probe.unlink(missing_ok=True)
        stale = []
        for trial in running:
            try:
                last = (self._beats / str(optuna_compat.trial_id(trial))).stat().st_mtime
            except FileNotFoundError:
                continue
            if now - last > grace:
                stale.append(optuna_compat.trial_id(trial))
        return stale


def open_journal(url: str, shown: str, *, create: bool, heartbeat_interval: int | None = None,
                 grace_period: int | None = None,
                 heartbeat_stale_trial_callback: Callable[[optuna.Study, FrozenTrial], None] | None = None,
                 ) -> BaseStorage:
    """The journal store ``url`` names (search.storage.STORES); ``create=False`` refuses a file that
    does not exist."""
    path = journal_path(url)
    assert path is not None, url
    if path.is_dir():
        raise UserError(f"--storage {shown}: {path} is a folder, not a journal file")
    if not create and not path.exists():
        raise UserError(f"--storage {shown}: no study store at {path} (start a study with `catdog-hpo run`)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return HeartbeatJournalStorage(path, heartbeat_interval, grace_period, heartbeat_stale_trial_callback)
    except OSError as exc:
        raise UserError(f"--storage {shown}: cannot use {path} as a journal file ({exc.strerror or exc})") from None
