"""`vlmq caption`: open the inputs and the output, find or start the workers, run, report.

With ``--run-id`` several clients share one run (docs/DESIGN.md §10): each writes
its own part (`OUT.parts/CLIENT.jsonl|.parquet`), and `vlmq caption merge OUT`
joins the parts, each image once. Without it the run's claims live under a fresh
id, so one client works exactly as a run of its own.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import redis

from shared.config.errors import StoreUnavailable
from shared.config.settings import Settings
from shared.queue.celery_app import create_celery_app
from shared.queue.heartbeat import live_workers
from shared.store.jobs import JobStore
from shared.store.redis_conn import connect, translate_connection_errors
from vlmq.caption.claims import Claims
from vlmq.caption.feed import FeedCounts, feed
from vlmq.caption.inputs import InputOptions, count_items, open_units
from vlmq.caption.outputs import open_output
from vlmq.caption.progress import Progress, Summary
from vlmq.caption.options import CaptionOptions
from vlmq.caption.run import CaptionRun, Wakeups
from vlmq.stack import ONE_WORKER, LocalStack, private_log_dir


# Most generate requests a private stack's worker runs together (VLMQ_GENERATE_MAX_BATCH's default is 8, for a
# worker that many clients share); bench/caption.py measures the difference.
PRIVATE_GENERATE_BATCH = 32


class CaptionError(RuntimeError):
    """A problem that stops the whole run (bad arguments, no workers); its message is the one line shown."""


@dataclass(frozen=True)
class StackChoice:
    """Where the workers come from: a running stack (``VLMQ_BROKER_URL`` set) or a private one started here."""

    model: str | None
    embed_workers: int | None = None  # None for both: one process serving both queues (`vlmq worker all`)
    generate_workers: int | None = None
    worker_timeout_s: float = 30.0  # how long to wait for a running stack's workers to report in

    def worker_counts(self) -> Mapping[str, int]:
        """The private stack's workers, as `LocalStack`'s keyword arguments."""
        if self.embed_workers is None and self.generate_workers is None:
            # One process: vision tower and LM take turns on every core, where two processes would split the
            # cores evenly between uneven work (bench/caption.py measures it).
            return ONE_WORKER
        return {"embed_workers": self.embed_workers or 1, "generate_workers": self.generate_workers or 1}

    def describe(self) -> str:
        counts = self.worker_counts()
        if counts.get("combined_workers"):
            return "one worker serving both queues"
        return f"{counts['embed_workers']} embed and {counts['generate_workers']} generate workers"


@dataclass(frozen=True)
class RunChoice:
    """A run shared by several clients (``run_id``), and this client's part in it."""

    run_id: str | None = None
    client_id: str = f"{socket.gethostname()}-{os.getpid()}"
    claim_timeout_s: float = 120.0  # a dead client's claims pass to another after this long

    def output_path(self, out: str | None, out_format: str) -> str | None:
        """A shared run's JSONL or Parquet goes to this client's part; txt and shards are split by input already."""
        if self.run_id is None or out_format not in ("jsonl", "parquet"):
            return out
        return str(parts_folder(out) / f"{self.client_id}.{out_format}")


def parts_folder(out: str) -> Path:
    return Path(f"{out}.parts")


@dataclass(frozen=True)
class Target:
    """What is read and written."""

    spec: str
    out: str | None
    out_format: str
    inputs: InputOptions = InputOptions()


def dry_run(target: Target, options: CaptionOptions, run: RunChoice) -> str:
    """How many images the inputs hold and how many the output has; nothing is captioned, no Redis needed."""
    output = open_output(target.out_format, run.output_path(target.out, target.out_format), list(options.prompts))
    total, done = count_items(target.spec, target.inputs, output.is_done)
    todo = total - done if options.limit is None else min(total - done, options.limit)
    return f"dry run: {total} images, {done} already in the output, {todo} to caption"


def caption(target: Target, options: CaptionOptions, stack: StackChoice, run: RunChoice = RunChoice(), *,
            progress: bool = True) -> Summary:
    """Caption every image of ``target.spec`` into its output; see the package docstring."""
    output = open_output(target.out_format, run.output_path(target.out, target.out_format), list(options.prompts))
    try:
        total, done = count_items(target.spec, target.inputs, output.is_done)  # a listing pass, for the ETA
        if total == done and run.run_id is None:  # nothing new: no need for Redis or workers
            return Summary(skipped=done)
        if options.limit is not None:
            total = min(total, done + options.limit)
        work = _Work(target, options, run, output, total - done, progress)
        if "VLMQ_BROKER_URL" in os.environ:
            settings = Settings()
            client = _reachable_store(settings.effective_store_url)
            try:
                _wait_for_workers(client, settings.key_prefix, stack.worker_timeout_s)
                return work.run(settings, client, check_alive=lambda: None)
            finally:
                client.close()
        return _with_private_stack(stack, work)
    finally:
        output.close()


def _with_private_stack(stack: StackChoice, work: _Work) -> Summary:
    if stack.model is None:
        raise CaptionError("--model is required when no running stack is configured (VLMQ_BROKER_URL unset)")
    if not Path(stack.model).is_dir():
        raise CaptionError(f"model folder not found: {stack.model}")
    # The private stack serves this run alone: its generate worker decodes together every generate request the
    # run keeps in flight (one per prompt per image), up to a cap, unless VLMQ_GENERATE_MAX_BATCH says otherwise.
    in_flight = work.options.max_in_flight * len(work.options.prompts)
    os.environ.setdefault("VLMQ_GENERATE_MAX_BATCH", str(min(in_flight, PRIVATE_GENERATE_BATCH)))
    log_dir = private_log_dir()
    print(f"starting a private stack: {stack.describe()} (logs in {log_dir})", file=sys.stderr, flush=True)
    with LocalStack(stack.model, **stack.worker_counts(), log_dir=log_dir) as local:
        client = _reachable_store(local.settings.effective_store_url)
        try:
            summary = work.run(local.settings, client, check_alive=local.check_alive)
        finally:
            client.close()
    shutil.rmtree(log_dir, ignore_errors=True)  # kept only when something went wrong
    return summary


@dataclass
class _Work:
    target: Target
    options: CaptionOptions
    run_choice: RunChoice
    output: object
    total: int
    progress: bool

    def run(self, settings: Settings, client: redis.Redis, check_alive: Callable[[], None]) -> Summary:
        celery = create_celery_app(settings)
        jobs = JobStore(client, settings.key_prefix, settings.job_ttl_s)
        choice = self.run_choice
        run_id = choice.run_id or f"single-{uuid.uuid4().hex}"

        def claims(kind: str) -> Claims:
            return Claims(client, settings.key_prefix, run_id, kind, choice.client_id, choice.claim_timeout_s, settings.job_ttl_s)

        units = claims("unit")
        bar = Progress(self.total, enabled=self.progress)
        counts = FeedCounts()
        wakeups = Wakeups(client, jobs)
        try:
            runner = CaptionRun(celery, jobs, wakeups, self.options, self.output, units, claims("sha"), bar,
                                check_alive=check_alive, max_upload_bytes=settings.max_upload_bytes,
                                refresh_s=choice.claim_timeout_s / 4)
            summary = runner.run(feed(open_units(self.target.spec, self.target.inputs), self.output, units, counts))
        finally:
            wakeups.close()
            bar.close()
            celery.close()
        summary.skipped, summary.elsewhere = counts.skipped, counts.elsewhere
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
