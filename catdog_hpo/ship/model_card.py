"""MODEL_CARD.md beside a retrained model: what it is, how it was found, how well it does.

Two halves, written at two times and joined by the export file:
- ``search_record(study, trial, ...)`` runs in ``export``: what the study knows (sampler, pruner,
  budget, trials run / pruned / rejected / failed, the baseline, objectives, the front point chosen,
  the exact run and export commands), stored in the export file under ``search``. So ``retrain``
  writes the card without opening the study store (it may be on another machine).
- ``write_model_card(out, export_doc, metrics, retrain_command)`` runs in ``retrain``: the card
  from that record and retrain's own metrics.json. Nothing in the card is typed by hand; a fact
  neither recorded reads "n/a".

No Optuna import: the study object is only read through its public attributes.
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path
from typing import Any

from catdog_hpo.search.objectives import OBJECTIVES
from catdog_hpo.search.record import StudyInfo, StudyKey, TrialRecord, baseline_of, finished_complete, outcome

CARD_NAME = "MODEL_CARD.md"
Z95 = 1.959964  # two-sided 95% normal quantile, for the Wilson interval
NA = "n/a"


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``correct``/``n`` (better than the normal one near 0 or 1)."""
    if n <= 0:
        return math.nan, math.nan
    p = correct / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


# --------------------------------------------------------------------------- export's half


def search_record(study: Any, trial: Any, pick_rule: str, front: list[int], export_args: list[str],
                  storage_shown: str) -> dict[str, Any]:
    """What the card needs from the study, as plain data for the export file."""
    info = StudyInfo.from_study(study)
    attrs = study.user_attrs
    trials = study.get_trials(deepcopy=False)
    states = [outcome(t) for t in trials]
    rejected = sum(1 for t in trials if TrialRecord.from_trial(t).rejected)
    completed = [t for t in trials if finished_complete(t)]
    best_acc = max((t.values[0] for t in completed), default=None)
    names = list(info.objectives)
    return {
        "study": study.study_name,
        "storage": storage_shown,
        "sampler": info.sampler, "pruner": info.pruner, "space": info.space, "seed": info.seed,
        "target_trials": info.target_trials, "epochs": info.epochs,
        "objectives": {n: v for n, v in zip(names, trial.values)},
        "directions": [d.name.lower() for d in study.directions],
        "measured": {n: OBJECTIVES[n].how for n in names if n in OBJECTIVES},
        "latency_device": info.latency_device,
        "budget": _budget(attrs),
        "trials": {"total": len(trials), "complete": states.count("COMPLETE"), "pruned": states.count("PRUNED"),
                   "rejected": rejected, "failed": states.count("FAIL")},
        "best_accuracy": best_acc,
        "baseline": _baseline(trials),
        "picked": {"trial": trial.number, "rule": pick_rule, "front": front},
        "run_command": _run_command(info, study.study_name, storage_shown),
        "export_command": shlex.join(["catdog-hpo", "export", "--study", study.study_name, *export_args]
                                     + ([] if storage_shown.startswith("sqlite:///studies/") else ["--storage", storage_shown])),
    }


def _budget(attrs: dict[str, Any]) -> str | None:
    """The study's time budget (run --budget) in words; None when it had none."""
    seconds = attrs.get(StudyKey.BUDGET_S)
    return None if seconds is None else f"{float(seconds):.0f} s of wall-clock time (run --budget)"


def _baseline(trials: list[Any]) -> dict[str, Any] | None:
    """The space's baseline trial (marked ``TrialKey.BASELINE`` by run; its latest attempt) and its accuracy, if it completed."""
    t = baseline_of(trials)
    if t is None:
        return None
    done = finished_complete(t)
    return {"trial": t.number, "state": outcome(t).lower(), "accuracy": t.values[0] if done else None}


def _run_command(info: StudyInfo, name: str, storage: str) -> str:
    args = ["catdog-hpo", "run"]
    src = info.data_source or {}
    if src.get("path"):
        args += ["--data", str(src["path"]), "--val-fraction", str(src.get("val_fraction")),
                 "--split-seed", str(src.get("split_seed"))]
    elif src.get("name"):
        args += ["--dataset", str(src["name"])]
    args += ["--space", str(info.space), "--sampler", str(info.sampler), "--pruner", str(info.pruner),
             "--trials", str(info.target_trials), "--seed", str(info.seed)]
    if info.epochs is not None:
        args += ["--epochs", str(info.epochs)]
    if len(info.objectives) > 1:
        args += ["--objectives", ",".join(info.objectives)]
    if info.latency_device:
        args += ["--latency-device", info.latency_device]
    args += ["--study", name]
    if not storage.startswith("sqlite:///studies/"):
        args += ["--storage", storage]
    return shlex.join(args)


