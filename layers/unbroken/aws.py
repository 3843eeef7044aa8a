"""AWS helpers: provider keys from Secrets Manager and router YAML from SSM (once per Lambda cold start), and the
asynchronous invocation of the worker Lambda.

boto3 is imported inside the functions so that local runs (and the import of this module) never pay for it.
Plain boto3 rather than Powertools Parameters: `python -X importtime` (Python 3.11, 2-core VM) puts boto3 at
~163 ms and `aws_lambda_powertools.utilities.parameters` at ~14 ms more on top of it; its value is a TTL cache, and
these values are read exactly once per execution environment, so it would buy nothing for its cost.

Values are never logged: only secret ARNs, variable names and error codes.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SecretsError(RuntimeError):
    """One or more secrets could not be read; the message names the ARNs and AWS error codes, never values."""


@contextmanager
def _botocore_bodies_unlogged() -> Iterator[None]:
    """botocore logs every response body at DEBUG (logger `botocore.parsers`): with a DEBUG root logger that would
    print the secret values. Silence it for the duration of these calls."""
    parsers = logging.getLogger("botocore.parsers")
    previous = parsers.level
    if parsers.getEffectiveLevel() < logging.INFO:
        parsers.setLevel(logging.INFO)
    try:
        yield
    finally:
        parsers.setLevel(previous)


def _region_of(arn: str) -> str | None:
    # arn:partition:service:region:account:resource; a bare name has no region (use the default one).
    parts = arn.split(":")
    if len(parts) > 5 and parts[0] == "arn" and parts[3]:
        return parts[3]
    return None


def _variable_for_secret_name(name: str) -> str:
    """`prod/unbroken/openai-api-key` -> `OPENAI_API_KEY`: the last path segment, made a valid variable name."""
    leaf = name.rsplit("/", 1)[-1]
    var = re.sub(r"[^A-Za-z0-9_]", "_", leaf).upper()
    return f"_{var}" if var[:1].isdigit() else var


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        if code:
            return str(code)
    return type(exc).__name__


def load_secrets_into_env(arns: Iterable[str], env: MutableMapping[str, str] | None = None) -> list[str]:
    """Read each secret and export its values as environment variables, so the router YAML's `${VAR}` references
    find them. A SecretString holding a JSON object sets one variable per key (`{"OPENAI_API_KEY": "..."}`); any
    other SecretString sets one variable named after the secret (`.../openai-api-key` -> `OPENAI_API_KEY`).
    A variable already present in the environment wins (explicit configuration beats the secret). Returns the names
    set, in order. Raises `SecretsError` after trying every ARN if any could not be read."""
    target: MutableMapping[str, str] = os.environ if env is None else env
    arns = [a.strip() for a in arns if a and a.strip()]
    if not arns:
        return []
    import boto3  # lazy: ~160 ms, paid only where secrets are configured

    clients: dict[str | None, Any] = {}
    set_names: list[str] = []
    failures: list[str] = []
    for arn in arns:
        region = _region_of(arn)
        if region not in clients:
            clients[region] = boto3.client("secretsmanager", region_name=region)
        try:
            with _botocore_bodies_unlogged():
                resp = clients[region].get_secret_value(SecretId=arn)
        except Exception as exc:  # botocore ClientError, endpoint errors...: report all of them together
            failures.append(f"{arn}: {_error_code(exc)}")
            continue
        text = resp.get("SecretString")
        if text is None:
            log.warning("secret has no SecretString (binary secrets are not supported); skipped", extra={"arn": arn})
            continue
        pairs: list[tuple[str, str]]
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            pairs = []
            for key, value in parsed.items():
                if not _ENV_NAME.match(str(key)) or isinstance(value, (dict, list)) or value is None:
                    log.warning("secret field skipped (bad name or not a scalar)", extra={"arn": arn, "field": key})
                    continue
                pairs.append((str(key), value if isinstance(value, str) else json.dumps(value)))
        else:
            pairs = [(_variable_for_secret_name(str(resp.get("Name") or arn)), text)]
        for name, value in pairs:
            if name in target:
                continue
            target[name] = value
            set_names.append(name)
    if failures:
        raise SecretsError("cannot read secret(s): " + "; ".join(failures))
    log.info("provider secrets loaded", extra={"variables": set_names})
    return set_names


def read_config_text_from_ssm(name: str) -> str:
    """The router YAML held in an SSM parameter (String or SecureString, decrypted). A Standard parameter holds
    4 KB and an Advanced one 8 KB; a larger config belongs in a file (UNBROKEN_CONFIG)."""
    import boto3  # lazy, see module docstring

    with _botocore_bodies_unlogged():  # a SecureString may hold inline keys
        resp = boto3.client("ssm").get_parameter(Name=name, WithDecryption=True)
    return str(resp["Parameter"]["Value"])


def invoke_worker(function_name: str, payload: dict[str, Any]) -> None:
    """Start a worker invocation (asynchronous: returns once Lambda has queued the event). Blocking: call it in a
    thread from the event loop."""
    import boto3

    boto3.client("lambda").invoke(FunctionName=function_name, InvocationType="Event",
                                  Payload=json.dumps(payload).encode())
