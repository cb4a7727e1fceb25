"""Serving an API with uvicorn so that it stops promptly on SIGTERM however many clients wait."""

from __future__ import annotations

import uvicorn
from fastapi import FastAPI

# Requests still running after a stop signal get this long, then are cancelled.
GRACEFUL_SHUTDOWN_S = 3


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI):
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig, frame) -> None:
        # Held waits answer at once (202: the job goes on, poll it) and followed streams end, so the
        # grace period is spent on requests that are finishing, not on clients that would wait for minutes.
        self._app.state.waiters.close_soon()
        super().handle_exit(sig, frame)


def serve(app: FastAPI, host: str, port: int, log_level: str) -> None:
    _Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                           timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S), app).run()
