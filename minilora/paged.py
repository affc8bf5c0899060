"""Paged AdamW: optimizer state in host memory that visits the GPU one chunk at a time, in 32 or 8 bits.

Adam keeps two moments per parameter, m and v: 8 bytes in fp32, twice what a bf16 weight and its bf16
gradient take together. For an 8B-parameter model that is 64 GB of state on top of 32 GB of weights and
gradients. `PagedAdamW` keeps the moments in page-locked ("pinned") host memory and streams them through a
few GPU slots, explicitly, in plain PyTorch, so that every byte that moves is visible:

* each parameter is cut into chunks of at most `chunk_elements` elements (a chunk never mixes parameters,
  so a chunk can be updated as soon as its parameter's gradient is ready);
* the chunks go through a ring of GPU slots: while chunk i is updated on the compute stream, the next ones
  are copied host→device on one side stream (prefetch) and finished ones device→host on another (PCIe is
  full duplex); CUDA events order the three streams: an update waits for its chunk's load, a write-back for
  its update, and a load into a slot for the write-back of the chunk that used the slot before;
* `step_in_backward=True` runs the update inside `loss.backward()`, from a per-parameter hook that fires as
  soon as the parameter's gradient is complete, then frees the gradient: no full set of gradients ever
  lives at once, and the state transfers overlap the rest of backward;
* `state_bits=8` stores m and v as 8-bit codes in blocks of 256 with one fp32 absmax each, on chapter 5's
  dynamic map (signed for m, unsigned for v): bitsandbytes' 8-bit optimizers' scheme, 2.03 bytes per
  parameter instead of 8. Parameters under 4,096 elements keep fp32 state, as in bitsandbytes.

The update is `torch.optim.AdamW`'s, operation for operation (decoupled weight decay λ, bias correction):

    θ ← θ·(1 − lr·λ);   m ← β1·m + (1 − β1)·g;   v ← β2·v + (1 − β2)·g²
    θ ← θ − lr/(1 − β1ᵗ) · m / (√v / √(1 − β2ᵗ) + ε)

In 8 bits, m and v are dequantized before and quantized after it. The price of paging is bandwidth: every
step moves the state bytes to the GPU and back (16 bytes per parameter in fp32, about 4 in 8 bits; the first
step loads nothing, its state starts at zero). Parameters on the CPU need no paging: the same update runs in
place on the host state.

The update below is the reference. On a GPU, chapter 10 (`minilora.fast.paged_adamw_update`, handed in through
`set_fused_update`) runs the whole update of a chunk, 8-bit dequantize and requantize included, as one
Triton kernel with the same arithmetic; the PyTorch here is some thirty launches per chunk.

How bitsandbytes differs: its paged state is CUDA unified memory that the driver migrates only when the GPU
runs short, so it moves nothing while everything fits and pages on demand when it does not.
"""

from __future__ import annotations

import copy
import numbers
import warnings
from collections import defaultdict, deque
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from itertools import chain
from typing import Any, Callable, ContextManager, Iterable, NamedTuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from minilora.double_quant import MapTables, dequantize_blockwise_8bit, dynamic_map, map_tables

__all__ = ["PagedAdamW", "PagedMemoryReport", "Piece", "plan_chunks", "adamw_update_", "BYTES_PER_ELEMENT",
           "DEFAULT_GPU_BUDGET", "bytes_per_element", "pinned_reserved_bytes", "STATE_BLOCK", "MIN_8BIT_SIZE",
           "set_fused_update"]

_SLOTS = 3  # the fewest that overlap: one chunk loading, one updating, one writing back
_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STATE_BLOCK = 256  # elements per absmax in 8-bit state (bitsandbytes' blockwise optimizers)
MIN_8BIT_SIZE = 4096  # smaller parameters keep fp32 state in 8-bit mode (bitsandbytes' min_8bit_size)
_KEYS_32 = ("step", "exp_avg", "exp_avg_sq")  # torch.optim.AdamW's names: checkpoints move between the two
_KEYS_8 = ("step", "exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax")
# Keys torch.optim.AdamW saves in its param groups that choose a kernel, not the math: accepted and dropped.
_KERNEL_KEYS = ("foreach", "fused", "capturable")
# Keys that change the math: only the value that means AdamW's update is accepted.
_SEMANTIC_DEFAULTS = {"amsgrad": False, "maximize": False, "differentiable": False, "decoupled_weight_decay": True}


def bytes_per_element(state_bits: int = 32, slots: int = _SLOTS) -> int:
    """GPU bytes one element of a chunk may occupy during a step: its slots, plus fp32 scratch for the update.

    fp32 state: 8 bytes (m, v) per slot; scratch √v (4) and fp32 copies of a 16-bit weight and gradient (8).
    8-bit state: 2 code bytes per slot plus the absmax (rounded up to 1 byte); scratch also holds the
    dequantized m and v (8) and the integer indices of the requantization (8).
    """
    if state_bits == 32:
        return slots * 8 + 12
    return slots * 3 + 12 + 16


