"""Data: tokenizers, preprocessing to indexed datasets, blending with replay, the resumable loader."""
