"""LoraConfig's features against PEFT 0.21: the same layers, the same trainable parameters, equal outputs and
gradients, and adapter files that load both ways (PEFT -> minilora -> PEFT).

Small GPT-2 (Conv1D), Llama and BERT models built from config with random weights; each case is one LoraConfig.
Also here: T5 (its feed-forward reads `wo.weight.dtype`) with LoRA and QLoRA, `minilora.inject` the module,
model-level delete_adapter / disable_adapter / set_adapter with modules to save.
"""

from __future__ import annotations

import copy
import json
import types
import warnings

import pytest
import torch
from torch import nn

from minilora.inject import (
    ModulesToSave,
    delete_adapter,
    disable_adapter,
    inject,
    lora_layers,
    merge_and_unload,
    saved_modules,
    set_adapter,
    unload,
)
from minilora.io import CONFIG_NAME, WEIGHTS_NAME, load_adapter, save_adapter
from minilora.lora import LoRALinear
from minilora.qlora import LinearNF4, quantize_model

from helpers import ATOL

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # PEFT's notes (fan_in_fan_out, ...), r > min


# ---------------------------------------------------------------------------------------------------------
# Models (module scope; tests deep-copy them)


def _seeded(build):
    torch.manual_seed(0)
    return build().eval()


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    bert = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=32, num_labels=3)
    llama = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, attention_bias=True,
                                     pad_token_id=0, num_labels=3, tie_word_embeddings=False)
    gpt2 = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, pad_token_id=0,
                                   num_labels=3)
    return {
        "bert_cls": _seeded(lambda: transformers.BertForSequenceClassification(bert)),
        "llama_cls": _seeded(lambda: transformers.LlamaForSequenceClassification(llama)),
        "llama_lm": _seeded(lambda: transformers.LlamaForCausalLM(llama)),
        "gpt2_cls": _seeded(lambda: transformers.GPT2ForSequenceClassification(gpt2)),
        "gpt2_lm": _seeded(lambda: transformers.GPT2LMHeadModel(gpt2)),
    }


def ids_for(model: nn.Module) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(1, model.config.vocab_size, (2, 6), generator=gen)  # no pad token (id 0)


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


# ---------------------------------------------------------------------------------------------------------
# The comparison


def perturb(peft_model: nn.Module, seed: int = 0) -> None:
    """Move every trainable PEFT parameter (B = 0 included) so that each one changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(peft_model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def our_name(peft_name: str) -> str:
    """PEFT's parameter name as minilora's: no `base_model.model.`, and A, B, m are Parameters, not modules."""
    name = peft_name.removeprefix("base_model.model.")
    for kind in ("lora_A", "lora_B", "lora_magnitude_vector"):
        if f".{kind}." in name and name.endswith(".weight"):
            return name.removesuffix(".weight")
    return name


def gradients(model: nn.Module, ids: torch.Tensor, peft_side: bool) -> dict[str, torch.Tensor]:
    """{minilora name: gradient} of a fixed random projection of the logits, for every trainable parameter."""
    model.zero_grad()
    out = logits(model, ids)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out * weights).sum().backward()
    return {our_name(n) if peft_side else n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def adapted(peft_model: nn.Module) -> dict[str, tuple[int, float]]:
    """{layer name: (r, alpha)} of PEFT's LoRA layers."""
    from peft.tuners.lora import LoraLayer

    return {our_name(n): (m.r["default"], m.lora_alpha["default"]) for n, m in peft_model.named_modules()
            if isinstance(m, LoraLayer)}


