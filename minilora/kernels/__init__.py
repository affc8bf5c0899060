"""GPU fast paths: Triton kernels, each with a readable chapter's PyTorch function as its fallback.

The dispatchers below pick the Triton kernel for CUDA tensors (when triton is installed) and the chapter's
function everywhere else. Both give the same bits (`column_dot`: the same sums up to float32 rounding), so
callers need not care which ran:

    dequantize(q, dtype)                       minilora.nf4.dequantize_nf4       <-> dequantize_nf4_triton
    quantize(w, blocksize, double_quant)       minilora.nf4.quantize_nf4         <-> quantize_nf4_triton
    double_quantize(absmax, scale_blocksize)   minilora.double_quant.double_quantize <-> double_quantize_triton
    column_dot(g, y, with_sum)                 (g * y).sum(0)                    <-> column_dot_triton

and, for `minilora.fast` on CUDA (no PyTorch twin: fast.py builds W' with addmm where these do not run),

    merge_weight(W0 or q, A, B, s, dtype, row_scale)  W' = [row_scale ⊙] (W0 + s·B A) in one pass
    merged_row_norm(W0 or q, A, B, s)                 ‖W0 + s·B A‖ per row, float32
    merged_matmul(m, W0 or q, A, B, s, bias, t)       m W'ᵀ + bias or m W', W' built and freed in one call

The kernels live by content: `kernels.nf4` (NF4 quantize and dequantize, the 8-bit step of double
quantization) and `kernels.lora_weight` (W' = W0 + s·B A for `minilora.fast`, its row norms, DoRA's column
dot products). Their public names are re-exported here. Under `torch.compile` the dispatchers call the same
code as registered operators (`kernels.ops`), which the compiler keeps whole instead of tracing into.
"""

from __future__ import annotations

import torch
from torch import Tensor

import minilora.double_quant
from minilora.double_quant import SCALE_BLOCKSIZE, DoubleQuantAbsmax
from minilora.kernels.lora_weight import (
    LORA_WEIGHT_CONFIG,
    column_dot_triton,
    dense_lora_row_norm_triton,
    dense_lora_weight_triton,
    nf4_lora_row_norm_triton,
    nf4_lora_weight_supported,
    nf4_lora_weight_triton,
)
from minilora.kernels.nf4 import (
    DEQUANT_CONFIG,
    HAVE_TRITON,
    QUANT_CONFIG,
    blockwise_8bit_triton,
    dequantize_nf4_triton,
    double_quantize_triton,
    quantize_nf4_triton,
    triton_usable,
)
from minilora.kernels import ops
from minilora.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4

__all__ = [
    "HAVE_TRITON",
    "triton_usable",
    "dequantize",
    "quantize",
    "double_quantize",
    "column_dot",
    "merge_weight",
    "merged_row_norm",
    "merged_matmul",
    "dequantize_nf4_triton",
    "quantize_nf4_triton",
    "blockwise_8bit_triton",
    "double_quantize_triton",
    "nf4_lora_weight_supported",
    "nf4_lora_weight_triton",
    "nf4_lora_row_norm_triton",
    "dense_lora_weight_triton",
    "dense_lora_row_norm_triton",
    "column_dot_triton",
    "DEQUANT_CONFIG",
    "QUANT_CONFIG",
    "LORA_WEIGHT_CONFIG",
]


def _on_gpu(device: torch.device) -> bool:
    return HAVE_TRITON and device.type == "cuda"


_compiling = torch.compiler.is_compiling


