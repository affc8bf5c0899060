"""minilora.fast: the fused LoRA / DoRA / QLoRA / QDoRA functions equal the formulas they fuse.

References: float64 autograd evaluations of y = x W0ᵀ + b + s·(x Aᵀ) Bᵀ and of DoRA's
y = x (m ⊙ V/‖V‖_row)ᵀ + b (V = W0 + s·B A, norm detached), minilora's readable LoRALinear (same
parameters, same outputs and gradients) and, in a slow test, PEFT's DoRA layer. Tolerances: float64 1e-10,
float32 1e-5 (relative), bf16 2e-2 and at most a few times the error of the same formula run in bf16.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minilora import fast, lora
from minilora.dora import NORM_EPS
from minilora.lora import LoRALinear
from minilora.nf4 import dequantize_nf4, quantize_nf4
from minilora.qlora import LinearNF4

SHAPES = [(1, 8, 8, 1), (7, 13, 5, 3), (33, 17, 29, 4), (4, 64, 48, 8)]  # (tokens, in, out, r), odd sizes too


def lora_ref(x, w, b, A, B, s):
    return F.linear(x, w, b) + s * F.linear(F.linear(x, A), B)


def dora_ref(x, w, b, A, B, m, s):
    v = w + s * B @ A
    norm = torch.linalg.vector_norm(v, dim=1).detach().clamp_min(NORM_EPS)
    return F.linear(x, (m / norm)[:, None] * v, b)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm().clamp_min(1e-300))


def make(shape, dtype=torch.float64, bias=False, seed=0):
    n, i, o, r = shape
    gen = torch.Generator().manual_seed(seed)
    t = dict(dtype=dtype)
    x = torch.randn(2, n, i, generator=gen, **t).requires_grad_(True)  # a leading batch dim as well
    w = torch.randn(o, i, generator=gen, **t) / math.sqrt(i)
    b = torch.randn(o, generator=gen, **t).requires_grad_(True) if bias else None
    A = (torch.randn(r, i, generator=gen, **t) / math.sqrt(i)).requires_grad_(True)
    B = torch.randn(o, r, generator=gen, **t).requires_grad_(True)
    m = (torch.linalg.vector_norm(w, dim=1) * (1 + 0.2 * torch.rand(o, generator=gen, **t))).requires_grad_(True)
    g = torch.randn(2, n, o, generator=gen, **t)
    s = float(torch.empty(1).uniform_(0.1, 4.0, generator=gen))
    return x, w, b, A, B, m, g, s


def outputs_and_grads(y, inputs, g):
    return [y, *torch.autograd.grad(y, inputs, g)]


def assert_all_close(got, ref, tol):
    for k, (a, b) in enumerate(zip(got, ref)):
        assert a.shape == b.shape, f"item {k}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert rel(a, b) <= tol, f"item {k} (0 = output, then gradients): rel err {rel(a, b):.2e} > {tol}"


# ---------------------------------------------------------------------------------------------------------
# float64 / float32 against the formulas


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("path", ["merged", "unmerged"])
def test_lora_equals_formula_fp64(shape, bias, path):
    x, w, b, A, B, _, g, s = make(shape, bias=bias, seed=sum(shape) + 2 * bias + (path == "merged"))
    inputs = [x, A, B] + ([b] if bias else [])
    got = outputs_and_grads(fast.lora_linear(x, w, b, A, B, s, path=path), inputs, g)
    ref = outputs_and_grads(lora_ref(x, w, b, A, B, s), inputs, g)
    assert_all_close(got, ref, 1e-10)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_dora_equals_formula_fp64(shape, bias):
    x, w, b, A, B, m, g, s = make(shape, bias=bias, seed=7 + len(shape) + shape[1])
    inputs = [x, A, B, m] + ([b] if bias else [])
    got = outputs_and_grads(fast.dora_linear(x, w, b, A, B, m, s), inputs, g)
    ref = outputs_and_grads(dora_ref(x, w, b, A, B, m, s), inputs, g)
    assert_all_close(got, ref, 1e-10)


def test_dora_zero_rows_fp64():
    # an all-zero row of W0 with B's row zero and m = 0 (as at init for such rows): output = bias, no NaN
    x, w, b, A, B, m, g, s = make((5, 12, 6, 2), bias=True, seed=3)
    with torch.no_grad():
        w[2] = 0
        B[2] = 0
        m[2] = 0
    inputs = [x, A, B, m, b]
    got = outputs_and_grads(fast.dora_linear(x, w, b, A, B, m, s), inputs, g)
    ref = outputs_and_grads(dora_ref(x, w, b, A, B, m, s), inputs, g)
    assert all(torch.isfinite(t).all() for t in got)
    assert_all_close(got, ref, 1e-10)


@pytest.mark.parametrize("path", ["merged", "unmerged"])
def test_lora_and_dora_fp32(path):
    x, w, b, A, B, m, g, s = make((9, 40, 24, 4), dtype=torch.float32, bias=True, seed=11)
    inputs = [x, A, B, b]
    got = outputs_and_grads(fast.lora_linear(x, w, b, A, B, s, path=path), inputs, g)
    # float64 reference on float64 copies of the same values
    x6, w6, b6, A6, B6, m6 = (t.detach().double().requires_grad_(t.requires_grad) for t in (x, w, b, A, B, m))
    ref = outputs_and_grads(lora_ref(x6, w6, b6, A6, B6, s), [x6, A6, B6, b6], g.double())
    assert_all_close(got, ref, 1e-5)
    got = outputs_and_grads(fast.dora_linear(x, w, b, A, B, m, s), [x, A, B, m, b], g)
    ref = outputs_and_grads(dora_ref(x6, w6, b6, A6, B6, m6, s), [x6, A6, B6, m6, b6], g.double())
    assert_all_close(got, ref, 1e-5)


def test_bf16_within_tolerance_and_fp32_master_grads():
    x, w, _, A, B, m, g, s = make((64, 96, 80, 8), dtype=torch.float32, seed=5)
    xb, wb, gb = x.detach().bfloat16().requires_grad_(True), w.bfloat16(), g.bfloat16()
    x6, w6, A6, B6, m6 = (t.detach().double().requires_grad_(True) for t in (xb, wb, A, B, m))
    for kind in ("lora-merged", "lora-unmerged", "dora"):
        if kind == "dora":
            y = fast.dora_linear(xb, wb, None, A, B, m, s)
            inputs, exact = [xb, A, B, m], dora_ref(x6, w6, None, A6, B6, m6, s)
            ref_inputs = [x6, A6, B6, m6]
            Ab, Bb, mb = (t.detach().bfloat16().requires_grad_(True) for t in (A, B, m))
            plain = dora_ref(xb, wb, None, Ab, Bb, mb, s)  # the same formula, simply run in bf16
            plain_inputs = [xb, Ab, Bb, mb]
        else:
            y = fast.lora_linear(xb, wb, None, A, B, s, path=kind.split("-")[1])
            inputs, exact = [xb, A, B], lora_ref(x6, w6, None, A6, B6, s)
            ref_inputs = [x6, A6, B6]
            Ab, Bb = (t.detach().bfloat16().requires_grad_(True) for t in (A, B))
            plain = lora_ref(xb, wb, None, Ab, Bb, s)
            plain_inputs = [xb, Ab, Bb]
        got = outputs_and_grads(y, inputs, gb)
        ref = outputs_and_grads(exact, ref_inputs, gb.double())
        bf16_plain = outputs_and_grads(plain, plain_inputs, gb)
        assert y.dtype == torch.bfloat16
        assert [t.dtype for t in got[2:]] == [torch.float32] * (len(got) - 2)  # masters keep float32 grads
        for k, (a, e, p) in enumerate(zip(got, ref, bf16_plain)):
            assert rel(a, e) <= min(2e-2, 4 * rel(p, e) + 2e-3), f"{kind} item {k}: {rel(a, e):.2e} vs bf16 {rel(p, e):.2e}"


# ---------------------------------------------------------------------------------------------------------
# 4-bit bases


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("path", ["merged", "unmerged"])
def test_qlora_and_qdora_fp64(double_quant, path):
    x, w, b, A, B, m, g, s = make((6, 128, 40, 4), bias=True, seed=13)
    q = quantize_nf4(w.float(), 64, double_quant)
    w_hat = dequantize_nf4(q, torch.float32).double()
    got = outputs_and_grads(fast.qlora_linear(x, q, b, A, B, s, path=path), [x, A, B, b], g)
    ref = outputs_and_grads(lora_ref(x, w_hat, b, A, B, s), [x, A, B, b], g)
    assert_all_close(got, ref, 1e-10)
    got = outputs_and_grads(fast.qdora_linear(x, q, b, A, B, m, s), [x, A, B, m, b], g)
    ref = outputs_and_grads(dora_ref(x, w_hat, b, A, B, m, s), [x, A, B, m, b], g)
    assert_all_close(got, ref, 1e-10)


# ---------------------------------------------------------------------------------------------------------
# The LoRALinear hook


def _layer(base: nn.Module, dora: bool, seed: int) -> LoRALinear:
    torch.manual_seed(seed)
    layer = LoRALinear(base, r=4, lora_alpha=8, use_dora=dora, init_lora_weights=False)
    if dora:
        with torch.no_grad():
            layer.lora_magnitude_vector["default"].mul_(1 + 0.2 * torch.rand_like(layer.lora_magnitude_vector["default"]))
    return layer


def _compare_layer(layer: LoRALinear, x: torch.Tensor, tol: float) -> None:
    name = layer.active_adapter
    params = [layer.lora_A[name], layer.lora_B[name]]
    if layer.use_dora[name]:
        params.append(layer.lora_magnitude_vector[name])
    g = torch.randn(*x.shape[:-1], layer.out_features, dtype=x.dtype)
    fused = fast.fused_forward(layer, x)
    assert fused is not None
    got = outputs_and_grads(fused, [x, *params], g)
    ref = outputs_and_grads(layer(x), [x, *params], g)
    assert_all_close(got, ref, tol)


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_forward_equals_loralinear_fp64(dora, bias):
    torch.manual_seed(17)
    base = nn.Linear(24, 20, bias=bias, dtype=torch.float64)
    layer = _layer(base, dora, 18)
    x = torch.randn(3, 5, 24, dtype=torch.float64, requires_grad=True)
    _compare_layer(layer, x, 1e-10)


def test_fused_forward_conv1d_base():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(19)
    conv = transformers.pytorch_utils.Conv1D(20, 24).double()  # GPT-2's linear layer: weight (in, out)
    for dora in (False, True):
        x = torch.randn(4, 24, dtype=torch.float64, requires_grad=True)
        _compare_layer(_layer(conv, dora, 20), x, 1e-10)


@pytest.mark.parametrize("dora", [False, True])
def test_fused_forward_nf4_base(dora):
    torch.manual_seed(21)
    base = LinearNF4.from_linear(nn.Linear(128, 48), blocksize=64, double_quant=True, compute_dtype=torch.float32)
    layer = _layer(base, dora, 22)
    x = torch.randn(6, 128, requires_grad=True)
    _compare_layer(layer, x, 1e-5)


def test_fused_forward_declines_what_it_cannot_fuse():
    torch.manual_seed(23)
    layer = LoRALinear(nn.Linear(16, 8), r=2, lora_dropout=0.1)
    x = torch.randn(3, 16)
    layer.train()
    assert fast.fused_forward(layer, x) is None  # dropout on the adapter input: the readable path
    layer.eval()
    torch.testing.assert_close(fast.fused_forward(layer, x), layer(x))
    layer.disable_adapters = True
    assert fast.fused_forward(layer, x) is None
    layer.disable_adapters = False
    bf16 = LoRALinear(nn.Linear(16, 8).bfloat16(), r=2)
    assert fast.fused_forward(bf16, x) is None  # x float32 on a bf16 base: left to the readable layer


def test_loralinear_fused_flag_routes_forward(request):
    """fused=True goes through the fused forward `import minilora` installs, fast.fused_forward (same outputs
    and gradients as the readable forward), fused=False never does, None only on CUDA inputs;
    inject(..., fused=...) sets the flag."""
    from minilora.inject import inject

    torch.manual_seed(29)
    calls = []
    lora.set_fused_forward(lambda layer, x: calls.append(1) or fast.fused_forward(layer, x))
    request.addfinalizer(lambda: lora.set_fused_forward(fast.fused_forward))
    layer = _layer(nn.Linear(24, 20, dtype=torch.float64), False, 30)
    x = torch.randn(5, 24, dtype=torch.float64, requires_grad=True)
    layer.fused = False
    y_ref = layer(x)
    grads_ref = torch.autograd.grad(y_ref.sum(), [x, layer.lora_A["default"], layer.lora_B["default"]])
    assert calls == []
    layer.fused = None  # CPU input: the readable forward
    layer(x)
    assert calls == []
    layer.fused = True
    y = layer(x)
    grads = torch.autograd.grad(y.sum(), [x, layer.lora_A["default"], layer.lora_B["default"]])
    assert calls == [1]
    assert rel(y, y_ref) < 1e-10 and all(rel(a, b) < 1e-10 for a, b in zip(grads, grads_ref))

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    inject(model, target_modules=["0", "2"], r=2, fused=False)
    assert [m.fused for m in (model[0], model[2])] == [False, False]
    with pytest.raises(ValueError, match="fused"):
        inject(model, target_modules=["0"], r=2, adapter_name="other", fused="yes")


# ---------------------------------------------------------------------------------------------------------
# choose_path and argument checks


def test_choose_path_gives_both_answers(monkeypatch):
    monkeypatch.setattr(fast, "MERGE_CROSSOVER", 1.0)  # the byte count's break-even
    monkeypatch.setattr(fast, "MERGE_CROSSOVER_FREE_BUILD", 0.0)
    assert fast.choose_path(16, 4096, 4096, 16) == "unmerged"
    assert fast.choose_path(8192, 4096, 4096, 16) == "merged"
    assert fast.choose_path(1024, 4096, 14336, 16) == "unmerged"
    assert fast.choose_path(8192, 4096, 14336, 16) == "merged"
    assert fast.choose_path(16, 4096, 4096, 16, free_build=True) == "merged"
    assert fast.choose_path(8192, 64, 64, 16) == "unmerged"  # r not small next to the layer
    # the rule is the byte count: merged iff tokens >= 2·in·out/(in + out)
    assert fast.choose_path(4096, 4096, 4096, 16) == "merged" and fast.choose_path(4095, 4096, 4096, 16) == "unmerged"
    # a measured factor scales the threshold; free builds have their own
    monkeypatch.setattr(fast, "MERGE_CROSSOVER", 2.5)
    assert fast.choose_path(10239, 4096, 4096, 16) == "unmerged" and fast.choose_path(10240, 4096, 4096, 16) == "merged"
    monkeypatch.setattr(fast, "MERGE_CROSSOVER_FREE_BUILD", 0.5)
    assert fast.choose_path(2047, 4096, 4096, 16, free_build=True) == "unmerged"
    assert fast.choose_path(2048, 4096, 4096, 16, free_build=True) == "merged"


def test_bad_arguments_raise_clear_errors():
    x, w, b, A, B, m, g, s = make((3, 8, 6, 2))
    with pytest.raises(ValueError, match="frozen"):
        fast.lora_linear(x, w.clone().requires_grad_(True), b, A, B, s)
    with pytest.raises(ValueError, match="A must be"):
        fast.lora_linear(x, w, b, A[:, :5], B, s)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 8\)"):
        fast.lora_linear(x[..., :5], w, b, A, B, s)
    with pytest.raises(ValueError, match="path"):
        fast.lora_linear(x, w, b, A, B, s, path="fused")
    with pytest.raises(ValueError, match="magnitude"):
        fast.dora_linear(x, w, b, A, B, m[:3], s)
    with pytest.raises(TypeError, match="NF4Tensor"):
        fast.qlora_linear(x, w, b, A, B, s)
    with pytest.raises(TypeError, match="NF4Tensor"):
        fast.lora_linear(x, "w", b, A, B, s)


# ---------------------------------------------------------------------------------------------------------
# PEFT's DoRA layer (slow: imports peft)


@pytest.mark.slow
def test_dora_equals_peft_dora():
    peft = pytest.importorskip("peft")
    torch.manual_seed(29)

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(24, 16)

        def forward(self, x):
            return self.lin(x)

    model = peft.get_peft_model(One(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lin"], use_dora=True,
                                                       init_lora_weights=False))
    layer = model.base_model.model.lin
    mag = layer.lora_magnitude_vector["default"].weight
    with torch.no_grad():
        mag.mul_(1 + 0.2 * torch.rand_like(mag))
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    base = layer.base_layer
    x = torch.randn(5, 24, requires_grad=True)
    g = torch.randn(5, 16)
    got = outputs_and_grads(fast.dora_linear(x, base.weight, base.bias, A, B, mag, layer.scaling["default"]),
                            [x, A, B, mag], g)
    ref = outputs_and_grads(layer(x), [x, A, B, mag], g)
    assert_all_close(got, ref, 1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["lora", "dora", "qlora", "qdora"])
def test_cuda_bf16_fused_against_float64(kind):
    torch.manual_seed(37)
    n, i, o, r, s = 512, 1024, 768, 16, 2.0
    w = torch.randn(o, i, device="cuda") / 32
    q = quantize_nf4(w, 64, True)
    base = q if kind.startswith("q") else w.bfloat16()
    w64 = dequantize_nf4(q, torch.float32).double() if kind.startswith("q") else w.bfloat16().double()
    x = torch.randn(n, i, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    A = (torch.randn(r, i, device="cuda") / 32).requires_grad_(True)
    B = (torch.randn(o, r, device="cuda") / 10).requires_grad_(True)
    m = (w64.norm(dim=1).float() * (1 + 0.1 * torch.rand(o, device="cuda"))).requires_grad_(True)
    g = torch.randn(n, o, device="cuda", dtype=torch.bfloat16)
    dora = kind.endswith("dora")
    params = [x, A, B] + ([m] if dora else [])
    y = (fast._apply_dora(x, base, None, A, B, m, s) if dora else fast._apply_lora(x, base, None, A, B, s, None))
    got = outputs_and_grads(y, params, g)
    ref_params = [p.detach().double().requires_grad_(True) for p in params]
    y6 = (dora_ref(ref_params[0], w64, None, *ref_params[1:3], ref_params[3], s) if dora
          else lora_ref(ref_params[0], w64, None, *ref_params[1:3], s))
    ref = outputs_and_grads(y6, ref_params, g.double())
    assert_all_close(got, ref, 2e-2)
