"""`catdog-hpo dashboard` and the storage helpers under it: the server answers over HTTP while
another process writes the same SQLite file, warns when exposed, and never prints a password."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from catdog_hpo.cli import main
from catdog_hpo.view.dashboard import dashboard_url, exposure_warning, is_loopback
from catdog_hpo.errors import UserError
from catdog_hpo.search.storage import load_study, mask_password, open_storage
from study_factory import copy_store, demo_store, make_study

FACTORY = Path(__file__).with_name("study_factory.py")
START_TIMEOUT_S = 30  # the dashboard imports optuna and plotly before it listens


# --------------------------------------------------------------------------- helpers


def start_dashboard(tmp_path: Path, url: str, *extra: str) -> tuple[subprocess.Popen, str, Path]:
    """Start `catdog-hpo dashboard --port 0` and return (process, base URL, stderr file)."""
    err_path = tmp_path / f"dashboard-{time.monotonic_ns()}.err"
    with err_path.open("w") as err_file:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "catdog_hpo", "dashboard", "--storage", url, "--port", "0",
             "--artifacts", str(tmp_path / "studies" / "artifacts"), *extra],
            stdout=subprocess.PIPE, stderr=err_file, text=True, cwd=tmp_path,
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        m = re.search(r"open (http://\S+)/dashboard", line)
        if m:
            return proc, m.group(1), err_path
        if not line and proc.poll() is not None:
            break
    stop(proc)
    raise AssertionError(f"dashboard did not start: {err_path.read_text()}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def get(url: str, accept_encoding: str | None = "gzip, deflate") -> tuple[int, dict, bytes]:
    """GET ``url``; browsers always send Accept-Encoding, so we do too unless told not to."""
    req = urllib.request.Request(url)
    if accept_encoding is not None:
        req.add_header("Accept-Encoding", accept_encoding)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def get_json(url: str) -> dict:
    status, _, body = get(url)
    assert status == 200, (url, status, body[:300])
    return json.loads(body)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built once: study "demo" (11 trials, curve artifacts) in <dir>/studies."""
    root = tmp_path_factory.mktemp("template")
    demo_store(root)
    return root


@pytest.fixture()
def study_file(template: Path, tmp_path: Path) -> str:
    """A private copy of the template store in tmp_path/studies: its URL."""
    return copy_store(template, tmp_path)


# --------------------------------------------------------------------------- the server


def test_dashboard_serves_while_another_process_writes(tmp_path: Path, study_file: str) -> None:
    proc, base, err_path = start_dashboard(tmp_path, study_file)
    try:
        studies = get_json(f"{base}/api/studies")["study_summaries"]
        assert [s["study_name"] for s in studies] == ["demo"]
        study_id = studies[0]["study_id"]
        before = len(get_json(f"{base}/api/studies/{study_id}")["trials"])
        assert before == 11

        n_new = 8
        writer = subprocess.Popen([sys.executable, str(FACTORY), "write", study_file, "demo", str(n_new)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        polls = 0
        while writer.poll() is None:  # read as fast as we can while the other process commits
            get_json(f"{base}/api/studies/{study_id}")
            polls += 1
        out, err = writer.communicate()
        assert writer.returncode == 0, err
        assert f"wrote {n_new} trials" in out
        assert "locked" not in err.lower()
        assert polls >= 1

        # The dashboard caches trials for 2 s; poll until it sees every new trial.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            trials = get_json(f"{base}/api/studies/{study_id}")["trials"]
            if len(trials) == before + n_new:
                break
            time.sleep(0.5)
        assert len(trials) == before + n_new
        assert {t["state"] for t in trials} >= {"Complete", "Pruned", "Fail"}
    finally:
        stop(proc)
    err_text = err_path.read_text()
    assert "locked" not in err_text.lower() and "Traceback" not in err_text, err_text


def test_dashboard_pages_static_files_and_artifacts(tmp_path: Path, study_file: str) -> None:
    proc, base, err_path = start_dashboard(tmp_path, study_file)
    try:
        status, _, body = get(f"{base}/dashboard")
        assert status == 200 and b"<html" in body.lower()

        status, headers, _ = get(f"{base}/static/bundle.js", accept_encoding="gzip, deflate, br")
        assert status == 200 and headers.get("Content-Encoding") == "gzip"
        # optuna-dashboard alone answers 500 here; our wrapper serves the plain file.
        status, headers, body = get(f"{base}/static/bundle.js", accept_encoding=None)
        assert status == 200 and "Content-Encoding" not in headers and len(body) > 100_000

        study_id = get_json(f"{base}/api/studies")["study_summaries"][0]["study_id"]
        trials = get_json(f"{base}/api/studies/{study_id}")["trials"]
        complete = [t for t in trials if t["state"] == "Complete"]
        arts = complete[0]["artifacts"]
        assert sorted(a["filename"] for a in arts) == [f"trial_{complete[0]['number']}_curves.csv",
                                                       f"trial_{complete[0]['number']}_curves.svg"]
        svg = next(a for a in arts if a["filename"].endswith(".svg"))
        status, headers, body = get(f"{base}/artifacts/{study_id}/{complete[0]['trial_id']}/{svg['artifact_id']}")
        assert status == 200 and body.lstrip().startswith(b"<svg") and b"val accuracy" in body
        assert all(not t["artifacts"] for t in trials if t["state"] != "Complete")
    finally:
        stop(proc)
    assert "Traceback" not in err_path.read_text()


def test_dashboard_warns_when_bound_to_all_interfaces(tmp_path: Path, study_file: str) -> None:
    proc, base, err_path = start_dashboard(tmp_path, study_file, "--host", "0.0.0.0")
    try:
        assert base.startswith("http://0.0.0.0:")
        deadline = time.monotonic() + 5
        while "warning" not in err_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop(proc)
    err = err_path.read_text()
    assert "warning: --host 0.0.0.0" in err and "no login" in err


def test_default_host_prints_no_warning(tmp_path: Path, study_file: str) -> None:
    proc, base, err_path = start_dashboard(tmp_path, study_file)
    try:
        assert base.startswith("http://127.0.0.1:")
    finally:
        stop(proc)
    assert "warning" not in err_path.read_text()


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.3.2.1", True), ("localhost", True), ("::1", True), ("[::1]", True),
    ("0.0.0.0", False), ("::", False), ("192.168.1.5", False), ("example.org", False),
])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
    assert (exposure_warning(host, 8080) is None) is loopback


