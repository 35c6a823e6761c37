"""Training curves as Optuna artifacts: a small SVG chart and a CSV per completed trial.

The SVG is drawn here by hand (no matplotlib): two panels, loss (train and val) and val accuracy
against the epoch, readable in the dashboard's artifact viewer and in any browser.
"""

from __future__ import annotations

import csv
import io
import math
import tempfile
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

from catdog_hpo.search import optuna_compat

if TYPE_CHECKING:
    import optuna
    from optuna.artifacts import FileSystemArtifactStore

# Columns of the curves CSV: the keys of one history entry (conventions.md).
CURVE_COLUMNS = ("epoch", "train_loss", "val_loss", "val_acc", "seconds", "lr")

# Chart geometry, in SVG user units (pixels at 100 % zoom).
PANEL_W, PANEL_H = 340, 240
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 52, 14, 34, 44
N_TICKS = 5
COLORS = {"train_loss": "#1f77b4", "val_loss": "#ff7f0e", "val_acc": "#2ca02c"}
LABELS = {"train_loss": "train loss", "val_loss": "val loss", "val_acc": "val accuracy"}


def artifact_store(studies_dir: Path) -> FileSystemArtifactStore:
    """The artifact store under ``studies_dir/artifacts`` (created if missing)."""
    from optuna.artifacts import FileSystemArtifactStore

    base = Path(studies_dir) / "artifacts"
    base.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(base_path=str(base))


def remove_study_artifacts(study: optuna.Study, store: Any) -> int:
    """Remove every artifact file the study's trials uploaded (before the study itself is
    deleted: Optuna's delete_study leaves them on disk); the number removed."""
    from optuna.artifacts import get_all_artifact_meta
    from optuna.artifacts.exceptions import ArtifactNotFound

    removed = 0
    for trial in study.get_trials(deepcopy=False):
        for meta in get_all_artifact_meta(trial, storage=optuna_compat.storage_of(study)):
            try:
                store.remove(meta.artifact_id)
                removed += 1
            except ArtifactNotFound:  # already gone: nothing to do
                pass
    return removed


def upload_training_curves(
    study: optuna.Study,
    trial: optuna.Trial | optuna.trial.FrozenTrial,
    history: list[dict],
    store: Any,
) -> None:
    """Upload ``trial_<n>_curves.svg`` and ``trial_<n>_curves.csv`` as artifacts of ``trial``.

    Call it while the trial is still running (from the objective, before it returns): Optuna
    refuses to attach artifacts to a finished trial.
    """
    from optuna.artifacts import upload_artifact

    if not history:
        raise ValueError("upload_training_curves: empty history")
    stem = f"trial_{trial.number}_curves"
    with tempfile.TemporaryDirectory(prefix="catdog-curves-") as tmp:
        svg_path = Path(tmp) / f"{stem}.svg"
        csv_path = Path(tmp) / f"{stem}.csv"
        svg_path.write_text(curves_svg(history, title=f"Trial {trial.number}"), encoding="utf-8")
        csv_path.write_text(curves_csv(history), encoding="utf-8")
        for path, mimetype in ((svg_path, "image/svg+xml"), (csv_path, "text/csv")):
            # the study's store: a FrozenTrial does not carry its own
            upload_artifact(
                artifact_store=store,
                file_path=str(path),
                study_or_trial=trial,
                storage=optuna_compat.storage_of(study),
                mimetype=mimetype,
            )


