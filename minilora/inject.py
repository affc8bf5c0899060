"""Putting LoRA adapters into a model, and taking them out again.

`inject` swaps each targeted layer for a `LoRALinear` wrapping it, in place, and freezes every other
parameter, so that only the low-rank factors train. Targets are named as in PEFT's `LoraConfig`:

* a list of names: a module matches if its full name equals an entry or ends with "." + entry
  (["query", "value"] hits "encoder.layer.0.attention.self.query", ...);
* a string: a regular expression that must match the full module name (`re.fullmatch`);
* "all-linear": every nn.Linear / Conv1D / 4-bit layer except the output head. As in PEFT, the head is
  `model.get_output_embeddings()` of a transformers model, or for task_type="SEQ_CLS" its `score` /
  `classifier` module; a plain nn.Module has no known head and nothing is excluded.

Then: `set_adapter`, `disable_adapters`, `merge_and_unload`, `unload`, `add_weighted_adapter` (task arithmetic)
and parameter counts.
"""

from __future__ import annotations

import math
import numbers
import re
import sys
import warnings
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

from minilora.lora import (
    InitMode,
    LoRALinear,
    base_weight,
    check_adapter_name,
    check_hparams,
    check_init_and_dtype,
    features_of,
    is_nf4,
    is_supported_base,
)

__all__ = [
    "inject",
    "find_target_modules",
    "lora_layers",
    "active_adapter",
    "set_adapter",
    "disable_adapters",
    "merge_and_unload",
    "unload",
    "add_weighted_adapter",
    "count_parameters",
    "print_trainable_parameters",
]

TargetSpec = str | Sequence[str]
ALL_LINEAR = "all-linear"
SEQ_CLS_HEAD_NAMES = ("score", "classifier")  # the names PEFT looks for; there is no fixed convention


# ---------------------------------------------------------------------------------------------------------
# Finding layers


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Every LoRALinear in the model with its full module name."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def outer_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Named modules, without the root and without the insides of LoRALinear layers (base_layer, dropout...)."""
    found, wrapped = [], []
    for name, module in model.named_modules():  # pre-order: a LoRALinear comes before its children
        if not name or any(name.startswith(w + ".") for w in wrapped):
            continue
        found.append((name, module))
        if isinstance(module, LoRALinear):
            wrapped.append(name)
    return found


def _head_names(model: nn.Module, task_type: str | None) -> set[str]:
    """Names of the output head that "all-linear" leaves alone (PEFT's rule, see module docstring)."""
    pretrained = getattr(sys.modules.get("transformers.modeling_utils"), "PreTrainedModel", None)
    if pretrained is None or not isinstance(model, pretrained):
        return set()
    head = model.get_output_embeddings()
    if head is None and task_type == "SEQ_CLS":
        head = next((getattr(model, n) for n in SEQ_CLS_HEAD_NAMES if getattr(model, n, None) is not None), None)
    if head is None:
        return set()
    return {name for name, module in model.named_modules() if module is head}


def _linear_overview(modules: list[tuple[str, nn.Module]], limit: int = 12) -> str:
    names = [n for n, m in modules if isinstance(m, LoRALinear) or is_supported_base(m)]
    if not names:
        return "this model has no nn.Linear / Conv1D / 4-bit layers"
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    return (
        f"its {len(names)} Linear-like layers end in {suffixes[:limit]}{' ...' if len(suffixes) > limit else ''}, "
        f"e.g. {names[:3]}"
    )


