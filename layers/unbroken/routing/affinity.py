"""Cache affinity: which deployment served a conversation's previous turn, so that the next one can be priced with
a prompt-cache hit there. A `previous_response_id` names it (the stored predecessor's `router.served_by`); else the
same long prompt prefix (`tokens.prefix_key`) seen in this process shortly before does."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

MAX_PREFIXES = 10_000


@dataclass(frozen=True, slots=True)
class Predecessor:
    """The deployment that served the turn before, and how many input tokens this request shares with what was
    sent to it then (its cacheable prefix)."""

    deployment: str
    shared_tokens: int
    via: Literal["previous_response_id", "prompt_prefix"]


class AffinityMemory:
    """Prompt prefix -> (deployment, input tokens, expiry), the most recent MAX_PREFIXES, per process."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._seen: OrderedDict[str, tuple[str, int, float]] = OrderedDict()
        self._now = clock

    def remember(self, key: str, deployment: str, input_tokens: int, ttl_s: float) -> None:
        self._seen[key] = (deployment, input_tokens, self._now() + ttl_s)
        self._seen.move_to_end(key)
        while len(self._seen) > MAX_PREFIXES:
            self._seen.popitem(last=False)

    def recall(self, key: str, input_tokens: int) -> Predecessor | None:
        """The deployment that last served this prefix, if within its TTL. The shared part is the smaller of the two
        prompts: a conversation's next prompt is the last one plus the new turns."""
        seen = self._seen.get(key)
        if seen is None:
            return None
        deployment, tokens, expires = seen
        if self._now() >= expires:
            del self._seen[key]
            return None
        return Predecessor(deployment, min(tokens, input_tokens), "prompt_prefix")
