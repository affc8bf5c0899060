"""Graders for chapter 1, why weight updates are low rank.

Answers come from exact arithmetic (parameter counts), from float64 singular value decompositions, or from
`minilora.lora.LoRALinear` itself. When an answer is wrong the grader tries the usual slips (2·d·r for a
non-square matrix, singular values not squared, U and Vᵀ mixed up, the smallest instead of the largest
singular values, P transposed) and names the one that reproduces the learner's number.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from minilora.course.grading import ExerciseFailed, expect_equal, expect_value_error, grader
from minilora.lora import LoRALinear

F64 = torch.float64


def _as_float(what: str, got: Any) -> float:
    try:
        value = float(got)
    except (TypeError, ValueError, RuntimeError):
        raise ExerciseFailed(f"{what}: expected a number, got {got!r}") from None
    if not math.isfinite(value):
        raise ExerciseFailed(f"{what}: expected a finite number, got {value!r}")
    return value


def _as_tensor(what: str, got: Any, shape: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(got, torch.Tensor):
        raise ExerciseFailed(f"{what}: expected a torch.Tensor of shape {shape}, got {type(got).__name__}")
    if tuple(got.shape) != shape:
        raise ExerciseFailed(f"{what}: expected shape {shape}, got {tuple(got.shape)}")
    return got


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.to(F64) - b.to(F64)).abs().max().item()


def _first_match(got: float, case: tuple, mistakes: list[tuple[str, Callable[..., float]]]) -> str:
    """'; hint: ...' for the first slip that reproduces `got` on `case`, else ''."""
    for hint, wrong in mistakes:
        try:
            if math.isclose(got, float(wrong(*case)), rel_tol=1e-9, abs_tol=1e-12):
                return f"; hint: {hint}"
        except (TypeError, ValueError, ZeroDivisionError, RuntimeError):
            continue
    return ""


def _singular_values(seed: int) -> torch.Tensor:
    """Singular values of a small random matrix with a decaying spectrum, sorted descending (float64)."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(12, 7, generator=gen, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(7, 7, generator=gen, dtype=F64))
    s = 2.0 ** -torch.arange(7, dtype=F64) * (1 + 0.1 * torch.rand(7, generator=gen, dtype=F64))
    return torch.linalg.svdvals(u @ torch.diag(s) @ v.T)


# --- 1.1 ------------------------------------------------------------------------------------------------------

@grader("1.1", "lora_param_count")
def grade_1_1(fn):
    cases = [(384, 1536, 8), (4096, 4096, 8), (1536, 384, 4), (10, 3, 1), (768, 3072, 16)]
    one_factor = "you counted one factor; LoRA trains both A (r × d_in) and B (d_out × r)"
    mistakes = [
        ("A is (r, d_in) and B is (d_out, r); 2·d·r only holds when the matrix is square (d_in = d_out)",
         lambda i, o, r: 2 * o * r),
        ("A is (r, d_in) and B is (d_out, r); 2·d·r only holds when the matrix is square (d_in = d_out)",
         lambda i, o, r: 2 * i * r),
        ("that is the size of the dense update ΔW (full fine-tuning), not of its two factors",
         lambda i, o, r: i * o),
        (one_factor, lambda i, o, r: i * r),
        (one_factor, lambda i, o, r: o * r),
        ("the factors are multiplied as matrices, but their parameters add: r·d_in + d_out·r",
         lambda i, o, r: i * o * r),
    ]
    for d_in, d_out, r in cases:
        expected = r * (d_in + d_out)
        # the count the library's layer really allocates agrees with the formula (a check of the grader)
        if d_in * d_out <= 1_000_000:
            layer = LoRALinear(torch.nn.Linear(d_in, d_out), r=r)
            assert sum(p.numel() for p in layer.parameters() if p.requires_grad) == expected
        got = fn(d_in, d_out, r)
        if isinstance(got, bool) or not isinstance(got, int):
            raise ExerciseFailed(f"lora_param_count({d_in}, {d_out}, {r}): expected an int, got {got!r}")
        if got != expected:
            hint = _first_match(float(got), (d_in, d_out, r), mistakes)
            raise ExerciseFailed(f"lora_param_count({d_in}, {d_out}, {r}): expected {expected}, got {got}{hint}")
    for bad in [(384, 384, 0), (384, 384, -2)]:
        expect_value_error(fn, bad, f"lora_param_count{bad}", "the rank must be at least 1")


