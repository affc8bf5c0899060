"""The LoRA weight W' = W0 + s·B A as one Triton kernel, its row norms, and DoRA's column dot products.

`minilora.fast` merges the adapter into the base weight when that moves fewer bytes (`fast.choose_path`):

    W'[i, j] = [c_i ·] (W0[i, j] + s · Σ_k B[i, k] A[k, j])          W0: (out, in), A: (r, in), B: (out, r)

One program builds one (bm, bn) tile: it reads W0's tile (16-bit, or its 4-bit codes and block scales,
dequantized in registers exactly as `minilora.kernels.nf4` does), adds the rank-r term in float32 and
rounds once to the compute dtype at the store. So W' costs one read of W0 and one write of W' (for an NF4
base: 0.5 byte read and 2 written per weight, where dequantize + addmm would write and re-read a dense
copy first). The rank-r term is either r outer products on the CUDA cores ("outer") or one tensor-core
`tl.dot` with the rank padded to 16 ("dot"); `LORA_WEIGHT_CONFIG` says which, per base kind.

DoRA needs ‖W0 + s·B A‖ per row before it can scale the rows: the same kernel with NORM_ONLY writes each
tile's squared row sums instead of the tile (no out×in write at all), and the caller sums them per row.
Its magnitude gradient needs Σ_n g_nj y_nj per column: `column_dot_triton` reads g and y once and
accumulates in float32 (PyTorch would first write the product g ⊙ y, then reduce it).

W' is checked against float64 math with a tolerance, not bit for bit (see `_launch_lora_weight`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from minilora.double_quant import DoubleQuantAbsmax
from minilora.kernels.nf4 import (HAVE_TRITON, cdiv, device_tables, interpreted, launch, next_power_of_2,
                                  require_triton, round_to, triton_usable)
from minilora.nf4 import NF4Tensor

if HAVE_TRITON:
    import triton
    import triton.language as tl

__all__ = [
    "LORA_WEIGHT_CONFIG",
    "LORA_WEIGHT_VARIANTS",
    "MAX_RANK",
    "nf4_lora_weight_supported",
    "nf4_lora_weight_triton",
    "nf4_lora_row_norm_triton",
    "dense_lora_weight_triton",
    "dense_lora_row_norm_triton",
    "column_dot_triton",
]

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


if HAVE_TRITON:

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
            w = round_to(w, out_ptr.dtype.element_ty, INTERPRETED)
            tile = out_ptr + row0 * n_cols + col0 + r[:, None] * n_cols + c[None, :]
            if EVEN:
                tl.store(tile, w)
            else:
                tl.store(tile, w, mask=ok)

    @triton.jit
    def _column_dot_kernel(g_ptr, y_ptr, dot_ptr, sum_ptr, n_rows, n_cols, rows_per_split,
                           BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, WITH_SUM: tl.constexpr):
        """Partial column sums of g ⊙ y (and of g) over one slice of rows: -> dot[split, col], sum[split, col]."""
        split = tl.program_id(1)
        cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < n_cols
        acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        acc_g = tl.zeros((BLOCK_C,), dtype=tl.float32)
        first = split.to(tl.int64) * rows_per_split
        last = tl.minimum(first + rows_per_split, n_rows)
        for start in range(first, last, BLOCK_N):
            rows = start + tl.arange(0, BLOCK_N)
            ok = (rows < last)[:, None] & col_ok[None, :]
            offs = rows[:, None] * n_cols + cols[None, :]
            g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            acc += tl.sum(g * y, axis=0)
            if WITH_SUM:
                acc_g += tl.sum(g, axis=0)
        tl.store(dot_ptr + split * n_cols + cols, acc, mask=col_ok)
        if WITH_SUM:
            tl.store(sum_ptr + split * n_cols + cols, acc_g, mask=col_ok)



def nf4_lora_weight_supported(q: NF4Tensor, rank: int | None = None) -> bool:
    """Can `nf4_lora_weight_triton` build this weight? 2-D, each row a whole number of blocks, rank <= 64."""
    return (isinstance(q, NF4Tensor) and len(q.shape) == 2 and q.shape[1] % q.blocksize == 0
            and q.blocksize <= 1024 and (rank is None or 1 <= rank <= MAX_RANK))


def _dq_args(q: NF4Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """(absmax, code8, scale8, offset, dq_blocksize) kernel arguments; unused ones point at valid memory."""
    if isinstance(q.absmax, DoubleQuantAbsmax):
        dq = q.absmax
        return dq.scales, dq.codes, dq.scales, dq.offset.reshape(1), dq.scale_blocksize
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
        table, _, map8 = device_tables(device)
        absmax, code8, scale8, offset, dq_blocksize = _dq_args(q)
        packed, w0 = q.packed, absmax
        blocksize, double_quant = q.blocksize, q.double_quant
    require_triton(device)
    a, b = A.contiguous(), B.contiguous()
    n_col_tiles = cdiv(in_features, bn)
    dummy = absmax  # a valid pointer for arguments a mode does not read
    even = out_features % bm == 0 and in_features % bn == 0
    launch(
        _nf4_lora_weight_kernel, (cdiv(out_features, bm), n_col_tiles),
        packed, absmax, code8, map8, scale8, offset, table, w0,
        b, a, row_scale if row_scale is not None else dummy, out if out is not None else dummy,
        sumsq if sumsq is not None else dummy,
        out_features, in_features, float(scaling), n_col_tiles,
        RANK=rank, R_PAD=max(16, next_power_of_2(rank)), VARIANT=LORA_WEIGHT_VARIANTS[variant], EVEN=even,
        BLOCKSIZE=blocksize, DOUBLE_QUANT=double_quant, DQ_BLOCKSIZE=dq_blocksize,
        BM=bm, BN=bn, DENSE=dense,
        ROW_SCALE=row_scale is not None, NORM_ONLY=sumsq is not None, INTERPRETED=interpreted(),
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
    sumsq = torch.empty(w0.shape[0], cdiv(w0.shape[1], bn), dtype=torch.float32, device=w0.device)
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
    sumsq = torch.empty(q.shape[0], cdiv(q.shape[1], bn), dtype=torch.float32, device=q.packed.device)
    _launch_lora_weight(q, A, B, scaling, None, sumsq, None, bm, bn, num_warps, variant)
    return sumsq.sum(dim=1).sqrt()


_SM_COUNT: dict[torch.device, int] = {}


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of this GPU (132 on an H100 SXM); a CPU under the interpreter counts as 1."""
    count = _SM_COUNT.get(device)
    if count is None:
        count = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        _SM_COUNT[device] = count
    return count


