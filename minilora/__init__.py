"""minilora: low-rank adaptation from first principles.

Each module holds one idea of the course: `profiling` (how we measure), `lora` (the LoRA layer), `inject`
(putting adapters into a model), `io` (adapter files in PEFT's format), `nf4` and `double_quant` (4-bit
weights, bit-exact with bitsandbytes), `qlora` (LoRA on a 4-bit base), `dora`, `paged`, `loraplus`.
"""

__version__ = "0.1.0"
