"""MLflow tracking: ``run --mlflow URI`` logs the study, ``retrain --mlflow URI`` the shipped model
(``ship.retrain_tracking``, with this module's client).

A study is one parent run; each trial a nested child run (params, ``config.json``, per-epoch
metrics with the epoch as step, the ``state`` tag, predicted/measured seconds). The parent's id is
a study user attribute (``StudyKey.MLFLOW_RUN_ID``), so every worker process, resumed run and
machine of the study logs into the same parent. The URI: ``--mlflow``, else $MLFLOW_TRACKING_URI
(as MLflow's own clients read it: set, it turns tracking on; ``--no-mlflow`` turns it off). A
missing mlflow is a one-line UserError naming the extra. Tracking never stops a study: the first
call that fails prints one warning and this process sends nothing more to that URI (docs/tracking.md).
"""

from __future__ import annotations

import os
import re
import time
import warnings
from typing import TYPE_CHECKING, Any, Callable

from catdog_hpo.errors import UserError, first_line
from catdog_hpo.search.record import StudyKey, TrialKey, outcome

if TYPE_CHECKING:
    import optuna
    from optuna.storages import BaseStorage
    from optuna.trial import FrozenTrial

    from catdog_hpo.engine.epochs import EpochStats

URI_ENV = "MLFLOW_TRACKING_URI"  # MLflow's own variable: set, it turns tracking on
EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
DEFAULT_EXPERIMENT = "catdog-hpo"
EXTRA = "pip install 'catdog-hpo[mlflow]'"
EPOCH_METRICS = {"train_loss": "train_loss", "val_loss": "val_loss", "val_acc": "val_acc", "lr": "lr",
                 "seconds": "epoch_s"}  # EpochStats field -> metric name (step: the epoch)
# MLflow's HTTP client retries 7 times with backoff and waits 120 s per request (minutes on a
# dead server); ours gives up within seconds, once. The user's own settings of these win.
_QUIET_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                   "MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
# The reason tag of a trial another worker failed because its own stopped beating (a dead worker).
STALE = "its worker stopped sending heartbeats (died): failed as stale by another worker"
_dead: set[str] = set()  # URIs that failed in this process: nothing more is sent there


def tracking_uri(flag: str | None, off: bool = False) -> str | None:
    """The URI to log to: ``--mlflow`` (``flag``), else $MLFLOW_TRACKING_URI; None with
    ``--no-mlflow`` (``off``) or neither. Checks that mlflow is installed (UserError otherwise)."""
    if off:
        if flag:
            raise UserError(f"--mlflow {flag} and --no-mlflow: give one of them")
        return None
    uri = flag or os.environ.get(URI_ENV) or None
    if uri is not None:
        require_mlflow("--mlflow" if flag else f"${URI_ENV}")
    return uri


def require_mlflow(why: str = "--mlflow") -> None:
    """UserError, one line naming the extra, when mlflow cannot be imported."""
    try:
        import mlflow  # noqa: F401
    except ImportError:
        hint = " (or pass --no-mlflow)" if why.startswith("$") else ""
        raise UserError(f"{why}: MLflow tracking needs mlflow: {EXTRA}{hint}") from None


