"""Putting LoRA adapters into a model, and taking them out again.

`inject` swaps each targeted layer for a `LoRALinear` wrapping it, in place, and freezes every other
parameter, so that only the low-rank factors train. Targets are named as in PEFT's `LoraConfig`:

* a list of names: a module matches if its full name equals an entry or ends with "." + entry
  (["query", "value"] hits "encoder.layer.0.attention.self.query", ...);
* a string: a regular expression that must match the full module name (`re.fullmatch`);
* "all-linear": every nn.Linear / Conv1D / 4-bit layer except the output head. As in PEFT, the head is
  `model.get_output_embeddings()` of a transformers model, or for task_type="SEQ_CLS" its `score` /
  `classifier` module; a plain nn.Module has no known head and nothing is excluded.

`LoraConfig`'s other choices of where adapters go have PEFT's meaning too: `exclude_modules` (names or a
regex left out), `layers_to_transform` / `layers_pattern` (only the blocks with these indices),
`rank_pattern` / `alpha_pattern` (another r or alpha for the layers a pattern names), `modules_to_save`
(whole modules trained as a copy next to the adapter: `ModulesToSave`; for task_type "SEQ_CLS" PEFT adds the
head, `classifier` / `score`) and `bias` ("none", "all", "lora_only": which biases train with the adapter).

Then: `set_adapter`, `disable_adapter`, `delete_adapter`, `merge_and_unload`, `unload`, `add_weighted_adapter`
(task arithmetic) and parameter counts.

`minilora.inject` is this module; calling the module, `minilora.inject(model, ...)`, calls `inject` (the
last lines of this file say how).
"""

from __future__ import annotations

import copy
import math
import numbers
import re
import sys
import types
import warnings
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from minilora.lora import (
    InitMode,
    LoRALinear,
    base_weight,
    check_adapter_name,
    check_hparams,
    check_init_and_dtype,
    check_weight_init,
    features_of,
    is_nf4,
    is_supported_base,
)

__all__ = [
    "inject",
    "find_target_modules",
    "lora_layers",
    "saved_modules",
    "ModulesToSave",
    "active_adapter",
    "set_adapter",
    "disable_adapter",
    "disable_adapters",
    "delete_adapter",
    "merge_and_unload",
    "unload",
    "add_weighted_adapter",
    "count_parameters",
    "print_trainable_parameters",
]

TargetSpec = str | Sequence[str]
ALL_LINEAR = "all-linear"
SEQ_CLS_HEAD_NAMES = ("score", "classifier")  # the names PEFT looks for; there is no fixed convention
# the heads PEFT trains whole (adds to modules_to_save) for a task type: a new task needs a new, trained head
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}
BIAS_MODES = ("none", "all", "lora_only")


# ---------------------------------------------------------------------------------------------------------
# Modules trained whole, next to the adapters


