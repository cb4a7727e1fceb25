"""vlmq with a Redis Cluster as its store: 3 masters with a replica each, started by the test from the same
redis-server binary (tests/support/redis_topologies.py); the broker stays one plain Redis, as it must
(Celery's transport does not speak Cluster).

Workers, both APIs and `vlmq caption` run on it; then a master is SIGKILLed in the middle of a 100-job run,
its replica takes over, and every job still finishes.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from shared.config.settings import Settings
from shared.queue.celery_app import create_celery_app
from shared.store.jobs import JobStore
from shared.store.redis_conn import connect
from tests.support.captioning import read_lines, run_caption, write_images
from tests.support.images import png_bytes
from tests.support.redis_topologies import LocalCluster
from tests.support.reliability import (
    chains_outcome,
    submit_through_failover,
    submit_until_some_finish,
)
from tests.support.services import workers_and_apis

JOBS = 100
VISIBILITY_TIMEOUT_S = 5


@pytest.fixture(scope="module")
def cluster_stack(demo_model, redis_server):
    broker = redis_server.url.rsplit("/", 1)[0] + "/9"  # a database of this module's own: Celery's queues
    with LocalCluster(masters=3, replicas=1) as cluster:
        settings = Settings(broker_url=broker, store_url=cluster.url, key_prefix="cluster:", max_new_tokens=8,
                            visibility_timeout_s=VISIBILITY_TIMEOUT_S)
        with workers_and_apis(demo_model, settings) as (embed_url, generate_url):
            yield {"cluster": cluster, "settings": settings, "embed": embed_url, "generate": generate_url}
    connect(broker).flushdb()


def test_embed_then_generate_through_the_apis_on_a_cluster_store(cluster_stack):
    embed, generate = cluster_stack["embed"], cluster_stack["generate"]
    job = httpx.post(f"{embed}/v1/embeddings?wait=60", timeout=70,
                     files=[("file", (f"{i}.png", png_bytes(4000 + i), "image/png")) for i in range(3)]).json()
    assert job["status"] == "succeeded", job
    aliases = [image["alias"] for image in job["images"]]
    # Three containers: the generator fetches them in one round trip per node.
    prompt = " ".join(aliases) + " What are these?"
    waited = httpx.post(f"{generate}/v1/generate?wait=60", timeout=70,
                        json={"prompt": prompt, "max_tokens": 4, "temperature": 0}).json()
    assert waited["status"] == "succeeded", waited
    # The same request streamed: the token stream (an XREAD on the asyncio cluster client) ends with the same text.
    with httpx.stream("POST", f"{generate}/v1/generate", timeout=70,
                      json={"prompt": prompt, "max_tokens": 4, "temperature": 0, "stream": True}) as response:
        events = [json.loads(line[len("data: "):]) for line in response.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    assert "".join(e["text"] for e in events if e["type"] == "text") == waited["text"]
    assert events[-1]["type"] == "end" and events[-1]["finish_reason"] == waited["finish_reason"]


def test_vlmq_caption_on_a_cluster_store(cluster_stack, tmp_path):
    images = write_images(tmp_path / "images", range(12))
    out = tmp_path / "captions.jsonl"
    result = run_caption(cluster_stack["settings"], tmp_path / "images", "--prompt", "Describe this image.",
                         "--out", str(out), "--max-tokens", "4")
    assert result.returncode == 0, result.stderr
    lines = read_lines(out)
    assert sorted(line["path"] for line in lines) == sorted(str(p) for p in images)
    assert all(isinstance(line["caption"], str) for line in lines)


def test_a_master_killed_mid_run_loses_no_job(cluster_stack):
    """A hundred embed → generate chains; once ten have finished, one of the three masters is SIGKILLed and
    the other chains are sent while its replica is promoted (the cluster's own failover). Clients refresh
    their slot map and retry, a task that met the failover puts its message back; every job finishes."""
    cluster, settings = cluster_stack["cluster"], cluster_stack["settings"]
    client = connect(settings.effective_store_url)
    jobs = JobStore(client, settings.key_prefix, settings.job_ttl_s)
    celery = create_celery_app(settings)
    started = time.monotonic()
    chains, done_before = submit_until_some_finish(celery, jobs, client, settings.key_prefix, 5000, JOBS // 4, 10, timeout_s=60)
    victim = cluster.masters[0]
    victim.kill()
    killed_at = time.monotonic()
    refused = submit_through_failover(celery, jobs, chains, JOBS, 5000)
    figures, finished = chains_outcome("cluster master killed", client, settings.key_prefix, jobs, chains, started, timeout_s=120)
    figures.extra = {"done_before_kill": done_before, "submits_refused_during_failover": refused,
                     "seconds_after_kill": round(time.monotonic() - killed_at, 1), "primaries_after": len(client.get_primaries())}
    figures.print()
    assert figures.lost == 0 and figures.duplicated == 0
    assert [j["error"] for j in finished.values() if j["status"] != "succeeded"] == []
    assert victim.port not in {node.port for node in client.get_primaries()}  # its replica serves its slots now
