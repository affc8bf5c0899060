"""Graders for chapter 5, double quantization.

Answers come from exact arithmetic and from `minilora.double_quant` (whose bytes equal bitsandbytes'). When an
answer is wrong the grader tries the usual slips (forgetting the float32 scale per 256 blocks, 16-bit
constants, no mean subtraction, one scale for everything, GiB for GB) and names the one that was made.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from minilora.course.grading import ExerciseFailed, expect_number, first_mistake, brief, grader
from minilora.double_quant import DoubleQuantAbsmax, double_quantize, dynamic_map


# --- 5.1 bits per parameter --------------------------------------------------------------------------------------

def _bits(blocksize: int, double_quant: bool, blocksize2: int = 256) -> float:
    return 4 + (8 / blocksize + 32 / (blocksize * blocksize2) if double_quant else 32 / blocksize)


@grader("5.1", "bits_per_param")
def grade_5_1(fn):
    cases = [(64, False, 256), (64, True, 256), (128, True, 256), (32, False, 256), (64, True, 128), (256, True, 64)]
    mistakes = {
        "with double quantization each group of blocksize2 blocks also stores one float32 scale: "
        "+ 32 / (blocksize · blocksize2) bits": lambda b, dq, b2: 4 + 8 / b if dq else 4 + 32 / b,
        "the absmax is a float32 (32 bits), not 16-bit":
            lambda b, dq, b2: 4 + (8 / b + 16 / (b * b2) if dq else 16 / b),
        "the answer includes the 4 bits of the code itself": lambda b, dq, b2: _bits(b, dq, b2) - 4,
        "the second-level float32 scale is shared by blocksize · blocksize2 weights, not by blocksize2":
            lambda b, dq, b2: 4 + (8 / b + 32 / b2 if dq else 32 / b),
    }
    for case in cases:
        expected = _bits(*case)
        what = f"on bits_per_param({case[0]}, double_quant={case[1]}, blocksize2={case[2]})"
        value = expect_number(what, fn(*case))
        if not math.isclose(value, expected, rel_tol=1e-9):
            hint = first_mistake(value, case, mistakes)
            raise ExerciseFailed(f"{what}: expected {expected!r}, got {value!r}" + (f"; hint: {hint}" if hint else ""))


# --- 5.2 quantize the absmax values ------------------------------------------------------------------------------

def _absmax_cases() -> list[tuple[str, Tensor, int]]:
    g = torch.Generator().manual_seed(3)
    return [
        ("absmax = [0.20, 0.25, 0.15, 0.30, 0.22, 0.18], blocksize 4 (two groups, the last one short)",
         torch.tensor([0.20, 0.25, 0.15, 0.30, 0.22, 0.18]), 4),
        ("absmax = 0.1 + rand(600) (seed 3), blocksize 256", 0.1 + torch.rand(600, generator=g), 256),
        ("absmax = [2.0, 3.0, 2.5, 4.0, 1.0, 3.5, 2.2, 2.8], blocksize 8",
         torch.tensor([2.0, 3.0, 2.5, 4.0, 1.0, 3.5, 2.2, 2.8]), 8),
    ]


def _quantize_variants(absmax: Tensor, blocksize: int) -> dict[str, DoubleQuantAbsmax]:
    """What common slips produce, in the exercise's output format."""
    code = dynamic_map()
    mid = (code[:-1] + code[1:]) / 2

    def run(values: Tensor, offset: Tensor, bs: int, signed_max: bool = False) -> DoubleQuantAbsmax:
        n = values.numel()
        groups = torch.nn.functional.pad(values, (0, -n % bs)).reshape(-1, bs)
        scales = groups.amax(dim=1) if signed_max else groups.abs().amax(dim=1)
        scaled = (groups / scales[:, None]).reshape(-1)[:n]
        return DoubleQuantAbsmax(torch.bucketize(scaled, mid).to(torch.uint8), scales, offset, bs)

    mean = absmax.mean()
    return {
        "subtract the mean of ALL absmax values first (the offset), so the positive scales use both halves of "
        "the signed map": run(absmax, torch.zeros(()), blocksize),
        "each group of `blocksize` values gets its own scale (its largest |value|), not one for the whole vector":
            run(absmax - mean, mean, absmax.numel()),
        "a group's scale is its largest *magnitude* after centring, abs().max(), not its largest value":
            run(absmax - mean, mean, blocksize, signed_max=True),
    }