def find_target_modules(model: nn.Module, target_modules: TargetSpec, task_type: str | None = None) -> list[str]:
    """Full names of the modules `target_modules` selects (PEFT's matching rules). Changes nothing.

    Raises ValueError if a listed name or the regex matches nothing, TypeError if it matches a module that
    LoRA cannot wrap (anything but nn.Linear, Conv1D, a 4-bit layer, or an existing LoRALinear).
    """
    modules = outer_modules(model)
    if isinstance(target_modules, str):
        if target_modules.lower() == ALL_LINEAR:
            heads = _head_names(model, task_type)
            chosen = [
                n for n, m in modules if (isinstance(m, LoRALinear) or is_supported_base(m)) and n not in heads
            ]
            if not chosen:
                raise ValueError(f"target_modules='all-linear' found nothing: {_linear_overview(modules)}")
            _check_wrappable(chosen, dict(modules))
            return chosen
        try:
            pattern = re.compile(target_modules)
        except re.error as err:
            raise ValueError(f"target_modules {target_modules!r} is not a valid regular expression: {err}") from None
        chosen = [n for n, _ in modules if pattern.fullmatch(n)]
        if not chosen:
            raise ValueError(
                f"the regex {target_modules!r} fully matches no module name; {_linear_overview(modules)}"
            )
    else:
        keys = list(target_modules or [])
        if not keys or not all(isinstance(k, str) and k for k in keys):
            raise ValueError(
                f"target_modules must be 'all-linear', a regex string, or a non-empty list of names; got "
                f"{target_modules!r}"
            )
        hit = {k: [n for n, _ in modules if n == k or n.endswith("." + k)] for k in keys}
        unknown = [k for k, names in hit.items() if not names]
        if unknown:
            raise ValueError(f"target_modules {unknown} match no module; {_linear_overview(modules)}")
        chosen_set = {n for names in hit.values() for n in names}
        chosen = [n for n, _ in modules if n in chosen_set]

    by_name = dict(modules)
    wrong = [n for n in chosen if not (isinstance(by_name[n], LoRALinear) or is_supported_base(by_name[n]))]
    if wrong:
        kinds = ", ".join(f"{n!r} ({type(by_name[n]).__name__})" for n in wrong[:5])
        raise TypeError(
            f"LoRA wraps nn.Linear, transformers Conv1D or 4-bit layers; target_modules also matched {kinds}"
            f"{' ...' if len(wrong) > 5 else ''}. Name the linear layers inside them instead: "
            f"{_linear_overview(modules)}"
        )
    _check_wrappable(chosen, by_name)
    return chosen


def _check_wrappable(names: list[str], by_name: dict[str, nn.Module]) -> None:
    """Raise one TypeError naming every layer LoRALinear would refuse (e.g. bitsandbytes' Linear4bit: an
    nn.Linear subclass whose weight holds packed 4-bit bytes), so that callers can check before they change."""
    refused = []
    for n in names:
        if isinstance(by_name[n], LoRALinear):
            continue
        try:
            features_of(by_name[n])
        except TypeError as err:
            refused.append(f"{n!r}: {err}")
    if refused:
        raise TypeError(
            f"{len(refused)} targeted layer(s) cannot be wrapped; nothing was changed. Leave them out of "
            "target_modules (or convert them, e.g. a bitsandbytes 4-bit layer with minilora.double_quant.from_bnb "
            "into a minilora.qlora.LinearNF4):\n  " + "\n  ".join(refused[:10])
            + (f"\n  ... and {len(refused) - 10} more" if len(refused) > 10 else "")
        )


# ---------------------------------------------------------------------------------------------------------
# Injecting


def active_adapter(model: nn.Module) -> str | None:
    """The adapter name the model's LoRA layers use (None if it has none)."""
    return next((layer.active_adapter for _, layer in lora_layers(model)), None)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name), leaf, new)


