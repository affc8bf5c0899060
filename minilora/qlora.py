"""QLoRA's frozen base: a linear layer whose weight lives in NF4 (Dettmers et al. 2023, arXiv 2305.14314).

`LinearNF4` stores W: (out, in) only as 4-bit codes and block scales (`minilora.nf4`, optionally double
quantized, `minilora.double_quant`). Its forward is

    y = x Ŵᵀ + b,        Ŵ = dequantize(W) in the compute dtype,

and Ŵ exists only inside each call: forward rebuilds it, multiplies and drops it; backward rebuilds it to
form dL/dx = dL/dy Ŵ. Nothing dense is kept between the two: the base costs its 4-bit storage plus one
layer's Ŵ at a time. The base is frozen: no gradient for W is ever formed. LoRA's trainable A and B sit
on top (`minilora.lora.LoRALinear` accepts a LinearNF4 as its base), and that is QLoRA.

`quantize_model` swaps a model's nn.Linear layers (and GPT-2's transformers `Conv1D`, whose weight is stored
(in, out) and is quantized transposed) for LinearNF4. Numerically a LinearNF4 equals
bitsandbytes' `Linear4bit(quant_type="nf4")` holding the same bytes (tests/test_qlora.py).

Quantizing and dequantizing go through `minilora.kernels.quantize` / `kernels.dequantize`: on CUDA the
Triton kernels, elsewhere `minilora.nf4.quantize_nf4` / `dequantize_nf4` themselves, bit for bit the same.
"""

from __future__ import annotations

import warnings
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# chapter 10's dispatchers: Triton on CUDA, minilora.nf4 elsewhere (the one import of a later chapter in the
# package, and why: ARCHITECTURE.md)
from minilora import kernels
from minilora.double_quant import SCALE_BLOCKSIZE, DoubleQuantAbsmax
from minilora.lora import LoRALinear, is_conv1d
from minilora.nf4 import SUPPORTED_DTYPES, NF4Tensor, check_blocksize

__all__ = ["LinearNF4", "quantize_model"]

_QUANT_BUFFERS = ("weight_packed", "weight_absmax", "weight_absmax_codes", "weight_absmax_scales",
                  "weight_absmax_offset")


def _check_dtype(dtype: object, what: str) -> torch.dtype:
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{what} must be torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}")
    return dtype  # type: ignore[return-value]


