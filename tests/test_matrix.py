"""Every combination `run` accepts holds for a whole study; every one it refuses is a one-line error.

The matrix is sampler x pruner x objectives x workers, derived from the registries (a sampler or
pruner added to ``search.choices`` joins it). Each accepted combination runs ``MATRIX_TRIALS``
finished trials, past every sampler's start-up trials (TPE, GP and CMA-ES draw at random for
their first 5-10) and past the pruners' first decisions, on a space whose trials take a fraction
of a second, and must end with exactly that many finished trials, none failed, none left running.

These studies take minutes, so they are marked ``matrix`` and left out of the default run
(pyproject's addopts); ``.ci/run`` runs them as a step of their own:
``pytest -m matrix -n 2 tests/test_matrix.py``. The refusals run in the default suite.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from catdog_hpo.errors import UserError
from catdog_hpo.search import choices
from catdog_hpo.search.record import TrialKey, outcome
from catdog_hpo.search.study import check_goal
from helpers import write_image_folder
from study_factory import run_settings

MATRIX_TRIALS = 24  # finished trials per study: past the start-up of every sampler (<= 10)
OBJECTIVE_SETS = (("accuracy",), ("accuracy", "params"))
WORKERS = (1, 2)

# 3 epochs: the pruners' first rung is epoch 2 (first_rung, sha_first_rung), so each study
# sees trials pruned and trials that finish. The grid has 36 points (depth 1: 2 x 6; depth 2:
# 2 x 2 x 6), more than MATRIX_TRIALS, so the grid sampler runs a whole study too.
MATRIX_SPACE: dict = {
    "name": "matrix",
    "base": {"image_size": 16, "model": {"family": "cnn", "head": "gap", "dropout": 0.0},
             "optim": {"name": "adam", "scheduler": "none"}, "train": {"epochs": 3, "batch_size": 32}},
    "blocks": {"depth": {"int": [1, 2]}, "channels": {"choices": [4, 8], "grid": [4, 8]}},
    "params": {"optim.lr": {"float": [1e-3, 3e-2], "log": True,
                            "grid": [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3e-2]}},
}


def _combinations() -> tuple[list[tuple], list[tuple]]:
    """(accepted, refused) (sampler, pruner, objectives) triples, as check_goal decides."""
    accepted, refused = [], []
    for sampler, pruner, objectives in itertools.product(choices.SAMPLERS, choices.PRUNERS, OBJECTIVE_SETS):
        try:
            check_goal(sampler, pruner, objectives)
        except UserError:
            refused.append((sampler, pruner, objectives))
        else:
            accepted.append((sampler, pruner, objectives))
    return accepted, refused


ACCEPTED, REFUSED = _combinations()


def _id(sampler: str, pruner: str, objectives: tuple[str, ...]) -> str:
    return f"{sampler}-{pruner}-{'+'.join(objectives)}"


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """128 train / 128 val images at 16 px, 4 batches per epoch: a trial costs its overheads
    (sampling, the store, the pruner), the part of a study these tests are about.

    The pruners prune only a trial strictly below the others at a rung, so the task must spread
    the trials' epoch-2 accuracies: with vivid colours (saturation 0.8) almost every config scored
    1.0 and a GP study pruned nothing; with one batch per epoch most scored 0.5 (chance), tied
    again. Faint colours (0.3), 4 steps an epoch and 128 val images (steps of 1/128) spread them:
    every pruner pruned 5 to 18 of 24 trials in each study."""
    return write_image_folder(tmp_path_factory.mktemp("matrix-images"), n_per_class=64, n_val_per_class=64,
                              saturation=0.3)


@pytest.fixture()
def workdir(tmp_path: Path, images: Path) -> Path:
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(MATRIX_SPACE))
    (tmp_path / "images").symlink_to(images)
    return tmp_path


def _run_whole_study(workdir: Path, **kw: object) -> optuna.Study:
    from catdog_hpo.data import DataSource
    from catdog_hpo.search.run import run

    settings = run_settings(workdir, trials=MATRIX_TRIALS, data=DataSource(path=str(workdir / "images")), **kw)
    run(settings)
    return optuna.load_study(study_name=settings.study, storage=settings.storage)


def _assert_whole(study: optuna.Study, label: str) -> None:
    trials = study.get_trials(deepcopy=False)
    states = {t.number: outcome(t) for t in trials}
    _report(label, trials)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                and TrialKey.REJECTED not in t.user_attrs]
    failed = {t.number: t.user_attrs.get(TrialKey.FAIL_REASON) for t in trials if t.state == TrialState.FAIL}
    assert not failed, f"failed trials: {failed}"
    # WAITING is fine: the grid enqueues all its points, and those past N wait for a resume.
    running = [t.number for t in trials if t.state == TrialState.RUNNING]
    assert not running, f"trials left RUNNING: {running}"
    assert len(finished) == MATRIX_TRIALS, f"{len(finished)} finished trials, not {MATRIX_TRIALS}: {states}"


def _report(label: str, trials: list) -> None:
    """One line per study to $CATDOG_MATRIX_REPORT when set: the closing note's table."""
    path = os.environ.get("CATDOG_MATRIX_REPORT")
    if not path:
        return
    counts = Counter("rejected" if TrialKey.REJECTED in t.user_attrs else outcome(t).lower() for t in trials)
    with open(path, "a") as f:  # one short append per study: safe from several xdist workers
        f.write(f"{label}\t" + " ".join(f"{k}={v}" for k, v in sorted(counts.items())) + "\n")


