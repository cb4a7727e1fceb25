"""Device kernels for vlmq, each with a torch reference beside it.

`ops` holds the dispatchers the models call (and the switch between kernel and
reference); `reference` the plain-torch implementations that run on the CPU and serve
as the test oracle for kernels; `build` compiles the C++/CUDA sources in `csrc/` on
first use.
"""

from cuda_ext.ops import embedding_gather, multimodal_embedding, set_embedding_gather
from cuda_ext.reference import multimodal_embedding_reference

__all__ = ["embedding_gather", "multimodal_embedding", "multimodal_embedding_reference", "set_embedding_gather"]
