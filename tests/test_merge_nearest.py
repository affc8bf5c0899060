"""A merge into a 16-bit base writes the nearest 16-bit weight to W0 + ΔW: no 16-bit matrix keeps more of ΔW.

Chapter 3 shows it on its trained adapter; here on a layer built with a small update (‖ΔW‖ = 2.5 % of ‖W0‖).
`LoRALinear.merge` forms W0 + ΔW in float32 and rounds once to the base's dtype. The float32 sum can itself
round, so in rare entries a float32 sum that lands exactly between two 16-bit values rounds the other way
than the float64 sum would (double rounding): at most a handful of entries, never a measurable loss.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from minilora.lora import LoRALinear

D, R, SIGMA, UPDATE_SHARE = 256, 8, 0.05, 0.025


def merged_layer(dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W0, ΔW, merged weight), all float64, for a (D, D) base in `dtype` with ‖ΔW‖ = UPDATE_SHARE·‖W0‖."""
    gen = torch.Generator().manual_seed(seed)
    base = nn.Linear(D, D, bias=False)
    with torch.no_grad():
        base.weight.copy_(SIGMA * torch.randn(D, D, generator=gen))
    layer = LoRALinear(base.to(dtype), r=R, lora_alpha=R)       # s = 1; the adapter stays float32
    with torch.no_grad():
        layer.lora_B["default"].copy_(torch.randn(D, R, generator=gen))
        layer.lora_B["default"].mul_(UPDATE_SHARE * base.weight.float().norm() / layer.delta_weight().norm())
        w0, delta = layer.base_layer.weight.double(), layer.delta_weight().double()
        layer.merge()
    return w0, delta, layer.base_layer.weight.double()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", [0, 1])
def test_merge_writes_the_nearest_16bit_weight(dtype, seed):
    w0, delta, merged = merged_layer(dtype, seed)
    nearest = (w0 + delta).to(dtype).double()                  # one rounding of the exact sum
    assert (merged != nearest).sum().item() <= 4               # double rounding: a tie, rarely
    lost = lambda w: (((w - w0) - delta).norm() / delta.norm()).item()
    assert lost(merged) == pytest.approx(lost(nearest), rel=1e-3)
    # and rounding ΔW to 16 bits before the addition keeps less of it
    assert lost((w0.to(dtype) + delta.to(dtype)).double()) > lost(merged)
