"""`catdog-hpo retrain`: train the final model from a config or export file, with the search's engine.

One call of ``train.fit`` per seed (the same function every trial ran), then, for the kept
model: a checkpoint (everything ``predict`` needs), metrics.json (val and test accuracy,
per-class precision/recall, confusion matrices, mean ± std over seeds), curves.svg, and the
TorchScript/ONNX exports checked against PyTorch (``formats``). With ``augment.tta`` the scores,
the exported files and the card's latency are of the flip-averaged model (``engine.tta``); the
checkpoint keeps the plain network and its config, and predict wraps it from there.

What is kept: training on ``train`` keeps each seed's best epoch (fit's ``best_state``: the val
set chose it); on ``train+val`` there is no held-out set, so the final epoch's weights are kept
and the val accuracy is a training-set number (metrics.json and the printout say so). Of K seeds
the one with the highest val accuracy is kept.

The pieces live next to their kin: the export file's reader in ``ship.trialfile`` (beside its
writer), the test folder in ``data.testset``, evaluation in ``ship.predict`` (predict's own
batching and normalisation), metrics.json and the printed lines in ``ship.retrain_report``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from catdog_hpo.config import TrialConfig, load_trial_config, read_mapping, with_train_overrides, write_mapping
from catdog_hpo.data import DataSource, ImageSet, load_images
from catdog_hpo.data.testset import load_test_set
from catdog_hpo.engine.tta import describe_flops, with_tta
from catdog_hpo.errors import UserError
from catdog_hpo.ship.checkpoint import bare_model
from catdog_hpo.ship.formats import ExportResult, export_all
from catdog_hpo.ship.model_meta import ModelMeta
from catdog_hpo.ship.predict import evaluate
from catdog_hpo.ship import searched
from catdog_hpo.ship.retrain_report import (checkpoint_metrics, metrics_document, plural, retrain_command,
                                            summary_lines)
from catdog_hpo.ship.seed_run import SeedRun, seed_line
from catdog_hpo.ship.choices import TRAIN_ON  # the --train-on choices
from catdog_hpo.ship.trialfile import ExportInfo, read_export_info

CHECK_BATCH = 8  # val images the exports are checked on
FORMATS = ("torchscript", "onnx", "pt2")  # ship.formats.export_all's formats


@dataclass(frozen=True)
class RetrainSettings:
    config: Path  # a TrialConfig file or an export file
    data: DataSource | None = None  # None: the source recorded in the export file
    epochs: int | None = None  # None: the config's train.epochs
    weights: str | None = None  # --weights FILE: replaces the config's model.weights_file
    seed: int | None = None  # first seed; None: the config's train.seed
    seeds: int = 1  # K runs with seeds seed, seed+1, ...
    train_on: str = "train"  # "train" | "train+val"
    test_dir: Path | None = None  # extra held-out images, DIR/<class>/*
    device: str = "auto"
    out: Path | None = None  # None: <studies_dir>/models/<config stem>
    studies_dir: Path = Path("studies")
    formats: tuple[str, ...] = FORMATS  # () skips the TorchScript/ONNX exports
    progress: bool = False
    deterministic: bool = False  # --deterministic (engine.runtime.configure_process)
    no_train: bool = False  # --no-train: ship the export file's searched weights (ship.searched)


@dataclass(frozen=True)
class RetrainResult:
    out: Path
    checkpoint: Path
    metrics: dict[str, Any]
    exports: list[ExportResult]


# --------------------------------------------------------------------------- inputs


def _with_train_on(data: ImageSet, train_on: str) -> ImageSet:
    if train_on == "train":
        return data
    # train+val: the val images join the training set and are still evaluated (not held out).
    return dataclasses.replace(data, train_x=torch.cat([data.train_x, data.val_x]),
                               train_y=torch.cat([data.train_y, data.val_y]))


# --------------------------------------------------------------------------- one seed


def _meta(cfg: TrialConfig, classes: tuple[str, ...]) -> ModelMeta:
    from catdog_hpo.engine.augment import MEAN, STD

    return ModelMeta(classes=tuple(classes), image_size=cfg.image_size, mean=tuple(MEAN), std=tuple(STD),
                     tta=cfg.augment.tta)


def train_seed(cfg: TrialConfig, data: ImageSet, device: torch.device, train_on: str,
               log: Callable[[str], None], progress: bool, feature_cache: Path | None = None) -> SeedRun:
    """One fit; keeps the best epoch (train) or the final one (train+val). ``feature_cache``: as
    the study, a frozen-backbone config trains its head on cached features (train only)."""
    from catdog_hpo.engine import epoch_table
    from catdog_hpo.engine.epochs import EpochStats
    from catdog_hpo.engine.train import fit

    def row(s: EpochStats) -> None:
        log(epoch_table.row(s))

    started = time.perf_counter()
    log(epoch_table.HEAD)
    if train_on == "train":
        # Exactly what a trial runs: fit builds the model after seeding, so the same seed on the
        # CPU gives the trial's history bit for bit.
        result = fit(cfg, data, device, on_epoch_end=row, progress=progress, feature_cache=feature_cache)
        state, kept = result.best_state, result.best_epoch
    else:
        torch.manual_seed(cfg.train.seed)  # weight init, as fit seeds it
        model = _built_model(cfg, len(data.classes))
        result = fit(cfg, data, device, on_epoch_end=row, model=model, progress=progress)
        # fit trains ``model`` in place: its weights now are the final epoch's.
        finished = result.status == "completed"
        state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()} if finished else None
        kept = len(result.history) if finished else 0
    return SeedRun(seed=cfg.train.seed, status=result.status, reason=result.reason,
                   history=[s.to_dict() for s in result.history], kept_epoch=kept, state=state,
                   seconds=time.perf_counter() - started)


def _built_model(cfg: TrialConfig, num_classes: int) -> nn.Module:
    from catdog_hpo.engine.models import build_model

    return build_model(cfg.model, num_classes, cfg.image_size)  # with its pretrained backbone


# --------------------------------------------------------------------------- the command


def _configs(settings: RetrainSettings) -> tuple[TrialConfig, TrialConfig]:
    """(the file's config, the one to train: with --epochs/--seed applied)."""
    file_cfg = load_trial_config(settings.config)
    cfg = with_train_overrides(file_cfg, epochs=settings.epochs, seed=settings.seed)
    if settings.weights is not None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, weights_file=settings.weights))
    return file_cfg, cfg


