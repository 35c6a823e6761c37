"""Trial checkpoints in a study: where they live, which one a retry resumes, what is kept.

The training state itself (what is saved, bit-exact resume) is ``engine.resume``; this module
maps a study's trials onto its files.

- Where: one folder per study that every worker reads: beside a SQLite or journal file
  (``studies/checkpoints/catdog_db/<study>/`` for ``studies/catdog.db``), or under
  ``--checkpoint-dir`` (which a PostgreSQL/MySQL study points at storage every machine mounts;
  without it such a study keeps them under ``studies/checkpoints/`` of each machine, and a retry
  on another machine starts over). An in-memory store keeps none: nothing could retry from it.
- Which file: a trial names its file in its ``CHECKPOINT`` attribute (``trial-<n>-<random>.pt``,
  a name no other study or store reuses; saves alternate with its twin ``.b.pt``, engine.resume)
  before the first write. A retry takes over the file
  of the trial it retries and writes on into it. The trial a retry retries: Optuna's stale-trial
  retry of a dead worker (the last of ``retry_history``), else ours (``RETRY_OF``: an interrupt,
  a sticky CUDA error).
- Resume: the retry's ``RESUMED_FROM_TRIAL``/``RESUMED_FROM_EPOCH`` say from where; the epochs
  taken over are reported to the pruner as they were (``search.trial``). A missing, damaged
  or mismatched file is ignored with a one-line warning (``RESUME_IGNORED``): epoch 1 again.
- Kept: ``tidy`` (after every trial) deletes the files no unfinished trial and no pending retry
  needs, and the best-epoch weights (``best-<n>-<random>.pt``, ``WEIGHTS_FILE``) of all but the
  ``keep`` most accurate completed trials, which ``export --with-weights`` ships.
"""

from __future__ import annotations

import re
import secrets
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from catdog_hpo.config import TrialConfig
from catdog_hpo.data import ImageSet
from catdog_hpo.engine.resume import CheckpointSpec, StateRejected, fingerprint, load_state, save_weights, twin_base
from catdog_hpo.errors import UserError
from catdog_hpo.search import optuna_compat
from catdog_hpo.search.record import TrialKey, finished_complete

if TYPE_CHECKING:
    from catdog_hpo.engine.epochs import FitResult

STALE_TMP_S = 3600  # seconds: a temp file this old is a write a killed worker never finished
_UNFINISHED = (TrialState.RUNNING, TrialState.WAITING)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip(".") or "_"


def study_folder(storage: str, study: str, studies_dir: Path, checkpoint_dir: Path | None) -> tuple[Path | None, bool]:
    """(the study's checkpoint folder, whether every machine on the store sees it). None for an
    in-memory store. ``checkpoint_dir``: --checkpoint-dir (taken as shared)."""
    from sqlalchemy.engine import make_url

    from catdog_hpo.search.journal import journal_path

    file = journal_path(storage)
    if file is None:
        try:
            url = make_url(storage)
        except Exception:  # not a URL: open_storage has refused it already with its own message
            return None, False
        database = url.database or ""
        if url.get_backend_name() == "sqlite":
            if database in ("", ":memory:") or database.startswith("file:"):
                return None, False
            file = Path(database)
        else:  # a server: the database's name tells its studies' folders apart
            label = _safe(f"{url.get_backend_name()}-{database}")
            root = checkpoint_dir if checkpoint_dir is not None else Path(studies_dir) / "checkpoints"
            return root / label / _safe(study), checkpoint_dir is not None
    root = checkpoint_dir if checkpoint_dir is not None else file.parent / "checkpoints"
    return root / _safe(file.name.replace(".", "_")) / _safe(study), True


def retried_number(trial: FrozenTrial) -> int | None:
    """The trial ``trial`` retries: the dead worker's (Optuna's retry history ends with it), or
    the interrupted one (RETRY_OF); None for a first run."""
    history = RetryHeartbeatStaleTrialCallback.retry_history(trial)
    if history:
        return int(history[-1])
    retry_of = trial.user_attrs.get(TrialKey.RETRY_OF)
    return int(retry_of) if retry_of is not None else None


