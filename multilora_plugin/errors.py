"""The errors a user of multilora_plugin can see.

Every user-facing failure is a subclass of `MultiLoRAError`, and its message says what was expected
and what was found. A failure tied to one adapter or one request never changes any other adapter.
"""

from __future__ import annotations


class MultiLoRAError(Exception):
    """Base class of every error raised on purpose by multilora_plugin."""


class ConfigError(MultiLoRAError, ValueError):
    """A setting (of `wrap`, `MultiLoRAConfig`, ...) is out of range or of the wrong kind."""


class WrapError(MultiLoRAError, TypeError):
    """The model cannot be wrapped (or unwrapped) as asked: already wrapped, not wrapped, nothing to patch."""


class InvalidRequestError(MultiLoRAError, ValueError):
    """The inputs of one call are inconsistent, e.g. one adapter name per row was expected."""


class AdapterNotFoundError(MultiLoRAError, KeyError):
    """A request names an adapter that is not loaded."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class AdapterExistsError(MultiLoRAError, ValueError):
    """`load_adapter` was given a name that is already taken."""


class AdapterLoadError(MultiLoRAError, OSError):
    """An adapter directory could not be read: missing, unreadable, corrupt or non-finite files."""


class IncompatibleAdapterError(MultiLoRAError, ValueError):
    """A readable adapter that this model (as wrapped) cannot serve: unsupported PEFT feature,
    a module that is missing or not wrapped, shapes of another base model, rank above `max_lora_rank`."""


class CapacityError(MultiLoRAError, RuntimeError):
    """More distinct adapters (or more of their bytes) are needed at once than the slot tier holds."""


class AdapterTooLargeError(IncompatibleAdapterError):
    """One adapter alone needs more slot memory than the whole budget (`lora_memory`)."""


class KernelInputError(MultiLoRAError, ValueError):
    """A kernel op was called with tensors of the wrong shape, dtype or device."""


class OverloadedError(MultiLoRAError, RuntimeError):
    """The server already holds as many requests as it may queue; the caller should retry later."""


class UnavailableError(MultiLoRAError, RuntimeError):
    """The part that was serving a request stopped (a Ray Serve replica died); the caller may retry."""


class RequestRejected(MultiLoRAError, ValueError):
    """A plugin's `multilora_request_received` refused the request; raise it there with the reason."""


class PluginError(MultiLoRAError, RuntimeError):
    """A plugin could not be loaded, or raised an unexpected error in a hook that decides a request."""


class GenerationFailed(MultiLoRAError, RuntimeError):
    """The model failed while generating a request (HTTP 500)."""