def _train_seeds(settings: RetrainSettings, cfg: TrialConfig, data: ImageSet, test: tuple | None,
                 device: torch.device, log: Callable[[str], None]) -> list[SeedRun]:
    """K fits with seeds seed, seed+1, ...; each kept model evaluated on val (and test)."""
    train_data = _with_train_on(data, settings.train_on)
    train_data = dataclasses.replace(  # moved once, not once per seed
        train_data, train_x=train_data.train_x.to(device), train_y=train_data.train_y.to(device),
        val_x=train_data.val_x.to(device), val_y=train_data.val_y.to(device))
    meta = _meta(cfg, data.classes)
    runs: list[SeedRun] = []
    for k in range(settings.seeds):
        seed_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=cfg.train.seed + k))
        log(f"seed {seed_cfg.train.seed}:")
        run = train_seed(seed_cfg, train_data, device, settings.train_on, log, settings.progress,
                         feature_cache=settings.studies_dir / "cache")
        if run.ok:
            model = bare_model(seed_cfg.model, len(data.classes), seed_cfg.image_size)
            model.load_state_dict(run.state)
            model = with_tta(model, cfg.augment.tta)  # scored as validation scored it
            run.val = evaluate(model, train_data.val_x, train_data.val_y, meta, device)  # the device copy
            if test is not None:
                run.test = evaluate(model, test[0], test[1], meta, device)
        log(seed_line(run, settings.train_on))
        runs.append(run)
    return runs


