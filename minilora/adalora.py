"""AdaLoRA: the update in SVD form, and a rank budget that moves to the layers that need it (Zhang et al. 2023,
arXiv 2303.10512).

LoRA gives every adapted layer the same rank r. AdaLoRA starts every layer at `init_r` and, while training,
prunes the least important singular values until the average rank is `target_r`: the rank goes where the
task needs it. For a frozen W0: (out, in) one layer learns

    ΔW = P Λ Q · s / (r0 + 1e-5),      P = lora_B: (out, r0),  Λ = diag(lora_E): (r0, 1),  Q = lora_A: (r0, in)

with s = lora_alpha and r0 = init_r (the denominator stays r0 when values are pruned, so pruning does not
rescale the survivors). P and Q are not forced to be orthogonal; a penalty pulls them there,

    R = mean over the adapted matrices of ‖Q Qᵀ − I‖_F and ‖Pᵀ P − I‖_F,    loss + orth_reg_weight · R,

so that Λ behaves like singular values and zeroing one removes one direction. Pruning zeroes entries of Λ
(P and Q stay), by an importance score per triplet (P[:, i], λ_i, Q[i, :]):

    I(w)   = |w · ∂L/∂w|                          sensitivity of one weight (first-order loss change if w = 0)
    Ī ← β1 Ī + (1 − β1) I                         smoothed sensitivity
    Ū ← β2 Ū + (1 − β2) |I − Ī|                   uncertainty: how much the sensitivity jumps around
    S(w)   = Ī · Ū
    S_i    = S(λ_i) + mean_k S(P[k, i]) + mean_j S(Q[i, j])

The budget (the number of λ kept over all layers) follows a cubic schedule: `init_r · n` for the first
`tinit` steps, then down to `target_r · n` by step T − tfinal (T = total_step), and fixed for the last
`tfinal` steps. Every `deltaT` steps of the middle phase the λ with the lowest scores are zeroed down to the
budget; at step T − tfinal the final pattern is fixed and re-applied at every later step.

Everything follows PEFT 0.21.2's AdaLoRA (`peft.AdaLoraConfig`, `AdaLoraModel.update_and_allocate`): the same
initialization drawn in the same order (one seed gives one adapter in both), the same scores, ties and
schedule, and adapter files that `peft.PeftModel.from_pretrained` loads. Use: `inject_adalora`, then per
step `loss = with_orthogonal_penalty(loss, model, config)`, backward, optimizer step,
`allocator.update_and_allocate(step)`, zero_grad.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from minilora.inject import find_target_modules
from minilora.lora import base_weight, default_adapter_dtype, features_of, is_conv1d, is_nf4

__all__ = [
    "AdaLoRAConfig",
    "SVDLinear",
    "inject_adalora",
    "svd_layers",
    "orthogonal_regularizer",
    "with_orthogonal_penalty",
    "RankAllocator",
    "final_ranks",
    "merge_and_unload_adalora",
    "save_adalora",
    "load_adalora",
]

EPS = 1e-5  # PEFT's guard in s / (r0 + 1e-5); kept so that outputs match to the last bit of float32
PREFIX = "base_model.model."  # PeftModel.base_model (AdaLoraModel) . model (the wrapped model)
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


# ---------------------------------------------------------------------------------------------------------
# The settings


@dataclass
class AdaLoRAConfig:
    """AdaLoRA's settings, with PEFT's names and defaults (`peft.AdaLoraConfig`). `total_step` is required.

    The schedule has three phases: steps ≤ tinit keep every rank (warm-up), steps up to total_step − tfinal
    prune down to `target_r` per layer on average, the last `tfinal` steps train the final pattern.
    """

    target_modules: str | Sequence[str] | None = None
    total_step: int | None = None
    init_r: int = 12
    target_r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    rank_pattern: dict[str, list[bool]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        def positive_int(name: str, value: object, zero_ok: bool = False) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero_ok else 1):
                raise ValueError(f"{name} must be an int {'≥ 0' if zero_ok else '> 0'}, got {value!r}")

        if self.target_modules is None:
            raise ValueError("target_modules is required: a list of names, a regex, or 'all-linear'")
        if self.total_step is None:
            raise ValueError("AdaLoRA needs total_step (> 0): its budget schedule ends there")
        positive_int("total_step", self.total_step)
        positive_int("init_r", self.init_r)
        positive_int("target_r", self.target_r)
        positive_int("tinit", self.tinit, zero_ok=True)
        positive_int("tfinal", self.tfinal, zero_ok=True)
        positive_int("deltaT", self.deltaT)
        if self.target_r > self.init_r:
            raise ValueError(f"target_r ({self.target_r}) must not exceed init_r ({self.init_r}): pruning only removes")
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(
                f"tinit={self.tinit}, tfinal={self.tfinal}, total_step={self.total_step} leave no steps to prune in: "
                "need tinit < total_step - tfinal"
            )
        for name in ("beta1", "beta2"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must lie in (0, 1), got {getattr(self, name)!r}")
        if not self.orth_reg_weight >= 0:
            raise ValueError(f"orth_reg_weight must be ≥ 0, got {self.orth_reg_weight!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be a probability in [0, 1), got {self.lora_dropout!r}")


# ---------------------------------------------------------------------------------------------------------
# The layer


class SVDLinear(nn.Module):
    """A frozen base layer plus ΔW = P Λ Q · s / (r0 + 1e-5). x: (..., in) -> (..., out).

    `lora_A` = Q: (r, in), `lora_E` = Λ: (r, 1), `lora_B` = P: (out, r). `r` is the number of triplets the
    layer holds (r0 = init_r when built; fewer after loading a pruned file); `ranknum` is r0 for good, the
    denominator of the scaling. A pruned triplet is one whose λ is zero.
    """

    def __init__(self, base_layer: nn.Module, r: int = 12, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 init_weights: bool = True) -> None:
        super().__init__()
        if is_nf4(base_layer) or not (is_conv1d(base_layer) or isinstance(base_layer, nn.Linear)):
            raise TypeError(f"AdaLoRA wraps nn.Linear or transformers Conv1D, got {type(base_layer).__name__}")
        self.in_features, self.out_features = features_of(base_layer)
        self.base_layer = base_layer
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.r = int(r)
        self.ranknum = float(r)
        self.lora_alpha = lora_alpha
        self.scaling = lora_alpha if lora_alpha > 0 else float(r)  # PEFT's rule
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.merged = False

        # PEFT draws these four from the global generator in this order, then re-initializes: drawing the same
        # numbers keeps the generator in step, so the next layer (and the next seed-dependent thing) agrees too.
        A = torch.randn(r, self.in_features)
        E = torch.randn(r, 1)
        B = torch.randn(self.out_features, r)
        torch.randn(1)  # PEFT's `ranknum` placeholder
        if init_weights:
            # Λ = 0: the layer starts as the base layer; P and Q small and random, so Λ gets a gradient at once
            E.zero_()
            A.normal_(0.0, 0.02)
            B.normal_(0.0, 0.02)
        dtype, device = default_adapter_dtype(base_layer), base_weight(base_layer).device
        self.lora_A = nn.Parameter(A.to(device, dtype))
        self.lora_E = nn.Parameter(E.to(device, dtype))
        self.lora_B = nn.Parameter(B.to(device, dtype))
        base_layer.requires_grad_(False)

    def delta_weight(self) -> Tensor:
        """ΔW = P (Q ⊙ λ) · s / (r0 + 1e-5) as (out, in)."""
        return self.lora_B @ (self.lora_A * self.lora_E) * self.scaling / (self.ranknum + EPS)

    def forward(self, x: Tensor) -> Tensor:
        result = self.base_layer(x)
        if self.merged or self.r == 0:
            return result
        x = self.lora_dropout(x.to(self.lora_A.dtype))
        # through the rank-r bottleneck: x Qᵀ, scaled per direction by λ, then Pᵀ
        delta = (x @ (self.lora_A * self.lora_E).T @ self.lora_B.T) * self.scaling / (self.ranknum + EPS)
        return result + delta.to(result.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W0 ← W0 + ΔW (forward then runs the base layer alone)."""
        if not self.merged:
            w = base_weight(self.base_layer)
            w += self.delta_weight().to(w.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 ← W0 − ΔW."""
        if self.merged:
            w = base_weight(self.base_layer)
            w -= self.delta_weight().to(w.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        kept = int((self.lora_E != 0).sum()) if self.r else 0
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, kept={kept}, alpha={self.lora_alpha}"


def svd_layers(model: nn.Module) -> list[tuple[str, SVDLinear]]:
    """Every SVDLinear of the model with its full module name, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SVDLinear)]


