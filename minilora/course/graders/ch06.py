"""Graders for chapter 6, QLoRA.

Answers come from `minilora.nf4` (whose bytes equal bitsandbytes') and from exact arithmetic. When an answer is
wrong the grader tries the usual slips (no scaling, scaling the whole output, a dequantized weight in the wrong
dtype, saving the dense weight for backward, 4.5 or 4 bits instead of 4.127, 16-bit adapters, GB for GiB,
forgetting the layer that checkpointing recomputes) and names the one that was made.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from minilora.course.grading import ExerciseFailed, expect_number, first_mistake, grader, tensors_close
from minilora.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4
from minilora.profiling import SavedTensorBytes

NF4_DQ_BYTES = (4 + 8 / 64 + 32 / (64 * 256)) / 8  # bytes per weight: NF4, blocksize 64, double quantization


# --- 6.1 the QLoRA forward pass ----------------------------------------------------------------------------------

def _qlora_cases() -> list[tuple[str, Tensor, NF4Tensor, Tensor, Tensor, float]]:
    g = torch.Generator().manual_seed(6)
    cases = []
    for lead, d_in, d_out, r, scaling, dtype in [((3,), 16, 24, 4, 2.0, torch.float32),
                                                 ((2, 5), 64, 40, 8, 0.5, torch.float32),
                                                 ((4,), 32, 48, 2, 1.5, torch.bfloat16)]:
        q = quantize_nf4(torch.randn(d_out, d_in, generator=g), blocksize=64, double_quant=True)
        A = (0.2 * torch.randn(r, d_in, generator=g)).to(dtype)
        B = (0.2 * torch.randn(d_out, r, generator=g)).to(dtype)
        x = torch.randn(*lead, d_in, generator=g).to(dtype)
        desc = f"x {tuple(x.shape)} {str(dtype).replace('torch.', '')}, W ({d_out}, {d_in}) in NF4, r={r}, scaling={scaling}"
        cases.append((desc, x, q, A, B, scaling))
    return cases


@grader("6.1", "qlora_forward")
def grade_6_1(fn):
    for desc, x, q, A, B, s in _qlora_cases():
        w_hat = dequantize_nf4(q, x.dtype)
        base, update = F.linear(x, w_hat), F.linear(F.linear(x, A), B)
        expected = base + s * update
        try:
            got = fn(x.clone(), q, A.clone(), B.clone(), s)
        except NotImplementedError:
            raise
        except RuntimeError as err:
            hint = ("rebuild Ŵ in x's dtype: dequantize_nf4(q, x.dtype)" if "dtype" in str(err) else
                    "W is (out, in), A is (r, in), B is (out, r), and F.linear(x, M) computes x Mᵀ")
            raise ExerciseFailed(f"on {desc}: your function raised RuntimeError: {err}; hint: {hint}") from None
        if not isinstance(got, Tensor):
            raise ExerciseFailed(f"on {desc}: expected a tensor, got {type(got).__name__}")
        if got.shape != expected.shape:
            raise ExerciseFailed(f"on {desc}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}")
        if got.dtype != x.dtype:
            raise ExerciseFailed(f"on {desc}: the output should have x's dtype ({x.dtype}), got {got.dtype}; hint: "
                                 "dequantize_nf4(q, x.dtype) rebuilds Ŵ in the compute dtype")
        if not tensors_close(got, expected):
            mistakes = {
                "the low-rank update is multiplied by `scaling` (alpha / r)": base + update,
                "only the adapter's update is scaled, not the base output": s * (base + update),
                "the adapter adds x Aᵀ Bᵀ (first A: in -> r, then B: r -> out)": base,
                "the base output uses the dequantized weight Ŵ: x Ŵᵀ": s * update,
            }
            hint = next((h for h, v in mistakes.items() if tensors_close(got, v)), None)
            err = (got.float() - expected.float()).abs().max().item()
            raise ExerciseFailed(f"on {desc}: max |got - expected| = {err:.3g}" + (f"; hint: {hint}" if hint else ""))


# --- 6.2 an autograd.Function that rebuilds Ŵ in backward ----------------------------------------------------------

def _dense_attributes(node: Any, numel: int) -> list[str]:
    """Names of tensors the learner's ctx holds as attributes with `numel` elements (a dense Ŵ)."""
    found = []
    for name, value in vars(node).items():
        if isinstance(value, Tensor) and value.numel() == numel:
            found.append(name)
    return found


