"""AdaLoRA (minilora.adalora) against PEFT 0.21.2's: the same adapter from the same seed, the same outputs and
gradients (orthogonality penalty included), the same λ pruned at every step of a whole schedule, files both
ways. Models are small BERT, GPT-2 and Llama configs built from code (no downloads)."""

import copy

import pytest
import torch

from minilora import adalora
from minilora.adalora import AdaLoRAConfig, RankAllocator, inject_adalora

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ATOL = 1e-6


def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, num_labels=2,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(cfg), ["query", "value", "dense"]


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg), ["c_attn", "c_proj"]


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    return transformers.LlamaForCausalLM(cfg), ["q_proj", "v_proj", "down_proj"]


MODELS = {"bert": _bert, "gpt2": _gpt2, "llama": _llama}


def _batch(name, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (4, 8), generator=g)
    if name == "bert":
        return {"input_ids": ids, "labels": torch.randint(0, 2, (4,), generator=g)}
    return {"input_ids": ids, "labels": ids}


def _pair(name, **settings):
    """(PEFT model, minilora model, config): both built from the same base and the same seed."""
    base, targets = MODELS[name]()
    base.config.attn_implementation = "eager"
    kw = dict(target_modules=targets, init_r=6, target_r=3, total_step=24, tinit=4, tfinal=6, deltaT=2,
              lora_alpha=16, orth_reg_weight=0.3) | settings
    ours = copy.deepcopy(base)
    torch.manual_seed(1)
    with pytest.warns(UserWarning) if name == "gpt2" else _nothing():  # PEFT sets fan_in_fan_out itself
        theirs = peft.get_peft_model(base, peft.AdaLoraConfig(**kw))
    config = AdaLoRAConfig(**kw)
    torch.manual_seed(1)
    inject_adalora(ours, config)
    return theirs, ours, config


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _peft_layers(peft_model):
    return {n: m for n, m in peft_model.base_model.model.named_modules()
            if isinstance(m, peft.tuners.adalora.SVDLinear)}


@pytest.mark.parametrize("name", MODELS)
def test_same_seed_same_adapter(name):
    theirs, ours, _ = _pair(name)
    layers = _peft_layers(theirs)
    assert [n for n, _ in adalora.svd_layers(ours)] == list(layers)
    for n, layer in adalora.svd_layers(ours):
        for part in ("lora_A", "lora_E", "lora_B"):
            assert torch.equal(getattr(layer, part), getattr(layers[n], part)["default"]), (n, part)
    trainable = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert trainable(ours) == trainable(theirs)


@pytest.mark.parametrize("name", MODELS)
def test_outputs_loss_and_gradients_match(name):
    theirs, ours, config = _pair(name)
    with torch.no_grad():  # Λ starts at zero: give it values so that the update is not a no-op
        for (_, layer), peft_layer in zip(adalora.svd_layers(ours), _peft_layers(theirs).values()):
            layer.lora_E.normal_()
            peft_layer.lora_E["default"].copy_(layer.lora_E)
    batch = _batch(name, 0)
    # AdaLoraModel.forward adds the penalty; PeftModel.forward without a task_type calls the transformers
    # model directly and skips it, so call the AdaLoraModel
    out_t = theirs.base_model(**batch)
    out_o = ours(**batch)
    loss_o = adalora.with_orthogonal_penalty(out_o.loss, ours, config)
    torch.testing.assert_close(out_o.logits, out_t.logits, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(loss_o, out_t.loss, atol=ATOL, rtol=1e-6)
    assert loss_o.item() != pytest.approx(out_o.loss.item())  # the penalty is in it
    out_t.loss.backward()
    loss_o.backward()
    for (n, layer), peft_layer in zip(adalora.svd_layers(ours), _peft_layers(theirs).values()):
        for part in ("lora_A", "lora_E", "lora_B"):
            torch.testing.assert_close(getattr(layer, part).grad, getattr(peft_layer, part)["default"].grad,
                                       atol=ATOL, rtol=1e-4, msg=f"{n}.{part}")


def _train_both(name, **settings):
    """Run the whole schedule on both; returns per-step (budget, our pattern, PEFT's pattern) and the models."""
    theirs, ours, config = _pair(name, **settings)
    opt_t = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=5e-3)
    opt_o = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=5e-3)
    allocator = RankAllocator(ours, config)
    history = []
    for step in range(1, config.total_step + 1):
        batch = _batch(name, step)
        loss_t = theirs.base_model(**batch).loss  # with the penalty (see above)
        loss_o = adalora.with_orthogonal_penalty(ours(**batch).loss, ours, config)
        loss_t.backward()
        loss_o.backward()
        opt_t.step()
        opt_o.step()
        theirs.base_model.update_and_allocate(step)
        budget = allocator.update_and_allocate(step)
        opt_t.zero_grad()
        opt_o.zero_grad()
        peft_pattern = {k.removesuffix(".lora_E.default"): v
                        for k, v in (theirs.peft_config["default"].rank_pattern or {}).items()}
        history.append((step, budget, allocator.rank_pattern, peft_pattern))
    return theirs, ours, config, allocator, history


