"""minilora.memory: the byte table, parameter counts, and predictions checked against real tensors.

References: `nbytes` of the tensors a real model and torch's AdamW hold; `SavedTensorBytes` for activations;
transformers (meta-device models) for parameter counts; PEFT for adapter counts and dtypes; bitsandbytes for
the NF4 storage layout; torch's profiler allocation log for the peak of a step.
"""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from minilora import memory as M
from minilora.profiling import SavedTensorBytes

TINY = [  # hidden, intermediate, layers, heads, kv_heads, vocab, batch, seq
    (64, 176, 2, 4, 2, 256, 2, 16),
    (96, 256, 1, 6, 6, 320, 3, 24),
    (128, 344, 3, 8, 2, 512, 1, 40),
]


def llama(h: int, i: int, layers: int, heads: int, kv: int, vocab: int, dtype=torch.float32,
          device: str = "cpu", tied: bool = False) -> LlamaForCausalLM:
    """A Llama with random weights (seeded), in training mode, without a KV cache."""
    cfg = LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=128, use_cache=False,
                      tie_word_embeddings=tied, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).train()


def model_dtype(regime: str) -> torch.dtype:
    r = M.get_regime(regime)
    return torch.float32 if r.autocast else r.activation_dtype


def forward_loss(model: torch.nn.Module, regime: str, ids: torch.Tensor) -> torch.Tensor:
    r = M.get_regime(regime)
    ctx = torch.autocast(ids.device.type, dtype=torch.bfloat16) if r.autocast else contextlib.nullcontext()
    with ctx:
        return model(input_ids=ids, labels=ids).loss


# --- the byte table -------------------------------------------------------------------------------------------

def test_regime_table_derives_from_dtype_sizes():
    f32, b16 = torch.float32.itemsize, torch.bfloat16.itemsize
    assert M.bytes_per_param("fp32") == f32 + f32 + 2 * f32 == 16
    assert M.bytes_per_param("bf16") == b16 + b16 + 2 * b16 == 8
    assert M.bytes_per_param("mixed") == b16 + b16 + f32 + 2 * f32 == 16
    assert M.bytes_per_param("amp") == f32 + f32 + 2 * f32
    assert M.REGIMES["amp"].casts == b16  # the bf16 weight copy lives from forward to backward
    for name in ("lora", "qlora"):
        assert M.bytes_per_param(name) == 16 and M.REGIMES[name].frozen == b16
    for r in M.REGIMES.values():
        assert r.trainable == r.weights + r.grads + r.master + r.moments


def test_unknown_regime_is_a_clear_error():
    with pytest.raises(ValueError, match="known: fp32"):
        M.bytes_per_param("fp8")


def test_nf4_bytes_per_param_matches_bitsandbytes_storage():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(256, 1024, dtype=torch.bfloat16)
    for dq in (False, True):
        packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq)
        nbytes = packed.nbytes + state.absmax.nbytes + (state.state2.absmax.nbytes if dq else 0)
        assert nbytes / w.numel() == M.nf4_bytes_per_param(64, double_quant=dq)


# --- parameter counts -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(M.LLAMA_SHAPES))
def test_llama_shapes_count_what_transformers_builds(name):
    s = M.LLAMA_SHAPES[name]
    cfg = LlamaConfig(hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=s.layers,
                      num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, vocab_size=s.vocab)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    params = list(model.parameters())
    assert s.n_params == sum(p.numel() for p in params)
    assert s.n_tensors == len(params)
    assert M.LlamaShape.from_config(cfg) == s


def test_tied_embeddings_count_once():
    model = llama(64, 176, 2, 4, 2, 256, tied=True)
    shape = M.LlamaShape.from_config(model.config)
    assert shape.tied and shape.n_params == sum(p.numel() for p in model.parameters())
    assert M.count_params(model) == M.llama_param_counts(shape)


def test_lora_counts_and_dtypes_match_peft():
    peft = pytest.importorskip("peft")
    model = llama(64, 176, 2, 4, 2, 256, dtype=torch.bfloat16)
    shape = M.LlamaShape.from_config(model.config)
    for targets in (M.LORA_TARGETS, ("q_proj", "v_proj")):
        m = peft.get_peft_model(llama(64, 176, 2, 4, 2, 256, dtype=torch.bfloat16),
                                peft.LoraConfig(r=8, target_modules=list(targets)))
        trainable, total = m.get_nb_trainable_parameters()
        counts = M.llama_param_counts(shape, lora_rank=8, targets=targets)
        assert (counts.trainable, counts.total) == (trainable, total)
        assert counts.tensors == sum(p.requires_grad for p in m.parameters())
        # the regime's byte sizes are PEFT's dtypes: fp32 adapters on a frozen bf16 base
        dtypes = {(p.dtype.itemsize, p.requires_grad) for p in m.parameters()}
        assert dtypes == {(M.REGIMES["lora"].weights, True), (M.REGIMES["lora"].frozen, False)}


