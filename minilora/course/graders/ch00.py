"""Graders for chapter 0, the memory wall.

Each grader runs the learner's function on small cases whose answers come from exact arithmetic or from
`minilora.memory`, and, when an answer is wrong, tries the usual mistakes (forgetting the gradients, one Adam
moment instead of two, GB instead of GiB, r·d_in·d_out adapters) to say which one was made.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, Callable

import torch
from torch import nn

from minilora import memory as M
from minilora.course.grading import ExerciseFailed, grader

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def _diagnose(answers: list[Any], cases: list[tuple], mistakes: dict[str, Callable[..., float]]) -> str | None:
    """The hint of the first mistake that reproduces every answer the learner gave, if any."""
    for hint, wrong in mistakes.items():
        try:
            if all(a is not None and math.isclose(float(a), float(wrong(*c)), rel_tol=1e-9)
                   for a, c in zip(answers, cases)):
                return hint
        except (TypeError, ValueError):
            continue
    return None


def _check_all(fn: Callable, cases: list[tuple], correct: Callable[..., float], show: Callable[[tuple], str],
               mistakes: dict[str, Callable[..., float]], rel: float = 1e-9) -> None:
    answers = [fn(*c) for c in cases]
    for answer, case in zip(answers, cases):
        expected = correct(*case)
        try:
            ok = math.isfinite(float(answer)) and math.isclose(float(answer), float(expected), rel_tol=rel)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            hint = _diagnose(answers, cases, mistakes)
            raise ExerciseFailed(f"on {show(case)}: expected {expected!r}, got {answer!r}"
                                 + (f"; hint: {hint}" if hint else ""))


# --- 0.1 ------------------------------------------------------------------------------------------------------

def _bytes(weights: torch.dtype, grads: torch.dtype, moments: torch.dtype, master: torch.dtype | None) -> int:
    return weights.itemsize + grads.itemsize + 2 * moments.itemsize + (master.itemsize if master else 0)


@grader("0.1", "training_bytes_per_param")
def grade_0_1(fn):
    # the library's regimes, plus one where gradients and moments differ in size so mistakes are told apart
    cases = [(F32, F32, F32, None), (BF16, BF16, BF16, None), (BF16, BF16, F32, F32), (BF16, BF16, F32, None),
             (F16, F32, F32, None)]
    for name, case in [("fp32", cases[0]), ("bf16", cases[1]), ("mixed", cases[2])]:
        assert _bytes(*case) == M.bytes_per_param(name)  # the grader's own arithmetic agrees with the library
    master = lambda m: m.itemsize if m else 0
    mistakes = {
        "you left out the gradients: backward stores one gradient per trainable parameter, in `grads` dtype":
            lambda w, g, m, ms: w.itemsize + 2 * m.itemsize + master(ms),
        "Adam keeps two moments per parameter, m (exp_avg) and v (exp_avg_sq), each in `moments` dtype":
            lambda w, g, m, ms: w.itemsize + g.itemsize + m.itemsize + master(ms),
        "a master copy, when there is one, is a full extra copy of the weights in `master` dtype":
            lambda w, g, m, ms: w.itemsize + g.itemsize + 2 * m.itemsize,
        "that is bits, not bytes: `dtype.itemsize` is already in bytes":
            lambda w, g, m, ms: 8 * _bytes(w, g, m, ms),
    }
    show = lambda c: "training_bytes_per_param(" + ", ".join(str(x).replace("torch.", "") for x in c) + ")"
    _check_all(fn, cases, _bytes, show, mistakes)


# --- 0.2 ------------------------------------------------------------------------------------------------------

def _tiny_model(dtype: torch.dtype, freeze_first: bool) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 32), nn.GELU(), nn.LayerNorm(32),
                          nn.Linear(32, 50)).to(dtype)
    if freeze_first:
        model[0].weight.requires_grad_(False)
    return model


def _one_step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    ids = torch.randint(0, 50, (4, 6))
    model(ids).float().logsumexp(-1).mean().backward()
    opt.step()


def _state_tensors(opt: torch.optim.Optimizer) -> list[tuple[str, torch.Tensor]]:
    return [(k, t) for s in opt.state.values() for k, t in s.items() if isinstance(t, torch.Tensor)]


@grader("0.2", "adam_state_bytes")
def grade_0_2(fn):
    model = _tiny_model(F32, freeze_first=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    got = fn(opt)
    if got != 0:
        raise ExerciseFailed(f"on a fresh AdamW before any step(): expected 0, got {got!r}; hint: Adam creates "
                             "its moments lazily, at the first step(). Count the tensors in optimizer.state, "
                             "not what the parameters suggest")
    for dtype, freeze, make in [
        (F32, False, lambda ps: torch.optim.AdamW(ps, lr=1e-3)),
        (BF16, True, lambda ps: torch.optim.AdamW(ps, lr=1e-3)),
        (F32, True, lambda ps: torch.optim.Adam(ps, lr=1e-3, amsgrad=True)),
    ]:
        model = _tiny_model(dtype, freeze)
        opt = make([p for p in model.parameters() if p.requires_grad])
        _one_step(model, opt)
        tensors = _state_tensors(opt)
        expected = sum(t.nbytes for _, t in tensors)
        got = fn(opt)
        if got == expected:
            continue
        what = type(opt).__name__ + (" (amsgrad=True)" if opt.defaults.get("amsgrad") else "")
        case = f"{what} after one step on a {str(dtype).replace('torch.', '')} model" + \
            (" with a frozen embedding" if freeze else "")
        params = [p for p in model.parameters()]
        guesses = {
            "you counted elements; multiply by `element_size()` (or use `.nbytes`) to get bytes":
                sum(t.numel() for _, t in tensors),
            "the `step` entries are tensors too (a 4-byte float per parameter tensor in PyTorch's Adam)":
                sum(t.nbytes for k, t in tensors if k != "step"),
            "Adam keeps two moments, exp_avg and exp_avg_sq; count every tensor in each state dict":
                sum(t.nbytes for k, t in tensors if k in ("exp_avg", "step")),
            "frozen parameters have no optimizer state: they are not in `optimizer.state`":
                sum(2 * p.nbytes for p in params) + 4 * len(params),
            "count what the optimizer really holds: with amsgrad, Adam keeps a third tensor, max_exp_avg_sq":
                sum(t.nbytes for k, t in tensors if k != "max_exp_avg_sq"),
        }
        hint = next((h for h, v in guesses.items() if got == v and v != expected), None)
        raise ExerciseFailed(f"on {case}: expected {expected}, got {got!r}" + (f"; hint: {hint}" if hint else ""))


# --- 0.3 ------------------------------------------------------------------------------------------------------

def _max_params(gpu_gib: float, bpp: float, reserved_gib: float) -> int:
    free = (Fraction(str(gpu_gib)) - Fraction(str(reserved_gib))) * 2**30
    return math.floor(free / Fraction(str(bpp)))


@grader("0.3", "max_trainable_params")
def grade_0_3(fn):
    cases = [(80, 16, 0.0), (80, M.bytes_per_param("bf16"), 0.0), (24, 8, 2.0), (40, 18, 5.5), (48, 12, 0.75)]
    mistakes = {
        "GiB means 2**30 bytes, not 10**9: GPU memory is counted in GiB (an '80 GB' card holds 80 GiB)":
            lambda g, b, r: math.floor((g - r) * 1e9 / b),
        "subtract the reserved memory (activations, workspace) before dividing":
            lambda g, b, r: math.floor(g * 2**30 / b),
        "round down: a model one parameter too big does not fit":
            lambda g, b, r: round((g - r) * 2**30 / b),
    }
    show = lambda c: f"max_trainable_params(gpu_gib={c[0]}, bytes_per_param={c[1]}, reserved_gib={c[2]})"
    answers = [fn(*c) for c in cases]
    for answer, case in zip(answers, cases):
        expected = _max_params(*case)
        if not isinstance(answer, int) or isinstance(answer, bool):
            raise ExerciseFailed(f"on {show(case)}: expected an int (a count of parameters), got {answer!r}")
        if answer != expected:
            hint = _diagnose(answers, cases, mistakes)
            raise ExerciseFailed(f"on {show(case)}: expected {expected}, got {answer}"
                                 + (f"; hint: {hint}" if hint else ""))
    for bad in [(80, 0, 0.0), (8, 16, 10.0)]:
        try:
            fn(*bad)
        except ValueError:
            continue
        except Exception as err:  # noqa: BLE001 - any other error is the learner's to fix
            raise ExerciseFailed(f"{show(bad)} raised {type(err).__name__}; check the inputs first and raise "
                                 "ValueError with a message that says what is wrong") from None
        raise ExerciseFailed(f"{show(bad)} should raise ValueError (nothing fits, or the input makes no sense)")


# --- 0.4 ------------------------------------------------------------------------------------------------------

def _lora(n_base: int, shapes: list[tuple[int, int]], rank: int, frozen_bytes: float) -> float:
    return n_base * frozen_bytes + M.bytes_per_param("lora") * sum(rank * (a + b) for a, b in shapes)


@grader("0.4", "lora_state_bytes")
def grade_0_4(fn):
    s7 = M.LLAMA_SHAPES["Llama-2-7B"]
    shapes7 = list(s7.linear_shapes().values()) * s7.layers
    cases = [(1000, [(64, 64), (64, 128)], 4, 2), (5000, [(96, 32)], 8, 4),
             (s7.n_params, shapes7, 16, 2), (s7.n_params, shapes7, 16, M.nf4_bytes_per_param())]
    # the grader's arithmetic is the library's LoRA regime (without Adam's per-tensor step counters)
    counts = M.llama_param_counts(s7, 16)
    lib = M.predict_training_memory(M.ParamCounts(counts.trainable, counts.frozen), "lora")["state"]
    assert lib == _lora(*cases[2])
    adapters = lambda shapes, r: sum(r * (a + b) for a, b in shapes)
    mistakes = {
        "a rank-r adapter on d_in -> d_out is A (r x d_in) and B (d_out x r): r*(d_in + d_out) parameters, "
        "not r*d_in*d_out": lambda n, sh, r, fb: n * fb + 16 * sum(r * a * b for a, b in sh),
        "the frozen base weights are still in memory: LoRA removes their gradients and Adam state, not the "
        "weights": lambda n, sh, r, fb: 16 * adapters(sh, r),
        "each adapter parameter has an fp32 weight, an fp32 gradient and two fp32 moments: 16 bytes, "
        "not 12 (don't forget the gradient)": lambda n, sh, r, fb: n * fb + 12 * adapters(sh, r),
        "each adapter parameter has a weight, a gradient and two moments, all fp32: 16 bytes":
            lambda n, sh, r, fb: n * fb + 8 * adapters(sh, r),
        "frozen weights cost `frozen_bytes` each and nothing more (no gradient, no Adam state)":
            lambda n, sh, r, fb: n * 16 + 16 * adapters(sh, r),
        "use the `frozen_bytes` argument for the base weights (2 for bf16, about 0.52 for NF4)":
            lambda n, sh, r, fb: n * 2 + 16 * adapters(sh, r),
    }
    show = lambda c: (f"lora_state_bytes(n_base={c[0]:,}, {len(c[1])} projections, rank={c[2]}, "
                      f"frozen_bytes={c[3]:g})")
    _check_all(fn, cases, _lora, show, mistakes)


# --- 0.5 ------------------------------------------------------------------------------------------------------

class _SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), bias-free, as in a Llama MLP."""

    def __init__(self, hidden: int, intermediate: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate = nn.Linear(hidden, intermediate, bias=False, dtype=dtype)
        self.up = nn.Linear(hidden, intermediate, bias=False, dtype=dtype)
        self.down = nn.Linear(intermediate, hidden, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))


