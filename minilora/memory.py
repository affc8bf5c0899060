"""The memory of fine-tuning, counted: training state per parameter, and the activations autograd keeps.

Training memory has four parts. Three are *state*, proportional to the parameter count N:

    weights    N · (bytes of the copy the forward pass reads)
    grads      N_trainable · (bytes of a gradient element)
    optimizer  N_trainable · (fp32 master copy, if any, + Adam's two moments m and v)

The fourth, *activations*, is what autograd saves during the forward pass for the backward pass. It grows
with the tokens in a batch (batch · seq) and with depth, not with N. `llama_saved_tensors` lists, tensor by
tensor, what a Hugging Face `LlamaForCausalLM` layer saves (SDPA attention, no gradient checkpointing), so
the activation bytes are a sum over a written-out inventory, not a fitted constant.

A regime is one way of storing these numbers (`REGIMES`); `predict_training_memory` turns a model (or a
parameter count) and a regime into bytes. GB means 10**9 bytes, GiB 2**30 bytes: GPU memory is sold and
reported in GiB, most papers and posts quote GB.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch import nn

if TYPE_CHECKING:  # transformers is only needed to build models (the course's extra), imported where used
    from transformers import LlamaConfig, LlamaForCausalLM

__all__ = [
    "GB",
    "GiB",
    "nf4_bytes_per_param",
    "Regime",
    "REGIMES",
    "get_regime",
    "bytes_per_param",
    "ParamCounts",
    "count_params",
    "LlamaShape",
    "LLAMA_SHAPES",
    "build_llama",
    "LORA_TARGETS",
    "llama_param_counts",
    "SavedTensor",
    "llama_saved_tensors",
    "activation_bytes",
    "predict_training_memory",
    "measured_state_bytes",
    "cpu_allocation_peak",
]

GB = 10**9
GiB = 2**30


def nf4_bytes_per_param(blocksize: int = 64, double_quant: bool = True, dq_blocksize: int = 256) -> float:
    """Bytes per weight of an NF4 tensor: 4-bit codes plus the block scales (QLoRA's layout).

    Without double quantization every block of `blocksize` weights carries one fp32 absmax:
    (4 + 32/blocksize)/8 bytes. With it, the absmax becomes one uint8 per block plus one fp32 scale per
    `dq_blocksize` blocks: (4 + 8/blocksize + 32/(blocksize·dq_blocksize))/8. Per-tensor constants (the code
    tables, one fp32 offset) are ignored: they do not grow with the weight.
    """
    if blocksize <= 0 or dq_blocksize <= 0:
        raise ValueError(f"block sizes must be positive, got blocksize={blocksize}, dq_blocksize={dq_blocksize}")
    scale_bits = 8 / blocksize + 32 / (blocksize * dq_blocksize) if double_quant else 32 / blocksize
    return (4 + scale_bits) / 8


@dataclass(frozen=True)
class Regime:
    """How one training setup stores each parameter, in bytes per parameter.

    Trainable parameters cost `weights + grads + master + moments` bytes each for the whole run; frozen ones
    cost `frozen` (or `frozen_4bit` when held in NF4). `casts` are low-precision copies of the weights that
    exist only from the forward pass to the backward pass (autocast makes them and autograd keeps them), so
    they are counted with the activations, not with the state.
    """

    name: str
    weights: float  # the copy the forward pass reads
    grads: float
    master: float  # fp32 master copy kept by the optimizer; 0 when the weights themselves are the master
    moments: float  # Adam's first and second moments together
    casts: float  # bf16 copies of the weights autocast saves for backward (amp only)
    frozen: float  # a frozen parameter: its weights only
    frozen_4bit: float | None  # a frozen parameter stored in NF4; None when the regime quantizes nothing
    activation_dtype: torch.dtype  # dtype of the matmul outputs the forward pass saves
    autocast: bool  # the forward runs under torch.autocast on fp32 weights
    adapters: bool  # only small adapter matrices train; the base model is frozen
    description: str

    @property
    def trainable(self) -> float:
        """Persistent bytes per trainable parameter: weights + grads + master + Adam moments."""
        return self.weights + self.grads + self.master + self.moments

    @property
    def optimizer(self) -> float:
        """Bytes per trainable parameter the optimizer owns (ZeRO's accounting): master copy + moments."""
        return self.master + self.moments


_FP32, _BF16 = 4, 2
_ADAPTER_DOC = "adapters in fp32 with fp32 grads and fp32 Adam moments (PEFT's default on a 16-bit base)"

REGIMES: dict[str, Regime] = {
    r.name: r
    for r in [
        Regime("fp32", _FP32, _FP32, 0, 2 * _FP32, 0, _FP32, None, torch.float32, False, False,
               "everything in fp32: weights, grads, Adam m and v"),
        Regime("bf16", _BF16, _BF16, 0, 2 * _BF16, 0, _BF16, None, torch.bfloat16, False, False,
               "model.to(bfloat16) + torch AdamW: the moments take the parameters' dtype, so all 16-bit"),
        Regime("amp", _FP32, _FP32, 0, 2 * _FP32, _BF16, _FP32, None, torch.bfloat16, True, False,
               "fp32 weights, grads and Adam; torch.autocast(bf16) casts each weight for the forward pass"),
        Regime("mixed", _BF16, _BF16, _FP32, 2 * _FP32, 0, _BF16, None, torch.bfloat16, False, False,
               "bf16 weights and grads, fp32 master copy and fp32 Adam moments (the ZeRO paper's count)"),
        Regime("lora", _FP32, _FP32, 0, 2 * _FP32, 0, _BF16, None, torch.bfloat16, False, True,
               "frozen bf16 base; " + _ADAPTER_DOC),
        Regime("qlora", _FP32, _FP32, 0, 2 * _FP32, 0, _BF16, nf4_bytes_per_param(), torch.bfloat16, False, True,
               "frozen base linears in NF4 with double quantization, the rest bf16; " + _ADAPTER_DOC),
    ]
}


def get_regime(regime: str | Regime) -> Regime:
    """The `Regime` for a name in `REGIMES` (or the regime itself)."""
    if isinstance(regime, Regime):
        return regime
    if not isinstance(regime, str) or regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}; known: {', '.join(REGIMES)}")
    return REGIMES[regime]


def bytes_per_param(regime: str | Regime) -> float:
    """Training-state bytes per trainable parameter in `regime` (weights + grads + master + Adam m, v)."""
    return get_regime(regime).trainable


@dataclass(frozen=True)
class ParamCounts:
    """How many parameters a model has, split by how they are stored.

    `tensors` is the number of trainable tensors: PyTorch's Adam keeps a 4-byte step counter per tensor.
    """

    trainable: int
    frozen: int = 0
    frozen_4bit: int = 0
    tensors: int = 0

    def __post_init__(self) -> None:
        for name in ("trainable", "frozen", "frozen_4bit", "tensors"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"ParamCounts.{name} must be a non-negative int, got {value!r}")

    @property
    def total(self) -> int:
        return self.trainable + self.frozen + self.frozen_4bit


def count_params(model: nn.Module) -> ParamCounts:
    """Trainable and frozen parameters of a module; tied parameters count once (as `parameters()` does)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in trainable)
    return ParamCounts(trainable=n_train, frozen=sum(p.numel() for p in model.parameters()) - n_train,
                       tensors=len(trainable))


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LlamaShape:
    """The sizes of a Llama decoder that memory depends on (no biases, SwiGLU MLP, RMSNorm, RoPE)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False  # lm_head shares the embedding matrix

    def __post_init__(self) -> None:
        for name in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"LlamaShape.{name} must be a positive int, got {value!r}")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"hidden ({self.hidden}) must divide into heads ({self.heads}), and heads into "
                             f"kv_heads ({self.kv_heads})")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @classmethod
    def from_config(cls, config: Any) -> "LlamaShape":
        """Read the sizes from a `transformers.LlamaConfig` (or anything with the same attribute names)."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if head_dim * config.num_attention_heads != config.hidden_size:
            raise ValueError("head_dim * num_attention_heads must equal hidden_size for this formula")
        return cls(config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                   config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads,
                   config.vocab_size, bool(getattr(config, "tie_word_embeddings", False)))

    def to_config(self, **overrides: Any) -> LlamaConfig:
        """A `transformers.LlamaConfig` of these sizes: the inverse of `from_config`.

        `overrides` are further `LlamaConfig` arguments (`max_position_embeddings`, `use_cache`,
        `attn_implementation`, `rope_theta`, ...); anything not given keeps `LlamaConfig`'s default. The sizes
        themselves come from the shape only: change them with `dataclasses.replace(shape, ...)`.
        """
        from transformers import LlamaConfig

        sizes = dict(hidden_size=self.hidden, intermediate_size=self.intermediate, num_hidden_layers=self.layers,
                     num_attention_heads=self.heads, num_key_value_heads=self.kv_heads, vocab_size=self.vocab,
                     tie_word_embeddings=self.tied)
        clash = sorted(set(sizes) & set(overrides))
        if clash:
            raise TypeError(f"to_config takes the sizes from the shape; got {', '.join(clash)} as overrides")
        return LlamaConfig(**sizes, **overrides)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of the seven projections of one decoder layer."""
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def linear_params(self) -> int:
        """Weights in the decoder layers' projections (what QLoRA stores in 4 bits)."""
        return self.layers * sum(a * b for a, b in self.linear_shapes().values())

    @property
    def n_params(self) -> int:
        """All parameters: projections, two RMSNorm weights per layer, the final norm, embedding, lm_head."""
        heads = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.linear_params + (2 * self.layers + 1) * self.hidden + heads

    @property
    def n_tensors(self) -> int:
        """Parameter tensors: 7 projections + 2 norms per layer, final norm, embedding, lm_head if untied."""
        return 9 * self.layers + 2 + (0 if self.tied else 1)


