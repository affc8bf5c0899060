"""Graders for chapter 12, beyond LoRA.

References: `minilora.adapters.BottleneckAdapter` for the adapter, `minilora.adalora.RankAllocator` for the
importance update, the triplet score and the budget schedule (both checked against PEFT 0.21.2), and exact
linear algebra for intruder dimensions, on small float64 cases. The usual slips are named when made: an
adapter run in parallel with its sublayer instead of after it, a lost residual or non-linearity, importance
without its smoothing, the uncertainty measured from the old average, sums where means belong, a linear
schedule, cosines without their absolute value, a comparison with only W0's top directions.
"""

from __future__ import annotations

import torch
from torch import nn

from minilora.adalora import AdaLoRAConfig, RankAllocator, inject_adalora
from minilora.adapters import BottleneckAdapter
from minilora.course.grading import ExerciseFailed, brief, expect_tensor, grader, max_abs_diff, tensor_mistake

F64 = torch.float64


# --- 12.1 ------------------------------------------------------------------------------------------------------

def _adapter_case(seed: int) -> tuple[nn.Module, BottleneckAdapter, torch.Tensor]:
    """A square sublayer (so that a parallel adapter also runs, and can be told apart) and a non-trivial adapter."""
    torch.manual_seed(seed)
    sublayer = nn.Linear(6, 6).to(F64)
    adapter = BottleneckAdapter(6, 3).to(F64)
    nn.init.normal_(adapter.up.weight)
    nn.init.normal_(adapter.up.bias)
    return sublayer, adapter, torch.randn(4, 6, dtype=F64)


@grader("12.1", "adapter_forward")
def grade_12_1(fn):
    gelu = nn.functional.gelu
    for seed in (0, 1):
        sub, ad, x = _adapter_case(seed)
        with torch.no_grad():
            want = ad(sub(x))
            got = expect_tensor("adapter_forward(sublayer, down, up, x) on x: (4, 6)", fn(sub, ad.down, ad.up, x), (4, 6))
            if max_abs_diff(got, want) > 1e-9:
                h = sub(x)
                hint = tensor_mistake(got, [
                    ("the adapter ran in PARALLEL with the sublayer (on x); Houlsby's adapter runs in sequence, on the "
                     "sublayer's output h", lambda: h + ad.up(gelu(ad.down(x)))),
                    ("the residual is missing: the adapter adds its output to h", lambda: ad.up(gelu(ad.down(h)))),
                    ("the non-linearity is missing: without it the adapter is linear and could be merged",
                     lambda: h + ad.up(ad.down(h))),
                    ("the non-linearity belongs between the two projections, not after up",
                     lambda: h + gelu(ad.up(ad.down(h)))),
                ], 1e-9)
                raise ExerciseFailed(f"on a 6 -> 6 sublayer with a bottleneck of 3 (seed {seed}): expected "
                                     f"{brief(want[0])}, got {brief(got[0])}{hint}")


# --- 12.2 ------------------------------------------------------------------------------------------------------

def _reference_importance(ps, grads, beta1, beta2):
    """Run RankAllocator.update_importance on a one-layer model whose λ take the given values and gradients."""
    model = nn.Sequential(nn.Linear(3, 3)).to(F64)
    config = AdaLoRAConfig(target_modules=["0"], init_r=ps[0].shape[0], target_r=1, total_step=10,
                           beta1=beta1, beta2=beta2)
    inject_adalora(model, config)
    layer = model[0]
    allocator = RankAllocator(model, config)
    out = []
    for p, g in zip(ps, grads):
        with torch.no_grad():
            layer.lora_E.copy_(p)
        for q in (layer.lora_A, layer.lora_E, layer.lora_B):
            q.grad = torch.zeros_like(q)
        layer.lora_E.grad = g.clone()
        allocator.update_importance()
        out.append((allocator.smoothed[("0", "E")].clone(), allocator.uncertainty[("0", "E")].clone()))
    return out


