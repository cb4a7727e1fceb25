"""Claims in Redis that let clients of one run share the work without a coordinator (docs/DESIGN.md §10).

A claim is one key per thing (a unit of the input, or the SHA-256 of some image
bytes) under ``{prefix}caption:{run}:{kind}:{name}``. It holds the claiming
client's id with a TTL while the work is under way, then its outcome for good
(`done` for a unit, the captions for some bytes). A client refreshes the TTL of
what it holds while it works on it; one that dies stops refreshing, and once the
TTL runs out the next client to ask takes the claim over. Every step is one Lua
script, so two clients never both get a claim.
"""

from __future__ import annotations

from collections.abc import Iterable

import redis

from shared.store.redis_conn import translate_connection_errors

MINE, BUSY, FINAL = "mine", "busy", "final"
_HELD = "held:"  # prefix of a claim's value while under way; an outcome never starts with it

# KEYS[1] the claim; ARGV: holder value, TTL in ms. → {state, value}
_CLAIM = """
local value = redis.call('GET', KEYS[1])
if not value then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {'mine', ARGV[1]}
end
if value == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {'mine', value}
end
if string.sub(value, 1, 5) == 'held:' then return {'busy', value} end
return {'final', value}
"""
# Only while the claim is still ours: a taken-over claim is left to its new holder.
_REFRESH = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


class Claims:
    """The claims of one kind (``unit`` or ``sha``) in one run, as seen by one client."""

    def __init__(self, client: redis.Redis, key_prefix: str, run_id: str, kind: str, client_id: str, timeout_s: float,
                 final_ttl_s: int):
        self._redis = client
        self._prefix = f"{key_prefix}caption:{run_id}:{kind}:"
        self._holder = _HELD + client_id
        self._timeout_ms = int(timeout_s * 1000)
        self._final_ttl_s = final_ttl_s  # outcomes live as long as job state (VLMQ_JOB_TTL_S)
        self._claim = client.register_script(_CLAIM)
        self._refresh = client.register_script(_REFRESH)
        self._release = client.register_script(_RELEASE)

    def claim(self, name: str) -> tuple[str, str | None]:
        """(MINE, None) if this client now holds it; (BUSY, None) if another does; (FINAL, outcome) if done."""
        with translate_connection_errors(self._redis):
            state, value = self._claim(keys=[self._prefix + name], args=[self._holder, self._timeout_ms])
        state = state.decode() if isinstance(state, bytes) else state
        return (FINAL, value.decode()) if state == FINAL else (state, None)

    def refresh(self, names: Iterable[str]) -> None:
        """Push back the takeover of every claim this client still holds among ``names``."""
        with translate_connection_errors(self._redis):
            pipe = self._redis.pipeline(transaction=False)
            for name in names:
                self._refresh(keys=[self._prefix + name], args=[self._holder, self._timeout_ms], client=pipe)
            pipe.execute()

    def finish(self, name: str, outcome: str) -> None:
        """Record the outcome for every client (whoever held the claim: the work is done either way)."""
        with translate_connection_errors(self._redis):
            self._redis.set(self._prefix + name, outcome, ex=self._final_ttl_s)

    def release(self, names: Iterable[str]) -> None:
        """Give up claims this client holds, unfinished, so that others (or a rerun) take them at once."""
        with translate_connection_errors(self._redis):
            pipe = self._redis.pipeline(transaction=False)
            for name in names:
                self._release(keys=[self._prefix + name], args=[self._holder], client=pipe)
            pipe.execute()
