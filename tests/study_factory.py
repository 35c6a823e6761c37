"""Build realistic Optuna studies for tests, shaped as `catdog-hpo run` writes them.

A study from ``make_study`` has the study user attrs of notes/conventions.md and trials of every
kind `run` produces: completed trials (per-epoch intermediate values, history, cost attrs,
training-curve artifacts when a store is given), pruned trials (stopped early), failed trials
(``fail_reason``), rejected trials (PRUNED, no intermediate values, ``rejected``) and optionally
running ones. Values are simulated from the parameters (no training), deterministic per seed.

Also a script, so a test can write to a store from another process:
    python tests/study_factory.py write URL STUDY N_TRIALS
"""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a script

from catdog_hpo.config import ModelConfig, OptimConfig, TrainConfig, TrialConfig, to_dict  # noqa: E402
from catdog_hpo.search.storage import open_storage  # noqa: E402

if TYPE_CHECKING:
    from catdog_hpo.search.settings import RunSettings

def run_settings(workdir: Path, **kw: object) -> "RunSettings":
    """Settings for ``search.run.run`` on the tiny space in ``workdir`` (tests' fixtures write
    ``tiny.yaml``): a SQLite store under ``workdir/studies``, synthetic data, no progress output."""
    from catdog_hpo.data import DataSource
    from catdog_hpo.search.settings import RunSettings

    base: dict[str, object] = dict(
        study="s", storage=f"sqlite:///{workdir}/studies/t.db", space=str(workdir / "tiny.yaml"),
        sampler="random", pruner="none", trials=3, data=DataSource(name="synthetic"),
        studies_dir=workdir / "studies", progress=False, heartbeat=2)
    base.update(kw)
    return RunSettings(**base)  # type: ignore[arg-type]


def load_run_study(s: "RunSettings") -> optuna.Study:
    return optuna.load_study(study_name=s.study, storage=s.storage)


# The factory's search space: names shaped like the real spaces' ("group.field").
DISTRIBUTIONS = {
    "optim.name": CategoricalDistribution(["sgd", "adam", "adamw"]),
    "optim.lr": FloatDistribution(1e-4, 1e-1, log=True),
    "model.width": IntDistribution(16, 128, step=16),
    "model.dropout": FloatDistribution(0.0, 0.5),
    "augment.flip": CategoricalDistribution([True, False]),
}

STUDY_ATTRS = {
    "space": "seed-cnn",
    "space_fingerprint": "f00dfeed",
    "pruner": "median",
    "data": "dataset:synthetic",
    "data_fingerprint": "0123abcd",
    "target_trials": 20,
    "seed": 0,
    "epochs": None,
    "catdog_hpo_version": "0.1.0",
}

FAIL_REASON = "non-finite loss at epoch 2 (lr too high)"
REJECT_REASON = "cost guard: 3.1 GFLOPs per image > limit 1.0"


def make_study(
    storage: Any,
    name: str = "demo",
    *,
    sampler: str = "tpe",
    n_complete: int = 6,
    n_pruned: int = 3,
    n_failed: int = 1,
    n_rejected: int = 1,
    n_running: int = 0,
    epochs: int = 4,
    seed: int = 0,
    store: Any = None,
) -> optuna.Study:
    """A new study ``name`` in ``storage`` (a URL or an Optuna storage) with the trials asked for.

    With ``store`` (an artifact store), completed trials get their training-curve artifacts.
    """
    if isinstance(storage, str):
        storage = open_storage(storage)
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        direction="maximize",
        sampler=optuna.samplers.RandomSampler(seed=seed),
    )
    for key, value in {**STUDY_ATTRS, "sampler": sampler, "seed": seed}.items():
        study.set_user_attr(key, value)
    add_trials(study, n_complete=n_complete, n_pruned=n_pruned, n_failed=n_failed,
               n_rejected=n_rejected, n_running=n_running, epochs=epochs, seed=seed, store=store)
    return study


def demo_store(root: Path, name: str = "demo", **kwargs: Any) -> str:
    """Build study ``name`` with curve artifacts in ``root/studies``; returns the store URL.

    The store is settled (one .db file, artifacts beside it) so ``copy_store`` can clone it.
    """
    from catdog_hpo.search.artifacts import artifact_store

    db = Path(root) / "studies" / "catdog.db"
    make_study(f"sqlite:///{db}", name, store=artifact_store(db.parent), **kwargs)
    settle(db)
    return f"sqlite:///{db}"


def copy_store(template_root: Path, root: Path) -> str:
    """Clone ``template_root/studies`` (from ``demo_store``) into ``root/studies``; returns its URL."""
    import shutil

    src, dst = Path(template_root) / "studies", Path(root) / "studies"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*-wal", "*-shm"))
    return f"sqlite:///{dst / 'catdog.db'}"