BYTES_PER_ELEMENT = bytes_per_element()  # 36: the default, fp32 state in three slots
DEFAULT_GPU_BUDGET = 256 * 2**20


def pinned_reserved_bytes(nbytes: int) -> int:
    """What torch's pinned caching allocator reserves for a request of `nbytes`: the next power of two."""
    return 0 if nbytes <= 0 else 1 << (int(nbytes) - 1).bit_length()


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


def quantize_state_(x: Tensor, tables: MapTables, codes: Tensor, absmax: Tensor) -> None:
    """Blockwise 8-bit quantization of x (n,) fp32 into codes (n,) uint8 and absmax (⌈n/256⌉,) fp32; x is
    overwritten (it is scratch). absmax_b = max |x| over block b; code_i = a map entry near x_i / absmax_b.

    Chapter 5's rule on every device (bitsandbytes' CPU kernel): snap x_i / absmax_b to the nearest of 65,536
    grid points in [-1, 1], then take the map entry nearest that point. No grid point is 0, so a tiny v is
    stored as about 1.5e-5 of its block's absmax, never as 0. That matters: the nearest-entry rule (chapter 5's
    `exact=True`) stores such a v as 0, and when the element's gradient is then 0 (an embedding row not in
    the batch) the update m/(√v + ε) divides by ε alone. Written to queue on a GPU without reading anything
    back to the host (a zero or subnormal absmax is raised to the smallest normal float instead of branching).
    """
    n, n_blocks = x.numel(), absmax.numel()
    if n == n_blocks * STATE_BLOCK:
        blocks = x.view(n_blocks, STATE_BLOCK)
    else:
        blocks = torch.nn.functional.pad(x, (0, n_blocks * STATE_BLOCK - n)).view(n_blocks, STATE_BLOCK)
    torch.linalg.vector_norm(blocks, ord=float("inf"), dim=1, out=absmax)
    scaled = blocks.mul_(absmax.clamp_min(torch.finfo(torch.float32).tiny).reciprocal().unsqueeze(1))
    grid = tables.entry_of_point.numel() - 1
    point = scaled.clamp_(-1.0, 1.0).add_(1.0).mul_(0.5).mul_(grid).add_(0.5).long()
    codes.copy_(tables.entry_of_point[point].view(-1)[:n])


# A faster update of the same chunk, tried first: chapter 10's one-kernel Triton update (minilora.fast,
# installed by minilora/__init__.py through `set_fused_update`). It returns False where it does not run.
FusedUpdate = Callable[[Tensor, Tensor, dict, float, dict, tuple], bool]
_FUSED_UPDATE: FusedUpdate | None = None


def set_fused_update(fn: FusedUpdate | None) -> None:
    """Make `fn(w, g, staged, step, hyper, tables) -> bool` the update `_update_staged` tries first."""
    global _FUSED_UPDATE
    _FUSED_UPDATE = fn


def _update_staged(w: Tensor, g: Tensor, staged: dict[str, Tensor], step: float, hyper: dict[str, float],
                   tables: tuple[MapTables, MapTables]) -> None:
    """AdamW on a flat slice w, g (n,) with its state `staged` (slot or host views): fp32, or 8-bit codes."""
    if _FUSED_UPDATE is not None and _FUSED_UPDATE(w, g, staged, step, hyper, tables):
        return  # the same update, in one kernel launch
    if "exp_avg_absmax" not in staged:
        adamw_update_(w, g, staged["exp_avg"], staged["exp_avg_sq"], step=step, **hyper)
        return
    signed, unsigned = tables
    m = dequantize_blockwise_8bit(staged["exp_avg"], staged["exp_avg_absmax"], signed.code, STATE_BLOCK)
    v = dequantize_blockwise_8bit(staged["exp_avg_sq"], staged["exp_avg_sq_absmax"], unsigned.code, STATE_BLOCK)
    adamw_update_(w, g, m, v, step=step, **hyper)
    quantize_state_(m, signed, staged["exp_avg"], staged["exp_avg_absmax"])
    quantize_state_(v, unsigned, staged["exp_avg_sq"], staged["exp_avg_sq_absmax"])


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
    every chunk but the last is full: there are exactly ⌈Σ numels / chunk_elements⌉ chunks. `PagedAdamW`
    plans each parameter on its own (`plan_chunks([numel], ...)`), so that a chunk is ready to update as
    soon as its one parameter's gradient is.
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


def _is_8bit(numel: int, state_bits: int) -> bool:
    return state_bits == 8 and numel >= MIN_8BIT_SIZE


