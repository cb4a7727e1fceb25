"""Pieces both FastAPI apps share: app state, error responses, API-key tenants, body limit, health and metrics."""

from __future__ import annotations

import hashlib
import hmac
import logging
from contextlib import asynccontextmanager
from typing import Annotated, Callable

import kombu.exceptions
import redis
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.config.errors import StoreUnavailable, Unauthorized, VlmqError
from shared.config.settings import Settings
from shared.queue.celery_app import create_celery_app
from shared.queue.heartbeat import live_workers
from shared.queue.metrics import WorkerStats, WorkerStatsCollector
from shared.store.containers import ContainerStore
from shared.store.jobs import JobStore
from shared.store.redis_conn import connect, connect_async, describe_auth_error
from shared.store.waiting import JobWaiters
from shared.store.streams import TokenStreams

log = logging.getLogger(__name__)

PUBLIC_TENANT = "public"

_HTTP_ERROR_CODES = {400: "invalid_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
                     413: "too_large", 415: "unsupported_media_type"}


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"code": code, "message": message}})


def _describe_validation_error(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as `{"error": {"code", "message"}}`; the caller's mistakes are 4xx."""

    @app.exception_handler(VlmqError)
    async def _vlmq_error(_: Request, exc: VlmqError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, "invalid_request", _describe_validation_error(exc))

    # FastAPI's and Starlette's own refusals (an unknown route, a wrong method, a multipart body it
    # cannot parse or with too many files) in the same shape as vlmq's.
    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_ERROR_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(redis.exceptions.ConnectionError)
    @app.exception_handler(redis.exceptions.TimeoutError)
    async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, redis.exceptions.AuthenticationError):
            err = StoreUnavailable(describe_auth_error(request.app.state.redis, exc))
        else:
            err = StoreUnavailable(f"the store is unreachable, try again shortly ({type(exc).__name__})")
        return error_response(err.status, err.code, err.message)

    # Publishing a task to a broker that is down fails, after the bounded retry
    # policy of create_celery_app, with kombu's OperationalError.
    @app.exception_handler(kombu.exceptions.OperationalError)
    async def _broker_down(_: Request, exc: Exception) -> JSONResponse:
        return error_response(503, "broker_unavailable", "the job queue (Redis broker) is unreachable, try again shortly")

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "internal_error", f"internal error ({type(exc).__name__})")


def tenant_for_key(key: str) -> str:
    # Tenants are named by a hash so keys never appear in Redis or logs.
    return "t_" + hashlib.sha256(key.encode()).hexdigest()[:16]


def get_tenant(request: Request) -> str:
    """The caller's tenant: from `Authorization: Bearer KEY` or `X-API-Key`, when keys are configured."""
    keys: list[str] = request.app.state.settings.api_keys
    if not keys:
        return PUBLIC_TENANT
    auth = request.headers.get("authorization", "")
    offered = auth[7:].strip() if auth.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
    for key in keys:
        if offered and hmac.compare_digest(offered.encode(), key.encode()):
            return tenant_for_key(key)
    raise Unauthorized("missing or unknown API key (send `Authorization: Bearer KEY` or `X-API-Key: KEY`)")


Tenant = Annotated[str, Depends(get_tenant)]


def _holds_key(request: Request) -> bool:
    """Whether API keys are configured and the request carries one of them."""
    if not request.app.state.settings.api_keys:
        return False
    try:
        get_tenant(request)
    except Unauthorized:
        return False
    return True


def health_router(worker_kind: str, extra_ready_check: Callable[[Request], None] | None = None) -> APIRouter:
    """`/healthz` (process up), `/readyz` (store reachable and a worker of `worker_kind` alive), `/metrics`."""
    router = APIRouter(tags=["health"])

    @router.get("/healthz")
    async def healthz() -> dict:  # in the event loop: a thread pool busy with other requests does not delay it
        return {"status": "ok"}

    @router.get("/readyz")
    def readyz(request: Request) -> JSONResponse:
        state = request.app.state
        try:
            state.redis.ping()
            workers = live_workers(state.redis, state.settings.key_prefix, worker_kind)
        except redis.exceptions.AuthenticationError as exc:
            return error_response(503, "store_unavailable", describe_auth_error(state.redis, exc))
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            return error_response(503, "store_unavailable", f"the store is unreachable ({type(exc).__name__})")
        if not workers:
            return error_response(503, "no_workers", f"no {worker_kind} worker has reported in")
        if extra_ready_check is not None:
            extra_ready_check(request)
        body = {"status": "ready", "workers": len(workers)}
        if _holds_key(request):  # what each worker serves (model paths, PIDs) is for operators, not for any prober
            body["worker_details"] = workers
        return JSONResponse(body)

    @router.get("/metrics")
    def metrics(request: Request) -> Response:
        return Response(generate_latest(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST)

    return router


class BodySizeLimit:
    """ASGI middleware refusing bodies over `max_bytes` with 413, before they are read whole.

    A declared Content-Length over the limit is refused without reading a byte;
    a chunked body is counted as it arrives and cut off at the limit.
    """

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        too_large = error_response(
            413, "too_large", f"request body over the limit of {self.max_bytes} bytes (VLMQ_MAX_UPLOAD_BYTES)"
        )
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await too_large(scope, receive, send)
        received = 0
        started = False

        class _Exceeded(Exception):
            pass

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _Exceeded
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _Exceeded:
            if not started:
                await too_large(scope, receive, send)


class WaitingCollector:
    """The requests this API process holds open on the store: waits on jobs and followed streams."""

    def __init__(self, waiters: JobWaiters):
        self._waiters = waiters

    def collect(self):
        yield GaugeMetricFamily("vlmq_api_jobs_waited", "Requests of this API process waiting for a job to finish",
                                value=self._waiters.jobs_waited)
        yield GaugeMetricFamily("vlmq_api_streams_followed", "Token streams this API process is following for its clients",
                                value=self._waiters.streams_followed)


def create_service_app(title: str, description: str, worker_kind: str, settings: Settings, routers: list[APIRouter]) -> FastAPI:
    """A FastAPI app with the state both APIs share: store clients, Celery, metrics, errors, health."""
    waiters = JobWaiters(connect_async(settings.effective_store_url), settings.key_prefix)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await waiters.start()
        yield
        await waiters.stop()

    app = FastAPI(title=title, version="0.1.0", description=description, lifespan=lifespan)
    client = connect(settings.effective_store_url)
    app.state.waiters = waiters
    app.state.settings = settings
    app.state.redis = client
    app.state.store = ContainerStore(client, settings.key_prefix, settings.container_ttl_s, settings.max_container_bytes)
    app.state.jobs = JobStore(client, settings.key_prefix, settings.job_ttl_s)
    app.state.streams = TokenStreams(client, settings.key_prefix, settings.job_ttl_s)
    app.state.celery = create_celery_app(settings)
    app.state.metrics_registry = CollectorRegistry()
    app.state.metrics_registry.register(WorkerStatsCollector(WorkerStats(client, settings.key_prefix, worker_kind)))
    app.state.metrics_registry.register(WaitingCollector(waiters))
    install_error_handlers(app)
    for router in [*routers, health_router(worker_kind)]:
        app.include_router(router)
    # base64 makes a JSON body ~4/3 of the image; leave room for it and the JSON around it.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes * 4 // 3 + 64 * 1024)
    return app
