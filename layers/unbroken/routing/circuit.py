"""One deployment's circuit breaker state, as every instance shares it in a store record (kind `circuit`, name
`<model>/<deployment>`; versioned, so every change is a compare-and-set on the version it was decided from).

closed -> open (failures) -> after `open_seconds` the first instance to claim it holds the probe (`probing`, owner =
that instance, until the claim lapses) -> closed on a success, open again on a failure. While an instance probes,
the others see the circuit open; a probe whose instance died lapses and may be claimed again. Without a store the
one process is always the claimant: an open period that ended reads as half-open at once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from unbroken.journal.store import Record

RECORD_KIND = "circuit"
CLOSED, OPEN, PROBING = "closed", "open", "probing"


def record_name(model: str, deployment: str) -> str:
    return f"{model}/{deployment}"


@dataclass(frozen=True, slots=True)
class Circuit:
    state: str = CLOSED  # closed | open | probing
    until: float = 0.0  # open: end of the open period; probing: when the claim lapses (epoch seconds)
    owner: str = ""  # probing: the instance holding the probe
    reason: str = ""  # why it opened (or how it closed)
    changed_at: float = 0.0  # epoch seconds
    version: int = 0  # of the store record this state is (0: none written yet)

    def seen_by(self, instance: str, now: float, *, claims_implicitly: bool) -> str:
        """closed | open | half_open, as `instance` sees it at `now` (what `LiveView.circuit` says)."""
        if self.state == CLOSED:
            return "closed"
        if now < self.until:
            return "half_open" if self.state == PROBING and self.owner == instance else "open"
        # The open period is over (or a probe lapsed): half-open for whoever claims it.
        return "half_open" if claims_implicitly else "open"

    def claimable(self, now: float) -> bool:
        return self.state != CLOSED and now >= self.until

    def data(self) -> dict[str, Any]:
        return {"state": self.state, "until": self.until, "owner": self.owner, "reason": self.reason,
                "changed_at": self.changed_at}

    @classmethod
    def from_record(cls, record: Record) -> Circuit:
        d = record.data
        return cls(state=str(d.get("state", CLOSED)), until=float(d.get("until", 0.0)), owner=str(d.get("owner", "")),
                   reason=str(d.get("reason", "")), changed_at=float(d.get("changed_at", 0.0)),
                   version=record.version)