@grader("12.2", "update_importance")
def grade_12_2(fn):
    gen = torch.Generator().manual_seed(0)
    ps = [torch.randn(4, 1, dtype=F64, generator=gen) for _ in range(3)]
    grads = [torch.randn(4, 1, dtype=F64, generator=gen) for _ in range(3)]
    beta1, beta2 = 0.85, 0.7
    want = _reference_importance(ps, grads, beta1, beta2)
    smoothed, unc = torch.zeros(4, 1, dtype=F64), torch.zeros(4, 1, dtype=F64)
    for step, ((p, g), (w_s, w_u)) in enumerate(zip(zip(ps, grads), want), start=1):
        prev_s, prev_u = smoothed, unc
        result = fn(p, g, smoothed, unc, beta1, beta2)
        if not (isinstance(result, tuple) and len(result) == 2):
            raise ExerciseFailed("update_importance must return a pair (smoothed, uncertainty)")
        smoothed, unc = (expect_tensor(f"step {step}: {what}", t, (4, 1)) for what, t in zip(("smoothed", "uncertainty"), result))
        what = f"step {step} (beta1={beta1}, beta2={beta2})"
        sens = (p * g).abs()
        if max_abs_diff(smoothed, w_s) > 1e-12:
            hint = tensor_mistake(smoothed, [
                ("no smoothing: the score must be the exponential moving average of |w·grad|, "
                 "beta1·previous + (1 - beta1)·current, not this step's sensitivity alone", lambda: sens),
                ("the weights are swapped: beta1 multiplies the previous average", lambda: (1 - beta1) * prev_s + beta1 * sens),
                ("the sensitivity is |w·grad| (absolute value of the product), not |grad|",
                 lambda: beta1 * prev_s + (1 - beta1) * g.abs()),
            ], 1e-12)
            raise ExerciseFailed(f"{what}: smoothed sensitivity expected {brief(w_s)}, got {brief(smoothed)}{hint}")
        if max_abs_diff(unc, w_u) > 1e-12:
            hint = tensor_mistake(unc, [
                ("the uncertainty compares this step's sensitivity with the NEW average (after this step's update)",
                 lambda: beta2 * prev_u + (1 - beta2) * (sens - prev_s).abs()),
                ("the uncertainty is smoothed too: beta2·previous + (1 - beta2)·|I - Ī|", lambda: (sens - w_s).abs()),
            ], 1e-12)
            raise ExerciseFailed(f"{what}: uncertainty expected {brief(w_u)}, got {brief(unc)}{hint}")


# --- 12.3 ------------------------------------------------------------------------------------------------------

@grader("12.3", "triplet_scores")
def grade_12_3(fn):
    gen = torch.Generator().manual_seed(1)
    r, d_in, d_out = 4, 5, 7
    s_A = torch.rand(r, d_in, dtype=F64, generator=gen)
    s_E = torch.rand(r, 1, dtype=F64, generator=gen)
    s_B = torch.rand(d_out, r, dtype=F64, generator=gen)
    # the reference: RankAllocator.triplet_scores with these element scores (Ī = s, Ū = 1)
    model = nn.Sequential(nn.Linear(d_in, d_out)).to(F64)
    config = AdaLoRAConfig(target_modules=["0"], init_r=r, target_r=1, total_step=10)
    inject_adalora(model, config)
    allocator = RankAllocator(model, config)
    for part, s in (("A", s_A), ("E", s_E), ("B", s_B)):
        allocator.smoothed[("0", part)], allocator.uncertainty[("0", part)] = s, torch.ones_like(s)
    want = allocator.triplet_scores()["0"]
    got = expect_tensor(f"triplet_scores(s_A: ({r}, {d_in}), s_E: ({r}, 1), s_B: ({d_out}, {r}))", fn(s_A, s_E, s_B), (r,))
    if max_abs_diff(got, want) > 1e-12:
        hint = tensor_mistake(got, [
            ("sum where PEFT takes the mean: a triplet's column of P and row of Q count by their MEAN score, so "
             "wide layers do not win by size", lambda: s_E.view(-1) + s_A.sum(1) + s_B.sum(0)),
            ("the right axes: Q = lora_A is (r, in), average each ROW; P = lora_B is (out, r), average each COLUMN",
             lambda: s_E.view(-1) + s_A.mean(0)[:r] + s_B.mean(1)[:r]),
            ("λ's own score is part of it", lambda: s_A.mean(1) + s_B.mean(0)),
        ], 1e-12)
        raise ExerciseFailed(f"expected {brief(want)}, got {brief(got)}{hint}")


