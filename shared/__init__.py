"""vlmq's common package: settings, the embedding container, the Redis store,
token-ID allocation, the Celery app, checkpoint loading and shared model layers."""
