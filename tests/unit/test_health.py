"""The health board (`routing/health.py`, circuit breaker per deployment) and the ranking (`routing/policy.py`)."""

from __future__ import annotations

import pytest

from unbroken.config import Deployment, HealthSettings, PublicModel
from unbroken.routing.health import HealthBoard, HedgeBudget
from unbroken.routing.policy import plan
from unbroken.routing.profile import RequestProfile


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


FAILURES_TO_OPEN = HealthSettings().failures_to_open
OPEN_SECONDS = HealthSettings().open_seconds


def model(*names: str) -> PublicModel:
    return PublicModel(name="m", deployments=[Deployment(name=n, provider="openai", model=f"x-{n}") for n in names])


def names(deployments: list[Deployment]) -> list[str]:
    return [d.name for d in deployments]


def test_the_circuit_opens_after_consecutive_failures(clock: Clock) -> None:
    board = HealthBoard(clock)
    for _ in range(FAILURES_TO_OPEN - 1):
        board.record_failure("m", "a")
    assert not (board.view("m", "a").circuit == "open")
    board.record_failure("m", "a")
    assert (board.view("m", "a").circuit == "open")
    assert (board.view("m", "b").circuit == "open") is False  # per deployment
    assert (board.view("other", "a").circuit == "open") is False  # and per model


def test_a_success_between_failures_resets_the_count(clock: Clock) -> None:
    board = HealthBoard(clock)
    for _ in range(FAILURES_TO_OPEN - 1):
        board.record_failure("m", "a")
    board.record_success("m", "a", None)
    for _ in range(FAILURES_TO_OPEN - 1):
        board.record_failure("m", "a")
    assert not (board.view("m", "a").circuit == "open")


def test_the_circuit_goes_back_after_open_seconds(clock: Clock) -> None:
    board = HealthBoard(clock)
    for _ in range(FAILURES_TO_OPEN):
        board.record_failure("m", "a")
    clock.now += OPEN_SECONDS - 0.001
    assert (board.view("m", "a").circuit == "open")
    clock.now += 0.002
    assert not (board.view("m", "a").circuit == "open")


def test_a_success_closes_an_open_circuit(clock: Clock) -> None:
    board = HealthBoard(clock)
    for _ in range(FAILURES_TO_OPEN):
        board.record_failure("m", "a")
    board.record_success("m", "a", 0.5)
    assert board.view("m", "a").circuit == "closed" and board.of("m", "a").consecutive_failures == 0


def rank(m: PublicModel, board: HealthBoard) -> list[Deployment]:
    """The policy's attempt order for a plain request (`ordered`: as configured, open circuits last)."""
    return list(plan(m, board, RequestProfile(100, None, (), None)).candidates)


def test_rank_puts_open_circuits_last_but_keeps_them(clock: Clock) -> None:
    board = HealthBoard(clock)
    m = model("a", "b", "c")
    assert names(rank(m, board)) == ["a", "b", "c"]
    for _ in range(FAILURES_TO_OPEN):
        board.record_failure("m", "a")
    assert names(rank(m, board)) == ["b", "c", "a"]
    clock.now += OPEN_SECONDS + 1
    assert names(rank(m, board)) == ["a", "b", "c"]


def test_ttft_p95_needs_a_few_samples_then_follows_the_tail() -> None:
    board = HealthBoard()
    assert board.ttft_p95("m", "a") is None
    for i in range(100):
        board.record_success("m", "a", 2.0 if i % 10 == 0 else 0.2)  # a tenth of first tokens are slow
    p95 = board.ttft_p95("m", "a")
    assert p95 is not None and 1.0 < p95 < 3.0
    for _ in range(300):
        board.record_success("m", "a", 0.2)  # the slow ones stop: the estimate decays back
    p95 = board.ttft_p95("m", "a")
    assert p95 is not None and p95 < 0.3


def test_hedge_budget_share_decays() -> None:
    budget = HedgeBudget()
    budget.note_request()
    assert budget.allows(0.1, 1.0)
    budget.hedged += 1
    allowed = 0
    for _ in range(200):
        budget.note_request()
        if budget.allows(0.1, 1.0):
            budget.hedged += 1
            allowed += 1
    assert 15 <= allowed <= 25  # about a tenth
