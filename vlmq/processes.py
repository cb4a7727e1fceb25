"""Supervising child processes: stop them all on SIGINT/SIGTERM or when one dies."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from typing import Callable

_PR_SET_PDEATHSIG = 1


def _libc_prctl():
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl


# Looked up here, not in the child: between fork and exec only async-signal-safe work is wise.
_prctl = _libc_prctl()


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: SIGTERM from the kernel when the thread that
    # started it (the parent's) exits, however it exits — even by SIGKILL.
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` that ties a child's life to its parent's (Linux); None where unsupported."""
    return _die_with_parent if _prctl is not None else None


def stop_all(children: list[subprocess.Popen], timeout_s: float = 20.0) -> None:
    """SIGTERM every live child, wait up to `timeout_s` in all, then SIGKILL what is left."""
    for child in children:
        if child.poll() is None:
            child.terminate()
    deadline = time.monotonic() + timeout_s
    for child in children:
        try:
            child.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def describe_exit(returncode: int) -> str:
    """How a child ended: `exited with status N`, or `was killed by SIGKILL` (Popen's negative return codes)."""
    if returncode < 0:
        return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with status {returncode}"


def wait_all_or_stop(children: list[subprocess.Popen], names: list[str]) -> int:
    """Block until a signal arrives or a child exits; then stop every child. Returns an exit status.

    A child that ends first is named on stderr, with how it ended, before the rest are stopped.
    """
    stopping = False

    def _on_signal(signum, _frame):
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stopping and all(child.poll() is None for child in children):
            time.sleep(0.2)
        if not stopping:
            name, child = next((n, c) for n, c in zip(names, children) if c.poll() is not None)
            print(f"{name} (pid {child.pid}) {describe_exit(child.returncode)}; stopping the rest", file=sys.stderr, flush=True)
        failed = [c for c in children if c.poll() not in (None, 0)]
        return 0 if stopping or not failed else 1
    finally:
        stop_all(children)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
