"""NF4 dequantize and quantize as Triton kernels: one pass over memory, bit for bit `minilora.nf4`.

Dequantization is pure data movement: 0.5 byte of codes (plus 4/64 or ~1/64 byte of scale) in, 2 bytes of
bf16 out per weight. Its floor is those bytes over the memory bandwidth, so the kernel's whole job is to
touch every byte once, in wide coalesced accesses:

    program p: bytes [p·B/2, (p+1)·B/2)  ->  codes (B,) = high, low nibble of each byte, interleaved
               values = NF4[codes] · absmax[block]            (B/blocksize blocks, float32 product)
               out[p·B : (p+1)·B] = values.to(dtype)

With double quantization the block scale itself is rebuilt on the fly from its 8-bit form,
absmax = dynamic_map[code8] · scale[block // 256] + offset, as two rounded float32 operations (no fused
multiply-add: bitsandbytes rounds the product before adding, and so must we).

Quantization reads each value once: per block the absmax (float32), a reciprocal, the scaled values, and the
code = number of the 15 midpoints strictly below the scaled value (bitsandbytes' tie rule: a value on a
midpoint takes the lower code). A ragged last block divides instead of multiplying by the reciprocal and
stores its clamped absmax, exactly as `minilora.nf4._scale_blocks` (and bitsandbytes' CPU path) does.

Double quantization of the n/64 absmax values is the mean (PyTorch, the same reduction bitsandbytes uses)
and one more kernel, one program per group of 256: subtract the mean, take the group's max |x|, scale, and
round to the 256-entry map by bitsandbytes' CPU rule (snap to one of 65,536 grid points, read the entry of
that point from a cached 64 KiB table), all-zero group -> byte 0. In PyTorch that step was about fifteen
small kernels plus a host-to-device copy of the map on every call.

`rounding="exact"` (default) takes the correctly rounded reciprocal 1/absmax, as PyTorch and bitsandbytes'
CPU path do. bitsandbytes' CUDA library is built with --use_fast_math, whose reciprocal is approximate
(within 1 ulp), so a few codes in a hundred million can differ from its GPU output at a midpoint;
`rounding="rcp_approx"` / `"div_full"` reproduce the two approximate PTX instructions it may compile to
(CUDA only), for checking which one it uses.

The kernels also run on a CPU under Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported),
which is how the tests check them bit for bit without a GPU.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch
from torch import Tensor

from minilora.double_quant import DoubleQuantAbsmax, MapTables, double_quantize, dynamic_map_tables
from minilora.nf4 import ALLOWED_BLOCKSIZES, NF4_TABLE, NF4Tensor, SUPPORTED_DTYPES

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: everything here reports itself unavailable
    triton = None
    tl = None

__all__ = [
    "HAVE_TRITON",
    "triton_usable",
    "dequantize_nf4_triton",
    "quantize_nf4_triton",
    "blockwise_8bit_triton",
    "double_quantize_triton",
    "RULES_8BIT",
    "nf4_lora_weight_supported",
    "nf4_lora_weight_triton",
    "nf4_lora_row_norm_triton",
    "dense_lora_weight_triton",
    "dense_lora_row_norm_triton",
    "LORA_WEIGHT_CONFIG",
    "LORA_WEIGHT_VARIANTS",
    "DEQUANT_CONFIG",
    "QUANT_CONFIG",
]

HAVE_TRITON = triton is not None
ROUNDINGS = {"exact": 0, "rcp_approx": 1, "div_full": 2}

# Elements per program and warps per program. 4096 bf16 outputs = 2 KiB of codes in, 8 KiB out per program:
# with 4 warps every thread moves 16 bytes of codes and 64 bytes of output (16-byte vector accesses).
DEQUANT_CONFIG = {"block": 4096, "num_warps": 4}
QUANT_CONFIG = {"block": 2048, "num_warps": 4}
# The W' = W0 + s·B A build, per base kind: a tile of bm rows x bn columns (bn a multiple of the NF4
# blocksize), num_warps, and how the rank-r term is formed: "outer" (r outer products on the CUDA cores, in
# the tile's layout) or "dot" (one tensor-core tl.dot, rank padded to 16). Set from the `buildsweep` section
# of `python -m bench` (its line "LORA_WEIGHT_CONFIG[kind] = ..."; bench/NOTES.md).
LORA_WEIGHT_CONFIG: dict[str, dict[str, int | str]] = {
    "dense": {"bm": 32, "bn": 128, "num_warps": 4, "variant": "dot"},
    "nf4": {"bm": 32, "bn": 128, "num_warps": 4, "variant": "dot"},
}
LORA_WEIGHT_VARIANTS = {"outer": 0, "dot": 1}
MAX_RANK = 64  # larger ranks: dequantize, then addmm


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable(device: torch.device | str) -> bool:
    """Can the kernels run on tensors of this device? CUDA with triton, or any device under the interpreter."""
    if not HAVE_TRITON:
        return False
    if torch.device(device).type == "cuda":
        return True
    return _interpreted()


if HAVE_TRITON:

    @triton.jit
    def _reciprocal(x, ROUNDING: tl.constexpr):
        """1/x in float32: correctly rounded (0), or one of the approximate PTX forms (1: rcp, 2: div.full)."""
        if ROUNDING == 1:
            r = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                          is_pure=True, pack=1)
        elif ROUNDING == 2:
            one = tl.full(x.shape, 1.0, tl.float32)
            r = tl.inline_asm_elementwise("div.full.ftz.f32 $0, $1, $2;", "=f,f,f", [one, x], dtype=tl.float32,
                                          is_pure=True, pack=1)
        else:
            r = tl.math.div_rn(tl.full(x.shape, 1.0, tl.float32), x)
        return r

    @triton.jit
    def _round_to(x, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
        """float32 -> dtype, round to nearest even. The GPU converts in hardware; Triton's CPU interpreter
        rounds float32 -> bf16 its own (inexact) way, so there the bits are rounded by hand."""
        if dtype == tl.bfloat16 and INTERPRETED:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # finite values only
            y = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            y = x.to(dtype)
        return y

    @triton.jit
    def _nf4_dequantize_kernel(
        packed_ptr, absmax_ptr, code8_ptr, map8_ptr, scale8_ptr, offset_ptr, table_ptr, out_ptr,
        n, n_bytes, n_blocks,
        BLOCKSIZE: tl.constexpr, BLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr, DQ_BLOCKSIZE: tl.constexpr,
        INTERPRETED: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)  # int64: tensors past 2^31 elements (a 128k-vocab head) exist
        HALF: tl.constexpr = BLOCK // 2
        NB: tl.constexpr = BLOCK // BLOCKSIZE

        byte_idx = pid * HALF + tl.arange(0, HALF)
        byte = tl.load(packed_ptr + byte_idx, mask=byte_idx < n_bytes, other=0)
        # first element of each pair sits in the high nibble; join + reshape interleaves high, low
        codes = tl.join(byte >> 4, byte & 0xF).reshape(BLOCK).to(tl.int32)
        values = tl.load(table_ptr + codes)  # 16-entry float32 table, stays in L1

        block_idx = pid * NB + tl.arange(0, NB)
        block_ok = block_idx < n_blocks
        if DOUBLE_QUANT:
            code8 = tl.load(code8_ptr + block_idx, mask=block_ok, other=0).to(tl.int32)
            scale8 = tl.load(scale8_ptr + block_idx // DQ_BLOCKSIZE, mask=block_ok, other=0.0)
            # two roundings, product then sum: the kernel is compiled with enable_fp_fusion=False
            absmax = tl.load(map8_ptr + code8) * scale8 + tl.load(offset_ptr)
        else:
            absmax = tl.load(absmax_ptr + block_idx, mask=block_ok, other=0.0)

        out = (values.reshape(NB, BLOCKSIZE) * absmax[:, None]).reshape(BLOCK)
        out_idx = pid * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + out_idx, _round_to(out, out_ptr.dtype.element_ty, INTERPRETED), mask=out_idx < n)

    @triton.jit
    def _nf4_quantize_kernel(
        x_ptr, packed_ptr, absmax_ptr, bounds_ptr,
        n, n_bytes, n_blocks,
        BLOCKSIZE: tl.constexpr, BLOCK: tl.constexpr, ROUNDING: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        HALF: tl.constexpr = BLOCK // 2
        NB: tl.constexpr = BLOCK // BLOCKSIZE

        idx = pid * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + idx, mask=idx < n, other=0.0).to(tl.float32)  # exact for fp16/bf16
        blocks = x.reshape(NB, BLOCKSIZE)
        # NaN counts as infinite here, so that bad input shows up as a non-finite absmax the caller can see
        absmax = tl.max(tl.where(blocks == blocks, tl.abs(blocks), float("inf")), axis=1)

        block_idx = pid * NB + tl.arange(0, NB)
        ragged = (block_idx == n_blocks - 1) & (n % BLOCKSIZE != 0)  # the short last block, if any
        if ROUNDING == 0:
            clamped = tl.maximum(absmax, tl.full(absmax.shape, 1e-38, tl.float32))  # all-zero block: codes 7, not NaN
            scaled = blocks * _reciprocal(clamped, ROUNDING)[:, None]
            stored = tl.where(ragged, clamped, absmax)
            if (n % BLOCKSIZE != 0) & (pid == (n_blocks - 1) // NB):  # only the program with the short block
                scaled = tl.where(ragged[:, None], tl.math.div_rn(blocks, clamped[:, None]), scaled)
        else:  # bitsandbytes' CUDA kernel: no clamp, no special last block
            scaled = blocks * _reciprocal(absmax, ROUNDING)[:, None]
            stored = absmax
        tl.store(absmax_ptr + block_idx, stored, mask=block_idx < n_blocks)

        # code = #midpoints strictly below the value; unrolled, the 15 midpoints live in registers
        codes = tl.zeros((NB, BLOCKSIZE), dtype=tl.int32)
        for i in tl.static_range(15):
            codes += (scaled > tl.load(bounds_ptr + i)).to(tl.int32)
        high, low = codes.reshape(HALF, 2).split()
        byte = ((high << 4) | low).to(tl.uint8)
        byte_idx = pid * HALF + tl.arange(0, HALF)
        tl.store(packed_ptr + byte_idx, byte, mask=byte_idx < n_bytes)

    @triton.jit
    def _blockwise_8bit_kernel(
        x_ptr, offset_ptr, map_ptr, mids_ptr, lut_ptr, codes_ptr, scales_ptr, n,
        BLOCKSIZE: tl.constexpr, SUBTRACT: tl.constexpr, RULE: tl.constexpr, ROUNDING: tl.constexpr,
    ):
        """One block of BLOCKSIZE values (minus the offset): scale = max |x|, code = map entry for x / scale."""
        pid = tl.program_id(0).to(tl.int64)
        idx = pid * BLOCKSIZE + tl.arange(0, BLOCKSIZE)
        ok = idx < n
        x = tl.load(x_ptr + idx, mask=ok, other=0.0)
        if SUBTRACT:  # double quantization centres the block scales on their mean first
            x = tl.where(ok, x - tl.load(offset_ptr), 0.0)
        scale = tl.max(tl.abs(x), axis=0)
        tl.store(scales_ptr + pid, scale)
        if RULE == 2:
            # bitsandbytes' CUDA kernel: value · (1/scale), no guard (an all-zero block gives NaN, which its
            # search sends to entry 0); a binary search from entry 127 in steps 64, 32, ..., 1, then the
            # nearer of the last entry and its neighbour on the value's side (a tie stays on that entry)
            v = x * _reciprocal(tl.broadcast_to(scale, (BLOCKSIZE,)), ROUNDING)
            pivot = tl.full((BLOCKSIZE,), 127, tl.int32)
            lower_pivot = tl.zeros((BLOCKSIZE,), tl.int32)
            upper_pivot = tl.full((BLOCKSIZE,), 255, tl.int32)
            lower = tl.full((BLOCKSIZE,), -1.0, tl.float32)
            upper = tl.full((BLOCKSIZE,), 1.0, tl.float32)
            val = tl.load(map_ptr + pivot)
            for i in tl.static_range(7):
                step = 64 >> i
                up = v > val
                lower_pivot = tl.where(up, pivot, lower_pivot)
                lower = tl.where(up, val, lower)
                upper_pivot = tl.where(up, upper_pivot, pivot)
                upper = tl.where(up, upper, val)
                pivot = tl.where(up, pivot + step, pivot - step)
                val = tl.load(map_ptr + pivot)
            upper = tl.where(upper_pivot == 255, tl.load(map_ptr + 255), upper)
            lower = tl.where(lower_pivot == 0, tl.load(map_ptr), lower)
            above = tl.where(v > (upper + val) * 0.5, upper_pivot, pivot)
            below = tl.where(v < (lower + val) * 0.5, lower_pivot, pivot)
            code = tl.where(v > val, above, below)
        else:
            # the correctly rounded 1/scale, 0 for an all-zero block (as minilora.double_quant in PyTorch)
            safe = tl.broadcast_to(tl.where(scale > 0, scale, 1.0), (BLOCKSIZE,))
            inverse = tl.where(scale > 0, _reciprocal(safe, 0), 0.0)
            v = x * inverse
            if RULE == 0:
                # bitsandbytes' CPU rule: grid point k = trunc(((v + 1) · 0.5) · 65535 + 0.5), each step rounded
                # to float32 (compiled without fused multiply-adds), then the precomputed entry of that point
                t = tl.minimum(tl.maximum(v, -1.0), 1.0)
                point = ((t + 1.0) * 0.5 * 65535.0 + 0.5).to(tl.int32)
                code = tl.load(lut_ptr + point).to(tl.int32)
                code = tl.where(scale > 0, code, 0)  # bitsandbytes writes byte 0 for an all-zero block
            else:
                # nearest entry = number of the 255 midpoints strictly below v: binary lifting, 8 steps
                code = tl.zeros((BLOCKSIZE,), tl.int32)
                for i in tl.static_range(8):
                    cand = code + (128 >> i)
                    mid = tl.load(mids_ptr + cand - 1, mask=cand <= 255, other=float("inf"))
                    code = tl.where(mid < v, cand, code)
        tl.store(codes_ptr + idx, code.to(tl.uint8), mask=ok)


    @triton.jit
    def _nf4_lora_weight_kernel(
        packed_ptr, absmax_ptr, code8_ptr, map8_ptr, scale8_ptr, offset_ptr, table_ptr, w0_ptr,
        b_ptr, a_ptr, row_scale_ptr, out_ptr, sumsq_ptr,
        n_rows, n_cols, scaling, n_col_tiles,
        RANK: tl.constexpr, R_PAD: tl.constexpr, VARIANT: tl.constexpr, EVEN: tl.constexpr,
        BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, DQ_BLOCKSIZE: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, DENSE: tl.constexpr,
        ROW_SCALE: tl.constexpr, NORM_ONLY: tl.constexpr, INTERPRETED: tl.constexpr,
    ):
        """One (BM, BN) tile of W' = [c ⊙] (W0 + s·B A), or of its squared row sums (NORM_ONLY).

        W0 = deq(NF4 codes), or a dense 16-bit (out, in) tensor at w0_ptr when DENSE. The tile's first row and
        column move the base pointers (int64 scalars); offsets inside the tile are int32, so the per-element
        address arithmetic stays 32-bit. EVEN: the tile grid covers W exactly, no masks.
        """
        pid_n = tl.program_id(1)
        row0 = tl.program_id(0).to(tl.int64) * BM
        col0 = pid_n * BN
        r = tl.arange(0, BM)
        c = tl.arange(0, BN)
        row_ok = row0 + r < n_rows
        col_ok = col0 + c < n_cols
        ok = row_ok[:, None] & col_ok[None, :]
        if DENSE:
            tile = w0_ptr + row0 * n_cols + col0 + r[:, None] * n_cols + c[None, :]
            if EVEN:
                w = tl.load(tile).to(tl.float32)
            else:
                w = tl.load(tile, mask=ok, other=0.0).to(tl.float32)
        else:
            HALF: tl.constexpr = BN // 2
            NBC: tl.constexpr = BN // BLOCKSIZE  # whole quantization blocks per tile row (n_cols % BLOCKSIZE == 0)
            hb = tl.arange(0, HALF)
            byte_ptr = packed_ptr + row0 * (n_cols // 2) + col0 // 2 + r[:, None] * (n_cols // 2) + hb[None, :]
            if EVEN:
                byte = tl.load(byte_ptr)
            else:
                byte = tl.load(byte_ptr, mask=row_ok[:, None] & (col0 // 2 + hb < n_cols // 2)[None, :], other=0)
            codes = tl.join(byte >> 4, byte & 0xF).reshape(BM, BN).to(tl.int32)
            values = tl.load(table_ptr + codes)

            nb = tl.arange(0, NBC)
            block_idx = ((row0 + r) * (n_cols // BLOCKSIZE))[:, None] + (pid_n * NBC + nb)[None, :]
            block_ok = row_ok[:, None] & (pid_n * NBC + nb < n_cols // BLOCKSIZE)[None, :]
            if DOUBLE_QUANT:
                code8 = tl.load(code8_ptr + block_idx, mask=block_ok, other=0).to(tl.int32)
                scale8 = tl.load(scale8_ptr + block_idx // DQ_BLOCKSIZE, mask=block_ok, other=0.0)
                absmax = tl.load(map8_ptr + code8) * scale8 + tl.load(offset_ptr)
            else:
                absmax = tl.load(absmax_ptr + block_idx, mask=block_ok, other=0.0)
            w = (values.reshape(BM, NBC, BLOCKSIZE) * absmax[:, :, None]).reshape(BM, BN)

        b_rows = b_ptr + row0 * RANK + r * RANK  # B[rows, :], (out, r) row-major
        a_cols = a_ptr + col0 + c  # A[:, cols], (r, in) row-major
        if VARIANT == 1:
            # tensor cores: (BM, R_PAD) x (R_PAD, BN) in one tl.dot, products exact in float32 (16-bit inputs),
            # float32 accumulation; rank padded with zeros to R_PAD >= 16 (tl.dot's least inner size)
            k = tl.arange(0, R_PAD)
            k_ok = k < RANK
            b_tile = tl.load(b_rows[:, None] + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            a_tile = tl.load(a_cols[None, :] + k[:, None] * n_cols, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if INTERPRETED:  # the interpreter's dot is numpy's: hand it float32
                b_tile = b_tile.to(tl.float32)
                a_tile = a_tile.to(tl.float32)
            low_rank = tl.dot(b_tile, a_tile, out_dtype=tl.float32)
        else:
            # RANK outer products on the CUDA cores, in the tile's own (coalesced) layout; the loop is unrolled,
            # so all 2·RANK small loads (B columns from L1, A rows) issue before the first multiply-add
            low_rank = tl.zeros((BM, BN), dtype=tl.float32)
            for k in tl.static_range(RANK):
                b_k = tl.load(b_rows + k, mask=row_ok, other=0.0).to(tl.float32)  # B[:, k]
                a_k = tl.load(a_cols + k * n_cols, mask=col_ok, other=0.0).to(tl.float32)  # A[k, :]
                low_rank += b_k[:, None] * a_k[None, :]
        w = w + scaling * low_rank  # one rounding at the store
        if NORM_ONLY:
            w = tl.where(ok, w, 0.0)
            tl.store(sumsq_ptr + (row0 + r) * n_col_tiles + pid_n, tl.sum(w * w, axis=1), mask=row_ok)
        else:
            if ROW_SCALE:
                w = w * tl.load(row_scale_ptr + row0 + r, mask=row_ok, other=0.0)[:, None]
            w = _round_to(w, out_ptr.dtype.element_ty, INTERPRETED)
            tile = out_ptr + row0 * n_cols + col0 + r[:, None] * n_cols + c[None, :]
            if EVEN:
                tl.store(tile, w)
            else:
                tl.store(tile, w, mask=ok)


@lru_cache(maxsize=8)
def _tables(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """NF4 table, its 15 midpoints and the 256-entry double-quant map, on `device` (float32)."""
    table = torch.tensor(NF4_TABLE, dtype=torch.float32, device=device)
    bounds = (table[:-1] + table[1:]) / 2  # float32 midpoints, as minilora.nf4 and bitsandbytes compute them
    return table, bounds, dynamic_map_tables(device).code


def _require(device: torch.device) -> None:
    if not HAVE_TRITON:
        raise RuntimeError("the NF4 Triton kernels need the `triton` package; use minilora.nf4 instead")
    if not triton_usable(device):
        raise RuntimeError(f"the NF4 Triton kernels run on CUDA tensors (or under TRITON_INTERPRET=1); "
                           f"got a tensor on {device}: use minilora.nf4 there")


def dequantize_nf4_triton(q: NF4Tensor, dtype: torch.dtype | None = None, *, out: Tensor | None = None,
                          block: int | None = None, num_warps: int | None = None) -> Tensor:
    """ŵ_i = NF4[code_i] · absmax_{i // blocksize} in one kernel: q -> q.shape in `dtype` (default q.dtype).

    Equal bit for bit to `minilora.nf4.dequantize_nf4(q, dtype)`. `out` (contiguous, q.numel() elements of
    `dtype`) is written in place if given. `block` / `num_warps` override DEQUANT_CONFIG (for tuning).
    """
    if not isinstance(q, NF4Tensor):
        raise TypeError(f"dequantize_nf4_triton expects a minilora NF4Tensor, got {type(q).__name__}")
    dtype = q.dtype if dtype is None else dtype
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    device = q.packed.device
    _require(device)
    block = block or max(DEQUANT_CONFIG["block"], q.blocksize)
    if block % q.blocksize or block & (block - 1):
        raise ValueError(f"block must be a power of two and a multiple of blocksize {q.blocksize}, got {block}")
    if out is None:
        out = torch.empty(q.shape, dtype=dtype, device=device)
    elif out.dtype != dtype or out.numel() != q.numel or not out.is_contiguous() or out.device != device:
        raise ValueError(f"out must be a contiguous {dtype} tensor of {q.numel} elements on {device}")
    table, _, map8 = _tables(device)
    packed = q.packed.reshape(-1)
    if isinstance(q.absmax, DoubleQuantAbsmax):
        dq = q.absmax
        absmax, code8, scale8, offset = dq.scales, dq.codes, dq.scales, dq.offset.reshape(1)
        dq_blocksize = dq.blocksize
    else:
        absmax, code8, scale8, offset = q.absmax, packed, q.absmax, q.absmax  # unused pointers
        dq_blocksize = 256
    grid = (triton.cdiv(q.numel, block),)
    _nf4_dequantize_kernel[grid](
        packed, absmax, code8, map8, scale8, offset, table, out,
        q.numel, packed.numel(), q.n_blocks,
        BLOCKSIZE=q.blocksize, BLOCK=block, DOUBLE_QUANT=q.double_quant, DQ_BLOCKSIZE=dq_blocksize,
        INTERPRETED=_interpreted(),
        num_warps=num_warps or DEQUANT_CONFIG["num_warps"], enable_fp_fusion=False,
    )
    return out


def quantize_nf4_triton(w: Tensor, blocksize: int = 64, double_quant: bool = False, *, rounding: str = "exact",
                        check_finite: bool = True, block: int | None = None,
                        num_warps: int | None = None) -> NF4Tensor:
    """NF4-quantize a float32/float16/bfloat16 tensor in one kernel: equal bit for bit to `quantize_nf4`.

    n = w.numel() values -> packed (ceil(n/2),) uint8 + absmax (ceil(n/blocksize),) float32, or its
    double-quantized form. `check_finite=False` skips the host-side check for NaN/inf (one small sync).
    """
    if not isinstance(w, Tensor):
        raise TypeError(f"quantize_nf4_triton expects a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"quantize_nf4_triton needs a float32, float16 or bfloat16 tensor, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor (shape {tuple(w.shape)})")
    if isinstance(blocksize, bool) or blocksize not in ALLOWED_BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {ALLOWED_BLOCKSIZES}, got {blocksize!r}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {sorted(ROUNDINGS)}, got {rounding!r}")
    _require(w.device)
    if rounding != "exact" and (w.device.type != "cuda" or double_quant):
        raise ValueError(f"rounding={rounding!r} imitates bitsandbytes' CUDA kernel: CUDA only, without double_quant")
    block = block or max(QUANT_CONFIG["block"], blocksize)
    if block % blocksize or block & (block - 1):
        raise ValueError(f"block must be a power of two and a multiple of blocksize {blocksize}, got {block}")

    flat = w.detach().reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=w.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=w.device)
    _, bounds, _ = _tables(w.device)
    _nf4_quantize_kernel[(triton.cdiv(n, block),)](
        flat, packed, absmax, bounds, n, packed.numel(), n_blocks,
        BLOCKSIZE=blocksize, BLOCK=block, ROUNDING=ROUNDINGS[rounding],
        num_warps=num_warps or QUANT_CONFIG["num_warps"],
    )
    if check_finite and not bool(torch.isfinite(absmax).all()):
        raise ValueError("cannot quantize non-finite weights: the tensor holds NaN or inf values")
    stored: Tensor | DoubleQuantAbsmax = double_quantize(absmax) if double_quant else absmax
    return NF4Tensor(packed=packed, absmax=stored, shape=w.shape, dtype=w.dtype, blocksize=blocksize)


RULES_8BIT = {"grid": 0, "nearest": 1, "search": 2}


def blockwise_8bit_triton(x: Tensor, blocksize: int = 256, *, tables: MapTables | None = None,
                          offset: Tensor | None = None, rule: str = "grid",
                          rounding: str = "exact") -> tuple[Tensor, Tensor]:
    """8-bit blockwise quantization of x − offset in one kernel: x (n,) float32 -> (codes (n,) uint8,
    scales (ceil(n/blocksize),) float32), scale_b = max |x − offset| over block b.

    rule "grid": bitsandbytes' CPU rule, bit for bit `minilora.double_quant.quantize_blockwise_8bit`;
    "nearest": its `exact=True`; "search": the binary search of bitsandbytes' CUDA kernel, with the
    reciprocal `rounding` ("exact", or its approximate "rcp_approx" / "div_full" forms, CUDA only).
    tables: `minilora.double_quant.MapTables` on x's device (default: the signed dynamic map);
    offset: a () or (1,) float32 tensor on x's device, subtracted in the kernel (no extra pass).
    """
    if not isinstance(x, Tensor) or x.dtype != torch.float32 or x.dim() != 1:
        raise ValueError(f"x must be a 1-D float32 tensor, got "
                         f"{(x.dtype, tuple(x.shape)) if isinstance(x, Tensor) else type(x).__name__}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 16 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two >= 16, got {blocksize!r}")
    if rule not in RULES_8BIT:
        raise ValueError(f"rule must be one of {sorted(RULES_8BIT)}, got {rule!r}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {sorted(ROUNDINGS)}, got {rounding!r}")
    if rounding != "exact" and (rule != "search" or x.device.type != "cuda"):
        raise ValueError(f"rounding={rounding!r} imitates bitsandbytes' CUDA kernel: rule='search' on CUDA only")
    _require(x.device)
    tables = dynamic_map_tables(x.device) if tables is None else tables
    if tables.code.numel() != 256 or tables.code.device != x.device:
        raise ValueError(f"tables must hold a 256-entry map on {x.device}")
    x = x.contiguous()
    n = x.numel()
    n_blocks = -(-n // blocksize)
    codes = torch.empty(n, dtype=torch.uint8, device=x.device)
    scales = torch.empty(n_blocks, dtype=torch.float32, device=x.device)
    if n_blocks == 0:
        return codes, scales
    _blockwise_8bit_kernel[(n_blocks,)](
        x, x if offset is None else offset, tables.code, tables.midpoints, tables.entry_of_point, codes, scales, n,
        BLOCKSIZE=blocksize, SUBTRACT=offset is not None, RULE=RULES_8BIT[rule], ROUNDING=ROUNDINGS[rounding],
        num_warps=max(1, min(8, blocksize // 128)), enable_fp_fusion=False,
    )
    return codes, scales


def double_quantize_triton(absmax: Tensor, blocksize: int = 256, *, rule: str = "grid",
                           rounding: str = "exact") -> DoubleQuantAbsmax:
    """`minilora.double_quant.double_quantize` as the mean plus one kernel: absmax (n_blocks,) float32 ->
    DoubleQuantAbsmax. rule "grid" (default) gives its bytes; see `blockwise_8bit_triton` for the others."""
    if not isinstance(absmax, Tensor) or absmax.dtype != torch.float32 or absmax.dim() != 1:
        raise ValueError("absmax must be a 1-D float32 tensor")
    offset = absmax.mean()
    codes, scales = blockwise_8bit_triton(absmax, blocksize, offset=offset, rule=rule, rounding=rounding)
    return DoubleQuantAbsmax(codes=codes, scales=scales, offset=offset, blocksize=blocksize)

def nf4_lora_weight_supported(q: NF4Tensor, rank: int | None = None) -> bool:
    """Can `nf4_lora_weight_triton` build this weight? 2-D, each row a whole number of blocks, rank <= 64."""
    return (isinstance(q, NF4Tensor) and len(q.shape) == 2 and q.shape[1] % q.blocksize == 0
            and q.blocksize <= 1024 and (rank is None or 1 <= rank <= MAX_RANK))


def _dq_args(q: NF4Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """(absmax, code8, scale8, offset, dq_blocksize) kernel arguments; unused ones point at valid memory."""
    if isinstance(q.absmax, DoubleQuantAbsmax):
        dq = q.absmax
        return dq.scales, dq.codes, dq.scales, dq.offset.reshape(1), dq.blocksize
    return q.absmax, q.packed, q.absmax, q.absmax, 256


def _tile_config(kind: str, bm: int | None, bn: int | None, num_warps: int | None,
                 variant: str | None) -> tuple[int, int, int, str]:
    """(bm, bn, num_warps, variant): the arguments given, LORA_WEIGHT_CONFIG[kind] for the rest, checked."""
    cfg = LORA_WEIGHT_CONFIG[kind]
    bm, bn = int(bm or cfg["bm"]), int(bn or cfg["bn"])
    num_warps, variant = int(num_warps or cfg["num_warps"]), str(variant or cfg["variant"])
    if bm < 16 or bm & (bm - 1) or bn < 16 or bn & (bn - 1):
        raise ValueError(f"bm and bn must be powers of two >= 16, got {bm}, {bn}")
    if num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"num_warps must be one of 1, 2, 4, 8, 16, got {num_warps}")
    if variant not in LORA_WEIGHT_VARIANTS:
        raise ValueError(f"variant must be one of {sorted(LORA_WEIGHT_VARIANTS)}, got {variant!r}")
    return bm, bn, num_warps, variant


def _check_adapter_shapes(out_features: int, in_features: int, A: Tensor, B: Tensor) -> int:
    rank = A.shape[0]
    if A.dim() != 2 or B.dim() != 2 or tuple(A.shape) != (rank, in_features) or tuple(B.shape) != (out_features, rank):
        raise ValueError(f"A must be (r, {in_features}) and B ({out_features}, r); got {tuple(A.shape)}, {tuple(B.shape)}")
    if not 1 <= rank <= MAX_RANK:
        raise ValueError(f"the Triton build handles ranks 1..{MAX_RANK}, got {rank}: dequantize, then addmm")
    return rank


def _launch_lora_weight(q: NF4Tensor | Tensor, A: Tensor, B: Tensor, scaling: float, out: Tensor | None,
                        sumsq: Tensor | None, row_scale: Tensor | None, bm: int, bn: int, num_warps: int,
                        variant: str) -> None:
    """One launch of `_nf4_lora_weight_kernel` over the (bm, bn) tiles of W (NF4Tensor or dense 16-bit)."""
    dense = isinstance(q, Tensor)
    if dense:
        if q.dim() != 2 or q.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"a dense W0 must be a 2-D bf16/fp16 tensor, got {tuple(q.shape)} {q.dtype}")
        out_features, in_features = q.shape
        rank = _check_adapter_shapes(out_features, in_features, A, B)
        device = q.device
        w0 = q.contiguous()
        packed = absmax = code8 = map8 = scale8 = offset = table = w0  # unused pointers
        blocksize, double_quant, dq_blocksize = 64, False, 256
    else:
        out_features, in_features = q.shape
        if not nf4_lora_weight_supported(q, A.shape[0] if A.dim() == 2 else None):
            raise ValueError(f"nf4_lora_weight_triton needs a 2-D NF4 weight whose rows hold whole blocks and rank "
                             f"<= {MAX_RANK}; got shape {tuple(q.shape)}, blocksize {q.blocksize}, rank {A.shape[0]}")
        rank = _check_adapter_shapes(out_features, in_features, A, B)
        bn = max(bn, q.blocksize)
        if bn % q.blocksize:
            raise ValueError(f"bn must be a power-of-two multiple of blocksize {q.blocksize}, got {bn}")
        device = q.packed.device
        table, _, map8 = _tables(device)
        absmax, code8, scale8, offset, dq_blocksize = _dq_args(q)
        packed, w0 = q.packed, absmax
        blocksize, double_quant = q.blocksize, q.double_quant
    _require(device)
    a, b = A.contiguous(), B.contiguous()
    n_col_tiles = triton.cdiv(in_features, bn)
    dummy = absmax  # a valid pointer for arguments a mode does not read
    even = out_features % bm == 0 and in_features % bn == 0
    _nf4_lora_weight_kernel[(triton.cdiv(out_features, bm), n_col_tiles)](
        packed, absmax, code8, map8, scale8, offset, table, w0,
        b, a, row_scale if row_scale is not None else dummy, out if out is not None else dummy,
        sumsq if sumsq is not None else dummy,
        out_features, in_features, float(scaling), n_col_tiles,
        RANK=rank, R_PAD=max(16, triton.next_power_of_2(rank)), VARIANT=LORA_WEIGHT_VARIANTS[variant], EVEN=even,
        BLOCKSIZE=blocksize, DOUBLE_QUANT=double_quant, DQ_BLOCKSIZE=dq_blocksize,
        BM=bm, BN=bn, DENSE=dense,
        ROW_SCALE=row_scale is not None, NORM_ONLY=sumsq is not None, INTERPRETED=_interpreted(),
        # W' is checked against float64 math with a tolerance, not bit for bit: multiply-adds may fuse (the
        # double-quant scale map·scale + offset then rounds once instead of twice, < 1 float32 ulp)
        num_warps=num_warps, enable_fp_fusion=True,
    )


def _row_scale_f32(row_scale: Tensor | None) -> Tensor | None:
    if row_scale is not None and (row_scale.dtype != torch.float32 or not row_scale.is_contiguous()):
        row_scale = row_scale.to(torch.float32).contiguous()
    return row_scale


def dense_lora_weight_triton(w0: Tensor, A: Tensor, B: Tensor, scaling: float, row_scale: Tensor | None = None,
                             *, bm: int | None = None, bn: int | None = None, num_warps: int | None = None,
                             variant: str | None = None) -> Tensor:
    """W' = [row_scale ⊙] (W0 + s·B A) in one pass: W0 (out, in) bf16/fp16, A: (r, in), B: (out, r) in W0's dtype.

    One read of W0 and one write of W'. Summed in float32, rounded once. row_scale: (out,) float32.
    bm, bn, num_warps, variant override LORA_WEIGHT_CONFIG["dense"] (for tuning).
    """
    if A.dtype != w0.dtype or B.dtype != w0.dtype:
        raise TypeError(f"A and B must be {w0.dtype} (W0's dtype), got {A.dtype}, {B.dtype}")
    out = torch.empty(w0.shape, dtype=w0.dtype, device=w0.device)
    _launch_lora_weight(w0, A, B, scaling, out, None, _row_scale_f32(row_scale),
                        *_tile_config("dense", bm, bn, num_warps, variant))
    return out


def dense_lora_row_norm_triton(w0: Tensor, A: Tensor, B: Tensor, scaling: float, *, bm: int | None = None,
                               bn: int | None = None, num_warps: int | None = None,
                               variant: str | None = None) -> Tensor:
    """‖W0 + s·B A‖₂ per row in float32, without writing the weight: -> (out,). For DoRA's norm."""
    bm, bn, num_warps, variant = _tile_config("dense", bm, bn, num_warps, variant)
    sumsq = torch.empty(w0.shape[0], triton.cdiv(w0.shape[1], bn), dtype=torch.float32, device=w0.device)
    _launch_lora_weight(w0, A, B, scaling, None, sumsq, None, bm, bn, num_warps, variant)
    return sumsq.sum(dim=1).sqrt()


def nf4_lora_weight_triton(q: NF4Tensor, A: Tensor, B: Tensor, scaling: float, dtype: torch.dtype,
                           row_scale: Tensor | None = None, *, bm: int | None = None, bn: int | None = None,
                           num_warps: int | None = None, variant: str | None = None) -> Tensor:
    """W' = [row_scale ⊙] (deq(q) + s·B A) in one pass: q (out, in) NF4, A: (r, in), B: (out, r) -> (out, in).

    A and B in dtype (bf16/fp16; the product is summed in float32); row_scale (out,) float32. The sum is
    rounded to dtype once. bm, bn, num_warps, variant override LORA_WEIGHT_CONFIG["nf4"] (for tuning).
    Used by minilora.fast for QLoRA / QDoRA on CUDA.
    """
    if dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"nf4_lora_weight_triton builds bf16 or fp16 weights, got {dtype}")
    if A.dtype != dtype or B.dtype != dtype:
        raise TypeError(f"A and B must be {dtype} (the compute dtype), got {A.dtype}, {B.dtype}")
    out = torch.empty(q.shape, dtype=dtype, device=q.packed.device)
    _launch_lora_weight(q, A, B, scaling, out, None, _row_scale_f32(row_scale),
                        *_tile_config("nf4", bm, bn, num_warps, variant))
    return out


def nf4_lora_row_norm_triton(q: NF4Tensor, A: Tensor, B: Tensor, scaling: float, *, bm: int | None = None,
                             bn: int | None = None, num_warps: int | None = None,
                             variant: str | None = None) -> Tensor:
    """‖deq(q) + s·B A‖₂ per row, in float32, without writing the weight: -> (out,). For DoRA's norm."""
    bm, bn, num_warps, variant = _tile_config("nf4", bm, bn, num_warps, variant)
    bn = max(bn, q.blocksize)
    sumsq = torch.empty(q.shape[0], triton.cdiv(q.shape[1], bn), dtype=torch.float32, device=q.packed.device)
    _launch_lora_weight(q, A, B, scaling, None, sumsq, None, bm, bn, num_warps, variant)
    return sumsq.sum(dim=1).sqrt()
