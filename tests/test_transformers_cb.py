"""Mixed adapters inside transformers' continuous batching (`transformers_cb`): every
request equals PEFT alone with its adapter (greedy), with fewer slots than adapters; streaming and
cancel through the manager; a broken adapter fails its own requests; what is refused."""

from __future__ import annotations

import copy
import time

import pytest
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching.requests import RequestStatus
from transformers.generation.continuous_batching.scheduler import SCHEDULER_MAPPING

import multilora_plugin
from multilora_plugin import AdapterNotFoundError, ConfigError, InvalidRequestError, toy
from multilora_plugin.transformers_cb import check_transformers_version

ADAPTERS = [None, "all4", "attn8_rs", "mlp16_l1", "regex_pat"]
PROMPTS = [[5, 9, 22, 7], [11, 12], [40, 41, 42, 43, 44, 45], [8], [70, 3, 19], [33, 34, 35, 36, 37, 38, 39, 30],
           [60, 61], [90, 17, 4]]
NEW = 6


def cb_config(**overrides) -> ContinuousBatchingConfig:
    """A small paged cache: 16-token pages and at most 24 tokens per forward, so prompts are split
    across forwards and requests join and leave at different steps."""
    return ContinuousBatchingConfig(**{"num_blocks": 48, "max_batch_tokens": 24, "page_size": 16, **overrides})


def greedy_config(new_tokens: int = NEW) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)


def wrapped(kit, max_loras: int = 2):
    model = multilora_plugin.wrap(kit.fresh(), max_loras=max_loras)
    for name, path in kit.paths.items():
        model.register_adapter(name, path)
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"])
def test_generate_batch_matches_peft_alone_with_fewer_slots_than_adapters(kit_factory, arch):
    kit = kit_factory(arch)
    if arch == "mistral":  # a sliding window shorter than the longest sequence (our own engine refuses these)
        kit = copy.copy(kit)
        base = kit.base = copy.deepcopy(kit.base)
        base.config.sliding_window = 6
    model = wrapped(kit, max_loras=2)
    names = [ADAPTERS[i % len(ADAPTERS)] for i in range(len(PROMPTS))]
    out = model.generate_batch(PROMPTS, generation_config=greedy_config(), continuous_batching_config=cb_config(),
                               adapter_names=names)
    assert list(out) == [f"req_{i}" for i in range(len(PROMPTS))]
    for (request_id, result), prompt, name in zip(out.items(), PROMPTS, names):
        assert result.status == RequestStatus.FINISHED and result.error is None, (request_id, result.error)
        assert result.generated_tokens == kit.greedy(name, prompt, NEW), (arch, request_id, name)
    stats = model.memory_stats()
    assert stats.in_use == 0  # every hold released
    assert stats.gpu_evictions > 0  # four adapters through two slots: slots were swapped mid-run
    assert not [k for k in SCHEDULER_MAPPING if k.startswith("multilora")]  # the scheduler left with its manager


def test_the_base_model_alone_equals_transformers_own_generate_batch(llama_kit):
    model = wrapped(llama_kit)
    theirs = llama_kit.fresh().generate_batch(PROMPTS, generation_config=greedy_config(),
                                              continuous_batching_config=cb_config())
    ours = model.generate_batch(PROMPTS, generation_config=greedy_config(), continuous_batching_config=cb_config())
    assert [r.generated_tokens for r in ours.values()] == [r.generated_tokens for r in theirs.values()]


def test_streaming_and_cancel_through_the_manager(llama_kit):
    model = wrapped(llama_kit, max_loras=1)
    manager = model.init_continuous_batching(generation_config=greedy_config(40), continuous_batching_config=cb_config())
    manager.start()
    try:
        long_id = manager.add_request(PROMPTS[0], adapter_name="all4", max_new_tokens=40, streaming=True)
        short_id = manager.add_request(PROMPTS[2], adapter_name="attn8_rs", max_new_tokens=NEW, streaming=True,
                                       request_id="mine")
        seen = []
        for result in manager.request_id_iter(long_id):
            seen.append(list(result.generated_tokens))
            if len(result.generated_tokens) == 3:
                manager.cancel_request(long_id)
                break
        assert seen == [llama_kit.greedy("all4", PROMPTS[0], n) for n in range(1, 4)]  # one output per token
        results = list(manager.request_id_iter(short_id))  # with one slot, it runs once the other is gone
        assert short_id == "mine" and results[-1].is_finished()
        assert results[-1].generated_tokens == llama_kit.greedy("attn8_rs", PROMPTS[2], NEW)
        deadline = time.monotonic() + 10
        while model.memory_stats().in_use and time.monotonic() < deadline:
            time.sleep(0.05)
        assert model.memory_stats().in_use == 0  # the cancelled request let its adapter go
    finally:
        manager.stop(block=True, timeout=30)
        manager.destroy()