# Sizes of published checkpoints (their config.json files); the weights are never needed here.
LLAMA_SHAPES: dict[str, LlamaShape] = {
    "TinyLlama-1.1B": LlamaShape(2048, 5632, 22, 32, 4, 32000),
    "Llama-2-7B": LlamaShape(4096, 11008, 32, 32, 32, 32000),
    "Llama-3-8B": LlamaShape(4096, 14336, 32, 32, 8, 128256),
    "Llama-2-70B": LlamaShape(8192, 28672, 80, 64, 8, 32000),
}


def build_llama(shape: LlamaShape, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", *,
                seed: int | None = 0, **overrides: Any) -> LlamaForCausalLM:
    """A `transformers.LlamaForCausalLM` of `shape` with RANDOM weights, created directly on `device` in `dtype`.

    The weights are initialized in `dtype` (no fp32 copy first: an 8B model in fp32 is 32 GB) after
    `torch.manual_seed(seed)`; `seed=None` leaves the global generator as it is. `overrides` go to
    `shape.to_config`. The model is returned as its constructor leaves it (training mode, `config.dtype`
    unset). On the "meta" device nothing is allocated: a way to list a model's parameters for free.
    """
    from transformers import LlamaForCausalLM

    config = shape.to_config(**overrides)
    if seed is not None:
        torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)


