"""Compact, exact storage encoding shared by every store.

A batch of events is stored as one blob: a one-byte tag, then JSON (tag 0) or zlib-compressed JSON (tag 1) of a list
of records. A record is either an event dict, stored as is, or a run of consecutive `response.output_text.delta`
events of one content part, stored as `[first_seq, item_id, output_index, content_index, [delta, ...]]`. Only events
whose keys are exactly the canonical ones, in the canonical order, with `logprobs == []`, are merged, so decoding
rebuilds dicts equal to the originals, keys in the same order. Lone surrogates survive (`surrogatepass`).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from typing import Any

TEXT_DELTA = "response.output_text.delta"
# The canonical key order of a text delta (the order the spec's examples use); others are stored verbatim.
_DELTA_KEYS = ("type", "sequence_number", "item_id", "output_index", "content_index", "delta", "logprobs")

_RAW = 0
_ZLIB = 1
# Below this, zlib's header and checksum cost more than they save.
_COMPRESS_MIN = 96
_LEVEL = 6

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=True).encode
_loads = json.loads


def check_dense(events: Sequence[dict[str, Any]]) -> tuple[int, int]:
    """(first_seq, last_seq) of a non-empty batch; `ValueError` unless the sequence numbers are consecutive ints."""
    first = events[0].get("sequence_number")
    if type(first) is not int:
        raise ValueError("every event needs an integer sequence_number")
    for offset, event in enumerate(events):
        if event.get("sequence_number") != first + offset or type(event.get("sequence_number")) is not int:
            raise ValueError(
                f"sequence numbers must be dense: expected {first + offset}, got {event.get('sequence_number')!r}"
            )
    return first, first + len(events) - 1


def _mergeable(event: dict[str, Any]) -> bool:
    # Exact types matter: True is an int, 1.0 == 1; a merged record must decode to the very same values.
    return (
        tuple(event) == _DELTA_KEYS
        and event["type"] == TEXT_DELTA
        and type(event["sequence_number"]) is int
        and type(event["item_id"]) is str
        and type(event["output_index"]) is int
        and type(event["content_index"]) is int
        and type(event["delta"]) is str
        and type(event["logprobs"]) is list
        and not event["logprobs"]
    )


def _pack(obj: Any) -> bytes:
    raw = _dumps(obj).encode("utf-8", "surrogatepass")
    if len(raw) >= _COMPRESS_MIN:
        packed = zlib.compress(raw, _LEVEL)
        if len(packed) < len(raw):
            return bytes((_ZLIB,)) + packed
    return bytes((_RAW,)) + raw


def _unpack(blob: bytes) -> Any:
    tag = blob[0]
    if tag == _ZLIB:
        raw = zlib.decompress(memoryview(blob)[1:])
    elif tag == _RAW:
        raw = bytes(memoryview(blob)[1:])
    else:
        raise ValueError(f"unknown journal blob tag {tag}")
    return _loads(raw.decode("utf-8", "surrogatepass"))


def encode_events(events: Sequence[dict[str, Any]]) -> bytes:
    records: list[Any] = []
    run: list[Any] | None = None
    run_next = 0
    for event in events:
        if event.get("type") == TEXT_DELTA and _mergeable(event):
            seq = event["sequence_number"]
            if (
                run is not None
                and seq == run_next
                and run[1] == event["item_id"]
                and run[2] == event["output_index"]
                and run[3] == event["content_index"]
            ):
                run[4].append(event["delta"])
            else:
                run = [seq, event["item_id"], event["output_index"], event["content_index"], [event["delta"]]]
                records.append(run)
            run_next = seq + 1
        else:
            records.append(event)
            run = None
    return _pack(records)


def decode_events(blob: bytes) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for record in _unpack(blob):
        if type(record) is list:
            seq, item_id, output_index, content_index, deltas = record
            for offset, delta in enumerate(deltas):
                out.append(
                    {
                        "type": TEXT_DELTA,
                        "sequence_number": seq + offset,
                        "item_id": item_id,
                        "output_index": output_index,
                        "content_index": content_index,
                        "delta": delta,
                        "logprobs": [],
                    }
                )
        else:
            out.append(record)
    return out


def encode_json(obj: Any) -> bytes:
    """A snapshot (request / response object) in the same tagged format."""
    return _pack(obj)


def decode_json(blob: bytes) -> Any:
    return _unpack(blob)
