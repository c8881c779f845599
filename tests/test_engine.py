"""The engine end to end: many concurrent requests over more adapters than slots give, request by
request, PEFT's tokens for that request alone; preemption, aborts, bad requests and bad adapters
change nothing for the other requests; seeded sampling does not depend on the batch."""

from __future__ import annotations

import copy
import os
import random

import pytest
import torch

import multilora_plugin
from multilora_plugin import LLM, Engine, LoRARequest, toy
from multilora_plugin.errors import (
    AdapterExistsError,
    AdapterLoadError,
    AdapterNotFoundError,
    ConfigError,
    InvalidRequestError,
)
from multilora_plugin.sampling import SamplingParams

VOCAB = 128
EOS = 3  # the tiny tokenizer's </s>
NAMES = [f"task{i}" for i in range(8)]


class Kit:
    """A tiny Llama, its tokenizer, 8 PEFT adapters on disk and PEFT's answers for single requests."""

    def __init__(self, root):
        self.base = toy.tiny_model("llama", vocab_size=VOCAB)
        self.tokenizer = toy.tiny_tokenizer(VOCAB)
        self.paths = toy.make_adapters(self.base, root, NAMES, r=8, lora_alpha=16, seed=7)
        self._peft = {}

    def wrapped(self, max_loras=4, **kwargs):
        model = multilora_plugin.wrap(copy.deepcopy(self.base), max_loras=max_loras, **kwargs)
        for name, path in self.paths.items():
            model.register_adapter(name, path)
        return model

    def alone(self, prompt, adapter, max_new_tokens, eos=True):
        """PEFT (or the base model) on this request alone, greedy; cut after the first EOS."""
        if adapter not in self._peft:
            from peft import PeftModel

            self._peft[adapter] = (PeftModel.from_pretrained(copy.deepcopy(self.base), self.paths[adapter]).eval()
                                   if adapter else self.base)
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = self._peft[adapter].generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                               max_new_tokens=max_new_tokens, pad_token_id=0, eos_token_id=None)
        tokens = out[0, len(prompt):].tolist()
        return tokens[: tokens.index(EOS) + 1] if eos and EOS in tokens else tokens


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    return Kit(tmp_path_factory.mktemp("engine_adapters"))


def workload(n=27, seed=0):
    """(prompt ids, adapter, max_new_tokens, step at which it arrives): 8 adapters and the base model."""
    rng = random.Random(seed)
    requests = []
    for i in range(n):
        prompt = [rng.randrange(4, VOCAB) for _ in range(rng.randrange(2, 14))]
        adapter = None if i % 9 == 8 else NAMES[rng.randrange(8)]
        requests.append((prompt, adapter, rng.randrange(3, 12), rng.choice([0, 0, 1, 3, 6])))
    return requests


def drive(engine, requests, params=None, check=None):
    """Add each request at its step, step until done; returns {index: final RequestOutput}."""
    done, step = {}, 0
    while step == 0 or engine.has_unfinished_requests() or any(at >= step for *_, at in requests):
        for i, (prompt, adapter, new_tokens, at) in enumerate(requests):
            if at == step:
                p = params(i) if params else SamplingParams(max_new_tokens=new_tokens, temperature=0)
                engine.add_request(str(i), prompt_token_ids=prompt, sampling_params=p, lora_request=adapter)
        for out in engine.step():
            if out.finished:
                done[int(out.request_id)] = out
        if check:
            check(engine)
        step += 1
    return done


def invariants(engine):
    """What must hold after every step: at most max_loras adapters among running rows, every row's
    slot holding exactly the content that row's request holds, and one KV row per running request."""
    rows = engine._rows
    adapters = {s.adapter for s in rows if s.adapter is not None}
    assert len(adapters) <= engine.model.multilora_config.max_loras
    assert all((s.hold is None) == (s.adapter is None) for s in rows)
    assert len(rows) == (0 if engine._batch is None else len(engine._batch))
    content_ids = engine.cache.content_ids()
    for s in rows:
        if s.adapter is not None:
            assert content_ids[s.slot] == s.hold.content_ids[s.adapter]
            assert engine.model.slot_contents()[s.slot] == s.adapter


