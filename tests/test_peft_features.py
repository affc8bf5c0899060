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
