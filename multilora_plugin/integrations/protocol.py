"""The wire formats the server speaks: request bodies (pydantic) and the JSON it answers with.

Two APIs over one engine:

* TGI / LoRAX: `{"inputs": ..., "parameters": {"adapter_id": ..., ...}}`; `parameters.adapter_id`
  names the adapter (none: the base model); answers `{"generated_text", "details"}` or, streamed,
  one `{"index", "token", "generated_text", "details"}` event per token.
* OpenAI (as vLLM serves it): `model` names the adapter or the base model; completions and chat
  completions, with vLLM's extra sampling fields (`top_k`, `min_p`, `repetition_penalty`,
  `ignore_eos`, `stop_token_ids`).

Everything here is pure: a body becomes `SamplingParams` (or a typed `InvalidRequestError`), an
engine output becomes a JSON-ready dict. `server.py` wires them to routes.
"""

from __future__ import annotations

import itertools

import random
import time
from typing import Any, Dict, List, Literal, Optional, Sequence, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import InvalidRequestError
from ..outputs import CompletionOutput, RequestOutput
from ..sampling import SamplingParams
from .access import utf8_problem

TGI_DEFAULT_MAX_NEW_TOKENS = 100
MAX_STOP_SEQUENCES = 16


class UnsupportedOption(InvalidRequestError):
    """The request asks for a feature this server does not implement (HTTP 422 on both APIs, as TGI's
    schema answers for its own unsupported parameters)."""


def _unsupported(name: str, value: Any, allowed: Any) -> None:
    if value is not None and value != allowed:
        raise UnsupportedOption(f"`{name}` is not supported by this server (expected {allowed!r} or nothing, "
                                f"but got {value!r})")


