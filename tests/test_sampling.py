"""Sampling: parameter validation, agreement with transformers' own processors, and seeded draws
that do not depend on the rest of the batch."""

from __future__ import annotations

import pytest
import torch

from multilora_plugin.errors import InvalidRequestError
from multilora_plugin.sampling import SamplingParams, sample

VOCAB = 50


def logits_rows(n, seed=0):
    return torch.randn(n, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("kwargs,words", [
    (dict(max_new_tokens=-1), "`max_new_tokens` should be an int >= 0, but got -1"),
    (dict(prompt_logprobs=21), "`prompt_logprobs` should be an int >= 0 and <= 20, but got 21"),
    (dict(temperature=-0.5), "`temperature` should be a number >= 0, but got -0.5"),
    (dict(temperature=float("nan")), "`temperature` should be a number >= 0, but got nan"),
    (dict(top_k=-1), "`top_k` should be an int >= 0, but got -1"),
    (dict(top_p=0.0), "`top_p` should be a number > 0 and <= 1, but got 0.0"),
    (dict(top_p=1.5), "`top_p` should be a number > 0 and <= 1, but got 1.5"),
    (dict(min_p=2), "`min_p` should be a number >= 0 and <= 1, but got 2"),
    (dict(repetition_penalty=0), "`repetition_penalty` should be a number > 0, but got 0"),
    (dict(seed=-3), "`seed` should be an int >= 0 and <= 18446744073709551615, but got -3"),
    (dict(stop=[""]), "`stop` should be a list of non-empty strings"),
    (dict(stop_token_ids=[1, "x"]), "`stop_token_ids` should be a list of token ids"),
])
def test_bad_values_are_refused(kwargs, words):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs)
    assert words in str(info.value)


def test_stop_accepts_one_string():
    assert SamplingParams(stop="###").stop == ("###",)


@pytest.mark.parametrize("kwargs", [
    dict(temperature=0.7, top_k=10),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=0.9, min_p=0.1),
    dict(temperature=0, repetition_penalty=1.3),
    dict(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.2),
])
def test_same_tokens_as_transformers_generate(llama_kit, kwargs):
    """With the same global seed, our choice from the model's logits gives the tokens that
    transformers' own `generate` samples with the same settings."""
    model = llama_kit.fresh().eval()
    model.generation_config.eos_token_id = None  # no EOS handling on either side: the chains alone differ
    prompt = torch.tensor([[5, 17, 17, 40, 9]])
    params = SamplingParams(max_new_tokens=8, **kwargs)
    hf_kwargs = dict(do_sample=not params.greedy, temperature=params.temperature or None, top_k=params.top_k,
                     top_p=params.top_p, min_p=params.min_p or None, repetition_penalty=params.repetition_penalty)
    torch.manual_seed(0)
    with torch.no_grad():
        want = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                              pad_token_id=0, **hf_kwargs)[0, 5:].tolist()
    torch.manual_seed(0)
    ids = prompt[0]
    for _ in range(8):
        with torch.no_grad():
            logits = model(ids.view(1, -1)).logits[:, -1]
        token = sample(logits, [(params, ids, None)])[0]
        ids = torch.cat([ids, torch.tensor([token])])
    assert len(want) == 8 and ids[5:].tolist() == want


def test_greedy_is_argmax_after_repetition_penalty():
    scores = torch.zeros(1, VOCAB)
    scores[0, 5], scores[0, 9] = 2.0, 1.9
    history = torch.tensor([5])
    assert sample(scores, [(SamplingParams(temperature=0), history, None)]) == [5]
    assert sample(scores, [(SamplingParams(temperature=0, repetition_penalty=1.5), history, None)]) == [9]


def test_top_k_one_is_greedy_and_top_p_keeps_the_nucleus():
    scores = logits_rows(4, seed=1)
    rows = [(SamplingParams(top_k=1, seed=i), torch.tensor([1]), SamplingParams(seed=i).generator()) for i in range(4)]
    assert sample(scores, rows) == scores.argmax(-1).tolist()
    probs = torch.softmax(scores[0], -1)
    nucleus = set(probs.argsort(descending=True)[: int((probs.sort(descending=True).values.cumsum(0) < 0.5).sum()) + 1]
                  .tolist())
    params = SamplingParams(top_p=0.5, seed=0)
    generator = params.generator()
    draws = {sample(scores[:1], [(params, torch.tensor([1]), generator)])[0] for _ in range(200)}
    assert draws <= nucleus


def test_seeded_draws_do_not_depend_on_the_batch():
    target = logits_rows(1, seed=5)
    params = SamplingParams(temperature=1.0, seed=1234)
    alone = []
    generator = params.generator()
    for _ in range(10):
        alone += sample(target, [(params, torch.tensor([1]), generator)])
    for batch_size, position in [(3, 0), (5, 4), (8, 2)]:
        generator = params.generator()
        others = [(SamplingParams(temperature=0.8, seed=i), torch.tensor([2]), SamplingParams(seed=i).generator())
                  for i in range(batch_size - 1)]
        mixed = []
        for step in range(10):
            logits = logits_rows(batch_size, seed=100 + step)
            logits[position] = target[0]
            rows = others[:position] + [(params, torch.tensor([1]), generator)] + others[position:]
            mixed.append(sample(logits, rows)[position])
        assert mixed == alone


def test_logits_shape_is_checked():
    with pytest.raises(InvalidRequestError, match=r"expected logits \[2, vocab\], but got \[3, 50\]"):
        sample(logits_rows(3), [(SamplingParams(), torch.tensor([1]), None)] * 2)
