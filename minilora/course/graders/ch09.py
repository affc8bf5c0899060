"""Graders for chapter 9, tuning.

References are `minilora.loraplus.loraplus_param_groups` (checked against PEFT's LoRA+ optimizer), the library's
scaling rule in `minilora.lora.LoRALinear`, and exact arithmetic. When an answer is wrong the grader names the
usual slip: the ratio on the wrong factor, DoRA's magnitude or a bias in the wrong group, frozen parameters
included, smoothing over partial windows, an off-by-one step, alpha/r for alpha/√r, SGD's s² for Adam's s.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from minilora.course.grading import ExerciseFailed, expect_number, expect_value_error, grader
from minilora.inject import inject
from minilora.lora import LoRALinear
from minilora.loraplus import loraplus_param_groups


# --- 9.1 ------------------------------------------------------------------------------------------------------

class _Tiny(nn.Module):
    """Two attention-like projections, a LayerNorm and a head: LoRA/DoRA go on q and v."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.v = nn.Linear(6, 6), nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 2)


def _model(use_dora: bool) -> nn.Module:
    torch.manual_seed(0)
    model = inject(_Tiny(), ["q", "v"], r=2, lora_alpha=4, use_dora=use_dora)
    model.head.requires_grad_(True)   # a trained head: a 2-D weight (A's group) and a 1-D bias (B's group)
    return model


def _lr_by_param(groups: Any, what: str) -> dict[int, float]:
    if not isinstance(groups, (list, tuple)) or not all(isinstance(g, dict) for g in groups):
        raise ExerciseFailed(f"{what}: expected a list of dicts like {{'params': [...], 'lr': ...}}, got "
                             f"{type(groups).__name__}")
    seen: dict[int, float] = {}
    for g in groups:
        if "params" not in g or "lr" not in g:
            raise ExerciseFailed(f"{what}: every group needs the keys 'params' and 'lr'; got keys {sorted(g)}")
        for p in g["params"]:
            if id(p) in seen:
                raise ExerciseFailed(f"{what}: a parameter appears in two groups; the optimizer would refuse that")
            seen[id(p)] = float(g["lr"])
    return seen


@grader("9.1", "loraplus_groups")
def grade_9_1(fn):
    lr, ratio = 1e-3, 16.0
    for use_dora in (False, True):
        model = _model(use_dora)
        names = {id(p): n for n, p in model.named_parameters()}
        expected = {id(p): float(g["lr"]) for g in loraplus_param_groups(model, lr, ratio) for p in g["params"]}
        kind = "DoRA" if use_dora else "LoRA"
        what = f"loraplus_groups(list(model.named_parameters()), lr=1e-3, ratio=16) on a {kind} model"
        got = _lr_by_param(fn(list(model.named_parameters()), lr, ratio), what)
        frozen = [names[i] for i in got if i not in expected]
        if frozen:
            raise ExerciseFailed(f"{what}: frozen parameters are in the groups ({frozen[:3]}); keep only parameters "
                                 "with requires_grad=True")
        missing = [names[i] for i in expected if i not in got]
        if missing:
            raise ExerciseFailed(f"{what}: trainable parameters missing from the groups: {missing[:3]}")
        wrong = {names[i]: (got[i], expected[i]) for i in expected if not math.isclose(got[i], expected[i])}
        if wrong:
            name, (g_lr, e_lr) = next(iter(wrong.items()))
            hint = ""
            if "lora_A" in name and math.isclose(g_lr, lr * ratio):
                hint = "; hint: the larger learning rate goes to B (it starts at zero), A keeps lr"
            elif "lora_B" in name and math.isclose(g_lr, lr / ratio):
                hint = "; hint: B's learning rate is lr * ratio, not lr / ratio"
            elif "magnitude" in name:
                hint = ("; hint: DoRA's magnitude vector is 1-D; PEFT's rule puts every 1-D trainable parameter "
                        "in B's group (lr * ratio)")
            elif name.endswith("bias"):
                hint = "; hint: biases are 1-D; the rule puts 1-D trainable parameters in B's group"
            raise ExerciseFailed(f"{what}: {name} got lr {g_lr:g}, expected {e_lr:g}{hint} "
                                 f"({len(wrong)} parameter(s) wrong)")
    expect_value_error(fn, (list(_model(False).named_parameters()), 1e-3, 0.0),
                       "loraplus_groups(named_params, lr=0.001, ratio=0.0)", "what is allowed: ratio > 0")


