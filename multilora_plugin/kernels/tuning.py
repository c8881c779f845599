"""Launch configurations of the Triton kernels, kept apart from the kernels themselves.

Each function maps the sizes of one launch to block sizes, warps and stages. The defaults are sound
for Hopper-class GPUs and any size. Tuned values, measured by `benchmarks/gpu/tune.py` on one kind of
GPU, live in `kernels/tuned/<device name>.json` and are used on that device; a launch whose sizes
were not tuned takes the tuned entry of the nearest size with the same rank and features, and the
defaults when there is none. `MULTILORA_TUNED_CONFIGS=path.json` uses that file instead (to try
configs out before committing them). `tl.dot` needs every block dimension to be at least 16.
"""

from __future__ import annotations

import functools
import json
import math
import os
import pathlib
import re
from dataclasses import dataclass, fields
from typing import Dict, Optional

import triton

TUNED_DIR = pathlib.Path(__file__).resolve().parent / "tuned"
OPS = ("bgmv_shrink", "bgmv_expand", "sgmv_shrink", "sgmv_expand")


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int = 16  # tokens per program (SGMV)
    block_n: int = 64  # output features per program (expand)
    block_k: int = 64  # input features per loop step (shrink)
    block_r: int = 16  # rank per loop step (expand) or the whole padded rank (shrink)
    split_k: int = 1  # programs that share one token's reduction (BGMV shrink)
    num_warps: int = 4
    num_stages: int = 3  # software pipelining depth of the loops (triton's default on CUDA)


def _rank_block(max_rank: int) -> int:
    return max(16, triton.next_power_of_2(max_rank))


def _token_block(max_segment_len: int) -> int:
    return min(64, max(16, triton.next_power_of_2(max_segment_len)))


def default_config(op: str, size: int, max_rank: int, features: int) -> LaunchConfig:
    """The untuned config. `size`: tokens (BGMV) or the longest segment (SGMV); `features`: in (shrink) or out (expand)."""
    if op == "sgmv_shrink":
        return LaunchConfig(block_m=_token_block(size), block_k=64 if features >= 64 else 32,
                            block_r=_rank_block(max_rank))
    if op == "sgmv_expand":
        return LaunchConfig(block_m=_token_block(size), block_n=128 if features >= 2048 else 64, block_r=16)
    if op == "bgmv_shrink":
        block_k = 256 if features >= 256 else 64
        # few tokens cannot fill the GPU: let several programs share each token's reduction
        split_k = max(1, min(triton.cdiv(features, block_k), 256 // max(1, size)))
        return LaunchConfig(block_k=block_k, block_r=_rank_block(max_rank), split_k=split_k)
    if op == "bgmv_expand":
        return LaunchConfig(block_n=256 if features >= 4096 else 128, block_r=16)
    raise ValueError(f"unknown op {op!r}; expected one of {OPS}")


# tuned tables -------------------------------------------------------------------------------------
def device_slug(name: str) -> str:
    """A file name for a device name: 'NVIDIA H200' → 'nvidia-h200'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def key(size: int, max_rank: int, features: int) -> str:
    return f"{size}:{max_rank}:{features}"


def read_table(path: "str | os.PathLike") -> Dict[str, Dict[str, LaunchConfig]]:
    """{op: {key(size, rank, features): LaunchConfig}} from a tuned-configs file."""
    data = json.loads(pathlib.Path(path).read_text())
    names = {f.name for f in fields(LaunchConfig)}
    return {op: {k: LaunchConfig(**{n: int(v) for n, v in cfg.items() if n in names}) for k, cfg in entries.items()}
            for op, entries in data.get("configs", {}).items() if op in OPS}


_tables: Dict[str, Dict[str, Dict[str, LaunchConfig]]] = {}  # device name or file → its table


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    import torch

    return torch.cuda.get_device_name(index)


def _current_device_name() -> Optional[str]:
    import torch

    return _device_name(torch.cuda.current_device()) if torch.cuda.is_available() else None


def table_for(device_name: Optional[str]) -> Dict[str, Dict[str, LaunchConfig]]:
    """The tuned table used for launches on `device_name` (read once; empty when there is none)."""
    override = os.environ.get("MULTILORA_TUNED_CONFIGS")
    cache_key = f"file:{override}" if override else str(device_name)
    if cache_key not in _tables:
        path = pathlib.Path(override) if override else (
            TUNED_DIR / f"{device_slug(device_name)}.json" if device_name else None)
        _tables[cache_key] = read_table(path) if path is not None and path.is_file() else {}
    return _tables[cache_key]


def config(op: str, size: int, max_rank: int, features: int) -> LaunchConfig:
    """The config of one launch: tuned for this device (nearest tuned size), else the default."""
    return _config(op, size, max_rank, features, _current_device_name(), os.environ.get("MULTILORA_TUNED_CONFIGS"))


@functools.lru_cache(maxsize=4096)
def _config(op: str, size: int, max_rank: int, features: int, device_name: Optional[str],
            override: Optional[str]) -> LaunchConfig:
    entries = table_for(device_name).get(op)
    same = [(int(k.split(":")[0]), cfg) for k, cfg in (entries or {}).items()
            if k.split(":")[1:] == [str(max_rank), str(features)]]
    if same:
        return min(same, key=lambda e: abs(math.log2(max(e[0], 1)) - math.log2(max(size, 1))))[1]
    return default_config(op, size, max_rank, features)


def clear_cache() -> None:
    """Forget the tables read so far (after writing a tuned file, say)."""
    _tables.clear()
    _config.cache_clear()


def sgmv_shrink_config(max_segment_len: int, max_rank: int, in_features: int) -> LaunchConfig:
    return config("sgmv_shrink", max_segment_len, max_rank, in_features)


def sgmv_expand_config(max_segment_len: int, max_rank: int, out_features: int) -> LaunchConfig:
    return config("sgmv_expand", max_segment_len, max_rank, out_features)


def bgmv_shrink_config(num_tokens: int, max_rank: int, in_features: int) -> LaunchConfig:
    return config("bgmv_shrink", num_tokens, max_rank, in_features)


def bgmv_expand_config(num_tokens: int, max_rank: int, out_features: int) -> LaunchConfig:
    return config("bgmv_expand", num_tokens, max_rank, out_features)
