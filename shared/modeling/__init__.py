"""Model infrastructure: checkpoint folders, the family registry, layers both towers and language models use, path timing."""
