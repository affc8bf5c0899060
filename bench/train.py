"""Section train: training steps of Llama-shaped models with RANDOM weights (1B and 8B shapes), gradient
checkpointing on: minilora QLoRA (fused) vs PEFT + bitsandbytes QLoRA; tokens/s and peak memory. Both start
from the same weights, and their losses before any update must agree."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from bench.common import ALPHA, DTYPE, R, Row, Settings, enable_checkpointing, guard
from minilora import fast
from minilora.inject import inject, lora_layers
from minilora.lora import LoRALinear
from minilora.memory import LLAMA_SHAPES, LlamaShape, build_llama
from minilora.profiling import time_fn
from minilora.qlora import quantize_model

SHAPES: dict[str, LlamaShape] = {
    "1B": LLAMA_SHAPES["TinyLlama-1.1B"],
    "8B": LLAMA_SHAPES["Llama-3-8B"],
    "tiny": LlamaShape(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=512),
}


def _build_llama(shape: str, device: torch.device, seq: int) -> nn.Module:
    """A Llama-architecture model with RANDOM weights, built directly on `device` in bf16."""
    model = build_llama(SHAPES[shape], DTYPE, device, seed=6, max_position_embeddings=max(seq, 128),
                        attn_implementation="sdpa")
    model.config.dtype = DTYPE  # the config names the weights' dtype, as from_config(..., dtype=) records it
    return model


def _to_bnb_4bit(model: nn.Module, device: torch.device) -> None:
    """Replace every nn.Linear but the head by bitsandbytes' Linear4bit (NF4, double quant, bf16 compute)."""
    import bitsandbytes as bnb

    head = model.get_output_embeddings()
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or module is head:
            continue
        new = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                compute_dtype=DTYPE, compress_statistics=True, quant_type="nf4", device="meta")
        new.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, quant_type="nf4",
                                       compress_statistics=True, blocksize=64).to(device)
        if module.bias is not None:
            new.bias = nn.Parameter(module.bias.data, requires_grad=False)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, new)
        del module


def _use_fused(model: nn.Module) -> int:
    """Route every LoRALinear of the model through `fast.fused_forward` (falling back where it declines)."""
    count = 0
    for _, layer in lora_layers(model):
        readable = layer.forward

        def forward(x: Tensor, layer: LoRALinear = layer, readable: Callable = readable) -> Tensor:
            y = fast.fused_forward(layer, x)
            return readable(x) if y is None else y

        layer.forward = forward
        count += 1
    return count


def _setup_train(kind: str, shape: str, device: torch.device, seq: int) -> tuple[nn.Module, list[Tensor]]:
    """The model of one row, "peft" (bitsandbytes 4-bit + PEFT) or "minilora" (NF4 + fused LoRA)."""
    model = _build_llama(shape, device, seq)
    if kind == "peft":
        from peft import LoraConfig, get_peft_model

        _to_bnb_4bit(model, device)
        model.is_loaded_in_4bit = True  # as from_pretrained(quantization_config=...) would mark it, for PEFT
        enable_checkpointing(model)
        model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    else:
        quantize_model(model, blocksize=64, double_quant=True, compute_dtype=DTYPE)
        enable_checkpointing(model)
        model.enable_input_require_grads()
        inject(model, target_modules="all-linear", r=R, lora_alpha=ALPHA)
        _use_fused(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params


def _time_steps(row: Row, model: nn.Module, params: list[Tensor], shape: str, device: torch.device,
                batch: int, seq: int, warmup: int, reps: int) -> None:
    """The loss before any update (B = 0: the 4-bit base model alone), then timed AdamW steps: tokens/s,
    and peak memory on a GPU."""
    row.info["trainable_params"] = sum(p.numel() for p in params)
    if device.type == "cuda":
        row.info["weights_gib"] = torch.cuda.memory_allocated(device) / 2**30
    opt = torch.optim.AdamW(params, lr=1e-4)
    torch.manual_seed(7)
    ids = torch.randint(0, SHAPES[shape].vocab, (batch, seq), device=device)

    def step() -> Tensor:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    with torch.no_grad():
        row.info["loss_step0"] = float(model(input_ids=ids, labels=ids).loss)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time_fn(step, warmup=warmup, reps=reps, device=device)
    row.ms = t.median_ms
    row.info["tokens_per_s"] = batch * seq / (t.median_ms * 1e-3)
    row.info.update(min_ms=t.min_ms, max_ms=t.max_ms, reps=t.reps, batch=batch, seq=seq,
                    grad_checkpointing=bool(getattr(model, "is_gradient_checkpointing", True)))
    if device.type == "cuda":
        row.peak_mib = torch.cuda.max_memory_allocated(device) / 2**20


def _compare_with_peft(row: Row, peft: Row) -> None:
    """minilora's row against PEFT's: step-0 losses must agree to 1e-2; ratio = tokens/s ours over PEFT's."""
    if "loss_step0" not in peft.info:
        return
    row.err = abs(row.info["loss_step0"] - peft.info["loss_step0"]) / abs(peft.info["loss_step0"])
    if not row.err <= 1e-2:
        row.status = "MISMATCH (step-0 loss)"
    row.ratio = row.info["tokens_per_s"] / peft.info["tokens_per_s"] if "tokens_per_s" in peft.info else None
    row.info["ratio_is"] = "tokens/s minilora / PEFT (higher is better)"
    if peft.peak_mib is not None and row.peak_mib is not None:
        row.info["peak_vs_peft"] = row.peak_mib / peft.peak_mib


def train_section(cfg: Settings) -> list[Row]:
    rows: list[Row] = []
    dev = cfg.device
    batch, seq = (4, 1024) if dev.type == "cuda" else (2, 32)
    shapes = (["1B"] if cfg.quick else ["1B", "8B"]) if dev.type == "cuda" else ["tiny"]
    warmup, reps = (1, 3) if cfg.quick or dev.type != "cuda" else (3, 8)
    for shape in shapes:
        done: dict[str, Row] = {}
        for kind, name in (("peft", "PEFT + bnb QLoRA"), ("minilora", "minilora fused QLoRA")):
            def body(row: Row, kind: str = kind) -> None:
                model, params = _setup_train(kind, shape, dev, seq)
                _time_steps(row, model, params, shape, dev, batch, seq, warmup, reps)
                if kind == "minilora" and "peft" in done:
                    _compare_with_peft(row, done["peft"])
                del model, params

            done[kind] = Row("train", name, f"{shape} B{batch} S{seq}")
            guard(rows, done[kind], body, dev)
    return rows