def _stops(stop: Union[str, List[str], None]) -> List[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_SEQUENCES:
        raise InvalidRequestError(f"`stop` should hold at most {MAX_STOP_SEQUENCES} strings, but got {len(stops)}")
    return [s for s in stops if s]


def _random_seed() -> int:
    return random.SystemRandom().getrandbits(63)


class _Body(BaseModel):
    """A request body: text in it must be valid Unicode (JSON can carry a lone UTF-16 surrogate, which no
    tokenizer and no UTF-8 response can hold), refused with a 422 that says where."""

    @model_validator(mode="before")
    @classmethod
    def _valid_text(cls, data: Any) -> Any:
        problem = utf8_problem(data)
        if problem:
            raise ValueError(problem)
        if isinstance(data, dict):  # JSON true / false is no number (pydantic's lax mode would take it for 1 / 0)
            for name, field in cls.model_fields.items():
                kind = repr(field.annotation)
                if isinstance(data.get(name), bool) and ("int" in kind or "float" in kind) and "bool" not in kind:
                    raise ValueError(f"`{name}` should be a number, but got {str(data[name]).lower()}")
        return data


# TGI --------------------------------------------------------------------------------------------------
class TGIParameters(_Body):
    """TGI's `parameters`. Options this server does not implement accept only their neutral value,
    so the schema says what is served (others get a 422 that names the field)."""

    adapter_id: Optional[str] = Field(None, description="adapter to generate with (none: the base model)")
    best_of: Optional[int] = Field(None, ge=1, le=1, description="one sequence per request")
    decoder_input_details: Literal[False] = False
    details: bool = False
    do_sample: bool = False
    frequency_penalty: Optional[float] = Field(None, ge=0, le=0, description="not supported: 0 or nothing")
    grammar: None = Field(None, description="not supported")
    max_new_tokens: Optional[int] = Field(None, ge=1)
    repetition_penalty: Optional[float] = Field(None, gt=0)
    return_full_text: Optional[bool] = None
    seed: Optional[int] = Field(None, ge=0, le=2**64 - 1)
    stop: List[str] = Field(default_factory=list, max_length=MAX_STOP_SEQUENCES)
    temperature: Optional[float] = Field(None, gt=0)
    top_k: Optional[int] = Field(None, gt=0)
    top_n_tokens: Optional[int] = Field(None, ge=0, le=20)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    truncate: Optional[int] = Field(None, ge=1)
    typical_p: Optional[float] = Field(None, ge=1, le=1, description="not supported: 1.0 or nothing")
    watermark: Literal[False] = False


class TGIRequest(_Body):
    inputs: str
    parameters: TGIParameters = Field(default_factory=TGIParameters)
    stream: bool = False


def tgi_sampling(p: TGIParameters, room: Optional[int], token_details: bool) -> SamplingParams:
    """TGI's parameters as SamplingParams. As in TGI, setting a temperature, top_k or top_p other
    than the neutral value means sampling even without `do_sample`; sampling without a seed draws
    one (reported in `details.seed`). `room`: positions left after the prompt (None: unbounded);
    `token_details`: the answer reports each token (a stream, or `details`), so logprobs are needed."""
    sampling = p.do_sample or p.temperature not in (None, 1.0) or p.top_k is not None \
        or p.top_p not in (None, 1.0)
    max_new = p.max_new_tokens
    if max_new is None:
        max_new = TGI_DEFAULT_MAX_NEW_TOKENS if room is None else max(1, min(TGI_DEFAULT_MAX_NEW_TOKENS, room))
    seed = p.seed if p.seed is not None or not sampling else _random_seed()
    return SamplingParams(
        max_new_tokens=max_new, temperature=(p.temperature or 1.0) if sampling else 0.0,
        top_k=p.top_k or 0, top_p=p.top_p or 1.0, repetition_penalty=p.repetition_penalty or 1.0,
        seed=seed, stop=_stops(p.stop), logprobs=(p.top_n_tokens or 0) if token_details else None,
    )


def tgi_finish_reason(completion: CompletionOutput) -> str:
    if completion.finish_reason == "length":
        return "length"
    if isinstance(completion.stop_reason, str):
        return "stop_sequence"
    return "eos_token"


class Tokens:
    """Token ids → the text and `special` flag TGI reports for them."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.special = frozenset(getattr(tokenizer, "all_special_ids", ()) or ())

    def text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False) if self.tokenizer is not None else ""

    def texts(self, context: Sequence[int], ids: Sequence[int], window: int = 6, special: bool = False) -> List[str]:
        """The text each token of `ids` adds after the tokens before it (as a stream shows it:
        leading spaces and merges included), decoding a short window of the tokens before; special
        tokens add nothing unless `special` (an echoed prompt shows them, as its decoded ids do)."""
        if self.tokenizer is None:
            return [""] * len(ids)
        seen = list(context[-window:])
        out = []
        for token in ids:
            before = self.tokenizer.decode(seen[-window:], skip_special_tokens=not special)
            after = self.tokenizer.decode(seen[-window:] + [token], skip_special_tokens=not special)
            out.append(after[len(before):] if after.startswith(before) else self.text(token))
            seen.append(token)
        return out

    def tgi(self, token: int, logprob: Optional[float], text: Optional[str] = None) -> dict:
        return {"id": token, "text": self.text(token) if text is None else text,
                "logprob": 0.0 if logprob is None else logprob, "special": token in self.special}



def tgi_response(output: RequestOutput, params: SamplingParams, body: TGIParameters, tokens: Tokens) -> dict:
    completion = output.outputs[0]
    answer: Dict[str, Any] = {"generated_text": _tgi_text(output, body)}
    if body.details:
        logprobs = completion.logprobs or [None] * len(completion.token_ids)
        answer["details"] = {
            "finish_reason": tgi_finish_reason(completion),
            "generated_tokens": len(completion.token_ids),
            "seed": params.seed if not params.greedy else None,
            "prefill": [],
            "tokens": [tokens.tgi(t, lp and lp.get(t), text) for t, lp, text in
                       zip(completion.token_ids, logprobs, tokens.texts(output.prompt_token_ids, completion.token_ids))],
            "top_tokens": [_tgi_top(tokens, lp, body.top_n_tokens) for lp in logprobs]
            if body.top_n_tokens else None,
        }
    return answer


def _tgi_text(output: RequestOutput, body: TGIParameters) -> str:
    """`generated_text`: the output, after the prompt with `return_full_text`."""
    text = output.outputs[0].text
    return (output.prompt or "") + text if body.return_full_text else text


def top(entry: Optional[Dict[int, float]], k: int) -> List[tuple]:
    """The k most likely (token, logprob) of one position (its entry holds the chosen token and the
    top k, so the top k are its k largest)."""
    return sorted(entry.items(), key=lambda kv: -kv[1])[:k] if entry and k else []


def _tgi_top(tokens: Tokens, entry: Optional[Dict[int, float]], k: int) -> List[dict]:
    return [tokens.tgi(t, v) for t, v in top(entry, k)]


def tgi_stream_events(output: RequestOutput, params: SamplingParams, body: TGIParameters,
                      tokens: Tokens) -> List[dict]:
    """One event per new token of `output`; the last event of a finished request carries the whole
    text and the details. The text of a step's tokens goes with its last one."""
    completion = output.outputs[0]
    new = completion.delta_token_ids
    first = len(completion.token_ids) - len(new)
    logprobs = completion.logprobs or []
    events = []
    for k, token in enumerate(new):
        entry = logprobs[first + k] if first + k < len(logprobs) else None
        last = k == len(new) - 1
        event: Dict[str, Any] = {
            "index": first + k + 1,
            "token": tokens.tgi(token, entry and entry.get(token), completion.delta_text if last else ""),
            "generated_text": None, "details": None,
            "top_tokens": _tgi_top(tokens, entry, body.top_n_tokens) if body.top_n_tokens else None,
        }
        events.append(event)
    if completion.finished and events:
        events[-1]["generated_text"] = _tgi_text(output, body)
        events[-1]["details"] = {
            "finish_reason": tgi_finish_reason(completion), "generated_tokens": len(completion.token_ids),
            "seed": params.seed if not params.greedy else None, "input_length": len(output.prompt_token_ids),
        }
    return events


# OpenAI -----------------------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    include_usage: bool = False


class _OpenAIBase(_Body):
    model_config = ConfigDict(extra="allow")  # unknown fields are ignored, as OpenAI does

    model: str
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, List[str], None] = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[Dict[str, float]] = None
    user: Optional[str] = None
    # vLLM's extra sampling fields
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    ignore_eos: bool = False
    stop_token_ids: Optional[List[int]] = None

    def sampling(self, max_tokens: Optional[int], room: Optional[int], logprobs: Optional[int],
                 prompt_logprobs: Optional[int] = None) -> SamplingParams:
        _unsupported("presence_penalty", self.presence_penalty or None, None)
        _unsupported("frequency_penalty", self.frequency_penalty or None, None)
        _unsupported("logit_bias", self.logit_bias or None, None)
        if not 1 <= self.n <= 16:
            raise InvalidRequestError(f"`n` should be between 1 and 16, but got {self.n!r}")
        if self.top_k is not None and self.top_k < -1:
            raise InvalidRequestError(f"`top_k` should be -1 (off), 0 (off) or positive, but got {self.top_k}")
        if self.repetition_penalty is not None and not self.repetition_penalty > 0:
            raise InvalidRequestError(f"`repetition_penalty` should be > 0, but got {self.repetition_penalty}")
        if max_tokens is None:
            max_tokens = 16 if room is None else max(1, room)
        return SamplingParams(
            max_new_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=max(self.top_k or 0, 0),
            min_p=self.min_p or 0.0, repetition_penalty=self.repetition_penalty or 1.0, seed=self.seed,
            stop=_stops(self.stop), stop_token_ids=self.stop_token_ids or (), ignore_eos=self.ignore_eos,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs,
        )


