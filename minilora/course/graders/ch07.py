"""Graders for chapter 7 (paged optimizers): the AdamW update, chunk plans, host memory, PCIe time.

References: `torch.optim.AdamW` (single-tensor, float64) for the update, `minilora.paged.plan_chunks` for the
chunk plan, and exact arithmetic for the byte and time counts. When an answer is wrong, the grader also
tries the usual mistakes on the same case and names the one the answer matches.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from minilora.course.grading import ExerciseFailed, expect_close, grader
from minilora.paged import plan_chunks as _library_plan_chunks

# ---------------------------------------------------------------------------------------------------------
# 7.1 One AdamW step


def _adamw_variant(p, g, m, v, step, lr, betas, eps, wd, mistake: str | None = None):
    """AdamW in float64 as a reference, or with one typical `mistake` (to recognise it in an answer)."""
    b1, b2 = betas
    p, g, m, v = p.clone(), g.clone(), m.clone(), v.clone()
    t = step
    if mistake == "step off by one":
        t = step + 1
    if mistake == "L2 instead of decoupled decay":
        g = g + wd * p
    elif mistake == "decay without lr":
        p = p * (1 - wd)
    elif mistake != "decay on the moments" and mistake != "decay after the update":
        p = p * (1 - lr * wd)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    if mistake == "decay on the moments":
        m, v = m * (1 - lr * wd), v * (1 - lr * wd)
    if mistake == "no bias correction":
        m_hat, v_hat = m, v
    elif mistake == "betas swapped in the correction":
        m_hat, v_hat = m / (1 - b2**t), v / (1 - b1**t)
    else:
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
    if mistake == "eps inside the sqrt":
        p = p - lr * m_hat / torch.sqrt(v_hat + eps)
    else:
        p = p - lr * m_hat / (torch.sqrt(v_hat) + eps)
    if mistake == "decay after the update":
        p = p * (1 - lr * wd)
    return p, m, v


_HINTS = {
    "step off by one": "your bias correction looks one step ahead: at the first update t = 1, so the "
                       "corrections are 1 - beta1**1 and 1 - beta2**1 (`step` is the number of this update)",
    "no bias correction": "divide m by (1 - beta1**t) and v by (1 - beta2**t) before using them: early on the "
                          "moments are biased towards their zero start",
    "betas swapped in the correction": "m is corrected with beta1, v with beta2",
    "L2 instead of decoupled decay": "that is Adam with L2 regularisation (decay added to the gradient, so it "
                                     "goes into the moments); AdamW decays the parameter directly: p *= 1 - lr*wd",
    "decay on the moments": "weight decay shrinks the parameter, p *= 1 - lr*wd, not the moments m and v",
    "decay without lr": "decoupled decay is scaled by the learning rate: p *= 1 - lr*weight_decay",
    "decay after the update": "apply the decay to the parameter before the Adam update (torch's order): "
                              "p *= 1 - lr*wd, then p -= lr * m_hat / (sqrt(v_hat) + eps)",
    "eps inside the sqrt": "eps is added after the square root: sqrt(v_hat) + eps",
}


def _guess(fn_out, case, which: int) -> str:
    """The hint for the first typical mistake whose output `which` (0: p, 1: m, 2: v) matches the answer's."""
    if not torch.isfinite(fn_out[which]).all():
        return (" Hint: the result is not finite; at the first update t = 1 (`step` counts from 1), so the "
                "bias corrections 1 - beta**t are never zero.")
    for mistake, hint in _HINTS.items():
        variant = _adamw_variant(*case, mistake=mistake)
        if torch.allclose(fn_out[which], variant[which], rtol=1e-9, atol=1e-12):
            return " Hint: " + hint + "."
    if which:
        step, betas = case[4], case[6]
        _, m, v = _adamw_variant(*case)
        hat = m / (1 - betas[0] ** step) if which == 1 else v / (1 - betas[1] ** step)
        if torch.allclose(fn_out[which], hat, rtol=1e-9, atol=1e-12):
            return (" Hint: return the moments themselves; the bias correction only enters the update of p, "
                    "and the next step continues from the uncorrected m and v.")
        return (" Hint: m = beta1*m + (1 - beta1)*g and v = beta2*v + (1 - beta2)*g*g, with the raw gradient "
                "(not bias-corrected, not decayed).")
    return ""


def _torch_reference(p0, grads, lr, betas, eps, wd):
    """Parameters, m and v after each step of torch.optim.AdamW (single-tensor, float64)."""
    p = p0.clone().requires_grad_()
    opt = torch.optim.AdamW([p], lr=lr, betas=betas, eps=eps, weight_decay=wd, foreach=False)
    out = []
    for g in grads:
        p.grad = g.clone()
        opt.step()
        st = opt.state[p]
        out.append((p.detach().clone(), st["exp_avg"].clone(), st["exp_avg_sq"].clone()))
    return out