def _measured_saved(tokens: int, hidden: int, intermediate: int, dtype: torch.dtype, weights_train: bool) -> int:
    """What autograd really saves (parameters excluded), measured with saved-tensor hooks."""
    from minilora.profiling import SavedTensorBytes

    torch.manual_seed(0)
    mlp = _SwiGLU(hidden, intermediate, dtype).requires_grad_(weights_train)
    x = torch.randn(tokens, hidden, dtype=dtype, requires_grad=True)   # an inner layer: its input needs a gradient
    with SavedTensorBytes(exclude=mlp.parameters()) as saved:
        mlp(x)
    return saved.bytes


@grader("0.5", "swiglu_saved_bytes")
def grade_0_5(fn):
    cases = [(12, 16, 40, F32, True), (12, 16, 40, BF16, True), (7, 24, 64, F32, False), (5, 32, 88, BF16, False),
             (3, 8, 8, F32, True), (9, 40, 24, BF16, False)]
    s = lambda dt: dt.itemsize
    mistakes = {
        "gate and up read the same input x: autograd saves that tensor once, not once per layer":
            lambda T, h, i, dt, tr: T * ((2 * h if tr else 0) + (i if tr else 0) + 3 * i) * s(dt),
        "silu saves its input g (its derivative is computed from g), besides the product's two factors":
            lambda T, h, i, dt, tr: T * ((h + i) if tr else 0) * s(dt) + 2 * T * i * s(dt),
        "the output of the block is not saved: nothing in this block's backward needs it":
            lambda T, h, i, dt, tr: (T * (h + i) * s(dt) if tr else 0) + 3 * T * i * s(dt) + T * h * s(dt),
        "with frozen weights a linear layer needs only its weight to pass the gradient back (dx = g W): "
        "it does not save its input":
            lambda T, h, i, dt, tr: T * (h + 4 * i) * s(dt),
        "frozen weights do not stop the gradient reaching x: silu and the product still save what they need":
            lambda T, h, i, dt, tr: T * (h + 4 * i) * s(dt) if tr else 0,
        "that is a count of elements: multiply by dtype.itemsize (bytes per element)":
            lambda T, h, i, dt, tr: T * ((h + i) if tr else 0) + 3 * T * i,
    }
    show = lambda c: (f"swiglu_saved_bytes(tokens={c[0]}, hidden={c[1]}, intermediate={c[2]}, "
                      f"dtype={str(c[3]).replace('torch.', '')}, weights_train={c[4]})")
    answers = [fn(*c) for c in cases]
    for answer, case in zip(answers, cases):
        expected = _measured_saved(*case)
        if isinstance(answer, bool) or not isinstance(answer, (int, float)) or answer != expected:
            hint = _diagnose(answers, cases, mistakes)
            raise ExerciseFailed(f"on {show(case)}: autograd saved {expected} bytes, your prediction is {answer!r}"
                                 + (f"; hint: {hint}" if hint else ""))
