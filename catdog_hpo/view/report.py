"""Read a study back: one offline HTML report (the text tables: ``view.tables``; its CSV: ``view.trials_csv``).

The HTML report is a single file with plotly.js inlined once, so it opens with no network:
optimization history, intermediate values coloured by trial state, parallel coordinates,
parameter importances, slice plots, the top trials, and (with ``compare``) the best-so-far
curves of several studies against trial number and wall time.
"""

from __future__ import annotations

import html
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from catdog_hpo.errors import UserError
from catdog_hpo.search.record import StudyInfo, TrialRecord, finished_complete, from_history, outcome
from catdog_hpo.view.tables import (TOP_N, _fmt_count, _fmt_float, _fmt_value, format_params,
                                    study_header, top_trials)
from catdog_hpo.view.trials_csv import write_trials_csv

if TYPE_CHECKING:
    import optuna
    import plotly.graph_objects as go
    from optuna.storages import BaseStorage

STATE_COLORS = {"COMPLETE": "#1f77b4", "PRUNED": "#ff7f0e", "RUNNING": "#2ca02c", "FAIL": "#d62728"}
# Fewer completed trials than this and importances are noise: the report shows a note instead.
MIN_TRIALS_FOR_IMPORTANCE = 5


@dataclass(frozen=True)
class ReportFiles:
    html: Path
    csv: Path


# --------------------------------------------------------------------------- the HTML report


def write_report(
    storage: BaseStorage,
    study_name: str,
    compare: Sequence[str] = (),
    out_dir: Path | None = None,
    storage_url: str = "the study store",
) -> ReportFiles:
    """Write ``report.html`` and ``trials.csv`` for ``study_name`` into ``out_dir``.

    ``out_dir`` defaults to ``studies/reports/<study>/``. Raises UserError for an unknown study
    (listing the known ones) or a study with no completed trial yet.
    """
    from catdog_hpo.search.storage import load_study

    study = load_study(storage, study_name, storage_url)
    _check_reportable(study)
    others = [load_study(storage, name, storage_url) for name in dict.fromkeys(compare) if name != study_name]
    out = Path(out_dir) if out_dir is not None else Path("studies") / "reports" / _safe_name(study_name)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot create it ({exc.strerror or exc})") from None
    page = render_report(study, others)
    html_path = out / "report.html"
    try:
        html_path.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot write {html_path}: {exc.strerror or exc}") from None
    return ReportFiles(html=html_path, csv=write_trials_csv(study, out / "trials.csv"))


def render_report(study: optuna.Study, compare: Sequence[optuna.Study] = ()) -> str:
    """The whole report page as HTML text (plotly.js inlined in the head)."""
    import optuna.visualization as vis
    from plotly.offline import get_plotlyjs

    summary = ("summary", "Summary", _summary_html(study))
    own = own_study(study)  # the charts draw this study's trials, not a warm start's history
    if len(study.directions) > 1:  # several objectives: the front, the trade-offs, each objective
        from catdog_hpo.view import pareto

        sections = [summary, *pareto.sections(own, _figure_or_note),
                    ("intermediate", "Intermediate values (val accuracy per epoch)",
                     _figure_or_note(lambda: intermediate_figure(own))),
                    ("parallel", "Parallel coordinates (accuracy)", _figure_or_note(
                        lambda: vis.plot_parallel_coordinate(own, target=lambda t: t.values[0],
                                                             target_name="accuracy")))]
    else:
        sections = [summary, *_single_objective_sections(own)]
    if compare:
        studies = [study, *compare]
        sections.append(("compare", "Comparison: best so far",
                         _figure_or_note(lambda: compare_figure(studies, "trial"))
                         + _figure_or_note(lambda: compare_figure(studies, "time"))))
    nav = " · ".join(f'<a href="#{sid}">{html.escape(title)}</a>' for sid, title, _ in sections)
    body = "\n".join(f'<section id="{sid}" class="section"><h2>{html.escape(title)}</h2>\n{content}\n</section>'
                     for sid, title, content in sections)
    title = html.escape(f"catdog-hpo report: {study.study_name}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title>\n"
            f"<style>{_CSS}</style>\n<script>{get_plotlyjs()}</script>\n</head><body>\n"
            f"<h1>{title}</h1>\n<p class=\"generated\">generated {datetime.now():%Y-%m-%d %H:%M}</p>\n"
            f"<nav>{nav}</nav>\n{body}\n</body></html>\n")


