"""Fixtures of the decode-kernel tests (test_decode_kernel.py, test_paged_decode.py)."""

from __future__ import annotations

import pytest

from cuda_ext import build
from cuda_ext.decode import ops as decode
from cuda_ext.decode.ops import set_decode_kernel


@pytest.fixture(scope="module")
def ops():
    """The built extension (once per machine, cached); skips where the toolchain is missing (a failed build fails)."""
    try:
        return build.decode_cpu_ops()
    except build.ToolchainMissing as error:
        pytest.skip(f"toolchain not found: {error}")


@pytest.fixture
def mode():
    previous = decode.decode_kernel()
    yield set_decode_kernel
    set_decode_kernel(previous)
