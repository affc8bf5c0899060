"""LoRA+: give B a larger learning rate than A (Hayou, Ghosh, Yu 2024, arXiv 2402.12354).

With B = 0 at the start and A random, the two factors play different roles, and the paper shows that for
wide layers the efficient choice is η_B = λ · η_A with λ ≫ 1 (2⁴ = 16 is the usual default). This module
only builds optimizer parameter groups; any torch optimizer can use them.

The grouping follows PEFT's `create_loraplus_optimizer`: every trainable parameter whose name contains
"lora_B", and every trainable 1-D parameter (biases, norm weights, DoRA's magnitude vector), gets lr·ratio;
everything else trainable gets lr. Weight decay applies to A and B; the 1-D parameters of that ratio group
that are biases or LayerNorm parameters get none. (PEFT's fourth group, for LoRA on embedding layers, has no
counterpart here: minilora adapts linear layers only.)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["loraplus_param_groups", "make_loraplus_optimizer"]


def _no_decay_names(model: nn.Module) -> set[str]:
    """Parameters exempt from weight decay: biases and LayerNorm parameters (PEFT/transformers' rule)."""
    names = {n for n, _ in model.named_parameters() if "bias" in n}
    for module_name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            prefix = f"{module_name}." if module_name else ""
            names |= {prefix + n for n, _ in module.named_parameters()}
    return names


def loraplus_param_groups(
    model: nn.Module, lr: float, ratio: float = 16.0, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Optimizer groups: "lora_A" at lr, "lora_B" at ratio·lr, "lora_B_no_decay" at ratio·lr with no decay.

    Only trainable parameters are included; empty groups are left out. Each group carries a "name" key.
    """
    for label, value in (("lr", lr), ("ratio", ratio)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{label} must be a finite number > 0, got {value!r}")
    if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")

    no_decay = _no_decay_names(model)
    groups: dict[str, list[nn.Parameter]] = {"lora_A": [], "lora_B": [], "lora_B_no_decay": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if "lora_B" in name or param.ndim == 1:
            groups["lora_B_no_decay" if name in no_decay else "lora_B"].append(param)
        else:
            groups["lora_A"].append(param)
    if not any(groups.values()):
        raise ValueError("the model has no trainable parameters; inject adapters first")

    settings = {
        "lora_A": (lr, weight_decay),
        "lora_B": (lr * ratio, weight_decay),
        "lora_B_no_decay": (lr * ratio, 0.0),
    }
    return [
        {"name": key, "params": params, "lr": settings[key][0], "weight_decay": settings[key][1]}
        for key, params in groups.items()
        if params
    ]


def make_loraplus_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer],
    lr: float,
    ratio: float = 16.0,
    weight_decay: float = 0.0,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """`optimizer_cls(loraplus_param_groups(model, lr, ratio, weight_decay), lr=lr, **kwargs)`."""
    return optimizer_cls(loraplus_param_groups(model, lr, ratio, weight_decay), lr=lr, **kwargs)
