"""Plain helpers the test files share (fixtures are in conftest.py): `from helpers import ...`.

pytest puts tests/ on sys.path (the folder has no __init__.py), so this module imports by its name. It needs
only torch at import time: PEFT is imported where a helper uses it, so a test file without PEFT still skips
at its own `pytest.importorskip("peft")`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from minilora.inject import lora_layers

ROOT = Path(__file__).resolve().parent.parent

ATOL = 1e-5  # fp32 comparisons with PEFT and with the formulas


class FakeNF4(nn.Module):
    """Stand-in with the 4-bit layer interface LoRA relies on: in/out_features, bias, forward, and
    dequantize() -> the (out, in) weight."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # round to a coarse grid, as a quantized weight would be
        self.register_buffer("codes", torch.round(linear.weight.detach() * 16).to(torch.int8))
        self.bias = nn.Parameter(linear.bias.detach().clone())

    def dequantize(self) -> torch.Tensor:
        return self.codes.float() / 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(), self.bias)


def randomize_B(model: nn.Module, adapter: str = "default", seed: int = 0) -> None:
    """Give every minilora lora_B a non-zero value, so that the adapters change the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            b = layer.lora_B[adapter]
            b.copy_(torch.randn(b.shape, generator=gen) * 0.05)


def randomize_peft_B(peft_model: nn.Module, seed: int) -> None:
    """Give every PEFT lora_B a non-zero value, so that a wrong adapter path changes the output."""
    from peft.tuners.lora import LoraLayer

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in peft_model.modules():
            if isinstance(module, LoraLayer):
                for linear in module.lora_B.values():
                    linear.weight.copy_(torch.randn(linear.weight.shape, generator=gen) * 0.05)


def copy_from_peft(peft_model: nn.Module, model: nn.Module, adapter: str = "default") -> None:
    """Copy A, B (and DoRA's magnitude) of every adapted layer from a PEFT model into the minilora model."""
    inner = peft_model.base_model.model
    with torch.no_grad():
        for name, layer in lora_layers(model):
            source = inner.get_submodule(name)
            layer.lora_A[adapter].copy_(source.lora_A[adapter].weight)
            layer.lora_B[adapter].copy_(source.lora_B[adapter].weight)
            if layer.use_dora[adapter]:
                layer.lora_magnitude_vector[adapter].copy_(source.lora_magnitude_vector[adapter].weight)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the model's state dict, to check later that nothing changed."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    """The same keys, shapes and values (bit for bit; NaN where NaN was) as `before`."""
    now = model.state_dict()
    return now.keys() == before.keys() and all(
        now[k].shape == before[k].shape and torch.allclose(now[k], before[k], rtol=0, atol=0, equal_nan=True)
        for k in before
    )


def load_tool(name: str) -> ModuleType:
    """The script tools/<name>.py as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_interpreted(script: str, **env: str) -> dict:
    """Run `script` in a fresh Python under Triton's interpreter (TRITON_INTERPRET=1: Triton kernels on CPU
    tensors) and return the JSON it prints on its last line starting with "RESULTS "; fail the test with the
    script's output when it crashes. A subprocess, because the interpreter is chosen when triton imports."""
    import pytest

    pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, TRITON_INTERPRET="1", **env),
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"interpreted checks crashed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULTS "):])


SMALL_LLAMA_TARGETS = ("q_proj", "v_proj", "gate_proj", "down_proj")


def small_llama(checkpointing: str | None = "non-reentrant", device: str = "cpu", layers: int = 3,
                qlora: bool = False, dora: bool = False) -> nn.Module:
    """A small Llama (float32, random weights, seed 0) with LoRA on SMALL_LLAMA_TARGETS (B != 0, so every adapter
    changes the output), in training mode; with transformers' gradient checkpointing of the kind named
    ("non-reentrant" or "reentrant") and the embeddings' output marked as requiring a gradient, or none.
    qlora: every linear layer but the head quantized to NF4 (double quantization) before the adapters; dora:
    DoRA adapters (a magnitude per output row) instead of LoRA's."""
    from bench.common import enable_checkpointing
    from minilora.inject import inject
    from minilora.memory import LlamaShape, build_llama

    m = build_llama(LlamaShape(hidden=64, intermediate=128, layers=layers, heads=4, kv_heads=2, vocab=256),
                    torch.float32, torch.device(device), seed=0, max_position_embeddings=128,
                    attn_implementation="sdpa")
    m.config.use_cache = False  # training: no key/value cache
    if checkpointing is not None:
        enable_checkpointing(m, reentrant=checkpointing == "reentrant")
        m.enable_input_require_grads()
    if qlora:
        from minilora.qlora import quantize_model

        quantize_model(m, double_quant=True, compute_dtype=torch.float32)
    inject(m, target_modules=list(SMALL_LLAMA_TARGETS), r=4, lora_alpha=8, init_lora_weights=False, use_dora=dora)
    return m.train()
