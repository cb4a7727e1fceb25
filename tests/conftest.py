"""Fixtures shared by all tests: one real redis-server per session, a fresh key prefix per test,
the CPU decode kernels built before any test runs."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch

from cuda_ext.decode.ops import cpu_decode_ops
from shared.config.settings import Settings
from shared.config.switch import Switch
from shared.store.redis_conn import connect
from vlmq.redis_server import EmbeddedRedis


@pytest.fixture(scope="session", autouse=True)
def decode_kernels_built() -> None:
    """Build (or load from the cache) the CPU decode kernels once, up front: on a fresh machine the
    first build takes ~20 s, which would otherwise land in a generate worker's model load, inside the
    60 s that `tests.support.services.worker_processes` gives workers starting side by side to report in.
    Where they cannot be built the models run the torch path (one logged warning), as in production."""
    cpu_decode_ops("cpu", torch.float32)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    """A private redis-server for the whole test session (no persistence)."""
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    return redis_server.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = connect(redis_url)
    yield client
    client.close()


@pytest.fixture
def key_prefix(redis_client: redis.Redis) -> Iterator[str]:
    """A key prefix no other test uses; its keys are deleted afterwards."""
    prefix = f"t{uuid.uuid4().hex[:12]}:"
    yield prefix
    keys = list(redis_client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        redis_client.delete(*keys)


@pytest.fixture
def settings(redis_url: str, key_prefix: str) -> Settings:
    """Settings pointing broker and store at the session's Redis, with this test's key prefix."""
    return Settings(broker_url=redis_url, store_url=redis_url, key_prefix=key_prefix)


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory) -> Path:
    """The tiny random-weight LLaVA `vlmq demo-model` writes (no transformers needed): for service tests."""
    from vlmq.demo_model import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("demo") / "llava")


@pytest.fixture(scope="session")
def service_workers(demo_model, redis_server) -> Iterator[Settings]:
    """One embed and one generate worker for the rest of the session, for tests that differ only in
    API settings (limits, keys, allowed roots) and put their own API servers in front of them.

    They use Redis database 5: Celery's queues are not under the key prefix, so workers
    sharing a database with another test's would take that test's jobs.
    """
    from tests.support.services import worker_processes

    url = redis_server.url.rsplit("/", 1)[0] + "/5"
    settings = Settings(broker_url=url, store_url=url, key_prefix="svc:")
    with worker_processes(["embed", "generate"], demo_model, settings):
        yield settings
    client = connect(url)
    client.flushdb()  # database 5 is these workers' alone
    client.close()


@pytest.fixture
def every_gemm_mkl_packed(monkeypatch) -> list[int]:
    """Every float32 CPU linear of the vision towers on MKL-packed weights, however small (a tiny
    model's weights are below `MIN_PACKED_ELEMENTS`), a count not settled on in blocks of 8 rows, so that
    whole blocks and shorter last ones both run. Yields the number of packed GEMM calls, for the test
    to see that some ran.
    Optional path: skipped where torch was built without MKL (then the oneDNN path runs everywhere)."""
    from embedder_service.models import mkl_packed

    if not mkl_packed.available():
        pytest.skip("this torch build has no MKL packed GEMM")
    # "on": also on a CPU where oneDNN is faster
    monkeypatch.setattr(mkl_packed, "packed_weights", Switch("packed_weights", Settings(packed_weights="on")))
    monkeypatch.setattr(mkl_packed, "MIN_PACKED_ELEMENTS", 0)
    monkeypatch.setattr(mkl_packed, "BLOCK_ROWS", 8)
    calls = [0]
    packed_linear = mkl_packed.linear

    def counted(*args):
        out = packed_linear(*args)
        calls[0] += out is not None
        return out

    monkeypatch.setattr(mkl_packed, "linear", counted)
    return calls


@pytest.fixture(params=["as-deployed", "mkl-packed"])
def gemm_paths(request) -> list[int] | None:
    """Runs a test twice: with the GEMMs as deployed (None), and with `every_gemm_mkl_packed` (its call count)."""
    return request.getfixturevalue("every_gemm_mkl_packed") if request.param == "mkl-packed" else None
