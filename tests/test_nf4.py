"""NF4 quantization against bitsandbytes: identical bytes and scales, and dequantized values identical to the
flattened-block rule bitsandbytes' CUDA kernel and PyTorch path share.

bitsandbytes' CPU dequantizer depends on the processor (see minilora.bnb): parity is checked against its
PyTorch path by name, its native C++ kernel is forced on and off explicitly, and its known divergence on an
AVX-512 CPU is a test of its own.
"""

import pytest
import torch

from minilora.bnb import (cpu_dequantize_path, cpu_has_avx512f, dequantize_4bit_native, dequantize_4bit_pytorch,
                          native_kernel_divergence, native_kernel_registered)
from minilora.double_quant import DoubleQuantAbsmax
from minilora.nf4 import (
    ALLOWED_BLOCKSIZES,
    NF4_TABLE,
    bits_per_parameter,
    code_usage,
    dequantize_nf4,
    nf4_code_values,
    nf4_table,
    quantize_nf4,
    storage_bytes,
)

bnb_F = pytest.importorskip("bitsandbytes.functional")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


pytestmark = pytest.mark.usefixtures("eager_bitsandbytes")  # no torch.compile of bitsandbytes' fallback


def bnb_quantize(w, blocksize, double_quant):
    return bnb_F.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")


def assert_same_as_bnb(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False, path: str = "pytorch") -> None:
    """Our quantize == bitsandbytes' quantize; our dequantize == bitsandbytes' dequantize through `path`."""
    packed, state = bnb_quantize(w, blocksize, double_quant)
    q = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    assert packed.shape == (q.packed.numel(), 1)
    assert torch.equal(q.packed, packed.view(-1))
    if double_quant:
        assert isinstance(q.absmax, DoubleQuantAbsmax)
        assert torch.equal(q.absmax.codes, state.absmax)
        assert torch.equal(q.absmax.scales, state.state2.absmax)
        assert torch.equal(q.absmax.offset, state.offset)
    else:
        assert torch.equal(q.absmax, state.absmax)
    with cpu_dequantize_path(path):
        theirs = bnb_F.dequantize_4bit(packed, state)
    ours = dequantize_nf4(q)
    assert ours.dtype == theirs.dtype == w.dtype and ours.shape == w.shape
    # bnb's C++ dequantizer returns a 1-D tensor of even length as (1, n); the values are what we compare
    assert torch.equal(ours, theirs.reshape(w.shape))


# --- the table -------------------------------------------------------------------------------------------


def test_table_is_bitsandbytes_table():
    assert torch.equal(nf4_table(), bnb_F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(torch.tensor(NF4_TABLE, dtype=torch.float32), nf4_table())


def test_table_derived_from_normal_quantiles():
    derived = nf4_code_values()
    assert derived.dtype == torch.float32
    assert torch.equal(derived, bnb_F.get_4bit_type("nf4", device="cpu"))
    # the float64 quantiles behind it (reference: torch's Φ) lie within float32 rounding of the table
    p = torch.linspace(0.5, 0.9677083, 9, dtype=torch.float64)[1:]
    exact = torch.special.ndtri(p) / torch.special.ndtri(torch.tensor(0.9677083, dtype=torch.float64))
    assert torch.allclose(derived[8:].double(), exact, rtol=0, atol=1e-6)


# --- bit-exact against bitsandbytes ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape, blocksize",
    [((64,), 64), ((1,), 64), ((33,), 32), ((7, 63), 64), ((2, 3, 50), 128), ((48, 96), 64), ((130, 40), 4096)],
    ids=str,
)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_same_as_bitsandbytes(shape, blocksize, dtype, double_quant):
    torch.manual_seed(sum(shape) + blocksize)
    w = (torch.randn(shape) * 0.05).to(dtype)
    assert_same_as_bnb(w, blocksize, double_quant)


@pytest.mark.parametrize("blocksize", ALLOWED_BLOCKSIZES)
def test_every_allowed_blocksize(blocksize):
    torch.manual_seed(blocksize)
    w = torch.randn(40, 130)  # 5200 values: a ragged last block for every blocksize
    assert_same_as_bnb(w, blocksize, double_quant=True)


def test_non_contiguous_input_is_read_in_logical_order():
    torch.manual_seed(7)
    w = torch.randn(96, 40).t()  # (40, 96) view with transposed strides
    assert not w.is_contiguous()
    assert_same_as_bnb(w, 64, True)
    assert torch.equal(quantize_nf4(w).packed, quantize_nf4(w.contiguous()).packed)


def test_midpoints_go_to_the_lower_code():
    table = nf4_table()
    mids = (table[:-1] + table[1:]) / 2
    above = torch.nextafter(mids, torch.tensor(2.0))
    # absmax 1.0, so each value is its own scaled value: exactly on every midpoint and one ulp above
    block = torch.cat([torch.tensor([1.0]), mids, above, torch.zeros(64 - 31)])
    q = quantize_nf4(block)
    codes = q.codes()
    assert torch.equal(codes[1:16], torch.arange(15, dtype=torch.uint8))
    assert torch.equal(codes[16:31], torch.arange(1, 16, dtype=torch.uint8))
    for dq in (False, True):
        assert_same_as_bnb(block, 64, dq)
        assert_same_as_bnb(-block, 64, dq)


