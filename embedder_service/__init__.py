"""The embedder: image jobs in, embedding containers out (vision tower + projector, no language model)."""
