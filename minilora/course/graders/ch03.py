"""Graders for chapter 3, LoRA in practice.

References are the library itself (`minilora.inject.find_target_modules`, `count_parameters`,
`LoRALinear`) and float64 arithmetic. When an answer is wrong the grader tries the usual slips (substring
instead of suffix matching, a suffix without its dot, tied weights counted twice, a forgotten bias or
scaling, B A written as A B, the merge weight applied to both factors) and names the one it recognises.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from minilora.course.grading import (ExerciseFailed, expect_equal, expect_tensor, expect_value_error, grader,
                                     max_abs_diff)
from minilora.inject import count_parameters, find_target_modules, inject
from minilora.lora import LoRALinear

F64 = torch.float64


# --- 3.1 ------------------------------------------------------------------------------------------------------

class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(4, 4)
        self.kq = nn.Linear(4, 4)  # ends in "q" but not in ".q"
        self.v = nn.Linear(4, 4)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = _Attention()
        self.q_proj = nn.Linear(4, 4)  # contains "q" and "proj"
        self.out = nn.Linear(4, 4)


class _Toy(nn.Module):
    """Names chosen so that substring and dot-less suffix matching pick up the wrong layers."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(4, 4)  # a top-level layer whose full name is exactly "q"
        self.layers = nn.ModuleList([_Block(), _Block()])
        self.v_head = nn.Linear(4, 2)


def _names(what: str, got: Any) -> list[str]:
    if isinstance(got, (str, bytes)) or not isinstance(got, (list, tuple)):
        raise ExerciseFailed(f"{what}: expected a list of module names (strings), got {type(got).__name__}")
    if not all(isinstance(n, str) for n in got):
        raise ExerciseFailed(f"{what}: every entry must be a module name (str), got {list(got)!r}")
    return list(got)


@grader("3.1", "find_targets")
def grade_3_1(fn):
    model = _Toy()
    all_names = [n for n, _ in model.named_modules() if n]

    def wrong(rule: Callable[[str, str], bool], keys: list[str]) -> list[str]:
        return [n for n in all_names if any(rule(n, k) for k in keys)]

    slips = [
        ("a key matches a name that equals it or ends with '.' + key; `key in name` (substring) also hits "
         "'layers.0.q_proj' and 'layers.0.attn.kq'", lambda n, k: k in n),
        ("name.endswith(key) without the dot also hits 'layers.0.attn.kq' for key 'q'; test "
         "name == key or name.endswith('.' + key)", lambda n, k: n.endswith(k)),
        ("a key that equals the full name matches too: the top-level layer is called just 'q'",
         lambda n, k: n.endswith("." + k)),
        ("match the end of the name, not its last part only: 'attn.q' must match 'layers.0.attn.q' and "
         "'layers.1.attn.q'", lambda n, k: n.rsplit(".", 1)[-1] == k.rsplit(".", 1)[-1]),
    ]
    for keys in (["q", "v"], ["attn.q", "out"], ["layers.1.q_proj"], ["q_proj", "v_head", "v"]):
        expected = find_target_modules(model, keys)
        got = _names(f"find_targets(model, {keys})", fn(model, list(keys)))
        if got != expected:
            hint = next((h for h, rule in slips if wrong(rule, keys) == got), "")
            if not hint and sorted(got) == sorted(expected):
                hint = "the right names in the wrong order; list them in model.named_modules() order"
            raise ExerciseFailed(f"find_targets(model, {keys}): expected {expected}, got {got}"
                                 + (f"; hint: {hint}" if hint else "") + f" (the toy model's modules: {all_names})")
    try:
        fn(model, ["q", "k_proj"])
    except ValueError as err:
        if "k_proj" not in str(err):
            raise ExerciseFailed("find_targets(model, ['q', 'k_proj']) raised ValueError, but its message should "
                                 f"name the key that matched nothing ('k_proj'); got: {err}") from None
    except NotImplementedError:
        raise
    except Exception as err:
        raise ExerciseFailed(f"find_targets(model, ['q', 'k_proj']) raised {type(err).__name__}; a key that "
                             "matches nothing is a ValueError naming the key (a typo must not train nothing "
                             "silently)") from None
    else:
        raise ExerciseFailed("find_targets(model, ['q', 'k_proj']): 'k_proj' matches no module, so expected a "
                             "ValueError naming it; nothing was raised (PEFT refuses such a config too)")