def check_with_peft(base: nn.Module, kwargs: dict, task_type: str | None, tmp_path) -> None:
    ids = ids_for(base)
    torch.manual_seed(0)  # A's init draws from the global generator: the same whichever tests ran before
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(task_type=task_type, **kwargs))

    # inject: the same layers with the same r and alpha, the same parameters trainable
    ours = inject(copy.deepcopy(base), task_type=task_type, **kwargs)
    layers = {n: (layer.r["default"], layer.lora_alpha["default"]) for n, layer in lora_layers(ours)}
    assert layers == adapted(reference)
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
        {our_name(n) for n, p in reference.named_parameters() if p.requires_grad}

    # PEFT's file -> minilora: equal outputs and gradients
    perturb(reference)
    reference.save_pretrained(tmp_path / "peft")
    loaded = copy.deepcopy(base)
    load_adapter(loaded, tmp_path / "peft")
    expected = logits(reference, ids).detach()
    assert (expected - logits(base, ids)).abs().max() > 0.01 * expected.abs().max()  # the adapter matters
    assert (logits(loaded, ids) - expected).abs().max() <= ATOL
    theirs, mine = gradients(reference, ids, peft_side=True), gradients(loaded, ids, peft_side=False)
    assert mine.keys() == theirs.keys()
    for name in mine:
        torch.testing.assert_close(mine[name], theirs[name], atol=ATOL, rtol=1e-4, msg=name)

    # minilora's file -> PEFT: equal outputs, and the same keys PEFT writes
    save_adapter(loaded, tmp_path / "ours", task_type=task_type)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert (logits(back, ids) - expected).abs().max() <= ATOL
    from safetensors.torch import load_file

    written = load_file(tmp_path / "ours" / WEIGHTS_NAME).keys()
    assert written == load_file(tmp_path / "peft" / WEIGHTS_NAME).keys() - _peft_duplicates(kwargs, task_type, written)


def _peft_duplicates(kwargs: dict, task_type: str | None, written) -> set[str]:
    """With bias="all", PEFT also writes a module-to-save's bias as `original_module.bias` / `modules_to_save.bias`
    next to its own key; minilora writes the one key (and reads PEFT's file, skipping the copies)."""
    if kwargs.get("bias") != "all" or task_type != "SEQ_CLS":
        return set()
    return {f"base_model.model.{head}.{part}.bias" for head in ("classifier", "score")
            for part in ("original_module", "modules_to_save")}


