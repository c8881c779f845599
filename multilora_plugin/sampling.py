"""Sampling parameters per request and the next-token choice, on transformers' logits processors.

Every request carries its own `SamplingParams` and, when seeded, its own `torch.Generator`, and its
row is processed on its own: the token it samples depends on its logits, its tokens so far and its
seed, never on which other requests share the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .errors import InvalidRequestError


def _number(value, name: str, low: float, high: float = math.inf, *, integer: bool = False,
            low_open: bool = False) -> None:
    kind = int if integer else (int, float)
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if ok and not integer:
        try:
            ok = math.isfinite(float(value))
        except OverflowError:  # an int beyond any float
            ok = False
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bound = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high != math.inf else "")
        raise InvalidRequestError(f"`{name}` should be {'an int' if integer else 'a number'} {bound}, "
                                  f"but got {value!r}")


@dataclass
class SamplingParams:
    """How one request picks its tokens. `temperature=0` is greedy; 0 / 1.0 / 0.0 switch off
    `top_k` / `top_p` / `min_p`."""

    max_new_tokens: int = 16  # 0: score the prompt only (with `prompt_logprobs`), generate nothing
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    stop: Sequence[str] = ()  # strings that end the output (not included in it)
    stop_token_ids: Sequence[int] = ()  # tokens that end the output, besides EOS
    ignore_eos: bool = False
    logprobs: Optional[int] = None  # report each token's log-probability and the top `logprobs` others
    # report each prompt token's log-probability given the ones before it, and the top `prompt_logprobs`
    prompt_logprobs: Optional[int] = None
    processors: LogitsProcessorList = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _number(self.max_new_tokens, "max_new_tokens", 0, integer=True)
        _number(self.temperature, "temperature", 0)
        _number(self.top_k, "top_k", 0, integer=True)
        _number(self.top_p, "top_p", 0, 1, low_open=True)
        _number(self.min_p, "min_p", 0, 1)
        _number(self.repetition_penalty, "repetition_penalty", 0, low_open=True)
        if self.seed is not None:
            _number(self.seed, "seed", 0, 2**64 - 1, integer=True)
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidRequestError(f"`stop` should be a list of non-empty strings, but got {self.stop!r}")
        self.stop = tuple(self.stop)
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise InvalidRequestError(f"`stop_token_ids` should be a list of token ids, but got {self.stop_token_ids!r}")
        self.stop_token_ids = tuple(self.stop_token_ids)
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _number(getattr(self, name), name, 0, 20, integer=True)
        self.processors = self._build()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def _build(self) -> LogitsProcessorList:
        """transformers' processors, in the order its `generate` applies them."""
        chain = LogitsProcessorList()
        if self.repetition_penalty != 1.0:
            chain.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.greedy:
            return chain
        if self.temperature != 1.0:
            chain.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k > 0:
            chain.append(TopKLogitsWarper(self.top_k))
        if self.top_p < 1.0:
            chain.append(TopPLogitsWarper(self.top_p))
        if self.min_p > 0.0:
            chain.append(MinPLogitsWarper(self.min_p))
        return chain

    def generator(self, device: "torch.device | str" = "cpu") -> Optional[torch.Generator]:
        """The request's own random stream (None without a seed: the global one)."""
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


def sample(logits: torch.Tensor, rows: Sequence[Tuple[SamplingParams, Sequence[int], Optional[torch.Generator]]]
           ) -> List[int]:
    """Next token of every row.

    Semantics:
      token[i] = argmax(p_i(logits[i]))                       if rows[i] is greedy
               ~ softmax(p_i(logits[i]))  using rows[i]'s generator   otherwise
      where p_i = rows[i]'s processors applied with its tokens so far (prompt + output)
    Args:
      logits: [B, V] the last position's logits
      rows:   B tuples (params, token ids so far (a list or an int64 tensor), generator or None)
    """
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise InvalidRequestError(f"expected logits [{len(rows)}, vocab], but got {list(logits.shape)}")
    # plain greedy rows need no processor: one argmax for all of them
    plain = [i for i, (params, _, _) in enumerate(rows) if params.greedy and not params.processors]
    tokens: List[int] = [0] * len(rows)
    if plain:
        index = torch.as_tensor(plain, device=logits.device)
        for i, token in zip(plain, logits.index_select(0, index).argmax(-1).tolist()):
            tokens[i] = token
    for i, (params, history, generator) in enumerate(rows):
        if params.greedy and not params.processors:
            continue
        scores = logits[i : i + 1].float()  # [1, V]
        if params.processors:
            ids = torch.as_tensor(history, dtype=torch.long, device=logits.device).view(1, -1)
            scores = params.processors(ids, scores)
        if params.greedy:
            tokens[i] = int(scores.argmax(-1))
        else:
            probs = torch.softmax(scores, dim=-1)
            if torch.isfinite(probs).all() and probs.sum() > 0:
                tokens[i] = int(torch.multinomial(probs, 1, generator=generator))
            else:  # extreme settings (temperature → 0, penalties → 0) overflow: their limit is greedy
                tokens[i] = int(logits[i].argmax(-1))
    return tokens


def logprobs(logits: torch.Tensor, tokens: Sequence[int], top: Sequence[int]) -> List[dict]:
    """Each row's {token: log-probability} under the model's own distribution (before any
    processor, as vLLM reports them): its chosen token first, then its `top[i]` most likely tokens.

    Args:
      logits: [B, V]; tokens: the B chosen tokens; top: B counts (0: the chosen token only)
    """
    scores = torch.log_softmax(logits.float(), dim=-1)
    chosen = scores.gather(1, torch.as_tensor(tokens, device=logits.device).view(-1, 1)).view(-1).tolist()
    most = max(top, default=0)
    values, ids = scores.topk(most, dim=-1) if most else (None, None)
    out = []
    for i, (token, logprob) in enumerate(zip(tokens, chosen)):
        entry = {token: logprob}
        if top[i]:
            for t, v in zip(ids[i, : top[i]].tolist(), values[i, : top[i]].tolist()):
                entry.setdefault(t, v)
        out.append(entry)
    return out
