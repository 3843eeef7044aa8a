"""What a failed attempt means for the rest of the request: the attempt loop asks `judge`, and turns a request that
got nothing from any deployment into a `Failure` with `failure_for`. One table, so the loop holds no error policy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from unbroken.errors import Failure, invalid
from unbroken.providers.base import FATAL_FOR_REQUEST, RETRY_SAME_DEPLOYMENT, ProviderError

# What the loop does next.
#   give_up      the caller gets the error now (nothing was sent yet, and no other deployment would do better)
#   refuse       a content-policy refusal: end the response `incomplete` with that reason, ask nobody else
#   drop_prefill the deployment rejected the assistant prefill: try it again at once with a continue-instruction
#   move_on      try another deployment (or this one again in a later round, if `retry_here`)
Action = Literal["give_up", "refuse", "drop_prefill", "move_on"]


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    # May this deployment be tried again in a later round (after backoff)?
    retry_here: bool = False
    # Leave out every deployment whose context window is not larger than this one's.
    needs_larger_window: bool = False


def judge(err: ProviderError, *, output_started: bool, prefill_in_use: bool) -> Verdict:
    """The decision for one failed attempt."""
    if err.kind in FATAL_FOR_REQUEST and not output_started:
        return Verdict("give_up")
    if err.kind == "content_filter":
        return Verdict("refuse")
    if err.kind == "prefill_rejected" and prefill_in_use:
        return Verdict("drop_prefill")
    return Verdict("move_on", retry_here=err.kind in RETRY_SAME_DEPLOYMENT,
                   needs_larger_window=err.kind == "context_length")


def failure_for(err: ProviderError | None, *, attempts: int) -> Failure:
    """The failure of a request that got no output from any deployment (`err` is the last attempt's)."""
    if err is None:
        return Failure("unavailable", "No deployment is available for this model.", code="upstream_unavailable")
    if err.kind in ("rate_limited", "quota"):
        return Failure("rate_limited", f"All deployments are rate limited ({attempts} attempts): {err.message}",
                       code="rate_limit_exceeded", retry_after=err.retry_after)
    if err.kind == "bad_request":
        return invalid(f"The upstream rejected the request: {err.message}", code="invalid_request")
    if err.kind == "context_length":
        return invalid(f"The input is too long for every deployment of this model: {err.message}",
                       code="context_length_exceeded", param="input")
    if err.kind == "content_filter":
        return invalid(f"The request was refused by the provider's content policy: "
                       f"{err.message}", code="content_filter")
    if err.kind in ("overloaded", "timeout"):
        return Failure("unavailable", f"Upstream unavailable after {attempts} attempts: {err.message}",
                       code="upstream_unavailable")
    return Failure("upstream_error", f"Upstream failed after {attempts} attempts: {err.message}",
                   code="upstream_error")