class CompletionRequest(_OpenAIBase):
    prompt: Union[str, List[str], List[int], List[List[int]]]
    max_tokens: Optional[int] = 16
    logprobs: Optional[int] = None
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    def prompts(self) -> List[Union[str, List[int]]]:
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt)):
            return [prompt]
        if not prompt:
            raise InvalidRequestError("`prompt` should not be empty")
        return list(prompt)

    def params(self, room: Optional[int]) -> SamplingParams:
        """With `echo` and `logprobs`, the prompt's tokens are scored too (`max_tokens: 0` scores only)."""
        _unsupported("best_of", self.best_of, self.n)
        _unsupported("suffix", self.suffix or None, None)
        return self.sampling(self.max_tokens, room, self.logprobs, self.logprobs if self.echo else None)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: Optional[str] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: Union[str, List[ContentPart], None] = None
    name: Optional[str] = None


class ResponseFormat(BaseModel):
    type: str


class ChatCompletionRequest(_OpenAIBase):
    messages: List[ChatMessage]
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    tools: Optional[List[Any]] = None
    tool_choice: Optional[Any] = None
    response_format: Optional[ResponseFormat] = None

    def conversation(self) -> List[dict]:
        """Messages as plain dicts for the chat template; text parts joined."""
        if not self.messages:
            raise InvalidRequestError("`messages` should hold at least one message")
        out = []
        for message in self.messages:
            content = message.content
            if isinstance(content, list):
                kinds = {part.type for part in content} - {"text"}
                if kinds:
                    raise UnsupportedOption(f"only text content parts are supported, but got {sorted(kinds)}")
                content = "".join(part.text or "" for part in content)
            out.append({"role": message.role, "content": content or ""})
        return out

    def params(self, room: Optional[int]) -> SamplingParams:
        _unsupported("tools", self.tools or None, None)
        _unsupported("tool_choice", self.tool_choice if self.tool_choice != "none" else None, None)
        if self.response_format is not None and self.response_format.type != "text":
            raise UnsupportedOption(f"`response_format` {self.response_format.type!r} is not supported "
                                      "(expected 'text')")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("`top_logprobs` needs `logprobs: true`")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self.sampling(max_tokens, room, (self.top_logprobs or 0) if self.logprobs else None)