@pytest.mark.parametrize("policy", ["fcfs", "adapter_affinity", "fair_share", "priority"])
def test_concurrent_requests_equal_peft_alone(kit, policy):
    requests = workload()
    engine = Engine(kit.wrapped(max_loras=4), kit.tokenizer, max_num_seqs=10, policy=policy)
    done = drive(engine, requests, check=invariants)
    assert sorted(done) == list(range(len(requests)))
    for i, (prompt, adapter, new_tokens, _) in enumerate(requests):
        out = done[i].outputs[0]
        assert out.token_ids == kit.alone(prompt, adapter, new_tokens), (i, adapter)
        assert out.finish_reason == ("stop" if out.token_ids[-1] == EOS else "length")
    stats = engine.stats()
    assert stats.adapter_swaps > 0 and stats.slot_swaps > 0, "8 adapters over 4 slots must swap"
    assert stats.finished == len(requests) and stats.running == stats.waiting == 0
    assert stats.generated_tokens == sum(len(o.outputs[0].token_ids) for o in done.values())
    assert engine.cache.stats().in_use == 0, "every slot reference was released"


@pytest.mark.parametrize("arch", ["gpt2", "opt", "qwen2"])
def test_other_architectures_equal_peft(kit_factory, arch):
    arch_kit = kit_factory(arch)
    model = multilora_plugin.wrap(arch_kit.fresh(), max_loras=2)
    for name, path in arch_kit.paths.items():
        model.register_adapter(name, path)
    names = list(arch_kit.paths) + [None]
    requests = [([5 + i, 9, 22 + i, 7][: 2 + i % 3], names[i % len(names)], 3 + i % 4, i % 3) for i in range(10)]
    done = drive(Engine(model, max_num_seqs=4), requests, check=invariants)
    for i, (prompt, adapter, new_tokens, _) in enumerate(requests):
        model_alone = arch_kit.peft(adapter) if adapter else arch_kit.fresh().eval()
        ids = torch.tensor([prompt])
        with torch.no_grad():
            want = model_alone.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                        max_new_tokens=new_tokens, pad_token_id=0, eos_token_id=None)
        assert done[i].outputs[0].token_ids == want[0, len(prompt):].tolist(), (arch, i, adapter)


def test_preempted_requests_resume_with_the_same_tokens(kit):
    requests = workload(n=12, seed=3)
    sampled = lambda i: SamplingParams(max_new_tokens=requests[i][2] + 6, temperature=0.9, top_k=30, seed=100 + i,
                                       ignore_eos=True)
    free = drive(Engine(kit.wrapped(), kit.tokenizer), requests, sampled)
    tight = Engine(kit.wrapped(), kit.tokenizer, max_total_tokens=48, max_num_batched_tokens=32)
    squeezed = drive(tight, requests, sampled, check=invariants)
    assert tight.stats().preemptions > 0
    for i in range(len(requests)):
        assert squeezed[i].outputs[0].token_ids == free[i].outputs[0].token_ids, i
    assert max(o.metrics.num_preemptions for o in squeezed.values()) > 0


def test_seeded_sampling_does_not_depend_on_the_batch(kit):
    prompt = [5, 17, 40, 9, 60]
    params = SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9, repetition_penalty=1.1, seed=1234,
                            ignore_eos=True)
    results = []
    for others in ([], [(None, 2)], [("task1", 4), ("task2", 1), (None, 3), ("task3", 9)]):
        engine = Engine(kit.wrapped(), kit.tokenizer)
        for j, (adapter, n) in enumerate(others):  # arrive first: the request lands in different rows
            engine.add_request(f"o{j}", prompt_token_ids=[7 + j] * (3 + j), lora_request=adapter,
                               sampling_params=SamplingParams(max_new_tokens=n, temperature=1.0))
        engine.add_request("x", prompt_token_ids=prompt, sampling_params=params, lora_request="task0")
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id == "x" and out.finished:
                    results.append(out.outputs[0].token_ids)
    assert len(results) == 3 and results[0] == results[1] == results[2]


