"""Stores for more workers (issue 26): Redis (``--storage redis://``) and the gRPC storage proxy
(``catdog-hpo storage-proxy`` + ``--storage grpc://``): exactly N trials from two workers, the study
lock, heartbeats, and one-line errors for bad URLs and missing extras.

Redis: 127.0.0.1:6379 (each test store under its own ``?prefix=``, its keys deleted afterwards);
the Redis tests skip, saying why, when the server or the redis package is missing. The proxy tests
serve a SQLite file and skip when grpcio is missing.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from catdog_hpo.cli import main
from catdog_hpo.search.locks import study_lock
from catdog_hpo.search.storage import open_storage
from catdog_hpo.search.study import count
from helpers import TINY_SPACE, one_line_error

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
N = 4


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPTUNA_STORAGE", raising=False)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY_SPACE))
    return tmp_path


def two_workers_reach_exactly_n(workdir: Path, url: str) -> None:
    """Two `run` processes on ``url`` at once: exactly N finished trials, none failed or extra."""
    # The images are decoded once first, so both workers start on the cache at the same moment.
    assert main(["run", "--space", "tiny.yaml", "--trials", "1", "--study", "warm", "--storage",
                 str(workdir / "warm.log"), "--no-progress"]) == 0
    command = [sys.executable, "-m", "catdog_hpo", "run", "--space", "tiny.yaml", "--sampler", "random",
               "--pruner", "none", "--trials", str(N), "--study", "s", "--storage", url,
               "--no-progress", "--heartbeat", "2"]
    procs = [subprocess.Popen(command, cwd=workdir, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    study = optuna.load_study(study_name="s", storage=open_storage(url, create=False))
    assert count(study) == (N, 0, 0)
    assert sorted(t.number for t in study.trials) == list(range(N))  # no extra trial, none failed
    assert all(f"done: {N}/{N} finished trials" in out for out in outs), outs


# --------------------------------------------------------------------------- Redis


@pytest.fixture()
def redis_url() -> Iterator[str]:
    """A fresh store on the Redis at 127.0.0.1:6379 (its own key prefix, deleted afterwards)."""
    redis = pytest.importorskip("redis", reason="redis is not installed (pip install 'catdog-hpo[redis]')")
    client = redis.Redis(host="127.0.0.1", port=6379)
    try:
        client.ping()
    except redis.exceptions.RedisError:
        pytest.skip("no Redis server on 127.0.0.1:6379")
    prefix = f"catdog-test-{uuid.uuid4().hex[:10]}"
    yield f"redis://127.0.0.1:6379/0?prefix={prefix}"
    keys = list(client.scan_iter(f"{prefix}*"))
    if keys:
        client.delete(*keys)


def test_redis_two_workers_reach_exactly_n(workdir: Path, redis_url: str) -> None:
    two_workers_reach_exactly_n(workdir, redis_url)


def test_redis_heartbeat_fails_a_silent_trial_and_lock_excludes(redis_url: str) -> None:
    storage = open_storage(redis_url, heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(study_name="hb", storage=storage)
    alive, dead = study.ask(), study.ask()
    storage.record_heartbeat(alive._trial_id)
    storage.record_heartbeat(dead._trial_id)
    now = int(storage._redis.time()[0])
    storage._redis.hset(storage._beats_key, str(dead._trial_id), now - 60)  # its worker died a minute ago
    optuna.storages.fail_stale_trials(study)
    assert {t.number: t.state for t in study.get_trials()} == {alive.number: TrialState.RUNNING,
                                                               dead.number: TrialState.FAIL}
    other = open_storage(redis_url)
    with study_lock(storage, redis_url, "hb"):
        assert not other._redis.lock(f"{other._lock_key}hb").acquire(blocking=False)
    with study_lock(other, redis_url, "hb"):  # released: the next holder gets it at once
        pass


# --------------------------------------------------------------------------- the gRPC storage proxy


class Proxy:
    """`catdog-hpo storage-proxy` on a free port, as a subprocess."""

    def __init__(self, storage: str, cwd: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "catdog_hpo", "storage-proxy", "--storage", storage,
                                      "--port", "0"], cwd=cwd, env=ENV, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        line = self.proc.stdout.readline()  # its first line says where it listens
        found = re.search(r"--storage (grpc://127\.0\.0\.1:\d+)", line)
        if found is None:
            self.proc.kill()
            raise AssertionError(f"storage-proxy did not start: {line}{self.proc.stdout.read()}")
        self.url = found.group(1)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    pytest.importorskip("grpc", reason="grpcio is not installed (pip install 'catdog-hpo[grpc]')")
    home = tmp_path_factory.mktemp("proxy")
    server = Proxy(f"sqlite:///{home}/proxied.db", home)
    yield server
    server.stop()


def test_grpc_proxy_two_workers_reach_exactly_n(workdir: Path, proxy: Proxy) -> None:
    two_workers_reach_exactly_n(workdir, proxy.url)


def test_grpc_heartbeat_fails_a_silent_trial(proxy: Proxy) -> None:
    storage = open_storage(proxy.url, heartbeat_interval=1, grace_period=1)
    study = optuna.create_study(study_name=f"hb-{uuid.uuid4().hex[:6]}", storage=storage)
    alive, dead = study.ask(), study.ask()
    storage.record_heartbeat(dead._trial_id)
    time.sleep(2.5)  # ages come from the database's clock: wait past the grace period
    storage.record_heartbeat(alive._trial_id)
    optuna.storages.fail_stale_trials(study)
    assert {t.number: t.state for t in study.get_trials()} == {alive.number: TrialState.RUNNING,
                                                               dead.number: TrialState.FAIL}


HOLD_AND_DIE = """
import sys, time
from catdog_hpo.search.storage import open_storage
from catdog_hpo.search.locks import study_lock
storage = open_storage(sys.argv[1])
with study_lock(storage, sys.argv[1], "locked"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_grpc_study_lock_excludes_and_a_killed_holder_frees_it(proxy: Proxy) -> None:
    first, second = open_storage(proxy.url), open_storage(proxy.url)
    got: list[float] = []
    with study_lock(first, proxy.url, "locked"):
        waiter = threading.Thread(target=lambda: (study_lock(second, proxy.url, "locked").__enter__(),
                                                  got.append(time.time())))
        waiter.start()
        time.sleep(0.5)
        assert not got, "two holders of one study lock"
        released = time.time()
    waiter.join(timeout=10)
    assert got and got[0] - released < 2
    # The waiter's hold never ended (entered by hand): end it by closing its channel, as a dying process does.
    second._own[1].close()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_AND_DIE, proxy.url], env=ENV, stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()  # SIGKILL while holding: the proxy sees the connection drop and frees the lock
    holder.wait()
    t = time.time()
    with study_lock(first, proxy.url, "locked"):
        assert time.time() - t < 10