class LoadLoRARequest(_Body):
    lora_name: str
    lora_path: str
    load_inplace: bool = False  # vLLM's: replace an adapter of that name (running requests finish on the old one)


class UnloadLoRARequest(_Body):
    lora_name: str
    lora_int_id: Optional[int] = None


def openai_finish_reason(completion: CompletionOutput) -> Optional[str]:
    if completion.finish_reason in (None, "length", "stop"):
        return completion.finish_reason
    return "stop"  # aborted: the text so far is all there is


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(completion: CompletionOutput, context: Sequence[int], start: int, tokens: Tokens,
                        offset: int, k: int) -> Optional[dict]:
    """The `logprobs` object of a completion choice for its tokens from `start` on; `context` is
    what comes before them (their text depends on it)."""
    if completion.logprobs is None:
        return None
    ids = completion.token_ids[start:]
    entries = completion.logprobs[start:start + len(ids)]
    texts = tokens.texts(context, ids)
    offsets, at = [], offset
    for text in texts:
        offsets.append(at)
        at += len(text)
    return {
        "tokens": texts,
        "token_logprobs": [entry.get(t) for t, entry in zip(ids, entries)],
        "top_logprobs": [{tokens.text(t): v for t, v in top(entry, k)} for entry in entries],
        "text_offset": offsets,
    }


def echoed_logprobs(output: RequestOutput, tokens: Tokens, k: int, rest: Optional[dict]) -> dict:
    """The `logprobs` object of an echoed prompt (OpenAI's legacy format: None for its first token,
    then each token's log-probability given those before it), followed by `rest` (the completion's)."""
    ids, scored = output.prompt_token_ids, output.prompt_logprobs
    texts = tokens.texts([], ids, special=True)
    offsets = list(itertools.accumulate((len(t) for t in texts[:-1]), initial=0))
    part = {"tokens": texts, "token_logprobs": [None] + [entry[t] for t, entry in zip(ids[1:], scored[1:])],
            "top_logprobs": [None] + [{tokens.text(t): v for t, v in top(entry, k)} for entry in scored[1:]],
            "text_offset": offsets}
    for field_name in part if rest else ():
        part[field_name] = part[field_name] + rest[field_name]
    return part


def chat_logprobs(completion: CompletionOutput, start: int, tokens: Tokens, k: int) -> Optional[dict]:
    if completion.logprobs is None:
        return None

    def item(token: int, logprob: float) -> dict:
        text = tokens.text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = []
    for token, entry in zip(completion.token_ids[start:], completion.logprobs[start:]):
        content.append({**item(token, entry.get(token)), "top_logprobs": [item(t, v) for t, v in top(entry, k)]})
    return {"content": content}


def now() -> int:
    return int(time.time())


# the model, as /info and /v1/models describe it ------------------------------------------------------
def describe_model(model) -> dict:
    """A wrapped model's part of TGI's /info."""
    first = next(model.parameters(), None)
    return {"model_dtype": str(first.dtype).replace("torch.", "") if first is not None else None,
            "model_device_type": first.device.type if first is not None else None,
            "max_loras": model.multilora_config.num_slots, "max_lora_rank": model.multilora_config.max_lora_rank,
            "lora_memory": model.memory_stats().slot_memory_bytes,
            "model_type": getattr(model.config, "model_type", None)}


def model_name(model) -> str:
    """The base model's name in the OpenAI API, unless the operator gives one."""
    name = getattr(model.config, "_name_or_path", "") or ""
    return name or getattr(model.config, "model_type", None) or "base"
