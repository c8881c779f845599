"""The HTTP server through the real clients: `huggingface_hub.InferenceClient` (TGI routes) and
`openai.OpenAI` (OpenAI routes) against a live uvicorn server on 127.0.0.1.

The oracle is the offline `LLM.generate` of a second wrapped copy of the same model (greedy), so
every answer must equal, token for token, what the engine gives without HTTP.
"""

from __future__ import annotations

import copy
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from huggingface_hub import InferenceClient
from openai import NotFoundError, OpenAI
from prometheus_client.parser import text_string_to_metric_families

import multilora_plugin
from multilora_plugin import LLM, LoRARequest, SamplingParams, toy
from multilora_plugin.integrations.local import running_server
from multilora_plugin.integrations.access import AccessPolicy
from multilora_plugin.integrations.server import create_app

VOCAB = 128
PROMPTS = ["show me the number of students", "tell me a story about a little house", "how are you this morning",
           "the water at night"]
ADAPTERS = [None, "sql", "chat", "poem"]
SPECS = {
    "sql": dict(r=8, lora_alpha=16, target_modules="all-linear", seed=1),
    "chat": dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], seed=2),
    "poem": dict(r=16, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"], use_rslora=True, seed=3),
    "late": dict(r=2, lora_alpha=4, target_modules=["o_proj", "down_proj"], seed=4),
}


class Served:
    """A live server with three adapters (and two slots), and the offline oracle."""

    def __init__(self, root):
        self.base = toy.tiny_model("llama", vocab_size=VOCAB)
        self.tokenizer = toy.tiny_tokenizer(VOCAB)
        self.paths = {name: toy.make_adapter(self.base, root / name, **spec) for name, spec in SPECS.items()}
        offline = multilora_plugin.wrap(copy.deepcopy(self.base), max_loras=4)
        self.llm = LLM(offline, self.tokenizer, load_entrypoints=False)
        self._lora = {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(self.paths.items())}
        self._cache = {}
        model = multilora_plugin.wrap(copy.deepcopy(self.base), max_loras=2)
        for name in ("sql", "chat", "poem"):
            model.register_adapter(name, self.paths[name])
        self.engine = multilora_plugin.Engine(model, self.tokenizer, load_entrypoints=False, max_num_seqs=16)

    def offline(self, adapter, prompt, n: int = 10):
        """(token ids, text, logprobs) of greedy generation offline; `prompt` is text or ids."""
        key = (adapter, prompt if isinstance(prompt, str) else tuple(prompt), n)
        if key not in self._cache:
            params = SamplingParams(max_new_tokens=n, temperature=0, logprobs=0)
            prompt_arg = prompt if isinstance(prompt, str) else {"prompt_token_ids": list(prompt)}
            (out,) = self.llm.generate([prompt_arg], params, self._lora.get(adapter), use_tqdm=False)
            completion = out.outputs[0]
            self._cache[key] = (completion.token_ids, completion.text,
                                [entry[t] for entry, t in zip(completion.logprobs, completion.token_ids)])
        return self._cache[key]

    def chat_ids(self, prompt: str):
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def metrics(self) -> dict:
        """{(sample name, labels as a sorted tuple): value} from GET /metrics."""
        text = httpx.get(self.url + "/metrics").text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def idle(self, timeout: float = 10.0) -> bool:
        """Wait until nothing is queued, running or held."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            server = self.app_server
            if (self.engine.get_num_unfinished_requests() == 0 and server.backend.async_engine.num_requests == 0
                    and self.engine.cache.stats().in_use == 0):
                return True
            time.sleep(0.05)
        return False


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    served = Served(tmp_path_factory.mktemp("server-adapters"))
    app = create_app(served.engine, served_model_name="tiny", access=AccessPolicy(allow_runtime_lora_updates=True))
    served.app_server = app.state.server
    with running_server(app) as url:
        served.url = url
        yield served
    served.engine.close()


def _tgi_reason(ids, n: int) -> str:
    """TGI's finish reason of greedy ids (cut at n): EOS (id 3 in the tiny tokenizer) or length."""
    return "eos_token" if ids[:n] and ids[:n][-1] == 3 else "length"