def inject_adalora(model: nn.Module, config: AdaLoRAConfig, *, task_type: str | None = None) -> nn.Module:
    """Wrap every targeted layer in an SVDLinear of rank init_r and freeze everything else; returns `model`.

    Targets are matched as `minilora.inject.inject` matches them (PEFT's rules). All targets are checked
    before the first is wrapped.
    """
    if svd_layers(model):
        raise ValueError("the model already has AdaLoRA layers; AdaLoRA trains one adapter at a time")
    names = find_target_modules(model, config.target_modules, task_type)
    wrong = [n for n in names if not isinstance(model.get_submodule(n), nn.Linear) and not is_conv1d(model.get_submodule(n))]
    if wrong:
        raise TypeError(f"AdaLoRA wraps nn.Linear and Conv1D only; these targets are neither: {wrong[:5]}")
    model.requires_grad_(False)
    for name in names:
        parent, _, leaf = name.rpartition(".")
        layer = SVDLinear(model.get_submodule(name), config.init_r, config.lora_alpha, config.lora_dropout)
        setattr(model.get_submodule(parent), leaf, layer)
    return model


# ---------------------------------------------------------------------------------------------------------
# The orthogonality penalty


def orthogonal_regularizer(model: nn.Module) -> Tensor:
    """R = mean over all Q (lora_A) and P (lora_B) of ‖Q Qᵀ − I‖_F, ‖Pᵀ P − I‖_F (PEFT's, before the weight)."""
    terms = []
    for _, layer in svd_layers(model):
        for matrix, gram in ((layer.lora_A, layer.lora_A @ layer.lora_A.T), (layer.lora_B, layer.lora_B.T @ layer.lora_B)):
            eye = torch.eye(*gram.shape, dtype=gram.dtype, device=gram.device)
            terms.append(torch.linalg.matrix_norm(gram - eye))  # Frobenius
    if not terms:
        raise ValueError("the model has no AdaLoRA layers (inject_adalora first)")
    return torch.stack(terms).mean()