def test_ragged_last_block_is_divided_not_multiplied():
    # bnb scales full blocks by x·(1/absmax) but the ragged last block by x/absmax. Build last-block values
    # for which the two roundings disagree about a midpoint, and check the codes still match bnb's.
    table = nf4_table()
    mids = (table[:-1] + table[1:]) / 2
    absmax = torch.tensor(3.0)
    candidates = torch.cat([mids * absmax, torch.nextafter(mids * absmax, torch.tensor(9.0))])
    disagree = (candidates / absmax == mids.repeat(2)) != (candidates * (1.0 / absmax) == mids.repeat(2))
    tricky = candidates[disagree]
    assert tricky.numel() > 0, "no value separates the two roundings; the test would prove nothing"
    w = torch.cat([torch.randn(64), absmax.reshape(1), tricky])
    assert w.numel() % 64 != 0
    assert_same_as_bnb(w, 64, False)


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_outliers_zeros_and_tiny_blocks(double_quant):
    torch.manual_seed(3)
    w = torch.randn(6, 64) * 0.02
    w[1, 5] = 40.0  # one outlier: the rest of its block collapses onto the zero code
    w[2, 0] = -1e4
    w[3] = 0.0  # an all-zero block
    w[4] = 1e-40  # subnormal float32 block
    assert_same_as_bnb(w, 64, double_quant)
    assert_same_as_bnb(torch.cat([torch.randn(64), torch.zeros(10)]), 64, double_quant)  # all-zero ragged block
    assert_same_as_bnb(torch.full((100,), 2.0), 64, double_quant)  # all absmax equal: DQ input is all zeros
    assert_same_as_bnb(torch.randn(5000) * torch.logspace(-20, 20, 5000), 64, double_quant)


# --- bitsandbytes' two CPU dequantizers ------------------------------------------------------------------

# Rows of whole blocks (and a 1-D tensor): both of bitsandbytes' CPU paths follow the flattened rule there.
# (8, 40): rows that are not a multiple of 16 take the native kernel's scalar loop, which is right too.
WHOLE_BLOCK_ROWS = [((64, 128), 64), ((3, 256), 128), ((96,), 32), ((8, 40), 64), ((5, 70), 64)]


@pytest.mark.parametrize("path", ["pytorch", "native"])
@pytest.mark.parametrize("shape, blocksize", WHOLE_BLOCK_ROWS, ids=str)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_both_cpu_paths_where_they_agree(shape, blocksize, double_quant, path):
    torch.manual_seed(blocksize)
    for dtype in DTYPES:
        assert_same_as_bnb((torch.randn(shape) * 0.05).to(dtype), blocksize, double_quant, path)


RAGGED_ROWS = [(48, 96), (300, 400), (24, 16), (8, 48), (4, 32), (12, 32), (2, 3, 96)]


@pytest.mark.parametrize("shape", RAGGED_ROWS, ids=str)
def test_native_avx512_kernel_on_rows_that_are_not_whole_blocks(shape):
    """bitsandbytes 0.50's AVX-512 loop scales element (i, j) of an (m, n) weight by
    absmax[i·(n // 64) + j // 64] instead of absmax[(i·n + j) // 64]: wrong unless n % 64 == 0.
    Its scalar loop (a CPU without AVX-512) is right. Whichever CPU runs this, the test says which held."""
    torch.manual_seed(sum(shape))
    found = native_kernel_divergence(torch.randn(shape) * 0.05, blocksize=64)
    if cpu_has_avx512f():
        assert found["elements"] > 0 and found["row_blocked"], (
            f"bitsandbytes' native AVX-512 dequantize_4bit now agrees with the flattened blocks on {shape} "
            f"({found}): the kernel was fixed; minilora.bnb's note and this test can say so")
    else:
        assert found["elements"] == 0, f"the native scalar loop differs from the flattened blocks on {shape}: {found}"


def test_bitsandbytes_runs_its_native_kernel_unless_told_otherwise():
    torch.manual_seed(0)
    w = torch.randn(48, 96)
    packed, state = bnb_quantize(w, 64, False)
    args = (packed, state.absmax, 64, "nf4", w.shape, w.dtype)
    machine = bnb_F.dequantize_4bit(packed, state)  # whatever this CPU picks
    expected = dequantize_4bit_native(*args) if native_kernel_registered() else dequantize_4bit_pytorch(*args)
    assert torch.equal(machine, expected)
    with cpu_dequantize_path("native"):
        assert torch.equal(bnb_F.dequantize_4bit(packed, state), dequantize_4bit_native(*args))
    with cpu_dequantize_path("pytorch"):
        assert torch.equal(bnb_F.dequantize_4bit(packed, state), dequantize_4bit_pytorch(*args))
    assert torch.equal(bnb_F.dequantize_4bit(packed, state), machine), "the machine's kernel is back after the block"
    assert torch.equal(dequantize_nf4(quantize_nf4(w)), dequantize_4bit_pytorch(*args))


