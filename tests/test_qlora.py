"""LinearNF4 against bitsandbytes' Linear4bit, and QLoRA (minilora LoRA on LinearNF4) against PEFT on bnb.

bitsandbytes' layers dequantize through whichever CPU kernel the processor selects (see minilora.bnb); each
comparison names the path: its PyTorch path (the flattened-block rule of its CUDA kernel) for any shape, and
its native C++ kernel, forced on, where rows are whole blocks (it scales ragged rows wrongly on AVX-512).
"""

import copy

import pytest
import torch
from torch import nn

from minilora import kernels
from minilora.bnb import cpu_dequantize_path, to_bnb
from minilora.nf4 import dequantize_nf4, quantize_nf4
from minilora.qlora import LinearNF4, quantize_model

bnb = pytest.importorskip("bitsandbytes")


pytestmark = pytest.mark.usefixtures("eager_bitsandbytes")  # no torch.compile of bitsandbytes' fallback


def bnb_layer(linear: nn.Linear, compute_dtype: torch.dtype, double_quant: bool) -> nn.Module:
    """bitsandbytes' NF4 layer quantized from the same weight (Params4bit quantizes on .to(device))."""
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type="nf4")
    layer.load_state_dict(linear.state_dict())
    return layer.to(linear.weight.device)  # stays in train mode: bnb's packed AVX512 inference layout is off


def forward_backward(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y.backward(grad)
    return y, x.grad


@pytest.mark.parametrize(
    "weight_dtype, compute_dtype",
    [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.float16, torch.float16),
     (torch.bfloat16, torch.bfloat16)],
    ids=str,
)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("path, in_features", [("pytorch", 96), ("pytorch", 128), ("native", 128)], ids=str)
def test_same_as_bitsandbytes_linear4bit(weight_dtype, compute_dtype, double_quant, path, in_features):
    with cpu_dequantize_path(path):
        _same_as_bitsandbytes_linear4bit(weight_dtype, compute_dtype, double_quant, in_features)


def _same_as_bitsandbytes_linear4bit(weight_dtype, compute_dtype, double_quant, in_features):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, 40).to(weight_dtype)
    ours = LinearNF4.from_linear(linear, blocksize=64, double_quant=double_quant, compute_dtype=compute_dtype)
    theirs = bnb_layer(linear, compute_dtype, double_quant)
    assert torch.equal(ours.weight_packed, theirs.weight.data.view(-1))
    state = theirs.weight.quant_state
    assert torch.equal(ours.dequantize(), bnb.functional.dequantize_4bit(theirs.weight.data, state).to(compute_dtype))

    x = torch.randn(3, 5, in_features).to(weight_dtype)
    grad = torch.randn(3, 5, 40).to(weight_dtype)
    y, gx = forward_backward(ours, x, grad)
    y_ref, gx_ref = forward_backward(theirs, x, grad)
    assert y.dtype == y_ref.dtype == weight_dtype
    assert torch.equal(y, y_ref)
    assert torch.equal(gx, gx_ref)


def test_bitsandbytes_layer_built_from_our_bytes():
    torch.manual_seed(1)
    linear = nn.Linear(64, 48)
    ours = LinearNF4.from_linear(linear, double_quant=True, compute_dtype=torch.bfloat16)
    packed, state = to_bnb(ours.quantized)
    theirs = bnb.nn.Linear4bit(64, 48, compute_dtype=torch.bfloat16, quant_type="nf4")
    theirs.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=64,
                                      compress_statistics=True, quant_type="nf4", bnb_quantized=True, module=theirs)
    theirs.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    x = torch.randn(7, 64)
    assert torch.equal(ours(x), theirs(x))


