"""NF4: 4-bit NormalFloat weights, bit for bit as bitsandbytes stores them.

A weight tensor is flattened (row-major) and cut into blocks of `blocksize` values (64 by default). Each
block keeps its largest magnitude `absmax` as a float32 and every value as a 4-bit index into a fixed table
of 16 numbers in [-1, 1]:

    code_i = argmin_k |NF4[k] - w_i / absmax_b|          w_i ≈ NF4[code_i] · absmax_b

The 16 numbers are quantiles of the standard normal distribution (see `nf4_code_values`). Two codes share
a byte, the first in the high nibble. Storage: 4 bits + 32/blocksize bits per weight (4.5 at 64), or about
4.127 with double quantization of the absmax values (chapter 5, `minilora.double_quant`).

Chapter 5 comes after this one, so this file does not import it: an `NF4Tensor` accepts any stored form of
its block scales that offers one code per block and `dequantize()` (`CompressedAbsmax`), and
`quantize_nf4(..., double_quant=True)` calls the function the package hands in when it is imported
(`set_double_quantize`, called by `minilora/__init__.py` with `minilora.double_quant.double_quantize`).

In what sense NF4 is "information-theoretically optimal" (QLoRA): its values are N(0, 1) quantiles at evenly
spaced probabilities, so if weights were exactly normal and always scaled by the same 1/(1.848 σ), each code
would be used about equally often (between 0.89/16 and 1.14/16 of the time): the 4-bit symbols would carry
nearly the maximal 4 bits of entropy. Where that does not hold: the scale is each block's own absmax, a random
maximum that also puts the block's extreme value exactly on ±1, so the outer codes are used far less than
1/16 (about 0.3/16 for N(0, 1) blocks of 64, see `code_usage`); real weights are not exactly normal; and
equal use of codes is not small error: NF4 minimises nothing like the mean squared error (bitsandbytes'
"af4" table cites "NF4 Isn't Information Theoretically Optimal (and that's Good)", arXiv:2306.06965).

Every step below matches bitsandbytes' CPU path exactly (checked in tests/test_nf4.py against
`bitsandbytes.functional.quantize_4bit` / `dequantize_4bit` 0.50.2): same table, same float32 arithmetic,
same rule at midpoints, same padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "NF4_TABLE",
    "ALLOWED_BLOCKSIZES",
    "check_blocksize",
    "nf4_table",
    "nf4_code_values",
    "CompressedAbsmax",
    "set_double_quantize",
    "NF4Tensor",
    "quantize_nf4",
    "dequantize_nf4",
    "storage_bytes",
    "bits_per_parameter",
    "code_usage",
]

# bitsandbytes' NF4 table (functional.get_4bit_type("nf4")), as float32. Index = 4-bit code.
NF4_TABLE: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

ALLOWED_BLOCKSIZES: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bnb's quantize_4bit
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
ZERO_CODE = 7  # NF4_TABLE[7] == 0.0; also the padding nibble of an odd-length tensor
_TINY = 1e-38  # bnb clamps an absmax at this before dividing, so an all-zero block scales to 0, not NaN

NF4_OFFSET = 0.9677083  # outermost probability; bitsandbytes' create_normal_map default


def check_blocksize(blocksize: object, what: str = "blocksize") -> int:
    """Raise ValueError unless `blocksize` is one of ALLOWED_BLOCKSIZES, as an int (64.0 and True are not)."""
    if type(blocksize) is not int or blocksize not in ALLOWED_BLOCKSIZES:
        raise ValueError(f"{what} must be one of {ALLOWED_BLOCKSIZES} (as bitsandbytes allows), got {blocksize!r}")
    return blocksize


@lru_cache(maxsize=8)
def _table_on(device: torch.device) -> Tensor:
    return torch.tensor(NF4_TABLE, dtype=torch.float32, device=device)


def nf4_table(device: torch.device | str | None = None) -> Tensor:
    """The 16 NF4 values as a (16,) float32 tensor, sorted, NF4[7] = 0, NF4[0] = -1, NF4[15] = 1."""
    return _table_on(torch.device(device or "cpu")).clone()


def nf4_code_values(offset: float = NF4_OFFSET) -> Tensor:
    """Derive the NF4 table from normal quantiles, as bitsandbytes' create_normal_map does: (16,) float32.

    Positive side: 8 quantiles Φ⁻¹(p) at p evenly spaced from `offset` down towards 1/2 (9 points, the last
    one, Φ⁻¹(1/2) = 0, dropped). Negative side: 7 of them, mirrored. Add an exact 0 and divide by the
    largest, Φ⁻¹(offset) ≈ 1.848, so the table spans [-1, 1]. 8 + 7 + 1 = 16 codes, one zero.

    bitsandbytes says `offset` was tuned empirically; numerically 0.9677083 ≈ 1 - (1/32 + 1/30)/2, the
    middle of the two outermost-bin centres 1 - 1/32 (16 equal bins) and 1 - 1/30 (15 bins).
    For the default offset the result is checked against NF4_TABLE (RuntimeError if it differs).
    """
    positive_p = torch.linspace(offset, 0.5, 9, dtype=torch.float32)[:-1]  # float32, like bnb
    negative_p = torch.linspace(offset, 0.5, 8, dtype=torch.float32)[:-1]
    # Φ⁻¹ in float64, then rounded to float32 *before* normalising: bnb stores the quantiles as float32
    # first, and normalising in float64 would change 6 of the 16 values in the last bit.
    positive = torch.special.ndtri(positive_p.double()).float().flip(0)  # ascending
    negative = -torch.special.ndtri(negative_p.double()).float()  # ascending: most negative first
    values = torch.cat([negative, torch.zeros(1), positive])
    values = values / positive.max()
    if offset == NF4_OFFSET and not torch.equal(values, nf4_table()):
        raise RuntimeError("derived NF4 values differ from NF4_TABLE; torch.special.ndtri changed?")
    return values


@runtime_checkable
class CompressedAbsmax(Protocol):
    """Block scales stored in a compressed form, such as chapter 5's `DoubleQuantAbsmax`.

    codes: one code per block, (n_blocks,); dequantize() -> the (n_blocks,) float32 scales; nbytes(): the
    bytes it stores. That is all an NF4Tensor reads of it.
    """

    codes: Tensor

    def dequantize(self) -> Tensor: ...

    def nbytes(self) -> int: ...


def _is_compressed(absmax: object) -> bool:
    """Whether absmax has the form of a `CompressedAbsmax`. Read off its attributes, as isinstance() on a
    runtime-checkable Protocol does, but in a way torch.compile can trace."""
    return isinstance(getattr(absmax, "codes", None), Tensor) and callable(getattr(absmax, "dequantize", None)) \
        and callable(getattr(absmax, "nbytes", None))


# quantize_nf4(..., double_quant=True): absmax (n_blocks,) float32 -> its compressed form. Chapter 5's
# `double_quantize`, handed in by minilora/__init__.py; None until then.
_DOUBLE_QUANTIZE: Callable[[Tensor], CompressedAbsmax] | None = None


def set_double_quantize(fn: Callable[[Tensor], CompressedAbsmax] | None) -> None:
    """Make `fn` the double quantization `quantize_nf4(..., double_quant=True)` applies to the block scales."""
    global _DOUBLE_QUANTIZE
    _DOUBLE_QUANTIZE = fn


@dataclass(frozen=True)
class NF4Tensor:
    """A tensor in NF4: n = shape.numel() values in ceil(n / blocksize) blocks.

    packed: (ceil(n/2),) uint8, two 4-bit codes per byte, element 2j in the high nibble.
    absmax: (n_blocks,) float32 block scales, or a compressed form of them (`CompressedAbsmax`, e.g.
    `minilora.double_quant.DoubleQuantAbsmax`).
    shape, dtype: of the original tensor (dequantization returns this dtype unless told otherwise).

    The parts are checked to fit together when the tensor is built (ValueError / TypeError naming the sizes
    that disagree): a wrong count would otherwise dequantize to shifted values or fail deep inside torch.
    Only sizes and dtypes are read, never values, so the check costs no GPU work.
    """

    packed: Tensor
    absmax: Tensor | CompressedAbsmax
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int

    def __post_init__(self) -> None:
        if not isinstance(self.shape, torch.Size):
            try:
                shape = torch.Size(self.shape)
            except TypeError:
                raise TypeError(f"NF4Tensor shape must be a torch.Size or tuple of ints, got {self.shape!r}") from None
            object.__setattr__(self, "shape", shape)  # frozen: the one normalisation allowed here
        _check_layout(self)

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def double_quant(self) -> bool:
        """True when the block scales are stored compressed (double quantization) rather than as float32."""
        return not isinstance(self.absmax, Tensor)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def block_absmax(self) -> Tensor:
        """The per-block scale dequantization multiplies by: (n_blocks,) float32."""
        return self.absmax if isinstance(self.absmax, Tensor) else self.absmax.dequantize()

    def codes(self) -> Tensor:
        """The 4-bit codes unpacked, one per element: (n,) uint8 in 0..15."""
        high, low = self.packed >> 4, self.packed & 0x0F
        return torch.stack([high, low], dim=1).reshape(-1)[: self.numel]

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """Same as `dequantize_nf4(self, dtype)`."""
        return dequantize_nf4(self, dtype)


def _check_layout(q: NF4Tensor) -> None:
    """Raise if q's blocksize, dtype, packed bytes and block scales do not fit its shape (see NF4Tensor)."""
    check_blocksize(q.blocksize, "NF4Tensor blocksize")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"NF4Tensor dtype (the original tensor's) must be float32, float16 or bfloat16, "
                         f"got {q.dtype!r}")
    n, n_blocks = q.numel, q.n_blocks
    where = f"shape {tuple(q.shape)} ({n} values, {n_blocks} blocks of {q.blocksize})"
    if not isinstance(q.packed, Tensor) or q.packed.dtype != torch.uint8 or q.packed.dim() != 1:
        got = f"{q.packed.dtype} {tuple(q.packed.shape)}" if isinstance(q.packed, Tensor) else type(q.packed).__name__
        raise TypeError(f"NF4Tensor packed must be a 1-D uint8 tensor (two 4-bit codes per byte), got {got}")
    if q.packed.numel() != (n + 1) // 2:
        raise ValueError(f"NF4Tensor packed has {q.packed.numel()} bytes; {where} needs (n + 1) // 2 = "
                         f"{(n + 1) // 2}")
    if isinstance(q.absmax, Tensor):
        scales, what = q.absmax, "absmax"
        if not q.absmax.is_floating_point() or q.absmax.dim() != 1:
            raise TypeError(f"NF4Tensor absmax must be a 1-D float32 tensor, got {q.absmax.dtype} "
                            f"{tuple(q.absmax.shape)}")
    elif _is_compressed(q.absmax):
        scales, what = q.absmax.codes, "double-quantized absmax codes"
    else:
        raise TypeError(f"NF4Tensor absmax must be a tensor or a DoubleQuantAbsmax (one code per block and "
                        f"dequantize()), got {type(q.absmax).__name__}")
    if scales.numel() != n_blocks:
        raise ValueError(f"NF4Tensor {what} has {scales.numel()} values; {where} needs one per block: {n_blocks}")