def _openai(served) -> OpenAI:
    return OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)


# TGI ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("adapter, prompt", list(zip(ADAPTERS, PROMPTS)))
def test_tgi_client_matches_offline(served, adapter, prompt):
    client = InferenceClient(base_url=served.url)
    ids, text, logprobs = served.offline(adapter, prompt, 8)
    assert client.text_generation(prompt, adapter_id=adapter, max_new_tokens=8) == text
    out = client.text_generation(prompt, adapter_id=adapter, max_new_tokens=8, details=True)
    assert out.generated_text == text
    assert [t.id for t in out.details.tokens] == ids
    assert "".join(t.text for t in out.details.tokens) == text
    assert [t.logprob for t in out.details.tokens] == pytest.approx(logprobs, abs=1e-5)
    assert (out.details.finish_reason, out.details.generated_tokens, out.details.seed) == \
        (_tgi_reason(ids, 8), len(ids), None)
    events = list(client.text_generation(prompt, adapter_id=adapter, max_new_tokens=8, stream=True, details=True))
    assert [e.token.id for e in events] == ids
    assert [e.index for e in events] == list(range(1, len(ids) + 1))
    assert "".join(e.token.text for e in events) == text == events[-1].generated_text
    assert all(e.details is None for e in events[:-1]) and events[-1].details.input_length == len(
        served.tokenizer.encode(prompt))
    assert "".join(client.text_generation(prompt, adapter_id=adapter, max_new_tokens=8, stream=True)) == text


def test_tgi_parameters(served):
    client = InferenceClient(base_url=served.url)
    prompt = PROMPTS[0]
    ids, text, _ = served.offline("sql", prompt, 8)
    assert client.text_generation(prompt, adapter_id="sql", max_new_tokens=8, return_full_text=True) == prompt + text
    # a stop string cuts the text before it
    words = text.split()
    stop = " " + words[3]
    out = client.text_generation(prompt, adapter_id="sql", max_new_tokens=8, stop=[stop], details=True)
    assert out.generated_text == text[:text.index(stop)]
    assert out.details.finish_reason == "stop_sequence"
    # sampling: the seed makes it repeatable and is reported; without one, a seed is drawn and reported
    a = client.text_generation(prompt, adapter_id="chat", max_new_tokens=8, do_sample=True, seed=7, details=True)
    b = client.text_generation(prompt, adapter_id="chat", max_new_tokens=8, temperature=0.8, top_k=20, seed=7,
                               details=True)
    again = client.text_generation(prompt, adapter_id="chat", max_new_tokens=8, do_sample=True, seed=7, details=True)
    assert a.details.seed == 7 and a.generated_text == again.generated_text
    assert b.details.seed == 7
    drawn = client.text_generation(prompt, adapter_id="chat", max_new_tokens=4, do_sample=True, details=True)
    assert isinstance(drawn.details.seed, int)
    # top_n_tokens: the most likely tokens of each position, best first
    out = client.text_generation(prompt, adapter_id="sql", max_new_tokens=3, details=True, top_n_tokens=3)
    assert len(out.details.top_tokens) == 3
    for chosen, top in zip(out.details.tokens, out.details.top_tokens):
        assert len(top) == 3 and top[0]["id"] == chosen.id  # greedy: the chosen token is the most likely
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
    # truncate keeps the last tokens of the prompt
    tail = served.tokenizer.encode(prompt)[-3:]
    assert client.text_generation(prompt, adapter_id="sql", max_new_tokens=5, truncate=3) == \
        served.offline("sql", tail, 5)[1]


def test_generate_routes_and_info(served):
    body = {"inputs": PROMPTS[1], "parameters": {"adapter_id": "poem", "max_new_tokens": 5, "details": True}}
    answer = httpx.post(served.url + "/generate", json=body).json()
    assert answer["generated_text"] == served.offline("poem", PROMPTS[1], 5)[1]
    lines = [line for line in httpx.post(served.url + "/generate_stream", json=body).text.splitlines() if line]
    assert len(lines) == 5 and all(line.startswith("data: ") for line in lines)
    info = httpx.get(served.url + "/info").json()
    assert info["model_id"] == "tiny" and info["max_total_tokens"] == 512 and info["max_loras"] == 2
    assert httpx.get(served.url + "/health").status_code == 200