def curves_csv(history: Sequence[dict]) -> str:
    """The history as CSV text, one row per epoch (missing keys left empty)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CURVE_COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: row.get(k, "") for k in CURVE_COLUMNS})
    return buf.getvalue()


def curves_svg(history: Sequence[dict], title: str = "Training curves") -> str:
    """A self-contained SVG: loss (train, val) and val accuracy against the epoch."""
    epochs = [float(row.get("epoch", i + 1)) for i, row in enumerate(history)]
    loss_panel = _panel(epochs, history, ("train_loss", "val_loss"), "loss", x0=0)
    acc_panel = _panel(epochs, history, ("val_acc",), "val accuracy", x0=PANEL_W)
    width, height = 2 * PANEL_W, PANEL_H + 24
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">\n'
        f'<rect width="{width}" height="{height}" fill="white"/>\n'
        f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13" font-weight="bold">'
        f"{escape(title)}</text>\n"
        f'<g transform="translate(0,20)">\n{loss_panel}{acc_panel}</g>\n</svg>\n'
    )


def _panel(epochs: list[float], history: Sequence[dict], keys: tuple[str, ...], ylabel: str, x0: float) -> str:
    """One chart panel at horizontal offset ``x0``: axes, ticks, a polyline per key, a legend."""
    series = {k: [(e, _finite(row.get(k))) for e, row in zip(epochs, history)] for k in keys}
    ys = [y for pts in series.values() for _, y in pts if y is not None]
    if not ys:
        ys = [0.0, 1.0]  # nothing finite to draw: still draw the empty axes
    xlo, xhi = _span(min(epochs), max(epochs))
    ylo, yhi = _span(min(ys), max(ys))
    left, right = x0 + MARGIN_L, x0 + PANEL_W - MARGIN_R
    top, bottom = MARGIN_T, PANEL_H - MARGIN_B

    def sx(x: float) -> float:
        return left + (x - xlo) / (xhi - xlo) * (right - left)

    def sy(y: float) -> float:
        return bottom - (y - ylo) / (yhi - ylo) * (bottom - top)

    out = [f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" fill="none" stroke="#888"/>\n']
    for i in range(N_TICKS):
        y = ylo + (yhi - ylo) * i / (N_TICKS - 1)
        out.append(f'<line x1="{left}" y1="{sy(y):.1f}" x2="{right}" y2="{sy(y):.1f}" stroke="#eee"/>'
                   f'<text x="{left - 4}" y="{sy(y) + 4:.1f}" text-anchor="end">{_fmt(y)}</text>\n')
    for x in _epoch_ticks(xlo, xhi):
        out.append(f'<text x="{sx(x):.1f}" y="{bottom + 15}" text-anchor="middle">{x:g}</text>\n')
    out.append(f'<text x="{(left + right) / 2}" y="{bottom + 32}" text-anchor="middle">epoch</text>\n')
    out.append(f'<text transform="translate({x0 + 12},{(top + bottom) / 2}) rotate(-90)" '
               f'text-anchor="middle">{escape(ylabel)}</text>\n')
    for n, (key, pts) in enumerate(series.items()):
        color = COLORS[key]
        drawn = [(sx(x), sy(y)) for x, y in pts if y is not None]
        if len(drawn) > 1:
            coords = " ".join(f"{px:.1f},{py:.1f}" for px, py in drawn)
            out.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="2"/>\n')
        out.extend(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="2.5" fill="{color}"/>' for px, py in drawn)
        ly, lx = top - 12, left + 4 + n * 110  # legend row above the plot area
        out.append(f'\n<line x1="{lx}" y1="{ly}" x2="{lx + 16}" y2="{ly}" stroke="{color}" stroke-width="2"/>'
                   f'<text x="{lx + 20}" y="{ly + 4}">{LABELS[key]}</text>\n')
    return "".join(out)


def _finite(value: Any) -> float | None:
    """``value`` as a float, or None when missing or not finite (a diverged loss)."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _span(lo: float, hi: float) -> tuple[float, float]:
    """An axis range around [lo, hi] with 5 % padding; never empty."""
    if hi - lo < 1e-12:
        pad = abs(lo) * 0.1 or 1.0
        return lo - pad, hi + pad
    pad = (hi - lo) * 0.05
    return lo - pad, hi + pad


def _epoch_ticks(lo: float, hi: float) -> list[float]:
    """Whole epochs inside [lo, hi], at most about 10 of them."""
    first, last = math.ceil(lo), math.floor(hi)
    step = max(1, math.ceil((last - first + 1) / 10))
    return [float(e) for e in range(first, last + 1, step)]


def _fmt(y: float) -> str:
    return f"{y:.3g}"
