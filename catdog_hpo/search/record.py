"""The study record's schema: every key catdog-hpo writes into an Optuna store, read back typed.

``run`` writes these as Optuna user attributes (JSON values); ``export``, ``report``, ``show``
and the progress lines read them back. Writers use the key constants; readers use
``TrialRecord.from_trial`` / ``StudyInfo.from_study``, which tolerate a missing key (a trial
pruned before training has no history; a study made by another tool has no attributes at all).
Add a new key here, as a constant and a field, and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial


class TrialKey:
    """Trial user attributes (``trial.set_user_attr(TrialKey.X, ...)``)."""

    CONFIG = "config"  # the TrialConfig the trial trained, as plain data (config.to_dict)
    REJECTED = "rejected"  # why the config was turned away before training (pruned, not trained)
    FAIL_REASON = "fail_reason"  # why the trial failed (first line, <= 500 characters)
    HISTORY = "history"  # one dict per epoch: engine.train.EpochStats as plain data
    EPOCHS_RUN = "epochs_run"  # epochs trained (fewer than configured when pruned)
    SEC_PER_EPOCH = "sec_per_epoch"  # mean wall seconds per epoch, train + validation
    BEST_EPOCH = "best_epoch"  # 1-based epoch of the best validation accuracy; 0 if none finished
    N_PARAMS = "n_params"  # parameters of the model (engine.models cost)
    FLOPS = "flops"  # one forward of the network per image (2 FLOPs per multiply-add) at the trial's image size
    # FLOPS x forwards per image of the model as shipped (engine.tta: 2 with augment.tta): what the
    # flops objective, --max-flops and the model card count. Kept apart from FLOPS, which the cost
    # model prices training by (training runs the network once per image; TTA is inference only).
    INFERENCE_FLOPS = "inference_flops"
    DEVICE = "device"  # torch device string the trial trained on ("cpu", "cuda:0")
    RETRY_OF = "retry_of"  # set on an enqueued re-run: the number of the interrupted trial
    LATENCY_MS = "latency_ms"  # batch-1 forward ms, median of repeats (engine.latency), before training
    LATENCY_METHOD = "latency_method"  # how LATENCY_MS was measured, in words (device, threads, runs)
    PRUNED_BY = "pruned_by"  # multi-objective: the Pareto rule's reason (search.pareto)
    # Multi-objective studies: the epoch after which the Pareto rule or the budget stopped the
    # trial. Such a trial is told COMPLETE (its values at its best epoch so far), so every
    # sampler learns from it, yet it counts as pruned everywhere we show or pick trials (outcome()).
    STOPPED_EARLY = "stopped_early"
    # The cost model (engine.cost, search.budget): seconds predicted before training, measured after.
    PREDICTED_S = "predicted_s"  # predicted seconds of all configured epochs (corrected), before training
    PREDICTED_EPOCH_S = "predicted_epoch_s"  # uncorrected predicted seconds per epoch (the correction's base)
    MEASURED_S = "measured_s"  # seconds of the epochs actually run (training + validation)
    COST_DEVICE = "cost_device"  # "<host>:<device>": the trials whose seconds calibrate each other
    BASELINE = "baseline"  # True on the space's baseline config (enqueued as trial 0 of a new study)
    ENQUEUED_FROM = "enqueued_from"  # run --enqueue FILE: the file a user config came from
    WARM_START_FROM = "warm_start_from"  # run --warm-start: "study@storage#trial" whose config this reran
    # run --warm-start, same search: a finished trial of that study ("study@storage#trial") copied
    # in as the sampler's history. It never ran here: it counts toward nothing and is never picked.
    WARM_HISTORY_FROM = "warm_history_from"
    BUDGET_STOP = "budget_stop"  # why a running trial was stopped at an epoch end (budget spent)
    # Trial checkpoints (search.checkpoints): file names inside the study's checkpoint folder.
    CHECKPOINT = "checkpoint"  # the training-state file it writes (a retry writes on into its source's)
    WEIGHTS_FILE = "weights_file"  # its best-epoch weights, kept for the top trials (export --with-weights)
    RESUMED_FROM_TRIAL = "resumed_from_trial"  # a retry: the trial whose checkpoint it went on from
    RESUMED_FROM_EPOCH = "resumed_from_epoch"  # a retry: epochs taken from that checkpoint (0: started over)
    RESUME_IGNORED = "resume_ignored"  # a retry: why the checkpoint was not used (missing, damaged, mismatched)


class StudyKey:
    """Study user attributes, written once by ``run`` when it creates the study."""

    SPACE = "space"  # search space name or path (space_files.load_space reads it back)
    SPACE_FINGERPRINT = "space_fingerprint"  # written last: its presence marks the study made
    SAMPLER = "sampler"  # a key of search.samplers.SAMPLERS
    PRUNER = "pruner"  # a key of search.pruners.PRUNERS
    DATA = "data"  # DataSource.describe(): a one-line description
    DATA_SOURCE = "data_source"  # the whole DataSource as a dict, so export/retrain rebuild the split
    DATA_FINGERPRINT = "data_fingerprint"  # the decoded images' fingerprint at the base image size
    OVERRIDES = "overrides"  # dotted config paths fixed on top of the space (--epochs, --device, ...)
    TARGET_TRIALS = "target_trials"  # --trials N: finished trials the study aims at
    SEED = "seed"  # --seed
    EPOCHS = "epochs"  # --epochs (None: the space's own)
    VERSION = "catdog_hpo_version"  # catdog-hpo version that made the study
    GRID_SIZE = "grid_size"  # number of grid points enqueued (grid sampler only)
    OBJECTIVES = "objectives"  # list of search.objectives.OBJECTIVES keys, accuracy first (absent: accuracy)
    LATENCY_DEVICE = "latency_device"  # --latency-device ("cpu" | "cuda"), with latency an objective
    SAMPLERS_USED = "samplers_used"  # SAMPLERS keys in the order runs used them (a resume may switch)
    RUN_CONFIG = "run_config"  # run --config FILE: {"path": FILE, "values": its keys} (None: no file)
    BUDGET_S = "budget_s"  # run --budget: the study's wall-clock budget in seconds, across all runs
    # run --mlflow: the study's parent run in MLflow, which every worker's trial runs nest under
    # (search.tracking); written by the first tracked run, replaced if the run is gone
    MLFLOW_RUN_ID = "mlflow_run_id"
    # run --warm-start: the "study@storage" sources applied so far, in order; a rerun naming one
    # again does not queue its configs (nor copy its history) a second time
    WARM_STARTED_FROM = "warm_started_from"


# What must match for two studies' trials to be comparable measurements: for a rerun to continue
# a study (search.study) and for a warm start to hand a source's trials to the sampler as history
# (search.warm_start). The sampler may differ: every sampler reads the same trials.
SAME_SEARCH = (StudyKey.SPACE_FINGERPRINT, StudyKey.DATA, StudyKey.DATA_FINGERPRINT, StudyKey.EPOCHS)


# Study system attribute (not shown by the dashboard): sampler streams handed out so far.
SAMPLER_STREAMS = "catdog_hpo:sampler_streams"
# Study system attributes of the time budget (search.budget): one [start, end] epoch-seconds
# interval per worker session, key prefix + session id; their union is the time spent.
BUDGET_SESSION_PREFIX = "catdog_hpo:budget_session:"
# The cost model's calibration per "<host>:<device>" (engine.cost.Calibration as a dict).
CALIBRATION_PREFIX = "catdog_hpo:calibration:"
REJECTION_CONSTRAINT = "turned_away"  # Trial.set_constraint key: > 0 on a config turned away


@dataclass(frozen=True)
class TrialRecord:
    """What catdog-hpo recorded on one trial; None where it recorded nothing."""

    number: int
    config: dict[str, Any] | None = None
    rejected: str | None = None
    fail_reason: str | None = None
    history: list[dict[str, Any]] | None = None
    epochs_run: int | None = None
    sec_per_epoch: float | None = None
    best_epoch: int | None = None
    n_params: int | None = None
    flops: int | None = None
    inference_flops: int | None = None
    device: str | None = None
    retry_of: int | None = None
    latency_ms: float | None = None
    latency_method: str | None = None
    pruned_by: str | None = None
    stopped_early: int | None = None
    predicted_s: float | None = None
    measured_s: float | None = None
    baseline: bool = False
    checkpoint: str | None = None
    weights_file: str | None = None
    resumed_from_trial: int | None = None
    resumed_from_epoch: int | None = None
    resume_ignored: str | None = None
    warm_start_from: str | None = None
    warm_history_from: str | None = None

    @classmethod
    def from_trial(cls, trial: FrozenTrial | optuna.Trial) -> TrialRecord:
        ua = trial.user_attrs
        config = ua.get(TrialKey.CONFIG)
        return cls(
            number=trial.number,
            config=config if isinstance(config, dict) else None,
            rejected=ua.get(TrialKey.REJECTED),
            fail_reason=ua.get(TrialKey.FAIL_REASON),
            history=ua.get(TrialKey.HISTORY),
            epochs_run=ua.get(TrialKey.EPOCHS_RUN),
            sec_per_epoch=ua.get(TrialKey.SEC_PER_EPOCH),
            best_epoch=ua.get(TrialKey.BEST_EPOCH),
            n_params=ua.get(TrialKey.N_PARAMS),
            flops=ua.get(TrialKey.FLOPS),
            inference_flops=ua.get(TrialKey.INFERENCE_FLOPS),
            device=ua.get(TrialKey.DEVICE),
            retry_of=ua.get(TrialKey.RETRY_OF),
            latency_ms=ua.get(TrialKey.LATENCY_MS),
            latency_method=ua.get(TrialKey.LATENCY_METHOD),
            pruned_by=ua.get(TrialKey.PRUNED_BY),
            stopped_early=ua.get(TrialKey.STOPPED_EARLY),
            predicted_s=ua.get(TrialKey.PREDICTED_S),
            measured_s=ua.get(TrialKey.MEASURED_S),
            baseline=bool(ua.get(TrialKey.BASELINE, False)),
            checkpoint=ua.get(TrialKey.CHECKPOINT),
            weights_file=ua.get(TrialKey.WEIGHTS_FILE),
            resumed_from_trial=ua.get(TrialKey.RESUMED_FROM_TRIAL),
            resumed_from_epoch=ua.get(TrialKey.RESUMED_FROM_EPOCH),
            resume_ignored=ua.get(TrialKey.RESUME_IGNORED),
            warm_start_from=ua.get(TrialKey.WARM_START_FROM),
            warm_history_from=ua.get(TrialKey.WARM_HISTORY_FROM),
        )

    @property
    def why(self) -> str:
        """Why the trial did not complete ("" when nothing was recorded)."""
        return self.fail_reason or self.rejected or ""

    @property
    def shipped_flops(self) -> int | None:
        """FLOPs per image of the model as shipped (both forwards with augment.tta); a trial from
        before ``inference_flops`` was recorded has only the one forward's."""
        return self.inference_flops if self.inference_flops is not None else self.flops


