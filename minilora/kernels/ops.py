"""The kernels as PyTorch operators (`torch.ops.minilora.*`), so that `torch.compile` can hold them in a graph.

Eager code calls the Python wrappers in `kernels.nf4` / `kernels.lora_weight` directly: every layer of
indirection costs host time per call, and eager training at width 4096 is host-bound. Under `torch.compile`
the same wrappers cannot be traced (they pick launch configurations, cache tables in dicts, read Python
dataclasses), so each dispatcher in `minilora.kernels` calls the operator below instead when
`torch.compiler.is_compiling()`. To the compiler an operator is opaque: it knows only its output's shape and
dtype (the `register_fake` functions) and that it changes none of its inputs. Inside, the operator runs the
same code eager would: the Triton kernel on CUDA, the chapter's PyTorch function elsewhere. So a compiled
model computes bit for bit what the eager one does, and CUDA graphs can capture it.

An NF4Tensor is a dataclass, which an operator cannot take. It crosses as its tensors plus its static facts
(`nf4_parts` / `nf4_from_parts`): packed codes, absmax (float32) or the double-quantized codes (uint8),
their scales and offset, the shape, the original dtype, blocksize and scale_blocksize.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from minilora.double_quant import DoubleQuantAbsmax
from minilora.kernels.nf4 import cdiv
from minilora.nf4 import NF4Tensor, dequantize_nf4

__all__ = ["nf4_parts", "nf4_from_parts", "NF4Meta", "lora_matmul"]

# (shape, dtype, blocksize, scale_blocksize or 0 for plain absmax): what an NF4Tensor is besides its tensors
NF4Meta = tuple[tuple[int, ...], torch.dtype, int, int]


def nf4_parts(q: NF4Tensor) -> tuple[tuple[Tensor, Optional[Tensor], Optional[Tensor], Tensor], NF4Meta]:
    """NF4Tensor -> ((packed, scales or None, offset or None, absmax or 8-bit codes), meta). No copies."""
    a = q.absmax
    if isinstance(a, DoubleQuantAbsmax):
        return (q.packed, a.scales, a.offset, a.codes), (tuple(q.shape), q.dtype, q.blocksize, a.scale_blocksize)
    return (q.packed, None, None, a), (tuple(q.shape), q.dtype, q.blocksize, 0)


def nf4_from_parts(packed: Tensor, scales: Optional[Tensor], offset: Optional[Tensor], absmax: Tensor,
                   meta: NF4Meta) -> NF4Tensor:
    """The inverse of `nf4_parts`."""
    shape, dtype, blocksize, scale_blocksize = meta
    stored: Any = absmax
    if scale_blocksize:
        stored = DoubleQuantAbsmax(codes=absmax, scales=scales, offset=offset, scale_blocksize=scale_blocksize)
    return NF4Tensor(packed=packed, absmax=stored, shape=torch.Size(shape), dtype=dtype, blocksize=blocksize)


# ---------------------------------------------------------------------------------------------------------
# The operators. Each takes an NF4 weight as (packed, scales, offset, absmax, shape, dtype, blocksize,
# scale_blocksize); `eager` is the function a dispatcher runs outside compilation, set by minilora.kernels.

_EAGER: dict[str, Callable[..., Any]] = {}


def set_eager(name: str, fn: Callable[..., Any]) -> None:
    """Register what the operator `name` runs: the eager dispatcher (Triton on CUDA, PyTorch elsewhere)."""
    _EAGER[name] = fn


def _q(packed: Tensor, scales: Optional[Tensor], offset: Optional[Tensor], absmax: Tensor, shape: list[int],
       dtype: torch.dtype, blocksize: int, scale_blocksize: int) -> NF4Tensor:
    """The NF4Tensor an operator received in parts. Its parts came from a tensor that passed NF4Tensor's own
    checks when it was built (`nf4_parts`), so only what a kernel's reads depend on is checked again, the
    dtypes and counts: the dataclasses' full checks run on every call of every layer, on the host."""
    n = math.prod(shape)
    n_blocks = cdiv(n, blocksize)
    codes_dtype = torch.uint8 if scale_blocksize else torch.float32
    if packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2 or absmax.dtype != codes_dtype \
            or absmax.numel() != n_blocks or (scale_blocksize and (
                scales is None or offset is None or scales.dtype != torch.float32
                or scales.numel() != cdiv(n_blocks, scale_blocksize))):
        # the parts disagree: let the dataclasses say how (their ValueError / TypeError)
        return nf4_from_parts(packed, scales, offset, absmax, (tuple(shape), dtype, blocksize, scale_blocksize))
    stored: Any = absmax
    if scale_blocksize:
        stored = _checked(DoubleQuantAbsmax, codes=absmax, scales=scales, offset=offset, scale_blocksize=scale_blocksize)
    return _checked(NF4Tensor, packed=packed, absmax=stored, shape=torch.Size(shape), dtype=dtype, blocksize=blocksize)


