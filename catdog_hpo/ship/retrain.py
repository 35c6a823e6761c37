"""`catdog-hpo retrain`: train the final model from a config or export file, with the search's engine.

One call of ``train.fit`` per seed (the same function every trial ran), then, for the kept
model: a checkpoint (everything ``predict`` needs), metrics.json (val and test accuracy,
per-class precision/recall, confusion matrices, mean ± std over seeds), curves.svg, and the
TorchScript/ONNX exports checked against PyTorch (``formats``).

What is kept: training on ``train`` keeps each seed's best epoch (fit's ``best_state``: the val
set chose it); on ``train+val`` there is no held-out set, so the final epoch's weights are kept
and the val accuracy is a training-set number (metrics.json and the printout say so). Of K seeds
the one with the highest val accuracy is kept.

No Optuna here: an export file is read as plain YAML/JSON.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from catdog_hpo.config import TrialConfig, load_trial_config, read_mapping, to_dict, write_mapping
from catdog_hpo.data import DataSource, ImageSet, load_images
from catdog_hpo.errors import ConfigError, UserError
from catdog_hpo.ship.formats import ExportResult, ModelMeta, export_all
from catdog_hpo.engine.metrics import classification_report, mean_std

TRAIN_ON = ("train", "train+val")
CHECK_BATCH = 8  # val images the exports are checked on
FORMATS = ("torchscript", "onnx")
_ROW = "{:>5}  {:>10}  {:>8}  {:>7}  {:>7}  {:>9}"
_HEAD = _ROW.format("epoch", "train loss", "val loss", "val acc", "seconds", "lr")


@dataclass(frozen=True)
class RetrainSettings:
    config: Path  # a TrialConfig file or an export file
    data: DataSource | None = None  # None: the source recorded in the export file
    epochs: int | None = None  # None: the config's train.epochs
    seed: int | None = None  # first seed; None: the config's train.seed
    seeds: int = 1  # K runs with seeds seed, seed+1, ...
    train_on: str = "train"  # "train" | "train+val"
    test_dir: Path | None = None  # extra held-out images, DIR/<class>/*
    device: str = "auto"
    out: Path | None = None  # None: <studies_dir>/models/<config stem>
    studies_dir: Path = Path("studies")
    formats: tuple[str, ...] = FORMATS  # () skips the TorchScript/ONNX exports
    progress: bool = False


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


@dataclass
class SeedRun:
    seed: int
    status: str  # fit's: "completed" | "non_finite"
    reason: str
    history: list[dict[str, float]]
    kept_epoch: int  # 1-based epoch whose weights are kept; 0: none
    state: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    val: dict[str, Any] | None = None  # classification_report of the kept weights
    test: dict[str, Any] | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.state is not None

    def summary(self) -> dict[str, Any]:
        final = self.history[-1]["val_acc"] if self.history else None
        best = max((h["val_acc"] for h in self.history), default=None)
        return {"seed": self.seed, "status": self.status, "reason": self.reason or None,
                "epochs_run": len(self.history), "kept_epoch": self.kept_epoch,
                "final_val_acc": final, "best_val_acc": best,
                "val_acc": self.val["accuracy"] if self.val else None,
                "test_acc": self.test["accuracy"] if self.test else None,
                "seconds": round(self.seconds, 2)}


@dataclass(frozen=True)
class RetrainResult:
    out: Path
    checkpoint: Path
    metrics: dict[str, Any]
    exports: list[ExportResult]


# --------------------------------------------------------------------------- inputs


def read_export_info(path: Path) -> ExportInfo:
    """The data source, fingerprint and trial an export file records; empty for a plain config."""
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


def load_test_set(folder: Path, classes: tuple[str, ...], image_size: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """uint8 N x 3 x S x S images and labels from ``folder``/<class>/*, decoded as training
    decodes; the class folders must be the model's classes. Returns the skipped files too."""
    import numpy as np

    from catdog_hpo.data.decode import decode_files
    from catdog_hpo.data.folder import scan

    try:
        found, entries, is_split = scan(Path(folder))
    except UserError as exc:
        raise UserError(f"--test {folder}: {exc}") from None
    if is_split:
        raise UserError(f"--test {folder}: expected {folder}/<class>/<images>, found train/ and val/ folders")
    if sorted(found) != sorted(classes):
        raise UserError(f"--test {folder}: its classes ({', '.join(sorted(found))}) do not match the model's "
                        f"({', '.join(sorted(classes))})")
    to_model = [list(classes).index(name) for name in found]  # folder label -> the model's class index
    pixels, reasons = decode_files([Path(folder) / e.rel for e in entries], image_size)
    good = [i for i, r in enumerate(reasons) if r is None]
    skipped = [f"{entries[i].rel} ({r})" for i, r in enumerate(reasons) if r is not None]
    if not good:
        raise UserError(f"--test {folder}: none of its {len(entries)} images could be decoded")
    x = torch.from_numpy(np.ascontiguousarray(pixels[good].transpose(0, 3, 1, 2)))
    y = torch.tensor([to_model[entries[i].label] for i in good], dtype=torch.int64)
    return x, y, skipped


def _with_train_on(data: ImageSet, train_on: str) -> ImageSet:
    if train_on == "train":
        return data
    # train+val: the val images join the training set and are still evaluated (not held out).
    return dataclasses.replace(data, train_x=torch.cat([data.train_x, data.val_x]),
                               train_y=torch.cat([data.train_y, data.val_y]))


# --------------------------------------------------------------------------- one seed


def bare_model(cfg: TrialConfig, num_classes: int) -> nn.Module:
    """The architecture only (no download, no weights file, nothing frozen): weights come next."""
    from catdog_hpo.engine.models import build_model

    arch = dataclasses.replace(cfg.model, pretrained=False, weights_file="", freeze_backbone=False)
    return build_model(arch, num_classes, cfg.image_size)


def _meta(cfg: TrialConfig, classes: tuple[str, ...]) -> ModelMeta:
    from catdog_hpo.engine.augment import MEAN, STD

    return ModelMeta(classes=tuple(classes), image_size=cfg.image_size, mean=tuple(MEAN), std=tuple(STD))


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, meta: ModelMeta,
             device: torch.device) -> dict[str, Any]:
    """classification_report of ``model`` (float32, eval mode) on uint8 images ``x``."""
    from catdog_hpo.ship.predict import batched_logits

    model = model.to(device).eval()

    def forward(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(batch).float().cpu()

    preds = batched_logits(forward, x, meta, device).argmax(1)
    return classification_report(preds, y.cpu(), meta.classes)


def train_seed(cfg: TrialConfig, data: ImageSet, device: torch.device, train_on: str,
               log: Callable[[str], None], progress: bool) -> SeedRun:
    """One fit; keeps the best epoch (train) or the final one (train+val)."""
    from catdog_hpo.engine.train import EpochStats, fit

    def row(s: EpochStats) -> None:
        log(_ROW.format(s.epoch, f"{s.train_loss:.4f}", f"{s.val_loss:.4f}", f"{s.val_acc:.4f}",
                        f"{s.seconds:.1f}", f"{s.lr:.3g}"))

    started = time.perf_counter()
    log(_HEAD)
    if train_on == "train":
        # Exactly what a trial runs: fit builds the model after seeding, so the same seed on the
        # CPU gives the trial's history bit for bit.
        result = fit(cfg, data, device, on_epoch_end=row, progress=progress)
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
    train_over: dict[str, Any] = {}
    if settings.epochs is not None:
        train_over["epochs"] = settings.epochs
    if settings.seed is not None:
        train_over["seed"] = settings.seed
    return file_cfg, dataclasses.replace(file_cfg, train=dataclasses.replace(file_cfg.train, **train_over))


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
        run = train_seed(seed_cfg, train_data, device, settings.train_on, log, settings.progress)
        if run.ok:
            model = bare_model(seed_cfg, len(data.classes))
            model.load_state_dict(run.state)
            run.val = evaluate(model, data.val_x, data.val_y, meta, device)
            if test is not None:
                run.test = evaluate(model, test[0], test[1], meta, device)
        log(_seed_line(run, settings.train_on))
        runs.append(run)
    return runs


def _export_formats(settings: RetrainSettings, out: Path, checkpoint: Path, data: ImageSet,
                    meta: ModelMeta, metrics: dict[str, Any], log: Callable[[str], None]) -> list[ExportResult]:
    """TorchScript and ONNX of the saved checkpoint, checked on val images; metrics.json updated."""
    from catdog_hpo.ship.checkpoint import load_model

    for stale in ("model.ts", "model.onnx"):
        (out / stale).unlink(missing_ok=True)  # never leave an export of an older model beside this one
    if not settings.formats:
        return []
    model, _ck = load_model(checkpoint, torch.device("cpu"))  # the file as predict will read it
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
    file_cfg, cfg = _configs(settings)
    info = read_export_info(settings.config)
    check_model(cfg.model, cfg.image_size)  # before any data is loaded: a bad model fails fast
    source = settings.data or info.source
    if source is None:
        raise UserError(f"{settings.config}: records no data source (not an export file); "
                        "pass --data DIR or --dataset NAME")
    out = settings.out if settings.out is not None else settings.studies_dir / "models" / settings.config.stem
    device = resolve_device(settings.device)

    data = load_images(source, cfg.image_size, settings.studies_dir / "cache")
    same_data = _same_data(info, data, cfg)
    test = load_test_set(settings.test_dir, data.classes, cfg.image_size) if settings.test_dir else None
    cost = model_cost(cfg.model, len(data.classes), cfg.image_size)
    log(f"data: {source.describe()}: {len(data.train_y)} train / {len(data.val_y)} val images, "
        f"classes {', '.join(data.classes)}, {cfg.image_size} px"
        + (f"; test: {settings.test_dir}: {len(test[1])} images" if test else ""))
    if same_data is False:
        log(f"note: the data differ from the study's (fingerprint {data.fingerprint[:12]} vs "
            f"{str(info.fingerprint)[:12]}): files, split or size changed since the search")
    if test is not None and test[2]:
        log(f"note: --test: skipped {len(test[2])} files that could not be decoded: {', '.join(test[2][:5])}")
    log(f"model: {cfg.model.family}, {cost.params:,} parameters, {cost.flops / 1e6:,.1f} MFLOPs/image; "
        f"device: {device}; training on {settings.train_on} for {_n(cfg.train.epochs, 'epoch')}, "
        f"{_n(settings.seeds, 'seed')}")

    runs = _train_seeds(settings, cfg, data, test, device, log)
    good = [r for r in runs if r.ok]
    if not good:
        raise UserError(f"no seed produced a model: {runs[0].reason or runs[0].status} "
                        f"(lower the learning rate, or check the data)")
    kept = max(good, key=lambda r: (r.val["accuracy"], -r.seed))  # ties: the first seed
    kept_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=kept.seed))
    metrics = _metrics(settings, file_cfg, kept_cfg, source, data, same_data, info, runs, kept, cost, device)

    checkpoint = out / "model.pt"
    try:
        save_checkpoint(checkpoint, kept.state, kept_cfg, data.classes, _checkpoint_metrics(metrics))
        (out / "curves.svg").write_text(
            curves_svg(kept.history, title=f"{settings.config.stem}: seed {kept.seed}, trained on {settings.train_on}"),
            encoding="utf-8")
        write_mapping(out / "metrics.json", metrics)  # written now: the exports below may fail
    except OSError as exc:
        raise UserError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None
    for line in _summary_lines(metrics):
        log(line)
    log(f"saved {checkpoint}, {out / 'metrics.json'}, {out / 'curves.svg'}")
    exports = _export_formats(settings, out, checkpoint, data, _meta(cfg, data.classes), metrics, log)
    return RetrainResult(out=out, checkpoint=checkpoint, metrics=metrics, exports=exports)


def _check_batch(data: ImageSet, meta: ModelMeta) -> torch.Tensor:
    from catdog_hpo.ship.predict import normalize

    x = data.val_x[:CHECK_BATCH].cpu()
    return normalize(x, meta.mean, meta.std)


def _same_data(info: ExportInfo, data: ImageSet, cfg: TrialConfig) -> bool | None:
    """Whether the images are the study's (by fingerprint); None when it cannot be told."""
    if info.fingerprint is None or info.fingerprint_image_size != cfg.image_size:
        return None  # the fingerprint covers the image size: at another size it always differs
    return data.fingerprint == info.fingerprint


# --------------------------------------------------------------------------- reporting


def _seed_line(run: SeedRun, train_on: str) -> str:
    if not run.ok:
        return f"seed {run.seed}: no model ({run.reason or run.status})"
    which = f"kept epoch {run.kept_epoch} of {len(run.history)}, " + ("the best by val acc" if train_on == "train" else "the final one")
    text = f"seed {run.seed}: val acc {run.val['accuracy']:.4f}{'' if train_on == 'train' else ' (not held out)'}"
    if run.test is not None:
        text += f", test acc {run.test['accuracy']:.4f}"
    stopped = f"; stopped early: {run.reason}" if run.status != "completed" else ""
    return f"{text} ({which}){stopped}"


def _acc_summary(values: list[float]) -> dict[str, Any]:
    mean, std = mean_std(values)
    return {"mean": mean, "std": std, "n": len(values), "values": values}


def _reproduction(info: ExportInfo, settings: RetrainSettings, file_cfg: TrialConfig, cfg: TrialConfig,
                  runs: list[SeedRun], same_data: bool | None, device: torch.device) -> dict[str, Any] | None:
    """The trial's recorded val accuracy next to this run's, when both measure the same thing:
    the file's config unchanged (epochs, first seed), trained on train, on the study's data."""
    if info.value is None:
        return None
    first = runs[0]
    final = first.history[-1]["val_acc"] if first.history else None
    comparable = (settings.train_on == "train" and same_data is not False and first.seed == file_cfg.train.seed
                  and cfg.train.epochs == file_cfg.train.epochs and first.status == "completed")
    return {
        "study": info.study, "trial": info.trial, "trial_val_acc": info.value,
        "retrained_final_val_acc": final, "seed": first.seed,
        "trial_device": info.device, "device": str(device),
        "difference": None if final is None else final - info.value,
        "comparable": comparable,
        "note": ("the trial's value is its final epoch's val accuracy: compare it with this run's final epoch "
                 "(same seed and data on the CPU give the same number; GPUs vary by run-to-run noise)")
        if comparable else "not comparable: other data, seed or training set than the trial's",
    }


def _metrics(settings: RetrainSettings, file_cfg: TrialConfig, cfg: TrialConfig, source: DataSource, data: ImageSet,
             same_data: bool | None, info: ExportInfo, runs: list[SeedRun], kept: SeedRun,
             cost: Any, device: torch.device) -> dict[str, Any]:
    good = [r for r in runs if r.ok]
    held_out = settings.train_on == "train"
    val_accs = [r.val["accuracy"] for r in good]
    test_accs = [r.test["accuracy"] for r in good if r.test is not None]
    from catdog_hpo.ship.trialfile import package_versions  # plain importlib.metadata; optuna is not imported by it

    return {
        "config_file": str(settings.config),
        "train_on": settings.train_on,
        "val_held_out": held_out,
        "val_note": None if held_out else
        "trained on train+val: the val accuracy is measured on training images, not a held-out estimate",
        "kept": "the best epoch by val accuracy" if held_out else "the final epoch (no held-out set to choose by)",
        "data": {"source": dataclasses.asdict(source), "description": source.describe(),
                 "fingerprint": data.fingerprint, "same_as_study": same_data,
                 "n_train": int(len(data.train_y)) + (0 if held_out else int(len(data.val_y))),
                 "n_val": int(len(data.val_y)), "classes": list(data.classes),
                 "test_dir": str(settings.test_dir) if settings.test_dir else None},
        "epochs": cfg.train.epochs,
        "device": str(device),
        "n_params": cost.params,
        "flops": cost.flops,
        "seeds": [r.summary() for r in runs],
        "kept_seed": kept.seed,
        "val_acc": _acc_summary(val_accs),
        "test_acc": _acc_summary(test_accs) if test_accs else None,
        "val": kept.val,
        "test": kept.test,
        "history": kept.history,
        "reproduction": _reproduction(info, settings, file_cfg, cfg, runs, same_data, device),
        "config": to_dict(cfg),
        "versions": package_versions(),
    }


def _checkpoint_metrics(m: dict[str, Any]) -> dict[str, Any]:
    """What the checkpoint carries: the headline numbers and the curves (metrics.json has the rest)."""
    return {k: m[k] for k in ("train_on", "val_held_out", "kept_seed", "val_acc", "test_acc", "val", "test",
                              "history", "epochs", "n_params", "flops", "data")}


def _pm(summary: dict[str, Any]) -> str:
    std = summary["std"]
    if summary["n"] < 2:
        return f"{summary['mean']:.4f}"
    return f"{summary['mean']:.4f} ± {std:.4f} (mean ± std over {summary['n']} seeds)"


def _summary_lines(m: dict[str, Any]) -> list[str]:
    lines = [f"val accuracy: {_pm(m['val_acc'])}"
             + ("" if m["val_held_out"] else "  [NOT held out: trained on train+val]")]
    if m["test_acc"] is not None:
        lines.append(f"test accuracy: {_pm(m['test_acc'])}")
    kept = m["val"]
    per = ", ".join(f"{c} P {_f(v['precision'])} R {_f(v['recall'])}" for c, v in kept["per_class"].items())
    lines.append(f"kept seed {m['kept_seed']}: val per class: {per}")
    rep = m["reproduction"]
    if rep is not None and rep["comparable"] and rep["retrained_final_val_acc"] is not None:
        diff = rep["difference"]
        verdict = "identical" if diff == 0 else f"differs by {diff:+.4f}"
        lines.append(f"trial {rep['trial']} of study {rep['study']!r} recorded val accuracy {rep['trial_val_acc']:.4f}; "
                     f"this run's final epoch (seed {rep['seed']}): {rep['retrained_final_val_acc']:.4f} ({verdict})")
    return lines


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _f(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"
