"""A multi-objective study read back: the Pareto front chart, the trade-off table, each
objective's history (for ``report``), and the front as text (for ``show``)."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

from catdog_hpo.search.pareto import completed_trials, front_trials
from catdog_hpo.search.record import StudyInfo, TrialRecord
from catdog_hpo.view.tables import _fmt_count, format_params, format_table

if TYPE_CHECKING:
    import optuna
    import plotly.graph_objects as go
    from optuna.trial import FrozenTrial

FRONT_COLOR = "#d62728"
OTHER_COLOR = "#9bb7d4"


def names_of(study: optuna.Study) -> list[str]:
    """The objectives' names: the study's metric names, else its recorded objectives."""
    names = study.metric_names or list(StudyInfo.from_study(study).objectives)
    return names if len(names) == len(study.directions) else [f"value {i}" for i in range(len(study.directions))]


def _fmt(name: str, v: float) -> str:
    if name == "accuracy":
        return f"{v:.4f}"
    if name == "latency":
        return f"{v:.3g} ms"
    return _fmt_count(v)


def _hover(t: FrozenTrial, names: list[str]) -> str:
    vals = "<br>".join(f"{n}: {_fmt(n, v)}" for n, v in zip(names, t.values))
    params = "<br>".join(f"{k} = {html.escape(str(v))}" for k, v in t.params.items())
    return f"trial {t.number}<br>{vals}<br>{params}"


def pareto_figure(study: optuna.Study) -> go.Figure:
    """Accuracy against the first cost objective: every completed trial, the front highlighted
    (and joined as a step line); hovering a point shows its values and hyperparameters."""
    import plotly.graph_objects as go

    names = names_of(study)
    front = front_trials(study)
    on_front = {t.number for t in front}
    others = [t for t in completed_trials(study) if t.number not in on_front]
    cost = names[1]
    fig = go.Figure()
    for label, group, color, size in (("other trials", others, OTHER_COLOR, 8), ("Pareto front", front, FRONT_COLOR, 11)):
        if not group:
            continue
        group = sorted(group, key=lambda t: t.values[1])
        fig.add_trace(go.Scatter(
            x=[t.values[1] for t in group], y=[t.values[0] for t in group], name=label,
            mode="lines+markers" if label == "Pareto front" else "markers", line_shape="hv",
            marker={"color": color, "size": size}, line={"color": color, "dash": "dot"},
            text=[_hover(t, names) for t in group], hovertemplate="%{text}<extra></extra>",
        ))
    extra = f" (the front counts all {len(names)} objectives: {', '.join(names)})" if len(names) > 2 else ""
    fig.update_layout(title=f"Pareto front: accuracy against {cost}{extra}",
                      xaxis_title=cost, yaxis_title="val accuracy",
                      xaxis_type="log" if cost in ("params", "flops") else "linear")
    return fig


def tradeoff_rows(study: optuna.Study) -> tuple[list[str], list[list[Any]]]:
    """The front, cheapest first: trial, each objective, epochs, hyperparameters."""
    names = names_of(study)
    front = sorted(front_trials(study), key=lambda t: (*t.values[1:], -t.values[0]))
    headers = ["#", *names, "epochs", "hyperparameters"]
    rows = [[t.number, *(_fmt(n, v) for n, v in zip(names, t.values)),
             "-" if TrialRecord.from_trial(t).epochs_run is None else TrialRecord.from_trial(t).epochs_run,
             format_params(t.params)] for t in front]
    return headers, rows


def format_front(study: optuna.Study) -> str:
    headers, rows = tradeoff_rows(study)
    if not rows:
        return "no completed trial yet"
    return f"Pareto front ({len(rows)} trials, cheapest first):\n" + format_table(headers, rows)


def tradeoff_html(study: optuna.Study) -> str:
    headers, rows = tradeoff_rows(study)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return (f'<p>The {len(rows)} trials no other trial beats on every objective, cheapest first: '
            f'each buys its accuracy at a lower cost than the next.</p>'
            f'<table class="trials" id="tradeoff"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>')


def history_figure(study: optuna.Study, index: int) -> go.Figure:
    """One objective over trial number: every completed trial and the best so far."""
    import plotly.graph_objects as go

    name = names_of(study)[index]
    maximize = study.directions[index].name == "MAXIMIZE"
    done = sorted(completed_trials(study), key=lambda t: t.number)
    best: list[float] = []
    for t in done:
        v = t.values[index]
        best.append(v if not best else (max if maximize else min)(best[-1], v))
    fig = go.Figure([
        go.Scatter(x=[t.number for t in done], y=[t.values[index] for t in done], mode="markers", name=name,
                   text=[_hover(t, names_of(study)) for t in done], hovertemplate="%{text}<extra></extra>"),
        go.Scatter(x=[t.number for t in done], y=best, mode="lines", line_shape="hv",
                   name=f"best so far ({'highest' if maximize else 'lowest'})"),
    ])
    fig.update_layout(title=f"{name} by trial", xaxis_title="trial number", yaxis_title=name)
    return fig


def sections(study: optuna.Study, figure_or_note: Any) -> list[tuple[str, str, str]]:
    """(id, title, html) of the multi-objective report sections."""
    names = names_of(study)
    history = "".join(figure_or_note(lambda i=i: history_figure(study, i)) for i in range(len(names)))
    return [
        ("pareto", "Pareto front", figure_or_note(lambda: pareto_figure(study))),
        ("tradeoff", "Trade-off table (the front)", tradeoff_html(study)),
        ("objective-history", "Each objective's history", history),
    ]