@grader("7.1", "adamw_step")
def grade_7_1(fn: Callable) -> None:
    gen = torch.Generator().manual_seed(7)
    settings = [dict(lr=0.1, betas=(0.9, 0.999), eps=1e-8, wd=0.5),
                dict(lr=0.03, betas=(0.8, 0.95), eps=1e-3, wd=0.0)]
    for s in settings:
        p0 = torch.randn(3, 4, generator=gen, dtype=torch.float64)
        grads = [torch.randn(3, 4, generator=gen, dtype=torch.float64) * 0.1 for _ in range(4)]
        ref = _torch_reference(p0, grads, s["lr"], s["betas"], s["eps"], s["wd"])
        p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
        for t, (g, (rp, rm, rv)) in enumerate(zip(grads, ref), start=1):
            args = (p.clone(), g.clone(), m.clone(), v.clone())
            kept = [a.clone() for a in args]
            out = fn(*args, t, s["lr"], s["betas"], s["eps"], s["wd"])
            if not (isinstance(out, tuple) and len(out) == 3 and all(isinstance(x, torch.Tensor) for x in out)):
                raise ExerciseFailed(f"adamw_step must return a tuple (p, m, v) of tensors, got {type(out).__name__}")
            if any(not torch.equal(a, k) for a, k in zip(args, kept)):
                raise ExerciseFailed("adamw_step changed its input tensors; return new tensors instead "
                                     "(use p * ..., not p.mul_(...))")
            case = f"step {t} with lr={s['lr']}, betas={s['betas']}, eps={s['eps']}, weight_decay={s['wd']}"
            inputs = (p, g, m, v, t, s["lr"], s["betas"], s["eps"], s["wd"])
            for which, name, want in ((1, "m", rm), (2, "v", rv), (0, "the parameter", rp)):
                got = out[which]
                if got.shape != want.shape:
                    raise ExerciseFailed(f"{case}: {name} has shape {tuple(got.shape)}, expected {tuple(want.shape)}")
                if not torch.allclose(got, want, rtol=1e-10, atol=1e-14):
                    raise ExerciseFailed(f"{case}: {name} differs from torch.optim.AdamW's by up to "
                                         f"{(got - want).abs().max().item():.3g}.{_guess(out, inputs, which)}")
            p, m, v = out


# ---------------------------------------------------------------------------------------------------------
# 7.2 Chunk plans


def _as_triples(plan: Any, call: str) -> list[list[tuple[int, int, int]]]:
    try:
        triples = [[tuple(piece) for piece in chunk] for chunk in plan]
        ok = all(len(t) == 3 for chunk in triples for t in chunk)
    except TypeError:
        ok = False
    if not ok:
        raise ExerciseFailed(f"{call} must return a list of chunks, each a list of (index, start, stop) "
                             f"triples; got {plan!r}")
    if any(not isinstance(x, int) for chunk in triples for t in chunk for x in t):
        raise ExerciseFailed(f"{call} returned non-integer positions ({triples}). Hint: a chunk holds a whole "
                             "number of elements: budget_bytes // bytes_per_elem.")
    return triples


