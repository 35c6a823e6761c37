"""Several machines on one study: separate `catdog-hpo run` processes, each in its own folder
(its own image cache, as on another host), sharing a PostgreSQL or MariaDB study store.

PostgreSQL: 127.0.0.1:5432, trust auth; MariaDB: 127.0.0.1:3306, root without a password. Each
test run creates a fresh database and drops it at the end. The tests skip, saying why, when a
server is down or its driver is missing.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from catdog_hpo.search.storage import open_storage
from catdog_hpo.search.study import count
from helpers import TINY_SPACE
from concurrent_open import open_at_once

pytestmark = pytest.mark.postgres

TINY = TINY_SPACE
GRID_SIZE = 6  # depth 1 or 2 (channels 8) x 3 learning rates
WAIT_S = 300  # the most one `run` may take here


def _reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


class Server:
    """A database server that hands out fresh databases and drops them at the end."""

    def __init__(self, connect: Callable[[], Any], url: str, drop_suffix: str = "") -> None:
        self._admin = connect()
        self._url = url  # with {name} for the database
        self._drop_suffix = drop_suffix
        self._made: list[str] = []

    def new_database(self, store: bool = True) -> str:
        """The URL of a new empty database; with ``store`` Optuna's tables are created in it
        first, as the first machine of a study would."""
        name = f"catdog_test_{uuid.uuid4().hex[:12]}"
        self._admin.cursor().execute(f"CREATE DATABASE {name}")
        self._made.append(name)
        url = self._url.format(name=name)
        if store:
            open_storage(url).engine.dispose()
        return url

    def close(self) -> None:
        for name in self._made:
            self._admin.cursor().execute(f"DROP DATABASE IF EXISTS {name}{self._drop_suffix}")
        self._admin.close()


@pytest.fixture(scope="module")
def postgres() -> Iterator[Server]:
    """PostgreSQL on 127.0.0.1:5432 (trust auth, user postgres)."""
    psycopg2 = pytest.importorskip("psycopg2", reason="psycopg2 is not installed (pip install psycopg2-binary)")
    if not _reachable(5432):
        pytest.skip("no PostgreSQL server on 127.0.0.1:5432")

    def connect() -> Any:
        admin = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")
        admin.autocommit = True  # CREATE/DROP DATABASE cannot run inside a transaction
        return admin

    server = Server(connect, "postgresql://postgres@127.0.0.1:5432/{name}", " WITH (FORCE)")
    yield server
    server.close()


@pytest.fixture(scope="module")
def mariadb() -> Iterator[Server]:
    """MariaDB (or MySQL) on 127.0.0.1:3306 (root, no password)."""
    pymysql = pytest.importorskip("pymysql", reason="pymysql is not installed (pip install pymysql)")
    if not _reachable(3306):
        pytest.skip("no MariaDB/MySQL server on 127.0.0.1:3306")

    def connect() -> Any:
        return pymysql.connect(host="127.0.0.1", port=3306, user="root", password="", autocommit=True)

    server = Server(connect, "mysql+pymysql://root@127.0.0.1:3306/{name}")
    yield server
    server.close()


def machines(tmp_path: Path, url: str, k: int, *args: str) -> list[tuple[int, str, str]]:
    """``k`` `catdog-hpo run` processes at once, each in its own folder, on study store ``url``."""
    procs = []
    for i in range(k):
        home = tmp_path / f"machine{i}"
        home.mkdir()
        (home / "tiny.yaml").write_text(yaml.safe_dump(TINY))
        cmd = [sys.executable, "-m", "catdog_hpo", "run", "--space", "tiny.yaml", "--dataset", "synthetic",
               "--storage", url, "--device", "cpu", "--no-progress", "--pruner", "none", "--heartbeat", "2", *args]
        out, err = open(home / "out.txt", "w"), open(home / "err.txt", "w")
        procs.append((subprocess.Popen(cmd, cwd=home, stdout=out, stderr=err), home))
        out.close(), err.close()
    results = []
    try:
        for proc, home in procs:
            code = proc.wait(timeout=WAIT_S)
            results.append((code, (home / "out.txt").read_text(), (home / "err.txt").read_text()))
    finally:
        for proc, _ in procs:  # none is left running when one hangs
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def check_runs(results: list[tuple[int, str, str]]) -> None:
    for code, out, err in results:
        assert code == 0, f"exit {code}\n{out}\n{err}"
        assert "Traceback" not in err


def params_key(t: optuna.trial.FrozenTrial) -> tuple:
    return tuple(sorted(t.params.items()))


def load(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(url, create=False))


def test_three_machines_share_a_grid_on_postgres(tmp_path: Path, postgres: Server) -> None:
    url = postgres.new_database()
    n = GRID_SIZE - 1  # stop one point short of the grid: the budget, not the grid, ends it
    check_runs(machines(tmp_path, url, 3, "--sampler", "grid", "--trials", str(n), "--study", "grid"))
    study = load(url, "grid")
    assert count(study) == (n, 0, 1)  # exactly N finished, one grid point left waiting
    done = [t for t in study.trials if t.state.is_finished()]
    assert len(done) == n and all(t.state == TrialState.COMPLETE for t in done)
    assert len({params_key(t) for t in done}) == n, "a grid point ran twice"
    assert study.user_attrs["grid_size"] == GRID_SIZE


def test_three_machines_stop_at_exactly_n_on_postgres(tmp_path: Path, postgres: Server) -> None:
    url = postgres.new_database()
    n = 5
    results = machines(tmp_path, url, 3, "--sampler", "random", "--trials", str(n), "--study", "random")
    check_runs(results)
    study = load(url, "random")
    assert count(study) == (n, 0, 0)
    assert len(study.trials) == n and all(t.state == TrialState.COMPLETE for t in study.trials)
    assert len({params_key(t) for t in study.trials}) == n  # the machines sampled different points
    assert all(f"done: {n}/{n} finished trials" in out for _, out, _ in results)


def test_two_machines_on_mariadb(tmp_path: Path, mariadb: Server) -> None:
    url = mariadb.new_database()
    n = 3
    check_runs(machines(tmp_path, url, 2, "--sampler", "grid", "--trials", str(n), "--study", "grid"))
    study = load(url, "grid")
    assert count(study) == (n, 0, GRID_SIZE - n)
    done = [t for t in study.trials if t.state.is_finished()]
    assert len(done) == n and all(t.state == TrialState.COMPLETE for t in done)
    assert len({params_key(t) for t in done}) == n


@pytest.mark.parametrize("server", ["postgres", "mariadb"])
def test_machines_opening_an_empty_database_at_once(tmp_path: Path, server: str,
                                                    request: pytest.FixtureRequest) -> None:
    """Several machines started together on a new, empty database all get the study store
    (each would otherwise race to create Optuna's tables, and all but one fail)."""
    url = request.getfixturevalue(server).new_database(store=False)
    outcomes = open_at_once(url, 4, tmp_path)
    assert outcomes == ["ok"] * 4
