"""The three kinds of Redis URL vlmq takes (one server, a cluster, Sentinel) and how each reaches Celery.

Parsing and configuration (and a cluster nobody answers): the clients themselves run on real deployments in
tests/unit/test_cluster_store.py, tests/reliability/test_cluster.py and test_sentinel.py.
"""

from __future__ import annotations

import pytest

from shared.config.errors import StoreUnavailable
from shared.config.settings import Settings
from shared.queue.celery_app import celery_url, create_celery_app, result_backend_url
from shared.store.redis_conn import (
    connect,
    is_cluster_url,
    is_sentinel_url,
    mask,
    sentinel_parts,
)
from tests.support.services import free_port

SENTINELS = "sentinel://:pw@s1:26379/2?master_name=mymaster;sentinel://s2:26380;sentinel://s3"
CLUSTER = "redis+cluster://:pw@n1:7000,n2:7001,n3:7002"


def test_the_kind_of_a_url_is_its_scheme():
    assert is_cluster_url(CLUSTER) and is_cluster_url("rediss+cluster://n1:7000")
    assert is_sentinel_url(SENTINELS)
    assert not is_cluster_url("redis://h:6379/0") and not is_sentinel_url("redis://h:6379/0")


def test_a_sentinel_url_gives_every_sentinel_the_master_name_and_the_url_celery_takes():
    sentinels, master, celery = sentinel_parts(SENTINELS)
    assert sentinels == [("s1", 26379), ("s2", 26380), ("s3", 26379)]  # 26379: Sentinel's port when none is given
    assert master == "mymaster"
    assert celery == "sentinel://:pw@s1:26379/2;sentinel://s2:26380;sentinel://s3"


def test_a_sentinel_url_without_a_master_name_is_refused_without_its_password():
    with pytest.raises(ValueError, match=r"master_name") as caught:
        sentinel_parts("sentinel://:secret@s1:26379")
    assert "secret" not in str(caught.value)


def test_mask_hides_only_the_password():
    assert mask("redis+cluster://user:pw@n1:7000,n2:7001") == "redis+cluster://user:**@n1:7000,n2:7001"
    assert mask("redis://h:6379/0") == "redis://h:6379/0"


def test_celery_takes_sentinel_urls_with_the_master_name_in_its_options_and_refuses_a_cluster():
    assert celery_url("redis://h:6379/0") == ("redis://h:6379/0", {})
    assert celery_url(SENTINELS) == ("sentinel://:pw@s1:26379/2;sentinel://s2:26380;sentinel://s3", {"master_name": "mymaster"})
    with pytest.raises(ValueError, match="cannot use a Redis Cluster"):
        celery_url(CLUSTER)


def test_a_sentinel_broker_gets_vlmqs_sentinel_transport_with_the_master_name():
    conf = create_celery_app(Settings(broker_url=SENTINELS, key_prefix="p:")).conf
    assert conf.broker_transport == "shared.queue.broker:SentinelTransport"  # kombu's Sentinel channel + the atomic take
    assert conf.broker_transport_options["master_name"] == "mymaster"
    assert conf.broker_transport_options["visibility_timeout"] == Settings().visibility_timeout_s
    assert conf.result_backend_transport_options == {"global_keyprefix": "p:", "master_name": "mymaster"}


def test_with_a_cluster_store_celery_results_go_to_the_broker():
    settings = Settings(broker_url="redis://b:6379/0", store_url=CLUSTER, key_prefix="p:")
    assert result_backend_url(settings) == "redis://b:6379/0"
    assert create_celery_app(settings).conf.result_backend == "redis://b:6379/0"
    plain = Settings(broker_url="redis://b:6379/0", store_url="redis://s:6379/0")
    assert result_backend_url(plain) == "redis://s:6379/0"


def test_a_cluster_broker_is_refused_at_once():
    with pytest.raises(ValueError, match="VLMQ_BROKER_URL must be a redis:// or sentinel:// URL"):
        create_celery_app(Settings(broker_url=CLUSTER))


def test_a_cluster_no_node_of_which_answers_is_store_unavailable_naming_the_nodes_not_the_password():
    with pytest.raises(StoreUnavailable) as caught:
        connect(f"redis+cluster://:secret@127.0.0.1:{free_port()},127.0.0.1:{free_port()}", retries=0)
    assert caught.value.message.startswith("Redis Cluster at 127.0.0.1:")
    assert "unreachable" in caught.value.message and "secret" not in caught.value.message