@grader("6.2", "DequantLinearFn")
def grade_6_2(fn):
    if not (isinstance(fn, type) and issubclass(fn, torch.autograd.Function)):
        raise ExerciseFailed(f"expected a subclass of torch.autograd.Function, got {fn!r}")
    g = torch.Generator().manual_seed(7)
    for lead, d_in, d_out, dtype in [((3, 5), 32, 48, torch.float32), ((7,), 64, 16, torch.float32),
                                     ((2, 3), 32, 64, torch.bfloat16)]:
        q = quantize_nf4(torch.randn(d_out, d_in, generator=g), blocksize=64, double_quant=True)
        x = torch.randn(*lead, d_in, generator=g).to(dtype)
        grad = torch.randn(*lead, d_out, generator=g).to(dtype)
        desc = f"x {tuple(x.shape)} {str(dtype).replace('torch.', '')}, W ({d_out}, {d_in}) in NF4"
        w_hat = dequantize_nf4(q, dtype)
        xg = x.clone().requires_grad_(True)
        with SavedTensorBytes() as saved:
            y = fn.apply(xg, q)
        if not isinstance(y, Tensor) or not tensors_close(y, F.linear(x, w_hat)):
            raise ExerciseFailed(f"on {desc}: forward should return x Ŵᵀ of shape {(*lead, d_out)}, got "
                                 f"{tuple(y.shape) if isinstance(y, Tensor) else y!r}")
        if y.dtype != dtype:
            raise ExerciseFailed(f"on {desc}: forward should return x's dtype {dtype}, got {y.dtype}; hint: "
                                 "dequantize_nf4(q, x.dtype)")
        if y.grad_fn is None:
            raise ExerciseFailed(f"on {desc}: the output has no gradient history; hint: compute y from x inside "
                                 "forward (no .detach() or torch.no_grad()), autograd connects it to backward")
        kept = _dense_attributes(y.grad_fn, d_out * d_in)
        if saved.bytes >= d_out * d_in * w_hat.element_size() or kept:
            where = f"ctx.{kept[0]}" if kept else "save_for_backward"
            raise ExerciseFailed(f"on {desc}: the dense Ŵ ({d_out}x{d_in}) is kept for backward (via {where}); "
                                 "hint: keep only the 4-bit tensor (ctx.q = q) and dequantize again in backward")
        if saved.bytes:
            raise ExerciseFailed(f"on {desc}: {saved.bytes} bytes saved for backward; hint: dL/dx = g Ŵ needs "
                                 "neither x nor Ŵ from the forward pass, only the 4-bit tensor (ctx.q = q)")
        try:
            y.backward(grad)
        except NotImplementedError:
            raise
        except RuntimeError as err:
            hint = ("grad_out is (..., out) and Ŵ is (out, in): grad_out @ Ŵ, no transpose"
                    if "cannot be multiplied" in str(err) else
                    "backward returns one gradient per forward input: (grad_x, None), with grad_x = grad_out @ Ŵ")
            raise ExerciseFailed(f"on {desc}: backward raised RuntimeError: {err}; hint: {hint}") from None
        expected = grad @ w_hat
        if xg.grad is None or not tensors_close(xg.grad, expected):
            got = None if xg.grad is None else tuple(xg.grad.shape)
            hint = ("grad_out: (..., out) times Ŵ: (out, in) gives (..., in); no transpose" if got == expected.shape
                    else "backward must return the gradient for x first")
            raise ExerciseFailed(f"on {desc}: dL/dx should be grad_out @ Ŵ, shape {tuple(expected.shape)}; got "
                                 f"{'no gradient' if got is None else 'a different tensor of shape ' + str(got)}; "
                                 f"hint: {hint}")


