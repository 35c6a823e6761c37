"""Admission: whether a config the sampler proposed may train, decided before any training.

The rule, whole: a config is admitted when the cost model's seconds for all its epochs fit in
the time left of ``--budget`` (no trial starts that would not finish), and, with a ``--trials``
target and unless the user asked for it by name (the baseline, ``--enqueue``, ``--warm-start``), when its expected
seconds under the pruner are at most SLACK fair shares, a fair share being the time left x
workers / the trials still to run, an allowance that doubles after every RELAX_EVERY refusals in
a row so that pacing bends instead of idling the budget. Every refusal, of this rule or of
``--max-params``/``--max-flops``, adds one to the worker's refusals in a row and an admission
resets it; the worker stops when the time left fits not even the cheapest config proposed so far
(after TOO_LATE refusals in a row), or after a run of refusals that had under 1% chance at the
share of configs admitted so far (at least MIN_RUN, at most MAX_RUN).

Both functions are pure: the guard (``search.budget.Guard``) prices the config and reads the
study once, the worker keeps the one counter (``Refusals``).
"""

from __future__ import annotations

import dataclasses
import math

from catdog_hpo.search.durations import format_duration

SLACK = 2.0  # fair shares a config may cost: trials that the pruner stops early leave time over
RELAX_EVERY = 8  # refusals in a row per doubling of SLACK; below MIN_RUN, so pacing alone never stops a run
TOO_LATE = 3  # refusals in a row with not even the cheapest config fitting: the budget is done
MIN_RUN = 25  # refusals in a row before a worker may give up (sampling one costs ~0.1 s)
MAX_RUN = 500  # ... and before it surely does (about a minute of sampling)
CHANCE = 0.01  # a run of refusals less likely than this at the admitted share is no accident


@dataclasses.dataclass(frozen=True)
class Priced:
    """One proposed config, priced by the cost model on this device."""

    predicted_s: float  # seconds for all its epochs
    expected_s: float  # seconds on average under the pruner (the epochs a trial runs on average)
    epochs: int
    ran_epochs: float  # epochs a trial runs on average under the pruner
    by_name: bool  # the baseline, an --enqueue or a --warm-start config: the user asked for it (record.asked_by_name)


@dataclasses.dataclass(frozen=True)
class Standing:
    """The study as this admission reads it, once."""

    left_s: float  # seconds of --budget left (inf without a budget)
    budget_s: float  # the whole --budget in seconds (inf without one)
    workers: int
    to_go: int | None  # trials still to run, this one included (None: no --trials)
    refused_in_a_row: int  # this worker's refusals in a row before this config


def decide(config: Priced, study: Standing) -> str | None:
    """None to admit ``config``, else the one-line reason it is refused (the module's rule)."""
    budget = f"of --budget {format_duration(study.budget_s)}"
    if config.predicted_s > study.left_s:
        return f"predicted {format_duration(config.predicted_s)} > the {format_duration(study.left_s)} left {budget}"
    if study.to_go is None or config.by_name or math.isinf(study.left_s):
        return None
    allowance = SLACK * 2 ** (study.refused_in_a_row // RELAX_EVERY)
    share = study.left_s * study.workers / max(1, study.to_go) * allowance
    if config.expected_s > share:
        return (f"expected {format_duration(config.expected_s)} ({config.ran_epochs:.1f} of {config.epochs} epochs "
                f"under the pruner) > its fair share {format_duration(share)} of the "
                f"{format_duration(study.left_s)} left {budget}")
    return None


@dataclasses.dataclass
class Refusals:
    """The worker's one refusal counter, and what its stop rule reads."""

    in_a_row: int = 0
    admitted: int = 0
    proposed: int = 0
    cheapest_s: float = math.inf  # the cheapest config proposed so far: predicted seconds

    def priced(self, predicted_s: float) -> None:
        self.cheapest_s = min(self.cheapest_s, predicted_s)

    def count(self, refused: bool) -> None:
        self.proposed += 1
        self.admitted += not refused
        self.in_a_row = self.in_a_row + 1 if refused else 0


def tolerated(admitted: int, proposed: int) -> int:
    """Refusals in a row that had under CHANCE at the share of ``proposed`` configs that were
    ``admitted`` (Laplace's estimate: none yet gives 1/2), MIN_RUN to MAX_RUN. A learning sampler
    that keeps proposing refused configs stops at MIN_RUN; random search, which never learns,
    admitting 7% of its configs, goes on to 44."""
    p = (admitted + 1) / (proposed + 2)
    run = math.ceil(math.log(CHANCE) / math.log1p(-p)) if p < 1 else 1
    return max(MIN_RUN, min(MAX_RUN, run))


def stop(refusals: Refusals, left_s: float, last: str | None = None) -> str | None:
    """None to go on, else the one-line reason this worker stops (the module's rule); ``last``:
    the last refusal's reason."""
    if refusals.in_a_row >= TOO_LATE and left_s < refusals.cheapest_s:
        return (f"the {format_duration(left_s)} left of the budget fits not even the cheapest config proposed "
                f"({format_duration(refusals.cheapest_s)}); no more trials start")
    before = refusals.proposed - refusals.in_a_row  # the run's own refusals are not the evidence
    if refusals.in_a_row >= tolerated(refusals.admitted, before):
        hint = ("the budget left is too small for the configs this space proposes" if math.isfinite(left_s)
                else "loosen --max-params/--max-flops or narrow the space")
        return f"the last {refusals.in_a_row} configs were all turned away before training (last: {last}); {hint}"
    return None
