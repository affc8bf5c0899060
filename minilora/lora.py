"""The LoRA layer: a frozen linear map plus a trainable low-rank update (Hu et al. 2021, arXiv 2106.09685).

For a frozen base weight W0: (out, in) LoRA learns ΔW = B A with A: (r, in), B: (out, r), r ≪ min(in, out):

    y = W0 x + b + s · B A dropout(x),      s = alpha / r   (rsLoRA: s = alpha / √r)

A starts Kaiming-uniform and B at zero, so the layer starts as the base layer and only B gets a gradient on
the first step. The base can be an `nn.Linear`, a GPT-2 style `transformers` `Conv1D` (weight stored as
(in, out)), or a 4-bit `minilora.qlora.LinearNF4` (recognised by its `dequantize()` method). One layer can
hold several named adapters; one of them is active at a time. Everything follows PEFT's `lora.Linear`
(names, init, scaling, merge rules) so that weights move between the two unchanged.

Later chapters plug into this layer; this file imports none of them:

* a *variant* changes what one adapter computes (PEFT's `LoraVariant`): `LoRALinear(..., use_dora=True)`
  gives the adapter the variant registered as "dora" (chapter 8's `minilora.dora.DoraVariant`), which
  then does that adapter's init, forward, merge and unmerge (`LoRAVariant`, `register_variant`);
* the *fused forward* (chapter 10's `minilora.fast.fused_forward`) computes the same output in fewer
  memory passes; `forward` hands it the layer first where it applies (`set_fused_forward`).

`minilora/__init__.py` installs both, so they are in place whichever module of the package is imported.
"""

from __future__ import annotations

import math
import numbers
import sys
import warnings
from typing import Callable, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LoRALinear",
    "lora_matmul",
    "base_weight",
    "is_conv1d",
    "is_nf4",
    "is_supported_base",
    "LoRAVariant",
    "register_variant",
    "set_fused_forward",
]

InitMode = bool | Literal["gaussian", "pissa", "olora"]
# PEFT init methods minilora does not implement, with what each needs (refused by name)
_REFUSED_INITS = {
    "loftq": "LoftQ alternates quantization and SVD steps against a bitsandbytes base",
    "eva": "EVA initializes from activations of a data loader (PEFT's initialize_lora_eva_weights)",
    "corda": "CorDA initializes from covariance statistics collected over a data set",
    "orthogonal": "PEFT's orthogonal init draws A and B from one QR decomposition",
}


# ---------------------------------------------------------------------------------------------------------
# Base layers


def is_conv1d(module: nn.Module) -> bool:
    """True for `transformers.pytorch_utils.Conv1D` (GPT-2's linear layer, weight (in, out))."""
    # Look the class up only if transformers is already loaded: a model holding a Conv1D has loaded it, and
    # minilora itself must not depend on transformers.
    utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(utils, "Conv1D", None)
    return conv1d is not None and isinstance(module, conv1d)


def is_nf4(module: nn.Module) -> bool:
    """True for a 4-bit base such as `minilora.qlora.LinearNF4`: it has `dequantize()` and feature counts."""
    return (
        callable(getattr(module, "dequantize", None))
        and hasattr(module, "in_features")
        and hasattr(module, "out_features")
    )


def is_supported_base(module: nn.Module) -> bool:
    """Can LoRA wrap this module? nn.Linear, transformers Conv1D, or a 4-bit base with `dequantize()`."""
    return is_nf4(module) or is_conv1d(module) or isinstance(module, nn.Linear)


def base_weight(base: nn.Module) -> Tensor:
    """The base layer's weight as a dense (out, in) tensor: Linear as is, Conv1D transposed, NF4 dequantized.

    For Linear and Conv1D this is a view of the stored weight (no copy); for NF4 it is a fresh tensor in the
    layer's compute dtype.
    """
    if is_nf4(base):  # checked first: a 4-bit layer may subclass nn.Linear but store packed bytes
        return base.dequantize()
    if is_conv1d(base):
        return base.weight.T
    if isinstance(base, nn.Linear):
        return base.weight
    raise TypeError(f"no dense weight for {type(base).__name__}; expected nn.Linear, Conv1D or a 4-bit layer")