# --- 3.2 ------------------------------------------------------------------------------------------------------

class _Tied(nn.Module):
    """An embedding tied to the output layer, as in GPT-2 or small Llamas with tie_word_embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.body = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6))
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.embed.weight


def _pair(what: str, got: Any) -> tuple[int, int]:
    if not isinstance(got, tuple) or len(got) != 2:
        raise ExerciseFailed(f"{what}: expected a pair (trainable, total), got {got!r}")
    try:
        return int(got[0]), int(got[1])
    except (TypeError, ValueError):
        raise ExerciseFailed(f"{what}: expected two integers, got {got!r}") from None


@grader("3.2", "count_trainable")
def grade_3_2(fn):
    def all_tensors(model: nn.Module, only_trainable: bool) -> int:
        # the slip: every module's own parameters plus its children's, so nested ones count more than once
        return sum(p.numel() for m in model.modules() for p in m.parameters() if p.requires_grad or not only_trainable)

    def no_dedup(model: nn.Module, only_trainable: bool) -> int:
        return sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False)
                   if p.requires_grad or not only_trainable)

    cases = []
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3))
    cases.append(("an nn.Sequential(Linear(5, 7), Linear(7, 3)), all trainable", plain))
    tied = _Tied()
    cases.append(("a model whose output layer shares the embedding's weight (tied), all trainable", tied))
    frozen = _Tied()
    inject(frozen, ["body.0", "body.2"], r=2, lora_alpha=4)
    cases.append(("the tied model with LoRA (r=2) on body.0 and body.2, the rest frozen", frozen))
    for what, model in cases:
        expected = count_parameters(model)
        got = _pair(f"count_trainable on {what}", fn(model))
        if got != expected:
            hint = ""
            if got[1] == no_dedup(model, False) != expected[1]:
                hint = ("the tied weight was counted twice: model.parameters() yields a shared tensor once, "
                        "named_parameters(remove_duplicate=False) or summing per module does not")
            elif got[1] == all_tensors(model, False):
                hint = ("summing p for every module in model.modules() counts a layer's parameters once for "
                        "itself and again for each parent; iterate model.parameters() once")
            elif got[0] == expected[1] and got[0] != expected[0]:
                hint = "'trainable' means requires_grad=True; frozen parameters count in the total only"
            elif got == (expected[1], expected[0]):
                hint = "the pair is (trainable, total), in that order"
            raise ExerciseFailed(f"count_trainable on {what}: expected (trainable, total) = {expected}, got {got}"
                                 + (f"; hint: {hint}" if hint else ""))


# --- 3.3 ------------------------------------------------------------------------------------------------------

def _linear_case(seed: int, n_in: int, n_out: int, r: int, bias: bool = True, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n_out, n_in, generator=gen))
        if bias:
            lin.bias.copy_(torch.randn(n_out, generator=gen))
    a = torch.randn(r, n_in, generator=gen)
    b = torch.randn(n_out, r, generator=gen)
    return lin.to(dtype).requires_grad_(False), a, b


@grader("3.3", "merge_linear")
def grade_3_3(fn):
    lin, a, b = _linear_case(0, n_in=6, n_out=5, r=3)
    s = 1.5
    w_before, b_before = lin.weight.clone(), lin.bias.clone()
    merged = fn(lin, a.clone(), b.clone(), s)
    if not isinstance(merged, nn.Linear):
        raise ExerciseFailed(f"merge_linear must return an nn.Linear (a plain layer: that is the point of "
                             f"merging), got {type(merged).__name__}")
    if merged is lin or merged.weight is lin.weight or not torch.equal(lin.weight, w_before):
        raise ExerciseFailed("merge_linear changed or reused the layer it was given; build a new nn.Linear and "
                             "leave the input alone (the base model may serve other adapters)")
    if not torch.equal(lin.bias, b_before):
        raise ExerciseFailed("merge_linear changed the input layer's bias; leave the input alone")
    expect_equal("merged layer (in_features, out_features)", (merged.in_features, merged.out_features), (6, 5))
    if merged.bias is None:
        raise ExerciseFailed("the merged layer has no bias, but the base layer had one; LoRA leaves the bias "
                             "as it is, so copy it over")
    ref = LoRALinear(lin, r=3, lora_alpha=s * 3)  # scaling alpha/r = s
    with torch.no_grad():
        ref.lora_A["default"].copy_(a)
        ref.lora_B["default"].copy_(b)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(x)
        got = merged(x)
    if max_abs_diff(got, expected) > 1e-4:
        w = lin.weight.detach()
        slips = [
            ("multiply B A by the scaling", w + b @ a),
            ("the update is W0 + s·B A; you subtracted it", w - s * (b @ a)),
        ]
        hint = next((h for h, cand in slips if max_abs_diff(merged.weight, cand) < 1e-4), "")
        if not hint and max_abs_diff(merged.weight, w + s * (b @ a)) < 1e-4:
            hint = "the weight is right; copy the base layer's bias unchanged"
        raise ExerciseFailed(f"merged(x) differs from the unmerged LoRA layer by up to {max_abs_diff(got, expected):.3g} "
                             f"(nn.Linear(6, 5), r=3, scaling 1.5)" + (f"; hint: {hint}" if hint else ""))
    if any(p.requires_grad for p in merged.parameters()):
        raise ExerciseFailed("the merged layer's parameters have requires_grad=True; a merged model is for "
                             "inference, so freeze them as the base was")

    # a square layer lets the transposed update through without a shape error
    sq, a2, b2 = _linear_case(2, n_in=4, n_out=4, r=2, bias=False)
    merged = fn(sq, a2.clone(), b2.clone(), 2.0)
    expected = sq.weight + 2.0 * (b2 @ a2)
    if merged.bias is not None:
        raise ExerciseFailed("the base layer had no bias (bias=False); the merged layer must not get one either")
    if max_abs_diff(merged.weight, expected) > 1e-5:
        hint = ("; hint: the update is B A, of shape (out, in); A B or (B A)ᵀ only fits a square layer by accident"
                if max_abs_diff(merged.weight, sq.weight + 2.0 * (b2 @ a2).T) < 1e-5 else "")
        raise ExerciseFailed(f"square layer (4×4, no bias): merged weight differs from W0 + s·B A by "
                             f"{max_abs_diff(merged.weight, expected):.3g}{hint}")

    # bfloat16 base: the merged layer keeps the base's dtype (the sum is best done in fp32, then rounded once)
    half, a3, b3 = _linear_case(3, n_in=8, n_out=8, r=2, dtype=torch.bfloat16)
    merged = fn(half, a3.clone(), b3.clone(), 0.5)
    if merged.weight.dtype != torch.bfloat16:
        raise ExerciseFailed(f"merging into a bfloat16 layer must give a bfloat16 layer (same memory, same "
                             f"kernels); got weight dtype {merged.weight.dtype}")
    expected = (half.weight.float() + 0.5 * (b3 @ a3)).to(torch.bfloat16)
    if max_abs_diff(merged.weight, expected) > 0.02 * expected.abs().max().item():
        raise ExerciseFailed("bfloat16 layer: the merged weight is far from W0 + s·B A rounded to bfloat16; "
                             "compute the sum in float32 and cast once")


# --- 3.4 ------------------------------------------------------------------------------------------------------

def _adapters(seed: int, ranks: list[int], n_in: int = 6, n_out: int = 5):
    gen = torch.Generator().manual_seed(seed)
    As = [torch.randn(r, n_in, generator=gen, dtype=F64) for r in ranks]
    Bs = [torch.randn(n_out, r, generator=gen, dtype=F64) for r in ranks]
    return As, Bs


@grader("3.4", "cat_adapters")
def grade_3_4(fn):
    ranks, scalings, weights = [2, 3], [2.0, 0.5], [0.7, -1.2]
    As, Bs = _adapters(0, ranks)
    expected = sum(w * s * (b @ a) for a, b, s, w in zip(As, Bs, scalings, weights))
    out = fn([a.clone() for a in As], [b.clone() for b in Bs], list(scalings), list(weights))
    if not isinstance(out, tuple) or len(out) != 2:
        raise ExerciseFailed("cat_adapters must return a pair (A, B)")
    what = "cat_adapters with ranks [2, 3] on a (5, 6) layer"
    if isinstance(out[0], torch.Tensor) and tuple(out[0].shape) == (2, 6):
        raise ExerciseFailed(f"{what}: A has shape (2, 6), the rank of one adapter. Summing the A's (and the B's) "
                             "is PEFT's 'linear' combination, which needs equal ranks and does not give "
                             "Σ w_i ΔW_i; stack them instead: the new rank is r_1 + r_2")
    a_new = expect_tensor(f"{what}: A (rows of all adapters stacked)", out[0], (5, 6))
    b_new = expect_tensor(f"{what}: B (columns side by side)", out[1], (5, 5))
    got = b_new.to(F64) @ a_new.to(F64)
    if max_abs_diff(got, expected) > 1e-9:
        def recipe(fa: Callable, fb: Callable) -> torch.Tensor:
            a = torch.cat([fa(a, s, w) for a, s, w in zip(As, scalings, weights)], 0)
            b = torch.cat([fb(b, s, w) for b, s, w in zip(Bs, scalings, weights)], 1)
            return b @ a

        slips = [
            ("put w_i·s_i on one factor only: scaling both A_i and B_i multiplies ΔW_i by (w_i·s_i)²",
             recipe(lambda a, s, w: w * s * a, lambda b, s, w: w * s * b)),
            ("each adapter's own scaling s_i = alpha_i / r_i belongs in the product: ΔW_i = s_i · B_i A_i",
             recipe(lambda a, s, w: w * a, lambda b, s, w: b)),
            ("the weights w_i are missing: the result must be Σ w_i·s_i·B_i A_i",
             recipe(lambda a, s, w: s * a, lambda b, s, w: b)),
        ]
        hint = next((h for h, cand in slips if max_abs_diff(got, cand) < 1e-9), "")
        raise ExerciseFailed(f"{what}: B_new A_new differs from Σ w_i·s_i·B_i A_i by up to {max_abs_diff(got, expected):.3g}"
                             + (f"; hint: {hint}" if hint else ""))
    # three adapters, one of rank 1, on a wide layer
    ranks, scalings, weights = [1, 4, 2], [1.0, 2.0, 4.0], [0.5, 0.25, 1.0]
    As, Bs = _adapters(1, ranks, n_in=9, n_out=3)
    a_new, b_new = fn(As, Bs, scalings, weights)
    expect_tensor("cat_adapters with ranks [1, 4, 2] on a (3, 9) layer: A", a_new, (7, 9))
    expect_tensor("cat_adapters with ranks [1, 4, 2] on a (3, 9) layer: B", b_new, (3, 7))
    expected = sum(w * s * (b @ a) for a, b, s, w in zip(As, Bs, scalings, weights))
    if max_abs_diff(b_new.to(F64) @ a_new.to(F64), expected) > 1e-9:
        raise ExerciseFailed("with three adapters (ranks 1, 4, 2) B_new A_new is not Σ w_i·s_i·B_i A_i")
    for bad in [([As[0]], [Bs[0], Bs[1]], [1.0], [1.0]), (As, Bs, scalings, [1.0, 2.0])]:
        expect_value_error(fn, bad, "cat_adapters with lists of different lengths",
                           "all four lists need one entry per adapter (zip would silently drop one)")
