"""Shipping the weights the search trained, without training again.

``run`` keeps the best-epoch weights of the study's most accurate trials (``search.checkpoints``,
``--keep-weights``). ``export --with-weights`` copies the chosen trial's file beside the export
file (``<export>.weights.pt``) and records it under ``weights`` (file, SHA-256, epoch, accuracy);
``retrain --no-train`` loads it instead of training: it evaluates, saves the checkpoint, exports
the formats and writes the model card for exactly the model the search measured, in seconds.
Retraining stays the default.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from catdog_hpo.config import TrialConfig, read_mapping, to_dict
from catdog_hpo.data import ImageSet
from catdog_hpo.engine.resume import StateRejected, load_weights
from catdog_hpo.errors import UserError
from catdog_hpo.files import atomic_write

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from catdog_hpo.ship.retrain import RetrainSettings
    from catdog_hpo.ship.seed_run import SeedRun
    from catdog_hpo.ship.trialfile import ExportSettings

WEIGHTS_SUFFIX = ".weights.pt"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_weights(settings: ExportSettings, study: optuna.Study, trial: FrozenTrial, cfg: TrialConfig,
                   export_path: Path) -> dict[str, Any]:
    """Copy the trial's kept best-epoch weights beside ``export_path``; the export file's
    ``weights`` entry. UserError (one line) when run did not keep them or they do not match."""
    from catdog_hpo.search.checkpoints import study_folder
    from catdog_hpo.search.record import TrialRecord
    from catdog_hpo.ship.config_diff import first_difference, normalised_config

    name = TrialRecord.from_trial(trial).weights_file
    folder, _ = study_folder(settings.storage, study.study_name, settings.studies_dir, settings.checkpoint_dir)
    source = folder / name if folder is not None and name else None
    if source is None or not source.is_file():
        where = f" ({source} is gone)" if source is not None else ""
        raise UserError(f"--with-weights: the best-epoch weights of trial {trial.number} were not kept{where}: "
                        "run keeps those of its --keep-weights most accurate trials (and --checkpoint-dir "
                        "must name the folder run used); export without --with-weights and retrain")
    try:
        weights = load_weights(source)
    except StateRejected as exc:
        raise UserError(f"--with-weights: {exc}") from None
    diff = first_difference(normalised_config(weights["config"], f"--with-weights: {source}: config"), to_dict(cfg))
    if diff is not None:
        raise UserError(f"--with-weights: {source} holds another config than trial {trial.number}'s "
                        f"({diff[0]} = {diff[1]!r}, the trial's is {diff[2]!r})")
    target = export_path.with_name(export_path.stem + WEIGHTS_SUFFIX)
    try:
        atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))
    except OSError as exc:
        raise UserError(f"--out {export_path}: cannot write {target.name} beside it ({exc.strerror or exc})") from None
    return {"file": target.name, "sha256": _sha256(target), "epoch": int(weights["epoch"]),
            "val_acc": float(weights["val_acc"]), "classes": list(weights["classes"]),
            "note": f"trial {trial.number}'s own weights at its best epoch, as the search measured them"}


def check_no_train(settings: RetrainSettings) -> None:
    """--no-train ships the searched weights as they are: no flag that changes training."""
    given = [flag for flag, on in (("--epochs", settings.epochs is not None), ("--seed", settings.seed is not None),
                                   ("--seeds", settings.seeds != 1), ("--train-on", settings.train_on != "train"),
                                   ("--weights", settings.weights is not None)) if on]
    if given:
        raise UserError(f"--no-train ships the search's weights as they are: drop {', '.join(given)} "
                        "(or retrain without --no-train)")


def searched_weights(config_file: Path) -> tuple[dict[str, Any], Path]:
    """The export file's ``weights`` entry and the weights file it names (checked by SHA-256)."""
    doc = read_mapping(config_file)
    entry = doc.get("weights")
    if not isinstance(entry, dict) or not entry.get("file"):
        raise UserError(f"--no-train: {config_file} has no searched weights "
                        "(export the trial with --with-weights, or retrain without --no-train)")
    path = Path(config_file).parent / str(entry["file"])
    if not path.is_file():
        raise UserError(f"--no-train: {path} (named by {config_file}) does not exist")
    if entry.get("sha256") and _sha256(path) != entry["sha256"]:
        raise UserError(f"--no-train: {path} is not the file {config_file} was exported with (SHA-256 differs)")
    return entry, path


def searched_run(settings: RetrainSettings, cfg: TrialConfig, data: ImageSet, test: tuple | None,
                 device: torch.device, log: Callable[[str], None]) -> list[SeedRun]:
    """retrain's one "seed" under --no-train: the trial's weights, evaluated on val (and test)."""
    from catdog_hpo.engine.augment import MEAN, STD
    from catdog_hpo.engine.tta import with_tta
    from catdog_hpo.ship.checkpoint import bare_model
    from catdog_hpo.ship.config_diff import normalised_config
    from catdog_hpo.ship.model_meta import ModelMeta
    from catdog_hpo.ship.predict import evaluate
    from catdog_hpo.ship.seed_run import SeedRun, seed_line

    entry, path = searched_weights(settings.config)
    try:
        weights = load_weights(path)
    except StateRejected as exc:
        raise UserError(f"--no-train: {exc}") from None
    if normalised_config(weights["config"], f"--no-train: {path}: config") != to_dict(cfg):
        raise UserError(f"--no-train: {path} holds another config than {settings.config}")
    if tuple(weights["classes"]) != tuple(data.classes):
        raise UserError(f"--no-train: the weights know classes {', '.join(weights['classes'])}, the data has "
                        f"{', '.join(data.classes)}")
    doc = read_mapping(settings.config)
    history = (doc.get("metrics") or {}).get("history") or []
    run = SeedRun(seed=cfg.train.seed, status="completed", reason="", history=list(history),
                  kept_epoch=int(weights["epoch"]), state=weights["state_dict"])
    model = bare_model(cfg.model, len(data.classes), cfg.image_size)
    model.load_state_dict(run.state)
    model = with_tta(model, cfg.augment.tta)  # scored as the trial's validation scored it
    meta = ModelMeta(classes=tuple(data.classes), image_size=cfg.image_size, mean=tuple(MEAN), std=tuple(STD))
    run.val = evaluate(model, data.val_x, data.val_y, meta, device)
    if test is not None:
        run.test = evaluate(model, test[0], test[1], meta, device)
    log(seed_line(run, "train") + f"; the search's weights (trial {doc.get('trial', {}).get('number')}, "
        f"recorded val accuracy {entry.get('val_acc'):.4f}), not retrained")
    return [run]


def record(settings: RetrainSettings) -> dict[str, Any]:
    """metrics.json's ``searched_weights``: what was shipped instead of a retrained model."""
    entry, _ = searched_weights(settings.config)
    doc = read_mapping(settings.config)
    return {"trial": (doc.get("trial") or {}).get("number"), "study": doc.get("study"), "file": entry["file"],
            "epoch": entry.get("epoch"), "val_acc": entry.get("val_acc"),
            "note": "the search's own weights at the trial's best epoch; not retrained (retrain --no-train)"}