OUTCOMES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")  # what show/report/cards count


def outcome(trial: FrozenTrial) -> str:
    """How a trial ended, as users read it: Optuna's state name, except that a multi-objective
    trial stopped early (TrialKey.STOPPED_EARLY; stored COMPLETE for the samplers' sake) is
    "PRUNED". The one rule every view, export and the Pareto front apply."""
    name = trial.state.name
    if name == "COMPLETE" and trial.user_attrs.get(TrialKey.STOPPED_EARLY) is not None:
        return "PRUNED"
    return name


def from_history(trial: FrozenTrial) -> bool:
    """A trial of an earlier study copied in by ``run --warm-start`` for the sampler to learn
    from: it ran elsewhere, so it counts toward no --trials, no budget share and no best."""
    return TrialKey.WARM_HISTORY_FROM in trial.user_attrs


def finished_complete(trial: FrozenTrial) -> bool:
    """Completed all its epochs with a value, in this study: a trial export, the front and the
    best may pick (a warm start's history trial has no weights, files or run of its own here)."""
    return outcome(trial) == "COMPLETE" and bool(trial.values) and not from_history(trial)


def counts_toward_n(trial: FrozenTrial) -> bool:
    """A finished trial that trained here (completed or pruned); a config turned away before
    training (search.trial.reject) and a warm start's history trial do not use up --trials."""
    return (trial.state.name in ("COMPLETE", "PRUNED") and TrialKey.REJECTED not in trial.user_attrs
            and not from_history(trial))