CASES = {
    # task types' defaults: the head trains whole and is saved under PEFT's keys
    "bert seq_cls": ("bert_cls", {"target_modules": ["query", "value"], "r": 4, "lora_alpha": 8}, "SEQ_CLS"),
    "bert seq_cls all-linear": ("bert_cls", {"target_modules": "all-linear", "r": 2}, "SEQ_CLS"),
    "llama seq_cls": ("llama_cls", {"target_modules": ["q_proj", "v_proj"], "r": 4}, "SEQ_CLS"),
    "llama seq_cls all-linear": ("llama_cls", {"target_modules": "all-linear", "r": 2}, "SEQ_CLS"),
    "gpt2 seq_cls": ("gpt2_cls", {"target_modules": ["c_attn"], "r": 2, "lora_alpha": 4}, "SEQ_CLS"),
    "gpt2 seq_cls all-linear": ("gpt2_cls", {"target_modules": "all-linear", "r": 2}, "SEQ_CLS"),
    # modules_to_save named
    "llama modules_to_save": ("llama_lm", {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}, "CAUSAL_LM"),
    "gpt2 modules_to_save": ("gpt2_lm", {"target_modules": ["c_attn"], "modules_to_save": ["ln_f"]}, "CAUSAL_LM"),
    "bert modules_to_save + dora": ("bert_cls", {"target_modules": ["query"], "use_dora": True,
                                                 "modules_to_save": ["pooler"]}, "SEQ_CLS"),
    # exclude_modules
    "bert exclude list": ("bert_cls", {"target_modules": "all-linear", "exclude_modules": ["key", "pooler.dense"]},
                          "SEQ_CLS"),
    "llama exclude regex": ("llama_lm", {"target_modules": ["q_proj", "v_proj"],
                                         "exclude_modules": r".*layers\.0\.self_attn\.v_proj"}, "CAUSAL_LM"),
    # layers_to_transform / layers_pattern
    "bert layers pattern": ("bert_cls", {"target_modules": ["query", "value"], "layers_to_transform": [1],
                                         "layers_pattern": "layer"}, "SEQ_CLS"),
    "llama layers no pattern": ("llama_lm", {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": 0},
                                "CAUSAL_LM"),
    "gpt2 layers pattern": ("gpt2_lm", {"target_modules": ["c_attn", "c_fc"], "layers_to_transform": [1],
                                        "layers_pattern": "h"}, "CAUSAL_LM"),
    # rank_pattern / alpha_pattern
    "bert rank alpha pattern": ("bert_cls", {"target_modules": ["query", "value"], "r": 4, "lora_alpha": 8,
                                             "rank_pattern": {"layer.1.attention.self.value": 2},
                                             "alpha_pattern": {"query": 3}}, "SEQ_CLS"),
    "llama rank pattern rslora": ("llama_lm", {"target_modules": "all-linear", "r": 4, "use_rslora": True,
                                               "rank_pattern": {"v_proj": 2, r"mlp\..*": 6}}, "CAUSAL_LM"),
    "gpt2 alpha pattern": ("gpt2_lm", {"target_modules": ["c_attn", "c_fc"], "alpha_pattern": {"c_fc": 32}},
                           "CAUSAL_LM"),
    # bias
    "bert bias all": ("bert_cls", {"target_modules": ["query"], "bias": "all"}, "SEQ_CLS"),
    "bert bias lora_only": ("bert_cls", {"target_modules": ["query", "value"], "bias": "lora_only"}, None),
    "llama bias lora_only": ("llama_lm", {"target_modules": ["q_proj", "o_proj"], "bias": "lora_only"}, "CAUSAL_LM"),
    "gpt2 bias all": ("gpt2_lm", {"target_modules": ["c_attn"], "bias": "all"}, "CAUSAL_LM"),
    # inits that rewrite the base: loading runs them again on the original model, as PEFT does
    "bert pissa": ("bert_cls", {"target_modules": ["query", "value"], "init_lora_weights": "pissa"}, "SEQ_CLS"),
    "llama olora": ("llama_lm", {"target_modules": ["q_proj", "up_proj"], "init_lora_weights": "olora"},
                    "CAUSAL_LM"),
    "gpt2 pissa": ("gpt2_lm", {"target_modules": ["c_attn"], "r": 2, "init_lora_weights": "pissa"}, "CAUSAL_LM"),
    "llama gaussian": ("llama_lm", {"target_modules": ["k_proj"], "init_lora_weights": "gaussian"}, "CAUSAL_LM"),
}


@pytest.mark.parametrize("case", CASES)
def test_same_layers_outputs_gradients_and_files_as_peft(case, models, tmp_path):
    model, kwargs, task_type = CASES[case]
    check_with_peft(models[model], kwargs, task_type, tmp_path)


def test_a_head_trained_by_hand_is_saved_for_seq_cls(models, tmp_path):
    """save_adapter(task_type="SEQ_CLS") writes the head PEFT's SEQ_CLS model expects, also where the head was
    unfrozen by hand instead of through modules_to_save."""
    base, ids = models["bert_cls"], ids_for(models["bert_cls"])
    ours = inject(copy.deepcopy(base), ["query"], r=2, init_lora_weights=False)
    with torch.no_grad():
        ours.classifier.weight.add_(1.0)  # "trained"
    save_adapter(ours, tmp_path, task_type="SEQ_CLS")
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["modules_to_save"] == ["classifier"]
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert (logits(back, ids) - logits(ours, ids)).abs().max() <= ATOL


def test_roberta_seq_cls_all_linear_leaves_the_head_to_modules_to_save(tmp_path):
    config = transformers.RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=32, num_labels=2)
    base = _seeded(lambda: transformers.RobertaForSequenceClassification(config))
    check_with_peft(base, {"target_modules": "all-linear", "r": 2}, "SEQ_CLS", tmp_path)
    ours = inject(copy.deepcopy(base), "all-linear", r=2, task_type="SEQ_CLS")
    assert isinstance(ours.classifier, ModulesToSave)  # its dense and out_proj train whole, without LoRA
    assert not [n for n, _ in lora_layers(ours) if n.startswith("classifier")]


