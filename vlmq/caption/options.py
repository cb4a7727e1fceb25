"""The options of a captioning run: the prompts, sampling, and how much to do before stopping."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FailureLimit:
    """`--max-failures`: a count (`50`) or a share of the images finished (`10%`, judged from the 20th on)."""

    count: int | None = None
    percent: float | None = None
    MIN_FOR_PERCENT = 20

    @classmethod
    def parse(cls, text: str) -> FailureLimit:
        try:
            if text.endswith("%"):
                percent = float(text[:-1])
                if not 0 <= percent <= 100:
                    raise ValueError
                return cls(percent=percent)
            count = int(text)
            if count < 0:
                raise ValueError
            return cls(count=count)
        except ValueError:
            raise ValueError(f"--max-failures takes a count (50) or a percentage (10%), not {text!r}") from None

    def exceeded(self, failed: int, finished: int) -> bool:
        if self.count is not None:
            return failed > self.count
        return finished >= self.MIN_FOR_PERCENT and 100 * failed / finished > self.percent


@dataclass(frozen=True)
class CaptionOptions:
    prompts: dict[str, str]  # name → text (prompts.py)
    max_tokens: int = 32
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    max_in_flight: int = 32
    tenant: str = "public"
    timeout_s: float = 600.0  # per image, from enqueue to finish
    limit: int | None = None  # images to caption in this run, at most
    max_failures: FailureLimit | None = None

    def payload(self, prompt: str) -> dict[str, Any]:
        """The generate request: one user turn with the (chained) image and the prompt."""
        sampling: dict[str, Any] = {"max_tokens": self.max_tokens, "temperature": self.temperature}
        for name in ("top_p", "top_k", "seed"):
            if getattr(self, name) is not None:
                sampling[name] = getattr(self, name)
        if self.ignore_eos:
            sampling["ignore_eos"] = True
        content = [{"type": "image"}, {"type": "text", "text": prompt}]
        return {"messages": [{"role": "user", "content": content}], "sampling": sampling, "stop": list(self.stop)}
