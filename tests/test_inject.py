"""inject / merge_and_unload / add_weighted_adapter against PEFT's LoraModel on MiniLM and small GPT-2 / BERT.

Target sets, parameter counts and the printed summary line come from PEFT 0.21 on the same models;
merged outputs are compared with the unmerged model (fp32, 1e-5); task arithmetic with float64 ΔW's.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from minilora.inject import (
    active_adapter,
    add_weighted_adapter,
    count_parameters,
    disable_adapters,
    find_target_modules,
    inject,
    lora_layers,
    merge_and_unload,
    print_trainable_parameters,
    set_adapter,
    unload,
)
from minilora.lora import LoRALinear

from helpers import ATOL, FakeNF4, randomize_B, snapshot, unchanged

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def bert_classifier() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=3
    )
    return transformers.BertForSequenceClassification(config).eval()


def peft_targets(model: nn.Module, **config) -> set[str]:
    wrapped = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**config))
    inner = wrapped.base_model.model
    return {n for n, m in inner.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


# ---------------------------------------------------------------------------------------------------------
# Which layers get adapters


@pytest.mark.parametrize(
    "targets",
    [["query", "value"], ["query", "attention.output.dense"], r".*\.(key|value)", r"encoder\.layer\.[0-2]\..*dense"],
)
def test_target_matching_equals_peft(minilm, targets):
    assert set(find_target_modules(minilm, targets)) == peft_targets(minilm, target_modules=targets)


def test_all_linear_equals_peft_and_skips_the_head(minilm, gpt2, bert_classifier):
    chosen = set(find_target_modules(minilm, "all-linear"))
    assert chosen == peft_targets(minilm, target_modules="all-linear")
    assert "pooler.dense" in chosen  # a bare encoder has no output embedding, so nothing is excluded
    chosen = set(find_target_modules(gpt2, "all-linear"))
    assert chosen == peft_targets(gpt2, target_modules="all-linear") and "lm_head" not in chosen
    chosen = set(find_target_modules(bert_classifier, "all-linear", task_type="SEQ_CLS"))
    expected = peft_targets(bert_classifier, target_modules="all-linear", task_type="SEQ_CLS")
    assert chosen == expected and "classifier" not in chosen


def test_inject_freezes_the_base_and_counts_like_peft(minilm, capsys):
    model = inject(copy.deepcopy(minilm), ["query", "value"], r=8, lora_alpha=16)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 2 * 6

    reference = peft.get_peft_model(copy.deepcopy(minilm), peft.LoraConfig(r=8, target_modules=["query", "value"]))
    assert count_parameters(model) == reference.get_nb_trainable_parameters()
    reference.print_trainable_parameters()
    peft_line = capsys.readouterr().out
    print_trainable_parameters(model)
    assert capsys.readouterr().out == peft_line


# ---------------------------------------------------------------------------------------------------------
# Errors leave the model as it was


def test_unknown_target_lists_available_names(tiny_bert):
    model = copy.deepcopy(tiny_bert)
    before = snapshot(model)
    with pytest.raises(ValueError, match="q_proj") as err:
        inject(model, ["q_proj", "value"])
    assert "query" in str(err.value) and "dense" in str(err.value)
    with pytest.raises(ValueError, match="regex"):
        inject(model, r"nothing\.here")
    for bad in ([], None, [""]):
        with pytest.raises(ValueError):
            inject(model, bad)
    assert unchanged(model, before) and not list(lora_layers(model))


def test_non_linear_target_is_a_type_error(tiny_bert):
    model = copy.deepcopy(tiny_bert)
    before = snapshot(model)
    with pytest.raises(TypeError, match="BertSelfAttention"):
        inject(model, ["self"])
    with pytest.raises(TypeError, match="LayerNorm"):
        inject(model, ["query", "LayerNorm"])
    assert unchanged(model, before) and not list(lora_layers(model))


def test_bad_hyperparameters_change_nothing(tiny_bert):
    model = copy.deepcopy(tiny_bert)
    for kwargs in ({"r": 0}, {"r": -1}, {"lora_alpha": 0}, {"lora_dropout": 1.0}):
        with pytest.raises(ValueError):
            inject(model, ["query"], **kwargs)
    assert not list(lora_layers(model))


def test_same_adapter_twice_is_refused_a_second_name_is_added(tiny_bert):
    model = inject(copy.deepcopy(tiny_bert), ["query"], r=4)
    before = snapshot(model)
    with pytest.raises(ValueError, match="already injected"):
        inject(model, ["query", "value"], r=4)
    assert unchanged(model, before)

    inject(model, ["query", "value"], r=2, adapter_name="second")
    query = model.encoder.layer[0].attention.self.query
    value = model.encoder.layer[0].attention.self.value
    assert query.adapter_names == ["default", "second"] and value.adapter_names == ["second"]
    assert active_adapter(model) == "default" and value.active_adapter == "default"
    assert query.lora_A["default"].requires_grad and not query.lora_A["second"].requires_grad
    set_adapter(model, "second")
    assert query.lora_A["second"].requires_grad and not query.lora_A["default"].requires_grad
    assert value.lora_B["second"].requires_grad
    with pytest.raises(ValueError, match="no adapter named"):
        set_adapter(model, "third")


# ---------------------------------------------------------------------------------------------------------
# Switching off, merging, unloading


def test_disable_adapters_context(gpt2):
    model = inject(copy.deepcopy(gpt2), "all-linear", r=4)
    randomize_B(model)
    ids = torch.randint(0, 64, (2, 8))
    adapted = model(ids).logits
    with disable_adapters(model):
        assert torch.equal(model(ids).logits, gpt2(ids).logits)
    assert torch.equal(model(ids).logits, adapted)
    assert (adapted - gpt2(ids).logits).abs().max() > 1e-3


def test_merge_and_unload_minilm(minilm):
    model = inject(copy.deepcopy(minilm), ["query", "value", "output.dense"], r=4)
    randomize_B(model)
    ids = torch.randint(0, 1000, (2, 8))
    adapted = model(ids).last_hidden_state.detach()
    plain = merge_and_unload(model)
    assert not list(lora_layers(plain))
    assert type(plain.encoder.layer[0].attention.self.query) is nn.Linear
    assert set(plain.state_dict()) == set(minilm.state_dict())
    assert (plain(ids).last_hidden_state - adapted).abs().max() <= ATOL


def test_merge_and_unload_gpt2_keeps_conv1d(gpt2):
    model = inject(copy.deepcopy(gpt2), "all-linear", r=4, use_rslora=True)
    randomize_B(model)
    ids = torch.randint(0, 64, (2, 8))
    adapted = model(ids).logits.detach()
    reference = peft.get_peft_model(
        copy.deepcopy(gpt2), peft.LoraConfig(r=4, use_rslora=True, target_modules="all-linear")
    )
    with torch.no_grad():
        for name, layer in lora_layers(model):
            target = reference.base_model.model.get_submodule(name)
            target.lora_A["default"].weight.copy_(layer.lora_A["default"])
            target.lora_B["default"].weight.copy_(layer.lora_B["default"])
    peft_plain = reference.merge_and_unload()
    plain = merge_and_unload(model)
    assert isinstance(plain.transformer.h[0].attn.c_attn, transformers.pytorch_utils.Conv1D)
    assert (plain(ids).logits - adapted).abs().max() <= ATOL
    for key, value in peft_plain.state_dict().items():
        assert (plain.state_dict()[key] - value).abs().max() <= 1e-6


def test_merge_and_unload_4bit_base_becomes_dense_linear():
    torch.manual_seed(0)
    model = nn.Sequential(FakeNF4(nn.Linear(8, 16)), nn.ReLU(), FakeNF4(nn.Linear(16, 4)))
    inject(model, ["0", "2"], r=2, init_lora_weights=False)
    adapters = (2 * 8 + 16 * 2) + (2 * 16 + 4 * 2)  # A (r, in) + B (out, r) per layer
    assert count_parameters(model) == (adapters, adapters + 8 * 16 + 16 * 4 + 16 + 4)  # + 4-bit weights + biases
    x = torch.randn(3, 8)
    adapted = model(x).detach()
    merge_and_unload(model)
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear
    assert (model(x) - adapted).abs().max() <= ATOL


def test_safe_merge_and_unload_refuses_nan_and_changes_nothing(tiny_bert):
    model = inject(copy.deepcopy(tiny_bert), ["query", "value"], r=4)
    randomize_B(model)
    with torch.no_grad():
        model.encoder.layer[1].attention.self.value.lora_B["default"][0, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(ValueError, match="non-finite"):
        merge_and_unload(model, safe=True)
    assert unchanged(model, before) and len(list(lora_layers(model))) == 4


def test_unload_gives_back_the_base_layers(tiny_bert):
    model = copy.deepcopy(tiny_bert)
    query = model.encoder.layer[0].attention.self.query
    inject(model, ["query"], r=4)
    randomize_B(model)
    ids = torch.randint(0, 50, (2, 8))
    unload(model)
    assert model.encoder.layer[0].attention.self.query is query
    assert torch.equal(model(ids).last_hidden_state, tiny_bert(ids).last_hidden_state)


# ---------------------------------------------------------------------------------------------------------
# Task arithmetic


def test_add_weighted_adapter_realises_the_weighted_sum_and_equals_peft_cat(minilm):
    weights = [0.7, -0.3]
    targets = ["query", "value"]
    model = inject(copy.deepcopy(minilm), targets, r=4, lora_alpha=8)
    inject(model, targets, r=2, lora_alpha=6, adapter_name="b")
    randomize_B(model, "default", seed=1)
    randomize_B(model, "b", seed=2)
    add_weighted_adapter(model, ["default", "b"], weights, "mix")

    for _, layer in lora_layers(model):
        assert layer.r["mix"] == 6 and layer.scaling["mix"] == 1.0
        expected = sum(w * layer.delta_weight(a).double() for a, w in zip(["default", "b"], weights))
        got = layer.lora_B["mix"].double() @ layer.lora_A["mix"].double()
        assert (got - expected).abs().max() <= 1e-6
    assert active_adapter(model) == "default"

    reference = peft.get_peft_model(copy.deepcopy(minilm), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    reference.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=6, target_modules=targets))
    with torch.no_grad():
        for name, layer in lora_layers(model):
            target = reference.base_model.model.get_submodule(name)
            for a in ("default", "b"):
                target.lora_A[a].weight.copy_(layer.lora_A[a])
                target.lora_B[a].weight.copy_(layer.lora_B[a])
    reference.add_weighted_adapter(["default", "b"], weights, "mix", combination_type="cat")
    for name, layer in lora_layers(model):
        target = reference.base_model.model.get_submodule(name)
        assert torch.allclose(target.lora_A["mix"].weight, layer.lora_A["mix"], atol=1e-7)
        assert torch.allclose(target.lora_B["mix"].weight, layer.lora_B["mix"], atol=1e-7)

    ids = torch.randint(0, 1000, (2, 8))
    set_adapter(model, "mix")
    reference.set_adapter("mix")
    assert (model(ids).last_hidden_state - reference(input_ids=ids).last_hidden_state).abs().max() <= ATOL


def test_add_weighted_adapter_errors(tiny_bert):
    model = inject(copy.deepcopy(tiny_bert), ["query"], r=2)
    inject(model, ["value"], r=2, adapter_name="other")
    inject(model, ["query"], r=2, adapter_name="dora", use_dora=True)
    with pytest.raises(ValueError, match="unknown"):
        add_weighted_adapter(model, ["default", "nope"], [1, 1], "mix")
    with pytest.raises(ValueError, match="same length"):
        add_weighted_adapter(model, ["default"], [1, 1], "mix")
    with pytest.raises(ValueError, match="same layers"):
        add_weighted_adapter(model, ["default", "other"], [1, 1], "mix")
    with pytest.raises(ValueError, match="DoRA"):
        add_weighted_adapter(model, ["default", "dora"], [1, 1], "mix")
    with pytest.raises(ValueError, match="taken"):
        add_weighted_adapter(model, ["default"], [1], "other")
    assert not any("mix" in layer.adapter_names for _, layer in lora_layers(model))
    assert isinstance(model.encoder.layer[0].attention.self.query, LoRALinear)


# ---------------------------------------------------------------------------------------------------------
# LoRA+ optimizer groups (minilora.loraplus) against peft.optimizers.create_loraplus_optimizer


def peft_style(name: str) -> str:
    """minilora parameter name -> PEFT's (which wraps each factor in an nn.Linear / DoRA module)."""
    for kind in ("lora_A", "lora_B", "lora_magnitude_vector"):
        if f".{kind}." in name:
            name += ".weight"
    return "base_model.model." + name