def test_abort_frees_the_slot_reference_and_kv_rows(kit):
    engine = Engine(kit.wrapped(), kit.tokenizer)
    long = SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True)
    engine.add_request("a", prompt_token_ids=[5, 6, 7], sampling_params=long, lora_request="task0")
    engine.add_request("b", prompt_token_ids=[8, 9], sampling_params=long, lora_request="task1")
    engine.add_request("w", prompt_token_ids=[8, 9], sampling_params=long, lora_request="task2")
    for _ in range(3):
        engine.step()
    assert len(engine._batch) == 3 and engine.cache.stats().in_use == 3
    engine.abort_request("a")
    engine.abort_request("nope")  # unknown ids are ignored
    assert len(engine._batch) == 2, "the aborted row left the KV cache at once"
    assert engine.cache.stats().in_use == 2, "its adapter is no longer held"
    outs = engine.step()
    aborted = [o for o in outs if o.request_id == "a"]
    assert len(aborted) == 1 and aborted[0].finished and aborted[0].outputs[0].finish_reason == "abort"
    assert len(aborted[0].outputs[0].token_ids) == 3
    engine.abort_request(["w"])
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert done["w"].outputs[0].finish_reason == "abort"
    assert done["b"].outputs[0].token_ids == kit.alone([8, 9], "task1", 30, eos=False)
    stats = engine.stats()
    assert (stats.aborted, stats.finished, engine.cache.stats().in_use) == (2, 1, 0)


def test_bad_requests_are_refused_alone(kit):
    engine = Engine(kit.wrapped(), kit.tokenizer)
    engine.add_request("ok", "the man said good things", SamplingParams(max_new_tokens=5, temperature=0),
                       lora_request="task0")
    cases = [
        (dict(request_id="ok", prompt=[5]), InvalidRequestError, "already queued or running"),
        (dict(request_id="e", prompt=""), InvalidRequestError, "the prompt is empty"),
        (dict(request_id="e", prompt_token_ids=[]), InvalidRequestError, "the prompt is empty"),
        (dict(request_id="e", prompt_token_ids=[5, VOCAB]), InvalidRequestError, f"ints in 0..{VOCAB - 1}"),
        (dict(request_id="e", prompt_token_ids=[5], sampling_params=SamplingParams(max_new_tokens=600)),
         InvalidRequestError, "should fit the model's 512 positions"),
        (dict(request_id="e", prompt_token_ids=[5], sampling_params={"max_new_tokens": -1}),
         InvalidRequestError, "`max_new_tokens` should be an int >= 0, but got -1"),
        (dict(request_id="e", prompt_token_ids=[5], sampling_params={"max_new_tokens": 0}),
         InvalidRequestError, "with max_new_tokens=0 the prompt is only scored, so it should have at least 2"),
        (dict(request_id="e", prompt_token_ids=[5], sampling_params={"temprature": 1}), InvalidRequestError,
         "bad sampling parameters"),
        (dict(request_id="e", prompt_token_ids=[5], lora_request="missing"), AdapterNotFoundError,
         "adapter 'missing' is not registered"),
        (dict(request_id="e", prompt_token_ids=[5], lora_request=LoRARequest("fresh", 3)), AdapterNotFoundError,
         "give its lora_path"),
        (dict(request_id="e", prompt_token_ids=[5], lora_request=LoRARequest("task0", 1, kit.paths["task1"])),
         AdapterExistsError, "is registered from"),
        (dict(request_id="e", prompt_token_ids=[5], lora_request=LoRARequest("new", 1, "/no/such/dir")),
         multilora_plugin.MultiLoRAError, "/no/such/dir"),
        (dict(request_id="e", prompt_token_ids=[5], priority="high"), InvalidRequestError, "`priority` should be"),
        (dict(request_id="", prompt_token_ids=[5]), InvalidRequestError, "`request_id` should be"),
    ]
    for kwargs, error, words in cases:
        with pytest.raises(error, match=words.replace("(", r"\(").replace(".", r"\.")):
            engine.add_request(**kwargs)
    assert "new" not in engine.cache
    done = [o for _ in range(6) for o in engine.step() if o.finished]
    assert [o.request_id for o in done] == ["ok"]
    ids = kit.tokenizer.encode("the man said good things")
    assert done[0].outputs[0].token_ids == kit.alone(ids, "task0", 5)


