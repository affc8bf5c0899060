"""Graders for chapter 2, the LoRA layer.

References are `minilora.lora` (the layer and its `lora_matmul`), autograd in float64, and exact
arithmetic. When an answer is wrong the grader tries the usual slips (no scaling, alpha/√r for alpha/r,
alpha // r, W instead of Wᵀ, A and B swapped at init, ΔW = A B, gradients without the scaling, float32
arithmetic on the float64 cases) and names the one that reproduces the learner's result.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from minilora.course.grading import (ExerciseFailed, expect_tensor, expect_value_error, float32_hint, grader,
                                     max_abs_diff, tensor_mistake)
from minilora.lora import LoRALinear, lora_matmul

F64 = torch.float64


def _case(seed: int, n_in: int = 6, n_out: int = 5, r: int = 3, batch: tuple[int, ...] = (2, 4)):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, n_in, generator=gen, dtype=F64)
    w0 = torch.randn(n_out, n_in, generator=gen, dtype=F64)
    a = torch.randn(r, n_in, generator=gen, dtype=F64)
    b = torch.randn(n_out, r, generator=gen, dtype=F64)
    return x, w0, a, b


# --- 2.1 ------------------------------------------------------------------------------------------------------

@grader("2.1", "lora_forward")
def grade_2_1(fn):
    x, w0, a, b = _case(0)
    alpha, r = 10.0, 3  # alpha not a multiple of r, so that alpha // r is caught
    try:
        got = fn(x.clone(), w0.clone(), a.clone(), b.clone(), alpha, r)
    except NotImplementedError:
        raise
    except RuntimeError as err:
        raise ExerciseFailed(f"lora_forward(x (2, 4, 6), W0 (5, 6), A (3, 6), B (5, 3), alpha=10, r=3) raised: {err}; "
                             "hint: weights are stored (out, in) as in nn.Linear, so a row x meets W0 as x @ W0.T, "
                             "and the branch is (x @ A.T) @ B.T") from None
    got = expect_tensor("lora_forward(x (2, 4, 6), W0 (5, 6), A (3, 6), B (5, 3), alpha=10, r=3)", got, (2, 4, 5))
    expected = F.linear(x, w0) + lora_matmul(x, a, b, alpha / r)
    if max_abs_diff(got, expected) > 1e-9:
        hint = tensor_mistake(got, [
            ("alpha // r is floor division (10 // 3 = 3); the scale is alpha / r = 3.33…",
             lambda: F.linear(x, w0) + lora_matmul(x, a, b, alpha // r)),
            ("scale the low-rank branch by alpha / r", lambda: F.linear(x, w0) + lora_matmul(x, a, b, 1.0)),
            ("the plain LoRA scale is alpha / r; alpha / √r is rsLoRA",
             lambda: F.linear(x, w0) + lora_matmul(x, a, b, alpha / math.sqrt(r))),
            ("the scale multiplies the low-rank branch only, not W0 x",
             lambda: (F.linear(x, w0) + lora_matmul(x, a, b, 1.0)) * (alpha / r)),
            ("you scaled by r / alpha; the LoRA scale is alpha / r",
             lambda: F.linear(x, w0) + lora_matmul(x, a, b, r / alpha)),
        ], 1e-9) or float32_hint(got, expected, 1e-9)
        raise ExerciseFailed(f"lora_forward on a (2, 4, 6) batch: max |difference| from W0 x + (alpha/r)·B A x "
                             f"is {max_abs_diff(got, expected):.3g}{hint}")
    # a square W0 lets a transposed weight run without a shape error, so check for it explicitly
    x, w0, a, b = _case(1, n_in=4, n_out=4, r=2, batch=(3,))
    got = expect_tensor("lora_forward(x (3, 4), W0 (4, 4), A (2, 4), B (4, 2), alpha=2, r=2)",
                  fn(x.clone(), w0.clone(), a.clone(), b.clone(), 2.0, 2), (3, 4))
    expected = F.linear(x, w0) + lora_matmul(x, a, b, 1.0)
    if max_abs_diff(got, expected) > 1e-9:
        hint = tensor_mistake(got, [
            ("a row of x times W0ᵀ: y = x @ W0.T (W0 is (out, in), as in nn.Linear)",
             lambda: x @ w0 + lora_matmul(x, a, b, 1.0)),
            ("the update is B A (first A: in → r, then B: r → out), so y = x Aᵀ Bᵀ per row",
             lambda: F.linear(x, w0) + x @ (a.T @ b.T).T),
        ], 1e-9) or float32_hint(got, expected, 1e-9)
        raise ExerciseFailed("lora_forward with a square W0 (4×4): max |difference| from x W0ᵀ + (alpha/r)·x Aᵀ Bᵀ "
                             f"is {max_abs_diff(got, expected):.3g}{hint}")
    gen = torch.Generator().manual_seed(5)
    big_x, big_w = torch.randn(2, 64, generator=gen), torch.randn(64, 64, generator=gen)
    big_a, big_b = torch.randn(4, 64, generator=gen), torch.randn(64, 4, generator=gen)
    got = fn(big_x, big_w, big_a, big_b, 8.0, 4)
    if isinstance(got, torch.Tensor) and got.dtype != torch.float32:
        raise ExerciseFailed(f"lora_forward on float32 inputs returned {got.dtype}; keep the input's dtype")


# --- 2.2 ------------------------------------------------------------------------------------------------------

def _make(cls, n_in: int, n_out: int, r: int, alpha: float, seed: int = 0):
    torch.manual_seed(seed)
    base = nn.Linear(n_in, n_out)
    try:
        layer = cls(base, r=r, alpha=alpha)
    except TypeError as err:
        raise ExerciseFailed(f"TinyLoRA(base, r={r}, alpha={alpha}) failed: {err}; hint: the constructor takes "
                             "(base: nn.Linear, r: int, alpha: float)") from None
    for name in ("A", "B"):
        if not isinstance(getattr(layer, name, None), nn.Parameter):
            raise ExerciseFailed(f"TinyLoRA has no nn.Parameter attribute `{name}`; store the factors as "
                                 "self.A = nn.Parameter(...) and self.B = nn.Parameter(...)")
    return base, layer


@grader("2.2", "TinyLoRA")
def grade_2_2(cls):
    n_in, n_out, r, alpha = 6, 5, 3, 7.0  # alpha not a multiple of r, so that alpha // r is caught
    base, layer = _make(cls, n_in, n_out, r, alpha)
    A, B = layer.A, layer.B
    if tuple(A.shape) == (n_out, r) and tuple(B.shape) == (r, n_in):
        raise ExerciseFailed("A has shape (out, r) and B (r, in): the names are swapped. In LoRA, A (r, in) "
                             "is the down-projection that reads x, B (out, r) the up-projection that writes y")
    if tuple(A.shape) != (r, n_in) or tuple(B.shape) != (n_out, r):
        raise ExerciseFailed(f"for base nn.Linear({n_in}, {n_out}) and r={r}: expected A of shape {(r, n_in)} and "
                             f"B of shape {(n_out, r)}, got {tuple(A.shape)} and {tuple(B.shape)}")
    if torch.count_nonzero(A) == 0 and torch.count_nonzero(B) > 0:
        raise ExerciseFailed("A is zero and B random: the init is swapped. ΔW = B A is zero either way, but with "
                             "A = 0 the first gradient of B vanishes instead; LoRA's convention (and PEFT's) "
                             "is B = 0, A random")
    if torch.count_nonzero(B) != 0:
        raise ExerciseFailed("B must start at zero, so that ΔW = B A = 0 and the layer starts as the base layer")
    if torch.count_nonzero(A) == 0:
        raise ExerciseFailed("A is all zeros: then B A stays zero and neither factor ever gets a gradient. "
                             "Initialise A randomly (Kaiming-uniform, as nn.Linear does)")
    trainable = {id(p) for p in layer.parameters() if p.requires_grad}
    if any(p.requires_grad for p in base.parameters()):
        raise ExerciseFailed("the base layer's weight (or bias) still has requires_grad=True; freeze it: "
                             "only A and B train")
    if trainable != {id(A), id(B)}:
        raise ExerciseFailed(f"expected exactly two trainable parameters (A and B), found {len(trainable)}")

    # Kaiming-uniform(a=√5) on an (r, in) weight is U(−1/√in, 1/√in): check on a larger layer
    _, big = _make(cls, 256, 32, 16, 16.0, seed=1)
    bound, std = 1 / math.sqrt(256), big.A.detach().double().std().item()
    if big.A.detach().abs().max().item() > bound * (1 + 1e-5) or not 0.9 < std / (bound / math.sqrt(3)) < 1.1:
        hint = ""
        if math.isclose(std, 1 / 16, rel_tol=0.1):
            hint = "; hint: that is N(0, 1/r²), PEFT's 'gaussian' option; the default is Kaiming-uniform"
        elif math.isclose(std, 1 / 4, rel_tol=0.1):
            hint = "; hint: std 1/√r is not LoRA's init; the default is Kaiming-uniform over fan_in = in"
        elif math.isclose(std, 1.0, rel_tol=0.1):
            hint = "; hint: torch.randn gives std 1, far too large; use nn.init.kaiming_uniform_(A, a=math.sqrt(5))"
        raise ExerciseFailed(f"for in=256 the entries of A should be U(−1/√256, 1/√256) = U(−0.0625, 0.0625) "
                             f"(nn.init.kaiming_uniform_(A, a=math.sqrt(5))); got max |A| = "
                             f"{big.A.detach().abs().max().item():.4f}, std {std:.4f}{hint}")

    x = torch.randn(2, 3, n_in)
    with torch.no_grad():
        same = layer(x)
        if max_abs_diff(same, base(x)) > 1e-6:
            raise ExerciseFailed("at init (B = 0) TinyLoRA(x) must equal base(x) exactly; max |difference| = "
                                 f"{max_abs_diff(same, base(x)):.3g}")
        layer.B.copy_(torch.randn(n_out, r))
        got = expect_tensor("TinyLoRA(x) for x of shape (2, 3, 6)", layer(x), (2, 3, n_out))
        s = alpha / r
        expected = base(x) + lora_matmul(x, layer.A, layer.B, s)
        if max_abs_diff(got, expected) > 1e-5:
            hint = tensor_mistake(got, [
                ("alpha // r is floor division (7 // 3 = 2); the scale is alpha / r = 2.33…",
                 lambda: base(x) + lora_matmul(x, layer.A, layer.B, alpha // r)),
                ("scale the low-rank branch by alpha / r", lambda: base(x) + lora_matmul(x, layer.A, layer.B, 1.0)),
                ("the plain LoRA scale is alpha / r; alpha / √r is rsLoRA",
                 lambda: base(x) + lora_matmul(x, layer.A, layer.B, alpha / math.sqrt(r))),
                ("keep the base layer's bias: call self.base(x), not x @ W.T",
                 lambda: F.linear(x, base.weight) + lora_matmul(x, layer.A, layer.B, s)),
            ], 1e-5)
            raise ExerciseFailed(f"with B ≠ 0, TinyLoRA(x) differs from base(x) + (alpha/r)·x Aᵀ Bᵀ by up to "
                                 f"{max_abs_diff(got, expected):.3g}{hint}")
        # the reference layer with the same factors gives the same output (a check of the grader itself)
        ref = LoRALinear(base, r=r, lora_alpha=alpha)
        ref.lora_A["default"].copy_(layer.A)
        ref.lora_B["default"].copy_(layer.B)
        assert max_abs_diff(ref(x), expected) < 1e-5
        layer.B.zero_()
    layer.zero_grad(set_to_none=True)
    layer(x).square().sum().backward()
    if layer.A.grad is None or layer.B.grad is None:
        raise ExerciseFailed("after backward A.grad or B.grad is None: are A and B used in forward?")
    if torch.count_nonzero(layer.A.grad) != 0 or torch.count_nonzero(layer.B.grad) == 0:
        raise ExerciseFailed("at init the gradient of A must be exactly zero (it is multiplied by B = 0) and the "
                             "gradient of B non-zero; yours is not")


# --- 2.3 ------------------------------------------------------------------------------------------------------

@grader("2.3", "merge_lora")
def grade_2_3(fn):
    x, w0, a, b = _case(2, n_in=6, n_out=5, r=3, batch=(4,))
    s = 0.75
    w0_before = w0.clone()
    got = expect_tensor("merge_lora(W0 (5, 6), A (3, 6), B (5, 3), scaling=0.75)", fn(w0, a.clone(), b.clone(), s),
                  (5, 6))
    if not torch.equal(w0, w0_before):
        raise ExerciseFailed("merge_lora changed W0 in place; return a new tensor and leave W0 as it was "
                             "(so that the adapter can still be switched off)")
    expected = w0 + s * (b @ a)
    if max_abs_diff(got, expected) > 1e-9:
        hint = tensor_mistake(got, [
            ("multiply ΔW = B A by the scaling", lambda: w0 + b @ a),
            ("the update is W0 + s·B A; you subtracted it", lambda: w0 - s * (b @ a)),
            ("B A has shape (out, in) like W0; (B A)ᵀ would be (in, out)", lambda: w0 + s * (b @ a).T),
        ], 1e-9) or float32_hint(got, expected, 1e-9)
        raise ExerciseFailed(f"merge_lora: max |difference| from W0 + s·B A is {max_abs_diff(got, expected):.3g}{hint}")
    merged_out = F.linear(x, got.to(F64))
    adapter_out = F.linear(x, w0) + lora_matmul(x, a, b, s)
    assert max_abs_diff(merged_out, adapter_out) < 1e-9  # merging changes nothing a caller can see
    half = torch.randn(5, 6, dtype=torch.bfloat16)
    got = fn(half, torch.randn(3, 6), torch.randn(5, 3), 2.0)
    if not isinstance(got, torch.Tensor) or got.dtype != torch.bfloat16:
        raise ExerciseFailed("merging into a bfloat16 W0 must give a bfloat16 weight (the layer stores W0's dtype); "
                             f"got {getattr(got, 'dtype', type(got).__name__)}")


# --- 2.4 ------------------------------------------------------------------------------------------------------

@grader("2.4", "lora_scaling")
def grade_2_4(fn):
    cases = [(16, 8, False), (16, 8, True), (8, 4, False), (32, 256, True), (32, 256, False), (1, 1, True)]
    for alpha, r, rs in cases:
        expected = alpha / math.sqrt(r) if rs else alpha / r
        # the library computes the same number (a check of the grader itself), on a layer as wide as the rank
        assert math.isclose(LoRALinear(nn.Linear(r, r), r=r, lora_alpha=alpha, use_rslora=rs).scaling["default"],
                            expected)
        got = fn(alpha, r, rslora=rs)
        try:
            ok = math.isclose(float(got), expected, rel_tol=1e-12)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            hint = ""
            if rs and math.isclose(float(got), alpha / r):
                hint = "; hint: rsLoRA divides by √r, not r"
            elif not rs and math.isclose(float(got), alpha / math.sqrt(r)):
                hint = "; hint: plain LoRA divides by r; √r is rsLoRA"
            elif math.isclose(float(got), r / alpha if not rs else math.sqrt(r) / alpha):
                hint = "; hint: alpha goes on top: scaling = alpha / r"
            raise ExerciseFailed(f"lora_scaling({alpha}, {r}, rslora={rs}): expected {expected!r}, got {got!r}{hint}")
    for bad in [(16, 0), (16, -4), (16, 2.5), (0, 8), (-1, 8)]:
        expect_value_error(fn, bad, f"lora_scaling{bad}", "what is allowed: r a positive int, alpha > 0")


# --- 2.5 ------------------------------------------------------------------------------------------------------

@grader("2.5", "lora_grads")
def grade_2_5(fn):
    for seed, zero_b in [(3, False), (4, True)]:
        x, _, a, b = _case(seed, n_in=6, n_out=5, r=3, batch=(4,))
        if zero_b:
            b = torch.zeros_like(b)
        s = 2.5
        gen = torch.Generator().manual_seed(seed + 10)
        g = torch.randn(4, 5, generator=gen, dtype=F64)
        a_ref, b_ref = a.clone().requires_grad_(), b.clone().requires_grad_()
        (lora_matmul(x, a_ref, b_ref, s) * g).sum().backward()  # dL/dy = g
        out = fn(x.clone(), g.clone(), a.clone(), b.clone(), s)
        if not isinstance(out, tuple) or len(out) != 2:
            raise ExerciseFailed("lora_grads must return a pair (grad_A, grad_B)")
        grad_a = expect_tensor("grad_A", out[0], (3, 6))
        grad_b = expect_tensor("grad_B", out[1], (5, 3))
        where = "with B = 0" if zero_b else "with random B"
        if max_abs_diff(grad_b, b_ref.grad) > 1e-9:
            hint = tensor_mistake(grad_b, [
                ("the scaling multiplies the branch, so it multiplies both gradients too",
                 lambda: b_ref.grad / s),
            ], 1e-9) or float32_hint(grad_b, b_ref.grad, 1e-9)
            raise ExerciseFailed(f"grad_B {where}: max |difference| from autograd is {max_abs_diff(grad_b, b_ref.grad):.3g}"
                                 f"{hint or '; hint: dL/dB = s · Gᵀ (x Aᵀ), the output gradient paired with the r-dim activations'}")
        if max_abs_diff(grad_a, a_ref.grad) > 1e-9:
            hint = tensor_mistake(grad_a, [
                ("the scaling multiplies the branch, so it multiplies both gradients too",
                 lambda: a_ref.grad / s),
            ], 1e-9) or float32_hint(grad_a, a_ref.grad, 1e-9)
            raise ExerciseFailed(f"grad_A {where}: max |difference| from autograd is {max_abs_diff(grad_a, a_ref.grad):.3g}"
                                 f"{hint or '; hint: dL/dA = s · Bᵀ Gᵀ x (it passes through B)'}")