class ModulesToSave(nn.Module):
    """A module that trains whole, as a copy per adapter (PEFT's `ModulesToSaveWrapper`, same layout).

    A new task's head (a classifier over 2 labels) starts random: a low-rank update of it means nothing, so
    the whole head trains. `original_module` stays frozen; `modules_to_save[name]` is a deep copy that runs
    in its place while adapter `name` is active. Where no copy is active (adapters disabled, another adapter
    active) the original runs. Attributes the wrapper lacks (`weight`, `out_features`, ...) are read from
    the module that runs. Saving writes the active copy's state_dict under the module's own name
    (`base_model.model.classifier.weight`), as PEFT does.
    """

    def __init__(self, module: nn.Module, adapter_name: str = "default") -> None:
        super().__init__()
        self.original_module = module.requires_grad_(False)
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter = adapter_name
        self.disable_adapters = False
        self.add_adapter(adapter_name)

    def add_adapter(self, adapter_name: str) -> None:
        """Add a trainable copy of the original module for `adapter_name` (made active only by set_adapter)."""
        if adapter_name in self.modules_to_save:
            raise ValueError(f"this module already has a trained copy for adapter {adapter_name!r}")
        self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)
        self._set_requires_grad()

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    @property
    def active_module(self) -> nn.Module:
        """The module forward runs: the active adapter's copy, or the original."""
        if self.disable_adapters or self.active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def _activate(self, adapter_name: str) -> None:
        self.active_adapter = adapter_name
        self._set_requires_grad()

    def _set_requires_grad(self) -> None:
        self.original_module.requires_grad_(False)
        for name, module in self.modules_to_save.items():
            module.requires_grad_(name == self.active_adapter)

    def delete_adapter(self, adapter_name: str) -> None:
        del self.modules_to_save[adapter_name]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.active_module(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules of the wrapper itself
        except AttributeError:
            if name.startswith("_") or name in ("original_module", "modules_to_save", "active_adapter",
                                                 "disable_adapters"):
                raise  # the wrapper's own state (absent only while it is being built or unpickled)
            return getattr(self.active_module, name)


def _save_targets(model: nn.Module, keys: Sequence[str]) -> list[str]:
    """Names of the modules modules_to_save lists. PEFT's rule: the full name ends with an entry, with or without
    a dot before it (so DistilBERT's `pre_classifier` trains whole too when SEQ_CLS lists `classifier`)."""
    found = [n for n, _ in outer_modules(model) if any(n.endswith(k) for k in keys)]
    return [n for n in found if not any(n.startswith(outer + ".") for outer in found)]  # a copy holds its insides


# ---------------------------------------------------------------------------------------------------------
# Finding layers


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Every LoRALinear in the model with its full module name."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def saved_modules(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    """Every ModulesToSave wrapper in the model with its full module name."""
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSave):
            yield name, module


def outer_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Named modules, without the root and without the insides of LoRALinear layers (base_layer, dropout...)
    and of ModulesToSave wrappers (the original module and its copies)."""
    found, wrapped = [], []
    for name, module in model.named_modules():  # pre-order: a wrapper comes before its children
        if not name or any(name.startswith(w + ".") for w in wrapped):
            continue
        found.append((name, module))
        if isinstance(module, (LoRALinear, ModulesToSave)):
            wrapped.append(name)
    return found


def _matches_name(name: str, keys: Sequence[str]) -> bool:
    """PEFT's rule for a list of names: the full name is a key, or ends with "." + a key."""
    return any(name == k or name.endswith("." + k) for k in keys)


def _excluded(name: str, exclude_modules: TargetSpec | None) -> bool:
    """exclude_modules: a regex that fully matches the name, or a list of names (as for target_modules)."""
    if not exclude_modules:
        return False
    if isinstance(exclude_modules, str):
        return re.fullmatch(exclude_modules, name) is not None
    return _matches_name(name, exclude_modules)


def _inside_saved(name: str, modules_to_save: Sequence[str] | None) -> bool:
    """Is `name` a module listed in modules_to_save, or inside one? Those train whole, so LoRA leaves them."""
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in modules_to_save or ())


