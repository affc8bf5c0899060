"""minilora: low-rank adaptation from first principles.

Each module holds one idea of the course:
  profiling     how every figure is measured (device, CUDA-event timing, peak memory, environment record)
  memory        the memory of fine-tuning: bytes per parameter, activations of a Llama layer
  lora          the LoRA layer: y = W0 x + (alpha/r) B A x, merge/unmerge, several adapters
  inject        putting adapters into any PyTorch / Hugging Face model, merge_and_unload, task arithmetic
  io            adapter files in PEFT's format (safetensors + JSON), both ways
  nf4           4-bit NormalFloat, bit-exact with bitsandbytes
  double_quant  quantizing the quantization constants: 8-bit block scales
  bnb           the bitsandbytes boundary: to_bnb / from_bnb, its two CPU dequantizers named, its known
                AVX-512 divergence
  qlora         LinearNF4: a frozen 4-bit base layer; quantize_model
  dora          weight-decomposed LoRA (magnitude and direction)
  loraplus      LoRA+ optimizer parameter groups
  paged         PagedAdamW: optimizer state in host memory, paged to the GPU in chunks
  kernels       Triton kernels for NF4 and the LoRA weight, behind dispatchers (the chapters' PyTorch elsewhere)
  fast          fused autograd functions (one merged GEMM) used where they win; compiling a model, offloading
                its checkpointed layer inputs
  distributed   DDP and FSDP2: the 4-bit weight sharded as bytes, adapter files saved and loaded from ranks
  adalora       AdaLoRA: the update as P Λ Q, singular values pruned by importance to a rank budget
  adapters      what LoRA is compared with: bottleneck adapters in sequence, prefix tuning

A chapter imports only earlier chapters (ARCHITECTURE.md). Where a later one extends an earlier one, it plugs
in below, at the end of this file: double quantization into nf4, DoRA and the fused forward into LoRALinear.

The course kit (the generated task, report tables, graders and the checker) is the subpackage
`minilora.course`; nothing here imports it.
"""

from minilora import distributed, double_quant, dora, fast, lora, nf4, paged
from minilora.bnb import from_bnb, to_bnb  # (importing bnb also quiets a bitsandbytes log line; see its docstring)
from minilora.inject import (
    add_weighted_adapter,
    count_parameters,
    delete_adapter,
    disable_adapter,
    disable_adapters,
    merge_and_unload,
    print_trainable_parameters,
    set_adapter,
)
from minilora.io import load_adapter, save_adapter

# `minilora.inject` is the module minilora/inject.py (calling it calls minilora.inject.inject), not a function
# bound over it: `import minilora.inject as m` gives the module.
from minilora.lora import LoRALinear
from minilora.loraplus import loraplus_param_groups, make_loraplus_optimizer
from minilora.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4
from minilora.paged import PagedAdamW
from minilora.qlora import LinearNF4, quantize_model
from minilora.adalora import AdaLoRAConfig, RankAllocator, inject_adalora, load_adalora, save_adalora
from minilora.adapters import PrefixTuning, insert_adapters

# Later chapters plug into earlier ones, which never import them:
nf4.set_double_quantize(double_quant.double_quantize)  # ch5 -> ch4: quantize_nf4(..., double_quant=True)
lora.register_variant("dora", dora.DoraVariant)  # ch8 -> ch2: LoRALinear(..., use_dora=True)
lora.set_fused_forward(fast.fused_forward)  # ch10 -> ch2: LoRALinear's forward on CUDA (fused=None)
paged.set_fused_update(fast.paged_adamw_update)  # ch10 -> ch7: PagedAdamW's update, one Triton kernel on CUDA

__version__ = "0.1.0"

__all__ = [
    "LoRALinear", "inject", "merge_and_unload", "set_adapter", "disable_adapter", "disable_adapters", "delete_adapter",
    "add_weighted_adapter",
    "count_parameters", "print_trainable_parameters", "save_adapter", "load_adapter",
    "loraplus_param_groups", "make_loraplus_optimizer",
    "NF4Tensor", "quantize_nf4", "dequantize_nf4", "to_bnb", "from_bnb", "LinearNF4", "quantize_model",
    "PagedAdamW",
    "AdaLoRAConfig", "inject_adalora", "RankAllocator", "save_adalora", "load_adalora",
    "insert_adapters", "PrefixTuning",
]