def inject(
    model: nn.Module,
    target_modules: TargetSpec | None = None,
    r: int = 8,
    lora_alpha: float = 8,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    use_dora: bool = False,
    adapter_name: str = "default",
    *,
    init_lora_weights: InitMode = True,
    task_type: str | None = None,
    adapter_dtype: torch.dtype | None = None,
    fused: bool | None = None,
) -> nn.Module:
    """Wrap every targeted layer in a LoRALinear (ΔW = B A, s = alpha/r or alpha/√r) and freeze the rest.

    Keywords and defaults are PEFT's `LoraConfig`'s. Returns `model`, modified in place. If the model
    already has adapters, `adapter_name` is added next to them (layers not yet wrapped get wrapped), the
    active adapter stays as it was and the new one stays frozen: `set_adapter(model, name)` to train it.
    Nothing is changed when an argument or a target is wrong: every target is checked before the first is
    wrapped. A target whose weight is shared with another module (tied word embeddings) gets a warning: its
    adapter cannot be merged without untying first. `fused` sets each targeted layer's
    `LoRALinear.fused` (None: fused layers of `minilora.fast` on CUDA, False: always the readable forward).
    """
    if target_modules is None:
        raise ValueError("target_modules is required: a list of names, a regex, or 'all-linear'")
    check_adapter_name(adapter_name)
    check_hparams(r, lora_alpha, lora_dropout)
    check_init_and_dtype(init_lora_weights, adapter_dtype)
    if fused not in (None, True, False):
        raise ValueError(f"fused must be None, True or False, got {fused!r}")
    names = find_target_modules(model, target_modules, task_type)  # also checks that each can be wrapped
    twice = [n for n in names if adapter_name in getattr(model.get_submodule(n), "lora_A", {})]
    if twice:
        raise ValueError(f"adapter {adapter_name!r} is already injected into {twice[:5]}; pick another name")
    tied = _tied_weights(model, names)
    if tied:
        consequence = ("the adapter trains and runs correctly, but merging it would write into the others too "
                       "(merge_and_unload refuses; LoRALinear.merge cannot see the other module).")
        warnings.warn(_tied_message(tied, consequence), stacklevel=2)

    current = active_adapter(model)
    settings = dict(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_rslora=use_rslora,
        use_dora=use_dora,
        init_lora_weights=init_lora_weights,
        adapter_dtype=adapter_dtype,
    )
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            module.add_adapter(adapter_name, **settings)
            module.fused = fused
        else:
            layer = LoRALinear(module, adapter_name=adapter_name, fused=fused, **settings)
            if current is not None:
                layer._activate(current)
            _replace(model, name, layer)

    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in lora_layers(model):
        layer._set_requires_grad()
    return model


# ---------------------------------------------------------------------------------------------------------
# Switching


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Make `adapter_name` active in every LoRA layer (layers without it run their base layer alone)."""
    layers = list(lora_layers(model))
    known = sorted({n for _, layer in layers for n in layer.adapter_names})
    if adapter_name not in known:
        raise ValueError(f"no adapter named {adapter_name!r}; the model has {known}")
    blocked = [n for n, layer in layers if layer.merged_adapter not in (None, adapter_name)]
    if blocked:
        raise ValueError(f"layers {blocked[:5]} hold a merged adapter; unmerge them before switching")
    for _, layer in layers:
        layer._activate(adapter_name)


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the `with` block every LoRA layer runs its base layer alone (merged adapters get unmerged)."""
    layers = [layer for _, layer in lora_layers(model)]
    before = [layer.disable_adapters for layer in layers]
    for layer in layers:
        layer.disable_adapters = True
    try:
        yield model
    finally:
        for layer, flag in zip(layers, before):
            layer.disable_adapters = flag


# ---------------------------------------------------------------------------------------------------------
# Taking adapters out