class _NF4Matmul(torch.autograd.Function):
    """y = x Ŵᵀ + b with Ŵ rebuilt from 4 bits in forward and again in backward; no gradient for W.

    q arrives as the NF4Tensor itself; under torch.compile, which cannot carry a dataclass through `apply`,
    as its static facts followed by its tensors (`kernels.ops.nf4_parts`), saved like any tensor.
    """

    @staticmethod
    def forward(ctx, x: Tensor, bias: Tensor | None, q: object, *parts: Tensor | None) -> Tensor:
        weight = kernels.ops.nf4_from_parts(*parts, q) if parts else q
        # only the 4-bit storage (the module's own buffers) is kept for backward
        ctx.q, ctx.n_parts = q, len(parts)
        ctx.save_for_backward(*parts)
        return F.linear(x, kernels.dequantize(weight, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        weight = kernels.ops.nf4_from_parts(*ctx.saved_tensors, ctx.q) if ctx.n_parts else ctx.q
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.matmul(grad_out, kernels.dequantize(weight, grad_out.dtype))  # (..., out) @ (out, in)
        if ctx.needs_input_grad[1]:  # only if someone unfroze the bias
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return (grad_x, grad_bias, None) + (None,) * ctx.n_parts


class LinearNF4(nn.Module):
    """Frozen 4-bit linear layer: x: (..., in_features) -> (..., out_features), y = x Ŵᵀ + b.

    The input is cast to `compute_dtype`, the output back to the input's dtype (as bitsandbytes'
    Linear4bit does). The packed weight and its scales are buffers (they follow `.to(device)` and appear in
    `state_dict`); `.to(dtype)` leaves them float32/uint8. The bias, if any, is a frozen Parameter.
    Build one from a trained layer with `LinearNF4.from_linear`; the constructor makes a zero weight.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.float32,
        weight_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        check_blocksize(blocksize)
        self.in_features, self.out_features = in_features, out_features
        self.blocksize = blocksize
        self.double_quant = bool(double_quant)
        self.compute_dtype = _check_dtype(compute_dtype, "compute_dtype")
        self.weight_dtype = _check_dtype(weight_dtype, "weight_dtype")  # the dtype W had before quantization

        n = in_features * out_features
        n_blocks = -(-n // blocksize)
        # 0x77 = two zero codes: until a weight is loaded the layer computes with W = 0
        self.register_buffer("weight_packed", torch.full(((n + 1) // 2,), 0x77, dtype=torch.uint8, device=device))
        if self.double_quant:
            n_scales = -(-n_blocks // SCALE_BLOCKSIZE)
            self.register_buffer("weight_absmax_codes", torch.zeros(n_blocks, dtype=torch.uint8, device=device))
            self.register_buffer("weight_absmax_scales", torch.zeros(n_scales, device=device))
            self.register_buffer("weight_absmax_offset", torch.zeros((), device=device))
        else:
            self.register_buffer("weight_absmax", torch.zeros(n_blocks, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> LinearNF4:
        """Quantize `linear.weight` (out, in) to NF4 and copy its bias. compute_dtype None: the weight's dtype.

        `linear`: an nn.Linear, or a transformers Conv1D (y = x W + b with W stored (in, out)), whose weight
        is quantized transposed, as the (out, in) matrix it applies.
        """
        if is_conv1d(linear):
            weight = linear.weight.T  # (out, in): the same map as nn.Linear's
        elif isinstance(linear, nn.Linear):
            weight = linear.weight
            if tuple(weight.shape) != (linear.out_features, linear.in_features):
                raise TypeError(f"{type(linear).__name__}.weight has shape {tuple(weight.shape)}, not (out, in) = "
                                f"{(linear.out_features, linear.in_features)}; is it already quantized?")
        else:
            raise TypeError(f"from_linear expects an nn.Linear or a transformers Conv1D, got {type(linear).__name__}")
        _check_dtype(weight.dtype, "the weight's dtype")
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, bias=linear.bias is not None, blocksize=blocksize,
                    double_quant=double_quant, compute_dtype=compute_dtype or weight.dtype,
                    weight_dtype=weight.dtype, device=weight.device)
        layer.load_quantized(kernels.quantize(weight, blocksize=blocksize, double_quant=double_quant))
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    # --- the 4-bit weight ------------------------------------------------------------------------------

    @property
    def quantized(self) -> NF4Tensor:
        """The weight as an NF4Tensor (this layer's buffers themselves, no copy).

        Built once and kept while the buffers stay the same tensors: building it checks every size, which
        costs host time on each call of a GPU layer. `.to()`, `load_state_dict(assign=True)` or a new buffer
        replaces a tensor, and then it is built again; in-place changes (`load_quantized`) need nothing.
        """
        buffers = tuple(self._buffers.get(name) for name in _QUANT_BUFFERS)
        cached = self.__dict__.get("_quantized")
        if cached is not None and all(a is b for a, b in zip(cached[0], buffers)) \
                and cached[1].dtype == self.weight_dtype:
            return cached[1]
        q = self._build_quantized()
        self.__dict__["_quantized"] = (buffers, q)
        return q

    def _build_quantized(self) -> NF4Tensor:
        if self.double_quant:
            absmax: Tensor | DoubleQuantAbsmax = DoubleQuantAbsmax(
                codes=self.weight_absmax_codes, scales=self.weight_absmax_scales, offset=self.weight_absmax_offset)
        else:
            absmax = self.weight_absmax
        return NF4Tensor(packed=self.weight_packed, absmax=absmax, shape=torch.Size((self.out_features,
                         self.in_features)), dtype=self.weight_dtype, blocksize=self.blocksize)

    @torch.no_grad()
    def load_quantized(self, q: NF4Tensor) -> None:
        """Copy an NF4Tensor of shape (out, in) with this layer's blocksize and double-quant setting."""
        if not isinstance(q, NF4Tensor):
            raise TypeError(f"load_quantized expects an NF4Tensor, got {type(q).__name__}")
        expected = (self.out_features, self.in_features, self.blocksize, self.double_quant)
        if (*q.shape, q.blocksize, q.double_quant) != expected:
            raise ValueError(f"NF4Tensor has shape {tuple(q.shape)}, blocksize {q.blocksize}, double_quant="
                             f"{q.double_quant}; this layer needs {expected[:2]}, {expected[2]}, {expected[3]}")
        self.weight_packed.copy_(q.packed)
        if isinstance(q.absmax, DoubleQuantAbsmax):
            if q.absmax.scale_blocksize != SCALE_BLOCKSIZE:
                raise ValueError(f"double quantization must use groups of {SCALE_BLOCKSIZE} block scales, got "
                                 f"{q.absmax.scale_blocksize}")
            self.weight_absmax_codes.copy_(q.absmax.codes)
            self.weight_absmax_scales.copy_(q.absmax.scales)
            self.weight_absmax_offset.copy_(q.absmax.offset)
        else:
            self.weight_absmax.copy_(q.absmax)
        self.weight_dtype = q.dtype

    @property
    def weight(self) -> Tensor:
        """A stand-in for the dense weight that has its shape (out, in), the compute dtype and the device, and no
        values (it reads as zeros, and writing to it raises): for models that read `proj.weight.dtype` or
        `.device` to decide how to cast their inputs (T5). The weight's values are `dequantize()`."""
        zero = torch.zeros((), dtype=self.compute_dtype, device=self.weight_packed.device)
        return zero.expand(self.out_features, self.in_features)  # no memory; expanded tensors refuse writes

    def dequantize(self) -> Tensor:
        """Ŵ: (out_features, in_features) in compute_dtype, a fresh dense tensor."""
        return kernels.dequantize(self.quantized, self.compute_dtype)

    # --- forward ---------------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        """y = x Ŵᵀ + b computed in compute_dtype. x: (..., in_features) -> (..., out_features), x's dtype."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"LinearNF4 expects inputs of shape (..., {self.in_features}); got {tuple(x.shape)}")
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        q = self.quantized
        if torch.compiler.is_compiling():
            parts, meta = kernels.ops.nf4_parts(q)
            return _NF4Matmul.apply(x.to(self.compute_dtype), bias, meta, *parts).to(x.dtype)
        return _NF4Matmul.apply(x.to(self.compute_dtype), bias, q).to(x.dtype)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        # Module.to(dtype) / .half() cast every floating buffer. The block scales must stay float32 (the codes
        # are only defined relative to them), so they follow the device but keep their dtype.
        before = {name: self._buffers[name] for name in _QUANT_BUFFERS if name in self._buffers}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}, double_quant={self.double_quant}, compute_dtype={self.compute_dtype}")


def _skipped(name: str, skip: Iterable[str]) -> bool:
    # An entry matches whole name components: "lm_head" skips "lm_head" and "model.lm_head", not "lm_head2".
    dotted = f".{name}."
    return any(f".{entry}." in dotted for entry in skip)


def _refuse_merged_adapters(model: nn.Module) -> None:
    merged = [n for n, m in model.named_modules() if isinstance(m, LoRALinear) and m.merged]
    if merged:
        raise ValueError(
            f"layers {merged[:5]}{' ...' if len(merged) > 5 else ''} hold a merged LoRA adapter: their base weight "
            "is W0 + ΔW, and once that is quantized, unmerge() can no longer take ΔW out (it would be counted "
            "twice). Nothing was quantized. Unmerge first (layer.unmerge() for each), or fold the adapter in for "
            "good with minilora.inject.merge_and_unload(model), then quantize."
        )


def _nothing_to_quantize(model: nn.Module, skip: tuple[str, ...], head: nn.Module | None) -> str:
    """Say why quantize_model found no plain nn.Linear: what the model holds instead."""
    counts: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, LinearNF4):
            kind = "LinearNF4 (already 4-bit)"
        elif module is head and isinstance(module, nn.Linear):
            kind = "nn.Linear output head (left alone)"
        elif type(module) is nn.Linear or is_conv1d(module):
            kind = f"{type(module).__name__} named in skip={list(skip)}"
        elif isinstance(module, nn.Linear):
            kind = f"nn.Linear subclasses such as {type(module).__name__} (left alone)"
        else:
            continue
        counts[kind] = counts.get(kind, 0) + 1
    found = "; ".join(f"{n} {kind}" for kind, n in counts.items()) or "no linear layers of any kind"
    return (
        f"quantize_model found nothing to quantize in {type(model).__name__}: it replaces plain nn.Linear layers "
        f"and transformers Conv1D layers only. Found: {found}. The model is unchanged."
    )


def _subclasses_skipped(subclasses: dict[str, list[str]]) -> str:
    found = "; ".join(f"{len(names)} {cls} ({names[:3]}{' ...' if len(names) > 3 else ''})"
                      for cls, names in subclasses.items())
    return (
        f"quantize_model left nn.Linear subclasses unquantized: {found}. A subclass may compute more than x Wᵀ + b "
        "or be read through its .weight by its owner (MultiheadAttention's out_proj), so it is not swapped "
        "blindly. If its forward is the plain linear map (e.g. Falcon's FalconLinear), quantize it by hand: "
        "parent.name = minilora.qlora.LinearNF4.from_linear(parent.name)."
    )


def quantize_model(
    model: nn.Module,
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    skip: Iterable[str] = ("lm_head",),
) -> nn.Module:
    """Replace every plain nn.Linear and transformers Conv1D of `model` by a LinearNF4, in place; returns it.

    A Conv1D (GPT-2's c_attn, c_fc, ...) stores W as (in, out); its LinearNF4 holds Wᵀ, the same map. Left
    alone: the output head (`model.get_output_embeddings()`, tied to the embedding in GPT-2), any module
    whose name contains a component listed in `skip`, and nn.Linear subclasses, with a warning naming them
    (e.g. MultiheadAttention's out_proj, whose weight its owner reads directly). compute_dtype None: each
    layer's weight dtype. All layers are quantized before any is replaced, so an error (say, a NaN weight)
    leaves the model unchanged.

    Refused: a model whose LoRA layers hold a merged adapter (their base weight is W0 + ΔW; once that is
    4-bit, unmerge cannot take ΔW out again). Warned: a model with nothing to quantize (the warning says
    what it holds instead).
    """
    if isinstance(skip, str):
        skip = (skip,)
    skip = tuple(skip)
    if compute_dtype is not None:
        _check_dtype(compute_dtype, "compute_dtype")
    settings = dict(blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype)
    if type(model) is nn.Linear:
        return LinearNF4.from_linear(model, **settings)
    _refuse_merged_adapters(model)

    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    names_of: dict[int, list[str]] = {}  # a module reachable under several names is replaced under all
    modules: dict[int, nn.Module] = {}
    subclasses: dict[str, list[str]] = {}  # nn.Linear subclasses left alone, by class
    for name, module in model.named_modules(remove_duplicate=False):
        if module is head:
            continue
        if type(module) is nn.Linear or is_conv1d(module):
            names_of.setdefault(id(module), []).append(name)
            modules[id(module)] = module
        elif isinstance(module, nn.Linear) and not isinstance(module, LinearNF4):
            subclasses.setdefault(type(module).__name__, []).append(name)
    chosen = {key: names for key, names in names_of.items() if not any(_skipped(n, skip) for n in names)}
    if not chosen:
        warnings.warn(_nothing_to_quantize(model, skip, head), stacklevel=2)
    elif subclasses:
        warnings.warn(_subclasses_skipped(subclasses), stacklevel=2)

    replacements = {}
    for key in chosen:
        try:
            replacements[key] = LinearNF4.from_linear(modules[key], **settings)
        except (ValueError, TypeError) as err:
            raise type(err)(f"cannot quantize {chosen[key][0]!r}: {err}") from err
    for key, new in replacements.items():
        for name in chosen[key]:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, new)
    return model
