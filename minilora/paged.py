"""Paged AdamW: optimizer state that lives in host memory and visits the GPU one chunk at a time.

Adam keeps two fp32 moments per parameter, 8 bytes, twice what a bf16 weight and its bf16 gradient take
together. For an 8B-parameter model that is 64 GB of state on top of 32 GB of weights and gradients.
bitsandbytes' paged optimizers put the state in CUDA unified memory and let the driver migrate pages to the
host when the GPU fills up. `PagedAdamW` does the same job explicitly, in plain PyTorch, so that every byte
that moves is visible:

* the moments `exp_avg` (m) and `exp_avg_sq` (v) live in page-locked ("pinned") host memory, in fp32;
* `step()` cuts the parameters into chunks of at most `chunk_elements` elements and streams them through
  three GPU slots: while chunk i is updated on the compute stream, chunk i+1 is copied host→device on one
  side stream and chunk i−1 device→host on another (PCIe is full duplex: both directions move at once);
* CUDA events order the three streams: an update waits for its chunk's load, a write-back waits for its
  update, and a load into a slot waits until the chunk that used the slot before has been written back.

The update is `torch.optim.AdamW`'s, operation for operation (decoupled weight decay λ, bias correction):

    θ ← θ·(1 − lr·λ);   m ← β1·m + (1 − β1)·g;   v ← β2·v + (1 − β2)·g²
    θ ← θ − lr/(1 − β1ᵗ) · m / (√v / √(1 − β2ᵗ) + ε)

The price is bandwidth: every step moves 8 bytes per parameter to the GPU and 8 back. Parameters on the CPU
(or no GPU at all) need no paging: then the same update runs in place on the CPU, as plain AdamW.

How bitsandbytes differs: its state is allocated with `cudaMallocManaged` and moves only when the GPU runs
short (page by page, on demand, with a prefetch hint before each parameter's update), so it costs nothing
while everything fits; tensors under 1e5 elements are never paged. Here every moment crosses PCIe on every
step, which makes the cost predictable and easy to measure, and the GPU never holds more than the budget.
"""

from __future__ import annotations

import copy
import numbers
import warnings
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from itertools import chain
from typing import Any, Callable, ContextManager, Iterable, NamedTuple

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["PagedAdamW", "PagedMemoryReport", "Piece", "plan_chunks", "adamw_update_", "BYTES_PER_ELEMENT",
           "DEFAULT_GPU_BUDGET"]

_SLOTS = 3  # one chunk loading, one updating, one writing back
_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")  # torch.optim.AdamW's names, so checkpoints move between the two
_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# GPU bytes that one element of a chunk may occupy during a step: three staging slots of (m, v) in fp32
# (24 bytes) plus fp32 scratch for the update: √v (4), and fp32 copies of a 16-bit weight and gradient (8).
BYTES_PER_ELEMENT = _SLOTS * 2 * 4 + 3 * 4
DEFAULT_GPU_BUDGET = 256 * 2**20


# ---------------------------------------------------------------------------------------------------------
# The update