def test_an_adapter_whose_files_break_fails_only_its_requests(llama_kit, tmp_path):
    model = wrapped(llama_kit)
    broken = tmp_path / "broken"
    toy.make_adapter(llama_kit.base, broken, r=4, seed=7)
    model.register_adapter("broken", broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    names = ["broken", "all4", None, "broken", "attn8_rs"]
    out = model.generate_batch(PROMPTS[:5], generation_config=greedy_config(), continuous_batching_config=cb_config(),
                               adapter_names=names)
    for result, prompt, name in zip(out.values(), PROMPTS, names):
        if name == "broken":
            assert result.status == RequestStatus.FAILED and "broken" in result.error
        else:
            assert result.error is None and result.generated_tokens == llama_kit.greedy(name, prompt, NEW)
    assert model.memory_stats().in_use == 0


def test_refusals(llama_kit):
    model = wrapped(llama_kit)
    with pytest.raises(AdapterNotFoundError, match="'nope' is not registered"):
        model.generate_batch(PROMPTS[:2], generation_config=greedy_config(), continuous_batching_config=cb_config(),
                             adapter_names=["all4", "nope"])
    with pytest.raises(InvalidRequestError, match="one name \\(or None\\) per input"):
        model.generate_batch(PROMPTS[:2], generation_config=greedy_config(), adapter_names=["all4"])
    with pytest.raises(ConfigError, match="CUDA graphs are not supported"):
        model.generate_batch(PROMPTS[:2], generation_config=greedy_config(),
                             continuous_batching_config=cb_config(use_cuda_graph=True))
    with pytest.raises(ConfigError, match="persistent_manager"):  # accepted by transformers, not kept here
        model.generate_batch(PROMPTS[:2], generation_config=greedy_config(), persistent_manager=True)
    with pytest.raises(ConfigError, match="scheduler_type"):
        model.generate_batch(PROMPTS[:2], generation_config=greedy_config(),
                             continuous_batching_config=cb_config(scheduler_type="prefill_first"))
    check_transformers_version("5.24.0")
    check_transformers_version("5.39.2.dev0")
    for version in ("5.23.1", "5.40.0", "6.0.0"):
        with pytest.raises(ConfigError, match=r"tested with transformers >=5.24,<5.40"):
            check_transformers_version(version)


@pytest.mark.parametrize("max_wait_steps, b_before", [(3, True), (10_000, False)])
def test_admission_is_our_schedulers_including_its_anti_starvation_bound(llama_kit, max_wait_steps, b_before):
    """One slot; B arrives behind four long A requests, and twelve short A requests arrive while those
    run. adapter_affinity prefers the resident A, so without the bound the short ones join at once
    and B waits for every A; with it, B is overdue by then, no new request may join A, the long ones
    drain and B runs ahead of the later ones."""
    model = wrapped(llama_kit, max_loras=1)
    manager = model.init_continuous_batching(generation_config=greedy_config(), continuous_batching_config=cb_config(),
                                             policy="adapter_affinity", max_wait_steps=max_wait_steps)
    manager.start()
    try:
        ids = [manager.add_request(PROMPTS[i], adapter_name="all4", max_new_tokens=24, request_id=f"A{i}",
                                   streaming=i == 0) for i in range(4)]
        ids.append(manager.add_request(PROMPTS[5], adapter_name="attn8_rs", request_id="B"))
        for result in manager.request_id_iter("A0"):  # A0 streams: B has waited eight steps when it has 8 tokens
            if len(result.generated_tokens) == 8:
                break
        ids += [manager.add_request(PROMPTS[i % 4], adapter_name="all4") for i in range(12)]
        order = []
        while len(set(order)) < len(ids):
            result = manager.get_result(timeout=30)
            assert result is not None and result.error is None
            if result.is_finished():
                order.append(result.request_id)
    finally:
        manager.stop(block=True, timeout=30)
        manager.destroy()
    assert (order.index("B") < order.index(ids[-1])) is b_before, order
    assert model.memory_stats().in_use == 0
