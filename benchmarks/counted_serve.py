"""`unbroken serve` with the store's bill counted, for the benchmark: `python -m benchmarks.counted_serve serve ...`
takes exactly the arguments of `unbroken serve` and runs `unbroken.cli.main`, plus two things:

- every DynamoDB call asks for `ReturnConsumedCapacity=TOTAL`, and the calls and the capacity units DynamoDB (Local)
  reports are counted per operation (reads included: `StoreStats` counts writes only);
- `GET /_bench/stats` returns those counts and the store's own `StoreStats`, so the harness can take the difference
  around a run and divide by the responses it streamed.

Nothing else changes; the counting is a dict update per store call, next to a network round trip.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections import Counter
from typing import Any

_calls: Counter[str] = Counter()
_units: Counter[str] = Counter()
_READS = ("get_item", "query", "batch_get_item", "scan")


def _capacity(result: dict[str, Any]) -> float:
    consumed = result.get("ConsumedCapacity")
    if isinstance(consumed, dict):
        consumed = [consumed]
    return float(sum(float(c.get("CapacityUnits") or 0) for c in consumed or [] if isinstance(c, dict)))


def _patch_dynamodb() -> None:
    from unbroken.journal import dynamodb

    original = dynamodb.DynamoDBStore._call

    async def counted(self: Any, op: str, **kwargs: Any) -> dict[str, Any]:
        name = re.sub(r"(?<!^)(?=[A-Z])", "_", op).lower()  # the store calls "TransactWriteItems": count it snake_case
        if name not in ("describe_table", "create_table", "update_time_to_live", "delete_table"):
            kwargs.setdefault("ReturnConsumedCapacity", "TOTAL")
        result = await original(self, op, **kwargs)
        _calls[name] += 1
        _units[name] += _capacity(result)
        return result

    dynamodb.DynamoDBStore._call = counted  # type: ignore[method-assign]


def _patch_app() -> None:
    import unbroken.api.app  # where `unbroken serve` takes create_app from (at call time)

    original = unbroken.api.app.create_app

    def create_app(config: Any, store: Any = None, **kwargs: Any) -> Any:
        app = original(config, store, **kwargs)

        @app.get("/_bench/stats", include_in_schema=False)
        async def stats() -> dict[str, Any]:
            reads = {op: n for op, n in _calls.items() if op in _READS}
            return {
                "store": dataclasses.asdict(store.stats) if store is not None else None,
                "calls": dict(_calls),
                "capacity_units": dict(_units),
                "read_calls": sum(reads.values()),
                "write_calls": sum(n for op, n in _calls.items() if op not in _READS),
                "rcu": sum(u for op, u in _units.items() if op in _READS),
                "wcu": sum(u for op, u in _units.items() if op not in _READS),
            }

        return app

    unbroken.api.app.create_app = create_app


def main() -> int:
    _patch_dynamodb()
    _patch_app()
    from unbroken.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