def test_engine_arguments_are_checked(kit):
    model = kit.wrapped()
    with pytest.raises(ConfigError, match="pass it to multilora_plugin.wrap"):
        Engine(model, max_loras=2)
    with pytest.raises(ConfigError, match=r"unknown engine arguments \['max_seqs'\]"):
        Engine(model, max_seqs=2)
    with pytest.raises(ConfigError, match="expected a model returned by multilora_plugin.wrap"):
        Engine(kit.base)
    with pytest.raises(InvalidRequestError, match="needs an engine with a tokenizer"):
        Engine(model).add_request("t", "some text")


def test_an_adapter_that_cannot_be_read_fails_only_its_requests(kit, tmp_path):
    model = kit.wrapped()
    broken = toy.make_adapters(kit.base, tmp_path, ["broken"], r=4, seed=9)["broken"]
    model.register_adapter("broken", broken)
    with open(os.path.join(broken, "adapter_model.safetensors"), "wb") as f:
        f.write(b"not a safetensors file")
    requests = [([5, 6, 7], "broken", 4, 0), ([8, 9], "task0", 5, 0), ([10, 11], "broken", 4, 1), ([12], None, 4, 1)]
    done = drive(Engine(model, kit.tokenizer), requests)
    for i in (0, 2):
        assert done[i].outputs[0].finish_reason == "error" and isinstance(done[i].error, AdapterLoadError)
        assert broken in str(done[i].error)
    for i in (1, 3):
        prompt, adapter, n, _ = requests[i]
        assert done[i].outputs[0].token_ids == kit.alone(prompt, adapter, n)


def test_requests_for_an_adapter_unloaded_while_queued_fail(kit):
    model = kit.wrapped(max_loras=1)
    engine = Engine(model, kit.tokenizer, policy="fcfs")
    long = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
    engine.add_request("first", prompt_token_ids=[5], sampling_params=long, lora_request="task0")
    engine.add_request("queued", prompt_token_ids=[5], sampling_params=long, lora_request="task1")
    engine.step()
    model.unload_adapter("task1")
    done = {o.request_id: o for _ in range(6) for o in engine.step() if o.finished}
    assert done["queued"].outputs[0].finish_reason == "error"
    assert isinstance(done["queued"].error, AdapterNotFoundError)
    assert done["first"].outputs[0].finish_reason == "length"


def test_pinned_slots_make_requests_wait_not_fail(kit):
    model = kit.wrapped(max_loras=2)
    model.pin_adapter("task7")  # the scheduler counts 2 slots; the cache can give only 1
    requests = [([5, 6], "task0", 5, 0), ([7, 8], "task1", 5, 0), ([9], "task7", 3, 0)]
    done = drive(Engine(model, kit.tokenizer), requests)
    for i, (prompt, adapter, n, _) in enumerate(requests):
        assert done[i].outputs[0].token_ids == kit.alone(prompt, adapter, n), i


