"""`unbroken serve` runs the router; `unbroken check-config` validates a config file and prints every problem."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
from pathlib import Path

from unbroken.config import Config, ConfigError, load_config

DEFAULT_STORE = "sqlite:///unbroken.db"

log = logging.getLogger("unbroken.cli")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("unbroken")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


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
    from unbroken.logs import configure, setup_logging

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
    for model_name, deployment, why in config.switched_off:
        # Names the environment variable a key would come from, never a value.
        log.warning("deployment switched off: %s/%s (%s)", model_name, deployment, why,
                    extra={"model": model_name, "deployment": deployment, "reason": why})
    for model_name, d in config.unpriced:
        log.warning("deployment without a price: %s/%s (%s)", model_name, d.name, d.no_price_reason,
                    extra={"model": model_name, "deployment": d.name})
    for model in config.models:
        if not model.enabled_deployments:
            log.warning("model %s is not served: every deployment of it is off (requests get a 503)", model.name,
                        extra={"model": model.name})
    configure(metrics=config.server.metrics, tracing=config.server.tracing)
    app = create_app(config, store, access_log=True, demo_controls=args.demo_controls)
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
        on = len(model.enabled_deployments)
        state = f"{on} deployment(s) on" if on else "not served (every deployment is off: requests get a 503)"
        print(f"model {model.name}: {state}")
        for d in model.deployments:
            if d.off_reason:
                print(f"  off: {d.name}: {d.off_reason}")
            elif not d.price_known:
                print(f"  warning: {d.name}: {d.no_price_reason}")
    print(f"{args.path}: OK")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="unbroken", description="An Open Responses router whose streams do not "
                                     "break.")
    parser.add_argument("--version", action="version", version=f"unbroken {_version()}")
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
