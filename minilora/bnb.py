"""The bitsandbytes boundary: converting NF4 tensors both ways, and naming which of its CPU kernels dequantizes.

`to_bnb` / `from_bnb` convert a `minilora.nf4.NF4Tensor` (plain or double-quantized) to and from
bitsandbytes' `(packed, QuantState)`, sharing the tensors. bitsandbytes calls the size of the groups of
block scales `blocksize` too (`QuantState.state2.blocksize`); minilora calls it `scale_blocksize`, and the
two names meet only here.

minilora checks NF4 bit for bit against bitsandbytes. On a CPU, bitsandbytes 0.50 has two implementations
of `torch.ops.bitsandbytes.dequantize_4bit`, and which one runs depends on the processor:

* its **PyTorch path** (`backends/default`), the rule its CUDA kernel follows too: the tensor is flattened
  row-major and cut into blocks of `blocksize` values, so element k is scaled by absmax[k // blocksize],
  whatever the shape;
* its **native C++ kernel**, registered for the CPU whenever its native library loads. Inside it, on a CPU
  with AVX-512F (its own cpuid test), rows whose length is a multiple of 16 take a vectorised loop that
  indexes the scales *per row*:

      element (i, j) of an (m, n) weight  ->  absmax[i · (n // blocksize) + j // blocksize]

  That equals k // blocksize = (i·n + j) // blocksize only when every row is a whole number of blocks
  (n % blocksize == 0). For a (48, 96) weight at blocksize 64, rows 1..47 are scaled by the wrong absmax:
  a bug in the reference, found because minilora's dequantize is compared with it value for value.
  Its scalar loop (rows not a multiple of 16, or a CPU without AVX-512F) follows the flattened rule, so
  there the machine's default is right.

Parity must not depend on which of the two a machine picks, so the tests and chapters 4-6 name the path:
`dequantize_4bit_pytorch` is the reference; `dequantize_4bit_native` forces the C++ kernel on (on any
x86 CPU; the AVX-512 loop runs only where the CPU has it); `cpu_dequantize_path(...)` routes every
bitsandbytes call inside a `with` block (its `Linear4bit`, PEFT's bnb layers) through one of them.
`native_kernel_divergence` measures the bug on a given shape, so the day bitsandbytes fixes it, a test says so.

bitsandbytes is imported lazily: minilora itself never needs it. Importing this module also quiets one log
line: with transformers' optional `kernels` package installed, every bitsandbytes import on a CPU with
AVX-512 BF16 tries to fetch a faster 4-bit GEMM from a model hub and, offline, logs "Failed to load CPU
gemm_4bit_forward from kernels-community". bitsandbytes then uses its own kernels, so nothing is lost;
the line is noise a learner cannot act on, and only that logger is set to ERROR.
"""

from __future__ import annotations

import ctypes
import logging
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
from torch import Tensor

from minilora.double_quant import SCALE_BLOCKSIZE, DoubleQuantAbsmax, dynamic_map
from minilora.nf4 import SUPPORTED_DTYPES, NF4Tensor, check_blocksize, nf4_table

__all__ = [
    "to_bnb",
    "from_bnb",
    "dequantize_4bit_pytorch",
    "dequantize_4bit_native",
    "native_kernel_registered",
    "cpu_has_avx512f",
    "cpu_dequantize_path",
    "row_blocked_absmax_index",
    "native_kernel_divergence",
]

# bitsandbytes' CPU backend logs at WARNING when the optional hub kernel cannot be fetched (see above).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

Path = Literal["pytorch", "native"]


# ---------------------------------------------------------------------------------------------------------
# Conversion to and from bitsandbytes


def to_bnb(q: NF4Tensor) -> tuple[Tensor, Any]:
    """minilora NF4Tensor -> bitsandbytes (packed (ceil(n/2), 1) uint8, QuantState with quant_type "nf4").

    The result dequantizes with `bitsandbytes.functional.dequantize_4bit(packed, state)` and can back a
    `bnb.nn.Params4bit(packed, quant_state=state, bnb_quantized=True, ...)`. Tensors are shared, not copied.
    """
    from bitsandbytes.functional import QuantState

    if not isinstance(q, NF4Tensor):
        raise TypeError(f"to_bnb expects a minilora NF4Tensor, got {type(q).__name__}")
    common = dict(shape=torch.Size(q.shape), dtype=q.dtype, blocksize=q.blocksize, quant_type="nf4",
                  code=nf4_table(q.packed.device))
    if isinstance(q.absmax, DoubleQuantAbsmax):
        dq = q.absmax
        # bitsandbytes' `blocksize` of the inner state is minilora's scale_blocksize (block scales per scale)
        inner = QuantState(absmax=dq.scales, code=dynamic_map(True, dq.codes.device),
                           blocksize=dq.scale_blocksize, dtype=torch.float32)
        state = QuantState(absmax=dq.codes, offset=dq.offset, state2=inner, **common)
    else:
        state = QuantState(absmax=q.absmax, **common)
    return q.packed.view(-1, 1), state


