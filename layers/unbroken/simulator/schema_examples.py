"""Example documents for JSON schemas: the arguments of simulated tool calls and the body of structured output.
Deterministic for a given PRNG state, valid for the subset of JSON Schema that tools and structured outputs use."""

from __future__ import annotations

import copy
import math
import random
import uuid
from typing import Any

from unbroken.simulator.tokens import VOCAB, words

_MAX_SCHEMA_DEPTH = 16


def _resolve_ref(root: Any, ref: str) -> Any:
    """Resolve a local JSON pointer (`#/$defs/X`, `#/definitions/X`, any `#/...`); unknown refs become `{}`."""
    if not ref.startswith("#"):
        return {}
    node = root
    for raw in ref[1:].split("/"):
        if not raw:
            continue
        part = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return {}
    return node


def _merge_all_of(schema: dict[str, Any], root: Any) -> dict[str, Any]:
    merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
    for sub in schema.get("allOf") or []:
        if isinstance(sub, dict) and "$ref" in sub:
            sub = _resolve_ref(root, sub["$ref"])
        if not isinstance(sub, dict):
            continue
        for key, value in sub.items():
            if key == "properties" and isinstance(value, dict):
                merged["properties"] = {**(merged.get("properties") or {}), **value}
            elif key == "required" and isinstance(value, list):
                merged["required"] = list(dict.fromkeys([*(merged.get("required") or []), *value]))
            else:
                merged.setdefault(key, value)
    return merged