# OpenAI -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("adapter, prompt", list(zip(ADAPTERS, PROMPTS)))
def test_openai_client_matches_offline(served, adapter, prompt):
    client = _openai(served)
    model = adapter or "tiny"
    ids, text, _ = served.offline(adapter, prompt, 8)
    out = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
    reason = "length" if _tgi_reason(ids, 8) == "length" else "stop"
    assert out.choices[0].text == text and out.choices[0].finish_reason == reason
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(served.tokenizer.encode(prompt)), len(ids))
    chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text
    assert [c.choices[0].finish_reason for c in chunks][-1] == reason

    chat_ids = served.chat_ids(prompt)
    chat_out, chat_text, _ = served.offline(adapter, chat_ids, 8)
    messages = [{"role": "user", "content": prompt}]
    out = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
    assert out.choices[0].message.content == chat_text and out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens == len(chat_ids)
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat_text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(chat_out)


def test_openai_several_prompts_n_and_logprobs(served):
    client = _openai(served)
    out = client.completions.create(model="poem", prompt=PROMPTS[:3], max_tokens=6, temperature=0, logprobs=2)
    assert [c.index for c in out.choices] == [0, 1, 2]
    for choice, prompt in zip(out.choices, PROMPTS):
        ids, text, logprobs = served.offline("poem", prompt, 6)
        assert choice.text == text
        assert choice.logprobs.token_logprobs == pytest.approx(logprobs, abs=1e-5)
        assert "".join(choice.logprobs.tokens) == text
        assert all(len(top) == 2 for top in choice.logprobs.top_logprobs)
    ids = served.tokenizer.encode(PROMPTS[3])
    out = client.completions.create(model="sql", prompt=[ids], max_tokens=5, temperature=0, echo=True)
    assert out.choices[0].text == served.tokenizer.decode(ids) + served.offline("sql", ids, 5)[1]
    chunks = list(client.completions.create(model="sql", prompt=[ids], max_tokens=5, temperature=0, echo=True,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == out.choices[0].text  # a stream echoes the same
    out = client.completions.create(model="sql", prompt=PROMPTS[0], max_tokens=5, n=3, temperature=1.0, seed=3)
    assert len(out.choices) == 3 and 3 <= out.usage.completion_tokens <= 15
    assert len({c.text for c in out.choices}) > 1  # each choice has its own seed
    chunks = list(client.completions.create(model="sql", prompt=PROMPTS[:2], max_tokens=4, temperature=0, stream=True))
    for index, prompt in enumerate(PROMPTS[:2]):
        assert "".join(c.choices[0].text for c in chunks if c.choices[0].index == index) == \
            served.offline("sql", prompt, 4)[1]
    out = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": PROMPTS[2]}],
                                         max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx(served.offline("chat", served.chat_ids(PROMPTS[2]), 4)[2],
                                                         abs=1e-5)
    assert all(len(c.top_logprobs) == 2 for c in content)


def test_openai_echo_with_logprobs_scores_the_prompt(served):
    """`echo` with `logprobs` (how lm-eval's local-completions scores a log-likelihood): OpenAI's legacy
    format for prompt + completion, the prompt's entries None first, then PEFT's log-softmax of the prompt
    tokens; `max_tokens: 0` scores only; a stream carries the prompt's entries in its first chunk."""
    import torch
    from peft import PeftModel

    client = _openai(served)
    ids = served.tokenizer.encode(PROMPTS[1])
    peft = PeftModel.from_pretrained(copy.deepcopy(served.base), served.paths["chat"]).eval()
    with torch.no_grad():
        want = torch.log_softmax(peft(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    expected = [None] + [want[i - 1, ids[i]].item() for i in range(1, len(ids))]
    out = client.completions.create(model="chat", prompt=[ids], max_tokens=3, temperature=0, echo=True, logprobs=2)
    lp = out.choices[0].logprobs
    gen_ids, gen_text, gen_logprobs = served.offline("chat", ids, 3)
    assert out.choices[0].text == served.tokenizer.decode(ids) + gen_text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:len(ids)] == pytest.approx(expected[1:], abs=1e-4)
    assert lp.token_logprobs[len(ids):] == pytest.approx(gen_logprobs, abs=1e-5)
    assert len(lp.tokens) == len(lp.text_offset) == len(ids) + 3
    assert "".join(lp.tokens) == out.choices[0].text
    for i in range(1, len(ids)):
        top = want[i - 1].topk(2)
        assert sorted(lp.top_logprobs[i].values(), reverse=True) == pytest.approx(top.values.tolist(), abs=1e-4)
    only = client.completions.create(model="chat", prompt=[ids], max_tokens=0, echo=True, logprobs=0)
    assert only.choices[0].text == served.tokenizer.decode(ids) and only.usage.completion_tokens == 0
    assert only.choices[0].logprobs.token_logprobs[1:] == pytest.approx(expected[1:], abs=1e-4)
    chunks = list(client.completions.create(model="chat", prompt=[ids], max_tokens=3, temperature=0, echo=True,
                                            logprobs=2, stream=True))
    assert chunks[0].choices[0].logprobs.token_logprobs[1:len(ids)] == pytest.approx(expected[1:], abs=1e-4)
    assert sum((c.choices[0].logprobs.token_logprobs for c in chunks), [])[len(ids):] == pytest.approx(
        gen_logprobs, abs=1e-5)


def test_models_lists_base_and_adapters(served):
    models = {m.id: m for m in _openai(served).models.list()}
    assert {"tiny", "sql", "chat", "poem"} <= set(models)
    assert models["sql"].parent == "tiny" and models["sql"].root == served.paths["sql"]


# many clients -------------------------------------------------------------------------------------------
def test_32_concurrent_streaming_clients(served):
    """32 clients × 5 streamed requests over three adapters and the base model (two slots): every
    stream is complete, in order, equal to offline; /metrics counts every request and token."""
    before = served.metrics()
    jobs = {(c, j): (ADAPTERS[(c + j) % 4], PROMPTS[(c * 5 + j) % 4], 4 + (c + 2 * j) % 7)
            for c in range(32) for j in range(5)}
    for adapter, prompt, _ in set(jobs.values()):
        served.offline(adapter, prompt, 10)

    def client_run(c: int) -> list:
        client = InferenceClient(base_url=served.url)
        got = []
        for j in range(5):
            adapter, prompt, n = jobs[c, j]
            got.append(list(client.text_generation(prompt, adapter_id=adapter, max_new_tokens=n, stream=True,
                                                   details=True)))
        return got

    with ThreadPoolExecutor(32) as pool:
        results = dict(zip(range(32), pool.map(client_run, range(32))))
    for c, streams in results.items():
        for j, events in enumerate(streams):
            adapter, prompt, n = jobs[c, j]
            ids, text, _ = served.offline(adapter, prompt, 10)
            assert [e.index for e in events] == list(range(1, len(ids[:n]) + 1)), (c, j)
            assert [e.token.id for e in events] == ids[:n], (c, j)
            assert events[-1].generated_text == "".join(e.token.text for e in events)
            assert events[-1].details.finish_reason == _tgi_reason(ids, n)
    assert served.idle()
    after = served.metrics()
    for adapter in ADAPTERS:
        label = adapter or "__base__"
        mine = [len(served.offline(a, p, 10)[0][:n]) for (a, p, n) in jobs.values() if a == adapter]
        ended = [("multilora_requests_total", (("adapter", label), ("finish_reason", reason)))
                 for reason in ("length", "stop")]
        assert sum(after.get(key, 0) - before.get(key, 0) for key in ended) == len(mine)
        key = ("multilora_generation_tokens_total", (("adapter", label),))
        assert after[key] - before.get(key, 0) == sum(mine)
        key = ("multilora_time_to_first_token_seconds_count", (("adapter", label),))
        assert after[key] - before.get(key, 0) == len(mine)
        key = ("multilora_inter_token_latency_seconds_count", (("adapter", label),))
        assert after[key] - before.get(key, 0) == sum(n - 1 for n in mine)
    assert after[("multilora_requests_in_flight", ())] == 0
    assert after[("multilora_slots", ())] == 2 and after[("multilora_slots_in_use", ())] <= 2
    assert after[("multilora_slot_swaps_total", ())] > before.get(("multilora_slot_swaps_total", ()), 0)
    for tier in ("gpu", "cpu"):
        assert ("multilora_adapter_cache_hits_total", (("tier", tier),)) in after
        assert ("multilora_adapter_cache_misses_total", (("tier", tier),)) in after


# adapters come and go -----------------------------------------------------------------------------------
def test_load_and_unload_while_serving(served):
    client = _openai(served)
    prompt = PROMPTS[2]
    with pytest.raises(NotFoundError):
        client.completions.create(model="late", prompt=prompt, max_tokens=4, temperature=0)
    r = httpx.post(served.url + "/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": served.paths["late"]})
    assert r.status_code == 200, r.text
    try:
        out = client.completions.create(model="late", prompt=prompt, max_tokens=6, temperature=0)
        assert out.choices[0].text == served.offline("late", prompt, 6)[1]
        # unloading an adapter lets its running request finish, then it is gone
        ids, text, _ = served.offline("late", prompt, 60)
        stream = iter(client.completions.create(model="late", prompt=prompt, max_tokens=60, temperature=0,
                                                stream=True))
        pieces = [next(stream).choices[0].text]
        r = httpx.post(served.url + "/v1/unload_lora_adapter", json={"lora_name": "late"})
        assert r.status_code == 200, r.text
        pieces += [c.choices[0].text for c in stream]
        assert "".join(pieces) == text
        assert "late" not in {m.id for m in client.models.list()}
        with pytest.raises(NotFoundError) as caught:
            client.completions.create(model="late", prompt=prompt, max_tokens=4)
        assert "not registered" in caught.value.body["message"]
        # errors of the adapter routes
        r = httpx.post(served.url + "/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": served.paths["late"]})
        assert r.status_code == 400 and "sql" in r.json()["error"]["message"]
        r = httpx.post(served.url + "/v1/unload_lora_adapter", json={"lora_name": "late"})
        assert r.status_code == 404
        r = httpx.post(served.url + "/v1/unload_lora_adapter", json={"lora_name": "chat"})  # the operator's
        assert r.status_code == 403
    finally:
        httpx.post(served.url + "/v1/unload_lora_adapter", json={"lora_name": "late"})
    assert client.completions.create(model="chat", prompt=prompt, max_tokens=5, temperature=0).choices[0].text == \
        served.offline("chat", prompt, 5)[1]


# bad requests -------------------------------------------------------------------------------------------
BAD = [
    ("/generate", "not json", 422),
    ("/generate", {}, 422),
    ("/generate", {"inputs": 5}, 422),
    ("/generate", {"inputs": "hi", "parameters": {"max_new_tokens": "many"}}, 422),
    ("/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 0}}, 422),
    ("/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 10**6}}, 400),
    ("/generate", {"inputs": "hi", "parameters": {"temperature": 0}}, 422),
    ("/generate", {"inputs": "hi", "parameters": {"top_p": 1.5}}, 422),
    ("/generate", {"inputs": "hi", "parameters": {"seed": 2**70, "do_sample": True}}, 422),
    ("/generate", {"inputs": "hi", "parameters": {"grammar": {"type": "json", "value": {}}}}, 422),
    ("/generate", {"inputs": "hi", "parameters": {"truncate": 0}}, 422),
    ("/generate", {"inputs": "", "parameters": {}}, 400),
    ("/generate", {"inputs": "hi", "parameters": {"repetition_penalty": 1e-300, "do_sample": True,
                                                 "max_new_tokens": 10**4}}, 400),
    ("/generate", {"inputs": "hi", "parameters": {"adapter_id": "nope"}}, 404),
    ("/generate_stream", {"inputs": "hi", "parameters": {"adapter_id": "nope"}}, 404),
    ("/", {"inputs": "hi", "parameters": {"adapter_id": "nope"}, "stream": True}, 404),
    ("/v1/completions", {"model": "tiny"}, 422),
    ("/v1/completions", {"model": "nope", "prompt": "hi"}, 404),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "n": 0}, 400),
    ("/v1/completions", {"model": "tiny", "prompt": []}, 400),
    ("/v1/completions", {"model": "tiny", "prompt": [[1, 10**6]]}, 400),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "logprobs": 50}, 400),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": -1}, 400),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "temperature": -1}, 400),
    ("/v1/completions", {"model": "tiny", "prompt": ["hi"] * 65}, 400),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "frequency_penalty": 0.5}, 422),  # unsupported: 422
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "top_k": -2}, 400),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "repetition_penalty": 0}, 400),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "n": True}, 422),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": False}, 422),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "temperature": True}, 422),
    ("/generate", {"inputs": "hi", "parameters": {"max_new_tokens": True}}, 422),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"content": "hi"}]}, 422),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                              "tools": [{"type": "function"}]}, 422),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     422),
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/nonexistent"}, 400),
    ("/v1/load_lora_adapter", {"lora_name": "x"}, 422),
    ("/v1/unload_lora_adapter", {"lora_name": "nope"}, 404),
]


