"""The engine's statistics in /metrics: published to the store by a thread, read back as Prometheus metrics."""

from __future__ import annotations

import threading
import time

from generator_service.engine import Engine, GenerationRequest
from generator_service.engine_metrics import publish_engine_stats
from generator_service.models.llama import LlamaForCausalLM
from generator_service.sampling import SamplingParams
from shared.queue.metrics import WorkerStats, WorkerStatsCollector


def test_prefix_hits_latencies_and_kv_blocks_reach_the_collector(demo_model, redis_client, key_prefix):
    engine = Engine(LlamaForCausalLM.from_checkpoint(demo_model), max_batch=4, max_seq_len=128, kv_cache_tokens=256, block_tokens=8)
    stats = WorkerStats(redis_client, key_prefix, "generate")
    stop = threading.Event()
    publisher = publish_engine_stats(engine, stats, stop, interval_s=0.05)
    try:
        prompt, params = list(range(3, 30)), SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
        for _ in range(2):  # 27 tokens, blocks of 8: the second finds 3 blocks
            engine.submit(GenerationRequest(prompt, params))
            engine.run_until_idle()
        deadline = time.monotonic() + 10
        metrics = {}
        while time.monotonic() < deadline and metrics.get("vlmq_generate_itl_seconds", {}).get("_count") != 8:
            time.sleep(0.05)
            metrics = {}
            for family in WorkerStatsCollector(stats).collect():
                values = {s.name.removeprefix(family.name): s.value for s in family.samples}
                metrics[family.name] = values | {"labels": [s.labels for s in family.samples]}
    finally:
        stop.set()
        publisher.join(timeout=5)
    assert metrics["vlmq_generate_prefix_hit_tokens"]["_total"] == 24
    assert metrics["vlmq_generate_prefix_lookup_tokens"]["_total"] == 54
    assert metrics["vlmq_generate_ttft_seconds"]["_count"] == 2
    assert metrics["vlmq_generate_itl_seconds"]["_count"] == 8  # 4 gaps in each answer of 5
    assert metrics["vlmq_generate_kv_blocks_total"][""] == 32
    assert metrics["vlmq_generate_waiting_requests"][""] == 0
    assert metrics["vlmq_generate_kv_blocks_used"][""] == 0  # both finished; their blocks stay cached, unused