def _export_formats(settings: RetrainSettings, out: Path, checkpoint: Path, data: ImageSet,
                    meta: ModelMeta, metrics: dict[str, Any], log: Callable[[str], None]) -> list[ExportResult]:
    """TorchScript and ONNX of the saved checkpoint, checked on val images; metrics.json updated."""
    from catdog_hpo.ship.checkpoint import load_model

    for stale in ("model.ts", "model.onnx", "model.pt2"):
        (out / stale).unlink(missing_ok=True)  # never leave an export of an older model beside this one
    if not settings.formats:
        return []
    model, ck = load_model(checkpoint, torch.device("cpu"))  # the file as predict will read it
    model = with_tta(model, ck.config.augment.tta)  # the files hold the flip average (meta.tta says so)
    batch = _check_batch(data, meta)
    exports = export_all(model, batch, out, meta, settings.formats)
    for r in exports:
        log(r.line())
    metrics["exports"] = {r.format: r.to_dict() for r in exports}
    metrics["exports_checked_on"] = f"{batch.shape[0]} val images"
    write_mapping(out / "metrics.json", metrics)
    return exports


def retrain(settings: RetrainSettings, log: Callable[[str], None] = print) -> RetrainResult:
    """Train, evaluate, save and export; see the module docstring. UserError for bad inputs."""
    from catdog_hpo.search.artifacts import curves_svg
    from catdog_hpo.ship.checkpoint import save_checkpoint
    from catdog_hpo.engine.device import resolve_device
    from catdog_hpo.engine.models import check_model, model_cost

    if settings.train_on not in TRAIN_ON:
        raise UserError(f"--train-on {settings.train_on!r}: expected one of {', '.join(TRAIN_ON)}")
    if settings.seeds < 1:
        raise UserError(f"--seeds {settings.seeds}: must be 1 or more")
    if settings.no_train:
        searched.check_no_train(settings)
    file_cfg, cfg = _configs(settings)
    info = read_export_info(settings.config)
    check_model(cfg.model, cfg.image_size)  # before any data is loaded: a bad model fails fast
    source = settings.data or info.source
    if source is None:
        raise UserError(f"{settings.config}: records no data source (not an export file); "
                        "pass --data DIR or --dataset NAME")
    out = settings.out if settings.out is not None else settings.studies_dir / "models" / settings.config.stem
    device = resolve_device(settings.device)
    from catdog_hpo.engine.runtime import configure_process

    configure_process(str(device), deterministic=settings.deterministic)  # TF32, determinism

    data = load_images(source, cfg.image_size, settings.studies_dir / "cache")
    same_data = _same_data(info, data, cfg)
    test = load_test_set(settings.test_dir, data.classes, cfg.image_size) if settings.test_dir else None
    test_name = str(settings.test_dir)
    if test is None and source.name is not None:
        # A built-in dataset's official test split: the search never saw it (its val is carved
        # from the training split); scored once here, reported beside val.
        from catdog_hpo.data.builtin import official_test_split

        test = official_test_split(source, cfg.image_size)
        test_name = f"the official test split of {source.name}"
    cost = model_cost(cfg.model, len(data.classes), cfg.image_size)
    log(f"data: {source.describe()}: {len(data.train_y)} train / {len(data.val_y)} val images, "
        f"classes {', '.join(data.classes)}, {cfg.image_size} px"
        + (f"; test: {test_name}: {len(test[1])} images" if test else ""))
    if same_data is False:
        log(f"note: the data differ from the study's (fingerprint {data.fingerprint[:12]} vs "
            f"{str(info.fingerprint)[:12]}): files, split or size changed since the search")
    if test is not None and test[2]:
        log(f"note: --test: skipped {len(test[2])} files that could not be decoded: {', '.join(test[2][:5])}")
    log(f"model: {cfg.model.family}, {cost.params:,} parameters, {describe_flops(cfg, cost.flops)}; "
        f"device: {device}; " + ("no training: the search's own weights (--no-train)" if settings.no_train else
                                 f"training on {settings.train_on} for {plural(cfg.train.epochs, 'epoch')}, "
                                 f"{plural(settings.seeds, 'seed')}"))

    train = searched.searched_run if settings.no_train else _train_seeds
    runs = train(settings, cfg, data, test, device, log)
    good = [r for r in runs if r.ok]
    if not good:
        raise UserError(f"no seed produced a model: {runs[0].reason or runs[0].status} "
                        f"(lower the learning rate, or check the data)")
    kept = max(good, key=lambda r: (r.val["accuracy"], -r.seed))  # ties: the first seed
    kept_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=kept.seed))
    metrics = metrics_document(settings, file_cfg, kept_cfg, source, data, same_data, info, runs, kept, cost, device)
    if settings.no_train:
        metrics["searched_weights"] = searched.record(settings)
        metrics["kept"] = metrics["searched_weights"]["note"]

    checkpoint = out / "model.pt"
    try:
        save_checkpoint(checkpoint, kept.state, kept_cfg, data.classes, checkpoint_metrics(metrics))
        (out / "curves.svg").write_text(
            curves_svg(kept.history, title=f"{settings.config.stem}: seed {kept.seed}, trained on {settings.train_on}"),
            encoding="utf-8")
        write_mapping(out / "metrics.json", metrics)  # written now: the exports below may fail
    except OSError as exc:
        raise UserError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None
    for line in summary_lines(metrics):
        log(line)
    log(f"saved {checkpoint}, {out / 'metrics.json'}, {out / 'curves.svg'}")
    exports = _export_formats(settings, out, checkpoint, data, _meta(cfg, data.classes), metrics, log)
    _model_card(settings, out, kept, kept_cfg, data.classes, metrics, log)
    return RetrainResult(out=out, checkpoint=checkpoint, metrics=metrics, exports=exports)