def test_bad_counts_and_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="non-negative int"):
        M.ParamCounts(trainable=-1)
    with pytest.raises(ValueError, match="divide"):
        M.LlamaShape(100, 200, 1, 3, 3, 10)
    shape = M.LLAMA_SHAPES["Llama-2-7B"]
    with pytest.raises(ValueError, match="subset"):
        M.llama_param_counts(shape, lora_rank=8, targets=("qkv",))
    with pytest.raises(ValueError, match="needs adapters"):
        M.llama_param_counts(shape, quantize_base=True)
    with pytest.raises(ValueError, match="4-bit"):
        M.predict_training_memory(M.llama_param_counts(shape, 16, quantize_base=True), "lora")
    with pytest.raises(ValueError, match="full fine-tuning"):
        M.predict_training_memory(M.llama_param_counts(shape, 16), "lora", 1, 128, shape=shape)
    with pytest.raises(ValueError, match="shape"):
        M.predict_training_memory(M.ParamCounts(10), "fp32", 1, 8)
    with pytest.raises(TypeError, match="nn.Module"):
        M.predict_training_memory("7B", "fp32")


# --- building models from shapes ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(M.LLAMA_SHAPES))
def test_to_config_and_from_config_are_inverses(name):
    shape = M.LLAMA_SHAPES[name]
    for s in (shape, dataclasses.replace(shape, tied=True)):
        assert M.LlamaShape.from_config(s.to_config()) == s
    # a config written by hand, as a checkpoint's config.json would give it, comes back the same
    cfg = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
                      num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab,
                      max_position_embeddings=4096, use_cache=False, rope_theta=500000.0)
    again = M.LlamaShape.from_config(cfg).to_config(max_position_embeddings=4096, use_cache=False, rope_theta=500000.0)
    assert again.to_dict() == cfg.to_dict()


def test_to_config_takes_sizes_from_the_shape_only():
    with pytest.raises(TypeError, match="hidden_size, tie_word_embeddings"):
        M.LLAMA_SHAPES["Llama-2-7B"].to_config(tie_word_embeddings=True, hidden_size=8)


def test_build_llama_is_the_seeded_model_transformers_builds():
    shape = M.LlamaShape(64, 176, 2, 4, 2, 256)
    kw = dict(max_position_embeddings=128, use_cache=False, attn_implementation="sdpa")
    ref = llama(64, 176, 2, 4, 2, 256)  # fp32, seed 0, training mode
    model = M.build_llama(shape, torch.float32, "cpu", seed=0, **kw)
    assert model.training and model.config.to_dict() == ref.config.to_dict()
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
    # seed=None draws from the generator as the caller left it
    torch.manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(M.build_llama(shape, seed=None, **kw).parameters(), ref.parameters()))
    # made directly in the dtype asked for; the default dtype is restored, also when building fails
    assert {p.dtype for p in M.build_llama(shape, torch.bfloat16, **kw).parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError):
        M.build_llama(shape, torch.bfloat16, attn_implementation="no-such-attention")
    assert torch.get_default_dtype() == torch.float32
    # on the meta device: the parameter list of a real size, no memory
    big = M.LLAMA_SHAPES["Llama-3-8B"]
    params = list(M.build_llama(big, torch.bfloat16, "meta").parameters())
    assert sum(p.numel() for p in params) == big.n_params and {p.device.type for p in params} == {"meta"}


# --- state bytes: prediction vs the tensors a real model holds after one AdamW step ---------------------------

@pytest.mark.parametrize("regime", ["fp32", "bf16", "amp"])
def test_state_prediction_is_exact_after_one_adamw_step(regime):
    model = llama(64, 176, 2, 4, 2, 256, dtype=model_dtype(regime))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 256, (2, 16))
    forward_loss(model, regime, ids).backward()
    opt.step()
    measured = M.measured_state_bytes(model, opt)
    predicted = M.predict_training_memory(model, regime)
    for part in ("weights", "grads", "optimizer", "state"):
        assert predicted[part] == measured[part], part


