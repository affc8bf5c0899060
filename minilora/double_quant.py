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

bitsandbytes' CUDA kernel does not use that grid: it binary-searches the map (nearest entry, as `exact=True`
up to which side a value exactly on a midpoint goes), so on a GPU its codes differ from its own CPU codes
in a few scales per thousand. minilora keeps the CPU rule on every device: the same bytes everywhere.

Two sizes of block meet here: the 4-bit weights come in blocks of `blocksize` (64) values, one absmax each
(`minilora.nf4`); those absmax values come in groups of `scale_blocksize` (256), one float32 scale each.

This page is the PyTorch reference, on any device. On CUDA, `minilora.kernels.double_quantize` runs the
same 8-bit step as one Triton kernel (the same bytes), and `minilora.kernels.quantize` uses it. Conversion
of a whole NF4 tensor to and from bitsandbytes (`to_bnb`, `from_bnb`) is in `minilora.bnb`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

__all__ = [
    "dynamic_map",
    "MapTables",
    "dynamic_map_tables",
    "map_tables",
    "quantize_blockwise_8bit",
    "dequantize_blockwise_8bit",
    "DoubleQuantAbsmax",
    "absmax_mean",
    "double_quantize",
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

    Entry = ±10^e · m with decade e ∈ {-6..0} and m evenly spaced in (0.1, 1); the decade [10^(e-1), 10^e)
    gets 2^(6+e) values per sign (64 in [0.1, 1), one below 1e-6), so most entries go to the top decades and
    relative precision is NOT constant: finest near ±1 (neighbours 1.4 % apart) and coarser towards small
    magnitudes (13 % apart just above 0.1, a factor 6 between the two smallest values). Plus 0 and 1.
    Signed: min -0.99297.
    A fresh tensor each call (the caller may modify it); the library's own copies are cached per device.
    """
    return _dynamic_map_cpu(bool(signed)).to(device=device, copy=True)


@dataclass(frozen=True)
class MapTables:
    """What rounding to a sorted 256-entry map needs, on one device (built once per map and device).

    code: (256,) float32, the map. midpoints: (255,) float32, (code[i] + code[i+1]) / 2.
    entry_of_point: (65536,) uint8, bitsandbytes' CPU lookup table: the entry nearest to grid point
    -1 + 2k/65535, i.e. the number of midpoints strictly below that point (float32 throughout).
    """

    code: Tensor
    midpoints: Tensor
    entry_of_point: Tensor


def _build_tables(code: Tensor) -> MapTables:
    code = code.to(torch.float32)
    midpoints = (code[:-1] + code[1:]) / 2
    points = torch.arange(_GRID_STEPS + 1, dtype=torch.float32, device=code.device) * 2.0 / _GRID_STEPS - 1.0
    entry = torch.searchsorted(midpoints, points)  # number of midpoints strictly below each point
    return MapTables(code, midpoints, entry.to(torch.uint8))


@lru_cache(maxsize=16)
def _cached_tables(key: tuple[float, ...], device: torch.device) -> MapTables:
    # built on the CPU once, then copied to the device once: no per-call host->device copy (each one
    # would stall the host until the GPU's queue has drained)
    tables = _build_tables(torch.tensor(key, dtype=torch.float32))
    return MapTables(*(t.to(device) for t in (tables.code, tables.midpoints, tables.entry_of_point)))


@lru_cache(maxsize=16)
def dynamic_map_tables(device: torch.device | str = "cpu") -> MapTables:
    """`MapTables` of the signed dynamic map on `device`, cached: shared, read-only tensors."""
    return _cached_tables(tuple(_dynamic_map_cpu(True).tolist()), torch.device(device))


def map_tables(code: Tensor, device: torch.device | str) -> MapTables:
    """`MapTables` of any sorted map for use on `device`: cached when `code` is on the CPU (read by value),
    rebuilt on every call otherwise (reading a GPU tensor's values would stall the host)."""
    if code.device.type == "cpu":
        return _cached_tables(tuple(code.to(torch.float32).tolist()), torch.device(device))
    tables = _build_tables(code)
    return MapTables(*(t.to(device) for t in (tables.code, tables.midpoints, tables.entry_of_point)))


def _check_vector(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.float32 or x.dim() != 1:
        raise ValueError(f"{name} must be a 1-D float32 tensor, got {x.dtype} with shape {tuple(x.shape)}")


def _check_scale_blocksize(scale_blocksize: object) -> None:
    if type(scale_blocksize) is not int or scale_blocksize <= 0:
        raise ValueError(f"scale_blocksize must be a positive int, got {scale_blocksize!r}")


def _quantize_8bit(x: Tensor, tables: MapTables, scale_blocksize: int, exact: bool) -> tuple[Tensor, Tensor]:
    """`quantize_blockwise_8bit` after its checks, with the map's tables at hand."""
    n = x.numel()
    n_blocks = -(-n // scale_blocksize)
    blocks = torch.nn.functional.pad(x, (0, n_blocks * scale_blocksize - n)).view(n_blocks, scale_blocksize)
    scales = blocks.abs().amax(dim=1)
    inverse = torch.where(scales > 0, 1.0 / scales, 0.0)
    scaled = blocks * inverse.unsqueeze(1)
    tiny = torch.isinf(inverse)
    if tiny.any():
        # A subnormal scale (below 1.2e-38) has no finite reciprocal, and inf * 0 is NaN, which would index
        # nowhere below. Divide those blocks instead; normal scales never come here, so their bytes stay
        # bitsandbytes'.
        scaled[tiny] = blocks[tiny] / scales[tiny].unsqueeze(1)
    if exact:
        codes = torch.bucketize(scaled, tables.midpoints).to(torch.uint8)
    else:
        # bitsandbytes' CPU rule: snap to the grid point -1 + 2k/65535 (round half up), then look up the entry
        # nearest that point. Each step is one float32 rounding, as in its C++ kernel; in place, no temporaries.
        point = scaled.clamp_(-1.0, 1.0).add_(1.0).mul_(0.5).mul_(_GRID_STEPS).add_(0.5).long()
        codes = tables.entry_of_point[point]
        codes.masked_fill_((scales == 0).unsqueeze(1), 0)  # the C++ kernel writes byte 0 for an all-zero block
    return codes.reshape(-1)[:n], scales


def quantize_blockwise_8bit(
    x: Tensor, code: Tensor, scale_blocksize: int = SCALE_BLOCKSIZE, exact: bool = False
) -> tuple[Tensor, Tensor]:
    """Blockwise 8-bit quantization: x: (n,) float32 -> (codes (n,) uint8, scales (ceil(n/scale_blocksize),) f32).

    scale_b = max |x| over block b of `scale_blocksize` values; codes_i = the entry of `code` nearest to
    x_i / scale_b (see module docstring for the CPU grid rule; `exact=True`: the nearest entry, found against
    float32 midpoints (a + b) / 2 with a value exactly on one going to the lower entry). Pass `code` on the
    CPU: its tables are then built once and cached.
    """
    _check_vector(x, "x")
    _check_scale_blocksize(scale_blocksize)
    return _quantize_8bit(x, map_tables(code, x.device), scale_blocksize, exact)


def dequantize_blockwise_8bit(codes: Tensor, scales: Tensor, code: Tensor,
                              scale_blocksize: int = SCALE_BLOCKSIZE) -> Tensor:
    """x̂_i = code[codes_i] · scales[i // scale_blocksize]: codes (n,) uint8, scales (n_blocks,) -> (n,) float32."""
    if codes.dtype != torch.uint8 or codes.dim() != 1:
        raise ValueError(f"codes must be a 1-D uint8 tensor, got {codes.dtype} with shape {tuple(codes.shape)}")
    _check_vector(scales, "scales")
    _check_scale_blocksize(scale_blocksize)
    n = codes.numel()
    needed = -(-n // scale_blocksize)
    if scales.numel() != needed:
        raise ValueError(f"{n} codes in blocks of {scale_blocksize} need {needed} scales, got {scales.numel()}")
    values = code.to(codes.device, torch.float32)[codes.long()]
    if n % scale_blocksize == 0:  # whole blocks: broadcast the scales instead of repeating them
        return (values.view(-1, scale_blocksize) * scales.unsqueeze(1)).view(n)
    return values * scales.repeat_interleave(scale_blocksize)[:n]


@dataclass(frozen=True)
class DoubleQuantAbsmax:
    """Block scales stored in 8 bits: absmax ≈ dynamic_map[codes] · scales[block // scale_blocksize] + offset.

    codes: (n_blocks,) uint8; scales: (ceil(n_blocks/scale_blocksize),) float32; offset: () float32 (the
    mean absmax); scale_blocksize: block scales per float32 scale (256). Sizes and dtypes are checked when
    it is built (never values: no GPU work). `minilora.nf4.NF4Tensor` stores one in place of its absmax
    tensor: it reads `codes` (one per block), `dequantize()` and `nbytes()`.
    """

    codes: Tensor
    scales: Tensor
    offset: Tensor
    scale_blocksize: int = SCALE_BLOCKSIZE

    def __post_init__(self) -> None:
        if type(self.scale_blocksize) is not int or self.scale_blocksize <= 0:
            raise ValueError(f"DoubleQuantAbsmax scale_blocksize must be a positive int, got {self.scale_blocksize!r}")
        for name, t, want in (("codes", self.codes, torch.uint8), ("scales", self.scales, torch.float32)):
            if not isinstance(t, Tensor) or t.dtype != want or t.dim() != 1:
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
                raise TypeError(f"DoubleQuantAbsmax {name} must be a 1-D {want} tensor, got {got}")
        if not isinstance(self.offset, Tensor) or not self.offset.is_floating_point() or self.offset.numel() != 1:
            got = f"{self.offset.dtype} {tuple(self.offset.shape)}" if isinstance(self.offset, Tensor) else self.offset
            raise TypeError(f"DoubleQuantAbsmax offset must be a one-element float tensor, got {got}")
        needed = -(-self.codes.numel() // self.scale_blocksize)
        if self.scales.numel() != needed:
            raise ValueError(f"DoubleQuantAbsmax has {self.codes.numel()} codes in groups of {self.scale_blocksize}, "
                             f"which need {needed} scales; got {self.scales.numel()}")

    def dequantize(self) -> Tensor:
        """The block scales the 4-bit dequantization uses: (n_blocks,) float32."""
        code = dynamic_map_tables(self.codes.device).code
        return dequantize_blockwise_8bit(self.codes, self.scales, code, self.scale_blocksize).add_(self.offset)

    def nbytes(self) -> int:
        """Bytes stored per tensor (the 256-entry map is shared by every tensor, so not counted)."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.offset))


def absmax_mean(absmax: Tensor) -> Tensor:
    """The offset: mean(absmax) as float32 computes it (bitsandbytes', bit for bit), unless that sum overflows.

    Block scales near 1e37 sum past float32's 3.4e38 and the mean becomes inf, then every code NaN. The mean
    itself is never larger than the largest value, so taken in float64 it fits float32 again; that one is
    used only where the float32 mean is not finite (chosen on the device: no host sync).
    """
    mean = absmax.mean()
    return torch.where(torch.isfinite(mean), mean, absmax.double().mean().float())


def double_quantize(absmax: Tensor, scale_blocksize: int = SCALE_BLOCKSIZE, exact: bool = False) -> DoubleQuantAbsmax:
    """Quantize NF4 block scales: absmax (n_blocks,) float32 -> DoubleQuantAbsmax (mean-centred, 8-bit).

    offset = mean(absmax); codes, scales = the 8-bit blockwise quantization of absmax - offset in groups of
    `scale_blocksize` (bitsandbytes' CPU rule, or the nearest entry with exact=True). No host sync.
    """
    _check_vector(absmax, "absmax")
    _check_scale_blocksize(scale_blocksize)
    offset = absmax_mean(absmax)
    codes, scales = _quantize_8bit(absmax - offset, dynamic_map_tables(absmax.device), scale_blocksize, exact)
    return DoubleQuantAbsmax(codes=codes, scales=scales, offset=offset, scale_blocksize=scale_blocksize)
