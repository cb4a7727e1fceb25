"""Stop strings, matched on the text as it is generated.

Text that could still turn out to be the start of a stop string is held back,
so a streamed reply never shows part of a stop string and then takes it back.
"""

from __future__ import annotations

from shared.config.errors import InvalidInput

MAX_STOPS = 16
MAX_STOP_LENGTH = 256


class StopMatcher:
    def __init__(self, stops: list[str]):
        if len(stops) > MAX_STOPS or any(not isinstance(s, str) or not s or len(s) > MAX_STOP_LENGTH for s in stops):
            raise InvalidInput(f"stop must be at most {MAX_STOPS} non-empty strings of at most {MAX_STOP_LENGTH} characters")
        self.stops = stops
        self.stopped = False
        self._pending = ""

    def _held_back(self, text: str) -> int:
        """How many trailing characters of `text` could begin a stop string."""
        for keep in range(min(len(text), max((len(s) for s in self.stops), default=0) - 1), 0, -1):
            tail = text[-keep:]
            if any(s.startswith(tail) for s in self.stops):
                return keep
        return 0

    def push(self, text: str) -> tuple[str, bool]:
        """The text now safe to emit, and whether a stop string has been reached."""
        if self.stopped:
            return "", True
        self._pending += text
        hits = [i for i in (self._pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self._pending = self._pending[: min(hits)], ""
            return out, True
        keep = self._held_back(self._pending)
        out, self._pending = self._pending[: len(self._pending) - keep], self._pending[len(self._pending) - keep :]
        return out, False

    def flush(self, text: str = "") -> str:
        """Everything still held back, at the end of generation."""
        out, _ = self.push(text)
        out, self._pending = out + self._pending, ""
        return out
