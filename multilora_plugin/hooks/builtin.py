"""Built-in plugins, written with the same hooks as any host plugin.

    AdapterDirectory   `Engine(..., adapter_dir=...)`: every subdirectory holding a PEFT adapter is an
                       adapter named after it; ones added later are found when a request names them
    EngineStatistics   the request and token figures of `Engine.stats()`
"""

from __future__ import annotations

import collections
import logging
import math
import os
from typing import Deque, Optional, Sequence

from ..adapters.checkpoint import CONFIG_NAME
from ..errors import ConfigError, MultiLoRAError
from .specs import hookimpl

logger = logging.getLogger(__name__)



class AdapterDirectory:
    """Adapters found under one directory, by subdirectory name."""

    def __init__(self, root: "str | os.PathLike") -> None:
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise ConfigError(f"`adapter_dir` should be a directory of PEFT adapter directories, but {self.root!r} "
                              "is not a directory")

    def path_of(self, name: str) -> Optional[str]:
        if not name or name in (".", "..") or any(sep and sep in name for sep in ("/", os.sep, os.altsep)):
            return None  # never leave the root
        path = os.path.join(self.root, name)
        return path if os.path.isfile(os.path.join(path, CONFIG_NAME)) else None

    def found(self) -> dict:
        """{name: path} of every adapter directory under the root now, by name."""
        paths = ((name, self.path_of(name)) for name in sorted(os.listdir(self.root)))
        return {name: path for name, path in paths if path is not None}

    @hookimpl
    def multilora_register_adapters(self, registry) -> None:
        for name, path in self.found().items():
            if name in registry:
                continue
            try:
                registry.add(name, path)
            except MultiLoRAError as exc:  # one bad directory does not hide the others
                logger.warning("adapter_dir: skipped %s: %s", path, exc)

    @hookimpl
    def multilora_resolve_adapter(self, name: str) -> Optional[str]:
        return self.path_of(name)


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


class EngineStatistics:
    """Counts requests by how they ended, tokens and busy time per step, time to first token and
    inter-token latency of finished requests (the most recent 10,000 / 100,000 samples)."""

    def __init__(self) -> None:
        self.ended: collections.Counter = collections.Counter()  # finish_reason → requests
        self.generated_tokens = 0
        self.busy_s = 0.0
        self.ttft_s: Deque[float] = collections.deque(maxlen=10_000)
        self.itl_s: Deque[float] = collections.deque(maxlen=100_000)

    @hookimpl
    def multilora_step_finished(self, stats) -> None:
        self.generated_tokens += stats.generated_tokens
        self.busy_s += stats.duration_s

    @hookimpl
    def multilora_request_finished(self, output) -> None:
        self.ended[output.outputs[0].finish_reason] += 1
        metrics = output.metrics
        if metrics is not None and metrics.first_token_time is not None:
            self.ttft_s.append(metrics.first_token_time - metrics.arrival_time)
            self.itl_s.extend(metrics.inter_token_s)

    def snapshot(self) -> dict:
        ttft, itl = list(self.ttft_s), list(self.itl_s)
        return dict(
            finished=self.ended["length"] + self.ended["stop"], aborted=self.ended["abort"],
            failed=self.ended["error"], generated_tokens=self.generated_tokens,
            tokens_per_s=self.generated_tokens / self.busy_s if self.busy_s else 0.0,
            mean_ttft_s=sum(ttft) / len(ttft) if ttft else 0.0, p99_ttft_s=_percentile(ttft, 0.99),
            mean_itl_s=sum(itl) / len(itl) if itl else 0.0, p99_itl_s=_percentile(itl, 0.99),
        )
