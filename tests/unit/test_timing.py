"""shared.modeling.timing.fastest: which of several equivalent calls ran fastest here."""

from __future__ import annotations

import time

from shared.modeling.timing import fastest


def test_the_quicker_call_wins_and_every_call_runs_each_round():
    runs = {"slow": 0, "quick": 0}

    def call(name: str, seconds: float):
        def run():
            runs[name] += 1
            time.sleep(seconds)
        return run

    winner, best = fastest({"slow": call("slow", 0.005), "quick": call("quick", 0.0)}, rounds=3)
    assert winner == "quick"
    assert runs == {"slow": 3, "quick": 3}
    assert best["slow"] >= 0.005 > best["quick"]


def test_a_tie_goes_to_the_first_listed():
    winner, _ = fastest({"first": lambda: None, "second": lambda: None}, rounds=0)
    assert winner == "first"