def _layout(numel: int, start: int, stop: int, state_bits: int) -> dict[str, tuple[torch.dtype, int, int]]:
    """The state tensors of elements [start, stop) of a parameter: name -> (dtype, first, last+1) in that tensor."""
    if not _is_8bit(numel, state_bits):
        return {"exp_avg": (torch.float32, start, stop), "exp_avg_sq": (torch.float32, start, stop)}
    b0, b1 = start // STATE_BLOCK, -(-stop // STATE_BLOCK)  # chunks start on block boundaries
    return {"exp_avg": (torch.uint8, start, stop), "exp_avg_sq": (torch.uint8, start, stop),
            "exp_avg_absmax": (torch.float32, b0, b1), "exp_avg_sq_absmax": (torch.float32, b0, b1)}


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
# The pager: a ring of GPU slots fed by a prefetching side stream


class _Slot:
    """One GPU staging area: an fp32 and a uint8 buffer, carved into views for the chunk it holds."""

    def __init__(self, device: torch.device, f32: int, u8: int) -> None:
        self.f32 = torch.empty(f32, dtype=torch.float32, device=device)
        self.u8 = torch.empty(u8, dtype=torch.uint8, device=device)

    def views(self, layout: dict[str, tuple[torch.dtype, int, int]]) -> dict[str, Tensor]:
        used = {torch.float32: 0, torch.uint8: 0}
        out = {}
        for name, (dtype, first, last) in layout.items():
            buf = self.f32 if dtype == torch.float32 else self.u8
            out[name] = buf[used[dtype]:used[dtype] + last - first]
            used[dtype] += last - first
        return out

    @property
    def nbytes(self) -> int:
        return self.f32.nbytes + self.u8.nbytes


class _Chunk(NamedTuple):
    param: Tensor
    start: int
    stop: int


