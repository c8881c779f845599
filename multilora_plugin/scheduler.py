"""Adapter-aware scheduling for continuous batching. Pure Python: no torch, no model.

Each `schedule()` call decides one engine step:

    1. KV budget: running requests each grow by one token this step; while that would pass
       `max_total_tokens`, the lowest-priority, most recent running request is preempted (recompute:
       it goes back to waiting, keeping the tokens it produced, and is prefilled again later).
    2. Admission: waiting requests, in the policy's order, join the batch while they fit:
       a seat (`max_num_seqs`), prefill tokens (`max_num_batched_tokens`), KV tokens, and a slot for
       their adapter (at most `max_loras` distinct adapters resident; base-model requests need none).
    3. Anti-starvation, for every policy: once the oldest waiting request (the head) has waited
       `max_wait_steps`, it is considered first. If it does not fit, what it needs is reserved: a
       seat, its prefill and KV tokens, and a slot: a free one, or else the active adapter whose
       running requests can be done soonest, which no newer request may join. Newer requests may
       still use everything else (base-model rows, the other adapters' seats), so the batch keeps
       working, but none can delay the head: it is admitted as soon as that adapter drains. When
       more adapters are wanted than there are slots, they take turns in arrival order.

Residency is the adapter cache's: the scheduler asks it through a read-only `Residency` view
(is this adapter in a slot; could these adapters all be in slots at once, beside what is held or
pinned) and never keeps a copy. Without a view (the
scheduler on its own), only the adapters of running requests count as resident. An adapter stays
resident after its requests drain, until another one needs its slot (the cache evicts the least
recently used). `adapters_to_prefetch` names the adapters of queued requests that are not resident
yet, so the cache can read them from disk ahead of time.

Policies (`SchedulerConfig.policy`):
    fcfs               arrival order; the head of the queue blocks when it does not fit
    adapter_affinity   requests whose adapter is resident (or the base model) first, then the others;
                       each in arrival order; requests that do not fit are skipped (the default)
    fair_share         adapters that received the least service (tokens) first, in the spirit of
                       S-LoRA's virtual token counter; an adapter returning from idle starts at the
                       lowest counter of the busy ones, so idle time earns no credit
    priority           `Request.priority` (lower is sooner), then arrival; skips what does not fit
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Callable, Collection, Dict, List, Optional, Protocol, Set, Tuple

from .config import check_int
from .errors import (
    AdapterNotFoundError,
    ConfigError,
    InvalidRequestError,
    MultiLoRAError,
)

POLICIES = ("fcfs", "adapter_affinity", "fair_share", "priority")


@dataclass
class SchedulerConfig:
    """Limits of one engine step.

    max_loras:              distinct adapters resident at once (slots); base-model requests need none
    max_num_seqs:           requests running at once
    max_num_batched_tokens: prompt tokens prefilled in one step (a longer request is prefilled alone, in chunks)
    max_total_tokens:       KV budget, in tokens held by running requests (prompt + generated)
    policy:                 one of POLICIES
    max_wait_steps:         steps a request may wait before no newer request may pass it
    max_prefetch:           adapters of queued requests handed over for prefetch per step
    """

    max_loras: int = 4
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 4096
    max_total_tokens: int = 65536
    policy: str = "adapter_affinity"
    max_wait_steps: int = 64
    max_prefetch: int = 4

    def __post_init__(self) -> None:
        for name in ("max_loras", "max_num_seqs", "max_num_batched_tokens", "max_total_tokens", "max_wait_steps"):
            check_int(name, getattr(self, name), 1)
        check_int("max_prefetch", self.max_prefetch, 0)
        if self.policy not in POLICIES:
            raise ConfigError(f"`policy` should be one of {POLICIES}, but got {self.policy!r}")


class Status(str, enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """What the scheduler knows of a request. Engines subclass it to carry their own state."""

    request_id: str
    adapter: Optional[str]  # None: the base model
    num_prompt_tokens: int
    max_new_tokens: int
    priority: int = 0  # lower is sooner (policy "priority" and preemption order)
    num_output_tokens: int = 0  # tokens generated so far; kept across preemption
    arrival: int = -1  # set by `Scheduler.add`: a global arrival counter
    arrival_step: int = -1  # the step count when it was added
    admitted_step: Optional[int] = None  # the step it first ran
    status: Status = Status.WAITING

    @property
    def num_tokens(self) -> int:
        """Tokens in its KV cache while running; tokens to prefill when (re)admitted."""
        return self.num_prompt_tokens + self.num_output_tokens


@dataclass
class SchedulerOutput:
    """One step's decisions (the design's I/O contract between scheduler, cache and engine)."""

    step: int
    prefill: List[Request] = field(default_factory=list)  # admitted this step: prefill `num_tokens` each
    decode: List[Request] = field(default_factory=list)  # running since an earlier step: one token each
    preempted: List[Request] = field(default_factory=list)  # moved back to waiting (recompute later)
    failed: List[Tuple[Request, MultiLoRAError]] = field(default_factory=list)  # removed, with the reason
    adapters_to_prefetch: List[str] = field(default_factory=list)  # queued, not resident yet

    @property
    def running(self) -> List[Request]:
        return self.prefill + self.decode

    @property
    def is_empty(self) -> bool:
        return not (self.prefill or self.decode)


@dataclass(frozen=True)
class SchedulerStats:
    steps: int
    waiting: int
    running: int
    active_adapters: Tuple[str, ...]  # adapters of running requests
    preemptions: int
    max_wait: int  # the longest any request waited before its first admission, in steps


class Residency(Protocol):
    """What the scheduler asks the adapter cache, which owns slot residency (`AdapterCache.residency`)."""

    def is_resident(self, name: str) -> bool:
        """Whether the adapter's current weights are in a slot."""

    def fits(self, names: Collection[str]) -> bool:
        """Whether all these adapters could be in slots at once now, beside every content that is
        held by a running batch or pinned (which keeps its slot)."""