@dataclass(frozen=True)
class Checkpoints:
    """A worker's view of its study's checkpoints (``for_run``); folder None: none kept."""

    folder: Path | None
    every: int = 1  # epochs between saves; 0: none written (retries still resume from old ones)
    keep: int = 3  # completed trials whose best-epoch weights are kept

    def start(self, trial: optuna.Trial, cfg: TrialConfig, data: ImageSet) -> CheckpointSpec:
        """The trial's CheckpointSpec: its file, and the state to resume from when it retries a
        trial that left one. Records RESUMED_FROM_* (and RESUME_IGNORED) on the trial."""
        from catdog_hpo.engine import heads

        key = fingerprint(cfg, len(data.classes), int(data.train_x.shape[0]))
        if self.folder is None or heads.applies(cfg):  # head-only trials (seconds each) keep none
            return CheckpointSpec(key=key)
        storage = trial.storage
        me = storage.get_trial(optuna_compat.trial_id(trial))
        source = retried_number(me)
        state, name, why = None, None, ""
        if source is not None:
            old = storage.get_trial(storage.get_trial_id_from_study_id_trial_number(
                optuna_compat.study_id(trial.study), source))
            name = old.user_attrs.get(TrialKey.CHECKPOINT)
            try:
                if name is None:
                    raise StateRejected(f"trial {source} left no checkpoint")
                state = load_state(self.folder / name, key)
                if state.passed_over:  # the newer of its two files was damaged: one epoch back
                    warnings.warn(f"trial {trial.number} retries trial {source}: {state.passed_over}; going on "
                                  f"from the other file, after epoch {state.epoch}")
            except StateRejected as exc:
                why, name = str(exc), None
                if old.intermediate_values:  # it had trained: that work is lost
                    warnings.warn(f"trial {trial.number} retries trial {source}: checkpoint ignored ({why}); "
                                  "training from epoch 1")
            _record_resume(trial, me, source, state.epoch if state is not None else 0, why)
        if self.every <= 0 and state is None:
            return CheckpointSpec(key=key)
        name = name or f"trial-{trial.number}-{secrets.token_hex(4)}.pt"
        trial.set_user_attr(TrialKey.CHECKPOINT, name)  # before any write: tidy keeps what a trial names
        return CheckpointSpec(self.folder / name if self.every > 0 else None, self.every, state, key)

    def keep_best(self, trial: optuna.Trial, cfg: TrialConfig, classes: tuple[str, ...], key: str,
                  result: FitResult) -> None:
        """Save the completed trial's best-epoch weights when it ranks among the ``keep`` most
        accurate completed trials so far (tidy drops those that fall out later)."""
        if self.folder is None or self.keep <= 0 or result.best_state is None:
            return
        done = sorted((t.values[0] for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                       if finished_complete(t)), reverse=True)
        if len(done) >= self.keep and result.best_val_acc <= done[self.keep - 1]:  # ties: the earlier trial
            return
        name = f"best-{trial.number}-{secrets.token_hex(4)}.pt"
        trial.set_user_attr(TrialKey.WEIGHTS_FILE, name)  # before the write, as CHECKPOINT
        try:
            save_weights(self.folder / name, result.best_state, cfg, classes, key, result.best_epoch,
                         result.best_val_acc)
        except (OSError, RuntimeError) as exc:
            warnings.warn(f"checkpoint: cannot write the best weights of trial {trial.number} ({exc})")

    def tidy(self, study: optuna.Study) -> int:
        """Delete what no trial needs any more; the number of files deleted. The folder is
        listed before the trials are read: a file made after the read is not in the listing,
        and one made before it is named by its trial (the name is recorded first)."""
        if self.folder is None or not self.folder.is_dir():
            return 0
        try:
            files = list(self.folder.iterdir())
        except OSError:
            return 0
        trials = study.get_trials(deepcopy=False)
        pending = {retried_number(t) for t in trials if t.state in _UNFINISHED}
        needed: set[str] = set()
        for t in trials:
            name = t.user_attrs.get(TrialKey.CHECKPOINT)
            if name and (t.state in _UNFINISHED or (t.state == TrialState.FAIL and t.number in pending)):
                needed.add(name)
            weights = t.user_attrs.get(TrialKey.WEIGHTS_FILE)
            if weights and t.state == TrialState.RUNNING:  # saved, not yet told COMPLETE
                needed.add(weights)
        best = sorted((t for t in trials if finished_complete(t) and t.user_attrs.get(TrialKey.WEIGHTS_FILE)),
                      key=lambda t: (-t.values[0], t.number))[:max(0, self.keep)]
        needed |= {t.user_attrs[TrialKey.WEIGHTS_FILE] for t in best}
        removed = 0
        for path in files:
            if twin_base(path.name) in needed:  # a trial's state is two files under one name
                continue
            ours = path.suffix == ".pt" and path.name.startswith(("trial-", "best-"))
            torn = path.name.startswith(".") and path.name.endswith(".tmp") and _age(path) > STALE_TMP_S
            if ours or torn:
                try:
                    path.unlink(missing_ok=True)
                    removed += 1
                except OSError:  # another worker's tidy, a read-only share: the next tidy tries again
                    pass
        return removed


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _record_resume(trial: optuna.Trial, me: FrozenTrial, source: int, epoch: int, why: str) -> None:
    """What the retry took over. A stale-trial retry inherits the dead trial's attributes, so
    the ones this retry does not set are cleared, not left standing."""
    trial.set_user_attr(TrialKey.RESUMED_FROM_EPOCH, epoch)
    if epoch or TrialKey.RESUMED_FROM_TRIAL in me.user_attrs:
        trial.set_user_attr(TrialKey.RESUMED_FROM_TRIAL, source if epoch else None)
    if why or TrialKey.RESUME_IGNORED in me.user_attrs:
        trial.set_user_attr(TrialKey.RESUME_IGNORED, why or None)