class Client:
    """One URI's MLflow client for this process; every call goes through ``call``, and the first
    failure warns once and turns the URI off for the rest of the process."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.mlflow: Any = None
        if uri in _dead:
            return
        for key, value in _QUIET_DEFAULTS.items():
            os.environ.setdefault(key, value)
        import mlflow

        self.mlflow = self.call("open the client", lambda: mlflow.MlflowClient(tracking_uri=uri))

    @property
    def alive(self) -> bool:
        return self.mlflow is not None and self.uri not in _dead

    def call(self, what: str, fn: Callable[[], Any]) -> Any:
        """``fn()``, or None once this URI has failed in this process (the first failure warns)."""
        if self.uri in _dead:
            return None
        try:
            return fn()
        except Exception as exc:  # connection refused, timeout, a server-side error: all the same to a study
            _dead.add(self.uri)
            from catdog_hpo.search.storage import mask_password

            warnings.warn(f"mlflow: could not {what} at {mask_password(self.uri)} ({_short(exc)}); this "
                          "process logs nothing more to MLflow and goes on (the study store keeps every trial)",
                          stacklevel=2)
            return None

    def experiment_id(self) -> str | None:
        name = os.environ.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT

        def get_or_create() -> str:
            found = self.mlflow.get_experiment_by_name(name)
            if found is None:
                try:
                    return self.mlflow.create_experiment(name)
                except Exception:  # another process created it just now
                    found = self.mlflow.get_experiment_by_name(name)
                    if found is None:
                        raise
            if found.lifecycle_stage != "active":
                raise RuntimeError(f"experiment {name!r} is deleted: restore it, or set ${EXPERIMENT_ENV}")
            return found.experiment_id

        return self.call(f"open the experiment {name!r}", get_or_create)

    def log(self, run_id: str, what: str, metrics: dict[str, float] | None = None, step: int = 0,
            params: dict[str, Any] | None = None, tags: dict[str, Any] | None = None) -> None:
        """One ``log_batch`` of ``metrics`` (at ``step``), ``params`` and ``tags``."""
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        batch = dict(metrics=[Metric(k, float(v), now, step) for k, v in (metrics or {}).items() if v is not None],
                     params=[Param(k, str(v)) for k, v in (params or {}).items()],
                     tags=[RunTag(k, str(v)) for k, v in (tags or {}).items() if v is not None])
        self.call(what, lambda: self.mlflow.log_batch(run_id, **batch))


def _short(exc: Exception) -> str:
    """An MLflow client error's OS error ("[Errno 111] Connection refused"), else its first line."""
    errno = re.search(r"\[Errno -?\d+\] [^)\"'\]]+", first_line(exc))
    return errno.group(0).strip() if errno else first_line(exc)[:200]


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """Where the MLflow UI shows the run on a tracking server, else its id and the store."""
    from catdog_hpo.search.storage import mask_password

    if uri.startswith(("http://", "https://")):
        return f"{mask_password(uri).rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"run {run_id} in {mask_password(uri)}"


# --------------------------------------------------------------------------- the study: the parent run


class StudyRun:
    """The study's parent run, opened by ``catdog-hpo run`` before its workers start."""

    def __init__(self, client: Client, run_id: str, experiment_id: str) -> None:
        self.client, self.run_id, self.experiment_id = client, run_id, experiment_id

    @classmethod
    def open(cls, uri: str, study: optuna.Study, storage: BaseStorage, storage_url: str) -> StudyRun | None:
        """The parent run the study records (resumed: status RUNNING again), or a new one, under
        the study lock so two processes starting together make one. None after the one warning."""
        from catdog_hpo.search.locks import study_lock

        client = Client(uri)
        if not client.alive:
            return None
        with study_lock(storage, storage_url, study.study_name):
            known = study.user_attrs.get(StudyKey.MLFLOW_RUN_ID)
            run = client.call("read the study's run", lambda: _active_run(client, known, study.study_name)) \
                if known else None
            if run is not None:
                client.call("resume the study's run", lambda: client.mlflow.update_run(known, status="RUNNING"))
            elif client.alive:
                run = _new_study_run(client, study)
                if run is not None:
                    study.set_user_attr(StudyKey.MLFLOW_RUN_ID, run.info.run_id)
        if run is None or not client.alive:
            return None
        return cls(client, run.info.run_id, run.info.experiment_id)

    def where(self) -> str:
        return run_url(self.client.uri, self.experiment_id, self.run_id)

    def close(self, study: optuna.Study, status: str = "FINISHED") -> None:
        """The study's figures so far on the parent run, and its status (KILLED: interrupted)."""
        if not self.client.alive:
            return
        from catdog_hpo.search.record import finished_complete, tally

        trials = study.get_trials(deepcopy=False)
        done = [t for t in trials if finished_complete(t)]  # the study's own: no --warm-start history
        metrics: dict[str, float] = {"finished_trials": tally(trials)[0], "completed_trials": len(done)}
        if done and len(study.directions) == 1:
            metrics["best_val_acc"] = max(t.values[0] for t in done)
        self.client.log(self.run_id, "log the study's figures", metrics=metrics, step=len(trials))
        self.client.call("end the study's run", lambda: self.client.mlflow.set_terminated(self.run_id, status))