def _diagnose_plan(got: list, sizes: list[int], capacity: int) -> str:
    pieces = [pc for chunk in got for pc in chunk]
    if any(stop <= start for _, start, stop in pieces):
        return " Hint: every piece must hold at least one element (skip empty parameters)."
    for k, chunk in enumerate(got):
        held = sum(stop - start for _, start, stop in chunk)
        if held > capacity:
            return (f" Hint: chunk {k} holds {held} elements, more than the {capacity} that fit; a parameter "
                    "larger than what is left of a chunk must be split.")
    covered = {i: 0 for i in range(len(sizes))}
    for i, start, stop in pieces:
        if i not in covered or start != covered[i]:
            return (f" Hint: pieces must cover each parameter in order, without gaps or overlaps "
                    f"(parameter {i} continues at {covered.get(i)}, got a piece starting at {start}).")
        covered[i] = stop
    if [covered[i] for i in range(len(sizes))] != list(sizes):
        return " Hint: every element of every parameter must be in exactly one piece."
    if len(got) > -(-sum(sizes) // capacity):
        return (" Hint: pack parameters back to back: when a parameter ends, the next one starts in the same "
                "chunk if there is room, so every chunk but the last is full.")
    return ""


@grader("7.2", "plan_chunks")
def grade_7_2(fn: Callable) -> None:
    cases = [([10, 3, 7], 48, 8), ([5, 5, 5], 40, 4), ([4, 0, 9], 24, 4), ([100], 70, 8), ([1, 2, 3, 4], 1000, 36),
             ([17, 1, 1, 30], 50, 8)]
    for sizes, budget, bpe in cases:
        capacity = budget // bpe
        want = [[(pc.index, pc.start, pc.stop) for pc in chunk] for chunk in _library_plan_chunks(sizes, capacity)]
        call = f"plan_chunks({sizes}, budget_bytes={budget}, bytes_per_elem={bpe})"
        got = _as_triples(fn(list(sizes), budget, bpe), call)
        if got != want:
            hint = _diagnose_plan(got, sizes, capacity)
            raise ExerciseFailed(f"{call} (capacity {capacity} elements): expected {want}, got {got}.{hint}")
    try:
        fn([4, 4], 7, 8)
    except ValueError:
        pass
    else:
        raise ExerciseFailed("plan_chunks([4, 4], budget_bytes=7, bytes_per_elem=8) must raise ValueError: "
                             "not even one element fits in the budget")


# ---------------------------------------------------------------------------------------------------------
# 7.3 Host memory for the moments


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 0 else 0


def _host_ram(shapes: list[tuple[int, ...]], pinned: bool) -> int:
    total = 0
    for shape in shapes:
        nbytes = 4 * math.prod(shape)
        total += 2 * (_next_pow2(nbytes) if pinned else nbytes)
    return total


@grader("7.3", "host_ram_needed")
def grade_7_3(fn: Callable) -> None:
    cases = [[(1000, 1000)], [(4096, 4096)], [(2048, 5632), (2048,), (32000, 2048)], [(3, 5), (0, 7), (1,)]]
    for shapes in cases:
        for pinned in (False, True):
            got = fn(shapes, pinned=pinned)
            want = _host_ram(shapes, pinned)
            if got == want and isinstance(got, int):
                continue
            if got == want:
                raise ExerciseFailed(f"host_ram_needed({shapes}, pinned={pinned}) should return an int, "
                                     f"got {type(got).__name__}")
            case = f"host_ram_needed({shapes}, pinned={pinned}): expected {want:,} bytes, got {got!r}"
            hint = ""
            exact = _host_ram(shapes, False)
            if got in (want // 2, want // 4):
                hint = ("Adam keeps two moments per parameter, m and v, each fp32 (4 bytes per element) whatever "
                        "the parameter's dtype: 8 bytes per element")
            elif pinned and got == exact:
                hint = ("pinned tensors come from torch's caching host allocator, which rounds each request up to "
                        "a power of two bytes")
            elif pinned and got == _next_pow2(exact):
                hint = "round each tensor up on its own (each moment of each parameter is one allocation), not the total"
            elif isinstance(got, int) and 0 < got - want <= 16 * sum(math.prod(sh) == 0 for sh in shapes):
                hint = "an empty parameter (0 elements) takes no memory; note (0 - 1).bit_length() is 1, not 0"
            raise ExerciseFailed(case + (f". Hint: {hint}." if hint else ""))


# ---------------------------------------------------------------------------------------------------------
# 7.4 Time on PCIe per step


@grader("7.4", "paged_step_seconds")
def grade_7_4(fn: Callable) -> None:
    cases = [(1_100_048_384, 25.0, True), (8_030_261_248, 25.0, True), (8_030_261_248, 50.0, False),
             (42_000_000, 15.75, False)]
    for n, bw, duplex in cases:
        want = (8 if duplex else 16) * n / (bw * 1e9)
        got = fn(n, bw, full_duplex=duplex)
        try:
            expect_close(f"paged_step_seconds({n:,}, {bw}, full_duplex={duplex})", got, want, rel=1e-9)
        except ExerciseFailed as err:
            hint = ""
            value = float(got) if isinstance(got, (int, float)) else float("nan")
            ratio = value / want if want else float("nan")
            if math.isclose(ratio, 1e9 / 2**30, rel_tol=1e-6) or math.isclose(ratio, 2**30 / 1e9, rel_tol=1e-6):
                hint = "GB/s means 10**9 bytes per second, not 2**30"
            elif math.isclose(ratio, 0.5, rel_tol=1e-6):
                hint = ("each parameter has two fp32 moments (8 bytes), and they travel both ways; without full "
                        "duplex the two directions take turns" if not duplex else
                        "each parameter has two fp32 moments, m and v: 8 bytes each way")
            elif math.isclose(ratio, 2.0, rel_tol=1e-6):
                hint = ("with full duplex, the 8 bytes/param going to the GPU and the 8 coming back share the "
                        "time: count one direction" if duplex else "two moments of 4 bytes = 8 bytes each way")
            elif math.isclose(ratio, 8.0, rel_tol=1e-6) or math.isclose(ratio, 1 / 8, rel_tol=1e-6):
                hint = "the bandwidth is in bytes per second (GB/s), not bits"
            raise ExerciseFailed(str(err) + (f". Hint: {hint}." if hint else "")) from None