@pytest.mark.matrix
@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("sampler,pruner,objectives", ACCEPTED, ids=[_id(*c) for c in ACCEPTED])
def test_every_accepted_combination_runs_a_whole_study(workdir: Path, sampler: str, pruner: str,
                                                       objectives: tuple[str, ...], workers: int) -> None:
    study = _run_whole_study(workdir, sampler=sampler, pruner=pruner, objectives=objectives,
                             workers=workers, devices=("cpu",) * workers)
    _assert_whole(study, f"{_id(sampler, pruner, objectives)} workers={workers}")
    stopped = [t for t in study.get_trials(deepcopy=False) if outcome(t) == "PRUNED"]
    # Pruned trials are the state TPE's multi-objective split broke on: make sure they occur.
    # Not with `patient`: it prunes only a trial whose accuracy stalled, and in 3 epochs with the
    # last one exempt (a rung there decides nothing) it has one epoch to see a stall in.
    if pruner not in ("none", "pareto", "patient"):
        assert stopped, "the pruner pruned nothing: the study did not reach the pruning path"


@pytest.mark.matrix
@pytest.mark.parametrize("sampler", ["tpe", "random", "nsga2"])
def test_several_objectives_with_every_cost(workdir: Path, sampler: str) -> None:
    # accuracy,latency failed with TPE + the Pareto rule like accuracy,params did
    _assert_whole(_run_whole_study(workdir, sampler=sampler, pruner="pareto",
                                   objectives=("accuracy", "params", "flops", "latency")),
                  f"{sampler}-pareto-accuracy+params+flops+latency workers=1")


@pytest.mark.matrix
@pytest.mark.parametrize("objectives", OBJECTIVE_SETS, ids=["+".join(o) for o in OBJECTIVE_SETS])
def test_a_budgeted_study(workdir: Path, objectives: tuple[str, ...]) -> None:
    pruner = "pareto" if len(objectives) > 1 else "sha"
    _assert_whole(_run_whole_study(workdir, sampler="tpe", pruner=pruner, objectives=objectives,
                                   time_budget=600.0), f"tpe-{pruner}-{'+'.join(objectives)} --budget 10m")


@pytest.mark.matrix
@pytest.mark.parametrize("objectives", OBJECTIVE_SETS, ids=["+".join(o) for o in OBJECTIVE_SETS])
def test_a_max_params_study(workdir: Path, objectives: tuple[str, ...]) -> None:
    from catdog_hpo.search.limits import Limits

    pruner = "pareto" if len(objectives) > 1 else "sha"
    # Depth 2 with 8 channels in its second block has more parameters: some configs are turned away.
    study = _run_whole_study(workdir, sampler="tpe", pruner=pruner, objectives=objectives,
                             limits=Limits(max_params=600))
    _assert_whole(study, f"tpe-{pruner}-{'+'.join(objectives)} --max-params 600")
    assert any(TrialKey.REJECTED in t.user_attrs for t in study.get_trials(deepcopy=False)), \
        "--max-params turned nothing away: the limit does not bite in this space"


# --------------------------------------------------------------------------- refusals (default suite)


def test_the_matrix_has_both_kinds() -> None:
    assert len(ACCEPTED) >= 40 and len(REFUSED) >= 30, (len(ACCEPTED), len(REFUSED))


def test_every_refused_combination_is_a_one_line_error(tmp_path: Path) -> None:
    """Through the real command line: exit 2, one `error:` line naming the flags, no traceback.
    One Python process runs every case (start-up would dominate a process per case)."""
    script = (
        "import sys\n"
        "from catdog_hpo.cli import main\n"
        "for case in sys.argv[1:]:\n"
        "    s, p, o = case.split('|')\n"
        "    try:\n"
        "        code = main(['run', '--sampler', s, '--pruner', p, '--objectives', o, '--trials', '1',\n"
        "                     '--device', 'cpu', '--no-progress'])\n"
        "    except SystemExit as exc:\n"
        "        code = exc.code\n"
        "    print(f'EXIT {case} {code}', file=sys.stderr)\n"
    )
    cases = [f"{s}|{p}|{','.join(o)}" for s, p, o in REFUSED]
    proc = subprocess.run([sys.executable, "-c", script, *cases], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    for case, (sampler, pruner, objectives) in zip(cases, REFUSED):
        end = lines.index(f"EXIT {case} 2")  # exit status 2 for each
        error = lines[end - 1]
        assert error.startswith("catdog-hpo run: error: "), (case, lines[max(0, end - 3):end + 1])
        assert f"--sampler {sampler}" in error or f"--pruner {pruner}" in error, (case, error)
    assert not (tmp_path / "studies").exists(), "a refused run must not create a store"
