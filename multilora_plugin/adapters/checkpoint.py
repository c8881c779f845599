"""PEFT adapter directory → validated `AdapterWeights`, using peft's own config and weight loading.

Everything is checked before anything is kept, so a failed load leaves no trace: the config (LoRA,
no unsupported features), the weights file (present, readable, finite), and every module the adapter
targets (present in the model, wrapped, same shapes, rank within `max_lora_rank`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Mapping, Optional

import torch
from peft import LoraConfig, PeftConfig, PeftType
from peft.utils import load_peft_weights
from peft.utils.other import get_pattern_key

from ..errors import AdapterLoadError, IncompatibleAdapterError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
_PREFIX = "base_model.model."
# checkpoint key suffix → what it is: A, B (of a linear layer or an embedding), DoRA's magnitude [out], a
# LoRA bias [out] (`lora_bias=True`), trainable tokens' new rows [n, dim]
_SUFFIXES = {".lora_A.weight": "a", ".lora_B.weight": "b", ".lora_embedding_A": "a", ".lora_embedding_B": "b",
             ".lora_magnitude_vector": "m", ".lora_B.bias": "bias", ".token_adapter.trainable_tokens_delta": "tokens"}
SUFFIX = ".modules_to_save"  # a module copy's target name: the module's name + SUFFIX (PEFT's module path)
_EXTRA = {"m": "a DoRA magnitude", "bias": "a LoRA bias", "tokens": "trainable tokens"}


@dataclass(frozen=True)
class ModuleWeights:
    """What one adapter holds for one target. `extra`: what some kinds hold besides A and B, passed to
    the layer's `write_slot` by name: "magnitude" [out] (DoRA), "bias" [out] (`lora_bias`, scaled),
    "token_indices" [n] and "token_values" [n, dim] (trainable tokens of an embedding); a module's
    full copy (`modules_to_save`, target "<module>.modules_to_save") holds its parameters by name."""

    a: Optional[torch.Tensor]  # [r, in]; for fused experts [E, r, in]; None: no LoRA pair (trainable tokens only)
    b: Optional[torch.Tensor]  # [out, r], scaling folded in; for fused experts [E, out, r]
    extra: Mapping[str, torch.Tensor] = field(default_factory=dict)

    @property
    def tensors(self) -> tuple:
        return tuple(t for t in (self.a, self.b, *self.extra.values()) if t is not None)

    @property
    def rank(self) -> int:
        return 0 if self.a is None else int(self.a.shape[-2])


@dataclass(frozen=True)
class AdapterWeights:
    """One adapter, read and validated, in CPU memory."""

    name: str
    path: str
    config: LoraConfig
    modules: Mapping[str, ModuleWeights]  # wrapped module name → weights
    # what the files looked like when read (`files_fingerprint`); None for weights that came from
    # elsewhere (a plugin's store) or files that changed while they were read
    fingerprint: Optional[tuple] = None

    @cached_property
    def num_bytes(self) -> int:
        held = {id(t): t for w in self.modules.values() for t in w.tensors}  # tied targets share tensors
        return sum(t.numel() * t.element_size() for t in held.values())

    @property
    def rank(self) -> int:
        return max(w.rank for w in self.modules.values())

    def pin_memory(self) -> "AdapterWeights":
        """A copy in page-locked memory, so copies into CUDA slots can be asynchronous."""
        pinned_once: dict = {}  # tied targets share tensors: pinned once

        def pin(t):
            if t is None:
                return None
            if id(t) not in pinned_once:
                pinned_once[id(t)] = t.pin_memory()
            return pinned_once[id(t)]

        pinned = {n: ModuleWeights(pin(w.a), pin(w.b), {k: pin(t) for k, t in w.extra.items()})
                  for n, w in self.modules.items()}
        return replace(self, modules=pinned)


@dataclass(frozen=True)
class ModelModules:
    """What a checkpoint is checked against: the model's modules and the wrapped ones' shapes.

    A target is a wrapped linear layer or router (named as its module), or one projection of fused
    MoE experts (named as its parameter: "model.layers.0.mlp.experts.gate_up_proj").
    """

    wrapped: Mapping[str, tuple]  # target → (in_features, out_features), or (num_experts, in, out) for experts
    all_names: frozenset
    output_embedding: Optional[str]
    max_lora_rank: Optional[int]  # None: any rank
    dtype: Optional[torch.dtype] = None  # weights are stored in the model's dtype (None: as saved)
    # fused-experts module → its projections that LoRA can target, in definition order (PEFT nests one
    # wrapper per targeted parameter in that order, the first innermost)
    experts: Mapping[str, tuple] = field(default_factory=dict)
    # target → the name PEFT matches `rank_pattern` / `alpha_pattern` against, where it is not the
    # target's own (a router's "mlp.gate.weight")
    pattern_keys: Mapping[str, str] = field(default_factory=dict)
    embeddings: frozenset = frozenset()  # targets that are embeddings (LoRA on them, trainable tokens)
    tied_embeddings: bool = False  # the output embedding shares the input embedding's weight
    input_embedding: Optional[str] = None
    # module whose full copies are served (`modules_to_save`) → {parameter name: (shape, dtype)}
    saved: Mapping[str, Mapping[str, tuple]] = field(default_factory=dict)


# (config attribute, its supported value, what to say). For None/False any falsy value is supported;
# attributes that an older peft does not have count as supported.
_UNSUPPORTED = (
    ("bias", "none", "trained biases (`bias` other than 'none')"),
    ("layer_replication", None, "layer replication"),
    ("alora_invocation_tokens", None, "activated LoRA (`alora_invocation_tokens`)"),
    ("use_qalora", False, "QA-LoRA (`use_qalora=True`)"),
    ("use_bdlora", False, "BD-LoRA"),
)


def read_config(path: str) -> LoraConfig:
    """Read and check `adapter_config.json`: a LoRA config with no feature this project cannot serve."""
    if not os.path.isdir(path):
        raise AdapterLoadError(f"expected a local PEFT adapter directory, but {path!r} is not a directory")
    config_file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_file):
        raise AdapterLoadError(f"expected {CONFIG_NAME} in the adapter directory {path!r}, but it is missing")
    try:
        config = PeftConfig.from_pretrained(path)
    except Exception as exc:  # json errors, unknown peft_type, bad field values: all mean an unreadable config
        raise AdapterLoadError(f"{config_file} is not a valid PEFT adapter config: {exc}") from exc
    if config.peft_type != PeftType.LORA or not isinstance(config, LoraConfig):
        found = getattr(config.peft_type, "value", config.peft_type)
        raise IncompatibleAdapterError(f"expected a LoRA adapter (peft_type 'LORA') at {path!r}, but found {found!r}")
    for attr, supported, what in _UNSUPPORTED:
        value = getattr(config, attr, supported)
        used = bool(value) if supported in (None, False) else value != supported
        if used:
            raise IncompatibleAdapterError(f"adapter at {path!r} uses {what}, which is not supported (found {value!r})")
    return config


def files_fingerprint(path: str) -> tuple:
    """(file, size, mtime, ctime, inode) of the config and weights files in `path`.

    A stat costs nothing next to reading the weights, where a hash would read every byte again;
    writing a file changes its ctime, which copy tools cannot set back (they can preserve mtime), and
    an atomic rename changes its inode. Used to tell whether a re-read found the same content.
    """
    found = []
    for file in (CONFIG_NAME, *WEIGHTS_NAMES):
        try:
            st = os.stat(os.path.join(path, file))
        except OSError:
            continue
        found.append((file, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
    return tuple(found)


def _read_tensors(path: str) -> dict:
    if not any(os.path.isfile(os.path.join(path, n)) for n in WEIGHTS_NAMES):
        raise AdapterLoadError(f"expected {' or '.join(WEIGHTS_NAMES)} in {path!r}, but neither exists")
    try:
        return load_peft_weights(path, device="cpu")
    except Exception as exc:
        raise AdapterLoadError(f"could not read the adapter weights in {path!r}: {exc}") from exc


def _targeted(key: str, target_parameters) -> bool:
    """PEFT's rule for `target_parameters`: the full name, or a suffix of it after a dot."""
    return key in target_parameters or any(key.endswith(f".{t}") for t in target_parameters)


