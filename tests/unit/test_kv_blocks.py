"""The KV block pool and the engine's scheduling over it: hashes, promises, LRU eviction, waiting, refusals, cancels.

The engine tests run the demo LLaVA checkpoint; which tokens it makes is the oracle tests' business
(tests/oracle/test_prefix_cache.py), here only how many requests run, wait and what their blocks become.
"""

from __future__ import annotations

import itertools

import pytest

from generator_service.engine import Engine, GenerationRequest
from generator_service.kv_blocks import BlockPool, block_hashes
from generator_service.models.llama import LlamaForCausalLM
from generator_service.sampling import SamplingParams
from shared.config.errors import InvalidInput
from shared.store.token_ids import EMBEDDING_INDEX_BASE as BASE

IMAGE = list(range(BASE, BASE + 6))


def test_hashes_name_the_whole_prefix_of_each_full_block():
    a = block_hashes([1, 2, 3, 4, 5, 6, 7], 2)
    assert len(a) == 3  # the partial last block has none
    assert block_hashes([1, 2, 3, 4, 9, 9], 2) == a[:2] + [block_hashes([1, 2, 3, 4, 9, 9], 2)[2]]
    assert block_hashes([1, 2, 3, 4, 9, 9], 2)[2] != a[2]
    assert block_hashes([9, 2, 3, 4], 2)[1] != a[1]  # a block's hash covers the blocks before it
    assert block_hashes([1, 2, 3, 4], 2, salt="tenant-b") != a[:2]
    assert block_hashes([5, 6], 2, previous=a[1]) == a[2:3]  # the chain continues from a known hash


def test_with_bidirectional_images_a_block_ending_inside_an_image_covers_the_rest_of_it():
    whole = [1, 2, *IMAGE, 3, 4]  # blocks of 4: [1, 2, i0, i1] ends inside the image
    partial = [1, 2, *IMAGE[:4], 3, 4]  # the same first block, the image cut short after it
    assert block_hashes(whole, 4)[0] == block_hashes(partial, 4)[0]  # causal: the block sees nothing after it
    assert block_hashes(whole, 4, bidirectional_images=True)[0] != block_hashes(partial, 4, bidirectional_images=True)[0]
    text = [1, 2, 3, 4, *IMAGE]
    assert block_hashes(text, 4, bidirectional_images=True)[0] == block_hashes(text, 4)[0]  # ends before the image


def test_pool_promises_hands_out_caches_and_evicts_least_recently_used():
    pool = BlockPool(4)
    assert pool.admit([], 3) and pool.available == 1
    assert not pool.admit([], 2)  # a promise the pool cannot keep is not made
    blocks = [pool.allocate() for _ in range(3)]
    for block, (before, h) in zip(blocks, itertools.pairwise((b"", b"a", b"b", b"c"))):
        pool.register(block, h, before, [block])
    pool.release(blocks)
    assert pool.used == 0 and pool.available == 4  # cached blocks without users count as available
    assert pool.lookup([b"a", b"b", b"x", b"c"]) == blocks[:2]  # the prefix, block by block
    assert pool.admit(blocks[:1], 2)  # a hit on "a" and two new blocks: the free one, then the LRU cached one
    new = [pool.allocate(), pool.allocate()]
    # Released tail first, so "c" was the least recently used: evicted first; "b" is still cached.
    assert pool.lookup([b"a", b"b"]) == blocks[:2] and pool.lookup([b"a", b"b", b"c"]) == blocks[:2]
    assert blocks[2] in new
    pool.release([blocks[0], *new])
    assert pool.used == 0 and pool.available == 4


def test_pool_finds_the_cached_block_sharing_the_longest_start_and_forgets_evicted_ones():
    pool = BlockPool(3)
    assert pool.admit([], 3)
    blocks = [pool.allocate() for _ in range(3)]
    pool.register(blocks[0], b"x1", b"root", [1, 2, 3, 4])
    pool.register(blocks[1], b"x2", b"root", [1, 2, 9, 9])
    pool.register(blocks[2], b"y", b"x1", [1, 2, 3, 4])  # the same IDs after another block: not a candidate
    assert pool.longest_partial(b"root", [1, 2, 3, 7]) == (blocks[0], 3)
    assert pool.longest_partial(b"root", [1, 2, 9]) == (blocks[1], 3)
    assert pool.longest_partial(b"root", [5, 2, 3]) is None  # not even the first ID
    pool.release(blocks[:2])  # unused, still cached, tail first: blocks[1] is the least recently used
    assert pool.admit([], 1) and pool.allocate() == blocks[1]  # evicted
    assert pool.longest_partial(b"root", [1, 2, 9]) == (blocks[0], 2)


def test_a_block_taken_back_is_free_and_promised_again():
    pool = BlockPool(2)
    assert pool.admit([], 2)
    block = pool.allocate()
    pool.unallocate(block)
    assert pool.used == 0 and pool.reserved == 2 and pool.available == 0  # still promised to its sequence
    assert {pool.allocate(), pool.allocate()} == {0, 1}


