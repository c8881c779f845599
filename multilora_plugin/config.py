"""Settings of a wrapped model, validated once."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from .errors import ConfigError

TargetModules = Union[str, Sequence[str]]


def check_int(name: str, value: object, minimum: int, bound: str = "") -> None:
    """Raise `ConfigError` unless `value` is an int (not a bool) >= `minimum`. `bound` says the
    minimum in words, with its reason, when it is another setting."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"`{name}` should be an int >= {bound or minimum}, but got {value!r}")
BACKENDS = ("auto", "torch", "triton")
ALL_LINEAR = "all-linear"
AUTO = "auto"


@dataclass
class MultiLoRAConfig:
    """How `wrap()` patches a model.

    max_loras:      adapters resident in slots at once (the base model never takes a slot)
    max_cpu_loras:  adapters whose weights are kept in CPU memory (slot residents included);
                    default max(4 * max_loras, 8); more can be registered, they are read on demand
    max_lora_rank:  slot buffers are padded to this rank; adapters of a higher rank are refused
    target_modules: "all-linear" (every nn.Linear / Conv1D but the output embeddings), a list of
                    module names or name suffixes (PEFT's rule), or a regex that must match a whole name
    backend:        "auto" | "torch" | "triton": the kernel backend, chosen once at wrap time
    modules_to_save: the modules whose full per-adapter copies (PEFT's `modules_to_save`) can be
                    served: "auto" (the input and output embeddings and a classification head,
                    `score` or `classifier`), a list of module names or name suffixes (linear
                    layers, embeddings or norms), or None
    """

    max_loras: int = 4
    max_lora_rank: int = 16
    max_cpu_loras: Optional[int] = None
    target_modules: TargetModules = ALL_LINEAR
    backend: str = "auto"
    modules_to_save: Optional[TargetModules] = AUTO

    def __post_init__(self) -> None:
        for name in ("max_loras", "max_lora_rank"):
            check_int(name, getattr(self, name), 1)
        if self.max_cpu_loras is None:
            self.max_cpu_loras = max(4 * self.max_loras, 8)
        check_int("max_cpu_loras", self.max_cpu_loras, self.max_loras,
                  f"max_loras ({self.max_loras}), as every adapter in a slot keeps its CPU copy")
        if self.backend not in BACKENDS:
            raise ConfigError(f"`backend` should be one of {BACKENDS}, but got {self.backend!r}")
        target = self.target_modules
        if isinstance(target, str):
            if target != ALL_LINEAR:
                try:
                    re.compile(target)
                except re.error as exc:
                    raise ConfigError(
                        f"`target_modules` should be {ALL_LINEAR!r}, a list of names or a valid regex, "
                        f"but {target!r} does not compile: {exc}"
                    ) from None
        elif not target or not all(isinstance(t, str) and t for t in target):
            raise ConfigError(
                f"`target_modules` should be {ALL_LINEAR!r}, a regex or a non-empty list of module names, "
                f"but got {target!r}"
            )
        else:
            self.target_modules = tuple(target)
        saved = self.modules_to_save
        if isinstance(saved, (list, tuple)) and all(isinstance(t, str) and t for t in saved):
            self.modules_to_save = tuple(saved)
        elif not (saved is None or saved == AUTO):
            raise ConfigError(f"`modules_to_save` should be {AUTO!r}, a list of module names or None, "
                              f"but got {saved!r}")

    def targets(self, name: str, is_output_embedding: bool) -> bool:
        """Whether the linear module called `name` is patched."""
        target = self.target_modules
        if target == ALL_LINEAR:
            return not is_output_embedding
        if isinstance(target, str):
            return re.fullmatch(target, name) is not None
        return any(name == t or name.endswith("." + t) for t in target)