def lr_and_decay(model: nn.Module, optimizer: torch.optim.Optimizer, rename=lambda n: n) -> dict[str, tuple]:
    by_param = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    return {rename(n): by_param[id(p)] for n, p in model.named_parameters() if p.requires_grad}


def unfreeze_some_base_parameters(model: nn.Module, prefix: str = "") -> None:
    for name in ("encoder.layer.0.attention.output.LayerNorm.weight", "encoder.layer.1.output.dense.bias",
                 "encoder.layer.1.output.dense.weight"):
        model.get_parameter(prefix + name).requires_grad_(True)


@pytest.mark.parametrize("use_dora", [False, True])
def test_loraplus_groups_and_one_step_equal_peft(tiny_bert, use_dora):
    from peft.optimizers import create_loraplus_optimizer

    from minilora.loraplus import loraplus_param_groups, make_loraplus_optimizer

    targets = ["query", "value"]
    ours = inject(copy.deepcopy(tiny_bert), targets, r=4, use_dora=use_dora)
    reference = peft.get_peft_model(
        copy.deepcopy(tiny_bert), peft.LoraConfig(r=4, target_modules=targets, use_dora=use_dora)
    )
    randomize_B(ours)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if ".lora_" in name:
                reference.get_parameter(peft_style(name)).copy_(p)
    unfreeze_some_base_parameters(ours)
    unfreeze_some_base_parameters(reference, "base_model.model.")

    kwargs = dict(lr=1e-3, weight_decay=0.1)
    ours_opt = make_loraplus_optimizer(ours, torch.optim.AdamW, ratio=16, **kwargs)
    peft_opt = create_loraplus_optimizer(
        reference, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, loraplus_weight_decay=0.1
    )
    groups = lr_and_decay(ours, ours_opt, peft_style)
    assert groups == lr_and_decay(reference, peft_opt)
    assert {v for k, v in groups.items() if ".lora_A." in k} == {(1e-3, 0.1)}
    assert {v for k, v in groups.items() if ".lora_B." in k} == {(16e-3, 0.1)}
    assert groups[peft_style("encoder.layer.0.attention.output.LayerNorm.weight")] == (16e-3, 0.0)  # 1-D: ratio
    assert [g["name"] for g in loraplus_param_groups(ours, 1e-3)] == ["lora_A", "lora_B", "lora_B_no_decay"]
    if use_dora:
        return  # DoRA's fp32 gradients differ from PEFT's by rounding, which Adam's first step amplifies

    ids = torch.randint(0, 50, (2, 8))
    for model, optimizer in ((ours, ours_opt), (reference, peft_opt)):
        model.eval()  # BERT's own dropout would draw different masks in the two runs
        model(input_ids=ids).last_hidden_state.pow(2).mean().backward()
        optimizer.step()
    for name, p in ours.named_parameters():
        if p.requires_grad:
            counterpart = peft_style(name) if ".lora_" in name else "base_model.model." + name
            assert (p - reference.get_parameter(counterpart)).abs().max() <= 1e-6, name