def test_dashboard_url_brackets_ipv6() -> None:
    assert dashboard_url("::1", 8080) == "http://[::1]:8080/dashboard"
    assert dashboard_url("127.0.0.1", 80) == "http://127.0.0.1:80/dashboard"


def test_dashboard_port_in_use_is_a_one_line_error(tmp_path: Path, study_file: str, capsys) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["dashboard", "--storage", study_file, "--port", str(port),
                     "--artifacts", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("catdog-hpo dashboard: error: --host 127.0.0.1 --port") and "\n" not in err


# --------------------------------------------------------------------------- passwords


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://user:secret@host/db", "postgresql://user:***@host/db"),
    ("postgresql+psycopg2://user:s3cr@t@host:5432/db", "postgresql+psycopg2://user:***@host:5432/db"),
    ("mysql+pymysql://u:pw@h/db?charset=utf8mb4", "mysql+pymysql://u:***@h/db?charset=utf8mb4"),
    ("postgresql://h/db?password=secret&sslmode=off", "postgresql://h/db?password=***&sslmode=off"),
    ("postgresql://user@host/db", "postgresql://user@host/db"),
    ("sqlite:///studies/catdog.db", "sqlite:///studies/catdog.db"),
])
def test_mask_password(url: str, shown: str) -> None:
    assert mask_password(url) == shown


@pytest.mark.parametrize("command", [["dashboard", "--port", "0"], ["studies"], ["show", "--study", "x"],
                                     ["report", "--study", "x"]])
def test_unreachable_store_error_masks_the_password(command: list[str], capsys) -> None:
    # Port 1 on loopback refuses at once: a quick, local "unreachable database".
    url = "postgresql://catdog:hunter2@127.0.0.1:1/studies"
    assert main([*command, "--storage", url]) == 2
    err = capsys.readouterr().err.strip()
    assert "hunter2" not in err and "catdog:***@127.0.0.1:1" in err and "\n" not in err


# --------------------------------------------------------------------------- open_storage


def test_open_storage_sqlite_is_wal_with_busy_timeout_and_creates_folder(tmp_path: Path) -> None:
    db = tmp_path / "new" / "deeper" / "s.db"
    storage = open_storage(f"sqlite:///{db}")
    assert db.is_file()
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with storage.engine.connect() as con:
        # busy_timeout is reported in milliseconds: our 60 s connect timeout.
        assert con.exec_driver_sql("PRAGMA busy_timeout").scalar() == 60_000
        assert con.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL: no fsync per commit


def test_open_storage_heartbeat_pass_through(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path}/h.db", heartbeat_interval=10, grace_period=30)
    assert (storage.heartbeat_interval, storage.grace_period) == (10, 30)
    with pytest.raises(UserError, match="heartbeat_interval"):
        open_storage(f"sqlite:///{tmp_path}/h.db", heartbeat_interval=0)


@pytest.mark.parametrize(("url", "message"), [
    ("studies/catdog.db", "not a storage URL"),
    ("nosuchdb://host/db", "unknown scheme 'nosuchdb'"),
    ("sqlite:////proc/no/such/dir/x.db", "cannot create folder"),
])
def test_open_storage_bad_urls(url: str, message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        open_storage(url)


def test_open_storage_refuses_a_folder_and_a_non_database(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="is a folder"):
        open_storage(f"sqlite:///{tmp_path}")
    junk = tmp_path / "junk.db"
    junk.write_text("this is not sqlite\n" * 100)
    with pytest.raises(UserError, match="junk.db"):
        open_storage(f"sqlite:///{junk}")


def test_open_storage_create_false_does_not_create(tmp_path: Path) -> None:
    db = tmp_path / "absent.db"
    with pytest.raises(UserError, match="no study store"):
        open_storage(f"sqlite:///{db}", create=False)
    assert not db.exists()


def test_load_study_unknown_name_lists_studies(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path}/s.db")
    make_study(storage, "alpha", n_complete=1, n_pruned=0, n_failed=0, n_rejected=0)
    make_study(storage, "beta", n_complete=1, n_pruned=0, n_failed=0, n_rejected=0)
    assert load_study(storage, "beta").study_name == "beta"
    with pytest.raises(UserError, match=r"no study named 'gamma' .*\(studies: alpha, beta\)"):
        load_study(storage, "gamma")
