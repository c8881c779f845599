"""`multilora demo`: a tiny Llama, a tokenizer and four PEFT adapters built locally, served three
ways (one mixed batch through `generate`, a stream of requests through the engine with two slots,
concurrent HTTP clients through the server), every output checked against PEFT on that request alone."""

from __future__ import annotations

import copy
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import torch
from huggingface_hub import InferenceClient
from peft import PeftModel
from tqdm.auto import tqdm

from . import toy
from .engine import Engine
from .integrations.local import running_server
from .integrations.server import create_app
from .llm import LLM
from .wrapping import wrap
from .outputs import LoRARequest
from .sampling import SamplingParams
from .toy import DEMO_ADAPTERS

DEMO_ROWS = [
    ("sql", "show me the number of students in each school"),
    (None, "tell me a story about a little house"),
    ("chat", "how are you this morning"),
    ("poem", "the water at night"),
]


def run_demo(new_tokens: int = 12, seed: int = 0) -> int:
    """Build everything, serve one mixed batch and a stream of requests through the engine, compare
    every output with PEFT. Returns an exit code."""
    started = time.perf_counter()
    base = toy.demo_model(seed=seed)
    tokenizer = toy.demo_tokenizer()
    with tempfile.TemporaryDirectory(prefix="multilora-demo-") as root:
        paths = toy.demo_adapters(base, root)
        model = wrap(copy.deepcopy(base), max_loras=4)
        for name, path in paths.items():
            info = model.load_adapter(name, path)
            print(f"loaded adapter {name!r:7} rank {info.rank:2}  {info.num_bytes / 1024:6.1f} KiB  "
                  f"({info.state.value})")
        names = [name for name, _ in DEMO_ROWS]
        batch = tokenizer([prompt for _, prompt in DEMO_ROWS], return_tensors="pt", padding=True)
        kwargs = dict(**batch, max_new_tokens=new_tokens, do_sample=False)
        peft = {None: base}
        with warnings.catch_warnings():  # peft calls a transformers method that transformers deprecates
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            for name in DEMO_ADAPTERS:
                peft[name] = PeftModel.from_pretrained(copy.deepcopy(base), paths[name]).eval()
        with torch.no_grad():
            out = model.generate(adapter_names=names, **kwargs)
            oracle = {name: peft[name].generate(**kwargs) for name in set(names)}
        width = batch["input_ids"].shape[1]
        print(f"\none batch of {len(names)} rows, {len(set(names) - {None})} adapters + base, "
              f"{new_tokens} new tokens (greedy):\n")
        failures = 0
        for row, (name, prompt) in enumerate(DEMO_ROWS):
            same = out[row].tolist() == oracle[name][row].tolist()
            failures += not same
            text = tokenizer.decode(out[row, width:], skip_special_tokens=True)
            print(f"  row {row}  adapter={str(name):5}  {'matches PEFT' if same else 'DIFFERS FROM PEFT'}")
            print(f"         prompt: {prompt}\n         output: {text}")
        stats = model.memory_stats()
        print(f"\nadapter cache: slots {model.slot_contents()}; {stats.cpu_entries} adapters "
              f"({stats.cpu_bytes / 1024:.0f} KiB) in CPU memory, {stats.gpu_bytes / 1024:.0f} KiB in slots; "
              f"{stats.slot_swaps} slot swaps")
        failures += _demo_engine(base, tokenizer, paths, peft, new_tokens)
        failures += _demo_server(base, tokenizer, paths, peft, new_tokens)
    verdict = "every output matches PEFT" if not failures else f"{failures} output(s) differ from PEFT"
    print(f"\n{verdict} ({time.perf_counter() - started:.1f} s)")
    return 1 if failures else 0