def test_pool_with_the_prefix_cache_off_never_hits():
    pool = BlockPool(2, prefix_cache=False)
    pool.admit([], 1)
    block = pool.allocate()
    pool.register(block, b"a", b"", [1, 2])
    pool.release([block])
    assert pool.lookup([b"a"]) == [] and pool.longest_partial(b"", [1, 2]) is None


@pytest.fixture(scope="module")
def model(demo_model):
    return LlamaForCausalLM.from_checkpoint(demo_model)


def params(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def test_a_full_pool_makes_requests_wait_then_run(model):
    engine = Engine(model, max_batch=8, max_seq_len=64, kv_cache_tokens=48, block_tokens=8, prefix_cache=False)
    # Each needs 20 + 12 - 1 = 31 positions: 4 blocks of the pool's 6, so one runs at a time.
    handles = [engine.submit(GenerationRequest(list(range(3, 23)), params(12))) for _ in range(3)]
    engine.step()
    assert (engine.num_running, engine.num_waiting) == (1, 2)
    most = 0
    while engine.has_work():
        engine.step()
        most = max(most, engine.num_running)
        assert engine.pool.used <= 6
    assert most == 1
    assert all(len(h.result().token_ids) == 12 for h in handles)
    assert engine.pool.used == 0 and engine.pool.reserved == 0


def test_a_prompt_longer_than_the_pool_is_refused_naming_it(model):
    engine = Engine(model, max_batch=4, max_seq_len=512, kv_cache_tokens=64, block_tokens=16)
    with pytest.raises(InvalidInput, match=r"70 tokens.*KV cache of 64"):
        engine.submit(GenerationRequest([5] * 70, params(4)))
    # An answer that would outgrow the pool is cut to it ("length"), not refused.
    handle = engine.submit(GenerationRequest([5] * 60, params(50)))
    engine.run_until_idle()
    assert (len(handle.result().token_ids), handle.result().finish_reason) == (4, "length")


def test_cancel_frees_the_blocks_at_the_next_step(model):
    engine = Engine(model, max_batch=4, max_seq_len=128, kv_cache_tokens=128, block_tokens=16, prefix_cache=False)
    running = engine.submit(GenerationRequest(list(range(3, 40)), params(60)))
    engine.step()
    waiting = engine.submit(GenerationRequest(list(range(3, 40)), params(60)))  # 96 positions: the pool is promised
    engine.step()
    assert engine.num_waiting == 1 and engine.pool.used == 3
    running.cancel()
    engine.step()
    assert running.result().finish_reason == "cancelled"
    assert engine.num_running == 1 and engine.num_waiting == 0  # the waiting one got the freed blocks
    waiting.cancel()
    engine.step()
    assert engine.pool.used == 0 and engine.pool.reserved == 0 and not engine.has_work()


def test_concurrency_is_bounded_by_tokens_not_rows(model):
    """The memory of 8 rows × 2048 positions holds 32 short chats of ≤ 300 tokens at once."""
    engine = Engine(model, max_batch=64, max_seq_len=2048, kv_cache_tokens=8 * 2048, block_tokens=16, prefix_cache=False)
    handles = [engine.submit(GenerationRequest(list(range(3, 3 + 200 + i)), params(100))) for i in range(32)]
    engine.step()
    assert engine.num_running == 32 and engine.num_waiting == 0
    engine.run_until_idle()
    assert all(len(h.result().token_ids) == 100 for h in handles)


def test_hits_and_lookups_are_counted(model):
    engine = Engine(model, max_batch=4, max_seq_len=128, block_tokens=8)
    prompt = list(range(3, 30))  # 27 tokens: 3 whole blocks
    first = engine.submit(GenerationRequest(prompt, params(2)))
    engine.run_until_idle()
    second = engine.submit(GenerationRequest(prompt, params(2)))
    engine.run_until_idle()
    other_tenant = engine.submit(GenerationRequest(prompt, params(2), cache_salt="b"))
    engine.run_until_idle()
    assert [h.result().usage.cached_tokens for h in (first, second, other_tenant)] == [0, 24, 0]
    assert (engine.stats.prefix_hit_tokens, engine.stats.prefix_lookup_tokens) == (24, 81)
    assert second.result().token_ids == first.result().token_ids
    assert engine.stats.ttft.counts[-1] == 3 and engine.stats.itl.counts[-1] == 3


@pytest.mark.parametrize("chunk", [0, 12], ids=["whole-prompts", "chunks-of-12"])
def test_prompts_arriving_together_compute_a_shared_prefix_once(model, chunk):
    # Two questions about one image, submitted at once: the second waits for the blocks the first is computing.
    shared = list(range(3, 43))  # 40 tokens: 5 blocks of 8
    prompts = [shared + list(range(100, 108)), shared + list(range(200, 208))]
    engine = Engine(model, max_batch=4, max_seq_len=128, block_tokens=8, prefill_chunk_tokens=chunk)
    handles = [engine.submit(GenerationRequest(p, params(6))) for p in prompts]
    engine.run_until_idle()
    assert [h.result().usage.cached_tokens for h in handles] == [0, 40]
    assert engine.stats.prefix_hit_tokens == 40
    alone = Engine(model, max_batch=4, max_seq_len=128, block_tokens=8, prefix_cache=False)
    expected = [alone.submit(GenerationRequest(p, params(6))) for p in prompts]
    alone.run_until_idle()
    assert [h.result().token_ids for h in handles] == [h.result().token_ids for h in expected]
    assert engine.pool.used == 0 and engine.pool.reserved == 0


@pytest.mark.parametrize("kv_tokens", [256, 32], ids=["room", "source-evicted"])
def test_a_prompt_sharing_part_of_a_cached_block_copies_those_positions(model, kv_tokens):
    """A's blocks of 8 are cached; B shares A's first 13 tokens: block 0 by hash, then positions 8 … 12 copied from A's
    block 1. With a pool too small to keep A's blocks while B runs, nothing is copied and B computes them."""
    a, b = list(range(3, 23)), list(range(3, 16)) + list(range(100, 110))
    engine = Engine(model, max_batch=4, max_seq_len=64, kv_cache_tokens=kv_tokens, block_tokens=8)
    engine.submit(GenerationRequest(a, params(1)))
    engine.run_until_idle()
    second = engine.submit(GenerationRequest(b, params(6)))
    engine.run_until_idle()
    hit = 13 if kv_tokens == 256 else 8  # 32 positions: B's 4 promised blocks evict A's block 1 first (LRU tail)
    assert second.result().usage.cached_tokens == hit
    assert engine.stats.prefix_hit_tokens == hit
    alone = Engine(model, max_batch=4, max_seq_len=64, block_tokens=8, prefix_cache=False)
    expected = alone.submit(GenerationRequest(b, params(6)))
    alone.run_until_idle()
    assert second.result().token_ids == expected.result().token_ids
    assert engine.pool.used == 0 and engine.pool.reserved == 0


@pytest.mark.parametrize("slowdown,first_mixed_chunk", [(0.0, 40), (2.0, 8)], ids=["no-limit", "limit"])
def test_a_decode_slowdown_limit_cuts_the_chunks_mixed_with_decoding(model, monkeypatch, slowdown, first_mixed_chunk):
    engine = Engine(model, max_batch=4, max_seq_len=256, block_tokens=8, prefix_cache=False, prefill_chunk_tokens=40,
                    max_decode_slowdown=slowdown)
    chunks = []
    step = engine.model.step

    def recording_step(ids, *args):
        if ids.numel():  # the stream decodes: record the chunk mixed with it
            chunks.append(sum(len(chunk.ids) for chunk in args[-1]))
        return step(ids, *args)

    monkeypatch.setattr(engine.model, "step", recording_step)
    stream = engine.submit(GenerationRequest(list(range(3, 13)), params(60)))
    engine.step()  # the stream's prompt and first token: it decodes from now on
    engine.submit(GenerationRequest(list(range(3, 123)), params(2)))  # 120 tokens arriving
    engine.run_until_idle()
    # Before any measurement the limit allows the least chunk; after, what the measured costs allow (≤ the size).
    assert chunks[0] == first_mixed_chunk and max(chunks) <= 40
    assert len(stream.result().token_ids) == 60


def test_the_chunk_budget_follows_the_measured_step_costs(model):
    engine = Engine(model, max_batch=4, max_seq_len=256, prefill_chunk_tokens=512, max_decode_slowdown=2.0)
    assert engine._prefill_budget(decoding=False) == 512
    engine._learn_step_cost(0.040, 0)  # a decode-only step: 40 ms
    engine._learn_step_cost(0.100, 30)  # a step with 30 prompt tokens: 2 ms each
    assert engine._prefill_budget(decoding=True) == 20  # (2 - 1) × 40 ms ÷ 2 ms
    engine.max_decode_slowdown = 0.0
    assert engine._prefill_budget(decoding=True) == 512


def test_where_a_token_costs_more_than_the_limit_allows_a_prompt_advances_a_token_a_step(model):
    engine = Engine(model, max_batch=4, max_seq_len=256, prefill_chunk_tokens=512, max_decode_slowdown=2.0)
    engine._learn_step_cost(0.010, 0)  # a decode-only step: 10 ms
    engine._learn_step_cost(0.050, 8)  # the probe: 8 prompt tokens at 5 ms each, half the allowance each
    assert engine._prefill_budget(decoding=True) == 2
    engine._learn_step_cost(0.110, 1)  # streams deep into their context: a token costing 100 ms (average now 24)
    assert engine._prefill_budget(decoding=True) == 1  # less than a token affordable: one


def test_a_stalled_decode_step_does_not_move_the_chunk_budget(model):
    engine = Engine(model, max_batch=4, max_seq_len=256, prefill_chunk_tokens=512, max_decode_slowdown=2.0)
    for seconds in (0.010, 0.010, 0.010, 0.010, 0.030):  # decode-only steps of 10 ms, the last stalled by the host
        engine._learn_step_cost(seconds, 0)
    engine._learn_step_cost(0.050, 8)  # 8 prompt tokens at 5 ms each
    assert engine._prefill_budget(decoding=True) == 2  # (2 - 1) × 10 ms ÷ 5 ms: the median step, not the stall
