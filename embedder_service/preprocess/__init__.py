"""Per-family image preprocessors: PIL image → the pixel tensor the family's vision tower takes."""

from embedder_service.preprocess.clip import ClipPreprocessor

__all__ = ["ClipPreprocessor"]