class _Pager:
    """Streams the state of one device's parameters through `n_slots` GPU slots, in a planned order.

    `plan(params)` says in which order parameters will be updated; `update(p, ...)` then updates p's chunks,
    keeping up to n_slots - 1 chunks ahead of it loading on the side stream. If the parameter that comes is
    not the one planned (the first backward pass, a parameter without gradient), the prefetched chunks are
    dropped and the plan restarts at it: slower, never wrong. `finish()` ends a step.
    """

    def __init__(self, opt: "PagedAdamW", device: torch.device) -> None:
        self.opt, self.device = opt, device
        self.on_gpu = device.type == "cuda"
        self.compute = torch.cuda.current_stream(device) if self.on_gpu else None
        self.to_gpu = torch.cuda.Stream(device=device) if self.on_gpu else None
        self.to_host = torch.cuda.Stream(device=device) if self.on_gpu else None
        c, bits = opt.chunk_elements, opt.state_bits
        f32 = 2 * c if bits == 32 else 2 * max(-(-c // STATE_BLOCK), MIN_8BIT_SIZE)
        self.slots = [_Slot(device, f32, 2 * c if bits == 8 else 0) for _ in range(opt.slots)]
        self.slot_free: list[torch.cuda.Event | None] = [None] * len(self.slots)  # its last write-back
        self.next_slot = 0
        signed, unsigned = dynamic_map(True), dynamic_map(False)  # on the CPU: the tables are cached by value
        self.tables = (map_tables(signed, device), map_tables(unsigned, device))
        self.todo: deque[_Chunk] = deque()  # planned, not loaded yet
        self.loaded: deque[tuple[_Chunk, int, torch.cuda.Event | None]] = deque()  # (chunk, slot, arrived)
        self.order: list[Tensor] = []  # parameters in the order they were updated in this step
        _wait_stream(self.to_gpu, self.compute)  # the slots' memory comes from the compute stream

    def plan(self, params: list[Tensor]) -> None:
        self.todo = deque(chunk for p in params for chunk in self._chunks(p))
        self.loaded.clear()  # loads already queued into slots are simply overwritten later, in stream order

    def _chunks(self, p: Tensor) -> list[_Chunk]:
        return [_Chunk(p, pc.start, pc.stop) for chunk in plan_chunks([p.numel()], self.opt.chunk_elements)
                for pc in chunk]

    def _fill(self) -> None:
        """Queue loads for planned chunks while a slot is free: the prefetch."""
        while self.todo and len(self.loaded) < len(self.slots):
            chunk = self.todo.popleft()
            k = self.next_slot
            self.next_slot = (k + 1) % len(self.slots)
            _wait(self.to_gpu, self.slot_free[k])  # the slot's previous chunk is back on the host
            self.loaded.append((chunk, k, self._load(chunk, self.slots[k])))

    def _load(self, chunk: _Chunk, slot: _Slot) -> torch.cuda.Event | None:
        """Host→device copy of a chunk's state on the side stream; zeros for a state not yet created."""
        state = self.opt.state.get(chunk.param)
        fresh = not state or id(chunk.param) in self.opt._fresh
        layout = _layout(chunk.param.numel(), chunk.start, chunk.stop, self.opt.state_bits)
        with _on(self.to_gpu):
            for name, staged in slot.views(layout).items():
                if fresh:  # the first step: Adam's state starts at zero, nothing to move
                    staged.zero_()
                else:
                    _, first, last = layout[name]
                    staged.copy_(state[name].view(-1)[first:last], non_blocking=True)
            return _record(self.to_gpu)

    def update(self, p: Tensor, grad: Tensor, state: dict, hyper: dict[str, float]) -> None:
        """Update all of p's chunks; each waits for its load, and its write-back is queued behind it."""
        if not (self.loaded or self.todo) or self._next_param() is not p:  # not what was prefetched
            self.plan([p] + [q for q in self._planned_params() if q is not p])
        self.order.append(p)
        w_flat, g_flat = p.detach().view(-1), grad.view(-1)
        for _ in range(len(self._chunks(p))):
            self._fill()
            chunk, k, arrived = self.loaded.popleft()
            layout = _layout(p.numel(), chunk.start, chunk.stop, self.opt.state_bits)
            staged = self.slots[k].views(layout)
            _wait(self.compute, arrived)
            _update_staged(w_flat[chunk.start:chunk.stop], g_flat[chunk.start:chunk.stop], staged,
                           float(state["step"]), hyper, self.tables)
            self.slot_free[k] = self._store(chunk, staged, layout, state, after=_record(self.compute))
        self._fill()  # start loading what comes next while the caller moves on

    def _store(self, chunk: _Chunk, staged: dict[str, Tensor], layout: dict, state: dict,
               after: torch.cuda.Event | None) -> torch.cuda.Event | None:
        """Device→host copy of an updated chunk on the other side stream, once `after` (its update) happened."""
        _wait(self.to_host, after)
        with _on(self.to_host):
            for name, src in staged.items():
                _, first, last = layout[name]
                state[name].view(-1)[first:last].copy_(src, non_blocking=True)
            return _record(self.to_host)

    def _next_param(self) -> Tensor:
        return (self.loaded[0][0] if self.loaded else self.todo[0]).param

    def _planned_params(self) -> list[Tensor]:
        seen: dict[int, Tensor] = {}
        for chunk in chain((c for c, _, _ in self.loaded), self.todo):
            seen.setdefault(id(chunk.param), chunk.param)
        return list(seen.values())

    def finish(self) -> list[Tensor]:
        """End a step: later loads wait for this step's write-backs; returns the order the step used."""
        _wait_stream(self.to_gpu, self.to_host)
        order, self.order = self.order, []
        self.todo.clear()
        self.loaded.clear()
        return order

    def synchronize(self) -> None:
        """Block the host until every write-back has landed (before anyone reads the host state)."""
        if self.to_host is not None:
            self.to_host.synchronize()


# ---------------------------------------------------------------------------------------------------------
# The optimizer


@dataclass
class PagedMemoryReport:
    """Where the optimizer's bytes are. Host bytes count the state of every parameter that has state."""

    host_state_bytes: int
    host_pinned_bytes: int
    host_pinned_reserved_bytes: int  # what the pinned allocator really holds: each tensor rounded to 2^k
    gpu_budget_bytes: int
    gpu_peak_bytes: int  # most bytes the optimizer itself held on a GPU: slots + the largest chunk's scratch
    chunk_elements: int
    last_step_chunks: int
    last_step_bytes_to_gpu: int
    last_step_bytes_to_host: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def __str__(self) -> str:
        return (f"state on host: {_human(self.host_state_bytes)} ({_human(self.host_pinned_bytes)} pinned, "
                f"{_human(self.host_pinned_reserved_bytes)} reserved by the pinned allocator) | GPU window: peak "
                f"{_human(self.gpu_peak_bytes)} of {_human(self.gpu_budget_bytes)} | last step: "
                f"{self.last_step_chunks} chunks, {_human(self.last_step_bytes_to_gpu)} in, "
                f"{_human(self.last_step_bytes_to_host)} out")


def _human(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n} B"


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


def _check_saved_group(i: int, saved: dict) -> dict:
    """A param group from a checkpoint, without the keys that only pick a torch kernel; refuses other math."""
    known = {"params", "param_names", "lr", "betas", "eps", "weight_decay", "initial_lr",
             *_KERNEL_KEYS, *_SEMANTIC_DEFAULTS}
    unknown = sorted(set(saved) - known)
    if unknown:
        raise ValueError(f"parameter group {i} of the state dict has keys PagedAdamW does not know: {unknown}; "
                         "it loads checkpoints of PagedAdamW and torch.optim.AdamW only")
    for key, default in _SEMANTIC_DEFAULTS.items():
        if key in saved and bool(saved[key]) != default:
            what = "Adam with L2 regularisation, not AdamW" if key == "decoupled_weight_decay" else "another update"
            raise ValueError(f"parameter group {i} of the state dict was saved with {key}={saved[key]!r} ({what}); "
                             f"PagedAdamW computes AdamW with {key}={default} and refuses to change the math silently")
    return {k: v for k, v in saved.items() if k not in _KERNEL_KEYS and k not in _SEMANTIC_DEFAULTS}


class PagedAdamW(Optimizer):
    """AdamW whose moments live in pinned host memory and stream through a fixed GPU window (module docstring).

    Same update as `torch.optim.AdamW` (see `adamw_update_`); amsgrad and maximize are not supported.
    `gpu_budget_bytes` caps what the optimizer allocates on the GPU: `slots` staging slots and the fp32
    scratch, `bytes_per_element(state_bits, slots)` bytes per element of a chunk. `state_bits` is 32 (fp32
    moments; the state dict has torch.optim.AdamW's layout and loads into it, and back) or 8 (codes and
    absmax per block of 256, bitsandbytes' 8-bit AdamW scheme; its state dict loads only into 8-bit PagedAdamW).

    `step_in_backward=True` registers a hook on every parameter that updates it as soon as its gradient is
    complete and frees the gradient; `step()` then only waits for the transfers. With it:
    * accumulation: `accumulation_steps=k` keeps the gradients through k backward passes and updates in the
      k-th (the gradients of all parameters then live between micro-batches, as with any optimizer);
    * clipping: a global gradient norm needs every gradient before the first update, which the step in
      backward cannot wait for: `max_grad_norm` is refused there (it works with `step()`).
    """

    # Tests set this to run the chunk pipeline for CPU parameters too (no streams, synchronous copies), so
    # the bookkeeping of chunks, slots and prefetch is checked on machines without a GPU.
    _chunk_cpu_params: bool = False

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 amsgrad: bool = False, *, maximize: bool = False, gpu_budget_bytes: int = DEFAULT_GPU_BUDGET,
                 state_bits: int = 32, slots: int = _SLOTS, step_in_backward: bool = False,
                 accumulation_steps: int = 1, max_grad_norm: float | None = None) -> None:
        for name, value in (("gpu_budget_bytes", gpu_budget_bytes), ("slots", slots),
                            ("accumulation_steps", accumulation_steps)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if state_bits not in (32, 8):
            raise ValueError(f"state_bits must be 32 or 8, got {state_bits!r}")
        if slots < _SLOTS:
            raise ValueError(f"slots must be at least {_SLOTS} (one loading, one updating, one storing), got {slots}")
        if accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be >= 1, got {accumulation_steps}")
        if accumulation_steps > 1 and not step_in_backward:
            raise ValueError("accumulation_steps is for step_in_backward=True; with step() accumulate as usual "
                             "(several backward passes, then one step())")
        if max_grad_norm is not None:
            if not _check_number("max_grad_norm", max_grad_norm) > 0:
                raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
            if step_in_backward:
                raise ValueError("max_grad_norm (clipping by the global gradient norm) cannot work with "
                                 "step_in_backward=True: each parameter is updated as soon as its own gradient is "
                                 "ready, before the others exist. Use step_in_backward=False to clip, or train "
                                 "without global clipping")
        granule = STATE_BLOCK if state_bits == 8 else 1  # 8-bit chunks start on block boundaries
        per_element = bytes_per_element(state_bits, slots)
        if gpu_budget_bytes < per_element * granule:
            raise ValueError(f"gpu_budget_bytes must be at least {per_element * granule} (the GPU bytes of the "
                             f"smallest chunk in flight), got {gpu_budget_bytes}")
        self.state_bits, self.slots = int(state_bits), int(slots)
        self.step_in_backward, self.accumulation_steps = bool(step_in_backward), int(accumulation_steps)
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self._reset_runtime(int(gpu_budget_bytes))
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize)
        _check_hyperparameters(defaults)
        super().__init__(params, defaults)
        if self.step_in_backward:
            self._register_hooks()

    def _settings(self) -> dict[str, Any]:
        return dict(state_bits=self.state_bits, slots=self.slots, step_in_backward=self.step_in_backward,
                    accumulation_steps=self.accumulation_steps, max_grad_norm=self.max_grad_norm)

    def _reset_runtime(self, gpu_budget_bytes: int) -> None:
        """Everything that is not optimizer state: the budget, counters, pagers (streams, slots) and hooks."""
        granule = STATE_BLOCK if self.state_bits == 8 else 1
        self.gpu_budget_bytes = gpu_budget_bytes
        per_chunk = gpu_budget_bytes // bytes_per_element(self.state_bits, self.slots)
        self.chunk_elements = per_chunk // granule * granule
        self.gpu_peak_bytes = 0
        self.last_step = {"chunks": 0, "bytes_to_gpu": 0, "bytes_to_host": 0}
        self._pagers: dict[torch.device, _Pager] = {}
        self._fresh: set[int] = set()  # ids of parameters whose host state is still all zeros
        self._order: dict[torch.device, list[Tensor]] = {}  # update order of the last step, per device
        self._hooks: list[Any] = []
        self._in_pass = False
        self._passes = 0
        self._can_pin = True
        self._warned_cpu = False

    # Optimizer pickles (and deep-copies) only defaults, state and param_groups; keep the settings too and
    # rebuild the rest, since CUDA streams and hooks cannot be copied.
    def __getstate__(self) -> dict[str, Any]:
        self.synchronize()
        return {**super().__getstate__(), "gpu_budget_bytes": self.gpu_budget_bytes, "settings": self._settings()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        budget = state.pop("gpu_budget_bytes", DEFAULT_GPU_BUDGET)
        settings = state.pop("settings", {})
        super().__setstate__(state)
        for key, default in dict(state_bits=32, slots=_SLOTS, step_in_backward=False, accumulation_steps=1,
                                 max_grad_norm=None).items():
            setattr(self, key, settings.get(key, default))
        self._reset_runtime(budget)
        if self.step_in_backward:
            self._register_hooks()

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
        if getattr(self, "_hooks", None) and self.step_in_backward:
            self._register_hooks(self.param_groups[-1]["params"])

    # --- state -------------------------------------------------------------------------------------------

    def _host_tensor(self, n: int | torch.Size, dtype: torch.dtype, pin: bool) -> Tensor:
        """Zeros in host memory, page-locked when `pin` (a GPU will read them) and the system allows it.

        Only page-locked memory can be copied asynchronously; copies from pageable memory are staged and
        block the host. torch's pinned allocator rounds each request up to a power of two, so pinned state
        can take up to 2x its size (`pinned_reserved_bytes`; the memory report gives the rounded total).
        """
        if pin and self._can_pin:
            try:
                return torch.zeros(n, dtype=dtype, pin_memory=True)
            except RuntimeError as err:
                self._can_pin = False
                first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                warnings.warn(f"PagedAdamW could not pin host memory ({first_line}); the rest of its state "
                              "uses pageable memory, whose copies are slower and block the host", stacklevel=7)
        return torch.zeros(n, dtype=dtype)

    def _new_state(self, p: Tensor) -> dict[str, Tensor]:
        """Zero state for p in host memory: one tensor per moment, shaped like p (chunks are mere views, so a
        different budget re-cuts the same state); in 8 bits uint8 codes and one fp32 absmax per 256 values."""
        pin = p.device.type == "cuda"
        state = {"step": torch.tensor(0.0, dtype=torch.float32)}
        if _is_8bit(p.numel(), self.state_bits):
            blocks = -(-p.numel() // STATE_BLOCK)
            for name in ("exp_avg", "exp_avg_sq"):
                state[name] = self._host_tensor(p.shape, torch.uint8, pin)
                state[name + "_absmax"] = self._host_tensor(blocks, torch.float32, pin)
        else:
            for name in ("exp_avg", "exp_avg_sq"):
                state[name] = self._host_tensor(p.shape, torch.float32, pin)
        self._fresh.add(id(p))
        return state

    def _check_param(self, p: Tensor, grad: Tensor) -> Tensor:
        """Raise on what PagedAdamW cannot update; returns the gradient, contiguous."""
        if p.device.type not in ("cpu", "cuda"):
            raise ValueError(f"PagedAdamW keeps its state in host memory and updates parameters on the CPU "
                             f"or a CUDA GPU; got a parameter on {p.device}. Nothing was updated. Use "
                             "torch.optim.AdamW for parameters on other devices.")
        if grad.layout != torch.strided:
            raise TypeError(f"PagedAdamW does not support sparse gradients (got layout {grad.layout}); "
                            "use torch.optim.SparseAdam for sparse embeddings")
        if not p.is_contiguous():
            raise ValueError("PagedAdamW pages contiguous parameters only (it updates flat slices); "
                             f"got a non-contiguous one of shape {tuple(p.shape)}")
        return grad if grad.is_contiguous() else grad.contiguous()

    def _group_of(self, p: Tensor) -> dict:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise KeyError("parameter not in this optimizer")

    # --- the update of one parameter, wherever it comes from -------------------------------------------------

    def _pager(self, device: torch.device) -> _Pager:
        if device not in self._pagers:
            self._pagers[device] = _Pager(self, device)
            slots_bytes = sum(s.nbytes for s in self._pagers[device].slots)
            scratch = self.chunk_elements * (bytes_per_element(self.state_bits, self.slots) - self.slots * (
                8 if self.state_bits == 32 else 3))
            self.gpu_peak_bytes = max(self.gpu_peak_bytes, slots_bytes + scratch)
        return self._pagers[device]

    def _update_param(self, p: Tensor, grad: Tensor, group: dict) -> None:
        """One AdamW step for p: in place on the host state (CPU parameter) or through its device's pager."""
        if not self.state[p]:
            self.state[p].update(self._new_state(p))
        state = self.state[p]
        state["step"] += 1
        paged = p.device.type == "cuda" or self._chunk_cpu_params
        if paged:
            self._pager(p.device).update(p, grad, state, _hyper(group))
        else:
            self._warn_cpu_once()
            host = {k: v.view(-1) for k, v in state.items() if k != "step"}
            _update_staged(p.detach().view(-1), grad.view(-1), host, float(state["step"]), _hyper(group),
                           (map_tables(dynamic_map(True), "cpu"), map_tables(dynamic_map(False), "cpu")))
        self._fresh.discard(id(p))
        moved = sum(t.nbytes for k, t in state.items() if k != "step") if paged else 0
        self.last_step["chunks"] += len(plan_chunks([p.numel()], self.chunk_elements)) if paged else 0
        self.last_step["bytes_to_gpu"] += moved if state["step"] > 1 else 0  # the first step loads nothing
        self.last_step["bytes_to_host"] += moved

    def _warn_cpu_once(self) -> None:
        if not self._warned_cpu:
            self._warned_cpu = True
            why = "no CUDA" if not torch.cuda.is_available() else "parameters on the CPU"
            warnings.warn(f"{why}: PagedAdamW runs as plain AdamW on the CPU", stacklevel=6)

    def _finish_step(self) -> None:
        """End of a step: remember each device's update order (the next step's prefetch plan)."""
        for device, pager in self._pagers.items():
            order = pager.finish()
            if order:
                self._order[device] = order

    def synchronize(self) -> None:
        """Wait until every write-back has reached host memory (state_dict and checkpoints call this)."""
        for pager in self._pagers.values():
            pager.synchronize()

    # --- the step inside backward ------------------------------------------------------------------------

    def _register_hooks(self, params: Iterable[Tensor] | None = None) -> None:
        params = list(params) if params is not None else [p for g in self.param_groups for p in g["params"]]
        for p in params:
            if p.requires_grad:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad_ready))

    def remove_hooks(self) -> None:
        """Detach the optimizer from the parameters' backward (the hooks of `step_in_backward=True`)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _updates_this_pass(self) -> bool:
        return self._passes % self.accumulation_steps == self.accumulation_steps - 1

    @torch.no_grad()
    def _on_grad_ready(self, p: Tensor) -> None:
        """Post-accumulate-grad hook: p.grad is complete for this backward pass; update p and free it."""
        try:
            if not self._in_pass:
                self._begin_pass()
            if not self._updates_this_pass():
                return  # accumulating: the gradient stays for the next micro-batch
            grad = self._check_param(p, p.grad)
            self._update_param(p, grad, self._group_by_id[id(p)])
            p.grad = None  # the point of the step in backward: this gradient's memory is free now
        except BaseException:
            self._in_pass = False
            raise

    def _begin_pass(self) -> None:
        """First hook of a backward pass: plan the prefetch, and have autograd call us when the pass ends."""
        self._in_pass = True
        torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
        if not self._updates_this_pass():
            return
        self.last_step = {"chunks": 0, "bytes_to_gpu": 0, "bytes_to_host": 0}
        self._group_by_id = {id(p): g for g in self.param_groups for p in g["params"]}
        for device, order in self._expected_orders().items():
            self._pager(device).plan(order)

    def _expected_orders(self) -> dict[torch.device, list[Tensor]]:
        """Per paged device, the order the last step updated parameters in; at first, the reverse of the
        parameter list (backward reaches the last layers first)."""
        out: dict[torch.device, list[Tensor]] = {}
        for p in reversed([p for g in self.param_groups for p in g["params"] if p.requires_grad]):
            if p.device.type == "cuda" or (self._chunk_cpu_params and p.device.type == "cpu"):
                out.setdefault(p.device, []).append(p)
        return {device: self._order.get(device, default) for device, default in out.items()}

    def _end_of_backward(self) -> None:
        self._in_pass = False
        if self._updates_this_pass():
            self._finish_step()
        self._passes += 1

    # --- step ----------------------------------------------------------------------------------------------

    def _collect(self) -> list[tuple[Tensor, dict]]:
        """Parameters with a gradient and their groups; checks everything before any state changes."""
        found = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._check_param(p, p.grad)
                    found.append((p, group))
        return found

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One AdamW step for every parameter that has a gradient; `closure` re-evaluates the loss.

        With `step_in_backward=True` the updates already ran during backward and this does nothing.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.step_in_backward:
            return loss
        work = self._collect()
        if self.max_grad_norm is not None and work:
            torch.nn.utils.clip_grad_norm_([p for p, _ in work], self.max_grad_norm)
        self.last_step = {"chunks": 0, "bytes_to_gpu": 0, "bytes_to_host": 0}
        by_device: dict[torch.device, list[tuple[Tensor, dict]]] = defaultdict(list)
        for p, group in work:
            by_device[p.device].append((p, group))
        for device, items in by_device.items():
            if device.type == "cuda" or self._chunk_cpu_params:
                self._pager(device).plan([p for p, _ in items])
            for p, group in items:
                self._update_param(p, self._check_param(p, p.grad), group)
        self._finish_step()
        return loss

    # --- reporting -----------------------------------------------------------------------------------------

    def memory_report(self) -> PagedMemoryReport:
        """Bytes of state on the host (pinned, and as the pinned allocator rounds them), and the GPU window."""
        self.synchronize()
        tensors = [t for s in self.state.values() for k, t in s.items() if k != "step"]
        host = [t for t in tensors if t.device.type == "cpu"]
        pinned = [t for t in host if t.numel() and t.is_pinned()]
        return PagedMemoryReport(
            host_state_bytes=sum(t.nbytes for t in host), host_pinned_bytes=sum(t.nbytes for t in pinned),
            host_pinned_reserved_bytes=sum(pinned_reserved_bytes(t.nbytes) for t in pinned),
            gpu_budget_bytes=self.gpu_budget_bytes, gpu_peak_bytes=self.gpu_peak_bytes,
            chunk_elements=self.chunk_elements, last_step_chunks=self.last_step["chunks"],
            last_step_bytes_to_gpu=self.last_step["bytes_to_gpu"],
            last_step_bytes_to_host=self.last_step["bytes_to_host"])

    # --- checkpoints ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch's layout (`state`, `param_groups`); waits for in-flight write-backs first."""
        self.synchronize()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from `state_dict()` here or from torch.optim.AdamW; everything is checked first.

        Unlike `Optimizer.load_state_dict`, the state is not cast to the parameter's dtype and device: it is
        copied into fresh host buffers (pinned for GPU parameters), so nothing is rounded on the way and the
        optimizer keeps no reference into `state_dict`. Group keys that only choose a torch kernel (foreach,
        fused, capturable) are dropped; any that would change the math (decoupled_weight_decay=False, amsgrad,
        maximize, differentiable) or that PagedAdamW does not know are refused.
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
        new_groups = [self._group_from_saved(i, group, saved)
                      for i, (group, saved) in enumerate(zip(self.param_groups, saved_groups))]
        new_state: defaultdict[Tensor, dict] = defaultdict(dict)
        for key, saved in state_dict["state"].items():
            if key not in id_map:
                raise ValueError(f"state_dict has state for parameter id {key!r}, which no parameter group lists")
            p = id_map[key]
            new_state[p] = self._state_from_saved(p, saved, key)
        # Commit only now: a state dict that fails a check leaves the optimizer as it was.
        self.synchronize()  # no write-back of the old state may land after this
        self._finish_step()
        self._fresh.clear()
        self.param_groups = new_groups
        self.state = new_state
        for post_hook in getattr(self, "_optimizer_load_state_dict_post_hooks", {}).values():
            post_hook(self)

    def _group_from_saved(self, i: int, group: dict, saved: dict) -> dict:
        new = {k: copy.deepcopy(v) for k, v in _check_saved_group(i, saved).items() if k != "params"}
        new["params"] = group["params"]
        if "param_names" in group and "param_names" not in saved:
            new["param_names"] = group["param_names"]
        for k, v in self.defaults.items():
            new.setdefault(k, v)
        _check_hyperparameters(new)
        return new

    def _state_from_saved(self, p: Tensor, saved: Any, key: Any) -> dict[str, Tensor]:
        """Fresh host state for p from a saved entry, after checking its keys, dtypes and shapes."""
        if isinstance(saved, dict) and not saved:
            return {}  # a parameter that never had a gradient
        eight = _is_8bit(p.numel(), self.state_bits)
        keys = _KEYS_8 if eight else _KEYS_32
        if not isinstance(saved, dict) or set(saved) != set(keys):
            got = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
            mode = f"{self.state_bits}-bit state" + (" (8-bit for parameters of >= 4096 elements)"
                                                     if self.state_bits == 8 else "")
            raise ValueError(f"state of parameter {key!r} must have exactly the keys {list(keys)} for {mode}, "
                             f"got {got}; 8-bit and 32-bit checkpoints do not load into each other")
        state = self._new_state(p)
        self._fresh.discard(id(p))
        for name, t in saved.items():
            if name == "step":
                continue
            want = state[name]
            if not isinstance(t, Tensor) or t.shape != want.shape or (eight and t.dtype != want.dtype):
                got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"state {name!r} of parameter {key!r} must be a tensor of shape "
                                 f"{tuple(want.shape)} ({want.dtype}), got {got}")
            want.copy_(t)
        state["step"].fill_(float(saved["step"]))
        return state
