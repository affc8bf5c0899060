"""Graders for chapter 8, DoRA.

References are `minilora.dora` and `minilora.lora.LoRALinear(use_dora=True)` (themselves checked against PEFT),
float64 autograd, and exact arithmetic. When an answer is wrong the grader tries the usual slips and names the
one that reproduces the learner's result: the norm over columns instead of rows, the scale forgotten, only B A
normalised, the magnitude applied per input, the norm not detached in backward, the bias rescaled.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from minilora import dora
from minilora.course.grading import (ExerciseFailed, expect_tensor, grader, max_abs_diff, tensor_mistake,
                                     tensors_close)
from minilora.lora import LoRALinear

F64 = torch.float64


def _case(seed: int, n_out: int, n_in: int, r: int):
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(n_out, n_in, generator=gen, dtype=F64)
    a = torch.randn(r, n_in, generator=gen, dtype=F64)
    b = 0.5 * torch.randn(n_out, r, generator=gen, dtype=F64)
    m = w0.norm(dim=1) * (0.8 + 0.4 * torch.rand(n_out, generator=gen, dtype=F64))
    return w0, a, b, m


def _reference_weight(w0, a, b, m, s, detach: bool = True) -> torch.Tensor:
    v = w0 + s * b @ a
    norm = v.norm(dim=1, keepdim=True)
    return m[:, None] * v / (norm.detach() if detach else norm)


# --- 8.1 ------------------------------------------------------------------------------------------------------

@grader("8.1", "dora_weight")
def grade_8_1(fn):
    # a wide layer: the wrong axis fails loudly; a square one: it would run silently, so test both
    for seed, (n_out, n_in, r) in enumerate([(5, 7, 3), (6, 6, 2)]):
        w0, a, b, m = _case(seed, n_out, n_in, r)
        s = 1.5
        what = f"dora_weight(W0 ({n_out}, {n_in}), A ({r}, {n_in}), B ({n_out}, {r}), m ({n_out},), scaling=1.5)"
        got = fn(w0.clone(), a.clone(), b.clone(), m.clone(), s)
        if isinstance(got, torch.Tensor) and tuple(got.shape) == (n_in, n_out) and n_in != n_out:
            raise ExerciseFailed(f"{what} returned shape (in, out) = {(n_in, n_out)}; W' has W0's shape (out, in)")
        got = expect_tensor(what, got, (n_out, n_in))
        expected = dora.dora_merged_weight(w0, s * b @ a, m)[0]
        assert max_abs_diff(expected, _reference_weight(w0, a, b, m, s)) < 1e-12  # the library agrees with the formula
        if max_abs_diff(got, expected) > 1e-9:
            v = w0 + s * b @ a
            ba = s * b @ a
            hint = tensor_mistake(got, [
                ("the norm is over each ROW of the (out, in) weight (dim=1): one length per output feature; "
                 "you normalised the columns (dim=0)", lambda: m[:, None] * v / v.norm(dim=0, keepdim=True)),
                ("m holds one length per output row: multiply rows, m[:, None] * ..., not columns",
                 lambda: m[None, :] * v / v.norm(dim=1, keepdim=True)),
                ("V = W0 + scaling · B A: the scale multiplies the low-rank product",
                 lambda: m[:, None] * (w0 + b @ a) / (w0 + b @ a).norm(dim=1, keepdim=True)),
                ("DoRA normalises the whole adapted weight W0 + s·B A, not B A alone",
                 lambda: m[:, None] * (w0 + ba / ba.norm(dim=1, keepdim=True))),
                ("divide V by its row norms before multiplying by m: W' = m ⊙ V / ‖V‖_row",
                 lambda: m[:, None] * v),
                ("ΔW = B A, shape (out, in); A B or (B A)ᵀ is not it",
                 lambda: m[:, None] * (w0 + s * (b @ a).T) / (w0 + s * (b @ a).T).norm(dim=1, keepdim=True)),
            ], 1e-9)
            raise ExerciseFailed(f"{what}: max |difference| from m ⊙ (W0 + s·B A)/‖W0 + s·B A‖_row is "
                                 f"{max_abs_diff(got, expected):.3g}{hint}")

    # at initialisation (B = 0, m = ‖W0‖_row) DoRA is the base weight
    w0, a, _, _ = _case(3, 4, 5, 2)
    b0, m0 = torch.zeros(4, 2, dtype=F64), w0.norm(dim=1)
    got = expect_tensor("dora_weight at init (B = 0, m = ‖W0‖_row)", fn(w0.clone(), a.clone(), b0, m0, 2.0), (4, 5))
    if max_abs_diff(got, w0) > 1e-12:
        raise ExerciseFailed(f"with B = 0 and m = ‖W0‖_row, W' must equal W0 (DoRA starts as the base layer); "
                             f"max |difference| {max_abs_diff(got, w0):.3g}")

    # backward: the norm is a constant (detached), m and both factors get gradients
    w0, a, b, m = _case(4, 5, 4, 3)
    s = 2.0
    g = torch.randn(5, 4, generator=torch.Generator().manual_seed(9), dtype=F64)
    grads = {}
    for label, detach in (("yours", None), ("detached", True), ("exact", False)):
        leaves = [t.clone().requires_grad_(True) for t in (a, b, m)]
        out = fn(w0.clone(), *leaves[:2], leaves[2], s) if detach is None else \
            _reference_weight(w0, leaves[0], leaves[1], leaves[2], s, detach)
        if label == "yours" and not (isinstance(out, torch.Tensor) and out.requires_grad):
            raise ExerciseFailed("dora_weight's result carries no gradient when A, B and m require one; do not "
                                 "detach the whole result (or m, A, B): only the norm is a constant")
        (out * g).sum().backward()
        grads[label] = [t.grad for t in leaves]
    for name, mine, ref, exact in zip("ABm", grads["yours"], grads["detached"], grads["exact"]):
        if mine is None:
            raise ExerciseFailed(f"after backward, {name}.grad is None: {name} must take part in W' "
                                 "(only ‖V‖_row is detached)")
        if max_abs_diff(mine, ref) > 1e-9:
            hint = ""
            if max_abs_diff(mine, exact) <= 1e-9:
                hint = ("; hint: treat ‖W0 + s·B A‖_row as a constant in backward (.detach() the norm), as the "
                        "DoRA paper (§4.3) and PEFT do; your gradient flows through the norm too")
            raise ExerciseFailed(f"the gradient of {name} differs from DoRA's by up to {max_abs_diff(mine, ref):.3g}{hint}")


# --- 8.2 ------------------------------------------------------------------------------------------------------

@grader("8.2", "magnitude_direction")
def grade_8_2(fn):
    for seed, (n_out, n_in) in enumerate([(4, 6), (5, 5)]):
        gen = torch.Generator().manual_seed(10 + seed)
        w = torch.randn(n_out, n_in, generator=gen, dtype=F64) * torch.linspace(0.5, 3, n_out, dtype=F64)[:, None]
        what = f"magnitude_direction(W ({n_out}, {n_in}))"
        got = fn(w.clone())
        if not (isinstance(got, tuple) and len(got) == 2):
            raise ExerciseFailed(f"{what}: expected a tuple (m, D), got {type(got).__name__}")
        m, d = got
        if isinstance(m, torch.Tensor) and tuple(m.shape) == (n_in,) and n_in != n_out:
            raise ExerciseFailed(f"{what}: m has {n_in} = in entries; DoRA keeps one length per OUTPUT row, "
                                 "a norm over the input axis (dim=1) of the (out, in) weight")
        m = expect_tensor(f"{what}, m", m, (n_out,))
        d = expect_tensor(f"{what}, D", d, (n_out, n_in))
        if max_abs_diff(m, w.norm(dim=1)) > 1e-12:
            hint = ""
            if tensors_close(m, w.norm(dim=0), atol=1e-12):
                hint = ("; hint: those are column norms (dim=0). For nn.Linear's (out, in) weight DoRA's lengths "
                        "are row norms (dim=1); a square matrix hides the mistake because both have the same size")
            elif tensors_close(m, w.square().sum(dim=1), atol=1e-12):
                hint = "; hint: that is the squared norm; take the square root (torch.linalg.vector_norm)"
            raise ExerciseFailed(f"{what}: m should be the L2 norm of every row of W{hint}")
        if max_abs_diff(m[:, None] * d, w) > 1e-12:
            raise ExerciseFailed(f"{what}: m[:, None] * D must give back W exactly; max |difference| "
                                 f"{max_abs_diff(m[:, None] * d, w):.3g}")

    # a row of zeros (real checkpoints have them) must not produce NaN
    w = torch.randn(3, 4, dtype=F64)
    w[1] = 0
    m, d = fn(w.clone())
    if not torch.isfinite(d).all():
        raise ExerciseFailed("W with an all-zero row gave NaN or inf in D: 0 / 0. Give such rows a zero direction, "
                             "e.g. with torch.where or m.clamp_min(tiny); a zero row divided by its zero norm is a "
                             "known cause of NaN at DoRA's first step")
    if max_abs_diff(d[1], torch.zeros(4)) > 0 or float(m[1]) != 0:
        raise ExerciseFailed(f"for an all-zero row expected m = 0 and a zero direction, got m = {float(m[1])!r}, "
                             f"D row {d[1].tolist()}")
    if max_abs_diff(d[[0, 2]].norm(dim=1), torch.ones(2)) > 1e-12:
        raise ExerciseFailed("the non-zero rows of D must have unit length")


# --- 8.3 ------------------------------------------------------------------------------------------------------

def _dm_dd(w0: torch.Tensor, wt: torch.Tensor) -> tuple[float, float]:
    dm = (wt.norm(dim=1) - w0.norm(dim=1)).abs().mean().item()
    dd = (1 - F.cosine_similarity(wt, w0, dim=1)).mean().item()
    return dm, dd


def _pair(got: Any, what: str) -> tuple[float, float]:
    try:
        dm, dd = got
        return float(dm), float(dd)
    except (TypeError, ValueError):
        raise ExerciseFailed(f"{what}: expected a pair of numbers (ΔM, ΔD), got {got!r}") from None


@grader("8.3", "delta_m_delta_d")
def grade_8_3(fn):
    gen = torch.Generator().manual_seed(20)
    w0 = torch.randn(6, 5, generator=gen, dtype=F64)
    # rows grow or shrink by different factors AND turn: both measures are non-zero
    wt = w0 * torch.linspace(0.7, 1.4, 6, dtype=F64)[:, None] + 0.3 * torch.randn(6, 5, generator=gen, dtype=F64)
    what = "delta_m_delta_d(W0 (6, 5), Wt (6, 5))"
    dm, dd = _pair(fn(w0.clone(), wt.clone()), what)
    edm, edd = _dm_dd(w0, wt)
    if not math.isclose(dm, edm, rel_tol=1e-9):
        hint = ""
        cdm = (wt.norm(dim=0) - w0.norm(dim=0)).abs().mean().item()
        if math.isclose(dm, cdm, rel_tol=1e-9):
            hint = "; hint: those are column norms; a magnitude is the norm of a row (one per output feature)"
        elif math.isclose(dm, (wt.norm(dim=1) - w0.norm(dim=1)).mean().item(), rel_tol=1e-9):
            hint = "; hint: take |‖w_t‖ − ‖w_0‖| before averaging, so that growth and shrinkage do not cancel"
        elif math.isclose(dm, (wt - w0).norm(dim=1).mean().item(), rel_tol=1e-9):
            hint = ("; hint: that is the size of the change ‖w_t − w_0‖; ΔM compares the LENGTHS ‖w_t‖ "
                    "and ‖w_0‖")
        raise ExerciseFailed(f"{what}: ΔM expected {edm:.6g}, got {dm:.6g}{hint}")
    if not math.isclose(dd, edd, rel_tol=1e-9):
        hint = ""
        if math.isclose(dd, F.cosine_similarity(wt, w0, dim=1).mean().item(), rel_tol=1e-9):
            hint = "; hint: ΔD is 1 − cos, so that no change gives 0"
        elif math.isclose(dd, (1 - F.cosine_similarity(wt, w0, dim=0)).mean().item(), rel_tol=1e-9):
            hint = "; hint: compare rows (dim=1), the directions of the output features, not columns"
        raise ExerciseFailed(f"{what}: ΔD expected {edd:.6g}, got {dd:.6g}{hint}")
    # two exact facts: scaling rows changes no direction; turning rows keeps their lengths
    scale = torch.linspace(0.5, 2.0, 6, dtype=F64)[:, None]
    dm, dd = _pair(fn(w0.clone(), w0 * scale), "delta_m_delta_d(W0, rows of W0 scaled)")
    if abs(dd) > 1e-12 or not math.isclose(dm, _dm_dd(w0, w0 * scale)[0], rel_tol=1e-9):
        raise ExerciseFailed(f"scaling each row of W0 by a positive factor changes lengths only: expected ΔD = 0 and "
                             f"ΔM = {_dm_dd(w0, w0 * scale)[0]:.6g}, got ΔM = {dm:.6g}, ΔD = {dd:.3g}")
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=F64))
    dm, dd = _pair(fn(w0.clone(), w0 @ q), "delta_m_delta_d(W0, W0 rotated)")
    if abs(dm) > 1e-12 or not math.isclose(dd, _dm_dd(w0, w0 @ q)[1], rel_tol=1e-9):
        raise ExerciseFailed(f"rotating every row (W0 @ Q, Q orthogonal) keeps lengths: expected ΔM = 0 and "
                             f"ΔD = {_dm_dd(w0, w0 @ q)[1]:.6g}, got ΔM = {dm:.3g}, ΔD = {dd:.6g}")


# --- 8.4 ------------------------------------------------------------------------------------------------------

def _build(cls, base: nn.Linear, r: int, alpha: float):
    try:
        layer = cls(base, r=r, alpha=alpha)
    except TypeError as err:
        raise ExerciseFailed(f"TinyDoRA(base, r={r}, alpha={alpha}) failed: {err}; hint: the constructor takes "
                             "(base: nn.Linear, r: int, alpha: float)") from None
    for name in ("A", "B", "m"):
        if not isinstance(getattr(layer, name, None), nn.Parameter):
            raise ExerciseFailed(f"TinyDoRA has no nn.Parameter attribute `{name}`; store self.A, self.B and self.m "
                                 "as nn.Parameter")
    return layer


@grader("8.4", "TinyDoRA")
def grade_8_4(cls):
    torch.manual_seed(0)
    n_in, n_out, r, alpha = 6, 5, 2, 4.0
    base = nn.Linear(n_in, n_out)
    layer = _build(cls, base, r, alpha)
    shapes = {"A": (r, n_in), "B": (n_out, r), "m": (n_out,)}
    for name, shape in shapes.items():
        got = tuple(getattr(layer, name).shape)
        if got != shape:
            extra = "; m has one length per output row" if name == "m" and got == (n_in,) else ""
            raise ExerciseFailed(f"for nn.Linear({n_in}, {n_out}) and r={r}: {name} should have shape {shape}, got "
                                 f"{got}{extra}")
    if torch.count_nonzero(layer.B) != 0 or torch.count_nonzero(layer.A) == 0:
        raise ExerciseFailed("initialise as LoRA does: B = 0, A random (Kaiming-uniform), so that W' = W0 at the start")
    if max_abs_diff(layer.m, base.weight.norm(dim=1)) > 1e-6:
        raise ExerciseFailed("m must start at the row norms of the base weight, base.weight.norm(dim=1)")
    if any(p.requires_grad for p in base.parameters()):
        raise ExerciseFailed("the base layer's weight and bias must be frozen (requires_grad=False)")
    trainable = {id(p) for p in layer.parameters() if p.requires_grad}
    if trainable != {id(layer.A), id(layer.B), id(layer.m)}:
        raise ExerciseFailed(f"expected exactly three trainable parameters (A, B, m), found {len(trainable)}")
    x = torch.randn(3, 4, n_in)
    with torch.no_grad():
        got = expect_tensor("TinyDoRA(x) for x (3, 4, 6)", layer(x), (3, 4, n_out))
        if max_abs_diff(got, base(x)) > 1e-5:
            raise ExerciseFailed(f"at init TinyDoRA(x) must equal base(x); max |difference| {max_abs_diff(got, base(x)):.3g}")

    # move away from the start, then compare outputs and gradients with the library's DoRA layer
    with torch.no_grad():
        layer.B.copy_(0.3 * torch.randn(n_out, r))
        layer.m.mul_(1 + 0.3 * torch.rand(n_out))
    ref = LoRALinear(nn.Linear(n_in, n_out), r=r, lora_alpha=alpha, use_dora=True)
    with torch.no_grad():
        ref.base_layer.load_state_dict(base.state_dict())
        ref.lora_A["default"].copy_(layer.A); ref.lora_B["default"].copy_(layer.B)
        ref.lora_magnitude_vector["default"].copy_(layer.m)
    x = torch.randn(7, n_in)
    g = torch.randn(7, n_out)
    got = expect_tensor("TinyDoRA(x) for x (7, 6)", layer(x), (7, n_out))
    expected = ref(x)
    if max_abs_diff(got, expected) > 1e-5:
        with torch.no_grad():
            s = alpha / r
            v = base.weight + s * layer.B @ layer.A
            scale = layer.m / v.norm(dim=1)
            hint = tensor_mistake(got.detach(), [
                ("the bias is not rescaled: y = (m/‖V‖) ⊙ (V x) + b (PEFT and the paper; torchtune differs)",
                 lambda: scale * F.linear(x, v, base.bias)),
                ("use scale s = alpha / r on B A", lambda: (layer.m / (base.weight + layer.B @ layer.A).norm(dim=1))
                 * F.linear(x, base.weight + layer.B @ layer.A) + base.bias),
                ("the norm is over rows (dim=1) of V", lambda: F.linear(x, layer.m[:, None] * v / v.norm(dim=0)) +
                 base.bias),
                ("forgot the bias of the base layer", lambda: scale * F.linear(x, v)),
            ], 1e-5)
        raise ExerciseFailed(f"with B ≠ 0 and m ≠ ‖W0‖: max |difference| from (m/‖V‖_row) ⊙ (V x) + b is "
                             f"{max_abs_diff(got, expected):.3g}{hint}")
    layer.zero_grad(set_to_none=True)
    (layer(x) * g).sum().backward()
    (ref(x) * g).sum().backward()
    pairs = {"A": (layer.A.grad, ref.lora_A["default"].grad), "B": (layer.B.grad, ref.lora_B["default"].grad),
             "m": (layer.m.grad, ref.lora_magnitude_vector["default"].grad)}
    for name, (mine, theirs) in pairs.items():
        if mine is None:
            raise ExerciseFailed(f"after backward {name}.grad is None: is {name} used in forward?")
        if max_abs_diff(mine, theirs) > 1e-5 * max(1.0, theirs.abs().max().item()):
            hint = ""
            if name in "AB":
                hint = ("; hint: is ‖V‖_row detached? DoRA treats the norm as a constant in backward "
                        "(norm = V.norm(dim=1).detach())")
            raise ExerciseFailed(f"the gradient of {name} differs from DoRA's by up to {max_abs_diff(mine, theirs):.3g}{hint}")
