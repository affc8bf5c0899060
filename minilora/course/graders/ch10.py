"""Graders for chapter 10, making it fast.

The roofline and the byte count are checked against exact arithmetic; the fused autograd function against
`minilora.fast.lora_linear` (merged path) on tiny float64 shapes, output and every gradient. The usual slips
(adding the two times instead of taking the larger, forgetting the backward build, dropping the scaling,
a transposed product) are named when they are made.
"""

from __future__ import annotations

import torch

from minilora import fast
from minilora.course.grading import ExerciseFailed, grader, numbers_close


@grader("10.1", "roofline_time")
def grade_10_1(fn):
    cases = [(2e12, 1e9, 1e15, 1e12), (1e9, 4e9, 1e15, 2e12), (6e12, 3e12, 2e15, 1e12)]
    for flops, nbytes, peak, bw in cases:
        want = max(flops / peak, nbytes / bw)
        got = float(fn(flops, nbytes, peak, bw))
        if not numbers_close(got, want):
            hint = ""
            if numbers_close(got, flops / peak + nbytes / bw):
                hint = "; hint: the arithmetic and the memory traffic overlap, so the floor is the LARGER of the two times, not their sum"
            elif numbers_close(got, min(flops / peak, nbytes / bw)):
                hint = "; hint: the slower of the two limits decides: take the max, not the min"
            raise ExerciseFailed(f"on flops={flops:g}, bytes={nbytes:g}, peak={peak:g} FLOP/s, "
                                 f"bandwidth={bw:g} B/s: expected {want:g} s, got {got:g}{hint}")


def _extra(tokens: int, d_in: int, d_out: int, r: int, b: int) -> int:
    return b * (4 * d_in * d_out + 2 * tokens * (d_in + d_out) + 4 * tokens * r)


@grader("10.2", "lora_extra_bytes")
def grade_10_2(fn):
    for case in [(8192, 4096, 4096, 16, 2), (16, 64, 32, 4, 4), (1000, 2048, 5632, 8, 2)]:
        want = _extra(*case)
        got = fn(*case)
        if got != want:
            n, i, o, r, b = case
            hint = ""
            if got == want - 2 * b * i * o:
                hint = "; hint: backward needs W' too, and it is rebuilt there (read W0, write W' again)"
            elif got == want - b * 4 * n * r:
                hint = "; hint: the skinny u and v are written once and read once each (4·N·r values)"
            elif got == b * (4 * i * o + n * (i + o) + 4 * n * r):
                hint = "; hint: x is read twice (for u and for dL/dA) and g twice (for v and for dL/dB)"
            elif got == want // b:
                hint = "; hint: count bytes, not values: multiply by dtype_bytes"
            raise ExerciseFailed(f"on tokens={n}, d_in={i}, d_out={o}, r={r}, dtype_bytes={b}: "
                                 f"expected {want}, got {got}{hint}")


@grader("10.3", "FusedLoRAFn")
def grade_10_3(cls):
    if not (isinstance(cls, type) and issubclass(cls, torch.autograd.Function)):
        raise ExerciseFailed("FusedLoRAFn must be a subclass of torch.autograd.Function")
    for n, d_in, d_out, r, s in [(5, 6, 4, 2, 2.0), (7, 3, 8, 3, 0.5)]:
        g0 = torch.Generator().manual_seed(n)
        x = torch.randn(n, d_in, generator=g0, dtype=torch.float64)
        W0 = torch.randn(d_out, d_in, generator=g0, dtype=torch.float64)
        A = torch.randn(r, d_in, generator=g0, dtype=torch.float64)
        B = torch.randn(d_out, r, generator=g0, dtype=torch.float64)
        g = torch.randn(n, d_out, generator=g0, dtype=torch.float64)
        leaves = [t.clone().requires_grad_(True) for t in (x, A, B)]
        y_ref = fast.lora_linear(leaves[0], W0, None, leaves[1], leaves[2], s, path="merged")
        ref = [y_ref, *torch.autograd.grad(y_ref, leaves, g)]
        mine = [t.clone().requires_grad_(True) for t in (x, A, B)]
        y = cls.apply(mine[0], W0, mine[1], mine[2], s)
        if not isinstance(y, torch.Tensor) or tuple(y.shape) != (n, d_out):
            raise ExerciseFailed(f"on x ({n}, {d_in}), W0 ({d_out}, {d_in}), r={r}: expected an output of shape "
                                 f"({n}, {d_out}), got {getattr(y, 'shape', type(y).__name__)}")
        got = [y, *torch.autograd.grad(y, mine, g, allow_unused=True)]
        for name, a, b in zip(["y", "dL/dx", "dL/dA", "dL/dB"], got, ref):
            if a is None or tuple(a.shape) != tuple(b.shape) or not torch.allclose(a, b, rtol=1e-9, atol=1e-9):
                hint = "hint: y = x (W0 + s·B A)ᵀ; dL/dx = g W'; dL/dA = s (g B)ᵀ x; dL/dB = s gᵀ (x Aᵀ)"
                if a is not None and tuple(a.shape) == tuple(b.shape) and torch.allclose(a * s, b, rtol=1e-9):
                    hint = "hint: the scaling s multiplies this gradient too"
                elif a is not None and tuple(a.shape) == tuple(b.shape) and s != 1 and torch.allclose(a, b * s, rtol=1e-9):
                    hint = "hint: s appears once in this gradient, not twice"
                elif a is not None and tuple(a.shape) != tuple(b.shape):
                    hint = f"hint: a gradient has the shape of its input ({tuple(b.shape)}); check for a transpose"
                raise ExerciseFailed(f"on x ({n}, {d_in}), W0 ({d_out}, {d_in}), r={r}, s={s}: {name} differs "
                                     f"from minilora.fast.lora_linear; {hint}")