def layer_index(name: str, layers_pattern: str | Sequence[str] | None) -> int | None:
    """The block index in a module name, as PEFT reads it: the number after `layers_pattern` ("layers.3."),
    or without a pattern the first number that follows a name component ("h.3." in "transformer.h.3.attn")."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        match = next((m for p in patterns if (m := re.match(rf"(?:^|.*?\.){p}\.(\d+)\.", name))), None)
    return int(match.group(1)) if match else None


def _in_layers(name: str, layers_to_transform: int | Sequence[int] | None, layers_pattern: Any) -> bool:
    if layers_to_transform is None or layers_to_transform == []:
        return True
    index = layer_index(name, layers_pattern)
    wanted = [layers_to_transform] if isinstance(layers_to_transform, int) else list(layers_to_transform)
    return index is not None and index in wanted


def pattern_value(patterns: Mapping[str, Any] | None, name: str, default: Any) -> Any:
    """rank_pattern / alpha_pattern: the value of the first key k with re.match(f"(.*\\.)?({k})$", name), else
    `default` (PEFT's get_pattern_key: a key names the end of a module name, as a regex)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


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


def find_target_modules(
    model: nn.Module,
    target_modules: TargetSpec,
    task_type: str | None = None,
    *,
    exclude_modules: TargetSpec | None = None,
    layers_to_transform: int | Sequence[int] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
    modules_to_save: Sequence[str] | None = None,
) -> list[str]:
    """Full names of the modules `target_modules` selects (PEFT's matching rules). Changes nothing.

    Then, as PEFT: names `exclude_modules` matches are dropped, and so is anything inside `modules_to_save`
    (including task_type's head); with `layers_to_transform`, a name is kept only if its block index
    (`layer_index`) is one of them. Raises ValueError if a listed name or the regex matches nothing, or
    nothing is left; TypeError if a target is a module LoRA cannot wrap (anything but nn.Linear, Conv1D, a
    4-bit layer, or an existing LoRALinear).
    """
    if isinstance(target_modules, str) and layers_to_transform is not None:
        raise ValueError("layers_to_transform needs target_modules as a list of names (as in PEFT), not a string")
    if layers_pattern and layers_to_transform is None:
        raise ValueError("layers_pattern only says where to read the index for layers_to_transform; give both")
    modules = outer_modules(model)
    saved = list(modules_to_save or []) + list(TASK_HEADS.get(task_type or "", ()))

    def keep(name: str) -> bool:
        return not _excluded(name, exclude_modules) and not _inside_saved(name, saved) \
            and _in_layers(name, layers_to_transform, layers_pattern)

    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        heads = _head_names(model, task_type)
        linear = [n for n, m in modules if (isinstance(m, LoRALinear) or is_supported_base(m)) and n not in heads]
        chosen = [n for n in linear if keep(n)]
        if not chosen:
            raise ValueError(f"target_modules='all-linear' found nothing to adapt: {_linear_overview(modules)}")
        _check_wrappable(chosen, dict(modules))
        return chosen
    if isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as err:
            raise ValueError(f"target_modules {target_modules!r} is not a valid regular expression: {err}") from None
        matched = [n for n, _ in modules if pattern.fullmatch(n)]
        if not matched:
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
        unknown = [k for k in keys if not any(_matches_name(n, [k]) for n, _ in modules)]
        if unknown:
            raise ValueError(f"target_modules {unknown} match no module; {_linear_overview(modules)}")
        matched = [n for n, _ in modules if _matches_name(n, keys)]
    chosen = [n for n in matched if keep(n)]
    if not chosen:
        raise ValueError(
            f"target_modules matched {matched[:5]}{' ...' if len(matched) > 5 else ''}, and exclude_modules="
            f"{exclude_modules!r}, modules_to_save={saved} and layers_to_transform={layers_to_transform!r} "
            "left none of them"
        )

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
    """The adapter name the model's LoRA layers (and modules-to-save) use (None if it has none)."""
    modules = list(lora_layers(model)) + list(saved_modules(model))
    return next((module.active_adapter for _, module in modules), None)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name), leaf, new)


def _check_patterns(rank_pattern: object, alpha_pattern: object, lora_alpha: float, lora_dropout: float) -> None:
    """rank_pattern: {regex: positive int}; alpha_pattern: {regex: number > 0} (checked as r and lora_alpha are)."""
    for name, patterns in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        if patterns is None:
            continue
        if not isinstance(patterns, Mapping) or not all(isinstance(k, str) and k for k in patterns):
            raise ValueError(f"{name} must map module-name patterns (strings) to values, got {patterns!r}")
        for key, value in patterns.items():
            try:
                re.compile(key)
                if name == "rank_pattern":
                    check_hparams(value, lora_alpha, lora_dropout)
                else:
                    check_hparams(1, value, lora_dropout)
            except (re.error, ValueError) as err:
                raise ValueError(f"{name}[{key!r}]: {err}") from None


