"""Every grader rejects a plausible wrong answer, and says what is wrong with it when it can.

Each wrong answer is the worked solution (solutions/NN_*.ipynb) with one slip a learner could make, written
as a textual edit of the exercise cell; the edit must still apply, so the cases follow the solutions. A
grader that passes its wrong answer lets learners go on believing it; `hint` is a pattern the message must
contain (the grader named the slip), `not_hint` one it must not (a hint about a mistake not made).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from minilora.course.check import EXERCISE_LINE
from minilora.course.grading import ExerciseFailed, _lookup, run_grader

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Wrong:
    exercise: str
    slip: str  # the test id: what the wrong answer does
    old: str  # text of the solution's exercise cell ...
    new: str  # ... and what the wrong answer has instead
    hint: str | None = None  # regex the grader's message must match
    not_hint: str | None = None  # regex it must not match


WRONG = [
    # chapter 0
    Wrong("0.1", "no-gradients", "total = weights.itemsize + grads.itemsize + 2 * moments.itemsize",
          "total = weights.itemsize + 2 * moments.itemsize", hint="left out the gradients"),
    Wrong("0.2", "elements-not-bytes", "t.numel() * t.element_size()", "t.numel()", hint="counted elements"),
    Wrong("0.3", "GB-not-GiB", "* 2**30 / bytes_per_param", "* 1e9 / bytes_per_param", hint="GiB means 2\\*\\*30"),
    Wrong("0.4", "12-bytes", "16 * n_adapter", "12 * n_adapter", hint="16 bytes"),
    Wrong("0.5", "input-saved-twice", "kept += tokens * (hidden + intermediate) * s",
          "kept += tokens * (2 * hidden + intermediate) * s", hint="same input x"),
    Wrong("0.5", "frozen-saves-inputs", "    if weights_train:\n        # dW", "    if True:\n        # dW",
          hint="does not save its input"),
    Wrong("0.5", "silu-input-forgotten", "kept = 3 * tokens * intermediate * s", "kept = 2 * tokens * intermediate * s",
          hint="silu saves its input"),
    # chapter 1
    Wrong("1.1", "square-formula", "return r * d_in + d_out * r", "return 2 * d_in * r", hint="only holds when"),
    Wrong("1.2", "not-squared", "descending=True).values ** 2", "descending=True).values"),
    Wrong("1.3", "smallest-values", "(U[:, :r] * S[:r]) @ Vh[:r]", "(U[:, -r:] * S[-r:]) @ Vh[-r:]"),
    Wrong("1.4", "no-theta0", "return theta0 + (P @ z).reshape(theta0.shape)", "return (P @ z).reshape(theta0.shape)"),
    Wrong("1.5", "off-by-one", "- 1e-12).sum().item()) + 1", "- 1e-12).sum().item())"),
    # chapter 2
    Wrong("2.1", "integer-division", "(alpha / r)", "(alpha // r)", hint="alpha // r"),
    Wrong("2.1", "float32", "return x @ W0.T + (alpha / r) * ((x @ A.T) @ B.T)",
          "return (x.float() @ W0.float().T + (alpha / r) * ((x.float() @ A.float().T) @ B.float().T)).to(x.dtype)",
          hint="float64.*1e-9"),
    Wrong("2.2", "integer-division", "self.scaling = alpha / r", "self.scaling = alpha // r", hint="alpha // r"),
    Wrong("2.3", "float32", "dtype = torch.promote_types(W0.dtype, torch.float32)", "dtype = torch.float32",
          hint="float64.*1e-9"),
    Wrong("2.4", "accepts-non-integer-r", "if isinstance(r, bool) or not isinstance(r, int) or r < 1:",
          "if r <= 0:", hint="positive int"),
    Wrong("2.5", "unscaled-grad-A", "grad_A = scaling * (G @ B).T @ x", "grad_A = (G @ B).T @ x", hint="scaling"),
    # chapter 3
    Wrong("3.1", "substring", 'return full == key or full.endswith("." + key)', "return key in full",
          hint="substring"),
    Wrong("3.2", "tied-counted-twice", "for p in model.parameters():",
          "for _, p in model.named_parameters(remove_duplicate=False):", hint="counted twice"),
    Wrong("3.3", "bias-not-copied", "merged.bias.copy_(linear.bias)", "pass"),
    Wrong("3.4", "both-factors-scaled", "B_new = torch.cat(list(Bs), dim=1)",
          "B_new = torch.cat([w * s * b for b, s, w in zip(Bs, scalings, weights)], dim=1)", hint="one factor only"),
    # chapter 4
    Wrong("4.1", "no-zero-block-guard", "blocks / absmax.clamp(min=1e-38)[:, None]", "blocks / absmax[:, None]",
          hint="all-zero block"),
    Wrong("4.1", "eight-levels", "[:, None] * 7)", "[:, None] * 8)", hint="-7..7"),
    Wrong("4.2", "upper-code-at-midpoints", "torch.bucketize(x, midpoints)", "torch.bucketize(x, midpoints, right=True)",
          hint="LOWER code"),
    Wrong("4.2", "codes-not-midpoints", "torch.bucketize(x, midpoints)", "torch.bucketize(x, codes).clamp(max=len(codes) - 1)",
          not_hint="at a midpoint"),
    Wrong("4.2", "float64-distances", "torch.bucketize(x, midpoints)",
          "(x.double().unsqueeze(-1) - codes.double()).abs().argmin(dim=-1)", not_hint="at a midpoint|right=False"),
    Wrong("4.2", "float64-midpoints", "midpoints = (codes[:-1] + codes[1:]) / 2",
          "midpoints = (codes.double()[:-1] + codes.double()[1:]) / 2\n    x = x.double()",
          hint="midpoints computed in float64"),
    Wrong("4.3", "low-nibble-first", "(codes[0::2] << 4) | codes[1::2]", "(codes[1::2] << 4) | codes[0::2]",
          hint="HIGH nibble"),
    Wrong("4.4", "seven-positive", "torch.linspace(p_max, 0.5, 9)[:-1]", "torch.linspace(p_max, 0.5, 8)[:-1]",
          hint="7 negative"),
    Wrong("4.5", "natural-log", "p.log2()", "p.log()", hint="log base 2"),
    # chapter 5
    Wrong("5.1", "no-second-scale", "+ 32 / (blocksize * blocksize2)", "", hint="blocksize2"),
    Wrong("5.2", "no-offset", "offset = absmax.mean()", "offset = absmax.mean() * 0", hint="mean"),
    Wrong("5.3", "repeat-not-interleave", "scales.repeat_interleave(blocksize)", "scales.repeat(blocksize)",
          hint="repeat_interleave"),
    Wrong("5.4", "GiB-not-GB", "return n_params * bits[scheme] / 8 / 1e9", "return n_params * bits[scheme] / 8 / 2**30",
          hint="decimal"),
    # chapter 6
    Wrong("6.1", "no-scaling", "scaling * F.linear(F.linear(x, A), B)", "F.linear(F.linear(x, A), B)"),
    Wrong("6.2", "backward-transposed", "return grad_out @ dequantize_nf4(ctx.q, grad_out.dtype), None",
          "return grad_out @ dequantize_nf4(ctx.q, grad_out.dtype).T.contiguous().T.T, None"),
    Wrong("6.3", "adapter-12-bytes", "adapters * (4 + 4 + 8)", "adapters * (4 + 8)"),
    Wrong("6.4", "checkpointing-ignored", "if checkpointing:", "if False:"),
    # chapter 7
    Wrong("7.1", "no-bias-correction", "m_hat = m / (1 - beta1**step)", "m_hat = m"),
    Wrong("7.2", "capacity-off-by-one", "capacity = budget_bytes // bytes_per_elem",
          "capacity = max(1, budget_bytes // bytes_per_elem - 1)"),
    Wrong("7.3", "pinned-not-rounded", "if pinned and nbytes > 0:", "if False:"),
    Wrong("7.4", "duplex-inverted", "return one_way if full_duplex else 2 * one_way",
          "return 2 * one_way if full_duplex else one_way"),
    # chapter 8
    Wrong("8.1", "column-norms", "V.norm(dim=1, keepdim=True)", "V.norm(dim=0, keepdim=True)"),
    Wrong("8.1", "norm-not-detached", "V.norm(dim=1, keepdim=True).detach()", "V.norm(dim=1, keepdim=True)"),
    Wrong("8.2", "zero-rows-nan", "safe = torch.where(m > 0, m, torch.ones_like(m))", "safe = m"),
    Wrong("8.3", "signed-mean", "(Wt.norm(dim=1) - W0.norm(dim=1)).abs().mean()",
          "(Wt.norm(dim=1) - W0.norm(dim=1)).mean().abs()", hint="cancel"),
    Wrong("8.4", "magnitude-ones", "self.m = nn.Parameter(base.weight.detach().norm(dim=1).clone())",
          "self.m = nn.Parameter(torch.ones(base.out_features))"),
    # chapter 9
    Wrong("9.1", "vectors-in-group-A", '"lora_B" in name or p.ndim == 1', '"lora_B" in name'),
    Wrong("9.2", "off-by-one", "            return t\n", "            return t - 1\n"),
    Wrong("9.3", "alpha-over-r", "return alpha / math.sqrt(r)", "return alpha / r"),
    Wrong("9.4", "rslora-ignored", "scaling = alpha / math.sqrt(r) if rslora else alpha / r", "scaling = alpha / r"),
    Wrong("9.5", "inverted", "lr * scale(alpha_old, r_old) / scale(alpha_new, r_new)",
          "lr * scale(alpha_new, r_new) / scale(alpha_old, r_old)"),
    # chapter 10
    Wrong("10.1", "sum-not-max", "return max(flops / peak_flops, nbytes / bandwidth)",
          "return flops / peak_flops + nbytes / bandwidth",
          hint="LARGER"),
    Wrong("10.2", "no-backward-build", "builds = 2 * (2 * d_in * d_out)", "builds = 2 * d_in * d_out",
          hint="backward needs W'"),
    Wrong("10.3", "unscaled-grad-A", "grad_A = s * (g @ B).t() @ x", "grad_A = (g @ B).t() @ x", hint="scaling s"),
    # chapter 11
    Wrong("11.1", "no-system-turn", 'text = turn("system", SYSTEM) + turn("user", question)',
          'text = turn("user", question)', hint="system turn"),
    Wrong("11.2", "loss-on-prompt", "labels = torch.tensor([-100] * len(prompt_ids) + answer_ids)",
          "labels = ids.clone()", hint="-100"),
    Wrong("11.3", "no-shift", "z, y = logits[:, :-1], labels[:, 1:]", "z, y = logits, labels", hint="t\\+1"),
    Wrong("11.4", "sixteen-steps", "d = (hi - lo) / 15", "d = (hi - lo) / 16", hint="/ 15"),
    # chapter 12
    Wrong("12.1", "parallel-not-sequential", "h + up(nn.functional.gelu(down(h)))", "h + up(nn.functional.gelu(down(x)))",
          hint="PARALLEL"),
    Wrong("12.1", "no-non-linearity", "h + up(nn.functional.gelu(down(h)))", "h + up(down(h))", hint="non-linearity"),
    Wrong("12.2", "no-smoothing", "new_smoothed = beta1 * smoothed + (1 - beta1) * sensitivity",
          "new_smoothed = sensitivity", hint="no smoothing"),
    Wrong("12.2", "old-average", "(sensitivity - new_smoothed).abs()", "(sensitivity - smoothed).abs()", hint="NEW average"),
    Wrong("12.3", "sum-not-mean", "s_A.mean(dim=1) + s_B.mean(dim=0)", "s_A.sum(dim=1) + s_B.sum(dim=0)", hint="MEAN"),
    Wrong("12.4", "linear-schedule", "(1 - progress) ** 3", "(1 - progress)", hint="CUBIC"),
    Wrong("12.5", "signed-cosine", "(U.T @ U0).abs().max(dim=1)", "(U.T @ U0).max(dim=1)", hint="sign"),
    Wrong("12.5", "top-k-only", "(U.T @ U0).abs().max(dim=1)", "(U.T @ U0[:, :k]).abs().max(dim=1)", hint="ALL"),
    # chapter 13
    Wrong("13.1", "array-split", "return [max(0, min(size, n_rows - k * size)) for k in range(world_size)]",
          "return [n_rows // world_size + (1 if k < n_rows % world_size else 0) for k in range(world_size)]",
          hint="array_split"),
    Wrong("13.2", "one-gather", "return 2 * param_bytes * share + grad_bytes * share",
          "return param_bytes * share + grad_bytes * share", hint="before its backward"),
    Wrong("13.2", "all-reduce-once", "return 2 * grad_bytes * share", "return grad_bytes * share",
          hint="reduce-scatter then an all-gather"),
    Wrong("13.3", "half-byte-nf4", "counts.frozen_4bit * M.nf4_bytes_per_param()", "counts.frozen_4bit * 0.5",
          hint="block scales"),
    Wrong("13.3", "working-sharded", "return working_bytes + (0 if offload else state / world_size)",
          "return (working_bytes + state) / world_size", hint="not divided by N"),
]


def _exercise_cells() -> dict[str, str]:
    cells = {}
    for path in sorted((ROOT / "solutions").glob("*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            src = "".join(cell["source"])
            m = EXERCISE_LINE.search(src) if cell["cell_type"] == "code" else None
            if m:
                cells[f"{m.group(1)}.{m.group(2)}"] = src
    return cells


CELLS = _exercise_cells()


def test_every_grader_has_a_wrong_answer():
    assert set(CELLS) == {w.exercise for w in WRONG}, set(CELLS) ^ {w.exercise for w in WRONG}


@pytest.mark.parametrize("wrong", WRONG, ids=lambda w: f"{w.exercise}-{w.slip}")
def test_grader_rejects_a_wrong_answer(wrong):
    source = CELLS[wrong.exercise]
    assert source.count(wrong.old) == 1, f"the solution of {wrong.exercise} changed: update this wrong answer"
    ns: dict = {"__name__": "wrong_answer"}
    exec(compile(source.replace(wrong.old, wrong.new), f"wrong_{wrong.exercise}", "exec"), ns)
    g = _lookup(wrong.exercise)
    with pytest.raises(ExerciseFailed) as failed:
        run_grader(g, ns[g.name])
    message = str(failed.value)
    if wrong.hint:
        assert re.search(wrong.hint, message, re.S), message
    if wrong.not_hint:
        assert not re.search(wrong.not_hint, message, re.S), message