def _active_run(client: Client, run_id: str, study_name: str) -> Any:
    """The server's run ``run_id``; None when it is deleted, unknown (the study was tracked on
    another server) or another study's (a copy): a new parent run takes its place."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.mlflow.get_run(run_id)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise
    return run if run.info.lifecycle_stage == "active" and run.data.tags.get("optuna.study") == study_name else None


def _new_study_run(client: Client, study: optuna.Study) -> Any:
    from catdog_hpo.search.record import StudyInfo

    experiment = client.experiment_id()
    if experiment is None:
        return None
    info = StudyInfo.from_study(study)
    run = client.call("create the study's run", lambda: client.mlflow.create_run(
        experiment, run_name=study.study_name, tags={"catdog_hpo.kind": "study", "optuna.study": study.study_name}))
    if run is None:
        return None
    params = {"space": info.space, "sampler": info.sampler, "pruner": info.pruner, "data": info.data,
              "objectives": ",".join(info.objectives), "seed": info.seed, "epochs": info.epochs,
              "target_trials": info.target_trials, "budget_s": info.budget_s, "catdog_hpo_version": info.version}
    client.log(run.info.run_id, "log the study's params", params={k: v for k, v in params.items() if v is not None})
    return run


# --------------------------------------------------------------------------- the trials: child runs


class TrialRuns:
    """A worker's trials as child runs of the study's parent run. ``started`` when a trial is
    claimed, ``epoch`` from where the trial reports to the pruner (once per epoch), ``ended``
    after the study was told. Without a URI, or a parent run, every call does nothing."""

    def __init__(self, uri: str | None, study: optuna.Study) -> None:
        self.client: Client | None = None
        self.parent = study.user_attrs.get(StudyKey.MLFLOW_RUN_ID) if uri else None
        self.study_name = study.study_name
        self.experiment: str | None = None
        self.runs: dict[int, str] = {}  # trial number -> its child run
        self.logged: set[int] = set()  # trials whose params and config are on their run
        client = Client(uri) if uri and self.parent else None
        parent = client.call("read the study's run", lambda: client.mlflow.get_run(self.parent)) \
            if client is not None and client.alive else None
        if parent is not None:
            self.client, self.experiment = client, parent.info.experiment_id

    @property
    def active(self) -> bool:
        """Whether trials are tracked (a URI and the study's parent run were found)."""
        return self.client is not None and self.client.alive

    def started(self, trial: optuna.Trial) -> None:
        client = self.client
        if client is None or not client.alive:
            return
        tags = {"mlflow.parentRunId": self.parent, "optuna.study": self.study_name,
                "optuna.trial_number": str(trial.number), "catdog_hpo.kind": "trial"}
        run = client.call(f"create trial {trial.number}'s run", lambda: client.mlflow.create_run(
            self.experiment, run_name=f"trial-{trial.number}", tags=tags))
        if run is not None:
            self.runs[trial.number] = run.info.run_id

    def epoch(self, trial: optuna.Trial, stats: EpochStats) -> None:
        """The epoch's losses, accuracy, lr and seconds with ``step=stats.epoch``; the params and
        config go with the first epoch (the sampler has picked them all by then)."""
        run_id = self.runs.get(trial.number)
        if run_id is None or self.client is None:
            return
        if trial.number not in self.logged:
            self._params(trial.number, run_id, trial.params, trial.user_attrs.get(TrialKey.CONFIG))
        values = {name: getattr(stats, field) for field, name in EPOCH_METRICS.items()}
        self.client.log(run_id, f"log trial {trial.number}'s epoch {stats.epoch}", metrics=values, step=stats.epoch)

    def ended(self, trial: optuna.Trial) -> None:
        """The trial as the store has it now: state tag, values, cost and seconds; run ended."""
        run_id = self.runs.pop(trial.number, None)
        client = self.client
        if run_id is None or client is None or not client.alive:
            return
        from catdog_hpo.search import optuna_compat

        frozen = trial.storage.get_trial(optuna_compat.trial_id(trial))
        ua = frozen.user_attrs
        self._params(trial.number, run_id, frozen.params, ua.get(TrialKey.CONFIG))
        state = state_of(frozen)
        metrics = {key: ua.get(key) for key in (TrialKey.PREDICTED_S, TrialKey.MEASURED_S, TrialKey.N_PARAMS,
                                                 TrialKey.FLOPS, TrialKey.INFERENCE_FLOPS, TrialKey.LATENCY_MS,
                                                 TrialKey.BEST_EPOCH, TrialKey.EPOCHS_RUN)}
        if frozen.values and state == "complete":
            metrics["best_val_acc"] = frozen.values[0]
        reason = ua.get(TrialKey.FAIL_REASON) or ua.get(TrialKey.REJECTED) or ua.get(TrialKey.PRUNED_BY) \
            or ua.get(TrialKey.BUDGET_STOP)
        tags = {"state": state, "reason": reason, "baseline": True if ua.get(TrialKey.BASELINE) else None,
                "retry_of": ua.get(TrialKey.RETRY_OF)}
        client.log(run_id, f"log trial {trial.number}'s end", metrics=metrics, step=int(ua.get(TrialKey.EPOCHS_RUN) or 0),
                   tags=tags)
        client.call(f"end trial {trial.number}'s run",
                    lambda: client.mlflow.set_terminated(run_id, "FAILED" if state == "failed" else "FINISHED"))

    def failed_as_stale(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """End the child run of ``trial``, which this worker has just failed as stale (Optuna's
        fail_stale_trials: its worker died, so nothing else would end its run): FAILED. Another
        process made the run, so it is found by the tags ``started`` sets."""
        client = self.client
        if client is None or not client.alive:
            return
        query = (f"tags.mlflow.parentRunId = '{self.parent}' and tags.`optuna.trial_number` = '{trial.number}' "
                 "and attributes.status = 'RUNNING'")
        found = client.call(f"find trial {trial.number}'s run",
                            lambda: client.mlflow.search_runs([self.experiment], filter_string=query))
        for run_id in [run.info.run_id for run in found or ()]:
            client.log(run_id, f"log trial {trial.number}'s end", tags={"state": "failed", "reason": STALE})
            client.call(f"end trial {trial.number}'s run", lambda: client.mlflow.set_terminated(run_id, "FAILED"))

    def _params(self, number: int, run_id: str, params: dict[str, Any], config: dict[str, Any] | None) -> None:
        if number in self.logged or self.client is None:
            return
        self.logged.add(number)  # MLflow params are write-once: logged once per run
        if params:
            self.client.log(run_id, f"log trial {number}'s params", params=params)
        if config is not None:
            client = self.client
            client.call(f"log trial {number}'s config", lambda: client.mlflow.log_dict(run_id, config, "config.json"))


def state_of(trial: optuna.trial.FrozenTrial) -> str:
    """complete, pruned (stopped early too), rejected (turned away before training) or failed."""
    name = outcome(trial)
    if name == "PRUNED":
        return "rejected" if TrialKey.REJECTED in trial.user_attrs else "pruned"
    return {"COMPLETE": "complete", "FAIL": "failed"}.get(name, name.lower())
