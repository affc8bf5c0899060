"""LoRALinear against PEFT's lora.Linear (same weights: same outputs and gradients) and against the formula.

References: PEFT 0.21 on the pretrained MiniLM (nn.Linear) and on a small random GPT-2 (Conv1D), and
float64 evaluations of y = x W0ᵀ + b + s·x Aᵀ Bᵀ. fp32 throughout; tolerance 1e-5 absolute.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from minilora.inject import inject, lora_layers
from minilora.lora import LoRALinear, base_weight, lora_matmul

from helpers import ATOL, FakeNF4, copy_from_peft, randomize_peft_B

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


# ---------------------------------------------------------------------------------------------------------
# Helpers (the models, minilm and gpt2, are conftest.py's fixtures)


def forward_backward(model: nn.Module, inputs: torch.Tensor, head: torch.Tensor, kind: str):
    """Output and gradients (input, then each LoRA parameter in order) of a fixed linear probe of the output."""
    model.eval()  # no attention/hidden dropout: both models must see the same function
    inputs = inputs.clone().requires_grad_(True)
    out = model(inputs_embeds=inputs)
    hidden = out.last_hidden_state if kind == "bert" else out.logits
    (hidden * head).sum().backward()
    grads = [inputs.grad] + [p.grad for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
    return hidden.detach(), grads


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------------------
# Equality with PEFT on real architectures

CASES = [(4, 8, False), (8, 3, True)]


@pytest.mark.parametrize("r,alpha,rslora", CASES)
def test_minilm_outputs_and_grads_equal_peft(minilm, r, alpha, rslora):
    targets = ["query", "value"]
    reference = peft.get_peft_model(
        copy.deepcopy(minilm), peft.LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=targets)
    )
    randomize_peft_B(reference, seed=1)
    ours = inject(copy.deepcopy(minilm), targets, r=r, lora_alpha=alpha, use_rslora=rslora)
    copy_from_peft(reference, ours)

    torch.manual_seed(0)
    inputs, head = torch.randn(2, 8, 384), torch.randn(2, 8, 384)
    ref_out, ref_grads = forward_backward(reference.base_model.model, inputs, head, "bert")
    out, grads = forward_backward(ours, inputs, head, "bert")
    base_out = minilm(inputs_embeds=inputs).last_hidden_state.detach()

    assert max_diff(ref_out, base_out) > 1e-3  # the adapters matter, so equality below means something
    assert max_diff(out, ref_out) <= ATOL
    assert len(grads) == len(ref_grads) == 1 + 2 * 2 * 6
    for g, ref in zip(grads, ref_grads):
        assert g.shape == ref.shape and max_diff(g, ref) <= ATOL
    scale = alpha / math.sqrt(r) if rslora else alpha / r
    assert all(layer.scaling["default"] == scale for _, layer in lora_layers(ours))


@pytest.mark.parametrize("r,alpha,rslora", [(4, 8, False), (2, 3, False), (8, 4, True)])
def test_gpt2_conv1d_outputs_and_grads_equal_peft(gpt2, r, alpha, rslora):
    targets = ["c_attn", "c_proj", "c_fc"]
    config = peft.LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=targets, fan_in_fan_out=True)
    reference = peft.get_peft_model(copy.deepcopy(gpt2), config)
    randomize_peft_B(reference, seed=1)
    ours = inject(copy.deepcopy(gpt2), targets, r=r, lora_alpha=alpha, use_rslora=rslora)
    copy_from_peft(reference, ours)
    assert all(layer.fan_in_fan_out for _, layer in lora_layers(ours))

    torch.manual_seed(0)
    inputs, head = torch.randn(2, 8, 32), torch.randn(2, 8, 64)
    ref_out, ref_grads = forward_backward(reference.base_model.model, inputs, head, "gpt2")
    out, grads = forward_backward(ours, inputs, head, "gpt2")
    assert max_diff(ref_out, gpt2(inputs_embeds=inputs).logits.detach()) > 1e-3
    assert max_diff(out, ref_out) <= ATOL
    assert len(grads) == len(ref_grads) == 1 + 2 * 4 * 2
    for g, ref in zip(grads, ref_grads):
        assert max_diff(g, ref) <= ATOL


# ---------------------------------------------------------------------------------------------------------
# The layer against the formula


def float64_reference(layer: LoRALinear, x: torch.Tensor, name: str = "default") -> torch.Tensor:
    w, b = base_weight(layer.base_layer).double(), layer.base_layer.bias.double()
    a, bb = layer.lora_A[name].double(), layer.lora_B[name].double()
    return x.double() @ w.T + b + layer.scaling[name] * (x.double() @ a.T @ bb.T)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_forward_is_the_formula(kind):
    torch.manual_seed(0)
    base = nn.Linear(12, 7) if kind == "linear" else transformers.pytorch_utils.Conv1D(7, 12)
    layer = LoRALinear(base, r=3, lora_alpha=5, init_lora_weights=False)
    x = torch.randn(2, 4, 12)
    assert layer(x).shape == (2, 4, 7)
    assert max_diff(layer(x).double(), float64_reference(layer, x)) <= 1e-5
    assert layer.fan_in_fan_out == (kind == "conv1d")
    assert base_weight(base).shape == (7, 12)


def test_zero_B_is_the_base_layer_and_A_gets_no_gradient(minilm):
    # every adapted layer feeds last_hidden_state (the pooler does not), so every A must get a zero gradient
    model = inject(copy.deepcopy(minilm), r"encoder\..*\.(query|key|value|dense)", r=8)
    inputs = torch.randn(2, 8, 384)
    out = model(inputs_embeds=inputs).last_hidden_state
    assert torch.equal(out, minilm(inputs_embeds=inputs).last_hidden_state)
    out.pow(2).sum().backward()
    layers = [layer for _, layer in lora_layers(model)]
    assert all(torch.equal(layer.lora_A["default"].grad, torch.zeros_like(layer.lora_A["default"])) for layer in layers)
    assert all(layer.lora_B["default"].grad.abs().max() > 0 for layer in layers)


def test_init_matches_peft_rules():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(1000, 300), r=64, lora_alpha=16)
    a = layer.lora_A["default"]
    bound = 1 / math.sqrt(1000)  # kaiming_uniform(a=√5) on (r, in) = U(−1/√in, 1/√in)
    assert a.abs().max() <= bound and a.abs().max() > 0.99 * bound
    assert abs(a.std().item() - bound / math.sqrt(3)) < 0.02 * bound
    assert torch.equal(layer.lora_B["default"], torch.zeros(300, 64))
    gaussian = LoRALinear(nn.Linear(1000, 300), r=64, init_lora_weights="gaussian")
    assert abs(gaussian.lora_A["default"].std().item() - 1 / 64) < 0.02 / 64
    assert layer.scaling["default"] == peft.LoraConfig(r=64, lora_alpha=16).lora_alpha / 64


def test_half_precision_base_keeps_float32_adapter_and_output_dtype():
    torch.manual_seed(0)
    base = nn.Linear(8, 4).to(torch.bfloat16)
    layer = LoRALinear(base, r=2, init_lora_weights=False)
    assert layer.lora_A["default"].dtype == torch.float32  # PEFT's autocast_adapter_dtype default
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    expected = base(x).float() + lora_matmul(x.float(), layer.lora_A["default"], layer.lora_B["default"], 1.0 * 8 / 2)
    assert max_diff(y.float(), expected.to(torch.bfloat16).float()) == 0


# ---------------------------------------------------------------------------------------------------------
# Dropout


def test_dropout_touches_only_the_adapter_path_and_matches_peft():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = LoRALinear(copy.deepcopy(base), r=4, lora_alpha=8, lora_dropout=0.5).train()
    x = torch.randn(5, 16)
    assert torch.equal(layer(x), base(x))  # B = 0: training-mode dropout leaves the base output alone

    with torch.no_grad():
        layer.lora_B["default"].normal_()
    a, b, s = layer.lora_A["default"], layer.lora_B["default"], layer.scaling["default"]
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    dropped = nn.Dropout(0.5)(x)
    assert max_diff(y, base(x) + s * dropped @ a.T @ b.T) <= ATOL
    assert max_diff(y, base(x) + s * x @ a.T @ b.T) > 1e-2  # dropout really acted

    holder = nn.Sequential(copy.deepcopy(base))
    reference = peft.get_peft_model(holder, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["0"]))
    reference.train()
    with torch.no_grad():
        reference.base_model.model[0].lora_A["default"].weight.copy_(a)
        reference.base_model.model[0].lora_B["default"].weight.copy_(b)
    torch.manual_seed(1)
    assert max_diff(reference(x), y) <= ATOL

    layer.eval()
    assert max_diff(layer(x), base(x) + s * x @ a.T @ b.T) <= ATOL


# ---------------------------------------------------------------------------------------------------------
# Merging


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merge_unmerge_round_trip(kind):
    torch.manual_seed(0)
    base = nn.Linear(12, 7) if kind == "linear" else transformers.pytorch_utils.Conv1D(7, 12)
    original = base.weight.detach().clone()
    layer = LoRALinear(base, r=3, lora_alpha=6, init_lora_weights=False)
    x = torch.randn(4, 12)
    y = layer(x)
    delta = layer.scaling["default"] * (layer.lora_B["default"].double() @ layer.lora_A["default"].double())
    expected = original.double() + (delta.T if kind == "conv1d" else delta)  # Conv1D stores (in, out)
    layer.merge()
    assert layer.merged
    assert max_diff(base.weight.double(), expected) <= 1e-6
    assert max_diff(layer(x), y) <= ATOL
    assert max_diff(base.weight, original) > 1e-3  # the update really went into the weight
    layer.unmerge()
    assert not layer.merged
    assert max_diff(base.weight, original) <= 1e-6
    assert max_diff(layer(x), y) <= ATOL


def test_merge_warnings_and_one_merged_adapter_at_a_time():
    layer = LoRALinear(nn.Linear(6, 4), r=2, init_lora_weights=False)
    layer.add_adapter("other", r=2)
    with pytest.warns(UserWarning, match="nothing to do"):
        layer.unmerge()
    layer.merge()
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    with pytest.raises(ValueError, match="unmerge"):
        layer.merge(adapter_name="other")
    with pytest.raises(ValueError, match="unmerge"):
        layer.set_adapter("other")


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), 3e38])  # s·3e38 overflows float32
def test_safe_merge_refuses_non_finite_weights(poison):
    base = nn.Linear(6, 4)
    layer = LoRALinear(base, r=2, init_lora_weights=False)
    with torch.no_grad():
        layer.lora_A["default"].fill_(1.0)
        layer.lora_B["default"][0, 0] = poison  # ΔW[0, :] = s·poison
    before = base.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge(safe=True)
    assert torch.equal(base.weight, before) and not layer.merged


def test_merge_into_4bit_base_is_refused_with_advice():
    layer = LoRALinear(FakeNF4(nn.Linear(6, 4)), r=2, init_lora_weights=False)
    with pytest.raises(TypeError, match="merge_and_unload"):
        layer.merge()
    assert not layer.merged


def test_4bit_base_forward_equals_dense_base():
    torch.manual_seed(0)
    nf4 = FakeNF4(nn.Linear(10, 6))
    dense = nn.Linear(10, 6)
    with torch.no_grad():
        dense.weight.copy_(nf4.dequantize())
        dense.bias.copy_(nf4.bias)
    quantized = LoRALinear(nf4, r=2, init_lora_weights=False)
    reference = LoRALinear(dense, r=2)
    with torch.no_grad():
        reference.lora_A["default"].copy_(quantized.lora_A["default"])
        reference.lora_B["default"].copy_(quantized.lora_B["default"])
    x = torch.randn(3, 10)
    assert max_diff(quantized(x), reference(x)) <= ATOL
    assert torch.equal(base_weight(nf4), nf4.dequantize())
    quantized(x).sum().backward()
    assert quantized.lora_B["default"].grad.abs().max() > 0
    assert not nf4.bias.requires_grad  # the base stays frozen


# ---------------------------------------------------------------------------------------------------------
# Several adapters, disabling


def test_adapters_switch_and_disable():
    torch.manual_seed(0)
    base = nn.Linear(8, 5)
    layer = LoRALinear(base, r=2, init_lora_weights=False)
    layer.add_adapter("other", r=4, lora_alpha=2, init_lora_weights=False)
    x = torch.randn(3, 8)
    assert layer.active_adapter == "default"
    assert layer.lora_A["default"].requires_grad and not layer.lora_A["other"].requires_grad
    y_default = layer(x)
    layer.set_adapter("other")
    assert layer.lora_A["other"].requires_grad and not layer.lora_B["default"].requires_grad
    assert max_diff(layer(x), float64_reference(layer, x, "other").float()) <= ATOL
    assert max_diff(layer(x), y_default) > 1e-3
    layer.disable_adapters = True
    assert torch.equal(layer(x), base(x))
    layer.disable_adapters = False
    layer.merge()
    layer.disable_adapters = True
    assert torch.equal(layer(x), base(x)) and not layer.merged  # disabling unmerges, as in PEFT
    with pytest.raises(ValueError, match="no adapter named"):
        layer.set_adapter("missing")
    with pytest.raises(ValueError, match="already has"):
        layer.add_adapter("other")


# ---------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "kwargs",
    [
        {"r": 0},
        {"r": -2},
        {"r": 2.5},
        {"r": True},
        {"r": "8"},
        {"lora_alpha": 0},
        {"lora_alpha": -1.0},
        {"lora_alpha": float("nan")},
        {"lora_alpha": float("inf")},
        {"lora_dropout": 1.0},
        {"lora_dropout": -0.1},
        {"adapter_name": "a.b"},
        {"adapter_name": ""},
        {"init_lora_weights": "loftq"},
        {"init_lora_weights": "pissa_niter_4"},
        {"init_lora_weights": "kaiming"},
    ],
)
def test_bad_hyperparameters_raise_value_error(kwargs):
    base = nn.Linear(4, 3)
    with pytest.raises(ValueError):
        LoRALinear(base, **kwargs)
    assert base.weight.requires_grad  # a refused layer is left as it was


def test_wrong_input_width_and_wrong_base():
    layer = LoRALinear(nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\)"):
        layer(torch.randn(2, 5))
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear(nn.Conv2d(3, 3, 1))
    packed = nn.Linear(4, 3)
    packed.weight = nn.Parameter(torch.zeros(6, 1), requires_grad=False)  # bitsandbytes-style packed storage
    with pytest.raises(TypeError, match="dequantize"):
        LoRALinear(packed)


def test_qlora_on_minilora_linear_nf4():
    qlora = pytest.importorskip("minilora.qlora")
    torch.manual_seed(0)
    dense = nn.Linear(64, 32)
    nf4 = qlora.LinearNF4.from_linear(dense)
    dequantized = nn.Linear(64, 32)
    with torch.no_grad():
        dequantized.weight.copy_(nf4.dequantize())
        dequantized.bias.copy_(nf4.bias)
    quantized = LoRALinear(nf4, r=4, lora_alpha=8, init_lora_weights=False)
    reference = LoRALinear(dequantized, r=4, lora_alpha=8)
    with torch.no_grad():
        reference.lora_A["default"].copy_(quantized.lora_A["default"])
        reference.lora_B["default"].copy_(quantized.lora_B["default"])
    x = torch.randn(2, 8, 64, requires_grad=True)
    y = quantized(x)
    assert max_diff(y, reference(x)) <= ATOL
    (grad_x,) = torch.autograd.grad(y.sum(), x)
    (ref_grad_x,) = torch.autograd.grad(reference(x).sum(), x)
    assert max_diff(grad_x, ref_grad_x) <= ATOL
    with pytest.raises(TypeError, match="merge_and_unload"):
        quantized.merge()


# ---------------------------------------------------------------------------------------------------------
# PiSSA and OLoRA: the adapter starts from W0's decomposition, the base keeps the rest


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_weight_inits_split_w0_between_base_and_adapter(init):
    torch.manual_seed(0)
    base = nn.Linear(12, 8)
    w0 = base.weight.detach().clone()
    layer = LoRALinear(base, r=3, lora_alpha=6, init_lora_weights=init)
    delta = layer.delta_weight()
    torch.testing.assert_close(base.weight + delta, w0, atol=1e-6, rtol=0)  # the layer still computes W0
    if init == "pissa":  # s·B A is W0's best rank-3 approximation: its top three singular directions
        U, S, Vh = torch.linalg.svd(w0)
        torch.testing.assert_close(delta, U[:, :3] @ torch.diag(S[:3]) @ Vh[:3], atol=1e-5, rtol=0)
    else:  # B holds orthonormal columns
        B = layer.lora_B["default"]
        torch.testing.assert_close(B.T @ B, torch.eye(3), atol=1e-5, rtol=0)


def test_weight_and_bias_are_the_base_layers():
    base = nn.Linear(4, 3)
    layer = LoRALinear(base, r=2)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert LoRALinear(nn.Linear(4, 3, bias=False), r=2).bias is None
