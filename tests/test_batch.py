"""The running batch: requests joining (concatenate) and leaving (filter) at different steps give,
row by row, the tokens PEFT generates for each request alone."""

from __future__ import annotations

import warnings

import pytest
import torch

import multilora_plugin
from multilora_plugin import BatchMapping
from multilora_plugin.batch import Batch
from multilora_plugin.errors import ConfigError

# (prompt, adapter, new tokens, step at which it joins)
REQUESTS = [
    ([5, 9, 22, 7], "all4", 6, 0),
    ([11, 12], None, 3, 0),
    ([40, 41, 42, 43, 44, 45], "attn8_rs", 5, 2),
    ([8], "all4", 4, 2),
    ([70, 3, 19], "regex_pat", 4, 3),
    ([33, 34, 35, 36, 37, 38, 39, 30], "mlp16_l1", 3, 5),
]


def serve(model, requests):
    """Greedy continuous batching by hand: join at the given step, leave when done. Every adapter is
    held in a slot for the whole run, and each forward gets the mapping of its rows' slots."""
    hold = model.adapter_cache.acquire(a for _, a, _, _ in requests if a is not None)

    def mapping(indices):
        slots = tuple(-1 if requests[i][1] is None else hold.slots[requests[i][1]] for i in indices)
        return BatchMapping(slots, model.multilora_config.max_loras)

    got = {i: [] for i in range(len(requests))}
    batch, rows, last = None, [], []
    step = 0
    with torch.no_grad():
        while step == 0 or rows or any(join >= step for *_, join in requests):
            if batch is not None:
                tokens = batch.decode(model, last, mapping(rows)).argmax(-1).tolist()
                for r, t in zip(rows, tokens):
                    got[r].append(t)
                last = tokens
            joining = [i for i, (*_, join) in enumerate(requests) if join == step]
            if joining:
                new, logits = Batch.prefill(model, [requests[i][0] for i in joining], mapping(joining))
                tokens = logits.argmax(-1).tolist()
                for r, t in zip(joining, tokens):
                    got[r].append(t)
                batch, rows, last = Batch.concatenate([batch, new]), rows + joining, last + tokens
            keep = [k for k, r in enumerate(rows) if len(got[r]) < requests[r][2]]
            if batch is not None:
                batch = batch.filter(keep)
                rows, last = [rows[k] for k in keep], [last[k] for k in keep]
                assert batch is None or batch.mask[:, 0].any(), "padding that no row needs was not trimmed"
            step += 1
    model.adapter_cache.release(hold)
    return got


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gpt2", "opt"])
def test_join_and_leave_match_peft(kit_factory, arch):
    kit = kit_factory(arch)
    model = multilora_plugin.wrap(kit.fresh(), max_loras=4)
    for name, path in kit.paths.items():
        model.register_adapter(name, path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = serve(model, REQUESTS)
    # the KV cache goes by the argument transformers supports (`past_key_values` goes away in 5.40)
    assert not [w for w in caught if "past_key_values" in str(w.message)], [str(w.message) for w in caught]
    for i, (prompt, adapter, new_tokens, _) in enumerate(REQUESTS):
        assert got[i] == kit.greedy(adapter, prompt, new_tokens), (arch, i, adapter)


def test_filter_to_nothing_and_concatenate_one():
    mask = torch.ones(2, 3, dtype=torch.long)
    batch = Batch(mask, None)
    assert batch.filter([]) is None
    assert Batch.concatenate([None, batch]) is batch


def test_sliding_window_models_are_refused(kit_factory):
    model = kit_factory("mistral").fresh()
    model.config.sliding_window = 16
    with pytest.raises(ConfigError, match="uses a sliding window of 16"):
        Batch.check_model(model)
    Batch.check_model(kit_factory("llama").fresh())
