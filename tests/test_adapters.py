"""Bottleneck adapters and prefix tuning (minilora.adapters): the adapter sits in sequence after its sublayer and
starts as the identity; prefix tuning equals PEFT's PrefixTuningConfig (0.21.2, 0.22.0) on GPT-2 and Llama (same seed,
same prefixes, outputs and gradients), and on BERT, which PEFT runs from 0.22.0 (before, it refused)."""

import copy

import pytest
import torch
from packaging.version import Version
from torch import nn

from minilora.adapters import BottleneckAdapter, PrefixTuning, SequentialAdapter, insert_adapters

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def test_adapter_runs_in_sequence_after_the_sublayer():
    torch.manual_seed(0)
    dense = nn.Linear(8, 6)
    layer = SequentialAdapter(dense, bottleneck=3)
    x = torch.randn(5, 8)
    torch.testing.assert_close(layer(x), dense(x))  # W_up = 0: the pretrained function at the start
    nn.init.normal_(layer.adapter.up.weight)
    h = dense(x)
    expected = h + layer.adapter.up(nn.functional.gelu(layer.adapter.down(h)))
    torch.testing.assert_close(layer(x), expected)
    parallel = dense(x) + layer.adapter.up(nn.functional.gelu(layer.adapter.down(x[:, :6])))
    assert not torch.allclose(layer(x), parallel)


def test_adapter_is_not_linear_so_it_cannot_be_merged():
    torch.manual_seed(0)
    adapter = BottleneckAdapter(6, 3)
    nn.init.normal_(adapter.up.weight)
    a, b = torch.randn(6), torch.randn(6)
    # a linear map would give f(a + b) - f(0) = f(a) - f(0) + f(b) - f(0)
    zero = adapter(torch.zeros(6))
    assert not torch.allclose(adapter(a + b) - zero, adapter(a) - zero + adapter(b) - zero, atol=1e-4)


def test_insert_adapters_houlsby_places(tiny_bert):
    model = insert_adapters(copy.deepcopy(tiny_bert), after=["output.dense"], bottleneck=4)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, SequentialAdapter)]
    assert wrapped == [f"encoder.layer.{i}.{p}" for i in range(2) for p in ("attention.output.dense", "output.dense")]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 4 * (16 * 4 + 4 + 4 * 16 + 16)
    ids = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).last_hidden_state, tiny_bert(ids).last_hidden_state)
    with pytest.raises(ValueError, match="match no module"):
        insert_adapters(copy.deepcopy(tiny_bert), after=["nope"])


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg)


@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_prefix_tuning_matches_peft(build):
    base = build()
    ours_base = copy.deepcopy(base)
    torch.manual_seed(3)
    theirs = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    torch.manual_seed(3)
    ours = PrefixTuning(ours_base, num_virtual_tokens=5)
    table = theirs.prompt_encoder["default"].embedding.weight
    assert torch.equal(ours.prefix, table)
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == table.numel()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding on one row
    out_t = theirs(input_ids=ids, attention_mask=mask, labels=ids)
    out_o = ours(input_ids=ids, attention_mask=mask, labels=ids)
    torch.testing.assert_close(out_o.logits, out_t.logits, atol=1e-5, rtol=1e-5)
    out_t.loss.backward()
    out_o.loss.backward()
    torch.testing.assert_close(ours.prefix.grad, table.grad, atol=1e-6, rtol=1e-4)


def test_prefix_tuning_on_bert_equals_peft_where_peft_runs_it():
    """PEFT up to 0.21.2 refused prefix tuning on BERT (its cache argument is not `past_key_values`); 0.22.0 runs
    it. Ours runs either way, and must then give PEFT's outputs and gradients from the same seed."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.BertForSequenceClassification(cfg)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (3, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding on one row
    labels = torch.tensor([0, 1, 1])
    torch.manual_seed(3)
    prefixed = PrefixTuning(copy.deepcopy(model), num_virtual_tokens=4)
    out = prefixed(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    assert prefixed.prefix.grad is not None and prefixed.prefix.grad.abs().sum() > 0
    assert all(p.grad is None for p in prefixed.model.parameters())
    config = peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4)
    if Version(peft.__version__) < Version("0.22.0"):
        with pytest.raises(ValueError, match="past key values"):
            peft.get_peft_model(copy.deepcopy(model), config)(input_ids=ids)
        return
    torch.manual_seed(3)
    theirs = peft.get_peft_model(copy.deepcopy(model), config)
    table = theirs.prompt_encoder["default"].embedding.weight
    assert torch.equal(prefixed.prefix.detach(), table)
    ref = theirs(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-6, rtol=1e-5)
    ref.loss.backward()
    torch.testing.assert_close(prefixed.prefix.grad, table.grad, atol=1e-9, rtol=1e-4)