# --- 6.3 QLoRA training state in bytes -----------------------------------------------------------------------------

def _state(n_params: int, shapes: list[tuple[int, int]], layers: int, r: int,
           nf4: float = NF4_DQ_BYTES, rest: float = 2, adapter: float = 16, rank_params: Callable | None = None) -> float:
    linear = layers * sum(a * b for a, b in shapes)
    per = rank_params or (lambda a, b: r * (a + b))
    adapters = layers * sum(per(a, b) for a, b in shapes)
    return linear * nf4 + (n_params - linear) * rest + adapters * adapter


_LLAMA7 = [(4096, 4096)] * 4 + [(4096, 11008)] * 2 + [(11008, 4096)]


@grader("6.3", "qlora_memory_bytes")
def grade_6_3(fn):
    cases = [(10_000, [(16, 32), (32, 16)], 2, 4), (1_000_000, [(64, 64)] * 4 + [(64, 176)] * 2 + [(176, 64)], 3, 8),
             (6_738_415_616, _LLAMA7, 32, 16), (6_738_415_616, _LLAMA7, 32, 64)]
    mistakes = {
        "with double quantization a weight costs 4 + 8/64 + 32/(64·256) bits, not 4.5 (that is one float32 "
        "absmax per 64 weights)": lambda *c: _state(*c, nf4=4.5 / 8),
        "NF4 also stores block scales: about 4.127 bits per weight, not 4": lambda *c: _state(*c, nf4=0.5),
        "only the projections are 4-bit: the other n_params - (linear weights) stay 2 bytes each":
            lambda *c: _state(*c, rest=NF4_DQ_BYTES),
        "the adapters are fp32 with fp32 gradients and two fp32 Adam moments: 4 + 4 + 8 = 16 bytes each":
            lambda *c: _state(*c, adapter=12),
        "16-bit adapters are a choice; here they are fp32 (16 bytes per adapter parameter with Adam)":
            lambda *c: _state(*c, adapter=8),
        "an adapter on an (in, out) projection has r·(in + out) parameters (A: r x in, B: out x r), not r·in·out":
            lambda *c: _state(*c, rank_params=lambda a, b: c[3] * a * b),
        "the linear shapes are per layer: multiply by n_layers": lambda n, s, L, r: _state(n, s, 1, r),
    }
    for case in cases:
        n, shapes, layers, r = case
        expected = _state(*case)
        what = f"on qlora_memory_bytes({n:_}, {len(shapes)} projections per layer, n_layers={layers}, r={r})"
        value = expect_number(what, fn(n, list(shapes), layers, r))
        if not math.isclose(value, expected, rel_tol=1e-9):
            hint = first_mistake(value, case, mistakes)
            raise ExerciseFailed(f"{what}: expected {expected:,.1f} bytes, got {value:,.6g}"
                                 + (f"; hint: {hint}" if hint else ""))


# --- 6.4 does it fit? ----------------------------------------------------------------------------------------------

def _activations(tokens: int, hidden: int, layers: int, per_token: float, checkpointing: bool) -> float:
    if checkpointing:
        return tokens * (layers * hidden * 2 + per_token)
    return tokens * layers * per_token


def _fits(state: float, ckpt: bool, tokens: int, hidden: int, n_layers: int, layer_bytes_per_token: float,
          gpu_gib: float, input_bytes: int = 2, recompute: bool = True, unit: float = 2**30,
          strict: bool = False) -> bool:
    if ckpt:
        act = tokens * (n_layers * hidden * input_bytes + (layer_bytes_per_token if recompute else 0))
    else:
        act = tokens * n_layers * layer_bytes_per_token
    total, capacity = state + act, gpu_gib * unit
    return total < capacity if strict else total <= capacity