def llama_param_counts(shape: LlamaShape, lora_rank: int | None = None,
                       targets: tuple[str, ...] = LORA_TARGETS, quantize_base: bool = False) -> ParamCounts:
    """Parameter counts for full fine-tuning (`lora_rank=None`) or for LoRA adapters on a frozen base.

    A rank-r adapter on a projection (in -> out) adds r·(in + out) trainable parameters (A: r×in, B: out×r).
    With `quantize_base`, the frozen projections are counted as 4-bit; embeddings, norms and lm_head stay 16-bit.
    """
    if lora_rank is None:
        if quantize_base:
            raise ValueError("quantize_base needs adapters (lora_rank): a 4-bit base cannot be trained directly")
        return ParamCounts(trainable=shape.n_params, tensors=shape.n_tensors)
    if not isinstance(lora_rank, int) or lora_rank <= 0:
        raise ValueError(f"lora_rank must be a positive int, got {lora_rank!r}")
    shapes = shape.linear_shapes()
    unknown = [t for t in targets if t not in shapes]
    if unknown or not targets:
        raise ValueError(f"targets must be a non-empty subset of {tuple(shapes)}, got {targets!r}")
    adapters = shape.layers * sum(lora_rank * (shapes[t][0] + shapes[t][1]) for t in targets)
    base_4bit = shape.linear_params if quantize_base else 0
    return ParamCounts(trainable=adapters, frozen=shape.n_params - base_4bit, frozen_4bit=base_4bit,
                       tensors=2 * shape.layers * len(targets))