def _infer_type(schema: dict[str, Any]) -> str:
    declared = schema.get("type")
    if isinstance(declared, str):
        return declared
    if isinstance(declared, list) and declared:
        non_null = [t for t in declared if t != "null"]
        return str(non_null[0] if non_null else declared[0])
    if any(k in schema for k in ("properties", "required", "additionalProperties", "minProperties")):
        return "object"
    if any(k in schema for k in ("items", "prefixItems", "minItems", "maxItems")):
        return "array"
    if any(k in schema for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")):
        return "number"
    return "string"


def _example_string(schema: dict[str, Any], rng: random.Random) -> str:
    fmt = schema.get("format")
    if fmt == "date-time":
        value = f"2025-0{rng.randint(1, 9)}-{rng.randint(10, 28)}T{rng.randint(10, 23)}:00:00Z"
    elif fmt == "date":
        value = f"2025-0{rng.randint(1, 9)}-{rng.randint(10, 28)}"
    elif fmt == "time":
        value = f"{rng.randint(10, 23)}:{rng.randint(10, 59)}:00"
    elif fmt == "email":
        value = f"{rng.choice(VOCAB)}@example.com"
    elif fmt in ("uri", "url", "uri-reference", "iri"):
        value = f"https://example.com/{rng.choice(VOCAB)}"
    elif fmt == "uuid":
        value = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    elif fmt == "ipv4":
        value = f"192.0.2.{rng.randint(1, 254)}"
    else:
        value = words(rng, rng.randint(1, 4))
    min_len = schema.get("minLength")
    max_len = schema.get("maxLength")
    if isinstance(min_len, int):
        while len(value) < min_len:
            value += " " + rng.choice(VOCAB)
    if isinstance(max_len, int) and len(value) > max_len:
        value = value[:max_len]
        if isinstance(min_len, int) and len(value) < min_len:  # contradictory bounds: satisfy the maximum
            value = value.ljust(min(min_len, max_len), "x")
    return value


def _bounds(schema: dict[str, Any]) -> tuple[float | None, bool, float | None, bool]:
    """(low, low exclusive, high, high exclusive) from draft-4 (boolean) or draft-6+ (numeric) exclusives."""
    lo, hi = schema.get("minimum"), schema.get("maximum")
    lo_x = hi_x = False
    ex_lo, ex_hi = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    if ex_lo is True:
        lo_x = True
    elif isinstance(ex_lo, int | float) and not isinstance(ex_lo, bool) and (lo is None or ex_lo >= lo):
        lo, lo_x = ex_lo, True
    if ex_hi is True:
        hi_x = True
    elif isinstance(ex_hi, int | float) and not isinstance(ex_hi, bool) and (hi is None or ex_hi <= hi):
        hi, hi_x = ex_hi, True
    lo = lo if isinstance(lo, int | float) and not isinstance(lo, bool) else None
    hi = hi if isinstance(hi, int | float) and not isinstance(hi, bool) else None
    return lo, lo_x, hi, hi_x


def _example_integer(schema: dict[str, Any], rng: random.Random) -> int:
    lo, lo_x, hi, hi_x = _bounds(schema)
    low = None if lo is None else (math.floor(lo) + 1 if lo_x else math.ceil(lo))
    high = None if hi is None else (math.ceil(hi) - 1 if hi_x else math.floor(hi))
    if low is None and high is None:
        low, high = 0, 100
    elif low is None:
        assert high is not None
        low = high - 100
    elif high is None:
        high = low + 100
    if low > high:
        return low
    step = schema.get("multipleOf")
    if isinstance(step, int) and not isinstance(step, bool) and step > 0:
        k_lo, k_hi = math.ceil(low / step), math.floor(high / step)
        if k_lo <= k_hi:
            return rng.randint(k_lo, k_hi) * step
    return rng.randint(low, high)


def _example_number(schema: dict[str, Any], rng: random.Random) -> float | int:
    lo, lo_x, hi, hi_x = _bounds(schema)
    if lo is None and hi is None:
        lo, hi = 0.0, 100.0
    elif lo is None:
        assert hi is not None
        lo = hi - 100.0
    elif hi is None:
        hi = lo + 100.0
    assert lo is not None and hi is not None
    step = schema.get("multipleOf")
    if isinstance(step, int | float) and not isinstance(step, bool) and step > 0:
        # Integers are the values whose quotient by a decimal step survives float division in validators.
        for candidate in range(math.ceil(lo), math.floor(hi) + 1):
            if (candidate / step).is_integer() and not (lo_x and candidate == lo) and not (hi_x and candidate == hi):
                return candidate
    if hi <= lo:
        return lo
    value = lo + (hi - lo) * rng.uniform(0.1, 0.9)
    rounded = round(value, 2)
    return rounded if lo < rounded < hi else value


def example_for_schema(schema: Any, rng: random.Random, *, root: Any = None, _depth: int = 0) -> Any:
    """A deterministic (for a given `rng` state) example document valid for a JSON schema, for the subset tools and
    structured outputs use: object (all properties, required ones always), string (enum/const, formats,
    min/maxLength), integer/number (bounds, multipleOf), boolean, null, array (1-2 items, min/maxItems,
    prefixItems), anyOf/oneOf (the first branch), allOf (merged) and local `$ref`s. `pattern` is not honoured."""
    if root is None:
        root = schema
    if schema is None or schema is True or schema == {}:
        return {} if _depth == 0 else rng.choice(VOCAB)  # a tool without parameters takes an empty object
    if not isinstance(schema, dict):
        return None
    if _depth > _MAX_SCHEMA_DEPTH:
        return None
    if isinstance(schema.get("$ref"), str):
        return example_for_schema(_resolve_ref(root, schema["$ref"]), rng, root=root, _depth=_depth + 1)
    if "const" in schema:
        return copy.deepcopy(schema["const"])
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return copy.deepcopy(rng.choice(enum))
    for key in ("anyOf", "oneOf"):
        branches = schema.get(key)
        if isinstance(branches, list) and branches:
            return example_for_schema(branches[0], rng, root=root, _depth=_depth + 1)
    if isinstance(schema.get("allOf"), list):
        return example_for_schema(_merge_all_of(schema, root), rng, root=root, _depth=_depth + 1)

    kind = _infer_type(schema)
    if kind == "object":
        props_value = schema.get("properties")
        props: dict[str, Any] = props_value if isinstance(props_value, dict) else {}
        required = [r for r in schema.get("required") or [] if isinstance(r, str)]
        deep = _depth > _MAX_SCHEMA_DEPTH // 2  # recursive schemas: stop adding optional properties
        out: dict[str, Any] = {}
        for name, sub in props.items():
            if not deep or name in required:
                out[name] = example_for_schema(sub, rng, root=root, _depth=_depth + 1)
        extra = schema.get("additionalProperties")
        extra_schema = extra if isinstance(extra, dict) else {}
        for name in required:
            if name not in out:
                out[name] = example_for_schema(extra_schema or {"type": "string"}, rng, root=root, _depth=_depth + 1)
        min_props = schema.get("minProperties")
        if isinstance(min_props, int) and extra is not False:
            while len(out) < min_props:
                out[f"extra_{len(out)}"] = example_for_schema(
                    extra_schema or {"type": "string"}, rng, root=root, _depth=_depth + 1
                )
        return out
    if kind == "array":
        min_value, max_value = schema.get("minItems"), schema.get("maxItems")
        min_items: int = min_value if isinstance(min_value, int) else 0
        max_items: int | None = max_value if isinstance(max_value, int) else None
        count = max(rng.randint(1, 2), min_items)
        if max_items is not None:
            count = min(count, max_items)
        prefix = schema.get("prefixItems")
        items = schema.get("items")
        if isinstance(items, list):  # draft 4-7 tuple form
            prefix, items = items, schema.get("additionalItems")
        prefix = prefix if isinstance(prefix, list) else []
        item_schema = items if isinstance(items, dict) else {"type": "string"}
        values: list[Any] = []
        for i in range(count):
            sub = prefix[i] if i < len(prefix) else item_schema
            value = example_for_schema(sub, rng, root=root, _depth=_depth + 1)
            if schema.get("uniqueItems"):
                for _ in range(8):  # a few redraws; a small enum may not have enough distinct values
                    if value not in values:
                        break
                    value = example_for_schema(sub, rng, root=root, _depth=_depth + 1)
                if value in values and len(values) >= min_items:
                    break
            values.append(value)
        return values
    if kind == "string":
        return _example_string(schema, rng)
    if kind == "integer":
        return _example_integer(schema, rng)
    if kind == "number":
        return _example_number(schema, rng)
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "null":
        return None
    return rng.choice(VOCAB)
