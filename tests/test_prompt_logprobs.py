"""Prompt log-probabilities (`SamplingParams(prompt_logprobs=k)`, vLLM's field) and scoring a prompt
without generating (`max_new_tokens=0`), mixed across adapters in one engine, against PEFT alone:
the log-softmax of PEFT's logits for the same model, adapter and tokens."""

from __future__ import annotations

import pytest
import torch

from multilora_plugin import LLM, SamplingParams
from multilora_plugin.errors import InvalidRequestError

NAMES = ("all4", "attn8_rs", "mlp16_l1")


def prompts(lengths, seed=0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 120, (n,), generator=g).tolist() for n in lengths]


def peft_log_softmax(kit, adapter, prompt) -> torch.Tensor:
    model = kit.peft(adapter) if adapter else kit.fresh().eval()
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([prompt])).logits[0].float(), -1)


def check_scored(kit, adapter, prompt, scored, top: int, atol: float = 1e-4) -> None:
    """`scored` is vLLM's `prompt_logprobs`: None, then {prompt token: lp, top k...} per later token."""
    want = peft_log_softmax(kit, adapter, prompt)
    assert len(scored) == len(prompt) and scored[0] is None
    for i in range(1, len(prompt)):
        entry, expected = scored[i], want[i - 1]
        assert next(iter(entry)) == prompt[i]  # the prompt's own token first
        assert entry[prompt[i]] == pytest.approx(expected[prompt[i]].item(), abs=atol), (adapter, i)
        values, ids = expected.topk(top) if top else (torch.empty(0), torch.empty(0, dtype=torch.long))
        for t, v in zip(ids.tolist(), values.tolist()):
            assert entry[t] == pytest.approx(v, abs=atol)
        assert len(entry) in (top, top + 1)


def test_prompt_logprobs_of_mixed_adapters_equal_peft_alone(llama_kit):
    """Three adapters and the base model in one prefill, with fewer slots than adapters; each row
    scores its own prompt and some go on generating."""
    kit = llama_kit
    rows = list(zip(prompts([6, 11, 3, 9, 7]), [NAMES[0], None, NAMES[1], NAMES[2], NAMES[0]], [2, 0, 5, 1, 3]))
    llm = LLM(kit.wrapped(max_loras=2), load_entrypoints=False)
    params = [SamplingParams(max_new_tokens=0 if i % 2 else 4, temperature=0, prompt_logprobs=k, ignore_eos=True)
              for i, (_, _, k) in enumerate(rows)]
    outs = llm.generate([{"prompt_token_ids": p} for p, _, _ in rows], params, [a for _, a, _ in rows],
                        use_tqdm=False)
    for i, ((prompt, adapter, k), out) in enumerate(zip(rows, outs)):
        assert out.error is None and out.finished
        check_scored(kit, adapter, prompt, out.prompt_logprobs, k)
        completion = out.outputs[0]
        if i % 2:  # scored only: nothing generated
            assert completion.token_ids == [] and completion.text == "" and completion.finish_reason == "length"
        else:
            assert completion.token_ids == kit.greedy(adapter, prompt, 4)


def test_long_prompts_are_prefilled_in_chunks_within_the_budget(llama_kit, monkeypatch):
    """A prompt longer than `max_num_batched_tokens` runs alone, in forwards of at most that many
    tokens, and scores and generates as PEFT does on the whole prompt."""
    kit = llama_kit
    sizes = []
    model = kit.wrapped(max_loras=2)
    real = type(model.hf_model).forward

    def counting(self, input_ids=None, **kwargs):
        sizes.append(input_ids.numel())
        return real(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(type(model.hf_model), "forward", counting)
    rows = list(zip(prompts([70, 5, 33], seed=1), [NAMES[1], None, NAMES[2]]))
    llm = LLM(model, max_num_batched_tokens=16, load_entrypoints=False)
    params = SamplingParams(max_new_tokens=3, temperature=0, prompt_logprobs=1, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in rows], params, [a for _, a in rows], use_tqdm=False)
    assert max(sizes) <= 16 and len(sizes) > 70 // 16
    for (prompt, adapter), out in zip(rows, outs):
        check_scored(kit, adapter, prompt, out.prompt_logprobs, 1, atol=2e-4)
        assert out.outputs[0].token_ids == kit.greedy(adapter, prompt, 3)


def test_a_scored_prompt_may_be_one_longer_than_the_model(llama_kit):
    """With max_new_tokens=0 the last prompt token is only a target, so a prompt of max_model_len + 1
    tokens fits (as lm-eval's windows of max_length + 1 do); one more does not."""
    kit = llama_kit
    llm = LLM(kit.wrapped(), load_entrypoints=False, max_model_len=12)
    prompt = prompts([13], seed=2)[0]
    out, = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_new_tokens=0, prompt_logprobs=0),
                        NAMES[0], use_tqdm=False)
    check_scored(kit, NAMES[0], prompt, out.prompt_logprobs, 0)
    with pytest.raises(InvalidRequestError, match="should fit the model's 12 positions"):
        llm.engine.add_request("x", prompt_token_ids=prompt + [5],
                               sampling_params=SamplingParams(max_new_tokens=0, prompt_logprobs=0))
    with pytest.raises(InvalidRequestError, match="should fit the model's 12 positions"):
        llm.engine.add_request("y", prompt_token_ids=prompt, sampling_params=SamplingParams(max_new_tokens=1))


def test_without_prompt_logprobs_nothing_is_reported(llama_kit):
    kit = llama_kit
    llm = LLM(kit.wrapped(), load_entrypoints=False)
    out, = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_new_tokens=2, temperature=0), NAMES[0],
                        use_tqdm=False)
    assert out.prompt_logprobs is None and out.outputs[0].token_ids == kit.greedy(NAMES[0], [5, 6, 7], 2)
