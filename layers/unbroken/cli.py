"""`unbroken serve` runs the router; `unbroken check-config` validates a config file and prints every problem."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
from pathlib import Path

from unbroken.config import Config, ConfigError, load_config

DEFAULT_STORE = "sqlite:///unbroken.db"


def _ready_message(config: Config, url: str, config_path: str, store_url: str) -> str:
    # The examples read the key from the caller's shell: a configured key is never printed (this line ends up in
    # terminals, CI output and log files).
    model = config.served_models[0].name if config.served_models else "MODEL"
    models = ", ".join(m.name for m in config.served_models) or "none (no deployment has its keys set)"
    body = f'{{"model":"{model}","input":"Tell me a story","stream":true}}'
    return (
        f"unbroken ready on {url}  (config {config_path}, store {store_url}; models: {models}; "
        f"the examples read your key from $UNBROKEN_API_KEY)\n"
        f"  curl:   curl -N {url}/responses -H \"Authorization: Bearer $UNBROKEN_API_KEY\" "
        f"-H 'Content-Type: application/json' -d '{body}'\n"
        f"  openai: python -c \"import os; from openai import OpenAI; "
        f"c = OpenAI(base_url='{url}', api_key=os.environ['UNBROKEN_API_KEY']); "
        f"print(c.responses.create(model='{model}', input='Tell me a story').output_text)\""
    )


def serve(args: argparse.Namespace) -> int:
    # What only serving needs (uvicorn, FastAPI, the stores): `check-config` and `--help` stay fast without it.
    import uvicorn

    from unbroken.api.app import create_app
    from unbroken.journal.backends import open_store
    from unbroken.logs import setup_logging

    setup_logging(args.log_level)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"unbroken: the config has problems:\n{exc}", file=sys.stderr)
        return 2
    try:
        store = open_store(args.store) if args.store != "none" else None
    except ValueError as exc:
        print(f"unbroken: {exc}", file=sys.stderr)
        return 2
    if args.create_table and store is not None:
        create = getattr(store, "create_table_if_missing", None)
        if create is None:
            print("unbroken: --create-table applies to dynamodb:// stores only", file=sys.stderr)
            return 2
        asyncio.run(create())
    app = create_app(config, store, demo_controls=args.demo_controls)
    # Bind first, then announce: a client that reads the ready line can connect at once (and --port 0 works).
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted connections only then (else Nagle + delayed ACK
    # add tens of milliseconds to small writes such as SSE frames).
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM,
                         socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as exc:
        print(f"unbroken: cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr)
        return 2
    sock.listen(1024)
    port = sock.getsockname()[1]
    host = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{host}:{port}/v1"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, server_header=False,
                                           timeout_graceful_shutdown=5))
    print(_ready_message(config, url, args.config, args.store), flush=True)
    asyncio.run(server.serve(sockets=[sock]))
    return 0


def check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem)
        print(f"{len(exc.problems)} problem(s) in {args.path}")
        return 1
    for model in config.models:
        on = [d.name for d in model.enabled_deployments]
        off = [d.name for d in model.deployments if not d.enabled]
        state = f"{len(on)} deployment(s) on" + (f"; off (no key in environment): {', '.join(off)}" if off else "")
        print(f"model {model.name}: {state}")
    print(f"{args.path}: OK")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="unbroken", description="An Open Responses router whose streams do not "
                                     "break.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="run the router")
    p_serve.add_argument("--config", default=os.environ.get("UNBROKEN_CONFIG", "router.yaml"))
    p_serve.add_argument("--host", default="127.0.0.1")
    p_serve.add_argument("--port", type=int, default=8080)
    p_serve.add_argument("--store", default=os.environ.get("UNBROKEN_STORE", DEFAULT_STORE),
                         help="sqlite:///PATH (default), memory://, dynamodb://TABLE?region=R&endpoint_url=U, none")
    p_serve.add_argument("--log-level", default=os.environ.get("UNBROKEN_LOG_LEVEL", "INFO"))
    p_serve.add_argument("--create-table", action="store_true",
                         help="create the DynamoDB table (on-demand, TTL) if it does not exist; for local use — "
                              "on AWS the SAM template creates it")
    p_serve.add_argument("--demo-controls", action="store_true",
                         help="add the demo page's 'kill the producer' button and its debug route (POST "
                              "/demo/responses/{id}/kill-producer, authenticated): it stops a response's producer "
                              "in this process as a crash would; for demonstrations only")
    p_serve.set_defaults(func=serve)
    p_check = sub.add_parser("check-config", help="validate a config file")
    p_check.add_argument("path", type=str)
    p_check.set_defaults(func=check_config)
    args = parser.parse_args(argv)
    if getattr(args, "config", None) and not Path(args.config).exists():
        print(f"unbroken: no config at {args.config} (try --config router.example.yaml)", file=sys.stderr)
        return 2
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