def _check_modules_to_save(modules_to_save: object) -> list[str]:
    if modules_to_save is None:
        return []
    if isinstance(modules_to_save, str) or not all(isinstance(m, str) and m for m in modules_to_save):
        raise ValueError(f"modules_to_save must be a list of module names, got {modules_to_save!r}")
    return list(modules_to_save)


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
    exclude_modules: TargetSpec | None = None,
    layers_to_transform: int | Sequence[int] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    modules_to_save: Sequence[str] | None = None,
    bias: str = "none",
) -> nn.Module:
    """Wrap every targeted layer in a LoRALinear (ΔW = B A, s = alpha/r or alpha/√r) and freeze the rest.

    Keywords and defaults are PEFT's `LoraConfig`'s (the module docstring lists them). Returns `model`,
    modified in place. If the model already has adapters, `adapter_name` is added next to them (layers not
    yet wrapped get wrapped), the active adapter stays as it was and the new one stays frozen:
    `set_adapter(model, name)` to train it. Nothing is changed when an argument or a target is wrong: every
    target is checked before the first is wrapped. A target whose weight is shared with another module (tied
    word embeddings) gets a warning: its adapter cannot be merged without untying first. `fused` sets each
    targeted layer's `LoRALinear.fused` (None: fused layers of `minilora.fast` on CUDA, False: always the
    readable forward). `bias="all"` / `"lora_only"` trains biases of the base model in place: disabling or
    deleting the adapter does not undo their change (as in PEFT).
    """
    if target_modules is None:
        raise ValueError("target_modules is required: a list of names, a regex, or 'all-linear'")
    check_adapter_name(adapter_name)
    check_hparams(r, lora_alpha, lora_dropout)
    check_init_and_dtype(init_lora_weights, adapter_dtype)
    _check_patterns(rank_pattern, alpha_pattern, lora_alpha, lora_dropout)
    if bias not in BIAS_MODES:
        raise ValueError(f"bias must be one of {BIAS_MODES}, got {bias!r}")
    if fused not in (None, True, False):
        raise ValueError(f"fused must be None, True or False, got {fused!r}")
    listed = _check_modules_to_save(modules_to_save)
    saved = listed + [h for h in TASK_HEADS.get(task_type or "", ()) if h not in listed]
    names = find_target_modules(  # also checks that each can be wrapped
        model, target_modules, task_type, exclude_modules=exclude_modules, layers_to_transform=layers_to_transform,
        layers_pattern=layers_pattern, modules_to_save=saved,
    )
    save_names = _save_targets(model, saved)
    if listed and not _save_targets(model, listed):
        raise ValueError(f"modules_to_save {listed} match no module; {_linear_overview(outer_modules(model))}")
    both = [n for n in save_names if n in names or isinstance(model.get_submodule(n), LoRALinear)]
    if both:
        raise ValueError(f"{both[:5]} would train whole (modules_to_save {saved}) and hold a LoRA adapter; leave "
                         "them out of one of the two (exclude_modules, or a narrower target_modules)")
    twice = [n for n in names + save_names if adapter_name in getattr(model.get_submodule(n), "adapter_names", [])]
    if twice:
        raise ValueError(f"adapter {adapter_name!r} is already injected into {twice[:5]}; pick another name")
    for name in names:  # PiSSA / OLoRA refuse some bases: check them all before the first base is rewritten
        module = model.get_submodule(name)
        check_weight_init(init_lora_weights, module.base_layer if isinstance(module, LoRALinear) else module)
    tied = _tied_weights(model, names)
    if tied:
        consequence = ("the adapter trains and runs correctly, but merging it would write into the others too "
                       "(merge_and_unload refuses; LoRALinear.merge cannot see the other module).")
        warnings.warn(_tied_message(tied, consequence), stacklevel=2)

    current = active_adapter(model)
    for name in names:
        settings = dict(
            r=pattern_value(rank_pattern, name, r),
            lora_alpha=pattern_value(alpha_pattern, name, lora_alpha),
            lora_dropout=lora_dropout,
            use_rslora=use_rslora,
            use_dora=use_dora,
            init_lora_weights=init_lora_weights,
            adapter_dtype=adapter_dtype,
        )
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            module.add_adapter(adapter_name, **settings)
            module.fused = fused
            layer = module
        else:
            layer = LoRALinear(module, adapter_name=adapter_name, fused=fused, **settings)
            if current is not None:
                layer._activate(current)
            _replace(model, name, layer)
        layer.bias_mode[adapter_name] = bias
    for name in save_names:
        module = model.get_submodule(name)
        if isinstance(module, ModulesToSave):
            module.add_adapter(adapter_name)
        else:
            wrapper = ModulesToSave(module, adapter_name)
            if current is not None:
                wrapper._activate(current)
            _replace(model, name, wrapper)
    _mark_trainable(model)
    return model


def _mark_trainable(model: nn.Module) -> None:
    """Freeze everything, then unfreeze what the active adapter trains: its A and B (and DoRA's m), its
    modules_to_save copies, and the biases its `bias` mode names (PEFT's _mark_only_adapters_as_trainable:
    "all": every parameter whose name contains "bias"; "lora_only": the biases of the wrapped layers)."""
    for p in model.parameters():
        p.requires_grad_(False)
    layers = [layer for _, layer in lora_layers(model)]
    for layer in layers:
        layer._set_requires_grad()
    for _, wrapper in saved_modules(model):
        wrapper._set_requires_grad()
    mode = next((layer.bias_mode[layer.active_adapter] for layer in layers if layer.active_adapter in layer.bias_mode),
                "none")
    if mode == "all":
        for name, p in model.named_parameters():
            if "bias" in name and "lora_" not in name and ".original_module." not in name:
                p.requires_grad_(True)
    elif mode == "lora_only":
        for layer in layers:
            if layer.active_adapter in layer.lora_A and isinstance(layer.bias, torch.Tensor):
                layer.bias.requires_grad_(True)