# --- 9.2 ------------------------------------------------------------------------------------------------------

def _steps_ref(losses: list[float], target: float, window: int) -> int | None:
    for t in range(window, len(losses) + 1):
        if sum(losses[t - window:t]) / window < target:
            return t
    return None


@grader("9.2", "steps_to_target")
def grade_9_2(fn):
    cases = [
        ("a single low loss before the mean gets there", [0.9, 0.9, 0.1, 0.9, 0.3, 0.3, 0.3, 0.3], 0.4, 3),
        ("a steady fall", [1.0, 0.9, 0.8, 0.6, 0.4, 0.3, 0.2, 0.1, 0.1], 0.5, 3),
        ("one early dip", [0.1, 1.0, 1.0, 1.0, 0.2, 0.2, 0.2, 0.2], 0.5, 3),
        ("a mean exactly at the target", [0.5, 0.5, 0.5, 0.5, 0.25, 0.25], 0.5, 2),
        ("never reached", [0.9, 0.8, 0.7, 0.6], 0.1, 2),
        ("window 1", [0.9, 0.8, 0.2, 0.1], 0.5, 1),
    ]
    for label, losses, target, window in cases:
        expected = _steps_ref(losses, target, window)
        got = fn(list(losses), target, window)
        if got != expected:
            hint = ""
            if expected is not None and got == expected - 1:
                hint = "; hint: steps are counted from 1 (the first step is step 1), so return t, not the index t − 1"
            elif label == "one early dip":
                hint = ("; hint: smooth over full windows only: before `window` losses exist, the 'mean' is one "
                        "lucky batch")
            elif label == "a single low loss before the mean gets there":
                hint = "; hint: compare the MEAN of the last `window` losses with the target, not a single loss"
            elif label == "a mean exactly at the target":
                hint = "; hint: 'below the target' is strict: mean < target"
            elif label == "never reached":
                hint = "; hint: return None when the target is never reached"
            raise ExerciseFailed(f"steps_to_target({losses}, target={target}, window={window}) ({label}): expected "
                                 f"{expected!r}, got {got!r}{hint}")
    expect_value_error(fn, ([0.5, 0.4], 0.3, 0), "steps_to_target([0.5, 0.4], 0.3, 0)", "what is allowed: window >= 1")


# --- 9.3 ------------------------------------------------------------------------------------------------------

@grader("9.3", "rslora_scaling")
def grade_9_3(fn):
    for alpha, r in [(16, 8), (16, 64), (8, 1), (32, 256), (1.5, 4)]:
        expected = alpha / math.sqrt(r)
        # the library's rsLoRA layer uses the same number (a check of the grader itself), as wide as the rank
        layer = LoRALinear(nn.Linear(r, r), r=r, lora_alpha=alpha, use_rslora=True)
        assert math.isclose(layer.scaling["default"], expected)
        got = expect_number(f"rslora_scaling({alpha}, {r})", fn(alpha, r))
        if not math.isclose(got, expected, rel_tol=1e-12):
            hint = ""
            if math.isclose(got, alpha / r):
                hint = "; hint: alpha / r is plain LoRA's scale; rsLoRA divides by √r"
            elif math.isclose(got, math.sqrt(r) / alpha):
                hint = "; hint: alpha goes on top: alpha / √r"
            elif math.isclose(got, math.sqrt(alpha / r)):
                hint = "; hint: only r is under the square root: alpha / √r"
            raise ExerciseFailed(f"rslora_scaling({alpha}, {r}): expected {expected!r}, got {got!r}{hint}")
    for bad in [(16, 0), (16, -4), (16, 2.5), (0, 8), (-2, 8)]:
        expect_value_error(fn, bad, f"rslora_scaling{bad}", "what is allowed: r a positive int, alpha > 0")


