"""The admission policy (catdog_hpo.search.admission) as a table: each row a config, the study's
standing, and what the rule answers."""

from __future__ import annotations

import math

import pytest

from catdog_hpo.search.admission import MIN_RUN, RELAX_EVERY, SLACK, TOO_LATE, Priced, Refusals, Standing, decide, stop

INF = math.inf


def priced(predicted: float, expected: float | None = None, by_name: bool = False) -> Priced:
    return Priced(predicted_s=predicted, expected_s=predicted if expected is None else expected, epochs=20,
                  ran_epochs=20.0 if expected is None else 20.0 * expected / predicted, by_name=by_name)


def standing(left: float, to_go: int | None = None, workers: int = 1, in_a_row: int = 0) -> Standing:
    return Standing(left_s=left, budget_s=3600.0 if math.isfinite(left) else INF, workers=workers, to_go=to_go,
                    refused_in_a_row=in_a_row)


# (why, config, study, the answer: None to admit, else the start of the reason)
DECIDE = [
    ("no budget: everything", priced(1e6), standing(INF, to_go=10), None),
    ("fits what is left, no --trials", priced(590), standing(600), None),
    ("would not finish", priced(601), standing(600), "predicted 10.0m > the 10.0m left"),
    ("would not finish, even asked by name", priced(601, by_name=True), standing(600, to_go=1), "predicted"),
    ("would not finish, however many refusals", priced(601, 1), standing(600, to_go=1, in_a_row=10 * RELAX_EVERY),
     "predicted"),
    # 600 s left, 10 to go, 1 worker: a fair share of 60 s, SLACK of them allowed
    ("within SLACK fair shares", priced(500, 60 * SLACK), standing(600, to_go=10), None),
    ("over SLACK fair shares", priced(500, 60 * SLACK + 1), standing(600, to_go=10), "expected"),
    ("asked by name: only 'must finish'", priced(500, 500, by_name=True), standing(600, to_go=10), None),
    ("two workers: twice the share", priced(500, 60 * SLACK * 2), standing(600, to_go=10, workers=2), None),
    ("RELAX_EVERY refusals in a row double it", priced(500, 60 * SLACK * 2),
     standing(600, to_go=10, in_a_row=RELAX_EVERY), None),
    ("one short of RELAX_EVERY: not yet", priced(500, 60 * SLACK * 2),
     standing(600, to_go=10, in_a_row=RELAX_EVERY - 1), "expected"),
    ("the last trial to run may take all that is left", priced(599, 599), standing(600, to_go=1, in_a_row=RELAX_EVERY),
     None),
    ("no --trials: no share", priced(599, 599), standing(600, to_go=None), None),
]


@pytest.mark.parametrize("config,study,answer", [row[1:] for row in DECIDE], ids=[row[0] for row in DECIDE])
def test_decide(config: Priced, study: Standing, answer: str | None) -> None:
    reason = decide(config, study)
    if answer is None:
        assert reason is None
    else:
        assert reason is not None and reason.startswith(answer) and "\n" not in reason
        assert "of --budget 60.0m" in reason  # names the flag and its value


def refusals(in_a_row: int, admitted: int = 0, before: int | None = None, cheapest: float = 10.0) -> Refusals:
    """``before``: configs proposed before this run of refusals (default: all admitted)."""
    before = admitted if before is None else before
    return Refusals(in_a_row=in_a_row, admitted=admitted, proposed=before + in_a_row, cheapest_s=cheapest)


# (why, the counter, seconds left, the answer: None to go on, else a phrase of the reason)
STOP = [
    ("admitted last: go on", refusals(0, 5), 1.0, None),
    ("too late, but not TOO_LATE in a row yet", refusals(TOO_LATE - 1, 5), 1.0, None),
    ("too late, TOO_LATE in a row", refusals(TOO_LATE, 5), 1.0, "fits not even the cheapest"),
    ("refusals in a row with time left: go on", refusals(TOO_LATE, 5), 100.0, None),
    ("a learning sampler stuck: MIN_RUN", refusals(MIN_RUN, 90), 100.0, "the last 25 configs were all turned away"),
    ("... one short: go on", refusals(MIN_RUN - 1, 90), 100.0, None),
    ("random search at 7% admitted: 25 is chance", refusals(MIN_RUN, 7, before=77), 100.0, None),
    ("... 44 is not", refusals(44, 7, before=77), 100.0, "the last 44 configs"),
    ("no budget: the hint names the limits", refusals(MIN_RUN, 90), INF, "loosen --max-params/--max-flops"),
]


@pytest.mark.parametrize("counter,left,answer", [row[1:] for row in STOP], ids=[row[0] for row in STOP])
def test_stop(counter: Refusals, left: float, answer: str | None) -> None:
    reason = stop(counter, left, last="too big")
    if answer is None:
        assert reason is None
    else:
        assert reason is not None and answer in reason and "\n" not in reason


def test_the_counter_counts_refusals_in_a_row_and_the_cheapest() -> None:
    r = Refusals()
    for refused, seconds in ((True, 30.0), (True, 12.0), (False, 50.0), (True, 40.0)):
        r.priced(seconds)
        r.count(refused)
    assert (r.in_a_row, r.admitted, r.proposed, r.cheapest_s) == (1, 1, 4, 12.0)
