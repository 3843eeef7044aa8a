"""The per-request knobs: string values in the request body's `metadata` (`sim_seed`, `sim_tps`, `sim_fault`, ...),
parsed and range-checked; a bad value is a 400 naming the key."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from unbroken.simulator.errors import ApiError
from unbroken.simulator.faults import Fault, parse_faults
from unbroken.simulator.tokens import DEFAULT_LENGTH

# Longest any fault (stall, timeout) or pacing delay holds a connection; the server's close releases it earlier.
HOLD_LIMIT_SECONDS = 300.0


def _meta_number(meta: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    if key not in meta:
        return default
    try:
        value = float(meta[key])
    except (TypeError, ValueError):
        raise ApiError(400, f"metadata.{key} must be a number", param=f"metadata.{key}") from None
    if not low <= value <= high:
        raise ApiError(400, f"metadata.{key} must be between {low:g} and {high:g}", param=f"metadata.{key}")
    return value


def _meta_bool(meta: dict[str, Any], key: str, default: bool) -> bool:
    if key not in meta:
        return default
    value = str(meta[key]).strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off", ""):
        return False
    raise ApiError(400, f"metadata.{key} must be true or false", param=f"metadata.{key}")


@dataclass(frozen=True, slots=True)
class Controls:
    """The per-request knobs, from the request body's `metadata` (all values are strings there)."""

    seed: str = "0"
    ttft_seconds: float = 0.0
    tokens_per_second: float = 0.0
    length: int = DEFAULT_LENGTH
    literal_continuation: bool = True
    reject_prefill: bool = False
    parallel_tools: bool = False
    request_key: str | None = None
    faults: tuple[Fault, ...] = ()
    fault_attempts: int = 1
    # A share of requests (drawn from the upstream's seeded generator) refused with 503 before any content.
    fail_rate: float = 0.0
    # Report `cached_tokens` for the longest conversation prefix this upstream has seen before (a prompt cache).
    prompt_cache: bool = False

    @classmethod
    def from_metadata(cls, metadata: Any) -> Controls:
        meta = metadata if isinstance(metadata, dict) else {}
        try:
            faults = parse_faults(str(meta.get("sim_fault") or ""))
        except ValueError as exc:
            raise ApiError(400, f"metadata.sim_fault: {exc}", param="metadata.sim_fault") from None
        return cls(
            seed=str(meta.get("sim_seed", "0")),
            ttft_seconds=_meta_number(meta, "sim_ttft_ms", 0.0, 0.0, HOLD_LIMIT_SECONDS * 1000) / 1000.0,
            tokens_per_second=_meta_number(meta, "sim_tps", 0.0, 0.0, 1e9),
            length=int(_meta_number(meta, "sim_length", DEFAULT_LENGTH, 0, 1_000_000)),
            literal_continuation=_meta_bool(meta, "sim_literal_continuation", True),
            reject_prefill=_meta_bool(meta, "sim_reject_prefill", False),
            parallel_tools=_meta_bool(meta, "sim_parallel_tools", False),
            request_key=str(meta["sim_request"]) if meta.get("sim_request") else None,
            faults=faults,
            fault_attempts=int(_meta_number(meta, "sim_fault_attempts", 1, 0, 1_000_000)),
            fail_rate=_meta_number(meta, "sim_fail_rate", 0.0, 0.0, 1.0),
            prompt_cache=_meta_bool(meta, "sim_prompt_cache", False),
        )
