"""The tiered cache on a wrapped model: lazy registration, prefetch, pinning, hot replace, honest
unload, faults after registration, and 1,000 registered adapters in bounded memory."""

from __future__ import annotations

import gc
import importlib
import os
import random
import shutil
import weakref

import pytest
import torch

import multilora_plugin
from multilora_plugin import (
    EMPTY,
    AdapterLoadError,
    AdapterNotFoundError,
    AdapterState,
    IncompatibleAdapterError,
    InvalidRequestError,
    toy,
)

from .conftest import padded_batch

S = AdapterState


@pytest.fixture
def reads(monkeypatch):
    """Counts weight reads from disk, per adapter name."""
    wrap_module = importlib.import_module("multilora_plugin.model")
    counts: dict = {}
    real = wrap_module.read_adapter

    def counting(name, path, modules, config=None, tensors=None):
        counts[name] = counts.get(name, 0) + 1
        return real(name, path, modules, config, tensors)

    monkeypatch.setattr(wrap_module, "read_adapter", counting)
    return counts


def logits(model, ids, names):
    with torch.no_grad():
        return model(ids, adapter_names=names).logits


def peft_logits(kit, name, ids, path=None):
    from peft import PeftModel

    model = PeftModel.from_pretrained(kit.fresh(), path or kit.paths[name]).eval()
    with torch.no_grad():
        return model(ids).logits


def test_register_reads_only_the_config(llama_kit, reads):
    model = multilora_plugin.wrap(llama_kit.fresh(), max_loras=2)
    info = model.register_adapter("attn", llama_kit.paths["attn8_rs"])
    assert reads == {} and info.state is S.COLD and info.num_bytes is None and info.rank == 8
    assert model.adapter_state("attn") is S.COLD
    ids, _ = padded_batch(2, [5, 5])
    got = logits(model, ids, ["attn", None])
    assert reads == {"attn": 1} and model.adapter_state("attn") is S.ACTIVE
    torch.testing.assert_close(got[0], peft_logits(llama_kit, "attn8_rs", ids)[0], atol=1e-4, rtol=0)
    logits(model, ids, ["attn", "attn"])
    assert reads == {"attn": 1}


def test_registration_checks_the_config(llama_kit, tmp_path):
    model = multilora_plugin.wrap(llama_kit.fresh(), max_lora_rank=4)
    with pytest.raises(IncompatibleAdapterError, match="rank 8 is above max_lora_rank=4"):
        model.register_adapter("big", llama_kit.paths["attn8_rs"])
    with pytest.raises(AdapterLoadError, match="adapter_config.json in the adapter directory"):
        model.register_adapter("empty", tmp_path)
    with pytest.raises(InvalidRequestError, match=r"adapters are given as \(name, path\)"):
        model.register_adapter(str(llama_kit.paths["all4"]), "all4")
    assert model.adapters == {}


def test_prefetch_pin_and_stats(llama_kit, reads):
    model = multilora_plugin.wrap(llama_kit.fresh(), max_loras=3, max_cpu_loras=3)
    for name, path in llama_kit.paths.items():
        model.register_adapter(name, path)
    futures = model.prefetch(["all4", "attn8_rs"])
    assert {n: f.result().name for n, f in futures.items()} == {"all4": "all4", "attn8_rs": "attn8_rs"}
    assert [model.adapter_state(n) for n in llama_kit.paths] == [S.CPU, S.CPU, S.COLD, S.COLD]
    assert model.pin_adapter("mlp16_l1") == 0
    ids, _ = padded_batch(2, [4, 4])
    for names in (["all4", None], ["attn8_rs", "all4"], ["regex_pat", None]):
        logits(model, ids, names)
        assert model.slot_contents()[0] == "mlp16_l1"
    stats = model.memory_stats()
    assert reads == {"all4": 1, "attn8_rs": 1, "mlp16_l1": 1, "regex_pat": 1}
    assert stats.cpu_entries == 3 and stats.slots_used == 3 and stats.pinned == 1
    assert stats.gpu_bytes == sum(model.adapters[n].num_bytes for n in model.slot_contents()) > 0  # packed
    assert stats.slot_free_bytes == stats.slot_memory_bytes - stats.gpu_bytes
    # pin: disk; all4: CPU; attn8_rs: CPU, all4: slot; regex_pat: disk, evicting attn8_rs (both tiers)
    assert (stats.gpu_hits, stats.gpu_misses, stats.cpu_hits, stats.cpu_misses) == (1, 4, 2, 2)
    assert model.adapter_state("attn8_rs") is S.COLD
    model.unpin_adapter("mlp16_l1")
    logits(model, ids, ["all4", "attn8_rs"])
    assert "mlp16_l1" not in model.slot_contents()