# ---------------------------------------------------------------------------------------------------------
# Several adapters: set_adapter, disable_adapter, delete_adapter, merging


def two_adapters(base: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The same two SEQ_CLS adapters ("a" on query/value, "b" on query) in PEFT and in minilora."""
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        target_modules=["query", "value"], r=2, task_type="SEQ_CLS"), adapter_name="a")
    reference.add_adapter("b", peft.LoraConfig(target_modules=["query"], r=4, task_type="SEQ_CLS"))
    ours = inject(copy.deepcopy(base), ["query", "value"], r=2, task_type="SEQ_CLS", adapter_name="a")
    inject(ours, ["query"], r=4, task_type="SEQ_CLS", adapter_name="b")
    for adapter in ("a", "b"):  # make both differ from the base and from each other, then copy them over
        reference.set_adapter(adapter)
        perturb(reference, seed=len(adapter) + ord(adapter))
    with torch.no_grad():
        ours_params = dict(ours.named_parameters())
        for name, p in reference.named_parameters():
            if any(f".{a}." in name or name.endswith(f".{a}.weight") for a in ("a", "b")):
                ours_params[our_name(name)].copy_(p)
    reference.set_adapter("a")  # the first adapter stays active in minilora, as in PEFT
    return reference.eval(), ours


def test_set_disable_delete_adapter_as_peft(models):
    base, ids = models["bert_cls"], ids_for(models["bert_cls"])
    reference, ours = two_adapters(base)
    for adapter in ("b", "a"):
        reference.set_adapter(adapter)
        set_adapter(ours, adapter)
        assert ours.classifier.active_adapter == adapter
        assert (logits(ours, ids) - logits(reference, ids)).abs().max() <= ATOL
        trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
        assert trainable == {our_name(n) for n, p in reference.named_parameters() if p.requires_grad}
    with disable_adapter(ours), reference.disable_adapter():
        assert (logits(ours, ids) - logits(base, ids)).abs().max() <= ATOL
        assert (logits(reference, ids) - logits(base, ids)).abs().max() <= ATOL
    assert (logits(ours, ids) - logits(reference, ids)).abs().max() <= ATOL  # back on, "a" active

    with pytest.raises(ValueError, match="one adapter name"):
        set_adapter(ours, ["a", "b"])
    delete_adapter(ours, "a")
    reference.delete_adapter("a")
    reference.set_adapter("b")
    assert all("a" not in layer.adapter_names for _, layer in lora_layers(ours))
    assert [n for n, _ in saved_modules(ours)] == ["classifier"] and ours.classifier.adapter_names == ["b"]
    assert (logits(ours, ids) - logits(reference, ids)).abs().max() <= ATOL
    # value layers held only "a": they are plain Linear layers again
    assert type(ours.bert.encoder.layer[0].attention.self.value) is nn.Linear
    delete_adapter(ours, "b")
    assert not list(lora_layers(ours)) and type(ours.classifier) is nn.Linear
    assert (logits(ours, ids) - logits(base, ids)).abs().max() == 0


def test_merge_and_unload_and_unload_with_modules_to_save(models):
    base, ids = models["bert_cls"], ids_for(models["bert_cls"])
    reference, ours = two_adapters(base)
    expected = logits(reference, ids).detach()
    merged = merge_and_unload(copy.deepcopy(ours))
    assert type(merged.classifier) is nn.Linear and not list(lora_layers(merged))
    assert (logits(merged, ids) - expected).abs().max() <= ATOL
    assert (logits(reference.merge_and_unload(), ids) - expected).abs().max() <= ATOL
    plain = unload(ours)
    assert type(plain.classifier) is nn.Linear
    assert (logits(plain, ids) - logits(base, ids)).abs().max() == 0


# ---------------------------------------------------------------------------------------------------------
# PiSSA and OLoRA: the same A, B and residual base as PEFT's right after the init


@pytest.mark.parametrize("model,targets,init", [("gpt2_lm", ["c_attn", "c_proj"], "pissa"),
                                                 ("llama_lm", ["q_proj", "down_proj"], "olora"),
                                                 ("bert_cls", ["query"], "pissa")])
def test_weight_inits_equal_peft(models, model, targets, init):
    base = models[model]
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        target_modules=targets, r=4, lora_alpha=8, init_lora_weights=init))
    ours = inject(copy.deepcopy(base), targets, r=4, lora_alpha=8, init_lora_weights=init)
    theirs = {our_name(n): p for n, p in reference.named_parameters()}
    for name, p in ours.named_parameters():  # A, B and the residual base weights
        torch.testing.assert_close(p, theirs[name], atol=1e-5, rtol=1e-4, msg=name)
    ids = ids_for(base)
    assert (logits(ours, ids) - logits(base, ids)).abs().max() <= 1e-4  # the layer computes W0 at step 0


def test_weight_inits_refused_where_they_cannot_apply(models):
    with pytest.raises(ValueError, match="olora.*Conv1D"):
        inject(copy.deepcopy(models["gpt2_lm"]), ["c_attn"], init_lora_weights="olora")
    half = quantize_model(copy.deepcopy(models["llama_lm"]), skip=("lm_head", "layers.0"))  # layer 1 in 4 bits
    before = half.model.layers[0].self_attn.q_proj.weight.detach().clone()
    with pytest.raises(ValueError, match="4-bit base"):
        inject(half, ["q_proj"], init_lora_weights="pissa")
    assert torch.equal(half.model.layers[0].self_attn.q_proj.weight, before)  # checked before any is rewritten
    assert not list(lora_layers(half))
    for name in ("loftq", "eva", "corda", "pissa_niter_16"):
        with pytest.raises(ValueError, match=name):
            inject(copy.deepcopy(models["llama_lm"]), ["q_proj"], init_lora_weights=name)


# ---------------------------------------------------------------------------------------------------------
# Bad arguments: clear errors, the model unchanged


@pytest.mark.parametrize("kwargs,phrase", [
    ({"bias": "some"}, "bias must be"),
    ({"rank_pattern": {"query": 0}}, r"rank_pattern\['query'\]"),
    ({"alpha_pattern": {"query": -1}}, r"alpha_pattern\['query'\]"),
    ({"rank_pattern": ["query"]}, "rank_pattern must map"),
    ({"target_modules": "all-linear", "layers_to_transform": [0]}, "list of names"),
    ({"layers_pattern": "layer"}, "give both"),
    ({"layers_to_transform": [7]}, "left none"),
    ({"exclude_modules": ["query", "value"]}, "left none"),
    ({"modules_to_save": ["no_such_head"]}, "no_such_head"),
    ({"modules_to_save": "classifier"}, "list of module names"),
])
def test_bad_feature_arguments_raise_and_change_nothing(models, kwargs, phrase):
    model = copy.deepcopy(models["bert_cls"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = {"target_modules": ["query", "value"], **kwargs}
    with pytest.raises(ValueError, match=phrase):
        inject(model, **settings)
    assert model.state_dict().keys() == before.keys()
    assert not list(lora_layers(model)) and not list(saved_modules(model))


# ---------------------------------------------------------------------------------------------------------
# minilora.inject is the module


def test_minilora_inject_is_the_module_and_still_callable(models):
    import minilora
    import minilora.inject as m
    from minilora import inject as from_package

    assert isinstance(m, types.ModuleType) and m is minilora.inject is from_package
    assert m.inject is inject and m.merge_and_unload is merge_and_unload
    model = minilora.inject(copy.deepcopy(models["bert_cls"]), ["query"], r=2)  # calls minilora.inject.inject
    assert len(list(lora_layers(model))) == 2


# ---------------------------------------------------------------------------------------------------------
# T5 reads its projections' .weight; GPT-2's Conv1D quantized


@pytest.fixture(scope="module")
def t5() -> nn.Module:
    config = transformers.T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                                   decoder_start_token_id=0)
    return _seeded(lambda: transformers.T5ForConditionalGeneration(config))


def t5_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, decoder_input_ids=ids).logits


def test_t5_with_lora_equals_peft_both_ways(t5, tmp_path):
    ids = ids_for(t5)
    reference = peft.get_peft_model(copy.deepcopy(t5), peft.LoraConfig(target_modules="all-linear", r=2,
                                                                         task_type="SEQ_2_SEQ_LM"))
    perturb(reference)
    reference.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(t5)
    load_adapter(ours, tmp_path / "peft")
    assert ours.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32  # what T5 reads
    expected = t5_logits(reference, ids).detach()
    assert (t5_logits(ours, ids) - expected).abs().max() <= ATOL
    save_adapter(ours, tmp_path / "ours", task_type="SEQ_2_SEQ_LM")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(t5), tmp_path / "ours").eval()
    assert (t5_logits(back, ids) - expected).abs().max() <= ATOL


def test_t5_with_qlora_runs_and_equals_its_dequantized_twin(t5):
    ids = ids_for(t5)
    quantized = quantize_model(copy.deepcopy(t5))
    wo = quantized.encoder.block[0].layer[1].DenseReluDense.wo
    assert isinstance(wo, LinearNF4)
    assert (wo.weight.shape, wo.weight.dtype, wo.weight.device) == ((16, 32), torch.float32, torch.device("cpu"))
    twin = copy.deepcopy(t5)  # the same model with each quantized weight replaced by its dequantized values
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, LinearNF4):
                twin.get_submodule(name).weight.copy_(module.dequantize())
    inject(quantized, "all-linear", r=2, init_lora_weights=False)
    inject(twin, "all-linear", r=2)
    with torch.no_grad():
        for (_, a), (_, b) in zip(lora_layers(quantized), lora_layers(twin)):
            b.lora_A["default"].copy_(a.lora_A["default"])
            b.lora_B["default"].copy_(a.lora_B["default"])
    out = t5_logits(quantized, ids)
    assert (out - t5_logits(twin, ids)).abs().max() <= 1e-4
    out.square().mean().backward()
    assert all(layer.lora_A["default"].grad is not None for _, layer in lora_layers(quantized))


def test_quantize_model_quantizes_gpt2_conv1d_transposed(models):
    base, ids = models["gpt2_lm"], ids_for(models["gpt2_lm"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing skipped that needs a word: lm_head is the (tied) head
        quantized = quantize_model(copy.deepcopy(base))
    names = [n for n, m in quantized.named_modules() if isinstance(m, LinearNF4)]
    assert len(names) == 8 and all(n.endswith(("c_attn", "c_proj", "c_fc")) for n in names)
    twin = copy.deepcopy(base)
    with torch.no_grad():
        for name in names:
            twin.get_submodule(name).weight.copy_(quantized.get_submodule(name).dequantize().T)  # Conv1D: (in, out)
    assert (logits(quantized, ids) - logits(twin, ids)).abs().max() <= 1e-4
    inject(quantized, ["c_attn"], r=2)  # QLoRA on GPT-2
    assert all(isinstance(layer.base_layer, LinearNF4) for _, layer in lora_layers(quantized))


def test_quantize_model_names_the_linear_subclasses_it_skips():
    class FalconLikeLinear(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(8, 8), FalconLikeLinear(8, 8))
    with pytest.warns(UserWarning, match=r"subclasses unquantized: 1 FalconLikeLinear \(\['1'\]\)"):
        quantize_model(model)
    assert isinstance(model[0], LinearNF4) and type(model[1]) is FalconLikeLinear
