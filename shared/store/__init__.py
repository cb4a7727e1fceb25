"""Redis: connections, the embedding container and its wire format, the container store, token IDs, jobs and token streams."""
