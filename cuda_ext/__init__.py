"""Device kernels for vlmq, each with a torch reference beside it.

`ops` holds the dispatchers the models call; `reference` the plain-torch
implementations that run on the CPU and serve as the test oracle for kernels.
"""

from cuda_ext.ops import multimodal_embedding
from cuda_ext.reference import multimodal_embedding_reference

__all__ = ["multimodal_embedding", "multimodal_embedding_reference"]