def _resolve_experts(path: str, pairs: dict, model: ModelModules, config: LoraConfig) -> dict:
    """Rename the pairs PEFT saved for fused experts to the projections they belong to.

    PEFT wraps each targeted parameter of an experts module in a `ParamWrapper` of its own, nested in
    the parameters' definition order: with gate_up_proj and down_proj targeted, "mlp.experts.lora_A"
    is down_proj's (the outermost) and "mlp.experts.base_layer.lora_A" gate_up_proj's.
    """
    resolved = {}
    for name, pair in pairs.items():
        module, depth = name, 0
        while module.endswith(".base_layer"):
            module, depth = module[: -len(".base_layer")], depth + 1
        if module not in model.experts:
            resolved[name] = pair
            continue
        targeted = [p for p in model.experts[module] if _targeted(f"{module}.{p}", config.target_parameters or ())]
        if depth >= len(targeted):
            raise IncompatibleAdapterError(
                f"adapter at {path!r} holds LoRA weights for {name!r}, but its target_parameters "
                f"{sorted(config.target_parameters or ())} name {len(targeted)} parameter(s) of {module!r}"
            )
        resolved[f"{module}.{targeted[len(targeted) - 1 - depth]}"] = pair
    return resolved


def _saved_owner(path: str, name: str, model: ModelModules, config: LoraConfig) -> Optional[str]:
    """The module whose trained copy (`modules_to_save`) the tensor `name` belongs to, or None.
    PEFT saves a copy's parameters under the module's own name ("lm_head.weight"). Which modules an
    entry copies changed with PEFT 0.22 (up to 0.21 every module whose name ends with it: "norm" takes
    "input_layernorm" too; from 0.22 whole name components only); both are read, as the keys say."""
    named = tuple(config.modules_to_save or ())
    if named and getattr(config, "ensure_weight_tying", False) and model.tied_embeddings:
        named += tuple(n for n in (model.input_embedding, model.output_embedding) if n)  # PEFT copies both, tied
    owners = [m for m in model.all_names if m and name.startswith(f"{m}.") and any(m.endswith(t) for t in named)]
    if not owners:
        return None
    owner = min(owners, key=len)
    if owner not in model.saved:
        raise IncompatibleAdapterError(
            f"adapter at {path!r} holds a trained copy of {owner!r} (`modules_to_save`), but copies of that module "
            f"are not served by this model; wrap with modules_to_save=[..., {owner!r}]"
        )
    return owner