def _model_card(settings: RetrainSettings, out: Path, kept: SeedRun, cfg: TrialConfig, classes: tuple[str, ...],
                metrics: dict[str, Any], log: Callable[[str], None]) -> None:
    """Time the kept model, add its latency and input normalisation to metrics.json, and write
    MODEL_CARD.md from metrics.json and the export file's search record (ship.model_card)."""
    from catdog_hpo.engine.augment import MEAN, STD
    from catdog_hpo.engine.latency import measure_model
    from catdog_hpo.ship.model_card import write_model_card

    doc = read_mapping(settings.config)
    search = doc.get("search") if isinstance(doc.get("search"), dict) else {}
    # Timed where the study timed its trials (the CPU unless it chose --latency-device cuda).
    where = torch.device("cuda" if search.get("latency_device") == "cuda" and torch.cuda.is_available() else "cpu")
    model = bare_model(cfg.model, len(classes), cfg.image_size)
    model.load_state_dict(kept.state)
    model = with_tta(model, cfg.augment.tta)  # the shipped files' cost: two forwards with flip averaging
    metrics["latency"] = measure_model(model, cfg.image_size, where).to_dict()
    metrics["normalisation"] = {"mean": list(MEAN), "std": list(STD),
                                "note": "uint8 pixels / 255, then (x - mean) / std per RGB channel"}
    try:
        write_mapping(out / "metrics.json", metrics)
        path = write_model_card(out, doc, metrics, retrain_command(settings))
    except OSError as exc:
        raise UserError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None
    log(f"latency {metrics['latency']['ms']} ms ({metrics['latency']['method']}); model card: {path}")


def _check_batch(data: ImageSet, meta: ModelMeta) -> torch.Tensor:
    from catdog_hpo.engine.augment import normalize

    x = data.val_x[:CHECK_BATCH].cpu()
    return normalize(x, meta.mean, meta.std)


def _same_data(info: ExportInfo, data: ImageSet, cfg: TrialConfig) -> bool | None:
    """Whether the images are the study's (by fingerprint); None when it cannot be told."""
    if info.fingerprint is None or info.fingerprint_image_size != cfg.image_size:
        return None  # the fingerprint covers the image size: at another size it always differs
    return data.fingerprint == info.fingerprint