def test_weight_is_dequantized_in_forward_and_again_in_backward(monkeypatch):
    layer = LinearNF4.from_linear(nn.Linear(32, 24))
    calls = []

    def counting(q, dtype=None):
        calls.append(dtype)
        return dequantize_nf4(q, dtype)

    monkeypatch.setattr(kernels, "dequantize", counting)  # LinearNF4 calls the dispatcher by its name
    saved = []
    x = torch.randn(4, 32, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = layer(x)
    assert len(calls) == 1
    assert (24, 32) not in saved and (32, 24) not in saved  # no dense weight kept for backward
    y.sum().backward()
    assert len(calls) == 2
    assert torch.allclose(x.grad, layer.dequantize().sum(0).expand(4, 32))


def test_unfrozen_bias_gets_its_gradient():
    layer = LinearNF4.from_linear(nn.Linear(16, 8))
    layer.bias.requires_grad_(True)
    grad = torch.randn(5, 3, 8)
    layer(torch.randn(5, 3, 16)).backward(grad)
    torch.testing.assert_close(layer.bias.grad, grad.sum(dim=(0, 1)))


def test_frozen_buffers_dtype_and_state_dict():
    torch.manual_seed(2)
    layer = LinearNF4.from_linear(nn.Linear(80, 16), double_quant=True)
    assert not any(p.requires_grad for p in layer.parameters())
    assert [n for n, _ in layer.named_parameters()] == ["bias"]
    buffers = dict(layer.named_buffers())
    assert set(buffers) == {"weight_packed", "weight_absmax_codes", "weight_absmax_scales", "weight_absmax_offset"}

    fresh = LinearNF4(80, 16, double_quant=True)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(3, 80)
    assert torch.equal(fresh(x), layer(x))

    layer.to(torch.bfloat16)  # the bias follows; the 4-bit data and its float32 scales do not
    assert layer.bias.dtype == torch.bfloat16
    assert {n: b.dtype for n, b in layer.named_buffers()} == {n: b.dtype for n, b in buffers.items()}
    assert torch.equal(layer.dequantize(), fresh.dequantize())


class Tiny(nn.Module):
    def __init__(self, hidden: int = 96) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, 64)
        self.lm_head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_quantize_model_replaces_plain_linears_only():
    torch.manual_seed(3)
    model = nn.Module()
    model.block = Tiny()
    model.attn = nn.MultiheadAttention(16, 2)  # its out_proj is an nn.Linear subclass read via .weight
    model.extra = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    model.alias = model.block.fc1  # the same layer under a second name
    original_fc1 = model.block.fc1.weight.detach().clone()

    quantize_model(model, skip=("lm_head", "extra"))
    assert isinstance(model.block.fc1, LinearNF4) and isinstance(model.block.fc2, LinearNF4)
    assert model.alias is model.block.fc1
    assert type(model.block.lm_head) is nn.Linear and type(model.extra[0]) is nn.Linear
    assert type(model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert torch.equal(model.block.fc1.dequantize(), dequantize_nf4(quantize_nf4(original_fc1, double_quant=True)))


def test_quantize_model_error_leaves_model_unchanged():
    model = Tiny()
    with torch.no_grad():
        model.fc2.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="'fc2'.*non-finite"):
        quantize_model(model)
    assert type(model.fc1) is nn.Linear and type(model.fc2) is nn.Linear


def test_bad_arguments():
    with pytest.raises(TypeError, match="nn.Linear"):
        LinearNF4.from_linear(nn.Conv1d(4, 4, 1))
    with pytest.raises(ValueError, match="compute_dtype"):
        LinearNF4.from_linear(nn.Linear(4, 4), compute_dtype=torch.int8)
    with pytest.raises(ValueError, match="blocksize"):
        LinearNF4(64, 64, blocksize=48)
    with pytest.raises(ValueError, match=r"\(\.\.\., 64\)"):
        LinearNF4(64, 8)(torch.randn(2, 63))


# --- QLoRA: minilora vs PEFT --------------------------------------------------------------------------


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("path, hidden", [("pytorch", 96), ("native", 128)], ids=str)
def test_qlora_matches_peft_on_bitsandbytes(compute_dtype, path, hidden):
    with cpu_dequantize_path(path):
        _qlora_matches_peft_on_bitsandbytes(compute_dtype, hidden)