_FITS_SLIPS: dict[str, Callable[..., bool]] = {
    "a GPU's memory is counted in GiB: 48 GiB = 48 · 2³⁰ bytes, not 48 · 10⁹":
        lambda st, ck, **kw: _fits(st, ck, unit=1e9, **kw),
    "the layer inputs kept under checkpointing are bf16: 2 bytes per number, not 4":
        lambda st, ck, **kw: _fits(st, ck, input_bytes=4, **kw),
    "during backward one layer's activations are rebuilt on top of the kept inputs: add layer_bytes_per_token":
        lambda st, ck, **kw: _fits(st, ck, recompute=False, **kw),
    "a run that needs exactly the GPU's memory fits (<=, not <)": lambda st, ck, **kw: _fits(st, ck, strict=True, **kw),
}


@grader("6.4", "fits_on_gpu")
def grade_6_4(fn):
    base = dict(tokens=512, hidden=8192, n_layers=80, layer_bytes_per_token=400_000.0, gpu_gib=48.0)
    capacity = 48 * 2**30
    act_ckpt = _activations(512, 8192, 80, 400_000.0, True)
    act_full = _activations(512, 8192, 80, 400_000.0, False)
    cases = [  # (state_bytes, checkpointing, expected, hint if wrong)
        (capacity - act_ckpt, True, True,
         "fits means state + activations <= gpu_gib · 2³⁰ bytes (equality fits); the layer inputs kept under "
         "checkpointing are bf16, 2 bytes per number"),
        (capacity - act_ckpt + 1, True, False,
         "with checkpointing the GPU keeps every layer's bf16 input (n_layers · hidden · 2 bytes per token) AND "
         "rebuilds one layer's activations (layer_bytes_per_token per token) during backward"),
        (48.5e9, True, True, "a GPU's memory is counted in GiB: 48 GiB = 48 · 2³⁰ bytes, not 48 · 10⁹"),
        (capacity - act_full, False, True, "without checkpointing every layer keeps all its activations: "
         "tokens · n_layers · layer_bytes_per_token"),
        (capacity - act_full + 1, False, False, "without checkpointing every layer keeps all its activations: "
         "tokens · n_layers · layer_bytes_per_token"),
        (capacity - act_ckpt + 1, False, False, "without checkpointing the activations are much larger"),
    ]
    answers = []
    for state, ckpt, expected, hint in cases:
        got = fn(state, checkpointing=ckpt, **base)
        if not isinstance(got, bool) and type(got).__name__ != "bool_":
            raise ExerciseFailed(f"on fits_on_gpu(state_bytes={state:,.0f}, ...): expected True or False, got {got!r}")
        answers.append(bool(got))
    for (state, ckpt, expected, hint), got in zip(cases, answers):
        if got != expected:
            # name the slip whose answers on every case are exactly the learner's, else the case's own hint
            slip = next((h for h, wrong in _FITS_SLIPS.items()
                         if [wrong(st, ck, **base) for st, ck, _, _ in cases] == answers), hint)
            raise ExerciseFailed(f"on fits_on_gpu(state_bytes={state:,.0f}, tokens=512, hidden=8192, n_layers=80, "
                                 f"layer_bytes_per_token=400000, gpu_gib=48, checkpointing={ckpt}): expected "
                                 f"{expected}, got {got}; hint: {slip}")
    for tokens in (1, 2048):  # a smaller GPU, checkpointing left at its default
        act = _activations(tokens, 4096, 32, 150_000.0, True)
        for extra, expected in ((0, True), (1, False)):
            state = 16 * 2**30 - act + extra
            got = fn(state, tokens=tokens, hidden=4096, n_layers=32, layer_bytes_per_token=150_000.0, gpu_gib=16.0)
            if bool(got) != expected:
                raise ExerciseFailed(f"on fits_on_gpu(state_bytes={state:,.0f}, tokens={tokens}, hidden=4096, "
                                     f"n_layers=32, layer_bytes_per_token=150000, gpu_gib=16): expected {expected}, "
                                     f"got {got}; hint: checkpointing=True is the default, and activations grow "
                                     "with the number of tokens")