def _demo_engine(base, tokenizer, paths, peft, new_tokens: int) -> int:
    """Requests over every demo adapter and the base model through `LLM` with only two slots, so
    adapters take turns; each output is checked against PEFT on that request alone."""
    model = wrap(copy.deepcopy(base), max_loras=2)
    llm = LLM(model, tokenizer, max_num_seqs=4)
    adapters = [None] + list(DEMO_ADAPTERS)
    lora = {name: LoRARequest(name, i + 1, paths[name]) for i, name in enumerate(DEMO_ADAPTERS)}
    jobs = [(adapters[i % len(adapters)], DEMO_ROWS[i % len(DEMO_ROWS)][1]) for i in range(10)]
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    outputs = llm.generate([p for _, p in jobs], params, [lora.get(a) for a, _ in jobs], use_tqdm=False)
    print(f"\ncontinuous batching: {len(jobs)} requests over {len(DEMO_ADAPTERS)} adapters + base, "
          f"max_loras=2, at most 4 running:\n")
    failures = 0
    for (name, _), output in zip(jobs, outputs):
        ids = torch.tensor([output.prompt_token_ids])
        with torch.no_grad():
            want = peft[name].generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                       max_new_tokens=new_tokens, eos_token_id=None)[0, ids.shape[1]:].tolist()
        same = output.outputs[0].token_ids == want
        failures += not same
        print(f"  {output.request_id:7} adapter={str(name):5} {'matches PEFT' if same else 'DIFFERS FROM PEFT'}"
              f"  {output.outputs[0].text.strip()}")
    stats = llm.engine.stats()
    print(f"\nengine: {stats.steps} steps, {stats.generated_tokens} tokens, {stats.adapter_swaps} adapter swaps, "
          f"mean time to first token {stats.mean_ttft_s * 1000:.1f} ms, "
          f"mean inter-token latency {stats.mean_itl_s * 1000:.1f} ms")
    return failures


def _peft_tokens(peft, name, ids: Sequence[int], new_tokens: int) -> list:
    ids = torch.tensor([list(ids)])
    with torch.no_grad():
        out = peft[name].generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=new_tokens, eos_token_id=None)
    return out[0, ids.shape[1]:].tolist()


def _demo_server(base, tokenizer, paths, peft, new_tokens: int) -> int:
    """The HTTP server on a free local port, two slots; 12 concurrent clients over the TGI route
    (`adapter_id`) and the OpenAI chat route (`model`), every answer checked against PEFT."""
    model = wrap(copy.deepcopy(base), max_loras=2)
    for name, path in paths.items():
        model.register_adapter(name, path)
    engine = Engine(model, tokenizer, max_num_seqs=8)

    with running_server(create_app(engine, served_model_name="tiny-llama")) as url:
        client = InferenceClient(base_url=url)
        print(f"\nHTTP server at {url} (TGI: POST /generate, OpenAI: POST /v1/chat/completions, GET /metrics)")
        adapters = [None] + list(DEMO_ADAPTERS)

        def tgi(i: int):
            name, prompt = adapters[i % len(adapters)], DEMO_ROWS[i % len(DEMO_ROWS)][1]
            out = client.text_generation(prompt, adapter_id=name, max_new_tokens=new_tokens, details=True)
            ids = tokenizer.encode(prompt)
            return "TGI   ", name, [t.id for t in out.details.tokens] == _peft_tokens(peft, name, ids, new_tokens), \
                out.generated_text

        def chat(i: int):
            name, prompt = adapters[i % len(adapters)], DEMO_ROWS[i % len(DEMO_ROWS)][1]
            messages = [{"role": "user", "content": prompt}]
            out = client.chat_completion(messages, model=name or "tiny-llama", max_tokens=new_tokens, temperature=0)
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = tokenizer.encode(text, add_special_tokens=False)
            want = tokenizer.decode(ids + _peft_tokens(peft, name, ids, new_tokens), skip_special_tokens=True)
            want = want[len(tokenizer.decode(ids, skip_special_tokens=True)):]
            return "OpenAI", name, out.choices[0].message.content == want, out.choices[0].message.content

        calls = [(tgi if i % 2 == 0 else chat, i) for i in range(12)]
        with ThreadPoolExecutor(12) as pool, tqdm(total=len(calls), desc="HTTP requests", unit="req") as progress:
            futures = [pool.submit(f, i) for f, i in calls]
            results = []
            for future in futures:
                results.append(future.result())
                progress.update(1)
        failures = 0
        for api, name, same, text in results:
            failures += not same
            print(f"  {api} adapter={str(name):5} {'matches PEFT' if same else 'DIFFERS FROM PEFT'}  {text.strip()}")
        stats = engine.stats()
        print(f"\nserver: {stats.finished} requests, {stats.generated_tokens} tokens in {stats.steps} steps, "
              f"{stats.slot_swaps} slot swaps")
    return failures
