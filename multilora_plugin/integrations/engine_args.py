"""`EngineArgs`: everything needed to build one serving engine, as plain data.

    args = EngineArgs(model="path/to/model", adapters={"sql": "path/to/sql"}, max_loras=4)
    engine = args.build()               # load the model and tokenizer, wrap, register the adapters

The single-process server builds one engine from it; each Ray Serve replica builds its own from the
same (picklable) arguments. `add_cli_args` / `from_cli_args` are the `multilora serve` options.
Without `model`, the engine serves the demo's tiny Llama (the same weights in every process).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Dict, Optional, Union

from ..config import check_int, parse_bytes
from ..errors import ConfigError

DTYPES = ("auto", "float32", "float16", "bfloat16")
QUANTIZATIONS = ("bitsandbytes-4bit", "bitsandbytes-8bit")  # nf4 (QLoRA's) and LLM.int8(), loaded by transformers
DEMO_MODEL_NAME = "tiny-llama"


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_model_path(what: str, value: str) -> None:
    """Raise `ConfigError` naming `value` when it is meant as a local directory (absolute, relative
    with "./" or "~", or with more than one "/") and is not one; "org/name" is left to the hub."""
    local = os.path.isabs(value) or value.startswith((".", "~")) or value.count("/") > 1
    path = os.path.expanduser(value)
    if local and not os.path.isdir(path):
        found = "is a file" if os.path.exists(path) else "does not exist"
        raise ConfigError(f"`{what}` should be a model directory or a hub id, but the path {value!r} {found}")


@dataclass
class EngineArgs:
    model: Optional[str] = None  # a transformers model directory or hub id; None: the demo's tiny Llama
    tokenizer: Optional[str] = None  # default: the model's
    adapters: Dict[str, str] = field(default_factory=dict)  # name → PEFT adapter directory
    adapter_dir: Optional[str] = None  # every adapter under it, by subdirectory name (found on first use)
    lora_memory: Optional[Union[int, str]] = None  # bytes of slot memory ("2GiB"); None: from the device
    max_loras: Optional[int] = None  # at most this many adapters in slots; None: as many as fit
    max_lora_rank: Optional[int] = None  # adapters of a higher rank are refused; None: any rank
    max_cpu_loras: Optional[int] = None
    max_num_seqs: int = 64
    max_model_len: Optional[int] = None
    dtype: str = "auto"
    device: Optional[str] = None  # default: cuda when available
    served_model_name: Optional[str] = None
    cpu_threads: Optional[int] = None  # torch's threads for a model on CPU; None: as torch has it
    quantization: Optional[str] = None  # one of QUANTIZATIONS: the base is quantized as it loads

    def __post_init__(self) -> None:
        for name, minimum in (("max_loras", 1), ("max_lora_rank", 1), ("max_num_seqs", 1), ("max_cpu_loras", 1),
                              ("max_model_len", 2), ("cpu_threads", 1)):
            value = getattr(self, name)
            if value is not None or name == "max_num_seqs":
                check_int(name, value, minimum)
        if self.lora_memory is not None:
            self.lora_memory = parse_bytes(self.lora_memory)
        if self.dtype not in DTYPES:
            raise ConfigError(f"`dtype` should be one of {DTYPES}, but got {self.dtype!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"`quantization` should be one of {QUANTIZATIONS}, but got {self.quantization!r}")
        if self.quantization is not None and self.model is None:
            raise ConfigError("`quantization` needs a `model` to load; the demo's tiny model is not quantized")
        if not isinstance(self.adapters, dict) or not all(isinstance(k, str) and k for k in self.adapters):
            raise ConfigError(f"`adapters` should map adapter names to directories, but got {self.adapters!r}")
        self.adapters = {name: os.fspath(path) for name, path in self.adapters.items()}
        for what, value in (("model", self.model), ("tokenizer", self.tokenizer)):
            if value is not None:
                check_model_path(what, value)

    @property
    def model_name(self) -> str:
        """The base model's name in the OpenAI API."""
        return self.served_model_name or self.model or DEMO_MODEL_NAME

    def build(self):
        """Load the model and tokenizer, wrap the model, register `adapters`; returns an `Engine`."""
        from ..engine import Engine

        model, tokenizer = self.build_model()
        engine_args = {"max_num_seqs": self.max_num_seqs}
        if self.max_model_len:
            engine_args["max_model_len"] = self.max_model_len
        return Engine(model, tokenizer, adapter_dir=self.adapter_dir, **engine_args)

    def build_model(self) -> tuple:
        """(the wrapped model with `adapters` registered, the tokenizer), for a host with an engine
        of its own (transformers' continuous batching)."""
        import torch

        from .. import toy
        from ..wrapping import wrap

        device = torch.device("cpu" if self.model is None else self.device or _default_device())
        if device.type == "cpu" and self.cpu_threads is not None:
            torch.set_num_threads(self.cpu_threads)
        if self.model is None:
            hf_model = toy.demo_model()
        else:
            from transformers import AutoModelForCausalLM

            dtype = self.dtype if self.dtype == "auto" else getattr(torch, self.dtype)
            if self.quantization is None:
                hf_model = AutoModelForCausalLM.from_pretrained(self.model, dtype=dtype).to(device).eval()
            else:  # quantized layers are placed as they load; they cannot be moved afterwards
                hf_model = AutoModelForCausalLM.from_pretrained(
                    self.model, dtype=dtype, quantization_config=self._quantization_config(dtype),
                    device_map=str(device)).eval()
        tokenizer = self.load_tokenizer()
        model = wrap(hf_model, lora_memory=self.lora_memory, max_loras=self.max_loras,
                     max_lora_rank=self.max_lora_rank, max_cpu_loras=self.max_cpu_loras)
        for name, path in self.adapters.items():
            model.register_adapter(name, path)
        return model, tokenizer

    def _quantization_config(self, dtype):
        from transformers import BitsAndBytesConfig

        if self.quantization == "bitsandbytes-8bit":
            return BitsAndBytesConfig(load_in_8bit=True)
        import torch

        compute = torch.float32 if dtype == "auto" else dtype
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)

    def load_tokenizer(self):
        if self.model is None:
            from .. import toy

            return toy.demo_tokenizer()
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.tokenizer or self.model)

    # the command line --------------------------------------------------------------------------------
    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--model", help="a transformers model directory or hub id (default: the demo's tiny model)")
        parser.add_argument("--tokenizer", help="tokenizer directory (default: the model's)")
        parser.add_argument("--adapter", action="append", default=[], type=_adapter_arg, metavar="NAME=PATH",
                            help="a PEFT LoRA adapter directory to serve as NAME (repeatable)")
        parser.add_argument("--adapter-dir", help="serve every PEFT adapter under this directory, by subdirectory name")
        parser.add_argument("--lora-memory", default=None,
                            help="slot memory for the adapters in slots, e.g. 2GiB; each takes its own size "
                                 "(default: a tenth of the GPU's free memory, 1 GiB on a CPU)")
        parser.add_argument("--max-loras", type=int, default=None,
                            help="at most this many adapters in slots (default: as many as fit in --lora-memory)")
        parser.add_argument("--max-lora-rank", type=int, default=None,
                            help="refuse adapters of a higher rank (default: any rank)")
        parser.add_argument("--max-cpu-loras", type=int, default=None, help="adapters kept in CPU memory")
        parser.add_argument("--max-num-seqs", type=int, default=64, help="requests running at once")
        parser.add_argument("--max-model-len", type=int, default=None, help="prompt + output tokens per request")
        parser.add_argument("--served-model-name", help="the base model's name in the OpenAI API")
        parser.add_argument("--dtype", default="auto", choices=DTYPES, help="the model's dtype (auto: as saved)")
        parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
        parser.add_argument("--quantization", default=None, choices=QUANTIZATIONS,
                            help="load the base quantized by bitsandbytes: 4-bit nf4 (QLoRA) or 8-bit "
                                 "(default: as saved)")
        parser.add_argument("--cpu-threads", type=int, default=None,
                            help="torch threads for a model on CPU (default: torch's, every core; on Ray replicas, "
                                 "their CPUs)")

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "EngineArgs":
        return cls(model=args.model, tokenizer=args.tokenizer, adapters=dict(args.adapter),
                   adapter_dir=args.adapter_dir, lora_memory=args.lora_memory, max_loras=args.max_loras,
                   max_lora_rank=args.max_lora_rank,
                   max_cpu_loras=args.max_cpu_loras, max_num_seqs=args.max_num_seqs,
                   max_model_len=args.max_model_len, dtype=args.dtype, device=args.device,
                   served_model_name=args.served_model_name, cpu_threads=args.cpu_threads,
                   quantization=args.quantization)



def parse_adapter(value: str) -> tuple:
    """"NAME=PATH" → (name, path); ValueError otherwise."""
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"expected NAME=PATH, but got {value!r}")
    return name, path


def _adapter_arg(value: str) -> tuple:
    try:
        return parse_adapter(value)
    except ValueError as exc:  # argparse shows an ArgumentTypeError's own message
        raise argparse.ArgumentTypeError(str(exc)) from None
