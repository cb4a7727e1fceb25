"""vlmq's compiled ops, each with a torch path beside it, in two rooms.

- `gather`: the multimodal embedding gather: a CUDA kernel, the same per-token code as a
  CPU extension (its proof on hosts without a GPU), the torch reference, and `ops`, the
  dispatcher between them that the generator calls.
- `decode`: the CPU decode kernels (AVX-512, AVX2) for a float32 decode step, and `ops`,
  which hands them to the models where they run; the torch path is the models' own.

Each room's C++/CUDA sources are in its `csrc/`; `build` compiles them on first use
(`python -m cuda_ext.build` ahead of time). `timing` times CUDA work for the benches.
"""
