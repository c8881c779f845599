"""What a request must be before the engine queues it: its sampling parameters, its prompt and its
adapter, each checked with a typed error that says what was expected and what was found; the
adapter registered on first use."""

from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import torch

from .adapters import not_registered
from .errors import AdapterExistsError, AdapterNotFoundError, InvalidRequestError, PluginError
from .outputs import EngineRequest, LoRARequest
from .sampling import SamplingParams


def sampling_params(params) -> SamplingParams:
    """A `SamplingParams`, a dict of its fields, or None (the defaults)."""
    if params is None:
        return SamplingParams()
    if isinstance(params, dict):
        try:
            return SamplingParams(**params)
        except TypeError as exc:
            raise InvalidRequestError(f"bad sampling parameters {params!r}: {exc}") from None
    if not isinstance(params, SamplingParams):
        raise InvalidRequestError(f"`sampling_params` should be a SamplingParams, but got {type(params).__name__}")
    return params


def check_length(request_id: str, num_prompt_tokens: int, params: SamplingParams, max_model_len: Optional[int]) -> None:
    """A request that only scores its prompt (max_new_tokens=0) needs two prompt tokens, the first
    to predict from, and no position for its last one; one that generates needs every prompt and
    output token to fit the model's positions."""
    if params.max_new_tokens == 0 and num_prompt_tokens < 2:
        raise InvalidRequestError(f"request {request_id!r}: with max_new_tokens=0 the prompt is only scored, "
                                  f"so it should have at least 2 tokens, but has {num_prompt_tokens}")
    positions = num_prompt_tokens - 1 if params.max_new_tokens == 0 else num_prompt_tokens + params.max_new_tokens
    if max_model_len is not None and positions > max_model_len:
        raise InvalidRequestError(
            f"request {request_id!r}: prompt ({num_prompt_tokens} tokens) + max_new_tokens ({params.max_new_tokens}) "
            f"should fit the model's {max_model_len} positions"
        )


def prompt_tokens(request_id: str, prompt, prompt_token_ids, tokenizer, vocab_size: Optional[int]) -> tuple:
    """(text or None, token ids) of a prompt given as text (needs `tokenizer`), as token ids, or as
    both (the text and the ids a host made of it)."""
    text = None
    if prompt is not None and prompt_token_ids is not None:  # the host tokenized it: ids rule, text kept
        if not isinstance(prompt, str):
            raise InvalidRequestError(f"request {request_id!r}: with `prompt_token_ids`, `prompt` should be "
                                      f"the text they encode, but got {type(prompt).__name__}")
        text, prompt = prompt, None
    if isinstance(prompt, str):
        if tokenizer is None:
            raise InvalidRequestError(f"request {request_id!r}: a text prompt needs an engine with a tokenizer; "
                                      "pass prompt_token_ids instead")
        text, ids = prompt, tokenizer.encode(prompt, add_special_tokens=True) if prompt else []
    else:
        ids = prompt_token_ids if prompt_token_ids is not None else prompt
        if ids is None or isinstance(ids, (bytes, dict)) or not isinstance(ids, (Sequence, torch.Tensor)):
            raise InvalidRequestError(f"request {request_id!r}: the prompt should be a string or a list of "
                                      f"token ids, but got {type(ids).__name__}")
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or t < 0
               or (vocab_size is not None and t >= vocab_size)]
        if bad:
            raise InvalidRequestError(f"request {request_id!r}: token ids should be ints in "
                                      f"0..{(vocab_size or 0) - 1}, but got {bad[:5]}")
    if not ids:
        raise InvalidRequestError(f"request {request_id!r}: the prompt is empty (it should have at least one token)")
    return text, ids


def lora_request(value) -> Optional[LoRARequest]:
    """A `LoRARequest`, an adapter name, or None (the base model)."""
    if value is None or isinstance(value, LoRARequest):
        return value
    if isinstance(value, str) and value:
        return LoRARequest(value, 1)
    raise InvalidRequestError(f"`lora_request` should be a LoRARequest, an adapter name or None, "
                              f"but got {value!r}")


def resolve_adapter(info: EngineRequest, model, resolve: Callable[[str], Optional[str]]) -> Optional[LoRARequest]:
    """The request's adapter (as plugins left it) on the wrapped `model`, registered on first use from
    the request's `lora_path` or from the path `resolve(name)` gives (a plugin's `multilora_resolve_adapter`)."""
    name, cache = info.adapter, model.adapter_cache
    if name is None:
        return None
    if not isinstance(name, str) or not name:
        raise PluginError(f"request {info.request_id!r}: a plugin set its adapter to {name!r}; "
                          "expected an adapter name or None")
    lora = info.lora_request if info.lora_request is not None and info.lora_request.lora_name == name else None
    path = lora.lora_path if lora is not None else ""
    if name not in cache:
        path = path or resolve(name) or ""
        if not path:
            raise AdapterNotFoundError(not_registered(name, cache.names()) + "; give its lora_path to register it")
        model.register_adapter(name, path)
    elif path and os.path.realpath(path) != os.path.realpath(cache.source(name).path):
        raise AdapterExistsError(
            f"adapter {name!r} is registered from {cache.source(name).path!r}, but this request gives "
            f"{path!r}; unload it first or use another lora_name"
        )
    return lora or LoRARequest(name, 1, cache.source(name).path)


def eos_token_ids(model, tokenizer) -> frozenset:
    """The ids that end a request: the model's generation config's and the tokenizer's."""
    ids = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    ids.add(getattr(tokenizer, "eos_token_id", None))
    return frozenset(i for i in ids if isinstance(i, int))
