"""What a run reports: the progress bar (images/s, captions/s, tokens/s, ETA, failures) and the summary."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

POSTFIX_EVERY_S = 0.5


@dataclass
class Summary:
    done: int = 0  # images with every caption
    failed: int = 0  # images with an error
    skipped: int = 0  # already in the output, or given twice
    elsewhere: int = 0  # units another client of the run finished
    embedded: int = 0  # image bytes sent to the embedder by this client
    deduplicated: int = 0  # images written from the outcome of the same bytes elsewhere in the run
    generated_tokens: int = 0
    captions: dict[str, int] = field(default_factory=dict)  # prompt name → captions written
    seconds: float = 0.0
    stopped: str | None = None  # why the run ended early, if it did
    interrupted: bool = False  # by Ctrl-C (or SIGTERM)

    def count(self, record: dict[str, Any], prompt_names: list[str]) -> None:
        if "error" in record:
            self.failed += 1
        else:
            self.done += 1
        for name in prompt_names:
            if name in record:
                self.captions[name] = self.captions.get(name, 0) + 1

    @property
    def images_per_s(self) -> float:
        return (self.done + self.failed) / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        state = self.stopped or "finished"
        captions = ", ".join(f"{name} {count}" for name, count in self.captions.items()) or "none"
        elsewhere = f", {self.elsewhere} units done by other clients" if self.elsewhere else ""
        return (f"{state}: done {self.done}, failed {self.failed}, skipped {self.skipped} (already in the output or repeated) "
                f"in {self.seconds:.1f} s: {self.images_per_s:.2f} images/s; embedded {self.embedded}, deduplicated "
                f"{self.deduplicated}{elsewhere}; captions written: {captions}; {self.generated_tokens} tokens generated")


class Progress:
    """A tqdm bar over images, its postfix the caption and token rates and the failures so far."""

    def __init__(self, total: int, *, enabled: bool):
        self.summary = Summary()
        self._bar = tqdm(total=total, unit="img", desc="captioning", disable=None if enabled else True, smoothing=0.1)
        self._started = time.monotonic()
        self._shown = 0.0

    def update(self) -> None:
        self._bar.update(1)
        now = time.monotonic()
        if now - self._shown < POSTFIX_EVERY_S:
            return
        self._shown = now
        seconds = max(now - self._started, 1e-9)
        summary = self.summary
        self._bar.set_postfix(captions_s=f"{sum(summary.captions.values()) / seconds:.2f}",
                              tok_s=f"{summary.generated_tokens / seconds:.1f}", failed=summary.failed, refresh=False)

    def close(self) -> None:
        self._bar.close()
