"""`catdog-hpo export`: the best (or a chosen) trial of a study -> one YAML/JSON file.

The trial's parameters are replayed through the study's own search space
(``spaces.resolve(load_space(space), FixedTrial(params), overrides)``), and the replayed config
must equal the config the trial recorded: so the exported config is what the search measured,
from the one mapping of parameters to configs there is. The file's ``config`` section is a plain
TrialConfig, so ``config.load_trial_config`` (``train``, ``retrain``) reads the file directly.
"""

from __future__ import annotations

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

from catdog_hpo.config import FORMAT_VERSION, TrialConfig, to_dict, write_mapping
from catdog_hpo.errors import ConfigError, UserError
from catdog_hpo.search.spaces import base_image_size, load_space, resolve

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


@dataclass(frozen=True)
class Exported:
    path: Path
    trial: FrozenTrial
    config: TrialConfig
    command: str  # the retrain command that reproduces the trial


# --------------------------------------------------------------------------- picking the trial


def pick_trial(study: optuna.Study, number: int | None) -> FrozenTrial:
    """Trial ``number`` (it must have completed) or the best completed trial; UserError otherwise."""
    trials = study.get_trials(deepcopy=False)
    if number is None:
        done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
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
    if trial.state != TrialState.COMPLETE:
        why = trial.user_attrs.get("fail_reason") or trial.user_attrs.get("rejected") or ""
        state = "failed" if trial.state == TrialState.FAIL else trial.state.name.lower()
        raise UserError(f"--trial {number}: the trial is {state}, not complete"
                        + (f" ({why})" if why else "") + "; only completed trials can be exported")
    return trial


def _state_counts(trials: list[FrozenTrial]) -> str:
    counts: dict[str, int] = {}
    for t in trials:
        word = "failed" if t.state == TrialState.FAIL else t.state.name.lower()
        counts[word] = counts.get(word, 0) + 1
    return ", ".join(f"{n} {s}" for s, n in counts.items()) or "no trials"


# --------------------------------------------------------------------------- replay


def replay_config(study: optuna.Study, trial: FrozenTrial) -> TrialConfig:
    """The trial's config, rebuilt from its parameters through the study's search space.

    UserError (one line) when the space cannot be loaded, the parameters no longer fit it, or
    the replayed config differs from the config the trial recorded (the space changed)."""
    attrs = study.user_attrs
    where = f"trial {trial.number} of study {study.study_name!r}"
    if "space" not in attrs:
        raise UserError(f"study {study.study_name!r} has no 'space' attribute: it was not made by catdog-hpo run")
    recorded = trial.user_attrs.get("config")
    if not isinstance(recorded, dict):
        raise UserError(f"{where} has no recorded 'config' attribute to check the replay against")
    try:
        space = load_space(attrs["space"])
    except UserError as exc:
        raise UserError(f"{where}: cannot load its search space {attrs['space']!r}: {exc}") from None
    overrides = attrs.get("overrides") or {}
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


def first_difference(a: Any, b: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    """The first dotted path where nested data ``a`` and ``b`` differ, with both values; None if equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in a or key not in b:
                return path, a.get(key, "(missing)"), b.get(key, "(missing)")
            found = first_difference(a[key], b[key], path)
            if found is not None:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return prefix, a, b
        for i, (x, y) in enumerate(zip(a, b)):
            found = first_difference(x, y, f"{prefix}[{i}]")
            if found is not None:
                return found
        return None
    if a != b or isinstance(a, bool) != isinstance(b, bool):  # True == 1 in Python; not in a config
        return prefix, a, b
    return None


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
    attrs, ua = study.user_attrs, trial.user_attrs
    space_name = attrs.get("space")
    try:
        fingerprint_size = base_image_size(load_space(space_name))
    except UserError:
        fingerprint_size = None
    return {
        "format_version": FORMAT_VERSION,
        "kind": EXPORT_KIND,
        "study": study.study_name,
        "trial": {"number": trial.number, "id": trial._trial_id},  # _trial_id: the storage's key; no public accessor
        "space": {"name": space_name, "fingerprint": attrs.get("space_fingerprint"),
                  "overrides": attrs.get("overrides") or {}},
        "params": dict(trial.params),
        "config": to_dict(cfg),
        "data": {
            "source": attrs.get("data_source"),  # path or name, val_fraction, split_seed, root
            "description": attrs.get("data"),
            "fingerprint": attrs.get("data_fingerprint"),
            # The study fingerprints the data at the space's base image size; it changes with the size.
            "fingerprint_image_size": fingerprint_size,
        },
        "metrics": {
            "value": trial.value,  # validation accuracy the study recorded (the final epoch's)
            "best_epoch": ua.get("best_epoch"),
            "epochs_run": ua.get("epochs_run"),
            "sec_per_epoch": ua.get("sec_per_epoch"),
            "n_params": ua.get("n_params"),
            "flops": ua.get("flops"),
            "device": ua.get("device"),
            "history": ua.get("history"),
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
    trial = pick_trial(study, settings.trial)
    cfg = replay_config(study, trial)
    path = settings.out or default_path(settings.studies_dir, study.study_name, trial.number)
    try:
        write_mapping(path, export_document(study, trial, cfg))
    except OSError as exc:
        raise UserError(f"--out {path}: cannot write it ({exc.strerror or exc})") from None
    return Exported(path=path, trial=trial, config=cfg, command=retrain_command(path))
