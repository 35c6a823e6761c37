"""What ``retrain`` reports: metrics.json, the checkpoint's headline numbers, the printed lines.

Kept apart from the training steps (``ship.retrain``) so the record's shape reads in one place:
per-seed summaries, mean ± std over seeds, the kept seed's per-class report, and the trial's
recorded value next to this run's when the two measure the same thing.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

from catdog_hpo.config import TrialConfig, to_dict
from catdog_hpo.data import DataSource, ImageSet
from catdog_hpo.engine.metrics import mean_std
from catdog_hpo.engine.tta import inference_flops
from catdog_hpo.ship.trialfile import ExportInfo, package_versions

if TYPE_CHECKING:
    import torch

    from catdog_hpo.ship.retrain import RetrainSettings
    from catdog_hpo.ship.seed_run import SeedRun


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
    # The trial's value is its best epoch's val accuracy (search.objective), the epoch kept here.
    final = max((h["val_acc"] for h in first.history), default=None)
    comparable = (settings.train_on == "train" and same_data is not False and first.seed == file_cfg.train.seed
                  and cfg.train.epochs == file_cfg.train.epochs and first.status == "completed")
    return {
        "study": info.study, "trial": info.trial, "trial_val_acc": info.value,
        "retrained_best_val_acc": final, "seed": first.seed,
        "trial_device": info.device, "device": str(device),
        "difference": None if final is None else final - info.value,
        "comparable": comparable,
        "note": ("the trial's value is its best epoch's val accuracy, the epoch retrain keeps: compare it with this run's best epoch "
                 "(same seed and data give the same number on the CPU, and on a GPU when both ran with --deterministic "
                 "on the same GPU model and software; other GPU runs vary by run-to-run noise)")
        if comparable else "not comparable: other data, seed or training set than the trial's",
    }


def metrics_document(settings: RetrainSettings, file_cfg: TrialConfig, cfg: TrialConfig, source: DataSource, data: ImageSet,
             same_data: bool | None, info: ExportInfo, runs: list[SeedRun], kept: SeedRun,
             cost: Any, device: torch.device) -> dict[str, Any]:
    good = [r for r in runs if r.ok]
    held_out = settings.train_on == "train"
    val_accs = [r.val["accuracy"] for r in good]
    test_accs = [r.test["accuracy"] for r in good if r.test is not None]
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
        "flops": cost.flops,  # one forward of the network per image
        "inference_flops": inference_flops(cfg, cost.flops),  # the files as shipped: both forwards with augment.tta
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


def checkpoint_metrics(m: dict[str, Any]) -> dict[str, Any]:
    """What the checkpoint carries: the headline numbers and the curves (metrics.json has the rest)."""
    return {k: m[k] for k in ("train_on", "val_held_out", "kept_seed", "val_acc", "test_acc", "val", "test",
                              "history", "epochs", "n_params", "flops", "data")}


def _pm(summary: dict[str, Any]) -> str:
    std = summary["std"]
    if summary["n"] < 2:
        return f"{summary['mean']:.4f}"
    return f"{summary['mean']:.4f} ± {std:.4f} (mean ± std over {summary['n']} seeds)"


def summary_lines(m: dict[str, Any]) -> list[str]:
    lines = [f"val accuracy: {_pm(m['val_acc'])}"
             + ("" if m["val_held_out"] else "  [NOT held out: trained on train+val]")]
    if m["test_acc"] is not None:
        lines.append(f"test accuracy: {_pm(m['test_acc'])}")
    kept = m["val"]
    per = ", ".join(f"{c} P {_f(v['precision'])} R {_f(v['recall'])}" for c, v in kept["per_class"].items())
    lines.append(f"kept seed {m['kept_seed']}: val per class: {per}")
    rep = m["reproduction"]
    if rep is not None and rep["comparable"] and rep["retrained_best_val_acc"] is not None:
        diff = rep["difference"]
        verdict = "identical" if diff == 0 else f"differs by {diff:+.4f}"
        lines.append(f"trial {rep['trial']} of study {rep['study']!r} recorded val accuracy {rep['trial_val_acc']:.4f}; "
                     f"this run's best epoch (seed {rep['seed']}): {rep['retrained_best_val_acc']:.4f} ({verdict})")
    return lines


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _f(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def retrain_command(settings: RetrainSettings) -> str:
    """The retrain command these settings came from, as a user would type it."""
    import shlex

    args = ["catdog-hpo", "retrain", "--config", str(settings.config)]
    if settings.data is not None:
        src = settings.data
        args += ["--data", str(src.path)] if src.path is not None else ["--dataset", str(src.name)]
        args += ["--val-fraction", str(src.val_fraction), "--split-seed", str(src.split_seed)]
    for flag, value in (("--epochs", settings.epochs), ("--seed", settings.seed), ("--test", settings.test_dir),
                        ("--out", settings.out)):
        if value is not None:
            args += [flag, str(value)]
    if settings.seeds != 1:
        args += ["--seeds", str(settings.seeds)]
    if settings.train_on != "train":
        args += ["--train-on", settings.train_on]
    if settings.device != "auto":
        args += ["--device", settings.device]
    if settings.no_train:
        args.append("--no-train")
    return shlex.join(args)
