"""Merging into a 16-bit base rounds W0 + ΔW once, to the base's dtype, and loses part of a small update.

Chapter 3 shows it on one layer; these tests pin the numbers down. With ‖ΔW‖ = 2.5 % of ‖W0‖ (the size
chapter 3 measures on its trained adapters) the update that survives a merge into bfloat16 is off by several
percent of ΔW, while a float32 merge is exact to float rounding, and unmerge gives the 16-bit W0 back bit for bit
(merge keeps a copy, because subtracting ΔW cannot undo the rounding).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from minilora.lora import LoRALinear

D, R, SIGMA, UPDATE_SHARE = 384, 8, 0.05, 0.025


def layer_with_update(dtype: torch.dtype, seed: int = 0) -> LoRALinear:
    """A (D, D) base of std SIGMA in `dtype` with a rank-R adapter whose s·BA has norm UPDATE_SHARE·‖W0‖."""
    gen = torch.Generator().manual_seed(seed)
    base = nn.Linear(D, D, bias=False)
    with torch.no_grad():
        base.weight.copy_(SIGMA * torch.randn(D, D, generator=gen))
    layer = LoRALinear(base.to(dtype), r=R, lora_alpha=R)   # s = 1; adapters stay float32
    with torch.no_grad():
        layer.lora_B["default"].copy_(torch.randn(D, R, generator=gen))
        delta = layer.delta_weight()
        w0 = base.weight.float()
        layer.lora_B["default"].mul_(UPDATE_SHARE * w0.norm() / delta.norm())
    return layer


def surviving_update_error(dtype: torch.dtype, seed: int = 0) -> float:
    """‖(W_merged − W0) − ΔW‖ / ‖ΔW‖: how much of the update the merge loses, relative to the update."""
    layer = layer_with_update(dtype, seed)
    w0 = layer.base_layer.weight.detach().clone().double()
    delta = layer.delta_weight().detach().double()
    layer.merge()
    moved = layer.base_layer.weight.detach().double() - w0
    return ((moved - delta).norm() / delta.norm()).item()


def test_bf16_merge_loses_a_few_percent_of_a_small_update():
    errors = [surviving_update_error(torch.bfloat16, seed) for seed in range(3)]
    # bf16 keeps 8 significant bits: a rounding step of W0 + ΔW is ~0.4 % of |W0|, i.e. ~15 % of a ΔW entry
    # 40x smaller than W0's; averaged over the matrix that is a few percent of ‖ΔW‖ (about 6.6 % here)
    assert all(0.03 < e < 0.12 for e in errors), errors


def test_fp16_merge_loses_less_and_fp32_merge_is_exact():
    fp16, fp32 = surviving_update_error(torch.float16), surviving_update_error(torch.float32)
    assert fp16 < surviving_update_error(torch.bfloat16) / 4, fp16   # 3 more mantissa bits: ~8x smaller
    assert fp32 < 1e-4, fp32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_unmerge_restores_the_16bit_base_exactly(dtype):
    layer = layer_with_update(dtype)
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert not torch.equal(layer.base_layer.weight, w0)
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, w0)


def test_bf16_merged_output_drifts_from_the_unmerged_layer():
    """The lost part shows in the outputs: merged vs unmerged differ by far more than in float32."""
    x = torch.randn(16, D, generator=torch.Generator().manual_seed(1))
    gaps = {}
    for dtype in (torch.float32, torch.bfloat16):
        layer = layer_with_update(dtype)
        with torch.no_grad():
            # compare both against the exact float64 result W0 x + ΔW x, so the bf16 input cast is not counted
            w0, delta = layer.base_layer.weight.double(), layer.delta_weight().double()
            exact_update = x.double() @ delta.T
            layer.merge()
            merged_update = x.double() @ (layer.base_layer.weight.double() - w0).T
        gaps[dtype] = ((merged_update - exact_update).norm() / exact_update.norm()).item()
    assert gaps[torch.float32] < 1e-4 and gaps[torch.bfloat16] > 0.03, gaps
