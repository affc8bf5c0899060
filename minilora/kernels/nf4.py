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

from minilora.double_quant import DoubleQuantAbsmax, MapTables, absmax_mean, dynamic_map_tables
from minilora.nf4 import NF4_TABLE, SUPPORTED_DTYPES, NF4Tensor, check_blocksize

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
    "DEQUANT_CONFIG",
    "QUANT_CONFIG",
]

HAVE_TRITON = triton is not None
ROUNDINGS = {"exact": 0, "rcp_approx": 1, "div_full": 2}

# Elements per program and warps per program. 4096 bf16 outputs = 2 KiB of codes in, 8 KiB out per program:
# with 4 warps every thread moves 16 bytes of codes and 64 bytes of output (16-byte vector accesses).
DEQUANT_CONFIG = {"block": 4096, "num_warps": 4}
QUANT_CONFIG = {"block": 2048, "num_warps": 4}


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for positive ints, on the host. (`triton.cdiv` also works in kernels, and a call from the host
    costs several microseconds: launches pay it per call.)"""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The least power of two >= n (n >= 1), on the host (see `cdiv`)."""
    return 1 << (n - 1).bit_length()


def interpreted() -> bool:
    """Is Triton's CPU interpreter on (TRITON_INTERPRET=1, read when triton is imported)?"""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def specialization_key(args: tuple) -> tuple | None:
    """What Triton compiles a kernel anew for, of its runtime arguments: each tensor's dtype and whether its
    address is 16-byte aligned; each int's width (32, 64 or unsigned 64 bit), whether it is 1 (compiled in as
    a constant) and whether it divides by 16; bools and floats by type. None for any other argument."""
    key = []
    for a in args:
        if isinstance(a, Tensor):
            key.append((a.dtype, a.data_ptr() & 15 == 0))
        elif isinstance(a, bool):
            key.append(bool)
        elif isinstance(a, int):
            key.append((a == 1, a & 15 == 0, -(2**31) <= a < 2**31, a < 2**63))
        elif isinstance(a, float):
            key.append(float)
        else:
            return None
    return tuple(key)


_LAUNCHES: dict[tuple, object] = {}
# On: `launch` keeps each compiled kernel and calls it directly. Off by default: on an H100 it saved 1.5-3.6 µs
# of a Triton call's 20-40 µs of host time, not Triton's launcher itself (`python -m bench.launchprobe`,
# bench/NOTES.md "Calls Z and AA"). MINILORA_LAUNCH_CACHE=1 switches it on for a process and those it starts.
LAUNCH_CACHE = os.environ.get("MINILORA_LAUNCH_CACHE", "0") == "1"


def launch(kernel, grid: tuple[int, ...], *args, **meta) -> None:
    """`kernel[grid](*args, **meta)`, with Triton's per-call Python paid once per specialization.

    args: the runtime arguments in order; meta: every constexpr parameter after them, by name, and launch
    options (num_warps, enable_fp_fusion). Triton's own launch binds the arguments and builds its cache key
    anew on every call; `bench.launchprobe` measures what skipping that saves. The first call of a key goes
    through it and keeps the compiled kernel it returns; later calls of that key hand the compiled kernel all
    its parameters, in order, directly.
    With LAUNCH_CACHE off, under the interpreter, and for arguments `specialization_key` does not know, every
    call goes through Triton.
    """
    spec = specialization_key(args) if LAUNCH_CACHE and not interpreted() else None
    if spec is None:
        kernel[grid](*args, **meta)
        return
    key = (kernel, torch.cuda.current_device(), spec, tuple(meta.items()))
    compiled = _LAUNCHES.get(key)
    if compiled is None:
        missing = [name for name in kernel.arg_names[len(args):] if name not in meta]
        if missing:
            raise TypeError(f"launch needs every parameter of the kernel by name; missing {missing}")
        _LAUNCHES[key] = kernel[grid](*args, **meta)
        return
    params = args + tuple(meta[name] for name in kernel.arg_names[len(args):])
    compiled[(grid + (1, 1))[:3]](*params)