def _checked(cls: type, **fields: Any) -> Any:
    """An instance of a frozen dataclass whose fields were checked before: its __post_init__ is not run."""
    obj = object.__new__(cls)
    obj.__dict__.update(fields)  # what the generated __init__ stores, through the frozen class's guard
    return obj


@torch.library.custom_op("minilora::nf4_dequantize", mutates_args=())
def nf4_dequantize(packed: Tensor, scales: Optional[Tensor], offset: Optional[Tensor], absmax: Tensor,
                   shape: list[int], dtype: torch.dtype, blocksize: int, scale_blocksize: int,
                   out_dtype: torch.dtype) -> Tensor:
    """Ŵ = dequantize(q) in out_dtype: (shape)."""
    q = _q(packed, scales, offset, absmax, shape, dtype, blocksize, scale_blocksize)
    return _EAGER.get("dequantize", dequantize_nf4)(q, out_dtype)


@nf4_dequantize.register_fake
def _(packed, scales, offset, absmax, shape, dtype, blocksize, scale_blocksize, out_dtype):
    return packed.new_empty(shape, dtype=out_dtype)


@torch.library.custom_op("minilora::nf4_lora_weight", mutates_args=())
def nf4_lora_weight(packed: Tensor, scales: Optional[Tensor], offset: Optional[Tensor], absmax: Tensor,
                    shape: list[int], dtype: torch.dtype, blocksize: int, scale_blocksize: int, A: Tensor,
                    B: Tensor, scaling: float, out_dtype: torch.dtype, row_scale: Optional[Tensor]) -> Tensor:
    """W' = [row_scale ⊙] (deq(q) + s·B A) in out_dtype: (out, in)."""
    q = _q(packed, scales, offset, absmax, shape, dtype, blocksize, scale_blocksize)
    return _EAGER["nf4_lora_weight"](q, A, B, scaling, out_dtype, row_scale=row_scale)


@nf4_lora_weight.register_fake
def _(packed, scales, offset, absmax, shape, dtype, blocksize, scale_blocksize, A, B, scaling, out_dtype, row_scale):
    return packed.new_empty(shape, dtype=out_dtype)


# W' and its product in one operator: to the compiler W' never exists as a tensor of the graph, so it can
# neither keep it for backward nor build all of a layer's weights at the top of the backward graph and hold
# them until their last use (what it did with nf4_lora_weight: every W' of a layer alive at once, 416 MiB at
# the 8B shape, bench/NOTES.md, call Q). Each call builds its W' and frees it on return, as eager code does.


def lora_matmul(m: Tensor, w: Tensor, bias: Optional[Tensor], transposed: bool) -> Tensor:
    """m wᵀ + bias (transposed) or m w: what the two operators below compute once they hold W'."""
    return torch.nn.functional.linear(m, w, bias) if transposed else torch.mm(m, w)


def _lora_matmul_fake(m: Tensor, out: int, inn: int, transposed: bool) -> Tensor:
    return m.new_empty((m.shape[0], out if transposed else inn))


