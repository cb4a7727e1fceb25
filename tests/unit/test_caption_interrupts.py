"""`vlmq caption`'s sending of a chain: a Ctrl-C between creating a job and keeping its id waits for the id."""

from __future__ import annotations

import os
import signal

import pytest

from vlmq.caption.run import _interrupts_deferred


def test_a_ctrl_c_inside_the_block_is_raised_at_its_end():
    handler = signal.getsignal(signal.SIGINT)
    ran = []
    with pytest.raises(KeyboardInterrupt):
        with _interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            ran.append("after the signal")  # still runs: the job id it stands for is kept
    assert ran == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is handler  # restored


def test_without_a_ctrl_c_the_block_runs_as_usual():
    with _interrupts_deferred():
        pass
    with pytest.raises(KeyboardInterrupt):  # Python's own handler is back: it raises at once
        os.kill(os.getpid(), signal.SIGINT)
