"""Gathers work items from many threads into batches for one function.

Celery runs the embed tasks of a worker process in threads; each task submits
its preprocessed images here and waits. One thread runs the model on up to
`max_batch` items, waiting at most `max_wait_s` for a batch to fill, so a GPU
sees large batches while image decoding goes on in the task threads.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from typing import Callable, Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class Batcher(Generic[Item, Result]):
    def __init__(self, run_batch: Callable[[list[Item]], list[Result]], max_batch: int, max_wait_s: float, name: str = "batcher"):
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._queue: queue.Queue[tuple[Item, Future]] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()
        self.batch_sizes: list[int] = []  # recent sizes, for metrics and tests
        self.on_batch: Callable[[int, float], None] | None = None

    def submit(self, item: Item) -> Future:
        future: Future = Future()
        self._queue.put((item, future))
        return future

    def _collect(self) -> list[tuple[Item, Future]]:
        batch = [self._queue.get()]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                batch.append(self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._collect()
            started = time.perf_counter()
            try:
                results = self.run_batch([item for item, _ in batch])
            except BaseException as exc:  # the waiting tasks report it; the loop keeps serving
                for _, future in batch:
                    future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                future.set_result(result)
            self.batch_sizes = (self.batch_sizes + [len(batch)])[-1000:]
            if self.on_batch is not None:
                self.on_batch(len(batch), time.perf_counter() - started)