def features_of(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a supported base layer, with a check of the stored weight's shape."""
    if is_nf4(base):
        return int(base.in_features), int(base.out_features)
    if is_conv1d(base):
        n_in, n_out = base.weight.shape  # Conv1D stores (in, out)
        return int(n_in), int(n_out)
    if isinstance(base, nn.Linear):
        expected = (base.out_features, base.in_features)
        if tuple(base.weight.shape) != expected:
            # e.g. bitsandbytes' Linear4bit: an nn.Linear subclass whose weight is packed 4-bit data
            raise TypeError(
                f"{type(base).__name__} is an nn.Linear whose weight has shape {tuple(base.weight.shape)}, "
                f"not (out, in) = {expected}; quantized layers must offer dequantize() (see minilora.qlora)"
            )
        return base.in_features, base.out_features
    raise TypeError(
        f"LoRA wraps nn.Linear, transformers Conv1D or a 4-bit layer with dequantize(); got {type(base).__name__}"
    )


def default_adapter_dtype(base: nn.Module) -> torch.dtype:
    """The dtype a new adapter gets on this base: float32, or float64 for a float64 base."""
    # Adapters train in float32 even on a half-precision base, as PEFT does by default
    # (autocast_adapter_dtype=True): the update s·BA is small next to W0 and would be lost in fp16/bf16 steps.
    if is_nf4(base):
        return torch.float32
    dtype = base.weight.dtype
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _device_of(base: nn.Module) -> torch.device:
    for tensor in list(base.parameters()) + list(base.buffers()):
        return tensor.device
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------------------
# The adapter math: the one function a fused kernel replaces


def lora_matmul(x: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """s · x Aᵀ Bᵀ, the low-rank update. x: (..., in), A: (r, in), B: (out, r) -> (..., out).

    Going through the r-dim bottleneck costs r·(in + out) per token instead of in·out for a dense ΔW.
    """
    return F.linear(F.linear(x, lora_A), lora_B) * scaling


# ---------------------------------------------------------------------------------------------------------
# Inits that start the adapter from W0 itself (and leave the base the rest)


def pissa_init(w0: Tensor, r: int, scaling: float) -> tuple[Tensor, Tensor, Tensor]:
    """PiSSA (Meng et al. 2024, arXiv 2404.02948): the adapter starts as W0's r principal directions.

    W0 = U S Vᵀ: (out, in). With the r largest singular values S_r and their vectors U_r: (out, r), V_r: (in, r),
    B = U_r √(S_r/s), A = √(S_r/s) V_rᵀ, so s·B A = U_r S_r V_rᵀ, and the base keeps the residual
    W_res = W0 − s·B A. The layer computes W0 at step 0, but training now moves W0's principal part.
    Returns (A (r, in), B (out, r), W_res (out, in)), all float32 (PEFT's pissa_init, exact SVD).
    """
    w0 = w0.detach().to(torch.float32)
    U, S, Vh = torch.linalg.svd(w0, full_matrices=False)
    root = torch.sqrt(S[:r] / scaling)
    lora_A = root[:, None] * Vh[:r]  # diag(√(S_r/s)) V_rᵀ
    lora_B = U[:, :r] * root[None, :]  # U_r diag(√(S_r/s))
    return lora_A, lora_B, w0 - scaling * lora_B @ lora_A


def olora_init(w0: Tensor, r: int, scaling: float) -> tuple[Tensor, Tensor, Tensor]:
    """OLoRA (Büyükakyüz 2024, arXiv 2406.01775): the adapter starts as W0's first r orthonormal directions.

    W0 = Q R (QR decomposition of W0: (out, in)): B = Q[:, :r] (orthonormal columns), A = R[:r], and the base
    keeps W_res = W0 − s·B A. Returns (A (r, in), B (out, r), W_res (out, in)), float32 (PEFT's olora_init).
    """
    w0 = w0.detach().to(torch.float32)
    Q, R = torch.linalg.qr(w0)
    lora_A, lora_B = R[:r].contiguous(), Q[:, :r].contiguous()
    return lora_A, lora_B, w0 - scaling * lora_B @ lora_A


_WEIGHT_INITS = {"pissa": pissa_init, "olora": olora_init}


def check_weight_init(init_lora_weights: object, base: nn.Module) -> None:
    """Refuse PiSSA / OLoRA where the base weight cannot take the residual back (before anything changes)."""
    if init_lora_weights not in _WEIGHT_INITS:
        return
    if is_nf4(base):
        raise ValueError(
            f"init_lora_weights={init_lora_weights!r} rewrites the base weight as W0 − s·B A, and a 4-bit base "
            "would have to be re-quantized. Initialize on the dense model, then quantize it "
            "(minilora.qlora.quantize_model)."
        )
    if init_lora_weights == "olora" and is_conv1d(base):
        raise ValueError(
            "init_lora_weights='olora' on a transformers Conv1D (weight stored (in, out)) is refused: PEFT's OLoRA "
            "decomposes the stored (in, out) matrix as if it were (out, in), and minilora would not agree with it."
        )
    if base.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"init_lora_weights={init_lora_weights!r} needs a float32/16 or bfloat16 base weight, got "
                         f"{base.weight.dtype}")


# ---------------------------------------------------------------------------------------------------------
# Argument checks


def check_hparams(r: object, lora_alpha: object, lora_dropout: object) -> None:
    """Raise ValueError unless r is a positive int, lora_alpha a finite number > 0, lora_dropout in [0, 1)."""
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r <= 0:
        raise ValueError(f"r must be a positive int (the rank of ΔW = B A), got {r!r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, numbers.Real) or not lora_alpha > 0:
        raise ValueError(f"lora_alpha must be a number > 0 (scaling is alpha / r), got {lora_alpha!r}")
    if math.isinf(lora_alpha):
        raise ValueError(f"lora_alpha must be finite, got {lora_alpha!r}")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, numbers.Real) or not 0 <= lora_dropout < 1:
        raise ValueError(f"lora_dropout must be a probability in [0, 1), got {lora_dropout!r}")


def check_init_and_dtype(init_lora_weights: object, adapter_dtype: object) -> None:
    """Raise ValueError unless init_lora_weights is True, False, "gaussian", "pissa" or "olora" and adapter_dtype
    a float dtype. PEFT's other init methods are refused by name, with what they need."""
    if isinstance(init_lora_weights, str) and init_lora_weights.startswith("pissa_niter_"):
        raise ValueError(f"init_lora_weights={init_lora_weights!r} (PiSSA from a randomized SVD) is not implemented; "
                         "'pissa' (the exact SVD) is")
    if isinstance(init_lora_weights, str) and init_lora_weights in _REFUSED_INITS:
        raise ValueError(f"init_lora_weights={init_lora_weights!r} is not implemented in minilora: "
                         f"{_REFUSED_INITS[init_lora_weights]}. Use True, False, 'gaussian', 'pissa' or 'olora'.")
    if init_lora_weights not in (True, False, "gaussian", "pissa", "olora"):
        raise ValueError(f"init_lora_weights must be True, False, 'gaussian', 'pissa' or 'olora', got "
                         f"{init_lora_weights!r}")
    if adapter_dtype is not None and not (isinstance(adapter_dtype, torch.dtype) and adapter_dtype.is_floating_point):
        raise ValueError(f"adapter_dtype must be a floating dtype, got {adapter_dtype}")


def _warn_if_rank_wasted(r: int, in_features: int, out_features: int) -> None:
    """Warn when r > min(in, out): B A has rank at most min(in, out), so the extra rank buys nothing."""
    most = min(in_features, out_features)
    if r > most:
        warnings.warn(
            f"r={r} exceeds min(in_features, out_features) = {most} of this {in_features} -> {out_features} layer. "
            f"ΔW = B A cannot have rank above {most}, so the extra {r - most} dimensions only add parameters "
            f"and compute (and change the scaling alpha/r); r={most} can express every update this one can.",
            stacklevel=4,
        )


def check_adapter_name(name: object) -> None:
    """Raise ValueError unless `name` can key an adapter: a non-empty printable string without '.'."""
    if not isinstance(name, str) or not name or "." in name or not name.isprintable():
        raise ValueError(f"adapter name must be a non-empty string without '.', got {name!r}")


# ---------------------------------------------------------------------------------------------------------
# Where later chapters plug in


class LoRAVariant(Protocol):
    """What one adapter computes when it is not plain LoRA (PEFT's `LoraVariant`); one object per adapter.

    init:    add the adapter's own parameters, once, after A and B exist (DoRA: the magnitude vector m).
    forward: the layer's output for x: (..., in) in the adapter's dtype, given result = base(x): (..., out).
    merge:   the weight a merged layer holds, W' from W0: (out, in) -> (out, in) in at least float32, and
             whatever unmerge will need to undo it (None: nothing).
    unmerge: W0 back from the stored W' and what merge returned: (out, in) in at least float32.
    """

    def init(self, layer: LoRALinear, name: str) -> None: ...

    def forward(self, layer: LoRALinear, name: str, x: Tensor, result: Tensor) -> Tensor: ...

    def merge(self, layer: LoRALinear, name: str, w0: Tensor) -> tuple[Tensor, object]: ...

    def unmerge(self, layer: LoRALinear, name: str, merged: Tensor, state: object) -> Tensor: ...


# Variants by the flag that asks for them: "dora" (use_dora=True) -> minilora.dora.DoraVariant.
VARIANTS: dict[str, Callable[[], LoRAVariant]] = {}


def register_variant(flag: str, factory: Callable[[], LoRAVariant]) -> None:
    """Make `use_<flag>=True` give each new adapter the variant `factory()` (minilora/__init__.py: "dora")."""
    VARIANTS[flag] = factory


def _variant_factory(use_dora: bool) -> Callable[[], LoRAVariant] | None:
    """The factory of the variant an adapter asks for, or None for plain LoRA."""
    if not use_dora:
        return None
    if "dora" not in VARIANTS:
        raise RuntimeError("use_dora=True needs the DoRA variant of chapter 8 (minilora.dora.DoraVariant); "
                           "`import minilora` registers it (minilora.lora.register_variant)")
    return VARIANTS["dora"]


# The fused forward of chapter 10 (`minilora.fast.fused_forward`, installed by minilora/__init__.py):
# (layer, x) -> the layer's output computed in fewer memory passes, or None where it does not apply.
_FUSED_FORWARD: Callable[[LoRALinear, Tensor], Tensor | None] | None = None


def set_fused_forward(fn: Callable[[LoRALinear, Tensor], Tensor | None] | None) -> None:
    """Make `fn` the fused forward that `LoRALinear.forward` tries first where `fused` asks for it."""
    global _FUSED_FORWARD
    _FUSED_FORWARD = fn


# ---------------------------------------------------------------------------------------------------------
# The layer


class LoRALinear(nn.Module):
    """A frozen base layer plus named low-rank adapters: y = base(x) + s · B A dropout(x).

    x: (..., in_features) -> (..., out_features). The adapter is computed in its own dtype (float32 by
    default) and the sum is cast back to the base output's dtype. With `use_dora=True` the adapter is DoRA
    (see `minilora.dora`): `lora_variant[name]` then computes it. Parameters live in dicts keyed by adapter
    name, as in PEFT: `lora_A[name]`: (r, in), `lora_B[name]`: (out, r), `lora_magnitude_vector[name]`:
    (out,) for DoRA.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        adapter_name: str = "default",
        init_lora_weights: InitMode = True,
        adapter_dtype: torch.dtype | None = None,
        fused: bool | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = features_of(base_layer)
        # None: the fused forward (minilora.fast) on CUDA inputs, this readable forward elsewhere;
        # True: fused wherever it applies (CPU too); False: always the readable forward below
        self.fused = fused
        self.base_layer = base_layer
        self.fan_in_fan_out = is_conv1d(base_layer)  # PEFT's name for "weight is stored (in, out)"

        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.use_dora: dict[str, bool] = {}
        self.scaling: dict[str, float] = {}
        self.bias_mode: dict[str, str] = {}  # PEFT's `bias`: which biases train and are saved with the adapter
        self.init_lora_weights: dict[str, InitMode] = {}  # "pissa" / "olora" changed the base: files say so
        self.lora_variant: dict[str, LoRAVariant] = {}  # adapters that are not plain LoRA (DoRA)

        self.active_adapter = adapter_name
        self.disable_adapters = False  # True: forward is the base layer alone
        self.merged_adapter: str | None = None  # name of the adapter folded into the base weight, if any
        self._merge_state: dict[str, object] = {}  # what a variant's unmerge needs, from its merge
        # exact copies of 16-bit base weights taken at merge time, so that unmerge restores them bit for bit
        self._unmerged_weight: dict[str, Tensor] = {}
        self.add_adapter(
            adapter_name, r, lora_alpha, lora_dropout, use_rslora, use_dora, init_lora_weights, adapter_dtype
        )
        base_layer.requires_grad_(False)  # after the checks in add_adapter: a refused layer stays as it was

    # --- adapters --------------------------------------------------------------------------------------

    @property
    def weight(self) -> Tensor:
        """The base layer's `weight`, as PEFT's layers expose it: models such as T5 read `proj.weight.dtype`."""
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        """The base layer's `bias` (None if it has none)."""
        return getattr(self.base_layer, "bias", None)

    @property
    def adapter_names(self) -> list[str]:
        """Names of the adapters this layer holds, in the order they were added."""
        return list(self.lora_A.keys())

    def add_adapter(
        self,
        adapter_name: str,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        init_lora_weights: InitMode = True,
        adapter_dtype: torch.dtype | None = None,
    ) -> None:
        """Add adapter `adapter_name`: A (r, in) Kaiming-uniform, B (out, r) zeros. Does not make it active.

        `init_lora_weights`: True (PEFT's default), "gaussian" (A ~ N(0, 1/r²), B = 0), False (B random too,
        so the adapter is not a no-op: for tests), or "pissa" / "olora": A and B from W0's SVD / QR, and the
        base weight becomes W0 − s·B A (it changes: see `pissa_init`, `olora_init`). With use_dora=True the DoRA
        variant then adds its magnitude m = ‖W0 + s·B A‖_row (= ‖W0‖_row when B = 0).
        """
        check_adapter_name(adapter_name)
        check_hparams(r, lora_alpha, lora_dropout)
        if adapter_name in self.lora_A:
            raise ValueError(f"this layer already has an adapter named {adapter_name!r}")
        check_init_and_dtype(init_lora_weights, adapter_dtype)
        check_weight_init(init_lora_weights, self.base_layer)
        variant_factory = _variant_factory(use_dora)
        _warn_if_rank_wasted(r, self.in_features, self.out_features)
        dtype = adapter_dtype or default_adapter_dtype(self.base_layer)
        device = _device_of(self.base_layer)

        lora_A = torch.empty(r, self.in_features, device=device, dtype=dtype)
        lora_B = torch.zeros(self.out_features, r, device=device, dtype=dtype)
        if init_lora_weights == "gaussian":
            nn.init.normal_(lora_A, std=1 / r)
        else:
            # a=√5 is nn.Linear's own init: U(−1/√in, 1/√in)
            nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        if init_lora_weights is False:
            nn.init.kaiming_uniform_(lora_B, a=math.sqrt(5))

        self.lora_A[adapter_name] = nn.Parameter(lora_A)
        self.lora_B[adapter_name] = nn.Parameter(lora_B)
        self.lora_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.r[adapter_name] = int(r)
        self.lora_alpha[adapter_name] = lora_alpha
        self.use_rslora[adapter_name] = bool(use_rslora)
        self.use_dora[adapter_name] = bool(use_dora)
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.bias_mode[adapter_name] = "none"  # minilora.inject sets "all" / "lora_only" (what saving includes)
        self.init_lora_weights[adapter_name] = init_lora_weights
        if init_lora_weights in _WEIGHT_INITS:
            self._init_from_weight(adapter_name, init_lora_weights)
        if variant_factory is not None:
            variant = variant_factory()
            variant.init(self, adapter_name)
            self.lora_variant[adapter_name] = variant
        # only the active adapter trains (a new one is not active unless it is the only one)
        self._set_requires_grad()

    def _init_from_weight(self, name: str, method: str) -> None:
        """PiSSA / OLoRA: A and B from W0's decomposition, W0 ← W_res in its stored dtype (a transposed view
        for Conv1D)."""
        stored = base_weight(self.base_layer)
        lora_A, lora_B, residual = _WEIGHT_INITS[method](stored, self.r[name], self.scaling[name])
        with torch.no_grad():
            self.lora_A[name].copy_(lora_A)
            self.lora_B[name].copy_(lora_B)
            stored.copy_(residual.to(stored.dtype))

    def set_adapter(self, adapter_name: str) -> None:
        """Make `adapter_name` the adapter used by forward; only its parameters get requires_grad=True."""
        if adapter_name not in self.lora_A:
            raise ValueError(f"no adapter named {adapter_name!r}; this layer has {self.adapter_names}")
        self._activate(adapter_name)

    def _activate(self, adapter_name: str) -> None:
        # The model-level set_adapter also calls this for layers that lack the adapter: they then run the base
        # layer alone (as PEFT does).
        if self.merged_adapter is not None and self.merged_adapter != adapter_name:
            raise ValueError(
                f"adapter {self.merged_adapter!r} is merged into the base weight; unmerge() before switching"
            )
        self.active_adapter = adapter_name
        self._set_requires_grad()

    def _set_requires_grad(self) -> None:
        for params in (self.lora_A, self.lora_B, self.lora_magnitude_vector):
            for name, p in params.items():
                p.requires_grad_(name == self.active_adapter)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove adapter `adapter_name` (it must not be merged)."""
        if adapter_name not in self.lora_A:
            raise ValueError(f"no adapter named {adapter_name!r}; this layer has {self.adapter_names}")
        if self.merged_adapter == adapter_name:
            raise ValueError(f"adapter {adapter_name!r} is merged; unmerge() before deleting it")
        for container in (self.lora_A, self.lora_B, self.lora_magnitude_vector, self.lora_dropout):
            if adapter_name in container:
                del container[adapter_name]
        for table in (self.r, self.lora_alpha, self.use_rslora, self.use_dora, self.scaling, self.bias_mode,
                      self.init_lora_weights):
            del table[adapter_name]
        self.lora_variant.pop(adapter_name, None)

    # --- forward ---------------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        """y = base(x) + s · B A dropout(x) for the active adapter. x: (..., in) -> (..., out).

        Where `fused` asks for it (None: CUDA inputs; True: always), the fused forward the package installs
        (`set_fused_forward`: chapter 10's `minilora.fast.fused_forward`) computes y first, in fewer memory
        passes; it returns None where it does not apply (dropout in training, a base it cannot read, ...),
        and the code below, the reference, runs instead. A variant (DoRA) computes its adapter's part.
        """
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"LoRALinear expects inputs of shape (..., {self.in_features}); got {tuple(x.shape)}"
            )
        if self.disable_adapters and self.merged:
            self.unmerge()  # "disabled" must mean the base weight, as in PEFT
        if _FUSED_FORWARD is not None and (self.fused or (self.fused is None and x.is_cuda)):
            y = _FUSED_FORWARD(self, x)  # the same function in fewer memory passes; None where it does not apply
            if y is not None:
                return y
        result = self.base_layer(x)
        name = self.active_adapter
        if self.disable_adapters or self.merged or name not in self.lora_A:
            return result

        lora_A, lora_B = self.lora_A[name], self.lora_B[name]
        x = x.to(lora_A.dtype)
        variant = self.lora_variant.get(name)
        if variant is None:
            out = result + lora_matmul(self.lora_dropout[name](x), lora_A, lora_B, self.scaling[name])
        else:
            out = variant.forward(self, name, x, result)
        return out.to(result.dtype)

    # --- merging ---------------------------------------------------------------------------------------

    @property
    def merged(self) -> bool:
        """True while an adapter is folded into the base weight (forward then skips the adapter)."""
        return self.merged_adapter is not None

    def delta_weight(self, adapter_name: str | None = None) -> Tensor:
        """ΔW = s · B A as (out, in), in at least float32 (plain LoRA; DoRA rescales rows on top)."""
        name = adapter_name or self.active_adapter
        dtype = torch.promote_types(self.lora_A[name].dtype, torch.float32)
        return (self.lora_B[name].to(dtype) @ self.lora_A[name].to(dtype)) * self.scaling[name]

    def merged_weight(self, adapter_name: str | None = None) -> Tensor:
        """The dense weight a merged layer holds, (out, in) in at least float32: W0 + ΔW, or its variant's W'.

        Reads W0 from the base layer (dequantized for a 4-bit base), so call it on an unmerged layer.
        """
        name = adapter_name or self.active_adapter
        with torch.no_grad():
            return self._merge_math(name, base_weight(self.base_layer))[0]

    def _merge_math(self, name: str, w0: Tensor) -> tuple[Tensor, object]:
        """(W', what unmerge needs to undo it): W0 + ΔW and None, or the variant's merge."""
        variant = self.lora_variant.get(name)
        if variant is not None:
            return variant.merge(self, name, w0.detach())
        delta = self.delta_weight(name).detach()
        return w0.detach().to(delta.dtype) + delta, None

    def merge(self, safe: bool = True, adapter_name: str | None = None) -> None:
        """Fold the adapter into the base weight: W0 ← W0 + ΔW (DoRA: W0 ← m ⊙ V/‖V‖_row). One at a time.

        safe=True builds the new weight on a copy, rounds it to the stored dtype and raises ValueError if it
        is not finite there (fp16 overflows beyond ±65504), leaving the layer untouched. 4-bit bases refuse
        (re-quantizing would destroy the update): use merge_and_unload.

        Memory: a float16/bfloat16 base keeps an exact copy of W0 while merged (2 bytes per weight of this
        layer, freed by unmerge), because W0 + ΔW rounded to 8 (bf16) or 11 (fp16) bits cannot be undone by
        subtracting ΔW: unmerge would leave W0 off by up to a rounding step of W0 + ΔW. float32/float64 bases
        keep no copy; their unmerge subtracts ΔW and is exact up to float rounding (about 1e-7 relative).
        """
        name = adapter_name or self.active_adapter
        if name not in self.lora_A:
            raise ValueError(f"no adapter named {name!r}; this layer has {self.adapter_names}")
        if self.merged_adapter == name:
            warnings.warn(f"adapter {name!r} is already merged; nothing to do", stacklevel=2)
            return
        if self.merged:
            raise ValueError(f"adapter {self.merged_adapter!r} is already merged; unmerge() it first")
        self._merge(name, safe, keep_original=True)

    def _merge(self, name: str, safe: bool, keep_original: bool) -> None:
        """merge() after its argument checks; keep_original=False skips the exact copy (the layer is dropped)."""
        if is_nf4(self.base_layer):
            raise TypeError(
                "cannot merge into a 4-bit base: writing W0 + ΔW back would re-quantize it and round most of "
                "the update away. Use minilora.inject.merge_and_unload(model), which replaces the layer by a "
                "dense nn.Linear holding dequantize() + ΔW, or dequantize the base first."
            )
        stored = base_weight(self.base_layer)  # (out, in) view of the stored weight
        with torch.no_grad():
            new, state = self._merge_math(name, stored)
            new = new.to(stored.dtype)  # checked as it will be stored: the sum can be finite in fp32 only
            if safe and not torch.isfinite(new).all():
                raise ValueError(
                    f"merging adapter {name!r} gives non-finite weights in {stored.dtype} (W0 + ΔW overflows the "
                    "dtype or the adapter holds NaN/inf); the base weight is unchanged. Check the adapter, or "
                    "merge into a float32 copy of the model."
                )
            if keep_original and stored.dtype in (torch.float16, torch.bfloat16):
                self._unmerged_weight[name] = stored.clone()
            elif state is not None:
                self._merge_state[name] = state
            stored.copy_(new)
        self.merged_adapter = name

    def unmerge(self) -> None:
        """Undo `merge`: W0 ← W0 − ΔW (a variant undoes its own merge; DoRA: W0 ← W'/factor − ΔW).

        A float16/bfloat16 base gets back the exact copy taken by merge instead (see `merge`).
        """
        if not self.merged:
            warnings.warn("no adapter is merged; nothing to do", stacklevel=2)
            return
        if is_nf4(self.base_layer):
            # Only possible if the base was quantized while merged: its 4 bits hold W0 + ΔW, and there is no
            # stored weight to subtract ΔW from.
            raise TypeError(
                "cannot unmerge: the base layer was replaced by a 4-bit one while the adapter was merged, so it "
                "stores W0 + ΔW and W0 is gone. Quantize only models without merged adapters."
            )
        name = self.merged_adapter
        stored = base_weight(self.base_layer)
        with torch.no_grad():
            original = self._unmerged_weight.pop(name, None)
            variant = self.lora_variant.get(name)
            if original is not None:
                restored = original
            elif variant is not None:
                restored = variant.unmerge(self, name, stored, self._merge_state.pop(name, None))
            else:
                delta = self.delta_weight(name)
                restored = stored.to(delta.dtype) - delta
            stored.copy_(restored.to(stored.dtype))
        self.merged_adapter = None

    def extra_repr(self) -> str:
        adapters = ", ".join(
            f"{n}(r={self.r[n]}, alpha={self.lora_alpha[n]}{', rslora' if self.use_rslora[n] else ''}"
            f"{', dora' if self.use_dora[n] else ''})"
            for n in self.adapter_names
        )
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, adapters=[{adapters}], "
            f"active={self.active_adapter!r}, merged={self.merged_adapter!r}"
        )