def test_cpu_dequantize_path_refuses_unknown_paths():
    with pytest.raises(ValueError, match="'pytorch' or 'native'"):
        with cpu_dequantize_path("cuda"):
            pass


# --- layout ---------------------------------------------------------------------------------------------


def test_first_element_in_high_nibble_and_zero_padding():
    q = quantize_nf4(torch.tensor([-1.0, 1.0, 1.0]))
    assert q.packed.tolist() == [0x0F, 0xF7]  # codes 0, 15 | 15, pad (7 = the code of 0.0)
    assert q.codes().tolist() == [0, 15, 15]
    assert dequantize_nf4(q).tolist() == [-1.0, 1.0, 1.0]


def test_dequantize_to_another_dtype():
    torch.manual_seed(0)
    w = torch.randn(10, 30)
    q = quantize_nf4(w, double_quant=True)
    packed, state = bnb_quantize(w, 64, True)
    absmax = bnb_F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    for dtype in DTYPES:
        theirs = dequantize_4bit_pytorch(packed, absmax, 64, "nf4", w.shape, dtype)
        assert torch.equal(dequantize_nf4(q, dtype), theirs)
        assert torch.equal(q.dequantize(dtype), theirs)


def test_reconstruction_error_within_bitsandbytes_band():
    # bnb's own test_4bit_quant bound for NF4 at blocksize 64 on N(0, 1): mean |error| < 0.072798 + 7σ
    torch.manual_seed(0)
    w = torch.randn(512, 512)
    err = (dequantize_nf4(quantize_nf4(w)) - w).abs().mean().item()
    assert 0.05 < err < 0.072798 + 7 * 0.000074


# --- storage --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_bits_per_parameter_counts_bitsandbytes_storage(double_quant):
    w = torch.randn(128, 256)
    q = quantize_nf4(w, double_quant=double_quant)
    packed, state = bnb_quantize(w, 64, double_quant)
    tensors = [packed, state.absmax] + ([state.state2.absmax, state.offset] if double_quant else [])
    reference = sum(t.numel() * t.element_size() for t in tensors)
    assert storage_bytes(q)["total"] == reference
    assert bits_per_parameter(q) == 8 * reference / w.numel()
    if double_quant:  # 4 + 8/64 + 32/(64·256), plus one float32 offset for the whole tensor
        assert bits_per_parameter(q) == 4 + 8 / 64 + 32 / (64 * 256) + 32 / w.numel()
    else:
        assert bits_per_parameter(q) == 4.5


def test_code_usage_counts_codes_and_outer_codes_are_rare():
    torch.manual_seed(0)
    w = torch.randn(256, 256)
    q = quantize_nf4(w)
    packed, _ = bnb_quantize(w, 64, False)
    codes = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 15], 1).reshape(-1).long()
    usage = code_usage(q)
    assert torch.equal(usage, torch.bincount(codes, minlength=16).double() / codes.numel())
    # the docstring's caveat: with a per-block absmax the extreme codes are far from 1/16 each
    assert usage[0] < 1 / 32 and usage[15] < 1 / 32 and usage[7] > 1 / 16


# --- bad input ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused(bad):
    w = torch.randn(4, 64)
    w[2, 7] = bad
    with pytest.raises(ValueError, match=r"non-finite.*\(2, 7\)"):
        quantize_nf4(w)


@pytest.mark.parametrize("blocksize", [48, 16, 8192, 0, -64, 64.0, True])
def test_disallowed_blocksize(blocksize):
    with pytest.raises(ValueError, match="blocksize must be one of"):
        quantize_nf4(torch.randn(128), blocksize=blocksize)


def test_empty_and_integer_tensors():
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4(torch.empty(0, 64))
    with pytest.raises(TypeError, match="int8"):
        quantize_nf4(torch.ones(64, dtype=torch.int8))
    with pytest.raises(TypeError, match="float64"):
        quantize_nf4(torch.ones(64, dtype=torch.float64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        quantize_nf4([1.0, 2.0])
    with pytest.raises(TypeError, match="dtype"):
        dequantize_nf4(quantize_nf4(torch.ones(64)), torch.int32)


def test_double_quantization_is_what_the_package_hands_in(request):
    from minilora import double_quant, nf4

    q = quantize_nf4(torch.randn(300, 64), double_quant=True)
    assert isinstance(q.absmax, double_quant.DoubleQuantAbsmax) and isinstance(q.absmax, nf4.CompressedAbsmax)
    nf4.set_double_quantize(None)
    request.addfinalizer(lambda: nf4.set_double_quantize(double_quant.double_quantize))
    with pytest.raises(RuntimeError, match="double_quant=True needs chapter 5"):
        quantize_nf4(torch.randn(64), double_quant=True)
    assert not quantize_nf4(torch.randn(64)).double_quant
