"""The multimodal embedding gather: `ops` (the dispatcher), `reference` (torch), `csrc/` (CUDA kernel, CPU extension)."""
