"""Slot memory bounded by bytes: adapters of many ranks resident together at their own sizes, mixed in
one batch and equal to PEFT alone; eviction to free the bytes asked for; refusal of an adapter larger
than the whole budget; compaction of a fragmented pool; the engine over more adapters than fit."""

from __future__ import annotations

import copy

import pytest
import torch

import multilora_plugin
from multilora_plugin import LLM, AdapterTooLargeError, LoRARequest, SamplingParams, toy
from multilora_plugin.slot_memory import Pool

from .oracle import Case

RANKS = {"r4": 4, "r8": 8, "r16": 16, "r64": 64}


@pytest.fixture(scope="module")
def ranked(tmp_path_factory):
    """A tiny Llama and adapters of ranks 4, 8, 16 and 64 on every linear layer, two of each rank."""
    base = toy.tiny_model("llama", hidden_size=64)
    root = tmp_path_factory.mktemp("ranked")
    paths = {f"{name}{i}": toy.make_adapter(base, root / f"{name}{i}", r=r, lora_alpha=2 * r, seed=10 * r + i)
             for name, r in RANKS.items() for i in range(2)}
    return Case(lambda: copy.deepcopy(base), paths)


def sizes(case: Case) -> dict:
    """Each adapter's bytes in slot memory, as a model wrapped with room for everything counts them."""
    model = case.wrapped(max_loras=8)
    return {name: model._slot_memory.size(model.adapter_cache.prefetch([name])[name].result())
            for name in case.paths}


def test_ranks_4_to_64_resident_together_and_mixed_equal_peft_alone(ranked):
    rows = ["r640", "r40", None, "r160", "r80", "r41", "r641", None, "r81"]
    ranked.check_mixed_forward(rows, lora_memory="64MiB")
    ranked.check_generate(["r40", "r641", None, "r160"], [[5, 9, 13], [7, 7], [11, 30, 4, 8], [6]])


def test_a_50_50_mix_of_rank_8_and_64_takes_what_the_adapters_hold(ranked):
    """Packed, not padded: slot memory is the sum of the adapters' own sizes (exactly, as every piece
    of this model is a multiple of the alignment), where padding to rank 64 would take 8x for rank 8."""
    model = ranked.wrapped(max_loras=8, lora_memory="64MiB")
    names = ["r80", "r640", "r81", "r641"]
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6]] * 4), adapter_names=names)
    stats = model.memory_stats()
    own = sum(model.adapters[n].num_bytes for n in names)
    assert stats.slots_used == 4 and stats.gpu_bytes == own
    assert stats.slot_free_bytes == stats.slot_memory_bytes - own == (64 << 20) - own
    padded = 4 * max(model.adapters[n].num_bytes for n in names)
    assert own < 0.6 * padded  # two rank-8 adapters take an eighth of a rank-64 one each


def resident(model) -> set:
    return {n for n in model.slot_contents() if n is not multilora_plugin.EMPTY}


def test_eviction_frees_the_bytes_asked_for(ranked):
    size = sizes(ranked)
    budget = size["r640"] + size["r80"] + size["r81"]  # one rank-64 and two rank-8 adapters
    model = ranked.wrapped(max_loras=8, lora_memory=budget)
    ids = torch.tensor([[5, 6, 7]])

    def use(*names):
        with torch.no_grad():
            model(input_ids=ids.expand(len(names), -1), adapter_names=list(names))

    use("r640", "r80", "r81")
    assert model.memory_stats().slot_free_bytes == 0
    use("r40")  # the least recently used adapter (r640) goes, and only it
    assert resident(model) == {"r80", "r81", "r40"}
    assert model.memory_stats().slot_free_bytes == size["r640"] - size["r40"]
    use("r641")  # 64 more: the least recent (r80) goes, which frees enough; r81 and r40 stay
    assert resident(model) == {"r81", "r40", "r641"}
    assert model.memory_stats().gpu_bytes == size["r81"] + size["r40"] + size["r641"] <= budget
    case_logits = ranked.logits("r641", ids)
    with torch.no_grad():
        got = model(input_ids=ids, adapter_names=["r641"]).logits
    torch.testing.assert_close(got, case_logits, atol=1e-4, rtol=1e-4)


def test_an_adapter_larger_than_the_budget_is_refused_naming_both_sizes(ranked):
    size = sizes(ranked)
    model = multilora_plugin.wrap(ranked.fresh(), lora_memory=size["r160"])
    model.load_adapter("r160", ranked.paths["r160"])  # exactly the budget: fits
    with pytest.raises(AdapterTooLargeError, match=r"'r640' needs .* KiB of slot memory, more than the whole "
                                                   r"budget of .* KiB \(lora_memory\)"):
        model.load_adapter("r640", ranked.paths["r640"])
    assert "r640" not in model.adapters
    model.register_adapter("r641", ranked.paths["r641"])  # read lazily: refused when a batch first needs it
    with pytest.raises(AdapterTooLargeError), torch.no_grad():
        model(input_ids=torch.tensor([[5, 6]]), adapter_names=["r641"])
    with torch.no_grad():
        got = model(input_ids=torch.tensor([[5, 6]]), adapter_names=["r160"]).logits
    torch.testing.assert_close(got, ranked.logits("r160", torch.tensor([[5, 6]])), atol=1e-4, rtol=1e-4)


