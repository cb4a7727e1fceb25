"""The captioning loop: each image's bytes embedded once, every prompt generated against that container.

For a new set of image bytes it sends one Celery chain, ``vlmq.embed`` then
``vlmq.generate`` — or a group of generates, one per prompt, all taking the same
container. Images are identified by the SHA-256 of their bytes and claimed in the
run's namespace (claims.py): bytes already captioned in this run are written from
the stored outcome, bytes another client is captioning wait for its outcome, and
bytes in flight here gather every image that holds them. At most
``max_in_flight`` images are outstanding, so memory stays bounded. Stopping part
way (Ctrl-C, too many failures, a dead worker) cancels the jobs in flight and
gives back the claims held, so that a rerun — or another client — goes on at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from celery import Celery, chain, group

from shared.config.errors import NotFound, StoreUnavailable
from shared.queue.tasks import embed_signature, generate_signature
from shared.store.jobs import CANCELLED, SUCCEEDED, TERMINAL_STATUSES, JobStore
from shared.store.redis_conn import subscriber, translate_connection_errors
from vlmq.caption.claims import BUSY, FINAL, Claims
from vlmq.caption.feed import WAIT, UnitEnd
from vlmq.caption.inputs import InputError, Item
from vlmq.caption.options import CaptionOptions
from vlmq.caption.progress import Progress, Summary

# How long the loop waits for a job to finish before checking every image in flight anyway.
POLL_S = 0.5


class Wakeups:
    """Wakes the loop as soon as any job finishes: one subscription to JobStore's finish announcements
    serves every image in flight. A missed announcement (a reconnect) costs at most ``POLL_S``."""

    def __init__(self, client, jobs: JobStore):
        self._client = client
        self._pubsub = subscriber(client)
        with translate_connection_errors(client):
            self._pubsub.subscribe(jobs.finished_channel)

    def wait(self, timeout_s: float) -> None:
        """Return once a job has finished since the last call, or after ``timeout_s``."""
        with translate_connection_errors(self._client):
            message = self._pubsub.get_message(timeout=timeout_s)
            while message is not None:  # every announcement so far: the loop checks all its jobs anyway
                message = self._pubsub.get_message(timeout=0)

    def close(self) -> None:
        self._pubsub.close()


class Stop(Exception):
    """The run stops before the end (too many failures); the message says why."""


@dataclass
class _Image:
    item: Item
    started: float  # time.monotonic() when its bytes were read


@dataclass
class _Bytes:
    """One set of image bytes in flight and every image that holds them."""

    sha256: str
    images: list[_Image]
    started: float
    data: bytes | None = None  # kept while another client holds the claim: it may have to be taken over
    embed_job: str | None = None
    generate_jobs: dict[str, str] = field(default_factory=dict)  # prompt name → job id


class CaptionRun:
    """Feeds items into embed → generate chains, at most ``max_in_flight`` images at a time, and writes records."""

    def __init__(self, celery: Celery, jobs: JobStore, wakeups: Wakeups, options: CaptionOptions, output, units: Claims,
                 same_bytes: Claims, progress: Progress, *, check_alive: Callable[[], None] = lambda: None, max_upload_bytes: int = 20 * 2**20,
                 refresh_s: float = 15.0):
        self.celery, self.jobs, self.wakeups, self.options, self.output = celery, jobs, wakeups, options, output
        self.units, self.same_bytes = units, same_bytes
        self.progress = progress
        self.summary = progress.summary
        self.check_alive = check_alive  # raises if the workers we rely on are gone
        self.max_upload_bytes = max_upload_bytes  # the embedder would refuse more: don't upload it
        self.refresh_s = refresh_s  # how often held claims are refreshed: well inside their timeout
        self._payloads = {name: options.payload(text) for name, text in options.prompts.items()}
        self._in_flight: dict[str, _Bytes] = {}  # by SHA-256, oldest first
        self._images = 0  # images in flight, every holder of the same bytes counted
        self._open_units: dict[str, int] = {}  # unit → its images not yet written
        self._ended_units: set[str] = set()  # units whose every image has been fed
        self._refreshed = time.monotonic()

    def run(self, feed: Iterator[Item | UnitEnd | str]) -> Summary:
        started = time.monotonic()
        try:
            self._loop(feed)
        except KeyboardInterrupt:
            self.summary.stopped, self.summary.interrupted = "interrupted (run the same command again to continue)", True
            self._abandon()
        except Stop as exc:
            self.summary.stopped = str(exc)
            self._abandon()
        except BaseException:
            self._abandon()
            raise
        finally:
            self.summary.seconds = time.monotonic() - started
        return self.summary

    def _loop(self, feed: Iterator[Item | UnitEnd | str]) -> None:
        submitted, exhausted = 0, False
        limit = self.options.limit
        while True:
            while not exhausted and self._images < self.options.max_in_flight and (limit is None or submitted < limit):
                step = next(feed, None)
                if step is None:
                    exhausted = True
                elif step == WAIT:
                    break
                elif isinstance(step, UnitEnd):
                    self._ended_units.add(step.name)
                    self._open_units.setdefault(step.name, 0)
                    self._maybe_finish_unit(step.name)
                else:
                    self._submit(step)
                    submitted += 1
            if not self._in_flight and (exhausted or (limit is not None and submitted >= limit)):
                return
            self._collect()
            self._refresh_claims()
            self.check_alive()

    # -- sending --------------------------------------------------------------------------------

    def _submit(self, item: Item) -> None:
        image = _Image(item, time.monotonic())
        self._open_units[item.unit] = self._open_units.get(item.unit, 0) + 1
        try:
            data = item.read()
        except (OSError, InputError) as exc:
            message = f"cannot read the image: {exc.strerror or exc}" if isinstance(exc, OSError) else str(exc)
            self._write(image, _error("unreadable", message))
            return
        if len(data) > self.max_upload_bytes:
            message = f"{len(data)} bytes is over the {self.max_upload_bytes}-byte limit"
            self._write(image, _error("too_large", message))
            return
        sha256 = hashlib.sha256(data).hexdigest()
        pending = self._in_flight.get(sha256)
        if pending is not None:  # the same bytes are on their way here
            pending.images.append(image)
            self._images += 1
            return
        state, outcome = self.same_bytes.claim(sha256)
        if state == FINAL:  # captioned earlier in this run
            self.summary.deduplicated += 1
            self._write(image, json.loads(outcome), sha256)
            return
        pending = _Bytes(sha256, [image], image.started)
        self._in_flight[sha256] = pending
        self._images += 1
        if state == BUSY:
            pending.data = data  # another client is on it: wait for its outcome
        else:
            self._send(pending, data)

    def _send(self, pending: _Bytes, data: bytes) -> None:
        tenant = self.options.tenant
        # Each job id is kept as soon as the job exists, and a Ctrl-C waits until it is: then even jobs created
        # before the chain is sent are cancelled, and none is left queued.
        with _interrupts_deferred():
            pending.embed_job, embed = embed_signature(self.celery, self.jobs, tenant, [data])
            generates = []
            for name, payload in self._payloads.items():
                pending.generate_jobs[name], signature = generate_signature(self.celery, self.jobs, tenant, payload)
                generates.append(signature)
        # One prompt: embed | generate. Several: embed | group(generates), each given the same container.
        chain(embed, generates[0] if len(generates) == 1 else group(generates)).apply_async()
        pending.data = None
        self.summary.embedded += 1

    # -- collecting -----------------------------------------------------------------------------

    def _collect(self) -> None:
        """Wait until a job finishes (or briefly), then write every image that has finished."""
        self.wakeups.wait(POLL_S)
        now = time.monotonic()
        for pending in list(self._in_flight.values()):
            if pending.embed_job is None:
                self._check_other_client(pending)
                continue
            jobs = self._jobs(pending)
            if jobs is None:
                self._finish(pending, _error("not_found", "the job expired before it finished"), keep=False)
            elif all(job["status"] in TERMINAL_STATUSES for job in jobs.values()):
                self._finish(pending, self._outcome(pending, jobs), keep=True)
            elif now - pending.started > self.options.timeout_s:
                self._cancel(pending)
                self._finish(pending, _error("timeout", f"not finished after {self.options.timeout_s:.0f} s"), keep=False)

    def _jobs(self, pending: _Bytes) -> dict[str, dict] | None:
        try:
            return {name: self.jobs.get(job_id) for name, job_id in pending.generate_jobs.items()}
        except NotFound:
            return None

    def _check_other_client(self, pending: _Bytes) -> None:
        state, outcome = self.same_bytes.claim(pending.sha256)
        if state == FINAL:
            self.summary.deduplicated += len(pending.images)
            self._finish(pending, json.loads(outcome), keep=False, deduplicated=True)
        elif state != BUSY:  # its client died: the claim passed to us
            self._send(pending, pending.data)

    def _outcome(self, pending: _Bytes, jobs: dict[str, dict]) -> dict[str, Any]:
        """The part of a record that is the same for every image holding these bytes."""
        outcome: dict[str, Any] = {}
        container_id = self._container_id(pending.embed_job)
        if container_id is not None:
            outcome["container_id"] = container_id
        prompt_tokens = completion_tokens = 0
        for name, job in jobs.items():
            if job["status"] == SUCCEEDED:
                outcome[name] = job["result"]["text"]
                prompt_tokens += job["result"]["usage"]["prompt_tokens"]
                completion_tokens += job["result"]["usage"]["completion_tokens"]
            elif "error" not in outcome:
                outcome["error"] = job["error"] or {"code": "failed", "message": "the job failed without a reason"}
        if prompt_tokens or completion_tokens:
            outcome |= {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
        self.summary.generated_tokens += completion_tokens
        return outcome

    def _container_id(self, embed_job_id: str) -> str | None:
        try:
            containers = (self.jobs.get(embed_job_id).get("result") or {}).get("containers") or []
        except NotFound:
            return None
        return containers[0]["id"] if containers else None

    def _finish(self, pending: _Bytes, outcome: dict[str, Any], *, keep: bool, deduplicated: bool = False) -> None:
        """Write a record for every image holding these bytes. ``keep``: store the outcome for the run
        (later images with these bytes reuse it); else give the claim back, so they are tried again."""
        del self._in_flight[pending.sha256]
        if keep and not _was_cancelled(outcome):
            self.same_bytes.finish(pending.sha256, json.dumps(outcome, ensure_ascii=False))
        elif not deduplicated:
            self.same_bytes.release([pending.sha256])
        if not deduplicated:
            self.summary.deduplicated += len(pending.images) - 1
        for image in pending.images:
            self._images -= 1
            self._write(image, outcome, pending.sha256)

    def _write(self, image: _Image, outcome: dict[str, Any], sha256: str | None = None) -> None:
        record = dict(image.item.fields) | ({"sha256": sha256} if sha256 else {})
        record.update(outcome)
        record["seconds"] = round(time.monotonic() - image.started, 3)
        if "error" in record:  # keep the error last, after what did succeed
            record["error"] = record.pop("error")
        self.output.write(image.item, record)
        self.summary.count(record, list(self._payloads))
        self.progress.update()
        unit = image.item.unit
        self._open_units[unit] -= 1
        self._maybe_finish_unit(unit)
        limit = self.options.max_failures
        if limit is not None and limit.exceeded(self.summary.failed, self.summary.done + self.summary.failed):
            raise Stop(f"stopped: {self.summary.failed} of {self.summary.done + self.summary.failed} images failed "
                       "(--max-failures); fix the cause and run the same command again")

    def _maybe_finish_unit(self, unit: str) -> None:
        if unit in self._ended_units and self._open_units[unit] == 0:
            self.output.end_unit(unit)
            self.units.finish(unit, "done")
            del self._open_units[unit]
            self._ended_units.discard(unit)

    # -- claims and stopping --------------------------------------------------------------------

    def _refresh_claims(self) -> None:
        if time.monotonic() - self._refreshed < self.refresh_s:
            return
        self._refreshed = time.monotonic()
        self.units.refresh(list(self._open_units))
        self.same_bytes.refresh([sha for sha, p in self._in_flight.items() if p.embed_job is not None])

    def _cancel(self, pending: _Bytes) -> None:
        for job_id in [pending.embed_job, *pending.generate_jobs.values()]:
            try:
                self.jobs.cancel(job_id, reason="vlmq caption stopped")
            except NotFound:
                pass

    def _abandon(self) -> None:
        """Cancel the jobs in flight and give back every claim held (best effort: Redis may be what failed)."""
        try:
            for pending in self._in_flight.values():
                if pending.embed_job is not None:
                    self._cancel(pending)
            self.same_bytes.release([sha for sha, p in self._in_flight.items() if p.embed_job is not None])
            self.units.release(list(self._open_units))
        except StoreUnavailable:
            pass
        self._in_flight.clear()


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """A Ctrl-C (SIGINT) during the block raises KeyboardInterrupt at its end instead of between two of its lines.
    Only where Ctrl-C raises KeyboardInterrupt at all: in the main thread (the one signals reach), under Python's own
    handler (a process started with SIGINT ignored, as under nohup, keeps ignoring it)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def _was_cancelled(outcome: dict[str, Any]) -> bool:
    return (outcome.get("error") or {}).get("code") == CANCELLED
