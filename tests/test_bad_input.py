"""Bad input and faults: each test shows that nothing is lost and nothing wrong comes back silently.

The rule under test everywhere: check everything before changing anything, and say what is wrong and what
to do. One group per public entry point: adapter files, merging, injecting, quantizing, NF4 storage, and the
paged optimizer.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

import minilora.io as minilora_io
from minilora.bnb import from_bnb
from minilora.double_quant import DoubleQuantAbsmax, double_quantize
from minilora.inject import find_target_modules, inject, lora_layers, merge_and_unload
from minilora.io import CONFIG_NAME, WEIGHTS_NAME, load_adapter, save_adapter
from minilora.lora import LoRALinear
from minilora.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4
from minilora.paged import PagedAdamW
from minilora.qlora import LinearNF4, quantize_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def mlp(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).to(dtype)


def randomize_adapters(model: nn.Module, seed: int, adapter: str = "default") -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for p in (layer.lora_A[adapter], layer.lora_B[adapter]):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def adapter_values(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{n}.{kind}": getattr(layer, kind)["default"].detach().clone()
            for n, layer in lora_layers(model) for kind in ("lora_A", "lora_B")}


def tiny_gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=8,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


# ---------------------------------------------------------------------------------------------------------
# Adapter files


def _fail_config_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make writing the config file fail, after the weights file has been written."""
    real_open = open

    def failing_open(file, mode="r", *args, **kwargs):
        if "w" in mode and CONFIG_NAME in os.fspath(file):
            raise OSError("disk full")
        return real_open(file, mode, *args, **kwargs)

    # minilora.io looks `open` up in its module globals first, then in builtins
    monkeypatch.setattr(minilora_io, "open", failing_open, raising=False)


