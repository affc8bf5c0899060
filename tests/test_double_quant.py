"""Double quantization and the bitsandbytes conversion, checked against bitsandbytes' CPU kernels."""

import pytest
import torch

from minilora.bnb import cpu_dequantize_path, from_bnb, to_bnb
from minilora.double_quant import (
    DoubleQuantAbsmax,
    dequantize_blockwise_8bit,
    double_quantize,
    dynamic_map,
    dynamic_map_tables,
    map_tables,
    quantize_blockwise_8bit,
)
from minilora.nf4 import dequantize_nf4, quantize_nf4

bnb_F = pytest.importorskip("bitsandbytes.functional")


pytestmark = pytest.mark.usefixtures("eager_bitsandbytes")  # no torch.compile of bitsandbytes' fallback


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_is_bitsandbytes_map(signed):
    ours = dynamic_map(signed)
    assert ours.shape == (256,) and ours.dtype == torch.float32
    assert torch.equal(ours, bnb_F.create_dynamic_map(signed=signed))


def test_map_tables_are_cached_and_the_map_handed_out_is_a_copy():
    code = dynamic_map()
    tables = map_tables(code, "cpu")
    assert map_tables(code.clone(), "cpu") is tables  # cached by value: built once per map and device
    assert dynamic_map_tables("cpu") is tables
    code[0] = 5.0  # the caller's copy: the cached tables and later copies are unaffected
    assert torch.equal(tables.code, bnb_F.create_dynamic_map(signed=True))
    assert torch.equal(dynamic_map(), bnb_F.create_dynamic_map(signed=True))
    assert tables.entry_of_point.dtype == torch.uint8 and tables.entry_of_point.shape == (65536,)


def test_lookup_table_is_the_nearest_entry_of_each_grid_point():
    # float64 reference: away from the midpoints (where float32 rounding of the midpoint could decide),
    # the table's entry for grid point -1 + 2k/65535 is the nearest map entry
    tables = dynamic_map_tables("cpu")
    code64 = tables.code.double()
    mids64 = (code64[:-1] + code64[1:]) / 2
    points = torch.arange(65536, dtype=torch.float32) * 2.0 / 65535 - 1.0  # as bitsandbytes builds them
    nearest = torch.searchsorted(mids64, points.double())
    below = mids64[(nearest - 1).clamp(min=0)]
    above = mids64[nearest.clamp(max=254)]
    clear = ((points.double() - below).abs() > 1e-6) & ((points.double() - above).abs() > 1e-6)
    assert clear.float().mean() > 0.99
    assert torch.equal(tables.entry_of_point.long()[clear], nearest[clear])


def _values_with_zero_group(n: int) -> torch.Tensor:
    torch.manual_seed(n)
    x = torch.randn(n) * 0.01
    x[256:512] = 0.0  # an all-zero group where there is one
    return x


@pytest.mark.parametrize("n", [3, 256, 1000, 2000, 2048])
def test_blockwise_8bit_same_as_bitsandbytes(n):
    x = _values_with_zero_group(n)
    code = dynamic_map()
    codes, scales = quantize_blockwise_8bit(x, code)
    theirs, state = bnb_F.quantize_blockwise(x, code=code, blocksize=256)
    assert torch.equal(codes, theirs) and torch.equal(scales, state.absmax)
    assert torch.equal(dequantize_blockwise_8bit(codes, scales, code), bnb_F.dequantize_blockwise(theirs, state))


def test_cpu_grid_rule_differs_from_nearest_only_near_midpoints():
    # bnb's CPU kernel snaps to 65,536 grid points first (at most 1/65535 away), so it can only pick
    # another entry than the nearest for values that close to a midpoint between entries.
    torch.manual_seed(5)
    code = dynamic_map()
    mids = (code[:-1] + code[1:]) / 2
    near_mids = (mids + (torch.rand(255) - 0.5) * 4e-5).clamp(-1, 1)
    one = torch.tensor([1.0])  # first in each group of 256, so every group is scaled by 1
    x = torch.cat([one, near_mids, one, torch.linspace(-4e-5, 4e-5, 79), torch.rand(176) * 2 - 1])
    grid, _ = quantize_blockwise_8bit(x, code)
    nearest, _ = quantize_blockwise_8bit(x, code, exact=True)
    theirs, _ = bnb_F.quantize_blockwise(x, code=code, blocksize=256)
    assert torch.equal(grid, theirs)
    differ = grid != nearest
    assert differ.any(), "no value separates the two rules; the test would prove nothing"
    distance = (x[differ].double().unsqueeze(1) - mids.double()).abs().min(dim=1).values
    assert distance.max() <= 1 / 65535 + 1e-7


def test_cpu_grid_rule_rounds_half_up():
    # Values that land exactly halfway between two grid points whose map entries differ
    code = dynamic_map()
    points = torch.arange(65536, dtype=torch.float32) * 2.0 / 65535 - 1.0
    entry = torch.searchsorted((code[:-1] + code[1:]) / 2, points)
    halfway = []
    for k in (entry[1:] != entry[:-1]).nonzero().flatten().tolist():
        t = torch.tensor((k + 0.5) / 65535, dtype=torch.float32)
        for _ in range(20):  # walk float32 neighbours until t·65535 rounds to exactly k + 0.5
            if (t * 65535).item() == k + 0.5:
                halfway.append((2 * t - 1).item())
                break
            t = torch.nextafter(t, torch.tensor(1.0 if (t * 65535).item() < k + 0.5 else -1.0))
    assert len(halfway) > 100
    x = torch.tensor([1.0] + halfway[:255])
    ours, _ = quantize_blockwise_8bit(x, code)
    theirs, _ = bnb_F.quantize_blockwise(x, code=code, blocksize=256)
    assert torch.equal(ours, theirs)
    half_even = entry[((x + 1.0) * 0.5 * 65535).round().long()].to(torch.uint8)
    assert (half_even != theirs).any(), "round-half-to-even would agree; the test would prove nothing"