# --------------------------------------------------------------------------- retrain's half


def _pct(v: float | None) -> str:
    return NA if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}%"


def _acc_line(report: dict[str, Any] | None) -> str:
    if not report or report.get("accuracy") is None:
        return NA
    n, acc = int(report["n"]), float(report["accuracy"])
    lo, hi = wilson(round(acc * n), n)
    return f"{_pct(acc)} (95% CI {_pct(lo)} to {_pct(hi)}, Wilson, n = {n})"


def _per_class(report: dict[str, Any]) -> list[str]:
    rows = ["| class | precision | recall | support |", "|---|---|---|---|"]
    for name, v in report["per_class"].items():
        rows.append(f"| {name} | {_pct(v['precision'])} | {_pct(v['recall'])} | {v['support']} |")
    return rows


def _confusion(report: dict[str, Any]) -> list[str]:
    classes = report["classes"]
    rows = ["| true \\ predicted | " + " | ".join(classes) + " |", "|---" * (len(classes) + 1) + "|"]
    for name, row in zip(classes, report["confusion_matrix"]):
        rows.append(f"| {name} | " + " | ".join(str(x) for x in row) + " |")
    return rows


def _mean_std(s: dict[str, Any] | None) -> str:
    if not s:
        return NA
    std = f" ± {100 * s['std']:.2f} points" if s.get("std") is not None else " (one seed: no spread)"
    return f"{_pct(s['mean'])}{std} over {s['n']} seed(s)"


def _v(x: Any) -> str:
    return NA if x is None or x == "" else f"{x:,}" if isinstance(x, int) and not isinstance(x, bool) else str(x)


def render_card(doc: dict[str, Any] | None, m: dict[str, Any], retrain_command: str) -> str:
    doc = doc or {}
    s = doc.get("search") or {}
    cfg, data, versions = m["config"], m["data"], m["versions"]
    lat = m.get("latency") or {}
    val, test = m.get("val"), m.get("test")
    base = s.get("baseline") or {}
    best, base_acc = s.get("best_accuracy"), base.get("accuracy")
    above = NA if best is None or base_acc is None else f"{100 * (best - base_acc):+.2f} points"
    trials = s.get("trials") or {}
    lines = [
        f"# Model card: {Path(str(m['config_file'])).stem}", "",
        "## What it is", "",
        f"- Image classifier over {len(data['classes'])} classes: {', '.join(data['classes'])}",
        f"- Input: RGB, {cfg['image_size']}x{cfg['image_size']} px, scaled to [0, 1] then normalised with "
        f"mean {m.get('normalisation', {}).get('mean', NA)} and std {m.get('normalisation', {}).get('std', NA)}",
        f"- Architecture: {cfg['model']['family']}; {_v(m['n_params'])} parameters; {_flops(m)}",
        f"- Latency: {lat.get('ms', NA)} ms ({lat.get('method', NA)})",
        _tta_line(cfg),
        _weights_line(m),
        "- Files: model.pt (checkpoint), model.ts (TorchScript), model.onnx, metrics.json, curves.svg", "",
        "## How it was found", "",
        f"- Study: {_v(s.get('study') or doc.get('study'))}; sampler {_v(s.get('sampler'))}, pruner {_v(s.get('pruner'))}, "
        f"space {_v(s.get('space'))}, seed {_v(s.get('seed'))}",
        f"- Objectives: {', '.join(f'{k} ({d})' for k, d in zip(s.get('objectives') or {}, s.get('directions') or [])) or NA}",
        *(f"  - {k}: {how}" for k, how in (s.get("measured") or {}).items()),
        f"- Budget: {_v(s.get('budget'))}; target {_v(s.get('target_trials'))} finished trials",
        f"- Trials: {_v(trials.get('total'))} run, {_v(trials.get('complete'))} completed, {_v(trials.get('pruned'))} pruned "
        f"({_v(trials.get('rejected'))} of them rejected before training), {_v(trials.get('failed'))} failed",
        "- Baseline: " + (f"trial {base['trial']}, {_pct(base_acc)}" if base_acc is not None else
                           f"trial {base['trial']} ({base['state']}, no accuracy)" if base else NA)
        + f"; the best trial is {above} above it",
        f"- Chosen: trial {_v((s.get('picked') or {}).get('trial', (doc.get('trial') or {}).get('number')))}, "
        f"{_v((s.get('picked') or {}).get('rule'))}; its search values: "
        + (", ".join(f"{k} {v:.4g}" for k, v in (s.get("objectives") or {}).items()) or NA), "",
        "## How well it does", "",
        f"- Validation accuracy: {_acc_line(val)}" + ("" if m["val_held_out"] else " — NOT held out (trained on train+val)"),
        f"- Test accuracy: {_acc_line(test)}" + ("" if test else " (no --test set given)"),
        f"- Across seeds: val {_mean_std(m.get('val_acc'))}; test {_mean_std(m.get('test_acc'))}",
        f"- Kept seed {m['kept_seed']} ({m['kept']}), {m['epochs']} epochs on {m['device']}", "",
    ]
    if val:
        lines += ["Validation per class:", "", *_per_class(val), "", "Validation confusion matrix:", "", *_confusion(val), ""]
    if test:
        lines += ["Test per class:", "", *_per_class(test), "", "Test confusion matrix:", "", *_confusion(test), ""]
    lines += [
        "## Data", "",
        f"- Source: {data['description']}; split: {_split(data['source'])}",
        f"- Fingerprint: {data['fingerprint']} (same as the study's: {_v(data.get('same_as_study'))})",
        f"- Images: {data['n_train']} train, {data['n_val']} val" + (f", test from {data['test_dir']}" if data.get("test_dir") else ""), "",
        "## Versions", "",
        *(f"- {k} {v}" for k, v in versions.items()), "",
        "## Reproduce", "", "```bash",
        s.get("run_command", f"# {NA}: the study's run command was not recorded"),
        s.get("export_command", f"# {NA}: the export command was not recorded"),
        retrain_command, "```", "",
        "## Limitations", "",
        f"- Trained on {data['n_train']} images and validated on {data['n_val']}: the 95% intervals above show how "
        "little a small validation set pins the accuracy down.",
        f"- Domain: {_domain(data)}. Accuracy on other images (other cameras, breeds, lighting, sizes) is not measured here.",
        "- Latency was measured on one machine under its load at the time; time it on the target device before relying on it.",
        "",
    ]
    return "\n".join(lines)


