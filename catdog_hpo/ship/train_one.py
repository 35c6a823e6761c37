"""`catdog-hpo train`: train one fixed config, print a per-epoch table, save the best epoch.

The same ``engine.train.fit`` a trial runs, on one config file (a TrialConfig or an export file),
with ``--epochs``/``--seed`` applied as ``retrain`` applies them. Writes OUT/history.json always
and OUT/best.pt (a checkpoint ``predict`` reads) when at least one epoch finished.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from catdog_hpo.config import load_trial_config, to_dict, with_train_overrides, write_mapping
from catdog_hpo.data import DataSource


@dataclass(frozen=True)
class TrainSettings:
    config: Path  # a TrialConfig file or an export file
    data: DataSource
    epochs: int | None = None  # None: the config's train.epochs
    seed: int | None = None  # None: the config's train.seed
    weights: str | None = None  # --weights FILE: replaces the config's model.weights_file
    device: str = "auto"
    deterministic: bool = False  # --deterministic (engine.runtime.configure_process)
    out: Path | None = None  # None: <studies_dir>/runs/<config stem>
    studies_dir: Path = Path("studies")
    progress: bool = True


@dataclass(frozen=True)
class TrainRun:
    out: Path
    status: str  # fit's: "completed" | "non_finite"
    reason: str  # why training stopped early ("" when it completed)
    checkpoint: Path | None  # None: no epoch finished, nothing but history.json was saved


def train_one(settings: TrainSettings, log: Callable[[str], None] = print) -> TrainRun:
    """Train, print the table through ``log``, save; UserError/ConfigError for bad inputs."""
    from catdog_hpo.data import load_images
    from catdog_hpo.engine import epoch_table
    from catdog_hpo.engine.device import resolve_device
    from catdog_hpo.engine.models import check_model, model_cost
    from catdog_hpo.engine.runtime import configure_process
    from catdog_hpo.engine.train import fit
    from catdog_hpo.engine.tta import describe_flops
    from catdog_hpo.ship.checkpoint import save_checkpoint

    cfg = with_train_overrides(load_trial_config(settings.config), epochs=settings.epochs, seed=settings.seed)
    if settings.weights is not None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, weights_file=settings.weights))
    check_model(cfg.model, cfg.image_size)  # before loading any data: a bad model fails fast
    out = settings.out if settings.out is not None else settings.studies_dir / "runs" / settings.config.stem
    source = settings.data
    device = resolve_device(settings.device)
    configure_process(str(device), deterministic=settings.deterministic)  # TF32, determinism
    data = load_images(source, cfg.image_size, settings.studies_dir / "cache")
    cost = model_cost(cfg.model, len(data.classes), data.image_size)
    log(f"data: {source.describe()} ({len(data.train_y)} train / {len(data.val_y)} val images; "
        f"classes {', '.join(data.classes)}; {data.image_size} px)")
    log(f"model: {cfg.model.family}, {cost.params:,} parameters, {describe_flops(cfg, cost.flops)}; "
        f"device: {device}")
    log(epoch_table.HEAD)
    result = fit(cfg, data, device, on_epoch_end=lambda s: log(epoch_table.row(s)), progress=settings.progress,
                 feature_cache=settings.studies_dir / "cache")  # a frozen backbone: cached features

    history = [s.to_dict() for s in result.history]
    write_mapping(out / "history.json", {
        "status": result.status, "reason": result.reason, "best_epoch": result.best_epoch,
        "best_val_acc": result.best_val_acc, "history": history, "config": to_dict(cfg),
        "data": source.describe(), "data_fingerprint": data.fingerprint, "device": str(device),
    })
    checkpoint = None
    if result.best_state is not None:
        best = result.history[result.best_epoch - 1]
        checkpoint = out / "best.pt"
        save_checkpoint(checkpoint, result.best_state, cfg, data.classes, {
            "best_epoch": result.best_epoch, "val_acc": best.val_acc, "val_loss": best.val_loss,
            "epochs_run": len(history), "history": history, "data": source.describe(),
            "data_fingerprint": data.fingerprint, "n_params": cost.params, "flops": cost.flops,
        })
        log(f"best epoch {result.best_epoch}: val acc {result.best_val_acc:.4f}; "
            f"saved {checkpoint} and {out / 'history.json'}")
    else:
        log(f"no epoch finished; nothing saved but {out / 'history.json'}")
    return TrainRun(out=out, status=result.status, reason=result.reason, checkpoint=checkpoint)