def adamw_update_(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, step: float, lr: float,
                  beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One AdamW step in place, in fp32. param, grad: (...) any float dtype; exp_avg, exp_avg_sq: (...) fp32.

    θ ← θ(1 − lr·λ);  m ← lerp(m, g, 1 − β1);  v ← β2·v + (1 − β2)g²;  θ ← θ − lr/(1 − β1ᵗ) · m/(√v/√(1 − β2ᵗ) + ε).
    The same operations in the same order as torch.optim.AdamW, so fp32 results agree bit for bit. A 16-bit
    weight is updated through an fp32 copy and rounded once at the end (torch would round after each op).
    """
    w = param if param.dtype == torch.float32 else param.float()
    g = grad.float()  # the same tensor when grad is already fp32: no copy
    if weight_decay != 0:
        w.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    step_size = lr / (1 - beta1**step)
    denom = exp_avg_sq.sqrt().div_((1 - beta2**step) ** 0.5).add_(eps)
    w.addcdiv_(exp_avg, denom, value=-step_size)
    if w is not param:
        param.copy_(w)


# ---------------------------------------------------------------------------------------------------------
# Chunking


class Piece(NamedTuple):
    """Elements [start, stop) of parameter `index` (flattened), staged from `offset` on in a chunk's slot."""

    index: int
    start: int
    stop: int
    offset: int

    @property
    def length(self) -> int:
        return self.stop - self.start


def plan_chunks(numels: list[int], chunk_elements: int) -> list[list[Piece]]:
    """Cut parameters of sizes `numels` into chunks of at most `chunk_elements` elements, in order.

    Parameters are packed back to back and one that does not fit in what is left of a chunk is split, so
    every chunk but the last is full: there are exactly ⌈Σ numels / chunk_elements⌉ chunks.
    """
    if chunk_elements < 1:
        raise ValueError(f"chunk_elements must be >= 1, got {chunk_elements}")
    chunks: list[list[Piece]] = []
    current: list[Piece] = []
    used = 0
    for index, numel in enumerate(numels):
        start = 0
        while start < numel:
            take = min(numel - start, chunk_elements - used)
            current.append(Piece(index, start, start + take, used))
            start += take
            used += take
            if used == chunk_elements:
                chunks.append(current)
                current, used = [], 0
    if current:
        chunks.append(current)
    return chunks


# Stream helpers that do nothing when there is no stream: the same pipeline then runs synchronously on the
# CPU, which is how the chunk bookkeeping is tested on machines without a GPU.
def _on(stream: torch.cuda.Stream | None) -> ContextManager:
    return torch.cuda.stream(stream) if stream is not None else nullcontext()


def _record(stream: torch.cuda.Stream | None) -> torch.cuda.Event | None:
    return stream.record_event() if stream is not None else None


def _wait(stream: torch.cuda.Stream | None, event: torch.cuda.Event | None) -> None:
    if stream is not None and event is not None:
        stream.wait_event(event)


def _wait_stream(stream: torch.cuda.Stream | None, other: torch.cuda.Stream | None) -> None:
    if stream is not None and other is not None:
        stream.wait_stream(other)


# ---------------------------------------------------------------------------------------------------------
# The optimizer


@dataclass
class PagedMemoryReport:
    """Where the optimizer's bytes are. Host bytes count m and v (fp32) of every parameter that has state."""

    host_state_bytes: int
    host_pinned_bytes: int
    gpu_budget_bytes: int
    gpu_peak_bytes: int  # most bytes the optimizer itself held on a GPU in one step: slots + fp32 scratch
    chunk_elements: int
    last_step_chunks: int
    last_step_bytes_to_gpu: int
    last_step_bytes_to_host: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def __str__(self) -> str:
        return (f"state on host: {_human(self.host_state_bytes)} ({_human(self.host_pinned_bytes)} pinned) | "
                f"GPU window: peak {_human(self.gpu_peak_bytes)} of {_human(self.gpu_budget_bytes)} | last step: "
                f"{self.last_step_chunks} chunks, {_human(self.last_step_bytes_to_gpu)} in, "
                f"{_human(self.last_step_bytes_to_host)} out")


def _human(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n} B"


class _Work(NamedTuple):
    param: Tensor
    grad: Tensor
    state: dict
    group: dict


def _hyper(group: dict) -> dict[str, float]:
    beta1, beta2 = group["betas"]
    return dict(lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
                weight_decay=float(group["weight_decay"]))


def _check_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")
    return float(value)


def _check_hyperparameters(group: dict) -> None:
    """Raise on settings AdamW cannot use or PagedAdamW does not implement; `group` has every key."""
    lr = _check_number("lr", group["lr"])
    if not lr >= 0:  # also catches NaN
        raise ValueError(f"lr must be >= 0, got {lr}")
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        beta = _check_number(f"betas[{i}]", beta)
        if not 0 <= beta < 1:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {beta}")
    eps = _check_number("eps", group["eps"])
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    weight_decay = _check_number("weight_decay", group["weight_decay"])
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if group.get("amsgrad", False):
        raise ValueError("amsgrad=True is not supported by PagedAdamW (it needs a third state tensor); "
                         "use torch.optim.AdamW")
    if group.get("maximize", False):
        raise ValueError("maximize=True is not supported by PagedAdamW; negate the loss instead")


class PagedAdamW(Optimizer):
    """AdamW whose fp32 moments live in pinned host memory and are streamed through a fixed GPU window.

    Same update as `torch.optim.AdamW` (see `adamw_update_`); amsgrad and maximize are not supported.
    `gpu_budget_bytes` caps what the optimizer allocates on the GPU during a step: the three staging slots
    and the fp32 scratch, `BYTES_PER_ELEMENT` (36) bytes per element of a chunk, so a chunk holds
    `gpu_budget_bytes // 36` elements. The state dict has torch.optim.AdamW's layout (`step`, `exp_avg`,
    `exp_avg_sq` per parameter, moments shaped like the parameter) and loads into it, and back.
    Parameters must live on the CPU or a CUDA GPU; `step` refuses any other device before it changes anything.
    """

    # Tests set this to run the chunk pipeline for CPU parameters too (no streams, synchronous copies), so
    # the chunk bookkeeping is checked on machines without a GPU.
    _chunk_cpu_params: bool = False

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 amsgrad: bool = False, *, maximize: bool = False,
                 gpu_budget_bytes: int = DEFAULT_GPU_BUDGET) -> None:
        if isinstance(gpu_budget_bytes, bool) or not isinstance(gpu_budget_bytes, numbers.Integral):
            raise TypeError(f"gpu_budget_bytes must be an int, got {type(gpu_budget_bytes).__name__}")
        if gpu_budget_bytes < BYTES_PER_ELEMENT:
            raise ValueError(f"gpu_budget_bytes must be at least {BYTES_PER_ELEMENT} (the GPU bytes of one "
                             f"element in flight), got {gpu_budget_bytes}")
        self._reset_runtime(int(gpu_budget_bytes))
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize)
        _check_hyperparameters(defaults)
        super().__init__(params, defaults)

    def _reset_runtime(self, gpu_budget_bytes: int) -> None:
        """Everything that is not optimizer state: the budget, counters, and the per-device copy streams."""
        self.gpu_budget_bytes = gpu_budget_bytes
        self.chunk_elements = gpu_budget_bytes // BYTES_PER_ELEMENT
        self.gpu_peak_bytes = 0
        self.last_step = {"chunks": 0, "bytes_to_gpu": 0, "bytes_to_host": 0}
        self._streams: dict[torch.device, tuple[torch.cuda.Stream, torch.cuda.Stream]] = {}
        self._can_pin = True
        self._warned_cpu = False

    # Optimizer pickles (and deep-copies) only defaults, state and param_groups; keep the budget too and
    # rebuild the rest, since CUDA streams cannot be copied.
    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "gpu_budget_bytes": self.gpu_budget_bytes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        budget = state.pop("gpu_budget_bytes", DEFAULT_GPU_BUDGET)
        super().__setstate__(state)
        self._reset_runtime(budget)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Check a group's settings and parameters before adding it, so a bad group leaves nothing behind."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        _check_hyperparameters({**self.defaults, **param_group})
        for p in params:
            tensor = p[1] if isinstance(p, tuple) else p  # named parameters come as (name, tensor)
            if isinstance(tensor, Tensor) and tensor.dtype not in _PARAM_DTYPES:
                raise TypeError(f"PagedAdamW updates float32, bfloat16 and float16 parameters, got {tensor.dtype}")
        super().add_param_group({**param_group, "params": params})

    # --- state -------------------------------------------------------------------------------------------

    def _host_tensor(self, shape: torch.Size, pin: bool) -> Tensor:
        """fp32 zeros in host memory, page-locked when `pin` (a GPU will read them) and the system allows it.

        Only page-locked memory can be copied asynchronously; copies from pageable memory are staged and
        block the host. torch's pinned allocator rounds each request up to a power of two, so pinned state
        takes up to 2x its size (about 1.1x for Llama shapes, whose big matrices are near powers of two).
        """
        if pin and self._can_pin:
            try:
                return torch.zeros(shape, dtype=torch.float32, pin_memory=True)
            except RuntimeError as err:
                self._can_pin = False
                first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                warnings.warn(f"PagedAdamW could not pin host memory ({first_line}); the rest of its state "
                              "uses pageable memory, whose copies are slower and block the host", stacklevel=7)
        return torch.zeros(shape, dtype=torch.float32)

    def _new_state(self, p: Tensor) -> dict[str, Tensor]:
        # One state tensor per parameter, shaped like it (not one per chunk): the state dict then has
        # torch.optim.AdamW's layout, and chunks are mere views, so a different budget re-cuts the same state.
        pin = p.device.type == "cuda"
        return {"step": torch.tensor(0.0, dtype=torch.float32),
                "exp_avg": self._host_tensor(p.shape, pin), "exp_avg_sq": self._host_tensor(p.shape, pin)}

    # --- step --------------------------------------------------------------------------------------------

    def _collect(self) -> dict[torch.device, list[_Work]]:
        """Parameters with a gradient, by device; checks everything before any state changes."""
        found: list[tuple[Tensor, Tensor, dict]] = []
        for group in self.param_groups:
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if p.device.type not in ("cpu", "cuda"):
                    raise ValueError(f"PagedAdamW keeps its state in host memory and updates parameters on the CPU "
                                     f"or a CUDA GPU; got a parameter on {p.device}. Nothing was updated. Use "
                                     "torch.optim.AdamW for parameters on other devices.")
                if grad.layout != torch.strided:
                    raise TypeError(f"PagedAdamW does not support sparse gradients (got layout {grad.layout}); "
                                    "use torch.optim.SparseAdam for sparse embeddings")
                if p.device.type == "cuda" and not p.is_contiguous():
                    raise ValueError("PagedAdamW pages contiguous parameters only (it updates flat slices); "
                                     f"got a non-contiguous one of shape {tuple(p.shape)}")
                found.append((p, grad if grad.is_contiguous() else grad.contiguous(), group))
        work: dict[torch.device, list[_Work]] = defaultdict(list)
        for p, grad, group in found:
            if not self.state[p]:
                self.state[p].update(self._new_state(p))
            work[p.device].append(_Work(p, grad, self.state[p], group))
        return work

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One AdamW step for every parameter that has a gradient; `closure` re-evaluates the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for device, items in self._collect().items():
            if device.type == "cuda" or self._chunk_cpu_params:
                self._step_chunked(device, items)
            else:
                self._step_in_place(items)
        return loss

    def _step_in_place(self, items: list[_Work]) -> None:
        """Plain AdamW on the CPU: nothing to page, the state is already in host memory."""
        if not self._warned_cpu:
            self._warned_cpu = True
            why = "no CUDA" if not torch.cuda.is_available() else "parameters on the CPU"
            warnings.warn(f"{why}: PagedAdamW runs as plain AdamW on the CPU", stacklevel=5)
        for w in items:
            w.state["step"] += 1
            adamw_update_(w.param, w.grad, w.state["exp_avg"], w.state["exp_avg_sq"],
                          step=float(w.state["step"]), **_hyper(w.group))

    def _copy_streams(self, device: torch.device) -> tuple[torch.cuda.Stream, torch.cuda.Stream]:
        if device not in self._streams:
            self._streams[device] = (torch.cuda.Stream(device=device), torch.cuda.Stream(device=device))
        return self._streams[device]

    def _step_chunked(self, device: torch.device, items: list[_Work]) -> None:
        """Stream the moments of `items` through `_SLOTS` GPU slots, chunk by chunk (see the module docstring)."""
        chunks = plan_chunks([w.param.numel() for w in items], self.chunk_elements)
        on_gpu = device.type == "cuda"
        compute = torch.cuda.current_stream(device) if on_gpu else None
        to_gpu, to_host = self._copy_streams(device) if on_gpu else (None, None)
        n_slots = min(_SLOTS, len(chunks))
        slot_elements = max((sum(pc.length for pc in chunk) for chunk in chunks), default=0)
        with torch.cuda.device(device) if on_gpu else nullcontext():
            # slots[k, 0] stages m and slots[k, 1] stages v for the chunk in slot k.
            slots = torch.empty(n_slots, 2, slot_elements, dtype=torch.float32, device=device)
            for w in items:
                w.state["step"] += 1
            # The copy streams must not touch `slots` before the compute stream is done with whatever the
            # allocator handed out that memory for last (it reuses memory in compute-stream order).
            _wait_stream(to_gpu, compute)
            _wait_stream(to_host, compute)
            loaded: list[torch.cuda.Event | None] = [None] * len(chunks)
            stored: list[torch.cuda.Event | None] = [None] * len(chunks)
            if chunks:
                loaded[0] = self._load(items, chunks[0], slots[0], to_gpu)
            for i, chunk in enumerate(chunks):
                nxt = i + 1
                if nxt < len(chunks):  # prefetch the next chunk while this one is updated
                    if nxt >= n_slots:  # its slot is free once the chunk that used it is back on the host
                        _wait(to_gpu, stored[nxt - n_slots])
                    loaded[nxt] = self._load(items, chunks[nxt], slots[nxt % n_slots], to_gpu)
                _wait(compute, loaded[i])
                self._update(items, chunk, slots[i % n_slots])
                stored[i] = self._store(items, chunk, slots[i % n_slots], to_host, after=_record(compute))
            # Free the slots (compute-stream memory) only after the last write-back, and return only once the
            # moments are home: the caller may read them (state_dict) and the next step will load them.
            _wait_stream(compute, to_host)
            if to_host is not None:
                to_host.synchronize()
        self._account(items, chunks, slots)

    def _load(self, items: list[_Work], chunk: list[Piece], slot: Tensor,
              stream: torch.cuda.Stream | None) -> torch.cuda.Event | None:
        """Copy the chunk's m and v host→device into `slot` on `stream`; the event marks them arrived."""
        with _on(stream):
            for pc in chunk:
                state = items[pc.index].state
                dst = slot[:, pc.offset:pc.offset + pc.length]
                dst[0].copy_(state["exp_avg"].view(-1)[pc.start:pc.stop], non_blocking=True)
                dst[1].copy_(state["exp_avg_sq"].view(-1)[pc.start:pc.stop], non_blocking=True)
            return _record(stream)

    def _store(self, items: list[_Work], chunk: list[Piece], slot: Tensor, stream: torch.cuda.Stream | None,
               after: torch.cuda.Event | None) -> torch.cuda.Event | None:
        """Copy the chunk's m and v device→host on `stream` once `after` (its update) has happened."""
        _wait(stream, after)
        with _on(stream):
            for pc in chunk:
                state = items[pc.index].state
                src = slot[:, pc.offset:pc.offset + pc.length]
                state["exp_avg"].view(-1)[pc.start:pc.stop].copy_(src[0], non_blocking=True)
                state["exp_avg_sq"].view(-1)[pc.start:pc.stop].copy_(src[1], non_blocking=True)
            return _record(stream)

    @staticmethod
    def _update(items: list[_Work], chunk: list[Piece], slot: Tensor) -> None:
        """AdamW on each piece of the chunk: flat slices of weight and gradient, staged slices of m and v."""
        for pc in chunk:
            w = items[pc.index]
            staged = slot[:, pc.offset:pc.offset + pc.length]
            adamw_update_(w.param.view(-1)[pc.start:pc.stop], w.grad.view(-1)[pc.start:pc.stop],
                          staged[0], staged[1], step=float(w.state["step"]), **_hyper(w.group))

    def _account(self, items: list[_Work], chunks: list[list[Piece]], slots: Tensor) -> None:
        """Record what the step moved and the most GPU memory it held (slots + the largest piece's scratch)."""
        moved = 8 * sum(w.param.numel() for w in items)  # m and v, fp32, each way
        scratch = max((pc.length * (4 if items[pc.index].param.dtype == torch.float32 else 12)
                       for chunk in chunks for pc in chunk), default=0)
        self.last_step = {"chunks": len(chunks), "bytes_to_gpu": moved, "bytes_to_host": moved}
        if slots.device.type == "cuda":
            self.gpu_peak_bytes = max(self.gpu_peak_bytes, slots.numel() * 4 + scratch)

    # --- reporting -----------------------------------------------------------------------------------------

    def memory_report(self) -> PagedMemoryReport:
        """Bytes of state on the host (and how much is pinned), and the GPU window's peak, for teaching."""
        moments = [s[k] for s in self.state.values() for k in ("exp_avg", "exp_avg_sq") if k in s]
        host = sum(t.nbytes for t in moments if t.device.type == "cpu")
        pinned = sum(t.nbytes for t in moments if t.device.type == "cpu" and t.is_pinned())
        return PagedMemoryReport(
            host_state_bytes=host, host_pinned_bytes=pinned, gpu_budget_bytes=self.gpu_budget_bytes,
            gpu_peak_bytes=self.gpu_peak_bytes, chunk_elements=self.chunk_elements,
            last_step_chunks=self.last_step["chunks"], last_step_bytes_to_gpu=self.last_step["bytes_to_gpu"],
            last_step_bytes_to_host=self.last_step["bytes_to_host"])

    # --- checkpoints ---------------------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from `state_dict()` here or from torch.optim.AdamW; everything is checked first.

        Unlike `Optimizer.load_state_dict`, the moments are not cast to the parameter's dtype and device:
        they are copied into fresh fp32 host buffers (pinned for GPU parameters), so nothing is rounded to
        bf16 on the way and the optimizer keeps no reference into `state_dict`.
        """
        state_dict = dict(state_dict)
        for pre_hook in getattr(self, "_optimizer_load_state_dict_pre_hooks", {}).values():
            state_dict = pre_hook(self, state_dict) or state_dict
        if not isinstance(state_dict.get("state"), dict) or not isinstance(state_dict.get("param_groups"), list):
            raise ValueError("state_dict must have a 'state' dict and a 'param_groups' list")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} parameter groups, this optimizer "
                             f"{len(self.param_groups)}")
        for i, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(f"parameter group {i} has {len(group['params'])} parameters here and "
                                 f"{len(saved['params'])} in state_dict")
        id_map = dict(zip(chain.from_iterable(g["params"] for g in saved_groups),
                          chain.from_iterable(g["params"] for g in self.param_groups)))
        new_groups = []
        for group, saved in zip(self.param_groups, saved_groups):
            new = {k: copy.deepcopy(v) for k, v in saved.items() if k != "params"}
            new["params"] = group["params"]
            if "param_names" in group and "param_names" not in saved:
                new["param_names"] = group["param_names"]
            for k, v in self.defaults.items():
                new.setdefault(k, v)
            _check_hyperparameters(new)
            new_groups.append(new)
        new_state: defaultdict[Tensor, dict] = defaultdict(dict)
        for key, saved in state_dict["state"].items():
            if key not in id_map:
                raise ValueError(f"state_dict has state for parameter id {key!r}, which no parameter group lists")
            p = id_map[key]
            new_state[p] = self._state_from_saved(p, saved, key)
        # Commit only now: a state dict that fails a check leaves the optimizer as it was.
        self.param_groups = new_groups
        self.state = new_state
        for post_hook in getattr(self, "_optimizer_load_state_dict_post_hooks", {}).values():
            post_hook(self)

    def _state_from_saved(self, p: Tensor, saved: Any, key: Any) -> dict[str, Tensor]:
        if isinstance(saved, dict) and not saved:
            return {}  # a parameter that never had a gradient
        if not isinstance(saved, dict) or set(saved) != set(_STATE_KEYS):
            got = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
            raise ValueError(f"state of parameter {key!r} must have exactly the keys {list(_STATE_KEYS)}, got {got}")
        for name in ("exp_avg", "exp_avg_sq"):
            t = saved[name]
            if not isinstance(t, Tensor) or t.shape != p.shape:
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"state {name!r} of parameter {key!r} must be a tensor of shape {tuple(p.shape)}, "
                                 f"got {shape}")
        state = self._new_state(p)
        state["step"].fill_(float(saved["step"]))
        state["exp_avg"].copy_(saved["exp_avg"])
        state["exp_avg_sq"].copy_(saved["exp_avg_sq"])
        return state