# --- 1.2 ------------------------------------------------------------------------------------------------------

def _energy(s: torch.Tensor, r: int) -> float:
    s2 = torch.sort(s.to(F64), descending=True).values ** 2
    return (s2[:r].sum() / s2.sum()).item()


@grader("1.2", "energy_kept")
def grade_1_2(fn):
    s = _singular_values(0)
    mistakes = [
        ("square the singular values: ‖ΔW‖_F² = Σ σᵢ², so the energy of rank r is Σ_(i≤r) σᵢ² / Σ σᵢ²",
         lambda s, r: (s[:r].sum() / s.sum()).item()),
        ("keep the r LARGEST singular values (sort in descending order), not the smallest",
         lambda s, r: ((s.sort().values[:r] ** 2).sum() / (s ** 2).sum()).item()),
        ("energy is a share of the total: divide by Σ σᵢ² over all singular values",
         lambda s, r: (s[:r] ** 2).sum().item()),
        ("take r values, not r + 1 (s[:r] holds r entries)", lambda s, r: _energy(s, r + 1)),
        ("take r values, not r − 1 (s[:r] holds r entries)", lambda s, r: _energy(s, r - 1)),
    ]
    for r in (1, 2, 3, 7):
        expected = _energy(s, r)
        got = _as_float(f"energy_kept(S, {r})", fn(s.clone(), r))
        if not math.isclose(got, expected, rel_tol=1e-6):
            hint = _first_match(got, (s, r), mistakes)
            raise ExerciseFailed(f"energy_kept(S, {r}) with S = {[round(x, 4) for x in s.tolist()]}: "
                                 f"expected {expected:.6f}, got {got:.6f}{hint}")
    shuffled = s[torch.tensor([3, 0, 6, 1, 5, 2, 4])]
    got = _as_float("energy_kept(S_shuffled, 2)", fn(shuffled.clone(), 2))
    if not math.isclose(got, _energy(s, 2), rel_tol=1e-6):
        raise ExerciseFailed(f"energy_kept(S, 2) with S in no particular order ({[round(x, 4) for x in shuffled.tolist()]}): "
                             f"expected {_energy(s, 2):.6f}, got {got:.6f}; hint: sort S in descending order first, "
                             "so that the r kept values are the largest ones")
    for r, expected in [(0, 0.0), (20, 1.0)]:
        got = _as_float(f"energy_kept(S, {r})", fn(s.clone(), r))
        if not math.isclose(got, expected, abs_tol=1e-9):
            raise ExerciseFailed(f"energy_kept(S, {r}) for {len(s)} singular values: expected {expected}, got {got}; "
                                 "hint: rank 0 keeps nothing, a rank at least len(S) keeps everything")
    s32 = s.float()
    got = _as_float("energy_kept(S_float32, 3)", fn(s32.clone(), 3))
    if not math.isclose(got, _energy(s32, 3), rel_tol=1e-5):
        raise ExerciseFailed(f"energy_kept on float32 singular values: expected {_energy(s32, 3):.6f}, got {got:.6f}")


# --- 1.3 ------------------------------------------------------------------------------------------------------

