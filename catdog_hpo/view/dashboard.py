"""Serve optuna-dashboard on the study store, with the training-curve artifacts.

A threaded WSGI server (the standard library's, as optuna-dashboard's own CLI uses) runs the
dashboard's WSGI app on a storage from ``open_storage``, so SQLite reads go through WAL with a
busy timeout and never clash with a `run` writing the same file.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any, TextIO
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from catdog_hpo.errors import UserError
from catdog_hpo.search.storage import mask_password, open_storage

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080


def is_loopback(host: str) -> bool:
    """True when ``host`` only accepts connections from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to a public address, so treat it as exposed


def exposure_warning(host: str, port: int) -> str | None:
    """The warning to print for a non-loopback ``host``, else None."""
    if is_loopback(host):
        return None
    return (f"warning: --host {host} makes the dashboard reachable from other machines on port {port}; "
            "it has no login, and anyone who reaches it can read, rename and delete your studies")


def serve_dashboard(
    storage_url: str,
    artifacts_dir: Path,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    out: TextIO | None = None,
) -> None:
    """Serve the dashboard until Ctrl-C. ``port=0`` picks a free port; the URL is printed to ``out``."""
    import optuna_dashboard
    from optuna.artifacts import FileSystemArtifactStore

    out = out or sys.stdout
    storage = open_storage(storage_url)
    artifacts_dir = Path(artifacts_dir)
    try:
        artifacts_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--artifacts {artifacts_dir}: cannot create it ({exc.strerror or exc})") from None
    app = optuna_dashboard.wsgi(storage, artifact_store=FileSystemArtifactStore(str(artifacts_dir)))
    server = _listen(host, port, _default_accept_encoding(app))
    try:
        url = dashboard_url(host, server.server_address[1])
        warning = exposure_warning(host, server.server_address[1])
        if warning:
            print(warning, file=sys.stderr, flush=True)
        print(f"optuna-dashboard for {mask_password(storage_url)} (artifacts: {artifacts_dir})\n"
              f"open {url}  (Ctrl-C to stop)", file=out, flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        print("dashboard stopped", file=out, flush=True)
    finally:
        server.server_close()


def dashboard_url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/dashboard"


class _ThreadedServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a hung browser request must not keep the process alive at Ctrl-C


class _ThreadedServer6(_ThreadedServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (wsgiref's signature)
        pass  # no access log: the terminal stays readable while the dashboard polls every second


def _listen(host: str, port: int, app: Any) -> WSGIServer:
    server_class = _ThreadedServer6 if ":" in host else _ThreadedServer
    try:
        return make_server(host.strip("[]"), port, app, server_class=server_class, handler_class=_QuietHandler)
    except OSError as exc:
        raise UserError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})") from None
    except OverflowError:
        raise UserError(f"--port {port}: must be between 0 and 65535") from None


def _default_accept_encoding(app: Any) -> Callable:
    """Wrap ``app`` so a request without Accept-Encoding is served plain.

    optuna-dashboard reads that header unguarded and answers HTTP 500 to clients (curl, scripts)
    that do not send it.
    """

    def wrapped(environ: dict, start_response: Callable) -> Any:
        environ.setdefault("HTTP_ACCEPT_ENCODING", "identity")
        return app(environ, start_response)

    return wrapped
