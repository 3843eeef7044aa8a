#!/bin/bash
# Gateway entry point (Handler: run.sh). The Lambda Web Adapter (AWS_LAMBDA_EXEC_WRAPPER=/opt/bootstrap) runs this
# script, waits for GET /healthz on 127.0.0.1:$AWS_LWA_PORT, then proxies every invocation to it and streams the
# answer back (AWS_LWA_INVOKE_MODE=response_stream).
# - /opt/python is the unbroken layer; $LAMBDA_RUNTIME_DIR holds the runtime's boto3 on some runtime images.
# - 127.0.0.1 only: nothing but the adapter may reach the app, which trusts its x-amzn-*-context headers.
# - No access log: one line per request is cost without value here (API Gateway has its own access log; the app
#   logs one JSON line per response with its id as correlation_id, never bodies). `unbroken.app` sets up the JSON
#   logging (Powertools' formatter, stderr) when uvicorn imports it; EMF metrics lines go to stdout.
# - --http: uvicorn's h11 protocol writing a response's head with its first body chunk (unbroken/api/http1.py):
#   one wake-up of the adapter, not two, before a stream's first token.
set -euo pipefail
export PYTHONPATH="${LAMBDA_TASK_ROOT:-/var/task}:/opt/python${PYTHONPATH:+:$PYTHONPATH}:${LAMBDA_RUNTIME_DIR:-/var/runtime}"
level="${UNBROKEN_LOG_LEVEL:-INFO}"
exec python -m uvicorn unbroken.app:lambda_app --http unbroken.api.http1:H11Protocol \
  --host 127.0.0.1 --port "${AWS_LWA_PORT:-8000}" \
  --no-server-header --no-access-log --log-level "${level,,}" \
  --timeout-keep-alive 75
