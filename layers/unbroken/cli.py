"""`unbroken serve` runs the router; `unbroken check-config` validates a config file and prints every problem;
`unbroken keys create|list|revoke` and `unbroken spend` call a running router's admin API (`/admin/v1`) over HTTP,
with the admin key from `--admin-key` or UNBROKEN_ADMIN_KEY."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from unbroken.config import Config, ConfigError, load_config

DEFAULT_STORE = "sqlite:///unbroken.db"
DEFAULT_URL = "http://127.0.0.1:8080"

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
    from unbroken.api.http1 import H11Protocol
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
    # Keep-alive 75 s as on Lambda (functions/gateway/run.sh): above the 5 s idle expiry of common client pools
    # (httpx's), so a client never sends on a connection the server is closing at the same moment.
    server = uvicorn.Server(uvicorn.Config(app, http=H11Protocol, log_level="warning", access_log=False,
                                           server_header=False, timeout_graceful_shutdown=5, timeout_keep_alive=75))
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


# -- the admin API's clients: keys and spend ---------------------------------------------------------------------


class _AdminError(Exception):
    pass


def _admin(args: argparse.Namespace, method: str, path: str, *, body: dict[str, Any] | None = None,
           params: dict[str, str] | None = None) -> Any:
    """One admin call; an error answer (the spec's error object) or no answer is an `_AdminError`."""
    import httpx

    key = args.admin_key or os.environ.get("UNBROKEN_ADMIN_KEY")
    if not key:
        raise _AdminError("no admin key: pass --admin-key or set UNBROKEN_ADMIN_KEY")
    base = args.url.rstrip("/").removesuffix("/v1")
    try:
        r = httpx.request(method, f"{base}/admin/v1{path}", json=body, params=params, timeout=30.0,
                          headers={"authorization": f"Bearer {key}"})
    except httpx.HTTPError as exc:
        raise _AdminError(f"cannot reach {base}: {type(exc).__name__}") from None
    try:
        data = r.json()
    except ValueError:
        data = None
    if r.status_code >= 400:
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, dict):
            raise _AdminError(f"{r.status_code} {error.get('code')}: {error.get('message')}")
        raise _AdminError(f"{r.status_code} from {base}")
    return data


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def _money(value: Any) -> str:
    return "-" if value is None else f"${float(value):g}"


def _key_line(key: dict[str, Any]) -> str:
    budgets, limits = key.get("budgets") or {}, key.get("limits") or {}
    state = "revoked" if key.get("revoked") else (
        "expired" if key.get("expires_at") and key["expires_at"] <= time.time() else "active")
    models = ",".join(key["models"]) if key.get("models") is not None else "*"
    return (f"{key['id']:22} {key['tenant']:16} {(key.get('name') or '-'):16} {state:8} models={models} "
            f"daily={_money(budgets.get('daily_usd'))} monthly={_money(budgets.get('monthly_usd'))} "
            f"rpm={limits.get('rpm') or '-'} tpm={limits.get('tpm') or '-'}")


def keys_create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"tenant": args.tenant}
    if args.name is not None:
        body["name"] = args.name
    if args.model:
        body["models"] = args.model
    budgets = {k: v for k, v in (("daily_usd", args.daily_usd), ("monthly_usd", args.monthly_usd)) if v is not None}
    limits = {k: v for k, v in (("rpm", args.rpm), ("tpm", args.tpm)) if v is not None}
    if budgets:
        body["budgets"] = budgets
    if limits:
        body["limits"] = limits
    if args.expires_in_days is not None:
        body["expires_at"] = time.time() + args.expires_in_days * 86400
    key = _admin(args, "POST", "/keys", body=body)
    if args.json:
        _print_json(key)
        return 0
    print(f"created {key['id']} for tenant {key['tenant']}")
    print(f"secret: {key['secret']}")
    print("(shown once: the router keeps only its SHA-256)")
    return 0


def keys_list(args: argparse.Namespace) -> int:
    listed = _admin(args, "GET", "/keys", params={"tenant": args.tenant} if args.tenant else None)
    if args.json:
        _print_json(listed)
        return 0
    keys = listed.get("data") or []
    for key in keys:
        print(_key_line(key))
    print(f"{len(keys)} key(s)")
    return 0


