"""Bulk captioning (`vlmq caption`): every image through `embed | generate`, bounded in flight, resumable.

The flow for one image: read its bytes, store them as an upload, and send the
Celery chain ``vlmq.embed → vlmq.generate``; the generate job takes the embed
job's container as its chat image. At most ``max_in_flight`` images are
outstanding at a time and inputs are discovered lazily, so memory stays
bounded however many images there are. Each finished image becomes one JSON
line in the output, flushed at once; a later run skips every path already
there, so an interrupted run is resumed by running the same command again.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import redis
from celery import Celery, chain
from tqdm import tqdm

from shared.config.errors import NotFound, StoreUnavailable
from shared.config.settings import Settings
from shared.queue.celery_app import create_celery_app
from shared.queue.heartbeat import live_workers
from shared.queue.tasks import embed_signature, generate_signature
from shared.store.jobs import FAILED, SUCCEEDED, JobStore
from shared.store.redis_conn import connect, translate_connection_errors
from vlmq.stack import LocalStack, private_log_dir

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
GLOB_CHARS = frozenset("*?[")
# How long one wait on the oldest outstanding job blocks before all are checked again.
POLL_S = 0.5


class CaptionError(RuntimeError):
    """A problem that stops the whole run (bad arguments, no workers); its message is the one line shown."""


# -- inputs -------------------------------------------------------------------------------------


def is_image_path(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def discover_inputs(spec: str) -> Iterator[str]:
    """Absolute image paths named by ``spec``, lazily: a folder (recursive, image extensions only,
    sorted within each folder), a glob pattern (``**`` recurses), a single image, or a text file
    with one path per line (relative ones taken from the current folder; blank lines and ``#`` skipped)."""
    if os.path.isdir(spec):
        for root, dirs, files in os.walk(spec):
            dirs.sort()
            for name in sorted(files):
                if is_image_path(name):
                    yield os.path.abspath(os.path.join(root, name))
    elif os.path.isfile(spec):
        if is_image_path(spec):
            yield os.path.abspath(spec)
            return
        with open(spec, encoding="utf-8") as listing:
            for line in listing:
                line = line.strip()
                if line and not line.startswith("#"):
                    yield os.path.abspath(line)
    elif GLOB_CHARS & set(spec):
        for path in glob.iglob(spec, recursive=True):
            if os.path.isfile(path) and is_image_path(path):
                yield os.path.abspath(path)
    else:
        raise CaptionError(f"input not found: {spec} (give a folder, a glob pattern, an image, or a text file of paths)")


# -- output -------------------------------------------------------------------------------------


def captioned_paths(out_path: Path) -> set[str]:
    """Paths that already have a line in ``out_path`` (done or failed). A torn last line — the
    previous run was killed mid-write — is cut off so the next line starts clean."""
    if not out_path.exists():
        return set()
    _cut_torn_tail(out_path)
    paths = set()
    with open(out_path, encoding="utf-8") as lines:
        for line in lines:
            try:
                paths.add(json.loads(line)["path"])
            except (ValueError, KeyError, TypeError):
                continue  # not one of ours; leave it be
    return paths


def _cut_torn_tail(path: Path) -> None:
    with open(path, "rb+") as out:
        out.seek(0, os.SEEK_END)
        size = out.tell()
        if size == 0:
            return
        out.seek(size - 1)
        if out.read(1) == b"\n":
            return
        # Walk back to the last newline (the torn line is short: one record).
        position = size
        while position > 0:
            step = min(4096, position)
            position -= step
            out.seek(position)
            chunk = out.read(step)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                out.truncate(position + cut + 1)
                return
        out.truncate(0)


class LineWriter:
    """Appends one JSON object per line and flushes it, so a line on disk is a finished image."""

    def __init__(self, out: TextIO):
        self._out = out

    def write(self, record: dict[str, Any]) -> None:
        self._out.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._out.flush()


# -- the run ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptionOptions:
    prompt: str
    max_tokens: int = 32
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    max_in_flight: int = 32
    tenant: str = "public"
    timeout_s: float = 600.0  # per image, from enqueue to finish

    def payload(self) -> dict[str, Any]:
        """The generate request: one user turn with the (chained) image and the prompt."""
        sampling: dict[str, Any] = {"max_tokens": self.max_tokens, "temperature": self.temperature}
        for name in ("top_p", "top_k", "seed"):
            if getattr(self, name) is not None:
                sampling[name] = getattr(self, name)
        content = [{"type": "image"}, {"type": "text", "text": self.prompt}]
        return {"messages": [{"role": "user", "content": content}], "sampling": sampling, "stop": list(self.stop)}


@dataclass
class Summary:
    done: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    interrupted: bool = False

    @property
    def images_per_s(self) -> float:
        return (self.done + self.failed) / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        state = "interrupted (run the same command again to continue)" if self.interrupted else "finished"
        return (f"{state}: done {self.done}, failed {self.failed}, skipped {self.skipped} (already in the output or repeated) "
                f"in {self.seconds:.1f} s: {self.images_per_s:.2f} images/s")


@dataclass
class _InFlight:
    path: str
    sha256: str
    embed_job_id: str
    generate_job_id: str
    started: float  # time.monotonic() when its file was read


class CaptionRun:
    """Feeds paths into `embed | generate` chains, at most ``max_in_flight`` at a time, and writes lines."""

    def __init__(self, celery: Celery, jobs: JobStore, options: CaptionOptions, writer: LineWriter,
                 check_alive: Callable[[], None] = lambda: None, progress: tqdm | None = None,
                 max_upload_bytes: int = 20 * 1024 * 1024):
        self.celery, self.jobs, self.options, self.writer = celery, jobs, options, writer
        self.max_upload_bytes = max_upload_bytes  # the embedder would refuse more: don't upload it
        self.check_alive = check_alive  # raises if the workers we rely on are gone
        self.progress = progress
        self.summary = Summary()
        self._payload = options.payload()
        self._in_flight: dict[str, _InFlight] = {}  # by generate job id, oldest first

    def run(self, paths: Iterable[str]) -> Summary:
        started = time.monotonic()
        pending = iter(paths)
        exhausted = False
        try:
            while True:
                while not exhausted and len(self._in_flight) < self.options.max_in_flight:
                    path = next(pending, None)
                    if path is None:
                        exhausted = True
                    else:
                        self._submit(path)
                if not self._in_flight:
                    break
                self._collect()
                self.check_alive()
        except KeyboardInterrupt:
            # What is in flight is dropped: those paths have no line, so the next run redoes them.
            self.summary.interrupted = True
        self.summary.seconds = time.monotonic() - started
        return self.summary

    def _submit(self, path: str) -> None:
        started = time.monotonic()
        try:
            size = os.path.getsize(path)
            if size > self.max_upload_bytes:
                self._finish_error(path, "too_large", f"{size} bytes is over the {self.max_upload_bytes}-byte limit", started)
                return
            with open(path, "rb") as image_file:
                data = image_file.read()
        except OSError as exc:
            self._finish_error(path, "unreadable", f"cannot read the file: {exc.strerror or exc}", started)
            return
        sha256 = hashlib.sha256(data).hexdigest()
        embed_job_id, embed = embed_signature(self.celery, self.jobs, self.options.tenant, [data])
        generate_job_id, generate = generate_signature(self.celery, self.jobs, self.options.tenant, self._payload)
        chain(embed, generate).apply_async()
        self._in_flight[generate_job_id] = _InFlight(path, sha256, embed_job_id, generate_job_id, started)

    def _collect(self) -> None:
        """Block until the oldest image finishes (or briefly), then write every image that has finished."""
        oldest = next(iter(self._in_flight))
        self.jobs.wait(oldest, POLL_S)
        now = time.monotonic()
        for job_id, item in list(self._in_flight.items()):
            try:
                job = self.jobs.get(job_id)
            except NotFound:
                self._finish(item, None, {"code": "not_found", "message": "the job expired before it finished"})
                continue
            if job["status"] in (SUCCEEDED, FAILED):
                self._finish(item, job["result"], job["error"])
            elif now - item.started > self.options.timeout_s:
                self._finish(item, None, {"code": "timeout", "message": f"not finished after {self.options.timeout_s:.0f} s"})

    def _finish(self, item: _InFlight, result: dict | None, error: dict | None) -> None:
        del self._in_flight[item.generate_job_id]
        record: dict[str, Any] = {"path": item.path, "sha256": item.sha256}
        container_id = self._container_id(item.embed_job_id)
        if result is not None:
            record.update(caption=result["text"], container_id=container_id,
                          prompt_tokens=result["usage"]["prompt_tokens"], completion_tokens=result["usage"]["completion_tokens"])
            self.summary.done += 1
        else:
            if container_id is not None:
                record["container_id"] = container_id
            record["error"] = error or {"code": "failed", "message": "the job failed without a reason"}
            self.summary.failed += 1
        record["seconds"] = round(time.monotonic() - item.started, 3)
        self._write(record)

    def _finish_error(self, path: str, code: str, message: str, started: float) -> None:
        """A line for a file that never got enqueued (unreadable, too large)."""
        self.summary.failed += 1
        self._write({"path": path, "error": {"code": code, "message": message}, "seconds": round(time.monotonic() - started, 3)})

    def _container_id(self, embed_job_id: str) -> str | None:
        try:
            containers = (self.jobs.get(embed_job_id).get("result") or {}).get("containers") or []
        except NotFound:
            return None
        return containers[0]["id"] if containers else None

    def _write(self, record: dict[str, Any]) -> None:
        self.writer.write(record)
        if self.progress is not None:
            self.progress.update(1)
            if self.summary.failed:
                self.progress.set_postfix(failed=self.summary.failed, refresh=False)


def new_paths(paths: Iterable[str], done: set[str], on_skip: Callable[[str], None]) -> Iterator[str]:
    """``paths`` without those in ``done`` (already in the output) or seen earlier in this run."""
    seen: set[str] = set()
    for path in paths:
        if path in done or path in seen:
            on_skip(path)
            continue
        seen.add(path)
        yield path


# -- the command --------------------------------------------------------------------------------


@dataclass(frozen=True)
class StackChoice:
    """Where the workers come from: a running stack (``VLMQ_BROKER_URL`` set) or a private one started here."""

    model: str | None
    embed_workers: int = 1
    generate_workers: int = 1
    worker_timeout_s: float = 30.0  # how long to wait for a running stack's workers to report in


def caption(spec: str, out_path: str | Path, options: CaptionOptions, stack: StackChoice, *, progress: bool = True) -> Summary:
    """Caption every image ``spec`` names into ``out_path`` (appending); see the module docstring."""
    out_path = Path(out_path)
    done = captioned_paths(out_path)
    total = sum(1 for path in discover_inputs(spec) if path not in done)  # a listing pass, for the ETA
    if total == 0:  # nothing new: no need for Redis or workers
        return Summary(skipped=sum(1 for _ in discover_inputs(spec)))
    if "VLMQ_BROKER_URL" in os.environ:
        settings = Settings()
        client = _reachable_store(settings.effective_store_url)
        try:
            _wait_for_workers(client, settings.key_prefix, stack.worker_timeout_s)
            return _run(spec, out_path, options, settings, client, done, total, progress, check_alive=lambda: None)
        finally:
            client.close()

    if stack.model is None:
        raise CaptionError("--model is required when no running stack is configured (VLMQ_BROKER_URL unset)")
    if not Path(stack.model).is_dir():
        raise CaptionError(f"model folder not found: {stack.model}")
    log_dir = private_log_dir()
    print(f"starting a private stack: {stack.embed_workers} embed and {stack.generate_workers} generate workers "
          f"(logs in {log_dir})", file=sys.stderr, flush=True)
    with LocalStack(stack.model, embed_workers=stack.embed_workers, generate_workers=stack.generate_workers,
                    log_dir=log_dir) as local:
        client = _reachable_store(local.settings.effective_store_url)
        try:
            summary = _run(spec, out_path, options, local.settings, client, done, total, progress, check_alive=local.check_alive)
        finally:
            client.close()
    shutil.rmtree(log_dir, ignore_errors=True)  # kept only when something went wrong
    return summary


def _run(spec: str, out_path: Path, options: CaptionOptions, settings: Settings, client: redis.Redis,
         done: set[str], total: int, progress: bool, check_alive: Callable[[], None]) -> Summary:
    celery = create_celery_app(settings)
    jobs = JobStore(client, settings.key_prefix, settings.job_ttl_s)
    bar = tqdm(total=total, unit="img", desc="captioning", disable=None if progress else True, smoothing=0.1)
    skipped = 0

    def on_skip(path: str) -> None:
        nonlocal skipped
        skipped += 1
        if path not in done:  # a repeat within the inputs, which the listing pass counted
            bar.total = max(bar.n, bar.total - 1)

    try:
        with open(out_path, "a", encoding="utf-8") as out:
            runner = CaptionRun(celery, jobs, options, LineWriter(out), check_alive, bar, settings.max_upload_bytes)
            summary = runner.run(new_paths(discover_inputs(spec), done, on_skip))
    finally:
        bar.close()
        celery.close()
    summary.skipped = skipped
    return summary


def _reachable_store(url: str) -> redis.Redis:
    """A client whose server answered a PING; ``StoreUnavailable`` (one clear line) if it did not.
    The client keeps its retries for the run: a Redis restart part way through is ridden out."""
    client = connect(url)
    try:
        with translate_connection_errors(client):
            client.ping()
    except StoreUnavailable:
        client.close()
        raise
    return client


def _wait_for_workers(client: redis.Redis, key_prefix: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        missing = [kind for kind in ("embed", "generate") if not live_workers(client, key_prefix, kind)]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise CaptionError(
                f"no {' and no '.join(missing)} worker reported in within {timeout_s:.0f} s on the configured Redis "
                f"(key prefix {key_prefix!r}): start one with `vlmq worker {missing[0]} --model PATH`, "
                "or unset VLMQ_BROKER_URL to let `vlmq caption` start its own"
            )
        time.sleep(0.5)
