"""`catdog-hpo storage-proxy`: serve a database study store to many workers over gRPC."""

from __future__ import annotations

import argparse

from catdog_hpo.cli.common import add_storage_arg


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "storage-proxy",
        help="serve a database study store to workers over gRPC (they run with --storage grpc://HOST:PORT)",
        description="Serve a SQLite, PostgreSQL or MySQL study store through Optuna's gRPC storage proxy, "
        "with catdog-hpo's study lock and heartbeats: one process holds the database connections and "
        "the workers run with --storage grpc://HOST:PORT (docs/stores.md). It has no login or TLS: "
        "keep it on a trusted network. Ctrl-C stops it.",
    )
    add_storage_arg(p, "the database store to serve")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 for workers "
                   "on other machines)")
    p.add_argument("--port", type=int, default=13000, help="port, 0 = any free one (default: 13000)")
    p.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    from catdog_hpo.search.grpc_store import require_grpc, serve
    from catdog_hpo.search.storage import mask_password

    require_grpc("storage-proxy")

    def ready(port: int) -> None:
        where = "127.0.0.1" if args.host in ("0.0.0.0", "::", "[::]") else args.host
        print(f"storage-proxy: serving {mask_password(args.storage)} at grpc://{args.host}:{port}; "
              f"workers: --storage grpc://{where}:{port} (Ctrl-C stops it)", flush=True)

    serve(args.storage, args.host, args.port, ready)
    return 0
