"""The trial file: `catdog-hpo export` writes the best (or a chosen) trial of a study to one
YAML/JSON file, and ``read_export_info`` reads back what ``retrain`` needs besides the config.

The trial's parameters are replayed through the study's own search space
(``spaces.resolve(load_space(space), FixedTrial(params), overrides)``), and the replayed config
must equal the config the trial recorded: so the exported config is what the search measured,
from the one mapping of parameters to configs there is. The file's ``config`` section is a plain
TrialConfig, so ``config.load_trial_config`` (``train``, ``retrain``) reads the file directly.
"""

from __future__ import annotations

import dataclasses
import platform
import re
import shlex
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from catdog_hpo.config import FORMAT_VERSION, TrialConfig, read_mapping, to_dict, write_mapping
from catdog_hpo.data import DataSource
from catdog_hpo.errors import ConfigError, UserError
from catdog_hpo.search import optuna_compat
from catdog_hpo.search.record import StudyInfo, StudyKey, TrialKey, TrialRecord, finished_complete, outcome
from catdog_hpo.search.space_files import base_image_size, load_space
from catdog_hpo.search.spaces import resolve
from catdog_hpo.ship.config_diff import first_difference, normalised_config

EXPORT_KIND = "catdog-hpo-export"
SUFFIXES = (".yaml", ".yml", ".json")
# Distributions whose versions make a run reproducible (PyPI names).
VERSIONED = ("catdog-hpo", "torch", "torchvision", "optuna")


@dataclass(frozen=True)
class ExportSettings:
    study: str
    storage: str
    trial: int | None = None  # trial number; None = the best completed trial
    out: Path | None = None  # None = <studies_dir>/exports/<study>-trial<N>.yaml
    studies_dir: Path = Path("studies")
    pareto: bool = False  # pick from the Pareto front (search.pareto.pick_front_point)
    max_params: int | None = None  # ... the most accurate trial with at most this many parameters
    max_latency: float | None = None  # ... and/or at most this latency, ms
    with_weights: bool = False  # --with-weights: copy the trial's best-epoch weights beside it (ship.searched)
    checkpoint_dir: Path | None = None  # --checkpoint-dir run used (None: run's default for the store)


@dataclass(frozen=True)
class Exported:
    path: Path
    trial: FrozenTrial
    config: TrialConfig
    command: str  # the retrain command that reproduces the trial
    rule: str = ""  # how the trial was chosen, in words


# --------------------------------------------------------------------------- picking the trial


def pick_trial(study: optuna.Study, number: int | None) -> FrozenTrial:
    """Trial ``number`` (it must have completed) or the best completed trial; UserError otherwise."""
    trials = study.get_trials(deepcopy=False)
    if number is None:
        done = [t for t in trials if finished_complete(t) and t.value is not None]
        if not done:
            states = _state_counts(trials)
            raise UserError(f"study {study.study_name!r} has no completed trial yet ({states}); "
                            f"nothing to export")
        sign = 1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1
        return max(done, key=lambda t: (sign * t.value, -t.number))  # ties: the earlier trial
    by_number = {t.number: t for t in trials}
    if number not in by_number:
        have = f"0 to {max(by_number)}" if by_number else "none"
        raise UserError(f"--trial {number}: study {study.study_name!r} has no trial {number} (trials: {have})")
    trial = by_number[number]
    copied = trial.user_attrs.get(TrialKey.WARM_HISTORY_FROM)
    if copied:  # it never ran in this study: its own study has its files
        raise UserError(f"--trial {number}: a --warm-start history trial, copied from {copied}; "
                        "export it from that study")
    if not finished_complete(trial):
        rec = TrialRecord.from_trial(trial)
        why = rec.why or (f"stopped early after epoch {rec.stopped_early}" if rec.stopped_early else "")
        state = "failed" if trial.state == TrialState.FAIL else outcome(trial).lower()
        raise UserError(f"--trial {number}: the trial is {state}, not complete"
                        + (f" ({why})" if why else "") + "; only completed trials can be exported")
    return trial


def _state_counts(trials: list[FrozenTrial]) -> str:
    counts: dict[str, int] = {}
    for t in trials:
        word = "failed" if t.state == TrialState.FAIL else outcome(t).lower()
        counts[word] = counts.get(word, 0) + 1
    return ", ".join(f"{n} {s}" for s, n in counts.items()) or "no trials"