# ---------------------------------------------------------------------------------------------------------
# Switching


def _adapter_names(model: nn.Module) -> list[str]:
    """Every adapter name in the model's LoRA layers and modules-to-save, in the order they were added."""
    names: dict[str, None] = {}
    for _, module in list(lora_layers(model)) + list(saved_modules(model)):
        names.update(dict.fromkeys(module.adapter_names))
    return list(names)


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Make `adapter_name` active in every LoRA layer and module-to-save, and the only adapter that trains.

    Layers without it run their base layer alone (as PEFT's). One adapter is active at a time, as with
    `PeftModel.set_adapter`; to run several at once, combine them into one (`add_weighted_adapter`).
    """
    if not isinstance(adapter_name, str):
        raise ValueError(f"set_adapter takes one adapter name (one adapter runs at a time; combine several with "
                         f"add_weighted_adapter), got {adapter_name!r}")
    layers = list(lora_layers(model))
    known = _adapter_names(model)
    if adapter_name not in known:
        raise ValueError(f"no adapter named {adapter_name!r}; the model has {known}")
    blocked = [n for n, layer in layers if layer.merged_adapter not in (None, adapter_name)]
    if blocked:
        raise ValueError(f"layers {blocked[:5]} hold a merged adapter; unmerge them before switching")
    for _, module in layers + list(saved_modules(model)):
        module._activate(adapter_name)  # its own parameters only: what else was unfrozen stays so, as in PEFT


@contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the `with` block the model is its base model: every LoRA layer runs its base layer alone (merged
    adapters get unmerged) and every module-to-save its original module (PEFT's `disable_adapter()`). Biases
    trained with bias="all" / "lora_only" stay as trained."""
    modules = [m for _, m in list(lora_layers(model)) + list(saved_modules(model))]
    before = [m.disable_adapters for m in modules]
    for m in modules:
        m.disable_adapters = True
    try:
        yield model
    finally:
        for m, flag in zip(modules, before):
            m.disable_adapters = flag


disable_adapters = disable_adapter  # the name of earlier versions


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Remove adapter `adapter_name` from every layer and module-to-save (PEFT's delete_adapter). In place.

    If it was active, the first remaining adapter becomes active. A layer (or module-to-save) left with no
    adapter is replaced by its base (original) module. Refused: a merged adapter (unmerge it first).
    """
    known = _adapter_names(model)
    if adapter_name not in known:
        raise ValueError(f"no adapter named {adapter_name!r}; the model has {known}")
    merged = [n for n, layer in lora_layers(model) if layer.merged_adapter == adapter_name]
    if merged:
        raise ValueError(f"adapter {adapter_name!r} is merged into {merged[:5]}; unmerge it before deleting it")
    was_active = active_adapter(model) == adapter_name
    for name, layer in list(lora_layers(model)):
        if adapter_name in layer.lora_A:
            layer.delete_adapter(adapter_name)
        if not layer.adapter_names:
            _replace(model, name, layer.base_layer)
    for name, wrapper in list(saved_modules(model)):
        if adapter_name in wrapper.modules_to_save:
            wrapper.delete_adapter(adapter_name)
        if not wrapper.adapter_names:
            _replace(model, name, wrapper.original_module)
    remaining = [n for n in known if n != adapter_name]
    if was_active and remaining:
        set_adapter(model, remaining[0])
    return model


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
    for name, wrapper in list(saved_modules(model)):  # the trained copy takes the original's place
        module = wrapper.modules_to_save[wrapper.active_adapter] if wrapper.active_adapter in wrapper.modules_to_save \
            else wrapper.original_module
        _replace(model, name, module.requires_grad_(False))
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove all adapters without merging: the original base layers come back. In place; returns model."""
    for name, layer in list(lora_layers(model)):
        if layer.merged:
            layer.unmerge()
        _replace(model, name, layer.base_layer)
    for name, wrapper in list(saved_modules(model)):
        _replace(model, name, wrapper.original_module)
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


# ---------------------------------------------------------------------------------------------------------
# `minilora.inject`, the module, called as a function


class _CallableModule(types.ModuleType):
    """The type of this module: `import minilora.inject as m` gives the module, with every function above as
    an attribute, and `minilora.inject(model, ...)` still calls `inject`, as it did when the package's
    attribute of that name was the function."""

    def __call__(self, *args: Any, **kwargs: Any) -> nn.Module:
        return inject(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
