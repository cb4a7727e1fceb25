"""Settings read from the environment, and the errors vlmq reports to callers."""
