"""A running batch, TGI style: left-padded rows, one attention mask, one transformers KV cache.

Requests join by prefilling them as a batch of their own and **concatenating** it into the running
one, and leave by **filtering** their rows out; padding that no row needs any more is trimmed. Rows
may use different adapters: every forward passes the caller's `BatchMapping` (row → slot) as
`lora_mapping`, and the batch itself knows nothing of adapters.

    prefill([r1, r2])   mask [[0 0 1 1 1]      KV [2, H, 5, D]
                              [1 1 1 1 1]]
    concatenate(batch with 1 row of KV length 2): the shorter side is left-padded with zero KV and
                        zero mask to length 5, then rows are stacked: [3, H, 5, D]
    decode(tokens)      mask gains a column of ones; KV grows by one position
    filter([1, 2])      rows kept; leading columns masked in every kept row are cut from mask and KV
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, Optional, Sequence

import torch
from transformers import DynamicCache

from .errors import ConfigError
from .mapping import BatchMapping


def _positions(mask: torch.Tensor, new: int) -> torch.Tensor:
    """Position ids of the last `new` columns: each row counts only its unmasked tokens."""
    return (mask.cumsum(-1) - 1).clamp(min=0)[:, -new:]


@functools.lru_cache(maxsize=None)
def _takes(model_class: type, name: str) -> bool:
    return name in inspect.signature(model_class.forward).parameters


def with_cache(model, cache: DynamicCache) -> dict:
    """The forward keyword argument that hands `model` (wrapped or not) its KV cache: `cache`
    (transformers 5.2x on), else the older `past_key_values` (deprecated in 5.24, removed in 5.40)."""
    return {"cache" if _takes(type(getattr(model, "hf_model", model)), "cache") else "past_key_values": cache}


def _keeps_logits(model) -> bool:
    """Whether the model's forward (wrapped or not) can compute the logits of its last positions only."""
    return _takes(type(getattr(model, "hf_model", model)), "logits_to_keep")


def _cache_from(layers: Sequence[tuple]) -> DynamicCache:
    cache = DynamicCache()
    for i, (keys, values) in enumerate(layers):
        cache.update(keys, values, i)
    return cache


class Batch:
    """Rows of running requests: their attention mask and KV cache."""

    def __init__(self, mask: torch.Tensor, cache: DynamicCache) -> None:
        self.mask = mask  # [B, T] int64: 1 where the KV position holds a real token
        self.cache = cache  # KV for the T positions

    def __len__(self) -> int:
        return self.mask.shape[0]

    @staticmethod
    def check_model(model) -> None:
        """Refuse models whose cache this batch cannot concatenate and filter."""
        config = getattr(model, "config", None)
        if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
            raise ConfigError(
                f"continuous batching needs a full KV cache, but {type(model).__name__} uses a sliding window "
                f"of {config.sliding_window}; load the model with sliding_window=None"
            )

    @classmethod
    def prefill(cls, model, token_ids: Sequence[Sequence[int]], mapping: BatchMapping, *,
                max_tokens: Optional[int] = None, every_position: Sequence[int] = (),
                consume: Optional[Callable[[int, int, torch.Tensor], None]] = None):
        """Run the prompts (left-padded) through `model`, row i with `mapping`'s slot for row i;
        returns (batch, last-position logits [B, V]).

        The forward runs in chunks of columns of at most `max_tokens` tokens in all (rows × columns),
        each chunk attending to the KV of those before it. For the rows in `every_position`, the
        logits of every real position go to `consume(row, first, logits [n, V])`, chunk by chunk
        (`first`: the position in that row's tokens of the first of the n); for the other rows only
        the last position's logits are computed when the model can keep that few."""
        width = max(len(t) for t in token_ids)
        device = model.device
        ids = torch.zeros(len(token_ids), width, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for row, tokens in enumerate(token_ids):
            ids[row, width - len(tokens):] = torch.as_tensor(list(tokens), dtype=torch.long)
            mask[row, width - len(tokens):] = 1
        cache = DynamicCache()  # filled in place by the forward, chunk after chunk
        step = width if max_tokens is None else max(1, max_tokens // len(token_ids))
        last_only = {} if every_position or not _keeps_logits(model) else {"logits_to_keep": 1}
        for start in range(0, width, step):
            end = min(width, start + step)
            out = model(input_ids=ids[:, start:end], attention_mask=mask[:, :end],
                        position_ids=_positions(mask[:, :end], end - start), use_cache=True,
                        lora_mapping=mapping, **with_cache(model, cache), **last_only)
            for row in every_position:
                pad = width - len(token_ids[row])  # the row's first real column
                if end > pad:
                    consume(row, max(start, pad) - pad, out.logits[row, max(start, pad) - start:])
        return cls(mask, cache), out.logits[:, -1]

    def decode(self, model, tokens: Sequence[int], mapping: BatchMapping) -> torch.Tensor:
        """Feed one token per row (with `mapping`'s slot for each row); returns the next logits [B, V]."""
        ids = torch.as_tensor(list(tokens), dtype=torch.long, device=self.mask.device).view(-1, 1)
        self.mask = torch.cat([self.mask, torch.ones_like(ids)], dim=1)
        out = model(input_ids=ids, attention_mask=self.mask, position_ids=_positions(self.mask, 1),
                    use_cache=True, lora_mapping=mapping, **with_cache(model, self.cache))
        return out.logits[:, -1]

    def filter(self, rows: Sequence[int]) -> Optional["Batch"]:
        """Keep `rows` (in that order); None when no row is left."""
        if not rows:
            return None
        index = torch.as_tensor(list(rows), dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else mask.shape[1] - 1
        layers = [(layer.keys.index_select(0, index)[:, :, start:], layer.values.index_select(0, index)[:, :, start:])
                  for layer in self.cache.layers]
        return Batch(mask[:, start:].contiguous(), _cache_from(layers))

    @staticmethod
    def concatenate(batches: Sequence["Batch"]) -> "Batch":
        """One batch with the rows of all `batches`, in order, left-padded to the longest."""
        batches = [b for b in batches if b is not None]
        if len(batches) == 1:
            return batches[0]
        width = max(b.mask.shape[1] for b in batches)

        def pad(t: torch.Tensor, dim: int, extra: int) -> torch.Tensor:
            if extra == 0:
                return t
            shape = list(t.shape)
            shape[dim] = extra
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        mask = torch.cat([pad(b.mask, 1, width - b.mask.shape[1]) for b in batches], dim=0)
        layers = []
        for i in range(len(batches[0].cache.layers)):
            keys = [pad(b.cache.layers[i].keys, 2, width - b.mask.shape[1]) for b in batches]
            values = [pad(b.cache.layers[i].values, 2, width - b.mask.shape[1]) for b in batches]
            layers.append((torch.cat(keys, dim=0), torch.cat(values, dim=0)))
        return Batch(mask, _cache_from(layers))