def test_loraplus_bad_arguments(tiny_bert):
    from minilora.loraplus import loraplus_param_groups

    with pytest.raises(ValueError, match="no trainable"):
        loraplus_param_groups(copy.deepcopy(tiny_bert).requires_grad_(False), 1e-3)
    model = inject(copy.deepcopy(tiny_bert), ["query"], r=2)
    for kwargs in ({"lr": 0}, {"lr": 1e-3, "ratio": -1}, {"lr": 1e-3, "weight_decay": -0.1}):
        with pytest.raises(ValueError):
            loraplus_param_groups(model, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# PEFT's name rules for layers_to_transform and rank_pattern / alpha_pattern


def test_layer_index_reads_the_block_number_as_peft_does():
    from minilora.inject import layer_index

    assert layer_index("model.layers.3.self_attn.q_proj", None) == 3
    assert layer_index("transformer.h.1.attn.c_attn", "h") == 1
    assert layer_index("model.layers.2.mlp.experts.5.w1", None) == 2  # the first number, not an expert's
    assert layer_index("encoder.layer.0.attention.self.query", ["blocks", "layer"]) == 0
    assert layer_index("lm_head", None) is None and layer_index("model.layers.3.q", "h") is None


def test_pattern_value_matches_the_end_of_a_name():
    from minilora.inject import pattern_value

    patterns = {"v_proj": 4, r"layers\.1\..*": 2}
    assert pattern_value(patterns, "model.layers.0.self_attn.v_proj", 8) == 4
    assert pattern_value(patterns, "model.layers.1.mlp.up_proj", 8) == 2
    assert pattern_value(patterns, "model.layers.0.self_attn.xv_proj", 8) == 8  # whole name parts only
    assert pattern_value(None, "anything", 8) == 8