def check_flags(every: int, keep: int, checkpoint_dir: Path | None) -> None:
    """One-line UserError naming the flag for a value run cannot use."""
    if every < 0:
        raise UserError(f"--checkpoint-every {every}: must be 0 (no checkpoints) or more epochs")
    if keep < 0:
        raise UserError(f"--keep-weights {keep}: must be 0 (none) or more trials")
    if checkpoint_dir is not None and Path(checkpoint_dir).exists() and not Path(checkpoint_dir).is_dir():
        raise UserError(f"--checkpoint-dir {checkpoint_dir}: not a folder")


def for_run(storage: str, study: str, studies_dir: Path, checkpoint_dir: Path | None, every: int,
            keep: int) -> Checkpoints:
    """The run's Checkpoints; UserError (naming the flag) for a bad value or an unusable folder."""
    check_flags(every, keep, checkpoint_dir)
    folder, _shared = study_folder(storage, study, studies_dir, checkpoint_dir)
    if folder is not None and (every > 0 or keep > 0):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            flag = "--checkpoint-dir" if checkpoint_dir is not None else "checkpoints"
            raise UserError(f"{flag} {folder}: cannot create it ({exc.strerror or exc})") from None
    return Checkpoints(folder, every, keep)


def where(storage: str, study: str, studies_dir: Path, checkpoint_dir: Path | None) -> str | None:
    """One line for the run's start when the checkpoints are not where every machine sees them."""
    folder, shared = study_folder(storage, study, studies_dir, checkpoint_dir)
    if folder is None or shared:
        return None
    return (f"checkpoints: kept on this machine ({folder}); a trial retried on another machine "
            "starts over: point --checkpoint-dir at storage every machine mounts")


def remove_study_folder(storage: str, study: str, studies_dir: Path) -> int:
    """Delete the study's checkpoint folder where run keeps it by default (studies delete); the
    number of files removed. A --checkpoint-dir elsewhere is the user's to clear."""
    folder, _ = study_folder(storage, study, studies_dir, None)
    if folder is None or not folder.is_dir():
        return 0
    files = [p for p in folder.iterdir() if p.is_file()]
    for path in files:
        path.unlink(missing_ok=True)
    if not any(folder.iterdir()):
        folder.rmdir()
    return len(files)


def replay(history: tuple[dict[str, Any], ...]) -> list[Any]:
    """The resumed epochs as EpochStats, to report to the pruner as they were."""
    from catdog_hpo.engine.epochs import EpochStats

    return [EpochStats(**h) for h in history]