def test_stops_and_incremental_text(kit):
    tok = kit.tokenizer
    prompt = tok.encode("the man said good things about the day")
    free = kit.alone(prompt, "task2", 24, eos=False)
    words = tok.decode(free, skip_special_tokens=True).split()
    engine = Engine(kit.wrapped(), tok)

    def run(rid, **params):
        engine.add_request(rid, prompt_token_ids=prompt, lora_request="task2",
                           sampling_params=SamplingParams(max_new_tokens=24, temperature=0, **params))
        pieces, texts, final = [], [], None
        while engine.has_unfinished_requests():
            for out in engine.step():
                pieces.append(out.outputs[0].delta_text)
                texts.append(out.outputs[0].text)
                final = out
        assert "".join(pieces) == final.outputs[0].text, "deltas add up to the text"
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:])), "the text only grows"
        return final.outputs[0]

    out = run("plain", ignore_eos=True)
    assert out.token_ids == free and out.finish_reason == "length"
    full = tok.decode(prompt + free, skip_special_tokens=True)
    assert out.text == full[len(tok.decode(prompt, skip_special_tokens=True)):]

    stop_word = words[len(words) // 2]
    out = run("stop", stop=[f" {stop_word}", "no such text"], ignore_eos=True)
    assert out.finish_reason == "stop" and out.stop_reason == f" {stop_word}"
    assert out.text == " " + " ".join(words[: words.index(stop_word)]) if words.index(stop_word) else out.text == ""

    token = free[5]
    out = run("stop_id", stop_token_ids=[token], ignore_eos=True)
    assert out.token_ids == free[: free.index(token) + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", token)

    model = kit.wrapped()
    model.generation_config.eos_token_id = [free[7]]  # the engine stops at the model's EOS ids and the tokenizer's
    engine = Engine(model, tok)
    assert engine.eos_token_ids == {free[7], EOS}
    out = run("eos")
    assert out.token_ids == free[: free.index(free[7]) + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", None)
    assert run("eos_ignored", ignore_eos=True).token_ids == free


def test_llm_generate_keeps_input_order_and_isolates_bad_prompts(kit, tmp_path):
    model = multilora_plugin.wrap(copy.deepcopy(kit.base), max_loras=2)  # nothing registered yet
    llm = LLM(model, kit.tokenizer, max_num_seqs=4)
    prompts = ["the man said", "good things about", "", "the day was long", [5, 6, 7], "what is it"]
    loras = [LoRARequest(n, i + 1, kit.paths[n]) for i, n in enumerate(NAMES[:3])]
    lora_request = [loras[0], loras[1], loras[2], None, loras[0], LoRARequest("gone", 9, str(tmp_path / "gone"))]
    outs = llm.generate(prompts, SamplingParams(max_new_tokens=6, temperature=0), lora_request, use_tqdm=True)
    assert [o.prompt for o in outs[:4]] == prompts[:4]
    assert [o.outputs[0].finish_reason == "error" for o in outs] == [False, False, True, False, False, True]
    assert isinstance(outs[2].error, InvalidRequestError) and isinstance(outs[5].error, multilora_plugin.MultiLoRAError)
    for i in (0, 1, 3, 4):
        ids = prompts[i] if isinstance(prompts[i], list) else kit.tokenizer.encode(prompts[i])
        adapter = lora_request[i].lora_name if lora_request[i] else None
        assert outs[i].prompt_token_ids == ids
        assert outs[i].outputs[0].token_ids == kit.alone(ids, adapter, 6), i
    assert set(model.adapters) == {"task0", "task1"}, "adapters register on first use; bad ones do not"

    one = llm.generate(["the man said", "the day"], SamplingParams(max_new_tokens=3, temperature=0),
                       loras[0], use_tqdm=False)
    assert one[0].outputs[0].token_ids == outs[0].outputs[0].token_ids[:3]
    assert one[1].lora_request == loras[0]
    with pytest.raises(InvalidRequestError, match="one entry per prompt"):
        llm.generate(["a", "b"], lora_request=[None], use_tqdm=False)


def test_stats_report_latency_and_cache_use(kit):
    engine = Engine(kit.wrapped(max_loras=2), kit.tokenizer, max_num_seqs=4)
    done = drive(engine, workload(n=9, seed=5))
    stats = engine.stats()
    assert stats.finished == 9 and stats.steps > 0
    assert stats.tokens_per_s > 0 and 0 < stats.mean_ttft_s <= stats.p99_ttft_s
    assert 0 < stats.mean_itl_s <= stats.p99_itl_s
    assert stats.gpu_hits > 0 and stats.cpu_misses >= 2
    for out in done.values():
        m = out.metrics
        assert m.arrival_time <= m.first_token_time <= m.last_token_time <= m.finished_time
    assert set(stats.as_dict()) >= {"running", "waiting", "active_adapters", "slot_swaps", "tokens_per_s"}


def test_incremental_text_waits_for_whole_characters():
    """A byte-level tokenizer splits multi-byte characters over several tokens: the text grows only
    by whole characters and adds up to the full decode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from multilora_plugin.detokenize import Detokenizer

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(["plain words only here"] * 4,
                                trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    prompt = tok.encode("plain words")
    output = tok.encode(" naïve café 😀 über ✓ done")
    assert len(output) > len(" naïve café 😀 über ✓ done".split()) + 6, "characters are split over tokens"
    detok = Detokenizer(tok, prompt)
    pieces = [detok.add(t) for t in output]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(prompt + output)[len(tok.decode(prompt)):] == " naïve café 😀 über ✓ done"


def test_a_forward_that_raises_fails_only_the_requests_it_ran(kit, monkeypatch):
    """A prefill that raises is retried request by request: only the request that fails alone
    fails. A decode that raises fails the rows it ran; the engine serves the next requests."""
    from multilora_plugin.batch import Batch

    real_prefill, real_decode = Batch.prefill, Batch.decode
    broken = {"decode": False}

    def prefill(cls, model, token_ids, mapping, **kwargs):
        if any(99 in t for t in token_ids):
            raise RuntimeError("a kernel failed on token 99")
        return real_prefill.__func__(cls, model, token_ids, mapping, **kwargs)

    def decode(self, model, tokens, mapping):
        if broken["decode"]:
            raise RuntimeError("the device went away")
        return real_decode(self, model, tokens, mapping)

    monkeypatch.setattr(Batch, "prefill", classmethod(prefill))
    monkeypatch.setattr(Batch, "decode", decode)
    engine = Engine(kit.wrapped(), kit.tokenizer)
    requests = [([5, 6, 7], "task0", 4, 0), ([8, 99, 9], "task1", 4, 0), ([10, 11], None, 4, 0)]
    done = drive(engine, requests)
    assert done[1].outputs[0].finish_reason == "error" and "token 99" in str(done[1].error)
    for i in (0, 2):
        prompt, adapter, n, _ = requests[i]
        assert done[i].outputs[0].token_ids == kit.alone(prompt, adapter, n), i
    engine.add_request("d", prompt_token_ids=[5, 6], lora_request="task2",
                       sampling_params=SamplingParams(max_new_tokens=5, temperature=0))
    engine.step()
    broken["decode"] = True
    failed = engine.step()
    assert [(o.request_id, o.outputs[0].finish_reason) for o in failed] == [("d", "error")]
    assert engine.cache.stats().in_use == 0 and engine._batch is None
    broken["decode"] = False
    done = drive(engine, [([12, 13], "task3", 3, 0)])
    assert done[0].outputs[0].token_ids == kit.alone([12, 13], "task3", 3)


def test_logprobs_equal_peft_log_softmax(kit):
    """`SamplingParams(logprobs=k)`: each token's log-probability under the model (PEFT's logits,
    log-softmaxed) and the k most likely tokens; the same in a mixed batch as alone."""
    from peft import PeftModel

    prompts = [([5, 6, 7, 8], "task1"), ([9, 10, 11], None), ([12, 13, 14, 15, 16], "task2")]
    llm = LLM(kit.wrapped(), kit.tokenizer, load_entrypoints=False)
    params = SamplingParams(max_new_tokens=5, temperature=0, logprobs=3, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in prompts], params, [a for _, a in prompts],
                        use_tqdm=False)
    for (prompt, adapter), out in zip(prompts, outs):
        reference = PeftModel.from_pretrained(copy.deepcopy(kit.base), kit.paths[adapter]).eval() if adapter \
            else kit.base
        ids = torch.tensor([prompt])
        with torch.no_grad():
            gen = reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=5, pad_token_id=0, eos_token_id=None, output_logits=True,
                                     return_dict_in_generate=True)
        completion = out.outputs[0]
        assert completion.token_ids == gen.sequences[0, len(prompt):].tolist()
        assert len(completion.logprobs) == 5
        total = 0.0
        for token, entry, logits in zip(completion.token_ids, completion.logprobs, gen.logits):
            want = torch.log_softmax(logits[0].float(), -1)
            assert next(iter(entry)) == token  # the chosen token first
            assert entry[token] == pytest.approx(want[token].item(), abs=1e-4)
            top = want.topk(3)
            for t, v in zip(top.indices.tolist(), top.values.tolist()):
                assert entry[t] == pytest.approx(v, abs=1e-4)
            assert len(entry) <= 4
            total += entry[token]
        assert completion.cumulative_logprob == pytest.approx(total)
    plain = llm.generate([{"prompt_token_ids": prompts[0][0]}], SamplingParams(max_new_tokens=2), use_tqdm=False)
    assert plain[0].outputs[0].logprobs is None
