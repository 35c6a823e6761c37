"""A database study store behind a gRPC proxy: ``catdog-hpo storage-proxy`` and ``--storage grpc://``.

Many workers each holding their own database connections overload a PostgreSQL/MySQL server; with
``catdog-hpo storage-proxy --storage URL --port P`` one process holds the connections (and
Optuna's in-process trial cache) and the workers reach it with ``--storage grpc://HOST:P``
(Optuna's ``GrpcStorageProxy``). Optuna's protocol has no lock and no heartbeats, so the proxy
serves a second small service beside Optuna's, ``catdog_hpo.Store`` (raw bytes, no generated code):

- ``Hold``: the study lock. A stream: the proxy answers ``1`` once it holds the study's lock for
  the caller (``0``: another caller holds it, try again) and keeps it until the caller cancels the
  stream or its connection drops, so a killed worker never leaves the lock held (keepalive pings
  find a lost machine within ``_KEEPALIVE_MS`` + its timeout). Under it the proxy also holds the
  database's own study lock (search.locks.study_lock: advisory lock, GET_LOCK, or the file lock
  beside SQLite), so workers on another proxy, or on the database directly, are excluded too.
  A caller waits for a busy lock at most ``_WAIT_S`` on the proxy, then asks again: the lock passes
  straight to a waiter when released, and no server thread is tied up by a waiter for long (the
  holder's own calls need threads too).
- ``Beat`` and ``Stale``: heartbeats in the database's own heartbeat table, ages on the database's
  clock, exactly as ``RDBStorage`` keeps them; each client sends its own grace period.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import threading
import time
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterator
from urllib.parse import urlsplit

from optuna.exceptions import ExperimentalWarning
from optuna.storages import BaseStorage, GrpcStorageProxy

from catdog_hpo.errors import UserError
from catdog_hpo.search import optuna_compat
from catdog_hpo.search.optuna_compat import Heartbeats

if TYPE_CHECKING:
    import grpc
    import optuna
    from optuna.trial import FrozenTrial

EXTRA = "pip install 'catdog-hpo[grpc]'"
SCHEME = "grpc://"
_SERVICE = "catdog_hpo.Store"
_CONNECT_S = 10  # seconds a worker waits for the proxy to answer before giving up
_THREADS = 64  # server threads: every worker's call may be in flight at once, plus one per held lock
_WAIT_S = 0.2  # seconds the proxy waits for a busy study lock before answering "try again"
_KEEPALIVE_MS = 10_000  # the proxy pings idle clients this often; no answer in 5 s drops them (and their lock)


def require_grpc(what: str) -> None:
    """One-line UserError naming the extra when grpcio or protobuf is missing."""
    try:
        import google.protobuf  # noqa: F401
        import grpc  # noqa: F401
    except ImportError:
        raise UserError(f"{what}: the gRPC storage proxy needs grpcio and protobuf: {EXTRA}") from None


def parse_url(url: str, shown: str) -> tuple[str, int]:
    """(host, port) of grpc://HOST:PORT; a one-line UserError naming ``shown`` otherwise."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UserError(f"--storage {shown}: cannot parse it ({exc})") from None
    if not parts.hostname or port is None or parts.path.strip("/") or parts.query:
        raise UserError(f"--storage {shown}: expected grpc://HOST:PORT, the address of a "
                        f"`catdog-hpo storage-proxy` (e.g. grpc://127.0.0.1:13000)")
    return parts.hostname, port


# --------------------------------------------------------------------------- the workers' side


class GrpcStore(GrpcStorageProxy, Heartbeats):
    """Optuna's gRPC client plus the study lock and heartbeats of ``catdog_hpo.Store``."""

    def __init__(self, host: str, port: int, heartbeat_interval: int | None = None, grace_period: int | None = None,
                 heartbeat_stale_trial_callback: Callable[[optuna.Study, FrozenTrial], None] | None = None) -> None:
        with warnings.catch_warnings():  # "experimental" since Optuna 4.2: nothing a user can act on
            warnings.simplefilter("ignore", ExperimentalWarning)
            super().__init__(host=host, port=port)
        self.address = f"{host}:{port}"
        self._heartbeats(heartbeat_interval, grace_period, heartbeat_stale_trial_callback)
        self._own: tuple[int, grpc.Channel] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_own"] = None  # a channel does not travel to another process
        return state

    def _rpc(self, method: str, stream: bool = False) -> Any:
        """A callable for ``method`` of catdog_hpo.Store, on this process's own channel."""
        import grpc

        if self._own is None or self._own[0] != os.getpid():
            self._own = (os.getpid(), grpc.insecure_channel(self.address))
        kind = self._own[1].unary_stream if stream else self._own[1].unary_unary
        return kind(f"/{_SERVICE}/{method}")

    @contextlib.contextmanager
    def study_lock(self, study_name: str) -> Iterator[None]:
        """The study-wide lock (search.locks.study_lock), held by the proxy for this process."""
        hold = self._rpc("Hold", stream=True)
        while True:  # each try waits up to _WAIT_S on the proxy
            call = hold(study_name.encode(), wait_for_ready=True)
            if self._first(call) == b"1":
                break
            time.sleep(0.001 * random.random())  # jitter: waiters do not ask again in step
        try:
            yield
        finally:
            call.cancel()  # the proxy releases the lock when the stream ends

    def _first(self, call: Any) -> bytes:
        import grpc

        try:
            return next(call)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise UserError(f"grpc://{self.address}: this proxy has no study lock: start it with "
                                f"`catdog-hpo storage-proxy`, not Optuna's run_grpc_proxy_server") from None
            raise

    def record_heartbeat(self, trial_id: int) -> None:
        self._rpc("Beat")(str(trial_id).encode())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        grace = self._grace()
        return json.loads(self._rpc("Stale")(json.dumps({"study_id": study_id, "grace": grace}).encode()))