def _module_pairs(path: str, tensors: Mapping[str, torch.Tensor], model: ModelModules, config: LoraConfig) -> dict:
    """Group checkpoint keys into {module name: {"a": tensor, "b": tensor, ...}}, and the parameters
    of a module's trained copy into {module name + ".modules_to_save": {"saved": {parameter: tensor}}}.

    PEFT also saves the full base weights of embedding-like modules it targets (`*.base_layer.weight`,
    in case the vocabulary was resized); LoRA leaves them unchanged, so they are skipped here, and a
    resized vocabulary shows up as a shape mismatch of the LoRA weights.
    """
    names = {(key[len(_PREFIX):] if key.startswith(_PREFIX) else key): key for key in tensors}
    pairs: dict = {}
    for name, key in sorted(names.items()):  # in name order, whatever the file's: the first error is always the same
        if name.endswith(".base_layer.weight"):
            continue
        suffix = next((s for s in _SUFFIXES if name.endswith(s)), None)
        owner = None if suffix is not None else _saved_owner(path, name, model, config)
        if owner is not None:
            pairs.setdefault(owner + SUFFIX, {"saved": {}})["saved"][name[len(owner) + 1:]] = tensors[key]
            continue
        if suffix is None:
            raise IncompatibleAdapterError(
                f"adapter at {path!r} holds the tensor {key!r}, which is no LoRA weight this project serves "
                f"(expected keys ending in {', '.join(_SUFFIXES)})"
            )
        pairs.setdefault(name[: -len(suffix)], {})[_SUFFIXES[suffix]] = tensors[key]
    if not pairs:
        raise IncompatibleAdapterError(f"adapter at {path!r} holds no LoRA weights")
    return pairs