class Scheduler:
    """See the module docstring. `adapter_exists(name)` (optional) says whether an adapter can be
    served; requests for others fail alone with `AdapterNotFoundError`. `residency` (optional): the
    adapter cache's view of its slots."""

    def __init__(self, config: Optional[SchedulerConfig] = None,
                 adapter_exists: Optional[Callable[[str], bool]] = None,
                 residency: Optional[Residency] = None) -> None:
        self.config = config or SchedulerConfig()
        self._adapter_exists = adapter_exists
        self._residency = residency
        self._waiting: Dict[str, Request] = {}  # request id → request, insertion order irrelevant
        self._running: Dict[str, Request] = {}  # request id → request, in admission order
        self._service: Dict[Optional[str], float] = {}  # fair_share: tokens served per adapter
        self._arrivals = itertools.count()
        self._step = 0
        self._preemptions = self._max_wait = 0

    # requests -------------------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        """Queue a request. Raises `InvalidRequestError` / `AdapterNotFoundError` for one that can never
        run (the scheduler is unchanged)."""
        if request.request_id in self._waiting or request.request_id in self._running:
            raise InvalidRequestError(f"a request with id {request.request_id!r} is already queued or running")
        c = self.config
        if request.num_prompt_tokens < 1:
            raise InvalidRequestError(f"request {request.request_id!r}: the prompt should have at least one "
                                      f"token, but has {request.num_prompt_tokens}")
        if request.max_new_tokens < 0:
            raise InvalidRequestError(f"request {request.request_id!r}: `max_new_tokens` should be >= 0, "
                                      f"but got {request.max_new_tokens}")
        if request.num_prompt_tokens + request.max_new_tokens > c.max_total_tokens:
            raise InvalidRequestError(
                f"request {request.request_id!r}: prompt ({request.num_prompt_tokens}) + max_new_tokens "
                f"({request.max_new_tokens}) should fit max_total_tokens={c.max_total_tokens}"
            )
        self._check_adapter(request)
        request.arrival, request.arrival_step = next(self._arrivals), self._step
        request.status = Status.WAITING
        self._waiting[request.request_id] = request
        if c.policy == "fair_share":
            self._lift(request)

    def abort(self, request_id: str) -> Optional[Request]:
        """Remove a waiting or running request; returns it, or None if it is not here."""
        request = self._waiting.pop(request_id, None) or self._running.pop(request_id, None)
        if request is not None:
            request.status = Status.FINISHED
        return request

    def finish(self, request_id: str) -> Request:
        """A running request is done (its slot reference and KV rows may be freed)."""
        request = self._running.pop(request_id, None)
        if request is None:
            raise InvalidRequestError(f"request {request_id!r} is not running")
        request.status = Status.FINISHED
        return request

    def record_tokens(self, request_id: str, num_tokens: int = 1) -> None:
        """The engine produced `num_tokens` output tokens for a running request."""
        request = self._running[request_id]
        request.num_output_tokens += num_tokens
        self._serve(request.adapter, num_tokens)

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running)

    @property
    def waiting(self) -> List[Request]:
        return sorted(self._waiting.values(), key=lambda r: r.arrival)

    @property
    def running(self) -> List[Request]:
        return list(self._running.values())

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            steps=self._step, waiting=len(self._waiting), running=len(self._running),
            active_adapters=tuple(self._active()), preemptions=self._preemptions, max_wait=self._max_wait,
        )

    # one step -------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(step=self._step)
        self._fail_unknown(out)
        self._preempt_for_decode(out)
        out.decode = list(self._running.values())
        self._admit(out)
        out.adapters_to_prefetch = self._prefetch_list(set(self._active()))
        self._step += 1
        return out

    def preempt(self, request_id: str) -> Request:
        """Move a running request back to waiting (recompute later; it keeps its output tokens and
        its place in arrival order). The scheduler does this itself under KV pressure; an engine does
        it when it cannot place a request it was given (its adapter's slot is pinned, say)."""
        request = self._running.pop(request_id, None)
        if request is None:
            raise InvalidRequestError(f"request {request_id!r} is not running")
        request.status = Status.WAITING
        self._waiting[request_id] = request
        self._preemptions += 1
        return request

    def defer(self, request_id: str) -> Request:
        """Undo this step's admission of a request that the host could not start after all (its own
        budgets ran out, or its adapter could not be placed): it waits again in its place, and no
        preemption is counted."""
        request = self._running.pop(request_id, None)
        if request is None:
            raise InvalidRequestError(f"request {request_id!r} is not running")
        request.status = Status.WAITING
        self._waiting[request_id] = request
        if request.admitted_step == self._step - 1:  # admitted by the last `schedule()`: it never ran
            request.admitted_step = None
        return request

    def _preempt_for_decode(self, out: SchedulerOutput) -> None:
        budget = self.config.max_total_tokens
        while self._running and sum(r.num_tokens + 1 for r in self._running.values()) > budget:
            victim = max(self._running.values(), key=lambda r: (r.priority, r.arrival))
            out.preempted.append(self.preempt(victim.request_id))

    def _admit(self, out: SchedulerOutput) -> None:
        c = self.config
        seats = c.max_num_seqs - len(self._running)
        prefill_budget = c.max_num_batched_tokens
        kv_free = c.max_total_tokens - sum(r.num_tokens + 1 for r in self._running.values())
        active = set(self._active())  # adapters of running requests, and of those admitted now
        order, block = self._policy_order(active), c.policy == "fcfs"
        head = min(self._waiting.values(), key=lambda r: r.arrival, default=None)
        if head is not None and self._step - head.arrival_step < c.max_wait_steps:
            head = None  # nobody is overdue
        elif head is not None:
            order.remove(head)
            order.insert(0, head)
        closed: Optional[str] = None  # an active adapter the overdue head waits on: nobody new joins it
        kept: Set[str] = set()  # the overdue head's adapter, when a slot is kept for it
        for request in order:
            if seats == 0:
                break
            need = request.num_tokens
            too_long = need > prefill_budget and prefill_budget < c.max_num_batched_tokens
            # KV: its tokens and the one it samples now, plus room for every running request's next
            # token, so that admitting it does not force a preemption at the next step
            headroom = len(self._running) if self._running else 0
            fits = (not too_long and need + 1 + headroom <= kv_free
                    and (closed is None or request.adapter != closed)
                    and self._has_slot(request.adapter, active | kept))
            if not fits:
                if block:
                    break
                if request is head:
                    # reserve what the overdue head needs, so that no newer request takes it: a seat,
                    # its tokens, and a slot (a free one, or the first active adapter to drain)
                    seats -= 1
                    prefill_budget -= need
                    kv_free -= need + 1
                    if head.adapter is not None and head.adapter not in active:
                        if self._has_slot(head.adapter, active):
                            kept = {head.adapter}
                        else:
                            closed = self._first_to_drain(active)
                continue
            del self._waiting[request.request_id]
            self._running[request.request_id] = request
            request.status = Status.RUNNING
            if request.admitted_step is None:
                request.admitted_step = self._step
                self._max_wait = max(self._max_wait, self._step - request.arrival_step)
            out.prefill.append(request)
            seats -= 1
            prefill_budget -= need
            kv_free -= need + 1
            if request.adapter is not None:
                active.add(request.adapter)

    def _policy_order(self, active: Set[str]) -> List[Request]:
        waiting = list(self._waiting.values())
        policy = self.config.policy
        if policy == "fcfs":
            return sorted(waiting, key=lambda r: r.arrival)
        if policy == "adapter_affinity":
            return sorted(waiting, key=lambda r: (not self._resident(r.adapter, active), r.arrival))
        if policy == "fair_share":
            return sorted(waiting, key=lambda r: (self._service.get(r.adapter, 0.0), r.arrival))
        return sorted(waiting, key=lambda r: (r.priority, r.arrival))

    # adapters -------------------------------------------------------------------------------------
    def _active(self) -> List[str]:
        return list(dict.fromkeys(r.adapter for r in self._running.values() if r.adapter is not None))

    def _resident(self, adapter: Optional[str], active: Set[str]) -> bool:
        """Whether `adapter` is in a slot (the base model always is; so are running requests' adapters)."""
        if adapter is None or adapter in active:
            return True
        return self._residency is not None and self._residency.is_resident(adapter)

    def _has_slot(self, adapter: Optional[str], want: Set[str]) -> bool:
        """Whether `adapter` can be in a slot beside the adapters in `want` (those of running and
        just admitted requests, and one kept for an overdue request); held and pinned adapters keep
        theirs."""
        if adapter is None or adapter in want:
            return True
        if self._residency is None:
            return len(want) + 1 <= self.config.max_loras
        return self._residency.fits(want | {adapter})

    def _first_to_drain(self, active: set) -> Optional[str]:
        """The active adapter whose running requests can all be done soonest (by their token limits)."""
        left: Dict[str, int] = {}
        for r in self._running.values():
            if r.adapter in active:
                left[r.adapter] = max(left.get(r.adapter, 0), r.max_new_tokens - r.num_output_tokens)
        return min(left, key=left.get) if left else None

    def _prefetch_list(self, active: Set[str]) -> List[str]:
        names: List[str] = []
        for request in self._policy_order(active):
            if len(names) >= self.config.max_prefetch:
                break
            if not self._resident(request.adapter, active) and request.adapter not in names:
                names.append(request.adapter)
        return names

    def _check_adapter(self, request: Request) -> None:
        if request.adapter is not None and self._adapter_exists is not None and not self._adapter_exists(request.adapter):
            raise AdapterNotFoundError(
                f"request {request.request_id!r} names adapter {request.adapter!r}, which is not registered "
                "and could not be resolved"
            )

    def _fail_unknown(self, out: SchedulerOutput) -> None:
        """Waiting requests whose adapter was unloaded since they were queued fail alone."""
        for request in list(self._waiting.values()):
            try:
                self._check_adapter(request)
            except AdapterNotFoundError as exc:
                del self._waiting[request.request_id]
                request.status = Status.FINISHED
                out.failed.append((request, exc))

    # fair share -----------------------------------------------------------------------------------
    def _serve(self, adapter: Optional[str], tokens: int) -> None:
        if self.config.policy == "fair_share":
            self._service[adapter] = self._service.get(adapter, 0.0) + tokens

    def _lift(self, request: Request) -> None:
        """A request for an adapter with nothing else queued or running: the adapter's counter is
        raised to the lowest counter of the backlogged adapters, so idle time earns no credit."""
        others = [r for r in itertools.chain(self._waiting.values(), self._running.values()) if r is not request]
        if any(r.adapter == request.adapter for r in others):
            return
        counters = [self._service.get(r.adapter, 0.0) for r in others]
        if counters:
            self._service[request.adapter] = max(self._service.get(request.adapter, 0.0), min(counters))
