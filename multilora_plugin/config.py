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
_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
DEFAULT_SLOTS = 256  # adapters resident at most when only bytes bound them (`max_loras` not given)
ALL_LINEAR = "all-linear"
AUTO = "auto"


def parse_bytes(value: Union[int, str], name: str = "lora_memory") -> int:
    """Bytes from an int or a string such as "2GiB", "512 MB", "1e9"."""
    if isinstance(value, bool):
        raise ConfigError(f"`{name}` should be a number of bytes or a size such as '2GiB', but got {value!r}")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", value)
        unit = match.group(2).lower() if match else None
        try:
            number = float(match.group(1)) * _UNITS[unit] if match and unit in _UNITS else None
        except ValueError:
            number = None
        if number is None:
            raise ConfigError(f"`{name}` should be a number of bytes or a size such as '2GiB', '512MB', but got "
                              f"{value!r}")
        number = int(number)
    else:
        raise ConfigError(f"`{name}` should be a number of bytes or a size such as '2GiB', but got {value!r}")
    if number <= 0:
        raise ConfigError(f"`{name}` should be more than 0 bytes, but got {value!r}")
    return number


@dataclass
class MultiLoRAConfig:
    """How `wrap()` patches a model.

    lora_memory:    bytes of slot memory for the adapters in slots (an int, or a size such as "2GiB");
                    each adapter takes its own size (its rank and targets, nothing padded); default:
                    a tenth of the free memory of a CUDA device at wrap time, 1 GiB on a CPU
    max_loras:      at most this many adapters resident in slots at once (the base model never takes
                    one); default: as many as fit in lora_memory, up to DEFAULT_SLOTS
    max_cpu_loras:  adapters whose weights are kept in CPU memory (slot residents included);
                    default max(4 * max_loras, 8), or DEFAULT_SLOTS without max_loras; more can be
                    registered, they are read on demand
    max_lora_rank:  adapters of a higher rank are refused; default: none are
    target_modules: "all-linear" (every nn.Linear / Conv1D but the output embeddings), a list of
                    module names or name suffixes (PEFT's rule), or a regex that must match a whole name
    backend:        "auto" | "torch" | "triton": the kernel backend, chosen once at wrap time
    modules_to_save: the modules whose full per-adapter copies (PEFT's `modules_to_save`) can be
                    served: "auto" (the input and output embeddings and a classification head,
                    `score` or `classifier`), a list of module names or name suffixes (linear
                    layers, embeddings or norms), or None
    """

    max_loras: Optional[int] = None
    max_lora_rank: Optional[int] = None
    max_cpu_loras: Optional[int] = None
    lora_memory: Optional[Union[int, str]] = None
    target_modules: TargetModules = ALL_LINEAR
    backend: str = "auto"
    modules_to_save: Optional[TargetModules] = AUTO

    def __post_init__(self) -> None:
        for name in ("max_loras", "max_lora_rank"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1)
        if self.lora_memory is not None:
            self.lora_memory = parse_bytes(self.lora_memory)
        if self.max_cpu_loras is None:
            self.max_cpu_loras = DEFAULT_SLOTS if self.max_loras is None else max(4 * self.max_loras, 8)
        bound = f"max_loras ({self.max_loras})" if self.max_loras is not None else f"the number of slots ({self.num_slots})"
        check_int("max_cpu_loras", self.max_cpu_loras, self.num_slots,
                  f"{bound}, as every adapter in a slot keeps its CPU copy")
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

    @property
    def num_slots(self) -> int:
        """How many adapters can be resident at once (slot ids 0 .. num_slots - 1)."""
        return DEFAULT_SLOTS if self.max_loras is None else self.max_loras

    def targets(self, name: str, is_output_embedding: bool) -> bool:
        """Whether the linear module called `name` is patched."""
        target = self.target_modules
        if target == ALL_LINEAR:
            return not is_output_embedding
        if isinstance(target, str):
            return re.fullmatch(target, name) is not None
        return any(name == t or name.endswith("." + t) for t in target)