# --------------------------------------------------------------------------- replay


def replay_config(study: optuna.Study, trial: FrozenTrial) -> TrialConfig:
    """The trial's config, rebuilt from its parameters through the study's search space.

    UserError (one line) when the space cannot be loaded, the parameters no longer fit it, or
    the replayed config differs from the config the trial recorded (the space changed)."""
    info = StudyInfo.from_study(study)
    where = f"trial {trial.number} of study {study.study_name!r}"
    if info.space is None:
        raise UserError(f"study {study.study_name!r} has no {StudyKey.SPACE!r} attribute: "
                        f"it was not made by catdog-hpo run")
    recorded = TrialRecord.from_trial(trial).config
    if recorded is None:
        raise UserError(f"{where} has no recorded {TrialKey.CONFIG!r} attribute to check the replay against")
    recorded = normalised_config(recorded, f"{where}: its recorded config")
    try:
        space = load_space(info.space)
    except UserError as exc:
        raise UserError(f"{where}: cannot load its search space {info.space!r}: {exc}") from None
    overrides = info.overrides or {}
    try:
        with warnings.catch_warnings():
            # FixedTrial warns when a value lies outside a (changed) range; the config check below decides.
            warnings.simplefilter("ignore")
            cfg = resolve(space, optuna.trial.FixedTrial(dict(trial.params), number=trial.number), overrides)
    except ValueError as exc:  # FixedTrial: a parameter the space asks for that the trial lacks
        first = str(exc).splitlines()[0]
        raise UserError(f"{where} does not replay through space {space.name!r} ({first}): "
                        f"the space changed since the study ran") from None
    except ConfigError as exc:
        raise UserError(f"{where} does not replay through space {space.name!r}: {exc}") from None
    diff = first_difference(to_dict(cfg), recorded)
    if diff is not None:
        key, now, then = diff
        raise UserError(f"{where}: replaying its parameters through space {space.name!r} gives "
                        f"{key} = {now!r}, but the trial ran with {then!r}: the space (or its overrides) "
                        f"changed since the study ran")
    return cfg


# --------------------------------------------------------------------------- the document


def package_versions() -> dict[str, str]:
    out = {}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    out["python"] = platform.python_version()
    return out


def export_document(study: optuna.Study, trial: FrozenTrial, cfg: TrialConfig) -> dict[str, Any]:
    """The export file's content: plain data, YAML/JSON-ready."""
    info, rec = StudyInfo.from_study(study), TrialRecord.from_trial(trial)
    space_name = info.space
    try:
        fingerprint_size = base_image_size(load_space(space_name))
    except UserError:
        fingerprint_size = None
    return {
        "format_version": FORMAT_VERSION,
        "kind": EXPORT_KIND,
        "study": study.study_name,
        "trial": {"number": trial.number, "id": optuna_compat.trial_id(trial)},  # the storage's key
        "space": {"name": space_name, "fingerprint": info.space_fingerprint,
                  "overrides": info.overrides or {}},
        # How the study ran: its samplers (a resume may switch) and the run --config file, if any.
        "run": {"samplers_used": list(info.samplers_used) or ([info.sampler] if info.sampler else []),
                "config_file": info.run_config},
        "params": dict(trial.params),
        "config": to_dict(cfg),
        "data": {
            "source": info.data_source,  # path or name, val_fraction, split_seed, root
            "description": info.data,
            "fingerprint": info.data_fingerprint,
            # The study fingerprints the data at the space's base image size; it changes with the size.
            "fingerprint_image_size": fingerprint_size,
        },
        "metrics": {
            "value": trial.values[0],  # validation accuracy the study recorded (the final epoch's; accuracy is objective 0)
            "best_epoch": rec.best_epoch,
            "epochs_run": rec.epochs_run,
            "sec_per_epoch": rec.sec_per_epoch,
            "n_params": rec.n_params,
            "flops": rec.flops,
            "device": rec.device,
            "history": rec.history,
        },
        "seed": cfg.train.seed,
        "versions": package_versions(),
    }


def default_path(studies_dir: Path, study_name: str, number: int) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", study_name)
    return Path(studies_dir) / "exports" / f"{safe}-trial{number}.yaml"