def keys_revoke(args: argparse.Namespace) -> int:
    key = _admin(args, "POST", f"/keys/{args.key_id}/revoke")
    if args.json:
        _print_json(key)
    else:
        print(f"revoked {key['id']} (tenant {key['tenant']}); every instance refuses it within a few seconds")
    return 0


def spend(args: argparse.Namespace) -> int:
    params = {"by": args.by, **{k: v for k, v in (("id", args.id), ("from", args.from_), ("to", args.to)) if v}}
    report = _admin(args, "GET", "/spend", params=params)
    if args.json:
        _print_json(report)
        return 0
    print(f"spend by {report['by']}, {report['from']} .. {report['to']} (UTC)")
    count = "attempts" if report["by"] == "deployment" else "requests"
    print(f"{'day':10}  {report['by']:28} {'usd':>12} {count:>9} {'input':>10} {'output':>10}")
    for row in report.get("data") or []:
        print(f"{row['day']:10}  {row['id']:28} {row['usd']:>12.6f} {row.get(count, 0):>9} "
              f"{row['input_tokens']:>10} {row['output_tokens']:>10}")
    for row in report.get("totals") or []:
        print(f"{'total':10}  {row['id']:28} {row['usd']:>12.6f} {row.get(count, 0):>9} "
              f"{row['input_tokens']:>10} {row['output_tokens']:>10}")
    if not report.get("data"):
        print("(nothing spent in this range)")
    return 0


def _admin_command(func: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return int(func(args))
        except _AdminError as exc:
            print(f"unbroken: {exc}", file=sys.stderr)
            return 1

    return run


def _admin_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=os.environ.get("UNBROKEN_URL", DEFAULT_URL),
                        help=f"the router (default $UNBROKEN_URL or {DEFAULT_URL})")
    parser.add_argument("--admin-key", default=None, help="an auth.admin_keys key (default $UNBROKEN_ADMIN_KEY)")
    parser.add_argument("--json", action="store_true", help="print the admin API's JSON answer")


def _add_admin_commands(sub: Any) -> None:
    p_keys = sub.add_parser("keys", help="API keys in the store, through a running router's admin API")
    keys = p_keys.add_subparsers(dest="keys_command", required=True)
    p_create = keys.add_parser("create", help="create a key (its secret is printed once)")
    _admin_options(p_create)
    p_create.add_argument("--tenant", required=True)
    p_create.add_argument("--name")
    p_create.add_argument("--model", action="append", help="a model the key may use (repeat; default: all)")
    p_create.add_argument("--daily-usd", type=float)
    p_create.add_argument("--monthly-usd", type=float)
    p_create.add_argument("--rpm", type=int, help="requests per minute")
    p_create.add_argument("--tpm", type=int, help="tokens (input + output) per minute")
    p_create.add_argument("--expires-in-days", type=float)
    p_create.set_defaults(func=_admin_command(keys_create))
    p_list = keys.add_parser("list", help="list keys (never their secrets)")
    _admin_options(p_list)
    p_list.add_argument("--tenant")
    p_list.set_defaults(func=_admin_command(keys_list))
    p_revoke = keys.add_parser("revoke", help="revoke a key by its id (key_...)")
    _admin_options(p_revoke)
    p_revoke.add_argument("key_id")
    p_revoke.set_defaults(func=_admin_command(keys_revoke))
    p_spend = sub.add_parser("spend", help="spend per key, tenant, model or deployment and UTC day")
    _admin_options(p_spend)
    p_spend.add_argument("--by", choices=["key", "tenant", "model", "deployment"], default="key")
    p_spend.add_argument("--id", help="one key id, tenant, model or model/deployment (default: all)")
    p_spend.add_argument("--from", dest="from_", help="first day, YYYY-MM-DD (default: --to)")
    p_spend.add_argument("--to", help="last day, YYYY-MM-DD (default: today, UTC)")
    p_spend.set_defaults(func=_admin_command(spend))


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
    _add_admin_commands(sub)
    args = parser.parse_args(argv)
    if getattr(args, "config", None) and not Path(args.config).exists():
        print(f"unbroken: no config at {args.config} (try --config router.example.yaml)", file=sys.stderr)
        return 2
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