def _check_module(path: str, module: str, pair: dict, model: ModelModules, config: LoraConfig) -> None:
    if module not in model.wrapped:
        if module not in model.all_names:
            why = "the model has no module of that name (was the adapter trained on another base model?)"
        elif module == model.output_embedding:
            why = "it is the output embedding, which `target_modules='all-linear'` leaves out; wrap it explicitly"
        else:
            why = "that module was not wrapped; include it in `wrap(..., target_modules=...)`"
        raise IncompatibleAdapterError(f"adapter at {path!r} targets {module!r}, but {why}")
    extra = sorted(set(pair) - {"a", "b", "indices"})
    if module in model.embeddings:
        kind, allowed = "an embedding", {"tokens", "m"}
    elif len(model.wrapped[module]) == 3 or module in model.pattern_keys:
        kind, allowed = "MoE experts or a router", set()
    else:
        kind, allowed = "a linear layer", {"m", "bias"}
    refused = [k for k in extra if k not in allowed]
    if refused:
        raise IncompatibleAdapterError(f"adapter at {path!r} holds {_EXTRA[refused[0]]} for {module!r}, which is "
                                       f"{kind}: that is not served there")
    if "tokens" in pair and model.tied_embeddings and (module != model.input_embedding
                                                       or model.output_embedding not in model.saved):
        raise IncompatibleAdapterError(
            f"adapter at {path!r} holds trainable tokens for {module!r}, and this model ties its input and output "
            f"embeddings, so they change the output embedding {model.output_embedding!r} too: wrap with "
            f"modules_to_save including {model.output_embedding!r} (as 'auto' does)")
    if "tokens" in pair and ("a" in pair or "b" in pair):
        raise IncompatibleAdapterError(f"adapter at {path!r} holds both LoRA and trainable tokens for {module!r}")
    if "tokens" in pair:
        _check_tokens(path, module, pair["tokens"], pair.get("indices"), model)
        return
    if not {"a", "b"} <= set(pair):
        missing = "lora_A" if "a" not in pair else "lora_B"
        raise AdapterLoadError(f"adapter at {path!r} has no {missing} weight for {module!r}")
    a, b = pair["a"], pair["b"]
    *experts, in_features, out_features = model.wrapped[module]
    num = experts[0] if experts else 1  # PEFT stacks the experts' A rows and B columns: [E * r, in], [out, E * r]
    if (a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_features or b.shape[0] != out_features
            or a.shape[0] != b.shape[1] or a.shape[0] % num):
        what = "E * r" if experts else "r"
        raise IncompatibleAdapterError(
            f"adapter at {path!r}, module {module!r}: expected lora_A [{what}, {in_features}] and lora_B "
            f"[{out_features}, {what}]{f' with E = {num} experts' if experts else ''}, but found {list(a.shape)} "
            f"and {list(b.shape)} (was the adapter trained on another base model?)"
        )
    expected = _config_rank(config, model.pattern_keys.get(module, module))
    if experts and a.shape[0] != num * expected:
        raise IncompatibleAdapterError(
            f"adapter at {path!r}, module {module!r}: expected lora_A [{num} experts x rank {expected}, "
            f"{in_features}], but found {list(a.shape)} (was the adapter trained on a model with another "
            "number of experts?)"
        )
    rank = a.shape[0] // num
    if model.max_lora_rank is not None and rank > model.max_lora_rank:
        raise IncompatibleAdapterError(
            f"adapter at {path!r}, module {module!r}: rank {rank} is above max_lora_rank="
            f"{model.max_lora_rank}; wrap with max_lora_rank >= {rank}"
        )
    for key in extra:  # a magnitude or a bias: one value per output feature
        if pair[key].shape != (out_features,):
            raise IncompatibleAdapterError(
                f"adapter at {path!r}, module {module!r}: expected {'lora_magnitude_vector' if key == 'm' else 'lora_B.bias'}"
                f" of shape [{out_features}], but found {list(pair[key].shape)}"
            )
    if not all(torch.isfinite(t).all() for t in pair.values()):
        raise AdapterLoadError(f"adapter at {path!r}, module {module!r}: weights contain NaN or Inf")