# Where a trial's parameters came from when the sampler did not propose them. A retry carries
# them over (``retry_attrs``), so an interrupted warm-start config is still one when it reruns.
ORIGIN_KEYS = (TrialKey.BASELINE, TrialKey.ENQUEUED_FROM, TrialKey.WARM_START_FROM)


def asked_by_name(user_attrs: dict[str, Any]) -> bool:
    """A config the user asked for (the baseline, --enqueue, --warm-start), not one the sampler
    proposed: admission only asks it to finish in the budget (search.admission)."""
    return any(user_attrs.get(key) for key in ORIGIN_KEYS)


def retry_attrs(trial: FrozenTrial) -> dict[str, Any]:
    """The user attributes of the queued rerun of ``trial`` (interrupted, or its CUDA context
    lost): which trial it retries, and where the parameters came from (``ORIGIN_KEYS``)."""
    kept = {key: trial.user_attrs[key] for key in ORIGIN_KEYS if key in trial.user_attrs}
    return {**kept, TrialKey.RETRY_OF: trial.number}


def baseline_of(trials: list[FrozenTrial]) -> FrozenTrial | None:
    """The space's baseline trial: the latest attempt of the config marked ``TrialKey.BASELINE``
    (a retry carries the mark, and the interrupted attempt before it says nothing of its value)."""
    marked = [t for t in trials if t.user_attrs.get(TrialKey.BASELINE)]
    return max(marked, key=lambda t: t.number) if marked else None