# --- 9.4 ------------------------------------------------------------------------------------------------------

@grader("9.4", "effective_lr")
def grade_9_4(fn):
    for lr, alpha, r, rs in [(1e-3, 16, 8, False), (2e-4, 32, 16, False), (1e-3, 16, 64, True), (5e-4, 8, 4, True)]:
        s = alpha / math.sqrt(r) if rs else alpha / r
        expected = lr * s
        got = expect_number(f"effective_lr({lr}, {alpha}, {r}, rslora={rs})", fn(lr, alpha, r, rslora=rs))
        if not math.isclose(got, expected, rel_tol=1e-12):
            hint = ""
            if math.isclose(got, lr * s * s):
                hint = ("; hint: that is the SGD rule (the gradient is also ∝ s, so s²·lr). With Adam the step of "
                        "each entry is ~lr whatever the gradient's size, so ΔW = s·B A moves by ~s·lr")
            elif math.isclose(got, lr / s):
                hint = "; hint: a larger scale makes ΔW move faster: multiply by s"
            elif rs and math.isclose(got, lr * alpha / r):
                hint = "; hint: with rslora=True the scale is alpha / √r"
            raise ExerciseFailed(f"effective_lr({lr}, {alpha}, {r}, rslora={rs}): expected {expected!r}, "
                                 f"got {got!r}{hint}")


# --- 9.5 ------------------------------------------------------------------------------------------------------

@grader("9.5", "matched_lr")
def grade_9_5(fn):
    cases = [  # (lr, alpha_old, r_old, alpha_new, r_new, rslora, rank_exponent)
        (2e-4, 16, 16, 32, 16, False, 1.0),   # double alpha at fixed r: halve lr
        (3e-4, 16, 8, 16, 64, False, 1.0),    # alpha fixed, r x8: s·r = alpha unchanged, so lr unchanged
        (3e-4, 16, 8, 16, 64, True, 1.0),     # rsLoRA: s·r = alpha·√r grows √8, so lr / √8
        (1e-3, 8, 8, 16, 16, False, 1.0),     # alpha = r throughout: s = 1, s·r doubles, so lr / 2
        (3e-4, 16, 8, 16, 64, False, 0.0),    # the plain s·lr rule: s / 8, so lr x8
    ]
    for lr, a0, r0, a1, r1, rs, p in cases:
        s0 = a0 / math.sqrt(r0) if rs else a0 / r0
        s1 = a1 / math.sqrt(r1) if rs else a1 / r1
        expected = lr * (s0 * r0**p) / (s1 * r1**p)
        call = (f"matched_lr({lr}, alpha_old={a0}, r_old={r0}, alpha_new={a1}, r_new={r1}, rslora={rs}, "
                f"rank_exponent={p})")
        got = expect_number(call, fn(lr, a0, r0, a1, r1, rslora=rs, rank_exponent=p))
        if not math.isclose(got, expected, rel_tol=1e-12):
            hint = ""
            if math.isclose(got, lr * (s1 * r1**p) / (s0 * r0**p)):
                hint = ("; hint: a larger new step needs a SMALLER learning rate: keep s·r^p·lr fixed, "
                        "lr_new = lr·step_old/step_new")
            elif p and math.isclose(got, lr * s0 / s1):
                hint = ("; hint: across ranks the step along the gradient also grows like r^rank_exponent at a "
                        "fixed s (chapter 2 §3): keep s·r^p·lr fixed, not s·lr")
            elif rs and math.isclose(got, lr * (a0 / r0 * r0**p) / (a1 / r1 * r1**p)):
                hint = "; hint: with rslora=True both scales are alpha / √r"
            raise ExerciseFailed(f"{call}: expected {expected!r} (the lr that keeps s·r^p·lr fixed), got {got!r}{hint}")
