"""Adapter files: PEFT's layout, interop both ways with equal outputs, atomic saves, all-or-nothing loads.

References: PEFT 0.21's own `save_pretrained` files and `PeftModel.from_pretrained` outputs on MiniLM (nn.Linear)
and a small GPT-2 (Conv1D). Bad-file checks use a toy BERT with MiniLM's module names.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from minilora.inject import inject, lora_layers
from minilora.io import CONFIG_NAME, WEIGHTS_NAME, adapter_state_dict, load_adapter, save_adapter
from minilora.lora import LoRALinear

from helpers import ATOL, randomize_B, randomize_peft_B, snapshot, unchanged

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).detach()


SETUPS = {
    "minilm": ("minilm", ["query", "value"], {"r": 4, "lora_alpha": 8, "use_rslora": True}, None, 1000),
    "gpt2": ("gpt2", "all-linear", {"r": 2, "lora_alpha": 4}, "CAUSAL_LM", 64),
}


# ---------------------------------------------------------------------------------------------------------
# Layout


@pytest.mark.parametrize("setup", ["minilm", "gpt2"])
def test_files_have_peft_keys_shapes_and_config(setup, request, tmp_path):
    fixture, targets, kwargs, task, _ = SETUPS[setup]
    base = request.getfixturevalue(fixture)
    ours = inject(copy.deepcopy(base), targets, task_type=task, **kwargs)
    save_adapter(ours, tmp_path / "ours", task_type=task)
    config = peft.LoraConfig(target_modules=targets, task_type=task, **kwargs)
    reference = peft.get_peft_model(copy.deepcopy(base), config)
    reference.save_pretrained(tmp_path / "peft")

    mine, theirs = load_file(tmp_path / "ours" / WEIGHTS_NAME), load_file(tmp_path / "peft" / WEIGHTS_NAME)
    assert mine.keys() == theirs.keys()
    assert all(mine[k].shape == theirs[k].shape and mine[k].dtype == theirs[k].dtype for k in mine)
    assert any(k.startswith("base_model.model.") and k.endswith(".lora_A.weight") for k in mine)
    with safe_open(tmp_path / "ours" / WEIGHTS_NAME, "pt") as f:
        assert f.metadata()["format"] == "pt"  # what PEFT writes; minilora adds its settings record

    config = json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())
    peft_config = json.loads((tmp_path / "peft" / CONFIG_NAME).read_text())
    for field in ("peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "fan_in_fan_out", "bias",
                  "task_type", "init_lora_weights", "inference_mode", "rank_pattern", "alpha_pattern"):
        assert config[field] == peft_config[field], field
    assert peft.LoraConfig.from_pretrained(tmp_path / "ours").r == kwargs["r"]
    assert not [p for p in (tmp_path / "ours").iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------------------
# Interop


@pytest.mark.parametrize("setup", ["minilm", "gpt2"])
def test_peft_loads_a_minilora_adapter(setup, request, tmp_path):
    fixture, targets, kwargs, task, vocab = SETUPS[setup]
    base = request.getfixturevalue(fixture)
    ours = inject(copy.deepcopy(base), targets, task_type=task, **kwargs)
    randomize_B(ours)
    save_adapter(ours, tmp_path, task_type=task)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ids = torch.randint(0, vocab, (2, 8))
    expected = output(ours, ids)
    assert (expected - output(base, ids)).abs().max() > 1e-3
    assert (output(loaded, ids) - expected).abs().max() <= ATOL


@pytest.mark.parametrize("setup", ["minilm", "gpt2"])
def test_minilora_loads_a_peft_adapter(setup, request, tmp_path):
    fixture, targets, kwargs, task, vocab = SETUPS[setup]
    base = request.getfixturevalue(fixture)
    config = peft.LoraConfig(target_modules=targets, task_type=task, **kwargs)
    reference = peft.get_peft_model(copy.deepcopy(base), config)
    randomize_peft_B(reference, seed=0)
    reference.save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    config = load_adapter(model, tmp_path)
    assert config["r"] == kwargs["r"] and len(list(lora_layers(model))) > 0
    ids = torch.randint(0, vocab, (2, 8))
    expected = output(reference.eval(), ids)
    assert (expected - output(base, ids)).abs().max() > 1e-3
    assert (output(model, ids) - expected).abs().max() <= ATOL
    assert all(p.requires_grad == (".lora_" in n) for n, p in model.named_parameters())


def test_round_trip_into_fresh_model_existing_adapter_and_new_name(tiny_bert, tmp_path):
    ours = inject(copy.deepcopy(tiny_bert), ["query", "value"], r=4, lora_alpha=8)
    randomize_B(ours)
    save_adapter(ours, tmp_path)
    ids = torch.randint(0, 50, (2, 8))

    fresh = copy.deepcopy(tiny_bert)
    load_adapter(fresh, tmp_path)
    assert (output(fresh, ids) - output(ours, ids)).abs().max() == 0

    again = inject(copy.deepcopy(tiny_bert), ["query", "value"], r=4, lora_alpha=8)  # B = 0
    load_adapter(again, tmp_path)
    assert (output(again, ids) - output(ours, ids)).abs().max() == 0

    both = inject(copy.deepcopy(tiny_bert), ["query"], r=2)
    load_adapter(both, tmp_path, adapter_name="loaded")
    assert both.encoder.layer[0].attention.self.query.adapter_names == ["default", "loaded"]
    assert both.encoder.layer[0].attention.self.value.adapter_names == ["loaded"]
    assert adapter_state_dict(both, "loaded").keys() == adapter_state_dict(ours).keys()


def test_half_precision_file_is_cast_on_load(tiny_bert, tmp_path):
    ours = inject(copy.deepcopy(tiny_bert), ["query"], r=4)
    randomize_B(ours)
    save_adapter(ours, tmp_path)
    tensors = {k: v.half() for k, v in load_file(tmp_path / WEIGHTS_NAME).items()}
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    model = copy.deepcopy(tiny_bert)
    load_adapter(model, tmp_path)
    for key, value in adapter_state_dict(model).items():
        assert value.dtype == torch.float32 and torch.equal(value, tensors[key].float())


# ---------------------------------------------------------------------------------------------------------
# Bad files: a clear error, and the model exactly as it was


def corrupt(path, change) -> None:
    tensors = load_file(path / WEIGHTS_NAME)
    change(tensors)
    save_file(tensors, path / WEIGHTS_NAME)


A0 = "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"
B1 = "base_model.model.encoder.layer.1.attention.self.value.lora_B.weight"

BAD_TENSORS = {
    "wrong shape": (lambda t: t.__setitem__(A0, torch.zeros(3, 16)), ["wrong shapes", A0, "(3, 16)"]),
    "missing key": (lambda t: t.pop(B1), ["missing keys", B1]),
    "unexpected key": (
        lambda t: t.__setitem__("base_model.model.pooler.dense.lora_A.weight", torch.zeros(4, 16)),
        ["unexpected keys", "pooler.dense"],
    ),
    "not finite": (lambda t: t[B1].__setitem__((0, 0), float("nan")), ["non-finite", B1]),
    "integer dtype": (lambda t: t.__setitem__(A0, torch.zeros(4, 16, dtype=torch.int64)), ["dtype", A0]),
    "two problems": (lambda t: (t.pop(B1), t.__setitem__(A0, torch.zeros(4, 15))), ["missing keys", "wrong shapes"]),
}


@pytest.mark.parametrize("injected", [False, True], ids=["fresh model", "adapter present"])
@pytest.mark.parametrize("problem", list(BAD_TENSORS))
def test_bad_tensors_raise_and_leave_the_model_unchanged(tiny_bert, tmp_path, problem, injected):
    source = inject(copy.deepcopy(tiny_bert), ["query", "value"], r=4)
    save_adapter(source, tmp_path)
    change, phrases = BAD_TENSORS[problem]
    corrupt(tmp_path, change)
    model = copy.deepcopy(tiny_bert)
    if injected:
        inject(model, ["query", "value"], r=4)
        randomize_B(model, seed=3)
    before = snapshot(model)
    with pytest.raises(ValueError) as err:
        load_adapter(model, tmp_path)
    assert all(p in str(err.value) for p in phrases), str(err.value)
    assert unchanged(model, before)
    assert len(list(lora_layers(model))) == (4 if injected else 0)


def test_value_that_overflows_the_adapter_dtype_is_refused(tiny_bert, tmp_path):
    source = inject(copy.deepcopy(tiny_bert), ["query"], r=4)
    save_adapter(source, tmp_path)
    corrupt(tmp_path, lambda t: t[A0].__setitem__((0, 0), 1e6))  # fine in float32, inf in float16
    model = inject(copy.deepcopy(tiny_bert), ["query"], r=4, adapter_dtype=torch.float16)
    before = snapshot(model)
    with pytest.raises(ValueError, match="non-finite"):
        load_adapter(model, tmp_path)
    assert unchanged(model, before)


def edit_config(path, **changes) -> None:
    config = json.loads((path / CONFIG_NAME).read_text())
    config.update(changes)
    (path / CONFIG_NAME).write_text(json.dumps(config))


@pytest.mark.parametrize(
    "changes,error,phrase",
    [
        ({"peft_type": "IA3"}, ValueError, "peft_type"),
        ({"use_qalora": True}, ValueError, "use_qalora"),
        ({"rank_pattern": {"query": 8}}, ValueError, "model expects"),  # the file's A and B have rank 4
        ({"init_lora_weights": "loftq"}, ValueError, "loftq"),
        ({"bias": "some"}, ValueError, "bias"),
        ({"r": 0}, ValueError, "r must be"),
        ({"target_modules": ["q_proj"]}, ValueError, "q_proj"),
        ({"target_modules": ["attention"]}, TypeError, "BertAttention"),
        ({"lora_alpha": 16}, ValueError, "alpha"),  # only a conflict when the adapter already exists
    ],
)
def test_bad_configs_raise_and_leave_the_model_unchanged(tiny_bert, tmp_path, changes, error, phrase):
    source = inject(copy.deepcopy(tiny_bert), ["query"], r=4)
    save_adapter(source, tmp_path)
    edit_config(tmp_path, **changes)
    model = inject(copy.deepcopy(tiny_bert), ["query"], r=4) if "lora_alpha" in changes else copy.deepcopy(tiny_bert)
    before = snapshot(model)
    with pytest.raises(error, match=phrase):
        load_adapter(model, tmp_path)
    assert unchanged(model, before)


def test_missing_or_unreadable_files(tiny_bert, tmp_path):
    model = copy.deepcopy(tiny_bert)
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        load_adapter(model, tmp_path)
    source = inject(copy.deepcopy(tiny_bert), ["query"], r=4)
    save_adapter(source, tmp_path)
    (tmp_path / WEIGHTS_NAME).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="safetensors"):
        load_adapter(model, tmp_path)
    (tmp_path / WEIGHTS_NAME).unlink()
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle data is never read")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_adapter(model, tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        load_adapter(model, tmp_path)
    assert not list(lora_layers(model))


# ---------------------------------------------------------------------------------------------------------
# Saving


def test_failed_save_keeps_the_old_files_and_leaves_no_temporaries(tiny_bert, tmp_path, monkeypatch):
    model = inject(copy.deepcopy(tiny_bert), ["query"], r=4)
    save_adapter(model, tmp_path)
    old = {name: (tmp_path / name).read_bytes() for name in (WEIGHTS_NAME, CONFIG_NAME)}

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a fi")
        raise OSError("disk full")

    randomize_B(model)
    monkeypatch.setattr("safetensors.torch.save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tmp_path)
    assert {name: (tmp_path / name).read_bytes() for name in old} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(old)


def test_save_errors(tiny_bert, tmp_path):
    model = copy.deepcopy(tiny_bert)
    with pytest.raises(ValueError, match="no adapter named"):
        save_adapter(model, tmp_path)
    inject(model, ["query"], r=4)
    inject(model, ["value"], r=2, adapter_name="other")
    model.encoder.layer[0].attention.self.value.add_adapter("mixed", r=2)
    model.encoder.layer[1].attention.self.value.add_adapter("mixed", r=2, use_rslora=True)  # (ranks may differ)
    with pytest.raises(ValueError, match="different"):
        save_adapter(model, tmp_path, adapter_name="mixed")
    save_adapter(model, tmp_path, adapter_name="other")
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["target_modules"] == ["value"] and config["r"] == 2
    assert isinstance(model.encoder.layer[0].attention.self.value, LoRALinear)


def test_per_layer_ranks_and_biases_are_written_as_peft_writes_them(tiny_bert, tmp_path):
    model = inject(copy.deepcopy(tiny_bert), ["query", "value"], r=4, lora_alpha=8, bias="lora_only",
                   rank_pattern={"layer.1.attention.self.value": 2}, alpha_pattern={"0.attention.self.query": 3})
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert (config["r"], config["lora_alpha"], config["bias"]) == (4, 8, "lora_only")
    assert config["rank_pattern"] == {"encoder.layer.1.attention.self.value": 2}
    assert config["alpha_pattern"] == {"encoder.layer.0.attention.self.query": 3}  # the others' value is lora_alpha
    keys = load_file(tmp_path / WEIGHTS_NAME).keys()
    assert {k for k in keys if k.endswith("bias")} == {
        f"base_model.model.encoder.layer.{i}.attention.self.{p}.base_layer.bias" for i in (0, 1) for p in ("query", "value")}
    again = copy.deepcopy(tiny_bert)
    load_adapter(again, tmp_path)
    assert again.encoder.layer[1].attention.self.value.r["default"] == 2
    assert again.encoder.layer[0].attention.self.query.base_layer.bias.requires_grad