def _qlora_matches_peft_on_bitsandbytes(compute_dtype, hidden):
    peft = pytest.importorskip("peft")
    inject = pytest.importorskip("minilora.inject").inject

    torch.manual_seed(4)
    dense = Tiny(hidden)
    ours = quantize_model(copy.deepcopy(dense), double_quant=True, compute_dtype=compute_dtype)
    inject(ours, target_modules=["fc1", "fc2"], r=4, lora_alpha=8, init_lora_weights=False)  # B ≠ 0

    # PEFT accepts bnb's Linear4bit on a CPU; the flag makes it use its bitsandbytes LoRA layer
    reference = copy.deepcopy(dense)
    for name in ("fc1", "fc2"):
        setattr(reference, name, bnb_layer(getattr(dense, name), compute_dtype, double_quant=True))
    reference.is_loaded_in_4bit = True
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], init_lora_weights=False)
    reference = peft.get_peft_model(reference, config)
    pairs = []
    for name in ("fc1", "fc2"):
        mine, theirs = getattr(ours, name), getattr(reference.base_model.model, name)
        assert type(theirs).__module__ == "peft.tuners.lora.bnb"
        assert torch.equal(mine.base_layer.weight_packed, theirs.base_layer.weight.data.view(-1))
        with torch.no_grad():
            theirs.lora_A["default"].weight.copy_(mine.lora_A["default"])
            theirs.lora_B["default"].weight.copy_(mine.lora_B["default"])
        pairs.append((mine, theirs))

    x = torch.randn(4, 7, 64)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y1, y2 = ours(x1), reference(x2)
    y1.square().sum().backward()
    y2.square().sum().backward()
    # Same operations in the same order: identical on this CPU; 1e-6 leaves room for summation order.
    close = dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y1, y2, **close)
    torch.testing.assert_close(x1.grad, x2.grad, **close)
    for mine, theirs in pairs:
        assert mine.lora_B["default"].grad.abs().max() > 0
        torch.testing.assert_close(mine.lora_A["default"].grad, theirs.lora_A["default"].weight.grad, **close)
        torch.testing.assert_close(mine.lora_B["default"].grad, theirs.lora_B["default"].weight.grad, **close)
    assert not any(p.requires_grad for n, p in ours.named_parameters() if "lora_" not in n)


@pytest.mark.cuda
def test_moves_to_cuda_and_agrees_with_cpu():
    torch.manual_seed(5)
    layer = LinearNF4.from_linear(nn.Linear(128, 64), compute_dtype=torch.float32)
    x = torch.randn(8, 128)
    expected = layer(x)
    layer.to("cuda")
    assert layer.weight_packed.is_cuda and layer.weight_absmax_scales.dtype == torch.float32
    torch.testing.assert_close(layer(x.cuda()).cpu(), expected, rtol=1e-4, atol=1e-4)


def test_weight_stand_in_has_shape_dtype_device_and_refuses_writes():
    layer = LinearNF4.from_linear(nn.Linear(64, 32), compute_dtype=torch.bfloat16)
    assert (layer.weight.shape, layer.weight.dtype, layer.weight.device) == \
        ((32, 64), torch.bfloat16, torch.device("cpu"))
    with pytest.raises(RuntimeError):
        layer.weight.add_(1)  # a stand-in: the values are dequantize()'s


def test_from_linear_quantizes_a_conv1d_transposed():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    conv = transformers.pytorch_utils.Conv1D(32, 64)  # nf=32 outputs, nx=64 inputs: weight (64, 32)
    layer = LinearNF4.from_linear(conv)
    assert (layer.in_features, layer.out_features) == (64, 32)
    expected = dequantize_nf4(quantize_nf4(conv.weight.detach().T.contiguous(), double_quant=True))
    assert torch.equal(layer.dequantize(), expected)
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), x @ expected.T + conv.bias)


def test_quantize_model_warns_naming_multihead_attentions_out_proj():
    model = nn.Module()
    model.fc = nn.Linear(16, 16)
    model.attn = nn.MultiheadAttention(16, 2)
    with pytest.warns(UserWarning, match=r"NonDynamicallyQuantizableLinear \(\['attn.out_proj'\]\)"):
        quantize_model(model)
    assert isinstance(model.fc, LinearNF4)
