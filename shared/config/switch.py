"""A process-wide choice between a compiled kernel and its torch path, with a run-time override."""

from __future__ import annotations

from typing import get_args

from shared.config.settings import Settings, get_settings


class Switch:
    """The mode a `Settings` field (a `Literal` of modes) holds, which benches and tests may override.

    Read when the switch is made, usually at its module's import, from `get_settings()`; a test
    that sets the variable passes a fresh `Settings()` to see its reading.
    """

    def __init__(self, field: str, settings: Settings | None = None) -> None:
        self.variable = f"VLMQ_{field.upper()}"
        self.modes: tuple[str, ...] = get_args(Settings.model_fields[field].annotation)
        self._mode: str = getattr(settings or get_settings(), field)

    def __call__(self) -> str:
        """The mode in force."""
        return self._mode

    def set(self, mode: str) -> str:
        """Put `mode` in force for the rest of the process (overriding the variable); returns the previous one."""
        if mode not in self.modes:
            raise ValueError(f"unknown {self.variable} mode {mode!r}: expected one of {', '.join(self.modes)}")
        previous, self._mode = self._mode, mode
        return previous