def own_study(study: optuna.Study) -> optuna.Study:
    """``study`` without its ``--warm-start`` history trials (they trained in another study), for
    the charts Optuna draws from every trial it holds (trial numbers kept); ``study`` itself when
    it has none."""
    import optuna

    from catdog_hpo.search.optuna_compat import storage_of

    if not any(from_history(t) for t in study.get_trials(deepcopy=False)):
        return study

    class OwnTrials(optuna.Study):
        def get_trials(self, deepcopy: bool = True, states: Any = None) -> list[optuna.trial.FrozenTrial]:
            return [t for t in super().get_trials(deepcopy=deepcopy, states=states) if not from_history(t)]

    return OwnTrials(study_name=study.study_name, storage=storage_of(study))


def _single_objective_sections(study: optuna.Study) -> list[tuple[str, str, str]]:
    """The chart sections of a one-objective study (after its summary)."""
    import optuna.visualization as vis

    return [
        ("history", "Optimization history", _figure_or_note(lambda: vis.plot_optimization_history(study))),
        ("intermediate", "Intermediate values (val accuracy per epoch)",
         _figure_or_note(lambda: intermediate_figure(study))),
        ("parallel", "Parallel coordinates", _figure_or_note(lambda: vis.plot_parallel_coordinate(study))),
        ("importance", "Parameter importances", _importance_html(study)),
        ("slice", "Slice plots", _figure_or_note(lambda: vis.plot_slice(study))),
        ("top-trials", f"Top {TOP_N} trials", _top_table_html(study)),
    ]


def intermediate_figure(study: optuna.Study) -> go.Figure:
    """Val accuracy per epoch of every trial that reported one, coloured by state."""
    import plotly.graph_objects as go

    fig = go.Figure()
    shown: set[str] = set()
    for t in study.get_trials(deepcopy=False):
        state = outcome(t)
        if not t.intermediate_values or state not in STATE_COLORS:
            continue
        steps = sorted(t.intermediate_values)
        fig.add_trace(go.Scatter(
            x=steps, y=[t.intermediate_values[s] for s in steps], mode="lines+markers",
            name=state.lower(), legendgroup=state, showlegend=state not in shown,
            line={"color": STATE_COLORS[state], "width": 1.5}, marker={"size": 5},
            hovertemplate=f"trial {t.number} ({state.lower()})<br>epoch %{{x}}: %{{y:.4f}}<extra></extra>",
        ))
        shown.add(state)
    if not shown:
        raise _Note("no trial reported a per-epoch value yet")
    fig.update_layout(xaxis_title="epoch", yaxis_title="val accuracy", legend_title="state")
    return fig


def compare_figure(studies: Sequence[optuna.Study], against: str) -> go.Figure:
    """Best value so far of each study against trial number (``"trial"``) or wall time (``"time"``).

    Wall time is minutes from the study's first trial start to each trial's completion.
    """
    import plotly.graph_objects as go

    fig = go.Figure()
    for study in studies:
        x, y = best_so_far(study, against)
        sampler = StudyInfo.from_study(study).sampler
        label = f"{study.study_name} ({'?' if sampler is None else sampler})"
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", line_shape="hv", name=label))
    axis = "trial number" if against == "trial" else "wall time (minutes since the study started)"
    fig.update_layout(title=f"Best value so far against {axis}", xaxis_title=axis, yaxis_title="best value")
    return fig