def _check_count(t: Any, expected: int, name: str, where: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.numel() != expected:
        raise ValueError(f"{name} has {t.numel()} values; expected {expected} for {where}")


def from_bnb(packed: Tensor, quant_state: Any) -> NF4Tensor:
    """bitsandbytes (packed, QuantState) from `quantize_4bit(..., quant_type="nf4")` -> minilora NF4Tensor.

    Accepts any `quant_storage` (the bytes are reinterpreted as uint8). Tensors are shared, not copied.
    The sizes of packed bytes, block scales and (double quantization) codes and scales are checked against
    the shape and blocksize first; a ValueError says which disagree.
    """
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
    check_blocksize(quant_state.blocksize, "quant_state.blocksize")
    if not torch.equal(quant_state.code.float().cpu(), nf4_table("cpu")):
        raise ValueError("quant_state.code is not the NF4 table")
    if quant_state.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"quant_state.dtype must be float32, float16 or bfloat16, got {quant_state.dtype!r}")
    packed = packed.contiguous().view(torch.uint8).reshape(-1)
    shape = torch.Size(quant_state.shape)
    n_blocks = -(-shape.numel() // quant_state.blocksize)
    where = f"shape {tuple(shape)} in blocks of {quant_state.blocksize} ({n_blocks} blocks)"
    if packed.numel() != (shape.numel() + 1) // 2:
        raise ValueError(f"{packed.numel()} packed bytes do not hold shape {tuple(shape)} "
                         f"({(shape.numel() + 1) // 2} bytes needed)")
    _check_count(quant_state.absmax, n_blocks, "quant_state.absmax", where)
    inner = quant_state.state2
    if inner is None:
        absmax: Tensor | DoubleQuantAbsmax = quant_state.absmax.float().reshape(-1)
    else:
        if inner.blocksize != SCALE_BLOCKSIZE or not torch.equal(inner.code.float().cpu(), dynamic_map(True)):
            raise ValueError("only bitsandbytes' default double quantization (signed dynamic map, blocks of "
                             f"{SCALE_BLOCKSIZE}) is supported")
        if quant_state.absmax.dtype != torch.uint8:
            raise ValueError(f"with double quantization quant_state.absmax holds 8-bit codes (uint8), got "
                             f"{quant_state.absmax.dtype}")
        _check_count(inner.absmax, -(-n_blocks // SCALE_BLOCKSIZE), "quant_state.state2.absmax",
                     f"{n_blocks} block codes in groups of {SCALE_BLOCKSIZE}")
        offset = torch.as_tensor(quant_state.offset, dtype=torch.float32, device=packed.device)
        if offset.numel() != 1:
            raise ValueError(f"quant_state.offset must be one number, got shape {tuple(offset.shape)}")
        absmax = DoubleQuantAbsmax(codes=quant_state.absmax.reshape(-1), scales=inner.absmax.float().reshape(-1),
                                   offset=offset.reshape(()), scale_blocksize=inner.blocksize)
    return NF4Tensor(packed=packed, absmax=absmax, shape=shape, dtype=quant_state.dtype,
                     blocksize=quant_state.blocksize)


# ---------------------------------------------------------------------------------------------------------
# Its two CPU dequantizers


def _uint8(packed: Tensor) -> Tensor:
    """bitsandbytes accepts any quant_storage dtype; the codes are its bytes."""
    return (packed if packed.dtype == torch.uint8 else packed.view(torch.uint8)).contiguous()


def dequantize_4bit_pytorch(packed: Tensor, absmax: Tensor, blocksize: int, quant_type: str,
                            shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """bitsandbytes' PyTorch dequantizer (flattened blocks, as on CUDA), run eagerly: -> `shape` in `dtype`.

    Same signature as `torch.ops.bitsandbytes.dequantize_4bit`. bitsandbytes wraps the function in
    torch.compile; its `__wrapped__` is the eager original (same operations, no compile time on a CPU).
    """
    from bitsandbytes.backends.default import ops as default_ops
    from bitsandbytes.backends.utils import _get_4bit_code

    compute = getattr(default_ops._dequantize_4bit_compute, "__wrapped__", default_ops._dequantize_4bit_compute)
    packed = _uint8(packed)
    code = _get_4bit_code(quant_type, packed.device)
    return compute(packed.reshape(-1), absmax, code, blocksize, shape, dtype)


def _native_function(quant_type: str, dtype: torch.dtype) -> Callable[..., Any]:
    from bitsandbytes.cextension import lib

    suffix = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype)
    if quant_type not in ("nf4", "fp4") or suffix is None:
        raise ValueError(f"the native CPU kernel handles nf4/fp4 into float32/bfloat16/float16, "
                         f"not {quant_type!r} into {dtype}")
    return getattr(lib, f"cdequantize_blockwise_cpu_{quant_type}_{suffix}")


def dequantize_4bit_native(packed: Tensor, absmax: Tensor, blocksize: int, quant_type: str,
                           shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """bitsandbytes' C++ CPU dequantizer, called directly whatever the CPU: -> `shape` in `dtype`.

    The call bitsandbytes makes on an AVX-512 CPU: the weight viewed as (m, n) with n its last dimension
    (a 1-D tensor as one row). The kernel needs an even n (two codes per byte per row).
    """
    from bitsandbytes.functional import get_ptr

    shape = tuple(shape)
    rows, n = (1, shape[0]) if len(shape) == 1 else (int(torch.Size(shape[:-1]).numel()), shape[-1])
    if n % 2:
        raise ValueError(f"the native CPU kernel needs an even last dimension, got {n}")
    packed = _uint8(packed).reshape(rows, n // 2)
    absmax = absmax.float().contiguous()
    out = torch.empty(shape, dtype=dtype)
    _native_function(quant_type, dtype)(get_ptr(packed), get_ptr(absmax), get_ptr(out),
                                        ctypes.c_longlong(blocksize), ctypes.c_longlong(rows), ctypes.c_longlong(n))
    return out


def native_kernel_registered() -> bool:
    """Whether bitsandbytes registered its C++ dequantizer for the CPU here (it does when its library loads).

    Read from the dispatcher's table: a kernel of its own for the CPU key, not only the "default" one.
    """
    import bitsandbytes  # noqa: F401  (registers the ops)

    table = torch._C._dispatch_dump("bitsandbytes::dequantize_4bit")
    return any(line.startswith("CPU:") for line in table.splitlines())


def cpu_has_avx512f() -> bool:
    """Whether the C++ kernel can take its AVX-512 loop on this CPU (its own cpuid test for AVX-512F)."""
    from bitsandbytes.cextension import lib

    return bool(lib.has_avx512f_cpu())


@contextmanager
def cpu_dequantize_path(path: Path) -> Iterator[None]:
    """Inside the block, every CPU call of `torch.ops.bitsandbytes.dequantize_4bit` runs `path`.

    "pytorch": the flattened-block reference; "native": the C++ kernel (even last dimensions only). This
    reaches bitsandbytes' own callers too (`dequantize_4bit`, `Linear4bit`, PEFT's bnb layers). The kernel
    is registered on top of bitsandbytes' CPU kernel and removed on exit, which brings the machine's back.
    """
    if path not in ("pytorch", "native"):
        raise ValueError(f"path must be 'pytorch' or 'native', got {path!r}")
    import bitsandbytes  # noqa: F401  (defines the op before we add a kernel to it)

    kernel = dequantize_4bit_pytorch if path == "pytorch" else dequantize_4bit_native
    library = torch.library.Library("bitsandbytes", "IMPL")
    with warnings.catch_warnings():  # torch warns that a kernel is overridden: that is the point
        warnings.simplefilter("ignore", UserWarning)
        library.impl("dequantize_4bit", kernel, "CPU")
    try:
        yield
    finally:
        library._destroy()


def row_blocked_absmax_index(shape: Sequence[int], blocksize: int) -> Tensor:
    """The scale each element gets in the native AVX-512 loop: (m, n) int64, i·(n // blocksize) + j // blocksize."""
    rows, n = int(torch.Size(shape[:-1]).numel()), shape[-1]
    i, j = torch.arange(rows).unsqueeze(1), torch.arange(n).unsqueeze(0)
    return i * (n // blocksize) + j // blocksize


def native_kernel_divergence(w: Tensor, blocksize: int = 64) -> dict[str, Any]:
    """Quantize w with bitsandbytes, dequantize through both paths; where and how the native one differs.

    Returns {"elements": differing elements, "rows": rows with any, "max_abs": largest difference,
    "row_blocked": whether the native result is exactly the per-row indexing described above}.
    """
    import bitsandbytes.functional as bnb_F

    packed, state = bnb_F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
    args = (packed, state.absmax, blocksize, "nf4", w.shape, w.dtype)
    reference, native = dequantize_4bit_pytorch(*args), dequantize_4bit_native(*args)
    diff = (native.float() - reference.float()).reshape(-1, w.shape[-1]).abs()
    codes = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 15], 1).reshape(-1)[: w.numel()].long()
    table = bnb_F.get_4bit_type("nf4", device="cpu")
    index = row_blocked_absmax_index(w.shape, blocksize).clamp(max=state.absmax.numel() - 1)
    row_blocked = (table[codes].reshape(index.shape) * state.absmax[index]).to(w.dtype)
    return {"elements": int((diff > 0).sum()), "rows": int((diff > 0).any(dim=1).sum()),
            "max_abs": float(diff.max()), "row_blocked": bool(torch.equal(native.reshape(index.shape), row_blocked))}