@grader("5.2", "quantize_absmax_8bit")
def grade_5_2(fn):
    for desc, absmax, bs in _absmax_cases():
        expected = double_quantize(absmax, scale_blocksize=bs, exact=True)
        got = fn(absmax.clone(), bs)
        if not (isinstance(got, tuple) and len(got) == 3 and all(isinstance(t, Tensor) for t in got)):
            raise ExerciseFailed(f"on {desc}: expected a tuple of three tensors (codes, scales, offset), got {got!r}")
        codes, scales, offset = got
        if codes.dtype != torch.uint8 or codes.shape != expected.codes.shape:
            raise ExerciseFailed(f"on {desc}: codes should be uint8 of shape {tuple(expected.codes.shape)}, got "
                                 f"{codes.dtype} of shape {tuple(codes.shape)}")
        if scales.shape != expected.scales.shape:
            hint = "one float32 scale per group of `blocksize` absmax values (the last group may be shorter)"
            raise ExerciseFailed(f"on {desc}: expected scales of shape {tuple(expected.scales.shape)}, got "
                                 f"{tuple(scales.shape)}; hint: {hint}")
        ok = (torch.equal(codes, expected.codes) and torch.allclose(scales.float(), expected.scales, rtol=1e-6)
              and math.isclose(float(offset), float(expected.offset), rel_tol=1e-6))
        if not ok:
            hint = next((h for h, v in _quantize_variants(absmax, bs).items()
                         if torch.equal(codes, v.codes) and math.isclose(float(offset), float(v.offset), abs_tol=1e-7)),
                        None)
            if hint is None and not torch.equal(codes, expected.codes):
                hint = ("codes are the index of the map entry nearest to (absmax - offset) / scale; a value exactly "
                        "between two entries takes the lower one (torch.bucketize on the midpoints)")
            raise ExerciseFailed(f"on {desc}: expected codes {brief(expected.codes)}, scales {brief(expected.scales)}, "
                                 f"offset {float(expected.offset):.5f}; got codes {brief(codes)}, scales "
                                 f"{brief(scales)}, offset {float(offset):.5f}" + (f"; hint: {hint}" if hint else ""))


# --- 5.3 dequantize them -----------------------------------------------------------------------------------------

@grader("5.3", "dequantize_absmax_8bit")
def grade_5_3(fn):
    code = dynamic_map()
    for desc, absmax, bs in _absmax_cases():
        dq = double_quantize(absmax, scale_blocksize=bs, exact=True)
        expected = dq.dequantize()
        got = fn(dq.codes.clone(), dq.scales.clone(), dq.offset.clone(), bs)
        if not isinstance(got, Tensor) or got.shape != expected.shape:
            raise ExerciseFailed(f"on the double-quantized {desc}: expected a tensor of shape "
                                 f"{tuple(expected.shape)}, got {got!r}")
        if not torch.allclose(got.float(), expected, rtol=1e-6, atol=1e-7):
            values = code[dq.codes.long()]
            per_value = dq.scales.repeat_interleave(bs)[: dq.codes.numel()]
            tiled = dq.scales.repeat(bs)[: dq.codes.numel()]
            mistakes = {
                "add the offset (the mean subtracted before quantizing) back": values * per_value,
                "scale j belongs to values j·blocksize … (j+1)·blocksize - 1: use repeat_interleave, not repeat":
                    values * tiled + dq.offset,
                "the code is an index into the map: look up map[codes] before scaling": dq.codes.float() * per_value
                + dq.offset,
            }
            hint = next((h for h, v in mistakes.items() if v.shape == got.shape
                         and torch.allclose(got.float(), v, rtol=1e-6, atol=1e-7)), None)
            raise ExerciseFailed(f"on the double-quantized {desc}: expected {brief(expected)}, got {brief(got)}"
                                 + (f"; hint: {hint}" if hint else ""))


# --- 5.4 memory of a model ---------------------------------------------------------------------------------------

_BITS = {"fp32": 32.0, "bf16": 16.0, "fp16": 16.0, "nf4": _bits(64, False), "nf4-dq": _bits(64, True)}


@grader("5.4", "memory_gb")
def grade_5_4(fn):
    cases = [(65_000_000_000, s) for s in ("fp32", "bf16", "fp16", "nf4", "nf4-dq")] + [(1_000_000, "nf4-dq"),
                                                                                         (7_000_000_000, "nf4")]
    mistakes = {
        "GB here means 10⁹ bytes (decimal), as the texts quoting '130 GB for 65B' use; 2³⁰ is a GiB":
            lambda n, s: n * _BITS[s] / 8 / 2 ** 30,
        "NF4 also stores a float32 absmax per 64 weights: 4.5 bits per weight, not 4": lambda n, s: n * 4 / 8 / 1e9,
        "double quantization keeps a float32 scale per 256 blocks too: 4 + 8/64 + 32/(64·256) bits":
            lambda n, s: n * (4 + 8 / 64) / 8 / 1e9,
        "that is gigabits: divide the bits by 8 to get bytes": lambda n, s: n * _BITS[s] / 1e9,
    }
    for n, scheme in cases:
        expected = n * _BITS[scheme] / 8 / 1e9
        what = f"on memory_gb({n:_}, {scheme!r})"
        value = expect_number(what, fn(n, scheme))
        if not math.isclose(value, expected, rel_tol=1e-9):
            hint = first_mistake(value, (n, scheme), mistakes)
            raise ExerciseFailed(f"{what}: expected {expected!r} GB, got {value!r}"
                                 + (f"; hint: {hint}" if hint else ""))
    try:
        fn(1000, "int3")
    except ValueError:
        pass
    else:
        raise ExerciseFailed("on memory_gb(1000, 'int3'): expected a ValueError naming the allowed schemes, but "
                             "nothing was raised")