def with_orthogonal_penalty(loss: Tensor, model: nn.Module, config: AdaLoRAConfig) -> Tensor:
    """loss + orth_reg_weight · R: what PEFT's AdaLoraModel.forward returns as `.loss`."""
    return loss + config.orth_reg_weight * orthogonal_regularizer(model)


# ---------------------------------------------------------------------------------------------------------
# Importance and the budget


class RankAllocator:
    """Scores the triplets of every SVDLinear and zeroes λ down to the scheduled budget (see module docstring).

    Call `update_and_allocate(step)` once per step, after `optimizer.step()` and before `zero_grad()` (it
    reads the gradients), with step counting from 0 or 1 as you like, up to `total_step`.
    """

    def __init__(self, model: nn.Module, config: AdaLoRAConfig) -> None:
        self.model, self.config = model, config
        self.layers = svd_layers(model)
        if not self.layers:
            raise ValueError("the model has no AdaLoRA layers (inject_adalora first)")
        self.init_budget = sum(layer.r for _, layer in self.layers)  # λ's alive at the start
        self.target_budget = config.target_r * len(self.layers)
        self.rank_pattern: dict[str, list[bool]] | None = None  # per layer: which λ survive the last pruning
        self.reset_importance()

    def reset_importance(self) -> None:
        self.smoothed: dict[tuple[str, str], Tensor] = {}  # Ī per weight, keyed by (layer name, "A"/"E"/"B")
        self.uncertainty: dict[tuple[str, str], Tensor] = {}  # Ū per weight

    # --- the schedule ----------------------------------------------------------------------------------

    def budget(self, step: int) -> tuple[int, bool]:
        """(how many λ may stay nonzero, whether to prune at this step) on the cubic schedule."""
        c = self.config
        if step <= c.tinit:
            return self.init_budget, False
        if step > c.total_step - c.tfinal:
            return self.target_budget, True
        progress = (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.init_budget - self.target_budget) * (1 - progress) ** 3 + self.target_budget)
        return budget, step % c.deltaT == 0

    # --- importance ------------------------------------------------------------------------------------

    @torch.no_grad()
    def update_importance(self) -> None:
        """Ī ← β1 Ī + (1 − β1) |w ∂L/∂w|,  Ū ← β2 Ū + (1 − β2) |I − Ī| for every weight of A, E, B."""
        b1, b2 = self.config.beta1, self.config.beta2
        for name, layer in self.layers:
            for part, p in (("A", layer.lora_A), ("E", layer.lora_E), ("B", layer.lora_B)):
                if p.grad is None:
                    raise RuntimeError(
                        f"{name}.lora_{part} has no gradient: call update_and_allocate after backward() and "
                        "before zero_grad()"
                    )
                key = (name, part)
                sensitivity = (p * p.grad).abs()
                smoothed = b1 * self.smoothed.get(key, torch.zeros_like(p)) + (1 - b1) * sensitivity
                self.uncertainty[key] = (b2 * self.uncertainty.get(key, torch.zeros_like(p))
                                         + (1 - b2) * (sensitivity - smoothed).abs())
                self.smoothed[key] = smoothed

    def triplet_scores(self) -> dict[str, Tensor]:
        """Per layer, (r,) scores S_i = S(λ_i) + mean_k S(P[k, i]) + mean_j S(Q[i, j]), S = Ī · Ū."""
        def score(name: str, part: str) -> Tensor:
            return self.smoothed[(name, part)] * self.uncertainty[(name, part)]

        return {
            name: score(name, "E").view(-1) + score(name, "A").mean(dim=1) + score(name, "B").mean(dim=0)
            for name, _ in self.layers
        }

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero every λ whose score is at or below the (n − budget)-th lowest of all; returns who survives."""
        scores = self.triplet_scores()
        n_prune = self.init_budget - budget
        if n_prune <= 0:  # nothing to prune (PEFT's torch.kthvalue would fail on k = 0)
            return {name: [True] * layer.r for name, layer in self.layers}
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=n_prune).values.item()
        pattern = {}
        for name, layer in self.layers:
            keep = scores[name] > threshold  # ties at the threshold go too, as in PEFT
            layer.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)
            pattern[name] = keep.tolist()
        return pattern

    @torch.no_grad()
    def apply_pattern(self, pattern: dict[str, list[bool]]) -> None:
        """Zero the λ that `pattern` prunes (the final phase re-applies it at every step)."""
        for name, layer in self.layers:
            keep = torch.tensor(pattern[name], device=layer.lora_E.device)
            layer.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)

    def update_and_allocate(self, step: int) -> int:
        """One step of AdaLoRA's bookkeeping (PEFT's `AdaLoraModel.update_and_allocate`); returns the budget.

        Before T − tfinal: update the scores, and prune when the schedule says so. At T − tfinal: prune to
        the final budget, fix that pattern and forget the scores. After: re-zero the fixed pattern.
        """
        end = self.config.total_step - self.config.tfinal
        if step < end:
            self.update_importance()
            budget, prune = self.budget(step)
            if prune:
                self.rank_pattern = self.mask_to_budget(budget)
            return budget
        if step == end:
            self.rank_pattern = self.mask_to_budget(self.target_budget)
            self.reset_importance()
            return self.target_budget
        if self.rank_pattern is not None:
            self.apply_pattern(self.rank_pattern)
        return self.target_budget


def final_ranks(model: nn.Module) -> dict[str, int]:
    """Per adapted layer, how many λ are nonzero: the rank of its ΔW (at most; P or Q could lose rank too)."""
    return {name: int((layer.lora_E != 0).sum()) for name, layer in svd_layers(model)}


def merge_and_unload_adalora(model: nn.Module) -> nn.Module:
    """Fold every ΔW into its base layer and put the base layers back; returns `model`."""
    for name, layer in svd_layers(model):
        layer.merge()
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, layer.base_layer)
    return model


# ---------------------------------------------------------------------------------------------------------
# Files in PEFT's format


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same directory, then rename: a failed write leaves `path` as it was."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_adalora(model: nn.Module, path: str | os.PathLike, config: AdaLoRAConfig,
                 rank_pattern: dict[str, list[bool]] | None = None, *, task_type: str | None = None,
                 base_model_name_or_path: str | None = None) -> Path:
    """Write the adapter as PEFT does: pruned triplets left out, the surviving pattern in the config.

    Keys: `base_model.model.<module>.lora_A` (r', in), `.lora_E` (r', 1), `.lora_B` (out, r'), r' the
    survivors of `rank_pattern` (all r when None). The config's `rank_pattern` keys are `<module>.lora_E`.
    """
    from safetensors.torch import save_file

    tensors, pattern = {}, {}
    for name, layer in svd_layers(model):
        keep = torch.ones(layer.r, dtype=torch.bool) if rank_pattern is None else torch.tensor(rank_pattern[name])
        key = f"{PREFIX}{name}."
        tensors[key + "lora_A"] = layer.lora_A.detach()[keep].cpu().contiguous()
        tensors[key + "lora_E"] = layer.lora_E.detach()[keep].cpu().contiguous()
        tensors[key + "lora_B"] = layer.lora_B.detach()[:, keep].cpu().contiguous()
        pattern[f"{name}.lora_E"] = keep.tolist()
    fields = {k: v for k, v in asdict(config).items() if k != "rank_pattern"}
    targets = fields["target_modules"]
    fields["target_modules"] = targets if isinstance(targets, str) else sorted(targets)
    record: dict[str, Any] = {
        "peft_type": "ADALORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True, "bias": "none", "r": 8, "fan_in_fan_out": any(
            layer.fan_in_fan_out for _, layer in svd_layers(model)),
        **fields, "rank_pattern": pattern if rank_pattern is not None else None,
    }
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    _atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    return directory


def load_adalora(model: nn.Module, path: str | os.PathLike, *, task_type: str | None = None) -> AdaLoRAConfig:
    """Read an AdaLoRA adapter (PEFT's or ours) into `model`: layers of the saved (pruned) ranks, r0 kept.

    Every key and shape is checked before the model changes; one ValueError lists all problems.
    """
    from safetensors.torch import load_file

    directory = Path(path)
    record = json.loads((directory / CONFIG_NAME).read_text())
    if record.get("peft_type") != "ADALORA":
        raise ValueError(f"{directory / CONFIG_NAME} is not an AdaLoRA adapter (peft_type={record.get('peft_type')!r})")
    names = {f.name for f in AdaLoRAConfig.__dataclass_fields__.values()}
    config = AdaLoRAConfig(**{k: v for k, v in record.items() if k in names})
    tensors = load_file(directory / WEIGHTS_NAME)  # safetensors: no code runs on load
    targets = find_target_modules(model, config.target_modules, task_type)
    problems, plan = [], []
    for name in targets:
        key = f"{PREFIX}{name}."
        parts = [tensors.get(key + p) for p in ("lora_A", "lora_E", "lora_B")]
        if any(t is None for t in parts):
            problems.append(f"missing tensors for {name}")
            continue
        A, E, B = parts
        n_in, n_out = features_of(model.get_submodule(name))
        r = A.shape[0]
        if A.shape != (r, n_in) or E.shape != (r, 1) or B.shape != (n_out, r):
            problems.append(f"{name}: shapes {tuple(A.shape)}, {tuple(E.shape)}, {tuple(B.shape)} do not fit {n_in} -> {n_out}")
        plan.append((name, A, E, B))
    unused = set(tensors) - {f"{PREFIX}{n}.{p}" for n in targets for p in ("lora_A", "lora_E", "lora_B")}
    if unused:
        problems.append(f"{len(unused)} tensors match no target, e.g. {sorted(unused)[:3]}")
    if problems:
        raise ValueError("cannot load this AdaLoRA adapter; nothing was changed:\n  " + "\n  ".join(problems))
    model.requires_grad_(False)
    for name, A, E, B in plan:
        base = model.get_submodule(name)
        layer = SVDLinear(base, A.shape[0], config.lora_alpha, config.lora_dropout, init_weights=False)
        layer.ranknum = float(config.init_r)  # the scaling keeps r0, whatever was pruned
        with torch.no_grad():
            for param, t in ((layer.lora_A, A), (layer.lora_E, E), (layer.lora_B, B)):
                param.copy_(t)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, layer)
    return config