# --- 12.4 ------------------------------------------------------------------------------------------------------

@grader("12.4", "cubic_budget")
def grade_12_4(fn):
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(3)])
    config = AdaLoRAConfig(target_modules=["0", "1", "2"], init_r=12, target_r=4, total_step=100, tinit=10,
                           tfinal=20)
    inject_adalora(model, config)
    allocator = RankAllocator(model, config)
    for step in (0, 10, 11, 25, 45, 60, 79, 80, 81, 100):
        want = allocator.budget(step)[0]
        got = fn(step, 36, 12, 10, 20, 100)
        if got != want:
            progress = (step - 10) / 70
            hint = ""
            if 10 < step <= 80 and got == int(24 * (1 - progress) + 12):
                hint = "; hint: the budget falls along a CUBIC, (1 - progress)**3, fast at first and slowly at the end"
            elif step > 80 and got != 12:
                hint = "; hint: after total_step - tfinal the budget stays at the target"
            elif step <= 10 and got != 36:
                hint = "; hint: during the first tinit steps every singular value stays (the initial budget)"
            elif 10 < step <= 80 and isinstance(got, float):
                hint = "; hint: a budget counts singular values: round down with int()"
            raise ExerciseFailed(f"cubic_budget(step={step}, init=36, target=12, tinit=10, tfinal=20, total=100): "
                                 f"expected {want}, got {got!r}{hint}")


# --- 12.5 ------------------------------------------------------------------------------------------------------

@grader("12.5", "count_intruders")
def grade_12_5(fn):
    gen = torch.Generator().manual_seed(2)
    W0 = torch.randn(20, 12, dtype=F64, generator=gen)
    U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
    cases = []
    # (a) a fine-tuned weight whose top directions are W0's own, some with flipped signs: no intruders
    flipped = U * torch.tensor([(-1.0) ** i for i in range(12)], dtype=F64)
    cases.append(("W0's singular vectors with flipped signs and boosted values", (flipped * (S * 1.5)) @ Vh))
    # (b) W0 plus a large rank-2 update along new directions: intruders
    new = torch.randn(20, 2, dtype=F64, generator=gen)
    cases.append(("W0 plus a large rank-2 update", W0 + 4 * new @ torch.randn(2, 12, dtype=F64, generator=gen)))
    # (c) a top direction that matches one of W0's *small* singular vectors: no intruder there
    swapped = U[:, [11] + list(range(11))] * torch.cat([S[:1] * 3, S[1:]])
    cases.append(("W0 whose smallest direction became the largest", swapped @ Vh))

    def reference(W):
        Uf = torch.linalg.svd(W, full_matrices=False)[0][:, :5]
        return int(((Uf.T @ U).abs().max(dim=1).values < 0.5).sum())

    for what, W in cases:
        want = reference(W)
        got = fn(W0, W, 5, 0.5)
        if got != want:
            Uf = torch.linalg.svd(W, full_matrices=False)[0][:, :5]
            hint = ""
            if got == int(((Uf.T @ U).max(dim=1).values < 0.5).sum()):
                hint = ("; hint: a singular vector's sign is arbitrary (u and -u are the same direction): compare "
                        "|cos|, not cos")
            elif got == int(((Uf.T @ U[:, :5]).abs().max(dim=1).values < 0.5).sum()):
                hint = "; hint: compare with ALL of W0's singular vectors, not only its top k"
            elif got == int(((Uf.T @ U).abs().max(dim=1).values > 0.5).sum()):
                hint = "; hint: an intruder is a direction with NO close match: max |cos| below epsilon"
            raise ExerciseFailed(f"{what}, k=5, epsilon=0.5: expected {want} intruders, got {got!r}{hint}")
