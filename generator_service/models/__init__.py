"""Language models in vlmq's own torch code, one file per family (`shared.modeling.registry` maps checkpoints to them).

Each exposes `from_checkpoint(checkpoint, device, dtype)`, `new_cache(num_blocks, block_size)` (a paged KV pool),
`prompt_positions(ids, containers) -> (prefill positions or None, first generated position)`,
`prefill(ids, cache, block_table, start=0, ranges=None, rows=None, all_logits=False, positions=None)` and
`decode(ids, positions, cache, rope_positions=None, tables=None)`, plus `config` (a `shared.modeling.layers.DecoderConfig`),
`device` and `dtype` — what `generator_service.engine.Engine` drives.
"""