@dataclass(frozen=True)
class SavedTensor:
    """One tensor autograd keeps for backward: `count` copies of `shape` in `dtype`."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    count: int = 1  # how many of these the whole model keeps (e.g. one per layer)

    @property
    def nbytes(self) -> int:
        return self.count * math.prod(self.shape) * self.dtype.itemsize


def _rms_norm(prefix: str, b: int, s: int, h: int, out_dtype: torch.dtype, count: int) -> list[SavedTensor]:
    # x.to(float32).pow(2) keeps its fp32 input; x * rsqrt(...) keeps rsqrt; weight * y keeps y (input dtype)
    return [SavedTensor(f"{prefix}: input upcast to fp32", (b, s, h), torch.float32, count),
            SavedTensor(f"{prefix}: 1/rms per token", (b, s, 1), torch.float32, count),
            SavedTensor(f"{prefix}: normalized, before the weight", (b, s, h), out_dtype, count)]


def _linear_inputs(name: str, consumers: tuple[str, ...], shape: tuple[int, ...], act: torch.dtype,
                   autocast: bool, count: int) -> list[SavedTensor]:
    # A linear layer keeps its input. Without autocast the consumers share one tensor; under autocast each
    # linear casts its fp32 input to bf16 on its own (autocast caches casts of weights only), so one per consumer.
    if not autocast:
        shared = f" (shared by {', '.join(consumers)})" if len(consumers) > 1 else ""
        return [SavedTensor(name + shared, shape, act, count)]
    return [SavedTensor(f"{c} input, bf16 cast", shape, act, count) for c in consumers]


def llama_saved_tensors(shape: LlamaShape, regime: str | Regime, batch: int, seq: int) -> list[SavedTensor]:
    """Every tensor a `LlamaForCausalLM` training forward (SDPA, labels given) saves for backward.

    Per layer, with T = batch·seq tokens, h hidden, i intermediate, kv = kv_heads·head_dim, s bytes of the
    activation dtype, and no autocast, this sums to T·[8h + 8 + 4·heads + s·(6h + 2kv + 4i)] bytes:
    two RMSNorms (fp32 input copy, 1/rms, normalized output), the attention input, q and k after RoPE, v,
    the attention output (also o_proj's input) and SDPA's fp32 log-sum-exp, the MLP input, and the MLP's four
    (T, i) tensors (gate output, SiLU output, up output, their product). Autocast adds per-consumer casts and
    the bf16 weight copies. Parameters themselves are not listed: they are resident anyway.
    """
    reg = get_regime(regime)
    if reg.adapters:
        raise ValueError(f"the activation inventory covers full fine-tuning; regime {reg.name!r} trains adapters, "
                         "whose frozen layers keep different tensors")
    for name, value in (("batch", batch), ("seq", seq)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    b, s, L = batch, seq, shape.layers
    h, i, nh, nkv, d = shape.hidden, shape.intermediate, shape.heads, shape.kv_heads, shape.head_dim
    act = reg.activation_dtype
    # the residual stream has the weights' dtype: bf16 in pure bf16, fp32 in fp32 and under autocast
    resid = torch.float32 if reg.autocast else act
    ac = reg.autocast
    items: list[SavedTensor] = []
    items += _rms_norm("input_layernorm", b, s, h, resid, L)
    items += _linear_inputs("attention input", ("q_proj", "k_proj", "v_proj"), (b, s, h), act, ac, L)
    items += [SavedTensor("query after RoPE (SDPA input)", (b, nh, s, d), act, L),
              SavedTensor("key after RoPE (SDPA input)", (b, nkv, s, d), act, L),
              SavedTensor("value (SDPA input)", (b, nkv, s, d), act, L),
              SavedTensor("attention output (also o_proj input)", (b, nh, s, d), act, L),
              SavedTensor("attention log-sum-exp", (b, nh, s), torch.float32, L)]
    items += _rms_norm("post_attention_layernorm", b, s, h, resid, L)
    items += _linear_inputs("MLP input", ("gate_proj", "up_proj"), (b, s, h), act, ac, L)
    items += [SavedTensor("gate_proj output (SiLU input)", (b, s, i), act, L),
              SavedTensor("SiLU output", (b, s, i), act, L),
              SavedTensor("up_proj output", (b, s, i), act, L),
              SavedTensor("SiLU·up (down_proj input)", (b, s, i), act, L)]
    if ac:
        items += [SavedTensor(f"{n} weight, bf16 cast", (o, k), act, L)
                  for n, (k, o) in shape.linear_shapes().items()]
    # once per model
    items += [SavedTensor("token ids (embedding backward)", (b, s), torch.int64),
              SavedTensor("RoPE cos (shared by all layers)", (1, s, d), resid),
              SavedTensor("RoPE sin (shared by all layers)", (1, s, d), resid)]
    items += _rms_norm("final norm", b, s, h, resid, 1)
    items += _linear_inputs("lm_head input", ("lm_head",), (b, s, h), act, ac, 1)
    if ac:
        items.append(SavedTensor("lm_head weight, bf16 cast", (shape.vocab, h), act))
    items += [SavedTensor("log-softmax of the logits (fp32)", (b * s, shape.vocab), torch.float32),
              # HF pads the labels by one and slices; .contiguous() copies unless batch is 1, where the
              # slice is already contiguous and stays a view of the padded (seq + 1) storage
              SavedTensor("shifted labels", (b * s,) if b > 1 else (s + 1,), torch.int64),
              SavedTensor("loss normaliser", (), torch.float32)]
    return items


def activation_bytes(shape: LlamaShape, regime: str | Regime, batch: int, seq: int) -> int:
    """Bytes autograd keeps between forward and backward: the sum over `llama_saved_tensors`."""
    return sum(t.nbytes for t in llama_saved_tensors(shape, regime, batch, seq))


def _shape_and_counts(model_or_counts: Any, shape: LlamaShape | None) -> tuple[ParamCounts, LlamaShape | None]:
    if isinstance(model_or_counts, nn.Module):
        counts = count_params(model_or_counts)
        config = getattr(model_or_counts, "config", None)
        if shape is None and config is not None and hasattr(config, "intermediate_size"):
            shape = LlamaShape.from_config(config)
        return counts, shape
    if isinstance(model_or_counts, LlamaShape):
        return llama_param_counts(model_or_counts), shape or model_or_counts
    if isinstance(model_or_counts, ParamCounts):
        return model_or_counts, shape
    if isinstance(model_or_counts, int) and not isinstance(model_or_counts, bool) and model_or_counts >= 0:
        return ParamCounts(trainable=model_or_counts), shape
    raise TypeError("model_or_counts must be an nn.Module, a LlamaShape, a ParamCounts or a parameter count, "
                    f"got {type(model_or_counts).__name__}")


def predict_training_memory(model_or_counts: nn.Module | LlamaShape | ParamCounts | int,
                            regime: str | Regime, batch: int = 0, seq: int = 0, *,
                            shape: LlamaShape | None = None) -> dict[str, int]:
    """Bytes of one AdamW training step, by part.

    state:  weights = N_train·w + N_frozen·f (+ N_4bit·f4),  grads = N_train·g,
            optimizer = N_train·(master + m + v) + 4 per trainable tensor (Adam's step counter)
    activations = sum of `llama_saved_tensors` (needs a Llama shape and batch, seq > 0; else 0)
    loss_buffers = 2·T·vocab·4: during backward, the fp32 gradient of the log-softmax and its input
                   gradient live at once on top of the activations (T = batch·seq)
    step_buffers = N_train·(bytes of the tensors Adam updates): the one temporary that PyTorch's default
                   multi-tensor AdamW allocates for sqrt(v), all parameters at once
    peak = state + max(activations + loss_buffers, step_buffers), gradients resident through the step
    """
    reg = get_regime(regime)
    counts, shape = _shape_and_counts(model_or_counts, shape)
    if batch < 0 or seq < 0:
        raise ValueError(f"batch and seq must be >= 0, got batch={batch}, seq={seq}")
    tokens = batch * seq
    if tokens and shape is None:
        raise ValueError("activations need the model's shape: pass a Llama model, a LlamaShape, or shape=...")
    if counts.frozen_4bit and reg.frozen_4bit is None:
        raise ValueError(f"regime {reg.name!r} stores no 4-bit weights, but the counts have "
                         f"{counts.frozen_4bit} of them; use 'qlora'")
    weights = counts.trainable * reg.weights + counts.frozen * reg.frozen + counts.frozen_4bit * (reg.frozen_4bit or 0)
    out = {"weights": math.ceil(weights), "grads": math.ceil(counts.trainable * reg.grads),
           "optimizer": math.ceil(counts.trainable * reg.optimizer) + 4 * counts.tensors}
    out["state"] = out["weights"] + out["grads"] + out["optimizer"]
    out["activations"] = activation_bytes(shape, reg, batch, seq) if tokens else 0
    out["loss_buffers"] = 2 * tokens * shape.vocab * 4 if tokens else 0
    out["step_buffers"] = math.ceil(counts.trainable * (reg.master or reg.weights))
    out["peak"] = out["state"] + max(out["activations"] + out["loss_buffers"], out["step_buffers"])
    return out


def measured_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Exact bytes of the training state a model and its optimizer hold now: sum of tensor `nbytes`."""
    params = list(model.parameters())
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    out = {"weights": sum(p.nbytes for p in params),
           "grads": sum(p.grad.nbytes for p in params if p.grad is not None),
           "optimizer": sum(t.nbytes for t in state)}
    out["state"] = out["weights"] + out["grads"] + out["optimizer"]
    return out


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    # the profiler's C++ backend prints start/stop lines straight to file descriptor 2
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_allocation_peak(fn: Callable[[], object]) -> int:
    """Peak bytes the CPU allocator held above its starting level while `fn()` ran.

    With `profile_memory=True`, torch's profiler logs every CPU allocation (+bytes) and free (-bytes) with a
    timestamp; the running sum of that log, in time order, is the memory held, and its maximum is the peak.
    This is the CPU's stand-in for `torch.cuda.max_memory_allocated`, which exists for CUDA only.
    """
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    results = getattr(prof.profiler, "kineto_results", None)
    if results is None:
        raise RuntimeError("this torch build's profiler keeps no allocation log (kineto_results is missing)")
    log = sorted((e.start_ns(), e.nbytes()) for e in results.events()
                 if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    held = peak = 0
    for _, nbytes in log:
        held += nbytes
        peak = max(peak, held)
    return peak