def triton_usable(device: torch.device | str) -> bool:
    """Can the kernels run on tensors of this device? CUDA with triton, or any device under the interpreter."""
    if not HAVE_TRITON:
        return False
    if torch.device(device).type == "cuda":
        return True
    return interpreted()


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
    def round_to(x, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
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
        tl.store(out_ptr + out_idx, round_to(out, out_ptr.dtype.element_ty, INTERPRETED), mask=out_idx < n)

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



@lru_cache(maxsize=8)
def device_tables(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """NF4 table, its 15 midpoints and the 256-entry double-quant map, on `device` (float32)."""
    table = torch.tensor(NF4_TABLE, dtype=torch.float32, device=device)
    bounds = (table[:-1] + table[1:]) / 2  # float32 midpoints, as minilora.nf4 and bitsandbytes compute them
    return table, bounds, dynamic_map_tables(device).code


def require_triton(device: torch.device) -> None:
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
    require_triton(device)
    block = block or max(DEQUANT_CONFIG["block"], q.blocksize)
    if block % q.blocksize or block & (block - 1):
        raise ValueError(f"block must be a power of two and a multiple of blocksize {q.blocksize}, got {block}")
    if out is None:
        out = torch.empty(q.shape, dtype=dtype, device=device)
    elif out.dtype != dtype or out.numel() != q.numel or not out.is_contiguous() or out.device != device:
        raise ValueError(f"out must be a contiguous {dtype} tensor of {q.numel} elements on {device}")
    table, _, map8 = device_tables(device)
    packed = q.packed.reshape(-1)
    if isinstance(q.absmax, DoubleQuantAbsmax):
        dq = q.absmax
        absmax, code8, scale8, offset = dq.scales, dq.codes, dq.scales, dq.offset.reshape(1)
        dq_blocksize = dq.scale_blocksize
    else:
        absmax, code8, scale8, offset = q.absmax, packed, q.absmax, q.absmax  # unused pointers
        dq_blocksize = 256
    grid = (cdiv(q.numel, block),)
    launch(
        _nf4_dequantize_kernel, grid, packed, absmax, code8, map8, scale8, offset, table, out,
        q.numel, packed.numel(), q.n_blocks,
        BLOCKSIZE=q.blocksize, BLOCK=block, DOUBLE_QUANT=q.double_quant, DQ_BLOCKSIZE=dq_blocksize,
        INTERPRETED=interpreted(),
        num_warps=num_warps or DEQUANT_CONFIG["num_warps"], enable_fp_fusion=False,
    )
    return out


def quantize_nf4_triton(w: Tensor, blocksize: int = 64, double_quant: bool = False, *, rounding: str = "exact",
                        check_finite: bool = True, block: int | None = None,
                        num_warps: int | None = None) -> NF4Tensor:
    """NF4-quantize a float32/float16/bfloat16 tensor in one kernel: equal bit for bit to `quantize_nf4`.

    n = w.numel() values -> packed (ceil(n/2),) uint8 + absmax (ceil(n/blocksize),) float32, or its
    double-quantized form (`double_quantize_triton`: the mean and one more kernel). `check_finite=False`
    skips the host-side check for NaN/inf (one small sync).
    """
    if not isinstance(w, Tensor):
        raise TypeError(f"quantize_nf4_triton expects a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"quantize_nf4_triton needs a float32, float16 or bfloat16 tensor, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor (shape {tuple(w.shape)})")
    check_blocksize(blocksize)
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {sorted(ROUNDINGS)}, got {rounding!r}")
    require_triton(w.device)
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
    _, bounds, _ = device_tables(w.device)
    launch(
        _nf4_quantize_kernel, (cdiv(n, block),), flat, packed, absmax, bounds, n, packed.numel(), n_blocks,
        BLOCKSIZE=blocksize, BLOCK=block, ROUNDING=ROUNDINGS[rounding],
        num_warps=num_warps or QUANT_CONFIG["num_warps"],
    )
    if check_finite and not bool(torch.isfinite(absmax).all()):
        raise ValueError("cannot quantize non-finite weights: the tensor holds NaN or inf values")
    stored: Tensor | DoubleQuantAbsmax = double_quantize_triton(absmax) if double_quant else absmax
    return NF4Tensor(packed=packed, absmax=stored, shape=w.shape, dtype=w.dtype, blocksize=blocksize)


RULES_8BIT = {"grid": 0, "nearest": 1, "search": 2}


def blockwise_8bit_triton(x: Tensor, scale_blocksize: int = 256, *, tables: MapTables | None = None,
                          offset: Tensor | None = None, rule: str = "grid",
                          rounding: str = "exact") -> tuple[Tensor, Tensor]:
    """8-bit blockwise quantization of x − offset in one kernel: x (n,) float32 -> (codes (n,) uint8,
    scales (ceil(n/scale_blocksize),) float32), scale_b = max |x − offset| over block b.

    rule "grid": bitsandbytes' CPU rule, bit for bit `minilora.double_quant.quantize_blockwise_8bit`;
    "nearest": its `exact=True`; "search": the binary search of bitsandbytes' CUDA kernel, with the
    reciprocal `rounding` ("exact", or its approximate "rcp_approx" / "div_full" forms, CUDA only).
    tables: `minilora.double_quant.MapTables` on x's device (default: the signed dynamic map);
    offset: a () or (1,) float32 tensor on x's device, subtracted in the kernel (no extra pass).
    """
    if not isinstance(x, Tensor) or x.dtype != torch.float32 or x.dim() != 1:
        raise ValueError(f"x must be a 1-D float32 tensor, got "
                         f"{(x.dtype, tuple(x.shape)) if isinstance(x, Tensor) else type(x).__name__}")
    if type(scale_blocksize) is not int or scale_blocksize < 16 or scale_blocksize & (scale_blocksize - 1):
        raise ValueError(f"scale_blocksize must be a power of two >= 16, got {scale_blocksize!r}")
    if rule not in RULES_8BIT:
        raise ValueError(f"rule must be one of {sorted(RULES_8BIT)}, got {rule!r}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {sorted(ROUNDINGS)}, got {rounding!r}")
    if rounding != "exact" and (rule != "search" or x.device.type != "cuda"):
        raise ValueError(f"rounding={rounding!r} imitates bitsandbytes' CUDA kernel: rule='search' on CUDA only")
    require_triton(x.device)
    tables = dynamic_map_tables(x.device) if tables is None else tables
    if tables.code.numel() != 256 or tables.code.device != x.device:
        raise ValueError(f"tables must hold a 256-entry map on {x.device}")
    x = x.contiguous()
    n = x.numel()
    n_blocks = -(-n // scale_blocksize)
    codes = torch.empty(n, dtype=torch.uint8, device=x.device)
    scales = torch.empty(n_blocks, dtype=torch.float32, device=x.device)
    if n_blocks == 0:
        return codes, scales
    launch(
        _blockwise_8bit_kernel, (n_blocks,),
        x, x if offset is None else offset, tables.code, tables.midpoints, tables.entry_of_point, codes, scales, n,
        BLOCKSIZE=scale_blocksize, SUBTRACT=offset is not None, RULE=RULES_8BIT[rule],
        ROUNDING=ROUNDINGS[rounding], num_warps=max(1, min(8, scale_blocksize // 128)), enable_fp_fusion=False,
    )
    return codes, scales


def double_quantize_triton(absmax: Tensor, scale_blocksize: int = 256, *, rule: str = "grid",
                           rounding: str = "exact") -> DoubleQuantAbsmax:
    """`minilora.double_quant.double_quantize` as the mean plus one kernel: absmax (n_blocks,) float32 ->
    DoubleQuantAbsmax. rule "grid" (default) gives its bytes; see `blockwise_8bit_triton` for the others.

    The offset is `absmax_mean(absmax)`, the very mean the PyTorch path takes (no host sync), and the kernel
    subtracts it while it reads the scales: no centred copy is written.
    """
    if not isinstance(absmax, Tensor) or absmax.dtype != torch.float32 or absmax.dim() != 1:
        raise ValueError("absmax must be a 1-D float32 tensor")
    offset = absmax_mean(absmax)
    codes, scales = blockwise_8bit_triton(absmax, scale_blocksize, offset=offset, rule=rule, rounding=rounding)
    return DoubleQuantAbsmax(codes=codes, scales=scales, offset=offset, scale_blocksize=scale_blocksize)
