"""Request bodies, from bytes to a validated model, for every endpoint: whatever a client sends becomes either the
model or a `Failure` naming the parameter that is wrong, never an exception from deeper down.

The JSON parser refuses some bodies (invalid UTF-8, a number with thousands of digits, nesting deep enough to
exhaust the parser's stack); other bodies parse but hold what nothing downstream can take: strings with a lone
UTF-16 surrogate (`"\\ud800"`, which cannot be encoded as UTF-8 for an upstream, a log line or the journal) and
nesting deeper than any real request needs. Both are refused here, once, at the edge.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from unbroken.errors import Failure, invalid

# Deeper than any real request (a JSON schema of tool parameters included), and far below the recursion limit of
# everything that walks a body later (pydantic, json.dumps for an upstream, the journal's codec).
MAX_DEPTH = 64

# A `\uD800`-`\uDFFF` escape: only such an escape can put a surrogate into a parsed string (raw bytes that are not
# UTF-8 are refused by the decoder), so bodies without one skip the surrogate walk.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")

Model = TypeVar("Model", bound=BaseModel)


def parse_json(raw: bytes) -> Any:
    """The JSON value of a request body."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid("The request body is not valid UTF-8.", param="body", code="invalid_json") from None
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except _NotFinite as exc:
        raise invalid(f"The request body is not valid JSON: {exc}.", param="body", code="invalid_json") from None
    except RecursionError:
        raise invalid("The request body is nested too deeply.", param="body", code="invalid_json") from None
    except ValueError as exc:  # JSONDecodeError, and the int parser's limit on digits
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "a number is too long"
        raise invalid(f"The request body is not valid JSON: {reason}.", param="body", code="invalid_json") from None
    problem = _first_problem(value, surrogates=_SURROGATE_ESCAPE.search(raw) is not None)
    if problem is not None:
        path, what = problem
        raise invalid(f"Invalid value for '{path}': {what}.", param=path)
    return value


class _NotFinite(ValueError):
    """A number JSON cannot hold: Python's parser takes `NaN` and `Infinity`, and reads `1e400` as infinity; none
    of them can be written back as JSON (the journal, an upstream) or compared as a number."""


def _no_constant(name: str) -> float:
    raise _NotFinite(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _NotFinite("a number is out of range")
    return value


def validate(model: type[Model], value: Any) -> Model:
    """`value` as `model`; a bad one is a 400 naming the most specific offending parameter."""
    if not isinstance(value, dict):
        raise invalid("The request body must be a JSON object.", param="body")
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise failure_from_validation(exc.errors()) from None


def failure_from_validation(errors: list[Any], *, prefix: tuple[Any, ...] = ()) -> Failure:
    err = most_specific(errors) if errors else {"loc": (), "msg": "invalid request"}
    loc = tuple(err.get("loc", ()))
    if loc[: len(prefix)] == prefix:
        loc = loc[len(prefix):]
    param = param_path(loc)
    if err.get("type") == "missing" and param == "body":
        return invalid("The request body must be a JSON object.", param="body")
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return invalid(f"Invalid value for '{param}': {msg}.", param=param)


def most_specific(errors: list[Any]) -> Any:
    """Of a union's errors, the one that got deepest into the value is the one that says what is wrong."""
    return max(errors, key=lambda e: len(e["loc"]))


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "none", "list"}
# The discriminator values pydantic puts into a `loc` after the index of an input item (the one discriminated
# union, `ItemParam`); never part of the parameter's name. Only these: a tag that is also a field name (`text`,
# `refusal`, `function`) would otherwise swallow the field that is wrong (`content[0].text`).
_ITEM_TAGS = {"message", "function_call", "function_call_output", "reasoning", "item_reference", "compaction"}


def param_path(loc: tuple[Any, ...]) -> str:
    """`input[0].content` from pydantic's loc, without its union-member tags (`str`, `list[...]`, the
    discriminator value after an index, model class names)."""
    out = ""
    previous: Any = None
    for part in loc:
        skip = isinstance(part, str) and (
            part in _TYPE_TAGS or "[" in part or part[:1].isupper() or "-" in part
            or (isinstance(previous, int) and part in _ITEM_TAGS)
        )
        previous = part
        if skip:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "body"


def _first_problem(value: Any, *, surrogates: bool) -> tuple[str, str] | None:
    """(param, what) for the first string with a lone surrogate or the first place nested too deeply. A fast walk
    without paths first; the path is only worked out for a body that has a problem."""
    if not _has_problem(value, surrogates):
        return None
    return _locate_problem(value, (), surrogates)


def _bad_string(s: str) -> bool:
    if s.isascii():
        return False
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _has_problem(value: Any, surrogates: bool) -> bool:
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            if depth >= MAX_DEPTH:
                return True
            for k, v in node.items():
                if surrogates and _bad_string(k):
                    return True
                stack.append((v, depth + 1))
        elif isinstance(node, list):
            if depth >= MAX_DEPTH:
                return True
            stack.extend((v, depth + 1) for v in node)
        elif surrogates and isinstance(node, str) and _bad_string(node):
            return True
    return False


def _locate_problem(node: Any, path: tuple[Any, ...], surrogates: bool) -> tuple[str, str] | None:
    # Recursive, but only below MAX_DEPTH: deeper containers are reported before being entered.
    if isinstance(node, dict | list) and len(path) >= MAX_DEPTH:
        return _json_path(path), f"nested more than {MAX_DEPTH} levels deep"
    if isinstance(node, dict):
        for k, v in node.items():
            if surrogates and _bad_string(k):
                return _json_path(path), "a key holds a lone UTF-16 surrogate, which is not valid Unicode text"
            found = _locate_problem(v, (*path, k), surrogates)
            if found is not None:
                return found
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found = _locate_problem(v, (*path, i), surrogates)
            if found is not None:
                return found
    elif surrogates and isinstance(node, str) and _bad_string(node):
        return _json_path(path), "the string holds a lone UTF-16 surrogate, which is not valid Unicode text"
    return None


def _json_path(path: tuple[Any, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"