def _saved_weights(path: str, target: str, pairs: Mapping, model: ModelModules) -> ModuleWeights:
    """A module's trained copy, checked against the module: parameters it has, of its shapes, finite;
    kept in the module's dtypes. Parameters the checkpoint leaves out keep the module's values."""
    module, params = target[: -len(SUFFIX)], pairs[target]["saved"]
    if module in pairs:
        raise IncompatibleAdapterError(f"adapter at {path!r} holds both a trained copy of {module!r} "
                                       "(`modules_to_save`) and adapter weights for it")
    own = model.saved[module]
    for name, tensor in params.items():
        if name not in own:
            raise IncompatibleAdapterError(f"adapter at {path!r} holds {name!r} in its copy of {module!r}, which "
                                           f"has no such parameter (it has {sorted(own)})")
        if tuple(tensor.shape) != own[name][0]:
            raise IncompatibleAdapterError(
                f"adapter at {path!r}, copy of {module!r}: expected {name} of shape {list(own[name][0])}, but found "
                f"{list(tensor.shape)} (was the adapter trained on another base model or vocabulary?)"
            )
        if not torch.isfinite(tensor).all():
            raise AdapterLoadError(f"adapter at {path!r}, copy of {module!r}: {name} contains NaN or Inf")
    return ModuleWeights(None, None, {n: t.to(own[n][1]).contiguous() for n, t in params.items()})


def _token_indices(config: LoraConfig, module: str) -> Optional[list]:
    """The token ids the config gives trainable tokens of `module`: a list (the input embedding's) or
    {module name or suffix: ids}, as PEFT reads `trainable_token_indices`."""
    indices = config.trainable_token_indices
    if isinstance(indices, dict):
        return next((v for k, v in indices.items() if module == k or module.endswith(f".{k}")), None)
    return indices


def _check_tokens(path: str, module: str, values: torch.Tensor, indices, model: ModelModules) -> None:
    vocab, dim = model.wrapped[module]
    if indices is None:
        raise AdapterLoadError(f"adapter at {path!r} holds trainable tokens for {module!r}, but its config's "
                               "trainable_token_indices name none for it")
    if values.shape != (len(indices), dim):
        raise IncompatibleAdapterError(f"adapter at {path!r}, module {module!r}: expected trainable tokens of shape "
                                       f"[{len(indices)}, {dim}], but found {list(values.shape)}")
    if any(not 0 <= i < vocab for i in indices):
        raise IncompatibleAdapterError(f"adapter at {path!r}, module {module!r}: trainable token ids should be in "
                                       f"0..{vocab - 1}, but got {sorted(indices)}")
    if not torch.isfinite(values).all():
        raise AdapterLoadError(f"adapter at {path!r}, module {module!r}: trainable tokens contain NaN or Inf")


def _config_rank(config: LoraConfig, module: str) -> int:
    """The rank the config gives `module` (PEFT's `rank_pattern` applied)."""
    return (config.rank_pattern or {}).get(get_pattern_key(list(config.rank_pattern or {}), module), config.r)


