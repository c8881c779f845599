"""Adapter names → sources. Registering reads only `adapter_config.json`, never the weights.

A source says where an adapter's weights are and what its config promises; the cache reads the
weights when a batch (or a prefetch) first needs them, so thousands of adapters can be registered
in about a second and cost a few kilobytes each until used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Union, Optional

from peft import LoraConfig

from ..errors import IncompatibleAdapterError, InvalidRequestError
from .checkpoint import read_config

BASE_MODEL = "__base__"  # PEFT's name for "no adapter"; None means the same


def requested_adapter(name) -> Optional[str]:
    """The adapter a request names: None (or BASE_MODEL) for the base model, else a str."""
    if name is not None and not isinstance(name, str):
        raise InvalidRequestError(f"adapter names should be str or None, but got {name!r}")
    return None if name in (None, BASE_MODEL) else name


@dataclass(frozen=True)
class AdapterSource:
    """Where one registered adapter comes from."""

    name: str
    path: str  # a local PEFT adapter directory
    config: LoraConfig  # read and validated at registration
    version: int = 1  # 1 when first registered, +1 for every hot replace (set by the cache)

    @property
    def rank(self) -> int:
        """The largest rank the config gives any module."""
        return max([self.config.r, *(self.config.rank_pattern or {}).values()])


def check_name(name: object) -> str:
    if not isinstance(name, str) or not name or name == BASE_MODEL:
        raise InvalidRequestError(
            f"an adapter name should be a non-empty str other than {BASE_MODEL!r}, but got {name!r}"
        )
    return name


def read_source(name: str, path: Union[str, os.PathLike], max_lora_rank: Optional[int]) -> AdapterSource:
    """Check `name`, read and validate the adapter's config (not its weights) and return its source.

    Raises `AdapterLoadError` for a missing or unreadable config and `IncompatibleAdapterError` for
    a config this model cannot serve (not LoRA, unsupported features, a rank above `max_lora_rank`).
    """
    check_name(name)
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidRequestError(f"an adapter path should be a str or os.PathLike, but got {path!r}")
    path = os.fspath(path)
    if not os.path.isdir(path) and os.path.isdir(name):
        raise InvalidRequestError(
            f"adapters are given as (name, path), but got the directory {name!r} as the name and {path!r} "
            "as the path (PEFT's `load_adapter` takes them the other way round)"
        )
    source = AdapterSource(name, path, read_config(path))
    if max_lora_rank is not None and source.rank > max_lora_rank:
        raise IncompatibleAdapterError(
            f"adapter at {path!r}: its config gives rank {source.rank}, but rank {source.rank} is above "
            f"max_lora_rank={max_lora_rank}; "
            f"wrap with max_lora_rank >= {source.rank}"
        )
    return source
