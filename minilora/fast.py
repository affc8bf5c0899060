"""Fused LoRA, DoRA, QLoRA and QDoRA layers: the functions of `minilora.lora` / `minilora.dora`, fewer bytes moved.

The readable LoRA layer computes y = x W0ᵀ + b + s·(x Aᵀ) Bᵀ as written, in float32 adapters, and autograd
keeps whatever each step needs. At r = 16 the adapter adds under 2% to the arithmetic of the two big GEMMs
(forward y = x Wᵀ, backward dL/dx = g W), so what makes a LoRA layer slower than its frozen base is memory
traffic: casts of the activations to float32, extra passes over (tokens, out) tensors, saved copies.

Here each layer is one `torch.autograd.Function` with a hand-written backward (g = dL/dy, shapes for a
2-D x: (N, in); A: (r, in); B: (out, r); s = scaling):

    forward    W' = W0 + s·B A            (out, in), built once in the compute dtype: one out×in pass
               y  = x W'ᵀ + b             the one big GEMM
               u  = x Aᵀ                  (N, r), kept for dL/dB
    backward   dL/dx = g W'               W' rebuilt (cheaper than keeping out×in bytes per layer alive)
               v     = g B                (N, r)
               dL/dA = s · vᵀ x           (r, in)
               dL/dB = s · gᵀ u           (out, r)

Saved for backward: x (which the caller holds anyway) and u. No weight gradient, no float32 copy of an
activation. Building W' costs reading W0 and writing W' (4·in·out bytes in bf16) per pass; for few tokens
that is more than the unmerged form y = x W0ᵀ + s·(x Aᵀ) Bᵀ, which instead reads and rewrites the
(N, out) output: `choose_path` picks the cheaper one.

A merged W' rounds W0 + s·BA to the compute dtype: the same relative rounding a bf16 output y gets anyway;
the gradients of A and B never go through W' at all. Where the rounding happens still matters in training.
Early on s·BA is smaller than half a bf16 unit of most weights: added to a value already rounded (the PyTorch
build's bf16 deq(W), or the unmerged form's x W0ᵀ, as PEFT and Unsloth add it too) it mostly rounds away;
the Triton build rounds deq(W) + s·BA from float32 once and keeps it on average. In `bench.parity`'s runs
its training loss fell as the float32 model's did, the others' more slowly (`bench/results/parity_*.json`).

DoRA (Liu et al. 2024) rescales each output row: W' = m ⊙ V/‖V‖_row with V = W0 + s·B A and the norm
treated as a constant in backward (DoRA §4.3, as PEFT does). Its fused form builds V, takes its row norms
in float32, scales V in place into W' and runs the one GEMM (for NF4 on CUDA: one kernel pass for the
norms, one that writes W' already scaled); backward needs dL/dm_j =
Σ_n g_nj (x V_jᵀ)_n / ‖V_j‖ = Σ_n g_nj (y_nj − b_j) / m_j, read off the saved output y (so no second GEMM).
Rows with m_j = 0 output only their bias; their dL/dm is taken as 0 (the reference's value whenever V's
row is zero too, as for all-zero rows of W0 at initialisation).

QLoRA / QDoRA: the same with W0 = dequantize(NF4); on CUDA the Triton kernel of `minilora.kernels` builds
W' = deq(W) + s·B A straight from the 4-bit codes in one pass (0.5 byte read, 2 written per weight).

Dropout on the adapter input (training with lora_dropout > 0) does not fit a merged weight; `fused_forward`
returns None there and the layer uses its readable path.

For whole models (chapter 10 §6): `compile_layers` compiles each decoder layer with its checkpoint,
`offload_checkpoints` keeps checkpointed layer inputs in host memory, and `fuse_loss` computes a causal LM's
loss from its head a chunk of tokens at a time (`linear_cross_entropy`), reading nothing back from the GPU.

`fused_forward` is what `minilora.lora.LoRALinear.forward` tries first on CUDA inputs (or with fused=True):
`minilora/__init__.py` installs it there (`minilora.lora.set_fused_forward`), so the LoRA layer of chapter 2
names nothing of this chapter.
"""

from __future__ import annotations

import weakref
from functools import cache, partial
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minilora import kernels
from minilora.dora import NORM_EPS, DoraVariant
from minilora.kernels.nf4 import interpreted, launch, require_triton
from minilora.lora import LoRALinear, is_conv1d, is_nf4
from minilora.nf4 import NF4Tensor

__all__ = [
    "MERGE_CROSSOVER",
    "MERGE_CROSSOVER_FREE_BUILD",
    "TRITON_BUILD",
    "USE_TRITON_BUILD",
    "choose_path",
    "merged_weight",
    "lora_linear",
    "dora_linear",
    "qlora_linear",
    "qdora_linear",
    "fused_forward",
    "PackedAdapters",
    "pack_adapters",
    "compile_layers",
    "repeated_layers",
    "compile_model",
    "offload_checkpoints",
    "linear_cross_entropy",
    "fuse_loss",
    "ADAMW_CONFIG",
    "USE_TRITON_ADAMW",
    "adamw_update_triton",
    "paged_adamw_update",
]

Path = Literal["merged", "unmerged"]
BaseWeight = Tensor | NF4Tensor

# The three measured constants of this module, each set from one line of the summary of
# `python -m bench --sections buildsweep,paths` (bench/NOTES.md says which line sets which).
#
# Merge when tokens ≥ MERGE_CROSSOVER · 2·in·out/(in + out) (see choose_path). 1.0 is the byte count's
# break-even. Measured on an H100 (bench/results, section paths): the unmerged path was faster up to
# N = 8192 at 4096² (2x the harmonic mean) and merged won from N = 16384 (4x), at 8192² from 16384 (2x):
# on that machine the host spends ~50-150 µs per launch, and the merged path launches two Triton builds.
MERGE_CROSSOVER = 4.0
# The same for a 4-bit base built by the Triton kernel (`free_build`): W' costs the bytes of deq(W0) alone,
# which the unmerged path pays too, so the byte count says merge always (0.0). Kept at 0.0: the sweep's
# QLoRA rows ran with the old build configuration (74 µs a build; 28 µs with the one chosen since), and
# merged and unmerged were then within 2 % at N = 8192, 4096².
MERGE_CROSSOVER_FREE_BUILD = 0.0
# Which W' build runs on CUDA for each base kind: True = the one-pass Triton kernel (read W0 or its 4-bit
# codes, write W'); False = PyTorch: addmm (dense) or dequantize + addmm_ in place (NF4).
TRITON_BUILD = {"dense": True, "nf4": True}
# Master switch over TRITON_BUILD (False: the PyTorch build everywhere; the benchmark's "torch build" rows).
USE_TRITON_BUILD = True


def choose_path(tokens: int, in_features: int, out_features: int, r: int, *, free_build: bool = False) -> Path:
    """'merged' or 'unmerged': which LoRA form moves fewer bytes for one forward + backward in 16-bit.

    merged extra:   build W' twice (forward, backward): 2 · (read W0 + write W') = 8·in·out bytes
    unmerged extra: add s·u Bᵀ into y (read + write N·out) and s·v A into dL/dx (N·in): 4·N·(in + out) bytes
    Both also pay the skinny products u, v, dL/dA, dL/dB (≈ 2·N·(in + out)·2 bytes), the same for both.
    Merged wins when N ≥ 2·in·out/(in + out) (the harmonic mean of in and out), times MERGE_CROSSOVER
    (measured: the builds are not at the byte floor, the GEMM epilogues are not free).
    free_build: W' costs no more than W0 itself (a 4-bit base must be dequantized anyway, and the Triton
    kernel adds s·B A in the same pass): the factor is MERGE_CROSSOVER_FREE_BUILD (0: always merged).
    For r comparable to in or out the adapter GEMMs stop being skinny; there the unmerged form is kept.
    """
    for name, value in (("tokens", tokens), ("in_features", in_features), ("out_features", out_features), ("r", r)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "tokens" else 1):
            raise ValueError(f"{name} must be a {'non-negative' if name == 'tokens' else 'positive'} int, got {value!r}")
    return _choose(tokens, in_features, out_features, r, free_build)


def _choose(tokens: int, in_features: int, out_features: int, r: int, free_build: bool) -> Path:
    if 8 * r > min(in_features, out_features):
        return "unmerged"
    harmonic = 2 * in_features * out_features / (in_features + out_features)
    factor = MERGE_CROSSOVER_FREE_BUILD if free_build else MERGE_CROSSOVER
    return "merged" if tokens >= factor * harmonic else "unmerged"


# ---------------------------------------------------------------------------------------------------------
# The base weight: dense (out, in) or NF4
#
# Everything between a layer's call and its GEMMs is host time: at width 4096 and ~1k tokens one fused
# forward + backward is host-bound, so the code below avoids dispatching operations that do nothing (casts
# to the dtype a tensor already has, no-op .contiguous()), decides the Triton question once per call, and
# validates arguments once, where they enter.