def test_unload_frees_slot_and_cpu_copy(llama_kit):
    model = llama_kit.wrapped(max_loras=2)
    ids, _ = padded_batch(2, [4, 4])
    reference = logits(model, ids, ["all4", "attn8_rs"])
    for _ in range(3):
        weights = model.adapter_cache.weights("all4")
        ref = weakref.ref(next(iter(weights.modules.values())).a)
        del weights
        model.unload_adapter("all4")
        gc.collect()
        assert ref() is None, "the unloaded adapter's CPU weights are still referenced"
        assert "all4" not in model.adapters and "all4" not in model.slot_contents()
        logits(model, ids, [None, "attn8_rs"])  # the next forward writes the freed slot
        slot = model.slot_contents().index(EMPTY)
        for layer in model._layers.values():
            assert layer.bank.ranks[slot] == 0 and layer.bank.a[slot] is None and layer.bank.b[slot] is None
        model.load_adapter("all4", llama_kit.paths["all4"])
        torch.testing.assert_close(logits(model, ids, ["all4", "attn8_rs"]), reference, atol=1e-6, rtol=0)
    for name in list(model.adapters):
        model.unload_adapter(name)
    stats = model.memory_stats()
    assert model.adapters == {} and model.slot_contents() == (EMPTY, EMPTY)
    assert (stats.gpu_bytes, stats.cpu_bytes, stats.cpu_entries, stats.registered) == (0, 0, 0, 0)


def test_loads_evictions_and_unloads_are_logged_at_info(llama_kit, caplog):
    """An operator's record: what entered and left memory, at INFO; slot moves only at DEBUG."""
    import logging

    model = llama_kit.wrapped(max_loras=2)
    ids, _ = padded_batch(1, [4])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="multilora_plugin"):
        logits(model, ids, ["all4"])  # a slot move: not at INFO
        assert model.evict_adapter("all4")
        logits(model, ids, ["all4"])  # read again from disk
        model.unload_adapter("attn8_rs")
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert said == ["adapter 'all4' evicted from memory (read again from disk when next used)",
                    "adapter 'all4' loaded into CPU memory", "adapter 'attn8_rs' unloaded"], said


def test_hot_replace_never_lands_mid_forward(llama_kit):
    """A hook replaces the adapter half way through a forward: that forward still computes the old
    version everywhere, the next one the new version everywhere."""
    model = multilora_plugin.wrap(llama_kit.fresh(), max_loras=2)
    model.load_adapter("live", llama_kit.paths["all4"])
    ids, _ = padded_batch(2, [5, 5])
    old, new = peft_logits(llama_kit, "all4", ids), peft_logits(llama_kit, "attn8_rs", ids)
    done = []

    def publish(module, args, output):
        if not done:
            done.append(model.load_adapter("live", llama_kit.paths["attn8_rs"], replace=True))

    handle = model.hf_model.model.layers[0].register_forward_hook(publish)
    got = logits(model, ids, ["live", "live"])
    handle.remove()
    assert done[0].version == 2 and model.adapters["live"].version == 2
    torch.testing.assert_close(got, old, atol=1e-4, rtol=0)
    torch.testing.assert_close(logits(model, ids, ["live", "live"]), new, atol=1e-4, rtol=0)


def test_replace_while_generate_holds_the_adapter(llama_kit):
    model = multilora_plugin.wrap(llama_kit.fresh(), max_loras=1)
    model.load_adapter("live", llama_kit.paths["all4"])
    ids, mask = padded_batch(1, [5])
    steps = []

    def publish(module, args, output):
        steps.append(model.adapter_cache.stats().in_use)
        if len(steps) == 2:
            model.load_adapter("live", llama_kit.paths["attn8_rs"], replace=True)
            model.unload_adapter("live")  # unloading while generate holds it waits for the end
            assert model.adapter_state("live") is S.EVICTING

    handle = model.hf_model.register_forward_hook(publish)
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, adapter_names=["live"], max_new_tokens=4, do_sample=False)
    handle.remove()
    assert steps == [1, 1, 1, 1]
    assert model.slot_contents() == (EMPTY,) and model.memory_stats().in_use == 0
    with pytest.raises(AdapterNotFoundError):
        model.adapter_state("live")


