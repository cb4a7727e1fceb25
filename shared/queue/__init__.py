"""Celery: the app factory, the broker transport, task signatures both services send, workers, heartbeats and statistics."""
