"""Claims of a shared captioning run on a real Redis: one holder at a time, takeover after the timeout."""

from __future__ import annotations

import time

from vlmq.caption.claims import BUSY, FINAL, MINE, Claims

TIMEOUT_S = 0.3


def two_clients(redis_client, key_prefix) -> tuple[Claims, Claims]:
    return tuple(Claims(redis_client, key_prefix, "run", "unit", name, TIMEOUT_S, final_ttl_s=60) for name in ("a", "b"))


def test_one_holder_at_a_time_and_takeover_once_the_holder_stops_refreshing(redis_client, key_prefix):
    a, b = two_clients(redis_client, key_prefix)
    assert a.claim("shard-0") == (MINE, None)
    assert b.claim("shard-0") == (BUSY, None)
    for _ in range(3):  # refreshed: held past its timeout
        time.sleep(TIMEOUT_S / 2)
        a.refresh(["shard-0"])
    assert b.claim("shard-0") == (BUSY, None)
    time.sleep(TIMEOUT_S * 1.5)  # a went silent
    assert b.claim("shard-0") == (MINE, None)
    a.refresh(["shard-0"])  # too late: it stays b's
    a.release(["shard-0"])
    assert a.claim("shard-0") == (BUSY, None)
    assert redis_client.pttl(f"{key_prefix}caption:run:unit:shard-0") > 0


def test_an_outcome_is_final_for_everyone_and_a_release_frees_at_once(redis_client, key_prefix):
    a, b = two_clients(redis_client, key_prefix)
    assert a.claim("x") == (MINE, None)
    a.finish("x", '{"caption": "a cat"}')
    assert b.claim("x") == (FINAL, '{"caption": "a cat"}') and a.claim("x") == (FINAL, '{"caption": "a cat"}')
    assert 0 < redis_client.ttl(f"{key_prefix}caption:run:unit:x") <= 60
    assert b.claim("y") == (MINE, None)
    b.release(["y"])
    assert a.claim("y") == (MINE, None)