def _tied_weights(model: nn.Module, names: list[str]) -> dict[str, tuple[str, list[str]]]:
    """{layer name: (module owning its base weight, names of parameters elsewhere sharing that memory)}.

    transformers ties GPT-2's lm_head to the token embedding wte (tie_word_embeddings=True) by making both
    modules hold the same Parameter; a write into one weight is then a write into the other.
    """
    def key(p: torch.Tensor) -> object:
        # Meta tensors have no memory to compare (tying shares the Parameter object itself). Real tensors
        # compare first addresses, not storages: flattened parameters (FSDP) are views of one storage at
        # different offsets, and only a tensor starting where another starts overlaps it.
        return ("id", id(p)) if p.is_meta else (p.device, p.data_ptr())

    owners: dict[object, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(key(p), []).append(pname)
    tied = {}
    for name in names:
        module = model.get_submodule(name)
        owner = f"{name}.base_layer" if isinstance(module, LoRALinear) else name
        weight = getattr(model.get_submodule(owner), "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.numel() == 0:
            continue
        others = [o for o in owners.get(key(weight), []) if not o.startswith(name + ".")]
        if others:
            tied[name] = (owner, others)
    return tied


def _tied_message(tied: dict[str, tuple[str, list[str]]], consequence: str) -> str:
    pairs = "; ".join(f"{n!r} shares its weight with {others}" for n, (_, others) in list(tied.items())[:5])
    owner = next(iter(tied.values()))[0]
    return (
        f"{pairs} (tied weights, e.g. tie_word_embeddings=True): {consequence} To merge, untie first by giving "
        f"the layer its own copy: `layer = model.get_submodule({owner!r}); layer.weight = "
        "torch.nn.Parameter(layer.weight.detach().clone())`, and set `model.config.tie_word_embeddings = False` "
        "so that saving and loading do not tie them again. Or keep the adapter unmerged."
    )


def _stored_dtype(layer: LoRALinear) -> torch.dtype:
    """The dtype merge_and_unload stores the merged weight in: the base weight's own; for a 4-bit base,
    whose dense replacement is new, the bias's dtype, else that of the merged weight (at least float32)."""
    if not is_nf4(layer.base_layer):
        return base_weight(layer.base_layer).dtype
    bias = getattr(layer.base_layer, "bias", None)
    if bias is not None:
        return bias.dtype
    return torch.promote_types(layer.lora_A[layer.active_adapter].dtype, torch.float32)


def _dense_from(layer: LoRALinear) -> nn.Module:
    """The plain layer that replaces `layer` after merging its active adapter (4-bit bases become Linear)."""
    base = layer.base_layer
    name = layer.active_adapter
    if layer.merged or name not in layer.lora_A:
        return base
    if not is_nf4(base):
        # finiteness was checked before anything changed; the layer is dropped, so no copy for unmerge
        layer._merge(name, safe=False, keep_original=False)
        return base
    weight = layer.merged_weight(name)
    bias = getattr(base, "bias", None)
    dense = nn.Linear(
        layer.in_features, layer.out_features, bias=bias is not None, device=weight.device, dtype=_stored_dtype(layer)
    )
    with torch.no_grad():
        dense.weight.copy_(weight)
        if bias is not None:
            dense.bias.copy_(bias)
    return dense.requires_grad_(False)


def _will_merge(layer: LoRALinear) -> bool:
    return not layer.merged and layer.active_adapter in layer.lora_A


def merge_and_unload(model: nn.Module, safe: bool = True) -> nn.Module:
    """Fold each layer's active adapter into its weight and put the plain layer back. In place; returns model.

    Linear and Conv1D layers keep their class; a 4-bit base becomes a dense nn.Linear holding
    dequantize() + ΔW (re-quantizing would round the update away). safe=True first checks that every merged
    weight is finite in the dtype it will be stored in and raises ValueError (model unchanged) if one is not.
    A layer whose weight is tied to another module (GPT-2's lm_head and wte) is refused before anything
    changes: merging would silently rewrite the other module too; the message says how to untie.
    """
    layers = list(lora_layers(model))
    tied = _tied_weights(model, [n for n, layer in layers if _will_merge(layer)])
    if tied:
        raise ValueError(_tied_message(tied, "merging would silently change them as well. Nothing was merged."))
    if safe:
        for name, layer in layers:
            if _will_merge(layer):
                dtype = _stored_dtype(layer)
                if not torch.isfinite(layer.merged_weight().to(dtype)).all():
                    raise ValueError(
                        f"merging {name!r} gives non-finite weights in {dtype} (W0 + ΔW overflows the dtype or the "
                        "adapter holds NaN/inf); nothing was merged. Check the adapter, or merge a float32 copy."
                    )
    for name, layer in layers:
        _replace(model, name, _dense_from(layer))
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove all adapters without merging: the original base layers come back. In place; returns model."""
    for name, layer in list(lora_layers(model)):
        if layer.merged:
            layer.unmerge()
        _replace(model, name, layer.base_layer)
    return model


def add_weighted_adapter(
    model: nn.Module, adapters: Sequence[str], weights: Sequence[float], adapter_name: str
) -> nn.Module:
    """Add adapter `adapter_name` with ΔW_new = Σ_i w_i ΔW_i exactly (task arithmetic), per layer.

    Realised as PEFT's "cat" combination: A_new = [w_1 s_1 A_1; w_2 s_2 A_2; ...] (rows stacked),
    B_new = [B_1 B_2 ...] (columns side by side), rank Σ r_i, alpha = rank so s_new = 1. Then
    B_new A_new = Σ w_i s_i B_i A_i. The new adapter is not made active. Plain LoRA only: DoRA's row
    rescaling does not add up linearly.
    """
    check_adapter_name(adapter_name)
    if isinstance(adapters, str) or not adapters or len(adapters) != len(weights):
        raise ValueError("adapters and weights must be non-empty lists of the same length")
    if not all(isinstance(w, numbers.Real) and math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite numbers, got {list(weights)}")
    layers = list(lora_layers(model))
    known = sorted({n for _, layer in layers for n in layer.adapter_names})
    missing = [a for a in adapters if a not in known]
    if missing or adapter_name in known:
        raise ValueError(f"adapters {missing} unknown or {adapter_name!r} taken; the model has {known}")
    holders = [n for n, layer in layers if any(a in layer.lora_A for a in adapters)]
    partial = [n for n, layer in layers if n in holders and not all(a in layer.lora_A for a in adapters)]
    if partial:
        raise ValueError(f"adapters {list(adapters)} do not all sit on the same layers (e.g. {partial[:3]})")
    dora_users = [n for n, layer in layers if any(layer.use_dora.get(a, False) for a in adapters)]
    if dora_users:
        raise ValueError(f"add_weighted_adapter combines plain LoRA adapters only; DoRA found in {dora_users[:3]}")

    for _, layer in layers:
        if not all(a in layer.lora_A for a in adapters):
            continue
        first = adapters[0]
        rank = sum(layer.r[a] for a in adapters)
        with warnings.catch_warnings():
            # the exact combination needs rank Σ r_i even where that exceeds min(in, out): not the user's choice
            warnings.filterwarnings("ignore", message=r"r=\d+ exceeds min")
            layer.add_adapter(
                adapter_name,
                r=rank,
                lora_alpha=rank,
                lora_dropout=getattr(layer.lora_dropout[first], "p", 0.0),
                adapter_dtype=layer.lora_A[first].dtype,
            )
        with torch.no_grad():
            stacked_A = torch.cat([w * layer.scaling[a] * layer.lora_A[a] for a, w in zip(adapters, weights)], 0)
            stacked_B = torch.cat([layer.lora_B[a] for a in adapters], dim=1)
            layer.lora_A[adapter_name].copy_(stacked_A)
            layer.lora_B[adapter_name].copy_(stacked_B)
    return model


# ---------------------------------------------------------------------------------------------------------
# Counting


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a 4-bit layer counts its in·out logical weights, not its bytes."""
    trainable = total = 0
    for p in model.parameters():  # shared (tied) parameters are counted once
        if not p.is_floating_point():
            continue  # packed 4-bit storage; counted as weights below
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    for module in model.modules():
        if is_nf4(module):
            total += module.in_features * module.out_features
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print PEFT's line: 'trainable params: T || all params: N || trainable%: P'."""
    trainable, total = count_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")