def test_frozen_parameters_cost_weights_only():
    model = llama(64, 176, 2, 4, 2, 256)
    for name, p in model.named_parameters():
        p.requires_grad_("q_proj" in name)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    forward_loss(model, "fp32", torch.randint(0, 256, (2, 16))).backward()
    opt.step()
    measured, predicted = M.measured_state_bytes(model, opt), M.predict_training_memory(model, "fp32")
    n_q = sum(p.numel() for n, p in model.named_parameters() if "q_proj" in n)
    assert predicted["grads"] == measured["grads"] == 4 * n_q
    assert {k: predicted[k] for k in measured} == measured


def test_lora_state_prediction_is_exact_on_a_peft_model():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(llama(64, 176, 2, 4, 2, 256, dtype=torch.bfloat16),
                                peft.LoraConfig(r=4, target_modules=list(M.LORA_TARGETS)))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, 256, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    measured = M.measured_state_bytes(model, opt)
    predicted = M.predict_training_memory(M.count_params(model), "lora")
    assert {k: predicted[k] for k in measured} == measured


def test_adam_state_is_allocated_at_the_first_step():
    model = llama(64, 176, 1, 4, 4, 256)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    assert M.measured_state_bytes(model, opt)["optimizer"] == 0
    forward_loss(model, "fp32", torch.randint(0, 256, (1, 8))).backward()
    opt.step()
    assert M.measured_state_bytes(model, opt)["optimizer"] == M.predict_training_memory(model, "fp32")["optimizer"]


# --- activations: the inventory vs what autograd really saves -------------------------------------------------

ACT_TOLERANCE = 0.01  # stated in the chapter; the inventory is in fact exact for transformers' Llama on CPU


@pytest.mark.parametrize("config", TINY)
@pytest.mark.parametrize("regime", ["fp32", "bf16", "amp"])
def test_activation_prediction_matches_saved_tensor_bytes(config, regime):
    *arch, batch, seq = config
    model = llama(*arch, dtype=model_dtype(regime))
    ids = torch.randint(0, arch[-1], (batch, seq))
    with SavedTensorBytes(exclude=model.parameters()) as saved:
        forward_loss(model, regime, ids)
    predicted = M.predict_training_memory(model, regime, batch, seq)["activations"]
    assert abs(predicted - saved.bytes) <= ACT_TOLERANCE * saved.bytes, (predicted, saved.bytes)


def test_per_layer_formula_in_closed_form():
    # the docstring's closed form, T·[8h + 8 + 4·heads + s·(6h + 2kv + 4i)], is the inventory's per-layer sum
    shape = M.LlamaShape(4096, 11008, 1, 32, 8, 32000)
    b, s = 2, 64
    one = M.activation_bytes(shape, "bf16", b, s)
    two = M.activation_bytes(M.LlamaShape(4096, 11008, 2, 32, 8, 32000), "bf16", b, s)
    h, i, kv, T = 4096, 11008, 8 * 128, b * s
    assert two - one == T * (8 * h + 8 + 4 * 32 + 2 * (6 * h + 2 * kv + 4 * i))


# --- the peak of a whole step ---------------------------------------------------------------------------------

PEAK_TOLERANCE = 0.02


@pytest.mark.parametrize("regime, batch, seq", [("fp32", 2, 32), ("bf16", 2, 32), ("amp", 2, 32), ("fp32", 1, 4)])
def test_peak_prediction_matches_the_cpu_allocation_log(regime, batch, seq):
    # (fp32, 1, 4): few tokens, so the optimizer's sqrt(v) buffer, not the activations, sets the peak
    model = llama(64, 176, 2, 4, 2, 2048, dtype=model_dtype(regime))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)  # a GPU's default AdamW
    ids = torch.randint(0, 2048, (batch, seq))

    def step() -> None:
        forward_loss(model, regime, ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    step()  # allocates grads and Adam state
    above_resident = M.cpu_allocation_peak(step)
    pred = M.predict_training_memory(model, regime, batch, seq)
    expected = pred["peak"] - pred["state"]
    assert abs(above_resident - expected) <= PEAK_TOLERANCE * expected, (above_resident, expected)


@pytest.mark.cuda
@pytest.mark.parametrize("regime", ["bf16", "amp"])
def test_peak_prediction_on_gpu(regime):
    model = llama(512, 1408, 4, 8, 8, 32000, dtype=model_dtype(regime), device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 32000, (4, 512), device="cuda")
    for _ in range(2):  # the first step allocates grads, Adam state and library workspaces
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        forward_loss(model, regime, ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
    measured = torch.cuda.max_memory_allocated() - base
    pred = M.predict_training_memory(model, regime, 4, 512)
    assert abs(measured - (pred["peak"] - pred["state"])) <= 0.15 * pred["peak"]