# --------------------------------------------------------------------------- one-line errors


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("url, says", [
    ("redis://127.0.0.1:notaport/0", "cannot parse it"),
    ("redis://127.0.0.1:6379/abc", "the database after the port must be a number"),
    ("redis:///0", "name the Redis server"),
    ("grpc://127.0.0.1", "expected grpc://HOST:PORT"),
    ("grpc://127.0.0.1:13000/db", "expected grpc://HOST:PORT"),
    ("grpc://127.0.0.1:{closed}", "no storage proxy answers at 127.0.0.1:{closed}"),
    ("nosuch://x", "unknown scheme 'nosuch' (use sqlite, postgresql, mysql, journal, redis, rediss, grpc)"),
])
def test_bad_store_urls_are_one_line_errors_naming_the_value(workdir: Path, capsys: pytest.CaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch, url: str, says: str) -> None:
    from catdog_hpo.search import grpc_store

    monkeypatch.setattr(grpc_store, "_CONNECT_S", 1)
    closed = _closed_port()
    url, says = url.format(closed=closed), says.format(closed=closed)
    assert main(["studies", "--storage", url]) == 2
    err = one_line_error(capsys)
    assert url in err and says in err, err


@pytest.mark.parametrize("module, url, extra", [
    ("redis", "redis://127.0.0.1:6379/0", "[redis]"),
    ("grpc", "grpc://127.0.0.1:13000", "[grpc]"),
])
def test_a_missing_extra_is_one_line_naming_it(workdir: Path, capsys: pytest.CaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch, module: str, url: str, extra: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # import fails as when not installed
    assert main(["studies", "--storage", url]) == 2
    assert f"pip install 'catdog-hpo{extra}'" in one_line_error(capsys)
    if module == "grpc":
        assert main(["storage-proxy", "--storage", "sqlite:///x.db", "--port", "0"]) == 2
        assert "catdog-hpo[grpc]" in one_line_error(capsys)


@pytest.mark.parametrize("url", ["studies/x.log", "redis://127.0.0.1:6379/0", "grpc://127.0.0.1:13000"])
def test_storage_proxy_serves_database_stores_only(workdir: Path, capsys: pytest.CaptureFixture, url: str) -> None:
    pytest.importorskip("grpc")
    assert main(["storage-proxy", "--storage", url, "--port", "0"]) == 2
    err = one_line_error(capsys)
    assert url in err and "serves a database store" in err