def _reference_best(w: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(w.to(F64), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


@grader("1.3", "best_rank_r")
def grade_1_3(fn):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(9, 6, generator=gen, dtype=F64) @ torch.diag(torch.tensor([5, 3, 2, 1, 0.5, 0.1], dtype=F64)) \
        @ torch.randn(6, 6, generator=gen, dtype=F64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    wrong = {
        "the right singular vectors are the ROWS of Vh: W_r = U[:, :r] · diag(S[:r]) · Vh[:r] "
        "(torch.linalg.svd returns Vh = Vᵀ; the old torch.svd returns V, whose COLUMNS you would take)":
            lambda r: (u[:, :r] * s[:r]) @ vh.T[:r],
        "keep the r LARGEST singular values: torch.linalg.svd sorts them in descending order, so take the "
        "first r": lambda r: (u[:, -r:] * s[-r:]) @ vh[-r:],
        "you dropped the singular values: U[:, :r] @ Vh[:r] has all σ = 1; scale the columns of U by S[:r]":
            lambda r: u[:, :r] @ vh[:r],
    }
    for r in (1, 2, 4):
        expected = _reference_best(w, r)
        got = fn(w.clone(), r)
        _as_tensor(f"best_rank_r(W of shape (9, 6), {r})", got, (9, 6))
        if _max_diff(got, expected) > 1e-8:
            hint = ""
            for text, make in wrong.items():
                candidate = make(r)
                if candidate is not None and candidate.shape == got.shape and _max_diff(got, candidate) < 1e-8:
                    hint = f"; hint: {text}"
                    break
            err_got = torch.linalg.matrix_norm(w - got.to(F64)).item() ** 2
            tail = (s[r:] ** 2).sum().item()
            raise ExerciseFailed(
                f"best_rank_r(W (9×6), r={r}): max |difference| from the truncated SVD is "
                f"{_max_diff(got, expected):.3g}; your ‖W − W_r‖_F² = {err_got:.6g}, while Eckart–Young's "
                f"minimum is Σ_(i>r) σᵢ² = {tail:.6g}{hint}")
        rank = torch.linalg.matrix_rank(got.to(F64), atol=1e-9).item()
        expect_equal(f"rank of best_rank_r(W, {r})", rank, r)
    # a wide matrix and float32: the same recipe must work whatever the shape
    w32 = torch.randn(4, 10, generator=gen)
    got = _as_tensor("best_rank_r(W of shape (4, 10), 2)", fn(w32.clone(), 2), (4, 10))
    if _max_diff(got, _reference_best(w32, 2)) > 1e-4:
        raise ExerciseFailed("best_rank_r on a wide (4×10) float32 matrix differs from the truncated SVD; "
                             "hint: use torch.linalg.svd(W, full_matrices=False) so the shapes fit any W")
    if got.dtype != torch.float32:
        raise ExerciseFailed(f"best_rank_r on a float32 matrix returned {got.dtype}; return W's dtype")


# --- 1.4 ------------------------------------------------------------------------------------------------------

@grader("1.4", "random_subspace_params")
def grade_1_4(fn):
    gen = torch.Generator().manual_seed(2)
    big, small = 7, 3
    theta0 = torch.randn(big, generator=gen)
    P = torch.randn(big, small, generator=gen)
    z = torch.zeros(small)
    got = _as_tensor("random_subspace_params(θ0, P, z=0)", fn(theta0.clone(), P.clone(), z), (big,))
    if _max_diff(got, theta0) > 1e-6:
        raise ExerciseFailed("with z = 0 the parameters must be exactly θ0 (training starts at the pretrained "
                             f"point); max |θ − θ0| = {_max_diff(got, theta0):.3g}")
    z = torch.randn(small, generator=gen, requires_grad=True)
    got = _as_tensor("random_subspace_params(θ0, P (7×3), z (3,))", fn(theta0.clone(), P.clone(), z), (big,))
    expected = theta0 + P @ z.detach()
    if _max_diff(got.detach(), expected) > 1e-5:
        raise ExerciseFailed(f"θ = θ0 + P z: max |difference| = {_max_diff(got.detach(), expected):.3g}; "
                             "hint: P has one column per free coordinate, so P @ z has θ0's shape")
    if not got.requires_grad:
        raise ExerciseFailed("θ does not depend on z through autograd (requires_grad is False); hint: build θ "
                             "from z with torch operations, without .detach(), .item() or torch.no_grad(), so "
                             "that training can reach z")
    got.pow(2).sum().backward()
    expected_grad = P.T @ (2 * expected)
    if z.grad is None or _max_diff(z.grad, expected_grad) > 1e-4:
        raise ExerciseFailed("the gradient that reaches z is wrong: d‖θ‖²/dz should be Pᵀ·2θ")
    # θ0 given as a matrix (a weight), P flattened against it: θ keeps θ0's shape
    w0 = torch.randn(2, 3, generator=gen)
    P2 = torch.randn(6, 4, generator=gen)
    z2 = torch.randn(4, generator=gen)
    try:
        got = fn(w0.clone(), P2.clone(), z2.clone())
    except NotImplementedError:
        raise
    except RuntimeError as err:
        raise ExerciseFailed(f"random_subspace_params(θ0 of shape (2, 3), P (6×4), z (4,)) raised: {err}; hint: "
                             "P z is a flat vector of 6 numbers; reshape it to θ0's shape before adding") from None
    got = _as_tensor("random_subspace_params(θ0 of shape (2, 3), P (6×4), z (4,))", got, (2, 3))
    expected = w0 + (P2 @ z2).reshape(2, 3)
    if _max_diff(got, expected) > 1e-5:
        raise ExerciseFailed("for a θ0 of shape (2, 3) the update P z (6 numbers) must be laid out in θ0's "
                             "row-major order: θ = θ0 + (P z).reshape(θ0.shape)")


# --- 1.5 ------------------------------------------------------------------------------------------------------

def _rank_for(s: torch.Tensor, fraction: float) -> int:
    s2 = torch.sort(s.to(F64), descending=True).values ** 2
    cum = torch.cumsum(s2, 0) / s2.sum()
    return int((cum < fraction - 1e-12).sum().item()) + 1


@grader("1.5", "rank_for_energy")
def grade_1_5(fn):
    s = _singular_values(3)
    s2 = s ** 2
    cum = (torch.cumsum(s2, 0) / s2.sum()).tolist()
    for fraction in (0.5, 0.8, 0.9, 0.99, 1.0):
        expected = _rank_for(s, fraction)
        got = fn(s.clone(), fraction)
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        if isinstance(got, bool) or not isinstance(got, int):
            raise ExerciseFailed(f"rank_for_energy(S, {fraction}): expected an int, got {got!r}")
        if got != expected:
            hint = ""
            if got == expected - 1:
                hint = "; hint: the answer is the smallest r whose kept share is AT LEAST the fraction " \
                       "(count the values before the crossing, plus the one that crosses it)"
            elif got == expected + 1:
                hint = "; hint: one too many: rank r keeps the first r values, so a share reached at the " \
                       "r-th value means rank r"
            raise ExerciseFailed(f"rank_for_energy(S, {fraction}) with cumulative shares "
                                 f"{[round(c, 4) for c in cum]}: expected {expected}, got {got}{hint}")
    s_exact = torch.tensor([3.0, 4.0], dtype=F64)  # shares 16/25 and 1 exactly
    got = fn(s_exact, 0.64)
    if isinstance(got, torch.Tensor):
        got = got.item()
    if got != 1:
        raise ExerciseFailed(f"rank_for_energy([3, 4], 0.64): the largest value alone keeps 16/25 = 0.64 of the "
                             f"energy, so the answer is 1; got {got!r} (hint: is the share compared with >= ?)")
    for bad in (0.0, 1.5, -0.1):
        try:
            fn(s.clone(), bad)
        except ValueError:
            continue
        except NotImplementedError:
            raise
        except Exception as err:
            raise ExerciseFailed(f"rank_for_energy(S, {bad}) raised {type(err).__name__}; raise a ValueError "
                                 "that says fraction must be in (0, 1]") from None
        raise ExerciseFailed(f"rank_for_energy(S, {bad}): expected a ValueError (fraction must be in (0, 1]), "
                             "but nothing was raised")
