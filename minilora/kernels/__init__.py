"""GPU fast paths: Triton kernels for NF4, with the pure-PyTorch versions as fallback.

`dequantize` and `quantize` pick the Triton kernel for CUDA tensors (when triton is installed) and
`minilora.nf4` everywhere else. Both give the same bits, so callers need not care which ran.

The 8-bit stage of double quantization (`blockwise_8bit_triton`, `double_quantize_triton`) is one kernel
too; `minilora.double_quant` calls it for CUDA tensors.

`column_dot(g, y)` = Σ_n g_nj y_nj and Σ_n g_nj per column, in float32, in one read of g and y: DoRA's
magnitude gradient (see `minilora.fast`). PyTorch would first write the product g ⊙ y, then reduce it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from minilora.kernels.nf4_triton import (
    DEQUANT_CONFIG,
    HAVE_TRITON,
    LORA_WEIGHT_CONFIG,
    QUANT_CONFIG,
    blockwise_8bit_triton,
    dense_lora_row_norm_triton,
    dense_lora_weight_triton,
    dequantize_nf4_triton,
    double_quantize_triton,
    nf4_lora_row_norm_triton,
    nf4_lora_weight_supported,
    nf4_lora_weight_triton,
    quantize_nf4_triton,
    triton_usable,
)
from minilora.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4

if HAVE_TRITON:
    import triton
    import triton.language as tl

__all__ = [
    "HAVE_TRITON",
    "triton_usable",
    "dequantize_nf4_triton",
    "quantize_nf4_triton",
    "blockwise_8bit_triton",
    "double_quantize_triton",
    "nf4_lora_weight_supported",
    "nf4_lora_weight_triton",
    "nf4_lora_row_norm_triton",
    "dense_lora_weight_triton",
    "dense_lora_row_norm_triton",
    "dequantize",
    "quantize",
    "column_dot",
    "column_dot_triton",
    "DEQUANT_CONFIG",
    "QUANT_CONFIG",
    "LORA_WEIGHT_CONFIG",
]


def _on_gpu(device: torch.device) -> bool:
    return HAVE_TRITON and device.type == "cuda"


def dequantize(q: NF4Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """`minilora.nf4.dequantize_nf4(q, dtype)`, through the Triton kernel on CUDA. -> q.shape in dtype."""
    if isinstance(q, NF4Tensor) and _on_gpu(q.packed.device):
        return dequantize_nf4_triton(q, dtype)
    return dequantize_nf4(q, dtype)


def quantize(w: Tensor, blocksize: int = 64, double_quant: bool = False) -> NF4Tensor:
    """`minilora.nf4.quantize_nf4(w, blocksize, double_quant)`, through the Triton kernel on CUDA."""
    if isinstance(w, Tensor) and _on_gpu(w.device):
        return quantize_nf4_triton(w, blocksize, double_quant)
    return quantize_nf4(w, blocksize, double_quant)


if HAVE_TRITON:

    @triton.jit
    def _column_dot_kernel(g_ptr, y_ptr, dot_ptr, sum_ptr, n_rows, n_cols, rows_per_split,
                           BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, WITH_SUM: tl.constexpr):
        """Partial column sums of g ⊙ y (and of g) over one slice of rows: -> dot[split, col], sum[split, col]."""
        split = tl.program_id(1)
        cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < n_cols
        acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        acc_g = tl.zeros((BLOCK_C,), dtype=tl.float32)
        first = split.to(tl.int64) * rows_per_split
        last = tl.minimum(first + rows_per_split, n_rows)
        for start in range(first, last, BLOCK_N):
            rows = start + tl.arange(0, BLOCK_N)
            ok = (rows < last)[:, None] & col_ok[None, :]
            offs = rows[:, None] * n_cols + cols[None, :]
            g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            acc += tl.sum(g * y, axis=0)
            if WITH_SUM:
                acc_g += tl.sum(g, axis=0)
        tl.store(dot_ptr + split * n_cols + cols, acc, mask=col_ok)
        if WITH_SUM:
            tl.store(sum_ptr + split * n_cols + cols, acc_g, mask=col_ok)


def column_dot(g: Tensor, y: Tensor, with_sum: bool = False) -> tuple[Tensor, Tensor | None]:
    """(Σ_n g_nj y_nj, Σ_n g_nj if with_sum) for g, y: (N, C) -> two (C,) float32 (float64 for float64).

    One Triton pass over g and y on CUDA; `(g * y).sum(0)` elsewhere.
    """
    if g.shape != y.shape or g.dim() != 2:
        raise ValueError(f"g and y must be 2-D of one shape, got {tuple(g.shape)} and {tuple(y.shape)}")
    if _on_gpu(g.device) and g.dtype in (torch.bfloat16, torch.float16) and y.dtype == g.dtype:
        return column_dot_triton(g, y, with_sum)
    acc_dtype = torch.float64 if g.dtype == torch.float64 else torch.float32  # (no dispatched promote_types)
    return (g * y).sum(0, dtype=acc_dtype), (g.sum(0, dtype=acc_dtype) if with_sum else None)


def column_dot_triton(g: Tensor, y: Tensor, with_sum: bool = False) -> tuple[Tensor, Tensor | None]:
    """`column_dot` through the Triton kernel (CUDA, or a CPU under TRITON_INTERPRET=1); float32 results."""
    if not triton_usable(g.device):
        raise RuntimeError(f"column_dot_triton needs CUDA tensors (or TRITON_INTERPRET=1); got {g.device}")
    if g.shape != y.shape or g.dim() != 2:
        raise ValueError(f"g and y must be 2-D of one shape, got {tuple(g.shape)} and {tuple(y.shape)}")
    g, y = g.contiguous(), y.contiguous()
    n_rows, n_cols = g.shape
    block_n, block_c = 32, 128
    col_blocks = triton.cdiv(n_cols, block_c)
    # enough programs to fill the GPU (~4 per SM), each over a whole number of row blocks
    splits = max(1, min(triton.cdiv(n_rows, block_n), triton.cdiv(4 * 132, col_blocks)))
    rows_per_split = triton.cdiv(triton.cdiv(n_rows, splits), block_n) * block_n
    splits = triton.cdiv(n_rows, rows_per_split)
    dot = torch.empty(splits, n_cols, dtype=torch.float32, device=g.device)
    total = torch.empty_like(dot) if with_sum else dot
    _column_dot_kernel[(col_blocks, splits)](g, y, dot, total, n_rows, n_cols, rows_per_split,
                                             BLOCK_N=block_n, BLOCK_C=block_c, WITH_SUM=with_sum, num_warps=4)
    return dot.sum(0), (total.sum(0) if with_sum else None)