@pytest.mark.parametrize("path, body, status", BAD, ids=[f"{p}-{s}-{i}" for i, (p, _, s) in enumerate(BAD)])
def test_bad_requests_get_their_status_in_their_format(served, path, body, status):
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, str) \
        else {"json": body}
    r = httpx.post(served.url + path, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    if path.startswith("/v1/"):
        assert isinstance(error["message"], str) and error["message"] and error["type"]
    else:
        assert isinstance(error, str) and error and r.json()["error_type"]


def test_tgi_client_raises_its_validation_error(served):
    from huggingface_hub.errors import ValidationError

    with pytest.raises(ValidationError, match="temperature"):
        InferenceClient(base_url=served.url).text_generation("hi", temperature=-1.0)


def test_queue_full_is_503(served):
    model = multilora_plugin.wrap(copy.deepcopy(served.base), max_loras=1)
    engine = multilora_plugin.Engine(model, served.tokenizer, load_entrypoints=False)
    long = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 400, "ignore_eos": True, "stream": True}
    app = create_app(engine, served_model_name="tiny", max_concurrent_requests=2)
    with running_server(app) as url, httpx.Client(timeout=30) as http:
        with http.stream("POST", url + "/v1/completions", json=long) as one, \
                http.stream("POST", url + "/v1/completions", json=long) as two:
            lines = [one.iter_lines(), two.iter_lines()]  # (a dropped line iterator closes its response)
            assert all(next(it).startswith("data:") for it in lines)
            assert app.state.server.backend.async_engine.num_requests == 2
            r = http.post(url + "/generate", json={"inputs": "hi"})
            assert r.status_code == 503 and r.json()["error_type"] == "overloaded"
            r = http.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hi"})
            assert r.status_code == 503 and r.json()["error"]["type"] == "server_overloaded"
        assert app.state.server.backend.async_engine.running
    # stopping the server stops its step loop and ends what was left
    assert not app.state.server.backend.async_engine.running
    assert engine.get_num_unfinished_requests() == 0
    engine.close()


# disconnects --------------------------------------------------------------------------------------------
def test_client_disconnect_frees_the_request(served):
    def aborted() -> float:
        m = served.metrics()
        return m.get(("multilora_requests_total", (("adapter", "sql"), ("finish_reason", "abort"))), 0)

    assert served.idle()
    start = aborted()
    body = {"model": "sql", "prompt": PROMPTS[0], "max_tokens": 480, "ignore_eos": True}
    with httpx.stream("POST", served.url + "/v1/completions", json={**body, "stream": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data:")
        assert served.engine.get_num_unfinished_requests() == 1
        assert served.engine.cache.stats().in_use == 1
    assert served.idle(), "the request was not freed after its client left"
    assert aborted() == start + 1
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
        httpx.post(served.url + "/v1/completions", json=body, timeout=0.3)
    assert served.idle(), "the request was not freed after its client left"
    assert aborted() == start + 2
