"""Study-store throughput: trials per second and storage overhead per trial, by backend and workers.

Each worker process runs `catdog-hpo run`'s storage path with a trivial objective (no training):
``open_run_storage`` (``open_storage``: SQLite in WAL mode with a 60 s busy timeout; heartbeats
with the retry callback), ``claim_trial`` (stale-trial check, the study-wide lock, the budget
count, ``ask``), a heartbeat thread, then what ``run_trial`` writes for an E-epoch trial: three
suggestions, four attributes, E x (report + should_prune), four more attributes, ``tell``.

- seconds: from the moment every worker is ready (start-up not counted) to the last ``tell``.
- ms overhead/trial: wall time per trial per worker (seconds x workers / finished trials) minus
  the objective's own time per trial (``--work-ms`` per epoch of simulated training, 0 by
  default): the time a worker spends in the store and waiting on the other workers.
- lost: trials claimed and never closed (left RUNNING) or a budget not reached; FAIL: trials
  closed as failed (a storage error in the middle of one); locked: "database is locked" errors.

Backends: SQLite as `run` opens it, and "sqlite-default" (what Optuna gives a plain
``sqlite:///`` URL: rollback journal, 5 s busy timeout) for comparison; PostgreSQL on
127.0.0.1:5432 and MariaDB on 127.0.0.1:3306 when they answer (a fresh database each, dropped
afterwards); Redis on 127.0.0.1:6379 (``redis://``, a fresh key prefix each, deleted afterwards);
"grpc-postgres": a fresh PostgreSQL database served by ``catdog-hpo storage-proxy`` (a subprocess
on a free port), the workers on ``grpc://``. Workers are forked after the imports (spawned for
gRPC, whose channels must not cross a fork; the barrier still keeps start-up out of the time).

Run: .venv/bin/python bench/storage.py [--trials 200] [--workers 1 4 8] [--epochs 3]
     [--backends sqlite sqlite-default postgres mariadb redis grpc-postgres] [--work-ms 0]
     [--wide-workers 16] (more worker counts for postgres and grpc-postgres only)
PostgreSQL directly vs through the proxy, 16 workers only:
     .venv/bin/python bench/storage.py --backends postgres grpc-postgres --workers 16 --wide-workers
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import re
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from catdog_hpo.data import DataSource  # noqa: E402
from catdog_hpo.search import optuna_compat  # noqa: E402
from catdog_hpo.search.storage import open_storage  # noqa: E402
from catdog_hpo.search.settings import RunSettings  # noqa: E402
from catdog_hpo.search.study import Claim, claim_trial, open_run_storage  # noqa: E402

STUDY = "bench"
HEARTBEAT_S = 10  # `run`'s default --heartbeat
_POLL_S = 0.02  # seconds between claims while the budget is full (`run` waits 1 s; see below)


@dataclass
class WorkerResult:
    finished: int = 0
    failed: int = 0
    locked: int = 0  # "database is locked" errors
    other_errors: list[str] = field(default_factory=list)
    own_s: float = 0.0  # the objective's own (simulated training) time
    last_tell: float = 0.0  # time.time() of the last tell


# --------------------------------------------------------------------------- the worker


def fake_trial(trial: optuna.Trial, epochs: int, work_s: float) -> tuple[float, float]:
    """What run_trial writes for a real trial; returns (value, own seconds)."""
    depth = trial.suggest_int("depth", 1, 3)
    channels = trial.suggest_categorical("block0.channels", [8, 16, 32])
    lr = trial.suggest_float("optim.lr", 1e-4, 1e-1, log=True)
    config = {"image_size": 32, "model": {"family": "cnn", "blocks": [{"channels": channels}] * depth},
              "optim": {"name": "adam", "lr": lr}, "train": {"epochs": epochs, "seed": 0}}
    trial.set_user_attr("config", config)
    trial.set_user_attr("n_params", 1000 * depth * channels)
    trial.set_user_attr("flops", 100_000 * depth * channels)
    trial.set_user_attr("device", "cpu")
    history, own = [], 0.0
    for epoch in range(1, epochs + 1):
        t = time.perf_counter()
        if work_s:
            time.sleep(work_s)  # stands in for an epoch of training
        own += time.perf_counter() - t
        acc = min(1.0, 0.5 + 0.1 * epoch * lr ** 0.1)
        history.append({"epoch": epoch, "train_loss": 1.0 / epoch, "val_loss": 1.0 / epoch,
                        "val_acc": acc, "seconds": work_s, "lr": lr})
        trial.report(acc, epoch)
        trial.should_prune()
    trial.set_user_attr("history", history)
    trial.set_user_attr("epochs_run", epochs)
    trial.set_user_attr("sec_per_epoch", work_s)
    trial.set_user_attr("best_epoch", epochs)
    return history[-1]["val_acc"], own


def open_plain_sqlite(url: str) -> Any:
    """What Optuna makes of a plain sqlite:/// URL (no WAL, default busy timeout), with `run`'s
    heartbeat settings."""
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)
    return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=3 * HEARTBEAT_S,
                                      heartbeat_stale_trial_callback=retry)


def worker(url: str, plain: bool, trials: int, epochs: int, work_s: float, seed: int,
           barrier: Any, results: Any) -> None:
    out = WorkerResult()
    settings = RunSettings(study=STUDY, storage=url, space="bench", sampler="random", pruner="none",
                           trials=trials, data=DataSource(name="synthetic"), heartbeat=HEARTBEAT_S)
    try:
        storage = open_plain_sqlite(url) if plain else open_run_storage(url, HEARTBEAT_S)
        study = optuna.load_study(study_name=STUDY, storage=storage,
                                  sampler=optuna.samplers.RandomSampler(seed=seed))
    except Exception as exc:  # noqa: BLE001 (reported in the table, not raised)
        barrier.wait()
        out.other_errors.append(f"open: {type(exc).__name__}: {str(exc).splitlines()[0]}")
        results.put(out)
        return
    barrier.wait()
    while True:
        try:
            trial = claim_trial(study, storage, settings, 0)
        except Exception as exc:  # noqa: BLE001
            _count_error(out, exc, "claim")
            time.sleep(_POLL_S)
            continue
        if trial is Claim.DONE:
            break
        if trial is Claim.WAIT:  # others hold the last places; one may fail and free its place
            time.sleep(_POLL_S)
            continue
        try:
            with optuna_compat.heartbeat_thread(trial, storage):
                value, own = fake_trial(trial, epochs, work_s)
                out.own_s += own
                study.tell(trial, value)
            out.finished += 1
            out.last_tell = time.time()
        except Exception as exc:  # noqa: BLE001
            _count_error(out, exc, "trial")
            try:
                study.tell(trial, state=TrialState.FAIL)
                out.failed += 1
            except Exception as again:  # noqa: BLE001 (the trial stays RUNNING: counted as lost)
                _count_error(out, again, "tell FAIL")
    results.put(out)


def _count_error(out: WorkerResult, exc: BaseException, where: str) -> None:
    if "database is locked" in str(exc):
        out.locked += 1
    else:
        out.other_errors.append(f"{where}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")


# --------------------------------------------------------------------------- one measurement


@dataclass
class Row:
    backend: str
    workers: int
    trials: int
    seconds: float
    finished: int
    overhead_ms: float
    lost: int
    failed: int
    locked: int
    errors: list[str]


def measure(backend: str, url: str, workers: int, trials: int, epochs: int, work_s: float) -> Row:
    plain = backend == "sqlite-default"
    setup = open_plain_sqlite(url) if plain else open_storage(url)
    optuna.create_study(study_name=STUDY, storage=setup, direction="maximize")
    _close(setup)  # no connection may cross the fork
    # Forked after the imports: worker start-up is not what is measured (the barrier keeps it out
    # for spawned gRPC workers too: gRPC's channels do not survive a fork).
    ctx = mp.get_context("spawn" if url.startswith("grpc://") else "fork")
    barrier, results = ctx.Barrier(workers + 1), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(url, plain, trials, epochs, work_s, i, barrier, results))
             for i in range(workers)]
    for p in procs:
        p.start()
    barrier.wait()
    t0 = time.time()
    outs = [results.get() for _ in procs]
    for p in procs:
        p.join()
    check = open_plain_sqlite(url) if plain else open_storage(url)
    states = [t.state for t in optuna.load_study(study_name=STUDY, storage=check).get_trials(deepcopy=False)]
    _close(check)
    finished = sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states)
    seconds = max((o.last_tell for o in outs), default=t0) - t0
    own_per_trial = sum(o.own_s for o in outs) / max(finished, 1)
    overhead = seconds * workers / max(finished, 1) - own_per_trial
    lost = states.count(TrialState.RUNNING) + max(0, trials - finished)
    return Row(backend, workers, trials, seconds, finished, overhead * 1000, lost,
               states.count(TrialState.FAIL), sum(o.locked for o in outs),
               [e for o in outs for e in o.other_errors])


def _close(storage: Any) -> None:
    """Drop ``storage``'s connections: an RDB engine's pool, a gRPC channel (Redis: none kept)."""
    if hasattr(storage, "engine"):
        storage.engine.dispose()
    elif hasattr(storage, "close"):
        storage.close()


# --------------------------------------------------------------------------- backends


def _reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


class Backend:
    """Fresh stores of one kind: ``new()`` -> URL; ``close()`` removes them all."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._dir = Path(tempfile.mkdtemp(prefix="catdog-bench-storage-"))
        self._dbs: list[str] = []
        self._prefixes: list[str] = []
        self._proxies: list[subprocess.Popen] = []
        self._admin: Any = None
        if name in ("postgres", "grpc-postgres"):
            import psycopg2

            self._admin = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")
            self._admin.autocommit = True
        elif name == "mariadb":
            import pymysql

            self._admin = pymysql.connect(host="127.0.0.1", port=3306, user="root", password="", autocommit=True)

    def new(self) -> str:
        name = f"catdog_bench_{uuid.uuid4().hex[:10]}"
        if self.name.startswith("sqlite"):
            return f"sqlite:///{self._dir}/{name}.db"
        if self.name == "redis":
            self._prefixes.append(name)
            return f"redis://127.0.0.1:6379/0?prefix={name}"
        self._admin.cursor().execute(f"CREATE DATABASE {name}")
        self._dbs.append(name)
        if self.name == "postgres":
            return f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
        if self.name == "grpc-postgres":
            return self._proxy(f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}")
        return f"mysql+pymysql://root@127.0.0.1:3306/{name}"

    def _proxy(self, url: str) -> str:
        """`catdog-hpo storage-proxy` for ``url`` on a free port; its grpc:// URL."""
        proc = subprocess.Popen([sys.executable, "-m", "catdog_hpo", "storage-proxy", "--storage", url, "--port", "0"],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._proxies.append(proc)
        line = proc.stdout.readline()  # its first line says where the workers connect
        found = re.search(r"--storage (grpc://\S+)", line)
        if found is None:
            raise RuntimeError(f"storage-proxy did not start: {line}")
        return found.group(1)

    def close(self) -> None:
        for proc in self._proxies:
            proc.terminate()
            proc.wait(timeout=30)
        if self._prefixes:
            import redis

            client = redis.Redis(host="127.0.0.1", port=6379)
            for prefix in self._prefixes:
                keys = list(client.scan_iter(f"{prefix}*"))
                if keys:
                    client.delete(*keys)
        force = " WITH (FORCE)" if self.name in ("postgres", "grpc-postgres") else ""
        for name in self._dbs:
            self._admin.cursor().execute(f"DROP DATABASE IF EXISTS {name}{force}")
        if self._admin is not None:
            self._admin.close()
        shutil.rmtree(self._dir, ignore_errors=True)


def available(name: str) -> str | None:
    """None when ``name`` can be measured here, else why not."""
    if name == "postgres":
        if not _reachable(5432):
            return "no server on 127.0.0.1:5432"
        return None if _importable("psycopg2") else "psycopg2 not installed"
    if name == "mariadb":
        if not _reachable(3306):
            return "no server on 127.0.0.1:3306"
        return None if _importable("pymysql") else "pymysql not installed"
    if name == "redis":
        if not _reachable(6379):
            return "no server on 127.0.0.1:6379"
        return None if _importable("redis") else "redis not installed (the [redis] extra)"
    if name == "grpc-postgres":
        return available("postgres") or (None if _importable("grpc") else "grpcio not installed (the [grpc] extra)")
    return None


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# --------------------------------------------------------------------------- main


def table(rows: list[Row]) -> str:
    lines = ["| backend | workers | trials | seconds | trials/s | ms overhead/trial | lost | FAIL | \"database is locked\" |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        rate = r.finished / r.seconds if r.seconds > 0 else float("nan")
        lines.append(f"| {r.backend} | {r.workers} | {r.finished}/{r.trials} | {r.seconds:.1f} | {rate:.1f} | "
                     f"{r.overhead_ms:.0f} | {r.lost} | {r.failed} | {r.locked} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=200, help="finished trials per measurement (default: 200)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 4, 8], help="worker counts (default: 1 4 8)")
    p.add_argument("--epochs", type=int, default=3, help="reports per trial (default: 3)")
    p.add_argument("--work-ms", type=float, default=0.0, help="simulated training per epoch, ms (default: 0)")
    p.add_argument("--backends", nargs="+",
                   default=["sqlite", "postgres", "mariadb", "redis", "grpc-postgres", "sqlite-default"],
                   choices=["sqlite", "sqlite-default", "postgres", "mariadb", "redis", "grpc-postgres"])
    p.add_argument("--default-workers", type=int, nargs="+", default=[8],
                   help="worker counts for sqlite-default (default: 8)")
    p.add_argument("--wide-workers", type=int, nargs="*", default=[16],
                   help="more worker counts for postgres and grpc-postgres only: PostgreSQL directly vs "
                   "through the proxy (default: 16)")
    args = p.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    rows: list[Row] = []
    for name in args.backends:
        why = available(name)
        if why is not None:
            print(f"{name}: skipped ({why})", flush=True)
            continue
        backend = Backend(name)
        try:
            counts = args.default_workers if name == "sqlite-default" else args.workers
            if name in ("postgres", "grpc-postgres"):
                counts = counts + [w for w in args.wide_workers if w not in counts]
            for workers in counts:
                row = measure(name, backend.new(), workers, args.trials, args.epochs, args.work_ms / 1000)
                rows.append(row)
                print(f"{name} x{workers}: {row.finished}/{row.trials} trials in {row.seconds:.1f} s"
                      + (f"; errors: {row.errors[:3]}" if row.errors else ""), flush=True)
        finally:
            backend.close()
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
