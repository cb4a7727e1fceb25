"""vlmq on a Redis Sentinel group: broker and store both `sentinel://` URLs naming a master with one replica and
three Sentinels (tests/support/redis_topologies.py). The master is SIGKILLed in the middle of a 100-job run;
the Sentinels promote the replica, the workers (Celery's Sentinel transport with vlmq's atomic take) and the
APIs reconnect to it, and every job finishes.
"""

from __future__ import annotations

import time

import pytest

from shared.config.settings import Settings
from shared.queue.celery_app import create_celery_app
from shared.store.jobs import JobStore
from shared.store.redis_conn import connect
from tests.support.redis_topologies import LocalSentinel
from tests.support.reliability import (
    chains_outcome,
    embed_then_generate,
    submit_through_failover,
    submit_until_some_finish,
)
from tests.support.services import workers_and_apis

JOBS = 100
VISIBILITY_TIMEOUT_S = 5


@pytest.fixture(scope="module")
def sentinel_stack(demo_model):
    with LocalSentinel(replicas=1) as group:
        settings = Settings(broker_url=group.url(), key_prefix="sentinel:", max_new_tokens=8,
                            visibility_timeout_s=VISIBILITY_TIMEOUT_S)
        with workers_and_apis(demo_model, settings) as (embed_url, generate_url):
            yield {"group": group, "settings": settings, "embed": embed_url, "generate": generate_url}


def test_a_master_failover_mid_run_loses_no_job(sentinel_stack):
    group, settings = sentinel_stack["group"], sentinel_stack["settings"]
    embed_then_generate(sentinel_stack["embed"], sentinel_stack["generate"], 6000)
    client = connect(settings.effective_store_url)
    jobs = JobStore(client, settings.key_prefix, settings.job_ttl_s)
    celery = create_celery_app(settings)
    started = time.monotonic()
    chains, done_before = submit_until_some_finish(celery, jobs, client, settings.key_prefix, 6100, JOBS // 4, 10, timeout_s=60)
    old_master = group.current_master_port()
    group.server_on(old_master).kill()
    killed_at = time.monotonic()
    refused = submit_through_failover(celery, jobs, chains, JOBS, 6100)
    figures, finished = chains_outcome("sentinel failover", client, settings.key_prefix, jobs, chains, started, timeout_s=120)
    figures.extra = {"done_before_failover": done_before, "submits_refused_during_failover": refused,
                     "seconds_after_failover": round(time.monotonic() - killed_at, 1)}
    figures.print()
    new_master = connect(f"redis://127.0.0.1:{group.current_master_port()}/0")
    assert new_master.info("replication")["role"] == "master" and group.current_master_port() != old_master
    # The workers took from the new master with vlmq's atomic take (BLMOVE, then the script), not kombu's BRPOP.
    stats = new_master.info("commandstats")
    assert stats["cmdstat_blmove"]["calls"] > 0 and "cmdstat_brpop" not in stats
    assert figures.lost == 0 and figures.duplicated == 0
    assert [j["error"] for j in finished.values() if j["status"] != "succeeded"] == []
    # The APIs' clients (sync and asyncio, through Sentinel) found the new master too.
    embed_then_generate(sentinel_stack["embed"], sentinel_stack["generate"], 6001)
