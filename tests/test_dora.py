"""DoRA against PEFT's DoraLinearLayer (outputs and gradients, magnitude included) and against its formula.

References: PEFT 0.21 with use_dora=True on MiniLM (nn.Linear), a small GPT-2 (Conv1D) and, marked slow, a
bitsandbytes NF4 layer (QDoRA); float64 evaluations of y = (m/‖V‖_row) ⊙ (V x) + b with V = W0 + s·B A.
fp32 throughout; tolerance 1e-5 absolute.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from minilora.inject import inject, lora_layers, merge_and_unload
from minilora.io import WEIGHTS_NAME, load_adapter, save_adapter
from minilora.lora import LoRALinear, base_weight

from helpers import ATOL, FakeNF4, copy_from_peft

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def perturb_peft(peft_model: nn.Module, seed: int = 1) -> None:
    """Non-zero B and a magnitude away from ‖W0‖, so that every DoRA term shows in the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in peft_model.modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                b = module.lora_B["default"].weight
                b.copy_(torch.randn(b.shape, generator=gen) * 0.05)
                m = module.lora_magnitude_vector["default"].weight
                m.mul_(1 + 0.2 * torch.rand(m.shape, generator=gen))


def run(model: nn.Module, inputs: torch.Tensor, head: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and gradients of a fixed probe: {"input": ..., "<module>/<lora_A|lora_B|magnitude>": ...}."""
    model.eval()
    inputs = inputs.clone().requires_grad_(True)
    out = model(inputs_embeds=inputs)
    hidden = out.logits if hasattr(out, "logits") else out.last_hidden_state
    (hidden * head).sum().backward()
    grads = {"input": inputs.grad}
    for name, p in model.named_parameters():
        if p.requires_grad and "lora_" in name:
            module = name.removeprefix("base_model.model.").split(".lora_")[0]
            kind = "magnitude" if "magnitude" in name else name.split(".lora_")[1][0]
            grads[f"{module}/{kind}"] = p.grad
    return hidden.detach(), grads


def dora_float64(layer: LoRALinear, x: torch.Tensor, detach_norm: bool = True) -> torch.Tensor:
    w0 = base_weight(layer.base_layer).double()
    a, b = layer.lora_A["default"].double(), layer.lora_B["default"].double()
    m = layer.lora_magnitude_vector["default"].double()
    v = w0 + layer.scaling["default"] * b @ a
    norm = v.norm(dim=1)
    norm = norm.detach() if detach_norm else norm
    return x.double() @ ((m / norm)[:, None] * v).T + layer.base_layer.bias.double()


# ---------------------------------------------------------------------------------------------------------
# Start, formula, gradients


def test_magnitude_starts_at_row_norms_and_dora_starts_as_the_base(minilm):
    model = inject(copy.deepcopy(minilm), ["query", "value", "output.dense"], r=4, use_dora=True)
    for name, layer in lora_layers(model):
        expected = minilm.get_submodule(name).weight.double().norm(dim=1)
        assert (layer.lora_magnitude_vector["default"].double() - expected).abs().max() <= 1e-6
    ids = torch.randint(0, 1000, (2, 8))
    assert (model(ids).last_hidden_state - minilm(ids).last_hidden_state).abs().max() <= ATOL


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_forward_is_the_formula_with_an_unscaled_bias(kind):
    torch.manual_seed(0)
    base = nn.Linear(12, 7) if kind == "linear" else transformers.pytorch_utils.Conv1D(7, 12)
    with torch.no_grad():
        base.bias.normal_()
    layer = LoRALinear(base, r=3, lora_alpha=5, use_dora=True, init_lora_weights=False)
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].mul_(1.5)
    x = torch.randn(2, 4, 12)
    assert (layer(x).double() - dora_float64(layer, x)).abs().max() <= ATOL


def test_norm_is_detached_in_backward():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(10, 6), r=2, lora_alpha=4, use_dora=True, init_lora_weights=False)
    x = torch.randn(5, 10, dtype=torch.float64)
    layer(x.float()).sum().backward()
    params = [layer.lora_A["default"], layer.lora_B["default"], layer.lora_magnitude_vector["default"]]
    ours = [p.grad.double() for p in params]
    for detach, should_match in ((True, True), (False, False)):
        for p in params:
            p.grad = None
        dora_float64(layer, x, detach_norm=detach).sum().backward()
        close = all((g - p.grad.double()).abs().max() <= ATOL for g, p in zip(ours, params))
        assert close == should_match


@pytest.mark.parametrize("r,alpha,rslora", [(8, 3, True)])  # more cases on GPT-2 below, where they are cheap
def test_minilm_outputs_and_grads_equal_peft(minilm, r, alpha, rslora):
    """fp32 outputs within 1e-5; gradients equal in float64 (1e-10) and in fp32 within 1e-5 of their size.

    DoRA's terms are summed in a different order than in PEFT, so fp32 gradients differ by rounding. Through six
    pretrained layers that reaches ~3e-5 on gradients of size ~10, about as far as PEFT's own fp32 gradients are
    from its float64 ones (measured: ours 0.7-1.9× PEFT's error). So the exact check runs in float64, and fp32
    gradients must match PEFT's float64 gradients to 1e-5 × max|gradient| (a 1e-5 relative bound).
    """
    torch.manual_seed(0)
    targets = ["query", "value"]
    config = peft.LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, use_dora=True, target_modules=targets)
    reference = peft.get_peft_model(copy.deepcopy(minilm), config)
    perturb_peft(reference)
    ours = inject(copy.deepcopy(minilm), targets, r=r, lora_alpha=alpha, use_rslora=rslora, use_dora=True)
    copy_from_peft(reference, ours)

    torch.manual_seed(0)
    inputs, head = torch.randn(2, 8, 384), torch.randn(2, 8, 384)
    ref_out, ref_grads = run(reference.base_model.model, inputs, head)
    out, grads = run(ours, inputs, head)
    assert (ref_out - minilm(inputs_embeds=inputs).last_hidden_state).abs().max() > 1e-3
    assert (out - ref_out).abs().max() <= ATOL
    assert grads.keys() == ref_grads.keys() and len(grads) == 1 + 3 * 12

    for model in (reference, ours):
        model.zero_grad(set_to_none=True)
        model.double()
    ref_out64, ref_grads64 = run(reference.base_model.model, inputs.double(), head.double())
    out64, grads64 = run(ours, inputs.double(), head.double())
    assert (out64 - ref_out64).abs().max() <= 1e-10
    for key, g in grads64.items():
        assert (g - ref_grads64[key]).abs().max() <= 1e-10, key
        assert (grads[key].double() - ref_grads64[key]).abs().max() <= 1e-5 * ref_grads64[key].abs().max(), key


@pytest.mark.parametrize("r,alpha,rslora", [(4, 8, False), (2, 3, False), (8, 4, True)])
def test_gpt2_conv1d_outputs_and_grads_equal_peft(gpt2, r, alpha, rslora):
    config = peft.LoraConfig(
        r=r, lora_alpha=alpha, use_rslora=rslora, use_dora=True, target_modules="all-linear", fan_in_fan_out=True
    )
    reference = peft.get_peft_model(copy.deepcopy(gpt2), config)
    perturb_peft(reference)
    ours = inject(copy.deepcopy(gpt2), "all-linear", r=r, lora_alpha=alpha, use_rslora=rslora, use_dora=True)
    copy_from_peft(reference, ours)
    torch.manual_seed(0)
    inputs, head = torch.randn(2, 8, 32), torch.randn(2, 8, 64)
    ref_out, ref_grads = run(reference.base_model.model, inputs, head)
    out, grads = run(ours, inputs, head)
    assert (out - ref_out).abs().max() <= ATOL
    assert grads.keys() == ref_grads.keys() and len(grads) == 1 + 3 * 8
    for key, g in grads.items():
        assert (g - ref_grads[key]).abs().max() <= ATOL, key


def test_dropout_matches_peft_and_leaves_the_start_at_the_base():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = LoRALinear(copy.deepcopy(base), r=4, lora_alpha=8, lora_dropout=0.5, use_dora=True).train()
    x = torch.randn(5, 16)
    assert (layer(x) - base(x)).abs().max() <= 1e-6  # m = ‖W0‖, B = 0: dropout cannot move the output

    reference = peft.get_peft_model(
        nn.Sequential(copy.deepcopy(base)),
        peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, use_dora=True, target_modules=["0"]),
    ).train()
    target = reference.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].normal_()
        layer.lora_magnitude_vector["default"].mul_(1.3)
        target.lora_A["default"].weight.copy_(layer.lora_A["default"])
        target.lora_B["default"].weight.copy_(layer.lora_B["default"])
        target.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude_vector["default"])
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    assert (reference(x) - y).abs().max() <= ATOL
    layer.eval()
    assert (layer(x) - y).abs().max() > 1e-3  # dropout acted in training mode
    assert (layer(x).double() - dora_float64(layer, x)).abs().max() <= ATOL


# ---------------------------------------------------------------------------------------------------------
# Zero rows: PEFT divides m by ‖V‖ = 0 there


@pytest.mark.parametrize("magnitude", [0.0, 1.0])
def test_zero_norm_row_stays_finite(magnitude):
    torch.manual_seed(0)
    base = nn.Linear(8, 4)
    with torch.no_grad():
        base.weight[1] = 0.0
    layer = LoRALinear(base, r=2, use_dora=True)
    assert layer.lora_magnitude_vector["default"][1] == 0.0
    with torch.no_grad():
        # magnitude 1.0: m/‖V‖ = 1/NORM_EPS (minilora.dora) while V's row is still 0
        layer.lora_magnitude_vector["default"][1] = magnitude
    x = torch.randn(3, 8, requires_grad=True)
    y = layer(x)
    assert torch.isfinite(y).all()
    assert torch.equal(y[:, 1], base.bias[1].expand(3))
    assert (y - base(x)).abs().max() <= 1e-6
    y.sum().backward()
    grads = [x.grad] + [p.grad for p in (layer.lora_A["default"], layer.lora_B["default"])]
    assert all(torch.isfinite(g).all() for g in grads)


def test_zero_norm_row_merge_unmerge_is_exact():
    torch.manual_seed(0)
    base = nn.Linear(8, 4)
    with torch.no_grad():
        base.weight[2] = 0.0
    layer = LoRALinear(base, r=2, use_dora=True)  # m[2] = 0, so the merge factor of row 2 is 0
    with torch.no_grad():
        layer.lora_B["default"].normal_()
    original = base.weight.detach().clone()
    x = torch.randn(3, 8)
    y = layer(x)
    layer.merge()
    assert torch.isfinite(base.weight).all() and (layer(x) - y).abs().max() <= ATOL
    layer.unmerge()
    assert torch.isfinite(base.weight).all() and (base.weight - original).abs().max() <= 1e-6


# ---------------------------------------------------------------------------------------------------------
# Merging and 4-bit bases


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merge_unmerge_round_trip(kind):
    torch.manual_seed(0)
    base = nn.Linear(12, 7) if kind == "linear" else transformers.pytorch_utils.Conv1D(7, 12)
    original = base.weight.detach().clone()
    layer = LoRALinear(base, r=3, lora_alpha=6, use_dora=True, init_lora_weights=False)
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].mul_(0.8)
    x = torch.randn(4, 12)
    y = layer(x)
    layer.merge()
    assert (layer(x) - y).abs().max() <= ATOL and (base.weight - original).abs().max() > 1e-3
    layer.unmerge()
    assert (base.weight - original).abs().max() <= 1e-6 and (layer(x) - y).abs().max() <= ATOL


def test_merge_and_unload_minilm(minilm):
    model = inject(copy.deepcopy(minilm), ["query", "output.dense"], r=4, use_dora=True)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B["default"].copy_(torch.randn(layer.lora_B["default"].shape, generator=gen) * 0.05)
    ids = torch.randint(0, 1000, (2, 8))
    adapted = model(ids).last_hidden_state.detach()
    plain = merge_and_unload(model)
    assert not list(lora_layers(plain)) and type(plain.encoder.layer[0].attention.self.query) is nn.Linear
    assert (plain(ids).last_hidden_state - adapted).abs().max() <= ATOL


def test_qdora_on_a_4bit_base_equals_dora_on_its_dense_weight():
    torch.manual_seed(0)
    nf4 = FakeNF4(nn.Linear(10, 6))
    dense = nn.Linear(10, 6)
    with torch.no_grad():
        dense.weight.copy_(nf4.dequantize())
        dense.bias.copy_(nf4.bias)
    quantized = LoRALinear(nf4, r=2, use_dora=True, init_lora_weights=False)
    reference = LoRALinear(dense, r=2, use_dora=True)
    with torch.no_grad():
        for name in ("lora_A", "lora_B", "lora_magnitude_vector"):
            getattr(reference, name)["default"].copy_(getattr(quantized, name)["default"])
    x = torch.randn(3, 10)
    assert (quantized(x) - reference(x)).abs().max() <= ATOL
    with pytest.raises(TypeError, match="merge_and_unload"):
        quantized.merge()
    model = nn.Sequential(quantized)
    merge_and_unload(model)
    assert type(model[0]) is nn.Linear and (model(x) - reference(x)).abs().max() <= ATOL


@pytest.mark.slow  # importing bitsandbytes takes several seconds on a CPU
def test_qdora_equals_peft_on_a_bitsandbytes_nf4_layer():
    bnb = pytest.importorskip("bitsandbytes")

    class Bnb4bit(nn.Module):
        """bitsandbytes Linear4bit seen through the 4-bit interface LoRALinear expects."""

        def __init__(self, layer: nn.Module) -> None:
            super().__init__()
            self.layer = layer
            self.in_features, self.out_features = layer.in_features, layer.out_features
            self.bias = layer.bias

        def dequantize(self) -> torch.Tensor:
            return bnb.functional.dequantize_4bit(self.layer.weight.data, self.layer.weight.quant_state)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(x)

    torch.manual_seed(0)
    dense = nn.Linear(64, 32)
    layer4 = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4")
    layer4.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
    layer4.bias = nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    layer4 = layer4.to("cpu")  # quantizes

    reference = peft.get_peft_model(
        nn.Sequential(copy.deepcopy(layer4)), peft.LoraConfig(r=4, use_dora=True, target_modules=["0"])
    )
    perturb_peft(reference)
    ours = LoRALinear(Bnb4bit(layer4), r=4, use_dora=True)
    target = reference.base_model.model[0]
    with torch.no_grad():
        ours.lora_A["default"].copy_(target.lora_A["default"].weight)
        ours.lora_B["default"].copy_(target.lora_B["default"].weight)
        ours.lora_magnitude_vector["default"].copy_(target.lora_magnitude_vector["default"].weight)
    x = torch.randn(3, 64)
    assert (ours(x) - reference(x)).abs().max() <= ATOL


# ---------------------------------------------------------------------------------------------------------
# Files: lora_magnitude_vector both ways


def test_dora_adapter_files_both_ways_with_peft(minilm, tmp_path):
    targets = ["query", "value"]
    ours = inject(copy.deepcopy(minilm), targets, r=4, lora_alpha=8, use_dora=True)
    reference = peft.get_peft_model(
        copy.deepcopy(minilm), peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=targets)
    )
    perturb_peft(reference)
    copy_from_peft(reference, ours)
    ids = torch.randint(0, 1000, (2, 8))
    expected = ours(ids).last_hidden_state.detach()

    save_adapter(ours, tmp_path / "ours")
    from safetensors import safe_open

    with safe_open(tmp_path / "ours" / WEIGHTS_NAME, "pt") as f:
        magnitudes = [k for k in f.keys() if k.endswith(".lora_magnitude_vector")]
    assert len(magnitudes) == 12
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(minilm), tmp_path / "ours").eval()
    assert (loaded(input_ids=ids).last_hidden_state - expected).abs().max() <= ATOL

    reference.save_pretrained(tmp_path / "peft")
    model = copy.deepcopy(minilm)
    load_adapter(model, tmp_path / "peft")
    assert all(layer.use_dora["default"] for _, layer in lora_layers(model))
    assert (model(ids).last_hidden_state - expected).abs().max() <= ATOL


def test_qdora_on_minilora_linear_nf4():
    qlora = pytest.importorskip("minilora.qlora")
    torch.manual_seed(0)
    nf4 = qlora.LinearNF4.from_linear(nn.Linear(64, 32))
    dense = nn.Linear(64, 32)
    with torch.no_grad():
        dense.weight.copy_(nf4.dequantize())
        dense.bias.copy_(nf4.bias)
    quantized = LoRALinear(nf4, r=4, use_dora=True)
    reference = LoRALinear(dense, r=4, use_dora=True)
    assert torch.equal(quantized.lora_magnitude_vector["default"], reference.lora_magnitude_vector["default"])
    with torch.no_grad():
        quantized.lora_B["default"].normal_(std=0.05)
        for name in ("lora_A", "lora_B"):
            getattr(reference, name)["default"].copy_(getattr(quantized, name)["default"])
    x = torch.randn(2, 8, 64)
    assert (quantized(x) - reference(x)).abs().max() <= ATOL
    model = merge_and_unload(nn.Sequential(quantized))
    assert type(model[0]) is nn.Linear and (model(x) - reference(x)).abs().max() <= ATOL


def test_dora_is_a_variant_the_package_registers(monkeypatch):
    from minilora import dora, lora

    layer = LoRALinear(nn.Linear(10, 6), r=2, use_dora=True)
    assert isinstance(layer.lora_variant["default"], dora.DoraVariant) and layer.use_dora["default"]
    layer.add_adapter("plain", r=2)
    assert "plain" not in layer.lora_variant  # plain LoRA adapters have no variant
    monkeypatch.delitem(lora.VARIANTS, "dora")
    base = nn.Linear(10, 6)
    with pytest.raises(RuntimeError, match="use_dora=True needs the DoRA variant"):
        LoRALinear(base, r=2, use_dora=True)
    assert base.weight.requires_grad  # refused before the layer took the base
