"""kombu's Redis transport, with a take that cannot lose a message to a dying worker.

kombu's consumer takes a message with ``BRPOP`` and only afterwards, in a
second round trip, records it in the ``unacked`` hash that brings it back if the
worker dies. A worker killed in between — the reply in its socket, or being
parsed, or waiting for the event loop while the worker's threads hold the GIL —
has removed the message from its queue without recording it anywhere: the job
is lost for good (the SIGKILL test, tests/reliability/test_worker_death.py,
lost one job in a few runs this way).

Here the consumer waits with ``BLMOVE queue queue RIGHT RIGHT`` instead, which
blocks until the queue is non-empty but leaves the message in place, then takes
it with a Lua script that pops it and records it in ``unacked`` and
``unacked_index`` in one atomic step — the same entries kombu's ``QoS.append``
writes (which then rewrites them, harmlessly). A message is thus at every
moment in its queue or in ``unacked``, and ``restore_visible`` brings back any
whose worker died. When several workers wait on one queue, all wake for a
message and one takes it; the others find nothing and wait again.

``close`` also survives a Redis that went away while a BLMOVE was waiting (kombu's
own would end the worker then; see ``Channel.close``).

Behind Sentinel (``sentinel://`` broker URLs) ``SentinelTransport`` is kombu's Sentinel
transport with the same take: kombu's Sentinel channel finds the master (and finds it
again after a failover, on reconnection), this channel takes from it. What a failover
can lose is Redis replication's to lose, not the take's: see docs/SCALING.md.

Used for consumers of a single queue without priorities (how vlmq's workers
consume); anything else falls back to kombu's BRPOP. Selected in
``create_celery_app`` with ``broker_transport``.
"""

from __future__ import annotations

from queue import Empty
from time import monotonic, time

from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

TRANSPORT = "shared.queue.broker:Transport"
SENTINEL_TRANSPORT = "shared.queue.broker:SentinelTransport"

# KEYS: queue, unacked hash, unacked index; ARGV: now. Peeks first so that a message
# that is not kombu's JSON is still taken (and left to kombu to handle) rather than
# popped by a script that then fails half-way: Lua scripts do not roll back.
_TAKE = """
local item = redis.call('LINDEX', KEYS[1], -1)
if not item then return false end
redis.call('RPOP', KEYS[1])
local ok, message = pcall(cjson.decode, item)
if ok and type(message) == 'table' and type(message['properties']) == 'table' then
  local tag = message['properties']['delivery_tag']
  local info = message['properties']['delivery_info']
  if type(tag) == 'string' and type(info) == 'table' then
    redis.call('ZADD', KEYS[3], ARGV[1], tag)
    redis.call('HSET', KEYS[2], tag,
      '[' .. item .. ',' .. cjson.encode(info['exchange'] or '') .. ',' .. cjson.encode(info['routing_key'] or '') .. ']')
  end
end
return item
"""


class Channel(kombu_redis.Channel):
    _take_queue: str | None = None

    def _takes_atomically(self, queues: list[str]) -> bool:
        return (len(queues) == 1 and self.ack_emulation and not self.global_keyprefix
                and list(self.priority_steps) == [0])

    def _brpop_start(self, timeout=None):
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues or not self._takes_atomically(queues):
            return super()._brpop_start(timeout)
        if timeout is None:
            timeout = self.brpop_timeout
        self._take_queue = queues[0]
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()
        # Wait until the queue holds something, without taking it (the list is unchanged).
        self.client.connection.send_command("BLMOVE", self._take_queue, self._take_queue, "RIGHT", "RIGHT", timeout or 0)

    def _brpop_read(self, **options):
        queue, self._take_queue = self._take_queue, None
        if queue is None:
            return super()._brpop_read(**options)
        try:
            try:
                waiting = self.client.parse_response(self.client.connection, "BLMOVE", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if waiting is None:
                raise Empty()
            taken = self.client.eval(_TAKE, 3, queue, self.unacked_key, self.unacked_index_key, time())
            if taken is None:
                raise Empty()  # another worker took it first
            self._queue_cycle.rotate(queue)
            self.connection._deliver(loads(bytes_to_str(taken)), queue)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def close(self):
        # kombu's close first reads the reply of a BLMOVE still waiting; with Redis gone that raises
        # before the channel is marked closed. Celery then drops the transport (collect) and closes
        # again, and that close restores the unacked messages through a transport without a client:
        # AttributeError, which ends the worker ("Unrecoverable error"). Without Redis there is no
        # reply to read; the rest of the close goes on (the messages stay in ``unacked``).
        if self._in_poll:
            try:
                self._brpop_read()
            except (Empty, *self.connection_errors):
                pass
        super().close()


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    """The atomic take (``Channel``) on the master kombu's Sentinel channel connects to."""


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel

    def __init__(self, client, **kwargs):
        super().__init__(client, **kwargs)
        # The ';'-separated entries of a Sentinel URL are Sentinels of one master, not alternate brokers,
        # but kombu cycles through them as such on a connection error, and its switch re-reads the
        # transport from the entry's scheme: after a failover the worker would consume through kombu's
        # own Sentinel transport (BRPOP, no atomic take). The Sentinels already lead to the new master:
        # nothing to switch to.
        client.cycle = None
