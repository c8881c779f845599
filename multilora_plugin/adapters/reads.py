"""Disk reads of adapter sources for the cache: each read runs once, on the thread that needs the
adapter first or on the prefetch pool, and everybody else who needs it waits on the same future."""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Optional

from ..errors import AdapterLoadError, MultiLoRAError
from .checkpoint import AdapterWeights
from .registry import AdapterSource

Reader = Callable[[AdapterSource], AdapterWeights]


class Load(Future):
    """A read of one adapter source: whoever claims it first reads, everybody else waits on it."""

    def __init__(self) -> None:
        super().__init__()
        self._claim = threading.Lock()
        self._claimed = False

    def claim(self) -> bool:
        """True for the one caller that is to run the read."""
        with self._claim:
            first, self._claimed = not self._claimed, True
            return first

    def cancel(self) -> bool:  # other callers may be waiting on the same read
        return False


class Reads:
    """Runs the cache's reader, here or on a small thread pool started on first use."""

    def __init__(self, read: Reader, workers: int) -> None:
        self._read = read
        self._workers = workers
        self._pool: Optional[ThreadPoolExecutor] = None

    def run(self, source: AdapterSource, load: Load) -> Optional[tuple]:
        """Claim `load` and read `source`: (weights, None) or (None, the error as a `MultiLoRAError`);
        None when another thread claimed it first (it sets the result)."""
        if not load.claim():
            return None
        try:
            return self._read(source), None
        except Exception as exc:
            if not isinstance(exc, MultiLoRAError):
                exc = AdapterLoadError(f"could not load adapter {source.name!r} from {source.path!r}: {exc!r}")
            return None, exc

    def submit(self, fn: Callable, *args) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="multilora-prefetch")
        self._pool.submit(fn, *args)

    def close(self) -> None:
        """Stop the pool (reads already running finish)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
