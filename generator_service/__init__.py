"""The generator: prompts with image aliases in, generated tokens out.

- `tokenizer`: text ↔ IDs, alias substitution, chat templates, streaming decode (`stops`: stop strings);
- `models`: the language models (one file per family), built from checkpoint folders;
- `sampling`: request parameters and the pure functions that pick tokens;
- `engine`: batched prefill/decode over one KV cache, driven by the worker's thread.
"""