def test_save_interrupted_before_the_config_keeps_the_old_adapter(tmp_path, monkeypatch):
    model = inject(mlp(), ["0", "2"], r=4, lora_alpha=8)
    randomize_adapters(model, seed=1)
    save_adapter(model, tmp_path)
    old = adapter_values(model)

    newer = inject(mlp(), ["0", "2"], r=4, lora_alpha=16)
    randomize_adapters(newer, seed=2)
    _fail_config_write(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(newer, tmp_path)
    monkeypatch.undo()

    fresh = mlp()
    config = load_adapter(fresh, tmp_path)
    assert config["lora_alpha"] == 8
    got = adapter_values(fresh)
    assert all(torch.equal(got[k], old[k]) for k in old), "the old adapter must load intact"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([WEIGHTS_NAME, CONFIG_NAME])  # no temporaries


def test_weights_and_config_from_different_saves_are_refused(tmp_path, monkeypatch):
    model = inject(mlp(), ["0", "2"], r=4, lora_alpha=8)
    save_adapter(model, tmp_path)
    newer = inject(mlp(), ["0", "2"], r=4, lora_alpha=16)
    randomize_adapters(newer, seed=2)

    # A crash between the two renames: the weights are already the new ones, the config still the old one.
    real_replace, calls = os.replace, []

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt("power cut")
        return real_replace(src, dst)

    monkeypatch.setattr(minilora_io.os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(newer, tmp_path)
    monkeypatch.undo()

    fresh = mlp()
    with pytest.raises(ValueError, match="do not belong together.*lora_alpha: weights 16, config 8"):
        load_adapter(fresh, tmp_path)
    assert not list(lora_layers(fresh))  # refused before anything changed


def test_save_to_an_existing_file_says_it_is_not_a_directory(tmp_path):
    model = inject(mlp(), ["0"], r=2)
    file = tmp_path / "adapter.safetensors"
    file.write_bytes(b"something else")
    with pytest.raises(NotADirectoryError, match="is a file, not a directory"):
        save_adapter(model, file)
    with pytest.raises(NotADirectoryError, match="lies inside .* which is a file"):
        save_adapter(model, file / "sub")
    assert file.read_bytes() == b"something else"


def test_load_into_a_meta_model_is_refused(tmp_path):
    model = inject(mlp(), ["0", "2"], r=4)
    randomize_adapters(model, seed=1)
    save_adapter(model, tmp_path)
    with torch.device("meta"):
        empty = mlp()
    with pytest.raises(ValueError, match="meta device"):
        load_adapter(empty, tmp_path)
    assert not list(lora_layers(empty))


def test_peft_still_reads_the_files(tmp_path):
    peft = pytest.importorskip("peft")
    model = inject(mlp(), ["0", "2"], r=4, lora_alpha=8)
    randomize_adapters(model, seed=1)
    save_adapter(model, tmp_path)
    x = torch.randn(3, 16)
    theirs = peft.PeftModel.from_pretrained(mlp(), tmp_path)
    torch.testing.assert_close(theirs(x), model(x), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# Merging


def overflowing_fp16_layer() -> LoRALinear:
    """A float16 layer whose W0 + ΔW is finite in float32 but beyond float16's largest value, 65504."""
    base = nn.Linear(4, 4, bias=False).half()
    with torch.no_grad():
        base.weight.fill_(65000.0)
    layer = LoRALinear(base, r=1, lora_alpha=1)
    with torch.no_grad():
        layer.lora_A["default"].fill_(1.0)
        layer.lora_B["default"].fill_(1000.0)  # ΔW = 1000 everywhere: 66000 in fp32, inf in fp16
    return layer


def test_safe_merge_checks_the_weight_in_the_stored_dtype():
    layer = overflowing_fp16_layer()
    before = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite weights in torch.float16"):
        layer.merge(safe=True)
    assert torch.equal(layer.base_layer.weight, before) and not layer.merged


def test_safe_merge_and_unload_checks_the_weight_in_the_stored_dtype():
    model = nn.Sequential(overflowing_fp16_layer())
    before = model[0].base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite weights in torch.float16"):
        merge_and_unload(model, safe=True)
    assert isinstance(model[0], LoRALinear) and torch.equal(model[0].base_layer.weight, before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_then_unmerge_restores_a_16_bit_base_exactly(dtype, use_dora):
    torch.manual_seed(0)
    base = nn.Linear(64, 48).to(dtype)
    w0 = base.weight.detach().clone()
    layer = LoRALinear(base, r=4, use_dora=use_dora, init_lora_weights=False)
    x = torch.randn(5, 64, dtype=dtype)
    unmerged_out = layer(x)
    layer.merge()
    assert not torch.equal(base.weight, w0)  # the update is in the weight
    layer.unmerge()
    assert torch.equal(base.weight, w0)
    assert torch.equal(layer(x), unmerged_out)


def test_merge_and_unload_into_a_tied_weight_is_refused():
    model = tiny_gpt2()
    wte = model.transformer.wte.weight.detach().clone()
    with pytest.warns(UserWarning, match=r"'lm_head' shares its weight with \['transformer.wte.weight'\]"):
        inject(model, ["lm_head"], r=2, init_lora_weights=False)
    with pytest.raises(ValueError, match="tie_word_embeddings.*Nothing was merged.*untie first"):
        merge_and_unload(model)
    assert torch.equal(model.transformer.wte.weight, wte)
    assert isinstance(model.lm_head, LoRALinear)


def test_merge_works_once_the_weights_are_untied():
    model = tiny_gpt2()
    head = model.lm_head
    head.weight = nn.Parameter(head.weight.detach().clone())  # what the refusal says to do
    model.config.tie_word_embeddings = False
    wte = model.transformer.wte.weight.detach().clone()
    inject(model, ["lm_head"], r=2, init_lora_weights=False)
    ids = torch.tensor([[1, 2, 3]])
    expected = model(ids).logits
    merge_and_unload(model)
    torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(model.transformer.wte.weight, wte)


# ---------------------------------------------------------------------------------------------------------
# Injecting


class PackedLinear(nn.Linear):
    """Stands in for bitsandbytes' Linear4bit: an nn.Linear subclass whose weight holds packed bytes."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__(n_in, n_out)
        self.weight = nn.Parameter(torch.zeros(n_in * n_out // 2, 1, dtype=torch.uint8), requires_grad=False)


def test_a_refused_target_leaves_every_layer_unwrapped():
    model = nn.Sequential(nn.Linear(16, 16), PackedLinear(16, 16), nn.Linear(16, 4))
    with pytest.raises(TypeError, match=r"(?s)cannot be wrapped; nothing was changed.*'1': PackedLinear"):
        inject(model, "all-linear", r=2)
    assert not list(lora_layers(model))
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("1."))
    with pytest.raises(TypeError, match="PackedLinear"):
        find_target_modules(model, ["1"])


@pytest.mark.slow  # importing bitsandbytes takes several seconds on a CPU
def test_all_linear_over_a_bitsandbytes_4bit_layer_changes_nothing():
    bnb = pytest.importorskip("bitsandbytes")
    model = nn.Sequential(nn.Linear(64, 64), bnb.nn.Linear4bit(64, 64, quant_type="nf4"), nn.Linear(64, 8))
    model[1] = model[1].to("cpu")  # quantizes
    with pytest.raises(TypeError, match="Linear4bit"):
        inject(model, "all-linear", r=2)
    assert not list(lora_layers(model)) and type(model[0]) is nn.Linear


def test_a_rank_above_min_in_out_warns():
    with pytest.warns(UserWarning, match=r"r=8 exceeds min\(in_features, out_features\) = 4"):
        LoRALinear(nn.Linear(4, 32), r=8)


# ---------------------------------------------------------------------------------------------------------
# Quantizing


def test_quantize_model_refuses_merged_adapters():
    model = inject(mlp(), ["0", "2"], r=4, init_lora_weights=False)
    for _, layer in lora_layers(model):
        layer.merge()
    x = torch.randn(3, 16)
    expected = model(x)
    with pytest.raises(ValueError, match="merged LoRA adapter.*Nothing was quantized"):
        quantize_model(model)
    assert not any(isinstance(m, LinearNF4) for m in model.modules())
    torch.testing.assert_close(model(x), expected)


def test_quantize_model_with_nothing_to_quantize_says_what_it_found():
    model = nn.Module()
    model.attn = nn.MultiheadAttention(16, 2)  # its out_proj is an nn.Linear subclass
    with pytest.warns(UserWarning, match="nothing to quantize.*nn.Linear subclasses"):
        quantize_model(model)


# ---------------------------------------------------------------------------------------------------------
# NF4 storage


def test_nf4_tensor_parts_that_do_not_fit_are_refused():
    w = torch.randn(8, 64)
    q = quantize_nf4(w, blocksize=64)  # 512 values: 256 bytes, 8 blocks
    parts = dict(packed=q.packed, absmax=q.absmax, shape=q.shape, dtype=q.dtype, blocksize=q.blocksize)
    with pytest.raises(ValueError, match="packed has 255 bytes; shape .8, 64. .* needs .* 256"):
        NF4Tensor(**{**parts, "packed": q.packed[:-1]})
    with pytest.raises(ValueError, match="absmax has 7 values; .* 8 blocks .* needs one per block: 8"):
        NF4Tensor(**{**parts, "absmax": q.absmax[:-1]})
    with pytest.raises(ValueError, match="absmax has 8 values; .* 16 blocks .* 16"):
        NF4Tensor(**{**parts, "blocksize": 32})
    with pytest.raises(ValueError, match="blocksize must be one of"):
        NF4Tensor(**{**parts, "blocksize": 48})
    with pytest.raises(TypeError, match="packed must be a 1-D uint8"):
        NF4Tensor(**{**parts, "packed": q.packed.to(torch.int32)})
    assert NF4Tensor(**{**parts, "shape": (8, 64)}).shape == torch.Size([8, 64])


def test_double_quantized_parts_that_do_not_fit_are_refused():
    q = quantize_nf4(torch.randn(300, 64), blocksize=64, double_quant=True)  # 300 blocks: 2 groups of 256
    dq = q.absmax
    with pytest.raises(ValueError, match="300 codes in groups of 256, which need 2 scales; got 1"):
        DoubleQuantAbsmax(codes=dq.codes, scales=dq.scales[:1], offset=dq.offset)
    shorter = DoubleQuantAbsmax(codes=dq.codes[:-1], scales=dq.scales, offset=dq.offset)
    with pytest.raises(ValueError, match="absmax codes has 299 values; .* 300"):
        NF4Tensor(packed=q.packed, absmax=shorter, shape=q.shape, dtype=q.dtype, blocksize=64)


@pytest.mark.slow  # importing bitsandbytes takes several seconds on a CPU
def test_from_bnb_checks_the_sizes_of_the_quant_state():
    functional = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(16, 64)
    packed, state = functional.quantize_4bit(w, blocksize=64, quant_type="nf4")
    state.absmax = state.absmax[:-1]
    with pytest.raises(ValueError, match=r"quant_state.absmax has 15 values; expected 16 for shape \(16, 64\)"):
        from_bnb(packed, state)

    packed, state = functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    state.state2.absmax = torch.cat([state.state2.absmax, state.state2.absmax])
    with pytest.raises(ValueError, match="state2.absmax has 2 values; expected 1 for 16 block codes"):
        from_bnb(packed, state)


@pytest.mark.parametrize("magnitude", [1e37, 3e38, 1e-40])
def test_double_quantization_of_extreme_weights(magnitude):
    torch.manual_seed(0)
    w = torch.randn(64, 64).clamp(-3, 3) * (magnitude / 3)
    q = quantize_nf4(w, blocksize=64, double_quant=True)
    plain = quantize_nf4(w, blocksize=64)
    back = dequantize_nf4(q)
    assert torch.isfinite(back).all()
    assert torch.isfinite(q.absmax.offset) and torch.isfinite(q.absmax.scales).all()
    # The 8-bit block scales are close to the float32 ones, as for ordinary weights (1% of the largest).
    assert ((q.block_absmax() - plain.block_absmax()).abs().max() <= 0.01 * plain.block_absmax().max()).item()


def test_double_quantize_keeps_the_float32_mean_when_it_is_finite():
    absmax = torch.rand(1000) + 0.1
    assert torch.equal(double_quantize(absmax).offset, absmax.mean())


# ---------------------------------------------------------------------------------------------------------
# Paged optimizer


def test_paged_adamw_refuses_other_devices_before_changing_state():
    on_cpu = nn.Parameter(torch.randn(8))
    elsewhere = nn.Parameter(torch.randn(8, device="meta"))  # stands for any device that is not CPU or CUDA
    opt = PagedAdamW([on_cpu, elsewhere], lr=0.1)
    on_cpu.grad = torch.ones(8)
    elsewhere.grad = torch.ones(8, device="meta")
    before = on_cpu.detach().clone()
    with pytest.raises(ValueError, match="parameter on meta.*Nothing was updated"):
        opt.step()
    assert torch.equal(on_cpu.detach(), before)
    assert not opt.state  # no step counted, no moments created
    copy.deepcopy(opt)  # still a usable optimizer
