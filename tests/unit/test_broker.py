"""shared.queue.broker: a message is at every moment in its queue or in `unacked`, never in neither."""

from __future__ import annotations

import contextlib
import json
import socket
import time

import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue

from shared.queue.broker import _TAKE, TRANSPORT, Channel
from shared.store.redis_conn import connect
from vlmq.redis_server import EmbeddedRedis


@pytest.fixture
def broker_url(redis_server):
    url = redis_server.url.rsplit("/", 1)[0] + "/2"  # a database of this module's own
    yield url
    client = connect(url)
    client.flushdb()
    client.close()


def publish(url: str, body: dict) -> None:
    queue = Queue("work", Exchange("work", type="direct"), routing_key="work")
    with Connection(url, transport=TRANSPORT, transport_options={"priority_steps": [0]}) as connection:
        Producer(connection).publish(body, exchange=queue.exchange, routing_key="work", declare=[queue], serializer="json")


def test_the_take_moves_a_message_into_unacked_in_one_step_and_a_sweep_brings_it_back(broker_url):
    publish(broker_url, {"n": 1})
    client = connect(broker_url)
    [raw] = client.lrange("work", 0, -1)
    tag = json.loads(raw)["properties"]["delivery_tag"]

    taken = client.eval(_TAKE, 3, "work", "unacked", "unacked_index", time.time())
    # One script: the queue lost it and `unacked` holds it, as kombu's QoS.append writes it.
    assert taken == raw and client.llen("work") == 0
    assert json.loads(client.hget("unacked", tag)) == [json.loads(raw), "work", "work"]
    assert client.zscore("unacked_index", tag) is not None
    assert client.eval(_TAKE, 3, "work", "unacked", "unacked_index", time.time()) is None  # nothing left to take

    # The worker that took it "died" (never acked): kombu's sweep puts it back on the queue.
    with Connection(broker_url, transport=TRANSPORT, transport_options={"visibility_timeout": 0, "priority_steps": [0]}) as connection:
        connection.default_channel.qos.restore_visible(num=10)
    assert client.llen("work") == 1 and client.hlen("unacked") == 0


def test_a_consumer_takes_with_blmove_and_acks(broker_url):
    publish(broker_url, {"n": 2})
    client = connect(broker_url)
    seen = []
    blmoves = _calls(client, "blmove")
    queue = Queue("work", Exchange("work", type="direct"), routing_key="work")
    with Connection(broker_url, transport=TRANSPORT, transport_options={"priority_steps": [0]}) as connection:
        channel = connection.channel()
        assert isinstance(channel, Channel)

        def on_message(body, message):
            # Received: recorded as unacked (by the take, then again by kombu), gone from the queue.
            seen.append((body, client.hexists("unacked", message.delivery_tag), client.llen("work")))
            message.ack()

        with Consumer(channel, [queue], callbacks=[on_message], accept=["json"]):
            connection.drain_events(timeout=5)
        channel.close()
    assert seen == [({"n": 2}, True, 0)]
    assert client.hlen("unacked") == 0  # acked
    assert _calls(client, "blmove") > blmoves  # it waited with BLMOVE, not BRPOP


def _calls(client, command: str) -> int:
    return client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0)


def test_closing_a_consumer_after_redis_died_mid_wait_does_not_crash_and_keeps_its_message():
    """What Celery's consumer does when the broker goes away: ``collect()`` (drops the transport),
    then ``close()``. A channel whose BLMOVE was still waiting for its reply used to raise out of the
    first close before it was marked closed; the second one then restored its unacked message
    through a transport without a client — AttributeError, the worker's "Unrecoverable error"."""
    with EmbeddedRedis(appendonly=True) as server:
        url = server.url
        publish(url, {"n": 3})
        held = []
        queue = Queue("work", Exchange("work", type="direct"), routing_key="work")
        connection = Connection(url, transport=TRANSPORT, transport_options={"priority_steps": [0]})
        consumer = Consumer(connection.default_channel, [queue], callbacks=[lambda body, message: held.append(body)],
                            accept=["json"])
        consumer.consume()
        # A second channel as Celery's remote-control one: a fanout queue deleted when its channel
        # closes — with Redis down that close raises, and the transport's close stops there.
        control = Queue("control", Exchange("control", type="fanout"), auto_delete=True)
        Consumer(connection.channel(), [control], callbacks=[lambda body, message: None], accept=["json"]).consume()
        with contextlib.suppress(socket.timeout):
            while True:  # until the message is delivered (not acked), and the next BLMOVE waits
                connection.drain_events(timeout=0.5)
        assert connection.default_channel._in_poll is not None
        server.stop()
        connection.collect(socket_timeout=1)
        connection.close()  # raised AttributeError("'NoneType' object has no attribute 'hostname'")
        server.start()
        client = connect(url)
        # Nothing lost: the message is still recorded as taken, so the visibility sweep brings it back.
        assert held == [{"n": 3}] and client.llen("work") == 0 and client.hlen("unacked") == 1
