"""The tuning search on synthetic cost/quality surfaces, where the right answer is known."""

from __future__ import annotations

import pytest

from fcpass.contract.errors import FcpassError
from fcpass.search import Knob, Measurement, Space, choose, search

TARGET = 30.0


def surface(spec: str) -> Measurement:
    """A FastCache-like surface: speed grows with both knobs, quality falls with their product, and the `bad`
    approximation loses 4 dB at the same skipping. The fastest setting at >= 30 dB is planted at a=5, b=4
    with `good` (a*b = 20, the most that holds; a weighs a little more than b in speed)."""
    options = dict(kv.split("=") for kv in spec.partition(":")[2].split(","))
    a, b = int(options["a"]), int(options["b"])
    loss = 0.0 if options["approx"] == "good" else 4.0
    speed = 1 + 0.4 * a * b + 0.01 * a
    return Measurement(psnr=46 - 0.8 * a * b - loss, ssim=0.9, mac_ideal=speed, wall_seconds=10 / speed)


SPACE = Space("fc", (Knob("approx", ("bad", "good"), ordered=False), Knob("a", tuple(range(1, 9))),
                     Knob("b", tuple(range(1, 9)))), start=(0, 0, 0))


def holds(m: Measurement) -> bool:
    return m.psnr >= TARGET


def exact_time(specs: list[str]) -> dict[str, float]:
    return {s: surface(s).mac_ideal for s in specs}


def test_the_search_finds_the_planted_optimum() -> None:
    result = search([SPACE], surface, holds, budget=40, seed=1, progress=False)
    winner = choose(result, exact_time)
    assert winner is not None and winner.settings == {"approx": "good", "a": 5, "b": 4}
    assert winner.measured.psnr == pytest.approx(30.0) and winner.timed == pytest.approx(9.05)


def test_the_winner_always_holds_the_target_and_the_budget_is_kept() -> None:
    for seed in range(6):
        for budget in (1, 3, 7, 20):
            result = search([SPACE], surface, holds, budget=budget, seed=seed, progress=False)
            assert len(result.trials) <= budget
            winner = choose(result, exact_time)
            assert winner is None or winner.measured.psnr >= TARGET
            assert all(t.holds == (t.measured.psnr >= TARGET) for t in result.trials)


def test_the_search_is_deterministic_for_a_seed() -> None:
    runs = [[t.spec for t in search([SPACE], surface, holds, budget=25, seed=7, progress=False).trials]
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_a_policy_that_cannot_run_is_skipped_with_its_reason() -> None:
    broken = Space("broken", (Knob("k", (1, 2)),), start=(0,))

    def evaluate(spec: str) -> Measurement:
        if spec.startswith("broken"):
            raise FcpassError("needs a region this graph lacks")
        return surface(spec)

    result = search([broken, SPACE], evaluate, holds, budget=30, seed=0, progress=False)
    assert result.skipped == {"broken": "needs a region this graph lacks"}
    assert {t.space for t in result.trials} == {"fc"} and len(result.trials) == 30


def test_near_ties_in_wall_time_go_to_the_larger_mac_ideal() -> None:
    slow = Space("x", (Knob("k", (1, 2, 3)),), start=(0,))

    def evaluate(spec: str) -> Measurement:
        k = int(spec[-1])
        return Measurement(psnr=40.0 - k, ssim=1.0, mac_ideal=2.0 + 0.1 * k, wall_seconds=1.0)

    result = search([slow], evaluate, holds, budget=3, progress=False)
    noisy = {"x:k=1": 2.00, "x:k=2": 1.99, "x:k=3": 1.50}  # k=2 within 2% of the fastest, k=3 not
    winner = choose(result, lambda specs: {s: noisy[s] for s in specs}, per_space=3)
    assert winner is not None and winner.spec == "x:k=2"


def test_no_holding_trial_means_no_winner() -> None:
    result = search([SPACE], surface, lambda m: False, budget=5, progress=False)
    assert choose(result, exact_time) is None and result.winner is None


def test_a_budget_below_one_is_refused() -> None:
    with pytest.raises(FcpassError, match="--budget 0 must be at least 1"):
        search([SPACE], surface, holds, budget=0, progress=False)


def test_a_spec_that_fixes_every_knob_is_one_trial() -> None:
    fixed = Space("fora:interval=3", (), start=())
    result = search([fixed], lambda spec: Measurement(35.0, 1.0, 2.0, 1.0), holds, budget=5, progress=False)
    assert [t.spec for t in result.trials] == ["fora:interval=3"]