def test_exact_rule_is_the_nearest_entry():
    torch.manual_seed(1)
    code = dynamic_map()
    x = torch.cat([torch.tensor([1.0]), torch.rand(511) * 2 - 1])
    codes, scales = quantize_blockwise_8bit(x, code, exact=True)
    scaled = torch.cat([x[:256] * (1.0 / scales[0]), x[256:] * (1.0 / scales[1])])
    distance = (scaled.double().unsqueeze(1) - code.double()).abs()  # float64 reference
    assert torch.equal(codes.long(), distance.argmin(dim=1))
    # a value exactly on a (float32) midpoint takes the lower entry
    mids = (code[:-1] + code[1:]) / 2
    on_mid, _ = quantize_blockwise_8bit(torch.cat([torch.tensor([1.0]), mids]), code, exact=True)
    assert torch.equal(on_mid[1:].long(), torch.arange(255))


def test_double_quantize_matches_bitsandbytes_state():
    torch.manual_seed(2)
    w = torch.randn(300, 200)  # 938 blocks of 64 -> 4 groups of 256 scales, the last one ragged
    _, plain = bnb_F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    _, nested = bnb_F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    dq = double_quantize(plain.absmax)
    assert torch.equal(dq.offset, plain.absmax.mean())
    assert torch.equal(dq.offset, nested.offset)
    assert torch.equal(dq.codes, nested.absmax) and torch.equal(dq.scales, nested.state2.absmax)
    assert nested.state2.blocksize == dq.scale_blocksize == 256
    theirs = bnb_F.dequantize_blockwise(nested.absmax, nested.state2) + nested.offset
    assert torch.equal(dq.dequantize(), theirs)
    # a second level of rounding: close to the true scales, not equal
    assert 0 < (dq.dequantize() - plain.absmax).abs().max() < 0.01 * plain.absmax.max()


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_round_trip_through_bitsandbytes(double_quant, dtype):
    torch.manual_seed(3)
    w = torch.randn(24, 70).to(dtype)
    q = quantize_nf4(w, blocksize=64, double_quant=double_quant)

    packed, state = to_bnb(q)
    assert packed.shape == (q.packed.numel(), 1) and state.quant_type == "nf4" and state.nested == double_quant
    with cpu_dequantize_path("pytorch"):  # bitsandbytes' flattened-block rule, whatever this CPU picks
        assert torch.equal(bnb_F.dequantize_4bit(packed, state), dequantize_nf4(q))

    theirs_packed, theirs_state = bnb_F.quantize_4bit(
        w, blocksize=64, compress_statistics=double_quant, quant_type="nf4"
    )
    for back in (from_bnb(packed, state), from_bnb(theirs_packed, theirs_state)):
        assert torch.equal(back.packed, q.packed)
        assert (back.shape, back.dtype, back.blocksize, back.double_quant) == (q.shape, q.dtype, 64, double_quant)
        assert torch.equal(back.block_absmax(), q.block_absmax())
        assert torch.equal(dequantize_nf4(back), dequantize_nf4(q))


def test_from_bnb_after_state_dict_serialization():
    # a Linear4bit state_dict stores the QuantState as tensors + a packed JSON blob; rebuild it and convert
    torch.manual_seed(4)
    w = torch.randn(16, 64)
    packed, state = bnb_F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    restored = bnb_F.QuantState.from_dict(state.as_dict(packed=True), device=torch.device("cpu"))
    with cpu_dequantize_path("pytorch"):
        assert torch.equal(dequantize_nf4(from_bnb(packed, restored)), bnb_F.dequantize_4bit(packed, state))


def test_from_bnb_other_quant_storage():
    w = torch.randn(8, 64)
    packed, state = bnb_F.quantize_4bit(w, blocksize=64, quant_type="nf4", quant_storage=torch.bfloat16)
    assert packed.dtype == torch.bfloat16
    assert torch.equal(from_bnb(packed, state).packed, quantize_nf4(w).packed)


def test_bad_input():
    packed, fp4_state = bnb_F.quantize_4bit(torch.randn(64), blocksize=64, quant_type="fp4")
    with pytest.raises(ValueError, match="nf4"):
        from_bnb(packed, fp4_state)
    packed, state = bnb_F.quantize_4bit(torch.randn(64), blocksize=64, quant_type="nf4")
    with pytest.raises(ValueError, match="packed bytes"):
        from_bnb(packed[:10], state)
    with pytest.raises(TypeError, match="QuantState"):
        from_bnb(packed, {"absmax": state.absmax})
    with pytest.raises(TypeError, match="NF4Tensor"):
        to_bnb(torch.randn(4))
    with pytest.raises(ValueError, match="1-D float32"):
        double_quantize(torch.ones(4, 4))
    with pytest.raises(ValueError, match="1-D float32"):
        double_quantize(torch.ones(4, dtype=torch.float16))
    with pytest.raises(ValueError, match="scale_blocksize"):
        quantize_blockwise_8bit(torch.ones(4), dynamic_map(), scale_blocksize=0)
    assert isinstance(quantize_nf4(torch.ones(64), double_quant=True).absmax, DoubleQuantAbsmax)
