"""Bad input to `catdog-hpo run`, through the real command line (a subprocess per case).

Every case must exit with status 2, end stderr with one `catdog-hpo run: error: ...` line (no
traceback), and leave the study store as it was. The cases run a few at a time: most of them
fail before any training, so the cost is mostly Python start-up.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from helpers import TINY_SPACE, write_image_folder

TINY = TINY_SPACE
SHARED_STUDY = "shared"  # made once by a real run; the reuse case points at it
_PARALLEL = 3  # cases running at once (the machine has 2 cores; start-up is partly I/O)


def _with_params(params: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {**TINY, "params": params, **extra}


# Search-space files with one mistake each: file name -> (content, what the error must say).
BAD_SPACES: dict[str, tuple[dict[str, Any], str]] = {
    "unknown_key.yaml": ({**TINY, "paramz": {}}, "unknown key 'paramz'"),
    "low_gt_high.yaml": (_with_params({"optim.lr": {"float": [0.1, 0.01]}}), "low 0.1 > high 0.01"),
    "log_low_zero.yaml": (_with_params({"optim.lr": {"float": [0.0, 0.1], "log": True}}), "log scale needs low > 0"),
    "empty_choices.yaml": (_with_params({"optim.name": {"choices": []}}), "choices: must be a non-empty list"),
    # 10 x 10 x 10 x 10 = 10,000 points per depth, 20,000 in all: over spaces.MAX_GRID_POINTS.
    "huge_grid.yaml": (_with_params({
        "optim.lr": {"float": [1e-4, 1e-1], "log": True, "grid": [i * 1e-4 for i in range(1, 11)]},
        "optim.weight_decay": {"float": [0.0, 0.1], "grid": [i / 100 for i in range(10)]},
        "model.dropout": {"float": [0.0, 0.5], "grid": [i / 20 for i in range(10)]},
        "optim.momentum": {"float": [0.5, 0.99], "grid": [0.5 + i / 20 for i in range(10)]},
    }), "the grid has more than 10,000 points"),
}


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]  # after `catdog-hpo run`
    says: str  # a piece of the error line
    flag_error: bool = False  # argparse's own error (usage lines before it)
    secret: str | None = None  # must appear nowhere in the output


COMMON = ("--space", "tiny.yaml", "--no-progress", "--device", "cpu", "--trials", "1")

CASES = [
    Case("unknown-sampler", ("--sampler", "bayes", *COMMON), "argument --sampler: invalid choice: 'bayes'", True),
    Case("unknown-pruner", ("--pruner", "asha", *COMMON), "argument --pruner: invalid choice: 'asha'", True),
    Case("trials-0", (*COMMON, "--trials", "0"), "argument --trials/--n-trials: 0", True),
    Case("trials-abc", (*COMMON, "--trials", "abc"), "argument --trials/--n-trials: 'abc' is not", True),
    Case("workers-0", (*COMMON, "--workers", "0"), "argument --workers: 0", True),
    Case("epochs-abc", (*COMMON, "--epochs", "abc"), "argument --epochs: 'abc' is not", True),
    Case("timeout-negative", (*COMMON, "--timeout", "-5"), "--timeout -5.0: must be more than 0 seconds"),
    Case("val-fraction", (*COMMON, "--val-fraction", "1.5"), "--val-fraction 1.5: must be between 0 and 1"),
    Case("storage-scheme", (*COMMON, "--storage", "foo://x"), "--storage foo://x: unknown scheme 'foo'"),
    Case("storage-not-a-url", (*COMMON, "--storage", "studies.db"), "--storage 'studies.db': not a storage URL"),
    Case("storage-folder", (*COMMON, "--storage", "sqlite:///studies"), "studies is a folder, not a SQLite file"),
    Case("storage-password", (*COMMON, "--storage", "postgresql://bob:hunter2@127.0.0.1:1/nope"),
         "postgresql://bob:***@127.0.0.1:1/nope", secret="hunter2"),
    Case("study-reused-other-space", ("--space", "other.yaml", "--no-progress", "--device", "cpu", "--trials", "1",
                                      "--sampler", "random", "--study", SHARED_STUDY),
         f"study '{SHARED_STUDY}' was made with space fingerprint"),
    Case("space-missing", ("--space", "missing.yaml", *COMMON[2:]), "--space missing.yaml: no built-in space of that name"),
    *[Case(f"space-{name.removesuffix('.yaml')}",
           ("--space", name, *COMMON[2:], *(("--sampler", "grid") if name == "huge_grid.yaml" else ())), says)
      for name, (_, says) in BAD_SPACES.items()],
    Case("data-missing", (*COMMON, "--data", "no_such_folder"), "no_such_folder: no such folder"),
    Case("data-is-a-file", (*COMMON, "--data", "tiny.yaml"), "tiny.yaml: is a file; --data needs a folder"),
    Case("data-one-class", (*COMMON, "--data", "one_class"), "one_class: only one class folder (cat)"),
]
# Every case but the huge grid runs against the shared store; that one gets a copy of its own,
# so a store it damages is told apart from one the others damage.
HUGE_GRID_CASE = "space-huge_grid"


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


def cli(cwd: Path, *argv: str, timeout: float = 120) -> Result:
    proc = subprocess.run([sys.executable, "-m", "catdog_hpo", "run", *argv], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def snapshot(db: Path) -> dict[str, Any]:
    """Everything a study store holds that a failed command could have changed."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{db}")
    try:
        out: dict[str, Any] = {}
        for summary in storage.get_all_studies():
            trials = storage.get_all_trials(summary._study_id, deepcopy=False)
            out[summary.study_name] = (
                summary.user_attrs,
                [(t.number, t.state, t.params, t.values, t.user_attrs, t.intermediate_values) for t in trials],
            )
        return out
    finally:
        storage.engine.dispose()