def open_grpc(url: str, shown: str, *, create: bool, heartbeat_interval: int | None = None,
              grace_period: int | None = None,
              heartbeat_stale_trial_callback: Callable[[optuna.Study, FrozenTrial], None] | None = None,
              ) -> BaseStorage:
    """The store a storage proxy serves at ``url`` (search.storage.STORES); ``create`` is the
    proxy's business (it opened its database with create)."""
    host, port = parse_url(url, shown)
    require_grpc(f"--storage {shown}")
    store = GrpcStore(host, port, heartbeat_interval, grace_period, heartbeat_stale_trial_callback)
    try:
        store.wait_server_ready(timeout=_CONNECT_S)
    except ConnectionError:
        store.close()
        raise UserError(f"--storage {shown}: no storage proxy answers at {host}:{port} within {_CONNECT_S} s "
                        f"(start one: catdog-hpo storage-proxy --storage URL --port {port})") from None
    return store


# --------------------------------------------------------------------------- the proxy's side


class _Locks:
    """The proxy's study locks: one holder per study name, held while its Hold stream lasts."""

    def __init__(self, storage: BaseStorage, url: str) -> None:
        self._storage, self._url = storage, url
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}

    def hold(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        from catdog_hpo.search.locks import study_lock

        name = request.decode()
        with self._guard:
            lock = self._locks.setdefault(name, threading.Lock())
        if not lock.acquire(timeout=_WAIT_S):
            yield b"0"
            return
        try:
            ended = threading.Event()
            if not context.add_callback(ended.set):  # the call is over already
                return
            # The database's lock too: workers on another proxy or on the database directly.
            with study_lock(self._storage, self._url, name):
                yield b"1"
                while not ended.wait(1.0) and context.is_active():
                    pass
        finally:
            lock.release()


def serve(url: str, host: str, port: int, on_ready: Callable[[int], None]) -> None:
    """Serve the database store ``url`` to gRPC workers on ``host:port`` (0: a free port) until
    interrupted; ``on_ready(port)`` is called once it listens."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    import optuna

    from catdog_hpo.search.storage import mask_password, open_storage, store_scheme, STORES

    shown = mask_password(url)
    if store_scheme(url) in STORES:
        raise UserError(f"--storage {shown}: the proxy serves a database store (sqlite, postgresql, mysql); "
                        f"journal and Redis stores are shared directly")
    rdb = open_storage(url)  # a RDBStorage, its tables created under the schema lock
    cached = optuna.storages.get_storage(rdb)  # with Optuna's trial cache, as its proxy docs advise
    locks = _Locks(rdb, url)

    def beat(request: bytes, context: grpc.ServicerContext) -> bytes:
        rdb.record_heartbeat(int(request))
        return b""

    def stale(request: bytes, context: grpc.ServicerContext) -> bytes:
        asked = json.loads(request)
        return json.dumps(optuna_compat.stale_trial_ids(rdb, int(asked["study_id"]), int(asked["grace"]))).encode()

    options = [("grpc.keepalive_time_ms", _KEEPALIVE_MS), ("grpc.keepalive_timeout_ms", 5_000),
               ("grpc.keepalive_permit_without_calls", 1)]
    server = grpc.server(ThreadPoolExecutor(max_workers=_THREADS), options=options)
    optuna_compat.add_storage_service(server, cached)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE, {
        "Hold": grpc.unary_stream_rpc_method_handler(locks.hold),
        "Beat": grpc.unary_unary_rpc_method_handler(beat),
        "Stale": grpc.unary_unary_rpc_method_handler(stale),
    }),))
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as exc:
        raise UserError(f"--host {host} --port {port}: cannot listen there ({exc})") from None
    if not bound:  # grpc answers 0 on some versions instead of raising
        raise UserError(f"--host {host} --port {port}: cannot listen there (in use, or not this machine's address)")
    server.start()
    try:
        on_ready(bound)
        server.wait_for_termination()
    finally:
        server.stop(grace=2)
