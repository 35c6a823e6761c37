"""Warm start (``run --warm-start STUDY[@STORAGE]``): start a study from what earlier ones learnt.

From each source study: its best K completed configs (``--warm-start-top K``, by accuracy) are
replayed through this run's space; one that is not a point of it is named in one line and
skipped (not replaced by the next best). The rest go through the same queue as ``--enqueue``
(``search.study``: one home for the configs a user asks to run first), right after the baseline,
each with ``warm_start_from`` = ``study@storage#trial``, so admission treats them as asked for by
name. When the source searched the same space on the same data (``record.SAME_SEARCH``, and the
same objectives), its finished trials are also copied in as the sampler's history (Optuna's
``add_trials``), each with ``warm_history_from``: they ran elsewhere, so they count toward no
``--trials``, no budget share and no best (``record.from_history``). The study records each
source it applied (``warm_started_from``); a rerun naming it again applies it no second time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from catdog_hpo.errors import ConfigError, UserError
from catdog_hpo.search.record import SAME_SEARCH, StudyKey, TrialKey, counts_toward_n, finished_complete
from catdog_hpo.search.storage import mask_password

if TYPE_CHECKING:
    import optuna
    from optuna.storages import BaseStorage
    from optuna.trial import FrozenTrial

    from catdog_hpo.search.spaces import Space

FLAG = "--warm-start"
# What a history trial keeps of its source's record: enough for show/report/the dashboard to say
# what it was. Not its cost attributes (they would calibrate this study's cost model with another
# run's timings) nor its checkpoint or weights files (they belong to the source's folder).
_KEPT = (TrialKey.CONFIG, TrialKey.N_PARAMS, TrialKey.FLOPS, TrialKey.EPOCHS_RUN, TrialKey.BEST_EPOCH,
         TrialKey.STOPPED_EARLY, TrialKey.PRUNED_BY)


@dataclass(frozen=True)
class WarmSource:
    """One ``--warm-start`` value: a study and the store it is in."""

    study: str
    storage: str

    @property
    def label(self) -> str:
        """``study@storage`` (password masked): how the study and its trials name the source."""
        return f"{self.study}@{mask_password(self.storage)}"


def parse_source(text: str, default_storage: str) -> WarmSource:
    """``STUDY`` (in ``default_storage``, the run's own) or ``STUDY@STORAGE``; the first ``@``
    splits them, so a database URL may hold its own (``user@host``)."""
    study, at, storage = text.partition("@")
    if not study.strip() or (at and not storage.strip()):
        raise UserError(f"{FLAG} {mask_password(text)!r}: expected STUDY or STUDY@STORAGE "
                        "(a study name, then optionally @ and the URL of its store)")
    return WarmSource(study.strip(), storage.strip() if at else default_storage)


@dataclass(frozen=True)
class Loaded:
    """A source study, read once: its attributes and the finished trials that ran in it."""

    source: WarmSource
    attrs: dict[str, Any]
    trials: tuple[FrozenTrial, ...]


def pending(storage: BaseStorage, study: str, sources: Sequence[WarmSource]) -> list[WarmSource]:
    """The sources not applied to ``study`` yet (all of them when it does not exist)."""
    try:
        sid = storage.get_study_id_from_name(study)
    except KeyError:
        return list(sources)
    done = set(storage.get_study_user_attrs(sid).get(StudyKey.WARM_STARTED_FROM) or ())
    return [s for s in sources if s.label not in done]


def load(source: WarmSource, own: WarmSource) -> Loaded:
    """Read ``source``; a one-line UserError naming the flag when it is not there."""
    from catdog_hpo.search.storage import load_study, open_storage

    where = f"{FLAG} {source.label}"
    if source == own:
        raise UserError(f"{where}: that is this run's own study (name another study to start from)")
    try:
        study = load_study(open_storage(source.storage, create=False), source.study, source.storage)
    except UserError as exc:  # the store's own message, less its "--storage URL: " (not that flag's)
        raise UserError(f"{where}: {str(exc).removeprefix(f'--storage {mask_password(source.storage)}: ')}") from None
    trials = tuple(t for t in study.get_trials(deepcopy=False) if counts_toward_n(t))
    return Loaded(source, dict(study.user_attrs), trials)


@dataclass(frozen=True)
class Plan:
    """What the loaded sources give this study."""

    queued: tuple[tuple[dict[str, Any], dict[str, Any]], ...] = ()  # (params, user attrs), to run first
    history: tuple[FrozenTrial, ...] = ()  # finished trials of same-search sources, for the sampler
    lines: tuple[str, ...] = ()  # what the run says about each source
    labels: tuple[str, ...] = ()  # the sources applied (StudyKey.WARM_STARTED_FROM)


def plan(loaded: Sequence[Loaded], space: Space, top: int, wanted: dict[str, Any],
         queued: Sequence[dict[str, Any]] = ()) -> Plan:
    """Each source's best ``top`` configs that fit ``space`` (one already ``queued``, the
    baseline, or taken from an earlier source is not queued twice), and the history of the
    sources whose search is this one's (``wanted``: this study's attributes, as
    search.study.study_attrs writes them)."""
    from catdog_hpo.search.space_files import check_params

    taken_all: list[tuple[dict[str, Any], dict[str, Any]]] = []
    history: list[FrozenTrial] = []
    lines: list[str] = []
    seen = {_key(p) for p in queued}
    for src in loaded:
        label = src.source.label
        done = [t for t in src.trials if finished_complete(t)]
        # Accuracy is the first objective and maximised: it ranks the configs in every study.
        best = sorted(done, key=lambda t: (-t.values[0], t.number))[:top]
        taken = twice = 0
        for t in best:
            key = _key(t.params)
            if key in seen:
                twice += 1
                continue
            try:
                check_params(space, t.params, f"{label}#{t.number}")
            except ConfigError as exc:
                lines.append(f"warm start: skipped {exc}")
                continue
            seen.add(key)
            taken_all.append((dict(t.params), {TrialKey.WARM_START_FROM: f"{label}#{t.number}"}))
            taken += 1
        head = (f"warm start: {label}: {taken} of its {len(best)} best configs run first"
                + (f" ({twice} already queued)" if twice else ""))
        differs = _differs(src.attrs, wanted)
        if differs:
            lines.append(f"{head}; it searched another {differs}, so its trials are not given to the sampler "
                         "as history")
        else:
            history += [_copied(t, label) for t in src.trials]
            lines.append(f"{head}; same space and data, so its {len(src.trials)} finished trials are the "
                         "sampler's history (not counted toward --trials)")
    return Plan(tuple(taken_all), tuple(history), tuple(lines), tuple(s.source.label for s in loaded))


def _key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)


def _differs(attrs: dict[str, Any], wanted: dict[str, Any]) -> str:
    """"" when a source's trials measure what this study's do, else what differs, in words."""
    for key in (*SAME_SEARCH, StudyKey.OBJECTIVES):
        have = attrs.get(key) or (["accuracy"] if key == StudyKey.OBJECTIVES else None)
        if have != wanted[key]:
            return f"{key.replace('_', ' ')} ({have!r}; this study: {wanted[key]!r})"
    return ""


def _copied(trial: FrozenTrial, label: str) -> FrozenTrial:
    """``trial`` as a history trial of this study: its params, values and state, marked.

    It keeps its per-epoch intermediate values. The sources searched the same space, data and
    epochs, so its curve measures what this study's trials do: with it TPE and CMA-ES rank a
    pruned history trial by its last accuracy as they rank their own, and the median and patient
    pruners (the median of completed trials' curves at an epoch) have a bar from the first new
    trial (the baseline and the replayed configs too), as a warm start should. Without the
    curves those pruners would be worse off than cold: Optuna counts completed history trials
    toward their start-up trials, then takes the median over the few own trials that have the
    epoch. SHA and Hyperband rank by rung records kept in trial system attributes, which are not
    copied (the source pruner's bookkeeping of its promotions, not measurements), and the
    Pareto rule reads finished_complete trials: those rank this study's own trials only."""
    from optuna.trial import TrialState, create_trial

    keep = {k: trial.user_attrs[k] for k in _KEPT if k in trial.user_attrs}
    return create_trial(
        state=trial.state, values=trial.values if trial.state == TrialState.COMPLETE else None,
        params=trial.params, distributions=trial.distributions,
        user_attrs={**keep, TrialKey.WARM_HISTORY_FROM: f"{label}#{trial.number}"},
        intermediate_values=dict(trial.intermediate_values),
    )


def record(study: optuna.Study, warm: Plan) -> None:
    """After its configs are queued: copy the history in, record the sources, say what was done."""
    if warm.history:
        study.add_trials(warm.history)
    applied = list(study.user_attrs.get(StudyKey.WARM_STARTED_FROM) or [])
    if warm.labels:
        study.set_user_attr(StudyKey.WARM_STARTED_FROM, applied + [s for s in warm.labels if s not in applied])
    for line in warm.lines:
        print(line)
