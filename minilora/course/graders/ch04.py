"""Graders for chapter 4, NF4.

Each grader runs the learner's function on tiny cases whose answers come from `minilora.nf4`, bitsandbytes'
NF4 table or exact arithmetic. When an answer is wrong it checks the usual slips (8 levels instead of 7,
truncating instead of rounding, max instead of absmax, the upper code at a midpoint, the low nibble first,
natural logarithms) and names the one that was made.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from minilora.course.grading import ExerciseFailed, brief, grader
from minilora.nf4 import ZERO_CODE, nf4_table, quantize_nf4


def _require_tensor(what: str, got: Any) -> Tensor:
    if not isinstance(got, Tensor):
        raise ExerciseFailed(f"{what}: expected a torch.Tensor, got {type(got).__name__}")
    return got


# --- 4.1 absmax int4 --------------------------------------------------------------------------------------------

def _int4_reference(x: Tensor, blocksize: int, levels: int = 7, round_fn: Callable = torch.round,
                    signed_max: bool = False) -> tuple[Tensor, Tensor]:
    blocks = x.reshape(-1, blocksize)
    absmax = blocks.amax(dim=1) if signed_max else blocks.abs().amax(dim=1)
    scaled = blocks / absmax.clamp(min=1e-38)[:, None] * levels
    return round_fn(scaled).reshape(-1).to(torch.int8), absmax


class _NaNToInteger(TorchFunctionMode):
    """Records the first torch operation that turns a float tensor holding NaN into an integer tensor.

    What NaN becomes as an integer is undefined (on x86 it often comes out as 0), so codes computed from
    0/0 can look right on one machine and be garbage on another: the grader must see the NaN itself."""

    def __init__(self) -> None:
        super().__init__()
        self.op: str | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if (self.op is None and isinstance(out, Tensor) and not out.is_floating_point() and not out.is_complex()
                and out.dtype != torch.bool):
            for a in (*args, *kwargs.values()):
                if isinstance(a, Tensor) and a.is_floating_point() and bool(torch.isnan(a).any()):
                    self.op = getattr(func, "__name__", str(func))
                    break
        return out


@grader("4.1", "absmax_quantize_int4")
def grade_4_1(fn):
    cases = [
        ("x = [0.9, -0.31, 0.05, 2.4, -1.2, 0.0, 0.61, -2.0], blocksize 4",
         torch.tensor([0.9, -0.31, 0.05, 2.4, -1.2, 0.0, 0.61, -2.0]), 4),
        ("an all-negative block: x = [-0.2, -1.6, -0.7, -0.45], blocksize 4",
         torch.tensor([-0.2, -1.6, -0.7, -0.45]), 4),
        ("x = [0.5, -0.1, 0.0, 0.3] + [0, 0, 0, 0] (second block all zero), blocksize 4",
         torch.tensor([0.5, -0.1, 0.0, 0.3, 0.0, 0.0, 0.0, 0.0]), 4),
        ("x = randn(256) (seed 0), blocksize 64", torch.randn(256, generator=torch.Generator().manual_seed(0)), 64),
    ]
    mistakes = {
        "symmetric int4 uses the 15 integers -7..7: the block's absmax must map to 7, not 8 (8 does not fit)":
            lambda x, b: _int4_reference(x, b, levels=8),
        "round to the nearest integer (torch.round); converting with .to(torch.int8) truncates towards zero":
            lambda x, b: _int4_reference(x, b, round_fn=torch.trunc),
        "the scale is the largest *magnitude*, x.abs().max(), not the largest value":
            lambda x, b: _int4_reference(x, b, signed_max=True),
    }
    for desc, x, b in cases:
        expected_codes, expected_absmax = _int4_reference(x, b)
        watch = _NaNToInteger()
        with watch:
            got = fn(x.clone(), b)
        if watch.op is not None:
            raise ExerciseFailed(f"on {desc}: your code turned a NaN into an integer (in `{watch.op}`); what NaN becomes "
                                 "as an integer is undefined, so these codes are right only by luck. Hint: an "
                                 "all-zero block has absmax 0, and 0/0 is NaN; clamp absmax to a tiny positive "
                                 "number before dividing (its codes must be 0)")
        if not (isinstance(got, tuple) and len(got) == 2):
            raise ExerciseFailed(f"on {desc}: expected a tuple (codes, absmax), got {type(got).__name__}")
        codes, absmax = (_require_tensor(f"on {desc}, codes", got[0]), _require_tensor(f"on {desc}, absmax", got[1]))
        if absmax.shape != expected_absmax.shape:
            raise ExerciseFailed(f"on {desc}: absmax should have one value per block, shape "
                                 f"{tuple(expected_absmax.shape)}, got shape {tuple(absmax.shape)}")
        if codes.shape != expected_codes.shape:
            raise ExerciseFailed(f"on {desc}: codes should be flat, shape {tuple(expected_codes.shape)}, "
                                 f"got shape {tuple(codes.shape)}")
        if codes.dtype != torch.int8:
            raise ExerciseFailed(f"on {desc}: codes should be torch.int8 (4-bit values fit in a byte), "
                                 f"got {codes.dtype}")
        same_absmax = torch.allclose(absmax.float(), expected_absmax, rtol=1e-6, atol=0)
        if not torch.equal(codes, expected_codes) or not same_absmax:
            hint = next((h for h, wrong in mistakes.items() if torch.equal(codes, wrong(x, b)[0])
                         and torch.allclose(absmax.float().abs(), wrong(x, b)[1].abs())), None)
            if hint is None and bool((expected_absmax == 0).any()):
                hint = ("an all-zero block has absmax 0; clamp it to a tiny positive number before dividing, "
                        "so 0/0 does not give NaN (its codes must be 0)")
            raise ExerciseFailed(f"on {desc}: expected codes {brief(expected_codes)} and absmax "
                                 f"{brief(expected_absmax)}, got codes {brief(codes)} and absmax {brief(absmax)}"
                                 + (f"; hint: {hint}" if hint else ""))


# --- 4.2 nearest code --------------------------------------------------------------------------------------------

def _nearest_reference(x: Tensor, codes: Tensor) -> Tensor:
    return torch.bucketize(x, (codes[:-1] + codes[1:]) / 2)


@grader("4.2", "nearest_code")
def grade_4_2(fn):
    nf4 = nf4_table()
    int4 = torch.arange(-7, 8, dtype=torch.float32) / 7
    midpoints = (nf4[:-1] + nf4[1:]) / 2
    cases = [
        ("x = [-0.9, -0.1, 0.0, 0.07, 0.3, 0.95] with the NF4 table",
         torch.tensor([-0.9, -0.1, 0.0, 0.07, 0.3, 0.95]), nf4),
        ("x beyond the ends, [-3.0, 2.5], with the NF4 table", torch.tensor([-3.0, 2.5]), nf4),
        ("x = the 15 float32 midpoints (NF4[k] + NF4[k+1]) / 2 of the NF4 table", midpoints.clone(), nf4),
        ("x = the midpoints of the int4 table k/7", (int4[:-1] + int4[1:]) / 2, int4),
        ("a 2-D x of shape (3, 4) with the int4 table", torch.linspace(-1.2, 1.2, 12).reshape(3, 4), int4),
    ]
    for desc, x, table in cases:
        expected = _nearest_reference(x, table)
        got = _require_tensor(f"on {desc}", fn(x.clone(), table.clone()))
        if got.shape != x.shape:
            raise ExerciseFailed(f"on {desc}: expected one index per element of x, shape {tuple(x.shape)}, "
                                 f"got shape {tuple(got.shape)}")
        if got.is_floating_point():
            raise ExerciseFailed(f"on {desc}: expected integer indices, got dtype {got.dtype}")
        if not torch.equal(got.long(), expected):
            hint = None
            mids = (table[:-1] + table[1:]) / 2
            wrong = got.long() != expected
            if torch.equal(got.long(), torch.bucketize(x, mids, right=True)):
                hint = ("a value exactly on a midpoint takes the LOWER code (bucketize with right=False, "
                        "or a strict `>`)")
            elif (torch.equal(got.long(), (x.unsqueeze(-1) - table).abs().argmin(dim=-1))
                  or torch.equal(got.long(), torch.bucketize(x.double(), (table.double()[:-1] + table.double()[1:]) / 2))):
                # the two slips give the same codes here, so the hint names both
                hint = ("the rule compares x with the midpoints m = (c[k] + c[k+1]) / 2 computed in float32, the "
                        "table's dtype, and x = m takes code k. Distances |x - c| do not follow it: at m they need "
                        "not come out equal in float32; nor do midpoints computed in float64, which differ from the "
                        "float32 ones in the last bit. Count the float32 midpoints strictly below x "
                        "(torch.bucketize(x, midpoints))")
            elif bool(torch.isin(x[wrong], mids).all()) and bool((got.long()[wrong] == expected[wrong] + 1).all()):
                hint = "at a midpoint between codes k and k+1 the answer is k"
            raise ExerciseFailed(f"on {desc}: expected {brief(expected)}, got {brief(got)}"
                                 + (f"; hint: {hint}" if hint else ""))


# --- 4.3 nibble packing ------------------------------------------------------------------------------------------

def _pack_reference(codes: Tensor) -> Tensor:
    c = codes.to(torch.uint8)
    if c.numel() % 2:
        c = torch.cat([c, c.new_full((1,), ZERO_CODE)])
    return (c[0::2] << 4) | c[1::2]


@grader("4.3", "pack_nibbles")
def grade_4_3(fn):
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    q = quantize_nf4(w)
    cases = [
        ("codes = [1, 2, 3, 4]", torch.tensor([1, 2, 3, 4], dtype=torch.uint8)),
        ("codes = [15, 0]", torch.tensor([15, 0], dtype=torch.uint8)),
        ("codes = [1, 2, 3] (odd length)", torch.tensor([1, 2, 3], dtype=torch.uint8)),
        ("the 512 codes of quantize_nf4(randn(8, 64))", q.codes()),
    ]
    for desc, codes in cases:
        expected = _pack_reference(codes)
        got = _require_tensor(f"on {desc}", fn(codes.clone()))
        hex_ = lambda t: [f"0x{int(v):02X}" for v in t.reshape(-1).tolist()[:8]]
        if got.dtype != torch.uint8:
            raise ExerciseFailed(f"on {desc}: expected a uint8 tensor (two codes per byte), got dtype {got.dtype}")
        if got.shape != expected.shape:
            hint = " (an odd count gets one padding code, 7, so the last byte is full)" if codes.numel() % 2 else ""
            raise ExerciseFailed(f"on {desc}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}{hint}")
        if not torch.equal(got, expected):
            hint = None
            low_first = _pack_reference(torch.stack([codes[1::2], codes[0::2][: codes[1::2].numel()]], 1).reshape(-1)) \
                if codes.numel() % 2 == 0 else None
            if low_first is not None and torch.equal(got, low_first):
                hint = "bitsandbytes puts the FIRST code of each pair in the HIGH nibble: byte = (c[2j] << 4) | c[2j+1]"
            elif codes.numel() % 2 and torch.equal(got[:-1], expected[:-1]):
                hint = "pad an odd count with code 7 (NF4's 0.0), as bitsandbytes does, not with 0"
            raise ExerciseFailed(f"on {desc}: expected bytes {hex_(expected)}, got {hex_(got)}"
                                 + (f"; hint: {hint}" if hint else ""))
    try:
        fn(torch.tensor([3, 16], dtype=torch.uint8))
    except ValueError:
        pass
    else:
        raise ExerciseFailed("on codes = [3, 16]: expected a ValueError (16 does not fit in 4 bits), but nothing "
                             "was raised; hint: check that every code is in 0..15 before packing")


# --- 4.4 the NF4 values ------------------------------------------------------------------------------------------

@grader("4.4", "nf4_values")
def grade_4_4(fn):
    expected = nf4_table()
    got = _require_tensor("nf4_values()", fn())
    if got.shape != (16,):
        raise ExerciseFailed(f"nf4_values(): expected 16 values, got shape {tuple(got.shape)}; hint: 7 negative "
                             "quantiles, one exact 0 and 8 positive quantiles")
    got = got.detach().float().cpu()
    if not bool((got[1:] > got[:-1]).all()):
        raise ExerciseFailed(f"nf4_values(): expected the values sorted ascending, got {brief(got)}")
    neg, zero, pos = int((got < 0).sum()), int((got == 0).sum()), int((got > 0).sum())
    if (neg, zero, pos) != (7, 1, 8):
        raise ExerciseFailed(f"nf4_values(): expected 7 negative values, one exact 0 and 8 positive ones, got "
                             f"{neg}, {zero} and {pos}; hint: the positive side uses 9 probabilities from "
                             "0.9677083 down to 0.5 (dropping 0.5), the negative side 8 (dropping 0.5)")
    if got[0] != -1 or got[-1] != 1:
        raise ExerciseFailed(f"nf4_values(): expected the table to span exactly [-1, 1], got [{got[0]:.6f}, "
                             f"{got[-1]:.6f}]; hint: divide every value by Φ⁻¹(0.9677083), the largest quantile")
    if not torch.allclose(got, expected, rtol=0, atol=1e-6):
        raise ExerciseFailed(f"nf4_values(): expected {brief(expected)}, got {brief(got)}; hint: probabilities "
                             "evenly spaced with torch.linspace(0.9677083, 0.5, 9)[:-1] (and 8 points for the "
                             "negative side), quantiles Φ⁻¹ = torch.special.ndtri")


# --- 4.5 entropy of code usage -----------------------------------------------------------------------------------

def _entropy(codes: Tensor, n_codes: int, log: Callable[[float], float] = math.log2) -> float:
    counts = torch.bincount(codes.reshape(-1).long(), minlength=n_codes).double()
    p = counts[counts > 0] / counts.sum()
    return float(-sum(v * log(v) for v in p.tolist()))


@grader("4.5", "code_entropy")
def grade_4_5(fn):
    gauss = torch.randn(4096, generator=torch.Generator().manual_seed(2))
    cases = [
        ("codes = [0, 1, ..., 15] (each once), n_codes=16", torch.arange(16, dtype=torch.uint8), 16),
        ("codes = [0, 0, 1, 1], n_codes=16", torch.tensor([0, 0, 1, 1], dtype=torch.uint8), 16),
        ("codes = [5, 5, 5], n_codes=16 (one code only)", torch.tensor([5, 5, 5], dtype=torch.uint8), 16),
        ("codes of quantize_nf4(randn(4096)), n_codes=16", quantize_nf4(gauss).codes(), 16),
        ("codes = [0, 1, 2, 3, 0, 0], n_codes=4", torch.tensor([0, 1, 2, 3, 0, 0]), 4),
    ]
    for desc, codes, k in cases:
        expected = _entropy(codes, k)
        got = fn(codes.clone(), k)
        try:
            value = float(got)
        except (TypeError, ValueError):
            raise ExerciseFailed(f"on {desc}: expected a number, got {got!r}") from None
        if not (math.isfinite(value) and math.isclose(value, expected, rel_tol=1e-6, abs_tol=1e-9)):
            hint = None
            if not math.isfinite(value):
                hint = "codes that never occur have p = 0, and 0·log 0 must count as 0 (drop them before the log)"
            elif expected > 0 and math.isclose(value, _entropy(codes, k, math.log), rel_tol=1e-6):
                hint = "entropy in bits uses log base 2 (torch.log2), not the natural logarithm"
            raise ExerciseFailed(f"on {desc}: expected {expected:.6f} bits, got {value!r}"
                                 + (f"; hint: {hint}" if hint else ""))