@torch.library.custom_op("minilora::nf4_lora_matmul", mutates_args=())
def nf4_lora_matmul(m: Tensor, packed: Tensor, scales: Optional[Tensor], offset: Optional[Tensor], absmax: Tensor,
                    shape: list[int], dtype: torch.dtype, blocksize: int, scale_blocksize: int, A: Tensor,
                    B: Tensor, scaling: float, bias: Optional[Tensor], transposed: bool,
                    row_scale: Optional[Tensor]) -> Tensor:
    """m W'ᵀ + bias (transposed: the forward, (N, in) -> (N, out)) or m W' (the input's gradient,
    (N, out) -> (N, in)), W' = [row_scale ⊙] (deq(q) + s·B A) built in m's dtype and freed inside."""
    q = _q(packed, scales, offset, absmax, shape, dtype, blocksize, scale_blocksize)
    return lora_matmul(m, _EAGER["nf4_lora_weight"](q, A, B, scaling, m.dtype, row_scale=row_scale), bias,
                       transposed)


@nf4_lora_matmul.register_fake
def _(m, packed, scales, offset, absmax, shape, dtype, blocksize, scale_blocksize, A, B, scaling, bias, transposed,
      row_scale):
    return _lora_matmul_fake(m, shape[0], shape[1], transposed)


@torch.library.custom_op("minilora::dense_lora_matmul", mutates_args=())
def dense_lora_matmul(m: Tensor, w0: Tensor, A: Tensor, B: Tensor, scaling: float, bias: Optional[Tensor],
                      transposed: bool, row_scale: Optional[Tensor]) -> Tensor:
    """`nf4_lora_matmul` on a dense base W0 (already in m's dtype)."""
    return lora_matmul(m, _EAGER["dense_lora_weight"](w0, A, B, scaling, row_scale=row_scale), bias, transposed)


@dense_lora_matmul.register_fake
def _(m, w0, A, B, scaling, bias, transposed, row_scale):
    return _lora_matmul_fake(m, w0.shape[0], w0.shape[1], transposed)


@torch.library.custom_op("minilora::nf4_lora_row_norm", mutates_args=())
def nf4_lora_row_norm(packed: Tensor, scales: Optional[Tensor], offset: Optional[Tensor], absmax: Tensor,
                      shape: list[int], dtype: torch.dtype, blocksize: int, scale_blocksize: int, A: Tensor,
                      B: Tensor, scaling: float) -> Tensor:
    """‖deq(q) + s·B A‖ per row, float32: (out,)."""
    q = _q(packed, scales, offset, absmax, shape, dtype, blocksize, scale_blocksize)
    return _EAGER["nf4_lora_row_norm"](q, A, B, scaling)


@nf4_lora_row_norm.register_fake
def _(packed, scales, offset, absmax, shape, dtype, blocksize, scale_blocksize, A, B, scaling):
    return packed.new_empty((shape[0],), dtype=torch.float32)


@torch.library.custom_op("minilora::dense_lora_weight", mutates_args=())
def dense_lora_weight(w0: Tensor, A: Tensor, B: Tensor, scaling: float, row_scale: Optional[Tensor]) -> Tensor:
    """W' = [row_scale ⊙] (W0 + s·B A) in W0's dtype: (out, in)."""
    return _EAGER["dense_lora_weight"](w0, A, B, scaling, row_scale=row_scale)


@dense_lora_weight.register_fake
def _(w0, A, B, scaling, row_scale):
    return torch.empty_like(w0)


@torch.library.custom_op("minilora::dense_lora_row_norm", mutates_args=())
def dense_lora_row_norm(w0: Tensor, A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """‖W0 + s·B A‖ per row, float32: (out,)."""
    return _EAGER["dense_lora_row_norm"](w0, A, B, scaling)


@dense_lora_row_norm.register_fake
def _(w0, A, B, scaling):
    return w0.new_empty((w0.shape[0],), dtype=torch.float32)


@torch.library.custom_op("minilora::column_dot", mutates_args=())
def column_dot(g: Tensor, y: Tensor, with_sum: bool) -> tuple[Tensor, Tensor]:
    """(Σ_n g_nj y_nj, Σ_n g_nj or an empty tensor): two (C,) accumulations (float64 for float64 inputs)."""
    dot, total = _EAGER["column_dot"](g, y, with_sum)
    return dot, total if total is not None else dot.new_empty((0,))


@column_dot.register_fake
def _(g, y, with_sum):
    acc = torch.float64 if g.dtype == torch.float64 else torch.float32
    return g.new_empty((g.shape[1],), dtype=acc), g.new_empty((g.shape[1] if with_sum else 0,), dtype=acc)