def tally(trials: list[FrozenTrial]) -> tuple[int, int, int]:
    """(finished, running, waiting) of ``trials``; finished: those that count toward --trials."""
    finished = sum(counts_toward_n(t) for t in trials)
    running = sum(t.state.name == "RUNNING" for t in trials)
    waiting = sum(t.state.name == "WAITING" for t in trials)
    return finished, running, waiting


@dataclass(frozen=True)
class StudyInfo:
    """What ``run`` recorded on a study; None where it recorded nothing."""

    name: str
    space: str | None = None
    space_fingerprint: str | None = None
    sampler: str | None = None
    pruner: str | None = None
    data: str | None = None
    data_source: dict[str, Any] | None = None
    data_fingerprint: str | None = None
    overrides: dict[str, Any] | None = None
    target_trials: int | None = None
    seed: int | None = None
    epochs: int | None = None
    version: str | None = None
    grid_size: int = 0
    objectives: tuple[str, ...] = ("accuracy",)  # a study made before --objectives: accuracy only
    latency_device: str | None = None
    samplers_used: tuple[str, ...] = ()  # empty for a study made before the sampler could change
    run_config: dict[str, Any] | None = None
    budget_s: float | None = None
    mlflow_run_id: str | None = None
    warm_started_from: tuple[str, ...] = ()

    @classmethod
    def from_attrs(cls, name: str, attrs: dict[str, Any]) -> StudyInfo:
        """From a study's user attributes (``study.user_attrs`` or a ``FrozenStudy``'s)."""
        return cls(
            name=name,
            space=attrs.get(StudyKey.SPACE),
            space_fingerprint=attrs.get(StudyKey.SPACE_FINGERPRINT),
            sampler=attrs.get(StudyKey.SAMPLER),
            pruner=attrs.get(StudyKey.PRUNER),
            data=attrs.get(StudyKey.DATA),
            data_source=attrs.get(StudyKey.DATA_SOURCE),
            data_fingerprint=attrs.get(StudyKey.DATA_FINGERPRINT),
            overrides=attrs.get(StudyKey.OVERRIDES) or {},
            target_trials=attrs.get(StudyKey.TARGET_TRIALS),
            seed=attrs.get(StudyKey.SEED),
            epochs=attrs.get(StudyKey.EPOCHS),
            version=attrs.get(StudyKey.VERSION),
            grid_size=int(attrs.get(StudyKey.GRID_SIZE, 0) or 0),
            objectives=tuple(attrs.get(StudyKey.OBJECTIVES) or ("accuracy",)),
            latency_device=attrs.get(StudyKey.LATENCY_DEVICE),
            samplers_used=tuple(attrs.get(StudyKey.SAMPLERS_USED) or ()),
            run_config=attrs.get(StudyKey.RUN_CONFIG),
            budget_s=attrs.get(StudyKey.BUDGET_S),
            mlflow_run_id=attrs.get(StudyKey.MLFLOW_RUN_ID),
            warm_started_from=tuple(attrs.get(StudyKey.WARM_STARTED_FROM) or ()),
        )

    @classmethod
    def from_study(cls, study: optuna.Study) -> StudyInfo:
        return cls.from_attrs(study.study_name, study.user_attrs)

    @property
    def made_by_run(self) -> bool:
        """Whether ``catdog-hpo run`` finished creating this study (its fingerprint is written last)."""
        return self.space_fingerprint is not None
