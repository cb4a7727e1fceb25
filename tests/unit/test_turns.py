"""`shared.modeling.turns.Turns`: one holder at a time, in the order they asked (`vlmq worker all`)."""

import threading
import time

from shared.modeling.turns import Turns


def _enter_in_thread(turns: Turns, name: str, entered: list[str]) -> threading.Thread:
    def take_turn() -> None:
        with turns:
            entered.append(name)

    thread = threading.Thread(target=take_turn)
    thread.start()
    time.sleep(0.05)  # it has asked by now: the next thread asks after it
    return thread


def test_waiting_threads_take_their_turns_in_the_order_they_asked():
    turns, entered = Turns(), []
    with turns:
        threads = [_enter_in_thread(turns, name, entered) for name in ("first", "second", "third")]
        assert entered == []  # nobody enters while the turn is held
    for thread in threads:
        thread.join(timeout=5)
    assert entered == ["first", "second", "third"]


def test_a_holder_that_asks_again_at_once_waits_behind_the_thread_already_waiting():
    # The engine's loop releases its turn and asks for the next at once; a plain Lock hands it straight back,
    # starving the vision batches.
    turns, entered = Turns(), []
    with turns:
        waiting = _enter_in_thread(turns, "waiting", entered)
    with turns:
        entered.append("again")
    waiting.join(timeout=5)
    assert entered == ["waiting", "again"]


def test_a_turn_is_passed_on_when_its_holder_raises():
    turns, entered = Turns(), []
    try:
        with turns:
            raise ValueError("a failed forward")
    except ValueError:
        pass
    _enter_in_thread(turns, "next", entered).join(timeout=5)
    assert entered == ["next"]