def test_a_fragmented_pool_is_compacted_and_every_adapter_still_serves_its_weights(ranked):
    size = sizes(ranked)
    budget = size["r80"] + size["r40"] + size["r81"] + size["r41"]
    model = ranked.wrapped(max_loras=8, lora_memory=budget)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        model(input_ids=ids.expand(4, -1), adapter_names=["r80", "r40", "r81", "r41"])
        model.evict_adapter("r40")
        model.evict_adapter("r41")  # two rank-4 holes, neither big enough for a rank-8 adapter
        model(input_ids=ids, adapter_names=[None])  # the evictions land: the holes are free
        assert model._slot_memory.fragmentation() > 0
        model.load_adapter("r8x", ranked.paths["r80"])  # the same rank-8 weights under another name
        got = model(input_ids=ids.expand(3, -1), adapter_names=["r80", "r8x", "r81"]).logits
    assert model._slot_memory.compactions == 1 and model._slot_memory.fragmentation() == 0
    for row, name in enumerate(["r80", "r80", "r81"]):
        torch.testing.assert_close(got[row], ranked.logits(name, ids)[0], atol=1e-4, rtol=1e-4)


def test_the_pool_places_first_fit_and_compacts_in_address_order():
    pool = Pool(96, torch.device("cpu"), torch.float32)
    pool.storage.copy_(torch.arange(96.0))
    assert pool.alloc(0, 32) == 0 and pool.alloc(1, 48) == 32
    pool.free(0)
    assert pool.alloc(2, 16) == 0 and pool.gaps() == [(16, 16), (80, 16)]
    assert pool.alloc(3, 32) is None and pool.fragmentation() == 0.5
    assert pool.compact() == [1] and pool.blocks == {2: (0, 16), 1: (16, 48)}
    assert pool.storage[16:64].tolist() == list(map(float, range(32, 80)))  # the data moved with its block
    assert pool.alloc(3, 32) == 64 and pool.fragmentation() == 0.0


def test_the_engine_serves_more_adapters_than_fit_each_equal_to_peft(ranked):
    """Twelve requests over the eight adapters, a budget that holds about two of the largest: every
    request's greedy tokens are PEFT's alone."""
    size = sizes(ranked)
    model = multilora_plugin.wrap(ranked.fresh(), lora_memory=2 * size["r640"] + size["r160"])
    llm = LLM(model, load_entrypoints=False, max_num_seqs=6)
    lora = {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(ranked.paths.items())}
    names = list(ranked.paths) + ["r40", None, "r641", "r80"]
    prompts = [[5 + i, 9, 4 + 2 * i] for i in range(len(names))]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True),
                        lora_request=[lora.get(n) for n in names], use_tqdm=False)
    for name, prompt, out in zip(names, prompts, outs):
        assert out.outputs[0].token_ids == ranked.greedy(name, prompt, 4), name
    stats = model.memory_stats()
    assert stats.gpu_evictions > 0 and stats.gpu_bytes <= stats.slot_memory_bytes


def test_a_request_for_an_adapter_larger_than_the_budget_fails_alone(ranked):
    """The scheduler never waits for room that cannot exist: the request fails with the typed error,
    and the requests beside it, on adapters that fit, are PEFT's alone."""
    size = sizes(ranked)
    model = multilora_plugin.wrap(ranked.fresh(), lora_memory=size["r160"])
    llm = LLM(model, load_entrypoints=False, max_num_seqs=4)
    lora = {name: LoRARequest(name, i + 1, ranked.paths[name]) for i, name in enumerate(["r640", "r160", "r40"])}
    names = ["r160", "r640", None, "r40"]
    prompts = [[5, 9, 4], [6, 9, 4], [7, 9, 4], [8, 9, 4]]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True),
                        lora_request=[lora.get(n) for n in names], use_tqdm=False)
    for name, prompt, out in zip(names, prompts, outs):
        if name == "r640":
            assert out.outputs[0].finish_reason == "error" and "more than the whole budget" in str(out.error)
        else:
            assert out.outputs[0].token_ids == ranked.greedy(name, prompt, 3), name


def test_a_hot_replace_by_a_larger_adapter_never_overfills_the_budget(ranked):
    """Replaced by a rank-64 adapter that does not fit beside the others, a rank-8 adapter's slot is
    freed rather than rewritten in place; the next batch that names it evicts what it must and serves the
    new weights."""
    size = sizes(ranked)
    model = multilora_plugin.wrap(ranked.fresh(), lora_memory=size["r640"] + size["r80"] - 1)
    model.load_adapter("x", ranked.paths["r80"])
    model.load_adapter("y", ranked.paths["r81"])
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        model(input_ids=ids.expand(2, -1), adapter_names=["x", "y"])
        assert resident(model) == {"x", "y"}
        model.load_adapter("x", ranked.paths["r640"], replace=True)
        model(input_ids=ids, adapter_names=[None])  # the replace lands: x's slot is freed, y stays
        assert resident(model) == {"y"} and model.adapters["x"].version == 2
        got = model(input_ids=ids, adapter_names=["x"]).logits
    assert resident(model) == {"x"} and model.memory_stats().gpu_bytes == size["r640"]
    torch.testing.assert_close(got, ranked.logits("r640", ids), atol=1e-4, rtol=1e-4)
