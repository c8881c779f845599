"""When the engine process dies: how many deaths the server rides out (`RestartPolicy`), and what it
keeps to say why when it gives up (the engine's own stderr, teed to a file: `Tee`, `last_lines`).

A server whose engine died is restarted with the same arguments and adapters (see
`engine_process.EngineProcess`); an engine that keeps dying is a crash loop that restarting would only
hide, so after `max_deaths` deaths within `window_s` seconds the server stops, exits non-zero and names
the engine's exit code and its last lines, and a process supervisor (systemd, a container's restart
policy) takes over.
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field

from ..errors import ConfigError


@dataclass
class RestartPolicy:
    """`max_deaths` deaths of the engine within `window_s` seconds stop the server (1: the first death
    does, as vLLM's server exits with its engine core); a start that fails counts as a death."""

    max_deaths: int = 3
    window_s: float = 300.0
    _deaths: collections.deque = field(default_factory=collections.deque, init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.max_deaths, int) or isinstance(self.max_deaths, bool) or self.max_deaths < 1:
            raise ConfigError(f"`max_deaths` should be an int >= 1, but got {self.max_deaths!r}")
        if not isinstance(self.window_s, (int, float)) or not self.window_s > 0:
            raise ConfigError(f"`window_s` should be a number of seconds > 0, but got {self.window_s!r}")

    def died(self, now: float) -> bool:
        """Record a death at `now` (time.monotonic()); True when that makes too many: give up."""
        self._deaths.append(now)
        while self._deaths and self._deaths[0] < now - self.window_s:
            self._deaths.popleft()
        return len(self._deaths) >= self.max_deaths

    @property
    def recent_deaths(self) -> int:
        return len(self._deaths)


class Tee:
    """A text stream that writes to two (the engine process's stderr: the terminal and its log file)."""

    def __init__(self, first, second) -> None:
        self.first, self.second = first, second

    def write(self, text: str) -> int:
        self.second.write(text)
        return self.first.write(text)

    def flush(self) -> None:
        self.first.flush()
        self.second.flush()

    def __getattr__(self, name: str):
        return getattr(self.first, name)


def last_lines(path: str, n: int = 20) -> str:
    """The last `n` lines of the file at `path` ("" when there is none)."""
    if not os.path.exists(path):
        return ""
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 64 * 1024))
        lines = f.read().decode("utf-8", "replace").splitlines()
    return "\n".join(lines[-n:])
