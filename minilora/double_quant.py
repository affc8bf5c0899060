"""Double quantization: storing the NF4 block scales in 8 bits, as bitsandbytes does.

A 4-bit weight needs a float32 absmax for every block of 64 values: 32/64 = 0.5 extra bits per weight.
QLoRA quantizes those scales a second time (bitsandbytes' `compress_statistics=True`):

    offset = mean(absmax)                                   one float32 per tensor
    absmax - offset  -> groups of 256 -> one float32 scale per group (the group's largest |value|)
                     -> each value / scale rounded to one of the 256 entries of a signed "dynamic" 8-bit map
    absmax ≈ dynamic_map[code] * scale + offset             what dequantization uses

Storage per weight: 8/64 + 32/(64·256) ≈ 0.127 bits instead of 0.5. The block scales are all positive;
subtracting their mean centres them so both halves of the signed map are used.

Rounding to the map follows the kernel bitsandbytes runs on a CPU (its C++ library), so the bytes are
identical to `bitsandbytes.functional.quantize_4bit(..., compress_statistics=True)` there. That kernel does
not search the map for the nearest entry: it first snaps the value to the nearest of 65,536 evenly spaced
points in [-1, 1] (1.5e-5 away at most) and takes the entry nearest to that point. So it can pick the
neighbouring entry for a value within 1.5e-5 of the midpoint between two entries, and near zero, where
entries are closer together than the points, one a few entries off; for values spread evenly over [-1, 1]
about 1 in 1000 codes differ. `exact=True` gives the nearest entry instead.

`to_bnb` / `from_bnb` convert a `minilora.nf4.NF4Tensor` to and from bitsandbytes' `(packed, QuantState)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from minilora.nf4 import NF4Tensor

__all__ = [
    "dynamic_map",
    "quantize_blockwise_8bit",
    "dequantize_blockwise_8bit",
    "DoubleQuantAbsmax",
    "double_quantize",
    "to_bnb",
    "from_bnb",
]

SCALE_BLOCKSIZE = 256  # block scales per float32 second-level scale; bitsandbytes' matmul requires 256
_GRID_STEPS = 65535  # bitsandbytes' CPU kernel resolves [-1, 1] into 65,535 steps (65,536 points)


@lru_cache(maxsize=2)
def _dynamic_map_cpu(signed: bool) -> Tensor:
    max_exponent_bits, total_bits = 7, 8
    values: list[float] = []
    for i in range(max_exponent_bits):
        # Decade 10^(i-6): the larger the magnitude, the more of the 7 non-sign bits go to the fraction.
        # Each decade is split evenly on [0.1, 1] and an entry sits in the middle of each piece.
        pieces = 2 ** (i + (0 if signed else 1)) + 1
        edges = torch.linspace(0.1, 1.0, pieces, dtype=torch.float32)
        middles = (edges[:-1] + edges[1:]) / 2.0
        decade = 10.0 ** (i - (max_exponent_bits - 1))
        values += (decade * middles).tolist()  # float32 product, as bitsandbytes computes it
        if signed:
            values += (-decade * middles).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (2**total_bits - len(values))  # the unsigned map is two entries short
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_map(signed: bool = True, device: torch.device | str | None = None) -> Tensor:
    """bitsandbytes' 8-bit "dynamic" map (Dettmers 2015): (256,) float32, sorted, in [-1, 1].

    Entry = ±10^e · m with decade e ∈ {-6..0} and m evenly spaced in (0.1, 1); small decades get few
    entries, large ones many, so relative precision is roughly constant. Plus 0 and 1. Signed: min -0.99297.
    """
    return _dynamic_map_cpu(bool(signed)).to(device=device, copy=True)


def _check_vector(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.float32 or x.dim() != 1:
        raise ValueError(f"{name} must be a 1-D float32 tensor, got {x.dtype} with shape {tuple(x.shape)}")


def _grid_lookup(scaled: Tensor, code: Tensor) -> Tensor:
    """Map index by bitsandbytes' CPU rule: snap to the grid point -1 + 2k/65535, then the entry nearest
    that point (a point exactly between two entries goes to the lower one). float32 throughout."""
    midpoints = (code[:-1] + code[1:]) / 2
    points = torch.arange(_GRID_STEPS + 1, dtype=torch.float32, device=code.device) * 2.0 / _GRID_STEPS - 1.0
    entry_of_point = torch.searchsorted(midpoints, points)  # number of midpoints strictly below each point
    point = ((scaled.clamp(-1.0, 1.0) + 1.0) * 0.5 * _GRID_STEPS + 0.5).long()  # round half up
    return entry_of_point[point]


def quantize_blockwise_8bit(
    x: Tensor, code: Tensor, blocksize: int = SCALE_BLOCKSIZE, exact: bool = False
) -> tuple[Tensor, Tensor]:
    """Blockwise 8-bit quantization: x: (n,) float32 -> (codes (n,) uint8, scales (ceil(n/blocksize),) f32).

    scale_b = max |x| over block b; codes_i = the entry of `code` nearest to x_i / scale_b (see module
    docstring for the CPU grid rule; `exact=True`: the nearest entry, found against float32 midpoints
    (a + b) / 2 with a value exactly on one going to the lower entry).
    """
    _check_vector(x, "x")
    if not isinstance(blocksize, int) or blocksize <= 0:
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")
    n = x.numel()
    n_blocks = -(-n // blocksize)
    blocks = torch.nn.functional.pad(x, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    scales = blocks.abs().amax(dim=1)
    inverse = torch.where(scales > 0, 1.0 / scales, torch.zeros_like(scales))
    scaled = (blocks * inverse.unsqueeze(1)).reshape(-1)[:n]
    code = code.to(x.device, torch.float32)
    if exact:
        codes = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2)
    else:
        codes = _grid_lookup(scaled, code)
        # The C++ kernel writes byte 0 for an all-zero block; its values still dequantize to 0.
        empty = (scales == 0).repeat_interleave(blocksize)[:n]
        codes = codes.masked_fill(empty, 0)
    return codes.to(torch.uint8), scales


def dequantize_blockwise_8bit(codes: Tensor, scales: Tensor, code: Tensor, blocksize: int = SCALE_BLOCKSIZE) -> Tensor:
    """x̂_i = code[codes_i] · scales[i // blocksize]: codes (n,) uint8, scales (n_blocks,) -> (n,) float32."""
    if codes.dtype != torch.uint8 or codes.dim() != 1:
        raise ValueError(f"codes must be a 1-D uint8 tensor, got {codes.dtype} with shape {tuple(codes.shape)}")
    _check_vector(scales, "scales")
    if scales.numel() != -(-codes.numel() // blocksize):
        raise ValueError(f"{codes.numel()} codes in blocks of {blocksize} need {-(-codes.numel() // blocksize)} "
                         f"scales, got {scales.numel()}")
    values = code.to(codes.device, torch.float32)[codes.long()]
    return values * scales.repeat_interleave(blocksize)[: codes.numel()]


@dataclass(frozen=True)
class DoubleQuantAbsmax:
    """Block scales stored in 8 bits: absmax ≈ dynamic_map[codes] · scales[block // 256] + offset.

    codes: (n_blocks,) uint8; scales: (ceil(n_blocks/256),) float32; offset: () float32 (mean absmax).
    """

    codes: Tensor
    scales: Tensor
    offset: Tensor
    blocksize: int = SCALE_BLOCKSIZE

    def dequantize(self) -> Tensor:
        """The block scales the 4-bit dequantization uses: (n_blocks,) float32."""
        code = dynamic_map(signed=True, device=self.codes.device)
        return dequantize_blockwise_8bit(self.codes, self.scales, code, self.blocksize) + self.offset

    def nbytes(self) -> int:
        """Bytes stored per tensor (the 256-entry map is shared by every tensor, so not counted)."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.offset))


def double_quantize(absmax: Tensor, blocksize: int = SCALE_BLOCKSIZE, exact: bool = False) -> DoubleQuantAbsmax:
    """Quantize NF4 block scales: absmax (n_blocks,) float32 -> DoubleQuantAbsmax (mean-centred, 8-bit)."""
    _check_vector(absmax, "absmax")
    offset = absmax.mean()
    code = dynamic_map(signed=True, device=absmax.device)
    codes, scales = quantize_blockwise_8bit(absmax - offset, code, blocksize, exact=exact)
    return DoubleQuantAbsmax(codes=codes, scales=scales, offset=offset, blocksize=blocksize)


# ---------------------------------------------------------------------------------------------------------
# Conversion to and from bitsandbytes


def to_bnb(q: NF4Tensor) -> tuple[Tensor, Any]:
    """minilora NF4Tensor -> bitsandbytes (packed (ceil(n/2), 1) uint8, QuantState with quant_type "nf4").

    The result dequantizes with `bitsandbytes.functional.dequantize_4bit(packed, state)` and can back a
    `bnb.nn.Params4bit(packed, quant_state=state, bnb_quantized=True, ...)`. Tensors are shared, not copied.
    """
    from bitsandbytes.functional import QuantState

    from minilora.nf4 import NF4Tensor, nf4_table

    if not isinstance(q, NF4Tensor):
        raise TypeError(f"to_bnb expects a minilora NF4Tensor, got {type(q).__name__}")
    common = dict(shape=torch.Size(q.shape), dtype=q.dtype, blocksize=q.blocksize, quant_type="nf4",
                  code=nf4_table(q.packed.device))
    if isinstance(q.absmax, DoubleQuantAbsmax):
        dq = q.absmax
        inner = QuantState(absmax=dq.scales, code=dynamic_map(True, dq.codes.device), blocksize=dq.blocksize,
                           dtype=torch.float32)
        state = QuantState(absmax=dq.codes, offset=dq.offset, state2=inner, **common)
    else:
        state = QuantState(absmax=q.absmax, **common)
    return q.packed.view(-1, 1), state


def from_bnb(packed: Tensor, quant_state: Any) -> NF4Tensor:
    """bitsandbytes (packed, QuantState) from `quantize_4bit(..., quant_type="nf4")` -> minilora NF4Tensor.

    Accepts any `quant_storage` (the bytes are reinterpreted as uint8). Tensors are shared, not copied.
    """
    from minilora.nf4 import ALLOWED_BLOCKSIZES, NF4Tensor, nf4_table

    if not isinstance(packed, Tensor):
        raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
    for field in ("absmax", "shape", "dtype", "blocksize", "quant_type", "code", "state2"):
        if not hasattr(quant_state, field):
            raise TypeError(f"quant_state must be a bitsandbytes QuantState (missing {field!r}), "
                            f"got {type(quant_state).__name__}")
    if getattr(quant_state, "packing_format_for_cpu", False):
        raise ValueError("this QuantState uses bitsandbytes' AVX512 CPU inference layout; "
                         "put the bnb module in train mode (or save its state_dict) to get the standard layout")
    if quant_state.quant_type != "nf4":
        raise ValueError(f"only quant_type 'nf4' is supported, got {quant_state.quant_type!r}")
    if quant_state.blocksize not in ALLOWED_BLOCKSIZES:
        raise ValueError(f"blocksize {quant_state.blocksize} is not one of {ALLOWED_BLOCKSIZES}")
    if not torch.equal(quant_state.code.float().cpu(), nf4_table("cpu")):
        raise ValueError("quant_state.code is not the NF4 table")
    packed = packed.contiguous().view(torch.uint8).reshape(-1)
    shape = torch.Size(quant_state.shape)
    if packed.numel() != (shape.numel() + 1) // 2:
        raise ValueError(f"{packed.numel()} packed bytes do not hold shape {tuple(shape)} "
                         f"({(shape.numel() + 1) // 2} bytes needed)")
    inner = quant_state.state2
    if inner is None:
        absmax: Tensor | DoubleQuantAbsmax = quant_state.absmax.float()
    else:
        if inner.blocksize != SCALE_BLOCKSIZE or not torch.equal(inner.code.float().cpu(), dynamic_map(True)):
            raise ValueError("only bitsandbytes' default double quantization (signed dynamic map, blocks of "
                             f"{SCALE_BLOCKSIZE}) is supported")
        offset = torch.as_tensor(quant_state.offset, dtype=torch.float32, device=packed.device).reshape(())
        absmax = DoubleQuantAbsmax(codes=quant_state.absmax, scales=inner.absmax.float(), offset=offset,
                                   blocksize=inner.blocksize)
    return NF4Tensor(packed=packed, absmax=absmax, shape=shape, dtype=quant_state.dtype,
                     blocksize=quant_state.blocksize)