def test_replace_of_an_unknown_name_loads_it(llama_kit):
    model = multilora_plugin.wrap(llama_kit.fresh())
    assert model.load_adapter("x", llama_kit.paths["all4"], replace=True).version == 1


def test_files_removed_or_corrupted_after_registration(llama_kit, tmp_path):
    paths = {}
    for name in ("gone", "corrupt", "ok"):
        paths[name] = tmp_path / name
        shutil.copytree(llama_kit.paths["all4" if name != "ok" else "attn8_rs"], paths[name])
    model = multilora_plugin.wrap(llama_kit.fresh(), max_loras=2)
    for name, path in paths.items():
        model.register_adapter(name, path)
    os.remove(paths["gone"] / "adapter_model.safetensors")
    (paths["corrupt"] / "adapter_model.safetensors").write_bytes(b"\x00not a safetensors file")
    ids, _ = padded_batch(2, [4, 4])
    want = logits(model, ids, ["ok", None])
    for name in ("gone", "corrupt"):
        with pytest.raises(AdapterLoadError, match=f"{paths[name]}"):
            logits(model, ids, [name, "ok"])
        with pytest.raises(AdapterLoadError):
            model.prefetch([name])[name].result()
        assert model.adapter_state(name) is S.COLD
    assert model.memory_stats().in_use == 0 and model.memory_stats().load_errors == 4
    torch.testing.assert_close(logits(model, ids, ["ok", None]), want, atol=0, rtol=0)
    shutil.copy(os.path.join(llama_kit.paths["all4"], "adapter_model.safetensors"), paths["gone"])  # restored
    torch.testing.assert_close(logits(model, ids, ["gone", "ok"])[0], logits(model, ids, ["gone", None])[0])
    assert model.adapter_state("gone") is S.ACTIVE


@pytest.fixture(scope="module")
def thousand(llama_kit, tmp_path_factory):
    names = [f"a{i:04d}" for i in range(1000)]
    return toy.make_adapters(llama_kit.base, tmp_path_factory.mktemp("thousand"), names,
                             target_modules=["q_proj", "v_proj", "down_proj"], seed=7)


@pytest.mark.slow  # a thousand adapter directories
def test_thousand_adapters_in_bounded_memory(llama_kit, thousand):
    model = multilora_plugin.wrap(llama_kit.fresh(), max_loras=4, max_cpu_loras=16)
    for name, path in thousand.items():
        model.register_adapter(name, path)
    assert len(model.adapters) == 1000
    rng = random.Random(0)
    ids, _ = padded_batch(4, [6, 6, 6, 6])
    sample = {}
    per_adapter = None
    for step in range(40):
        names = rng.sample(sorted(thousand), 4)
        out = logits(model, ids, names)
        if step % 10 == 0:
            sample.update({n: out[i] for i, n in enumerate(names[:1])})
        stats = model.memory_stats()
        per_adapter = per_adapter or stats.cpu_bytes // stats.cpu_entries
        assert stats.cpu_entries <= 16 and stats.cpu_bytes <= 16 * per_adapter and stats.slots_used <= 4
    stats = model.memory_stats()
    assert stats.loads == stats.cpu_misses > 100 and stats.cpu_evictions == stats.loads - 16
    for name, got in sample.items():
        want = peft_logits(llama_kit, name, ids, thousand[name])[0]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory and the copy stream need a GPU")
def test_cuda_slots_fill_from_pinned_memory_on_a_side_stream(llama_kit):
    model = multilora_plugin.wrap(llama_kit.fresh().cuda(), max_loras=2)
    for name in ("all4", "attn8_rs", "regex_pat"):
        model.register_adapter(name, llama_kit.paths[name])
    ids, _ = padded_batch(2, [5, 5])
    ids = ids.cuda()
    for names in (["all4", "attn8_rs"], ["regex_pat", "all4"], ["attn8_rs", None]):
        got = logits(model, ids, names)  # every call swaps a slot through the copy stream
        for row, name in enumerate(names):
            want = peft_logits(llama_kit, name, ids.cpu())[row] if name else None
            if want is not None:
                torch.testing.assert_close(got[row].cpu(), want, atol=1e-4, rtol=0)
    weights = model.adapter_cache.weights("all4")
    assert all(w.a.is_pinned() and w.b.is_pinned() for w in weights.modules.values())
