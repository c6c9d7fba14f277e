"""``evomerge serve``: build the policy, print how to connect, start optuna-dashboard beside
the app if asked, and run the app on uvicorn."""

from __future__ import annotations

import os
import secrets
import sys
import threading
from pathlib import Path
from typing import Any

from evomerge.service.security import MAX_BODY, Policy


def policy_from_args(args: Any) -> Policy:
    token = os.environ.get("EVOMERGE_TOKEN") or secrets.token_urlsafe(24)
    return Policy(
        token=token, runs=Path(args.runs).resolve(),
        roots=tuple(Path(r).resolve() for r in (args.allow_root or [Path.cwd()])),
        token_for_reads=args.token_for_reads, allow_unsafe_loading=args.allow_unsafe_loading,
        max_body=args.max_body or MAX_BODY, storage=args.storage,
    )


def start_optuna_dashboard(storage_url: str, host: str, port: int) -> threading.Thread:
    """optuna-dashboard over ``storage_url`` on its own port, in a daemon thread (its JS uses
    absolute URLs, so it cannot live under a sub-path of this app)."""
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    import optuna_dashboard

    from evomerge.search.storage import open_storage

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    server = make_server(host, port, optuna_dashboard.wsgi(open_storage(storage_url, Path())),
                         handler_class=Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True, name="optuna-dashboard")
    thread.start()
    return thread


def serve(args: Any) -> int:
    import uvicorn

    from evomerge.service.app import create_app

    if args.optuna_dashboard_port and not args.storage:
        raise ValueError(
            "--optuna-dashboard-port: optuna-dashboard reads one storage, and without --storage "
            "each job has its own journal; add --storage URL (e.g. sqlite:///runs/evomerge.db)"
        )
    policy = policy_from_args(args)
    policy.runs.mkdir(parents=True, exist_ok=True)
    dash = None
    if args.optuna_dashboard_port:
        start_optuna_dashboard(args.storage, args.host, args.optuna_dashboard_port)
        dash = f"http://{args.host}:{args.optuna_dashboard_port}/dashboard"
    app = create_app(policy, ray_address=args.ray_address, optuna_dashboard_url=dash)
    where = f"http://{args.host}:{args.port}"
    given = bool(os.environ.get("EVOMERGE_TOKEN"))
    lines = [f"evomerge serve: {where}/" + ("" if given else f"#token={policy.token}"),
             "  token for writes: " + ("EVOMERGE_TOKEN" if given else policy.token),
             f"  runs: {policy.runs}",
             f"  allowed roots: {', '.join(str(r) for r in policy.all_roots())}",
             f"  API docs: {where}/docs"] + ([f"  optuna-dashboard: {dash}"] if dash else [])
    print("\n".join(lines), file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                timeout_graceful_shutdown=3)  # open event streams end at once
    return 0
