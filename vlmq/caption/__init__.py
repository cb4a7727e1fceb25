"""Bulk captioning (`vlmq caption`): images from files, WebDataset shards, Parquet or manifests, through
`embed | generate` chains, into JSONL, Parquet, .txt files or WebDataset shards — resumable, and shared
between clients without a coordinator. docs/DESIGN.md §10.

- inputs.py, parquet_input.py: what is read, unit by unit, item by item (streamed);
- prompts.py: the prompts by name;
- outputs.py (JSONL, .txt), parquet_output.py, webdataset_output.py: what is written, and what is already done;
- claims.py: units and image bytes claimed in Redis, taken over from a dead client;
- feed.py: the items this client captions;
- options.py: prompts, sampling, limits; run.py: the loop that sends chains and writes records;
- progress.py: the bar and the summary;
- command.py: `vlmq caption`; merge.py: `vlmq caption merge`.
"""