def _scaling(config: LoraConfig, module: str, rank: int, path: str) -> float:
    """PEFT's scaling for one module: alpha / r (or alpha / sqrt(r) with rsLoRA), patterns applied."""
    expected_rank = _config_rank(config, module)
    if expected_rank != rank:
        raise AdapterLoadError(
            f"adapter at {path!r}, module {module!r}: the config gives rank {expected_rank}, "
            f"but the weights have rank {rank}"
        )
    alpha_key = get_pattern_key(list(config.alpha_pattern or {}), module)
    alpha = (config.alpha_pattern or {}).get(alpha_key, config.lora_alpha)
    return alpha / math.sqrt(rank) if config.use_rslora else alpha / rank


def read_adapter(name: str, path: str, model: ModelModules, config: Optional[LoraConfig] = None,
                 tensors: Optional[Mapping[str, torch.Tensor]] = None) -> AdapterWeights:
    """Read, validate and scale a PEFT LoRA adapter directory. Raises a `MultiLoRAError` on any problem.

    The weights carry the fingerprint of the files read (see `files_fingerprint`), or None when
    `tensors` were given or the files changed during the read.

    `config`: the adapter's config when it was read already (at registration); the weights are checked
    against it. None: read it from `path`. `tensors`: its PEFT state dict when it comes from elsewhere
    (a plugin's store); None: read the weights file in `path`.
    """
    path = os.fspath(path)
    config = read_config(path) if config is None else config
    if tensors is not None and not (isinstance(tensors, Mapping)
                                    and all(isinstance(t, torch.Tensor) for t in tensors.values())):
        raise AdapterLoadError(f"adapter {name!r}: the weights provided should be a PEFT state dict "
                               f"{{name: tensor}}, but got {type(tensors).__name__}")
    before = files_fingerprint(path) if tensors is None else None
    pairs = _module_pairs(path, _read_tensors(path) if tensors is None else dict(tensors), model, config)
    pairs = _resolve_experts(path, pairs, model, config)
    modules = {}
    for module in sorted(pairs):
        if module.endswith(SUFFIX):
            modules[module] = _saved_weights(path, module, pairs, model)
            continue
        if "tokens" in pairs[module]:
            pairs[module]["indices"] = _token_indices(config, module)
        _check_module(path, module, pairs[module], model, config)
        if "tokens" in pairs[module]:  # trainable tokens: new rows, no LoRA pair
            values = pairs[module]["tokens"].to(model.dtype or pairs[module]["tokens"].dtype).contiguous()
            tokens = {"token_indices": torch.tensor(pairs[module]["indices"]), "token_values": values}
            modules[module] = ModuleWeights(None, None, tokens)
            if model.tied_embeddings:  # the same rows of the tied output embedding (as PEFT ties them)
                tied = model.output_embedding + SUFFIX
                if tied in pairs:
                    raise IncompatibleAdapterError(f"adapter at {path!r} holds both trainable tokens of the tied "
                                                   f"embeddings and a trained copy of {model.output_embedding!r}")
                modules[tied] = ModuleWeights(None, None, tokens)
            continue
        a, b = pairs[module]["a"], pairs[module]["b"]
        num = model.wrapped[module][0] if len(model.wrapped[module]) == 3 else None
        if num is not None:  # fused experts: per-expert A [E, r, in] and B [E, out, r]
            a = a.reshape(num, -1, a.shape[-1])
            b = b.reshape(b.shape[0], -1, num).permute(2, 0, 1)
        scale = _scaling(config, model.pattern_keys.get(module, module), a.shape[-2], path)
        dtype = model.dtype or b.dtype
        # as PEFT: a magnitude or bias the config does not ask for (use_dora, lora_bias) is not used
        extra = {}
        if "m" in pairs[module] and getattr(config, "use_dora", False):
            extra["magnitude"] = pairs[module]["m"].float().contiguous()
        if "bias" in pairs[module] and getattr(config, "lora_bias", False):
            extra["bias"] = (pairs[module]["bias"].float() * scale).to(dtype).contiguous()
        modules[module] = ModuleWeights(a.to(dtype).contiguous(), (b.float() * scale).to(dtype).contiguous(), extra)
    fingerprint = before if before is not None and files_fingerprint(path) == before else None
    return AdapterWeights(name=name, path=path, config=config, modules=modules, fingerprint=fingerprint)