def integrity(db: Path) -> str:
    con = sqlite3.connect(db)
    try:
        return con.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        con.close()


def _copy_store(src: Path, dst: Path) -> None:
    """A consistent copy of a SQLite store (a plain file copy would miss its WAL file)."""
    a, b = sqlite3.connect(src), sqlite3.connect(dst)
    try:
        a.backup(b)
    finally:
        a.close()
        b.close()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the shared store (one study, one finished trial) and the bad inputs."""
    from catdog_hpo.data import DataSource
    from catdog_hpo.search.run import run
    from catdog_hpo.search.settings import RunSettings

    root = tmp_path_factory.mktemp("cli_errors")
    (root / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    other = _with_params({"optim.lr": {"float": [1e-4, 1e-3], "log": True}})
    (root / "other.yaml").write_text(yaml.safe_dump(other))
    for name, (content, _) in BAD_SPACES.items():
        (root / name).write_text(yaml.safe_dump(content))
    write_image_folder(root / "one_class", classes=("cat",), n_per_class=3, size=8, split=False)
    settings = RunSettings(
        study=SHARED_STUDY, storage=f"sqlite:///{root}/studies/catdog.db", space=str(root / "tiny.yaml"),
        sampler="random", pruner="none", trials=1, data=DataSource(name="synthetic", root="studies/datasets"),
        studies_dir=root / "studies", progress=False, heartbeat=2)
    assert run(settings) == 0
    (root / "huge").mkdir()
    _copy_store(root / "studies/catdog.db", root / "huge/catdog.db")
    return root


@pytest.fixture(scope="module")
def results(workdir: Path) -> dict[str, Result]:
    before = snapshot(workdir / "studies/catdog.db")
    assert list(before) == [SHARED_STUDY] and len(before[SHARED_STUDY][1]) == 1

    def one(case: Case) -> tuple[str, Result]:
        argv = case.argv
        if case.id == HUGE_GRID_CASE:
            argv = (*argv, "--storage", f"sqlite:///{workdir}/huge/catdog.db")
        return case.id, cli(workdir, *argv)

    with ThreadPoolExecutor(_PARALLEL) as pool:
        return dict(pool.map(one, CASES))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_exit_2(results: dict[str, Result], case: Case) -> None:
    r = results[case.id]
    assert r.code == 2, f"exit {r.code}\nstdout:\n{r.out}\nstderr:\n{r.err}"
    assert "Traceback" not in r.err and "Traceback" not in r.out
    lines = r.err.strip().splitlines()
    assert lines, "nothing on stderr"
    assert lines[-1].startswith("catdog-hpo run: error: "), lines[-1]
    assert case.says in lines[-1], lines[-1]
    if case.flag_error:
        assert lines[0].startswith("usage: catdog-hpo run")
    else:
        assert len(lines) == 1, f"more than the one error line on stderr:\n{r.err}"
    if case.secret is not None:
        assert case.secret not in r.err + r.out


def test_store_is_intact_after_every_bad_input(results: dict[str, Result], workdir: Path) -> None:
    """The failed commands neither changed the shared study nor left a half-made study behind."""
    db = workdir / "studies/catdog.db"
    assert integrity(db) == "ok"
    after = snapshot(db)
    assert list(after) == [SHARED_STUDY]
    study = optuna.load_study(study_name=SHARED_STUDY, storage=f"sqlite:///{db}")
    assert study.user_attrs["target_trials"] == 1 and study.user_attrs["sampler"] == "random"
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE]


def test_too_large_grid_leaves_no_study_behind(results: dict[str, Result], workdir: Path) -> None:
    """A refused grid must not leave a study in the store: a rerun of the same command would
    then find the study, take it for a grid study without a grid and run random trials."""
    db = workdir / "huge/catdog.db"
    assert results[HUGE_GRID_CASE].code == 2
    assert integrity(db) == "ok"
    assert list(snapshot(db)) == [SHARED_STUDY], "the refused grid study was created anyway"
    case = next(c for c in CASES if c.id == HUGE_GRID_CASE)
    again = cli(workdir, *case.argv, "--storage", f"sqlite:///{db}")
    assert again.code == 2 and case.says in again.err, f"the rerun ran instead:\n{again.out}"


def test_gpus_without_cuda_is_one_line(workdir: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: --gpus is valid")
    r = cli(workdir, "--space", "tiny.yaml", "--no-progress", "--trials", "1", "--gpus", "0,1")
    assert r.code == 2 and "Traceback" not in r.err
    assert r.err.strip().splitlines() == ["catdog-hpo run: error: --gpus 0,1: no GPU in use (--device auto)"]
