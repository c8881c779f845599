"""The adapter cache's records: the contents of an adapter name (with their ids) and its registry entry."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional

from .checkpoint import AdapterWeights
from .reads import Load
from .registry import AdapterSource

# Content ids come from one counter for the whole process, so that an id is never seen twice, not
# even across two caches (two wrapped models): hosts may log and compare them.
_CONTENT_IDS = itertools.count(1)


def new_content_id() -> int:
    return next(_CONTENT_IDS)


@dataclass(eq=False)
class Content:
    """One distinct content of an adapter name: what a slot holds."""

    id: int
    source: AdapterSource
    weights: AdapterWeights
    size: int = 0  # bytes it takes in slot memory
    refs: int = 0  # holds by running batches; > 0 ⇒ in a slot

    @property
    def name(self) -> str:
        return self.source.name


@dataclass(eq=False)
class Entry:
    """A registered adapter name."""

    source: AdapterSource
    content: Optional[Content] = None  # its current content; set ⇔ in the CPU tier
    loading: Optional[Load] = None  # set ⇔ a disk read for `source` is running
    pinned: bool = False  # ⇒ its current content is kept in a slot
    last_read: Optional[tuple] = None  # (source, fingerprint, content id) of its latest content