def _check_input(w: Tensor, blocksize: int, double_quant: bool) -> None:
    if not isinstance(w, Tensor):
        raise TypeError(f"quantize_nf4 expects a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"quantize_nf4 needs a float32, float16 or bfloat16 tensor, got {w.dtype}"
                        + (" (float64: convert with .float() first)" if w.dtype == torch.float64 else ""))
    if w.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor (shape {tuple(w.shape)})")
    check_blocksize(blocksize)
    if double_quant and _DOUBLE_QUANTIZE is None:
        raise RuntimeError("double_quant=True needs chapter 5's double quantization, which `import minilora` "
                           "installs (minilora.nf4.set_double_quantize)")
    bad = ~torch.isfinite(w)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0].tolist())
        raise ValueError(f"cannot quantize non-finite weights: {int(bad.sum())} NaN/inf values, first at index "
                         f"{first} ({w[first].item()})")


def _scale_blocks(flat: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """flat: (n,) float32 -> (scaled (n,) in [-1, 1], absmax (n_blocks,)), with bnb's exact arithmetic."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = [(blocks * (1.0 / absmax.clamp(min=_TINY)).unsqueeze(1)).reshape(-1)]
    absmaxes = [absmax]
    if full < n:
        # bnb treats a ragged last block differently: it divides instead of multiplying by the reciprocal
        # (the last bit can differ, which changes a code at a midpoint), and it stores the clamped absmax.
        tail_absmax = flat[full:].abs().amax().clamp(min=_TINY)
        scaled.append(flat[full:] / tail_absmax)
        absmaxes.append(tail_absmax.reshape(1))
    return torch.cat(scaled).clamp(-1.0, 1.0), torch.cat(absmaxes)


def quantize_nf4(w: Tensor, blocksize: int = 64, double_quant: bool = False) -> NF4Tensor:
    """Quantize any-shape float32/float16/bfloat16 tensor w to NF4 (bitsandbytes' layout and codes).

    n = w.numel() values -> packed (ceil(n/2),) uint8 + absmax (ceil(n/blocksize),) float32
    (or 8-bit codes + a float32 per 256 blocks + one mean, if double_quant: chapter 5's `double_quantize`).
    """
    _check_input(w, blocksize, double_quant)
    with torch.no_grad():
        flat = w.detach().reshape(-1).float()  # exact for fp16/bf16: all arithmetic below is float32
        scaled, absmax = _scale_blocks(flat, blocksize)
        table = _table_on(flat.device)
        # Nearest code = number of midpoints strictly below the value, so a value exactly on a midpoint
        # takes the lower code (bnb's bucketize; its CUDA kernel's strict `>` tests agree). The midpoints
        # are float32 (a + b) / 2, so "nearest" holds up to their rounding.
        codes = torch.bucketize(scaled, (table[:-1] + table[1:]) / 2).to(torch.uint8)
        if codes.numel() % 2:
            codes = torch.cat([codes, codes.new_full((1,), ZERO_CODE)])
        packed = (codes[0::2] << 4) | codes[1::2]
        stored: Tensor | CompressedAbsmax = _DOUBLE_QUANTIZE(absmax) if double_quant else absmax
    return NF4Tensor(packed=packed, absmax=stored, shape=w.shape, dtype=w.dtype, blocksize=blocksize)


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """ŵ_i = NF4[code_i] · absmax_{i // blocksize}, in float32, then cast: -> q.shape in `dtype` (or q.dtype)."""
    if not isinstance(q, NF4Tensor):
        raise TypeError(f"dequantize_nf4 expects an NF4Tensor, got {type(q).__name__}")
    dtype = q.dtype if dtype is None else dtype
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    values = _table_on(q.device)[q.codes().long()]
    scales = q.block_absmax().to(q.device, torch.float32).repeat_interleave(q.blocksize)[: q.numel]
    return (values * scales).to(dtype).reshape(q.shape)


def storage_bytes(q: NF4Tensor) -> dict[str, int]:
    """Bytes this tensor stores: {"codes": packed 4-bit data, "scales": absmax or its 8-bit form, "total"}.

    The 16-entry NF4 table and the 256-entry map of double quantization are shared constants: not counted.
    """
    codes = q.packed.numel() * q.packed.element_size()
    scales = q.absmax.numel() * 4 if isinstance(q.absmax, Tensor) else q.absmax.nbytes()
    return {"codes": codes, "scales": scales, "total": codes + scales}


def bits_per_parameter(q: NF4Tensor) -> float:
    """8 · storage bytes / numel. Blocksize 64: 4 + 32/64 = 4.5; double quant: 4 + 8/64 + 32/(64·256) ≈ 4.127."""
    return 8 * storage_bytes(q)["total"] / q.numel


def code_usage(q: NF4Tensor) -> Tensor:
    """How often each of the 16 codes occurs: (16,) float64 fractions summing to 1 (1/16 each = 4 bits)."""
    counts = torch.bincount(q.codes().long(), minlength=16).double()
    return counts / counts.sum()