def dequantize(q: NF4Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """`minilora.nf4.dequantize_nf4(q, dtype)`, through the Triton kernel on CUDA. -> q.shape in dtype."""
    if _compiling() and isinstance(q, NF4Tensor):
        parts, (shape, q_dtype, blocksize, scale_blocksize) = ops.nf4_parts(q)
        return ops.nf4_dequantize(*parts, list(shape), q_dtype, blocksize, scale_blocksize, dtype or q_dtype)
    return _dequantize(q, dtype)


def _dequantize(q: NF4Tensor, dtype: torch.dtype | None = None) -> Tensor:
    if isinstance(q, NF4Tensor) and _on_gpu(q.packed.device):
        return dequantize_nf4_triton(q, dtype)
    return dequantize_nf4(q, dtype)


def quantize(w: Tensor, blocksize: int = 64, double_quant: bool = False) -> NF4Tensor:
    """`minilora.nf4.quantize_nf4(w, blocksize, double_quant)`, through the Triton kernels on CUDA.

    On CUDA both levels run as kernels: the 4-bit codes and block scales in one pass, then (double_quant)
    the mean of the scales and one kernel for their 8-bit codes.
    """
    if isinstance(w, Tensor) and _on_gpu(w.device):
        return quantize_nf4_triton(w, blocksize, double_quant)
    return quantize_nf4(w, blocksize, double_quant)


def double_quantize(absmax: Tensor, scale_blocksize: int = SCALE_BLOCKSIZE, exact: bool = False) -> DoubleQuantAbsmax:
    """`minilora.double_quant.double_quantize(absmax, scale_blocksize, exact)`, as one kernel on CUDA.

    absmax (n_blocks,) float32 -> DoubleQuantAbsmax. The kernel handles groups of a power of two from 16 to
    4096 scales (one program per group); other sizes take the PyTorch path on any device.
    """
    if (isinstance(absmax, Tensor) and _on_gpu(absmax.device) and type(scale_blocksize) is int
            and 16 <= scale_blocksize <= 4096 and not scale_blocksize & (scale_blocksize - 1)):
        return double_quantize_triton(absmax, scale_blocksize, rule="nearest" if exact else "grid")
    return minilora.double_quant.double_quantize(absmax, scale_blocksize, exact)


def column_dot(g: Tensor, y: Tensor, with_sum: bool = False) -> tuple[Tensor, Tensor | None]:
    """(Σ_n g_nj y_nj, Σ_n g_nj if with_sum) for g, y: (N, C) -> two (C,) float32 (float64 for float64).

    DoRA's magnitude gradient (see `minilora.fast`). One Triton pass over g and y for 16-bit CUDA tensors;
    `(g * y).sum(0)` elsewhere.
    """
    if g.shape != y.shape or g.dim() != 2:
        raise ValueError(f"g and y must be 2-D of one shape, got {tuple(g.shape)} and {tuple(y.shape)}")
    if _compiling():
        dot, total = ops.column_dot(g, y, with_sum)
        return dot, (total if with_sum else None)
    return _column_dot(g, y, with_sum)


def _column_dot(g: Tensor, y: Tensor, with_sum: bool) -> tuple[Tensor, Tensor | None]:
    if _on_gpu(g.device) and g.dtype in (torch.bfloat16, torch.float16) and y.dtype == g.dtype:
        return column_dot_triton(g, y, with_sum)
    acc_dtype = torch.float64 if g.dtype == torch.float64 else torch.float32  # (no dispatched promote_types)
    return (g * y).sum(0, dtype=acc_dtype), (g.sum(0, dtype=acc_dtype) if with_sum else None)


def merge_weight(weight: NF4Tensor | Tensor, A: Tensor, B: Tensor, scaling: float, dtype: torch.dtype,
                row_scale: Tensor | None = None) -> Tensor:
    """W' = [row_scale ⊙] (W0 + s·B A): (out, in) in dtype, one Triton pass over W0 or its 4-bit codes (CUDA).

    A dense W0 must already be in dtype. Callers check `nf4_lora_weight_supported` (NF4) first.
    """
    if isinstance(weight, NF4Tensor):
        if _compiling():
            parts, (shape, q_dtype, blocksize, scale_blocksize) = ops.nf4_parts(weight)
            return ops.nf4_lora_weight(*parts, list(shape), q_dtype, blocksize, scale_blocksize, A, B, float(scaling),
                                       dtype, row_scale)
        return nf4_lora_weight_triton(weight, A, B, scaling, dtype, row_scale=row_scale)
    if _compiling():
        return ops.dense_lora_weight(weight, A, B, float(scaling), row_scale)
    return dense_lora_weight_triton(weight, A, B, scaling, row_scale=row_scale)


def merged_matmul(m: Tensor, weight: NF4Tensor | Tensor, A: Tensor, B: Tensor, scaling: float,
                  bias: Tensor | None = None, transposed: bool = True, row_scale: Tensor | None = None) -> Tensor:
    """m W'ᵀ + bias (transposed: a forward, m (N, in) -> (N, out)) or m W' (an input's gradient, m (N, out)
    -> (N, in); bias None), W' = [row_scale ⊙] (W0 + s·B A) built by `merge_weight` in m's dtype.

    Eagerly the two steps as written; under `torch.compile` one operator (`kernels.ops`), so that W' stays
    inside it: a compiled backward can then neither hoist the builds nor keep W' between two uses.
    """
    if _compiling():
        if isinstance(weight, NF4Tensor):
            parts, (shape, q_dtype, blocksize, scale_blocksize) = ops.nf4_parts(weight)
            return ops.nf4_lora_matmul(m, *parts, list(shape), q_dtype, blocksize, scale_blocksize, A, B,
                                       float(scaling), bias, transposed, row_scale)
        return ops.dense_lora_matmul(m, weight, A, B, float(scaling), bias, transposed, row_scale)
    return ops.lora_matmul(m, merge_weight(weight, A, B, scaling, m.dtype, row_scale), bias, transposed)


def merged_row_norm(weight: NF4Tensor | Tensor, A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """‖W0 + s·B A‖ for each row: (out,) float32, one Triton pass that never writes W' (CUDA)."""
    if isinstance(weight, NF4Tensor):
        if _compiling():
            parts, (shape, q_dtype, blocksize, scale_blocksize) = ops.nf4_parts(weight)
            return ops.nf4_lora_row_norm(*parts, list(shape), q_dtype, blocksize, scale_blocksize, A, B, float(scaling))
        return nf4_lora_row_norm_triton(weight, A, B, scaling)
    if _compiling():
        return ops.dense_lora_row_norm(weight, A, B, float(scaling))
    return dense_lora_row_norm_triton(weight, A, B, scaling)


# What the operators of kernels.ops run: the eager code above, never the compile branch again.
ops.set_eager("dequantize", _dequantize)
ops.set_eager("column_dot", _column_dot)
ops.set_eager("nf4_lora_weight", nf4_lora_weight_triton)
ops.set_eager("nf4_lora_row_norm", nf4_lora_row_norm_triton)
ops.set_eager("dense_lora_weight", dense_lora_weight_triton)
ops.set_eager("dense_lora_row_norm", dense_lora_row_norm_triton)