def best_so_far(study: optuna.Study, against: str) -> tuple[list[float], list[float]]:
    """(x, best-so-far of the first objective) over the study's completed trials, in completion
    order for ``"time"``."""
    from optuna.study import StudyDirection

    # A multi-objective study (--objectives accuracy,...) is compared on its first objective,
    # accuracy: the quantity every study of the product shares.
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if finished_complete(t)]
    pick = max if study.directions[0] == StudyDirection.MAXIMIZE else min
    if against == "trial":
        done.sort(key=lambda t: t.number)
        xs = [float(t.number) for t in done]
    else:
        start = min(t.datetime_start for t in trials if t.datetime_start is not None) if done else None
        done.sort(key=lambda t: t.datetime_complete)
        xs = [(t.datetime_complete - start).total_seconds() / 60.0 for t in done]  # minutes
    best: list[float] = []
    for t in done:
        best.append(t.values[0] if not best else pick(best[-1], t.values[0]))
    return xs, best


# --------------------------------------------------------------------------- helpers


class _Note(Exception):
    """A section that cannot be drawn: its message is shown in place of the chart."""


def _check_reportable(study: optuna.Study) -> None:

    trials = study.get_trials(deepcopy=False)
    if not any(finished_complete(t) for t in trials):
        counts = Counter(outcome(t).lower() for t in trials)
        have = ", ".join(f"{n} {s}" for s, n in counts.items()) or "no trials at all"
        raise UserError(f"study {study.study_name!r} has no completed trial yet ({have}): nothing to report")


def _figure_or_note(build: Any) -> str:
    """The figure ``build()`` returns as an HTML div, or a note saying why there is none."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optuna's "too few trials" warnings: the note says it
            fig = build()
    except (_Note, ValueError) as exc:
        return _note(str(exc))
    if not fig.data:
        return _note("not enough trials with these values to draw this chart yet")
    fig.update_layout(template="plotly_white")
    return fig.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False})


def _importance_html(study: optuna.Study) -> str:
    import optuna.visualization as vis

    n_done = sum(1 for t in study.get_trials(deepcopy=False) if finished_complete(t))
    if n_done < MIN_TRIALS_FOR_IMPORTANCE:
        return _note(f"parameter importances need at least {MIN_TRIALS_FOR_IMPORTANCE} completed trials; "
                     f"this study has {n_done}")
    caught: list[warnings.WarningMessage] = []

    def build() -> go.Figure:
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            fig = vis.plot_param_importances(study)
        caught.extend(got)
        if any("importances will be equal" in str(w.message) for w in caught):
            raise _Note("the completed trials do not separate good from bad settings yet: "
                        "importances cannot be estimated")
        return fig

    return _figure_or_note(build)


def _summary_html(study: optuna.Study) -> str:
    lines = study_header(study).splitlines()
    items = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
    if len(study.directions) > 1:
        from catdog_hpo.view.pareto import names_of

        from catdog_hpo.search.pareto import front_trials

        return (f"<ul>{items}<li>objectives: {html.escape(', '.join(names_of(study)))}; "
                f"{len(front_trials(study))} trials on the Pareto front</li></ul>")
    best = top_trials(study, 1)[0]  # not Optuna's best_trial: it may pick a --warm-start history trial
    return (f"<ul>{items}<li>best: trial {best.number}, value {_fmt_value(best.value)}, "
            f"{html.escape(format_params(best.params))}</li></ul>")


def _top_table_html(study: optuna.Study) -> str:
    """The top trials; flops: per image of the model as shipped (a TTA model runs two forwards)."""
    headers = ["#", "value", "params", "flops", "s/epoch", "epochs", "hyperparameters"]
    rows = []
    for t in top_trials(study):
        r = TrialRecord.from_trial(t)
        rows.append([t.number, _fmt_value(t.value), _fmt_count(r.n_params), _fmt_count(r.shipped_flops),
                     _fmt_float(r.sec_per_epoch, 2), "-" if r.epochs_run is None else r.epochs_run,
                     format_params(t.params)])
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="trials"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _safe_name(name: str) -> str:
    """A study name usable as one folder name."""
    return re.sub(r"[^\w.-]+", "_", name).strip(".") or "study"


_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }
nav a { margin-right: .3em; } .generated { color: #777; font-size: .9em; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: .5em .8em; }
.section { margin-bottom: 2em; overflow-x: auto; }
table.trials { border-collapse: collapse; font-size: .9em; }
table.trials th, table.trials td { border: 1px solid #ddd; padding: .25em .5em; text-align: left; }
table.trials th { background: #f4f4f4; }
"""