def retrain_command(path: Path) -> str:
    return f"catdog-hpo retrain --config {shlex.quote(str(path))}"


def export_trial(settings: ExportSettings) -> Exported:
    """Write the export file for the chosen trial; returns where, and the retrain command."""
    from catdog_hpo.search.storage import load_study, open_storage

    if settings.out is not None and settings.out.suffix.lower() not in SUFFIXES:
        raise UserError(f"--out {settings.out}: the file must end in {', '.join(SUFFIXES)} (YAML or JSON)")
    storage = open_storage(settings.storage, create=False)
    study = load_study(storage, settings.study, settings.storage)
    trial, rule, front = _pick(study, settings)
    cfg = replay_config(study, trial)
    path = settings.out or default_path(settings.studies_dir, study.study_name, trial.number)
    doc = export_document(study, trial, cfg)
    from catdog_hpo.search.storage import mask_password
    from catdog_hpo.ship.model_card import search_record

    doc["search"] = search_record(study, trial, rule, front, _export_args(settings), mask_password(settings.storage))
    if settings.with_weights:  # retrain --no-train ships them as the search measured them
        from catdog_hpo.ship.searched import export_weights

        doc["weights"] = export_weights(settings, study, trial, cfg, path)
    try:
        write_mapping(path, doc)
    except OSError as exc:
        raise UserError(f"--out {path}: cannot write it ({exc.strerror or exc})") from None
    return Exported(path=path, trial=trial, config=cfg, command=retrain_command(path), rule=rule)


def _pick(study: optuna.Study, settings: ExportSettings) -> tuple[FrozenTrial, str, list[int]]:
    """The trial to export, how it was chosen (in words) and the front's trial numbers."""
    from catdog_hpo.search.pareto import front_trials, pick_front_point

    multi = len(study.directions) > 1
    if settings.trial is not None:
        trial = pick_trial(study, settings.trial)
        return trial, f"trial {trial.number}, chosen by number", [t.number for t in front_trials(study)] if multi else []
    if multi or settings.pareto or settings.max_params is not None or settings.max_latency is not None:
        pick = pick_front_point(study, settings.max_params, settings.max_latency)
        return pick.trial, pick.rule, pick.front
    return pick_trial(study, None), "the most accurate completed trial", []


def _export_args(settings: ExportSettings) -> list[str]:
    if settings.trial is not None:
        return ["--trial", str(settings.trial)]
    args = ["--pareto"] if settings.pareto else []
    if settings.max_params is not None:
        args += ["--max-params", str(settings.max_params)]
    if settings.max_latency is not None:
        args += ["--max-latency", f"{settings.max_latency:g}"]
    return args


# --------------------------------------------------------------------------- reading it back


@dataclass(frozen=True)
class ExportInfo:
    """What an export file records besides the config (all None for a plain config file)."""

    source: DataSource | None = None
    fingerprint: str | None = None
    fingerprint_image_size: int | None = None
    study: str | None = None
    trial: int | None = None
    value: float | None = None  # the val accuracy the study recorded for the trial
    device: str | None = None  # where the trial trained


def read_export_info(path: Path) -> ExportInfo:
    """The data source, fingerprint and trial an export file records; empty for a plain config.
    (The config itself is read by ``config.load_trial_config``.)"""
    doc = read_mapping(path)
    data = doc.get("data")
    if not isinstance(data, dict):
        return ExportInfo()
    raw = data.get("source")
    source = None
    if raw is not None:
        names = {f.name for f in dataclasses.fields(DataSource)}
        if not isinstance(raw, dict) or set(raw) - names:
            raise ConfigError(f"{path}: data.source: expected a mapping of {', '.join(sorted(names))}")
        source = DataSource(**raw)
    trial = doc.get("trial") if isinstance(doc.get("trial"), dict) else {}
    metrics = doc.get("metrics") if isinstance(doc.get("metrics"), dict) else {}
    return ExportInfo(source=source, fingerprint=data.get("fingerprint"),
                      fingerprint_image_size=data.get("fingerprint_image_size"),
                      study=doc.get("study"), trial=trial.get("number"), value=metrics.get("value"),
                      device=metrics.get("device"))
