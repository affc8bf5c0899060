"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv 2402.09353).

DoRA splits every output row of the adapted weight into a length and a direction:

    V  = W0 + s·B A                       (out, in)   the LoRA-adapted weight
    W' = m ⊙ V / ‖V‖_row                  m: (out,)   one learned length per output row

LoRA moves the direction, the magnitude vector m moves the length. m starts at ‖W0‖_row, so with B = 0 the
layer is exactly the base layer. As in the paper (§4.3) and in PEFT, ‖V‖_row is treated as a constant in the
backward pass: it follows V in the forward pass but gets no gradient, which saves memory and time.

The functions here are pure tensor math. `DoraVariant`, at the end, plugs them into the LoRA layer of
chapter 2 as a variant (PEFT's `LoraVariant`): `minilora.lora.LoRALinear(..., use_dora=True)` gives the
adapter one, and it adds the magnitude vector and computes the adapter's forward, merge and unmerge.
Output, in the form PEFT computes it (x̃ = dropout(x); x̃ = x in eval mode or without dropout):

    y = base(x) + (m/‖V‖ − 1) ⊙ W0 x̃ + (m/‖V‖) ⊙ s·B A x̃

Without dropout this is y = (m/‖V‖) ⊙ (V x) + b: the bias is not rescaled. With dropout the W0 x term of
base(x) stays un-dropped and only the correction terms see x̃.

Rows with ‖V‖ = 0 (all-zero rows of W0 exist in real checkpoints) would give m/0 = NaN; the norm is taken
in at least float32 and floored at `NORM_EPS`, so such rows get a finite factor and, since V's row is zero,
output exactly the bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minilora.lora import LoRALinear, base_weight, lora_matmul

__all__ = ["NORM_EPS", "row_norm", "dora_scale", "dora_forward", "dora_merged_weight", "dora_unmerged_weight",
           "DoraVariant"]

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
    dropout: nn.Module,
) -> Tensor:
    """The DoRA output y (see module docstring). x: (..., in), base_out: (..., out) = base(x) -> (..., out).

    `weight` is W0 as (out, in) in x's dtype; A: (r, in), B: (out, r), magnitude m: (out,). `dropout` is the
    adapter's dropout module: while it drops (training mode, p > 0) W0 x̃ is recomputed, otherwise it is read
    off base(x) − b (saves a matmul). s·B A x̃ is chapter 2's `lora_matmul`, the one plain LoRA uses.
    """
    delta = scaling * (lora_B @ lora_A)  # (out, in), only feeds the detached norm
    scale = dora_scale(magnitude, weight, delta).to(x.dtype)  # (out,)
    if dropout.training and not isinstance(dropout, nn.Identity):
        x = dropout(x)
        base_part = F.linear(x, weight)  # W0 x̃
    else:
        base_part = base_out if bias is None else base_out - bias  # W0 x
    lora_part = lora_matmul(x, lora_A, lora_B, scaling)  # s·B A x̃
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


# ---------------------------------------------------------------------------------------------------------
# DoRA in the LoRA layer


class DoraVariant:
    """DoRA for one adapter of a `LoRALinear`, kept as its `lora_variant[name]` (`minilora.lora.LoRAVariant`).

    The adapter keeps its A, B and scaling; the variant adds the magnitude m: (out,) as
    `layer.lora_magnitude_vector[name]` (PEFT's name, so state dicts and adapter files match) and replaces
    the adapter's forward, merge and unmerge by the functions above.
    """

    def init(self, layer: LoRALinear, name: str) -> None:
        """m = ‖W0 + s·B A‖_row in the adapter's dtype (‖W0‖_row when B = 0: the layer starts as its base)."""
        with torch.no_grad():
            norm = row_norm(base_weight(layer.base_layer), layer.delta_weight(name))
        layer.lora_magnitude_vector[name] = nn.Parameter(norm.to(layer.lora_A[name].dtype))

    def forward(self, layer: LoRALinear, name: str, x: Tensor, result: Tensor) -> Tensor:
        """`dora_forward` for x: (..., in) in the adapter's dtype and result = base(x): (..., out)."""
        return dora_forward(
            x,
            result,
            weight=base_weight(layer.base_layer).to(x.dtype),
            bias=getattr(layer.base_layer, "bias", None),
            lora_A=layer.lora_A[name],
            lora_B=layer.lora_B[name],
            magnitude=layer.lora_magnitude_vector[name],
            scaling=layer.scaling[name],
            dropout=layer.lora_dropout[name],
        )

    def merge(self, layer: LoRALinear, name: str, w0: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        """W' = (m/‖W0 + ΔW‖_row) ⊙ (W0 + ΔW) from w0: (out, in), and what `unmerge` needs to undo it.

        Unmerging divides by the factor m/‖V‖ of the *unmerged* weight, so it is kept. Rows with factor 0
        (m = 0) cannot be divided back: their original values are kept too (usually there are none).
        """
        merged, factor = dora_merged_weight(w0, layer.delta_weight(name).detach(), layer.lora_magnitude_vector[name])
        rows = torch.nonzero(factor == 0).flatten()
        return merged, (factor, rows, w0[rows].clone())

    def unmerge(self, layer: LoRALinear, name: str, merged: Tensor, state: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """W0 = W'/factor − ΔW, with the rows of factor 0 restored from what `merge` kept."""
        factor, rows, saved = state
        restored = dora_unmerged_weight(merged, layer.delta_weight(name), factor)
        restored[rows] = saved.to(restored.dtype)
        return restored
