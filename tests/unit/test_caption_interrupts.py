"""`vlmq caption`'s sending of a chain: a Ctrl-C between creating a job and keeping its id waits for the id."""

from __future__ import annotations

import os
import signal

import pytest

from vlmq.caption.run import _interrupts_deferred


@pytest.fixture
def python_sigint_handler():
    """Python's own SIGINT handler for the test, whatever this process inherited (a shell's background job ignores SIGINT)."""
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, inherited)


def test_a_ctrl_c_inside_the_block_is_raised_at_its_end(python_sigint_handler):
    ran = []
    with pytest.raises(KeyboardInterrupt):
        with _interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            ran.append("after the signal")  # still runs: the job id it stands for is kept
    assert ran == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_where_sigint_is_ignored_the_block_leaves_it_ignored():
    inherited = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with _interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, inherited)