@pytest.mark.parametrize("name", MODELS)
def test_pruning_follows_peft_step_by_step(name):
    theirs, ours, config, allocator, history = _train_both(name)
    for step, budget, ours_pattern, peft_pattern in history:
        if ours_pattern is not None:
            assert ours_pattern == peft_pattern, f"step {step}"
    # the final pattern meets the target budget and both models hold the same nonzero λ
    assert sum(map(sum, allocator.rank_pattern.values())) <= config.target_r * len(allocator.layers)
    for (n, layer), peft_layer in zip(adalora.svd_layers(ours), _peft_layers(theirs).values()):
        assert torch.equal(layer.lora_E != 0, peft_layer.lora_E["default"] != 0), n
        torch.testing.assert_close(layer.lora_E, peft_layer.lora_E["default"], atol=1e-4, rtol=1e-3)
    ranks = adalora.final_ranks(ours)
    assert len(set(ranks.values())) > 1, f"the budget should move between layers: {ranks}"


def test_budget_schedule_matches_peft():
    theirs, ours, config = _pair("bert", total_step=40, tinit=5, tfinal=7, deltaT=3)
    allocator = RankAllocator(ours, config)
    for step in range(0, 41):
        assert allocator.budget(step) == theirs.base_model.rankallocator.budget_schedule(step), step


def test_importance_is_smoothed_and_uncertain():
    _, ours, config = _pair("bert")
    allocator = RankAllocator(ours, config)
    layer = adalora.svd_layers(ours)[0][1]
    grads = [torch.randn_like(layer.lora_E) for _ in range(2)]
    for g in grads:
        for _, other in adalora.svd_layers(ours):
            for p in (other.lora_A, other.lora_E, other.lora_B):
                p.grad = torch.ones_like(p)
        layer.lora_E.grad = g
        with torch.no_grad():
            layer.lora_E.fill_(1.0)
        allocator.update_importance()
    name = adalora.svd_layers(ours)[0][0]
    i1, i2 = grads[0].abs(), grads[1].abs()
    s1 = 0.15 * i1
    s2 = 0.85 * s1 + 0.15 * i2
    u2 = 0.85 * (0.15 * (i1 - s1).abs()) + 0.15 * (i2 - s2).abs()
    torch.testing.assert_close(allocator.smoothed[(name, "E")], s2)
    torch.testing.assert_close(allocator.uncertainty[(name, "E")], u2)


def test_files_load_in_peft_and_back(tmp_path):
    theirs, ours, config, allocator, _ = _train_both("gpt2")
    adalora.save_adalora(ours, tmp_path / "ours", config, allocator.rank_pattern, task_type="CAUSAL_LM")
    base, _ = _gpt2()
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    # no labels: a loaded (inference-mode) AdaLoRA model in PEFT 0.21.2 fails on computing a loss
    batch = {"input_ids": _batch("gpt2", 99)["input_ids"]}
    ours.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, ours(**batch).logits, atol=ATOL, rtol=1e-5)
    # and PEFT's own file into minilora
    theirs.save_pretrained(tmp_path / "theirs")
    mine = copy.deepcopy(base)
    adalora.load_adalora(mine, tmp_path / "theirs")
    theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(mine(**batch).logits, theirs(**batch).logits, atol=ATOL, rtol=1e-5)
    kept = {n: layer.r for n, layer in adalora.svd_layers(mine)}
    assert kept == {n: sum(v) for n, v in allocator.rank_pattern.items()}


def test_merge_equals_unmerged():
    _, ours, _ = _pair("llama")
    with torch.no_grad():
        for _, layer in adalora.svd_layers(ours):
            layer.lora_E.normal_()
    batch = _batch("llama", 3)
    ours.eval()
    with torch.no_grad():
        before = ours(**batch).logits
        adalora.merge_and_unload_adalora(ours)
        assert not adalora.svd_layers(ours)
        torch.testing.assert_close(ours(**batch).logits, before, atol=1e-5, rtol=1e-5)


def test_bad_settings_are_refused_before_anything_changes():
    with pytest.raises(ValueError, match="total_step"):
        AdaLoRAConfig(target_modules=["query"])
    with pytest.raises(ValueError, match="tinit"):
        AdaLoRAConfig(target_modules=["query"], total_step=10, tinit=6, tfinal=4)
    with pytest.raises(ValueError, match="target_r"):
        AdaLoRAConfig(target_modules=["query"], total_step=10, init_r=4, target_r=8)
    model, _ = _bert()
    with pytest.raises(ValueError, match="match no module"):
        inject_adalora(model, AdaLoRAConfig(target_modules=["nope"], total_step=10))
    assert not adalora.svd_layers(model)
    _, ours, config = _pair("bert")
    with pytest.raises(RuntimeError, match="after backward"):
        RankAllocator(ours, config).update_and_allocate(1)
