"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv 2402.09353).

DoRA splits every output row of the adapted weight into a length and a direction:

    V  = W0 + s·B A                       (out, in)   the LoRA-adapted weight
    W' = m ⊙ V / ‖V‖_row                  m: (out,)   one learned length per output row

LoRA moves the direction, the magnitude vector m moves the length. m starts at ‖W0‖_row, so with B = 0 the
layer is exactly the base layer. As in the paper (§4.3) and in PEFT, ‖V‖_row is treated as a constant in the
backward pass: it follows V in the forward pass but gets no gradient, which saves memory and time.

The functions here are pure tensor math; `minilora.lora.LoRALinear(..., use_dora=True)` calls them.
Output, in the form PEFT computes it (x̃ = dropout(x); x̃ = x in eval mode or without dropout):

    y = base(x) + (m/‖V‖ − 1) ⊙ W0 x̃ + (m/‖V‖) ⊙ s·B A x̃

Without dropout this is y = (m/‖V‖) ⊙ (V x) + b: the bias is not rescaled. With dropout the W0 x term of
base(x) stays un-dropped and only the correction terms see x̃.

Rows with ‖V‖ = 0 (all-zero rows of W0 exist in real checkpoints) would give m/0 = NaN; the norm is taken
in at least float32 and floored at `NORM_EPS`, so such rows get a finite factor and, since V's row is zero,
output exactly the bias.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["NORM_EPS", "row_norm", "dora_scale", "dora_forward", "dora_merged_weight", "dora_unmerged_weight"]

# Floor for ‖V‖_row. Far below any row norm of a trained weight (those are O(1e-2..1e2)), far above float32's
# smallest normal number, so m / NORM_EPS stays finite for any magnitude a layer can reasonably learn.
NORM_EPS = 1e-12


def _norm_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 row norms lose digits and fp16 overflows for wide rows; take them in float32 (or float64).
    return torch.promote_types(dtype, torch.float32)


def row_norm(weight: Tensor, delta: Tensor | None = None) -> Tensor:
    """‖W0 + ΔW‖₂ over the input dim, one value per output row, no floor. weight, delta: (out, in) -> (out,)."""
    dtype = _norm_dtype(weight.dtype)
    v = weight.to(dtype)
    if delta is not None:
        v = v + delta.to(dtype)
    return torch.linalg.vector_norm(v, dim=1)


def dora_scale(magnitude: Tensor, weight: Tensor, delta: Tensor) -> Tensor:
    """m / max(‖W0 + ΔW‖_row, eps), with the norm detached (DoRA §4.3). magnitude: (out,) -> (out,) float32+."""
    norm = row_norm(weight.detach(), delta.detach()).clamp_min(NORM_EPS)
    return magnitude.to(norm.dtype) / norm


def dora_forward(
    x: Tensor,
    base_out: Tensor,
    *,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    scaling: float,
    dropout: Callable[[Tensor], Tensor],
    use_dropout: bool,
    lora_fn: Callable[[Tensor, Tensor, Tensor, float], Tensor],
) -> Tensor:
    """The DoRA output y (see module docstring). x: (..., in), base_out: (..., out) = base(x) -> (..., out).

    `weight` is W0 as (out, in) in x's dtype; `lora_fn(x, A, B, s) = s·x Aᵀ Bᵀ` is the LoRA product, passed in
    so that DoRA and plain LoRA share one implementation of it. `use_dropout` is True in training mode with a
    real dropout; then W0 x̃ is recomputed, otherwise it is read off base(x) − b (saves a matmul).
    """
    delta = scaling * (lora_B @ lora_A)  # (out, in), only feeds the detached norm
    scale = dora_scale(magnitude, weight, delta).to(x.dtype)  # (out,)
    if use_dropout:
        x = dropout(x)
        base_part = F.linear(x, weight)  # W0 x̃
    else:
        base_part = base_out if bias is None else base_out - bias  # W0 x
    lora_part = lora_fn(x, lora_A, lora_B, scaling)  # s·B A x̃
    return base_out + (scale - 1) * base_part + scale * lora_part


def dora_merged_weight(weight: Tensor, delta: Tensor, magnitude: Tensor) -> tuple[Tensor, Tensor]:
    """W' = (m/‖W0+ΔW‖_row) ⊙ (W0 + ΔW) and that factor. weight, delta: (out, in) -> ((out, in), (out,)).

    Computed in at least float32; the caller casts W' back to the stored dtype.
    """
    dtype = _norm_dtype(weight.dtype)
    v = weight.to(dtype) + delta.to(dtype)
    factor = dora_scale(magnitude.detach(), weight, delta).to(dtype)
    return factor[:, None] * v, factor


def dora_unmerged_weight(merged: Tensor, delta: Tensor, factor: Tensor) -> Tensor:
    """Inverse of `dora_merged_weight`: W0 = W'/factor − ΔW (rows with factor 0 come back as 0; see LoRALinear)."""
    dtype = factor.dtype
    safe = torch.where(factor == 0, torch.ones_like(factor), factor)
    return merged.to(dtype) / safe[:, None] - delta.to(dtype)
