"""minilora.fast.pack_adapters: the adapters' float32 masters in one buffer and their compute-dtype copies in
another. The packed model must compute exactly what the unpacked one does, step after step, and fall back to
casting wherever a factor left the pack."""

import copy

import torch
from torch import nn

import minilora
from minilora.fast import pack_adapters
from minilora.inject import inject
from minilora.lora import LoRALinear


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).to(torch.bfloat16).requires_grad_(False)
    inject(model, target_modules=["0", "2"], r=4, lora_alpha=8)
    for layer in lora_layers(model):
        layer.fused = True  # the fused path runs on CPU too when asked
        nn.init.normal_(layer.lora_B["default"], std=0.1)
    return model


def _train(model: nn.Module, steps: int = 3) -> tuple[list[float], list[torch.Tensor]]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    losses = []
    for _ in range(steps):
        loss = model(x).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses, [p.detach().clone() for p in params]


def test_packed_model_trains_exactly_like_the_unpacked_one():
    plain, packed = _model(), _model()
    pack = pack_adapters(packed)
    assert pack is not None and pack.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in packed.parameters() if p.requires_grad)
    (l1, p1), (l2, p2) = _train(plain), _train(packed)
    assert l1 == l2  # bit for bit: the same casts, done once for all layers
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))


def test_copies_refresh_after_an_in_place_change_and_parameters_stay_the_same_objects():
    model = _model()
    A = lora_layers(model)[0].lora_A["default"]
    ids = [id(p) for p in model.parameters()]
    pack = pack_adapters(model)
    assert [id(p) for p in model.parameters()] == ids  # an optimizer made before packing still holds them
    a16, _ = pack.copies(A, lora_layers(model)[0].lora_B["default"], torch.bfloat16)
    with torch.no_grad():
        A.add_(1.0)
    a16_new, _ = pack.copies(A, lora_layers(model)[0].lora_B["default"], torch.bfloat16)
    assert torch.equal(a16_new, A.detach().to(torch.bfloat16))


def test_a_factor_that_left_the_pack_is_cast_as_before():
    model = _model()
    layer = lora_layers(model)[0]
    pack = pack_adapters(model)
    layer.lora_A["default"].data = layer.lora_A["default"].data.clone()  # e.g. model.to(...) re-points storage
    assert pack.copies(layer.lora_A["default"], layer.lora_B["default"], torch.bfloat16) is None
    reference = copy.deepcopy(model)
    for m in lora_layers(reference):
        m.__dict__.pop("_packed_adapters", None)
    x = torch.randn(3, 16).to(torch.bfloat16)
    assert torch.equal(model(x), reference(x))


def test_packed_adapter_saves_and_loads(tmp_path):
    model = _model()
    pack_adapters(model)
    _train(model, steps=1)
    minilora.save_adapter(model, tmp_path / "a")
    other = _model()  # the same base; its adapter is overwritten by the file
    minilora.load_adapter(other, tmp_path / "a")
    x = torch.randn(3, 16).to(torch.bfloat16)
    assert torch.equal(model(x), other(x))