def column_dot_triton(g: Tensor, y: Tensor, with_sum: bool = False) -> tuple[Tensor, Tensor | None]:
    """`column_dot` through the Triton kernel (CUDA, or a CPU under TRITON_INTERPRET=1); float32 results."""
    if not triton_usable(g.device):
        raise RuntimeError(f"column_dot_triton needs CUDA tensors (or TRITON_INTERPRET=1); got {g.device}")
    if g.shape != y.shape or g.dim() != 2:
        raise ValueError(f"g and y must be 2-D of one shape, got {tuple(g.shape)} and {tuple(y.shape)}")
    g, y = g.contiguous(), y.contiguous()
    n_rows, n_cols = g.shape
    block_n, block_c = 32, 128
    col_blocks = cdiv(n_cols, block_c)
    # enough programs to fill the GPU (~4 per SM), each over a whole number of row blocks
    splits = max(1, min(cdiv(n_rows, block_n), cdiv(4 * _sm_count(g.device), col_blocks)))
    rows_per_split = cdiv(cdiv(n_rows, splits), block_n) * block_n
    splits = cdiv(n_rows, rows_per_split)
    dot = torch.empty(splits, n_cols, dtype=torch.float32, device=g.device)
    total = torch.empty_like(dot) if with_sum else dot
    launch(_column_dot_kernel, (col_blocks, splits), g, y, dot, total, n_rows, n_cols, rows_per_split,
           BLOCK_N=block_n, BLOCK_C=block_c, WITH_SUM=with_sum, num_warps=4)
    return dot.sum(0), (total.sum(0) if with_sum else None)