def _check_base(weight: object) -> None:
    if isinstance(weight, NF4Tensor):
        if len(weight.shape) != 2:
            raise ValueError(f"an NF4 base weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
        return
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a (out, in) tensor or a minilora NF4Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    if weight.requires_grad:
        raise ValueError("the base weight must be frozen (requires_grad=False): the fused layers form no "
                         "gradient for it")


def _shape(weight: BaseWeight) -> tuple[int, int]:
    out_features, in_features = weight.shape
    return int(out_features), int(in_features)


def _dense(weight: BaseWeight, dtype: torch.dtype) -> Tensor:
    """W0 as (out, in) in dtype: the stored tensor itself when it already is, else a fresh one."""
    if isinstance(weight, NF4Tensor):
        if dtype == torch.float64:  # NF4 values are float32 products: exact in float64 (used by the tests)
            return kernels.dequantize(weight, torch.float32).to(dtype)
        return kernels.dequantize(weight, dtype)
    return weight if weight.dtype == dtype else weight.to(dtype)


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """t in dtype; no call at all when it already is (each dispatched op costs host time on a GPU)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _addmm(inp: Tensor, m1: Tensor, m2: Tensor, alpha: float = 1.0, beta: float = 1.0,
           inplace: bool = False) -> Tensor:
    """beta·inp + alpha·m1 m2 (beta = 0: inp ignored). inp: (p, q), m1: (p, k), m2: (k, q) -> (p, q).

    Eager: one addmm, in place on inp where asked (inp then must be a fresh tensor). While compiling, a
    product and pointwise scaling instead, which inductor fuses with what follows. Why: compiled on CUDA
    (torch 2.11), the layer's addmm forms with alpha and beta gave the adapters zero gradients where eager's
    were not, and these forms give eager's (bench/NOTES.md, call AD); inductor rewrites addmm into mm + add
    in places and has dropped the scalars there before (pytorch/pytorch#167313). tests/test_compile.py checks
    that no addmm with alpha or beta reaches inductor.
    """
    if not torch.compiler.is_compiling():
        if inplace:
            return inp.addmm_(m1, m2, beta=beta, alpha=alpha)
        return torch.addmm(inp, m1, m2, beta=beta, alpha=alpha)
    out = torch.mm(m1, m2)
    if alpha != 1:
        out = out * alpha
    if beta == 0:
        return out
    return (inp if beta == 1 else inp * beta) + out


def _triton_build(weight: BaseWeight, dtype: torch.dtype, rank: int) -> bool:
    """Build W' with the one-pass Triton kernel? On CUDA, 16-bit compute, an NF4 base of a shape it handles or
    a contiguous dense base already in the compute dtype (cuBLAS's addmm with inner size r is slow there)."""
    if not (USE_TRITON_BUILD and kernels.HAVE_TRITON and dtype in (torch.bfloat16, torch.float16)):
        return False
    if isinstance(weight, NF4Tensor):
        return (TRITON_BUILD["nf4"] and weight.device.type == "cuda"
                and kernels.nf4_lora_weight_supported(weight, rank))
    if not TRITON_BUILD["dense"]:
        return False
    return (weight.device.type == "cuda" and weight.dtype == dtype and weight.is_contiguous()
            and 1 <= rank <= kernels.lora_weight.MAX_RANK)


def merged_weight(weight: BaseWeight, A: Tensor, B: Tensor, scaling: float, dtype: torch.dtype,
                  row_scale: Tensor | None = None) -> Tensor:
    """W' = [row_scale ⊙] (W0 + s·B A) as a fresh (out, in) tensor in dtype. A: (r, in), B: (out, r) in dtype.

    W0 is left untouched. On CUDA one Triton pass (read W0 or its 4-bit codes, write W'); elsewhere one
    addmm (dense) or dequantize + addmm in place (NF4).
    """
    return _build(weight, A, B, scaling, dtype, row_scale, _triton_build(weight, dtype, A.shape[0]))


def _build(weight: BaseWeight, a: Tensor, b: Tensor, scaling: float, dtype: torch.dtype, row_scale: Tensor | None,
           triton: bool) -> Tensor:
    """`merged_weight` with the Triton decision already taken."""
    if triton:
        return kernels.merge_weight(weight, a, b, scaling, dtype, row_scale)
    if isinstance(weight, NF4Tensor):
        w = _addmm(_dense(weight, dtype), b, a, alpha=scaling, inplace=True)
    else:
        w = _addmm(_cast(weight, dtype), b, a, alpha=scaling)
    if row_scale is not None:
        w.mul_(_cast(row_scale, dtype).unsqueeze(1))
    return w


def _row_norm(weight: BaseWeight, a: Tensor, b: Tensor, scaling: float, dtype: torch.dtype,
              triton: bool) -> tuple[Tensor, Tensor | None]:
    """‖W0 + s·B A‖_row in float32 (float64 for float64), and V itself when it had to be built for it."""
    if triton:
        return kernels.merged_row_norm(weight, a, b, scaling), None
    v = _build(weight, a, b, scaling, dtype, None, False)
    return torch.linalg.vector_norm(v, dim=1, dtype=torch.float64 if dtype == torch.float64 else torch.float32), v


# ---------------------------------------------------------------------------------------------------------
# The adapters' gradients, in their own dtype
#
# Float32 masters A, B get float32 gradients. Computing s·Mᵀ N in 16-bit and letting autograd cast the result
# costs two launches per factor (product, cast); cuBLAS can write float32 from 16-bit operands directly
# (`out_dtype`, CUDA only), which is one launch and keeps the float32 accumulator's digits.

_OUT_DTYPE_OK: dict[torch.device, bool] = {}


def _out_dtype_ok(device: torch.device) -> bool:
    """Does this device's addmm take `out_dtype` (16-bit operands, float32 result)? Probed once per device."""
    ok = _OUT_DTYPE_OK.get(device)
    if ok is None:
        ok = False
        if device.type == "cuda":
            try:
                one = torch.ones(1, 1, device=device, dtype=torch.bfloat16)
                ok = torch.addmm(torch.empty(1, 1, device=device), one, one, beta=0, alpha=0.5,
                                 out_dtype=torch.float32).item() == 0.5
            except (RuntimeError, TypeError, NotImplementedError):
                ok = False
        _OUT_DTYPE_OK[device] = ok
    return ok


def _scaled_mm(m1: Tensor, m2: Tensor, s: float, like: Tensor, like_compute: Tensor) -> Tensor:
    """s · m1 m2 in the dtype of `like` (the factor whose gradient this is). m1: (p, k), m2: (k, q) in the
    compute dtype, the dtype of `like_compute` (the same factor, cast) -> (p, q).

    addmm with beta=0 ignores its first argument (any tensor of the result's shape, here the factor itself):
    s·m1 m2 in one launch instead of a product and a scaling pass.
    """
    # Not while compiling: the out_dtype overload has no working fake-tensor or inductor rule (tracing it
    # breaks the graph, and every layer then runs eager between graphs), and inductor fuses the cast anyway.
    if like.dtype != m1.dtype and not torch.compiler.is_compiling() and _out_dtype_ok(m1.device):
        return torch.addmm(like, m1, m2, beta=0, alpha=s, out_dtype=like.dtype)
    return _addmm(like_compute, m1, m2, alpha=s, beta=0)  # autograd casts it to like's dtype


# ---------------------------------------------------------------------------------------------------------
# LoRA


def _flatten(x: Tensor, in_features: int) -> Tensor:
    if x.shape[-1] != in_features:
        raise ValueError(f"x must have shape (..., {in_features}), got {tuple(x.shape)}")
    return x.reshape(-1, in_features)


def _check_adapter(A: Tensor, B: Tensor, out_features: int, in_features: int) -> int:
    if not isinstance(A, Tensor) or not isinstance(B, Tensor) or A.dim() != 2 or B.dim() != 2:
        raise ValueError("A must be a (r, in) tensor and B a (out, r) tensor")
    r, a_in = A.shape
    b_out, b_r = B.shape
    if a_in != in_features or b_out != out_features or b_r != r:
        raise ValueError(f"for a ({out_features}, {in_features}) base, A must be (r, {in_features}) and B "
                         f"({out_features}, r); got A {tuple(A.shape)}, B {tuple(B.shape)}")
    return r


# ---------------------------------------------------------------------------------------------------------
# The base weight through autograd.Function.apply
#
# Eager, an NF4 base goes into `apply` as the NF4Tensor it is and waits on ctx for backward: nothing is built
# per call. torch.compile cannot trace a dataclass through `apply`, so while compiling an NF4 base crosses as
# its tensors and static facts (`kernels.ops.nf4_parts`), saved for backward like any tensor, and is put
# together again on the other side.


def _base_args(weight: BaseWeight) -> tuple:
    """What `apply` receives for the base: (weight,) eager or dense; (meta, *tensors) for NF4 under compile."""
    if isinstance(weight, NF4Tensor) and torch.compiler.is_compiling():
        parts, meta = kernels.ops.nf4_parts(weight)
        return (meta, *parts)
    return (weight,)


def _base_from(base: object, parts: tuple) -> BaseWeight:
    return kernels.ops.nf4_from_parts(*parts, base) if parts else base  # type: ignore[return-value]


def _keep_base(ctx, weight: BaseWeight, base: object, parts: tuple) -> tuple:
    """Remember the base for backward; returns the tensors to save with the others."""
    ctx.base, ctx.n_parts = (base if parts else weight), len(parts)
    return parts


def _saved_base(ctx, saved: tuple) -> BaseWeight:
    parts = tuple(saved[len(saved) - ctx.n_parts:]) if ctx.n_parts else ()
    return _base_from(ctx.base, parts)


class _LoRAFunction(torch.autograd.Function):
    """y = x W0ᵀ + b + s·(x Aᵀ) Bᵀ for 2-D x, merged or unmerged (see module docstring)."""

    @staticmethod
    def forward(ctx, x: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scaling: float, path: Path,
                copies: tuple[Tensor, Tensor] | None, base: object, *parts: Tensor | None) -> Tensor:
        weight = _base_from(base, parts)
        dtype = x.dtype
        # A, B in the compute dtype: r·(in + out) values, cast here unless `pack_adapters` already did
        a, b = copies if copies is not None else (_cast(A, dtype), _cast(B, dtype))
        triton = False
        if path == "merged":
            triton = _triton_build(weight, dtype, a.shape[0])
            if triton:  # W' built inside one call with its product (see kernels.merged_matmul)
                y = kernels.merged_matmul(x, weight, a, b, scaling, _cast(bias, dtype))
            else:
                y = F.linear(x, _build(weight, a, b, scaling, dtype, None, False), _cast(bias, dtype))
            u = F.linear(x, a) if ctx.needs_input_grad[3] else None
        else:
            u = F.linear(x, a)
            y = F.linear(x, _dense(weight, dtype), _cast(bias, dtype))
            y = _addmm(y, u, b.t(), alpha=scaling, inplace=True)
        ctx.scaling, ctx.path, ctx.triton = scaling, path, triton
        # A and B themselves are parameters (saving them costs nothing): their gradients come back in their dtype
        ctx.save_for_backward(x, u, a, b, A, B, *_keep_base(ctx, weight, base, parts))
        return y

    @staticmethod
    def backward(ctx, g: Tensor):
        saved = ctx.saved_tensors
        x, u, a, b, A, B = saved[:6]
        weight, s = _saved_base(ctx, saved), ctx.scaling
        need_x, need_bias, need_a, need_b = ctx.needs_input_grad[:4]
        g = g if g.is_contiguous() else g.contiguous()  # no dispatch when it already is
        merged = ctx.path == "merged"
        grad_x = grad_bias = grad_a = grad_b = None
        v = torch.mm(g, b) if (need_a or (need_x and not merged)) else None  # (N, r), s applied below
        if need_x:
            if merged:
                grad_x = (kernels.merged_matmul(g, weight, a, b, s, transposed=False) if ctx.triton
                          else torch.mm(g, _build(weight, a, b, s, g.dtype, None, False)))
            else:
                grad_x = _addmm(torch.mm(g, _dense(weight, g.dtype)), v, a, alpha=s, inplace=True)
        if need_a:
            grad_a = _scaled_mm(v.t(), x, s, A, a)
        if need_b:
            grad_b = _scaled_mm(g.t(), u, s, B, b)
        if need_bias:
            grad_bias = g.sum(0)
        return (grad_x, grad_bias, grad_a, grad_b, None, None, None, None) + (None,) * ctx.n_parts


def _apply_lora(x: Tensor, weight: BaseWeight, bias: Tensor | None, A: Tensor, B: Tensor, scaling: float,
                path: Path | None) -> Tensor:
    _check_base(weight)
    out_features, in_features = _shape(weight)
    if path not in ("merged", "unmerged", None):
        raise ValueError(f"path must be 'merged', 'unmerged' or None (choose_path), got {path!r}")
    return _lora(x, weight, bias, A, B, scaling, path, out_features, in_features)


def _lora(x: Tensor, weight: BaseWeight, bias: Tensor | None, A: Tensor, B: Tensor, scaling: float,
          path: Path | None, out_features: int, in_features: int,
          copies: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """`_apply_lora` for a base already checked (2-D, frozen) of the given shape; `copies`: A and B already
    in x's dtype (`pack_adapters`), or None to cast them here."""
    r = _check_adapter(A, B, out_features, in_features)
    x2 = x if x.dim() == 2 and x.shape[1] == in_features else _flatten(x, in_features)
    if path is None:
        free_build = isinstance(weight, NF4Tensor) and _triton_build(weight, x.dtype, r)
        path = _choose(x2.shape[0], in_features, out_features, r, free_build)
    y = _LoRAFunction.apply(x2, bias, A, B, float(scaling), path, copies, *_base_args(weight))
    return y if x2 is x else y.reshape(*x.shape[:-1], out_features)


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scaling: float,
                path: Path | None = None) -> Tensor:
    """y = x W0ᵀ + b + s·(x Aᵀ) Bᵀ with a fused backward. x: (..., in), W0: (out, in) frozen -> (..., out).

    Computed in x's dtype; A: (r, in), B: (out, r) may be float32 masters (their gradients come back in
    their dtype). path: 'merged', 'unmerged' or None for `choose_path`.
    """
    return _apply_lora(x, weight, bias, A, B, scaling, path)


def qlora_linear(x: Tensor, weight: NF4Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scaling: float,
                 path: Path | None = None) -> Tensor:
    """`lora_linear` on a 4-bit base: W0 = dequantize(weight), rebuilt in backward instead of kept."""
    if not isinstance(weight, NF4Tensor):
        raise TypeError(f"qlora_linear expects a minilora NF4Tensor weight, got {type(weight).__name__}")
    return _apply_lora(x, weight, bias, A, B, scaling, path)


# ---------------------------------------------------------------------------------------------------------
# DoRA


class _DoRAFunction(torch.autograd.Function):
    """y = x W'ᵀ + b, W' = c ⊙ V, V = W0 + s·B A, c = m / ‖V‖_row (detached), for 2-D x."""

    @staticmethod
    def forward(ctx, x: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, magnitude: Tensor, scaling: float,
                copies: tuple[Tensor, Tensor] | None, base: object, *parts: Tensor | None) -> Tensor:
        weight = _base_from(base, parts)
        dtype = x.dtype
        a, b = copies if copies is not None else (_cast(A, dtype), _cast(B, dtype))
        triton = _triton_build(weight, dtype, a.shape[0])
        norm, v = _row_norm(weight, a, b, scaling, dtype, triton)
        c = _cast(magnitude, norm.dtype) / norm.clamp_min(NORM_EPS)  # (out,) float32: the row factor
        if triton:  # W' = c ⊙ V built inside one call with its product (see kernels.merged_matmul)
            y = kernels.merged_matmul(x, weight, a, b, scaling, _cast(bias, dtype), row_scale=c)
        else:
            w = v.mul_(_cast(c, dtype).unsqueeze(1))  # V is ours: scale it in place, no second out×in buffer
            y = F.linear(x, w, _cast(bias, dtype))
            del w, v
        u = F.linear(x, a) if ctx.needs_input_grad[3] else None
        ctx.scaling, ctx.triton = scaling, triton
        # y is the layer's own output, so keeping it costs no new memory; dL/dm is read off it
        ctx.save_for_backward(x, u, a, b, c, magnitude, bias, y if ctx.needs_input_grad[4] else None,
                              *_keep_base(ctx, weight, base, parts))
        return y

    @staticmethod
    def backward(ctx, g: Tensor):
        saved = ctx.saved_tensors
        x, u, a, b, c, magnitude, bias, y = saved[:8]
        weight, s = _saved_base(ctx, saved), ctx.scaling
        need_x, need_bias, need_a, need_b, need_m = ctx.needs_input_grad[:5]
        g = g if g.is_contiguous() else g.contiguous()  # no dispatch when it already is
        grad_x = grad_bias = grad_a = grad_b = grad_m = None
        if need_x:
            grad_x = (kernels.merged_matmul(g, weight, a, b, s, transposed=False, row_scale=c) if ctx.triton
                      else torch.mm(g, _build(weight, a, b, s, g.dtype, c, False)))
        cs = (c * s).unsqueeze(1) if (need_a or need_b) else None  # (out, 1) float32
        if need_a:
            v_s = torch.mm(g, b * _cast(cs, g.dtype))  # (g ⊙ c) B s as g (c ⊙ B) s: scale B, not g
            grad_a = torch.mm(v_s.t(), x)
        if need_b:
            grad_b = torch.mm(g.t(), u) * cs
        g_sum = None
        if need_m:
            # Σ_n g_nj (y_nj − b_j) = Σ_n g_nj (x W'ᵀ)_nj, one read of g and y, accumulated in float32
            dot, g_sum = kernels.column_dot(g, y, with_sum=bias is not None)
            if bias is not None:
                dot = dot - _cast(bias, dot.dtype) * g_sum
            # dot/m is inf or nan where m = 0; where() drops those values (nothing flows back through them)
            m = _cast(magnitude, dot.dtype)
            grad_m = torch.where(m != 0, dot.div_(m), 0.0)
        if need_bias:
            grad_bias = g.sum(0) if g_sum is None else g_sum
        return (grad_x, grad_bias, grad_a, grad_b, grad_m, None, None, None) + (None,) * ctx.n_parts


def _check_magnitude(magnitude: object, out_features: int) -> None:
    if not isinstance(magnitude, Tensor) or magnitude.dim() != 1 or magnitude.shape[0] != out_features:
        raise ValueError(f"magnitude must be a ({out_features},) tensor, got "
                         f"{tuple(magnitude.shape) if isinstance(magnitude, Tensor) else type(magnitude).__name__}")


def _apply_dora(x: Tensor, weight: BaseWeight, bias: Tensor | None, A: Tensor, B: Tensor, magnitude: Tensor,
                scaling: float) -> Tensor:
    _check_base(weight)
    out_features, in_features = _shape(weight)
    return _dora(x, weight, bias, A, B, magnitude, scaling, out_features, in_features)


def _dora(x: Tensor, weight: BaseWeight, bias: Tensor | None, A: Tensor, B: Tensor, magnitude: Tensor,
          scaling: float, out_features: int, in_features: int,
          copies: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """`_apply_dora` for a base already checked (2-D, frozen) of the given shape (`copies` as in `_lora`)."""
    _check_adapter(A, B, out_features, in_features)
    _check_magnitude(magnitude, out_features)
    x2 = x if x.dim() == 2 and x.shape[1] == in_features else _flatten(x, in_features)
    y = _DoRAFunction.apply(x2, bias, A, B, magnitude, float(scaling), copies, *_base_args(weight))
    return y if x2 is x else y.reshape(*x.shape[:-1], out_features)


def dora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, magnitude: Tensor,
                scaling: float) -> Tensor:
    """DoRA: y = x (m ⊙ V/‖V‖_row)ᵀ + b, V = W0 + s·B A, norm detached. x: (..., in) -> (..., out).

    Equal to `minilora.dora.dora_forward` (and PEFT's DoRA) without dropout: PEFT's
    base(x) + (m/‖V‖ − 1)·x W0ᵀ + (m/‖V‖)·s·x Aᵀ Bᵀ is the same sum. magnitude m: (out,).
    """
    return _apply_dora(x, weight, bias, A, B, magnitude, scaling)


def qdora_linear(x: Tensor, weight: NF4Tensor, bias: Tensor | None, A: Tensor, B: Tensor, magnitude: Tensor,
                 scaling: float) -> Tensor:
    """`dora_linear` on a 4-bit base: W0 = dequantize(weight), rebuilt in backward instead of kept."""
    if not isinstance(weight, NF4Tensor):
        raise TypeError(f"qdora_linear expects a minilora NF4Tensor weight, got {type(weight).__name__}")
    return _apply_dora(x, weight, bias, A, B, magnitude, scaling)


# ---------------------------------------------------------------------------------------------------------
# The fused forward of minilora.lora.LoRALinear

# What each type of base layer is, decided on its first call (duck-typing a layer costs microseconds)
_BASE_KIND: dict[type, str] = {}


def _base_kind(base: nn.Module) -> str:
    """'nf4' (a 4-bit layer with dequantize()), 'conv1d' (weight stored (in, out)) or 'dense'."""
    kind = _BASE_KIND.get(type(base))
    if kind is None:
        kind = "nf4" if is_nf4(base) else "conv1d" if is_conv1d(base) else "dense"
        _BASE_KIND[type(base)] = kind
    return kind


def _fused_base(base: nn.Module, x: Tensor) -> tuple[BaseWeight, Tensor | None, torch.dtype] | None:
    """(W0 as tensor or NF4Tensor, bias, compute dtype) of a LoRALinear's base, or None if not fusable."""
    kind = _base_kind(base)
    if kind == "nf4":
        quantized = getattr(base, "quantized", None)
        if isinstance(quantized, NF4Tensor) and len(quantized.shape) == 2:  # minilora.qlora.LinearNF4
            return quantized, base.bias, getattr(base, "compute_dtype", x.dtype)
        return None  # another 4-bit layer: only its dequantize() is known
    weight = base.weight.T if kind == "conv1d" else base.weight  # Conv1D stores (in, out)
    if weight.dtype != x.dtype or weight.requires_grad or weight.dim() != 2:
        return None  # let the readable path handle (or report) mixed dtypes and trainable bases
    return weight, base.bias, x.dtype


def fused_forward(layer: LoRALinear, x: Tensor, path: Path | None = None) -> Tensor | None:
    """A `minilora.lora.LoRALinear`'s forward through the fused functions, or None where they do not apply.

    None for: adapters disabled or merged, no active adapter, dropout active (training with p > 0), a base
    that is neither dense nor a minilora 4-bit layer, a dense base in another dtype than x or trainable, an
    adapter variant other than DoRA.
    Otherwise the result equals layer(x) up to rounding, in x's dtype.
    """
    name = layer.active_adapter
    lora_A = layer.lora_A
    if layer.disable_adapters or layer.merged or name not in lora_A:
        return None
    if layer.training and not isinstance(layer.lora_dropout[name], nn.Identity):
        return None
    found = _fused_base(layer.base_layer, x)
    if found is None:
        return None
    if path not in ("merged", "unmerged", None):
        raise ValueError(f"path must be 'merged', 'unmerged' or None (choose_path), got {path!r}")
    weight, bias, compute_dtype = found
    xc = x if x.dtype == compute_dtype else x.to(compute_dtype)
    A, B, s = lora_A[name], layer.lora_B[name], layer.scaling[name]
    out_features, in_features = layer.out_features, layer.in_features
    packed = layer.__dict__.get("_packed_adapters")
    copies = None
    if packed is not None and not torch.compiler.is_compiling():  # compiled, the casts fuse anyway
        copies = packed.copies(A, B, compute_dtype)
    variant = layer.lora_variant.get(name)
    if variant is None:
        y = _lora(xc, weight, bias, A, B, s, path, out_features, in_features, copies)
    elif isinstance(variant, DoraVariant):
        y = _dora(xc, weight, bias, A, B, layer.lora_magnitude_vector[name], s, out_features, in_features,
                  copies)
    else:
        return None  # a variant with no fused form here: the layer's own forward
    return y if y.dtype == x.dtype else y.to(x.dtype)


# ---------------------------------------------------------------------------------------------------------
# Packed adapters: one cast for the whole model
#
# A forward in bf16 needs A and B in bf16: two casts per adapted layer, two launches each step that do
# almost no work (r·(in + out) values) but cost the host as much as a GEMM's launch; 154 layers of a 1B
# Llama make 308. Packing keeps the float32 masters — what the optimizer updates — as views of one flat
# buffer, and their compute-dtype copies as views of another: after an optimizer step, the first layer to
# run finds its factors changed (their version counters moved) and refreshes every copy with one copy_.


class PackedAdapters:
    """The float32 masters of a model's adapter factors in one buffer, their compute-dtype copy in another.

    params: the factors (each 2-D, float32, on one device); each `p.data` becomes a view into `master`, so the
    Parameter objects (and any optimizer holding them) are unchanged. `copies(A, B, dtype)` returns A and B in
    `dtype`, fresh: one copy_ of the whole buffer whenever any factor changed in place since the last one.
    A factor whose storage was replaced since packing (`model.to(...)`, loading with assign=True) is no longer
    packed: `copies` returns None for it and the layer casts as it would unpacked.
    """

    def __init__(self, params: list[nn.Parameter], dtype: torch.dtype) -> None:
        devices = {p.device for p in params}
        if len(devices) != 1 or any(p.dtype != torch.float32 for p in params):
            raise ValueError("pack_adapters needs float32 factors on one device; got "
                             f"{sorted({str(p.dtype) for p in params})} on {sorted(map(str, devices))}")
        (device,) = devices
        total = sum(p.numel() for p in params)
        self.dtype = dtype
        self.master = torch.empty(total, dtype=torch.float32, device=device)
        self.copy = torch.empty(total, dtype=dtype, device=device)
        self.slots: dict[int, tuple[nn.Parameter, Tensor, int]] = {}  # id(p) -> (p, its copy, data_ptr)
        offset = 0
        with torch.no_grad():
            for p in params:
                n = p.numel()
                self.master[offset:offset + n].copy_(p.reshape(-1))
                p.data = self.master[offset:offset + n].view_as(p)
                self.slots[id(p)] = (p, self.copy[offset:offset + n].view_as(p), p.data_ptr())
                offset += n
        self.seen: dict[int, int] = {}
        self.refresh()

    def refresh(self) -> None:
        """Copy every master into the compute dtype (one launch) and note the versions it saw."""
        with torch.no_grad():
            self.copy.copy_(self.master)
        self.seen = {key: p._version for key, (p, _, _) in self.slots.items()}

    def copies(self, A: Tensor, B: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
        """(A, B) in `dtype` from the packed copy, or None where they are not packed (or not in `dtype`)."""
        slot_a, slot_b = self.slots.get(id(A)), self.slots.get(id(B))
        if dtype != self.dtype or slot_a is None or slot_b is None \
                or A.data_ptr() != slot_a[2] or B.data_ptr() != slot_b[2]:
            return None
        if A._version != self.seen[id(A)] or B._version != self.seen[id(B)]:
            self.refresh()
        return slot_a[1], slot_b[1]


def pack_adapters(model: nn.Module, dtype: torch.dtype | None = None) -> PackedAdapters | None:
    """Pack the float32 A and B of every LoRA layer in `model` (see PackedAdapters); returns the pack.

    dtype: the compute dtype of the copies (default: the dtype of the first adapted layer's base weight, or
    its compute_dtype for a 4-bit base). Call it after the adapters exist (inject, load_adapter) and before
    training; under torch.compile it is not needed (the compiler fuses the casts) and is ignored.
    Returns None when there is nothing to pack (no float32 adapter factors).
    """
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    params = [p for layer in layers for d in (layer.lora_A, layer.lora_B) for p in d.values()
              if p.dtype == torch.float32]
    if not params:
        return None
    if dtype is None:
        base = layers[0].base_layer
        dtype = getattr(base, "compute_dtype", None) or base.weight.dtype
    pack = PackedAdapters(params, dtype)
    for layer in layers:
        layer.__dict__["_packed_adapters"] = pack  # a plain attribute: not a submodule, not in state_dict
    return pack


def compile_layers(model: nn.Module, **compile_kwargs) -> int:
    """Compile each repeated layer of `model` whole, in place; returns how many layers were compiled.

    The repeated layers are the longest `nn.ModuleList` whose entries share one class (a transformer's decoder
    layers). Why layers and not the whole model: the layers share their code, so dynamo traces one graph and
    every layer reuses it (parameters are graph inputs): compiling takes seconds at any depth, where a whole
    8B model takes minutes. Why whole layers and not their parts: each compiled call costs host time (guards,
    AOT autograd's wrapper), so one call per layer issues a step faster than one per attention, MLP and norm,
    and inductor fuses across them (the residual adds into the norms).

    A layer under transformers' gradient checkpointing (non-reentrant; the reentrant kind is refused with a
    ValueError, changing nothing) is compiled *with* its checkpoint: the compiled call runs the layer's
    checkpoint function, which dynamo traces as a region whose activations backward recomputes. Backward then
    recomputes inside its own compiled graph, only what it needs: not the layer's last projection (its output
    feeds the next layer, not this layer's gradients; about a quarter of a Llama layer's weights) nor the residual
    add after it, and each 4-bit base is rebuilt once for both the recompute and the gradient. Two compiled
    calls per layer and step (forward, backward) where an eager checkpoint around a compiled layer makes three.
    `offload_checkpoints` works before or after this. No CUDA graphs here (they need whole, static steps:
    `compile_model(model, mode="reduce-overhead")`). The recompile limit is raised to twice the depth, so that
    a guard on a layer's own attribute cannot send deeper layers back to eager. Calling it again changes nothing.

    Before each call dynamo checks that the layer it is given looks like the one it compiled: the layer's whole
    module tree, a few hundred guards, for each layer object anew. Once the first steps have compiled, train
    inside `torch.compiler.set_stance(skip_guard_eval_unsafe=True)` to skip them (safe while shapes, modules
    and train/eval mode stay as they are); without that, at the 8B shape, the guards cost more host time than
    the fewer calls save (bench/NOTES.md, calls L and M).
    """
    import torch._dynamo

    layers = repeated_layers(model)
    checkpointed = set(_checkpointed(model))
    # offload_checkpoints' wrapper holds the checkpoint as .inner; one compiled before is not checked again
    funcs = [layer._gradient_checkpointing_func for layer in layers if layer in checkpointed]
    inner = [getattr(f, "inner", f) for f in funcs]
    _check_non_reentrant([f for f in inner if not hasattr(f, "compiled")], "compile_layers")
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 2 * len(layers))
    if inner:
        _trace_checkpoints()
    call = torch.compile(_call, **compile_kwargs)
    for layer in layers:
        if layer in checkpointed:
            func = layer._gradient_checkpointing_func
            checkpoint = getattr(func, "inner", func)
            if not hasattr(checkpoint, "compiled"):
                compiled = _compiled_checkpoint(_rebuilding_weights(checkpoint), call)
                # offload's saved-tensor hooks stay outside the compiled call (dynamo does not trace them)
                offload = getattr(func, "offload", None)
                layer._gradient_checkpointing_func = compiled if offload is None else _offloaded(compiled, offload)
        elif not isinstance(layer.forward, partial):  # a partial forward: compiled before
            layer.forward = partial(call, layer.forward)
    return len(layers)


def _call(function: Callable, *args, **kwargs):
    """What `compile_layers` compiles: a call of a layer's forward, or of its checkpoint function with the
    forward (keyword arguments bound) as the function it checkpoints, given as an argument, so that dynamo
    traces one graph for all the layers rather than specializing on each layer module it is attached to."""
    return function(*args, **kwargs)


def _compiled_checkpoint(checkpoint: Callable, call: Callable) -> Callable:
    """A checkpoint function that runs `checkpoint(function, ...)` itself compiled, through `call`."""
    def compiled_checkpoint(function, *args, **kwargs):
        return call(checkpoint, function, *args, **kwargs)

    compiled_checkpoint.compiled = True  # compile_model refuses a model whose layers are compiled already
    return compiled_checkpoint


def _rebuild_weights_policy(ctx, op, *args, **kwargs):
    """Selective-checkpoint policy: a weight built from a frozen base (its dequantized NF4 codes, or W0 + s·B A),
    and a product with one built inside its operator, is recomputed in backward, never saved; everything else
    as a plain checkpoint decides. Without it, torch 2.11's partitioner keeps the output of these operators
    (opaque to it) for backward: every layer's built weights alive at once, 13 GiB at the 8B shape
    (bench/NOTES.md, call P)."""
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_RECOMPUTE if op in _WEIGHT_BUILDS else CheckpointPolicy.PREFER_RECOMPUTE


_WEIGHT_BUILDS = (torch.ops.minilora.nf4_dequantize.default, torch.ops.minilora.nf4_lora_weight.default,
                  torch.ops.minilora.dense_lora_weight.default, torch.ops.minilora.nf4_lora_matmul.default,
                  torch.ops.minilora.dense_lora_matmul.default)


def _rebuilding_weights(checkpoint: Callable) -> Callable:
    """`checkpoint` with `_rebuild_weights_policy` as its selective-checkpoint context, unless its caller set
    a context of their own (`context_fn` in its keywords), which is left as it is."""
    if "context_fn" in getattr(checkpoint, "keywords", {}):
        return checkpoint
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return partial(checkpoint, context_fn=partial(create_selective_checkpoint_contexts, _rebuild_weights_policy))


def _check_non_reentrant(funcs: list[Callable], who: str) -> None:
    """ValueError unless every checkpoint function in `funcs` is torch's non-reentrant checkpoint (dynamo traces
    that one as a region; the reentrant kind runs a Python autograd.Function that it cannot)."""
    if any(getattr(f, "keywords", {}).get("use_reentrant", True) is not False for f in funcs):
        raise ValueError(f"{who}: the model uses reentrant gradient checkpointing; enable it with "
                         "{'use_reentrant': False}")


def _trace_checkpoints() -> None:
    """Let dynamo trace a transformers layer's checkpoint as one region. The layers write a context variable
    (for capturing hidden states on request) that a recompute would write again: dynamo is told not to replay
    forward side effects in the recompute (a process-wide setting; in a transformers model that write is all
    it skips). Older torch has no such setting, and breaks the graph there."""
    import torch._dynamo

    if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True


def repeated_layers(model: nn.Module) -> nn.ModuleList:
    """The longest `nn.ModuleList` of `model` whose entries share one class (a transformer's decoder layers):
    the layers `compile_layers` compiles. ValueError if there is none."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1
             and len({type(layer) for layer in m}) == 1]
    if not lists:
        raise ValueError("compile_layers: the model has no nn.ModuleList of repeated layers")
    return max(lists, key=len)


def _checkpointed(model: nn.Module) -> list[nn.Module]:
    """The modules of `model` that transformers' gradient checkpointing has on, each holding the checkpoint
    function it calls as `_gradient_checkpointing_func` (empty: none is)."""
    return [m for m in model.modules()
            if getattr(m, "gradient_checkpointing", False) and getattr(m, "_gradient_checkpointing_func", None)]


def compile_model(model: nn.Module, **compile_kwargs) -> nn.Module:
    """`torch.compile(model, **compile_kwargs)` that stays one graph under transformers' gradient checkpointing.

    Dynamo traces a non-reentrant `torch.utils.checkpoint` call as one region whose activations the backward
    recomputes; two things in a transformers model break it at every layer, and this removes both:
    * the layers write a context variable (for capturing hidden states on request) that a recompute would
      write again: dynamo is told not to replay forward side effects in the recompute (its process-wide
      `skip_fwd_side_effects_in_bwd_under_checkpoint`; in a transformers model that write is all it skips);
    * the hook that marks the embeddings' output as requiring a gradient (`enable_input_require_grads`, which
      transformers adds with checkpointing): it calls `requires_grad_` inside the graph. Non-reentrant
      checkpointing needs no such mark; the reentrant kind does, so it is refused (ValueError).
    Each checkpoint recomputes the weights it builds from 4-bit or frozen bases (`_rebuild_weights_policy`).
    With `mode="reduce-overhead"` the whole step, forward and backward, then replays as CUDA graphs. Returns the
    compiled model; without checkpointing this is `torch.compile` itself. Offloaded checkpoints
    (`offload_checkpoints`) are refused: dynamo does not trace saved-tensor hooks.
    """
    funcs = [m._gradient_checkpointing_func for m in _checkpointed(model)]
    if any(hasattr(f, "compiled") for f in funcs):
        raise ValueError("compile_model: compile_layers has compiled this model's layers already")
    if any(hasattr(f, "offload") for f in funcs):
        raise ValueError("compile_model: offload_checkpoints' saved-tensor hooks would break the graph at every "
                         "layer; offload with compile_layers, or compile the model without offloading")
    _check_non_reentrant(funcs, "compile_model")
    if funcs:
        _trace_checkpoints()
        for module in _checkpointed(model):  # recompute the built weights (`_rebuild_weights_policy`)
            module._gradient_checkpointing_func = _rebuilding_weights(module._gradient_checkpointing_func)
        # every copy of the hook: enabling it twice (as transformers' checkpointing and a caller may) registers
        # it twice, and transformers' own disable_input_require_grads forgets all but the last
        for module in model.modules():
            for key, hook in list(module._forward_hooks.items()):
                if getattr(hook, "__name__", "") == "make_inputs_require_grads":
                    del module._forward_hooks[key]
    return torch.compile(model, **compile_kwargs)


# ---------------------------------------------------------------------------------------------------------
# Checkpointed layer inputs in host memory
#
# Under gradient checkpointing a decoder layer keeps one tensor for backward: its input, (batch, seq, hidden)
# in the compute dtype, 32 MiB per layer for an 8B Llama at 4 x 1024 tokens, 1 GiB over 32 layers. It is next
# needed when backward reaches that layer again, hundreds of milliseconds later, so it can wait in pinned host
# memory. The copies run on a stream of their own: the copy out overlaps the layers that follow, and when
# backward fetches a layer's input it starts fetching the one before it, which arrives while this layer is
# recomputed and differentiated. transformers' own `offload=True` copies synchronously on the compute stream,
# which stops the host at every layer until the GPU has caught up.


class _HostCopy:
    """One offloaded tensor: its host copy (None while it stays on its device), and its device copy while it
    stays or once fetched (with the event that says a fetch is done)."""

    __slots__ = ("host", "device", "gpu", "ready", "__weakref__")

    def __init__(self, host: Tensor | None, device: torch.device):
        self.host, self.device = host, device
        self.gpu: Tensor | None = None
        self.ready: torch.cuda.Event | None = None


class HostOffload:
    """Saved-tensor hooks that keep large saved activations in host memory (see the comment above).

    `pack` takes an activation (a tensor that requires grad, not a parameter) of at least `min_bytes` and
    returns a handle; when the next one comes it copies this one to pinned host memory, on a side stream for
    a CUDA tensor (the newest stays on its device: backward needs it first). `unpack` returns it on its
    device, fetched ahead of time when the handle packed after it was unpacked first (backward runs the layers
    in reverse). Other tensors pass through. Off a GPU the copies are plain clones: nothing is saved, but the
    bookkeeping runs (and is tested) on a CPU.
    """

    def __init__(self, min_bytes: int = 1 << 20):
        self.min_bytes = min_bytes
        self.order: list[weakref.ref] = []  # the live handles, in the order they were packed
        self.stream: torch.cuda.Stream | None = None

    def _side(self, device: torch.device) -> torch.cuda.Stream:
        if self.stream is None or self.stream.device != device:
            self.stream = torch.cuda.Stream(device)
        return self.stream

    def pack(self, t: Tensor) -> Tensor | _HostCopy:
        # only activations, which carry a gradient: a compiled layer (`compile_layers`) also saves its weights,
        # quantized bases and rotary tables, which are kept anyway or small
        if not t.requires_grad or isinstance(t, nn.Parameter) or t.numel() * t.element_size() < self.min_bytes:
            return t
        # the newest stays where it is until another comes: the last layer's input is the first that backward
        # needs, so it is never copied out and back (the GPU would wait for that copy at backward's start)
        handle = _HostCopy(None, t.device)
        handle.gpu = t.detach()
        live = [ref for ref in self.order if ref() is not None]
        if live and live[-1]().host is None:
            self._copy_out(live[-1]())
        self.order = live + [weakref.ref(handle)]
        return handle

    def _copy_out(self, handle: _HostCopy) -> None:
        """Move the handle's tensor to (pinned) host memory: on the side stream, beside the compute."""
        t, handle.gpu = handle.gpu, None
        if t.device.type != "cuda":
            handle.host = t.clone()
            return
        side, here = self._side(t.device), torch.cuda.current_stream(t.device)
        handle.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        side.wait_stream(here)  # t is written by the work queued so far
        with torch.cuda.stream(side):
            handle.host.copy_(t, non_blocking=True)
        t.record_stream(side)  # the allocator may not hand t's memory out again before the copy ends

    def _fetch(self, handle: _HostCopy) -> None:
        if handle.device.type != "cuda":
            handle.gpu = handle.host.clone()
            return
        side, here = self._side(handle.device), torch.cuda.current_stream(handle.device)
        # allocated on the compute stream, where it is used and freed; the side stream first waits for the
        # work queued so far, which may still read memory this block last held
        handle.gpu = torch.empty(handle.host.shape, dtype=handle.host.dtype, device=handle.device)
        side.wait_stream(here)
        with torch.cuda.stream(side):
            handle.gpu.copy_(handle.host, non_blocking=True)
            handle.ready = torch.cuda.Event()
            handle.ready.record(side)

    def unpack(self, handle: object) -> Tensor:
        if not isinstance(handle, _HostCopy):
            return handle
        if handle.gpu is None:
            self._fetch(handle)
        live = [h for h in (ref() for ref in self.order) if h is not None]
        at = next((i for i, h in enumerate(live) if h is handle), None)
        if at:  # fetch the one packed just before: backward needs it next
            earlier = live[at - 1]
            if earlier.gpu is None:
                self._fetch(earlier)
        if handle.ready is not None:
            torch.cuda.current_stream(handle.device).wait_event(handle.ready)
        return handle.gpu

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def offload_checkpoints(model: nn.Module, min_bytes: int = 1 << 20) -> HostOffload:
    """Keep the input of every gradient-checkpointed layer of `model` in pinned host memory until backward.

    For a transformers model with gradient checkpointing on (`model.activation_checkpointing_enable(...)`;
    before transformers 5.25 `gradient_checkpointing_enable`): each layer's checkpoint function then runs
    inside `HostOffload`'s saved-tensor hooks, which see what the checkpoint keeps for backward, the layer's
    input, (batch, seq, hidden) in the compute dtype (what the layer saves inside is recomputed, not kept).
    GPU memory falls by one such tensor per layer but the last (which backward needs first); the copies run
    beside the layers' compute. Tensors under `min_bytes`, and those that need no gradient, stay on the GPU
    (the first layer's input needs one only if the embeddings' output is marked, as transformers'
    checkpointing does). Works beside `compile_layers`.
    Returns the hooks' owner; raises ValueError, changing nothing, if no module of `model` is checkpointed.
    """
    modules = _checkpointed(model)
    if not modules:
        raise ValueError("offload_checkpoints: no module of the model is gradient-checkpointed; call "
                         "model.activation_checkpointing_enable({'use_reentrant': False}) first "
                         "(transformers < 5.25: gradient_checkpointing_enable)")
    offload = HostOffload(min_bytes)
    for module in modules:
        inner = module._gradient_checkpointing_func
        module._gradient_checkpointing_func = _offloaded(getattr(inner, "inner", inner), offload)  # wrap once
    return offload


def _offloaded(checkpoint: Callable, offload: HostOffload) -> Callable:
    """A checkpoint function that runs `checkpoint` inside `offload`'s saved-tensor hooks."""
    def checkpointed(function, *args, **kwargs):
        with offload.hooks():
            return checkpoint(function, *args, **kwargs)

    checkpointed.offload, checkpointed.inner = offload, checkpoint
    return checkpointed


# ---------------------------------------------------------------------------------------------------------
# The loss without its logits
#
# A Llama-3 head turns 4096 tokens into 4096 x 128,256 logits: 1 GiB in bf16, and the loss wants them in float32
# too. Taken a chunk of tokens at a time, each chunk's logits, loss and gradient are formed and dropped before
# the next: one chunk's logits are alive at a time. With the head frozen (LoRA), the gradient of the hidden
# states is complete once forward has seen every chunk, so forward computes it and backward only scales it.
# Liger's fused linear cross-entropy does the same, but its forward asks the GPU for the number of labelled
# tokens (`.item()`) and its backward asks whether the incoming gradient is 1 (`torch.equal`): twice a step the
# host stops until the GPU has caught up, and then the GPU idles while the host issues what comes next. Here
# the count stays on the GPU (each token's share of the mean is a tensor) and backward multiplies by the
# gradient whatever it is: nothing waits.

IGNORE_INDEX = -100  # the label transformers' losses skip
CE_CHUNK = 512  # tokens per chunk: (512, 128256) bf16 logits are 125 MiB


def _chunk_cross_entropy(logits: Tensor, targets: Tensor, share: Tensor) -> tuple[Tensor, Tensor]:
    """One chunk: (Σ_i share_i · (lse_i − z_i,t_i), dL/dlogits = share_i · (softmax(z_i) − onehot(t_i))).

    logits (c, V) in the compute dtype, computed in float32 (as transformers upcasts before its loss); targets
    (c,), IGNORE_INDEX where unlabelled; share (c,) float32, 1/n for a labelled token, 0 for the others. The
    gradient comes back in the logits' dtype. Compiled on a GPU (`_chunk_loss`), where it is one reduction and
    one elementwise pass over the chunk."""
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1)
    t = targets.clamp_min(0)
    picked = z.gather(1, t.unsqueeze(1)).squeeze(1)
    loss = ((lse - picked) * share).sum()
    hot = torch.arange(z.shape[1], device=z.device).unsqueeze(0) == t.unsqueeze(1)
    grad = (torch.exp(z - lse.unsqueeze(1)) - hot.float()) * share.unsqueeze(1)
    return loss, grad.to(logits.dtype)


@cache
def _compiled_chunk() -> Callable:
    return torch.compile(_chunk_cross_entropy, fullgraph=True, dynamic=False)


def _chunk_loss(logits: Tensor) -> Callable:
    """`_chunk_cross_entropy`, compiled once for CUDA inputs (eager elsewhere: the CPU is for checking)."""
    return _compiled_chunk() if logits.device.type == "cuda" else _chunk_cross_entropy


class _LinearCrossEntropy(torch.autograd.Function):
    """L = Σ_i share_i · CE(h_i Wᵀ, t_i) for hidden states h (N, H), head W (V, H), chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, share: Tensor, chunk: int) -> Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        loss = hidden.new_zeros((), dtype=torch.float32)
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s:s + chunk]
            part, g = _chunk_loss(h)(F.linear(h, weight), targets[s:s + chunk], share[s:s + chunk])
            loss += part
            if need_h:
                torch.mm(g, weight, out=grad_h[s:s + chunk])
            if need_w:  # a trained head (full fine-tuning): its gradient summed over chunks in float32
                grad_w.add_(torch.mm(g.t(), h))
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        # multiplied whatever grad is (1 under a plain loss.backward()): testing it would make the host wait
        return (grad_h * grad.to(grad_h.dtype) if grad_h is not None else None,
                (grad_w * grad).to(ctx.weight_dtype) if grad_w is not None else None, None, None, None)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, num_items: Tensor | int | None = None,
                         chunk: int = CE_CHUNK) -> Tensor:
    """Mean cross-entropy of the logits hidden Wᵀ against targets, never holding more than `chunk` rows of them.

    hidden (N, H), weight (V, H) (a head without bias), targets (N,) with IGNORE_INDEX for unlabelled tokens.
    The mean is over labelled tokens, or a sum divided by `num_items` (transformers' `num_items_in_batch`, for
    gradient accumulation). Equals `F.cross_entropy(F.linear(hidden, weight).float(), targets)` up to the order
    of float32 sums; the gradients reach hidden (and weight, if it trains) in their dtype.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be (N, H) and weight (V, H); got {tuple(hidden.shape)}, {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be ({hidden.shape[0]},), got {tuple(targets.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    labelled = targets != IGNORE_INDEX
    count = labelled.sum().clamp_min(1) if num_items is None else num_items
    share = labelled.float() / count  # a tensor: the count is never read back to the host
    return _LinearCrossEntropy.apply(hidden, weight, targets, share, chunk)


def fuse_loss(model: nn.Module, chunk: int = CE_CHUNK) -> nn.Module:
    """Make a transformers causal language model compute its training loss with `linear_cross_entropy`.

    Called with `labels`, the model runs its decoder, shifts the labels one token left as transformers does,
    and returns the loss with `logits=None` (no (tokens, vocab) tensor is ever whole); called without labels,
    it runs as before. For a model whose head is a plain Linear (no bias, no logit scaling or soft-capping);
    anything else is refused with a ValueError, changing nothing. Calling it again changes nothing. Returns
    the model.
    """
    if getattr(model.forward, "fused_loss", False):
        return model
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    if decoder is None or not isinstance(head, nn.Linear):
        raise ValueError("fuse_loss: needs a transformers causal LM with a decoder and a Linear head")
    if head.bias is not None:
        raise ValueError("fuse_loss: the head has a bias; linear_cross_entropy computes h Wᵀ only")
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(config, name, None) not in (None, 1, 1.0):
            raise ValueError(f"fuse_loss: the model's config sets {name}, which linear_cross_entropy does not apply")
    original = model.forward

    def forward(*args, labels: Tensor | None = None, **kwargs):
        if labels is None:
            return original(*args, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        num_items = kwargs.pop("num_items_in_batch", None)
        kwargs.pop("logits_to_keep", None)
        out = decoder(*args, **kwargs)
        hidden = out[0]
        targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].to(hidden.device)  # token i predicts i + 1
        loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight, targets.reshape(-1),
                                    num_items, chunk)
        rest = {k: v for k, v in out.items() if k != "last_hidden_state"}  # the cache, hidden states, attentions
        return CausalLMOutputWithPast(loss=loss, logits=None, **rest)

    forward.fused_loss = True
    model.forward = forward
    return model


# ---------------------------------------------------------------------------------------------------------
# Paged AdamW's update in one kernel
#
# `minilora.paged._update_staged` updates a chunk with chapter 7's readable PyTorch: in 8 bits that is
# dequantize m and v (a gather and a product each), AdamW (about ten elementwise passes, each reading and
# writing the whole chunk in float32), and quantize m and v again (a max, a scale and a table lookup each),
# some thirty launches and ~60 bytes of traffic per element. The kernel below does the same per block of
# 256 elements in registers: it reads the param, the gradient, two code bytes and the block's two absmax
# values, and writes the param, two code bytes and two absmax values: 2·(param bytes) + grad bytes + 4
# bytes per element. With fp32 state it reads and writes m and v (16 bytes) instead of the codes.
#
# The arithmetic is that of the readable update as torch computes it on a CPU, operation for operation:
# lerp and addcmul as one fused multiply-add each (ATen's CPU kernels use fmadd), every other product, sum,
# quotient and square root correctly rounded on its own (fp fusion is off, division and square root are the
# IEEE ones), bias corrections computed by the host in double precision and rounded to float32 as torch
# rounds a Python scalar. Under Triton's interpreter m, v, their codes and absmax then equal chapter 7's bit
# for bit (tests/test_paged_kernel.py); the parameter agrees to its last bit or two, because torch's CPU
# square root is sometimes one unit below the correctly rounded one. torch's CUDA kernels divide by a
# scalar as a product with its reciprocal, and nvcc may contract addcdiv's product and sum into a
# multiply-add, so on a GPU too the parameter can differ in its last bit or two (bench/paged_kernel_check.py).

# Blocks of 256 per program and warps per program (bench/paged_kernel_check.py times the alternatives).
ADAMW_CONFIG = {"blocks_per_program": 4, "num_warps": 4}
# Master switch: False sends PagedAdamW back to chapter 7's PyTorch update (the benchmark's unfused rows).
USE_TRITON_ADAMW = True
_STATE_BLOCK = 256  # minilora.paged.STATE_BLOCK, the block of one absmax (checked where the state comes in)

if kernels.HAVE_TRITON:
    import triton
    import triton.language as tl

    from minilora.kernels.nf4 import round_to

    @triton.jit
    def _dequantize_state(codes_ptr, absmax_ptr, map_ptr, idx, block, ok, block_ok):
        """x̂ = map[code] · absmax[block]: (ROWS, 256) float32 from codes and one absmax per row."""
        codes = tl.load(codes_ptr + idx, mask=ok, other=0).to(tl.int32)
        absmax = tl.load(absmax_ptr + block, mask=block_ok, other=0.0)
        return tl.load(map_ptr + codes) * absmax[:, None]

    @triton.jit
    def _quantize_state(x, codes_ptr, absmax_ptr, lut_ptr, idx, block, ok, block_ok):
        """`minilora.paged.quantize_state_` for ROWS blocks: absmax = max |x| per row; code = the map entry of
        the nearest of 65,536 grid points to x / absmax (bitsandbytes' CPU rule, via its lookup table)."""
        x = tl.where(ok, x, 0.0)  # the padding of a ragged last block, as torch pads it
        absmax = tl.max(tl.abs(x), axis=1)  # (ROWS,)
        tl.store(absmax_ptr + block, absmax, mask=block_ok)
        safe = tl.maximum(absmax, 1.1754943508222875e-38)  # torch.finfo(float32).tiny: never divide by 0
        inverse = tl.math.div_rn(tl.full(safe.shape, 1.0, tl.float32), safe)
        t = tl.minimum(tl.maximum(x * inverse[:, None], -1.0), 1.0)
        point = ((t + 1.0) * 0.5 * 65535.0 + 0.5).to(tl.int32)  # every step rounded (no fused multiply-add)
        point = tl.minimum(tl.maximum(point, 0), 65535)  # a NaN must not read outside the table
        tl.store(codes_ptr + idx, tl.load(lut_ptr + point), mask=ok)

    @triton.jit
    def _adamw_kernel(
        w_ptr, g_ptr, m_ptr, v_ptr, m_absmax_ptr, v_absmax_ptr, m_map_ptr, v_map_ptr, m_lut_ptr, v_lut_ptr,
        n, decay, beta1_weight, beta2, one_minus_beta2, neg_step_size, bias_correction2_sqrt, eps,
        EIGHT_BIT: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, INTERPRETED: tl.constexpr,
    ):
        """AdamW on ROWS blocks of BLOCK elements: w, g (n,); m, v (n,) uint8 codes + (⌈n/BLOCK⌉,) absmax, or fp32."""
        pid = tl.program_id(0).to(tl.int64)
        block = pid * ROWS + tl.arange(0, ROWS)  # (ROWS,)
        idx = block[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]  # (ROWS, BLOCK)
        ok = idx < n
        block_ok = block * BLOCK < n
        w = tl.load(w_ptr + idx, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + idx, mask=ok, other=0.0).to(tl.float32)
        if EIGHT_BIT:
            m = _dequantize_state(m_ptr, m_absmax_ptr, m_map_ptr, idx, block, ok, block_ok)
            v = _dequantize_state(v_ptr, v_absmax_ptr, v_map_ptr, idx, block, ok, block_ok)
        else:
            m = tl.load(m_ptr + idx, mask=ok, other=0.0)
            v = tl.load(v_ptr + idx, mask=ok, other=0.0)
        w = w * decay  # θ(1 − lr·λ)
        # m ← lerp(m, g, 1 − β1) as ATen computes it: fma(c, g − m, base), c = weight or weight − 1
        small = beta1_weight < 0.5
        coeff = tl.where(small, beta1_weight, beta1_weight - 1.0)
        m = tl.math.fma(tl.full(m.shape, 0.0, tl.float32) + coeff, g - m, tl.where(small, m, g))
        v = tl.math.fma(one_minus_beta2 * g, g, v * beta2)  # β2·v + (1 − β2)·g·g: addcmul's fmadd
        denom = tl.math.div_rn(tl.sqrt_rn(v), tl.full(v.shape, 0.0, tl.float32) + bias_correction2_sqrt) + eps
        w = w + tl.math.div_rn(neg_step_size * m, denom)  # addcdiv: θ + (−lr/(1 − β1ᵗ))·m / denom
        tl.store(w_ptr + idx, round_to(w, w_ptr.dtype.element_ty, INTERPRETED), mask=ok)
        if EIGHT_BIT:
            _quantize_state(m, m_ptr, m_absmax_ptr, m_lut_ptr, idx, block, ok, block_ok)
            _quantize_state(v, v_ptr, v_absmax_ptr, v_lut_ptr, idx, block, ok, block_ok)
        else:
            tl.store(m_ptr + idx, m, mask=ok)
            tl.store(v_ptr + idx, v, mask=ok)


def adamw_update_triton(w: Tensor, g: Tensor, staged: dict[str, Tensor], step: float, hyper: dict[str, float],
                        tables: tuple | None = None, *, config: dict | None = None) -> None:
    """`minilora.paged._update_staged` in one launch: AdamW on a flat chunk w, g (n,) with its state `staged`.

    staged: {"exp_avg", "exp_avg_sq"} fp32 (n,), or uint8 codes (n,) plus {"exp_avg_absmax",
    "exp_avg_sq_absmax"} fp32 (⌈n/256⌉,) on the dynamic maps of `tables` = (signed, unsigned)
    `minilora.double_quant.MapTables` on w's device. w: fp32, bf16 or fp16, updated in place (a 16-bit
    weight through float32, rounded once); g: fp32, bf16 or fp16. hyper: lr, beta1, beta2, eps,
    weight_decay. Everything is updated in place; nothing is read back to the host.
    """
    eight = "exp_avg_absmax" in staged
    m, v = staged["exp_avg"], staged["exp_avg_sq"]
    n = w.numel()
    for name, t in (("w", w), ("g", g), ("exp_avg", m), ("exp_avg_sq", v)):
        if t.dim() != 1 or t.numel() != n or not t.is_contiguous() or t.device != w.device:
            raise ValueError(f"{name} must be a contiguous (n,) tensor on {w.device} like w, got "
                             f"{tuple(t.shape)} on {t.device}")
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16) or g.dtype not in (
            torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"w and g must be float32, bfloat16 or float16, got {w.dtype} and {g.dtype}")
    if m.dtype != v.dtype or m.dtype != (torch.uint8 if eight else torch.float32):
        raise TypeError(f"exp_avg and exp_avg_sq must both be {'uint8 codes' if eight else 'float32'}, got "
                        f"{m.dtype} and {v.dtype}")
    if eight:
        blocks = -(-n // _STATE_BLOCK)
        m_absmax, v_absmax = staged["exp_avg_absmax"], staged["exp_avg_sq_absmax"]
        if any(t.numel() != blocks or t.dtype != torch.float32 or t.device != w.device for t in (m_absmax, v_absmax)):
            raise ValueError(f"{n} elements need {blocks} float32 absmax values per moment on {w.device}")
        if tables is None or any(t.code.device != w.device for t in tables):
            raise ValueError(f"8-bit state needs the (signed, unsigned) map tables on {w.device}")
        (signed, unsigned) = tables
        maps = (signed.code, unsigned.code, signed.entry_of_point, unsigned.entry_of_point)
    else:
        m_absmax = v_absmax = m
        maps = (m, m, m, m)  # not read
    require_triton(w.device)
    if n == 0:
        return
    cfg = {**ADAMW_CONFIG, **(config or {})}
    rows = cfg["blocks_per_program"]
    lr, beta1, beta2 = hyper["lr"], hyper["beta1"], hyper["beta2"]
    launch(
        _adamw_kernel, (-(-n // (rows * _STATE_BLOCK)),), w, g, m, v, m_absmax, v_absmax, *maps, n,
        1 - lr * hyper["weight_decay"], 1 - beta1, beta2, 1 - beta2, -(lr / (1 - beta1**step)),
        (1 - beta2**step) ** 0.5, hyper["eps"],
        EIGHT_BIT=eight, ROWS=rows, BLOCK=_STATE_BLOCK, INTERPRETED=interpreted(),
        num_warps=cfg["num_warps"], enable_fp_fusion=False,
    )


def paged_adamw_update(w: Tensor, g: Tensor, staged: dict[str, Tensor], step: float, hyper: dict[str, float],
                       tables: tuple) -> bool:
    """What `minilora.paged` calls first for every chunk (`paged.set_fused_update`): the one-launch update
    where Triton runs (CUDA, or any device under the interpreter) and USE_TRITON_ADAMW is on. Returns
    whether it updated the chunk; False leaves it to chapter 7's PyTorch update."""
    if not (USE_TRITON_ADAMW and kernels.triton_usable(w.device)):
        return False
    adamw_update_triton(w, g, staged, step, hyper, tables)
    return True