def _flops(m: dict[str, Any]) -> str:
    """FLOPs per image of the files as shipped (metrics.json's ``inference_flops``; a metrics.json
    written before it has only the network's one forward, ``flops``)."""
    one, shipped = m.get("flops"), m.get("inference_flops", m.get("flops"))
    if not one or not shipped or shipped == one:
        return f"{_v(shipped)} FLOPs per image"
    return f"{_v(shipped)} FLOPs per image as shipped ({shipped // one} forwards of {_v(one)}: flip averaging)"


def _tta_line(cfg: dict[str, Any]) -> str:
    """Whether the model files hold test-time flip averaging (augment.tta, engine/tta.py)."""
    if not (cfg.get("augment") or {}).get("tta"):
        return "- Test-time augmentation: none (one forward per image)"
    return ("- Test-time augmentation: flip averaging is inside model.ts, model.onnx and model.pt2: each averages "
            "the logits of the image and its horizontal mirror (two forwards per image, in the latency above); "
            "model.pt holds the plain network, and `catdog-hpo predict` applies the average from its config")


def _weights_line(m: dict[str, Any]) -> str:
    """Where the weights come from: retrained, or the search's own (retrain --no-train)."""
    w = m.get("searched_weights")
    decay = ((m.get("config") or {}).get("train") or {}).get("ema") or 0
    ema = f"; the exponential moving average of the weights (decay {decay:g} per step)" if decay else ""
    if not w:
        return f"- Weights: retrained by `catdog-hpo retrain` ({m['kept']}){ema}"
    return (f"- Weights: the search's own, not retrained: trial {_v(w.get('trial'))}'s best epoch "
            f"({_v(w.get('epoch'))}), the model the search measured (val accuracy {_pct(w.get('val_acc'))} then){ema}")


def _split(src: dict[str, Any]) -> str:
    return f"val fraction {src.get('val_fraction')}, split seed {src.get('split_seed')} (when the source has no train/val split)"


def _domain(data: dict[str, Any]) -> str:
    src = data["source"]
    if src.get("name") == "synthetic":
        return "generated images (coloured stripes and checks), not photographs: a demo model only"
    return f"the images of {data['description']} only"


def write_model_card(out: Path, doc: dict[str, Any] | None, metrics: dict[str, Any], retrain_command: str) -> Path:
    path = Path(out) / CARD_NAME
    path.write_text(render_card(doc, metrics, retrain_command), encoding="utf-8")
    return path
