"""Waiting inside a request for as long as its client is there: a client that leaves ends the wait
and cancels the job nobody will read."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Awaitable, TypeVar

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from shared.config.errors import ClientGone
from shared.store.jobs import JobStore
from shared.store.waiting import JobWaiters

T = TypeVar("T")


async def _until_disconnected(request: Request) -> None:
    # Once the body has been read, the server's next message for this request is its disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, waiting: Awaitable[T]) -> T:
    """What `waiting` returns; ``ClientGone`` (and `waiting` cancelled) if the client disconnects first."""
    wait_task = asyncio.ensure_future(waiting)
    gone_task = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({wait_task, gone_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (wait_task, gone_task):
            task.cancel()
        await asyncio.gather(wait_task, gone_task, return_exceptions=True)
    if not wait_task.cancelled() and wait_task.done():
        return wait_task.result()
    raise ClientGone("the client disconnected before its job finished")


async def cancel_abandoned(jobs: JobStore, job_id: str) -> None:
    """Cancel a job whose client went away; runs to its end even inside a cancelled request."""
    with anyio.CancelScope(shield=True):
        await run_in_threadpool(jobs.cancel, job_id, None, "the client disconnected")


async def wait_for_job(request: Request, waiters: JobWaiters, jobs: JobStore, job_id: str, timeout_s: float) -> dict:
    """The job once finished (or as it stands after `timeout_s`); a client that leaves first cancels it."""
    try:
        return await unless_disconnected(request, waiters.wait(job_id, timeout_s))
    except ClientGone:
        await cancel_abandoned(jobs, job_id)
        raise


def sse_response(pieces: AsyncIterator[str], jobs: JobStore, job_id: str, *, cancel_on_disconnect: bool) -> StreamingResponse:
    """Server-Sent Events of `pieces`; with `cancel_on_disconnect`, a client that leaves before the end cancels the job."""

    async def body() -> AsyncIterator[str]:
        try:
            async for piece in pieces:
                yield piece
        except (asyncio.CancelledError, GeneratorExit):  # the server cancels the response when its client disconnects
            if cancel_on_disconnect:
                await cancel_abandoned(jobs, job_id)
            raise

    return StreamingResponse(body(), media_type="text/event-stream")