def settle(db_path: Path) -> None:
    """Fold SQLite's WAL into the main file of the store at ``db_path``.

    After this the .db file alone holds the whole store, so a test can copy it as a template.
    """
    import sqlite3

    con = sqlite3.connect(db_path, timeout=60)
    try:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        con.close()


def add_trials(
    study: optuna.Study,
    *,
    n_complete: int = 0,
    n_pruned: int = 0,
    n_failed: int = 0,
    n_rejected: int = 0,
    n_running: int = 0,
    epochs: int = 4,
    seed: int = 0,
    store: Any = None,
) -> None:
    """Append trials to ``study``, interleaving kinds the way a real search mixes them."""
    rng = random.Random(seed * 7919 + len(study.trials))
    kinds = (["complete"] * n_complete + ["pruned"] * n_pruned + ["failed"] * n_failed
             + ["rejected"] * n_rejected)
    rng.shuffle(kinds)
    if kinds and n_complete:
        kinds.remove("complete")
        kinds.insert(0, "complete")  # a completed trial first: the search has a best from the start
    for kind in kinds:
        _add_trial(study, kind, epochs, rng, store)
    for _ in range(n_running):
        trial = study.ask(DISTRIBUTIONS)
        trial.report(0.55, 1)  # one epoch in


def _add_trial(study: optuna.Study, kind: str, epochs: int, rng: random.Random, store: Any) -> None:
    trial = study.ask(DISTRIBUTIONS)
    p = trial.params
    cfg = TrialConfig(
        image_size=32,
        model=ModelConfig(dropout=p["model.dropout"]),
        optim=OptimConfig(name=p["optim.name"], lr=p["optim.lr"]),
        train=TrainConfig(epochs=epochs),
    )
    trial.set_user_attr("config", to_dict(cfg))
    n_params = 1000 * p["model.width"] * 3 + 2
    trial.set_user_attr("n_params", n_params)
    trial.set_user_attr("flops", 40 * n_params)
    trial.set_user_attr("device", "cpu")
    if kind == "rejected":
        trial.set_user_attr("rejected", REJECT_REASON)
        study.tell(trial, state=TrialState.PRUNED)
        return
    final = _final_accuracy(p, rng)
    run_epochs = {"complete": epochs, "pruned": max(1, epochs // 2), "failed": 2}[kind]
    history = []
    for epoch in range(1, run_epochs + 1):
        acc = 0.5 + (final - 0.5) * (1.0 - math.exp(-epoch / 1.5))
        loss = 0.7 - 0.5 * (acc - 0.5) + rng.uniform(0, 0.02)
        if kind == "failed" and epoch == run_epochs:
            loss = float("nan")
        history.append({"epoch": epoch, "train_loss": round(loss - 0.03, 4), "val_loss": loss,
                        "val_acc": round(acc, 4), "seconds": 1.5 + rng.random(), "lr": p["optim.lr"]})
        if kind != "failed" or epoch < run_epochs:
            trial.report(history[-1]["val_acc"], epoch)
    trial.set_user_attr("history", history)
    trial.set_user_attr("epochs_run", run_epochs)
    trial.set_user_attr("sec_per_epoch", sum(h["seconds"] for h in history) / run_epochs)
    accs = [h["val_acc"] for h in history]
    trial.set_user_attr("best_epoch", 1 + accs.index(max(accs)))
    if kind == "failed":
        trial.set_user_attr("fail_reason", FAIL_REASON)
        study.tell(trial, state=TrialState.FAIL)
    elif kind == "pruned":
        study.tell(trial, state=TrialState.PRUNED)
    else:
        if store is not None:
            from catdog_hpo.search.artifacts import upload_training_curves

            upload_training_curves(study, trial, history, store)
        study.tell(trial, max(accs))


def _final_accuracy(p: dict, rng: random.Random) -> float:
    """A plausible final accuracy: best near lr 3e-3, better with width, some noise."""
    lr_term = math.exp(-((math.log10(p["optim.lr"]) + 2.5) ** 2))  # 1 at lr = 10^-2.5
    width_term = p["model.width"] / 128
    return min(0.98, 0.55 + 0.25 * lr_term + 0.1 * width_term + rng.uniform(0, 0.05))


def _main(argv: list[str]) -> int:
    """``write URL STUDY N``: add N completed trials, one commit burst each (another process)."""
    if len(argv) != 4 or argv[0] != "write":
        print(__doc__, file=sys.stderr)
        return 2
    url, name, n = argv[1], argv[2], int(argv[3])
    storage = open_storage(url)
    study = optuna.load_study(study_name=name, storage=storage,
                              sampler=optuna.samplers.RandomSampler(seed=1))
    for i in range(n):
        add_trials(study, n_complete=1, epochs=3, seed=i + 1)
    print(f"wrote {n} trials", flush=True)
    return 0


if __name__ == "__main__":
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    raise SystemExit(_main(sys.argv[1:]))
